// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
)

// These tests run LAN ingress (BPF_PROG_TEST_RUN) under rule sets built
// here by a plain compiler of their own (buildRuleSet): control/policy's
// Compile is held to the datapath in rules_property_test.go.

// testRule is a rule as buildRuleSet takes it: an empty field is any.
type testRule struct {
	src, dst      []netip.Prefix
	protos        []uint8
	sports        []PortBitmap // First, Last; Bitmap unused
	dports        []PortBitmap
	dscps         []uint8
	lans          []int
	policy        int
	sticky        time.Duration
	stickyPerRule bool
}

// buildRuleSet compiles rules the obvious way: every table entry's bitmap
// holds the rules that entry's values satisfy, checked rule by rule.
func buildRuleSet(rules []testRule) RuleSet {
	if len(rules) == 0 {
		return RuleSet{}
	}
	words := (len(rules) + 63) / 64
	rs := RuleSet{Words: words, LAN: map[int]uint32{}}
	ids := map[string]uint32{}
	intern := func(ok func(r testRule) bool) uint32 {
		b := make([]uint64, words)
		for i, r := range rules {
			if ok(r) {
				b[i/64] |= 1 << (i % 64)
			}
		}
		k := fmt.Sprint(b)
		if id, ok := ids[k]; ok {
			return id
		}
		ids[k] = uint32(len(rs.Bitmaps))
		rs.Bitmaps = append(rs.Bitmaps, b)
		return ids[k]
	}
	prefixes := func(field func(testRule) []netip.Prefix) []PrefixBitmap {
		all := []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}
		for _, r := range rules {
			for _, p := range field(r) {
				if !slices.Contains(all, p) {
					all = append(all, p)
				}
			}
		}
		var t []PrefixBitmap
		for _, p := range all {
			// An address whose longest match is p is in every rule
			// prefix that holds p, and in no other.
			t = append(t, PrefixBitmap{p, intern(func(r testRule) bool {
				return len(field(r)) == 0 || slices.ContainsFunc(field(r), func(q netip.Prefix) bool {
					return q.Bits() <= p.Bits() && q.Contains(p.Addr())
				})
			})})
		}
		return t
	}
	rs.Src = prefixes(func(r testRule) []netip.Prefix { return r.src })
	rs.Dst = prefixes(func(r testRule) []netip.Prefix { return r.dst })
	inPorts := func(ranges []PortBitmap, port int) bool {
		return len(ranges) == 0 || slices.ContainsFunc(ranges, func(pr PortBitmap) bool { return int(pr.First) <= port && port <= int(pr.Last) })
	}
	ports := func(field func(testRule) []PortBitmap) []PortBitmap {
		cuts := []int{0, numPorts}
		for _, r := range rules {
			for _, pr := range field(r) {
				cuts = append(cuts, int(pr.First), int(pr.Last)+1)
			}
		}
		slices.Sort(cuts)
		cuts = slices.Compact(cuts)
		var t []PortBitmap
		for i := 0; i+1 < len(cuts); i++ {
			first := cuts[i]
			t = append(t, PortBitmap{uint16(first), uint16(cuts[i+1] - 1), intern(func(r testRule) bool { return inPorts(field(r), first) })})
		}
		return t
	}
	rs.SrcPort = ports(func(r testRule) []PortBitmap { return r.sports })
	rs.DstPort = ports(func(r testRule) []PortBitmap { return r.dports })
	for v := range rs.Proto {
		rs.Proto[v] = intern(func(r testRule) bool { return len(r.protos) == 0 || slices.Contains(r.protos, uint8(v)) })
	}
	for v := range rs.DSCP {
		rs.DSCP[v] = intern(func(r testRule) bool { return len(r.dscps) == 0 || slices.Contains(r.dscps, uint8(v)) })
	}
	rs.NoPorts = intern(func(r testRule) bool { return len(r.sports) == 0 && len(r.dports) == 0 })
	for _, r := range rules {
		for _, lan := range r.lans {
			rs.LAN[lan] = intern(func(r testRule) bool { return len(r.lans) == 0 || slices.Contains(r.lans, lan) })
		}
	}
	rs.AnyLAN = intern(func(r testRule) bool { return len(r.lans) == 0 })
	for _, r := range rules {
		rs.Actions = append(rs.Actions, RuleAction{ID: len(rs.Actions), Policy: r.policy, Sticky: r.sticky, StickyPerRule: r.stickyPerRule})
	}
	return rs
}

func pfx(s ...string) []netip.Prefix {
	var p []netip.Prefix
	for _, x := range s {
		if !strings.Contains(x, "/") {
			a := netip.MustParseAddr(x)
			p = append(p, netip.PrefixFrom(a, a.BitLen()))
			continue
		}
		p = append(p, netip.MustParsePrefix(x))
	}
	return p
}

func portRange(first, last uint16) []PortBitmap { return []PortBitmap{{First: first, Last: last}} }

// allOn is a bucket table of line l alone; noLine one of no line.
func allOn(l int) []int {
	t := make([]int, NumBuckets)
	for b := range t {
		t[b] = l
	}
	return t
}

func noLine() []int { return allOn(NoLine) }

// policyTables sets policy 0 to line 1 (as steering does) and policies
// 1..n to the given tables.
func policyTables(tables ...PolicyTable) []PolicyTable {
	return append([]PolicyTable{{Buckets: allOn(1)}}, tables...)
}

func setPolicies(t *testing.T, d *Datapath, tables []PolicyTable) {
	t.Helper()
	if err := d.SetPolicies(tables); err != nil {
		t.Fatal(err)
	}
}

func setRules(t *testing.T, d *Datapath, rules []testRule) {
	t.Helper()
	if err := d.SetRuleSet(buildRuleSet(rules)); err != nil {
		t.Fatal(err)
	}
}

// pinnedRule is the rule and policy recorded in p's flow; ok false when
// no flow is pinned.
func pinnedRule(t *testing.T, d *Datapath, p packet) (rule, policy int, ok bool) {
	t.Helper()
	f, ok := lookupFlow(t, d, p)
	if !ok {
		return 0, 0, false
	}
	rule, policy = flowRulePolicy(f.Flags)
	return rule, policy, true
}

const testLAN = 7 // the ingress ifindex the tests' packets come in by, unless a case says another

// classifying loads the steering datapath (policy 0: line 1) with
// policy 1 on line 0 and policy 2 on line 2.
func classifying(t *testing.T) *Datapath {
	t.Helper()
	d := steering(t)
	setPolicies(t, d, policyTables(PolicyTable{Buckets: allOn(0)}, PolicyTable{Buckets: allOn(2)}))
	return d
}

