// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Benchmarks with BPF_PROG_TEST_RUN: ns/op is the kernel's time per run of
// the program on one packet.

// benchDatapath loads a datapath with the default, 1M-entry, flow map and
// reports that map's kernel memory, in all and per entry (the map is
// preallocated: the figure is the same empty or full).
func benchDatapath(b *testing.B) *Datapath {
	d := load(b, Options{FlowEntries: DefaultFlowEntries})
	for l, mark := range lineMark {
		if err := d.SetLine(l, Line{Mark: mark, NATAddrs: natAddrs(l)}); err != nil {
			b.Fatal(err)
		}
	}
	if err := d.SetBuckets(Buckets(nil, []int{1, 1, 1}, []bool{true, true, true})); err != nil {
		b.Fatal(err)
	}
	info, err := d.objs.UlFlows.Info()
	if err != nil {
		b.Fatal(err)
	}
	if memlock, ok := info.Memlock(); ok {
		b.ReportMetric(float64(memlock)/(1<<20), "flowmap-MiB")
		b.ReportMetric(float64(memlock)/float64(d.objs.UlFlows.MaxEntries()), "flowmap-bytes/entry")
	}
	return d
}

func benchmark(b *testing.B, prog *ebpf.Program, pkt []byte) {
	_, perRun, err := prog.Benchmark(pkt, b.N, b.ResetTimer)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(perRun.Nanoseconds()), "ns/op")
}

func BenchmarkEmptyProgram(b *testing.B) {
	requireBPF(b)
	var objs emptyObjects
	if err := loadEmptyObjects(&objs, nil); err != nil {
		b.Fatal(err)
	}
	defer objs.Close()
	benchmark(b, objs.UplinkdEmpty, tcp4(1).bytes())
}

func BenchmarkLANIngressExistingFlow(b *testing.B) {
	d := benchDatapath(b)
	pkt := tcp4(1).bytes()
	run(b, d.objs.UplinkdLanIn, pkt, 0)
	benchmark(b, d.objs.UplinkdLanIn, pkt)
}

func BenchmarkLANEgressReply(b *testing.B) {
	d := benchDatapath(b)
	p := tcp4(1)
	run(b, d.objs.UplinkdLanIn, p.bytes(), 0)
	p.src, p.dst, p.sport, p.dport = p.dst, p.src, p.dport, p.sport
	benchmark(b, d.objs.UplinkdLanOut, p.bytes())
}

// newFlowPacket is the first packet of new flow i: a TCP SYN (which
// skips the conntrack lookup) or a UDP datagram (which does it).
func newFlowPacket(proto uint8, i int) []byte {
	return newFlow(proto, i).bytes()
}

// newFlow is newFlowPacket's packet, before it is put into bytes.
func newFlow(proto uint8, i int) packet {
	p := tcp4(uint16(i))
	p.tcpFlags = tcpSYN
	if proto == protoUDP {
		p = udp4(uint16(i))
	}
	p.src = netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
	return p
}

// floorFlows is where the floor's new flows start: apart from the
// datapath's, in the same map.
const floorFlows = 1 << 23

// newFlowTimes are the mean times of a new flow's first packet through
// LAN ingress, the empty program and the floor's insert.
type newFlowTimes struct {
	steer, empty, floor time.Duration
}

// timeNewFlows runs the first packet of n new flows (from base on), each
// once through LAN ingress, through the empty program and (another new
// flow) through the floor's insert, and returns their mean times: a
// single run's time includes the test-run timer, so the others are timed
// the same way, taking turns with it.
func timeNewFlows(b *testing.B, d *Datapath, empty *ebpf.Program, floor *Floor, proto uint8, base, n int) newFlowTimes {
	return timeNewFlowsOf(b, d, empty, floor, newFlowPacket, proto, base, n)
}

