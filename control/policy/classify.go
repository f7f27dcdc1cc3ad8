// SPDX-License-Identifier: Apache-2.0

package policy

import (
	"math/bits"
	"net/netip"
	"slices"

	"github.com/uplinkd/uplinkd/loader"
)

// Classify returns the index of the rule of rs that p matches, -1 for
// none, the way the datapath's classifier does: one lookup per field gives
// a bitmap id (the longest matching prefix of the packet's family for the
// addresses; the proto, DSCP and port arrays, NoPorts for both ports of a
// packet without ports; the LAN map, AnyLAN on a miss), then the 7 bitmaps
// are ANDed word by word up to Words and the first set bit is the rule.
func Classify(rs loader.RuleSet, p Packet) int {
	if rs.Words == 0 || len(rs.Actions) == 0 {
		return -1
	}
	src, ok1 := longestMatch(rs.Src, p.Src)
	dst, ok2 := longestMatch(rs.Dst, p.Dst)
	if !ok1 || !ok2 {
		return -1
	}
	sport, dport := rs.NoPorts, rs.NoPorts
	if p.HasPorts {
		sport, ok1 = portLookup(rs.SrcPort, p.SrcPort)
		dport, ok2 = portLookup(rs.DstPort, p.DstPort)
		if !ok1 || !ok2 {
			return -1
		}
	}
	lan, ok := rs.LAN[p.LAN]
	if !ok {
		lan = rs.AnyLAN
	}
	ids := [...]uint32{src, dst, rs.Proto[p.Proto], rs.DSCP[p.DSCP&63], sport, dport, lan}
	for w := range rs.Words {
		x := ^uint64(0)
		for _, id := range ids {
			x &= rs.Bitmaps[id][w]
		}
		if x != 0 {
			return w*64 + bits.TrailingZeros64(x)
		}
	}
	return -1
}

// longestMatch is the LPM trie's lookup: the bitmap of the longest prefix of
// a's family holding a.
func longestMatch(table []loader.PrefixBitmap, a netip.Addr) (uint32, bool) {
	best := -1
	for i, e := range table {
		if e.Prefix.Contains(a) && (best < 0 || e.Prefix.Bits() > table[best].Prefix.Bits()) {
			best = i
		}
	}
	if best < 0 {
		return 0, false
	}
	return table[best].Bitmap, true
}

// portLookup is the port array's lookup, done on the table's intervals.
func portLookup(table []loader.PortBitmap, port uint16) (uint32, bool) {
	i, found := slices.BinarySearchFunc(table, port, func(e loader.PortBitmap, port uint16) int {
		switch {
		case e.Last < port:
			return -1
		case e.First > port:
			return 1
		}
		return 0
	})
	if !found {
		return 0, false
	}
	return table[i].Bitmap, true
}