func TestRulesClassifyNewFlows(t *testing.T) {
	d := classifying(t)
	rules := []testRule{
		0: {dst: pfx("203.0.113.0/24"), policy: 1},
		1: {protos: []uint8{protoUDP}, dports: portRange(5060, 5061), policy: 2},
		2: {src: pfx("192.168.1.77"), policy: 1},
		3: {protos: []uint8{protoICMP, protoICMPv6}, policy: 2},
		4: {dscps: []uint8{46}, policy: 1},
		5: {lans: []int{9}, policy: 2},
		6: {dst: pfx("2001:db8:aa::/48"), sports: portRange(1000, 1999), policy: 1},
		7: {src: pfx("2001:db8:1::77"), dscps: []uint8{10}, policy: 2},
		8: {protos: []uint8{protoTCP}, dports: portRange(8000, 8999), lans: []int{testLAN, 11}, policy: 1},
		// ul_rule_lan_slots: 73 shares 9's slot, 139 11's; 7's is its own.
		9: {lans: []int{9 + 64, 11 + 128}, policy: 1},
	}
	setRules(t, d, rules)

	other4 := netip.MustParseAddr("198.51.100.9")
	tests := []struct {
		name string
		pkt  packet
		lan  uint32
		rule int // -1: none, policy 0
	}{
		{"v4 dst prefix", packet{src: client4, dst: netip.MustParseAddr("203.0.113.5"), proto: protoTCP, sport: 101, dport: 443}, testLAN, 0},
		{"v4 dst outside prefix", packet{src: client4, dst: netip.MustParseAddr("203.0.114.5"), proto: protoTCP, sport: 102, dport: 443}, testLAN, -1},
		{"first match wins", packet{src: client4, dst: netip.MustParseAddr("203.0.113.5"), proto: protoUDP, sport: 103, dport: 5060}, testLAN, 0},
		{"udp dst port", packet{src: client4, dst: other4, proto: protoUDP, sport: 104, dport: 5061}, testLAN, 1},
		{"tcp to the udp port", packet{src: client4, dst: other4, proto: protoTCP, sport: 105, dport: 5061}, testLAN, -1},
		{"udp port out of range", packet{src: client4, dst: other4, proto: protoUDP, sport: 106, dport: 5062}, testLAN, -1},
		{"v4 src host", packet{src: netip.MustParseAddr("192.168.1.77"), dst: other4, proto: protoTCP, sport: 107, dport: 443}, testLAN, 2},
		{"v4 icmp", packet{src: client4, dst: other4, proto: protoICMP, icmpType: icmpEcho, sport: 5}, testLAN, 3},
		{"v6 icmp", packet{src: client6, dst: server6, proto: protoICMPv6, icmpType: icmp6Echo, sport: 5}, testLAN, 3},
		{"v4 dscp", packet{src: client4, dst: other4, proto: protoTCP, sport: 108, dport: 443, dscp: 46}, testLAN, 4},
		{"v4 dscp with options (slow parser)", packet{src: client4, dst: other4, proto: protoTCP, sport: 109, dport: 443, dscp: 46, ipOptions: 8}, testLAN, 4},
		{"v4 dscp behind a vlan tag", packet{vlans: []uint16{tpid8021Q}, src: client4, dst: other4, proto: protoUDP, sport: 110, dport: 443, dscp: 46}, testLAN, 4},
		{"v4 other dscp", packet{src: client4, dst: other4, proto: protoTCP, sport: 111, dport: 443, dscp: 45}, testLAN, -1},
		{"v6 dscp", packet{src: client6, dst: server6, proto: protoUDP, sport: 112, dport: 443, dscp: 46}, testLAN, 4},
		{"lan ifindex", packet{src: client4, dst: other4, proto: protoTCP, sport: 113, dport: 443}, 9, 5},
		{"v6 dst prefix and src port", packet{src: client6, dst: netip.MustParseAddr("2001:db8:aa::1"), proto: protoTCP, sport: 1500, dport: 443}, testLAN, 6},
		{"v6 dst prefix, other src port", packet{src: client6, dst: netip.MustParseAddr("2001:db8:aa::1"), proto: protoTCP, sport: 2000, dport: 443}, testLAN, -1},
		{"v6 src host and dscp", packet{src: netip.MustParseAddr("2001:db8:1::77"), dst: server6, proto: protoUDP, sport: 116, dport: 53, dscp: 10}, testLAN, 7},
		{"v6 src host, other dscp", packet{src: netip.MustParseAddr("2001:db8:1::77"), dst: server6, proto: protoUDP, sport: 117, dport: 53}, testLAN, -1},
		{"tcp port on a listed lan", packet{src: client4, dst: other4, proto: protoTCP, sport: 118, dport: 8080}, 11, 8},
		{"tcp port on another lan", packet{src: client4, dst: other4, proto: protoTCP, sport: 119, dport: 8080}, 12, -1},
		{"v4 nothing", packet{src: client4, dst: other4, proto: protoTCP, sport: 120, dport: 443}, testLAN, -1},
		{"lan sharing a slot", packet{src: client4, dst: other4, proto: protoTCP, sport: 121, dport: 443}, 73, 9},
		{"other lan sharing that slot", packet{src: client4, dst: other4, proto: protoTCP, sport: 122, dport: 443}, 139, 9},
		{"unnamed lan in a shared slot", packet{src: client4, dst: other4, proto: protoTCP, sport: 123, dport: 443}, 9 + 128, -1},
		{"unnamed lan in a named one's slot", packet{src: client4, dst: other4, proto: protoTCP, sport: 124, dport: 443}, testLAN + 64, -1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			policy := 0
			if tt.rule >= 0 {
				policy = rules[tt.rule].policy
			}
			// policy 0: line 1; policy 1: line 0; policy 2: line 2.
			wantLine := map[int]int{0: 1, 1: 0, 2: 2}[policy]
			mark := runOn(t, d.objs.UplinkdLanIn, tt.pkt.bytes(), foreignMark, tt.lan)
			if want := foreignMark | lineMark[wantLine]; mark != want {
				t.Errorf("mark %#x, want %#x (line %d)", mark, want, wantLine)
			}
			rule, pol, ok := pinnedRule(t, d, tt.pkt)
			if !ok || rule != tt.rule || pol != policy {
				t.Errorf("flow pinned %v by rule %d, policy %d; want rule %d, policy %d", ok, rule, pol, tt.rule, policy)
			}
		})
	}

	// The flows say so too.
	var flows []Flow
	if err := d.Flows(func(f Flow) bool { flows = append(flows, f); return true }); err != nil {
		t.Fatal(err)
	}
	if i := slices.IndexFunc(flows, func(f Flow) bool { return f.Src.Port() == 1500 }); i < 0 || flows[i].Rule != 6 || flows[i].Policy != 1 || flows[i].Line != 0 {
		t.Errorf("flows: %+v, want one of rule 6, policy 1, line 0", flows)
	}
	if i := slices.IndexFunc(flows, func(f Flow) bool { return f.Src.Port() == 120 }); i < 0 || flows[i].Rule != -1 || flows[i].Policy != 0 {
		t.Errorf("flows: %+v, want one of no rule, policy 0", flows)
	}
}

// Without a rule set, flows record no rule and policy 0, and the
// counters of rules and policies stay at zero.
func TestNoRulesNoClassification(t *testing.T) {
	d := steering(t)
	p := tcp4(100)
	if mark := steer(t, d, p, "new_flow"); mark != foreignMark|lineMark[1] {
		t.Fatalf("mark %#x", mark)
	}
	if f, ok := lookupFlow(t, d, p); !ok || f.Flags != 0 {
		t.Errorf("flow %+v, want flags 0", f)
	}
	hits, err := d.RuleHits()
	if err != nil || len(hits) != 0 {
		t.Errorf("rule hits %v, %v; want none", hits, err)
	}
	flows, err := d.PolicyFlows()
	if err != nil || len(flows) != MaxPolicies || slices.ContainsFunc(flows, func(n uint64) bool { return n != 0 }) {
		t.Errorf("policy flows %v, %v; want %d zeros", flows, err, MaxPolicies)
	}
}

