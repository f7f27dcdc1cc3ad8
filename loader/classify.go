// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"errors"
	"fmt"
	"maps"
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
	if len(rs.Actions) > 0 {
		if err := d.writeRuleGen(gen, rs); err != nil {
			return fmt.Errorf("setting rules: %w", err)
		}
	}
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

// writeRuleGen writes rs into generation gen of the classifier's tables;
// the datapath does not read that generation meanwhile.
func (d *Datapath) writeRuleGen(gen uint32, rs RuleSet) error {
	// The counters first: the generation's rules count from zero.
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	keys := make([]uint32, MaxRules)
	for r := range keys {
		keys[r] = gen*MaxRules + uint32(r)
	}
	if err := d.w.batchUpdate(d.objs.UlRuleHits, keys, make([]uint64, MaxRules*cpus)); err != nil {
		return fmt.Errorf("zeroing rule counters: %w", err)
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
		return fmt.Errorf("writing rule bitmaps: %w", err)
	}

	for _, t := range []struct {
		m    *ebpf.Map
		name string
		p    []PrefixBitmap
	}{{d.objs.UlRuleSrc, "source", rs.Src}, {d.objs.UlRuleDst, "destination", rs.Dst}} {
		want := make(map[uplinkdRulePrefix]uint32, len(t.p))
		for _, p := range t.p {
			want[rulePrefixKey(gen, p.Prefix)] = p.Bitmap
		}
		if err := syncGen(&d.w, t.m, want, func(k uplinkdRulePrefix) bool { return uint32(k.Gen) == gen }); err != nil {
			return fmt.Errorf("writing %s prefixes: %w", t.name, err)
		}
	}

	arrays := []struct {
		m    *ebpf.Map
		name string
		ids  []uint32
	}{
		{d.objs.UlRuleProto, "protocols", rs.Proto[:]},
		{d.objs.UlRuleDscp, "DSCPs", rs.DSCP[:]},
		{d.objs.UlRuleSport, "source ports", portIDs(rs.SrcPort)},
		{d.objs.UlRuleDport, "destination ports", portIDs(rs.DstPort)},
	}
	for _, a := range arrays {
		keys = keys[:0]
		for v := range a.ids {
			keys = append(keys, gen*uint32(len(a.ids))+uint32(v))
		}
		if err := d.w.batchUpdate(a.m, keys, a.ids); err != nil {
			return fmt.Errorf("writing %s: %w", a.name, err)
		}
	}

	lans := make(map[uplinkdRuleLanKey]uint32, len(rs.LAN))
	for ifindex, id := range rs.LAN {
		lans[uplinkdRuleLanKey{Gen: gen, Ifindex: uint32(ifindex)}] = id
	}
	if err := syncGen(&d.w, d.objs.UlRuleLan, lans, func(k uplinkdRuleLanKey) bool { return k.Gen == gen }); err != nil {
		return fmt.Errorf("writing LAN interfaces: %w", err)
	}

	actions := make([]uplinkdRuleAction, len(rs.Actions))
	keys = keys[:0]
	for r, a := range rs.Actions {
		actions[r] = uplinkdRuleAction{Policy: uint32(a.Policy), StickyNs: uint64(a.Sticky.Nanoseconds())}
		if a.StickyPerRule {
			actions[r].Flags |= ruleStickyPerRule
		}
		keys = append(keys, gen*MaxRules+uint32(r))
	}
	if err := d.w.batchUpdate(d.objs.UlRuleActions, keys, actions); err != nil {
		return fmt.Errorf("writing rule actions: %w", err)
	}
	return nil
}

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
	for r, a := range rs.Actions {
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
