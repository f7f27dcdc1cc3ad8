// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"math"
	"math/bits"
	"net/netip"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Shared with bpf/lib/classify.h and bpf/lib/policy.h.
const (
	ruleGens           = 2       // UL_RULE_GENS
	numPorts           = 1 << 16 // UL_NUM_PORTS
	ruleStickyPerRule  = 1 << 0  // RULE_F_STICKY_PER_RULE
	policySet          = 1 << 0  // POLICY_F_SET
	flowRuleShift      = 8       // FLOW_RULE_SHIFT
	flowRuleMask       = 0x1fff  // FLOW_RULE_MASK
	flowPolicyShift    = 24      // FLOW_POLICY_SHIFT
	flowPolicyMask     = 0x3f    // FLOW_POLICY_MASK
	ruleFullPrefixBits = 8 + 8   // gen and family bytes before the address in a rule_prefix
	v4Fanout           = 16      // UL_V4_FANOUT
	v4MaxDepth         = 5       // UL_V4_MAX_DEPTH
	v4MaxIntervals     = 1 << 17 // UL_V4_INTERVALS
	v4Nodes            = 9216    // UL_V4_NODES
	v4Pad              = ^uint32(0)
	v4DirCells         = 1 << 16      // UL_V4_DIR_CELLS
	v4DirTree          = 1 << 31      // UL_V4_DIR_TREE
	v4DirLevelShift    = 24           // UL_V4_DIR_LEVEL_SHIFT
	v6MaxPrefixes      = 65536 + 4096 // UL_V6_PREFIXES
	stickyPerRule      = 0x10000      // UL_STICKY_PER_RULE
	lanSlotCount       = 64           // UL_LAN_SLOTS
	lanSlotShared      = ^uint32(0)   // UL_LAN_SLOT_SHARED
	lanSlotEmpty       = ^uint32(1)   // UL_LAN_SLOT_EMPTY
)

// The rule bitmaps hold RuleWords words.
var _ = [RuleWords]uint64(uplinkdRuleBitmap{}.W)

// checkRuleLimits makes sure the Go limits in rules.go are the object's.
func checkRuleLimits(spec *ebpf.CollectionSpec) error {
	for _, c := range []struct {
		m    string
		want int
	}{
		{uplinkdMapUlRuleActions, ruleGens * MaxRules},
		{uplinkdMapUlRuleHits, ruleGens * MaxRules},
		{uplinkdMapUlRuleBitmaps, ruleGens * MaxBitmaps},
		{uplinkdMapUlRuleSport, ruleGens * numPorts},
		{uplinkdMapUlRuleProto, ruleGens * 256},
		{uplinkdMapUlRuleDscp, ruleGens * 64},
		{uplinkdMapUlPolicies, MaxPolicies},
		{uplinkdMapUlPolicyBuckets, MaxPolicies},
		{uplinkdMapUlPolicyFlows, MaxPolicies},
		{uplinkdMapUlPolicyStats, MaxPolicies},
		{uplinkdMapUlRuleV4Nodes, 2 * ruleGens * v4Nodes},
		{uplinkdMapUlRuleV4Ids, 2 * ruleGens * v4MaxIntervals},
		{uplinkdMapUlRuleV4Dir, 2 * ruleGens * v4DirCells},
		{uplinkdMapUlRuleLanSlots, ruleGens * lanSlotCount},
		{uplinkdMapUlRuleSrc, ruleGens * v6MaxPrefixes},
		{uplinkdMapUlRuleDst, ruleGens * v6MaxPrefixes},
	} {
		if got := int(spec.Maps[c.m].MaxEntries); got != c.want {
			return fmt.Errorf("%s has %d entries, the loader expects %d", c.m, got, c.want)
		}
	}
	return nil
}

// flowFlags is the rule (-1: none) and policy of a flow, as flow.flags
// holds them.
func flowFlags(rule, policy int) uint32 {
	return uint32(rule+1)&flowRuleMask<<flowRuleShift | uint32(policy)&flowPolicyMask<<flowPolicyShift
}

// flowRulePolicy reads the rule (-1: none) and policy from flow.flags.
func flowRulePolicy(flags uint32) (rule, policy int) {
	return int(flags>>flowRuleShift&flowRuleMask) - 1, int(flags >> flowPolicyShift & flowPolicyMask)
}

