// SPDX-License-Identifier: Apache-2.0

package plan

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/uplinkd/uplinkd/control/config"
)

// Line is a configured line as it is now: its address (from the config
// or from the interface) and whether it is usable.
type Line struct {
	config.Line
	Index   int          // the line's number (config.Line.Slot) less one: its datapath index
	Address netip.Prefix // zero: the interface has no address in the gateway's subnet (yet)
	Carrier bool         // the interface is up and has carrier
	Up      bool         // not taken down by the operator
	Healthy bool         // its probes answer (or it is kept in use because every line is down)
	// Late: its probes answer, but a round under way had no answer in time
	// (health.Late): the line keeps its flows, routes and NAT and gets no
	// new flows.
	Late bool
	// AdaptedWeight replaces the configured weight when weights are
	// adaptive; 0: the configured weight.
	AdaptedWeight int
}

// Usable reports whether new flows may be sent over the line.
func (l Line) Usable() bool { return l.Serving() && !l.Late }

// Serving reports whether the line carries traffic: its own table's
// default route, its share of the multipath route, the flows pinned to
// it. A late line is serving but not usable.
func (l Line) Serving() bool { return l.Up && l.Carrier && l.Healthy && l.Address.IsValid() }

// NATAddr is the source address the line's flows are NAT'd to: its VIP in
// an HA pair (it moves to the master), else its own address.
func (l Line) NATAddr() netip.Addr {
	if l.VIPPrefix.IsValid() {
		return l.VIPPrefix.Addr()
	}
	return l.Address.Addr()
}

// EffectiveWeight is the line's share of new flows.
func (l Line) EffectiveWeight() int {
	if l.AdaptedWeight > 0 {
		return l.AdaptedWeight
	}
	return l.Weight
}

// Interfaces is what Resolve needs from the kernel: the IPv4 addresses of
// an interface, or ErrNoInterface.
type Interfaces interface {
	Addrs(ifname string) ([]netip.Prefix, error)
}

// ErrNoInterface says an interface does not exist.
var ErrNoInterface = errors.New("no such interface")

// Resolve checks the config against the kernel (every interface exists;
// every line has an address in its gateway's subnet) and returns the
// lines. Errors name the file, line and field.
func Resolve(c *config.Config, ifs Interfaces) ([]Line, error) {
	var errs []error
	for i, name := range c.LAN.Interfaces {
		if _, err := ifs.Addrs(name); err != nil {
			errs = append(errs, c.Errorf(fmt.Sprintf("lan.interfaces[%d]", i), "%s: %v", name, err))
		}
	}
	lines := make([]Line, len(c.Lines))
	for i, u := range c.Lines {
		f := fmt.Sprintf("uplinks[%d]", i)
		lines[i] = Line{Line: u, Index: u.Slot - 1, Up: true, Carrier: true, Healthy: true}
		addrs, err := ifs.Addrs(u.Interface)
		if err != nil {
			errs = append(errs, c.Errorf(f+".interface", "%s: %v", u.Interface, err))
			continue
		}
		if u.Prefix.IsValid() {
			if !hasAddr(addrs, u.Prefix) {
				errs = append(errs, c.Errorf(f+".address", "%s is not assigned to %s (it has %v)", u.Prefix, u.Interface, addrs))
				continue
			}
			lines[i].Address = u.Prefix
			continue
		}
		a, ok := LineAddress(addrs, u.GatewayAddr)
		if !ok {
			errs = append(errs, c.Errorf(f+".gateway", "%s is outside the subnets of %s (%v); set address: or fix gateway:", u.GatewayAddr, u.Interface, addrs))
			continue
		}
		lines[i].Address = a
	}
	return lines, errors.Join(errs...)
}

// LineAddress picks a line's address among its interface's addresses: the
// first whose subnet holds the gateway, as the kernel picks a source.
func LineAddress(addrs []netip.Prefix, gw netip.Addr) (netip.Prefix, bool) {
	for _, a := range addrs {
		if a.Addr().Is4() && a.Contains(gw) && a.Addr() != gw {
			return a, true
		}
	}
	return netip.Prefix{}, false
}

func hasAddr(addrs []netip.Prefix, p netip.Prefix) bool {
	for _, a := range addrs {
		if a == p {
			return true
		}
	}
	return false
}

var defaultRoute4 = netip.MustParsePrefix("0.0.0.0/0")

