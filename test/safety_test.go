// SPDX-License-Identifier: Apache-2.0

package test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/uplinkd/uplinkd/control/events"
	"github.com/uplinkd/uplinkd/test/lab"
)

// On a machine where nothing mounted bpffs (a fresh Debian machine), the
// agent mounts it itself, runs, and down removes its pins. The whole run
// happens in a private mount namespace with /sys/fs/bpf unmounted; the
// shell waits on the pinned flow map (kernel state), not on a log line.
func TestRunWithoutBPFFSMounted(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	rep := faults(t, l, "run and down with bpffs unmounted")
	rep.Injected = 1
	pin := "/sys/fs/bpf/uplinkd-" + l.Prefix + "-nofs"
	cfg := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, PinDir: pin}))
	script := `set -eu
umount /sys/fs/bpf 2>/dev/null || true
if mountpoint -q /sys/fs/bpf; then echo "bpffs still mounted"; exit 3; fi
"$UPLINKD" run -c "$CFG" 2>"$LOG" & pid=$!
i=0; until [ -e "$PIN/ul_flows" ]; do i=$((i+1)); [ $i -lt 600 ] || { echo "no pins after 30s"; kill $pid; exit 4; }; sleep 0.05; done
mountpoint -q /sys/fs/bpf || { echo "agent pinned without bpffs"; exit 5; }
kill -TERM $pid; wait $pid
"$UPLINKD" down -c "$CFG"
[ ! -e "$PIN" ] || { echo "pins left after down"; exit 6; }
echo ok`
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	log := filepath.Join(t.TempDir(), "agent.log")
	cmd := l.Gateway.Command(ctx, "unshare", "--mount", "--propagation", "private", "sh", "-c", script)
	cmd.Env = append(os.Environ(), "UPLINKD="+uplinkd, "CFG="+cfg, "PIN="+pin, "LOG="+log)
	out, err := cmd.CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "ok" {
		agentLog, _ := os.ReadFile(log)
		t.Fatalf("%v\n%s\nagent log:\n%s", err, out, agentLog)
	}
	if _, err := os.Stat(pin); !os.IsNotExist(err) {
		t.Errorf("pin dir %s visible outside the private mount namespace: %v", pin, err)
	}
}

// A pin dir that is not on a bpf filesystem is a config error (exit 2,
// naming the field) for plan and run alike, and nothing is touched; down
// with such a pin dir deletes nothing there.
func TestPinDirNotOnBPFFS(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	rep := faults(t, l, "pin_dir not on bpffs")
	rep.BadInputs = 3
	dir := t.TempDir()
	keep := filepath.Join(dir, "keep")
	if err := os.WriteFile(keep, []byte("mine"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, PinDir: dir}))
	for _, c := range []string{"plan", "run"} {
		out, code := exitCode(t, l, c, "-c", cfg)
		if code != 2 || !strings.Contains(out, "datapath.pin_dir: "+dir+" is not on a bpf filesystem") {
			t.Errorf("%s: exit %d\n%s\nwant exit 2 naming datapath.pin_dir", c, code, out)
		}
	}
	out, _ := exitCode(t, l, "down", "-c", cfg)
	if b, err := os.ReadFile(keep); err != nil || string(b) != "mine" {
		t.Errorf("down touched %s (%v):\n%s", keep, err, out)
	}
}

// exitCode runs uplinkd in the lab gateway and returns its output and exit
// status.
func exitCode(t *testing.T, l *lab.Lab, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := l.Gateway.Command(ctx, uplinkd, args...)
	out, err := cmd.CombinedOutput()
	if err != nil && cmd.ProcessState == nil {
		t.Fatal(err)
	}
	return string(out), cmd.ProcessState.ExitCode()
}