func TestPinnedFlowNeverReclassified(t *testing.T) {
	d := classifying(t)
	web := packet{src: client4, dst: server4, proto: protoTCP, sport: 200, dport: 443}
	setRules(t, d, []testRule{{dst: pfx("198.51.100.0/24"), policy: 1}})
	if mark := steer(t, d, web, "new_flow"); mark != foreignMark|lineMark[0] {
		t.Fatalf("mark %#x, want line 0's", mark)
	}
	// The same destination now goes to policy 2, by another rule.
	setRules(t, d, []testRule{{dst: pfx("203.0.113.0/24"), policy: 1}, {dst: pfx("198.51.100.0/24"), policy: 2}})
	for range 3 {
		if mark := steer(t, d, web, "existing_flow"); mark != foreignMark|lineMark[0] {
			t.Errorf("pinned flow's mark %#x, want line 0's", mark)
		}
	}
	if rule, policy, _ := pinnedRule(t, d, web); rule != 0 || policy != 1 {
		t.Errorf("pinned flow now says rule %d, policy %d; want 0 and 1 as pinned", rule, policy)
	}
	next := web
	next.sport++
	if mark := steer(t, d, next, "new_flow"); mark != foreignMark|lineMark[2] {
		t.Errorf("new flow's mark %#x, want line 2's", mark)
	}
	if rule, policy, _ := pinnedRule(t, d, next); rule != 1 || policy != 2 {
		t.Errorf("new flow: rule %d, policy %d; want 1 and 2", rule, policy)
	}
	// No rules at all: new flows are policy 0's, pinned ones stay.
	setRules(t, d, nil)
	if mark := steer(t, d, web, "existing_flow"); mark != foreignMark|lineMark[0] {
		t.Errorf("pinned flow's mark %#x without rules, want line 0's", mark)
	}
	third := next
	third.sport++
	if mark := steer(t, d, third, "new_flow"); mark != foreignMark|lineMark[1] {
		t.Errorf("new flow's mark %#x without rules, want line 1's", mark)
	}
	if f, _ := lookupFlow(t, d, third); f.Flags != 0 {
		t.Errorf("flow flags %#x without rules, want 0", f.Flags)
	}
}

// A policy's tiers as the control plane computes them: line 0 first, line
// 2 while line 0 is down; a UDP flow moved off a dead line stays within its
// policy.
func TestPolicyTiersAndMoves(t *testing.T) {
	d := classifying(t)
	setRules(t, d, []testRule{{protos: []uint8{protoUDP}, policy: 1}})
	udp := udp4(300)
	if mark := steer(t, d, udp, "new_flow"); mark != foreignMark|lineMark[0] {
		t.Fatalf("mark %#x, want line 0's (tier 1)", mark)
	}
	// Line 0 dies. Before the control plane moves the policy to its next
	// tier, a new flow of the policy finds no live line in its buckets: it
	// takes policy 0's (the default last resort), never line 0.
	setDead(t, d, 0)
	early := udp4(301)
	if mark := steer(t, d, early, "new_flow"); mark != foreignMark|lineMark[1] {
		t.Errorf("mark %#x while the policy's tier is dead, want policy 0's line 1", mark)
	}
	// Tier 2: line 2.
	setPolicies(t, d, policyTables(PolicyTable{Buckets: allOn(2)}, PolicyTable{Buckets: allOn(2)}))
	late := udp4(302)
	if mark := steer(t, d, late, "new_flow"); mark != foreignMark|lineMark[2] {
		t.Errorf("mark %#x in tier 2, want line 2's", mark)
	}
	// The flow pinned to line 0 moves within its policy: to line 2, not to
	// policy 0's line 1.
	if mark := steer(t, d, udp, "moved_flow"); mark != foreignMark|lineMark[2] {
		t.Errorf("moved flow's mark %#x, want line 2's (its policy's)", mark)
	}
	if f, _ := lookupFlow(t, d, udp); f.Line != 2 {
		t.Errorf("moved flow on line %d, want 2", f.Line)
	}
	// A flow of policy 0 moves by policy 0's buckets as ever.
	zero := udp4(303)
	zero.proto, zero.dport = protoTCP, 443
	if mark := steer(t, d, zero, "new_flow"); mark != foreignMark|lineMark[1] {
		t.Fatalf("policy 0 flow's mark %#x, want line 1's", mark)
	}
	// Weights within a tier: lines 0 and 2 of policy 1 at 1:3 (line 0
	// back), policy 0 untouched.
	setLive(t, d, 0)
	setPolicies(t, d, policyTables(PolicyTable{Buckets: Buckets(nil, []int{1, 0, 3}, []bool{true, true, true})}, PolicyTable{Buckets: allOn(2)}))
	count := map[uint32]int{}
	for i := range 400 {
		count[runOn(t, d.objs.UplinkdLanIn, udp4(uint16(1000+i)).bytes(), 0, testLAN)]++
	}
	if len(count) != 2 || count[lineMark[0]] < 60 || count[lineMark[0]] > 140 || count[lineMark[2]] < 260 {
		t.Errorf("400 flows of a 1:3 policy over lines 0 and 2: %v", count)
	}
}

func setLive(t *testing.T, d *Datapath, line int) {
	t.Helper()
	if err := d.SetLine(line, Line{Mark: lineMark[line], Weight: 1, NATAddrs: natAddrs(line)}); err != nil {
		t.Fatal(err)
	}
}

const (
	unreachMark   = 0x3e00
	blackholeMark = 0x3f00
)

func TestLastResorts(t *testing.T) {
	d := steering(t)
	setPolicies(t, d, policyTables(
		PolicyTable{LastResort: LastResortUnreachable, Buckets: noLine()},
		PolicyTable{LastResort: LastResortBlackhole, Buckets: noLine()},
		PolicyTable{LastResort: LastResortDefault, Buckets: noLine()},
	))
	setRules(t, d, []testRule{
		{dports: portRange(1, 1), policy: 1},
		{dports: portRange(2, 2), policy: 2},
		{dports: portRange(3, 3), policy: 3},
		{dports: portRange(4, 4), policy: 9}, // never set: policy 0 serves
	})
	pkt := func(dport uint16) packet {
		return packet{src: client4, dst: server4, proto: protoUDP, sport: 400, dport: dport}
	}

	// Marks not configured: every last resort is the default.
	for port := uint16(1); port <= 4; port++ {
		if mark := steer(t, d, pkt(port), "new_flow"); mark != foreignMark|lineMark[1] {
			t.Errorf("port %d without last resort marks: mark %#x, want policy 0's line 1", port, mark)
		}
	}
	if _, err := d.ClearFlows(); err != nil {
		t.Fatal(err)
	}

	if err := d.SetLastResortMarks(unreachMark, blackholeMark); err != nil {
		t.Fatal(err)
	}
	if err := d.SetLastResortMarks(0x10000, 0); err == nil {
		t.Error("a mark outside the mask was taken")
	}
	for _, c := range []struct {
		port   uint16
		reason string
		mark   uint32
	}{
		{1, "policy_unreachable", unreachMark},
		{2, "policy_blackhole", blackholeMark},
		{3, "new_flow", lineMark[1]},
		{4, "new_flow", lineMark[1]},
	} {
		packets := 1
		if c.reason != "new_flow" {
			packets = 2 // not pinned: the second packet is classified again
		}
		for range packets {
			if mark := steer(t, d, pkt(c.port), c.reason); mark != foreignMark|c.mark {
				t.Errorf("port %d: mark %#x, want %#x", c.port, mark, foreignMark|c.mark)
			}
		}
		_, pinned := lookupFlow(t, d, pkt(c.port))
		if want := c.reason == "new_flow"; pinned != want {
			t.Errorf("port %d: flow pinned %v, want %v", c.port, pinned, want)
		}
	}
	hits, err := d.RuleHits()
	if err != nil {
		t.Fatal(err)
	}
	// Unreachable and blackhole: each packet; the others, their flow
	// (before and after the marks).
	if want := []uint64{3, 3, 2, 2}; !slices.Equal(hits, want) {
		t.Errorf("rule hits %v, want %v", hits, want)
	}

	// A UDP flow of policy 1 whose line dies while its policy is
	// unreachable stays on its line.
	setPolicies(t, d, policyTables(PolicyTable{LastResort: LastResortUnreachable, Buckets: allOn(0)}))
	p := pkt(1)
	p.sport = 401
	if mark := steer(t, d, p, "new_flow"); mark != foreignMark|lineMark[0] {
		t.Fatalf("mark %#x, want line 0's", mark)
	}
	setDead(t, d, 0)
	if mark := steer(t, d, p, "no_live_line"); mark != foreignMark|lineMark[0] {
		t.Errorf("flow of an unreachable policy off its dead line: mark %#x, want line 0's (stays)", mark)
	}
}

