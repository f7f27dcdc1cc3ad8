// SPDX-License-Identifier: Apache-2.0

package routing

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/uplinkd/uplinkd/control/plan"
)

// Netlink is the Kernel of one network namespace, through a netlink
// handle opened in it. Only IPv4 rules and routes carrying Protocol, at
// priorities and in tables of Scope, are seen and touched.
type Netlink struct {
	H        *netlink.Handle
	Protocol int
	Scope    plan.Scope
}

// dumpRetries bounds retries of a dump the kernel interrupted because the
// tables changed under it.
const dumpRetries = 5

func retryDump[T any](f func() (T, error)) (T, error) {
	var v T
	var err error
	for range dumpRetries {
		if v, err = f(); !errors.Is(err, netlink.ErrDumpInterrupted) {
			return v, err
		}
	}
	return v, err
}

// Rules lists the tagged IPv4 rules.
func (n *Netlink) Rules() ([]plan.Rule, error) {
	all, err := retryDump(func() ([]netlink.Rule, error) { return n.H.RuleList(unix.AF_INET) })
	if err != nil {
		return nil, err
	}
	var out []plan.Rule
	for _, r := range all {
		if int(r.Protocol) != n.Protocol || !n.Scope.Priorities[r.Priority] {
			continue
		}
		pr := plan.Rule{Priority: r.Priority, Table: r.Table, Mark: r.Mark, SuppressPrefixLen: r.SuppressPrefixlen}
		if r.Mask != nil {
			pr.Mask = *r.Mask
		}
		if r.Src != nil {
			pr.Src = prefixOf(r.Src)
		}
		out = append(out, pr)
	}
	return out, nil
}

func (n *Netlink) rule(r plan.Rule) *netlink.Rule {
	nr := netlink.NewRule()
	nr.Family = unix.AF_INET
	nr.Priority = r.Priority
	nr.Table = r.Table
	nr.Protocol = uint8(n.Protocol)
	nr.SuppressPrefixlen = r.SuppressPrefixLen
	if r.Mask != 0 {
		nr.Mark = r.Mark
		mask := r.Mask
		nr.Mask = &mask
	}
	if r.Src.IsValid() {
		nr.Src = ipNet(r.Src)
	}
	return nr
}

// AddRule adds a tagged rule; one that exists already is no error.
func (n *Netlink) AddRule(r plan.Rule) error {
	if err := n.H.RuleAdd(n.rule(r)); err != nil && !errors.Is(err, unix.EEXIST) {
		return err
	}
	return nil
}

// DelRule deletes a tagged rule; one that is gone already is no error.
func (n *Netlink) DelRule(r plan.Rule) error {
	if err := n.H.RuleDel(n.rule(r)); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ESRCH) {
		return err
	}
	return nil
}

