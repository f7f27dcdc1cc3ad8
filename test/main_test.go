// SPDX-License-Identifier: Apache-2.0

// Package test holds uplinkd's integration tests: the real binary and the
// real kernel, in namespace labs (package lab) that each test builds and
// removes.
package test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/google/nftables"
	"github.com/google/nftables/userdata"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	agentpkg "github.com/uplinkd/uplinkd/control/agent"
	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/ctlsock"
	"github.com/uplinkd/uplinkd/control/events"
	"github.com/uplinkd/uplinkd/test/lab"
)

// uplinkd is the binary under test, built once by TestMain.
var uplinkd string

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Println("integration tests need root (network namespaces, netlink, nftables): skipped")
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "uplinkd-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// UPLINKD_BIN names a binary built elsewhere: the VM tests build it on
	// the host, where compiling is not emulated.
	uplinkd = os.Getenv("UPLINKD_BIN")
	if uplinkd == "" {
		uplinkd = filepath.Join(dir, "uplinkd")
		args := []string{"build", "-o", uplinkd}
		if raceEnabled {
			args = append(args, "-race")
		}
		if out, err := exec.Command("go", append(args, "../cmd/uplinkd")...).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "building uplinkd: %v\n%s", err, out)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// newLab builds a lab removed at the end of the test, and a state dir.
func newLab(t testing.TB, opts lab.Options) (*lab.Lab, string) {
	t.Helper()
	if uplinkd == "" {
		t.Skip("needs root")
	}
	l, err := lab.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Error(err)
		}
	})
	return l, t.TempDir()
}