// SetRuleSet installs a rule set: new flows are classified by it, pinned
// flows keep their line. It writes the generation of the classifier's
// tables not in use, whole, then switches the datapath to it with one
// write, so that no packet sees half of a rule set, and zeroes the rule
// counters of the generation beforehand. A rule set equal to the one this
// Datapath installed last writes nothing; so does the empty one when none
// is in force.
func (d *Datapath) SetRuleSet(rs RuleSet) error {
	d.ruleMu.Lock()
	defer d.ruleMu.Unlock()
	if d.rules != nil && ruleSetsEqual(*d.rules, rs) {
		return nil
	}
	if err := checkRuleSet(rs); err != nil {
		return fmt.Errorf("setting rules: %w", err)
	}
	cfg, err := d.ruleCfg()
	if err != nil {
		return fmt.Errorf("setting rules: %w", err)
	}
	active := cfg.Gen % ruleGens
	if len(rs.Actions) == 0 && cfg.Words[active] == 0 {
		d.rules = cloneRuleSet(rs)
		return nil
	}
	gen := 1 - active
	// A packet that read the previous flip's generation may still be
	// classifying by what is now the inactive one: wait it out.
	if time.Since(d.ruleFlip) < time.Second {
		waitForReaders()
	}
	var g genCfg
	if len(rs.Actions) > 0 {
		if g, err = d.writeRuleGen(gen, rs); err != nil {
			return fmt.Errorf("setting rules: %w", err)
		}
	}
	cfg.V4[0][gen], cfg.V4[1][gen], cfg.Fixed[gen] = g.trees[0], g.trees[1], g.fixed
	// First the generation's fields, then the flip alone: a packet reads
	// either generation whole.
	n := len(rs.Actions)
	cfg.Words[gen], cfg.Nrules[gen], cfg.NoPorts[gen], cfg.AnyLan[gen] = uint32(rs.Words), uint32(n), rs.NoPorts, rs.AnyLAN
	if n == 0 {
		cfg.Words[gen], cfg.NoPorts[gen], cfg.AnyLan[gen] = 0, 0, 0
	}
	if err := d.w.put(d.objs.UlRuleCfg, uint32(0), &cfg); err != nil {
		return fmt.Errorf("setting rules: %w", err)
	}
	cfg.Gen = gen
	if err := d.w.put(d.objs.UlRuleCfg, uint32(0), &cfg); err != nil {
		return fmt.Errorf("setting rules: switching to the new rules: %w", err)
	}
	d.ruleFlip = time.Now()
	d.rules = cloneRuleSet(rs)
	if n > 0 && !d.policy0Lines.Swap(true) {
		// Sticky rules of policy 0 read its line set, which SetBuckets
		// keeps from now on.
		b, err := d.CurrentBuckets()
		if err != nil {
			return err
		}
		if err := d.setPolicy0Lines(lineSet(b)); err != nil {
			return err
		}
	}
	return nil
}

// SetLastResortMarks sets the fwmarks that send a new flow to the
// unreachable and the blackhole route, for the policies whose last resort
// they are; 0 leaves one unconfigured, and such a policy then falls back to
// policy 0 as the default last resort does.
func (d *Datapath) SetLastResortMarks(unreach, blackhole uint32) error {
	for _, m := range []uint32{unreach, blackhole} {
		if m&^d.markMask != 0 {
			return fmt.Errorf("setting last resort marks: mark %#x outside mask %#x", m, d.markMask)
		}
	}
	d.ruleMu.Lock()
	defer d.ruleMu.Unlock()
	cfg, err := d.ruleCfg()
	if err != nil {
		return fmt.Errorf("setting last resort marks: %w", err)
	}
	if cfg.UnreachMark == unreach && cfg.BlackholeMark == blackhole {
		return nil
	}
	cfg.UnreachMark, cfg.BlackholeMark = unreach, blackhole
	if err := d.w.put(d.objs.UlRuleCfg, uint32(0), &cfg); err != nil {
		return fmt.Errorf("setting last resort marks: %w", err)
	}
	return nil
}

func (d *Datapath) ruleCfg() (uplinkdRuleCfg, error) {
	var cfg uplinkdRuleCfg
	if err := d.objs.UlRuleCfg.Lookup(uint32(0), &cfg); err != nil {
		return cfg, fmt.Errorf("reading rule config: %w", err)
	}
	return cfg, nil
}

