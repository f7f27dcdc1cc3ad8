// SPDX-License-Identifier: Apache-2.0

package agent

import (
	"context"
	"time"

	"github.com/uplinkd/uplinkd/control/ctlsock"
	"github.com/uplinkd/uplinkd/control/events"
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
}

// FlowMapStatus is how full the datapath's flow map has been.
type FlowMapStatus struct {
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
	// Usable: new flows may be sent over the line (up, carrier, healthy,
	// addressed).
	Usable       bool `json:"usable"`
	Carrier      bool `json:"carrier"`
	OperatorDown bool `json:"operator_down"` // taken down with `uplinkd line NAME down`
	// Health is the probes' judgement: "up", "down" or "probing".
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
}

// status builds the Status, in the run loop.
func (a *Agent) status() Status {
	s := Status{Config: a.cfg.File(), AllLinesDown: a.allDown, Lines: []LineStatus{}, Attached: a.k.Attached()}
	if use, err := a.k.FlowMapUse(); err == nil {
		s.FlowMap = FlowMapStatus{Capacity: use.Capacity, Inserted: use.Inserted, EvictedAtLeast: use.EvictedAtLeast}
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
		if h, ok := hs[l.Name]; ok {
			ls.Health, ls.HealthSince, ls.HealthWhy = string(h.State), h.Since, h.Why
			ls.LossRatio, ls.RTTSeconds, ls.JitterSeconds, ls.Samples = h.Loss, h.RTT.Seconds(), h.Jitter.Seconds(), h.Samples
		}
		s.Lines = append(s.Lines, ls)
	}
	return s
}

// eventsWait bounds how long an events request waits for a new event
// (a long poll: `uplinkd events --follow` asks again).
const eventsWait = 20 * time.Second

// handle answers a control socket request: events straight from the ring
// (waiting for one when asked, without holding up the run loop), the
// rest in the run loop.
func (a *Agent) handle(ctx context.Context, req ctlsock.Request) ctlsock.Reply {
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
