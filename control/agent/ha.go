// SPDX-License-Identifier: Apache-2.0

package agent

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/uplinkd/uplinkd/control/ctlsock"
	"github.com/uplinkd/uplinkd/control/events"
	"github.com/uplinkd/uplinkd/control/ha"
	hstate "github.com/uplinkd/uplinkd/control/health"
	"github.com/uplinkd/uplinkd/control/plan"
	"github.com/uplinkd/uplinkd/control/sysctl"
)

// HA roles: the master holds the VIPs (keepalived moved them here) and
// forwards; the standby probes its lines from its own addresses and keeps
// its datapath loaded, ready for a takeover.
const (
	RoleMaster  = "master"
	RoleStandby = "standby"
)

// haState is this gateway's part in an HA pair, as the agent sees it.
type haState struct {
	role      string // "" until the first refresh
	since     time.Time
	takeovers uint64 // times this gateway became master since the agent started
	// The last takeover: when the LAN VIP was seen here, and how long from
	// then until the kernel state was applied for it (routes, NAT, the
	// datapath's NAT sources that recover the synced flows' lines).
	lastTakeover time.Time
	applyTook    time.Duration
	pending      bool // a takeover seen, its Apply not done yet
	// What keepalived's notify script said last, and when.
	notified   string
	notifiedAt time.Time
	// clearFlows: became standby, the flow map is to be emptied once the
	// datapath is synced; clearing: a clear runs (beside the run loop: a
	// million flows take a second or more).
	clearFlows bool
	clearing   atomic.Bool
	// vipFlush: lines whose VIP's connections the master flushes when
	// it is still master, and they still do not serve, at that time.
	vipFlush map[string]time.Time
	// startedMaster: the agent found this gateway master at its start.
	startedMaster bool
	// clearFailed: the last clear failed; the next Apply asks again.
	clearFailed atomic.Bool
	// master mirrors role == RoleMaster for the conntrackd resync, which
	// runs beside the run loop.
	master atomic.Bool
	resync resyncState
}

// resyncState is what the master's periodic conntrackd resyncs did.
type resyncState struct {
	mu      sync.Mutex
	every   time.Duration
	ok      uint64
	failed  uint64
	last    time.Time // the last one that succeeded
	lastErr string    // the last failure's error, "" once one succeeded again
}

// refreshHA follows the LAN VIP: on the first LAN interface, this gateway
// is master. It reports whether the role changed.
func (a *Agent) refreshHA(now time.Time) bool {
	ha := a.cfg.HA
	if ha == nil {
		// A reload removed the ha block: a single gateway, which never
		// empties its flow map; a block added again starts afresh.
		a.ha.master.Store(false)
		a.ha.role, a.ha.clearFlows, a.ha.pending = "", false, false
		return false
	}
	role := RoleStandby
	if addrs, err := a.k.Addrs(a.cfg.LAN.Interfaces[0]); err == nil {
		for _, p := range addrs {
			if p.Addr() == ha.LANVIPPrefix.Addr() {
				role = RoleMaster
			}
		}
	}
	a.ha.master.Store(role == RoleMaster)
	if role == a.ha.role {
		return false
	}
	first := a.ha.role == ""
	a.ha.role, a.ha.since = role, now
	// An agent that starts on the master (a restart, an upgrade) finds it
	// forwarding with the state it adopted: it is ready at once, or the
	// restart would hand the VIPs to the peer and take them back.
	a.ha.startedMaster = first && role == RoleMaster
	// An ex-master's pins are stale: while the peer forwarded, a flow may
	// have ended and its ports been reused by another, or moved to
	// another line. They go; a takeover recovers every flow's line from
	// the conntrack entries the peer synced. A standby at start clears
	// them too (a previous run may have been master).
	a.ha.clearFlows = role == RoleStandby
	if role == RoleMaster && !first {
		a.ha.takeovers++
		a.ha.lastTakeover, a.ha.pending = now, true
	}
	a.events.Add(events.HARole, "", "HA role", "role", role, "vip", ha.LANVIPPrefix.Addr(), "first", first)
	return true
}

// appliedHA notes that an Apply ended: a pending takeover is complete
// once an Apply after it succeeded (ok).
func (a *Agent) appliedHA(now time.Time, ok bool) {
	if !a.ha.pending || !ok {
		return
	}
	a.ha.pending = false
	a.ha.applyTook = now.Sub(a.ha.lastTakeover)
	a.events.Add(events.HATakeover, "", "took over as master", "applied_in", a.ha.applyTook)
}

