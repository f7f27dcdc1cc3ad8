// SPDX-License-Identifier: Apache-2.0

package policy

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/uplinkd/uplinkd/loader"
)

// TestRandomRules checks that the benchmarks' rules compile at the largest
// size, and that their packets find rules.
func TestRandomRules(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 7))
	rules := RandomRules(r, loader.MaxRules, []int{3, 4}, 16)
	rs, err := Compile(rules)
	if err != nil {
		t.Fatal(err)
	}
	checkRuleSet(t, rules, rs)
	t.Logf("%d rules: %d bitmaps, %d src and %d dst prefixes, %d src and %d dst port intervals",
		len(rules), len(rs.Bitmaps), len(rs.Src), len(rs.Dst), len(rs.SrcPort), len(rs.DstPort))
	for i := range 200 {
		// A packet to a rule's destination, from a source a rule may name.
		rule := rules[r.IntN(len(rules))]
		p := Packet{Src: netip.AddrFrom4([4]byte{192, 168, 1, byte(i)}), Dst: netip.MustParseAddr("9.9.9.9"), Proto: 6, HasPorts: true, SrcPort: 40000, DstPort: 443, LAN: 3}
		if len(rule.Dst) > 0 {
			p.Dst = rule.Dst[0].Addr()
		}
		if got, want := Classify(rs, p), Match(rules, p); got != want {
			t.Fatalf("%+v: Classify = %d, Match = %d", p, got, want)
		}
	}
}

func BenchmarkCompile(b *testing.B) {
	for _, n := range []int{16, 256, loader.MaxRules} {
		rules := RandomRules(rand.New(rand.NewPCG(1, uint64(n))), n, []int{3, 4}, 16)
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Compile(rules); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