// waitForReaders waits until every BPF program running now has ended: an
// RCU grace period, which membarrier(MEMBARRIER_CMD_GLOBAL) waits for.
// Where the kernel refuses it (nohz_full), a pause far longer than a
// program runs.
func waitForReaders() {
	const membarrierCmdGlobal = 1
	if _, _, errno := unix.Syscall(unix.SYS_MEMBARRIER, membarrierCmdGlobal, 0, 0); errno != 0 {
		time.Sleep(10 * time.Millisecond)
	}
}

// Rule fields, in the order of enum rule_field (bpf/lib/classify.h).
const (
	fieldSrc = iota
	fieldDst
	fieldProto
	fieldDSCP
	fieldSport
	fieldDport
	fieldLAN
	ruleFields
	ruleFieldFixed = 1 << 31 // UL_RULE_FIELD_FIXED
)

var _ = [ruleFields]uint32(uplinkdRuleCfg{}.Fixed[0])

// genCfg is what rule_cfg holds of a generation besides its counts.
type genCfg struct {
	trees [2]uplinkdV4Tree
	fixed [ruleFields]uint32
}

// fixedFields finds the fields whose table gives one bitmap for every
// value: the datapath does not look them up, and their tables are not
// written.
func fixedFields(rs RuleSet) [ruleFields]uint32 {
	var fixed [ruleFields]uint32
	one := func(ids ...uint32) bool {
		for _, id := range ids {
			if id != ids[0] {
				return false
			}
		}
		return len(ids) > 0
	}
	prefixIDs := func(t []PrefixBitmap) []uint32 {
		ids := make([]uint32, len(t))
		for i, p := range t {
			ids[i] = p.Bitmap
		}
		return ids
	}
	portIDs := func(t []PortBitmap) []uint32 {
		ids := make([]uint32, len(t))
		for i, p := range t {
			ids[i] = p.Bitmap
		}
		return ids
	}
	for f, ids := range map[int][]uint32{
		fieldSrc: prefixIDs(rs.Src), fieldDst: prefixIDs(rs.Dst),
		fieldProto: rs.Proto[:], fieldDSCP: rs.DSCP[:],
		fieldSport: portIDs(rs.SrcPort), fieldDport: portIDs(rs.DstPort),
		fieldLAN: append(slices.Collect(maps.Values(rs.LAN)), rs.AnyLAN),
	} {
		if one(ids...) {
			fixed[f] = ruleFieldFixed | ids[0]
		}
	}
	return fixed
}

