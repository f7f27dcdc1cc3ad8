// SPDX-License-Identifier: Apache-2.0

package loader_test

import (
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/uplinkd/uplinkd/control/policy"
	"github.com/uplinkd/uplinkd/loader"
)

func init() {
	loader.BenchRuleSet = func(n int) (loader.RuleSet, error) {
		r := rand.New(rand.NewPCG(uint64(n), 4))
		return policy.Compile(policy.RandomRules(r, n, []int{7, 8}, 4))
	}
}

// TestDatapathClassifiesAsMatch holds the datapath to policy.Match, the
// reference: random rules compiled by policy.Compile and installed with
// SetRuleSet, random packets through LAN ingress (BPF_PROG_TEST_RUN), and
// the rule each new flow's entry records.
func TestDatapathClassifiesAsMatch(t *testing.T) {
	d := loader.LoadForTest(t)
	if err := d.SetLine(0, loader.Line{Mark: 0x100}); err != nil {
		t.Fatal(err)
	}
	buckets := make([]int, loader.NumBuckets)
	if err := d.SetBuckets(buckets); err != nil { // every bucket on line 0
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(12, 1))
	lans := []int{3, 4, 5, 3 + 64} // 67 shares 3's slot in ul_rule_lan_slots
	matched, later, total := 0, 0, 0
	sizes := []int{1, 3, 10, 40, 64, 65, 150, 700}
	for set := range 40 {
		var rules []policy.Rule
		if set%8 == 7 {
			// Large and realistic: thousands of prefixes in the tries.
			rules = policy.RandomRules(r, []int{1000, 4096}[set/8%2], lans, 8)
		} else {
			rules = genRules(r, sizes[r.IntN(len(sizes))], lans)
		}
		rs, err := policy.Compile(rules)
		if err != nil {
			t.Fatal(err)
		}
		if err := d.SetRuleSet(rs); err != nil {
			t.Fatal(err)
		}
		if _, err := d.ClearFlows(); err != nil {
			t.Fatal(err)
		}
		for range 100 {
			p, lan := genPacket(r, rules, lans)
			want := policy.Match(rules, policyPacket(p, lan))
			d.RunLANIngress(t, p, lan)
			f, ok := d.PinnedFlow(t, p)
			if !ok {
				t.Fatalf("set %d: packet %+v (lan %d) pinned no flow", set, p, lan)
			}
			wantPolicy := 0
			if want >= 0 {
				wantPolicy = rules[want].Policy
			}
			if f.Rule != want || f.Policy != wantPolicy {
				t.Fatalf("set %d of %d rules: packet %+v (lan %d): flow of rule %d, policy %d; Match says rule %d, policy %d\nclassify says %d",
					set, len(rules), p, lan, f.Rule, f.Policy, want, wantPolicy, policy.Classify(rs, policyPacket(p, lan)))
			}
			total++
			if want >= 0 {
				matched++
			}
			if want > 0 {
				later++
			}
		}
	}
	t.Logf("%d packets: %d matched a rule, %d a rule past the first", total, matched, later)
	if matched < total/3 || later < matched/3 {
		t.Errorf("the generator is off: %d of %d packets matched, %d past the first rule", matched, total, later)
	}
}

func policyPacket(p loader.TestPacket, lan int) policy.Packet {
	hasPorts := p.Proto == 6 || p.Proto == 17
	q := policy.Packet{Src: p.Src, Dst: p.Dst, Proto: p.Proto, DSCP: p.DSCP, LAN: lan, HasPorts: hasPorts}
	if hasPorts {
		q.SrcPort, q.DstPort = p.SrcPort, p.DstPort
	}
	return q
}

// The generators draw from a small space of addresses (within
// 100.64.0.0/28 and 2001:db8::/124, and 1 in 8 anywhere), ports,
// protocols, DSCPs and LANs, so that rules nest and overlap and packets
// often match, and not only the first rule.
func genAddr(r *rand.Rand, v6 bool) netip.Addr {
	if r.IntN(8) == 0 { // anywhere
		var a [16]byte
		for i := range a {
			a[i] = byte(r.Uint32())
		}
		if !v6 {
			return netip.AddrFrom4([4]byte(a[:4]))
		}
		return netip.AddrFrom16(a)
	}
	h := byte(r.IntN(16))
	if r.IntN(16) == 0 {
		h = 0x80 | byte(r.IntN(128)) // outside every /28 of the generator
	}
	if v6 {
		return netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: h})
	}
	return netip.AddrFrom4([4]byte{100, 64, 0, h})
}

func genPrefix(r *rand.Rand, v6 bool) netip.Prefix {
	a := genAddr(r, v6)
	bits := []int{0, 8, 24, 28, 29, 30, 31, 32}[r.IntN(8)]
	if v6 {
		bits = []int{0, 32, 120, 124, 125, 126, 127, 128}[r.IntN(8)]
	}
	p, _ := a.Prefix(bits)
	return p
}

var genPorts = []uint16{0, 1, 2, 3, 53, 443, 1024, 65534, 65535}