func TestStickyClients(t *testing.T) {
	const sticky = 100 * time.Millisecond
	d := steering(t)
	// Policy 1: lines 0 and 2, 1:1.
	split := Buckets(nil, []int{1, 0, 1}, []bool{true, true, true})
	setPolicies(t, d, policyTables(PolicyTable{Buckets: split}))
	web := func(sport uint16) packet {
		return packet{src: client4, dst: server4, proto: protoTCP, sport: sport, dport: 443}
	}
	voip := func(sport uint16) packet {
		return packet{src: client4, dst: server4, proto: protoUDP, sport: sport, dport: 5060}
	}
	// Where each flow goes by its hash alone: without stickiness.
	setRules(t, d, []testRule{{protos: []uint8{protoTCP}, policy: 1}, {protos: []uint8{protoUDP}, policy: 1}})
	type flowID struct {
		proto uint8
		sport uint16
	}
	hashLine := map[flowID]uint32{}
	for s := range uint16(40) {
		for _, p := range []packet{web(1000 + s), voip(1000 + s)} {
			hashLine[flowID{p.proto, p.sport}] = runOn(t, d.objs.UplinkdLanIn, p.bytes(), 0, testLAN)
		}
	}
	byHash := func(p packet) uint32 { return hashLine[flowID{p.proto, p.sport}] }
	if _, err := d.ClearFlows(); err != nil {
		t.Fatal(err)
	}
	// other returns flows of fn whose hash line is not mark.
	other := func(fn func(uint16) packet, mark uint32) []packet {
		var o []packet
		for s := range uint16(40) {
			if p := fn(1000 + s); byHash(p) != mark {
				o = append(o, p)
			}
		}
		if len(o) < 3 {
			t.Fatalf("only %d of 40 flows hash to another line than %#x", len(o), mark)
		}
		return o
	}

	// Sticky per policy: web and voip share the client's entry.
	setRules(t, d, []testRule{{protos: []uint8{protoTCP}, policy: 1, sticky: sticky}, {protos: []uint8{protoUDP}, policy: 1, sticky: sticky}})
	first := runOn(t, d.objs.UplinkdLanIn, web(1000).bytes(), 0, testLAN)
	if first != byHash(web(1000)) {
		t.Fatalf("first flow's mark %#x, want its hash's %#x", first, byHash(web(1000)))
	}
	for _, p := range append(other(web, first)[:2], other(voip, first)[:2]...) {
		if mark := runOn(t, d.objs.UplinkdLanIn, p.bytes(), 0, testLAN); mark != first {
			t.Errorf("flow %d/%d within the sticky time: mark %#x, want the client's %#x", p.proto, p.sport, mark, first)
		}
	}
	// After the sticky time, a new flow goes by its hash again.
	time.Sleep(sticky + 50*time.Millisecond)
	later := other(web, first)[2]
	if mark := runOn(t, d.objs.UplinkdLanIn, later.bytes(), 0, testLAN); mark != byHash(later) {
		t.Errorf("flow after the sticky time: mark %#x, want its hash's %#x", mark, byHash(later))
	}
	now := byHash(later)
	// The client's line leaves the policy's tier: its new flows go to the
	// tier's line.
	lineOf := map[uint32]int{lineMark[0]: 0, lineMark[2]: 2}
	tier := 2 - lineOf[now]
	setPolicies(t, d, policyTables(PolicyTable{Buckets: allOn(tier)}))
	if mark := runOn(t, d.objs.UplinkdLanIn, voip(2000).bytes(), 0, testLAN); mark != lineMark[tier] {
		t.Errorf("flow after its sticky line left the tier: mark %#x, want the tier's %#x", mark, lineMark[tier])
	}
	if _, err := d.ClearFlows(); err != nil {
		t.Fatal(err)
	}

	// Sticky per rule: the two rules keep entries of their own.
	setPolicies(t, d, policyTables(PolicyTable{Buckets: split}))
	setRules(t, d, []testRule{
		{protos: []uint8{protoTCP}, dports: portRange(443, 443), policy: 1, sticky: time.Hour, stickyPerRule: true},
		{protos: []uint8{protoUDP}, dports: portRange(5060, 5060), policy: 1, sticky: time.Hour, stickyPerRule: true},
	})
	webLine := runOn(t, d.objs.UplinkdLanIn, web(1001).bytes(), 0, testLAN)
	o := other(voip, webLine)
	voipLine := runOn(t, d.objs.UplinkdLanIn, o[0].bytes(), 0, testLAN)
	if voipLine == webLine {
		t.Errorf("voip flow followed the web rule's sticky line %#x", webLine)
	}
	// voip flows that hash to the web rule's line keep the voip rule's.
	for _, p := range other(voip, voipLine)[:3] {
		if mark := runOn(t, d.objs.UplinkdLanIn, p.bytes(), 0, testLAN); mark != voipLine {
			t.Errorf("voip flow %d: mark %#x, want the voip rule's sticky line %#x", p.sport, mark, voipLine)
		}
	}
	// A dead sticky line is not kept.
	setDead(t, d, lineOf[webLine])
	if mark := runOn(t, d.objs.UplinkdLanIn, web(3000).bytes(), 0, testLAN); mark == webLine || mark == 0 {
		t.Errorf("flow of a client whose sticky line died: mark %#x, want a live line", mark)
	}
}