// down while an agent runs would race it (the agent puts routing back and
// may save its own sysctl values as the originals): it is refused, naming
// the agent, and nothing is removed.
func TestDownRefusedWhileAgentRuns(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	rep := faults(t, l, "down while the agent runs")
	rep.Injected = 1
	cfg := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state}))
	a := startAgent(t, l, cfg)
	before := snapshot(t, l, "wan1", "wan2")
	out, code := exitCode(t, l, "down", "-c", cfg)
	if code != 1 || !strings.Contains(out, "an agent is running") || !strings.Contains(out, "pid "+strconv.Itoa(a.cmd.Process.Pid)) {
		t.Errorf("down: exit %d\n%s\nwant exit 1 naming the agent's pid %d", code, out, a.cmd.Process.Pid)
	}
	if after := snapshot(t, l, "wan1", "wan2"); after != before {
		t.Errorf("a refused down changed the kernel:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// A lock file left by a crashed agent, naming a pid that now belongs to an
// unrelated process, makes `line down` signal nobody.
func TestLineDownSignalsNoStranger(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	rep := faults(t, l, "stale lock naming a reused pid")
	rep.Injected = 1
	cfg := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state}))
	stranger := exec.Command("sleep", "30")
	if err := stranger.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stranger.Process.Kill(); stranger.Wait() })
	if err := os.WriteFile(filepath.Join(state, "uplinkd.lock"), []byte(strconv.Itoa(stranger.Process.Pid)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, code := exitCode(t, l, "line", "down", "dsl1", "-c", cfg)
	if code != 0 || !strings.Contains(out, "no agent runs") {
		t.Errorf("line down: exit %d\n%s\nwant no agent notified", code, out)
	}
	if err := stranger.Process.Signal(syscall.Signal(0)); err != nil {
		t.Errorf("the unrelated process is gone: %v", err)
	}
	if stranger.ProcessState != nil {
		t.Errorf("the unrelated process exited: %v", stranger.ProcessState)
	}
}

// A gateway full of others' objects: a firewall table, rules and routes in
// the number ranges uplinkd uses (but not at its own numbers), dhcp routes
// in main, a foreign pin in its pin dir. uplinkd runs beside them, and
// after down every one of them is as it was, byte for byte.
func TestForeignObjectsCoexist(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	rep := faults(t, l, "others' table, rules, routes, pin")
	rep.Injected = 9
	pin := l.PinDir()
	if err := os.Mkdir(pin, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(pin) })
	foreignPin := filepath.Join(pin, "someone_else")
	if out, err := exec.Command("bpftool", "map", "create", foreignPin, "type", "array", "key", "4", "value", "4", "entries", "1", "name", "someone_else").CombinedOutput(); err != nil {
		t.Fatalf("bpftool map create: %v\n%s", err, out)
	}
	for _, cmd := range [][]string{
		{"nft", "add table inet filter"},
		{"nft", "add chain inet filter input { type filter hook input priority 0; policy accept; }"},
		{"nft", `add rule inet filter input tcp dport 22 accept comment "the host's ssh"`},
		{"ip", "rule add prio 110 lookup 300 proto static"},
		{"ip", "rule add prio 210 from 10.9.9.0/24 lookup 300 proto dhcp"},
		{"ip", "rule add prio 40 lookup 300 proto 85"},
		{"ip", "route add 10.9.9.0/24 dev lan0 table 210 proto static"},
		{"ip", "route add 10.8.8.0/24 dev lan0 proto dhcp"},
		{"ip", "route add 10.7.7.0/24 dev lan0 table 300 proto 85"},
	} {
		gw(t, l, cmd[0], strings.Fields(cmd[1])...)
	}
	before := snapshot(t, l, "wan1", "wan2")
	cfg := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state}))
	a := startAgent(t, l, cfg)
	srv := echoServer(t, l)
	checkPinned(t, l, openFlows(t, l, srv.Addr, 10, true))
	a.stop(t)
	gw(t, l, uplinkd, "down", "-c", cfg)
	if after := snapshot(t, l, "wan1", "wan2"); after != before {
		rep.ForeignTouched++
		t.Errorf("foreign objects changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if _, err := os.Stat(foreignPin); err != nil {
		t.Errorf("the foreign pin is gone: %v", err)
	}
	os.Remove(foreignPin)
}

