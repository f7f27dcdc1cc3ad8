// SPDX-License-Identifier: Apache-2.0

package agent

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"time"

	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/ctlsock"
	"github.com/uplinkd/uplinkd/control/events"
	"github.com/uplinkd/uplinkd/control/flows"
	"github.com/uplinkd/uplinkd/control/plan"
	"github.com/uplinkd/uplinkd/loader"
)

// Status is what `uplinkd status --json` prints: the agent's view of every
// line and of the datapath. Field names are part of the documented schema.
type Status struct {
	Config string `json:"config"`
	// AllLinesDown: every line failed its probes; the last usable lines
	// are kept carrying traffic.
	AllLinesDown bool         `json:"all_lines_down"`
	Lines        []LineStatus `json:"lines"`
	// Attached is the datapath's attach mode ("tcx" or "tc") by interface.
	Attached map[string]string `json:"attached,omitempty"`
	FlowMap  FlowMapStatus     `json:"flow_map"`
	// Reasons counts the packets LAN ingress handled, by datapath reason
	// (new_flow, existing_flow, foreign_src, ...: see bpf/lib/reasons.h).
	Reasons map[string]uint64 `json:"reasons,omitempty"`
	// SlowParsed counts the LAN packets that the datapath's fast parser
	// (direct packet access) could not read, so the full one did.
	SlowParsed uint64 `json:"slow_parsed"`
	Totals     Totals `json:"totals"`
	// ReconcileErrors counts applies that failed since the agent started;
	// Restored the repairs of state someone else changed.
	ReconcileErrors uint64 `json:"reconcile_errors"`
	Restored        uint64 `json:"restored"`
	// DatapathError says why the datapath figures are missing, if they are.
	DatapathError string `json:"datapath_error,omitempty"`
	// HA is this gateway's part in an HA pair; absent without an ha block.
	HA *HAStatus `json:"ha,omitempty"`
	// Policies and Rules: every policy by id and every rule in order;
	// absent without rules (every flow takes the balanced policy).
	Policies []PolicyStatus `json:"policies,omitempty"`
	Rules    []RuleStatus   `json:"rules,omitempty"`
}

// PolicyStatus is one policy: which of its tiers new flows use now.
type PolicyStatus struct {
	ID         int    `json:"id"`
	Name       string `json:"name"`
	LastResort string `json:"last_resort"`
	// Tier is the tier (1-based, by metric) whose lines get the policy's
	// new flows now; 0 when none of its lines is usable (the last
	// resort), and Lines are those lines.
	Tier  int      `json:"tier"`
	Lines []string `json:"lines"`
	// Flows counts the new flows the rules gave the policy since the
	// datapath's maps were created, while a rule set was in force (the
	// balanced policy's include those no rule matched).
	Flows uint64 `json:"flows"`
	// Pinned counts the policy's flows in the flow map now (counted with
	// the flows per line, see LineStatus.Flows).
	Pinned int `json:"pinned"`
	// The traffic of those flows that the datapath forwarded, as the
	// lines' forwarded counters count it (Tx at LAN ingress, Rx at LAN
	// egress). A gateway without rules counts nothing here: all its
	// traffic is the balanced policy's, the lines' forwarded counters.
	TxPackets uint64 `json:"tx_packets"`
	TxBytes   uint64 `json:"tx_bytes"`
	RxPackets uint64 `json:"rx_packets"`
	RxBytes   uint64 `json:"rx_bytes"`
}

// RuleStatus is one rule and the new flows it matched.
type RuleStatus struct {
	Name   string `json:"name"`
	Policy string `json:"policy"`
	// Hits counts the new flows the rule matched since its rule set was
	// installed (a reload that changes the rules starts again from 0).
	Hits uint64 `json:"hits"`
}