// timeNewFlowsOf is timeNewFlows with the packets of newPacket.
func timeNewFlowsOf(b *testing.B, d *Datapath, empty *ebpf.Program, floor *Floor,
	newPacket func(proto uint8, i int) []byte, proto uint8, base, n int) newFlowTimes {
	var sum newFlowTimes
	once := func(p *ebpf.Program, pkt []byte) time.Duration {
		_, t, err := p.Benchmark(pkt, 1, nil)
		if err != nil {
			b.Fatal(err)
		}
		return t
	}
	// The two inserting programs take turns by chunks, not by flow: the
	// LRU refills a CPU's free list 128 nodes at a time (evicting, in a
	// full map), and strict turns would hand every refill to the same one.
	const chunk = 512
	for start := 0; start < n; start += chunk {
		m := min(chunk, n-start)
		for i := range m {
			pkt := newPacket(proto, base+start+i)
			sum.steer += once(d.objs.UplinkdLanIn, pkt)
			sum.empty += once(empty, pkt)
		}
		for i := range m {
			sum.floor += once(floor.Insert, newPacket(proto, floorFlows+base+start+i))
		}
	}
	return newFlowTimes{sum.steer / time.Duration(n), sum.empty / time.Duration(n), sum.floor / time.Duration(n)}
}

// benchFloor loads the floor programs over d's flow map.
func benchFloor(b *testing.B, d *Datapath) *Floor {
	f, err := LoadFloor(d.objs.UlFlows)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { f.Close() })
	return f
}

// BenchmarkLANIngressNewFlow times new flows against the empty program
// (added-ns/flow) and the floor's insert (floor-added-ns/flow: what the
// headers, a lookup that misses and the kernel's LRU insert cost alone;
// above-floor-ns/flow: what uplinkd adds to that).
func BenchmarkLANIngressNewFlow(b *testing.B) {
	for _, proto := range []struct {
		name string
		n    uint8
	}{{"tcp-syn", protoTCP}, {"udp", protoUDP}} {
		b.Run(proto.name, func(b *testing.B) {
			d := benchDatapath(b)
			empty, err := EmptyProgram()
			if err != nil {
				b.Fatal(err)
			}
			defer empty.Close()
			t := timeNewFlows(b, d, empty, benchFloor(b, d), proto.n, 0, b.N)
			b.ReportMetric(float64(t.steer.Nanoseconds()), "ns/op")
			b.ReportMetric(float64(t.empty.Nanoseconds()), "empty-ns/op")
			b.ReportMetric(float64((t.steer - t.empty).Nanoseconds()), "added-ns/flow")
			b.ReportMetric(float64((t.floor - t.empty).Nanoseconds()), "floor-added-ns/flow")
			b.ReportMetric(float64((t.steer - t.floor).Nanoseconds()), "above-floor-ns/flow")
		})
	}
}

// benchPolicies gives benchDatapath's datapath policies 1 to 3 (one line
// each) beside policy 0 (all three lines), as BenchRuleSet's rules name.
func benchPolicies(b *testing.B, d *Datapath) {
	tables := []PolicyTable{{Buckets: Buckets(nil, []int{1, 1, 1}, []bool{true, true, true})}}
	for l := range 3 {
		weights := make([]int, 3)
		weights[l] = 1
		tables = append(tables, PolicyTable{Buckets: Buckets(nil, weights, []bool{true, true, true})})
	}
	if err := d.SetPolicies(tables); err != nil {
		b.Fatal(err)
	}
}

// newFlowPacketAnywhere is newFlowPacket with the destination spread over
// the unicast IPv4 space, so that the rules' address tries are walked
// along many paths, as real destinations walk them.
func newFlowPacketAnywhere(proto uint8, i int) []byte {
	p := newFlow(proto, i)
	a := uint32(i) * 2654435761 // Knuth's multiplicative hash
	p.dst = netip.AddrFrom4([4]byte{byte(1 + (a>>24)%223), byte(a >> 16), byte(a >> 8), byte(a)})
	if p.dst.IsLinkLocalUnicast() {
		p.dst = server4
	}
	return p.bytes()
}

