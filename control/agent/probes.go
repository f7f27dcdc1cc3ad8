// SPDX-License-Identifier: Apache-2.0

package agent

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"time"

	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/events"
	"github.com/uplinkd/uplinkd/control/health"
	"github.com/uplinkd/uplinkd/control/plan"
)

// adaptEvery is how often adaptive weights are recomputed: weight changes
// are rate-limited to one per line per period.
const adaptEvery = 5 * time.Second

// probes runs a prober per line that has an address, and judges each line
// from its rounds.
type probes struct {
	reports  chan health.Report
	ctx      context.Context // nil until Run starts the probes
	running  map[string]*lineProbe
	trackers map[string]*tracked
	nextID   uint64
}

type lineProbe struct {
	spec   health.Line
	cancel context.CancelFunc
	done   chan struct{}
}

// tracked is a line's judgement, kept across prober restarts (an address
// change does not make a dead line look healthy).
type tracked struct {
	*health.Tracker
	params config.Health
	probe  config.Probe
}

func newProbes() probes {
	return probes{reports: make(chan health.Report, 64), running: map[string]*lineProbe{}, trackers: map[string]*tracked{}}
}

func (p *probes) start(ctx context.Context) { p.ctx = ctx }

// sync starts, restarts and stops probers to match the lines.
func (p *probes) sync(a *Agent) error {
	if p.ctx == nil {
		return nil
	}
	var errs []error
	wanted := map[string]bool{}
	for _, l := range a.lines {
		if !l.Address.IsValid() {
			continue // no source address to probe from: the line is unusable anyway
		}
		spec, err := a.probeSpec(l)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		wanted[l.Name] = true
		t := p.trackers[l.Name]
		if t == nil || !reflect.DeepEqual(t.params, a.cfg.Health) || !reflect.DeepEqual(t.probe, l.Probe) {
			probesPerRound := len(l.Probe.Targets)
			if l.Probe.Gateway != config.ProbeNone {
				probesPerRound++
			}
			h := a.cfg.Health
			p.trackers[l.Name] = &tracked{
				Tracker: health.NewTracker(h.DownAfter, h.UpAfter, l.Probe.MinTargets, h.Window*probesPerRound, time.Now()),
				params:  h, probe: l.Probe,
			}
		}
		if lp := p.running[l.Name]; lp != nil {
			spec.ID = lp.spec.ID
			if reflect.DeepEqual(spec, lp.spec) {
				continue
			}
			p.stop(l.Name)
		}
		p.nextID++
		spec.ID = p.nextID
		pr, err := health.NewProber(spec, a.cfg.Health.Interval, a.cfg.Health.Timeout, a.env.Do)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		ctx, cancel := context.WithCancel(p.ctx)
		lp := &lineProbe{spec: spec, cancel: cancel, done: make(chan struct{})}
		p.running[l.Name] = lp
		go func() {
			defer close(lp.done)
			pr.Run(ctx, p.reports)
		}()
	}
	for name := range p.running {
		if !wanted[name] {
			p.stop(name)
		}
	}
	return errors.Join(errs...)
}

func (a *Agent) probeSpec(l plan.Line) (health.Line, error) {
	link, err := a.env.NL.LinkByName(l.Interface)
	if err != nil {
		return health.Line{}, fmt.Errorf("probing %s: %w", l.Name, err)
	}
	return health.Line{
		Name: l.Name, Ifname: l.Interface, Ifindex: link.Attrs().Index, MAC: link.Attrs().HardwareAddr,
		Mark: l.Mark, Source: l.Address.Addr(), Gateway: l.GatewayAddr, Probe: l.Probe,
	}, nil
}

// stop stops a line's prober and waits for it.
func (p *probes) stop(name string) {
	if lp := p.running[name]; lp != nil {
		lp.cancel()
		<-lp.done
		delete(p.running, name)
	}
}

func (p *probes) stopAll() {
	for name := range p.running {
		p.stop(name)
	}
}

// observe judges a line from one round; it reports whether the line's
// usability changed, so that the kernel state must follow.
func (a *Agent) observe(r health.Report) bool {
	lp, t := a.probes.running[r.Line], a.probes.trackers[r.Line]
	if lp == nil || lp.spec.ID != r.ID || t == nil {
		return false // a round of a prober that was replaced
	}
	if !t.Observe(r.Round) {
		return false
	}
	st := t.Status()
	kind := map[health.State]string{health.Up: events.LineUp, health.Down: events.LineDown, health.Probing: events.LineProbing}[st.State]
	a.events.Add(kind, r.Line, "line health", "state", st.State, "why", st.Why, "loss", fmt.Sprintf("%.2f", st.Loss), "rtt", st.RTT)
	for i := range a.lines {
		if a.lines[i].Name == r.Line {
			healthy := st.State == health.Up
			changed := a.lines[i].Healthy != healthy
			a.lines[i].Healthy = healthy
			return changed
		}
	}
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
		t := a.probes.trackers[l.Name]
		if t == nil {
			continue
		}
		st := t.Status()
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

// Health returns each line's probe status, by line name.
func (a *Agent) Health() map[string]health.Status {
	out := map[string]health.Status{}
	for name, t := range a.probes.trackers {
		out[name] = t.Status()
	}
	return out
}
