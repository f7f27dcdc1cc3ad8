// SPDX-License-Identifier: Apache-2.0

package health

import (
	"context"
	"errors"
	"reflect"
	"time"

	"github.com/uplinkd/uplinkd/control/config"
)

// Monitor runs a Prober per line and judges each line from its rounds
// with a Tracker. Its owner hands it the lines (Sync), reads the reports
// (Reports) and passes each back to Observe, in one goroutine: the
// Monitor itself holds no lock.
type Monitor struct {
	do       func(func() error) error // runs a function in the lines' namespace
	reports  chan Report
	ctx      context.Context // nil until Start
	running  map[string]*lineProber
	trackers map[string]*tracked
	nextID   uint64
}

type lineProber struct {
	spec   Line
	cancel context.CancelFunc
	done   chan struct{}
}

// tracked is a line's judgement, kept across prober restarts (an address
// change does not make a dead line look healthy), and the settings it was
// made with (new settings start a new judgement).
type tracked struct {
	*Tracker
	params config.Health
	probe  config.Probe
}

// NewMonitor returns a monitor whose probe sockets are opened by do (in
// the lines' network namespace).
func NewMonitor(do func(func() error) error) *Monitor {
	return &Monitor{do: do, reports: make(chan Report, 64), running: map[string]*lineProber{}, trackers: map[string]*tracked{}}
}

// Start lets Sync run probers until ctx ends; before it, Sync does
// nothing.
func (m *Monitor) Start(ctx context.Context) { m.ctx = ctx }

// Started reports whether Start was called.
func (m *Monitor) Started() bool { return m.ctx != nil }

// Reports is where the probers send their rounds.
func (m *Monitor) Reports() <-chan Report { return m.reports }

// Sync starts, restarts and stops probers to match lines (those with a
// source address to probe from), probing with the health settings h.
func (m *Monitor) Sync(lines []Line, h config.Health) error {
	if m.ctx == nil {
		return nil
	}
	var errs []error
	wanted := map[string]bool{}
	for _, spec := range lines {
		wanted[spec.Name] = true
		t := m.trackers[spec.Name]
		newSettings := t == nil || !reflect.DeepEqual(t.params, h) || !reflect.DeepEqual(t.probe, spec.Probe)
		if newSettings {
			probesPerRound := len(spec.Probe.Targets)
			if spec.Probe.Gateway != config.ProbeNone {
				probesPerRound++
			}
			nt := &tracked{
				Tracker: NewTracker(h.DownAfter, h.UpAfter, spec.Probe.MinTargets, h.Window*probesPerRound, time.Now()),
				params:  h, probe: spec.Probe,
			}
			if t != nil {
				// New settings judge from now on, from where the line
				// stands: a down line does not come back, nor a late one
				// stay late, because a reload changed a number.
				nt.inherit(t.Tracker)
			}
			m.trackers[spec.Name] = nt
		}
		if lp := m.running[spec.Name]; lp != nil {
			spec.ID = lp.spec.ID
			if reflect.DeepEqual(spec, lp.spec) && !newSettings { // new timings need a new prober too
				continue
			}
			m.stop(spec.Name)
		}
		m.nextID++
		spec.ID = m.nextID
		pr, err := NewProber(spec, h.Interval, h.Timeout, h.RetryInterval, m.do)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		ctx, cancel := context.WithCancel(m.ctx)
		lp := &lineProber{spec: spec, cancel: cancel, done: make(chan struct{})}
		m.running[spec.Name] = lp
		go func() {
			defer close(lp.done)
			pr.Run(ctx, m.reports)
		}()
	}
	for name := range m.running {
		if !wanted[name] {
			m.stop(name)
		}
	}
	return errors.Join(errs...)
}

// stop stops a line's prober and waits for it.
func (m *Monitor) stop(name string) {
	if lp := m.running[name]; lp != nil {
		lp.cancel()
		<-lp.done
		delete(m.running, name)
	}
}

// Stop stops every prober and waits for them.
func (m *Monitor) Stop() {
	for name := range m.running {
		m.stop(name)
	}
}

// Observe judges a line from one of its reports. It returns whether its
// state changed and, only then, the line's status (computing it for every
// round costs, with 16 lines); a round of a prober that was replaced since
// changes nothing.
func (m *Monitor) Observe(r Report) (Status, bool) {
	lp, t := m.running[r.Line], m.trackers[r.Line]
	if lp == nil || lp.spec.ID != r.ID || t == nil {
		return Status{}, false
	}
	if r.Late != "" {
		if !t.Late(r.Round.At, r.Late) {
			return Status{}, false
		}
	} else if !t.Observe(r.Round) {
		return Status{}, false
	}
	return t.Status(), true
}

// Down takes a line down at once, for a failure seen without probes
// (carrier loss); it reports whether the state changed.
func (m *Monitor) Down(line string, at time.Time, why string) bool {
	t := m.trackers[line]
	return t != nil && t.Down(at, why)
}

// Status returns a line's status, and false for a line not monitored.
func (m *Monitor) Status(line string) (Status, bool) {
	t := m.trackers[line]
	if t == nil {
		return Status{}, false
	}
	return t.Status(), true
}

// Statuses returns every monitored line's status, by name.
func (m *Monitor) Statuses() map[string]Status {
	out := make(map[string]Status, len(m.trackers))
	for name, t := range m.trackers {
		out[name] = t.Status()
	}
	return out
}
