// SPDX-License-Identifier: Apache-2.0

package test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/uplinkd/uplinkd/control/events"
	"github.com/uplinkd/uplinkd/loader"
	"github.com/uplinkd/uplinkd/test/foreign"
	"github.com/uplinkd/uplinkd/test/lab"
)

// flowID names a flow in the flow table: TCP and UDP flows may share a
// client port.
type flowID struct {
	proto uint8
	src   netip.AddrPort
}

// pins reads the flow table the agent pinned.
func pins(t *testing.T, l *lab.Lab) map[flowID]loader.Flow {
	t.Helper()
	dp, err := loader.Load(loader.Options{PinDir: l.PinDir(), FlowEntries: 1 << 16})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	out := map[flowID]loader.Flow{}
	if err := dp.Flows(func(f loader.Flow) bool { out[flowID{f.Proto, f.Src}] = f; return true }); err != nil {
		t.Fatal(err)
	}
	return out
}

func lineStats(t *testing.T, l *lab.Lab) []loader.LineStats {
	t.Helper()
	dp, err := loader.Load(loader.Options{PinDir: l.PinDir(), FlowEntries: 1 << 16})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	s, err := dp.LineStats()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// id is how the flow table knows the flow.
func (f *flow) id() flowID {
	if f.udp != nil {
		return flowID{unix.IPPROTO_UDP, f.udp.LocalAddr()}
	}
	return flowID{unix.IPPROTO_TCP, f.tcp.LocalAddr().(*net.TCPAddr).AddrPort()}
}

// checkPinned asserts that every flow is in the flow table, on the line
// whose address the server sees, and returns the lines by flow.
func checkPinned(t *testing.T, l *lab.Lab, fs []*flow) map[*flow]int {
	t.Helper()
	table := pins(t, l)
	lines := map[*flow]int{}
	for _, f := range fs {
		p, ok := table[f.id()]
		if !ok {
			t.Errorf("%v (from %v) is not in the flow table", f, f.id())
			continue
		}
		if got := l.Lines[p.Line].Address.Addr(); got != f.seen.Addr() {
			t.Errorf("%v is pinned to line %d (%s) but the server sees %s", f, p.Line, got, f.seen.Addr())
		}
		lines[f] = p.Line
	}
	return lines
}

// newShare opens n short connections and returns the share of each line
// among them.
func newShare(t *testing.T, l *lab.Lab, dst netip.AddrPort, n int) []float64 {
	t.Helper()
	counts := make([]float64, len(l.Lines))
	for i := range n {
		c, seen, err := lab.DialTCP(l.Clients[i%len(l.Clients)], dst, 2*time.Second)
		if err != nil {
			t.Fatalf("new connection %d: %v", i, err)
		}
		c.Close()
		for j, u := range l.Lines {
			if u.Address.Addr() == seen.Addr() {
				counts[j]++
			}
		}
	}
	for j := range counts {
		counts[j] /= float64(n)
	}
	return counts
}

// shareTolerance is how far a line's share of new flows may be from its
// weight's share. Flows pick buckets by a hash of their 5-tuple; with 200
// flows the standard deviation of a share is at most 3.5 points, so 14
// points is 4 standard deviations (a false failure in about 1 of 15000
// runs per comparison).
const shareTolerance = 0.14

func checkShare(t *testing.T, what string, got []float64, weights ...int) {
	t.Helper()
	total := 0
	for _, w := range weights {
		total += w
	}
	for i, w := range weights {
		want := float64(w) / float64(total)
		if d := got[i] - want; d > shareTolerance || d < -shareTolerance {
			t.Errorf("%s: line %d has %.0f%% of new flows, want %.0f%% ± %.0f", what, i+1, 100*got[i], 100*want, 100*shareTolerance)
		}
	}
	t.Logf("%s: shares %v for weights %v", what, fmtShares(got), weights)
}

func fmtShares(s []float64) string {
	parts := make([]string, len(s))
	for i, v := range s {
		parts[i] = fmt.Sprintf("%.0f%%", 100*v)
	}
	return strings.Join(parts, " ")
}

// The datapath pins every flow to a line: 240 TCP and UDP flows from
// three clients spread by weight, each seen by the server with the
// address of the line it is pinned to; weight changes 1:1 → 1:3 → 4:1
// while they run move and break none of them, and new flows follow the
// new weights. (TestWeightChangeWithoutDatapathBreaksFlows is the same
// change without the datapath.)
func TestDatapathPinsFlowsAcrossWeightChanges(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{Clients: 3})
	opts := lab.ConfigOptions{StateDir: state, Weights: []int{1, 1}}
	file := writeConfig(t, l.Config(opts))
	a := startAgent(t, l, file)
	srv := echoServer(t, l)

	flows := openFlows(t, l, srv.Addr, 240, true)
	before := checkPinned(t, l, flows)
	per := share(l, flows)
	t.Logf("240 long-lived flows (120 TCP, 120 UDP) over weights 1:1: %v", per)
	for _, u := range l.Lines {
		if s := float64(per[u.Name]) / 240; s < 0.5-shareTolerance || s > 0.5+shareTolerance {
			t.Errorf("line %s has %.0f%% of the flows, want 50%% ± %.0f", u.Name, 100*s, 100*shareTolerance)
		}
	}

	for _, w := range [][]int{{1, 3}, {4, 1}} {
		opts.Weights = w
		a.reload(t, file, l.Config(opts))
		broken, moved, detail := checkAll(flows)
		if broken+moved > 0 {
			t.Errorf("weights -> %v: %d flows broken, %d moved: %v", w, broken, moved, detail)
		}
		after := checkPinned(t, l, flows)
		repinned := 0
		for f, line := range before {
			if after[f] != line {
				repinned++
			}
		}
		if repinned > 0 {
			t.Errorf("weights -> %v: %d flows re-pinned", w, repinned)
		}
		checkShare(t, fmt.Sprintf("weights %v", w), newShare(t, l, srv.Addr, 200), w...)
	}
}