// Where uplinkd's own numbers are taken by others (a route in a line's
// table, a rule at its priority, a table of its nftables name), run
// refuses, naming what is in the way, and changes nothing.
func TestForeignObjectsInTheWayRefused(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, setup, extra, want string
	}{
		{"route in a line's table", "route add default via 198.51.100.1 table 201 proto static", "", "route default table 201 proto 4"},
		{"rule at a line's priority", "rule add prio 101 lookup 300 proto static", "", "rule prio 101 lookup 300 proto 4"},
		{"the firewall's nftables table", "", "routing:\n  nft_table: filter\n", "nftables table inet filter exists and is not created by uplinkd"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			l, state := newLab(t, lab.Options{})
			rep := faults(t, l, "numbers taken: "+tc.name)
			rep.BadInputs = 1
			gw(t, l, "nft", strings.Fields("add table inet filter")...)
			gw(t, l, "nft", strings.Fields("add chain inet filter input { type filter hook input priority 0; policy accept; }")...)
			if tc.setup != "" {
				gw(t, l, "ip", strings.Fields(tc.setup)...)
			}
			before := snapshot(t, l, "wan1", "wan2")
			cfg := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, Extra: tc.extra}))
			out, code := exitCode(t, l, "run", "-c", cfg)
			if code != 1 || !strings.Contains(out, tc.want) {
				t.Errorf("run: exit %d\n%s\nwant exit 1 naming %q", code, out, tc.want)
			}
			exitCode(t, l, "down", "-c", cfg)
			if after := snapshot(t, l, "wan1", "wan2"); after != before {
				t.Errorf("a refused run and down changed the kernel:\nbefore:\n%s\nafter:\n%s", before, after)
			}
		})
	}
}

// Forwarding is never on without uplinkd's firewall, at any instant of a
// start: the agent is killed (-9) at 20 points of its first apply
// ($UPLINKD_KILL_TRIALS: the kernel matrix's VMs use fewer), and each
// time ip_forward=1 comes with the stateful forward rules in place.
func TestForwardingNeverWithoutFirewall(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	rep := faults(t, l, "kill -9 during a start")
	cfg := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state}))
	forwarding := func() bool { return strings.TrimSpace(gw(t, l, "cat", "/proc/sys/net/ipv4/ip_forward")) == "1" }
	// How long a warm start takes here (the first loads kernel modules,
	// seconds in an emulated VM): the kills are spread over it.
	var start time.Duration
	for range 2 {
		begin := time.Now()
		a := spawnAgent(t, l, cfg)
		for !forwarding() {
			if time.Since(begin) > agentWait {
				t.Fatal("forwarding never went on")
			}
			time.Sleep(5 * time.Millisecond)
		}
		start = time.Since(begin)
		a.kill9(t)
		exitCode(t, l, "down", "-c", cfg)
	}
	trials := 20
	if v := os.Getenv("UPLINKD_KILL_TRIALS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("UPLINKD_KILL_TRIALS=%q: want a positive number", v)
		}
		trials = n
	}
	seen := 0
	for i := range trials {
		rep.Injected++
		a := spawnAgent(t, l, cfg)
		// Up to 1.6 times a start: others load the machine too.
		after := start * time.Duration(i) * 8 / time.Duration(5*trials)
		time.Sleep(after)
		a.kill9(t)
		if forwarding() {
			seen++
			out, err := l.Gateway.Run(context.Background(), "nft", "list", "chain", "inet", "uplinkd", "forward")
			if err != nil {
				out = err.Error()
			}
			if !strings.Contains(out, "ct state established,related") || !strings.Contains(out, "ct state invalid") {
				t.Errorf("killed after %v: forwarding on without the firewall:\n%s", after, out)
			}
		}
		if out, code := exitCode(t, l, "down", "-c", cfg); code != 0 {
			t.Fatalf("down: exit %d\n%s", code, out)
		}
	}
	t.Logf("a start takes %v; forwarding was on after %d of %d kills", start.Round(time.Millisecond), seen, trials)
	if seen == 0 || seen == trials {
		t.Errorf("forwarding was on after %d of %d kills: the kills did not span the start", seen, trials)
	}
}