// writeRuleGen writes rs into generation gen of the classifier's tables;
// the datapath does not read that generation meanwhile. It returns what
// rule_cfg is to hold of the generation.
func (d *Datapath) writeRuleGen(gen uint32, rs RuleSet) (genCfg, error) {
	c := genCfg{fixed: fixedFields(rs)}
	// The counters first: the generation's rules count from zero.
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return c, err
	}
	keys := make([]uint32, MaxRules)
	for r := range keys {
		keys[r] = gen*MaxRules + uint32(r)
	}
	if err := d.w.batchUpdate(d.objs.UlRuleHits, keys, make([]uint64, MaxRules*cpus)); err != nil {
		return c, fmt.Errorf("zeroing rule counters: %w", err)
	}

	bitmaps := make([]uplinkdRuleBitmap, len(rs.Bitmaps))
	keys = keys[:0]
	for i, b := range rs.Bitmaps {
		for w, word := range b {
			bitmaps[i].W[w] = word
			if word != 0 {
				bitmaps[i].Any |= 1 << w
			}
		}
		keys = append(keys, gen*MaxBitmaps+uint32(i))
	}
	if err := d.w.batchUpdate(d.objs.UlRuleBitmaps, keys, bitmaps); err != nil {
		return c, fmt.Errorf("writing rule bitmaps: %w", err)
	}

	for field, t := range []struct {
		m    *ebpf.Map
		name string
		p    []PrefixBitmap
	}{{d.objs.UlRuleSrc, "source", rs.Src}, {d.objs.UlRuleDst, "destination", rs.Dst}} {
		if c.fixed[field] != 0 {
			continue
		}
		tree, err := d.writeV4Tree(uint32(field), gen, t.p)
		if err != nil {
			return c, fmt.Errorf("writing %s prefixes: %w", t.name, err)
		}
		c.trees[field] = tree
		want := make(map[uplinkdRulePrefix]uint32, len(t.p))
		for _, p := range t.p {
			if !p.Prefix.Addr().Is4() {
				want[rulePrefixKey(gen, p.Prefix)] = p.Bitmap
			}
		}
		if err := syncGen(&d.w, t.m, want, func(k uplinkdRulePrefix) bool { return uint32(k.Gen) == gen }); err != nil {
			return c, fmt.Errorf("writing %s prefixes: %w", t.name, err)
		}
	}

	for _, a := range []struct {
		field int
		m     *ebpf.Map
		name  string
		ids   func() []uint32
	}{
		{fieldProto, d.objs.UlRuleProto, "protocols", func() []uint32 { return rs.Proto[:] }},
		{fieldDSCP, d.objs.UlRuleDscp, "DSCPs", func() []uint32 { return rs.DSCP[:] }},
		{fieldSport, d.objs.UlRuleSport, "source ports", func() []uint32 { return portIDs(rs.SrcPort) }},
		{fieldDport, d.objs.UlRuleDport, "destination ports", func() []uint32 { return portIDs(rs.DstPort) }},
	} {
		if c.fixed[a.field] != 0 {
			continue
		}
		ids := a.ids()
		keys = keys[:0]
		for v := range ids {
			keys = append(keys, gen*uint32(len(ids))+uint32(v))
		}
		if err := d.w.batchUpdate(a.m, keys, ids); err != nil {
			return c, fmt.Errorf("writing %s: %w", a.name, err)
		}
	}

	if c.fixed[fieldLAN] == 0 {
		lans := make(map[uplinkdRuleLanKey]uint32, len(rs.LAN))
		for ifindex, id := range rs.LAN {
			lans[uplinkdRuleLanKey{Gen: gen, Ifindex: uint32(ifindex)}] = id
		}
		if err := syncGen(&d.w, d.objs.UlRuleLan, lans, func(k uplinkdRuleLanKey) bool { return k.Gen == gen }); err != nil {
			return c, fmt.Errorf("writing LAN interfaces: %w", err)
		}
		slots := lanSlots(rs.LAN)
		keys = keys[:0]
		for s := range slots {
			keys = append(keys, gen*lanSlotCount+uint32(s))
		}
		if err := d.w.batchUpdate(d.objs.UlRuleLanSlots, keys, slots); err != nil {
			return c, fmt.Errorf("writing LAN interface slots: %w", err)
		}
	}

	actions := make([]uplinkdRuleAction, len(rs.Actions))
	keys = keys[:0]
	for r, a := range rs.Actions {
		actions[r] = uplinkdRuleAction{Id: uint32(a.ID), Policy: uint32(a.Policy), StickyNs: uint64(a.Sticky.Nanoseconds())}
		if a.StickyPerRule {
			actions[r].Flags |= ruleStickyPerRule
		}
		keys = append(keys, gen*MaxRules+uint32(r))
	}
	if err := d.w.batchUpdate(d.objs.UlRuleActions, keys, actions); err != nil {
		return c, fmt.Errorf("writing rule actions: %w", err)
	}
	return c, nil
}

// lanSlots places the LAN interfaces the rules name by ifindex %
// lanSlotCount; a slot two of them share is marked so, and the datapath
// looks those up in ul_rule_lan.
func lanSlots(lans map[int]uint32) []uplinkdRuleLanSlot {
	slots := make([]uplinkdRuleLanSlot, lanSlotCount)
	for i := range slots {
		slots[i].Ifindex = lanSlotEmpty
	}
	for ifindex, id := range lans {
		s := &slots[ifindex%lanSlotCount]
		if s.Ifindex != lanSlotEmpty {
			*s = uplinkdRuleLanSlot{Ifindex: lanSlotShared}
			continue
		}
		*s = uplinkdRuleLanSlot{Ifindex: uint32(ifindex), Id: id}
	}
	return slots
}

