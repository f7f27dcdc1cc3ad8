// SPDX-License-Identifier: Apache-2.0

package config

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/uplinkd/uplinkd/loader"
)

// Limits of policies and rules: the datapath's.
const (
	// MaxRules bounds rules.
	MaxRules = loader.MaxRules
	// MaxPolicies bounds PolicyList: balanced, the configured policies
	// and one per line: shorthand, together.
	MaxPolicies = loader.MaxPolicies
	// MaxSticky bounds a rule's sticky time.
	MaxSticky = 24 * time.Hour
)

// Last resorts of a policy none of whose lines is usable.
const (
	LastResortDefault     = "default"     // the balanced policy's lines
	LastResortUnreachable = "unreachable" // no line: the client gets ICMP unreachable
	LastResortBlackhole   = "blackhole"   // no line: packets are dropped silently
)

// BalancedPolicy is the built-in policy, id 0: every line by its weight.
// Flows that no rule matches take it; a rule may name it too.
const BalancedPolicy = "balanced"

// LinePolicyPrefix starts the name of the implicit policy of a rule's
// `line: NAME` shorthand: "line:NAME".
const LinePolicyPrefix = "line:"

// PrefixSet is a named list of prefixes kept in a file of its own, which
// the agent follows as it changes (a provider's ranges, say).
type PrefixSet struct {
	Name string `yaml:"name"`
	// File is the set's file. Load makes a relative path relative to the
	// directory of the config file, so that File opens from anywhere.
	File string `yaml:"file"`
	// Prefixes is the file's content, read by Load; ReadPrefixSet(File)
	// reads it again.
	Prefixes []netip.Prefix `yaml:"-"`
}

// Policy is a named set of lines in tiers: a new flow takes a line of the
// tier with the lowest metric that has a usable line, by weight; the next
// tier only while every line of those above is down.
type Policy struct {
	// ID is the policy's number in the datapath (PolicyList fills it).
	ID      int            `yaml:"-"`
	Name    string         `yaml:"name"`
	Members []PolicyMember `yaml:"members"`
	// LastResort is what a flow gets when no member is usable: one of
	// LastResortDefault (Load's default), LastResortUnreachable,
	// LastResortBlackhole.
	LastResort string `yaml:"last_resort"`
}

// PolicyMember is a line in a policy.
type PolicyMember struct {
	Line   string `yaml:"line"`
	Metric int    `yaml:"metric"` // the tier: lower first
	Weight int    `yaml:"weight"` // share within the tier; Load fills in the line's weight where the file has none
}

// PortRange is the ports First..Last.
type PortRange struct{ First, Last uint16 }

// Rule says which new flows take which policy. Rules are tried in order
// and the first that matches decides; a field left empty matches any
// value, and a flow matches when it matches every field.
type Rule struct {
	// Name defaults to "rule-N", N the rule's 1-based position.
	Name string `yaml:"name"`
	// ID is the rule's number in the datapath, which flows record: its
	// place in the file unless RenumberRules keeps an earlier one.
	ID int `yaml:"-"`
	// Text is what the file writes for the fields Load parses below.
	Text RuleText `yaml:",inline"`

	// Src and Dst: after Load, a set's prefixes (shared with its
	// PrefixSet) when SrcSet or DstSet names one, kept for display and
	// for re-reading the set.
	Src, Dst []netip.Prefix `yaml:"-"`
	SrcSet   string         `yaml:"src_set"`
	DstSet   string         `yaml:"dst_set"`
	Protos   []uint8        `yaml:"-"`
	SrcPorts []PortRange    `yaml:"-"` // only TCP and UDP packets have ports
	DstPorts []PortRange    `yaml:"-"`
	DSCPs    []uint8        `yaml:"-"`
	LANs     []string       `yaml:"-"` // LAN interfaces the flow comes in on
	// Policy names a policy of PolicyList: after Load, the line:
	// shorthand is the policy "line:NAME".
	Policy string `yaml:"policy"`
	// Sticky, when positive, gives a client's new flows the line its last
	// one got within this time, while that line serves the policy.
	Sticky time.Duration `yaml:"sticky"`
	// StickyPerRule keys stickiness by (client, rule) instead of
	// (client, policy).
	StickyPerRule bool `yaml:"sticky_per_rule"`
}

