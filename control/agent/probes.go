// SPDX-License-Identifier: Apache-2.0

package agent

import (
	"errors"
	"fmt"
	"time"

	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/events"
	"github.com/uplinkd/uplinkd/control/health"
)

// adaptEvery is how often adaptive weights are recomputed: weight changes
// are rate-limited to one per line per period.
const adaptEvery = 5 * time.Second

// syncProbes hands the monitor the lines that can be probed: those with
// a source address (a line without one is unusable anyway).
func (a *Agent) syncProbes() error {
	if a.health == nil || !a.health.Started() {
		return nil
	}
	var specs []health.Line
	var errs []error
	for _, l := range a.lines {
		if !l.Address.IsValid() {
			continue
		}
		link, err := a.env.NL.LinkByName(l.Interface)
		if err != nil {
			errs = append(errs, fmt.Errorf("probing %s: %w", l.Name, err))
			continue
		}
		specs = append(specs, health.Line{
			Name: l.Name, Ifname: l.Interface, Ifindex: link.Attrs().Index, MAC: link.Attrs().HardwareAddr,
			Mark: l.Mark, Source: l.Address.Addr(), Gateway: l.GatewayAddr, Probe: l.Probe,
		})
	}
	return errors.Join(append(errs, a.health.Sync(specs, a.cfg.Health))...)
}

// observe judges a line from one round; it reports whether the line's
// usability changed, so that the kernel state must follow.
func (a *Agent) observe(r health.Report) bool {
	st, changed := a.health.Observe(r)
	if !changed {
		return false
	}
	kind := map[health.State]string{health.Up: events.LineUp, health.Late: events.LineLate, health.Down: events.LineDown, health.Probing: events.LineProbing}[st.State]
	for i := range a.lines {
		if a.lines[i].Name != r.Line {
			continue
		}
		l := &a.lines[i]
		if st.State == health.Up && l.Late {
			kind = events.LineOnTime // its answers came late: it never went down
		}
		a.events.Add(kind, r.Line, "line health", "state", st.State, "why", st.Why, "loss", fmt.Sprintf("%.2f", st.Loss), "rtt", st.RTT)
		healthy := st.State == health.Up || st.State == health.Late
		// Late moves the datapath's buckets; without the datapath the
		// multipath route is all the steering, and taking a late line out
		// of it would move flows: the line stays in use.
		late := st.State == health.Late && a.cfg.Datapath.On()
		changed := l.Healthy != healthy || l.Late != late
		l.Healthy, l.Late = healthy, late
		return changed
	}
	a.events.Add(kind, r.Line, "line health", "state", st.State, "why", st.Why, "loss", fmt.Sprintf("%.2f", st.Loss), "rtt", st.RTT)
	return false
}

// adaptWeights recomputes adaptive weights from the lines' health; it
// reports whether any changed.
func (a *Agent) adaptWeights() bool {
	if a.cfg.Weights != config.WeightsAdaptive {
		return false
	}
	changed := false
	for i := range a.lines {
		l := &a.lines[i]
		st, ok := a.healthOf(l.Name)
		if !ok {
			continue
		}
		w := health.AdaptiveWeight(l.Weight, st)
		if w == l.EffectiveWeight() {
			continue
		}
		a.events.Add(events.Weight, l.Name, "weight changed", "from", l.EffectiveWeight(), "to", w,
			"configured", l.Weight, "loss", fmt.Sprintf("%.2f", st.Loss), "rtt", st.RTT, "best_rtt", st.BestRTT)
		l.AdaptedWeight = w
		changed = true
	}
	return changed
}

func (a *Agent) healthOf(line string) (health.Status, bool) {
	if a.health == nil {
		return health.Status{}, false
	}
	return a.health.Status(line)
}

// Health returns each line's probe status, by line name.
func (a *Agent) Health() map[string]health.Status {
	if a.health == nil {
		return nil
	}
	return a.health.Statuses()
}
