// SPDX-License-Identifier: Apache-2.0

// Package datapath keeps uplinkd's eBPF datapath (package loader) in step
// with the lines, as routing, nat and sysctl do for their kernel state: it
// loads or adopts the pinned maps, attaches to every LAN interface
// (re-attaching what someone detached), and writes the line table, the
// buckets, the LAN subnets and the local addresses, each only when it
// changed. Line interfaces carry no program.
package datapath

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"

	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/events"
	"github.com/uplinkd/uplinkd/control/plan"
	"github.com/uplinkd/uplinkd/loader"
)

// Kernel is what Sync needs from the gateway's namespace.
type Kernel struct {
	// Do runs a function in the namespace (programs attach there).
	Do func(func() error) error
	// LinkIndex is an interface's index.
	LinkIndex func(ifname string) (int, error)
	// LocalAddrs lists the gateway's own addresses.
	LocalAddrs func() ([]netip.Addr, error)
}

// Sync is the datapath of one agent: nil until the first Apply loads it.
type Sync struct {
	k        Kernel
	dp       *loader.Datapath
	attached map[string]int // interface name → ifindex it was attached at
	// lineIfs are the line interfaces by name → ifindex, each cleared once
	// of the uplink programs earlier uplinkd attached there.
	lineIfs map[string]int
	// ruleSet is the rule set compiled for compiledFor with its LAN
	// interfaces at compiledLANs: compiled again only when they change.
	ruleSet      loader.RuleSet
	compiledFor  *config.Config
	compiledLANs map[string]int
	// reused are policy ids that new policies take from removed ones:
	// their flows are forgotten when the datapath is loaded, and those
	// the old rules pinned meanwhile once the new rules are in.
	reused []int
}

// New returns a Sync that has loaded nothing yet.
func New(k Kernel) *Sync { return &Sync{k: k} }

// Options are the loader options that cfg names.
func Options(cfg *config.Config) loader.Options {
	return loader.Options{
		PinDir:      cfg.Datapath.PinDir,
		FlowEntries: cfg.Datapath.FlowEntries,
		MarkMask:    cfg.Routing.MarkMask,
		Attach:      attachMode(cfg.Datapath.Attach),
	}
}

// attachMode maps the config's datapath.attach onto the loader's.
func attachMode(attach string) loader.AttachMode {
	switch attach {
	case config.AttachTC:
		return loader.AttachTC
	case config.AttachTCX:
		return loader.AttachTCX
	}
	return ""
}