func genRange(r *rand.Rand) policy.PortRange {
	a, b := genPorts[r.IntN(len(genPorts))], genPorts[r.IntN(len(genPorts))]
	return policy.PortRange{First: min(a, b), Last: max(a, b)}
}

func genRules(r *rand.Rand, n int, lans []int) []policy.Rule {
	rules := make([]policy.Rule, n)
	for i := range rules {
		ru := &rules[i]
		for range r.IntN(3) - r.IntN(2) { // mostly none or one
			ru.Src = append(ru.Src, genPrefix(r, r.IntN(3) == 0))
		}
		for range r.IntN(3) - r.IntN(2) {
			ru.Dst = append(ru.Dst, genPrefix(r, r.IntN(3) == 0))
		}
		switch r.IntN(4) {
		case 0:
			ru.Protos = []uint8{6}
		case 1:
			ru.Protos = []uint8{17, 6}
		case 2:
			ru.Protos = []uint8{[]uint8{1, 58}[r.IntN(2)]}
		}
		if len(ru.Protos) > 0 && ru.Protos[0] != 1 && ru.Protos[0] != 58 {
			if r.IntN(3) == 0 {
				ru.SrcPorts = []policy.PortRange{genRange(r)}
			}
			if r.IntN(2) == 0 {
				ru.DstPorts = []policy.PortRange{genRange(r), genRange(r)}[:1+r.IntN(2)]
			}
		}
		if r.IntN(5) == 0 {
			ru.DSCPs = []uint8{0, 10, 46, 63}[:1+r.IntN(4)]
		}
		if r.IntN(5) == 0 {
			ru.LANs = []int{lans[r.IntN(len(lans))]}
		}
		ru.Policy = r.IntN(8)
	}
	return rules
}

// genPacket draws a packet: half the time one built to satisfy a random
// rule (before the rules before it are considered), else at random.
func genPacket(r *rand.Rand, rules []policy.Rule, lans []int) (loader.TestPacket, int) {
	v6 := r.IntN(3) == 0
	p := loader.TestPacket{Src: genAddr(r, v6), Dst: genAddr(r, v6), SrcPort: genPorts[r.IntN(len(genPorts))], DstPort: genPorts[r.IntN(len(genPorts))]}
	p.Proto = []uint8{6, 17, 1}[r.IntN(3)]
	if v6 && p.Proto == 1 {
		p.Proto = 58
	}
	p.DSCP = []uint8{0, 10, 46, 63, 5}[r.IntN(5)]
	lan := []int{lans[0], lans[1], lans[2], 99}[r.IntN(4)]
	if len(rules) == 0 || r.IntN(2) == 0 {
		return fix(p), lan
	}
	ru := rules[r.IntN(len(rules))]
	// Its addresses first: they set the family.
	if len(ru.Src) > 0 {
		q := ru.Src[r.IntN(len(ru.Src))]
		p.Src = inPrefix(r, q)
		v6 = q.Addr().Is6()
	}
	if len(ru.Dst) > 0 {
		q := ru.Dst[r.IntN(len(ru.Dst))]
		if q.Addr().Is6() == v6 {
			p.Dst = inPrefix(r, q)
		}
	}
	if p.Src.Is6() != p.Dst.Is6() {
		p.Dst = genAddr(r, p.Src.Is6())
	}
	if len(ru.Protos) > 0 {
		p.Proto = ru.Protos[r.IntN(len(ru.Protos))]
	}
	if len(ru.SrcPorts) > 0 {
		p.SrcPort = ru.SrcPorts[0].First
	}
	if len(ru.DstPorts) > 0 {
		p.DstPort = ru.DstPorts[0].Last
	}
	if len(ru.DSCPs) > 0 {
		p.DSCP = ru.DSCPs[r.IntN(len(ru.DSCPs))]
	}
	if len(ru.LANs) > 0 {
		lan = ru.LANs[0]
	}
	return fix(p), lan
}

// inPrefix is a random address of q.
func inPrefix(r *rand.Rand, q netip.Prefix) netip.Addr {
	a := q.Masked().Addr().AsSlice()
	for i := range a {
		bitsBefore := i * 8
		for b := 0; b < 8; b++ {
			if bitsBefore+b >= q.Bits() && r.IntN(2) == 1 {
				a[i] |= 0x80 >> b
			}
		}
	}
	addr, _ := netip.AddrFromSlice(a)
	return addr
}

// fix makes p a packet the datapath pins: ICMP of its family, a unicast
// routable destination.
func fix(p loader.TestPacket) loader.TestPacket {
	switch {
	case p.Proto == 1 && p.Src.Is6():
		p.Proto = 58
	case p.Proto == 58 && p.Src.Is4():
		p.Proto = 1
	}
	if p.Dst.IsMulticast() || p.Dst.IsLinkLocalUnicast() {
		p.Dst = netip.MustParseAddr("100.64.0.1")
		if p.Src.Is6() {
			p.Dst = netip.MustParseAddr("2001:db8::1")
		}
	}
	return p
}