// RuleText holds a rule's fields as written: each a scalar or a list.
type RuleText struct {
	Src     List   `yaml:"src"`
	Dst     List   `yaml:"dst"`
	Proto   List   `yaml:"proto"`
	SrcPort List   `yaml:"src_port"`
	DstPort List   `yaml:"dst_port"`
	DSCP    List   `yaml:"dscp"`
	LAN     List   `yaml:"lan"`
	Line    string `yaml:"line"` // shorthand for a one-line policy, whose last resort is the default
}

// PolicyList is every policy: balanced (every line, metric 0, its
// weight), then the configured policies in file order, then one per
// distinct line: shorthand, in the order rules first name them. Each has
// its ID: balanced 0, the others their numbers of RenumberPolicies, or
// their places in this list where it was not called.
func (c *Config) PolicyList() []Policy {
	list := c.policyList()
	for i := range list {
		list[i].ID = i
		if id, ok := c.policyIDs[list[i].Name]; ok {
			list[i].ID = id
		}
	}
	return list
}

// IDs are numbers in the datapath by name: policies' (balanced is 0) or
// rules'.
type IDs map[string]int

// RenumberPolicies numbers the policies so that each keeps the id prev
// gives its name (a running agent's numbers, kept in its state dir): a
// flow records its policy's id, and a reload or restart that reorders,
// adds or removes policies must not hand that id to another policy. It
// returns the numbers to keep (see renumber).
func (c *Config) RenumberPolicies(prev IDs) IDs {
	list := c.policyList()
	names := make([]string, len(list))
	for i, p := range list {
		names[i] = p.Name
	}
	ids, keep := renumber(names, prev, MaxPolicies)
	c.policyIDs = ids
	return keep
}

// RenumberRules numbers the rules as RenumberPolicies does the policies:
// a flow records its rule's id, which a reload that moves the rule keeps.
func (c *Config) RenumberRules(prev IDs) IDs {
	names := make([]string, len(c.Rules))
	for i, r := range c.Rules {
		names[i] = r.Name
	}
	ids, keep := renumber(names, prev, MaxRules)
	for i := range c.Rules {
		c.Rules[i].ID = ids[c.Rules[i].Name]
	}
	return keep
}

// renumber gives names[0] the id 0 if it is the balanced policy (which
// always is), then each name the id prev gives it; a new name takes the
// lowest id that prev gives no name, else the lowest that no name holds.
// keep is ids plus prev's other names whose ids are still free, so that
// an id a reload freed goes to a new name last.
func renumber(names []string, prev IDs, limit int) (ids, keep IDs) {
	ids, used := IDs{}, map[int]bool{}
	first := 0
	if len(names) > 0 && names[0] == BalancedPolicy {
		ids[BalancedPolicy], used[0], first = 0, true, 1
	}
	for _, name := range names[first:] {
		if id, ok := prev[name]; ok && id >= first && id < limit && !used[id] {
			ids[name], used[id] = id, true
		}
	}
	retired := map[int]bool{}
	for name, id := range prev {
		if _, ok := ids[name]; !ok {
			retired[id] = true
		}
	}
	for _, name := range names[first:] {
		if _, ok := ids[name]; ok {
			continue
		}
		id := first
		for id < limit && (used[id] || retired[id]) {
			id++
		}
		if id == limit { // every free id was a retired name's
			for id = first; used[id]; id++ {
			}
		}
		ids[name], used[id] = id, true
	}
	keep = maps.Clone(ids)
	for name, id := range prev {
		if _, ok := keep[name]; !ok && id >= first && id < limit && !used[id] {
			keep[name], used[id] = id, true
		}
	}
	return ids, keep
}