// Apply loads and attaches what is missing and writes the maps. Only the
// buckets that must move for a new weight or a dead line are rewritten, so
// only new flows see the change.
func (d *Sync) Apply(cfg *config.Config, lines []plan.Line, lan []netip.Prefix, log *slog.Logger, ev *events.Ring) error {
	env := d.k
	if d.dp == nil {
		var dp *loader.Datapath
		if err := env.Do(func() (err error) { dp, err = loader.Load(Options(cfg)); return err }); err != nil {
			return fmt.Errorf("loading datapath: %w", err)
		}
		d.dp, d.attached, d.lineIfs = dp, map[string]int{}, map[string]int{}
		if len(d.reused) > 0 {
			// A start whose policies take removed ones' ids: the
			// previous run's flows must not become the new policies'.
			n, err := dp.ForgetPolicies(d.reused)
			if err != nil {
				return fmt.Errorf("freeing the ids of removed policies %v: %w", d.reused, err)
			}
			log.Info("removed policies' ids reused: their flows are no policy's now", "ids", d.reused, "flows", n)
		}
		if err := dp.CTRecovery(); err != nil {
			log.Warn("datapath loaded; recovery from conntrack is off: flows the flow map loses are picked afresh", "ct_recovery", "off", "why", err)
		} else {
			log.Info("datapath loaded", "ct_recovery", "on")
		}
	}
	var errs []error
	attach := func(ifname string, f func() error) {
		index, err := env.LinkIndex(ifname)
		if err != nil {
			errs = append(errs, fmt.Errorf("attaching to %s: %w", ifname, err))
			return
		}
		repair := ""
		if idx, ok := d.attached[ifname]; ok && idx == index {
			// Someone may have unpinned a link or deleted a filter.
			verr := env.Do(func() error { return d.dp.Verify(ifname) })
			if verr == nil {
				return
			}
			repair = verr.Error()
		}
		if err := env.Do(f); err != nil {
			errs = append(errs, err)
			return
		}
		d.attached[ifname] = index
		if repair != "" {
			ev.Add(events.Restored, "", "datapath re-attached", "interface", ifname, "why", repair)
			return
		}
		log.Info("datapath attached", "interface", ifname, "mode", d.dp.Attached()[ifname])
	}
	for _, ifname := range cfg.LAN.Interfaces {
		attach(ifname, func() error { return d.dp.AttachLAN(ifname) })
	}

	weights := make([]int, loader.MaxLines)
	live := make([]bool, loader.MaxLines)
	table := make([]loader.Line, loader.MaxLines) // a number no line has: the zero Line
	for _, l := range lines {
		dl := lineEntry(l)
		if index, err := env.LinkIndex(l.Interface); err == nil {
			if d.lineIfs[l.Interface] != index {
				if err := env.Do(func() error { return d.dp.Detach(l.Interface) }); err != nil {
					errs = append(errs, fmt.Errorf("taking earlier uplinkd's counters off %s: %w", l.Interface, err))
				} else {
					d.lineIfs[l.Interface] = index
				}
			}
			dl.Ifindex = index
		}
		table[l.Index] = dl
		weights[l.Index], live[l.Index] = l.EffectiveWeight(), l.Usable()
	}
	if err := d.dp.SetLines(table); err != nil {
		errs = append(errs, err)
	}

	if err := d.applyPolicies(cfg, lines, weights, live, log); err != nil {
		errs = append(errs, err)
	}
	if err := d.dp.SetLANSubnets(lan); err != nil {
		errs = append(errs, err)
	}
	local, err := env.LocalAddrs()
	if err == nil {
		err = d.dp.SetLocal(local)
	}
	if err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// applyPolicies writes every policy's table (the balanced one's, id 0,
// from the lines' effective weights), the last resorts' marks, then the
// rules that name the policies, then unsets the policies no rule names
// any more: a flow classified meanwhile, by the old rules or the new,
// finds its policy's table. Only what changed is written: the buckets
// that must move for a new weight or a dead line (so only new flows see
// the change), a rule set only when it compiles to other tables.
func (d *Sync) applyPolicies(cfg *config.Config, lines []plan.Line, weights []int, live []bool, log *slog.Logger) error {
	prev, err := d.dp.CurrentPolicies()
	if err != nil {
		return err
	}
	rs, err := d.compiled(cfg)
	if err != nil {
		return err
	}
	tables := PolicyTables(cfg, lines, weights, live, prev)
	// The old rules' policies stay until the new rules are in.
	during := slices.Clone(tables)
	for id := range during {
		if during[id].Buckets == nil && id < len(prev) {
			during[id] = prev[id]
		}
	}
	unreachable, blackhole := cfg.LastResortMarks()
	if err := d.dp.SetLastResortMarks(unreachable, blackhole); err != nil {
		return err
	}
	if err := d.dp.SetPolicies(during); err != nil {
		return err
	}
	names := map[int]string{}
	for _, p := range cfg.PolicyList() {
		names[p.ID] = p.Name
	}
	for id, t := range tables {
		if id >= len(prev) || prev[id].Buckets == nil || t.Buckets == nil || slices.Equal(prev[id].Buckets, t.Buckets) {
			continue
		}
		if id == 0 {
			log.Info("buckets changed", "moved", moved(prev[id].Buckets, t.Buckets), "of", len(t.Buckets))
		} else {
			log.Info("policy buckets changed", "policy", names[id], "moved", moved(prev[id].Buckets, t.Buckets), "of", len(t.Buckets))
		}
	}
	if err := d.dp.SetRuleSet(rs); err != nil {
		return err
	}
	if len(d.reused) > 0 {
		n, err := d.dp.ForgetStalePolicyFlows(d.reused)
		if err != nil {
			return fmt.Errorf("freeing the ids of removed policies %v: %w", d.reused, err)
		}
		if n > 0 {
			log.Info("flows the old rules pinned under reused policy ids during the change are no policy's", "ids", d.reused, "flows", n)
		}
		d.reused = nil
	}
	return d.dp.SetPolicies(tables)
}

// compiled is cfg's rule set, compiled again only when the config or the
// index of a LAN interface its rules name changed.
func (d *Sync) compiled(cfg *config.Config) (loader.RuleSet, error) {
	lans := map[string]int{}
	for _, r := range cfg.Rules {
		for _, ifname := range r.LANs {
			index, err := d.k.LinkIndex(ifname)
			if err != nil {
				index = noInterface // gone: the rule matches nothing until it is back
			}
			lans[ifname] = index
		}
	}
	if d.compiledFor == cfg && maps.Equal(d.compiledLANs, lans) {
		return d.ruleSet, nil
	}
	rs, err := CompileRules(cfg, func(ifname string) (int, error) { return lans[ifname], nil })
	if err != nil {
		return loader.RuleSet{}, err
	}
	d.compiledFor, d.compiledLANs, d.ruleSet = cfg, lans, rs
	return rs, nil
}

// lineEntry is a line's entry in the datapath's line table (its interface
// aside). A late line is not dead: it keeps its flows, and only the
// buckets, built from the usable lines, give it no new ones.
func lineEntry(l plan.Line) loader.Line {
	dl := loader.Line{Mark: l.Mark, Weight: uint32(l.EffectiveWeight()), Dead: !l.Serving()}
	if l.Address.IsValid() {
		dl.NATAddrs = []netip.Addr{l.Address.Addr()}
		if l.VIPPrefix.IsValid() {
			// The VIP of an HA pair first: it is what new flows are NAT'd
			// to, and what recovers the line of a flow that conntrackd
			// committed here at a takeover.
			dl.NATAddrs = []netip.Addr{l.VIPPrefix.Addr(), l.Address.Addr()}
		}
	}
	return dl
}

// Detach takes the datapath off an interface that a new config no
// longer names (a removed line's, or a dropped LAN interface).
func (d *Sync) Detach(ifname string) error {
	if d.dp == nil {
		return nil
	}
	delete(d.attached, ifname)
	delete(d.lineIfs, ifname)
	return d.k.Do(func() error { return d.dp.Detach(ifname) })
}

// RemoveLine removes a line that a new config dropped from the datapath,
// with the flows pinned to it; it returns how many flows it removed.
func (d *Sync) RemoveLine(index int) (int, error) {
	if d.dp == nil {
		return 0, nil
	}
	return d.dp.RemoveLine(index)
}

// ForgetPolicies makes the pinned flows of policies ids no policy's, ids
// that new policies take from removed ones: now, when the datapath is
// loaded (else when Apply loads it), and once more, after the next Apply
// installed the new rules, for the flows the old rules pinned meanwhile.
// It returns how many flows it changed now.
func (d *Sync) ForgetPolicies(ids []int) (int, error) {
	if len(ids) == 0 {
		return 0, nil
	}
	for _, id := range ids {
		if !slices.Contains(d.reused, id) {
			d.reused = append(d.reused, id)
		}
	}
	if d.dp == nil {
		return 0, nil
	}
	return d.dp.ForgetPolicies(ids)
}

// FlowClearer returns a func removing every pinned flow of the datapath
// loaded now (none before Apply loaded it) and saying how many; it may
// run on another goroutine.
func (d *Sync) FlowClearer() func() (int, error) {
	dp := d.dp
	if dp == nil {
		return func() (int, error) { return 0, nil }
	}
	return dp.ClearFlows
}

// Attached is the attach mode ("tcx" or "tc") by interface.
func (d *Sync) Attached() map[string]string {
	if d.dp == nil {
		return nil
	}
	m := map[string]string{}
	for ifname, mode := range d.dp.Attached() {
		m[ifname] = string(mode)
	}
	return m
}

func moved(a, b []int) int {
	n := 0
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			n++
		}
	}
	return n
}

// FlowMapUse is how full the flow map has been; zero before Apply loaded
// the datapath.
func (d *Sync) FlowMapUse() (loader.FlowMapUse, error) {
	if d.dp == nil {
		return loader.FlowMapUse{}, nil
	}
	return d.dp.FlowMapUse()
}

// Close releases the datapath's handles; its pins stay.
func (d *Sync) Close() {
	if d.dp != nil {
		d.dp.Close()
		d.dp = nil
	}
}
