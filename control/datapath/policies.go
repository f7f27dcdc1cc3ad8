// SPDX-License-Identifier: Apache-2.0

package datapath

import (
	"fmt"

	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/plan"
	"github.com/uplinkd/uplinkd/control/policy"
	"github.com/uplinkd/uplinkd/loader"
)

// CompileRules turns cfg's rules into the datapath's classifier tables:
// policies by id (config.PolicyList), LAN interfaces by index (ifindex),
// prefix sets as they were last read.
func CompileRules(cfg *config.Config, ifindex func(string) (int, error)) (loader.RuleSet, error) {
	if len(cfg.Rules) == 0 {
		return loader.RuleSet{}, nil
	}
	ids := map[string]int{}
	for id, p := range cfg.PolicyList() {
		ids[p.Name] = id
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
			if err != nil {
				return loader.RuleSet{}, fmt.Errorf("compiling rules: rules[%d] (%s): lan %s: %w", i, r.Name, ifname, err)
			}
			pr.LANs = append(pr.LANs, index)
		}
		rules[i] = pr
	}
	return policy.Compile(rules)
}

// PolicyBuckets computes the bucket table of every policy of cfg but the
// balanced one (id 0, the datapath's own bucket table, which follows the
// lines' effective weights): its first tier with a usable line, by its
// members' weights, keeping the buckets of prev (the tables in force,
// by id) that it can. The result is indexed by policy id; entry 0 is nil.
func PolicyBuckets(cfg *config.Config, lines []plan.Line, prev [][]int) [][]int {
	index := map[string]int{}
	usable := make([]bool, loader.MaxLines)
	for _, l := range lines {
		index[l.Name] = l.Index
		usable[l.Index] = l.Usable()
	}
	list := cfg.PolicyList()
	tables := make([][]int, len(list))
	for id, p := range list[1:] {
		id++
		var members []policy.Member
		for _, m := range p.Members {
			if i, ok := index[m.Line]; ok {
				members = append(members, policy.Member{Line: i, Metric: m.Metric, Weight: m.Weight})
			}
		}
		var before []int
		if id < len(prev) {
			before = prev[id]
		}
		tables[id] = policy.Buckets(before, members, usable)
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
