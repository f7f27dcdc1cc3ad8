// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"math/rand/v2"
	"slices"
	"testing"
)

func counts(table []int) map[int]int {
	c := map[int]int{}
	for _, l := range table {
		c[l]++
	}
	return c
}

// checkShares fails unless every live line with a positive weight has its
// exact share of the buckets within one, and the others none.
func checkShares(t *testing.T, table []int, weights []int, live []bool) {
	t.Helper()
	if len(table) != NumBuckets {
		t.Fatalf("%d buckets, want %d", len(table), NumBuckets)
	}
	var total int
	for l, w := range weights {
		if w > 0 && live[l] {
			total += w
		}
	}
	c := counts(table)
	for l, w := range weights {
		if w <= 0 || !live[l] {
			if c[l] != 0 {
				t.Errorf("line %d (weight %d, live %v) has %d buckets", l, w, live[l], c[l])
			}
			continue
		}
		exact := float64(NumBuckets) * float64(w) / float64(total)
		if float64(c[l]) < exact-1 || float64(c[l]) > exact+1 {
			t.Errorf("line %d: %d buckets, want %.1f±1 (weights %v, live %v)", l, c[l], exact, weights, live)
		}
	}
	if total == 0 && c[NoLine] != NumBuckets {
		t.Errorf("no live line, yet %d buckets are assigned", NumBuckets-c[NoLine])
	}
}

// mustMove is the least number of buckets that can move from prev to a
// table with next's shares.
func mustMove(prev, next []int) int {
	p, n := counts(prev), counts(next)
	keep := 0
	for l, c := range p {
		if l != NoLine {
			keep += min(c, n[l])
		}
	}
	return NumBuckets - keep
}

func moved(prev, next []int) int {
	var m int
	for b := range next {
		if prev[b] != next[b] {
			m++
		}
	}
	return m
}

func TestBuckets(t *testing.T) {
	steps := []struct {
		name    string
		weights []int
		live    []bool
	}{
		{"one line", []int{1}, []bool{true}},
		{"second line, equal weight", []int{1, 1}, []bool{true, true}},
		{"weights 1:3", []int{1, 3}, []bool{true, true}},
		{"third line", []int{1, 3, 2}, []bool{true, true, true}},
		{"line 1 dies", []int{1, 3, 2}, []bool{true, false, true}},
		{"line 1 returns", []int{1, 3, 2}, []bool{true, true, true}},
		{"weight 0", []int{0, 3, 2}, []bool{true, true, true}},
		{"uneven shares", []int{7, 11, 13}, []bool{true, true, true}},
		{"all dead", []int{7, 11, 13}, []bool{false, false, false}},
		{"one back", []int{7, 11, 13}, []bool{false, true, false}},
		{"sixteen lines", []int{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}, slices.Repeat([]bool{true}, 16)},
		{"fewer lines", []int{5, 5}, []bool{true, true}},
	}
	var prev []int
	for _, s := range steps {
		next := Buckets(prev, s.weights, s.live)
		checkShares(t, next, s.weights, s.live)
		if !slices.Equal(next, Buckets(prev, s.weights, s.live)) {
			t.Errorf("%s: not deterministic", s.name)
		}
		if prev != nil {
			if m, want := moved(prev, next), mustMove(prev, next); m != want {
				t.Errorf("%s: %d buckets moved, %d had to", s.name, m, want)
			}
		}
		prev = next
	}
}

func TestBucketsSameInputsNoMove(t *testing.T) {
	w, live := []int{2, 5, 1}, []bool{true, true, true}
	a := Buckets(nil, w, live)
	if b := Buckets(a, w, live); !slices.Equal(a, b) {
		t.Errorf("%d buckets moved with nothing changed", moved(a, b))
	}
}

func TestBucketsRandomChanges(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var prev []int
	for i := range 500 {
		n := 1 + rng.IntN(MaxLines)
		weights := make([]int, n)
		live := make([]bool, n)
		for l := range n {
			weights[l] = rng.IntN(10)
			live[l] = rng.IntN(4) != 0
		}
		next := Buckets(prev, weights, live)
		checkShares(t, next, weights, live)
		if prev != nil && moved(prev, next) != mustMove(prev, next) {
			t.Fatalf("step %d: %d buckets moved, %d had to", i, moved(prev, next), mustMove(prev, next))
		}
		prev = next
	}
}
