// SPDX-License-Identifier: Apache-2.0

package test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/uplinkd/uplinkd/control/events"
	"github.com/uplinkd/uplinkd/loader"
	"github.com/uplinkd/uplinkd/test/lab"
)

// iperf3 measures TCP throughput from the lab's first client to the
// server, through the gateway, in Gbit/s.
func iperf3(b *testing.B, l *lab.Lab, streams int, secs int) float64 {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs+20)*time.Second)
	defer cancel()
	out, err := l.Clients[0].Command(ctx, "iperf3", "-c", l.ServerAddrs[0].String(), "-t", fmt.Sprint(secs),
		"-P", fmt.Sprint(streams), "-J").Output()
	if err != nil {
		b.Fatalf("iperf3: %v\n%s", err, out)
	}
	var res struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		b.Fatalf("iperf3 output: %v", err)
	}
	return res.End.SumReceived.BitsPerSecond / 1e9
}

// The UDP workload of BenchmarkForwarding: every client floods
// udpFlows destination ports from udpPort up with udpSize-byte
// payloads; the server drops them before conntrack (udpSink).
const (
	udpPort  = 9000
	udpFlows = 16
	udpSize  = 64
)

// buildUDPFlood builds the sendmmsg sender (test/udpflood) for the
// benchmark and returns its path.
func buildUDPFlood(b *testing.B) string {
	b.Helper()
	bin := filepath.Join(b.TempDir(), "udpflood")
	if out, err := exec.Command("go", "build", "-o", bin, "./udpflood").CombinedOutput(); err != nil {
		b.Fatalf("building udpflood: %v\n%s", err, out)
	}
	return bin
}

// udpSink makes the lab's server drop the flood's datagrams as they
// arrive (before conntrack, without ICMP errors back): the server's
// interface counters count them, and nothing else costs CPU.
func udpSink(b *testing.B, l *lab.Lab) {
	b.Helper()
	nftApply(b, l.Server, fmt.Sprintf(`table inet uplinkd_bench_sink {
	chain prerouting {
		type filter hook prerouting priority raw; policy accept;
		udp dport %d-%d drop
	}
}
`, udpPort, udpPort+udpFlows-1))
}

// serverRxPackets sums the packets the lab's server received on its
// links to the ISPs.
func serverRxPackets(b *testing.B, l *lab.Lab) uint64 {
	b.Helper()
	h := netlinkIn(b, l.Server)
	defer h.Close()
	var n uint64
	for i := range l.ISPs {
		link, err := h.LinkByName(fmt.Sprintf("isp%d", i+1))
		if err != nil {
			b.Fatal(err)
		}
		n += link.Attrs().Statistics.RxPackets
	}
	return n
}

// floodResult sums what the senders report.
type floodResult struct {
	Sent    uint64  `json:"sent"`
	Seconds float64 `json:"seconds"`
	NoBufs  uint64  `json:"nobufs"`
}

// floods runs the sender in every client for secs seconds towards dst,
// all starting together, and returns their sums (Seconds: the longest).
func floods(b *testing.B, l *lab.Lab, flood string, dst netip.AddrPort, secs int) floodResult {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs+20)*time.Second)
	defer cancel()
	at := time.Now().Add(300 * time.Millisecond)
	var cmds []*exec.Cmd
	var outs []*bytes.Buffer
	for _, c := range l.Clients {
		cmd := c.Command(ctx, flood, "-dst", dst.String(), "-flows", fmt.Sprint(udpFlows), "-size", fmt.Sprint(udpSize),
			"-at", fmt.Sprint(at.UnixNano()), "-for", fmt.Sprint(time.Duration(secs)*time.Second))
		out := &bytes.Buffer{}
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		cmds = append(cmds, cmd)
		outs = append(outs, out)
	}
	var errs []error
	var sum floodResult
	for i, cmd := range cmds {
		var res floodResult
		err := cmd.Wait()
		if err == nil {
			err = json.Unmarshal(outs[i].Bytes(), &res)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("udpflood in %s: %w: %s", l.Clients[i].Name, err, outs[i]))
		}
		sum.Sent += res.Sent
		sum.NoBufs += res.NoBufs
		sum.Seconds = max(sum.Seconds, res.Seconds)
	}
	if err := errors.Join(errs...); err != nil {
		b.Fatal(err)
	}
	return sum
}