// controlHACheck answers keepalived's track script (uplinkd ha check),
// whose failure lowers this gateway's VRRP priority, so that the peer
// holds the VIPs while this one has a reason not to:
//   - it started less than ha.ReadyAfter ago (conntrackd's resync, its
//     lines' first judgement), unless it is master: it started on the
//     master, or became master meanwhile, which it does only when the peer
//     is absent or not ready either (a ready peer outranks a starting
//     gateway), and failing would only hand the VIPs to that peer and take
//     them back (two gateways started together did, in CI);
//   - a line not taken down by the operator is without carrier, or not
//     up by its probes (probing after its link came back, or down): the
//     peer may well have it (a line down for both lowers both, and the
//     master stays);
//   - as master, a line's VIP is missing from its interface (someone
//     removed it: its NAT'd traffic gets no replies here).
//
// keepalived tracks no line interface itself: a fault there would take
// both gateways down when a line's link dies for both, and a priority it
// restores the moment a link comes back would have this gateway take the
// VIPs before the line is up again.
func (a *Agent) controlHACheck(now time.Time) ctlsock.Reply {
	if a.cfg.HA == nil {
		return ctlsock.Reply{Error: fmt.Sprintf("%s has no ha block", a.cfg.File())}
	}
	if left := ha.ReadyAfter(a.cfg) - now.Sub(a.started); left > 0 && !a.ha.startedMaster && a.ha.role != RoleMaster {
		return ctlsock.Reply{Error: fmt.Sprintf("starting: ready for the VIPs in %v (its lines' health, conntrackd's resync)", left.Round(100*time.Millisecond))}
	}
	health := a.Health()
	for _, l := range a.lines {
		if !l.Up {
			continue
		}
		if !l.Carrier {
			return ctlsock.Reply{Error: fmt.Sprintf("line %s has no carrier on %s here", l.Name, l.Interface)}
		}
		if st, ok := health[l.Name]; ok && st.State != hstate.Up && st.State != hstate.Late {
			return ctlsock.Reply{Error: fmt.Sprintf("line %s is %s here", l.Name, st.State)}
		}
	}
	if a.ha.role == RoleMaster {
		for _, l := range a.cfg.Lines {
			if !l.VIPPrefix.IsValid() {
				continue
			}
			addrs, err := a.k.Addrs(l.Interface)
			if err == nil && !slices.ContainsFunc(addrs, func(p netip.Prefix) bool { return p.Addr() == l.VIPPrefix.Addr() }) {
				return ctlsock.Reply{Error: fmt.Sprintf("master without line %s's VIP %s on %s", l.Name, l.VIPPrefix, l.Interface)}
			}
		}
	}
	return ctlsock.Reply{Message: "ready"}
}

// controlHANotify records what keepalived's notify script says and
// reconciles at once (the VIPs have moved, or are about to).
func (a *Agent) controlHANotify(state string) ctlsock.Reply {
	if a.cfg.HA == nil {
		return ctlsock.Reply{Error: fmt.Sprintf("%s has no ha block", a.cfg.File())}
	}
	if state != "master" && state != "backup" && state != "fault" {
		return ctlsock.Reply{Error: fmt.Sprintf("unknown HA state %q: want master, backup or fault", state)}
	}
	a.ha.notified, a.ha.notifiedAt = state, time.Now()
	a.events.Add(events.HANotify, "", "keepalived notify", "state", state)
	if _, err := a.Apply(); err != nil {
		return ctlsock.Reply{Message: "noted: " + state, Error: "applying: " + err.Error()}
	}
	return ctlsock.Reply{Message: fmt.Sprintf("noted: %s; this gateway is %s", state, a.ha.role)}
}

// vipFlushGrace is how long a master waits before it flushes the
// connections of a line that stopped serving: its check fails within two
// seconds (fall 2 of 1 s) and the peer takes over at its next advert.
const vipFlushGrace = 4 * time.Second