func TestRuleHitsAndPolicyFlows(t *testing.T) {
	d := classifying(t)
	setRules(t, d, []testRule{
		{protos: []uint8{protoUDP}, policy: 2},
		{dports: portRange(443, 443), policy: 1},
		{dports: portRange(22, 22), policy: 1},
	})
	for i := range 5 {
		runOn(t, d.objs.UplinkdLanIn, udp4(uint16(500+i)).bytes(), 0, testLAN)
	}
	for i := range 3 {
		p := tcp4(uint16(500 + i))
		runOn(t, d.objs.UplinkdLanIn, p.bytes(), 0, testLAN)
		runOn(t, d.objs.UplinkdLanIn, p.bytes(), 0, testLAN) // pinned: not counted again
	}
	other := tcp4(600)
	other.dport = 80
	runOn(t, d.objs.UplinkdLanIn, other.bytes(), 0, testLAN)

	hits, err := d.RuleHits()
	if err != nil {
		t.Fatal(err)
	}
	if want := []uint64{5, 3, 0}; !slices.Equal(hits, want) {
		t.Errorf("rule hits %v, want %v", hits, want)
	}
	flows, err := d.PolicyFlows()
	if err != nil {
		t.Fatal(err)
	}
	if len(flows) != MaxPolicies || flows[0] != 1 || flows[1] != 3 || flows[2] != 5 {
		t.Errorf("policy flows %v, want 1, 3, 5 for policies 0, 1, 2", flows[:4])
	}
	// A new rule set counts from zero; the same one again changes nothing.
	setRules(t, d, []testRule{{protos: []uint8{protoUDP}, policy: 2}})
	if hits, err := d.RuleHits(); err != nil || !slices.Equal(hits, []uint64{0}) {
		t.Errorf("rule hits after a new rule set: %v, %v; want [0]", hits, err)
	}
	runOn(t, d.objs.UplinkdLanIn, udp4(700).bytes(), 0, testLAN)
	setRules(t, d, []testRule{{protos: []uint8{protoUDP}, policy: 2}})
	if hits, err := d.RuleHits(); err != nil || !slices.Equal(hits, []uint64{1}) {
		t.Errorf("rule hits after the same rule set again: %v, %v; want [1]", hits, err)
	}
	// OpenStats reads them from the pins.
	s, err := OpenStats(d.pinDir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if hits, err := s.RuleHits(); err != nil || !slices.Equal(hits, []uint64{1}) {
		t.Errorf("pinned rule hits %v, %v; want [1]", hits, err)
	}
	if flows, err := s.PolicyFlows(); err != nil || flows[2] != 6 {
		t.Errorf("pinned policy flows %v, %v; want 6 for policy 2", flows, err)
	}
}

// A rule generation written by an uplinkd without ul_rule_lan_slots (an
// upgrade: the new programs read the old agent's rules until the new one
// writes its own) has its slots zero: the LAN interfaces are then looked
// up in ul_rule_lan, not taken for unnamed.
func TestLANSlotsUnwritten(t *testing.T) {
	d := classifying(t)
	setRules(t, d, []testRule{{lans: []int{9}, policy: 1}})
	keys := make([]uint32, ruleGens*lanSlotCount)
	for i := range keys {
		keys[i] = uint32(i)
	}
	if _, err := d.objs.UlRuleLanSlots.BatchUpdate(keys, make([]uplinkdRuleLanSlot, len(keys)), nil); err != nil {
		t.Fatal(err)
	}
	named := packet{src: client4, dst: netip.MustParseAddr("198.51.100.9"), proto: protoTCP, sport: 131, dport: 443}
	other := named
	other.sport = 132
	runOn(t, d.objs.UplinkdLanIn, named.bytes(), 0, 9)
	runOn(t, d.objs.UplinkdLanIn, other.bytes(), 0, 10)
	if rule, pol, ok := pinnedRule(t, d, named); !ok || rule != 0 || pol != 1 {
		t.Errorf("flow from the named LAN: rule %d, policy %d (%v); want 0, 1", rule, pol, ok)
	}
	if rule, pol, ok := pinnedRule(t, d, other); !ok || rule != -1 || pol != 0 {
		t.Errorf("flow from another LAN: rule %d, policy %d (%v); want none, 0", rule, pol, ok)
	}
}

// A datapath loaded over pins trusts neither shortcut of the classifier
// (the IPv4 common cells, the LAN slots) until it writes its own rules: an
// older uplinkd run in between rewrote the rules under them. Here they are
// made stale by hand: a common dst bitmap of every rule without ports for
// every /16, and LAN 9 taken for unnamed.
func TestLoadDistrustsRuleShortcuts(t *testing.T) {
	d := classifying(t)
	setRules(t, d, []testRule{
		{dst: pfx("203.0.113.0/24"), policy: 1},
		{lans: []int{9}, policy: 2},
	})
	cfg, err := d.ruleCfg()
	if err != nil {
		t.Fatal(err)
	}
	stale := uplinkdV4Common{Set: 1, Id: cfg.NoPorts[cfg.Gen%ruleGens]}
	for i := range stale.Cells {
		stale.Cells[i] = ^uint64(0)
	}
	for gen := range uint32(ruleGens) {
		if err := d.objs.UlRuleV4Common.Put(1*ruleGens+gen, &stale); err != nil { // the dst table
			t.Fatal(err)
		}
		slot := uplinkdRuleLanSlot{Ifindex: 9, Id: cfg.AnyLan[cfg.Gen%ruleGens]}
		if err := d.objs.UlRuleLanSlots.Put(gen*lanSlotCount+9, &slot); err != nil {
			t.Fatal(err)
		}
	}
	plain := packet{src: client4, dst: netip.MustParseAddr("198.51.100.9"), proto: protoTCP, sport: 141, dport: 443}
	fromLAN9 := plain
	fromLAN9.sport = 142
	// The stale shortcuts are read: the test's premise.
	runOn(t, d.objs.UplinkdLanIn, plain.bytes(), 0, testLAN)
	if rule, _, _ := pinnedRule(t, d, plain); rule != 0 {
		t.Fatalf("the stale common cells did not take: rule %d, want 0", rule)
	}
	if _, err := d.ClearFlows(); err != nil {
		t.Fatal(err)
	}

	again := load(t, Options{PinDir: d.pinDir})
	runOn(t, again.objs.UplinkdLanIn, plain.bytes(), 0, testLAN)
	runOn(t, again.objs.UplinkdLanIn, fromLAN9.bytes(), 0, 9)
	if rule, pol, ok := pinnedRule(t, again, plain); !ok || rule != -1 || pol != 0 {
		t.Errorf("after a load, a flow to no rule's prefix: rule %d, policy %d (%v); want none, 0", rule, pol, ok)
	}
	if rule, pol, ok := pinnedRule(t, again, fromLAN9); !ok || rule != 1 || pol != 2 {
		t.Errorf("after a load, a flow from LAN 9: rule %d, policy %d (%v); want 1, 2", rule, pol, ok)
	}
}

// Load turns the shortcuts off in the generation the attached programs
// classify by (a restart): a packet classifying meanwhile must read a
// shortcut whole or not at all. Here the turning off runs again and again
// (the shortcuts put back between, in steps that cannot tear) while new
// flows from LAN 9 are classified; bitmap 0 is an empty one, so a torn
// read (the slot's old ifindex, a zeroed id) would show. Zeroing the ids
// tore 130 of 1.58M flows in 20 s.
func TestDistrustRuleShortcutsUnderTraffic(t *testing.T) {
	d := classifying(t)
	rs := buildRuleSet([]testRule{{dst: pfx("203.0.113.0/24"), policy: 1}, {lans: []int{9}, policy: 2}})
	rs = withEmptyBitmap0(rs)
	if err := d.SetRuleSet(rs); err != nil {
		t.Fatal(err)
	}
	cfg, err := d.ruleCfg()
	if err != nil {
		t.Fatal(err)
	}
	gen := cfg.Gen % ruleGens
	slotKey, commonKey := gen*lanSlotCount+9, 1*ruleGens+gen
	var slot uplinkdRuleLanSlot
	var common uplinkdV4Common
	if err := d.objs.UlRuleLanSlots.Lookup(slotKey, &slot); err != nil {
		t.Fatal(err)
	}
	if err := d.objs.UlRuleV4Common.Lookup(commonKey, &common); err != nil {
		t.Fatal(err)
	}
	if slot.Ifindex != 9 || slot.Id == 0 || common.Set != 1 || common.Id == 0 {
		t.Fatalf("premise: slot %+v, common id %d set %d", slot, common.Id, common.Set)
	}
	var stop atomic.Bool
	var zeroings, flows, wrong atomic.Int64
	errs := make(chan error, 2)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for !stop.Load() {
			if err := d.distrustRuleShortcuts(); err != nil {
				errs <- err
				return
			}
			zeroings.Add(1)
			off, offCommon := slot, common
			off.Ifindex, offCommon.Set = 0, 0
			for _, step := range []struct {
				m *ebpf.Map
				k uint32
				v any
			}{{d.objs.UlRuleLanSlots, slotKey, &off}, {d.objs.UlRuleLanSlots, slotKey, &slot},
				{d.objs.UlRuleV4Common, commonKey, &offCommon}, {d.objs.UlRuleV4Common, commonKey, &common}} {
				if err := step.m.Put(step.k, step.v); err != nil {
					errs <- err
					return
				}
			}
		}
	}()
	go func() {
		defer wg.Done()
		for i := 0; !stop.Load(); i++ {
			p := packet{src: netip.AddrFrom4([4]byte{192, 168, byte(i >> 16), byte(i >> 8)}),
				dst: netip.MustParseAddr("198.51.100.9"), proto: protoTCP, sport: uint16(i), dport: 443}
			out := make([]byte, skbCtxOutSize)
			if _, err := d.objs.UplinkdLanIn.Run(&ebpf.RunOptions{Data: p.bytes(), Context: skbCtx{IngressIfindex: 9}, ContextOut: out}); err != nil {
				errs <- err
				return
			}
			flows.Add(1)
			var f uplinkdFlow
			k := keyOf(p)
			if err := d.objs.UlFlows.Lookup(&k, &f); err != nil {
				continue // evicted already
			}
			if rule, pol := flowRulePolicy(f.Flags); rule != 1 || pol != 2 {
				wrong.Add(1)
			}
		}
	}()
	time.Sleep(3 * time.Second)
	stop.Store(true)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	t.Logf("%d turnings off, %d new flows, %d misclassified", zeroings.Load(), flows.Load(), wrong.Load())
	if wrong.Load() > 0 {
		t.Errorf("%d of %d new flows from LAN 9 misclassified while the shortcuts were turned off", wrong.Load(), flows.Load())
	}
}