// writeV4Tree writes the IPv4 prefixes of an address table as the search
// tree of generation gen of field (0: source, 1: destination) and returns
// where it is.
func (d *Datapath) writeV4Tree(field, gen uint32, t []PrefixBitmap) (uplinkdV4Tree, error) {
	firsts, ids := v4Intervals(t)
	if len(firsts) > v4MaxIntervals {
		return uplinkdV4Tree{}, fmt.Errorf("%d IPv4 address intervals, at most %d", len(firsts), v4MaxIntervals)
	}
	levels := v4TreeLevels(firsts)
	var tree uplinkdV4Tree
	var nodes []uplinkdV4Node
	for l, level := range levels {
		tree.Off[l] = uint32(len(nodes))
		nodes = append(nodes, level...)
	}
	tree.Depth = uint32(len(levels))
	table := field*ruleGens + gen
	keys := make([]uint32, len(nodes))
	for i := range keys {
		keys[i] = table*v4Nodes + uint32(i)
	}
	if err := d.w.batchUpdate(d.objs.UlRuleV4Nodes, keys, nodes); err != nil {
		return tree, fmt.Errorf("writing the IPv4 tree: %w", err)
	}
	keys = make([]uint32, len(ids))
	for i := range keys {
		keys[i] = table*v4MaxIntervals + uint32(i)
	}
	if err := d.w.batchUpdate(d.objs.UlRuleV4Ids, keys, ids); err != nil {
		return tree, fmt.Errorf("writing the IPv4 intervals: %w", err)
	}
	// Before the flip, like the rest: the datapath reads the common cells
	// of every table with more than one interval, first.
	common := v4CommonCells(firsts, ids)
	if err := d.w.put(d.objs.UlRuleV4Common, table, &common); err != nil {
		return tree, fmt.Errorf("writing the IPv4 common cells: %w", err)
	}
	// A tree of 1 or 2 levels is walked from its root.
	if len(levels) < 3 {
		return tree, nil
	}
	// About a cell per interval: most cells are then one interval or hold
	// a leaf's worth.
	bits := min(max(bitsFor(len(firsts)), 8), 16)
	tree.DirShift = uint32(32 - bits)
	// The directory last: it points into the rest.
	dir := v4Directory(firsts, ids, len(levels), bits)
	keys = make([]uint32, len(dir))
	for i := range keys {
		keys[i] = table*v4DirCells + uint32(i)
	}
	if err := d.w.batchUpdate(d.objs.UlRuleV4Dir, keys, dir); err != nil {
		return tree, fmt.Errorf("writing the IPv4 directory: %w", err)
	}
	return tree, nil
}

// v4CommonCells finds the bitmap id that holds the most /16s whole (in a
// table of specific prefixes, the id of the rules without one) and marks
// the /16s it holds.
func v4CommonCells(firsts, ids []uint32) uplinkdV4Common {
	cells := v4Directory(firsts, ids, v4MaxDepth, 16)
	count := map[uint32]int{}
	for _, e := range cells {
		if e&v4DirTree == 0 {
			count[e]++
		}
	}
	c := uplinkdV4Common{Set: 1}
	best := 0
	for id, n := range count {
		if n > best || n == best && id < c.Id {
			c.Id, best = id, n
		}
	}
	if best == 0 {
		return c
	}
	for cell, e := range cells {
		if e == c.Id {
			c.Cells[cell/64] |= 1 << (cell % 64)
		}
	}
	return c
}

// v4Directory gives each cell (the addresses with the same top bits) its
// directory entry: the bitmap id of the one interval holding it whole, or
// where in the tree (of depth levels) to start: the lowest node above the
// leaves of every interval of the cell.
func v4Directory(firsts, ids []uint32, depth, bits int) []uint32 {
	dir := make([]uint32, 1<<bits)
	shift := 32 - bits
	a := 0 // the interval holding the cell's first address
	for c := range dir {
		lo := uint32(c) << shift
		hi := lo | (1<<shift - 1)
		for a+1 < len(firsts) && firsts[a+1] <= lo {
			a++
		}
		b := a // the interval holding its last address
		for b+1 < len(firsts) && firsts[b+1] <= hi {
			b++
		}
		if a == b {
			dir[c] = ids[a]
			continue
		}
		la, lb, level := a/v4Fanout, b/v4Fanout, depth-1
		for la != lb {
			la, lb, level = la/v4Fanout, lb/v4Fanout, level-1
		}
		dir[c] = v4DirTree | uint32(level)<<v4DirLevelShift | uint32(la)
	}
	return dir
}