// flushVIPsDue flushes the VIP connections of lines whose grace ended
// with this gateway still master and the line still not serving; a line
// that serves again, or a role change, cancels its flush.
func (a *Agent) flushVIPsDue(lines []plan.Line, now time.Time) []error {
	var errs []error
	for _, l := range lines {
		at, ok := a.ha.vipFlush[l.Name]
		switch {
		case !ok:
			continue
		case l.Serving() || a.ha.role != RoleMaster || a.cfg.HA == nil:
			delete(a.ha.vipFlush, l.Name)
			continue
		case now.Before(at):
			continue
		}
		delete(a.ha.vipFlush, l.Name)
		n, err := a.k.FlushConntrack(l.NATAddr())
		if err != nil {
			errs = append(errs, err)
		}
		a.events.Add(events.ConntrackFlush, l.Name, "conntrack flushed", "address", l.NATAddr(), "entries", n,
			"why", "still master "+vipFlushGrace.String()+" after the line stopped serving")
	}
	return errs
}

// startClearFlows empties the flow map beside the run loop, if this
// gateway became standby and no clear runs already (else at a later
// Apply). clear is bound to the datapath loaded now; a clear that fails is
// tried again at the next Apply.
func (a *Agent) startClearFlows(clear func() (int, error)) {
	if !a.ha.clearFlows || !a.ha.clearing.CompareAndSwap(false, true) {
		return
	}
	a.ha.clearFlows = false
	a.spawn(func() {
		defer a.ha.clearing.Store(false)
		start := time.Now()
		n, err := clear()
		if err != nil {
			a.log.Error("emptying the flow map of a standby", "err", err, "removed", n)
			a.ha.clearFailed.Store(true)
			return
		}
		a.events.Add(events.HAFlowsCleared, "", "standby: flow map emptied", "flows", n, "took", time.Since(start).Round(time.Millisecond))
	})
}

// udpStreamTimeoutPath is conntrack's timeout of an assured UDP flow, the
// shortest of a steady flow that sends no conntrack event while it runs.
const udpStreamTimeoutPath = "net/netfilter/nf_conntrack_udp_timeout_stream"

// resyncConntrack runs until ctx ends: while this gateway is master it has
// conntrackd send its connections to the peer every ha.ResyncEvery of the
// UDP stream timeout, with a dump of the kernel table first every
// ha.DumpEvery-th time, so that the standby's copies of long, steady flows
// never time out there (ha.Resync says why). Beside the run loop: a
// resync of a big table takes conntrackd a while. A failure is an event
// at most once per resyncReportEvery; status counts every one.
func (a *Agent) resyncConntrack(ctx context.Context, socket string, sysctls sysctl.FS) {
	r := &a.ha.resync
	var (
		last     time.Time // the last resync asked for, or when this gateway became master
		n        int       // resyncs asked for since then
		reported time.Time // the last failure made an event
	)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		// Read every second: an operator may change the timeout.
		timeout := 120 * time.Second // the kernel's default
		if v, err := sysctls.Get(udpStreamTimeoutPath); err == nil {
			if s, err := strconv.Atoi(v); err == nil && s > 0 {
				timeout = time.Duration(s) * time.Second
			}
		}
		every := ha.ResyncEvery(timeout)
		r.mu.Lock()
		r.every = every
		r.mu.Unlock()
		if !a.ha.master.Load() {
			// keepalived's notify script resyncs at a takeover.
			last, n = time.Time{}, 0
			continue
		}
		if last.IsZero() {
			last = time.Now()
		}
		// Half a tick early rather than a tick late.
		if time.Since(last) < every-500*time.Millisecond {
			continue
		}
		last = time.Now()
		n++
		c, cancel := context.WithTimeout(ctx, every)
		err := ha.Resync(c, socket, n%ha.DumpEvery == 0)
		cancel()
		r.mu.Lock()
		if err == nil {
			r.ok++
			r.last, r.lastErr = time.Now(), ""
		} else {
			r.failed++
			r.lastErr = err.Error()
		}
		r.mu.Unlock()
		if err != nil && ctx.Err() == nil && time.Since(reported) >= resyncReportEvery {
			reported = time.Now()
			a.events.Add(events.HAResyncFailed, "", "conntrackd resync failed: the standby's copies of steady flows may time out", "err", err)
		}
	}
}

// resyncReportEvery spaces the events of failing resyncs (no conntrackd:
// one every 40 s would fill the event ring in hours).
const resyncReportEvery = time.Minute

// resyncStatus fills h's conntrackd resync fields.
func (a *Agent) resyncStatus(h *HAStatus) {
	r := &a.ha.resync
	r.mu.Lock()
	defer r.mu.Unlock()
	h.ResyncEverySeconds = r.every.Seconds()
	h.Resyncs, h.ResyncErrors, h.ResyncError = r.ok, r.failed, r.lastErr
	if !r.last.IsZero() {
		last := r.last
		h.LastResync = &last
	}
}
