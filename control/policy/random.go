// SPDX-License-Identifier: Apache-2.0

package policy

import (
	"math/rand/v2"
	"net/netip"
	"time"
)

// commonPorts are the destination ports RandomRules picks from.
var commonPorts = []PortRange{
	{80, 80}, {443, 443}, {53, 53}, {22, 22}, {25, 25}, {123, 123},
	{3389, 3389}, {5060, 5061}, {3478, 3481}, {8000, 8999}, {10000, 20000},
}

// RandomRules returns n rules shaped like a large real rule set, for
// benchmarks and tests: mostly destination prefixes (1 in 10 IPv6) with
// destination ports, some source hosts of 192.168.1.0/24, some DSCP, ICMP or
// LAN (from lans) matches, policies 0..policies-1. Compile takes 4096 of
// them within loader.MaxBitmaps.
func RandomRules(r *rand.Rand, n int, lans []int, policies int) []Rule {
	rules := make([]Rule, n)
	for i := range rules {
		rule := &rules[i]
		if r.IntN(10) < 9 {
			for range 1 + r.IntN(10)/9 { // one prefix, two 1 time in 10
				rule.Dst = append(rule.Dst, randomDst(r))
			}
		}
		if r.IntN(10) < 7 {
			rule.DstPorts = []PortRange{commonPorts[r.IntN(len(commonPorts))]}
			rule.Protos = [][]uint8{{6}, {17}, {6, 17}}[r.IntN(3)]
		} else if r.IntN(3) == 0 {
			rule.Protos = []uint8{1}
		}
		if r.IntN(10) == 0 {
			rule.Src = []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{192, 168, 1, byte(r.IntN(256))}), 32)}
		}
		if r.IntN(20) == 0 {
			rule.DSCPs = []uint8{[]uint8{46, 34, 26}[r.IntN(3)]}
		}
		if len(lans) > 0 && r.IntN(20) == 0 {
			rule.LANs = []int{lans[r.IntN(len(lans))]}
		}
		if policies > 0 {
			rule.Policy = r.IntN(policies)
		}
		if r.IntN(20) == 0 {
			rule.Sticky = 10 * time.Minute
		}
	}
	return rules
}

func randomDst(r *rand.Rand) netip.Prefix {
	if r.IntN(10) == 0 {
		var a [16]byte
		a[0], a[1], a[2], a[3] = 0x20, 0x01, 0x0d, 0xb8
		for j := 4; j < 16; j++ {
			a[j] = byte(r.Uint32())
		}
		p, _ := netip.AddrFrom16(a).Prefix([]int{32, 48, 56, 64, 128}[r.IntN(5)])
		return p
	}
	u := r.Uint32()
	p, _ := netip.AddrFrom4([4]byte{byte(u >> 24), byte(u >> 16), byte(u >> 8), byte(u)}).Prefix([]int{16, 20, 24, 24, 24, 28, 32}[r.IntN(7)])
	return p
}