// What someone else removes comes back by itself, each kind within a
// fraction of a second (events: inotify for pins, nfnetlink for the
// nftables table, rtnetlink netconf for forwarding and rp_filter): an
// unpinned datapath link (which detaches it), uplinkd's nftables table,
// ip_forward and a line's rp_filter.
func TestRepairsOfOthersEdits(t *testing.T) {
	t.Parallel()
	requireTCX(t)
	l, state := newLab(t, lab.Options{})
	rep := faults(t, l, "others' edits of uplinkd's state")
	rep.Injected = 4
	cfg := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state}))
	startAgent(t, l, cfg)
	lanPin := filepath.Join(l.PinDir(), "links", l.LANInterface+"_ingress")
	sysctl := func(k string) string { return strings.TrimSpace(gw(t, l, "cat", "/proc/sys/"+k)) }
	for _, c := range []struct {
		what string
		edit []string
		back func() bool
	}{
		{"unpinned LAN ingress link", []string{"rm", lanPin}, func() bool {
			_, err := os.Stat(lanPin)
			return err == nil && len(tcxPrograms(t, l)) == 1
		}},
		{"deleted nftables table", []string{"nft", "delete", "table", "inet", "uplinkd"}, func() bool {
			_, err := l.Gateway.Run(context.Background(), "nft", "list", "chain", "inet", "uplinkd", "forward")
			return err == nil
		}},
		{"ip_forward turned off", []string{"sh", "-c", "echo 0 >/proc/sys/net/ipv4/ip_forward"}, func() bool {
			return sysctl("net/ipv4/ip_forward") == "1"
		}},
		{"rp_filter on wan1 made strict", []string{"sh", "-c", "echo 1 >/proc/sys/net/ipv4/conf/wan1/rp_filter"}, func() bool {
			return sysctl("net/ipv4/conf/wan1/rp_filter") == "2"
		}},
	} {
		if !c.back() {
			t.Fatalf("%s: not in place before the test", c.what)
		}
		gw(t, l, c.edit[0], c.edit[1:]...)
		eventually(t, c.what+" restored", c.back)
	}
}

// Two agents with their own state dirs on one pin dir would fight over the
// buckets and the reset rules: the second is refused, naming the first.
func TestOneAgentPerPinDir(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	rep := faults(t, l, "a second agent on the pin dir")
	rep.Injected = 2
	first := startAgent(t, l, writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state})))
	second := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: t.TempDir()}))
	out, code := exitCode(t, l, "run", "-c", second)
	want := "is in use by pid " + strconv.Itoa(first.cmd.Process.Pid)
	if code != 1 || !strings.Contains(out, want) {
		t.Errorf("second agent: exit %d\n%s\nwant exit 1 and %q", code, out, want)
	}
	out, code = exitCode(t, l, "down", "-c", second)
	if code != 1 || !strings.Contains(out, want) {
		t.Errorf("down with the other state dir: exit %d\n%s\nwant exit 1 and %q", code, out, want)
	}
}

