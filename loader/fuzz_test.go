// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// FuzzLANPrograms runs random and mutated frames through LAN ingress and
// LAN egress (BPF_PROG_TEST_RUN) and checks, after each:
//   - both programs return TC_ACT_UNSPEC ("next");
//   - mark bits outside the mask are kept, and a mark set is a live line's;
//   - LAN ingress counts exactly one reason, creates at most one flow, and
//     none for a frame that must not be steered (non-IP, multicast or
//     broadcast, link-local, to the gateway itself, a non-first fragment);
//   - LAN egress never creates a flow or sets a mark;
//   - every flow entry is well-formed and pinned to a live line.
//
// Line 1 is dead but still holds buckets, as in the instant between a line
// dying and its buckets moving: no flow may land on it. A rule set sends
// some new flows to other policies (one with the unreachable last resort).
//
// The seeds (below, and testdata/fuzz/FuzzLANPrograms) cover Ethernet with
// and without VLAN tags, IPv4 with options and fragments, IPv6 with
// extension headers, truncated headers and TCP/UDP/ICMP/ICMPv6. `make test`
// runs a short fuzz; `make fuzz FUZZTIME=10m` a long one.
func FuzzLANPrograms(f *testing.F) {
	for _, p := range fuzzSeeds() {
		f.Add(p.bytes(), foreignMark)
	}
	ns := newNetns(f) // conntrack lookups see an empty table of their own
	d := load(f, Options{FlowEntries: 1 << 14})
	for l, mark := range lineMark {
		if err := d.SetLine(l, Line{Mark: mark, Weight: 1, Dead: l == 1, NATAddrs: natAddrs(l)}); err != nil {
			f.Fatal(err)
		}
	}
	if err := d.SetBuckets(Buckets(nil, []int{1, 1, 1}, []bool{true, true, true})); err != nil {
		f.Fatal(err)
	}
	if err := d.SetLocal([]netip.Addr{local4, local6}); err != nil {
		f.Fatal(err)
	}
	// Rules too, so that new flows go through the classifier: policy 1
	// on line 0; policy 2 on the dead line 1 alone (its new flows fall
	// back to policy 0's lines); policy 3 as well, with last resort
	// unreachable (its new flows get the unreachable mark, no flow).
	if err := d.SetPolicies([]PolicyTable{
		{Buckets: Buckets(nil, []int{1, 1, 1}, []bool{true, true, true})},
		{Buckets: allOn(0)},
		{Buckets: allOn(1)},
		{LastResort: LastResortUnreachable, Buckets: allOn(1)},
	}); err != nil {
		f.Fatal(err)
	}
	if err := d.SetLastResortMarks(unreachMark, blackholeMark); err != nil {
		f.Fatal(err)
	}
	if err := d.SetRuleSet(buildRuleSet([]testRule{
		{dst: pfx("203.0.113.0/24", "2001:db8:cc::/48"), policy: 1},
		{protos: []uint8{protoUDP}, dports: portRange(53, 53), policy: 2},
		{dscps: []uint8{46}, policy: 3},
		{src: pfx("192.0.2.128/25"), sports: portRange(1000, 1999), policy: 1, sticky: time.Second},
	})); err != nil {
		f.Fatal(err)
	}

	f.Fuzz(func(t *testing.T, frame []byte, mark uint32) {
		// BPF_PROG_TEST_RUN takes an Ethernet header and at most a page.
		if len(frame) < 14 || len(frame) > 1500 {
			return
		}
		before := countFlows(t, d)
		reasonsBefore := reasonTotal(t, d)
		var inMark, outMark uint32
		err := ns.do(func() (err error) {
			if inMark, err = runMark(d.objs.UplinkdLanIn, frame, mark); err != nil {
				return err
			}
			outMark, err = runMark(d.objs.UplinkdLanOut, frame, mark)
			return err
		})
		if errors.Is(err, unix.EINVAL) {
			// BPF_PROG_TEST_RUN refuses some frames before running the
			// program (an IPv6 ethertype with less than an IPv6 header).
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		if outMark != mark {
			t.Errorf("LAN egress changed the mark %#x to %#x", mark, outMark)
		}
		if inMark&^d.markMask != mark&^d.markMask {
			t.Errorf("LAN ingress changed mark bits outside the mask: %#x -> %#x", mark, inMark)
		}
		if inMark != mark && inMark&d.markMask != lineMark[0] && inMark&d.markMask != lineMark[2] && inMark&d.markMask != unreachMark {
			t.Errorf("LAN ingress set mark %#x, not a live line's nor the unreachable last resort's", inMark)
		}
		if n := reasonTotal(t, d) - reasonsBefore; n != 1 {
			t.Errorf("LAN ingress counted %d reasons, want 1", n)
		}
		after := checkFlows(t, d)
		switch why := mustNotSteer(frame); {
		case after < before || after > before+1:
			t.Errorf("flows %d -> %d after one frame", before, after)
		case why != "" && (after != before || inMark != mark):
			t.Errorf("frame must not be steered (%s): flows %d -> %d, mark %#x -> %#x", why, before, after, mark, inMark)
		}
		checkKeys(t, d, frame, func(prog *ebpf.Program, f []byte) error {
			err := ns.do(func() error { _, err := runMark(prog, f, mark); return err })
			if errors.Is(err, unix.EINVAL) {
				return errTestRunRefused
			}
			return err
		})
		// Few flows: checkKeys reads the whole map several times a frame.
		if after > 64 {
			clearFlows(t, d)
		}
	})
}

// runMark runs prog on frame with the given input mark; an error unless
// it returned TC_ACT_UNSPEC.
func runMark(prog *ebpf.Program, frame []byte, mark uint32) (uint32, error) {
	out := make([]byte, skbCtxOutSize)
	ret, err := prog.Run(&ebpf.RunOptions{Data: frame, Context: skbCtx{Mark: mark}, ContextOut: out})
	if err != nil {
		return 0, err
	}
	if ret != tcActUnspec {
		return 0, errors.New("program did not return TC_ACT_UNSPEC")
	}
	return skbMark(out), nil
}

func reasonTotal(t *testing.T, d *Datapath) uint64 {
	var n uint64
	for _, c := range reasons(t, d) {
		n += c
	}
	return n
}

func countFlows(t *testing.T, d *Datapath) int {
	n := 0
	if err := d.Flows(func(Flow) bool { n++; return true }); err != nil {
		t.Fatal(err)
	}
	return n
}

func clearFlows(t *testing.T, d *Datapath) {
	var (
		k    uplinkdFlowKey
		v    uplinkdFlow
		keys []uplinkdFlowKey
	)
	it := d.objs.UlFlows.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, k)
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if err := d.objs.UlFlows.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			t.Fatal(err)
		}
	}
}

