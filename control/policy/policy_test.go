// SPDX-License-Identifier: Apache-2.0

package policy

import (
	"errors"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"testing"
	"time"

	"github.com/uplinkd/uplinkd/loader"
)

func prefixes(ss ...string) []netip.Prefix {
	ps := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		ps[i] = netip.MustParsePrefix(s)
	}
	return ps
}

// pkt is a packet from LAN 1, TCP with ports when proto is 6 or 17.
func pkt(src, dst string, proto uint8, sport, dport uint16) Packet {
	return Packet{
		Src: netip.MustParseAddr(src), Dst: netip.MustParseAddr(dst), Proto: proto,
		SrcPort: sport, DstPort: dport, HasPorts: proto == 6 || proto == 17, LAN: 1,
	}
}

func TestMatchAndClassify(t *testing.T) {
	tests := []struct {
		name  string
		rules []Rule
		p     Packet
		want  int
	}{
		{"no rules", nil, pkt("10.0.0.1", "1.1.1.1", 6, 1000, 80), -1},
		{"empty rule matches all", []Rule{{}}, pkt("10.0.0.1", "1.1.1.1", 1, 0, 0), 0},
		{"src in", []Rule{{Src: prefixes("10.0.0.0/24")}}, pkt("10.0.0.1", "1.1.1.1", 6, 1000, 80), 0},
		{"src out", []Rule{{Src: prefixes("10.0.0.0/24")}}, pkt("10.0.1.1", "1.1.1.1", 6, 1000, 80), -1},
		{"src host bits ignored", []Rule{{Src: []netip.Prefix{netip.PrefixFrom(netip.MustParseAddr("10.0.0.77"), 24)}}}, pkt("10.0.0.1", "1.1.1.1", 6, 1000, 80), 0},
		{"dst in list", []Rule{{Dst: prefixes("192.0.2.0/24", "1.1.1.1/32")}}, pkt("10.0.0.1", "1.1.1.1", 6, 1000, 80), 0},
		{"dst out", []Rule{{Dst: prefixes("192.0.2.0/24", "1.1.1.1/32")}}, pkt("10.0.0.1", "1.1.1.2", 6, 1000, 80), -1},
		{"proto", []Rule{{Protos: []uint8{17}}, {Protos: []uint8{6}}}, pkt("10.0.0.1", "1.1.1.1", 6, 1000, 80), 1},
		{"dscp", []Rule{{DSCPs: []uint8{46}}}, Packet{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("1.1.1.1"), Proto: 17, DSCP: 46}, 0},
		{"dscp other", []Rule{{DSCPs: []uint8{46}}}, pkt("10.0.0.1", "1.1.1.1", 17, 1, 2), -1},
		{"src port range", []Rule{{SrcPorts: []PortRange{{1000, 2000}}}}, pkt("10.0.0.1", "1.1.1.1", 6, 2000, 80), 0},
		{"src port below", []Rule{{SrcPorts: []PortRange{{1000, 2000}}}}, pkt("10.0.0.1", "1.1.1.1", 6, 999, 80), -1},
		{"dst port list", []Rule{{DstPorts: []PortRange{{443, 443}, {80, 80}}}}, pkt("10.0.0.1", "1.1.1.1", 6, 1000, 80), 0},
		{"dst port 65535", []Rule{{DstPorts: []PortRange{{60000, 65535}}}}, pkt("10.0.0.1", "1.1.1.1", 17, 1000, 65535), 0},
		{"dst port 0", []Rule{{DstPorts: []PortRange{{0, 0}}}}, pkt("10.0.0.1", "1.1.1.1", 17, 1000, 0), 0},
		{"icmp skips port rules", []Rule{{DstPorts: []PortRange{{0, 65535}}}, {SrcPorts: []PortRange{{0, 65535}}}, {Protos: []uint8{1}}}, pkt("10.0.0.1", "1.1.1.1", 1, 0, 0), 2},
		{"icmp: no rule", []Rule{{DstPorts: []PortRange{{0, 65535}}}}, pkt("10.0.0.1", "1.1.1.1", 1, 0, 0), -1},
		{"lan", []Rule{{LANs: []int{2}}, {LANs: []int{1, 3}}}, pkt("10.0.0.1", "1.1.1.1", 6, 1000, 80), 1},
		{"lan fallback", []Rule{{LANs: []int{2}}, {}}, pkt("10.0.0.1", "1.1.1.1", 6, 1000, 80), 1},
		{"lan unknown to every rule", []Rule{{LANs: []int{2}}, {Protos: []uint8{6}}}, Packet{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("1.1.1.1"), Proto: 6, LAN: 9}, 1},
		{"all fields", []Rule{{
			Src: prefixes("10.0.0.0/8"), Dst: prefixes("1.1.1.0/24"), Protos: []uint8{6},
			SrcPorts: []PortRange{{1000, 1000}}, DstPorts: []PortRange{{80, 80}}, LANs: []int{1},
		}}, pkt("10.9.9.9", "1.1.1.1", 6, 1000, 80), 0},
		{"all fields, one off", []Rule{{
			Src: prefixes("10.0.0.0/8"), Dst: prefixes("1.1.1.0/24"), Protos: []uint8{6},
			SrcPorts: []PortRange{{1000, 1000}}, DstPorts: []PortRange{{80, 80}}, LANs: []int{1},
		}}, pkt("10.9.9.9", "1.1.1.1", 6, 1001, 80), -1},
		{"first match wins", []Rule{{Dst: prefixes("1.1.1.1/32")}, {Dst: prefixes("1.1.1.0/24")}}, pkt("10.0.0.1", "1.1.1.1", 6, 1, 2), 0},
		{"first match wins, shorter first", []Rule{{Dst: prefixes("1.1.0.0/16")}, {Dst: prefixes("1.1.1.1/32")}}, pkt("10.0.0.1", "1.1.1.1", 6, 1, 2), 0},
		{"longer prefix of a later rule keeps an earlier shorter one", []Rule{{Dst: prefixes("1.1.1.1/32"), Protos: []uint8{17}}, {Dst: prefixes("1.0.0.0/8")}}, pkt("10.0.0.1", "1.1.1.1", 6, 1, 2), 1},
		{"v4 packet, v6 rule", []Rule{{Src: prefixes("::/0")}}, pkt("10.0.0.1", "1.1.1.1", 6, 1, 2), -1},
		{"v6 packet, v4 rule", []Rule{{Src: prefixes("0.0.0.0/0")}}, pkt("2001:db8::1", "2001:db8::2", 6, 1, 2), -1},
		{"v6 packet, v4-mapped rule", []Rule{{Src: prefixes("::ffff:0.0.0.0/96")}}, pkt("10.0.0.1", "1.1.1.1", 6, 1, 2), -1},
		{"mixed families", []Rule{{Src: prefixes("10.0.0.0/8", "2001:db8::/32")}}, pkt("2001:db8::1", "2001:db8::2", 6, 1, 2), 0},
		{"v6 prefix", []Rule{{Dst: prefixes("2001:db8:1::/48")}, {}}, pkt("2001:db8::1", "2001:db8:1::2", 6, 1, 2), 0},
		{"v6 prefix, other", []Rule{{Dst: prefixes("2001:db8:1::/48")}, {}}, pkt("2001:db8::1", "2001:db8:2::2", 6, 1, 2), 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Match(tt.rules, tt.p); got != tt.want {
				t.Errorf("Match = %d, want %d", got, tt.want)
			}
			rs, err := Compile(tt.rules)
			if err != nil {
				t.Fatal(err)
			}
			checkRuleSet(t, tt.rules, rs)
			if got := Classify(rs, tt.p); got != tt.want {
				t.Errorf("Classify = %d, want %d", got, tt.want)
			}
		})
	}
}