// A line's identity follows its name: reordering the lines (reload, then
// restart) moves no flow and changes no line's mark or table; removing a
// line by reload takes its programs off its interface and puts its
// interface's sysctls back at once; adding it again gives it its place.
func TestLineIdentityFollowsName(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{Clients: 2})
	rep := faults(t, l, "lines reordered, restarted, removed")
	rep.Injected = 3
	file := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state}))
	a := startAgent(t, l, file)
	srv := echoServer(t, l)
	flows := openFlows(t, l, srv.Addr, 40, true)
	rules := gw(t, l, "ip", "rule", "show")
	before := checkPinned(t, l, flows)

	check := func(stage string) {
		t.Helper()
		broken, moved, detail := checkAll(flows)
		rep.FlowsLost += broken
		if broken+moved > 0 {
			t.Errorf("%s: %d flows broken, %d moved: %v", stage, broken, moved, detail)
		}
		after := checkPinned(t, l, flows)
		for f, line := range before {
			if after[f] != line {
				t.Errorf("%s: %v re-pinned from line %d to %d", stage, f, line, after[f])
			}
		}
		if got := gw(t, l, "ip", "rule", "show"); got != rules {
			t.Errorf("%s: rules changed:\n%s\nwant:\n%s", stage, got, rules)
		}
	}
	reversed := l.Config(lab.ConfigOptions{StateDir: state, Order: []int{1, 0}})
	a.reload(t, file, reversed)
	check("reordered by reload")
	a.stop(t)
	a = spawnAgent(t, l, file)
	t.Cleanup(func() { a.stop(t) })
	a.waitReady(t)
	check("restarted with the reordered config")

	// dsl2 removed: its programs leave wan2, its sysctls come back.
	a.reload(t, file, l.Config(lab.ConfigOptions{StateDir: state, Order: []int{0}}))
	if out := gw(t, l, "cat", "/proc/sys/net/ipv4/conf/wan2/rp_filter"); strings.TrimSpace(out) == "2" {
		t.Errorf("wan2's rp_filter still uplinkd's (2) after its line was removed")
	}
	if _, err := os.Stat(filepath.Join(l.PinDir(), "links", "wan2_ingress")); !os.IsNotExist(err) {
		t.Errorf("wan2's ingress link is still pinned after its line was removed: %v", err)
	}
	if strings.Contains(gw(t, l, "ip", "rule", "show"), "lookup 202") {
		t.Errorf("dsl2's rules are left after its line was removed")
	}
}

// A start that cannot adopt what a previous run left (here: the pinned
// flow map has another size) changes nothing: the gateway goes on
// forwarding its established flows, and the error says what to do.
func TestFailedStartKeepsAWorkingGateway(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	rep := faults(t, l, "a start that cannot adopt the pins")
	rep.Injected = 1
	file := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state}))
	a := startAgent(t, l, file)
	srv := echoServer(t, l)
	flows := openFlows(t, l, srv.Addr, 10, false)
	a.stop(t) // the state stays: forwarding goes on
	before := snapshot(t, l, "wan1", "wan2")
	bigger := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, Flows: 1 << 17}))
	out, code := exitCode(t, l, "run", "-c", bigger)
	if code != 1 || !strings.Contains(out, "pinned map ul_flows has 65536 entries, this config wants 131072") ||
		!strings.Contains(out, "goes on forwarding") {
		t.Errorf("run with another flow map size: exit %d\n%s\nwant exit 1 naming the map and what to do", code, out)
	}
	if after := snapshot(t, l, "wan1", "wan2"); after != before {
		t.Errorf("the failed start changed the kernel:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	broken, moved, detail := checkAll(flows)
	rep.FlowsLost += broken
	if broken+moved > 0 {
		t.Errorf("%d established flows broken, %d moved: %v", broken, moved, detail)
	}
}

// The control socket: reload prints what changed, or the errors of a bad
// config and keeps the running one; it is root's alone (0600 in a 0700
// dir).
func TestControlSocket(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	rep := faults(t, l, "bad reload, non-root control")
	rep.BadInputs = 2
	file := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state}))
	startAgent(t, l, file)
	sock := filepath.Join(state, "uplinkd.sock")
	if st, err := os.Stat(sock); err != nil {
		t.Errorf("control socket: %v", err)
	} else if st.Mode().Perm() != 0o600 || st.Mode()&os.ModeSocket == 0 {
		t.Errorf("control socket %v, want a socket of mode 0600", st.Mode())
	}
	before := snapshot(t, l, "wan1", "wan2")
	if err := os.WriteFile(file, []byte(l.Config(lab.ConfigOptions{StateDir: state, Weights: []int{0, 1}})), 0o600); err != nil {
		t.Fatal(err)
	}
	out, code := exitCode(t, l, "reload", "-c", file)
	if code != 2 || !strings.Contains(out, "uplinks[0].weight: want 1..255, got 0") {
		t.Errorf("reload of a bad config: exit %d\n%s", code, out)
	}
	if after := snapshot(t, l, "wan1", "wan2"); after != before {
		t.Errorf("a refused reload changed the kernel:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if err := os.WriteFile(file, []byte(l.Config(lab.ConfigOptions{StateDir: state, Weights: []int{3, 1}})), 0o600); err != nil {
		t.Fatal(err)
	}
	out, code = exitCode(t, l, "reload", "-c", file)
	if code != 0 || !strings.Contains(out, "line dsl1: weight 1 -> 3 (new flows only)") || !strings.Contains(out, "routes ~1") {
		t.Errorf("reload: exit %d\n%s\nwant the weight change and the route replaced", code, out)
	}
	if !strings.Contains(gw(t, l, "ip", "route", "show", "table", "222"), "weight 3") {
		t.Error("the reload returned before table 222 had the new weight")
	}
	if _, err := exec.LookPath("setpriv"); err == nil {
		cmd := l.Gateway.Command(context.Background(), "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", uplinkd, "line", "down", "dsl1", "-c", file)
		if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "permission denied") {
			t.Errorf("nobody's line down: %v\n%s\nwant permission denied", err, out)
		}
		if !lineIn(t, l, 1) {
			t.Error("nobody took dsl1 down")
		}
	}
}

