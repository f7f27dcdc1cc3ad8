// SPDX-License-Identifier: Apache-2.0

package ha

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/uplinkd/uplinkd/control/config"
)

const pair = `lan: {interfaces: [lan0]}
nat: snat
state_dir: /run/uplinkd-gw1
uplinks:
  - {name: dsl1, interface: wan1, gateway: 198.51.100.1, address: 198.51.100.2/28, vip: 198.51.100.4/28}
  - {name: dsl2, interface: wan2, gateway: 198.51.100.17, address: 198.51.100.18/28, vip: 198.51.100.20/28}
ha:
  sync_interface: sync0
  address: 203.0.113.249
  peer: 203.0.113.250
  priority: 150
  advert_interval: 100ms
  lan_vip: 192.0.2.1/24
`

var paths = Paths{Dir: "/etc/uplinkd/ha", Uplinkd: "/usr/sbin/uplinkd", ConfigFile: "/etc/uplinkd/uplinkd.yaml"}

// The three files carry every number of the ha block and every VIP, and
// the notify script commits conntrackd's cache before it tells the agent.
func TestRender(t *testing.T) {
	c, err := config.Parse("pair.yaml", []byte(pair))
	if err != nil {
		t.Fatal(err)
	}
	f, err := Render(c, paths)
	if err != nil {
		t.Fatal(err)
	}
	for file, want := range map[string][]string{
		KeepalivedConf: {"vrrp_version 3", "state BACKUP", "interface lan0", "virtual_router_id 51", "priority 150", "advert_int 0.1\n",
			"192.0.2.1/24 dev lan0\n", "198.51.100.4/28 dev wan1 no_track", "198.51.100.20/28 dev wan2 no_track",
			"track_interface {\n        lan0\n    }", "init_fail\n", "weight -128\n",
			"track_script {\n        uplinkd_agent\n        uplinkd_lines\n    }", "script \"/usr/sbin/uplinkd ha check -c /etc/uplinkd/uplinkd.yaml\"\n",
			`script "/usr/sbin/uplinkd ha check -lines -c /etc/uplinkd/uplinkd.yaml"`, "rise 3\n",
			`notify_master "/etc/uplinkd/ha/uplinkd-ha-notify master"`},
		ConntrackdConf: {"Mode FTFW", "IPv4_address 203.0.113.249", "IPv4_Destination_Address 203.0.113.250", "Interface sync0",
			"LockFile /run/uplinkd-gw1/conntrackd.lock", "Path /run/uplinkd-gw1/conntrackd.ctl",
			"IPv4_address 198.51.100.2\n", "IPv4_address 198.51.100.18\n",
			"HashLimit 2097152\n", "ResendQueueSize 2097152\n"},
		NotifyScript: {"#!/bin/sh", `CONNTRACKD="conntrackd -C /etc/uplinkd/ha/conntrackd.conf"`,
			`UPLINKD="/usr/sbin/uplinkd ha notify"`, `CONFIG="/etc/uplinkd/uplinkd.yaml"`, `$UPLINKD master -c "$CONFIG"`},
	} {
		for _, w := range want {
			if !strings.Contains(f[file], w) {
				t.Errorf("%s lacks %q:\n%s", file, w, f[file])
			}
		}
	}
	// The standby holds the peer's connections in its kernel (no external
	// cache): the new master resyncs and sends a bulk update before it
	// tells the agent, and nothing shortens the kernel's timers (-t would
	// expire the synced connections).
	master := f[NotifyScript][strings.Index(f[NotifyScript], "master)"):]
	master = master[:strings.Index(master, ";;")]
	if b, u := strings.Index(master, "$CONNTRACKD -B"), strings.Index(master, "$UPLINKD master"); b < 0 || u < b {
		t.Errorf("master: want the bulk update before the agent is told:\n%s", master)
	}
	if strings.Contains(f[NotifyScript], "$CONNTRACKD -t") || strings.Contains(f[NotifyScript], "$CONNTRACKD -c") {
		t.Errorf("notify script commits or shortens timers:\n%s", f[NotifyScript])
	}
	if !strings.Contains(f[ConntrackdConf], "DisableExternalCache On") {
		t.Errorf("conntrackd keeps an external cache:\n%s", f[ConntrackdConf])
	}
	// The VIPs are not conntrackd's to ignore: flows NAT'd to them are
	// what it syncs.
	for _, vip := range []string{"198.51.100.4", "198.51.100.20", "192.0.2.1\n"} {
		if strings.Contains(f[ConntrackdConf], "IPv4_address "+vip) {
			t.Errorf("conntrackd ignores the VIP %s", vip)
		}
	}
}