func (c *Config) policyList() []Policy {
	weight := map[string]int{}
	balanced := Policy{Name: BalancedPolicy, LastResort: LastResortDefault}
	for _, u := range c.Lines {
		weight[u.Name] = u.Weight
		balanced.Members = append(balanced.Members, PolicyMember{Line: u.Name, Weight: u.Weight})
	}
	list := append([]Policy{balanced}, c.Policies...)
	seen := map[string]bool{}
	for _, r := range c.Rules {
		line, ok := strings.CutPrefix(r.Policy, LinePolicyPrefix)
		if !ok || seen[r.Policy] {
			continue
		}
		seen[r.Policy] = true
		list = append(list, Policy{
			Name:       r.Policy,
			Members:    []PolicyMember{{Line: line, Weight: weight[line]}},
			LastResort: LastResortDefault,
		})
	}
	return list
}

// LastResortMarks are the fwmarks of the unreachable and blackhole last
// resorts: the highest and second highest values of routing.mark_mask
// that no line's mark takes; 0 where the mask has no such value.
func (c *Config) LastResortMarks() (unreachable, blackhole uint32) {
	used := map[uint32]bool{}
	for _, u := range c.Lines {
		used[u.Mark] = true
	}
	var free []uint32
	mask := c.Routing.MarkMask
	for v := mask; v != 0 && len(free) < 2; v = (v - 1) & mask {
		if !used[v] {
			free = append(free, v)
		}
	}
	free = append(free, 0, 0)
	return free[0], free[1]
}

// LastResortRule is the rule priority and table of a last resort
// (LastResortUnreachable or LastResortBlackhole): past every line's, so
// that no line's number can take them (the fwmark rule of the resort's mark
// sends the flow to the table, whose default route is unreachable or
// blackhole).
func (r Routing) LastResortRule(kind string) (priority, table int) {
	n := MaxLines + 1
	if kind == LastResortBlackhole {
		n++
	}
	return r.FwmarkPriority + n, r.TableBase + n
}

// setNameRE is the form of policy, rule and prefix set names.
var setNameRE = regexp.MustCompile(`^[a-z0-9_-]{1,32}$`)