// kill -9 of the agent: forwarding and counting go on without it; a new
// agent adopts the pinned maps and links, and no flow is re-pinned.
func TestAgentCrashAdoptsPins(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{Clients: 2})
	file := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state}))
	srv := echoServer(t, l)
	first := spawnAgent(t, l, file)
	first.waitReady(t)
	t.Cleanup(func() { first.stop(t) })

	flows := openFlows(t, l, srv.Addr, 40, true)
	pinned := pins(t, l)
	first.kill9(t)

	statsBefore := lineStats(t, l)
	if broken, moved, detail := checkAll(flows); broken+moved > 0 {
		t.Fatalf("without the agent: %d broken, %d moved: %v", broken, moved, detail)
	}
	statsAfter := lineStats(t, l)
	for i := range l.Lines {
		if statsAfter[i].TxPackets <= statsBefore[i].TxPackets || statsAfter[i].RxPackets <= statsBefore[i].RxPackets {
			t.Errorf("line %d counters stopped without the agent: %+v -> %+v", i+1, statsBefore[i], statsAfter[i])
		}
	}

	second := startAgent(t, l, file)
	_ = second
	if broken, moved, detail := checkAll(flows); broken+moved > 0 {
		t.Fatalf("after the restart: %d broken, %d moved: %v", broken, moved, detail)
	}
	now := pins(t, l)
	for _, f := range flows {
		was, is := pinned[f.id()], now[f.id()]
		// FirstSeen is converted from boot time at each read: equal
		// within the conversion's jitter (2.3 ms in an emulated VM) means
		// the entry was never recreated, which would have made it newer
		// than the crash, seconds later.
		if d := was.FirstSeen.Sub(is.FirstSeen).Abs(); was.Line != is.Line || d > 100*time.Millisecond || is.TxPackets <= was.TxPackets {
			t.Errorf("%v: before the crash line %d first seen %v tx %d, after the restart line %d first seen %v tx %d: want the same pin, counting on",
				f, was.Line, was.FirstSeen, was.TxPackets, is.Line, is.FirstSeen, is.TxPackets)
		}
	}
}

// bpftool shows the pinned maps with their field names (BTF), ports in
// host order.
func TestBpftoolShowsFields(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	startAgent(t, l, writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state})))
	srv := echoServer(t, l)
	c, _, err := lab.DialTCP(l.Clients[0], srv.Addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	out, err := l.Gateway.Run(context.Background(), "bpftool", "map", "dump", "pinned", l.PinDir()+"/ul_flows")
	if err != nil {
		t.Fatal(err)
	}
	for _, field := range []string{`"saddr"`, `"daddr"`, `"sport"`, `"dport": 7`, `"line"`, `"nat_addr"`, `"tx_packets"`, `"rx_bytes"`, `"first_seen"`} {
		if !strings.Contains(out, field) {
			t.Errorf("bpftool map dump ul_flows lacks %s:\n%s", field, out)
		}
	}
	out, err = l.Gateway.Run(context.Background(), "bpftool", "map", "dump", "pinned", l.PinDir()+"/ul_lines")
	if err != nil {
		t.Fatal(err)
	}
	for _, field := range []string{`"mark": 16777216`, `"flags"`, `"weight": 1`} {
		if !strings.Contains(out, field) {
			t.Errorf("bpftool map dump ul_lines lacks %s:\n%s", field, out)
		}
	}
}