// HAStatus is this gateway's part in an HA pair.
type HAStatus struct {
	Role  string    `json:"role"` // "master" (it holds the VIPs) or "standby"
	Since time.Time `json:"since"`
	// Takeovers counts the times it became master since the agent
	// started; LastTakeover is the last, and TakeoverApplySeconds how long
	// the kernel state took to follow it.
	Takeovers            uint64     `json:"takeovers"`
	LastTakeover         *time.Time `json:"last_takeover,omitempty"`
	TakeoverApplySeconds float64    `json:"takeover_apply_seconds"`
	// Notified is what keepalived's notify script said last ("" none).
	Notified   string     `json:"notified,omitempty"`
	NotifiedAt *time.Time `json:"notified_at,omitempty"`
	// The master's conntrackd resyncs, every ResyncEverySeconds: done,
	// failed, when the last succeeded and the last error (until one
	// succeeds again).
	ResyncEverySeconds float64    `json:"resync_every_seconds"`
	Resyncs            uint64     `json:"resyncs"`
	ResyncErrors       uint64     `json:"resync_errors"`
	LastResync         *time.Time `json:"last_resync,omitempty"`
	ResyncError        string     `json:"resync_error,omitempty"`
}

// Totals sums the lines.
type Totals struct {
	TxBytes uint64 `json:"tx_bytes"`
	RxBytes uint64 `json:"rx_bytes"`
	Flows   int    `json:"flows"`
}

// FlowMapStatus is how full the datapath's flow map has been.
type FlowMapStatus struct {
	Entries  int    `json:"entries"` // flows in the map now
	Capacity int    `json:"capacity"`
	Inserted uint64 `json:"inserted"` // flows pinned since the maps were created
	// EvictedAtLeast: flows only leave the map when the LRU evicts them
	// for a new one, so at least this many pins were lost.
	EvictedAtLeast uint64 `json:"evicted_at_least"`
}

// LineStatus is one line in a Status.
type LineStatus struct {
	Name      string `json:"name"`
	Number    int    `json:"number"`
	Interface string `json:"interface"`
	Address   string `json:"address,omitempty"` // "" until the interface has one in the gateway's subnet
	Gateway   string `json:"gateway"`
	// Usable: new flows may be sent over the line (up, carrier, healthy and
	// not late, addressed).
	Usable       bool `json:"usable"`
	Carrier      bool `json:"carrier"`
	OperatorDown bool `json:"operator_down"` // taken down with `uplinkd line NAME down`
	// Health is the probes' judgement: "up", "late", "down" or "probing".
	Health        string    `json:"health"`
	HealthSince   time.Time `json:"health_since"`
	HealthWhy     string    `json:"health_why"`
	LossRatio     float64   `json:"loss_ratio"`
	RTTSeconds    float64   `json:"rtt_seconds"`
	JitterSeconds float64   `json:"jitter_seconds"`
	Samples       int       `json:"samples"` // probes in the window of the figures above
	// WeightConfigured is the config's weight; WeightEffective the share
	// new flows get now (adaptive weights change it).
	WeightConfigured int `json:"weight_configured"`
	WeightEffective  int `json:"weight_effective"`
	// StateChanges counts the line's health changes (up, late, down, probing)
	// since the agent started.
	StateChanges uint64 `json:"state_changes"`
	// Packets and bytes on the line's interface, as the kernel counts them
	// (Tx: out to the ISP; the gateway's own traffic included), and their
	// rate over the last second or so.
	TxPackets        uint64  `json:"tx_packets"`
	TxBytes          uint64  `json:"tx_bytes"`
	RxPackets        uint64  `json:"rx_packets"`
	RxBytes          uint64  `json:"rx_bytes"`
	TxBytesPerSecond float64 `json:"tx_bytes_per_second"`
	RxBytesPerSecond float64 `json:"rx_bytes_per_second"`
	// The LAN's traffic forwarded over the line, as the datapath counts it
	// from the flows pinned there (Tx at LAN ingress, Rx at LAN egress).
	ForwardedTxPackets uint64 `json:"forwarded_tx_packets"`
	ForwardedTxBytes   uint64 `json:"forwarded_tx_bytes"`
	ForwardedRxPackets uint64 `json:"forwarded_rx_packets"`
	ForwardedRxBytes   uint64 `json:"forwarded_rx_bytes"`
	Flows              int    `json:"flows"` // flows pinned to it
}

