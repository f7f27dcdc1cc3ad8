// SPDX-License-Identifier: Apache-2.0

package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/ctlsock"
	"github.com/uplinkd/uplinkd/control/datapath"
	"github.com/uplinkd/uplinkd/control/events"
	"github.com/uplinkd/uplinkd/control/ha"
	"github.com/uplinkd/uplinkd/control/health"
	"github.com/uplinkd/uplinkd/control/nat"
	"github.com/uplinkd/uplinkd/control/plan"
	"github.com/uplinkd/uplinkd/control/routing"
	"github.com/uplinkd/uplinkd/control/statefile"
	"github.com/uplinkd/uplinkd/control/sysctl"
	"github.com/uplinkd/uplinkd/loader"
)

// Agent keeps the kernel state of one config applied in one namespace.
type Agent struct {
	cfg      *config.Config
	env      *Env
	log      *slog.Logger
	events   *events.Ring
	lines    []plan.Line
	reconfig chan *config.Config
	ctl      chan ctlCall // requests from the control socket
	// k is the kernel as Apply reads and changes it (envOps, or a fake).
	k       ops
	dead    []string        // lines whose TCP reset the last Apply installed
	usable  map[string]bool // lines the last Apply kept serving (health.Late included)
	allDown bool            // every line failed its probes: the last usable ones are kept
	// lineChanged says the last refresh saw a line change (carrier,
	// operator, address): a change of kernel state that follows is not a
	// repair of someone else's edit.
	lineChanged bool
	flowMap     flowMapWatch
	// stats reads the pinned maps for status; reconcileErrors counts
	// failed applies.
	stats           statsReader
	reconcileErrors uint64
	// pinDir is the datapath's pin dir ("": no datapath), for readers
	// outside the run loop (a reload cannot change it).
	pinDir string
	// health probes and judges the lines (nil in unit tests without a
	// kernel).
	health *health.Monitor
	// kernel is what the kernel offers, checked by Run; the zero value
	// (everything there) until then.
	kernel Kernel
	// scope is where this agent's rules and routes can be: those of every
	// config it ran with, so that a line a reload removed is cleaned up.
	scope plan.Scope
	// adopting: a previous run left its state (it did not `down`); a
	// failed start then leaves that state forwarding instead of removing
	// it.
	adopting bool
	// ha is this gateway's part in an HA pair (zero without an ha block).
	ha haState
	// started is when Run began (uplinkd ha check waits ha.ReadyAfter).
	started time.Time
	// spawn runs work that must not hold up the run loop (a goroutine;
	// unit tests run it inline).
	spawn func(func())
	// setRead brings the prefix-set files as read after a change, by the
	// watch numbered setWatch (the config in force's); stopSetWatch ends
	// that watch.
	setRead      chan prefixSetRead
	setWatch     int
	stopSetWatch context.CancelFunc
	// policyIDs and ruleIDs are the policies' and rules' ids, the removed
	// ones' too (see config.RenumberPolicies), as kept in the state dir.
	policyIDs, ruleIDs config.IDs
	// reused are the ids this run's policies take from policies the
	// previous run had and this config removed: Run frees them.
	reused []int
	// namesPending says policies.json does not name the policies and
	// rules by the numbers in force yet: the next Apply that succeeds
	// writes it.
	namesPending bool
	// runCtx is Run's context, nil before Run: what the watches started
	// by a reload live as long as.
	runCtx context.Context
}

// NewAgent checks cfg against the kernel (interfaces, addresses) and
// returns an agent that has not touched anything yet.
func NewAgent(cfg *config.Config, env *Env, log *slog.Logger) (*Agent, error) {
	a, err := newAgent(cfg, newEnvOps(env), log)
	if err != nil {
		return nil, err
	}
	a.env = env
	a.health = health.NewMonitor(env.Do)
	return a, nil
}