// withEmptyBitmap0 puts an empty bitmap (no rule) first in rs's pool, as
// a compiler may intern one first, and renumbers every reference.
func withEmptyBitmap0(rs RuleSet) RuleSet {
	rs.Bitmaps = append([][]uint64{make([]uint64, rs.Words)}, rs.Bitmaps...)
	for i := range rs.Src {
		rs.Src[i].Bitmap++
	}
	for i := range rs.Dst {
		rs.Dst[i].Bitmap++
	}
	for i := range rs.SrcPort {
		rs.SrcPort[i].Bitmap++
	}
	for i := range rs.DstPort {
		rs.DstPort[i].Bitmap++
	}
	for i := range rs.Proto {
		rs.Proto[i]++
	}
	for i := range rs.DSCP {
		rs.DSCP[i]++
	}
	rs.NoPorts++
	rs.AnyLAN++
	lan := map[int]uint32{}
	for k, v := range rs.LAN {
		lan[k] = v + 1
	}
	rs.LAN = lan
	return rs
}

// TestPolicyStats: a policy counts the forwarded packets and bytes of the
// flows a rule set classified into it, out and back, those of no rule
// being policy 0's; a flow pinned before any rule set counts nowhere, and
// ForgetPolicies zeroes a freed id's counters and stops its flows
// counting.
func TestPolicyStats(t *testing.T) {
	d := classifying(t)
	before := tcp4(300)
	runOn(t, d.objs.UplinkdLanIn, before.bytes(), 0, testLAN)
	setRules(t, d, []testRule{
		{protos: []uint8{protoUDP}, policy: 2},
		{dports: portRange(443, 443), policy: 1},
	})
	reply := func(p packet) packet {
		r := p
		r.src, r.dst, r.sport, r.dport = p.dst, p.src, p.dport, p.sport
		return r
	}
	udp, web, other := udp4(301), tcp4(302), tcp4(303)
	other.dport = 80
	for range 3 {
		runOn(t, d.objs.UplinkdLanIn, udp.bytes(), 0, testLAN)
	}
	for range 2 {
		runOn(t, d.objs.UplinkdLanIn, web.bytes(), 0, testLAN)
	}
	runOn(t, d.objs.UplinkdLanIn, other.bytes(), 0, testLAN)
	runOn(t, d.objs.UplinkdLanIn, before.bytes(), 0, testLAN) // pinned before the rules
	run(t, d.objs.UplinkdLanOut, reply(web).bytes(), 0)
	run(t, d.objs.UplinkdLanOut, reply(before).bytes(), 0)

	size := func(p packet) uint64 { return uint64(len(p.bytes())) }
	want := make([]LineStats, MaxPolicies)
	want[0] = LineStats{TxPackets: 1, TxBytes: size(other)}
	want[1] = LineStats{TxPackets: 2, TxBytes: 2 * size(web), RxPackets: 1, RxBytes: size(reply(web))}
	want[2] = LineStats{TxPackets: 3, TxBytes: 3 * size(udp)}
	got, err := d.PolicyStats()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, want) {
		t.Errorf("policy stats %v, want %v", got[:3], want[:3])
	}
	s, err := OpenStats(d.pinDir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if pinned, err := s.PolicyStats(); err != nil || !slices.Equal(pinned, want) {
		t.Errorf("pinned policy stats %v (%v), want %v", pinned[:3], err, want[:3])
	}

	// A freed id counts from zero, and its old flows count nowhere.
	if _, err := d.ForgetPolicies([]int{1}); err != nil {
		t.Fatal(err)
	}
	runOn(t, d.objs.UplinkdLanIn, web.bytes(), 0, testLAN)
	run(t, d.objs.UplinkdLanOut, reply(web).bytes(), 0)
	want[1] = LineStats{}
	if got, err := d.PolicyStats(); err != nil || !slices.Equal(got, want) {
		t.Errorf("policy stats after ForgetPolicies %v (%v), want %v", got[:3], err, want[:3])
	}
	if flows, err := d.PolicyFlows(); err != nil || flows[1] != 0 || flows[2] != 1 {
		t.Errorf("policy flows after ForgetPolicies %v (%v), want 0 for policy 1, 1 for 2", flows[:3], err)
	}
}

// Rule sets change while packets run: every flow is classified by one
// whole rule set or the other, never by a mix. The two sets differ in
// size (one word, three), so a packet reading one generation's tables
// with the other's word count would show.
func TestRuleSetSwapUnderTraffic(t *testing.T) {
	d := classifying(t)
	setPolicies(t, d, policyTables(PolicyTable{Buckets: allOn(0)}, PolicyTable{Buckets: allOn(2)}, PolicyTable{Buckets: allOn(0)}))
	a := []testRule{
		{dst: pfx("198.51.100.0/24"), protos: []uint8{protoTCP}, policy: 1},
		{protos: []uint8{protoUDP}, policy: 2},
	}
	var b []testRule
	for i := range 150 { // rules 0..149, most never match
		b = append(b, testRule{dst: pfx(fmt.Sprintf("10.%d.0.0/16", i)), policy: 3})
	}
	b[70] = testRule{protos: []uint8{protoUDP}, policy: 3}
	b[140] = testRule{dst: pfx("198.51.100.0/24"), policy: 2}
	// What each set says of a flow (rule, policy).
	answers := map[uint8][2][2]int{
		protoTCP: {{0, 1}, {140, 2}},
		protoUDP: {{1, 2}, {70, 3}},
	}
	rsA, rsB := buildRuleSet(a), buildRuleSet(b)
	if err := d.SetRuleSet(rsA); err != nil {
		t.Fatal(err)
	}

	var (
		stop    atomic.Bool
		wg      sync.WaitGroup
		sent    atomic.Int64
		seenA   atomic.Int64
		seenB   atomic.Int64
		runErrs = make(chan error, 1)
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; !stop.Load(); i++ {
			p := tcp4(uint16(i))
			if i%2 == 1 {
				p = udp4(uint16(i))
			}
			p.src = netip.AddrFrom4([4]byte{192, 168, byte(i >> 16), byte(i >> 8)})
			out := make([]byte, skbCtxOutSize)
			if _, err := d.objs.UplinkdLanIn.Run(&ebpf.RunOptions{Data: p.bytes(), Context: skbCtx{IngressIfindex: testLAN}, ContextOut: out}); err != nil {
				runErrs <- err
				return
			}
			sent.Add(1)
			// Read at once: the small flow map evicts.
			var f uplinkdFlow
			k := keyOf(p)
			if err := d.objs.UlFlows.Lookup(&k, &f); err != nil {
				runErrs <- fmt.Errorf("flow %d: %w", i, err)
				return
			}
			rule, policy := flowRulePolicy(f.Flags)
			switch ans := answers[p.proto]; [2]int{rule, policy} {
			case ans[0]:
				seenA.Add(1)
			case ans[1]:
				seenB.Add(1)
			default:
				runErrs <- fmt.Errorf("flow %d, proto %d: rule %d, policy %d; neither set's answer %v", i, p.proto, rule, policy, ans)
				return
			}
		}
	}()
	swaps := 0
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline) && len(runErrs) == 0; swaps++ {
		rs := rsB
		if swaps%2 == 1 {
			rs = rsA
		}
		if err := d.SetRuleSet(rs); err != nil {
			t.Fatal(err)
		}
	}
	stop.Store(true)
	wg.Wait()
	select {
	case err := <-runErrs:
		t.Fatal(err)
	default:
	}
	t.Logf("%d swaps, %d packets: %d flows by set A, %d by set B", swaps, sent.Load(), seenA.Load(), seenB.Load())
	if swaps < 4 || seenA.Load() == 0 || seenB.Load() == 0 {
		t.Errorf("%d swaps, flows by set A %d, by set B %d: want both sets seen", swaps, seenA.Load(), seenB.Load())
	}
}

