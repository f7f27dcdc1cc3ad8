// SPDX-License-Identifier: Apache-2.0

package policy

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"

	"github.com/uplinkd/uplinkd/loader"
)

// Errors of Compile past the datapath's limits.
var (
	ErrTooManyRules   = errors.New("too many rules")
	ErrTooManyBitmaps = errors.New("too many distinct rule bitmaps")
)

// Compile turns rules into the tables of the datapath's classifier. Each
// field's table maps a packet's value to the bitmap of the rules that value
// satisfies (the rules without that field included); the first rule set in
// all of a packet's bitmaps is the one Match finds. No rules give the zero
// RuleSet. Identical bitmaps are stored once.
func Compile(rules []Rule) (loader.RuleSet, error) {
	if len(rules) == 0 {
		return loader.RuleSet{}, nil
	}
	if len(rules) > loader.MaxRules {
		return loader.RuleSet{}, fmt.Errorf("compiling rules: %d rules, at most %d: %w", len(rules), loader.MaxRules, ErrTooManyRules)
	}
	if err := check(rules); err != nil {
		return loader.RuleSet{}, fmt.Errorf("compiling rules: %w", err)
	}
	c := &compiler{words: (len(rules) + 63) / 64, ids: map[string]uint32{}}
	rs := loader.RuleSet{Words: c.words, LAN: map[int]uint32{}}
	rs.Src = c.prefixes(rules, func(r *Rule) []netip.Prefix { return r.Src })
	rs.Dst = c.prefixes(rules, func(r *Rule) []netip.Prefix { return r.Dst })

	base, by := valueRules(rules, func(r *Rule) []uint8 { return r.Protos })
	for v := range rs.Proto {
		rs.Proto[v] = c.with(base, by[uint8(v)])
	}
	base, by = valueRules(rules, func(r *Rule) []uint8 { return r.DSCPs })
	for v := range rs.DSCP {
		rs.DSCP[v] = c.with(base, by[uint8(v)])
	}

	rs.SrcPort = c.ports(rules, func(r *Rule) []PortRange { return r.SrcPorts })
	rs.DstPort = c.ports(rules, func(r *Rule) []PortRange { return r.DstPorts })
	noPorts := c.bitmap()
	for i, r := range rules {
		if len(r.SrcPorts) == 0 && len(r.DstPorts) == 0 {
			noPorts.set(i)
		}
	}
	rs.NoPorts = c.intern(noPorts)

	lanBase, lanBy := valueRules(rules, func(r *Rule) []int { return r.LANs })
	for _, lan := range slices.Sorted(maps.Keys(lanBy)) {
		rs.LAN[lan] = c.with(lanBase, lanBy[lan])
	}
	rs.AnyLAN = c.intern(lanBase)

	if c.overflow {
		return loader.RuleSet{}, fmt.Errorf("compiling rules: more than %d distinct bitmaps: %w", loader.MaxBitmaps, ErrTooManyBitmaps)
	}
	rs.Bitmaps = c.pool
	rs.Actions = make([]loader.RuleAction, len(rules))
	for i, r := range rules {
		// Numbered by place: a caller that keeps numbers across reloads
		// sets its own.
		rs.Actions[i] = loader.RuleAction{ID: i, Policy: r.Policy, Sticky: r.Sticky, StickyPerRule: r.StickyPerRule}
	}
	return rs, nil
}

// check rejects what the datapath cannot hold; the config catches all of
// it first, with file and line.
func check(rules []Rule) error {
	for i, r := range rules {
		for _, p := range slices.Concat(r.Src, r.Dst) {
			if !p.IsValid() {
				return fmt.Errorf("rules[%d]: an invalid prefix (%#v)", i, p)
			}
		}
		for _, pr := range slices.Concat(r.SrcPorts, r.DstPorts) {
			if pr.First > pr.Last {
				return fmt.Errorf("rules[%d]: port range %d-%d is empty", i, pr.First, pr.Last)
			}
		}
		for _, d := range r.DSCPs {
			if d > 63 {
				return fmt.Errorf("rules[%d]: dscp %d out of range 0..63", i, d)
			}
		}
		if r.Policy < 0 || r.Policy >= loader.MaxPolicies {
			return fmt.Errorf("rules[%d]: policy id %d out of range 0..%d", i, r.Policy, loader.MaxPolicies-1)
		}
	}
	return nil
}

// bitmap is a set of rules, one bit a rule, bit i%64 of word i/64.
type bitmap []uint64

func (b bitmap) set(i int)   { b[i/64] |= 1 << (i % 64) }
func (b bitmap) clear(i int) { b[i/64] &^= 1 << (i % 64) }

// compiler holds the bitmap pool of one compilation.
type compiler struct {
	words    int
	pool     [][]uint64
	ids      map[string]uint32 // a bitmap's words, little-endian bytes → its id in pool
	key      []byte
	chunk    []uint64 // where the pool's next bitmaps are cut from
	overflow bool     // more than loader.MaxBitmaps distinct bitmaps
}

func (c *compiler) bitmap() bitmap { return make(bitmap, c.words) }

// intern returns b's id in the pool, adding a copy of b if it is new.
func (c *compiler) intern(b bitmap) uint32 {
	c.key = c.key[:0]
	for _, w := range b {
		c.key = binary.LittleEndian.AppendUint64(c.key, w)
	}
	if id, ok := c.ids[string(c.key)]; ok {
		return id
	}
	if len(c.pool) == loader.MaxBitmaps {
		c.overflow = true
		return 0
	}
	if len(c.chunk) < c.words {
		c.chunk = make([]uint64, 64*c.words)
	}
	kept := c.chunk[:c.words:c.words]
	c.chunk = c.chunk[c.words:]
	copy(kept, b)
	id := uint32(len(c.pool))
	c.pool = append(c.pool, kept)
	c.ids[string(c.key)] = id
	return id
}