// BenchmarkLANIngressNewFlowRules times new flows (TCP SYNs to destinations
// all over the address space) with 0, 16, 256 and 4096 rules of
// control/policy's RandomRules shape, the way BenchmarkLANIngressNewFlow
// does: added-ns/flow is over the empty program. One datapath takes every
// flow; its rule set is switched off (rule_cfg's word count zeroed, as in
// a gateway without rules) for every other flow, so that classify-ns/flow
// (what the rules add to a new flow) compares the same maps in the same
// caches (medians over rounds of 1024 flows), and norules-added-ns/flow is
// the flows without; matched-% is the share of flows a rule decided.
func BenchmarkLANIngressNewFlowRules(b *testing.B) {
	if BenchRuleSet == nil {
		b.Skip("no rule compiler (rules_property_test.go sets it)")
	}
	for _, n := range []int{0, 16, 256, 4096} {
		b.Run(fmt.Sprintf("rules-%d", n), func(b *testing.B) {
			d := benchDatapath(b)
			benchPolicies(b, d)
			rs, err := BenchRuleSet(n)
			if err != nil {
				b.Fatal(err)
			}
			if err := d.SetRuleSet(rs); err != nil {
				b.Fatal(err)
			}
			var on, off uplinkdRuleCfg
			if err := d.objs.UlRuleCfg.Lookup(uint32(0), &on); err != nil {
				b.Fatal(err)
			}
			off = on
			off.Words[on.Gen%ruleGens] = 0
			classifying := func(c *uplinkdRuleCfg) {
				if err := d.objs.UlRuleCfg.Update(uint32(0), c, ebpf.UpdateExist); err != nil {
					b.Fatal(err)
				}
			}
			empty, err := EmptyProgram()
			if err != nil {
				b.Fatal(err)
			}
			defer empty.Close()
			once := func(p *ebpf.Program, pkt []byte) time.Duration {
				_, t, err := p.Benchmark(pkt, 1, nil)
				if err != nil {
					b.Fatal(err)
				}
				return t
			}
			// On one CPU: the program's per-CPU state and caches are
			// then the same for every flow.
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			var cpus, was unix.CPUSet
			if err := unix.SchedGetaffinity(0, &was); err != nil {
				b.Fatal(err)
			}
			cpus.Set(0)
			if err := unix.SchedSetaffinity(0, &cpus); err != nil {
				b.Fatal(err)
			}
			defer unix.SchedSetaffinity(0, &was)
			const round = 1024
			var rules time.Duration
			var added, noneAdded, classify []float64
			rng := rand.New(rand.NewPCG(uint64(n), 1))
			swap := false
			for start := 0; start < b.N; start += round {
				var r, n, e time.Duration
				m := min(round, b.N-start)
				for i := range m {
					pkt := newFlowPacketAnywhere(protoTCP, start+i)
					// One flow of each pair with rules, the other without,
					// which one drawn at random: the LRU refills its free
					// list every 128 new flows, an even count, and that
					// flow pays some 100 ns more (rules-0, flows alike,
					// showed it when the even ones took the rules).
					if i%2 == 0 {
						swap = rng.IntN(2) == 1
					}
					if (i%2 == 0) != swap {
						classifying(&on)
						r += once(d.objs.UplinkdLanIn, pkt)
					} else {
						classifying(&off)
						n += once(d.objs.UplinkdLanIn, pkt)
					}
					e += once(empty, pkt)
				}
				rules += r
				half := func(d time.Duration, odd int) float64 { return float64(d.Nanoseconds()) / float64((m+odd)/2) }
				ei := float64(e.Nanoseconds()) / float64(m)
				added = append(added, half(r, 1)-ei)
				noneAdded = append(noneAdded, half(n, 0)-ei)
				classify = append(classify, half(r, 1)-half(n, 0))
			}
			classifying(&on)
			hits, err := d.RuleHits()
			if err != nil {
				b.Fatal(err)
			}
			var matched uint64
			for _, h := range hits {
				matched += h
			}
			classified := (b.N + 1) / 2
			b.ReportMetric(float64(rules.Nanoseconds())/float64(classified), "ns/op")
			b.ReportMetric(median(added), "added-ns/flow")
			b.ReportMetric(median(noneAdded), "norules-added-ns/flow")
			b.ReportMetric(median(classify), "classify-ns/flow")
			b.ReportMetric(100*float64(matched)/float64(classified), "matched-%")
		})
	}
}

