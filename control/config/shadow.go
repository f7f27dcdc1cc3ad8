// SPDX-License-Identifier: Apache-2.0

package config

import (
	"fmt"
	"net/netip"
	"slices"
)

// shadowed warns of each rule that one earlier rule shadows entirely:
// every field of the earlier one is any or a superset, so that it takes
// every flow the later one would match. Field by field is conservative:
// a rule shadowed only by several earlier ones together is not found.
func (c *Config) shadowed() []string {
	var warnings []string
	// Each rule's ports merged, and its prefixes indexed when needed:
	// an earlier rule is compared with every later one.
	srcPorts := make([][]PortRange, len(c.Rules))
	dstPorts := make([][]PortRange, len(c.Rules))
	for i, r := range c.Rules {
		srcPorts[i], dstPorts[i] = merge(r.SrcPorts), merge(r.DstPorts)
	}
	src := make([]*prefixIndex, len(c.Rules))
	dst := make([]*prefixIndex, len(c.Rules))
	index := func(x []*prefixIndex, i int, p []netip.Prefix) *prefixIndex {
		if x[i] == nil {
			x[i] = newPrefixIndex(p)
		}
		return x[i]
	}
	for j := range c.Rules {
		b := &c.Rules[j]
		for i := range j {
			a := &c.Rules[i]
			if subset(a.Protos, b.Protos) && subset(a.DSCPs, b.DSCPs) && subset(a.LANs, b.LANs) &&
				portsCover(srcPorts[i], b.SrcPorts) && portsCover(dstPorts[i], b.DstPorts) &&
				prefixesCover(a.Src, b.Src, a.SrcSet, b.SrcSet, func() *prefixIndex { return index(src, i, a.Src) }) &&
				prefixesCover(a.Dst, b.Dst, a.DstSet, b.DstSet, func() *prefixIndex { return index(dst, i, a.Dst) }) {
				w := c.Errorf(fmt.Sprintf("rules[%d]", j), "shadowed by rules[%d] (%s)", i, a.Name)
				warnings = append(warnings, w.Error())
				break
			}
		}
	}
	return warnings
}

// subset reports whether the field values a match every value b does
// (empty: any).
func subset[T comparable](a, b []T) bool {
	if len(a) == 0 {
		return true
	}
	if len(b) == 0 {
		return false
	}
	for _, v := range b {
		if !slices.Contains(a, v) {
			return false
		}
	}
	return true
}

// merge sorts port ranges and joins those that overlap or touch.
func merge(ranges []PortRange) []PortRange {
	if len(ranges) == 0 {
		return nil
	}
	m := slices.SortedFunc(slices.Values(ranges), func(x, y PortRange) int { return int(x.First) - int(y.First) })
	merged := m[:1]
	for _, r := range m[1:] {
		last := &merged[len(merged)-1]
		if int(r.First) <= int(last.Last)+1 {
			last.Last = max(last.Last, r.Last)
		} else {
			merged = append(merged, r)
		}
	}
	return merged
}

// portsCover reports whether the merged ranges a cover every port of b
// (empty: any, packets without ports included).
func portsCover(a, b []PortRange) bool {
	if len(a) == 0 {
		return true
	}
	if len(b) == 0 {
		return false
	}
	for _, r := range b {
		if !slices.ContainsFunc(a, func(x PortRange) bool { return x.First <= r.First && r.Last <= x.Last }) {
			return false
		}
	}
	return true
}

// prefixesCover reports whether the prefixes a contain every prefix of b
// (empty: any); the same set on both sides covers whatever it holds.
func prefixesCover(a, b []netip.Prefix, aSet, bSet string, index func() *prefixIndex) bool {
	switch {
	case len(a) == 0 && aSet != "": // an empty set: a matches nothing
		return false
	case len(a) == 0:
		return true
	case len(b) == 0:
		return false
	case aSet != "" && aSet == bSet:
		return true
	}
	x := index()
	for _, q := range b {
		if !x.contains(q) {
			return false
		}
	}
	return true
}

// prefixIndex finds whether a list of prefixes contains a prefix in a
// lookup per distinct prefix length, not a scan: sets can be large.
type prefixIndex struct {
	prefixes map[netip.Prefix]bool
	lengths  []int
}

func newPrefixIndex(ps []netip.Prefix) *prefixIndex {
	x := &prefixIndex{prefixes: map[netip.Prefix]bool{}}
	for _, p := range ps {
		x.prefixes[p] = true
		if !slices.Contains(x.lengths, p.Bits()) {
			x.lengths = append(x.lengths, p.Bits())
		}
	}
	return x
}

func (x *prefixIndex) contains(q netip.Prefix) bool {
	for _, n := range x.lengths {
		if n > q.Bits() {
			continue
		}
		if p, err := q.Addr().Prefix(n); err == nil && x.prefixes[p] {
			return true
		}
	}
	return false
}