// A line taken down: new flows avoid it; its UDP flows move to a live
// line and keep working; its TCP flows get a reset on their next packet
// instead of retransmitting for minutes; flows on the other line are
// untouched. Brought back up, it gets new flows again.
func TestDeadLineFlows(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{Clients: 2})
	file := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state}))
	startAgent(t, l, file)
	srv := echoServer(t, l)
	flows := openFlows(t, l, srv.Addr, 60, true)
	dead := l.Lines[0].Address.Addr()

	// The agent answers once it has taken the line out of service.
	if out := gw(t, l, uplinkd, "line", "down", "dsl1", "-c", file); !strings.Contains(out, "line dsl1 down") {
		t.Fatalf("uplinkd line down: %s", out)
	}
	if !lineOut(t, l, 1) {
		t.Fatal("uplinkd line down returned before the line was out of service")
	}

	var resets, movedUDP, untouched int
	for _, f := range flows {
		start := time.Now()
		err := f.check()
		took := time.Since(start)
		switch {
		case f.seen.Addr() != dead:
			if err != nil {
				t.Errorf("%v on the live line: %v", f, err)
			}
			untouched++
		case f.udp != nil:
			seen, qerr := f.udp.Query([]byte("again"), time.Second)
			if qerr != nil || seen.Addr() == dead {
				t.Errorf("%v on the dead line: after the move seen as %v, %v; want a live line", f, seen, qerr)
			}
			movedUDP++
		default:
			if err == nil || !strings.Contains(err.Error(), "reset") {
				t.Errorf("%v on the dead line: %v after %v; want a connection reset", f, err, took)
			}
			resets++
		}
	}
	t.Logf("line dsl1 down: %d TCP flows reset, %d UDP flows moved, %d flows on dsl2 untouched", resets, movedUDP, untouched)
	if resets == 0 || movedUDP == 0 || untouched == 0 {
		t.Errorf("want flows of every kind: %d resets, %d moved, %d untouched", resets, movedUDP, untouched)
	}
	if got := newShare(t, l, srv.Addr, 50); got[0] != 0 {
		t.Errorf("line dsl1 is down but got %.0f%% of new flows", 100*got[0])
	}

	gw(t, l, uplinkd, "line", "up", "dsl1", "-c", file)
	if !lineIn(t, l, 1) {
		t.Fatal("uplinkd line up returned before the line was back in service")
	}
	if got := newShare(t, l, srv.Addr, 50); got[0] == 0 {
		t.Error("line dsl1 is back up but gets no new flows")
	}
}

// Someone else's TC program on the LAN interface keeps running through
// uplinkd's attach, a crash and restart, and `uplinkd down`.
func TestForeignTCProgramSurvives(t *testing.T) {
	t.Parallel()
	requireTCX(t)
	l, state := newLab(t, lab.Options{})
	prog, counter := foreign.Program(t)
	var theirs link.Link
	if err := l.Gateway.Do(func() error {
		iface, err := net.InterfaceByName(l.LANInterface)
		if err != nil {
			return err
		}
		theirs, err = link.AttachTCX(link.TCXOptions{Interface: iface.Index, Program: prog, Attach: ebpf.AttachTCXIngress})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { theirs.Close() })
	info, err := prog.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	srv := echoServer(t, l)
	file := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state}))

	counts := func(stage string) {
		t.Helper()
		before := foreign.Count(t, counter)
		if err := lab.Ping(l.Clients[0], l.LANAddress.Addr(), time.Second); err != nil {
			t.Fatalf("%s: %v", stage, err)
		}
		if after := foreign.Count(t, counter); after <= before {
			t.Errorf("%s: the foreign program stopped counting (%d -> %d)", stage, before, after)
		}
	}
	counts("before uplinkd")
	first := spawnAgent(t, l, file)
	t.Cleanup(func() { first.stop(t) })
	first.waitReady(t)
	counts("with uplinkd attached")
	if got := tcxPrograms(t, l); len(got) != 2 || got[0] != id {
		t.Errorf("lan0 TCX ingress runs %v, want the foreign program (%d) first, then uplinkd's", got, id)
	}
	if got := newShare(t, l, srv.Addr, 40); got[0] == 0 || got[1] == 0 {
		t.Errorf("steering with a foreign program in front: shares %v", got)
	}
	first.kill9(t)
	second := spawnAgent(t, l, file)
	t.Cleanup(func() { second.stop(t) })
	second.waitReady(t)
	counts("after a crash and restart")
	second.stop(t)
	gw(t, l, uplinkd, "down", "-c", file)
	counts("after uplinkd down")
	if got := tcxPrograms(t, l); len(got) != 1 || got[0] != id {
		t.Errorf("after down, lan0 TCX ingress runs programs %v, want the foreign one (%d) only", got, id)
	}
}

