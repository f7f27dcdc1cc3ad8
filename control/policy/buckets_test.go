// SPDX-License-Identifier: Apache-2.0

package policy

import (
	"slices"
	"testing"

	"github.com/uplinkd/uplinkd/loader"
)

func bucketCounts(table []int) map[int]int {
	c := map[int]int{}
	for _, l := range table {
		c[l]++
	}
	return c
}

func TestBucketsTiers(t *testing.T) {
	// Lines 0 and 1 in tier 1 (weights 3 and 1), line 2 in tier 2, line 3
	// in tier 5; line 4 is not a member.
	members := []Member{{Line: 0, Metric: 1, Weight: 3}, {Line: 1, Metric: 1, Weight: 1}, {Line: 2, Metric: 2, Weight: 1}, {Line: 3, Metric: 5, Weight: 7}}
	n := loader.NumBuckets
	tests := []struct {
		name   string
		usable []bool
		want   map[int]int // buckets of each line
	}{
		{"tier 1 by weight", []bool{true, true, true, true, true}, map[int]int{0: n * 3 / 4, 1: n / 4}},
		{"tier 1, one line down", []bool{false, true, true, true, true}, map[int]int{1: n}},
		{"tier 1 down: tier 2", []bool{false, false, true, true, true}, map[int]int{2: n}},
		{"tiers 1 and 2 down: tier 5", []bool{false, false, false, true, true}, map[int]int{3: n}},
		{"none usable", []bool{false, false, false, false, true}, map[int]int{loader.NoLine: n}},
		{"usable shorter than lines", []bool{false, false}, map[int]int{loader.NoLine: n}},
		{"nil usable", nil, map[int]int{loader.NoLine: n}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			table := Buckets(nil, members, tt.usable)
			if len(table) != n {
				t.Fatalf("%d buckets, want %d", len(table), n)
			}
			got := bucketCounts(table)
			for l, c := range tt.want {
				if d := got[l] - c; d < -1 || d > 1 {
					t.Errorf("line %d: %d buckets, want %d±1 (%v)", l, got[l], c, got)
				}
			}
			for l := range got {
				if _, ok := tt.want[l]; !ok {
					t.Errorf("line %d has %d buckets, want none", l, got[l])
				}
			}
		})
	}
}

func TestBucketsEdgeMembers(t *testing.T) {
	n := loader.NumBuckets
	usable := []bool{true, true, true}
	// A member of weight 0 gets nothing, and does not hold its tier.
	got := bucketCounts(Buckets(nil, []Member{{Line: 0, Metric: 0, Weight: 0}, {Line: 1, Metric: 1, Weight: 1}}, usable))
	if got[1] != n {
		t.Errorf("weight 0 in tier 0: %v, want every bucket on line 1", got)
	}
	// Lines out of range are not usable.
	got = bucketCounts(Buckets(nil, []Member{{Line: -1, Weight: 1}, {Line: 9, Weight: 1}, {Line: 2, Metric: 3, Weight: 1}}, usable))
	if got[2] != n {
		t.Errorf("lines out of range: %v, want every bucket on line 2", got)
	}
	// No members: no line.
	if got := bucketCounts(Buckets(nil, nil, usable)); got[loader.NoLine] != n {
		t.Errorf("no members: %v", got)
	}
}

func TestBucketsStable(t *testing.T) {
	members := []Member{{Line: 0, Weight: 1}, {Line: 1, Weight: 1}, {Line: 2, Weight: 2}, {Line: 3, Metric: 1, Weight: 1}}
	all := []bool{true, true, true, true}
	a := Buckets(nil, members, all)
	if b := Buckets(nil, members, all); !slices.Equal(a, b) {
		t.Fatal("same inputs, different tables")
	}
	if b := Buckets(a, members, all); !slices.Equal(a, b) {
		t.Fatal("a table changes with nothing else changing")
	}

	// Line 1 goes down: lines 0 and 2 keep every bucket they had.
	down := []bool{true, false, true, true}
	b := Buckets(a, members, down)
	for i := range a {
		if a[i] != 1 && b[i] != a[i] {
			t.Fatalf("bucket %d moved from line %d to %d", i, a[i], b[i])
		}
		if b[i] == 1 {
			t.Fatalf("bucket %d still on the dead line 1", i)
		}
	}
	// Back up: line 1 takes its share only from the others' surplus.
	c := Buckets(b, members, all)
	moved := 0
	for i := range b {
		if b[i] != c[i] {
			moved++
			if c[i] != 1 {
				t.Fatalf("bucket %d moved from line %d to %d, not to the line back up", i, b[i], c[i])
			}
		}
	}
	if want := bucketCounts(c)[1]; moved != want {
		t.Errorf("%d buckets moved, want %d (line 1's share)", moved, want)
	}

	// The tier falls to line 3 and comes back.
	d := Buckets(c, members, []bool{false, false, false, true})
	if got := bucketCounts(d); got[3] != loader.NumBuckets {
		t.Fatalf("tier 0 down: %v", got)
	}
	if e := Buckets(d, members, all); bucketCounts(e)[3] != 0 {
		t.Fatalf("tier 0 back: line 3 keeps buckets: %v", bucketCounts(e))
	}
}