// status builds the Status, in the run loop.
func (a *Agent) status() Status {
	s := Status{
		Config: a.cfg.File(), AllLinesDown: a.allDown, Lines: []LineStatus{}, Attached: a.k.Attached(),
		ReconcileErrors: a.reconcileErrors, Restored: a.events.CountKind(events.Restored),
	}
	if use, err := a.k.FlowMapUse(); err == nil {
		s.FlowMap = FlowMapStatus{Capacity: use.Capacity, Inserted: use.Inserted, EvictedAtLeast: use.EvictedAtLeast}
	}
	if a.cfg.HA != nil {
		h := &HAStatus{Role: a.ha.role, Since: a.ha.since, Takeovers: a.ha.takeovers,
			TakeoverApplySeconds: a.ha.applyTook.Seconds(), Notified: a.ha.notified}
		if !a.ha.lastTakeover.IsZero() {
			h.LastTakeover = &a.ha.lastTakeover
		}
		if !a.ha.notifiedAt.IsZero() {
			h.NotifiedAt = &a.ha.notifiedAt
		}
		a.resyncStatus(h)
		s.HA = h
	}
	hs := a.Health()
	for _, l := range a.lines {
		ls := LineStatus{
			Name: l.Name, Number: l.Slot, Interface: l.Interface, Gateway: l.GatewayAddr.String(),
			Usable: l.Usable(), Carrier: l.Carrier, OperatorDown: !l.Up,
			WeightConfigured: l.Weight, WeightEffective: l.EffectiveWeight(),
		}
		if l.Address.IsValid() {
			ls.Address = l.Address.Addr().String()
		}
		for _, kind := range []string{events.LineUp, events.LineLate, events.LineOnTime, events.LineDown, events.LineProbing} {
			ls.StateChanges += a.events.Count(kind, l.Name)
		}
		if h, ok := hs[l.Name]; ok {
			ls.Health, ls.HealthSince, ls.HealthWhy = string(h.State), h.Since, h.Why
			ls.LossRatio, ls.RTTSeconds, ls.JitterSeconds, ls.Samples = h.Loss, h.RTT.Seconds(), h.Jitter.Seconds(), h.Samples
		}
		s.Lines = append(s.Lines, ls)
	}
	s.Policies, s.Rules = policyStatus(a.cfg, a.lines)
	counters := a.interfaceCounters()
	rates := a.stats.rates(counters, time.Now())
	for i := range s.Lines {
		l := &s.Lines[i]
		idx := l.Number - 1
		if counters == nil || idx < 0 || idx >= len(counters) {
			continue
		}
		c := counters[idx]
		l.TxPackets, l.TxBytes, l.RxPackets, l.RxBytes = c.TxPackets, c.TxBytes, c.RxPackets, c.RxBytes
		l.TxBytesPerSecond, l.RxBytesPerSecond = rates[idx][0], rates[idx][1]
		s.Totals.TxBytes += c.TxBytes
		s.Totals.RxBytes += c.RxBytes
	}
	return s
}

// interfaceCounters are the kernel's counters of each line's interface,
// indexed by line (number - 1), in the run loop; nil without a kernel.
func (a *Agent) interfaceCounters() []loader.LineStats {
	if a.env == nil {
		return nil
	}
	out := make([]loader.LineStats, loader.MaxLines)
	for _, l := range a.lines {
		idx := l.Slot - 1
		if idx < 0 || idx >= len(out) {
			continue
		}
		link, err := a.env.NL.LinkByName(l.Interface)
		if err != nil || link.Attrs().Statistics == nil {
			continue
		}
		st := link.Attrs().Statistics
		out[idx] = loader.LineStats{TxPackets: st.TxPackets, TxBytes: st.TxBytes, RxPackets: st.RxPackets, RxBytes: st.RxBytes}
	}
	return out
}

// addDatapath adds the datapath's figures to a status, outside the run
// loop (reading a large flow map takes a while; the maps need no lock).
func (a *Agent) addDatapath(s *Status) {
	st, err := a.stats.open(a.pinDir)
	if err != nil {
		s.DatapathError = err.Error()
		return
	}
	lines, err := st.LineStats()
	if err == nil {
		s.Reasons, err = st.Reasons()
	}
	if err == nil {
		s.SlowParsed, err = st.SlowParsed()
	}
	var counts flows.Counts
	var use loader.FlowMapUse
	if err == nil {
		use, err = st.FlowMapUseFrom(s.Reasons)
	}
	if err == nil {
		// What changes the count by line (and by policy): flows pinned,
		// moved off a dead line, removed with a line (evictions come with
		// pins), whose policy was forgotten.
		changes := use.Inserted + use.Removed + use.Forgotten + s.Reasons["moved_flow"]
		counts, err = a.stats.countFlows(st, changes, time.Now)
		s.FlowMap.Entries = counts.Total
	}
	if err != nil {
		s.DatapathError = err.Error()
		return
	}
	if len(s.Rules) > 0 {
		if err := addPolicyCounts(st, s); err != nil {
			s.DatapathError = err.Error()
			return
		}
	}
	for i := range s.Lines {
		l := &s.Lines[i]
		idx := l.Number - 1
		if idx < 0 || idx >= len(lines) {
			continue
		}
		c := lines[idx]
		l.ForwardedTxPackets, l.ForwardedTxBytes, l.ForwardedRxPackets, l.ForwardedRxBytes = c.TxPackets, c.TxBytes, c.RxPackets, c.RxBytes
		l.Flows = counts.PerLine[l.Number]
	}
	s.Totals.Flows = s.FlowMap.Entries
	addPinnedFlows(s, counts)
}

