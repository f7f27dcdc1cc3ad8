// SPDX-License-Identifier: Apache-2.0

package datapath

import (
	"fmt"
	"math"

	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/plan"
	"github.com/uplinkd/uplinkd/control/policy"
	"github.com/uplinkd/uplinkd/loader"
)

// noInterface is an interface index no interface has: a rule that can
// match nothing (its LAN interface is gone, its prefix set is empty) is
// compiled with it, so that it keeps its place and its number.
const noInterface = math.MaxInt32

// CompileRules turns cfg's rules into the datapath's classifier tables:
// policies by id (config.PolicyList), LAN interfaces by index (ifindex:
// one that fails, an interface that is gone, gives noInterface), prefix
// sets as they were last read (an empty set matches nothing). The result
// passes loader.CheckRuleSet, or this returns its error.
func CompileRules(cfg *config.Config, ifindex func(string) (int, error)) (loader.RuleSet, error) {
	if len(cfg.Rules) == 0 {
		return loader.RuleSet{}, nil
	}
	ids := map[string]int{}
	for _, p := range cfg.PolicyList() {
		ids[p.Name] = p.ID
	}
	rules := make([]policy.Rule, len(cfg.Rules))
	for i, r := range cfg.Rules {
		id, ok := ids[r.Policy]
		if !ok {
			return loader.RuleSet{}, fmt.Errorf("compiling rules: rules[%d] (%s): no policy %q", i, r.Name, r.Policy)
		}
		pr := policy.Rule{
			Src: r.Src, Dst: r.Dst, Protos: r.Protos, DSCPs: r.DSCPs,
			Policy: id, Sticky: r.Sticky, StickyPerRule: r.StickyPerRule,
		}
		for _, p := range r.SrcPorts {
			pr.SrcPorts = append(pr.SrcPorts, policy.PortRange(p))
		}
		for _, p := range r.DstPorts {
			pr.DstPorts = append(pr.DstPorts, policy.PortRange(p))
		}
		for _, ifname := range r.LANs {
			index, err := ifindex(ifname)
			if err != nil || index <= 0 {
				index = noInterface
			}
			pr.LANs = append(pr.LANs, index)
		}
		if emptySet(cfg, r.SrcSet) || emptySet(cfg, r.DstSet) {
			pr.LANs = []int{noInterface}
		}
		rules[i] = pr
	}
	rs, err := policy.Compile(rules)
	if err != nil {
		return loader.RuleSet{}, err
	}
	for i, r := range cfg.Rules {
		rs.Actions[i].ID = r.ID
	}
	if err := loader.CheckRuleSet(rs); err != nil {
		return loader.RuleSet{}, fmt.Errorf("compiling rules: %w", err)
	}
	return rs, nil
}

// emptySet reports whether name is a prefix set without prefixes.
func emptySet(cfg *config.Config, name string) bool {
	for _, s := range cfg.PrefixSets {
		if s.Name == name {
			return len(s.Prefixes) == 0
		}
	}
	return false
}

// PolicyTables computes every policy's table by id: its last resort, and
// the bucket table of its first tier with a usable line, by its members'
// weights, keeping the buckets of prev (the tables in force, by id) that
// it can. The balanced policy (id 0) takes the lines' effective weights
// (weights, live: by line index). Ids no policy of cfg has are unset
// (nil buckets).
func PolicyTables(cfg *config.Config, lines []plan.Line, weights []int, live []bool, prev []loader.PolicyTable) []loader.PolicyTable {
	index := map[string]int{}
	usable := make([]bool, loader.MaxLines)
	for _, l := range lines {
		index[l.Name] = l.Index
		usable[l.Index] = l.Usable()
	}
	before := func(id int) []int {
		if id < len(prev) {
			return prev[id].Buckets
		}
		return nil
	}
	tables := make([]loader.PolicyTable, loader.MaxPolicies)
	for _, p := range cfg.PolicyList() {
		if p.ID == 0 {
			tables[0].Buckets = loader.Buckets(before(0), weights, live)
			continue
		}
		var members []policy.Member
		for _, m := range p.Members {
			if i, ok := index[m.Line]; ok {
				members = append(members, policy.Member{Line: i, Metric: m.Metric, Weight: m.Weight})
			}
		}
		tables[p.ID] = loader.PolicyTable{LastResort: lastResort(p.LastResort), Buckets: policy.Buckets(before(p.ID), members, usable)}
	}
	return tables
}

// lastResort is a config's last resort as the datapath numbers it.
func lastResort(kind string) int {
	switch kind {
	case config.LastResortUnreachable:
		return loader.LastResortUnreachable
	case config.LastResortBlackhole:
		return loader.LastResortBlackhole
	}
	return loader.LastResortDefault
}