// Only the LAN's subnets are forwarded and NATed (as the seed's -s
// NWI/NMI): a client spoofing a bogon source is dropped, counted, and gets
// no flow entry; its real address still works.
func TestSpoofedSourceDropped(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	rep := faults(t, l, "a spoofed LAN source")
	rep.Injected = 1
	startAgent(t, l, writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state})))
	srv, err := lab.StartEchoServer(l.Server, l.ServerAddrs[0], 7)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	c := l.Clients[0]
	if _, err := c.Run(context.Background(), "ip", "addr", "add", "10.66.0.1/32", "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	query := func(src string) error {
		return c.Do(func() error {
			conn, err := net.DialUDP("udp4", &net.UDPAddr{IP: net.ParseIP(src)}, net.UDPAddrFromAddrPort(srv.Addr))
			if err != nil {
				return err
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(time.Second))
			if _, err := conn.Write([]byte("hello")); err != nil {
				return err
			}
			_, err = conn.Read(make([]byte, 64))
			return err
		})
	}
	if err := query("10.66.0.1"); err == nil {
		t.Error("a spoofed source got an answer through the gateway")
	}
	if err := query(lab.ClientAddr(1).Addr().String()); err != nil {
		t.Errorf("the client's own address: %v", err)
	}
	for id := range pins(t, l) {
		if id.src.Addr() == netip.MustParseAddr("10.66.0.1") {
			t.Errorf("a spoofed source has a flow entry: %v", id)
		}
	}
	if out := gw(t, l, "nft", "list", "chain", "inet", "uplinkd", "lan_src"); !regexp.MustCompile(`counter packets [1-9]\d* bytes \d+ drop`).MatchString(out) {
		t.Errorf("no drop counted in lan_src:\n%s", out)
	}
}