// udpFlood floods the server through the gateway and returns the packets
// per second (in thousands) the server received and the senders sent.
func udpFlood(b *testing.B, l *lab.Lab, flood string, secs int) (recv, sent float64) {
	b.Helper()
	before := serverRxPackets(b, l)
	res := floods(b, l, flood, netip.AddrPortFrom(l.ServerAddrs[0], udpPort), secs)
	time.Sleep(100 * time.Millisecond) // what is still in queues
	got := serverRxPackets(b, l) - before
	if res.NoBufs > 0 {
		b.Logf("udpflood: %d batches refused with ENOBUFS", res.NoBufs)
	}
	return float64(got) / res.Seconds / 1e3, float64(res.Sent) / res.Seconds / 1e3
}

// floodAloneDst is where senderAlone sends: through a veth pair of each
// client's own (flood0, flood1), to a MAC address nobody has, so that
// the far end drops the packet at once as not its own.
var floodAloneDst = netip.MustParseAddrPort("10.255.0.2:9000")

// floodAloneSetup gives every client the veth pair senderAlone sends
// into (the lab's removal removes it).
func floodAloneSetup(b *testing.B, l *lab.Lab) {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, c := range l.Clients {
		for _, args := range [][]string{
			{"link", "add", "flood0", "type", "veth", "peer", "name", "flood1"},
			{"link", "set", "flood1", "up"},
			{"link", "set", "flood0", "up"},
			{"addr", "add", "10.255.0.1/24", "dev", "flood0"},
			{"neigh", "replace", floodAloneDst.Addr().String(), "lladdr", "02:00:00:00:00:02", "dev", "flood0", "nud", "permanent"},
		} {
			if _, err := c.Run(ctx, "ip", args...); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// senderAlone is what the senders manage with nothing behind them (into
// a veth pair of their own), in thousands of packets per second: the
// headroom the sender leaves. Through the lab, a veth hands a packet on
// in the sender's own system call (softirq), so everything forwarding
// costs is paid on the sending CPUs: sent and received then agree, and
// the rate is the cost of the whole path.
func senderAlone(b *testing.B, l *lab.Lab, flood string, secs int) float64 {
	res := floods(b, l, flood, floodAloneDst, secs)
	return float64(res.Sent) / res.Seconds / 1e3
}

// variant is one way of spreading flows over the lines, as
// BenchmarkForwarding compares them.
type variant struct {
	name     string
	datapath bool // the agent with its datapath (else datapath.enabled: false)
	mwan     bool // plus the mwan3-style marks and rules (mwan)
}

var variants = []variant{
	{name: "K"},                 // the kernel's multipath alone: table 222's hash
	{name: "U", datapath: true}, // uplinkd's datapath
	{name: "M", mwan: true},     // an mwan3-style connmark setup
}

// withVariant starts the agent as v wants it (and, for M, adds the
// mwan3-style setup and checks that it spreads flows over every line),
// runs fn, and takes everything down again, also when fn fails.
func withVariant(b *testing.B, l *lab.Lab, v variant, weights []int, fn func()) {
	b.Helper()
	file := writeConfig(b, l.Config(lab.ConfigOptions{StateDir: b.TempDir(), NoDatapath: !v.datapath, Weights: weights}))
	a := spawnAgent(b, l, file)
	defer func() {
		a.stop(b)
		if out, err := l.Gateway.Run(context.Background(), uplinkd, "down", "-c", file); err != nil {
			b.Errorf("uplinkd down: %v\n%s", err, out)
		}
	}()
	a.waitReady(b)
	if v.datapath {
		for n := range l.Lines {
			a.waitFor(b, fmt.Sprintf("forwarding on line %d", n+1), func() bool { return lineIn(b, l, n+1) })
		}
	}
	if v.mwan {
		m := &mwan{l: l}
		defer m.remove(b)
		m.add(b, weights)
		m.usesEveryLine(b, netip.AddrPortFrom(l.ServerAddrs[0], udpPort), 32)
	}
	fn()
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// BenchmarkForwarding compares forwarding through the lab gateway three
// ways: K, the kernel's weighted multipath alone (the agent with its
// datapath disabled); U, uplinkd's datapath; M, an mwan3-style setup
// (nftables connmark restore/save, a weighted random mark for new
// connections, fwmark rules to the line tables; see mwan). Workloads:
// iperf3 TCP with 1 and 4 streams from one client, and 64-byte UDP
// datagrams from two clients with a sendmmsg sender (test/udpflood),
// counted where the server receives them; each round also measures the
// senders alone (senderAlone). Each round starts the agent once per
// variant and runs every workload under it, K, U and M in turn (the
// order rotating from round to round), so that the shared machine's
// noise hits all three; the sub-benchmarks report the medians over the
// rounds and their ratios to K (ratios of the medians). Run with
// -benchtime=1x: each b.N is forwardingRounds rounds.
func BenchmarkForwarding(b *testing.B) {
	if uplinkd == "" {
		b.Skip("needs root")
	}
	if _, err := exec.LookPath("iperf3"); err != nil {
		b.Skip("needs iperf3 (make deps installs it)")
	}
	const (
		forwardingRounds = 9
		secs             = 3
	)
	l, _ := newLab(b, lab.Options{Clients: 2})
	weights := []int{1, 1}
	flood := buildUDPFlood(b)
	udpSink(b, l)
	floodAloneSetup(b, l)
	srv := l.Server.Command(context.Background(), "iperf3", "-s", "-B", l.ServerAddrs[0].String())
	if err := srv.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = srv.Process.Kill(); _ = srv.Wait() }()
	time.Sleep(200 * time.Millisecond)

	tcp := func(streams int) func(*testing.B) (float64, float64) {
		return func(b *testing.B) (float64, float64) { return iperf3(b, l, streams, secs), 0 }
	}
	workloads := []struct {
		name, unit string
		run        func(*testing.B) (got, sent float64)
	}{
		{"tcp-1", "Gbit/s", tcp(1)},
		{"tcp-4", "Gbit/s", tcp(4)},
		{"udp-64B", "kpps", func(b *testing.B) (float64, float64) { return udpFlood(b, l, flood, secs) }},
	}
	// got and sent per workload and variant, one figure a round; the
	// rounds as text per workload, for the log.
	got, sent := map[string][]float64{}, map[string][]float64{}
	rounds := map[string][]string{}
	var alone []float64
	for r := range b.N * forwardingRounds {
		for i := range variants {
			v := variants[(r+i)%len(variants)]
			withVariant(b, l, v, weights, func() {
				for _, w := range workloads {
					g, s := w.run(b)
					got[w.name+v.name] = append(got[w.name+v.name], g)
					sent[w.name+v.name] = append(sent[w.name+v.name], s)
					text := fmt.Sprintf("%s %.2f", v.name, g)
					if s > 0 {
						text += fmt.Sprintf(" (sent %.2f)", s)
					}
					if i == 0 {
						text = fmt.Sprintf("round %d: %s", r+1, text)
					}
					rounds[w.name] = append(rounds[w.name], text)
				}
			})
		}
		alone = append(alone, senderAlone(b, l, flood, secs))
		rounds["udp-64B"] = append(rounds["udp-64B"], fmt.Sprintf("senders alone %.2f", alone[len(alone)-1]))
	}
	for _, w := range workloads {
		b.Run(w.name, func(b *testing.B) {
			b.Logf("%s, in rounds: %s", w.unit, strings.Join(rounds[w.name], ", "))
			b.ReportMetric(0, "ns/op") // the time is the parent's
			k := median(got[w.name+"K"])
			for _, v := range variants {
				m := median(got[w.name+v.name])
				b.ReportMetric(m, w.unit+"-"+v.name)
				if v.name != "K" {
					b.ReportMetric(m/k, v.name+"/K")
				}
				if s := median(sent[w.name+v.name]); s > 0 {
					b.ReportMetric(s, "sent-"+w.unit+"-"+v.name)
				}
			}
			if w.unit == "kpps" {
				b.ReportMetric(median(alone), "sender-alone-kpps")
			}
		})
	}
}

// waitFor polls cond every 2 ms for up to 10 s and returns how long it took.
func waitFor(b *testing.B, what string, cond func() bool) time.Duration {
	start := time.Now()
	for time.Since(start) < 10*time.Second {
		if cond() {
			return time.Since(start)
		}
		time.Sleep(2 * time.Millisecond)
	}
	b.Fatalf("%s: not within 10s", what)
	return 0
}

// allVia asserts that n new connections all succeed, all through line
// want (1-based) or, with want 0, none through line 1.
func allVia(b *testing.B, l *lab.Lab, srv *lab.EchoServer, n, want int) {
	for i := range n {
		c, seen, err := lab.DialTCP(l.Clients[0], srv.Addr, time.Second)
		if err != nil {
			b.Fatalf("connection %d after the agent acted: %v", i, err)
		}
		c.Close()
		on1 := seen.Addr() == l.Lines[0].Address.Addr()
		if want == 0 && on1 {
			b.Fatalf("connection %d went through the failed line", i)
		}
	}
}

// BenchmarkFailover measures, over trials, the time from a fault on line 1
// to the moment uplinkd avoids the line (the datapath gives it no new
// flows: late or down; every new connection then succeeds through line 2,
// which each trial checks), to the moment it has taken the line out of
// service (down: out of the multipath route, its TCP reset in place), and
// from the end of the fault to the line's return, with the default health
// settings. Run with -benchtime=1x.
func BenchmarkFailover(b *testing.B) {
	const trials = 20
	for _, fault := range []struct {
		name string
		set  func(l *lab.Lab, on bool) error
	}{
		{"gateway-silent", func(l *lab.Lab, on bool) error { return l.SetGatewaySilent(1, on) }},
		{"carrier-down", func(l *lab.Lab, on bool) error { return l.SetCarrier(1, !on) }},
	} {
		b.Run(fault.name, func(b *testing.B) {
			l, state := newLab(b, lab.Options{})
			startAgent(b, l, writeConfig(b, l.Config(lab.ConfigOptions{StateDir: state})))
			srv := echoServer(b, l)

			var avoided, down, up []time.Duration
			for range b.N * trials {
				// A fault at any point of the probe cycle (rounds every
				// 200 ms: a fixed pause would always hit the same point).
				time.Sleep(300*time.Millisecond + rand.N(200*time.Millisecond))
				if err := fault.set(l, true); err != nil {
					b.Fatal(err)
				}
				start := time.Now()
				var avoidedAfter, downAfter time.Duration
				waitFor(b, "failover", func() bool {
					if avoidedAfter == 0 && lineAvoided(b, l, 1) {
						avoidedAfter = time.Since(start)
					}
					if downAfter == 0 && lineOut(b, l, 1) {
						downAfter = time.Since(start)
					}
					return avoidedAfter != 0 && downAfter != 0
				})
				avoided, down = append(avoided, avoidedAfter), append(down, downAfter)
				allVia(b, l, srv, 20, 0)
				if err := fault.set(l, false); err != nil {
					b.Fatal(err)
				}
				up = append(up, waitFor(b, "recovery", func() bool { return lineIn(b, l, 1) }))
			}
			slices.Sort(avoided)
			slices.Sort(down)
			slices.Sort(up)
			b.ReportMetric(float64(avoided[len(avoided)/2].Milliseconds()), "failover-median-ms")
			b.ReportMetric(float64(avoided[len(avoided)-1].Milliseconds()), "failover-max-ms")
			b.ReportMetric(float64(down[len(down)/2].Milliseconds()), "down-median-ms")
			b.ReportMetric(float64(down[len(down)-1].Milliseconds()), "down-max-ms")
			b.ReportMetric(float64(up[len(up)/2].Milliseconds()), "recovery-median-ms")
			b.ReportMetric(float64(up[len(up)-1].Milliseconds()), "recovery-max-ms")
			b.ReportMetric(float64(len(down)), "trials")
		})
	}
}

// BenchmarkLossNoFalseDown runs 5 minutes of 20% random loss on line 1
// (the lab's line-loss fault: ISP 1 drops a fifth of what it sends the
// gateway, probe answers included) with the default health settings, and
// counts the times the agent took the line down: its line-down events and
// the line's health changes, asked over the control socket. It fails on
// any, a late round (no new flows until it is answered) included. Run
// with -benchtime=1x (each b.N is 5 minutes).
func BenchmarkLossNoFalseDown(b *testing.B) {
	const (
		period  = 5 * time.Minute
		percent = 20
	)
	l, state := newLab(b, lab.Options{})
	a := startAgent(b, l, writeConfig(b, l.Config(lab.ConfigOptions{StateDir: state})))
	line := l.Lines[0].Name
	for range b.N {
		before := a.lineStatus(b, line).StateChanges
		if err := l.SetLoss(1, percent); err != nil {
			b.Fatal(err)
		}
		var worst float64
		for end := time.Now().Add(period); time.Now().Before(end); {
			time.Sleep(10 * time.Second)
			worst = max(worst, a.lineStatus(b, line).LossRatio)
		}
		st := a.lineStatus(b, line)
		if err := l.SetLoss(1, 0); err != nil {
			b.Fatal(err)
		}
		downs := a.countEvents(events.LineDown, line)
		b.ReportMetric(float64(downs), "false-downs")
		b.ReportMetric(float64(a.countEvents(events.LineLate, line)), "lates")
		b.ReportMetric(float64(st.StateChanges-before), "state-changes")
		b.ReportMetric(100*st.LossRatio, "loss-%-last")
		b.ReportMetric(100*worst, "loss-%-worst")
		if downs > 0 || st.StateChanges != before || !st.Usable {
			b.Errorf("%d line-down events, %d health changes in %v of %d%% loss; usable at the end: %v",
				downs, st.StateChanges-before, period, percent, st.Usable)
		}
	}
}

// BenchmarkAgentSteadyState measures the agent's CPU and memory over b.N
// times 10 s of no change (-benchtime 3x gives a finer figure), with lines
// probed at the default interval: four lines and sixteen (the datapath's
// most), each with an empty flow map and with a full one (a million flows,
// seeded before the agent starts, which adopts them).
func BenchmarkAgentSteadyState(b *testing.B) {
	for _, c := range []struct{ lines, flows int }{{4, 0}, {4, 1 << 20}, {16, 0}, {16, 1 << 20}} {
		b.Run(fmt.Sprintf("lines=%d/flows=%d", c.lines, c.flows), func(b *testing.B) {
			l, state := newLab(b, lab.Options{ISPs: c.lines})
			var entries uint32 // 0: the lab's default
			if c.flows > 0 {
				entries = uint32(c.flows)
				seedFlows(b, l, c.lines, c.flows)
			}
			a := startAgent(b, l, writeConfig(b, l.Config(lab.ConfigOptions{StateDir: state, Flows: entries})))
			// The start's one-off work is over once a status answers (the
			// metrics endpoint's first status counts the flows).
			a.status(b)
			time.Sleep(time.Second)
			pid := a.cmd.Process.Pid
			const period = 10 * time.Second
			before := cpuTicks(b, pid)
			time.Sleep(time.Duration(b.N) * period)
			used := float64(cpuTicks(b, pid)-before) / 100 // USER_HZ
			b.ReportMetric(100*used/(float64(b.N)*period.Seconds()), "cpu-%")
			b.ReportMetric(float64(rssKiB(b, pid))/1024, "rss-MiB")
			if a.countEvents(events.LineDown, "") > 0 {
				b.Error("a line went down at steady state")
			}
		})
	}
}

// seedFlows fills the lab's flow map, pinned before the agent starts, with
// n flows spread over the lines, as the datapath would have pinned them.
func seedFlows(b *testing.B, l *lab.Lab, lines, n int) {
	d, err := loader.Load(loader.Options{PinDir: l.PinDir(), FlowEntries: uint32(n)})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	now := time.Now()
	if err := d.SeedFlows(n, func(i int) loader.Flow {
		return loader.Flow{
			Proto: 6, Line: i % lines,
			Src:     netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(11 + i%16)}), uint16(1024+i%60000)),
			Dst:     netip.AddrPortFrom(netip.AddrFrom4([4]byte{203, byte(i >> 16), byte(i >> 8), byte(i)}), 443),
			NATAddr: lab.LineFor(1 + i%lines).Address.Addr(),
			TxBytes: uint64(i), RxBytes: uint64(3 * i), TxPackets: 10, RxPackets: 20,
			FirstSeen: now.Add(-time.Hour), LastSeen: now,
		}
	}); err != nil {
		b.Fatal(err)
	}
}

