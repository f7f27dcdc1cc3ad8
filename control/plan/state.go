// SPDX-License-Identifier: Apache-2.0

// Package plan computes the kernel state uplinkd wants, as a plain value,
// from the config and the lines' health. It never touches the kernel: the
// routing, nat and sysctl packages apply a State, and Render prints it as
// the ip/nft/sysctl commands a person would type.
package plan

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/uplinkd/uplinkd/control/config"
)

// Well-known routing tables.
const TableMain = 254

// RouteType is the kind of a route: where it sends packets.
type RouteType uint8

// Route types uplinkd uses (values are the kernel's RTN_*).
const (
	Unicast     RouteType = 1
	Blackhole   RouteType = 6 // drops silently
	Unreachable RouteType = 7 // answers with ICMP "host unreachable"
	Prohibit    RouteType = 8 // answers with ICMP "administratively prohibited": the client fails fast
)

// Rule is one policy routing rule.
type Rule struct {
	Priority int
	Table    int
	Src      netip.Prefix // zero: from all
	Mark     uint32       // with Mask: fwmark Mark/Mask; Mask 0: no fwmark match
	Mask     uint32
	// SuppressPrefixLen makes the rule ignore routes whose prefix length is
	// at most this (0: default routes); -1 unset.
	SuppressPrefixLen int
	Why               string // not in the kernel: printed by Render
}

// Key identifies a rule in the kernel: two rules are the same when every
// matching field is the same.
func (r Rule) Key() string {
	return fmt.Sprintf("%d/%d/%s/%#x/%#x/%d", r.Priority, r.Table, r.Src, r.Mark, r.Mask, r.SuppressPrefixLen)
}

// Nexthop is one way out of a route.
type Nexthop struct {
	Gateway netip.Addr
	Device  string
	Weight  int // 1..256
}

// Route is one route in one table.
type Route struct {
	Table    int
	Dst      netip.Prefix
	Type     RouteType
	Metric   int
	Src      netip.Addr // preferred source; zero: none
	Nexthops []Nexthop  // unicast only; more than one: multipath
	Why      string
}

// Key identifies a route in the kernel: table, destination and metric.
// Routes with the same key replace each other.
func (r Route) Key() string { return fmt.Sprintf("%d/%s/%d", r.Table, r.Dst, r.Metric) }

// Equal reports whether two routes are the same in the kernel (Why aside).
// A single nexthop has no weight in the kernel.
func (r Route) Equal(o Route) bool {
	if r.Key() != o.Key() || r.Type != o.Type || r.Src != o.Src || len(r.Nexthops) != len(o.Nexthops) {
		return false
	}
	for i := range r.Nexthops {
		a, b := r.Nexthops[i], o.Nexthops[i]
		if len(r.Nexthops) == 1 {
			a.Weight, b.Weight = 0, 0
		}
		if a != b {
			return false
		}
	}
	return true
}

// Sysctl is one kernel setting, by its path below /proc/sys
// ("net/ipv4/conf/eth1/rp_filter"), so that interface names with dots
// need no escaping.
type Sysctl struct {
	Path  string
	Value string
	Why   string
}

// Name is the sysctl(8) spelling: dots between components, and a dot in
// an interface name written as a slash.
func (s Sysctl) Name() string {
	parts := strings.Split(s.Path, "/")
	for i, p := range parts {
		parts[i] = strings.ReplaceAll(p, ".", "/")
	}
	return strings.Join(parts, ".")
}

// NATLine is the source NAT of one line.
type NATLine struct {
	Line      string
	Interface string
	Address   netip.Addr // SNAT only: the fixed source address
}

// DeadLine is a line that is down, by the fwmark of the flows the
// datapath pinned to it.
type DeadLine struct {
	Line       string
	Mark, Mask uint32
}

// NAT is uplinkd's nftables table: source NAT per line, the seed's
// stateful forwarding basics, and a TCP reset for flows pinned to a dead
// line.
type NAT struct {
	Table    string // family inet
	Mode     string // config.NATMasquerade, NATSNAT or NATNone
	LAN      []string
	Lines    []NATLine
	Firewall bool // replies and related traffic pass; nothing new from a line into the LAN
	// Dead lines: their pinned TCP flows are answered with a reset, so
	// clients fail at once instead of retransmitting for minutes (a TCP
	// client treats the prohibit route's ICMP error as soft). UDP and ICMP
	// flows are moved to a live line by the datapath.
	Dead []DeadLine
	// LANSubnets: only these IPv4 sources are forwarded from the LAN (the
	// seed's -s NWI/NMI); none known, no such check.
	LANSubnets []netip.Prefix
	// HAGuard drops, on every line and LAN interface, new TCP connections
	// that do not start with a SYN. In an HA pair the standby holds the
	// master's connections in its kernel (conntrackd without external
	// cache); a segment of one it does not hold (not synced yet) would make
	// a fresh conntrack entry after a takeover that breaks the connection
	// (the kernel would re-map the server's port, or NAT the client anew).
	HAGuard bool
}