// newAgent is NewAgent over any ops: the unit tests pass a fake kernel.
func newAgent(cfg *config.Config, k ops, log *slog.Logger) (*Agent, error) {
	// The lines keep the numbers a running agent gave them (read only:
	// plan touches nothing; Run writes them back).
	slots, err := ReadSlots(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	if err := cfg.Renumber(slots); err != nil {
		return nil, err
	}
	names, err := ReadPolicyNames(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	policyIDs, ruleIDs := cfg.RenumberPolicies(idsOf(names.Policies)), cfg.RenumberRules(idsOf(names.Rules))
	reused := reusedIDs(idsOf(names.Policies), cfg)
	if err := CheckRules(cfg); err != nil {
		return nil, err
	}
	lines, err := plan.Resolve(cfg, k)
	if err != nil {
		return nil, err
	}
	if cfg.Datapath.On() {
		if err := loader.CheckPinDir(cfg.Datapath.PinDir); err != nil {
			return nil, cfg.Errorf("datapath.pin_dir", "%v", err)
		}
	}
	saved, err := savedScope(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	pinDir := ""
	if cfg.Datapath.On() {
		pinDir = cfg.Datapath.PinDir
	}
	return &Agent{
		cfg: cfg, k: k, log: log, lines: lines, pinDir: pinDir,
		events:   events.NewRing(events.DefaultSize, log),
		reconfig: make(chan *config.Config),
		ctl:      make(chan ctlCall),
		// Buffered: a read while the run loop is busy is not lost.
		setRead:   make(chan prefixSetRead, 1),
		scope:     plan.ScopeOf(cfg).Union(saved),
		adopting:  len(slots) > 0 || previousRun(cfg),
		spawn:     func(f func()) { go f() },
		policyIDs: policyIDs,
		ruleIDs:   ruleIDs,
		reused:    reused,
	}, nil
}

// Events returns what happened to the lines, oldest first.
func (a *Agent) Events() []events.Event { return a.events.List() }

// Reconfigure hands a new config to the running agent (SIGHUP). It is
// checked against the kernel first; a config that fails the check, or
// that changes what uplinkd owns (protocol, nftables table, state and pin
// dirs: a restart after `down` is needed), is refused and the old one
// stays. Only new flows see new weights.
func (a *Agent) Reconfigure(ctx context.Context, cfg *config.Config) error {
	select {
	case a.reconfig <- cfg:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (a *Agent) reconfigure(cfg *config.Config) error {
	old := a.cfg
	if cfg.Routing.Protocol != old.Routing.Protocol || cfg.Routing.NFTTable != old.Routing.NFTTable ||
		cfg.Routing.MarkMask != old.Routing.MarkMask || cfg.StateDir != old.StateDir ||
		cfg.Datapath.PinDir != old.Datapath.PinDir || cfg.Datapath.On() != old.Datapath.On() ||
		cfg.Datapath.FlowEntries != old.Datapath.FlowEntries || cfg.Datapath.Attach != old.Datapath.Attach {
		return errors.New("routing.protocol, routing.nft_table, routing.mark_mask, state_dir and datapath.pin_dir, enabled, " +
			"flow_entries and attach cannot change while running (the loaded datapath has them): uplinkd down, then run")
	}
	if cfg.Metrics.Listen != old.Metrics.Listen {
		return errors.New("metrics.listen cannot change while running (the endpoint is bound at start): restart the agent")
	}
	if err := cfg.Renumber(old.Slots()); err != nil {
		return err
	}
	if a.env != nil {
		k := &routing.Netlink{H: a.env.NL, Protocol: cfg.Routing.Protocol}
		foreign, err := k.Foreign(plan.Needed(cfg))
		if err != nil {
			return err
		}
		if len(foreign) > 0 {
			return fmt.Errorf("the new config's numbers hold rules or routes uplinkd did not create:\n  %s", strings.Join(foreign, "\n  "))
		}
	}
	lines, err := plan.Resolve(cfg, a.k)
	if err != nil {
		return err
	}
	if err := writeSlots(cfg.StateDir, cfg.Slots()); err != nil {
		return err
	}
	policyIDs, ruleIDs := cfg.RenumberPolicies(a.policyIDs), cfg.RenumberRules(a.ruleIDs)
	if err := CheckRules(cfg); err != nil {
		return err
	}
	// Past the limit of ids a new policy takes a removed one's, whose
	// pinned flows must not become the new policy's.
	if reused := reusedIDs(a.policyIDs, cfg); len(reused) > 0 {
		n, err := a.k.ForgetPolicies(reused)
		if err != nil {
			return fmt.Errorf("freeing the ids of removed policies %v: %w", reused, err)
		}
		a.events.Add(events.Config, "", "removed policies' ids reused: their flows are no policy's now", "ids", reused, "flows", n)
	}
	scope := a.scope.Union(plan.ScopeOf(cfg))
	if err := writeScope(cfg.StateDir, scope); err != nil {
		return err
	}
	kept := cfg.Slots()
	for _, l := range a.lines {
		if _, ok := kept[l.Name]; !ok {
			a.removeLine(l)
		}
	}
	// A LAN interface the new config drops, or that changes role (LAN to
	// line or back), loses its programs; the next apply attaches what its
	// new role wants.
	for _, ifname := range changedRoles(old, cfg) {
		if err := a.k.Detach(ifname); err != nil {
			a.log.Error("detaching the datapath", "interface", ifname, "err", err)
		}
	}
	was := map[string]plan.Line{}
	for _, l := range a.lines {
		was[l.Name] = l
	}
	for i := range lines {
		if w, ok := was[lines[i].Name]; ok {
			lines[i].Up, lines[i].Healthy, lines[i].Late, lines[i].Carrier = w.Up, w.Healthy, w.Late, w.Carrier
			if cfg.Weights == config.WeightsAdaptive && w.Weight == lines[i].Weight {
				lines[i].AdaptedWeight = w.AdaptedWeight
			}
		}
	}
	a.cfg, a.lines = cfg, lines
	a.scope, a.policyIDs, a.ruleIDs = scope, policyIDs, ruleIDs
	a.namesPending = true // written by the next Apply that succeeds
	// Its prefix sets' files, which may be others (SIGHUP and `uplinkd
	// reload` alike).
	a.restartPrefixSetWatch(a.runCtx)
	a.events.Add(events.Config, "", "new config", "file", cfg.File())
	return nil
}

// removeLine undoes at once what was the line's alone, when a new config
// drops it: the line programs on its interface, its datapath entry and
// the flows pinned to it, the conntrack entries NAT'd to its address, and
// its interface's sysctls. A line that gets its number later inherits no
// flow. The removed flows' next packets start afresh on a live line (a
// TCP connection sees the server reset it: its address changed). Its
// rules and routes go with the next reconcile (they are in the agent's
// scope).
func (a *Agent) removeLine(l plan.Line) {
	if err := a.k.Detach(l.Interface); err != nil {
		a.log.Error("removing a line's datapath", "line", l.Name, "err", err)
	}
	flows, err := a.k.RemoveLine(l.Index)
	if err != nil {
		a.log.Error("removing a line's flows", "line", l.Name, "err", err)
	}
	var entries uint
	if l.Address.IsValid() {
		if entries, err = a.k.FlushConntrack(l.Address.Addr()); err != nil {
			a.log.Error("flushing a removed line's conntrack entries", "line", l.Name, "err", err)
		}
	}
	var paths []string
	for _, s := range plan.LineSysctls(l.Interface) {
		paths = append(paths, s.Path)
	}
	if _, err := sysctl.RestorePaths(a.k.Sysctls(), a.cfg.StateDir, paths); err != nil {
		a.log.Error("restoring a line's sysctls", "line", l.Name, "err", err)
	}
	a.events.Add(events.Config, l.Name, "line removed by the new config", "interface", l.Interface,
		"number", l.Slot, "flows_removed", flows, "conntrack_flushed", entries)
}

// changedRoles lists the LAN interfaces of old that cfg no longer has as
// LAN interfaces (dropped, or now a line's).
func changedRoles(old, cfg *config.Config) []string {
	var out []string
	for _, ifname := range old.LAN.Interfaces {
		if !slices.Contains(cfg.LAN.Interfaces, ifname) {
			out = append(out, ifname)
		}
	}
	return out
}

// slotsFile, in the state dir, keeps each line's number by name (see
// config.Renumber).
const slotsFile = "lines.json"

// previousRun reports whether a run that did not `down` left state behind
// (saved sysctls, pinned maps), also one of an uplinkd from before
// lines.json: a failed start then must not remove it.
func previousRun(cfg *config.Config) bool {
	for _, p := range []string{
		filepath.Join(cfg.StateDir, sysctl.SavedFile),
		filepath.Join(cfg.Datapath.PinDir, "ul_flows"),
	} {
		if _, err := os.Lstat(p); err == nil {
			return true
		}
	}
	return false
}

func writeSlots(stateDir string, s config.Slots) error {
	return statefile.Write(stateDir, slotsFile, s)
}

// CheckRules compiles cfg's rules as the datapath would take them, so that
// a rule set past its limits (distinct rule bitmaps, address intervals) is
// refused with the config instead of failing every apply. Each LAN
// interface gets an index of its own, as in the kernel: the most bitmaps
// the rules can need.
func CheckRules(cfg *config.Config) error {
	index := map[string]int{}
	ifindex := func(ifname string) (int, error) {
		if _, ok := index[ifname]; !ok {
			index[ifname] = len(index) + 1
		}
		return index[ifname], nil
	}
	if _, err := datapath.CompileRules(cfg, ifindex); err != nil {
		return cfg.Errorf("rules", "%v", err)
	}
	return nil
}

// reusedIDs are the ids that cfg's policies take from other names in prev
// (removed policies whose ids were kept).
func reusedIDs(prev config.IDs, cfg *config.Config) []int {
	was := map[int]string{}
	for name, id := range prev {
		was[id] = name
	}
	var reused []int
	for _, p := range cfg.PolicyList() {
		if name, ok := was[p.ID]; ok && name != p.Name {
			reused = append(reused, p.ID)
		}
	}
	slices.Sort(reused)
	return reused
}

// policyNamesFile, in the state dir, names the rules and policies of the
// config in force by their numbers in the datapath, for readers of the
// flow map (uplinkd flows).
const policyNamesFile = "policies.json"

// PolicyNames are the names of the rules (by index) and policies (by id)
// the datapath's flows record. Policies holds the ids the agent keeps for
// policies a reload removed too ("" for a free id): their flows are
// still pinned, and the ids are given to new policies last.
type PolicyNames struct {
	Rules    []string `json:"rules"`
	Policies []string `json:"policies"`
}

// policyNames are the rules' and policies' names by id.
func policyNames(rules, policies config.IDs) PolicyNames {
	return PolicyNames{Rules: byID(rules), Policies: byID(policies)}
}

// byID lists names by id, "" for an id no name has.
func byID(ids config.IDs) []string {
	var out []string
	for name, id := range ids {
		for len(out) <= id {
			out = append(out, "")
		}
		out[id] = name
	}
	return out
}

// idsOf are the ids of names listed by id.
func idsOf(names []string) config.IDs {
	ids := config.IDs{}
	for id, name := range names {
		if name != "" {
			ids[name] = id
		}
	}
	return ids
}

// ReadPolicyNames returns the names a running agent kept in stateDir;
// none where it has not run.
func ReadPolicyNames(stateDir string) (PolicyNames, error) {
	var n PolicyNames
	if err := statefile.Check(stateDir); errors.Is(err, fs.ErrNotExist) {
		return n, nil
	} else if err != nil {
		return n, err
	}
	return n, statefile.Read(stateDir, policyNamesFile, &n)
}

// ReadSlots returns the lines' numbers a running agent kept in stateDir;
// none where it has not run.
func ReadSlots(stateDir string) (config.Slots, error) {
	slots := config.Slots{}
	if err := statefile.Check(stateDir); errors.Is(err, fs.ErrNotExist) {
		return slots, nil
	} else if err != nil {
		return nil, err
	}
	return slots, statefile.Read(stateDir, slotsFile, &slots)
}

// Lines returns the lines as the agent last saw them.
func (a *Agent) Lines() []plan.Line { return append([]plan.Line(nil), a.lines...) }

// Desired is the kernel state the agent wants now.
func (a *Agent) Desired() plan.State {
	lines, _ := a.planLines()
	want := plan.Build(a.cfg, lines)
	want.NAT.LANSubnets = v4(a.lanSubnets())
	return want
}

// lanSubnets are the sources LAN clients may have: lan.subnets, or the
// subnets of the LAN interfaces' addresses, followed as they change.
func (a *Agent) lanSubnets() []netip.Prefix {
	if len(a.cfg.LAN.SubnetPrefixes) > 0 {
		return a.cfg.LAN.SubnetPrefixes
	}
	var out []netip.Prefix
	for _, ifname := range a.cfg.LAN.Interfaces {
		addrs, err := a.k.Addrs(ifname)
		if err != nil {
			continue
		}
		for _, p := range addrs {
			if !slices.Contains(out, p.Masked()) {
				out = append(out, p.Masked())
			}
		}
	}
	return out
}

func v4(ps []netip.Prefix) []netip.Prefix {
	return slices.DeleteFunc(slices.Clone(ps), func(p netip.Prefix) bool { return !p.Addr().Is4() })
}

// planLines are the lines as the plan uses them. When every line that
// could carry traffic has failed its probes, uplinkd does not blackhole
// what might still work: the lines in use before keep being used until a
// line answers again. kept names them; nil outside that fallback. When
// the only lines left serving are late, they keep their new flows too.
func (a *Agent) planLines() (lines []plan.Line, kept []string) {
	lines = slices.Clone(a.lines)
	candidate := func(l plan.Line) bool { return l.Up && l.Carrier && l.Address.IsValid() }
	anyUsable, anyServing, anyCandidate := false, false, false
	for _, l := range lines {
		anyUsable = anyUsable || l.Usable()
		anyServing = anyServing || l.Serving()
		anyCandidate = anyCandidate || candidate(l)
	}
	if !anyUsable && anyServing {
		for i := range lines {
			lines[i].Late = false
		}
		return lines, nil
	}
	if anyUsable || !anyCandidate {
		return lines, nil
	}
	kept = []string{}
	for i, l := range lines {
		if candidate(l) && (a.usable[l.Name] || len(a.usable) == 0) {
			lines[i].Healthy, lines[i].Late = true, false
			kept = append(kept, l.Name)
		}
	}
	return lines, kept
}

// Report says what one Apply changed.
type Report struct {
	Sysctls int
	Routing routing.Result
	NAT     bool
}

// Changed reports whether the kernel was changed.
func (r Report) Changed() bool { return r.Sysctls > 0 || r.Routing.Changed() || r.NAT }

func (r Report) String() string {
	return fmt.Sprintf("sysctls %d, %s, nat replaced %v", r.Sysctls, r.Routing, r.NAT)
}

// refresh follows the carrier of every line, the lines the operator took
// down, and the addresses of lines whose address is not fixed in the
// config (DHCP, PPPoE).
func (a *Agent) refresh() error {
	down, err := LinesDown(a.cfg.StateDir)
	for i := range a.lines {
		l := &a.lines[i]
		if c := a.k.Carrier(l.Interface); c != l.Carrier {
			a.lineChanged = true
			a.events.Add(events.Carrier, l.Name, "line state", "carrier", c, "interface", l.Interface)
			l.Carrier = c
			// Without carrier the line's probes fail too: judge it down now,
			// so that it comes back after the hold-down, not flaps later.
			if a.health != nil && !c && a.health.Down(l.Name, time.Now(), "no carrier on "+l.Interface) {
				a.events.Add(events.LineDown, l.Name, "line health", "state", health.Down, "why", "no carrier on "+l.Interface)
				l.Healthy, l.Late = false, false
			}
		}
		if up := !slices.Contains(down, l.Name); err == nil && up != l.Up {
			a.lineChanged = true
			a.events.Add(events.Operator, l.Name, "line state", "up", up)
			l.Up = up
		}
		if l.Prefix.IsValid() {
			continue
		}
		var addr netip.Prefix
		if addrs, err := a.k.Addrs(l.Interface); err == nil {
			addr, _ = plan.LineAddress(addrs, l.GatewayAddr)
		}
		if addr != l.Address {
			a.lineChanged = true
			a.events.Add(events.Address, l.Name, "line address changed", "interface", l.Interface, "from", l.Address, "to", addr)
			l.Address = addr
		}
	}
	return err
}

// Apply brings the kernel to the desired state: sysctls, then routes and
// rules, then the datapath, then NAT. It goes on after errors and returns
// them all.
func (a *Agent) Apply() (Report, error) {
	var rep Report
	var errs []error
	a.lineChanged = false
	if err := a.refresh(); err != nil {
		errs = append(errs, err)
	}
	if a.refreshHA(time.Now()) {
		a.lineChanged = true
	}
	defer func() { a.appliedHA(time.Now(), len(errs) == 0) }()
	lines, kept := a.planLines()
	switch allDown := kept != nil; {
	case allDown && !a.allDown:
		a.events.Add(events.AllDown, "", "every line failed its probes: keeping the last configuration", "kept", kept)
	case !allDown && a.allDown:
		a.events.Add(events.AllDown, "", "a line answers again: leaving the last-configuration fallback")
	}
	a.allDown = kept != nil
	want := plan.Build(a.cfg, lines)
	lan := a.lanSubnets()
	want.NAT.LANSubnets = v4(lan)
	if a.kernel.RejectPrerouting != nil {
		want.NAT.Dead = nil
	}
	var err error
	// Forwarding goes on last, once the firewall is in place: a crash at
	// any instant of Apply never leaves a gateway forwarding without it.
	forwarding, others := plan.SplitForwarding(want.Sysctls)
	if rep.Sysctls, err = sysctl.Apply(a.k.Sysctls(), others, a.cfg.StateDir); err != nil {
		errs = append(errs, err)
	}
	if rep.Routing, err = routing.Reconcile(a.k.Routing(a.cfg.Routing.Protocol, a.scope), want); err != nil {
		errs = append(errs, err)
	}
	// A line coming back loses its TCP reset before the datapath gives it
	// new flows; a line going down gets its reset only after the datapath
	// stopped giving it new flows. Otherwise a new connection could be
	// reset in between.
	interim := want.NAT
	interim.Dead = slices.DeleteFunc(slices.Clone(want.NAT.Dead), func(d plan.DeadLine) bool {
		return !slices.Contains(a.dead, d.Line)
	})
	if len(interim.Dead) != len(want.NAT.Dead) || len(interim.Dead) != len(a.dead) {
		if _, err := a.k.ApplyNAT(interim); err != nil {
			errs = append(errs, err)
		}
	}
	datapathSynced := true
	if a.cfg.Datapath.On() {
		if err := a.k.SyncDatapath(a.cfg, lines, lan, a.log, a.events); err != nil {
			errs = append(errs, err)
			datapathSynced = false
		} else if a.cfg.HA != nil {
			if a.ha.clearFailed.CompareAndSwap(true, false) && a.ha.role == RoleStandby {
				a.ha.clearFlows = true
			}
			a.startClearFlows(a.k.FlowClearer())
		}
	}
	if rep.NAT, err = a.k.ApplyNAT(want.NAT); err != nil {
		errs = append(errs, err)
	} else {
		n, err := sysctl.Apply(a.k.Sysctls(), forwarding, a.cfg.StateDir)
		rep.Sysctls += n
		if err != nil {
			errs = append(errs, err)
		}
	}
	a.dead = a.dead[:0]
	for _, d := range want.NAT.Dead {
		a.dead = append(a.dead, d.Line)
	}
	// Lines that stopped serving lose their conntrack entries, after the
	// datapath moved their flows away and their TCP reset is in place (a
	// late line keeps them: it may only be slow).
	now := time.Now()
	usable := map[string]bool{}
	for _, l := range lines {
		if l.Serving() {
			usable[l.Name] = true
		} else if a.usable[l.Name] && l.Address.IsValid() {
			// Its NAT source: the VIP in an HA pair (the own address
			// too, for the gateway's own connections).
			addrs := []netip.Addr{l.Address.Addr()}
			switch {
			case l.NATAddr() == l.Address.Addr():
			case a.cfg.HA == nil:
				addrs = append([]netip.Addr{l.NATAddr()}, addrs...)
			case a.ha.role == RoleMaster:
				// In an HA pair the master's failing check (uplinkd
				// ha check -lines) hands the VIPs to the peer, which
				// may well carry the line: the VIP's connections are
				// flushed only if this gateway is still master, and
				// the line still not serving, after vipFlushGrace (a
				// flush now would reach the peer through conntrackd's
				// destroy events). The standby never flushes them:
				// its table holds the master's connections.
				if a.ha.vipFlush == nil {
					a.ha.vipFlush = map[string]time.Time{}
				}
				a.ha.vipFlush[l.Name] = now.Add(vipFlushGrace)
			}
			for _, addr := range addrs {
				n, err := a.k.FlushConntrack(addr)
				if err != nil {
					errs = append(errs, err)
				}
				a.events.Add(events.ConntrackFlush, l.Name, "conntrack flushed", "address", addr, "entries", n)
			}
		}
	}
	errs = append(errs, a.flushVIPsDue(lines, now)...)
	a.usable = usable
	if a.ha.pending {
		// Just became master: the connections synced from the peer of a
		// line that does not serve here would keep their VIP's NAT while
		// the datapath sends their UDP by another line (with the wrong
		// source), and their TCP keeps waiting: they go, as on a line
		// going down. A line without carrier here keeps them (as above).
		for _, l := range lines {
			if l.Serving() || !l.Carrier || !l.VIPPrefix.IsValid() {
				continue
			}
			n, err := a.k.FlushConntrack(l.VIPPrefix.Addr())
			if err != nil {
				errs = append(errs, err)
			}
			a.events.Add(events.ConntrackFlush, l.Name, "conntrack flushed", "address", l.VIPPrefix.Addr(), "entries", n, "why", "not serving at a takeover")
		}
	}
	if err := a.syncProbes(); err != nil {
		errs = append(errs, err)
	}
	// The policies' names by number once the datapath is in step (their
	// flows forgotten where ids were reused): a run stopped before (kill
	// -9) finds the previous names, and frees those ids again.
	if a.namesPending && datapathSynced {
		if err := statefile.Write(a.cfg.StateDir, policyNamesFile, policyNames(a.ruleIDs, a.policyIDs)); err != nil {
			errs = append(errs, err)
		} else {
			a.namesPending = false
		}
	}
	return rep, errors.Join(errs...)
}

// lockPins prepares the pin dir (mounting bpffs where it must) and takes
// its lock: one agent per pin dir, whatever their state dirs.
func lockPins(pinDir string, log *slog.Logger) (*statefile.Lock, error) {
	mounted, err := loader.PreparePinDir(pinDir)
	if err != nil {
		return nil, err
	}
	if mounted {
		log.Info("mounted bpffs: nothing was mounted there", "path", loader.BPFFSRoot)
	}
	return statefile.LockDir(pinDir)
}

// refuseForeign fails, naming them, when the nftables table, the rule
// priorities or the routing tables the plan needs hold what uplinkd did
// not create: it would replace or shadow them, so the operator picks other
// numbers instead.
func (a *Agent) refuseForeign() error {
	if err := nat.CheckOwned(a.env.NFT, a.cfg.Routing.NFTTable); err != nil {
		return err
	}
	k := &routing.Netlink{H: a.env.NL, Protocol: a.cfg.Routing.Protocol, Scope: a.scope}
	foreign, err := k.Foreign(plan.Needed(a.cfg))
	if err != nil {
		return err
	}
	if len(foreign) > 0 {
		return fmt.Errorf("what uplinkd needs holds rules or routes it did not create (pick other routing numbers or uplinks[].table):\n  %s",
			strings.Join(foreign, "\n  "))
	}
	return nil
}

// Close stops the probes and releases the agent's handles; the kernel
// state, BPF pins included, stays.
func (a *Agent) Close() {
	if a.health != nil {
		a.health.Stop()
	}
	a.stats.close()
	a.k.Close()
}

// Down removes everything uplinkd installed in env's namespace, as far as
// cfg names it (protocol tag, nftables table, state dir, pin dir), and
// nothing else: rules and routes with the tag, the table, the BPF
// programs (detached) and pins; the saved sysctls are put back.
func Down(cfg *config.Config, env *Env) error {
	var errs []error
	// The sysctls first: forwarding is back to what it was before the
	// firewall goes.
	_, restoreErr := sysctl.Restore(env.Sysctl, cfg.StateDir)
	if restoreErr != nil {
		errs = append(errs, restoreErr)
	}
	scope := plan.ScopeOf(cfg)
	saved, scopeErr := savedScope(cfg.StateDir)
	if scopeErr != nil {
		errs = append(errs, fmt.Errorf("rules and routes of earlier numbers not looked for (%s kept): %w", scopeFile, scopeErr))
	} else {
		scope = scope.Union(saved)
	}
	k := &routing.Netlink{H: env.NL, Protocol: cfg.Routing.Protocol, Scope: scope}
	_, routesErr := routing.Remove(k)
	if routesErr != nil {
		errs = append(errs, fmt.Errorf("removing rules and routes: %w", routesErr))
	}
	// Forwarding may still be on: the firewall stays until it is off.
	if restoreErr != nil {
		errs = append(errs, fmt.Errorf("nftables table inet %s kept: forwarding may still be on (restore the sysctls, then down again)", cfg.Routing.NFTTable))
	} else if err := nat.Remove(env.NFT, cfg.Routing.NFTTable); err != nil {
		errs = append(errs, err)
	}
	files := []string{linesDownFile, slotsFile, policyNamesFile}
	if routesErr == nil && scopeErr == nil {
		files = append(files, scopeFile) // kept until its rules and routes are gone
	}
	for _, f := range files {
		if err := statefile.Remove(cfg.StateDir, f); err != nil {
			errs = append(errs, err)
		}
	}
	if err := env.Do(func() error { return loader.Remove(cfg.Datapath.PinDir) }); err != nil {
		errs = append(errs, fmt.Errorf("removing datapath: %w", err))
	}
	return errors.Join(errs...)
}

// Timing of the run loop.
const (
	settle        = 10 * time.Millisecond  // events closer than this are one change
	minRepair     = 100 * time.Millisecond // at most ten event-driven reconciles a second
	fullReconcile = 5 * time.Second        // a reconcile even without events
	retryAfter    = time.Second            // after a failed reconcile
)

// Run applies the state, then keeps it applied until ctx ends: on every
// change of links, addresses, uplinkd's rules or routes (netlink events)
// and every fullReconcile. The kernel state stays when Run returns, so
// forwarding goes on; Down removes it. A first Apply that fails is
// rolled back, so nothing is left half-applied.
func (a *Agent) Run(ctx context.Context) error {
	lock, err := statefile.Acquire(a.cfg.StateDir)
	if err != nil {
		return err
	}
	defer lock.Release()
	if a.cfg.Datapath.On() {
		pins, err := lockPins(a.cfg.Datapath.PinDir, a.log)
		if err != nil {
			return err
		}
		defer pins.Release()
	}
	a.kernel = CheckKernel(a.env, a.cfg.Routing.NFTTable)
	if err := a.kernel.Refuse(a.cfg); err != nil {
		return err
	}
	a.kernel.Log(a.log, a.cfg)
	if err := a.refuseForeign(); err != nil {
		return err
	}
	if a.cfg.Datapath.On() {
		if err := loader.CheckPins(datapath.Options(a.cfg)); err != nil {
			return fmt.Errorf("%w\nthe datapath pinned there goes on forwarding with its maps; either give the config "+
				"the numbers the pinned maps have (datapath.flow_entries), or `uplinkd down` and run again "+
				"(flows are then pinned afresh; established TCP flows may break)", err)
		}
	}
	a.started = time.Now()
	// Requests wait for the run loop: a ping answers once the config is
	// applied.
	if err := ctlsock.Serve(ctx, a.cfg.StateDir, func(req ctlsock.Request) ctlsock.Reply { return a.handle(ctx, req) }); err != nil {
		return err
	}
	// What a previous run left (it did not `down`) is adopted, forwarding.
	adopting := a.adopting
	// Policies that take removed ones' ids must not inherit their pinned
	// flows: forgotten as the datapath is loaded, and those the previous
	// run's rules pin until this run's are in, after.
	if _, err := a.k.ForgetPolicies(a.reused); err != nil {
		return fmt.Errorf("freeing the ids of removed policies %v: %w", a.reused, err)
	}
	if err := writeSlots(a.cfg.StateDir, a.cfg.Slots()); err != nil {
		return err
	}
	a.namesPending = true // written by Apply, once it succeeded
	if err := writeScope(a.cfg.StateDir, a.scope); err != nil {
		return err
	}
	rep, err := a.Apply()
	if err != nil {
		// A fresh start leaves nothing half-applied. Adopted state is a
		// gateway that was forwarding: it is left as it is.
		if !adopting {
			if derr := Down(a.cfg, a.env); derr != nil {
				err = errors.Join(err, fmt.Errorf("rolling back: %w", derr))
			}
			return fmt.Errorf("applying: %w", err)
		}
		return fmt.Errorf("applying: %w\nthe kernel state of the previous run is left in place and forwarding goes on; "+
			"fix the config and run again, or `uplinkd down` to remove it all", err)
	}
	a.log.Info("applied", "changes", rep.String())

	links := ""
	if a.cfg.Datapath.On() {
		links = loader.LinksDir(a.cfg.Datapath.PinDir)
	}
	changes, carrierLost, err := watch(ctx, a.env.NS, a.cfg.Routing.Protocol, a.cfg.Routing.NFTTable, links, a.log)
	if err != nil {
		return err
	}
	a.health.Start(ctx)
	a.runCtx = ctx
	a.restartPrefixSetWatch(ctx)
	// Idle unless an ha block makes this gateway master (a reload may add
	// one; the state dir, where conntrackd's socket is, cannot change).
	go a.resyncConntrack(ctx, ha.ConntrackdSocket(a.cfg.StateDir), a.k.Sysctls())
	if err := a.syncProbes(); err != nil {
		a.log.Error("starting probes", "err", err)
	}
	defer a.health.Stop()
	tick := time.NewTicker(fullReconcile)
	defer tick.Stop()
	adapt := time.NewTicker(adaptEvery)
	defer adapt.Stop()
	var lastRepair time.Time
	for {
		var newConfig string
		repair := false
		select {
		case <-ctx.Done():
			return nil
		case cfg := <-a.reconfig:
			if err := a.reconfigure(cfg); err != nil {
				a.log.Error("new config refused, keeping the old one", "file", cfg.File(), "err", err)
				continue
			}
			newConfig = cfg.File()
		case r := <-a.setRead:
			if !a.takePrefixSets(r) {
				continue
			}
		case c := <-a.ctl:
			c.reply <- a.control(c.req)
			continue
		case r := <-a.health.Reports():
			if !a.observe(r) {
				continue
			}
		case <-adapt.C:
			if !a.adaptWeights() {
				continue
			}
		case <-tick.C:
			a.checkFlowMap(time.Now())
			// A sample, so that a status has rates even when nothing
			// asked for one lately.
			if counters := a.interfaceCounters(); counters != nil {
				a.stats.rates(counters, time.Now())
			}
		case <-changes:
			// Rate limit: someone deleting uplinkd's rules in a loop gets
			// a repair every minRepair, not a busy agent. A carrier loss
			// meanwhile ends the wait for more events.
			select {
			case <-time.After(max(settle, minRepair-time.Since(lastRepair))):
			case <-carrierLost:
				time.Sleep(minRepair - time.Since(lastRepair))
			}
			drain(changes)
			lastRepair = time.Now()
			repair = true
		case <-carrierLost:
			// Acted on at once: a dead line takes new flows until then.
			time.Sleep(minRepair - time.Since(lastRepair))
			drain(changes)
			lastRepair = time.Now()
			repair = true
		}
		rep, err := a.Apply()
		switch {
		case newConfig != "":
			a.events.Add(events.Config, "", "new config applied", "file", newConfig, "changes", rep.String())
		case repair && rep.Changed() && !a.lineChanged:
			a.events.Add(events.Restored, "", "reconciled", "changes", rep.String(), "why", "kernel state changed by someone else")
		case rep.Changed():
			a.log.Info("reconciled", "changes", rep.String())
		}
		if err != nil {
			a.reconcileErrors++
			a.log.Error("reconciling", "err", err)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(retryAfter):
			}
		}
	}
}

func drain(c <-chan struct{}) {
	for {
		select {
		case <-c:
		default:
			return
		}
	}
}