// A reconcile that changes nothing writes nothing: the same rule set, the
// same policies, the same marks. An agent without rules never writes the
// rule maps.
func TestUnchangedRulesWriteNothing(t *testing.T) {
	d := steering(t)
	before := d.Writes()
	if err := d.SetRuleSet(RuleSet{}); err != nil {
		t.Fatal(err)
	}
	if n := d.Writes() - before; n != 0 {
		t.Errorf("no rules on a fresh datapath: %d writes, want 0", n)
	}
	rules := []testRule{{dst: pfx("203.0.113.0/24"), policy: 1}, {lans: []int{3}, dports: portRange(53, 53), policy: 2}}
	tables := policyTables(PolicyTable{Buckets: allOn(0)}, PolicyTable{LastResort: LastResortBlackhole, Buckets: allOn(2)})
	apply := func() uint64 {
		t.Helper()
		before := d.Writes()
		for _, err := range []error{d.SetRuleSet(buildRuleSet(rules)), d.SetPolicies(tables), d.SetLastResortMarks(unreachMark, blackholeMark)} {
			if err != nil {
				t.Fatal(err)
			}
		}
		return d.Writes() - before
	}
	if n := apply(); n == 0 {
		t.Fatal("a first rule set wrote nothing")
	}
	if n := apply(); n != 0 {
		t.Errorf("the same rules, policies and marks again: %d writes, want 0", n)
	}
	// One policy's buckets change: its table, one write.
	tables[2].Buckets = allOn(0)
	if n := apply(); n != 2 {
		t.Errorf("one policy's buckets changed: %d writes, want 2 (its buckets and its line set)", n)
	}
	got, err := d.CurrentPolicies()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != MaxPolicies || !slices.Equal(got[2].Buckets, allOn(0)) || got[2].LastResort != LastResortBlackhole ||
		!slices.Equal(got[1].Buckets, allOn(0)) || !slices.Equal(got[0].Buckets, allOn(1)) || got[3].Buckets != nil {
		t.Errorf("current policies differ from those set")
	}
	// Fewer policies: the dropped one is unset, in one write.
	if err := d.SetPolicies(tables[:2]); err != nil {
		t.Fatal(err)
	}
	if got, _ := d.CurrentPolicies(); got[2].Buckets != nil {
		t.Error("policy 2 still set")
	}
}

func TestSetRuleSetRejects(t *testing.T) {
	d := steering(t)
	good := buildRuleSet([]testRule{{dst: pfx("203.0.113.0/24"), policy: 1}})
	for name, mutate := range map[string]func(rs *RuleSet){
		"words":         func(rs *RuleSet) { rs.Words = 2 },
		"bitmap id":     func(rs *RuleSet) { rs.Proto[6] = uint32(len(rs.Bitmaps)) },
		"no ::/0":       func(rs *RuleSet) { rs.Src = rs.Src[:1] },
		"prefix twice":  func(rs *RuleSet) { rs.Dst = append(rs.Dst, PrefixBitmap{netip.MustParsePrefix("203.0.113.7/24"), 0}) },
		"port gap":      func(rs *RuleSet) { rs.DstPort = []PortBitmap{{0, 100, 0}, {102, 65535, 0}} },
		"policy":        func(rs *RuleSet) { rs.Actions[0].Policy = MaxPolicies },
		"bit past rule": func(rs *RuleSet) { rs.Bitmaps[0] = []uint64{0b10} },
	} {
		rs := *cloneRuleSet(good)
		mutate(&rs)
		if err := d.SetRuleSet(rs); err == nil {
			t.Errorf("%s: taken", name)
		}
	}
	if err := d.SetPolicies(make([]PolicyTable, MaxPolicies+1)); err == nil {
		t.Error("too many policies taken")
	}
	if err := d.SetPolicies(policyTables(PolicyTable{LastResort: 7, Buckets: noLine()})); err == nil {
		t.Error("an unknown last resort taken")
	}
}

// The pins of an uplinkd without rules lack the rule and policy maps:
// CheckPins passes, Load creates them, and OpenStats reads without them.
func TestAdoptPinsWithoutRuleMaps(t *testing.T) {
	requireBPF(t)
	dir := tempPinDir(t)
	first := load(t, Options{PinDir: dir})
	for l := range 2 {
		if err := first.SetLine(l, Line{Mark: lineMark[l]}); err != nil {
			t.Fatal(err)
		}
	}
	if err := first.SetBuckets(allOn(1)); err != nil {
		t.Fatal(err)
	}
	p := tcp4(800)
	runOn(t, first.objs.UplinkdLanIn, p.bytes(), 0, testLAN)
	first.Close()
	var removed []string
	for _, name := range []string{"ul_rule_bitmaps", "ul_rule_src", "ul_rule_dst", "ul_rule_proto", "ul_rule_dscp",
		"ul_rule_sport", "ul_rule_dport", "ul_rule_lan", "ul_rule_actions", "ul_rule_cfg", "ul_rule_hits", "ul_rule_v4_nodes", "ul_rule_v4_ids", "ul_rule_v4_dir", "ul_rule_v4_common", "ul_rule_lan_slots",
		"ul_policies", "ul_policy_buckets", "ul_sticky", "ul_policy_flows", "ul_policy_stats"} {
		if err := os.Remove(filepath.Join(dir, name)); err != nil {
			t.Fatalf("unpinning %s: %v", name, err)
		}
		removed = append(removed, name)
	}
	names, err := pinnedMapNames()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if strings.HasPrefix(n, "ul_rule") || strings.HasPrefix(n, "ul_polic") || n == "ul_sticky" {
			if !slices.Contains(removed, n) {
				t.Errorf("map %s is new with rules but not in this test's list", n)
			}
		}
	}

	s, err := OpenStats(dir)
	if err != nil {
		t.Fatal(err)
	}
	if hits, err := s.RuleHits(); err != nil || hits != nil {
		t.Errorf("rule hits without the map: %v, %v", hits, err)
	}
	if flows, err := s.PolicyFlows(); err != nil || len(flows) != MaxPolicies {
		t.Errorf("policy flows without the map: %v, %v", flows, err)
	}
	s.Close()

	if err := CheckPins(Options{PinDir: dir, FlowEntries: 4096}); err != nil {
		t.Fatal(err)
	}
	d := load(t, Options{PinDir: dir})
	for _, name := range removed {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Errorf("%s not pinned after Load: %v", name, err)
		}
	}
	if mark := runOn(t, d.objs.UplinkdLanIn, p.bytes(), 0, testLAN); mark != lineMark[1] {
		t.Errorf("pinned flow's mark %#x after the upgrade, want line 1's", mark)
	}
	setPolicies(t, d, policyTables(PolicyTable{Buckets: allOn(0)}))
	if err := d.SetRuleSet(buildRuleSet([]testRule{{protos: []uint8{protoTCP}, policy: 1}})); err != nil {
		t.Fatal(err)
	}
	if mark := runOn(t, d.objs.UplinkdLanIn, tcp4(801).bytes(), 0, testLAN); mark != lineMark[0] {
		t.Errorf("new flow's mark %#x, want policy 1's line 0", mark)
	}
	if err := CheckPins(Options{PinDir: dir, FlowEntries: 4096}); err != nil {
		t.Error(err)
	}
}

