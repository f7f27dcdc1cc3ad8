// SPDX-License-Identifier: Apache-2.0

// Package ha writes what an active/standby pair of uplinkd gateways runs
// beside the agent: keepalived's config (one VRRP instance moving the
// LAN's and every line's virtual address together), conntrackd's (FTFW
// over the direct link, so that the standby holds the master's
// connections, NAT mappings included) and the notify script keepalived
// runs at each transition. uplinkd itself speaks neither protocol.
package ha

import (
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/uplinkd/uplinkd/control/config"
)

// File names in the directory the configs are written to.
const (
	KeepalivedConf = "keepalived.conf"
	ConntrackdConf = "conntrackd.conf"
	NotifyScript   = "uplinkd-ha-notify"
)

// SyncPort is conntrackd's UDP port on the sync link.
const SyncPort = 3780

// Files are the daemons' configs, by file name.
type Files map[string]string

// Paths says where the files live once written, and the uplinkd binary
// and config file the notify script calls.
type Paths struct {
	Dir        string // absolute
	Uplinkd    string // absolute path of the uplinkd binary
	ConfigFile string // absolute path of this gateway's uplinkd config
}

// ConntrackdSocket is conntrackd's control socket for a gateway whose
// state directory is stateDir (one per gateway, so that two can share a
// machine in a lab).
func ConntrackdSocket(stateDir string) string { return filepath.Join(stateDir, "conntrackd.ctl") }

// maxSocketPath is the longest UNIX socket path conntrackd takes.
const maxSocketPath = 107

// ConntrackdLock is conntrackd's lock file for a gateway's state dir.
func ConntrackdLock(stateDir string) string { return filepath.Join(stateDir, "conntrackd.lock") }

// Render returns the three files for c, which must have an ha block.
func Render(c *config.Config, p Paths) (Files, error) {
	if c.HA == nil {
		return nil, fmt.Errorf("the config has no ha block")
	}
	for _, s := range []string{p.Dir, p.Uplinkd, p.ConfigFile, c.StateDir} {
		if !filepath.IsAbs(s) {
			return nil, fmt.Errorf("want absolute paths, got %q", s)
		}
		// The paths go into a shell script and keepalived's quoted
		// strings unescaped: refuse what would be read as more.
		if i := strings.IndexFunc(s, unsafePathRune); i >= 0 {
			return nil, fmt.Errorf("path %q: %q would need quoting in keepalived's config and the notify script: use a path of letters, digits and ._-/+@:,=~", s, s[i])
		}
	}
	// conntrackd refuses a control socket path of over 107 bytes (a
	// sockaddr_un); the agent could not reach it.
	if sock := ConntrackdSocket(c.StateDir); len(sock) > maxSocketPath {
		return nil, fmt.Errorf("conntrackd's control socket %s would be %d bytes long, conntrackd takes at most %d: use a shorter state_dir", sock, len(sock), maxSocketPath)
	}
	return Files{
		KeepalivedConf: keepalived(c, p),
		ConntrackdConf: conntrackd(c),
		NotifyScript:   notify(c, p),
	}, nil
}

// unsafePathRune reports a rune a rendered path may not hold.
func unsafePathRune(r rune) bool {
	switch {
	case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
		return false
	}
	return !strings.ContainsRune("._-/+@:,=~", r)
}

// keepalived is one VRRP instance: both gateways start as BACKUP and the
// higher priority wins. It faults without a LAN interface or without an
// agent that answers (uplinkd ha check); uplinkd ha check -lines lowers the
// priority by lowerWeight while the agent is starting or a line is not fit
// here. It tracks no line interface itself.
func keepalived(c *config.Config, p Paths) string {
	ha := c.HA
	var b strings.Builder
	lan := c.LAN.Interfaces[0]
	fmt.Fprintf(&b, `# Written by uplinkd ha configs for %s: keepalived moves the LAN's and
# every line's virtual address to the master, together.
global_defs {
    # VRRPv3: sub-second adverts (VRRPv2 rounds advert_int up to 1 s).
    vrrp_version 3
    script_user root
    enable_script_security
}

# Without a running agent (NAT, routes, steering) the VIPs are worth
# nothing here: fault, the peer takes over, whatever the priorities.
vrrp_script uplinkd_agent {
    script "%[7]s ha check -c %[1]s"
    interval 1
    timeout 2
    fall 2
    rise 1
}

# Fails for the agent's first %[6]v unless it is master (its
# lines' health, conntrackd's resync), while one of its lines is without
# link or not up by its probes (unless the operator took it down), and on
# the master while a line's VIP is missing: the priority drops, so the
# peer holds the VIPs meanwhile if it has none of these (a line dead for
# both lowers both: the master stays). Three good checks in a row to come
# back, so that a flapping line does not bounce the VIPs every second.
# Not a fault: a gateway with such a reason still beats no gateway. With
# priorities %[8]d or more apart the higher one keeps the VIPs anyway.
vrrp_script uplinkd_lines {
    script "%[7]s ha check -lines -c %[1]s"
    interval 1
    timeout 2
    fall 2
    rise %[9]d
    init_fail
    weight -%[8]d
}

vrrp_instance uplinkd {
    state BACKUP
    interface %[2]s
    virtual_router_id %d
    priority %d
    advert_int %s
    # Without the LAN this gateway is useless: fault, the peer takes over.
    # Its lines are the agent's to judge (uplinkd_lines): a line's link
    # down is no fault here, or a line dying for both gateways would take
    # the whole site down.
    track_interface {
`, p.ConfigFile, lan, ha.RouterID, ha.Priority, seconds(ha.AdvertInterval), ReadyAfter(c), p.Uplinkd, lowerWeight, LinesRise)
	for _, ifname := range c.LAN.Interfaces {
		fmt.Fprintf(&b, "        %s\n", ifname)
	}
	b.WriteString(`    }
    track_script {
        uplinkd_agent
        uplinkd_lines
    }
    virtual_ipaddress {
`)
	fmt.Fprintf(&b, "        %s dev %s\n", ha.LANVIPPrefix, lan)
	for _, l := range c.Lines {
		// no_track: a VIP's interface going down would otherwise fault
		// the instance, on both gateways when the line dies for both.
		fmt.Fprintf(&b, "        %s dev %s no_track    # %s's NAT source\n", l.VIPPrefix, l.Interface, l.Name)
	}
	script := filepath.Join(p.Dir, NotifyScript)
	fmt.Fprintf(&b, `    }
    notify_master "%[1]s master"
    notify_backup "%[1]s backup"
    notify_fault "%[1]s fault"
}
`, script)
	return b.String()
}