// BenchmarkLANIngressVsEmpty times, in one run, the empty program, the
// LAN ingress program and the floor's lookup (headers and the flow
// lookup alone) on a packet of an existing flow, in five alternating
// rounds of b.N runs each (at least 200000, or the clock's noise shows),
// and reports the medians of the per-round differences and ratio: the
// machine's noise hits all alike.
func BenchmarkLANIngressVsEmpty(b *testing.B) {
	runs := max(b.N, 200000)
	d := benchDatapath(b)
	empty, err := EmptyProgram()
	if err != nil {
		b.Fatal(err)
	}
	defer empty.Close()
	floor := benchFloor(b, d)
	pkt := tcp4(1).bytes()
	run(b, d.objs.UplinkdLanIn, pkt, 0)
	var emptyNs, steerNs, added, ratio, floorAdded []float64
	for range 5 {
		_, e, err := empty.Benchmark(pkt, runs, nil)
		if err != nil {
			b.Fatal(err)
		}
		_, s, err := d.objs.UplinkdLanIn.Benchmark(pkt, runs, nil)
		if err != nil {
			b.Fatal(err)
		}
		_, f, err := floor.Lookup.Benchmark(pkt, runs, nil)
		if err != nil {
			b.Fatal(err)
		}
		floorAdded = append(floorAdded, float64(f.Nanoseconds()-e.Nanoseconds()))
		emptyNs = append(emptyNs, float64(e.Nanoseconds()))
		steerNs = append(steerNs, float64(s.Nanoseconds()))
		added = append(added, float64(s.Nanoseconds()-e.Nanoseconds()))
		ratio = append(ratio, float64(s)/float64(e))
	}
	b.ReportMetric(median(emptyNs), "empty-ns/pkt")
	b.ReportMetric(median(steerNs), "steer-ns/pkt")
	b.ReportMetric(median(added), "added-ns/pkt")
	b.ReportMetric(median(ratio), "x-empty")
	b.ReportMetric(median(floorAdded), "floor-added-ns/pkt")
}

// BenchmarkLANIngressPinnedClassified times, like
// BenchmarkLANIngressVsEmpty, a packet of an existing flow, here of a flow
// a rule set (4096 rules) classified, against the same packet of an
// unclassified flow of a datapath without rules, in five alternating
// rounds: classified-extra-ns/pkt is what the classified flow pays per
// packet (its policy's packet and byte counters).
func BenchmarkLANIngressPinnedClassified(b *testing.B) {
	if BenchRuleSet == nil {
		b.Skip("no rule compiler (rules_property_test.go sets it)")
	}
	runs := max(b.N, 200000)
	d, plain := benchDatapath(b), benchDatapath(b)
	benchPolicies(b, d)
	rs, err := BenchRuleSet(4096)
	if err != nil {
		b.Fatal(err)
	}
	if err := d.SetRuleSet(rs); err != nil {
		b.Fatal(err)
	}
	empty, err := EmptyProgram()
	if err != nil {
		b.Fatal(err)
	}
	defer empty.Close()
	pkt := tcp4(1).bytes()
	run(b, d.objs.UplinkdLanIn, pkt, 0)
	run(b, plain.objs.UplinkdLanIn, pkt, 0)
	stats, err := d.PolicyStats()
	if err != nil {
		b.Fatal(err)
	}
	var counted uint64
	for _, s := range stats {
		counted += s.TxPackets
	}
	if counted != 1 {
		b.Fatalf("the flow's first packet counted %d times by the policies, want once: not classified?", counted)
	}
	var classified, unclassified, extra []float64
	for range 5 {
		var t [3]time.Duration
		for i, p := range []*ebpf.Program{empty, plain.objs.UplinkdLanIn, d.objs.UplinkdLanIn} {
			if _, t[i], err = p.Benchmark(pkt, runs, nil); err != nil {
				b.Fatal(err)
			}
		}
		unclassified = append(unclassified, float64(t[1].Nanoseconds()-t[0].Nanoseconds()))
		classified = append(classified, float64(t[2].Nanoseconds()-t[0].Nanoseconds()))
		extra = append(extra, float64(t[2].Nanoseconds()-t[1].Nanoseconds()))
	}
	b.ReportMetric(median(unclassified), "unclassified-added-ns/pkt")
	b.ReportMetric(median(classified), "classified-added-ns/pkt")
	b.ReportMetric(median(extra), "classified-extra-ns/pkt")
}