// Sticky rules of policy 0 on a datapath whose buckets only SetBuckets
// writes: the line set SetRuleSet and SetBuckets keep decides.
func TestStickyPolicy0(t *testing.T) {
	d := steering(t)
	if err := d.SetBuckets(Buckets(nil, []int{1, 0, 1}, []bool{true, true, true})); err != nil {
		t.Fatal(err)
	}
	setRules(t, d, []testRule{{protos: []uint8{protoTCP}, sticky: time.Hour}})
	first := runOn(t, d.objs.UplinkdLanIn, tcp4(5000).bytes(), 0, testLAN)
	lines := map[uint32]bool{}
	for i := range 20 {
		mark := runOn(t, d.objs.UplinkdLanIn, tcp4(uint16(5001+i)).bytes(), 0, testLAN)
		lines[mark] = true
	}
	if len(lines) != 1 || !lines[first] {
		t.Errorf("a sticky client's flows went to %v, want all on %#x", lines, first)
	}
	// Its line leaves policy 0's buckets: the client's next flow goes to
	// the other.
	other := 2
	if first == lineMark[2] {
		other = 0
	}
	if err := d.SetBuckets(allOn(other)); err != nil {
		t.Fatal(err)
	}
	if mark := runOn(t, d.objs.UplinkdLanIn, tcp4(6000).bytes(), 0, testLAN); mark != lineMark[other] {
		t.Errorf("flow after the sticky line left the buckets: mark %#x, want %#x", mark, lineMark[other])
	}
}

// A flow records the id of the rule that matched it (RuleAction.ID), not
// its place: a reload that moves the rule leaves the flow naming it.
func TestFlowRecordsRuleID(t *testing.T) {
	d := classifying(t)
	rs := buildRuleSet([]testRule{
		{dst: pfx("203.0.113.0/24"), policy: 1},
		{protos: []uint8{protoUDP}, policy: 2},
	})
	rs.Actions[0].ID, rs.Actions[1].ID = 4000, 17
	if err := d.SetRuleSet(rs); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		pkt       packet
		rule, pol int
	}{
		{packet{src: client4, dst: netip.MustParseAddr("203.0.113.5"), proto: protoTCP, sport: 301, dport: 443}, 4000, 1},
		{packet{src: client4, dst: netip.MustParseAddr("198.51.100.9"), proto: protoUDP, sport: 302, dport: 53}, 17, 2},
	} {
		runOn(t, d.objs.UplinkdLanIn, c.pkt.bytes(), foreignMark, testLAN)
		if rule, pol, ok := pinnedRule(t, d, c.pkt); !ok || rule != c.rule || pol != c.pol {
			t.Errorf("flow pinned %v by rule %d, policy %d; want rule %d, policy %d", ok, rule, pol, c.rule, c.pol)
		}
	}
	if hits, err := d.RuleHits(); err != nil || len(hits) != 2 || hits[0] != 1 || hits[1] != 1 {
		t.Errorf("hits %v (%v), want one each, by place", hits, err)
	}
	rs.Actions[1].ID = 4000
	if err := d.SetRuleSet(rs); err == nil {
		t.Error("two rules with one id accepted")
	}
}

// ForgetPolicies makes the flows of the given policies no policy's and no
// rule's, and leaves the others as they are.
func TestForgetPolicies(t *testing.T) {
	d := classifying(t)
	setRules(t, d, []testRule{
		{dst: pfx("203.0.113.0/24"), policy: 1},
		{protos: []uint8{protoUDP}, policy: 2},
	})
	one := packet{src: client4, dst: netip.MustParseAddr("203.0.113.5"), proto: protoTCP, sport: 401, dport: 443}
	two := packet{src: client4, dst: netip.MustParseAddr("198.51.100.9"), proto: protoUDP, sport: 402, dport: 53}
	for _, p := range []packet{one, two} {
		runOn(t, d.objs.UplinkdLanIn, p.bytes(), foreignMark, testLAN)
	}
	n, err := d.ForgetPolicies([]int{1})
	if err != nil || n != 1 {
		t.Fatalf("ForgetPolicies: %d flows (%v), want 1", n, err)
	}
	if rule, pol, ok := pinnedRule(t, d, one); !ok || rule != -1 || pol != 0 {
		t.Errorf("policy 1's flow after: rule %d policy %d (%v), want none and 0", rule, pol, ok)
	}
	if rule, pol, ok := pinnedRule(t, d, two); !ok || rule != 1 || pol != 2 {
		t.Errorf("policy 2's flow after: rule %d policy %d (%v), want 1 and 2 untouched", rule, pol, ok)
	}
	if f, ok := lookupFlow(t, d, one); !ok || f.Line != 0 || f.TxPackets != 1 {
		t.Errorf("policy 1's flow after: %+v, want its line and counters kept", f)
	}
	// Readers that cache counts by the map's changes see it.
	if use, err := d.FlowMapUse(); err != nil || use.Forgotten != 1 {
		t.Errorf("FlowMapUse after: %+v (%v), want 1 forgotten", use, err)
	}
}

// A removed policy's sticky clients go with its id.
func TestForgetPoliciesStickyClients(t *testing.T) {
	d := classifying(t)
	setRules(t, d, []testRule{
		{dst: pfx("203.0.113.0/24"), policy: 1, sticky: time.Hour},
		{protos: []uint8{protoUDP}, policy: 2, sticky: time.Hour},
	})
	runOn(t, d.objs.UplinkdLanIn, packet{src: client4, dst: netip.MustParseAddr("203.0.113.5"), proto: protoTCP, sport: 421, dport: 443}.bytes(), 0, testLAN)
	runOn(t, d.objs.UplinkdLanIn, packet{src: client4, dst: netip.MustParseAddr("198.51.100.9"), proto: protoUDP, sport: 422, dport: 53}.bytes(), 0, testLAN)
	scopes := func() map[uint32]int {
		got := map[uint32]int{}
		var k uplinkdStickyKey
		it := d.objs.UlSticky.Iterate()
		for it.Next(&k, new(uplinkdSticky)) {
			got[k.Scope]++
		}
		if err := it.Err(); err != nil {
			t.Fatal(err)
		}
		return got
	}
	if got := scopes(); got[1] != 1 || got[2] != 1 {
		t.Fatalf("sticky clients by scope %v, want one of policy 1 and one of 2", got)
	}
	if _, err := d.ForgetPolicies([]int{1}); err != nil {
		t.Fatal(err)
	}
	if got := scopes(); got[1] != 0 || got[2] != 1 {
		t.Errorf("sticky clients by scope after forgetting policy 1: %v, want policy 2's only", got)
	}
}

// After ForgetPolicies, the old rules may still pin flows under the
// reused id until the new rules are in: ForgetStalePolicyFlows forgets
// those (rule 0 gave them policy 1; the new rules give policy 1 by rule
// 1 only) and keeps the new policy's.
func TestForgetStalePolicyFlows(t *testing.T) {
	d := classifying(t)
	setRules(t, d, []testRule{{dst: pfx("203.0.113.0/24"), policy: 1}})
	if _, err := d.ForgetPolicies([]int{1}); err != nil {
		t.Fatal(err)
	}
	stale := packet{src: client4, dst: netip.MustParseAddr("203.0.113.5"), proto: protoTCP, sport: 411, dport: 443}
	runOn(t, d.objs.UplinkdLanIn, stale.bytes(), 0, testLAN) // the old rules, still in force
	setRules(t, d, []testRule{
		{dst: pfx("203.0.113.0/24"), policy: 2},
		{protos: []uint8{protoUDP}, policy: 1},
	})
	fresh := packet{src: client4, dst: netip.MustParseAddr("198.51.100.9"), proto: protoUDP, sport: 412, dport: 53}
	runOn(t, d.objs.UplinkdLanIn, fresh.bytes(), 0, testLAN)
	n, err := d.ForgetStalePolicyFlows([]int{1})
	if err != nil || n != 1 {
		t.Fatalf("ForgetStalePolicyFlows: %d flows (%v), want 1", n, err)
	}
	if rule, pol, ok := pinnedRule(t, d, stale); !ok || rule != -1 || pol != 0 {
		t.Errorf("the old rules' flow: rule %d policy %d (%v), want none and 0", rule, pol, ok)
	}
	if rule, pol, ok := pinnedRule(t, d, fresh); !ok || rule != 1 || pol != 1 {
		t.Errorf("the new policy's flow: rule %d policy %d (%v), want 1 and 1 kept", rule, pol, ok)
	}
}