// Empty reports whether the table has no chain at all and so is not
// created.
func (n NAT) Empty() bool { return len(NFTRules(n)) == 1 } // the owner rule alone

// State is everything uplinkd wants the kernel to hold.
type State struct {
	Rules   []Rule
	Routes  []Route
	NAT     NAT
	Sysctls []Sysctl
}

// SortRules orders rules by priority, then key, the order the kernel lists
// them in.
func SortRules(rs []Rule) {
	slices.SortFunc(rs, func(a, b Rule) int {
		if a.Priority != b.Priority {
			return a.Priority - b.Priority
		}
		return strings.Compare(a.Key(), b.Key())
	})
}

// SortRoutes orders routes by table, destination and metric.
func SortRoutes(rs []Route) {
	slices.SortFunc(rs, func(a, b Route) int {
		if a.Table != b.Table {
			return a.Table - b.Table
		}
		if c := a.Dst.Addr().Compare(b.Dst.Addr()); c != 0 {
			return c
		}
		if a.Dst.Bits() != b.Dst.Bits() {
			return a.Dst.Bits() - b.Dst.Bits()
		}
		return a.Metric - b.Metric
	})
}

// Scope is where uplinkd's rules and routes can be: the rule priorities
// and routing tables a config numbers for its lines (every position up to
// config.MaxLines, so that lines a reload removed are found too). A rule
// or route outside it is never taken for uplinkd's, whatever its protocol
// tag.
type Scope struct {
	Priorities map[int]bool
	Tables     map[int]bool
}

// ScopeOf is the scope of one config.
func ScopeOf(c *config.Config) Scope {
	r := c.Routing
	s := Scope{
		Priorities: map[int]bool{r.MainPriority: true, r.MultipathPriority: true},
		Tables:     map[int]bool{r.MultipathTable: true},
	}
	for n := 1; n <= config.MaxLines; n++ {
		s.Priorities[r.FwmarkPriority+n] = true
		s.Priorities[r.SourcePriority+n] = true
		s.Tables[r.TableBase+n] = true
	}
	for _, u := range c.Lines {
		s.Tables[u.Table] = true
	}
	for _, kind := range lastResorts {
		prio, table := r.LastResortRule(kind)
		s.Priorities[prio], s.Tables[table] = true, true
	}
	return s
}

// Union is a scope that holds both.
func (s Scope) Union(o Scope) Scope {
	u := Scope{Priorities: maps.Clone(s.Priorities), Tables: maps.Clone(s.Tables)}
	if u.Priorities == nil {
		u.Priorities = map[int]bool{}
	}
	if u.Tables == nil {
		u.Tables = map[int]bool{}
	}
	maps.Copy(u.Priorities, o.Priorities)
	maps.Copy(u.Tables, o.Tables)
	return u
}

// Needed is the exact rule priorities and tables a config's lines use,
// whatever their state now: where others' rules or routes would be
// shadowed or replaced by uplinkd's.
func Needed(c *config.Config) Scope {
	r := c.Routing
	s := Scope{
		Priorities: map[int]bool{r.MainPriority: true, r.MultipathPriority: true},
		Tables:     map[int]bool{r.MultipathTable: true},
	}
	for _, u := range c.Lines {
		s.Priorities[r.FwmarkPriority+u.Slot] = true
		s.Priorities[r.SourcePriority+u.Slot] = true
		s.Tables[u.Table] = true
	}
	for _, kind := range LastResorts(c) {
		prio, table := r.LastResortRule(kind)
		s.Priorities[prio], s.Tables[table] = true, true
	}
	return s
}

// lastResorts are the last resorts that have a rule and a table of their
// own.
var lastResorts = []string{config.LastResortUnreachable, config.LastResortBlackhole}

// LastResorts are the last resorts that c's policies use, of those with a
// rule and a table (lastResorts).
func LastResorts(c *config.Config) []string {
	var used []string
	for _, kind := range lastResorts {
		if slices.ContainsFunc(c.Policies, func(p config.Policy) bool { return p.LastResort == kind }) {
			used = append(used, kind)
		}
	}
	return used
}
