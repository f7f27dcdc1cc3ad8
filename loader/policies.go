// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"fmt"
)

// PolicyTable is a policy as the datapath holds it: where its new flows go.
type PolicyTable struct {
	// LastResort is what the policy's new flows get while Buckets holds
	// no live line: LastResortDefault, LastResortUnreachable or
	// LastResortBlackhole.
	LastResort int
	// Buckets is the policy's bucket table (see Buckets): NumBuckets
	// entries, each a line or NoLine.
	Buckets []int
}

// SetPolicies installs the policies, tables[id] being policy id's; ids
// from len(tables) on, and ids whose table has no buckets (nil), are
// unset, and a rule naming one sends its flows to policy 0. Policy 0's buckets are ul_buckets (SetBuckets), its last
// resort the default: no line. Pinned flows keep their lines. Only what
// differs from the maps is written, one batch a map: a reconcile with
// nothing to change writes nothing.
func (d *Datapath) SetPolicies(tables []PolicyTable) error {
	if len(tables) > MaxPolicies {
		return fmt.Errorf("setting policies: %d policies, at most %d", len(tables), MaxPolicies)
	}
	for id, t := range tables {
		if id > 0 && t.Buckets == nil {
			continue // unset
		}
		if err := checkBuckets(t.Buckets); err != nil {
			return fmt.Errorf("setting policy %d: %w", id, err)
		}
		switch {
		case t.LastResort < LastResortDefault || t.LastResort > LastResortBlackhole:
			return fmt.Errorf("setting policy %d: unknown last resort %d", id, t.LastResort)
		case id == 0 && t.LastResort != LastResortDefault:
			return fmt.Errorf("setting policy 0: its last resort can only be the default")
		}
	}
	d.policy0Lines.Store(true)
	if len(tables) > 0 {
		if err := d.SetBuckets(tables[0].Buckets); err != nil {
			return err
		}
	}
	have, err := readAll[uint32, uplinkdPolicy](d.objs.UlPolicies)
	if err != nil {
		return fmt.Errorf("reading policies: %w", err)
	}
	haveBuckets, err := readAll[uint32, uplinkdPolicyBuckets](d.objs.UlPolicyBuckets)
	if err != nil {
		return fmt.Errorf("reading policy buckets: %w", err)
	}
	var (
		ids, bucketIDs []uint32
		policies       []uplinkdPolicy
		buckets        []uplinkdPolicyBuckets
	)
	for id := uint32(1); id < MaxPolicies; id++ {
		var want uplinkdPolicy
		if int(id) < len(tables) && tables[id].Buckets != nil {
			t := tables[id]
			b := policyBuckets(t.Buckets)
			if haveBuckets[id] != b {
				bucketIDs, buckets = append(bucketIDs, id), append(buckets, b)
			}
			want = uplinkdPolicy{LastResort: uint32(t.LastResort), Flags: policySet, Lines: lineSet(t.Buckets)}
		}
		if have[id] != want {
			ids, policies = append(ids, id), append(policies, want)
		}
	}
	// The buckets first: a policy being set finds its own.
	if len(bucketIDs) > 0 {
		if err := d.w.batchUpdate(d.objs.UlPolicyBuckets, bucketIDs, buckets); err != nil {
			return fmt.Errorf("setting policy buckets: %w", err)
		}
	}
	if len(ids) > 0 {
		if err := d.w.batchUpdate(d.objs.UlPolicies, ids, policies); err != nil {
			return fmt.Errorf("setting policies: %w", err)
		}
	}
	return nil
}

// CurrentPolicies returns the policies in force, MaxPolicies of them: an
// unset one has no buckets. Policy 0's buckets are CurrentBuckets.
func (d *Datapath) CurrentPolicies() ([]PolicyTable, error) {
	b0, err := d.CurrentBuckets()
	if err != nil {
		return nil, err
	}
	have, err := readAll[uint32, uplinkdPolicy](d.objs.UlPolicies)
	if err != nil {
		return nil, fmt.Errorf("reading policies: %w", err)
	}
	haveBuckets, err := readAll[uint32, uplinkdPolicyBuckets](d.objs.UlPolicyBuckets)
	if err != nil {
		return nil, fmt.Errorf("reading policy buckets: %w", err)
	}
	tables := make([]PolicyTable, MaxPolicies)
	tables[0].Buckets = b0
	for id := uint32(1); id < MaxPolicies; id++ {
		p := have[id]
		if p.Flags&policySet == 0 {
			continue
		}
		t := PolicyTable{LastResort: int(p.LastResort), Buckets: make([]int, NumBuckets)}
		for b, l := range haveBuckets[id].Line {
			t.Buckets[b] = int(l)
			if l == bucketNoLine {
				t.Buckets[b] = NoLine
			}
		}
		tables[id] = t
	}
	return tables, nil
}

// checkBuckets says what is wrong with a bucket table.
func checkBuckets(lines []int) error {
	if len(lines) != NumBuckets {
		return fmt.Errorf("bucket table has %d entries, want %d", len(lines), NumBuckets)
	}
	for b, l := range lines {
		if l == NoLine {
			continue
		}
		if err := checkLine(l); err != nil {
			return fmt.Errorf("bucket %d: %w", b, err)
		}
	}
	return nil
}

func policyBuckets(lines []int) uplinkdPolicyBuckets {
	var v uplinkdPolicyBuckets
	for b, l := range lines {
		v.Line[b] = bucketNoLine
		if l != NoLine {
			v.Line[b] = uint32(l)
		}
	}
	return v
}

// lineSet is the set of lines a bucket table holds, a bit each: a sticky
// client keeps its line only while the line is in its policy's set.
func lineSet(lines []int) uint32 {
	var set uint32
	for _, l := range lines {
		if l != NoLine {
			set |= 1 << l
		}
	}
	return set
}