// TestWords crosses the words of the bitmaps: the first match is found in
// the word that holds it, whatever the rules in the words before.
func TestWords(t *testing.T) {
	rules := make([]Rule, 200)
	for i := range rules {
		rules[i] = Rule{DstPorts: []PortRange{{uint16(i), uint16(i)}}, Policy: i % loader.MaxPolicies}
	}
	rules = append(rules, Rule{Protos: []uint8{6}})
	rs, err := Compile(rules)
	if err != nil {
		t.Fatal(err)
	}
	checkRuleSet(t, rules, rs)
	for _, port := range []uint16{0, 63, 64, 127, 128, 199, 200, 65535} {
		p := pkt("10.0.0.1", "1.1.1.1", 6, 1, port)
		if got, want := Classify(rs, p), Match(rules, p); got != want {
			t.Errorf("port %d: Classify = %d, Match = %d", port, got, want)
		}
	}
}

func TestCompileZero(t *testing.T) {
	rs, err := Compile(nil)
	if err != nil || !reflect.DeepEqual(rs, loader.RuleSet{}) {
		t.Fatalf("Compile(nil) = %+v, %v; want the zero RuleSet", rs, err)
	}
	if got := Classify(rs, pkt("10.0.0.1", "1.1.1.1", 6, 1, 2)); got != -1 {
		t.Errorf("Classify(zero) = %d, want -1", got)
	}
}

