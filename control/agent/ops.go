// SPDX-License-Identifier: Apache-2.0

package agent

import (
	"log/slog"
	"net/netip"

	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/datapath"
	"github.com/uplinkd/uplinkd/control/events"
	"github.com/uplinkd/uplinkd/control/nat"
	"github.com/uplinkd/uplinkd/control/plan"
	"github.com/uplinkd/uplinkd/control/routing"
	"github.com/uplinkd/uplinkd/control/sysctl"
	"github.com/uplinkd/uplinkd/loader"
)

// ops is the kernel as Apply reads and changes it, one small method per
// kind of state. envOps is the real one, over an Env; the unit tests' fake
// records every call, so that apply ordering, partial failure and the
// all-lines-down and reorder cases are tested without a kernel.
type ops interface {
	// Addrs lists the IPv4 addresses of an interface (plan.Interfaces).
	Addrs(ifname string) ([]netip.Prefix, error)
	// Carrier reports whether an interface is up with carrier.
	Carrier(ifname string) bool
	// Sysctls is /proc/sys of the namespace.
	Sysctls() sysctl.FS
	// Routing is the rules and routes tagged proto within scope.
	Routing(proto int, scope plan.Scope) routing.Kernel
	// ApplyNAT makes uplinkd's nftables table equal to n.
	ApplyNAT(n plan.NAT) (bool, error)
	// FlushConntrack deletes the conntrack entries NAT'd to addr.
	FlushConntrack(addr netip.Addr) (uint, error)
	// SyncDatapath loads, attaches and writes the datapath for lines.
	SyncDatapath(cfg *config.Config, lines []plan.Line, lan []netip.Prefix, log *slog.Logger, ev *events.Ring) error
	// Detach takes the datapath off an interface the config no longer
	// names.
	Detach(ifname string) error
	// RemoveLine removes a dropped line's datapath entry and its pinned
	// flows; it returns how many flows it removed.
	RemoveLine(index int) (int, error)
	// ForgetPolicies makes the pinned flows of policies ids no policy's
	// (loader.Datapath.ForgetPolicies); it returns how many it changed.
	ForgetPolicies(ids []int) (int, error)
	// FlowClearer returns a func that removes every flow pinned in the
	// datapath loaded now and says how many; it may run beside the run
	// loop.
	FlowClearer() func() (int, error)
	// FlowMapUse is how full the datapath's flow map has been (zero
	// before the datapath is loaded).
	FlowMapUse() (loader.FlowMapUse, error)
	// Attached is the datapath's attach mode by interface.
	Attached() map[string]string
	// Close releases the datapath's handles (its pins stay).
	Close()
}

// envOps is ops over the real kernel of an Env.
type envOps struct {
	env *Env
	dp  *datapath.Sync
}

var _ ops = (*envOps)(nil)

func newEnvOps(env *Env) *envOps {
	return &envOps{env: env, dp: datapath.New(datapath.Kernel{
		Do:         env.Do,
		LocalAddrs: env.LocalAddrs,
		LinkIndex: func(ifname string) (int, error) {
			link, err := env.NL.LinkByName(ifname)
			if err != nil {
				return 0, err
			}
			return link.Attrs().Index, nil
		},
	})}
}

func (o *envOps) Addrs(ifname string) ([]netip.Prefix, error) { return o.env.Addrs(ifname) }
func (o *envOps) Carrier(ifname string) bool                  { return o.env.Carrier(ifname) }
func (o *envOps) Sysctls() sysctl.FS                          { return o.env.Sysctl }
func (o *envOps) ApplyNAT(n plan.NAT) (bool, error)           { return nat.Apply(o.env.NFT, n) }
func (o *envOps) FlushConntrack(a netip.Addr) (uint, error)   { return o.env.FlushConntrack(a) }
func (o *envOps) Detach(ifname string) error                  { return o.dp.Detach(ifname) }
func (o *envOps) RemoveLine(index int) (int, error)           { return o.dp.RemoveLine(index) }
func (o *envOps) ForgetPolicies(ids []int) (int, error)       { return o.dp.ForgetPolicies(ids) }
func (o *envOps) FlowClearer() func() (int, error)            { return o.dp.FlowClearer() }
func (o *envOps) Close()                                      { o.dp.Close() }
func (o *envOps) Attached() map[string]string                 { return o.dp.Attached() }
func (o *envOps) FlowMapUse() (loader.FlowMapUse, error)      { return o.dp.FlowMapUse() }

func (o *envOps) Routing(proto int, scope plan.Scope) routing.Kernel {
	return &routing.Netlink{H: o.env.NL, Protocol: proto, Scope: scope}
}

func (o *envOps) SyncDatapath(cfg *config.Config, lines []plan.Line, lan []netip.Prefix, log *slog.Logger, ev *events.Ring) error {
	return o.dp.Apply(cfg, lines, lan, log, ev)
}