// median is the middle value of v (the upper one of an even count).
func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// BenchmarkInsertMillionthFlow fills the default 1M-entry flow map to one
// short of full from Go, then times new flows through the program: the
// first fills the map, the rest make the LRU evict. Compared with new
// flows into an empty map in the same run.
func BenchmarkInsertMillionthFlow(b *testing.B) {
	d := benchDatapath(b)
	empty, err := EmptyProgram()
	if err != nil {
		b.Fatal(err)
	}
	defer empty.Close()
	floor := benchFloor(b, d)
	newFlows := func(base int) newFlowTimes {
		return timeNewFlows(b, d, empty, floor, protoTCP, base, b.N)
	}
	emptyMap := newFlows(0)

	fill := int(DefaultFlowEntries) - 1
	if err := d.SeedFlows(fill, func(i int) Flow {
		return Flow{Proto: 6, Src: netip.AddrPortFrom(netip.AddrFrom4([4]byte{172, byte(i >> 16), byte(i >> 8), byte(i)}), uint16(i)),
			Dst: netip.AddrPortFrom(netip.IPv4Unspecified(), 443)}
	}); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	full := newFlows(1 << 20)
	b.ReportMetric(float64(emptyMap.steer.Nanoseconds()), "empty-map-ns/flow")
	b.ReportMetric(float64(full.steer.Nanoseconds()), "full-map-ns/flow")
	b.ReportMetric(float64((emptyMap.steer - emptyMap.empty).Nanoseconds()), "empty-map-added-ns/flow")
	b.ReportMetric(float64((full.steer - full.empty).Nanoseconds()), "full-map-added-ns/flow")
	b.ReportMetric(float64((full.floor - full.empty).Nanoseconds()), "full-map-floor-added-ns/flow")
	b.ReportMetric(float64((full.steer - full.floor).Nanoseconds()), "full-map-above-floor-ns/flow")
	b.ReportMetric(float64(full.steer)/float64(emptyMap.steer), "x-empty-map")
}

// BenchmarkClearFullFlowMap times ClearFlows (an HA gateway becoming
// standby) on a full 1M-entry flow map, seeded from Go; the agent runs it
// beside its run loop. Three clears whatever b.N (make bench asks for
// 20,000 of the packet benchmarks).
func BenchmarkClearFullFlowMap(b *testing.B) {
	const trials = 3
	d := benchDatapath(b)
	fill := int(DefaultFlowEntries) - 1
	var took time.Duration
	for range trials {
		if err := d.SeedFlows(fill, func(i int) Flow {
			return Flow{Proto: 6, Src: netip.AddrPortFrom(netip.AddrFrom4([4]byte{172, byte(i >> 16), byte(i >> 8), byte(i)}), uint16(i)),
				Dst: netip.AddrPortFrom(netip.IPv4Unspecified(), 443)}
		}); err != nil {
			b.Fatal(err)
		}
		count := func() int {
			n := 0
			if err := d.Flows(func(Flow) bool { n++; return true }); err != nil {
				b.Fatal(err)
			}
			return n
		}
		before := count() // the LRU may have evicted a few while seeding
		start := time.Now()
		n, err := d.ClearFlows()
		took += time.Since(start)
		if left := count(); err != nil || n != before || left != 0 {
			b.Fatalf("ClearFlows removed %d of %d, %d left: %v", n, before, left, err)
		}
	}
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(took.Seconds()/trials, "s/clear")
	b.ReportMetric(float64(fill), "flows")
}