// v4Intervals splits the IPv4 space by the longest match of the table's
// IPv4 prefixes: the intervals' first addresses (from 0, ascending) and
// their bitmap ids, neighbours with the same id merged. The table holds
// 0.0.0.0/0 and no prefix twice (checkRuleSet).
func v4Intervals(t []PrefixBitmap) (firsts, ids []uint32) {
	type span struct {
		first, last uint64
		bits        int
		id          uint32
	}
	var spans []span
	for _, p := range t {
		if !p.Prefix.Addr().Is4() {
			continue
		}
		a := p.Prefix.Masked().Addr().As4()
		first := uint64(binary.BigEndian.Uint32(a[:]))
		spans = append(spans, span{first, first + 1<<(32-p.Prefix.Bits()) - 1, p.Prefix.Bits(), p.Bitmap})
	}
	// Prefixes nest or are apart: by first address, the outer first.
	slices.SortFunc(spans, func(a, b span) int { return cmp.Or(cmp.Compare(a.first, b.first), cmp.Compare(a.bits, b.bits)) })
	emit := func(at uint64, id uint32) {
		if at > math.MaxUint32 {
			return
		}
		if n := len(firsts); n > 0 && uint64(firsts[n-1]) == at { // an inner prefix starts here
			firsts, ids = firsts[:n-1], ids[:n-1]
		}
		if n := len(ids); n > 0 && ids[n-1] == id {
			return
		}
		firsts, ids = append(firsts, uint32(at)), append(ids, id)
	}
	var open []span // the prefixes holding the current address, outermost first
	for _, sp := range spans {
		for len(open) > 0 && open[len(open)-1].last < sp.first {
			closed := open[len(open)-1]
			open = open[:len(open)-1]
			if len(open) > 0 {
				emit(closed.last+1, open[len(open)-1].id)
			}
		}
		emit(sp.first, sp.id)
		open = append(open, sp)
	}
	for len(open) > 1 {
		closed := open[len(open)-1]
		open = open[:len(open)-1]
		emit(closed.last+1, open[len(open)-1].id)
	}
	return firsts, ids
}

// v4TreeLevels builds the search tree over the intervals' first addresses:
// the root's level first, the leaves last. A node holds the first
// addresses of up to 16 intervals (a leaf) or of its children's.
func v4TreeLevels(firsts []uint32) [][]uplinkdV4Node {
	var levels [][]uplinkdV4Node
	keys := firsts
	for {
		level := make([]uplinkdV4Node, (len(keys)+v4Fanout-1)/v4Fanout)
		for i := range level {
			for j := range v4Fanout {
				level[i].First[j] = v4Pad
				if k := i*v4Fanout + j; k < len(keys) {
					level[i].First[j] = keys[k]
				}
			}
		}
		levels = append([][]uplinkdV4Node{level}, levels...)
		if len(level) <= 1 {
			return levels
		}
		keys = make([]uint32, len(level))
		for i, n := range level {
			keys[i] = n.First[0]
		}
	}
}

// bitsFor is the bits that count to n: ceil(log2(n)).
func bitsFor(n int) int { return bits.Len(uint(n - 1)) }

// syncGen makes the entries of m that ours selects (a generation's) those
// of want: stale ones are deleted first, then want is written in one batch
// where the kernel batches the map's type.
func syncGen[K comparable](w *mapWriter, m *ebpf.Map, want map[K]uint32, ours func(K) bool) error {
	have, err := readChunked[K, uint32](m)
	if err != nil {
		return fmt.Errorf("reading: %w", err)
	}
	for k := range have {
		if _, keep := want[k]; keep || !ours(k) {
			continue
		}
		if err := w.del(m, &k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("deleting a stale entry: %w", err)
		}
	}
	keys := slices.Collect(maps.Keys(want))
	values := make([]uint32, len(keys))
	for i, k := range keys {
		values[i] = want[k]
	}
	if len(keys) == 0 {
		return nil
	}
	err = w.batchUpdate(m, keys, values)
	if !errors.Is(err, ebpf.ErrNotSupported) {
		return err
	}
	for i := range keys {
		if err := w.put(m, &keys[i], values[i]); err != nil {
			return err
		}
	}
	return nil
}