// checkPolicies reads the prefix sets, fills the defaults of policies
// and rules and checks them; lanIf are the LAN interfaces. Shadowed rules
// are warnings, in c.Warnings.
func (c *Config) checkPolicies(lanIf map[string]bool) []error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, c.Errorf(field, format, args...))
	}
	// name checks a name's form and that seen has no other of its kind;
	// a malformed name is kept too, so that what names it is not wrong.
	name := func(field, v string, seen map[string]string) {
		switch {
		case seen[v] != "":
			bad(field, "%q is also the name of %s", v, seen[v])
			return
		case !setNameRE.MatchString(v):
			bad(field, "want 1 to 32 characters of [a-z0-9_-], got %q", v)
		}
		seen[v] = parent(field)
	}
	weight := map[string]int{}
	for _, u := range c.Lines {
		weight[u.Name] = u.Weight
	}
	lines := slices.Sorted(maps.Keys(weight))

	// Prefix sets, read from their files.
	if n := len(c.PrefixSets); n > MaxPrefixSets {
		bad("prefix_sets", "at most %d sets, got %d", MaxPrefixSets, n)
	}
	setNames, total := map[string]string{}, 0
	for i := range c.PrefixSets {
		s := &c.PrefixSets[i]
		f := fmt.Sprintf("prefix_sets[%d]", i)
		name(f+".name", s.Name, setNames)
		if s.File == "" {
			bad(f+".file", "missing: the file of the set's prefixes, one a line")
			continue
		}
		if !filepath.IsAbs(s.File) {
			s.File = filepath.Join(filepath.Dir(c.file), s.File)
		}
		if c.skipSets {
			continue
		}
		p, err := ReadPrefixSet(s.File)
		for _, e := range unjoin(err) {
			bad(f+".file", "%v", e)
		}
		if err == nil && len(p) == 0 {
			c.Warnings = append(c.Warnings, c.Errorf(f+".file", "%s has no prefixes: the rules on set %s match nothing", s.File, s.Name).Error())
		}
		s.Prefixes, total = p, total+len(p)
	}
	if total > MaxPrefixes {
		bad("prefix_sets", "%d prefixes in all sets, at most %d", total, MaxPrefixes)
	}
	sets := map[string][]netip.Prefix{}
	for _, s := range c.PrefixSets {
		if setNames[s.Name] != "" {
			sets[s.Name] = s.Prefixes
		}
	}

	// Policies.
	if n := 1 + len(c.Policies); n > MaxPolicies {
		bad("policies", "at most %d policies with balanced, got %d", MaxPolicies, n)
	}
	policyNames := map[string]string{}
	for i := range c.Policies {
		p := &c.Policies[i]
		f := fmt.Sprintf("policies[%d]", i)
		if p.Name == BalancedPolicy {
			bad(f+".name", "balanced is the built-in policy (every line by its weight): name yours otherwise")
		} else {
			name(f+".name", p.Name, policyNames)
		}
		if len(p.Members) == 0 {
			bad(f+".members", "at least one member is needed: {line: NAME, metric: TIER, weight: N}")
		}
		in := map[string]string{}
		for j := range p.Members {
			m := &p.Members[j]
			mf := fmt.Sprintf("%s.members[%d]", f, j)
			w, known := weight[m.Line]
			switch {
			case m.Line == "":
				bad(mf+".line", "missing: the line's name")
			case !known:
				bad(mf+".line", "unknown line %q (uplinks: %s)", m.Line, strings.Join(lines, ", "))
			case in[m.Line] != "":
				bad(mf+".line", "%s is also %s: a line is in a policy once", m.Line, in[m.Line])
			default:
				in[m.Line] = mf
			}
			if m.Metric < 0 {
				bad(mf+".metric", "want 0 or more (lower tiers first), got %d", m.Metric)
			}
			if _, set := c.pos[mf+".weight"]; !set && m.Weight == 0 {
				m.Weight = w
			} else if m.Weight < 1 || m.Weight > 255 {
				bad(mf+".weight", "want 1..255, got %d", m.Weight)
			}
		}
		switch p.LastResort {
		case "":
			p.LastResort = LastResortDefault
		case LastResortDefault:
		case LastResortUnreachable, LastResortBlackhole:
			if u, b := c.LastResortMarks(); u == 0 || b == 0 {
				bad(f+".last_resort", "%s needs two values of routing.mark_mask %#x that no line's mark takes", p.LastResort, c.Routing.MarkMask)
			}
			prio, table := c.Routing.LastResortRule(p.LastResort)
			switch {
			case prio >= c.Routing.MultipathPriority || (prio > c.Routing.SourcePriority && prio <= c.Routing.SourcePriority+MaxLines):
				bad(f+".last_resort", "%s needs rule priority %d (routing.fwmark_priority + %d), which is past the multipath rule or among the source rules", p.LastResort, prio, prio-c.Routing.FwmarkPriority)
			case !ValidTable(table) || table == c.Routing.MultipathTable || slices.ContainsFunc(c.Lines, func(u Line) bool { return u.Table == table }):
				bad(f+".last_resort", "%s needs table %d (routing.table_base + %d), which is reserved or another table of the config", p.LastResort, table, table-c.Routing.TableBase)
			}
		default:
			bad(f+".last_resort", "want default, unreachable or blackhole, got %q", p.LastResort)
		}
	}
	policies := append([]string{BalancedPolicy}, slices.Sorted(maps.Keys(policyNames))...)

	// Rules.
	if n := len(c.Rules); n > MaxRules {
		bad("rules", "at most %d rules, got %d", MaxRules, n)
	}
	ruleNames, implicit := map[string]string{}, map[string]bool{}
	count := 1 + len(c.Policies)
	for i := range c.Rules {
		r := &c.Rules[i]
		f := fmt.Sprintf("rules[%d]", i)
		r.ID = i
		if _, set := c.pos[f+".name"]; !set && r.Name == "" {
			r.Name = fmt.Sprintf("rule-%d", i+1)
		}
		name(f+".name", r.Name, ruleNames)

		addrs := func(key string, text List, set string) []netip.Prefix {
			if set == "" {
				return parseList(c, bad, f+"."+key, text, parsePrefix)
			}
			if text != nil {
				bad(f+"."+key+"_set", "%s and %s_set both: a rule takes one of them", key, key)
			} else if p, ok := sets[set]; !ok {
				bad(f+"."+key+"_set", "unknown prefix set %q (prefix_sets: %s)", set, cmp.Or(strings.Join(slices.Sorted(maps.Keys(sets)), ", "), "none"))
			} else {
				return p
			}
			return nil
		}
		r.Src = addrs("src", r.Text.Src, r.SrcSet)
		r.Dst = addrs("dst", r.Text.Dst, r.DstSet)
		r.Protos = parseList(c, bad, f+".proto", r.Text.Proto, parseProto)
		r.SrcPorts = parseList(c, bad, f+".src_port", r.Text.SrcPort, parsePorts)
		r.DstPorts = parseList(c, bad, f+".dst_port", r.Text.DstPort, parsePorts)
		r.DSCPs = parseList(c, bad, f+".dscp", r.Text.DSCP, parseDSCP)
		r.LANs = parseList(c, bad, f+".lan", r.Text.LAN, func(s string) (string, string) {
			if !lanIf[s] {
				return "", fmt.Sprintf("unknown lan interface %q (lan.interfaces: %s)", s, strings.Join(c.LAN.Interfaces, ", "))
			}
			return s, ""
		})
		if len(r.SrcPorts)+len(r.DstPorts) > 0 && len(r.Protos) == len(r.Text.Proto) && !portProtos(r.Protos) {
			pf := f + ".src_port"
			if len(r.SrcPorts) == 0 {
				pf = f + ".dst_port"
			}
			bad(pf, "ports need proto tcp, udp or both (only their packets have ports), got proto %s", protoText(r.Protos))
		}

		switch line := r.Text.Line; {
		case r.Policy != "" && line != "":
			bad(f+".line", "policy and line both: a rule takes one of them")
		case r.Policy == "" && line == "":
			bad(f, "want policy: NAME or line: NAME, the lines its flows take")
		case line != "":
			if _, known := weight[line]; !known {
				bad(f+".line", "unknown line %q (uplinks: %s)", line, strings.Join(lines, ", "))
				break
			}
			r.Policy = LinePolicyPrefix + line
			if !implicit[r.Policy] {
				implicit[r.Policy] = true
				if count++; count > MaxPolicies && 1+len(c.Policies) <= MaxPolicies {
					bad(f+".line", "the policy %s would be the %dth: at most %d in all (balanced, policies and one per line: shorthand)", r.Policy, count, MaxPolicies)
				}
			}
		case r.Policy != BalancedPolicy && policyNames[r.Policy] == "":
			bad(f+".policy", "unknown policy %q (policies: %s)", r.Policy, strings.Join(policies, ", "))
		}

		if _, set := c.pos[f+".sticky"]; set && (r.Sticky <= 0 || r.Sticky > MaxSticky) {
			bad(f+".sticky", "want more than 0 and at most %v, got %v", MaxSticky, r.Sticky)
		}
		if _, set := c.pos[f+".sticky"]; r.StickyPerRule && !set {
			bad(f+".sticky_per_rule", "without sticky: there is nothing to keep")
		}
	}
	if len(errs) == 0 {
		c.Warnings = append(c.Warnings, c.shadowed()...)
	}
	return errs
}