func TestRenderRefuses(t *testing.T) {
	c, err := config.Parse("pair.yaml", []byte(pair))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Render(c, Paths{Dir: "ha", Uplinkd: paths.Uplinkd, ConfigFile: paths.ConfigFile}); err == nil {
		t.Error("a relative dir accepted")
	}
	for _, bad := range []string{"/etc/up linkd.yaml", `/etc/x"$(id)".yaml`, "/etc/x`id`.yaml", "/etc/x;y.yaml"} {
		if _, err := Render(c, Paths{Dir: paths.Dir, Uplinkd: paths.Uplinkd, ConfigFile: bad}); err == nil {
			t.Errorf("config path %q accepted", bad)
		}
	}
	// conntrackd takes a control socket path of at most 107 bytes.
	long := *c
	long.StateDir = "/run/" + strings.Repeat("d", maxSocketPath-len("/run//conntrackd.ctl"))
	if _, err := Render(&long, paths); err != nil {
		t.Errorf("a socket path of %d bytes refused: %v", len(ConntrackdSocket(long.StateDir)), err)
	}
	long.StateDir += "d"
	if _, err := Render(&long, paths); err == nil || !strings.Contains(err.Error(), "state_dir") {
		t.Errorf("a socket path of %d bytes: %v, want it refused", len(ConntrackdSocket(long.StateDir)), err)
	}
	c.HA = nil
	if _, err := Render(c, paths); err == nil {
		t.Error("a config without ha block accepted")
	}
}

// An agent is ready for the VIPs after up_after rounds and two more, at
// least 5 s.
func TestReadyAfter(t *testing.T) {
	for _, tc := range []struct {
		health string
		want   time.Duration
	}{
		{"health: {interval: 200ms, up_after: 3}\n", 5 * time.Second},
		{"health: {interval: 1m, timeout: 1s, up_after: 100}\n", 102 * time.Minute},
	} {
		c, err := config.Parse("pair.yaml", []byte(pair+tc.health))
		if err != nil {
			t.Fatal(err)
		}
		if got := ReadyAfter(c); got != tc.want {
			t.Errorf("%s: ReadyAfter %v, want %v", strings.TrimSpace(tc.health), got, tc.want)
		}
	}
}

func TestSeconds(t *testing.T) {
	for _, tc := range []struct {
		ms   int
		want string
	}{{10, "0.01"}, {100, "0.1"}, {1000, "1"}, {1250, "1.25"}} {
		if got := seconds(time.Duration(tc.ms) * time.Millisecond); got != tc.want {
			t.Errorf("%d ms: %q, want %q", tc.ms, got, tc.want)
		}
	}
}

// Resync speaks conntrackd's control protocol: one native-endian int per
// connection, the request, then it reads until conntrackd closes; -B (send
// the cache to the peer), after -R (dump the kernel table) when asked.
func TestResync(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "ctl")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make(chan uint32, 8)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			b := make([]byte, 8)
			if n, _ := io.ReadAtLeast(c, b, 4); n == 4 {
				got <- binary.NativeEndian.Uint32(b)
			} else {
				got <- 0
			}
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	requests := func() []uint32 {
		var r []uint32
		for {
			select {
			case v := <-got:
				r = append(r, v)
			case <-time.After(100 * time.Millisecond):
				return r
			}
		}
	}
	for _, c := range []struct {
		dump bool
		want []uint32
	}{{false, []uint32{sendBulk}}, {true, []uint32{ctResyncMaster, sendBulk}}} {
		if err := Resync(ctx, sock, c.dump); err != nil {
			t.Fatal(err)
		}
		if r := requests(); !slices.Equal(r, c.want) {
			t.Errorf("Resync(dump %v): conntrackd got requests %v, want %v", c.dump, r, c.want)
		}
	}
	if err := Resync(ctx, filepath.Join(t.TempDir(), "none"), false); err == nil {
		t.Error("resync with no conntrackd listening: no error")
	}
}

func TestResyncEvery(t *testing.T) {
	for _, c := range []struct{ timeout, want time.Duration }{
		{120 * time.Second, 40 * time.Second},
		{6 * time.Second, 2 * time.Second},
		{time.Second, time.Second},
		{0, time.Second},
	} {
		if got := ResyncEvery(c.timeout); got != c.want {
			t.Errorf("ResyncEvery(%v) = %v, want %v", c.timeout, got, c.want)
		}
	}
}
