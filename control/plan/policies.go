// SPDX-License-Identifier: Apache-2.0

package plan

import (
	"cmp"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/uplinkd/uplinkd/control/config"
)

// Tier is one tier of a policy: its members of one metric.
type Tier struct {
	Metric  int
	Members []config.PolicyMember
}

// Tiers groups a policy's members by metric, lowest first, members in
// config order within a tier.
func Tiers(p config.Policy) []Tier {
	members := slices.Clone(p.Members)
	slices.SortStableFunc(members, func(a, b config.PolicyMember) int { return cmp.Compare(a.Metric, b.Metric) })
	var tiers []Tier
	for _, m := range members {
		if n := len(tiers); n > 0 && tiers[n-1].Metric == m.Metric {
			tiers[n-1].Members = append(tiers[n-1].Members, m)
			continue
		}
		tiers = append(tiers, Tier{Metric: m.Metric, Members: []config.PolicyMember{m}})
	}
	return tiers
}

// ActiveTier is the index of the first tier of p with a usable line and
// those lines, the lines that get p's new flows; -1 and none when no line
// of p is usable (its last resort).
func ActiveTier(p config.Policy, lines []Line) (int, []string) {
	usable := map[string]bool{}
	for _, l := range lines {
		usable[l.Name] = l.Usable()
	}
	for i, t := range Tiers(p) {
		var in []string
		for _, m := range t.Members {
			if usable[m.Line] {
				in = append(in, m.Line)
			}
		}
		if len(in) > 0 {
			return i, in
		}
	}
	return -1, nil
}

// RenderPolicies prints c's policies and rules as the datapath gets them:
// each policy's tiers and the one in use with lines as they are, and the
// rules in the order they are tried.
func RenderPolicies(w io.Writer, c *config.Config, lines []Line) {
	if len(c.Rules) == 0 {
		fmt.Fprintln(w, "\n# no rules: every new flow takes the balanced policy (every usable line, by weight)")
		return
	}
	fmt.Fprintln(w, "\n# policies, by id in the datapath: a new flow takes a line of its policy's first tier with a usable line")
	for _, p := range c.PolicyList() {
		var tiers []string
		for _, t := range Tiers(p) {
			var ms []string
			for _, m := range t.Members {
				ms = append(ms, fmt.Sprintf("%s weight %d", m.Line, m.Weight))
			}
			tiers = append(tiers, fmt.Sprintf("metric %d: %s", t.Metric, strings.Join(ms, ", ")))
		}
		now := "none usable: last resort"
		if i, _ := ActiveTier(p, lines); i >= 0 {
			now = fmt.Sprintf("tier %d", i+1)
		}
		fmt.Fprintf(w, "# policy %d %s: %s; last_resort %s (now: %s)\n", p.ID, p.Name, strings.Join(tiers, " | "), p.LastResort, now)
	}
	fmt.Fprintln(w, "\n# rules, in the datapath's classifier: the first that matches a new flow decides (pinned flows never move)")
	for i, r := range c.Rules {
		fmt.Fprintf(w, "# rule %d %s: %s -> policy %s%s\n", i+1, r.Name, RuleMatch(r), r.Policy, stickyText(r))
	}
}

// RuleMatch is what a rule matches, as the config writes it ("any" for a
// rule without fields).
func RuleMatch(r config.Rule) string {
	var parts []string
	add := func(key string, vs []string) {
		if len(vs) > 0 {
			parts = append(parts, key+" "+strings.Join(vs, ","))
		}
	}
	set := func(key, name string, vs []string) {
		if name != "" {
			vs = []string{"@" + name}
		}
		add(key, vs)
	}
	set("src", r.SrcSet, r.Text.Src)
	set("dst", r.DstSet, r.Text.Dst)
	add("proto", r.Text.Proto)
	add("src_port", r.Text.SrcPort)
	add("dst_port", r.Text.DstPort)
	add("dscp", r.Text.DSCP)
	add("lan", r.Text.LAN)
	if len(parts) == 0 {
		return "any"
	}
	return strings.Join(parts, " ")
}

func stickyText(r config.Rule) string {
	switch {
	case r.Sticky <= 0:
		return ""
	case r.StickyPerRule:
		return fmt.Sprintf(", sticky %s per client and rule", r.Sticky)
	}
	return fmt.Sprintf(", sticky %s per client and policy", r.Sticky)
}