// Build computes the desired kernel state from the config and the lines.
func Build(c *config.Config, lines []Line) State {
	r := c.Routing
	var s State
	s.Rules = append(s.Rules, Rule{
		Priority: r.MainPriority, Table: TableMain, SuppressPrefixLen: 0,
		Why: "main table first (LAN and line subnets), minus its default routes (the seed deletes them; uplinkd leaves them alone)",
	})
	var mp []Nexthop
	for _, l := range lines {
		n := l.Index + 1
		s.Rules = append(s.Rules, Rule{
			Priority: r.FwmarkPriority + n, Table: l.Table, Mark: l.Mark, Mask: r.MarkMask, SuppressPrefixLen: -1,
			Why: fmt.Sprintf("flows the datapath pinned to %s", l.Name),
		})
		s.Routes = append(s.Routes, Route{
			Table: l.Table, Dst: defaultRoute4, Type: Prohibit, Metric: 1,
			Why: fmt.Sprintf("%s unusable: fail fast rather than leave by another line", l.Name),
		})
		if !l.Address.IsValid() {
			continue
		}
		for _, t := range l.Probe.Targets {
			// Even while the line is down, so that its probes tell when it
			// works again; SO_BINDTODEVICE keeps them on the line anyway.
			s.Routes = append(s.Routes, Route{
				Table: l.Table, Dst: netip.PrefixFrom(t, 32), Type: Unicast, Src: l.Address.Addr(),
				Nexthops: []Nexthop{{Gateway: l.GatewayAddr, Device: l.Interface, Weight: 1}},
				Why:      fmt.Sprintf("%s's probe target %s, through %s even while it is down", l.Name, t, l.Name),
			})
		}
		s.Rules = append(s.Rules, Rule{
			Priority: r.SourcePriority + n, Table: l.Table, Src: l.Address.Masked(), SuppressPrefixLen: -1,
			Why: fmt.Sprintf("traffic from %s's subnet (NAT'd or bound to its address)", l.Name),
		})
		if !l.Serving() {
			// Its table keeps only the prohibit route: flows pinned to the
			// line, and traffic bound to its address, fail fast.
			continue
		}
		s.Routes = append(s.Routes, Route{
			Table: l.Table, Dst: defaultRoute4, Type: Unicast, Src: l.Address.Addr(),
			Nexthops: []Nexthop{{Gateway: l.GatewayAddr, Device: l.Interface, Weight: 1}},
			Why:      fmt.Sprintf("%s's own table", l.Name),
		})
		mp = append(mp, Nexthop{Gateway: l.GatewayAddr, Device: l.Interface, Weight: l.EffectiveWeight()})
	}
	unreachable, blackhole := c.LastResortMarks()
	for _, kind := range LastResorts(c) {
		prio, table := r.LastResortRule(kind)
		mark, typ := unreachable, Unreachable
		if kind == config.LastResortBlackhole {
			mark, typ = blackhole, Blackhole
		}
		s.Rules = append(s.Rules, Rule{
			Priority: prio, Table: table, Mark: mark, Mask: r.MarkMask, SuppressPrefixLen: -1,
			Why: fmt.Sprintf("new flows of a policy with last_resort: %s while none of its lines is usable", kind),
		})
		s.Routes = append(s.Routes, Route{
			Table: table, Dst: defaultRoute4, Type: typ,
			Why: fmt.Sprintf("last_resort: %s", kind),
		})
	}
	s.Rules = append(s.Rules, Rule{
		Priority: r.MultipathPriority, Table: r.MultipathTable, SuppressPrefixLen: -1,
		Why: "everything not pinned: weighted multipath over the usable lines",
	})
	if len(mp) > 0 {
		s.Routes = append(s.Routes, Route{
			Table: r.MultipathTable, Dst: defaultRoute4, Type: Unicast, Nexthops: mp,
			Why: "weighted multipath default",
		})
	}
	SortRules(s.Rules)
	SortRoutes(s.Routes)

	s.NAT = NAT{Table: r.NFTTable, Mode: c.NAT, LAN: c.LAN.Interfaces, Firewall: c.Firewall == config.FirewallStateful, HAGuard: c.HA != nil}
	for _, l := range lines {
		if !l.Serving() && c.Datapath.On() {
			s.NAT.Dead = append(s.NAT.Dead, DeadLine{Line: l.Name, Mark: l.Mark, Mask: r.MarkMask})
		}
		nl := NATLine{Line: l.Name, Interface: l.Interface}
		if c.NAT == config.NATSNAT {
			nl.Address = l.NATAddr()
		}
		s.NAT.Lines = append(s.NAT.Lines, nl)
	}

	s.Sysctls = []Sysctl{
		{Path: ForwardingSysctl, Value: "1", Why: "a gateway forwards (set last, once the firewall is in place)"},
		{Path: "net/ipv4/fib_multipath_hash_policy", Value: "3", Why: "hash on the fields below: stable across TCP retransmissions (policy 1 follows the skb hash, which the client re-picks)"},
		{Path: "net/ipv4/fib_multipath_hash_fields", Value: "0x37", Why: "source/destination address, protocol, ports"},
		{Path: "net/ipv4/fib_multipath_use_neigh", Value: "1", Why: "skip nexthops whose neighbour entry failed"},
	}
	for _, l := range lines {
		s.Sysctls = append(s.Sysctls, LineSysctls(l.Interface)...)
	}
	return s
}

// ForwardingSysctl turns forwarding on.
const ForwardingSysctl = "net/ipv4/ip_forward"

// SplitForwarding separates the forwarding sysctl, which goes on only once
// the firewall is in place, from the others.
func SplitForwarding(all []Sysctl) (forwarding, others []Sysctl) {
	for _, s := range all {
		if s.Path == ForwardingSysctl {
			forwarding = append(forwarding, s)
		} else {
			others = append(others, s)
		}
	}
	return forwarding, others
}

// LineSysctls are the settings uplinkd makes on a line's interface.
func LineSysctls(ifname string) []Sysctl {
	return []Sysctl{
		{Path: "net/ipv4/conf/" + ifname + "/rp_filter", Value: "2", Why: "loose: replies may come back by any line"},
		{Path: "net/ipv4/conf/" + ifname + "/ignore_routes_with_linkdown", Value: "1", Why: "avoid a line at once when its carrier drops"},
	}
}