// readChunked reads every entry of a map that may be large but is mostly
// empty, in batches of a few thousand (readAll's one batch of the map's
// size costs tens of milliseconds in buffers alone at 131072 entries).
func readChunked[K comparable, V any](m *ebpf.Map) (map[K]V, error) {
	const chunk = 4096
	keys, values := make([]K, chunk), make([]V, chunk)
	out := make(map[K]V)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cursor, keys, values, nil)
		for i := range n {
			out[keys[i]] = values[i]
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return out, nil
		}
		if errors.Is(err, ebpf.ErrNotSupported) {
			return readAll[K, V](m) // it iterates
		}
		if err != nil {
			return nil, err
		}
	}
}

// rulePrefixKey is p as a key of generation gen of ul_rule_src or
// ul_rule_dst.
func rulePrefixKey(gen uint32, p netip.Prefix) uplinkdRulePrefix {
	bits, family := ruleFullPrefixBits+p.Bits(), uint8(unix.AF_INET6)
	if p.Addr().Is4() {
		bits, family = ruleFullPrefixBits+96+p.Bits(), unix.AF_INET
	}
	return uplinkdRulePrefix{Prefixlen: uint32(bits), Gen: uint8(gen), Family: family, Addr: p.Masked().Addr().As16()}
}

// portIDs expands a port table to one bitmap id per port.
func portIDs(t []PortBitmap) []uint32 {
	ids := make([]uint32, numPorts)
	for _, r := range t {
		for p := int(r.First); p <= int(r.Last); p++ {
			ids[p] = r.Bitmap
		}
	}
	return ids
}

// CheckRuleSet says what in rs the datapath cannot take: SetRuleSet
// refuses it whole.
func CheckRuleSet(rs RuleSet) error { return checkRuleSet(rs) }

// v4IntervalsOf is the IPv4 intervals t makes (see v4Intervals).
func v4IntervalsOf(t []PrefixBitmap) []uint32 {
	firsts, _ := v4Intervals(t)
	return firsts
}

// countV6 counts t's IPv6 prefixes: its entries in the IPv6 trie.
func countV6(t []PrefixBitmap) int {
	n := 0
	for _, p := range t {
		if !p.Prefix.Addr().Is4() {
			n++
		}
	}
	return n
}