// writeConfig writes a config file for the test.
func writeConfig(t testing.TB, text string) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "uplinkd.yaml")
	if err := os.WriteFile(f, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// gw runs a command in the lab's gateway and returns its output.
func gw(t testing.TB, l *lab.Lab, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := l.Gateway.Run(ctx, name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// nftApply runs `nft -f -` with script in host h.
func nftApply(tb testing.TB, h *lab.Host, script string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := h.Command(ctx, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("nft in %s: %v\n%s\n%s", h.Name, err, out, script)
	}
}

// netlinkIn opens a netlink handle in host h; the caller closes it.
func netlinkIn(tb testing.TB, h *lab.Host) *netlink.Handle {
	tb.Helper()
	nh, err := h.Netlink()
	if err != nil {
		tb.Fatal(err)
	}
	return nh
}

// agent is an `uplinkd run` process in a lab gateway.
type agent struct {
	cmd      *exec.Cmd
	log      *syncBuffer
	done     chan error
	stateDir string
}

// waitReady waits until the agent answers on its control socket, which it
// does once it has applied its config and runs its loop.
func (a *agent) waitReady(t testing.TB) {
	t.Helper()
	a.waitFor(t, "ready (control socket answers)", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := ctlsock.Call(ctx, a.stateDir, ctlsock.Request{Cmd: "ping"})
		return err == nil
	})
}

// waitFor polls ok until it holds, failing the test when the agent exits
// or agentWait passes. Generous: a first start loads kernel modules
// (nf_conntrack, nft_*), which takes seconds in the emulated VMs of the
// kernel matrix.
func (a *agent) waitFor(t testing.TB, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(agentWait)
	for time.Now().Before(deadline) {
		select {
		case err := <-a.done:
			a.done <- err
			t.Fatalf("agent exited: %v\n%s", err, a.log.String())
		default:
		}
		if ok() {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("agent not %s after %v:\n%s", what, agentWait, a.log.String())
}

// startAgent runs `uplinkd run -c cfg` in the gateway until the test ends
// (SIGTERM, then `uplinkd down`), and waits until it has applied its
// state.
func startAgent(t testing.TB, l *lab.Lab, cfg string) *agent {
	t.Helper()
	return startAgentIn(t, l.Gateway, cfg)
}

// startAgentIn is startAgent in gateway host h (e.g. one of an HA pair).
func startAgentIn(t testing.TB, h *lab.Host, cfg string) *agent {
	t.Helper()
	a := spawnAgentIn(t, h, cfg)
	t.Cleanup(func() {
		a.stop(t)
		if out, err := h.Run(context.Background(), uplinkd, "down", "-c", cfg); err != nil {
			t.Errorf("uplinkd down: %v\n%s", err, out)
		}
		if t.Failed() {
			t.Logf("agent log:\n%s", a.log.String())
		}
	})
	a.waitReady(t)
	return a
}

// spawnAgent starts the agent process; the caller stops it.
func spawnAgent(t testing.TB, l *lab.Lab, cfg string) *agent {
	t.Helper()
	return spawnAgentIn(t, l.Gateway, cfg)
}

// spawnAgentIn is spawnAgent in gateway host h.
func spawnAgentIn(t testing.TB, h *lab.Host, cfg string) *agent {
	t.Helper()
	c, err := config.Load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a := &agent{log: &syncBuffer{}, done: make(chan error, 1), stateDir: c.StateDir}
	a.cmd = h.Command(context.Background(), uplinkd, "run", "-c", cfg)
	a.cmd.Stdout, a.cmd.Stderr = a.log, a.log
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { a.done <- a.cmd.Wait() }()
	return a
}

// stop sends SIGTERM and waits; an agent that is already gone is fine.
func (a *agent) stop(t testing.TB) {
	if a.cmd.ProcessState != nil {
		return
	}
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-a.done:
		if err != nil {
			t.Errorf("agent exited with %v", err)
		}
	case <-time.After(emulated(10 * time.Second)):
		_ = a.cmd.Process.Kill()
		<-a.done
		t.Errorf("agent did not stop on SIGTERM within %v", emulated(10*time.Second))
	}
}

// kill9 kills the agent the hard way, as a crash would.
func (a *agent) kill9(t testing.TB) {
	t.Helper()
	if err := a.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-a.done
}

// agentWait bounds how long a test waits for the agent to act.
const agentWait = 60 * time.Second

// events returns the events the agent keeps, asked over its control
// socket (nil when it does not answer).
func (a *agent) events() []events.Event {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var evs []events.Event
	if err := ctlsock.CallData(ctx, a.stateDir, ctlsock.Request{Cmd: "events"}, &evs); err != nil {
		return nil
	}
	return evs
}

// countEvents counts the agent's events of kind about line ("": any)
// whose fields hold every key=value pair of fields.
func (a *agent) countEvents(kind, line string, fields ...string) int {
	n := 0
	for _, e := range a.events() {
		if e.Kind != kind || (line != "" && e.Line != line) {
			continue
		}
		match := true
		for _, kv := range fields {
			k, v, _ := strings.Cut(kv, "=")
			match = match && e.Fields[k] == v
		}
		if match {
			n++
		}
	}
	return n
}

// lineEvents is the kinds of the agent's events about line, in order.
func (a *agent) lineEvents(line string) []string {
	var kinds []string
	for _, e := range a.events() {
		if e.Line == line {
			kinds = append(kinds, e.Kind)
		}
	}
	return kinds
}

// lastEvent is the agent's last event of kind about line (zero if none).
func (a *agent) lastEvent(kind, line string) events.Event {
	var last events.Event
	for _, e := range a.events() {
		if e.Kind == kind && (line == "" || e.Line == line) {
			last = e
		}
	}
	return last
}

// status is the agent's status, asked over its control socket.
func (a *agent) status(t testing.TB) agentpkg.Status {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var st agentpkg.Status
	if err := ctlsock.CallData(ctx, a.stateDir, ctlsock.Request{Cmd: "status"}, &st); err != nil {
		t.Fatalf("asking the agent's status: %v", err)
	}
	return st
}

// lineStatus is one line's part of the agent's status.
func (a *agent) lineStatus(t testing.TB, name string) agentpkg.LineStatus {
	t.Helper()
	for _, l := range a.status(t).Lines {
		if l.Name == name {
			return l
		}
	}
	t.Fatalf("no line %s in the agent's status", name)
	return agentpkg.LineStatus{}
}

// waitEvent waits until the agent has reported at least n events of kind
// about line ("": any) with the given key=value fields.
func (a *agent) waitEvent(t testing.TB, n int, kind, line string, fields ...string) {
	t.Helper()
	a.waitFor(t, fmt.Sprintf("reporting %d %s events of line %q %v", n, kind, line, fields), func() bool {
		return a.countEvents(kind, line, fields...) >= n
	})
}

// reload rewrites the config file and sends SIGHUP; it waits until the
// agent has applied the new config.
func (a *agent) reload(t testing.TB, file, text string) {
	t.Helper()
	n := a.countConfigApplied()
	if err := os.WriteFile(file, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := a.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	a.waitFor(t, "applying the new config", func() bool { return a.countConfigApplied() > n })
}

func (a *agent) countConfigApplied() int {
	n := 0
	for _, e := range a.events() {
		if e.Kind == events.Config && e.Msg == "new config applied" {
			n++
		}
	}
	return n
}

// syncBuffer is a strings.Builder safe for the agent's output goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// snapshot is the kernel state uplinkd may touch, as text, to compare a
// gateway before and after.
func snapshot(t testing.TB, l *lab.Lab, ifaces ...string) string {
	t.Helper()
	var b strings.Builder
	b.WriteString(gw(t, l, "ip", "-4", "rule", "show"))
	b.WriteString(gw(t, l, "ip", "-6", "rule", "show"))
	b.WriteString(gw(t, l, "ip", "-4", "route", "show", "table", "all"))
	b.WriteString(gw(t, l, "nft", "--stateless", "list", "ruleset")) // no counters: traffic may flow meanwhile
	keys := []string{"net/ipv4/ip_forward", "net/ipv4/fib_multipath_hash_policy", "net/ipv4/fib_multipath_hash_fields", "net/ipv4/fib_multipath_use_neigh"}
	for _, i := range ifaces {
		keys = append(keys, "net/ipv4/conf/"+i+"/rp_filter", "net/ipv4/conf/"+i+"/ignore_routes_with_linkdown")
	}
	for _, k := range keys {
		b.WriteString(k + "=" + gw(t, l, "cat", "/proc/sys/"+k))
	}
	return b.String()
}

// echoServer runs the lab's echo server on its first server address, port
// 7, until the test ends.
func echoServer(t testing.TB, l *lab.Lab) *lab.EchoServer {
	t.Helper()
	srv, err := lab.StartEchoServer(l.Server, l.ServerAddrs[0], 7)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv
}

// eventually waits up to eventuallyBound for ok, and logs how long it took.
func eventually(t testing.TB, what string, ok func() bool) {
	t.Helper()
	start := time.Now()
	for time.Since(start) < eventuallyBound {
		if ok() {
			t.Logf("%s after %v", what, time.Since(start).Round(time.Millisecond))
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Errorf("%s: not within %v", what, eventuallyBound)
}

// eventuallyBound is how long eventually waits: 2 s on the host; in the
// kernel matrix's emulated guests, where a reconcile after a line went
// down took 4.4 s (6.12) and 4.5 s (6.1) under load, 10 s.
var eventuallyBound = emulated(2 * time.Second)

// emulated stretches a bound that holds on the host five times in the
// kernel matrix's emulated guests, where 2-3 VMs share 2 host cores and a
// dial, a reconcile or a stop takes seconds.
func emulated(d time.Duration) time.Duration {
	if os.Getenv("UPLINKD_EMULATED_VM") != "" {
		return 5 * d
	}
	return d
}

// lineOut reports whether the agent has taken line n out of service: out
// of the multipath route and its TCP reset in place (which happens after
// the datapath's buckets are rewritten). It reads the gateway's kernel
// in-process (netlink, nftables): a failover is timed without the two
// `ip` and `nft` process starts a look took (about 36 ms under load).
func lineOut(tb testing.TB, l *lab.Lab, n int) bool {
	inMultipath, down := lineState(tb, l, n)
	return !inMultipath && down
}

// lineIn reports whether the agent has put line n back in service: in the
// multipath route, its TCP reset gone, and buckets of the datapath's (the
// last step: from then on new flows take it).
func lineIn(tb testing.TB, l *lab.Lab, n int) bool {
	if inMultipath, down := lineState(tb, l, n); !inMultipath || down {
		return false
	}
	return hasBuckets(tb, l, n)
}

// lineAvoided reports whether the datapath gives line n no new flows: it
// holds none of the buckets. A late line is avoided before it is down.
func lineAvoided(tb testing.TB, l *lab.Lab, n int) bool { return !hasBuckets(tb, l, n) }

// hasBuckets reports whether line n holds any of the datapath's buckets.
func hasBuckets(tb testing.TB, l *lab.Lab, n int) bool {
	m, err := ebpf.LoadPinnedMap(filepath.Join(l.PinDir(), "ul_buckets"), nil)
	if err != nil {
		tb.Fatal(err)
	}
	defer m.Close()
	var bucket, line uint32
	for it := m.Iterate(); it.Next(&bucket, &line); {
		if line == uint32(n-1) {
			return true
		}
	}
	return false
}

// gatewayEnv opens netlink and nftables handles in the lab's gateway;
// the caller closes them.
func gatewayEnv(tb testing.TB, l *lab.Lab) *agentpkg.Env {
	tb.Helper()
	ns, err := l.Gateway.NetNS()
	if err != nil {
		tb.Fatal(err)
	}
	defer ns.Close() // OpenEnv keeps a copy
	env, err := agentpkg.OpenEnv(ns)
	if err != nil {
		tb.Fatal(err)
	}
	return env
}

// lineState reads in the gateway whether line n is a nexthop of table
// 222's routes and whether uplinkd's nftables table holds its "is down"
// rule (the TCP reset).
func lineState(tb testing.TB, l *lab.Lab, n int) (inMultipath, down bool) {
	tb.Helper()
	env := gatewayEnv(tb, l)
	defer env.Close()
	u := l.Lines[n-1]
	link, err := env.NL.LinkByName(u.Interface)
	if err != nil {
		tb.Fatal(err)
	}
	idx := link.Attrs().Index
	routes, err := env.NL.RouteListFiltered(unix.AF_INET, &netlink.Route{Table: 222}, netlink.RT_FILTER_TABLE)
	if err != nil {
		tb.Fatal(err)
	}
	for _, r := range routes {
		inMultipath = inMultipath || r.LinkIndex == idx
		for _, nh := range r.MultiPath {
			inMultipath = inMultipath || nh.LinkIndex == idx
		}
	}
	table := &nftables.Table{Family: nftables.TableFamilyINet, Name: "uplinkd"}
	chains, err := env.NFT.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		tb.Fatal(err)
	}
	for _, ch := range chains {
		if ch.Table.Name != table.Name {
			continue
		}
		rules, err := env.NFT.GetRules(table, ch)
		if err != nil {
			tb.Fatal(err)
		}
		for _, r := range rules {
			cm, _ := userdata.GetString(r.UserData, userdata.TypeComment)
			down = down || strings.Contains(cm, u.Name+" is down")
		}
	}
	return inMultipath, down
}

// faultReport is one safety test's row in the table `make faults` prints:
// what was injected, whether the gateway survived it (the test passed),
// established flows lost on healthy lines, objects of uplinkd's left after
// its `down`, others' objects touched, and bad inputs tried.
type faultReport struct {
	Injected, FlowsLost, ForeignTouched, BadInputs int
}

// faults starts a test's report. Call it right after newLab: it is logged
// once the test's agents are stopped and downed, with the leftovers of
// uplinkd it then finds in the lab's gateway (rules and routes of its
// protocol, its nftables table, its pin dir).
func faults(t *testing.T, l *lab.Lab, what string) *faultReport {
	t.Helper()
	r := &faultReport{}
	t.Cleanup(func() {
		// uplinkd's numbers (the default config's): rules at 50, 101..116,
		// 201..216 and 222, routes in tables 201..216 and 222, tagged 85.
		left := 0
		rules, _ := l.Gateway.Run(context.Background(), "ip", "rule", "show")
		for _, line := range strings.Split(rules, "\n") {
			var prio int
			if _, err := fmt.Sscanf(line, "%d:", &prio); err == nil && strings.Contains(line, "proto 85") &&
				(prio == 50 || prio == 222 || prio > 100 && prio <= 116 || prio > 200 && prio <= 216) {
				left++
			}
		}
		routes, _ := l.Gateway.Run(context.Background(), "ip", "route", "show", "table", "all", "proto", "85")
		for _, line := range strings.Split(routes, "\n") {
			var table int
			if i := strings.Index(line, " table "); i >= 0 {
				fmt.Sscanf(line[i+len(" table "):], "%d", &table)
			}
			if table == 222 || table > 200 && table <= 216 {
				left++
			}
		}
		if _, err := l.Gateway.Run(context.Background(), "nft", "list", "table", "inet", "uplinkd"); err == nil {
			left++
		}
		if _, err := os.Stat(l.PinDir()); err == nil {
			left++
		}
		t.Logf("fault-report: %s|%d|%v|%d|%d|%d|%d", what, r.Injected, !t.Failed(), r.FlowsLost, left, r.ForeignTouched, r.BadInputs)
	})
	return r
}