// conntrackd syncs by FTFW (reliable, with resends) over UDP on the sync
// link, TCP and UDP only, ignoring the gateway's own addresses.
func conntrackd(c *config.Config) string {
	ha := c.HA
	var own []string
	own = append(own, "127.0.0.1", ha.AddressAddr.String())
	for _, l := range c.Lines {
		own = append(own, l.Prefix.Addr().String())
	}
	var ignore strings.Builder
	for _, a := range own {
		fmt.Fprintf(&ignore, "\t\t\tIPv4_address %s\n", a)
	}
	return fmt.Sprintf(`# Written by uplinkd ha configs: the master's connections, NAT mappings
# included, copied to the standby over the sync link, straight into its
# kernel table (no external cache): a takeover has nothing to commit, so
# no packet meets the new master before it knows the connections.
Sync {
	Mode FTFW {
		DisableExternalCache On
		# A periodic bulk (uplinkd's resync) of more connections than
		# the resend queue holds left the same ones unrefreshed each time.
		ResendQueueSize %d
	}
	UDP {
		IPv4_address %s
		IPv4_Destination_Address %s
		Port %d
		Interface %s
		SndSocketBuffer 1249280
		RcvSocketBuffer 1249280
		Checksum on
	}
}

General {
	# Room for twice as many connections as the flow map holds
	# (datapath.flow_entries): a connection past HashLimit is not synced.
	HashSize %d
	HashLimit %d
	LogFile off
	Syslog off
	LockFile %s
	UNIX {
		Path %s
	}
	NetlinkBufferSize 2097152
	NetlinkBufferSizeMaxGrowth 8388608
	Filter From Userspace {
		Protocol Accept {
			TCP
			UDP
		}
		Address Ignore {
%s		}
	}
}
`, hashLimit(c), ha.AddressAddr, ha.PeerAddr, SyncPort, ha.SyncInterface, hashLimit(c)/4, hashLimit(c),
		ConntrackdLock(c.StateDir), ConntrackdSocket(c.StateDir), ignore.String())
}

// hashLimit is conntrackd's HashLimit, the most connections its caches
// hold: conntrackd's documentation asks for twice nf_conntrack_max; the
// config's measure of the connections a gateway carries is its flow map.
func hashLimit(c *config.Config) int {
	return 2 * int(c.Datapath.FlowEntries)
}

// notify is conntrackd's sequence for a pair without external cache,
// then word to the agent, which then reports the takeover.
func notify(c *config.Config, p Paths) string {
	ct := fmt.Sprintf("conntrackd -C %s", filepath.Join(p.Dir, ConntrackdConf))
	return fmt.Sprintf(`#!/bin/sh
# Written by uplinkd ha configs: keepalived runs it at every VRRP
# transition of this gateway, with the new state as $1.
CONNTRACKD="%[1]s"
UPLINKD="%[2]s ha notify"    # then the state, then -c FILE
CONFIG="%[3]s"
# The peer's connections are in the kernel already (DisableExternalCache):
# nothing to commit, and no "conntrackd -t" on the way down, which would
# expire them here.
case "$1" in
master)
	$CONNTRACKD -f    # flush the internal cache
	$CONNTRACKD -R    # resync it with the kernel
	$CONNTRACKD -B    # send everything to the peer
	$UPLINKD master -c "$CONFIG"
	;;
backup)
	$CONNTRACKD -n    # ask the new master for its connections
	$UPLINKD backup -c "$CONFIG"
	;;
fault)
	$UPLINKD fault -c "$CONFIG"
	;;
*)
	echo "usage: $0 master|backup|fault" >&2
	exit 2
	;;
esac
exit 0
`, ct, p.Uplinkd, p.ConfigFile)
}

// ReadyAfter is how long an agent runs before it may hold the VIPs
// (uplinkd ha check fails until then): uplinkd's up_after health rounds
// and two more (a line whose health is not known yet would have its
// flows moved or reset), at least 5 s for conntrackd's resync.
func ReadyAfter(c *config.Config) time.Duration {
	return max(5*time.Second, time.Duration(c.Health.UpAfter+2)*c.Health.Interval)
}

// LinesRise is how many good checks in a row (a second apart) give a
// gateway its priority back after uplinkd ha check -lines failed.
const LinesRise = 3

// lowerWeight is what a failing uplinkd ha check takes off this gateway's
// VRRP priority: half its range, so that with both gateways' priorities up
// to 127 apart the one that lost a line gives way, and with a line down on
// both, the master stays.
const lowerWeight = 128

// seconds writes d as keepalived's advert_int: seconds with two decimals.
func seconds(d time.Duration) string {
	return strings.TrimRight(strings.TrimRight(fmt.Sprintf("%.2f", d.Seconds()), "0"), ".")
}