// with interns base plus the rules of extra.
func (c *compiler) with(base bitmap, extra []int) uint32 {
	for _, r := range extra {
		base.set(r)
	}
	id := c.intern(base)
	for _, r := range extra {
		base.clear(r)
	}
	return id
}

// valueRules returns, for a field of discrete values, the rules without the
// field, and for each value the rules that list it.
func valueRules[T comparable](rules []Rule, field func(*Rule) []T) (bitmap, map[T][]int) {
	base := make(bitmap, (len(rules)+63)/64)
	by := map[T][]int{}
	for i := range rules {
		vs := field(&rules[i])
		if len(vs) == 0 {
			base.set(i)
		}
		for _, v := range vs {
			by[v] = append(by[v], i)
		}
	}
	return base, by
}

// prefixes builds an address table. A prefix's bitmap is the rules without
// the field plus the rules listing that prefix or one containing it, so
// that an address's longest matching prefix gives the rules it satisfies.
// The table holds 0.0.0.0/0 and ::/0, and every listed prefix except those
// whose bitmap is that of the table's longest prefix containing them.
func (c *compiler) prefixes(rules []Rule, field func(*Rule) []netip.Prefix) []loader.PrefixBitmap {
	type listed struct {
		p    netip.Prefix
		rule int // -1: the roots, listed by no rule
	}
	base := c.bitmap()
	list := []listed{{netip.PrefixFrom(netip.IPv4Unspecified(), 0), -1}, {netip.PrefixFrom(netip.IPv6Unspecified(), 0), -1}}
	for i := range rules {
		ps := field(&rules[i])
		if len(ps) == 0 {
			base.set(i)
		}
		for _, p := range ps {
			list = append(list, listed{p.Masked(), i})
		}
	}
	// By address then length: IPv4 first, and each prefix after the
	// prefixes containing it, so that those are on the stack.
	slices.SortFunc(list, func(a, b listed) int {
		return cmp.Or(a.p.Addr().Compare(b.p.Addr()), cmp.Compare(a.p.Bits(), b.p.Bits()))
	})

	type entry struct {
		p   netip.Prefix
		acc bitmap
	}
	var (
		stack []entry // the table's prefixes containing the current one
		free  []bitmap
		table []loader.PrefixBitmap
	)
	for i := 0; i < len(list); {
		p := list[i].p
		for len(stack) > 0 && !contains(stack[len(stack)-1].p, p) {
			free = append(free, stack[len(stack)-1].acc)
			stack = stack[:len(stack)-1]
		}
		var acc bitmap
		if n := len(free); n > 0 {
			acc, free = free[n-1], free[:n-1]
		} else {
			acc = c.bitmap()
		}
		if len(stack) > 0 {
			copy(acc, stack[len(stack)-1].acc)
		} else {
			copy(acc, base)
		}
		for ; i < len(list) && list[i].p == p; i++ {
			if r := list[i].rule; r >= 0 {
				acc.set(r)
			}
		}
		if len(stack) > 0 && slices.Equal(acc, stack[len(stack)-1].acc) {
			free = append(free, acc) // the longest match already gives this bitmap
			continue
		}
		table = append(table, loader.PrefixBitmap{Prefix: p, Bitmap: c.intern(acc)})
		stack = append(stack, entry{p, acc})
	}
	return table
}

// contains reports whether prefix q contains prefix p (same family).
func contains(q, p netip.Prefix) bool {
	return q.Bits() <= p.Bits() && q.Contains(p.Addr())
}

// ports builds a port table: the elementary intervals between the ends of
// every listed range, each with the rules without the field plus the rules
// with a range holding it; neighbours with the same bitmap are merged.
func (c *compiler) ports(rules []Rule, field func(*Rule) []PortRange) []loader.PortBitmap {
	type event struct {
		at, rule, delta int // at port at, rule's count of ranges holding it changes by delta
	}
	acc := c.bitmap()
	var events []event
	for i := range rules {
		rs := field(&rules[i])
		if len(rs) == 0 {
			acc.set(i)
		}
		for _, r := range rs {
			events = append(events, event{int(r.First), i, 1})
			if r.Last < 65535 {
				events = append(events, event{int(r.Last) + 1, i, -1})
			}
		}
	}
	slices.SortFunc(events, func(a, b event) int { return cmp.Compare(a.at, b.at) })

	count := make([]int32, len(rules))
	var table []loader.PortBitmap
	for at, e := 0, 0; at <= 65535; {
		for ; e < len(events) && events[e].at == at; e++ {
			ev := events[e]
			count[ev.rule] += int32(ev.delta)
			if count[ev.rule] > 0 {
				acc.set(ev.rule)
			} else {
				acc.clear(ev.rule)
			}
		}
		next := 65536
		if e < len(events) {
			next = events[e].at
		}
		id := c.intern(acc)
		if n := len(table); n > 0 && table[n-1].Bitmap == id {
			table[n-1].Last = uint16(next - 1)
		} else {
			table = append(table, loader.PortBitmap{First: uint16(at), Last: uint16(next - 1), Bitmap: id})
		}
		at = next
	}
	return table
}