// checkFlows checks every entry of the flow map and returns their number.
func checkFlows(t *testing.T, d *Datapath) int {
	var (
		k uplinkdFlowKey
		v uplinkdFlow
		n int
	)
	it := d.objs.UlFlows.Iterate()
	for it.Next(&k, &v) {
		n++
		if why := badFlow(&k, &v); why != "" {
			t.Errorf("flow %+v -> %+v: %s", k, v, why)
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

func badFlow(k *uplinkdFlowKey, v *uplinkdFlow) string {
	v4mapped := func(a [16]byte) bool { return netip.AddrFrom16(a).Is4In6() }
	switch {
	case k.Pad != 0:
		return "pad not zero"
	case k.Family == 2 && (!v4mapped(k.Saddr) || !v4mapped(k.Daddr)):
		return "IPv4 flow without v4-mapped addresses"
	case k.Family == 2 && k.Proto != protoTCP && k.Proto != protoUDP && k.Proto != protoICMP:
		return "IPv4 flow of another protocol"
	case k.Family == 10 && k.Proto != protoTCP && k.Proto != protoUDP && k.Proto != protoICMPv6:
		return "IPv6 flow of another protocol"
	case k.Family != 2 && k.Family != 10:
		return "unknown family"
	case (k.Proto == protoICMP || k.Proto == protoICMPv6) && k.Dport != 0:
		return "ICMP flow with a destination port"
	case v.Line != 0 && v.Line != 2:
		return "not pinned to a live line"
	case v.Flags&flowRecovered != 0:
		return "recovered without conntrack"
	case v.Flags&^(flowClassified|flowRuleMask<<flowRuleShift|flowPolicyMask<<flowPolicyShift) != 0:
		return "unknown flags"
	case v.Flags&flowClassified == 0:
		return "not classified, with a rule set in force"
	case !fuzzRulePolicy(v.Flags):
		return "a rule or policy the fuzz's rule set does not have"
	case v.TxPackets == 0 || v.TxBytes < 14*v.TxPackets:
		return "tx counters"
	case v.FirstSeen == 0 || v.LastSeen < v.FirstSeen:
		return "timestamps"
	}
	nat := natAddrs(int(v.Line))[0]
	if k.Family == 10 {
		nat = natAddrs(int(v.Line))[1]
	}
	if v.NatAddr != nat.As16() {
		return "NAT address is not the line's"
	}
	return ""
}

// mustNotSteer says why LAN ingress must leave frame alone (no mark, no
// flow), or "" when it may steer it. It is written apart from the C
// parser, from the protocols' definitions.
func mustNotSteer(frame []byte) string {
	be16 := binary.BigEndian.Uint16
	if frame[0]&1 != 0 {
		return "L2 multicast or broadcast"
	}
	off, etherType := 14, be16(frame[12:])
	for i := 0; i < 2 && (etherType == tpid8021Q || etherType == tpid8021AD); i++ {
		if len(frame) < off+4 {
			return "truncated VLAN tag"
		}
		etherType = be16(frame[off+2:])
		off += 4
	}
	ip := frame[off:]
	switch etherType {
	case etherIPv4:
		if len(ip) < 20 {
			return "truncated IPv4"
		}
		if ip[0]>>4 != 4 || ip[0]&0xf < 5 {
			return "malformed IPv4"
		}
		if be16(ip[6:])&0x1fff != 0 {
			return "non-first IPv4 fragment"
		}
		dst := netip.AddrFrom4([4]byte(ip[16:20]))
		switch {
		case dst.IsMulticast() || dst == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
			return "IPv4 multicast or broadcast"
		case dst.IsLinkLocalUnicast():
			return "IPv4 link-local"
		case dst == local4:
			return "to the gateway"
		}
	case etherIPv6:
		if len(ip) < 40 {
			return "truncated IPv6"
		}
		if ip[0]>>4 != 6 {
			return "malformed IPv6"
		}
		dst := netip.AddrFrom16([16]byte(ip[24:40]))
		switch {
		case dst.IsMulticast():
			return "IPv6 multicast"
		case dst.IsLinkLocalUnicast():
			return "IPv6 link-local"
		case dst == local6:
			return "to the gateway"
		}
		next, off := ip[6], 40
		for range 8 {
			switch next {
			case extHopByHop, extRouting, extDestOpts:
				if len(ip) < off+2 {
					return "truncated IPv6 extension header"
				}
				next, off = ip[off], off+(int(ip[off+1])+1)*8
				continue
			case extFragment:
				if len(ip) < off+8 {
					return "truncated IPv6 fragment header"
				}
				if be16(ip[off+2:])&0xfff8 != 0 {
					return "non-first IPv6 fragment"
				}
				next, off = ip[off], off+8
				continue
			}
			break
		}
	default:
		return "not IP"
	}
	return ""
}

// fuzzSeeds are frames of every shape the parser knows.
func fuzzSeeds() []packet {
	v6 := func(p packet) packet { p.src, p.dst = client6, server6; return p }
	icmp := packet{src: client4, dst: server4, proto: protoICMP, icmpType: icmpEcho, sport: 7}
	icmp6 := packet{src: client6, dst: server6, proto: protoICMPv6, icmpType: icmp6Echo, sport: 7}
	return []packet{
		tcp4(40000), udp4(40001), icmp, v6(tcp4(40002)), v6(udp4(40003)), icmp6,
		{vlans: []uint16{tpid8021Q}, src: client4, dst: server4, proto: protoTCP, sport: 40004, dport: 80},
		{vlans: []uint16{tpid8021AD, tpid8021Q}, src: client6, dst: server6, proto: protoUDP, sport: 40005, dport: 53},
		{src: client4, dst: server4, proto: protoTCP, sport: 40006, dport: 80, ipOptions: 8},
		{src: client4, dst: server4, proto: protoUDP, sport: 40007, dport: 53, moreFrags: true, payload: 64},
		{src: client4, dst: server4, proto: protoUDP, fragOffset: 8, payload: 64},
		{src: client6, dst: server6, proto: protoTCP, sport: 40008, dport: 443, extHdrs: []uint8{extHopByHop, extRouting, extDestOpts}},
		{src: client6, dst: server6, proto: protoUDP, sport: 40009, dport: 53, extHdrs: []uint8{extFragment}, moreFrags: true},
		{src: client6, dst: server6, proto: protoUDP, extHdrs: []uint8{extFragment}, fragOffset: 8},
		{src: client4, dst: server4, proto: protoTCP, sport: 40010, dport: 80, cut: 18},
		{src: client6, dst: server6, proto: protoTCP, sport: 40011, dport: 80, cut: 30},
		{src: client4, dst: netip.MustParseAddr("224.0.0.251"), proto: protoUDP, sport: 5353, dport: 5353},
		{src: client4, dst: netip.MustParseAddr("169.254.1.1"), proto: protoTCP, sport: 40012, dport: 80},
		{src: client6, dst: netip.MustParseAddr("fe80::1"), proto: protoTCP, sport: 40013, dport: 80},
		{src: client4, dst: local4, proto: protoTCP, sport: 40014, dport: 22},
		{src: client6, dst: local6, proto: protoTCP, sport: 40015, dport: 22},
		{src: client6, dst: server6, proto: protoICMPv6, icmpType: icmp6NS},
		{src: client4, dst: server4, proto: protoICMP, icmpType: icmpUnreach},
		{src: client4, dst: server4, proto: protoGRE},
		{etherType: etherARP},
		{etherType: etherLLDP},
		{src: client4, dst: server4, proto: protoTCP, version: 6},
		{src: client4, dst: server4, proto: protoTCP, ihl: 3},
		// The fast parser's edges: the shortest frames it reads (38 and 58
		// bytes), a first fragment, sources a reply cannot go back to.
		{src: client4, dst: server4, proto: protoTCP, sport: 40016, dport: 80, cut: 16},
		{src: client6, dst: server6, proto: protoTCP, sport: 40017, dport: 80, cut: 16},
		{src: client4, dst: server4, proto: protoTCP, sport: 40018, dport: 80, moreFrags: true, tcpFlags: tcpSYN},
		{src: netip.MustParseAddr("169.254.3.3"), dst: server4, proto: protoUDP, sport: 40019, dport: 53},
		{src: netip.MustParseAddr("fe80::5"), dst: server6, proto: protoTCP, sport: 40020, dport: 443},
		{src: netip.MustParseAddr("224.1.1.1"), dst: server4, proto: protoUDP, sport: 40021, dport: 53},
	}
}

// fuzzRulePolicy reports whether a flow's rule and policy are of
// FuzzLANPrograms's rule set: no rule and policy 0, or one of its four
// rules with its policy (a flow of rule 1 or 2 keeps the policy it was
// classified in, whichever line it fell back to).
func fuzzRulePolicy(flags uint32) bool {
	rule, policy := flowRulePolicy(flags)
	want := map[int]int{-1: 0, 0: 1, 1: 2, 2: 3, 3: 1}
	p, ok := want[rule]
	return ok && p == policy
}
