// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/cilium/ebpf"
)

// Stats reads what the datapath counts: the flow map, the per-line
// counters and the per-reason counters. A Datapath has one over the maps
// its programs use; OpenStats opens one over the pinned maps alone, for
// readers that load no program (`uplinkd flows`, metrics), with or
// without a running agent.
type Stats struct {
	flows, lineStats, reasons *ebpf.Map
	// The rule and policy counters and the rule config; nil when opened
	// over the pins of an uplinkd that had none.
	ruleCfg, ruleHits, policyFlows, policyStats *ebpf.Map
	reasonNames                                 []string // by code
	owned                                       bool     // opened by OpenStats: Close closes the maps
}

// ErrNoDatapath says the pin dir holds no datapath maps (no agent has run
// with it, or `down` removed them).
var ErrNoDatapath = errors.New("no datapath pinned there")

// OpenStats opens the maps pinned in pinDir read-only.
func OpenStats(pinDir string) (*Stats, error) {
	spec, err := loadUplinkd()
	if err != nil {
		return nil, err
	}
	names, err := reasonNames(spec.Types)
	if err != nil {
		return nil, err
	}
	s := &Stats{reasonNames: names, owned: true}
	ro := &ebpf.LoadPinOptions{ReadOnly: true}
	for _, m := range []struct {
		name     string
		to       **ebpf.Map
		optional bool // an earlier uplinkd's pins lack it
	}{
		{"ul_flows", &s.flows, false}, {"ul_line_stats", &s.lineStats, false}, {"ul_reasons", &s.reasons, false},
		{"ul_rule_cfg", &s.ruleCfg, true}, {"ul_rule_hits", &s.ruleHits, true}, {"ul_policy_flows", &s.policyFlows, true},
		{"ul_policy_stats", &s.policyStats, true},
	} {
		*m.to, err = ebpf.LoadPinnedMap(filepath.Join(pinDir, m.name), ro)
		if errors.Is(err, os.ErrNotExist) && m.optional {
			continue
		}
		if errors.Is(err, os.ErrNotExist) {
			s.Close()
			return nil, fmt.Errorf("%s: %w", pinDir, ErrNoDatapath)
		}
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("opening pinned map %s: %w", m.name, err)
		}
		want := spec.Maps[m.name]
		if got := *m.to; got.KeySize() != want.KeySize || got.ValueSize() != want.ValueSize || got.Type() != want.Type {
			s.Close()
			return nil, fmt.Errorf("pinned map %s in %s has another layout than this uplinkd's (another version's?)", m.name, pinDir)
		}
	}
	return s, nil
}

// Close closes the maps OpenStats opened (a Datapath's close with it).
func (s *Stats) Close() {
	if !s.owned {
		return
	}
	for _, m := range []*ebpf.Map{s.flows, s.lineStats, s.reasons, s.ruleCfg, s.ruleHits, s.policyFlows, s.policyStats} {
		if m != nil {
			m.Close()
		}
	}
}

// SeedFlows writes n flows, flow(i) for each i, into the flow map as if
// the datapath had pinned them: for benchmarks and tests of the readers
// (a million-flow map is built in seconds, not by a million packets).
func (d *Datapath) SeedFlows(n int, flow func(i int) Flow) error {
	boot, err := bootTime()
	if err != nil {
		return err
	}
	const batch = 1 << 14
	keys := make([]uplinkdFlowKey, batch)
	vals := make([]uplinkdFlow, batch)
	for start := 0; start < n; start += batch {
		m := min(batch, n-start)
		for i := range m {
			f := flow(start + i)
			family := uint8(unix.AF_INET6)
			if f.Src.Addr().Is4() {
				family = unix.AF_INET
			}
			keys[i] = uplinkdFlowKey{Family: family, Proto: f.Proto, Saddr: f.Src.Addr().As16(), Daddr: f.Dst.Addr().As16(), Sport: f.Src.Port(), Dport: f.Dst.Port()}
			v := uplinkdFlow{
				Line: uint32(f.Line), TxPackets: f.TxPackets, TxBytes: f.TxBytes, RxPackets: f.RxPackets, RxBytes: f.RxBytes,
				FirstSeen: uint64(f.FirstSeen.Sub(boot)), LastSeen: uint64(f.LastSeen.Sub(boot)),
			}
			if f.NATAddr.IsValid() {
				v.NatAddr = f.NATAddr.As16()
			}
			if f.Recovered {
				v.Flags |= flowRecovered
			}
			v.Flags |= flowFlags(f.Rule, f.Policy)
			if f.Rule >= 0 || f.Policy > 0 {
				v.Flags |= flowClassified
			}
			vals[i] = v
		}
		if err := d.w.batchUpdate(d.objs.UlFlows, keys[:m], vals[:m]); err != nil {
			return fmt.Errorf("seeding flows: %w", err)
		}
	}
	return nil
}

// RuleHits returns how many flows each rule of the rule set in force
// decided (a new flow, a flow recovered from conntrack, or each packet a
// last resort of unreachable or blackhole marked), indexed by rule and
// summed over the CPUs; they count from zero when a rule set is
// installed. Empty when no rule set is in force.
func (s *Stats) RuleHits() ([]uint64, error) {
	if s.ruleCfg == nil || s.ruleHits == nil {
		return nil, nil
	}
	var cfg uplinkdRuleCfg
	if err := s.ruleCfg.Lookup(uint32(0), &cfg); err != nil {
		return nil, fmt.Errorf("reading rule config: %w", err)
	}
	gen := cfg.Gen % ruleGens
	n := int(cfg.Nrules[gen])
	if cfg.Words[gen] == 0 || n == 0 {
		return nil, nil
	}
	// A batch reads from the first key on: up to the generation's last
	// rule.
	counts, err := perCPUSums(s.ruleHits, int(gen)*MaxRules+n)
	if err != nil {
		return nil, fmt.Errorf("reading rule hits: %w", err)
	}
	return counts[int(gen)*MaxRules:], nil
}

// PolicyFlows returns how many flows were pinned for each policy, indexed
// by policy id, summed over the CPUs. They are counted only while a rule
// set is in force: without one every flow is policy 0's, and the
// new_flow and recovered_ct reasons count them.
func (s *Stats) PolicyFlows() ([]uint64, error) {
	if s.policyFlows == nil {
		return make([]uint64, MaxPolicies), nil
	}
	counts, err := perCPUSums(s.policyFlows, MaxPolicies)
	if err != nil {
		return nil, fmt.Errorf("reading policy flows: %w", err)
	}
	return counts, nil
}

// perCPUSums reads the first n entries of a per-CPU array of counters in
// one batch and sums each over the CPUs.
func perCPUSums(m *ebpf.Map, n int) ([]uint64, error) {
	return perCPUFold(m, n, func(sum *uint64, c uint64) { *sum += c })
}

// perCPUFold reads the first n entries of a per-CPU array in one batch and
// folds each entry's values over the CPUs with add.
func perCPUFold[T any](m *ebpf.Map, n int, add func(sum *T, c T)) ([]T, error) {
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, err
	}
	keys := make([]uint32, n)
	perCPU := make([]T, n*cpus) // key i's at [i*cpus, (i+1)*cpus)
	var cursor ebpf.MapBatchCursor
	got, err := m.BatchLookup(&cursor, keys, perCPU, nil)
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil, err
	}
	if got != n {
		return nil, fmt.Errorf("%d of %d entries", got, n)
	}
	folded := make([]T, n)
	for i, k := range keys {
		for _, c := range perCPU[i*cpus : (i+1)*cpus] {
			add(&folded[k], c)
		}
	}
	return folded, nil
}