func TestCompileActions(t *testing.T) {
	rules := []Rule{{Policy: 3, Sticky: time.Minute, StickyPerRule: true}, {Policy: 0}}
	rs, err := Compile(rules)
	if err != nil {
		t.Fatal(err)
	}
	want := []loader.RuleAction{{ID: 0, Policy: 3, Sticky: time.Minute, StickyPerRule: true}, {ID: 1}}
	if !reflect.DeepEqual(rs.Actions, want) {
		t.Errorf("actions %+v, want %+v", rs.Actions, want)
	}
}

// TestCompileShares checks that identical bitmaps are stored once and that
// neighbouring port intervals with one bitmap are merged.
func TestCompileShares(t *testing.T) {
	rules := []Rule{
		{Dst: prefixes("1.1.1.0/24"), DstPorts: []PortRange{{80, 80}, {81, 90}}},
		{Dst: prefixes("2.2.2.0/24", "1.1.1.0/24")},
	}
	rs, err := Compile(rules)
	if err != nil {
		t.Fatal(err)
	}
	checkRuleSet(t, rules, rs)
	if len(rs.DstPort) != 3 {
		t.Errorf("dst ports %v, want 0-79, 80-90, 91-65535", rs.DstPort)
	}
	// {} (v4 root and others), {0,1} (1.1.1.0/24, ports 80-90, ...), {1} (2.2.2.0/24, other ports, ...).
	if len(rs.Bitmaps) != 3 {
		t.Errorf("%d bitmaps %v, want 3", len(rs.Bitmaps), rs.Bitmaps)
	}
}

func TestCompileDeterministic(t *testing.T) {
	rules := genRules(rand.New(rand.NewPCG(1, 2)), 500)
	a, err := Compile(rules)
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		b, err := Compile(rules)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(a, b) {
			t.Fatal("two compilations of the same rules differ")
		}
	}
}

func TestCompileErrors(t *testing.T) {
	tooMany := make([]Rule, loader.MaxRules+1)
	// Bitmaps {i, i+1} from the destinations and {i, i+2} from the
	// sources: more than MaxBitmaps distinct ones.
	tooDistinct := make([]Rule, loader.MaxRules)
	host := func(i int) netip.Prefix {
		return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 32)
	}
	for i := range tooDistinct {
		tooDistinct[i] = Rule{Dst: []netip.Prefix{host(i), host(i + 1)}, Src: []netip.Prefix{host(i), host(i + 2)}}
	}
	tests := []struct {
		name  string
		rules []Rule
		is    error
	}{
		{"too many rules", tooMany, ErrTooManyRules},
		{"too many bitmaps", tooDistinct, ErrTooManyBitmaps},
		{"invalid prefix", []Rule{{Dst: []netip.Prefix{{}}}}, nil},
		{"empty port range", []Rule{{DstPorts: []PortRange{{2, 1}}}}, nil},
		{"dscp", []Rule{{DSCPs: []uint8{64}}}, nil},
		{"policy", []Rule{{Policy: loader.MaxPolicies}}, nil},
		{"negative policy", []Rule{{Policy: -1}}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Compile(tt.rules)
			if err == nil {
				t.Fatal("no error")
			}
			if tt.is != nil && !errors.Is(err, tt.is) {
				t.Errorf("error %q is not %q", err, tt.is)
			}
			t.Log(err)
		})
	}
}