// statsReader reads the pinned maps for status, and keeps the last
// samples of the line interfaces' counters to give rates.
type statsReader struct {
	mu    sync.Mutex
	st    *loader.Stats
	prev  []loader.LineStats // the sample before last
	prevT time.Time
	last  []loader.LineStats
	lastT time.Time
	// counted is the last count of the flows by line; held while a walk
	// runs, so that statuses asked meanwhile wait for it and share it.
	counted flowCount
}

// flowCountReuse bounds the cost of counting flows: a count is reused
// while younger than this many times the walk that made it took, so
// that however often statuses and scrapes ask, walking the flow map
// takes at most about 1/flowCountReuse of a core. A million flows (a
// walk of 0.5 to 2 s) are counted at most every minute or so.
const flowCountReuse = 50

// flowCountCheap is a walk short enough to redo whenever the map changed:
// a count of a small map is never stale (an emulated test VM walks a
// 64K-bucket map in tens of milliseconds, and a reused count there was
// seconds old).
const flowCountCheap = 250 * time.Millisecond

// flowCountSmall is a count always redone when the map changed, however
// long its walk took: in an emulated test VM under load a walk of a map
// holding 2 flows took more than flowCountCheap, and the reused count
// missed the 18 flows pinned since.
const flowCountSmall = 100000

// flowCount is a count of the flow map's flows, by line number and in
// all. The datapath keeps no count: the map is walked.
type flowCount struct {
	mu      sync.Mutex
	counts  flows.Counts
	at      time.Time     // when the walk ended; zero: never counted
	took    time.Duration // what it took
	changes uint64        // the map's pins, moves and removals when it was walked
}

// countFlows returns the flows by line and in all: the last walk's where
// the map's pins, moves and removals (changes, from the datapath's
// counters) are the same since, or where the walk was expensive and is recent (see
// flowCountReuse); else a fresh walk of the flow map.
func (r *statsReader) countFlows(src flows.Source, changes uint64, now func() time.Time) (flows.Counts, error) {
	c := &r.counted
	c.mu.Lock()
	defer c.mu.Unlock()
	start := now()
	expensive := c.took >= flowCountCheap && c.counts.Total >= flowCountSmall
	if !c.at.IsZero() && (changes == c.changes || expensive && start.Sub(c.at) < flowCountReuse*c.took) {
		return c.counts, nil
	}
	counts, err := flows.Count(src)
	if err != nil {
		return flows.Counts{}, err
	}
	c.counts, c.at, c.changes = counts, now(), changes
	c.took = c.at.Sub(start)
	return counts, nil
}

func (r *statsReader) open(pinDir string) (*loader.Stats, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.st == nil {
		st, err := loader.OpenStats(pinDir)
		if err != nil {
			return nil, err
		}
		r.st = st
	}
	return r.st, nil
}

// rates returns bytes per second (tx, rx) per line since a sample at
// least half a second old.
func (r *statsReader) rates(now []loader.LineStats, at time.Time) [][2]float64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.last != nil && at.Sub(r.lastT) >= 500*time.Millisecond {
		r.prev, r.prevT = r.last, r.lastT
		r.last, r.lastT = now, at
	} else if r.last == nil {
		r.last, r.lastT = now, at
	}
	out := make([][2]float64, len(now))
	if r.prev == nil {
		return out
	}
	dt := at.Sub(r.prevT).Seconds()
	for i := range min(len(now), len(r.prev)) {
		if now[i].TxBytes >= r.prev[i].TxBytes && now[i].RxBytes >= r.prev[i].RxBytes {
			out[i] = [2]float64{float64(now[i].TxBytes-r.prev[i].TxBytes) / dt, float64(now[i].RxBytes-r.prev[i].RxBytes) / dt}
		}
	}
	return out
}

