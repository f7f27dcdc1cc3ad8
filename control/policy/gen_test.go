// SPDX-License-Identifier: Apache-2.0

package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/uplinkd/uplinkd/loader"
)

// chooser draws the random choices of the generators: *rand.Rand in the
// property test, the fuzz input in the fuzz target.
type chooser interface {
	IntN(n int) int
}

// byteChooser draws from a byte string, zeros once it is used up.
type byteChooser struct{ b []byte }

func (c *byteChooser) IntN(n int) int {
	v := 0
	for range 1 + min(n-1, 1<<16)/256 { // one byte, two above 256
		v <<= 8
		if len(c.b) > 0 {
			v |= int(c.b[0])
			c.b = c.b[1:]
		}
	}
	return v % n
}

func pick[T any](c chooser, vs ...T) T { return vs[c.IntN(len(vs))] }

// The generators use a small address and port space so that rules overlap
// and packets match often. Prefixes may have host bits set.
func genPrefix(c chooser) netip.Prefix {
	h := byte(c.IntN(16))
	if c.IntN(3) == 0 {
		return netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: h}), pick(c, 0, 32, 120, 124, 126, 127, 128))
	}
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 0, 0, h}), pick(c, 0, 8, 24, 28, 29, 30, 31, 32))
}

func genAddr(c chooser, v6 bool) netip.Addr {
	h := byte(c.IntN(16))
	if c.IntN(16) == 0 {
		h = 0xff // outside the generated /28s
	}
	if v6 {
		return netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: h})
	}
	return netip.AddrFrom4([4]byte{10, 0, 0, h})
}

var genPorts = []uint16{0, 1, 2, 3, 4, 5, 6, 7, 65534, 65535}

func genRange(c chooser) PortRange {
	a, b := pick(c, genPorts...), pick(c, genPorts...)
	return PortRange{min(a, b), max(a, b)}
}

// some returns 0..3 values of gen, none half of the time.
func some[T any](c chooser, gen func() T) []T {
	if c.IntN(2) == 0 {
		return nil
	}
	vs := make([]T, 1+c.IntN(3))
	for i := range vs {
		vs[i] = gen()
	}
	return vs
}

func genRules(c chooser, n int) []Rule {
	rules := make([]Rule, n)
	for i := range rules {
		rules[i] = Rule{
			Src:      some(c, func() netip.Prefix { return genPrefix(c) }),
			Dst:      some(c, func() netip.Prefix { return genPrefix(c) }),
			Protos:   some(c, func() uint8 { return pick[uint8](c, 1, 6, 17, 58) }),
			SrcPorts: some(c, func() PortRange { return genRange(c) }),
			DstPorts: some(c, func() PortRange { return genRange(c) }),
			DSCPs:    some(c, func() uint8 { return pick[uint8](c, 0, 1, 2, 46, 63) }),
			LANs:     some(c, func() int { return pick(c, 1, 2, 3) }),
			Policy:   c.IntN(loader.MaxPolicies),
		}
	}
	return rules
}

func genPacket(c chooser) Packet {
	v6 := c.IntN(3) == 0
	p := Packet{
		Src:   genAddr(c, v6),
		Dst:   genAddr(c, v6 != (c.IntN(8) == 0)), // now and then the families differ
		Proto: pick[uint8](c, 1, 6, 17, 58, 132),
		DSCP:  pick[uint8](c, 0, 1, 2, 46, 63),
		LAN:   pick(c, 1, 2, 3, 4),
	}
	if p.Proto == 6 || p.Proto == 17 {
		p.HasPorts = true
		p.SrcPort, p.DstPort = pick(c, genPorts...), pick(c, genPorts...)
	}
	return p
}

// checkRuleSet fails unless rs has the form the datapath needs.
func checkRuleSet(t *testing.T, rules []Rule, rs loader.RuleSet) {
	t.Helper()
	if want := (len(rules) + 63) / 64; rs.Words != want {
		t.Fatalf("words %d, want %d", rs.Words, want)
	}
	if len(rules) == 0 {
		return
	}
	if len(rs.Actions) != len(rules) {
		t.Fatalf("%d actions for %d rules", len(rs.Actions), len(rules))
	}
	seen := map[string]bool{}
	for id, b := range rs.Bitmaps {
		if len(b) != rs.Words {
			t.Fatalf("bitmap %d has %d words, want %d", id, len(b), rs.Words)
		}
		ks := fmt.Sprint(b)
		if seen[ks] {
			t.Fatalf("bitmap %d is stored twice", id)
		}
		seen[ks] = true
	}
	ids := []uint32{rs.NoPorts, rs.AnyLAN}
	ids = append(append(ids, rs.Proto[:]...), rs.DSCP[:]...)
	for _, tbl := range [][]loader.PrefixBitmap{rs.Src, rs.Dst} {
		for _, e := range tbl {
			ids = append(ids, e.Bitmap)
		}
	}
	for _, tbl := range [][]loader.PortBitmap{rs.SrcPort, rs.DstPort} {
		for _, e := range tbl {
			ids = append(ids, e.Bitmap)
		}
	}
	for _, id := range rs.LAN {
		ids = append(ids, id)
	}
	for _, id := range ids {
		if int(id) >= len(rs.Bitmaps) {
			t.Fatalf("bitmap id %d, the pool has %d", id, len(rs.Bitmaps))
		}
	}
	for _, tbl := range [][]loader.PrefixBitmap{rs.Src, rs.Dst} {
		for _, root := range []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")} {
			if !slices.ContainsFunc(tbl, func(e loader.PrefixBitmap) bool { return e.Prefix == root }) {
				t.Fatalf("address table without %v: %v", root, tbl)
			}
		}
	}
	for _, tbl := range [][]loader.PortBitmap{rs.SrcPort, rs.DstPort} {
		next := 0
		for _, e := range tbl {
			if int(e.First) != next || e.Last < e.First {
				t.Fatalf("port table not in order or with a gap at %d: %v", next, tbl)
			}
			next = int(e.Last) + 1
		}
		if next != 65536 {
			t.Fatalf("port table ends at %d: %v", next-1, tbl)
		}
	}
}