// parseList parses a rule field's items with parse, reporting each bad or
// repeated one. An empty list is an error: it would read as "any".
func parseList[T comparable](c *Config, bad func(string, string, ...any), field string, text List, parse func(string) (T, string)) []T {
	if text != nil && len(text) == 0 {
		bad(field, "an empty list: leave the key out to match any value")
		return nil
	}
	var out []T
	for i, s := range text {
		f := fmt.Sprintf("%s[%d]", field, i)
		if _, listed := c.pos[f]; !listed {
			f = field // written as a scalar
		}
		v, msg := parse(s)
		switch {
		case msg != "":
			bad(f, "%s", msg)
		case slices.Contains(out, v):
			bad(f, "%s is listed twice", s)
		default:
			out = append(out, v)
		}
	}
	return out
}

// IP protocol numbers by name.
var protoNumbers = map[string]uint8{"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58}

func parseProto(s string) (uint8, string) {
	if p, ok := protoNumbers[s]; ok {
		return p, ""
	}
	n, err := strconv.ParseUint(s, 10, 8)
	if err != nil {
		return 0, fmt.Sprintf("want tcp, udp, icmp, icmpv6 or a protocol number 0..255, got %q", s)
	}
	return uint8(n), ""
}

// portProtos reports whether protos are TCP, UDP or both: the protocols
// whose packets the datapath reads ports of.
func portProtos(protos []uint8) bool {
	return len(protos) > 0 && !slices.ContainsFunc(protos, func(p uint8) bool { return p != 6 && p != 17 })
}

// protoText is a rule's protocols as the file names them.
func protoText(protos []uint8) string {
	if len(protos) == 0 {
		return "any"
	}
	var names []string
	for _, p := range protos {
		n := strconv.Itoa(int(p))
		for name, v := range protoNumbers {
			if v == p {
				n = name
			}
		}
		names = append(names, n)
	}
	return strings.Join(names, ", ")
}

// parsePorts parses "N" or "N-M".
func parsePorts(s string) (PortRange, string) {
	first, last, isRange := strings.Cut(s, "-")
	if !isRange {
		last = first
	}
	a, aerr := strconv.ParseUint(first, 10, 16)
	b, berr := strconv.ParseUint(last, 10, 16)
	switch {
	case aerr != nil || berr != nil:
		return PortRange{}, fmt.Sprintf("want a port 0..65535 or a range N-M, got %q", s)
	case a > b:
		return PortRange{}, fmt.Sprintf("%s: the range's first port is above its last", s)
	}
	return PortRange{uint16(a), uint16(b)}, ""
}

// DSCP code points by name (RFC 2474 class selectors, RFC 2597 assured
// forwarding, RFC 3246 expedited forwarding, RFC 5865 voice admit).
var dscpNumbers = map[string]uint8{
	"cs0": 0, "cs1": 8, "cs2": 16, "cs3": 24, "cs4": 32, "cs5": 40, "cs6": 48, "cs7": 56,
	"af11": 10, "af12": 12, "af13": 14, "af21": 18, "af22": 20, "af23": 22,
	"af31": 26, "af32": 28, "af33": 30, "af41": 34, "af42": 36, "af43": 38,
	"ef": 46, "va": 44,
}

func parseDSCP(s string) (uint8, string) {
	if d, ok := dscpNumbers[s]; ok {
		return d, ""
	}
	n, err := strconv.ParseUint(s, 10, 8)
	if err != nil || n > 63 {
		return 0, fmt.Sprintf("want 0..63 or a name (cs0..cs7, af11..af43, ef, va), got %q", s)
	}
	return uint8(n), ""
}

// unjoin splits errors.Join's error into its errors.
func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	if err != nil {
		return []error{err}
	}
	return nil
}

// WithPrefixSets returns a copy of c whose prefix sets named in sets hold
// the prefixes given there (as re-read from their files), and whose rules
// follow them. c is unchanged: its rules and sets share their slices.
func (c *Config) WithPrefixSets(sets map[string][]netip.Prefix) *Config {
	n := *c
	n.PrefixSets = slices.Clone(c.PrefixSets)
	for i, s := range n.PrefixSets {
		if p, ok := sets[s.Name]; ok {
			n.PrefixSets[i].Prefixes = p
		}
	}
	n.Rules = slices.Clone(c.Rules)
	for i, r := range n.Rules {
		if p, ok := sets[r.SrcSet]; ok && r.SrcSet != "" {
			n.Rules[i].Src = p
		}
		if p, ok := sets[r.DstSet]; ok && r.DstSet != "" {
			n.Rules[i].Dst = p
		}
	}
	return &n
}
