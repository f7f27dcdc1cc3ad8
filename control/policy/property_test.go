// SPDX-License-Identifier: Apache-2.0

package policy

import (
	"math/rand/v2"
	"testing"
)

// TestClassifyMatches holds the compiled form to the reference: random
// rules over a small address and port space, so that prefixes nest and
// overlap and packets match often, and random packets.
func TestClassifyMatches(t *testing.T) {
	r := rand.New(rand.NewPCG(12, 12))
	matched, later := 0, 0
	const sets, packets = 1000, 50
	for range sets {
		n := r.IntN(20)
		if r.IntN(10) == 0 {
			n = 60 + r.IntN(140) // across words
		}
		rules := genRules(r, n)
		rs, err := Compile(rules)
		if err != nil {
			t.Fatalf("%v\nrules %+v", err, rules)
		}
		checkRuleSet(t, rules, rs)
		for range packets {
			p := genPacket(r)
			want := Match(rules, p)
			if got := Classify(rs, p); got != want {
				t.Fatalf("Classify = %d, Match = %d\npacket %+v\nrules %+v", got, want, p, rules)
			}
			if want >= 0 {
				matched++
			}
			if want > 0 {
				later++
			}
		}
	}
	t.Logf("%d of %d packets matched a rule, %d a rule past the first", matched, sets*packets, later)
	// Not a test of the code but of the generator: most packets must find
	// a rule, and not all the first.
	if matched < sets*packets/4 || later < matched/4 {
		t.Errorf("only %d of %d packets matched a rule, %d a rule past the first", matched, sets*packets, later)
	}
}

func FuzzCompile(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{3, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20})
	f.Add([]byte("\x10some rules and some packets to start from, 0123456789"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c := &byteChooser{data}
		rules := genRules(c, c.IntN(100))
		rs, err := Compile(rules)
		if err != nil {
			t.Fatal(err)
		}
		checkRuleSet(t, rules, rs)
		for range 64 {
			if len(c.b) == 0 {
				break
			}
			p := genPacket(c)
			if got, want := Classify(rs, p), Match(rules, p); got != want {
				t.Fatalf("Classify = %d, Match = %d\npacket %+v\nrules %+v", got, want, p, rules)
			}
		}
	})
}