// checkRuleSet says what in rs the datapath cannot take.
func checkRuleSet(rs RuleSet) error {
	n := len(rs.Actions)
	if n > MaxRules {
		return fmt.Errorf("%d rules, at most %d", n, MaxRules)
	}
	if n == 0 {
		return nil
	}
	if rs.Words != (n+63)/64 {
		return fmt.Errorf("%d words for %d rules, want %d", rs.Words, n, (n+63)/64)
	}
	if len(rs.Bitmaps) > MaxBitmaps {
		return fmt.Errorf("%d bitmaps, at most %d", len(rs.Bitmaps), MaxBitmaps)
	}
	for i, b := range rs.Bitmaps {
		if len(b) > rs.Words {
			return fmt.Errorf("bitmap %d has %d words, want %d", i, len(b), rs.Words)
		}
		if len(b) == rs.Words && n%64 != 0 && b[len(b)-1]>>(n%64) != 0 {
			return fmt.Errorf("bitmap %d has bits past rule %d", i, n-1)
		}
	}
	id := func(what string, id uint32) error {
		if int(id) >= len(rs.Bitmaps) {
			return fmt.Errorf("%s: bitmap %d of %d", what, id, len(rs.Bitmaps))
		}
		return nil
	}
	var errs []error
	for _, t := range []struct {
		name string
		p    []PrefixBitmap
	}{{"src", rs.Src}, {"dst", rs.Dst}} {
		if n := len(v4IntervalsOf(t.p)); n > v4MaxIntervals {
			errs = append(errs, fmt.Errorf("%s: %d IPv4 address intervals, at most %d", t.name, n, v4MaxIntervals))
		}
		if n := countV6(t.p); n > v6MaxPrefixes {
			errs = append(errs, fmt.Errorf("%s: %d IPv6 prefixes, at most %d", t.name, n, v6MaxPrefixes))
		}
		has4, has6 := false, false
		seen := make(map[netip.Prefix]bool, len(t.p))
		for _, p := range t.p {
			if !p.Prefix.IsValid() {
				errs = append(errs, fmt.Errorf("%s: invalid prefix", t.name))
				continue
			}
			if m := p.Prefix.Masked(); seen[m] {
				errs = append(errs, fmt.Errorf("%s: %s twice", t.name, m))
			} else {
				seen[m] = true
			}
			errs = append(errs, id(t.name+" "+p.Prefix.String(), p.Bitmap))
			has4 = has4 || p.Prefix.Bits() == 0 && p.Prefix.Addr().Is4()
			has6 = has6 || p.Prefix.Bits() == 0 && !p.Prefix.Addr().Is4()
		}
		if !has4 || !has6 {
			errs = append(errs, fmt.Errorf("%s: no 0.0.0.0/0 or ::/0: an address would find no entry", t.name))
		}
	}
	for v, b := range rs.Proto {
		errs = append(errs, id(fmt.Sprintf("proto %d", v), b))
	}
	for v, b := range rs.DSCP {
		errs = append(errs, id(fmt.Sprintf("dscp %d", v), b))
	}
	for _, t := range []struct {
		name string
		p    []PortBitmap
	}{{"src_port", rs.SrcPort}, {"dst_port", rs.DstPort}} {
		next := 0
		for _, r := range t.p {
			if int(r.First) != next || r.Last < r.First {
				errs = append(errs, fmt.Errorf("%s: range %d-%d does not follow %d", t.name, r.First, r.Last, next-1))
				break
			}
			errs = append(errs, id(fmt.Sprintf("%s %d-%d", t.name, r.First, r.Last), r.Bitmap))
			next = int(r.Last) + 1
		}
		if next != numPorts {
			errs = append(errs, fmt.Errorf("%s: ports from %d on are not covered", t.name, next))
		}
	}
	errs = append(errs, id("no ports", rs.NoPorts), id("any lan", rs.AnyLAN))
	if len(rs.LAN) > 256 {
		errs = append(errs, fmt.Errorf("%d LAN interfaces, at most 256", len(rs.LAN)))
	}
	for ifindex, b := range rs.LAN {
		if ifindex <= 0 {
			errs = append(errs, fmt.Errorf("lan: ifindex %d", ifindex))
		}
		errs = append(errs, id(fmt.Sprintf("lan %d", ifindex), b))
	}
	ruleIDs := map[int]bool{}
	for r, a := range rs.Actions {
		if a.ID < 0 || a.ID >= MaxRules || ruleIDs[a.ID] {
			errs = append(errs, fmt.Errorf("rule %d: id %d out of range [0, %d) or another rule's", r, a.ID, MaxRules))
		}
		ruleIDs[a.ID] = true
		if a.Policy < 0 || a.Policy >= MaxPolicies {
			errs = append(errs, fmt.Errorf("rule %d: policy %d out of range [0, %d)", r, a.Policy, MaxPolicies))
		}
		if a.Sticky < 0 {
			errs = append(errs, fmt.Errorf("rule %d: negative sticky time", r))
		}
	}
	return errors.Join(errs...)
}

func ruleSetsEqual(a, b RuleSet) bool {
	if len(a.Actions) == 0 || len(b.Actions) == 0 {
		return len(a.Actions) == len(b.Actions)
	}
	prefixesEqual := func(x, y []PrefixBitmap) bool { return slices.Equal(x, y) }
	return a.Words == b.Words && a.NoPorts == b.NoPorts && a.AnyLAN == b.AnyLAN &&
		a.Proto == b.Proto && a.DSCP == b.DSCP &&
		slices.EqualFunc(a.Bitmaps, b.Bitmaps, slices.Equal) &&
		prefixesEqual(a.Src, b.Src) && prefixesEqual(a.Dst, b.Dst) &&
		slices.Equal(a.SrcPort, b.SrcPort) && slices.Equal(a.DstPort, b.DstPort) &&
		maps.Equal(a.LAN, b.LAN) && slices.Equal(a.Actions, b.Actions)
}

func cloneRuleSet(rs RuleSet) *RuleSet {
	c := rs
	c.Bitmaps = make([][]uint64, len(rs.Bitmaps))
	for i, b := range rs.Bitmaps {
		c.Bitmaps[i] = slices.Clone(b)
	}
	c.Src, c.Dst = slices.Clone(rs.Src), slices.Clone(rs.Dst)
	c.SrcPort, c.DstPort = slices.Clone(rs.SrcPort), slices.Clone(rs.DstPort)
	c.LAN = maps.Clone(rs.LAN)
	c.Actions = slices.Clone(rs.Actions)
	return &c
}