// cpuTicks is a process's user+system time in clock ticks.
func cpuTicks(b *testing.B, pid int) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// Fields after the command name, which is in parentheses.
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return utime + stime
}

func rssKiB(b *testing.B, pid int) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, _ := strconv.ParseInt(strings.Fields(rest)[0], 10, 64)
			return n
		}
	}
	b.Fatal("no VmRSS")
	return 0
}

// progRun is a program's run count and total run time, as the kernel
// counts them while BPF run-time stats are on.
type progRun struct {
	count uint64
	time  time.Duration
}

func runStats(b *testing.B, p *ebpf.Program) progRun {
	s, err := p.Stats()
	if err != nil {
		b.Fatal(err)
	}
	return progRun{s.RunCount, s.Runtime}
}

// nsPerRun is the mean run time between two samples.
func nsPerRun(before, after progRun) float64 {
	if after.count <= before.count {
		return 0
	}
	return float64(after.time-before.time) / float64(after.count-before.count)
}

// pinnedProgram opens the program that the TCX link pinned at pin runs.
func pinnedProgram(b *testing.B, pin string) *ebpf.Program {
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		b.Fatal(err)
	}
	p, err := ebpf.NewProgramFromID(info.Program)
	if err != nil {
		b.Fatal(err)
	}
	return p
}

