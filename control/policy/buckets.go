// SPDX-License-Identifier: Apache-2.0

package policy

import "github.com/uplinkd/uplinkd/loader"

// Member is a line of a policy.
type Member struct {
	Line   int // the line's datapath index
	Metric int // its tier: the lowest tier with a usable line is used
	Weight int // its share within the tier
}

// Buckets gives the policy's bucket table: the usable lines (usable is
// indexed by line; a weight of 0 or less counts as unusable) of the first
// tier (lowest metric) that has one, split by weight with loader.Buckets,
// which keeps prev's buckets of lines that stay. Every bucket is
// loader.NoLine when no member is usable.
func Buckets(prev []int, members []Member, usable []bool) []int {
	up := func(m Member) bool {
		return m.Line >= 0 && m.Line < len(usable) && usable[m.Line] && m.Weight > 0
	}
	tier, found := 0, false
	for _, m := range members {
		if up(m) && (!found || m.Metric < tier) {
			tier, found = m.Metric, true
		}
	}
	if !found {
		table := make([]int, loader.NumBuckets)
		for b := range table {
			table[b] = loader.NoLine
		}
		return table
	}
	weights := make([]int, len(usable))
	live := make([]bool, len(usable))
	for _, m := range members {
		if up(m) && m.Metric == tier {
			weights[m.Line] += m.Weight
			live[m.Line] = true
		}
	}
	return loader.Buckets(prev, weights, live)
}