func (r *statsReader) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.st != nil {
		r.st.Close()
		r.st = nil
	}
}

// Status asks the run loop for the agent's status and adds the
// datapath's figures (for the metrics endpoint, in the agent's process).
func (a *Agent) Status(ctx context.Context) (Status, error) {
	rep := a.handle(ctx, ctlsock.Request{Cmd: "status"})
	if rep.Error != "" {
		return Status{}, errors.New(rep.Error)
	}
	var s Status
	err := json.Unmarshal(rep.Data, &s)
	return s, err
}

// eventsWait bounds how long an events request waits for a new event
// (a long poll: `uplinkd events --follow` asks again).
const eventsWait = 20 * time.Second

// handle answers a control socket request: events straight from the ring
// (waiting for one when asked, without holding up the run loop), the
// rest in the run loop.
func (a *Agent) handle(ctx context.Context, req ctlsock.Request) ctlsock.Reply {
	if req.Cmd == "status" {
		rep := a.call(ctx, req)
		if rep.Error != "" || a.pinDir == "" || a.env == nil {
			return rep
		}
		var s Status
		if err := json.Unmarshal(rep.Data, &s); err != nil {
			return ctlsock.Reply{Error: err.Error()}
		}
		a.addDatapath(&s)
		return ctlsock.DataReply(s)
	}
	if req.Cmd != "events" {
		return a.call(ctx, req)
	}
	evs, changed := a.events.Since(req.Since)
	if len(evs) == 0 && req.Wait {
		select {
		case <-changed:
			evs, _ = a.events.Since(req.Since)
		case <-time.After(eventsWait):
		case <-ctx.Done():
		}
	}
	if evs == nil {
		evs = []events.Event{}
	}
	return ctlsock.DataReply(evs)
}

// policyStatus is every policy with the tier in use, and every rule; nil
// for a config without rules.
func policyStatus(cfg *config.Config, lines []plan.Line) ([]PolicyStatus, []RuleStatus) {
	if len(cfg.Rules) == 0 {
		return nil, nil
	}
	var ps []PolicyStatus
	for _, p := range cfg.PolicyList() {
		st := PolicyStatus{ID: p.ID, Name: p.Name, LastResort: p.LastResort, Lines: []string{}}
		if t, in := plan.ActiveTier(p, lines); t >= 0 {
			st.Tier, st.Lines = t+1, in
		}
		ps = append(ps, st)
	}
	rs := make([]RuleStatus, len(cfg.Rules))
	for i, r := range cfg.Rules {
		rs[i] = RuleStatus{Name: r.Name, Policy: r.Policy}
	}
	return ps, rs
}

// addPolicyCounts adds the datapath's rule hits, and flows and traffic per
// policy. The
// hits are those of the rule set installed now, which is the config's but
// for an instant after a reload.
func addPolicyCounts(st *loader.Stats, s *Status) error {
	hits, err := st.RuleHits()
	if err != nil {
		return err
	}
	newFlows, err := st.PolicyFlows()
	if err != nil {
		return err
	}
	traffic, err := st.PolicyStats()
	if err != nil {
		return err
	}
	for i := range s.Rules {
		if i < len(hits) {
			s.Rules[i].Hits = hits[i]
		}
	}
	for i := range s.Policies {
		p := &s.Policies[i]
		if p.ID < len(newFlows) {
			p.Flows = newFlows[p.ID]
		}
		if p.ID < len(traffic) {
			t := traffic[p.ID]
			p.TxPackets, p.TxBytes, p.RxPackets, p.RxBytes = t.TxPackets, t.TxBytes, t.RxPackets, t.RxBytes
		}
	}
	return nil
}

// addPinnedFlows adds each policy's flows in the flow map now.
func addPinnedFlows(s *Status, counts flows.Counts) {
	for i := range s.Policies {
		s.Policies[i].Pinned = counts.PerPolicy[s.Policies[i].ID]
	}
}