// attachTCX attaches p to the lab's LAN interface's TCX hook, first or
// last in its chain; the benchmark's end detaches it if the caller has not.
// It skips without TCX.
func attachTCX(b *testing.B, l *lab.Lab, p *ebpf.Program, attach ebpf.AttachType, anchor link.Anchor) link.Link {
	var lk link.Link
	err := l.Gateway.Do(func() error {
		iface, err := net.InterfaceByName(l.LANInterface)
		if err != nil {
			return err
		}
		lk, err = link.AttachTCX(link.TCXOptions{Interface: iface.Index, Program: p, Attach: attach, Anchor: anchor})
		return err
	})
	if errors.Is(err, link.ErrNotSupported) {
		b.Skip("needs TCX (6.6+) to put the empty program on the same hook")
	}
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = lk.Close() })
	return lk
}

// BenchmarkDatapathInTraffic measures what uplinkd's programs add per
// forwarded packet in real traffic: the kernel's run-time statistics
// (BPF_ENABLE_STATS, on only while the benchmark holds it) of LAN ingress
// and LAN egress against an empty program attached after each on the same
// hook, over bulk TCP uploads (data through LAN ingress, ACKs through
// egress) and downloads (the other way round). A forwarded packet passes
// one uplinkd program: LAN ingress on its way out, LAN egress on its way
// back (the lines carry none). Every other round also runs the floor's
// lookups (loader.Floor: the headers and a lookup in the agent's flow map,
// nothing else) first on the same hooks: *-floor-added-ns/pkt is what any
// datapath keeping its flows in that map pays, and the rest is uplinkd's
// own. The floor goes first because the first program on a hook pays for
// bringing the packet, the map's bucket and the flow into the cache: run
// after uplinkd, the floor measured 44-53 ns; run before it, 79-95 ns,
// with uplinkd then adding 67-81 ns after it. Medians of alternating
// rounds. Run with -benchtime=1x.
func BenchmarkDatapathInTraffic(b *testing.B) {
	if uplinkd == "" {
		b.Skip("needs root")
	}
	if _, err := exec.LookPath("iperf3"); err != nil {
		b.Skip("needs iperf3 (make deps installs it)")
	}
	l, state := newLab(b, lab.Options{})
	a := startAgent(b, l, writeConfig(b, l.Config(lab.ConfigOptions{StateDir: state})))
	srv := l.Server.Command(context.Background(), "iperf3", "-s", "-B", l.ServerAddrs[0].String())
	if err := srv.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = srv.Process.Kill(); _ = srv.Wait() }()

	in := pinnedProgram(b, filepath.Join(loader.LinksDir(l.PinDir()), l.LANInterface+"_ingress"))
	defer in.Close()
	out := pinnedProgram(b, filepath.Join(loader.LinksDir(l.PinDir()), l.LANInterface+"_egress"))
	defer out.Close()
	flows, err := ebpf.LoadPinnedMap(filepath.Join(l.PinDir(), "ul_flows"), nil)
	if err != nil {
		b.Fatal(err)
	}
	defer flows.Close()
	floor, err := loader.LoadFloor(flows)
	if err != nil {
		b.Fatal(err)
	}
	defer floor.Close()
	var empty [2]*ebpf.Program
	hooks := []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress}
	for i, attach := range hooks {
		p, err := loader.EmptyProgram()
		if err != nil {
			b.Fatal(err)
		}
		defer p.Close()
		empty[i] = p
		attachTCX(b, l, p, attach, link.Tail())
	}
	runTime, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Fatal(err)
	}
	defer runTime.Close()
	time.Sleep(200 * time.Millisecond) // iperf3 -s listening

	const rounds = 5
	var addedIn, addedOut, inNs, emptyNs, floorIn, floorOut []float64
	progs := []*ebpf.Program{in, empty[0], out, empty[1], floor.Lookup, floor.LookupReply}
	stats := func() []progRun {
		s := make([]progRun, len(progs))
		for i, p := range progs {
			s[i] = runStats(b, p)
		}
		return s
	}
	iperf := func(reverse bool) {
		args := []string{"-c", l.ServerAddrs[0].String(), "-t", "2", "-P", "4"}
		if reverse {
			args = append(args, "-R")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		outp, err := l.Clients[0].Command(ctx, "iperf3", args...).CombinedOutput()
		cancel()
		if err != nil {
			b.Fatalf("iperf3: %v\n%s", err, outp)
		}
	}
	for range b.N * rounds {
		for _, reverse := range []bool{false, true} {
			before := stats()
			iperf(reverse)
			after := stats()
			i, ei := nsPerRun(before[0], after[0]), nsPerRun(before[1], after[1])
			o, eo := nsPerRun(before[2], after[2]), nsPerRun(before[3], after[3])
			addedIn = append(addedIn, i-ei)
			addedOut = append(addedOut, o-eo)
			inNs = append(inNs, i)
			emptyNs = append(emptyNs, ei)

			// The same traffic with the floor first on each hook.
			floorLinks := []link.Link{
				attachTCX(b, l, floor.Lookup, hooks[0], link.Head()),
				attachTCX(b, l, floor.LookupReply, hooks[1], link.Head()),
			}
			before = stats()
			iperf(reverse)
			after = stats()
			for _, lk := range floorLinks {
				if err := lk.Close(); err != nil {
					b.Fatal(err)
				}
			}
			ei, eo = nsPerRun(before[1], after[1]), nsPerRun(before[3], after[3])
			floorIn = append(floorIn, nsPerRun(before[4], after[4])-ei)
			floorOut = append(floorOut, nsPerRun(before[5], after[5])-eo)
		}
	}
	// The share of packets the fast parser could not read: ~0 in plain
	// TCP, or the figures above are the slow parser's.
	st := a.status(b)
	var steered uint64
	for _, n := range st.Reasons {
		steered += n
	}
	b.ReportMetric(100*float64(st.SlowParsed)/float64(max(steered, 1)), "slow-parsed-%")
	b.ReportMetric(median(addedIn), "lan-in-added-ns/pkt")
	b.ReportMetric(median(addedOut), "lan-out-added-ns/pkt")
	b.ReportMetric(median(floorIn), "lan-in-floor-added-ns/pkt")
	b.ReportMetric(median(floorOut), "lan-out-floor-added-ns/pkt")
	b.ReportMetric(median(inNs), "lan-in-ns/pkt")
	b.ReportMetric(median(emptyNs), "empty-ns/pkt")
}