// requireTCX skips a test that needs TCX links on a kernel without them
// (before 6.6): uplinkd itself then attaches with tc, which TestTCFallback
// and the loader's TestAttachTC cover.
func requireTCX(t *testing.T) {
	t.Helper()
	if err := loader.TCXSupported(); err != nil {
		t.Skipf("needs TCX: %v", err)
	}
}

// tcxPrograms lists the programs attached to the lab gateway's LAN
// interface with TCX, ingress. (Debian 12's bpftool does not know TCX.)
func tcxPrograms(t *testing.T, l *lab.Lab) []ebpf.ProgramID {
	t.Helper()
	var ids []ebpf.ProgramID
	if err := l.Gateway.Do(func() error {
		iface, err := net.InterfaceByName(l.LANInterface)
		if err != nil {
			return err
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: iface.Index, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return err
		}
		for _, p := range res.Programs {
			ids = append(ids, p.ID)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return ids
}

// On a kernel without TCX uplinkd attaches with clsact + cls_bpf by
// itself; on one with TCX that path is forced with `datapath.attach: tc`.
func TestTCFallback(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	attach := "tc"
	noTCX := loader.TCXSupported()
	if noTCX != nil {
		attach = "auto"
		t.Logf("attach: auto, the kernel has no TCX (%v)", noTCX)
	}
	file := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, Attach: attach}))
	a := startAgent(t, l, file)
	srv := echoServer(t, l)
	flows := openFlows(t, l, srv.Addr, 20, true)
	checkPinned(t, l, flows)
	out := gw(t, l, "tc", "filter", "show", "dev", l.LANInterface, "ingress")
	if !strings.Contains(out, "uplinkd_lan_in") {
		t.Errorf("tc filter show dev lan0 ingress:\n%s\nwant uplinkd's cls_bpf filter", out)
	}
	if noTCX == nil {
		if got := tcxPrograms(t, l); len(got) != 0 {
			t.Errorf("attach: tc, but TCX programs %v are attached", got)
		}
	}
	a.stop(t)
	gw(t, l, uplinkd, "down", "-c", file)
	if out := gw(t, l, "tc", "qdisc", "show", "dev", l.LANInterface); strings.Contains(out, "clsact") {
		t.Errorf("after down, the clsact qdisc uplinkd created is still there:\n%s", out)
	}
}

// Carrier loss on a line takes it out at once (netlink event, no probe):
// new connections all succeed through the other line, flows on the other
// line are untouched; with the carrier back the line gets new flows again,
// after the hold-down of up_after good probe rounds.
func TestCarrierLoss(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{Clients: 2})
	a := startAgent(t, l, writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state})))
	srv := echoServer(t, l)
	flows := openFlows(t, l, srv.Addr, 40, true)

	if err := l.SetCarrier(1, false); err != nil {
		t.Fatal(err)
	}
	a.waitEvent(t, 1, events.Carrier, "dsl1", "carrier=false")
	eventually(t, "dsl1 out of service", func() bool { return lineOut(t, l, 1) })
	checkFailover(t, l, srv, flowsOn(l, flows, 2))

	if err := l.SetCarrier(1, true); err != nil {
		t.Fatal(err)
	}
	a.waitEvent(t, 1, events.Carrier, "dsl1", "carrier=true")
	a.waitEvent(t, 1, events.LineUp, "dsl1") // after the hold-down
	eventually(t, "dsl1 back in service", func() bool { return lineIn(t, l, 1) })
	if got := newShare(t, l, srv.Addr, 50); got[0] == 0 {
		t.Error("dsl1 has its carrier back but gets no new flows")
	}
}