// Routes lists the tagged IPv4 routes of every table.
func (n *Netlink) Routes() ([]plan.Route, error) {
	filter := &netlink.Route{Table: unix.RT_TABLE_UNSPEC, Protocol: netlink.RouteProtocol(n.Protocol)}
	all, err := retryDump(func() ([]netlink.Route, error) {
		return n.H.RouteListFiltered(unix.AF_INET, filter, netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
	})
	if err != nil {
		return nil, err
	}
	out := make([]plan.Route, 0, len(all))
	for _, r := range all {
		if !n.Scope.Tables[r.Table] {
			continue
		}
		pr := plan.Route{Table: r.Table, Type: plan.RouteType(r.Type), Metric: r.Priority, Dst: netip.MustParsePrefix("0.0.0.0/0")}
		if r.Dst != nil {
			pr.Dst = prefixOf(r.Dst)
		}
		if a, ok := netip.AddrFromSlice(r.Src); ok {
			pr.Src = a.Unmap()
		}
		if r.Gw != nil {
			nh, err := n.nexthop(r.Gw, r.LinkIndex, 1)
			if err != nil {
				return nil, err
			}
			pr.Nexthops = []plan.Nexthop{nh}
		}
		for _, m := range r.MultiPath {
			nh, err := n.nexthop(m.Gw, m.LinkIndex, m.Hops+1)
			if err != nil {
				return nil, err
			}
			pr.Nexthops = append(pr.Nexthops, nh)
		}
		out = append(out, pr)
	}
	return out, nil
}

func (n *Netlink) nexthop(gw net.IP, ifindex, weight int) (plan.Nexthop, error) {
	nh := plan.Nexthop{Weight: weight}
	nh.Gateway, _ = netip.AddrFromSlice(gw)
	nh.Gateway = nh.Gateway.Unmap()
	link, err := n.H.LinkByIndex(ifindex)
	if err != nil {
		return nh, fmt.Errorf("interface %d of a route: %w", ifindex, err)
	}
	nh.Device = link.Attrs().Name
	return nh, nil
}

func (n *Netlink) route(r plan.Route) (*netlink.Route, error) {
	nr := &netlink.Route{
		Family:   unix.AF_INET,
		Table:    r.Table,
		Dst:      ipNet(r.Dst),
		Type:     int(r.Type),
		Priority: r.Metric,
		Protocol: netlink.RouteProtocol(n.Protocol),
	}
	if r.Src.IsValid() {
		nr.Src = r.Src.AsSlice()
	}
	for _, nh := range r.Nexthops {
		link, err := n.H.LinkByName(nh.Device)
		if err != nil {
			return nil, fmt.Errorf("interface %s: %w", nh.Device, err)
		}
		if len(r.Nexthops) == 1 {
			nr.Gw, nr.LinkIndex = nh.Gateway.AsSlice(), link.Attrs().Index
			break
		}
		nr.MultiPath = append(nr.MultiPath, &netlink.NexthopInfo{Gw: nh.Gateway.AsSlice(), LinkIndex: link.Attrs().Index, Hops: nh.Weight - 1})
	}
	return nr, nil
}

// ReplaceRoute creates or replaces a tagged route.
func (n *Netlink) ReplaceRoute(r plan.Route) error {
	nr, err := n.route(r)
	if err != nil {
		return err
	}
	return n.H.RouteReplace(nr)
}

// DelRoute deletes a tagged route; one that is gone already is no error.
func (n *Netlink) DelRoute(r plan.Route) error {
	nr := &netlink.Route{
		Family: unix.AF_INET, Table: r.Table, Dst: ipNet(r.Dst), Priority: r.Metric,
		Type: int(r.Type), Protocol: netlink.RouteProtocol(n.Protocol),
	}
	if err := n.H.RouteDel(nr); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
		return err
	}
	return nil
}

func prefixOf(n *net.IPNet) netip.Prefix {
	a, _ := netip.AddrFromSlice(n.IP)
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones)
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// Foreign lists, as `ip` would show them, the rules and routes without
// uplinkd's protocol tag at the priorities and in the tables of needed
// (plan.Needed): uplinkd would shadow or replace them, so it refuses them.
func (n *Netlink) Foreign(needed plan.Scope) ([]string, error) {
	prios, tables := needed.Priorities, needed.Tables
	rules, err := retryDump(func() ([]netlink.Rule, error) { return n.H.RuleList(unix.AF_INET) })
	if err != nil {
		return nil, fmt.Errorf("listing rules: %w", err)
	}
	var out []string
	for _, r := range rules {
		if int(r.Protocol) != n.Protocol && prios[r.Priority] {
			out = append(out, fmt.Sprintf("rule prio %d lookup %d proto %d", r.Priority, r.Table, r.Protocol))
		}
	}
	routes, err := retryDump(func() ([]netlink.Route, error) {
		return n.H.RouteListFiltered(unix.AF_INET, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	})
	if err != nil {
		return nil, fmt.Errorf("listing routes: %w", err)
	}
	for _, r := range routes {
		if int(r.Protocol) != n.Protocol && tables[r.Table] {
			dst := "default"
			if r.Dst != nil && prefixOf(r.Dst).Bits() > 0 {
				dst = r.Dst.String()
			}
			out = append(out, fmt.Sprintf("route %s table %d proto %d", dst, r.Table, r.Protocol))
		}
	}
	return out, nil
}