// A reload that would move a line into a table holding someone else's
// route is refused, naming it; the route and the running state stay.
func TestReloadIntoForeignTableRefused(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	rep := faults(t, l, "a reload into others' table")
	rep.BadInputs = 1
	file := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state}))
	startAgent(t, l, file)
	gw(t, l, "ip", "route", "add", "default", "via", "198.51.100.1", "table", "300", "proto", "static")
	before := snapshot(t, l, "wan1", "wan2")
	extra := []string{"    table: 300\n"}
	if err := os.WriteFile(file, []byte(l.Config(lab.ConfigOptions{StateDir: state, LineExtra: extra})), 0o600); err != nil {
		t.Fatal(err)
	}
	out, code := exitCode(t, l, "reload", "-c", file)
	if code != 1 || !strings.Contains(out, "route default table 300 proto 4") {
		t.Errorf("reload: exit %d\n%s\nwant exit 1 naming the route in table 300", code, out)
	}
	if after := snapshot(t, l, "wan1", "wan2"); after != before {
		rep.ForeignTouched++
		t.Errorf("a refused reload changed the kernel:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// A reload that removes a line and gives its number to a new one: the new
// line inherits none of the removed line's flows (they would leave by it
// with the removed line's NAT address), the flows of the other lines stay
// as they are.
func TestRemovedLineLeavesNoFlows(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{ISPs: 3, Clients: 2})
	rep := faults(t, l, "a line removed, its number given to a new one")
	rep.Injected = 1
	file := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, Order: []int{0, 1}}))
	a := startAgent(t, l, file)
	srv := echoServer(t, l)
	flows := openFlows(t, l, srv.Addr, 40, false)
	pinned := checkPinned(t, l, flows)
	var kept, removed []*flow
	for _, f := range flows {
		if pinned[f] == 0 {
			kept = append(kept, f)
		} else {
			removed = append(removed, f)
		}
	}
	if len(kept) == 0 || len(removed) == 0 {
		t.Fatalf("%d flows on dsl1, %d on dsl2: want both", len(kept), len(removed))
	}

	reloaded := time.Now()
	a.reload(t, file, l.Config(lab.ConfigOptions{StateDir: state, Order: []int{0, 2}}))
	if number := a.lineStatus(t, "dsl3").Number; number != 2 {
		t.Fatalf("dsl3 got number %d; the test wants dsl2's (2)", number)
	}
	// A late packet of a removed flow (a delayed ACK, a retransmission)
	// pins it afresh, to a live line and with that line's own address:
	// harmless. What must not be is the old pin, inherited by dsl3.
	table := pins(t, l)
	for _, f := range removed {
		if p, ok := table[f.id()]; ok && (p.FirstSeen.Before(reloaded) || p.NATAddr == l.Lines[1].Address.Addr()) {
			t.Errorf("%v of the removed dsl2 is still pinned (to line %d, NAT %s, first seen %v before the reload)",
				f, p.Line, p.NATAddr, reloaded.Sub(p.FirstSeen))
		}
	}
	if ev := a.lastEvent(events.Config, "dsl2"); ev.Fields["flows_removed"] != strconv.Itoa(len(removed)) {
		t.Errorf("removal event %v: want flows_removed=%d", ev.Fields, len(removed))
	}
	broken, moved, detail := checkAll(kept)
	rep.FlowsLost += broken
	if broken+moved > 0 {
		t.Errorf("dsl1's flows: %d broken, %d moved: %v", broken, moved, detail)
	}
	after := checkPinned(t, l, kept)
	for _, f := range kept {
		if after[f] != 0 {
			t.Errorf("%v moved from dsl1 to line %d", f, after[f])
		}
	}
}

// A restart with a line's table changed while the agent was stopped: the
// routes it left in the old table are found (the state dir keeps every
// number it used) and removed, and `down` leaves none anywhere.
func TestRestartWithOtherTableCleansTheOld(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	rep := faults(t, l, "restart with a line's table changed")
	rep.Injected = 1
	table := func(n int) []string { return []string{"", fmt.Sprintf("    table: %d\n", n)} }
	file := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, LineExtra: table(301)}))
	a := startAgent(t, l, file)
	if routes := gw(t, l, "ip", "route", "show", "table", "301"); !strings.Contains(routes, "wan2") {
		t.Fatalf("table 301 before:\n%s", routes)
	}
	a.stop(t) // its state stays, forwarding
	if err := os.WriteFile(file, []byte(l.Config(lab.ConfigOptions{StateDir: state, LineExtra: table(302)})), 0o600); err != nil {
		t.Fatal(err)
	}
	a = spawnAgent(t, l, file)
	t.Cleanup(func() { a.stop(t) })
	a.waitReady(t)
	if routes := gw(t, l, "ip", "route", "show", "table", "301"); routes != "" {
		t.Errorf("the old table 301 after a restart with table 302:\n%s", routes)
	}
	if routes := gw(t, l, "ip", "route", "show", "table", "302"); !strings.Contains(routes, "wan2") {
		t.Errorf("table 302 after the restart:\n%s", routes)
	}
	if rules := gw(t, l, "ip", "rule", "show"); strings.Contains(rules, "lookup 301") {
		t.Errorf("rules still look up table 301:\n%s", rules)
	}
}
