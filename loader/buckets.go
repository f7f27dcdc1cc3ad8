// SPDX-License-Identifier: Apache-2.0

package loader

// Buckets computes a bucket table: NumBuckets entries, each a line index or
// NoLine. weights and live are indexed by line; a line missing from live is
// dead. Every live line with a positive weight gets a share of the buckets
// proportional to its weight, within one bucket of the exact share (largest
// remainders); with no such line every bucket is NoLine.
//
// prev is the table in force (nil for none). A line keeps its buckets of
// prev up to its new share, so the only buckets that move are those of lines
// that died, went or shrank: the least movement there is, hence the fewest
// new flows changing line. The result depends only on the arguments.
func Buckets(prev []int, weights []int, live []bool) []int {
	quota := shares(weights, live, NumBuckets)
	count := make([]int, len(quota))
	table := make([]int, NumBuckets)

	for b := range table {
		table[b] = NoLine
		if b >= len(prev) {
			continue
		}
		if l := prev[b]; l >= 0 && l < len(quota) && count[l] < quota[l] {
			table[b] = l
			count[l]++
		}
	}
	for b := range table {
		if table[b] != NoLine {
			continue
		}
		// The line furthest below its share, the lowest index on ties.
		best := NoLine
		for l := range quota {
			if count[l] < quota[l] && (best == NoLine || quota[l]-count[l] > quota[best]-count[best]) {
				best = l
			}
		}
		if best == NoLine {
			break
		}
		table[b] = best
		count[best]++
	}
	return table
}

// shares splits n among the live lines in proportion to their weights, by
// the largest remainder method (ties to the lower line index).
func shares(weights []int, live []bool, n int) []int {
	quota := make([]int, len(weights))
	var total int64
	for l, w := range weights {
		if w > 0 && l < len(live) && live[l] {
			total += int64(w)
		}
	}
	if total == 0 {
		return quota
	}
	rem := make([]int64, len(weights))
	left := n
	for l, w := range weights {
		if w > 0 && l < len(live) && live[l] {
			exact := int64(n) * int64(w)
			quota[l] = int(exact / total)
			rem[l] = exact % total
			left -= quota[l]
		}
	}
	for ; left > 0; left-- {
		best := 0
		for l := range rem {
			if rem[l] > rem[best] {
				best = l
			}
		}
		quota[best]++
		rem[best] = -1
	}
	return quota
}
