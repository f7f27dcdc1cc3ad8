// SPDX-License-Identifier: Apache-2.0

// Package health probes every line through itself and judges it: up,
// late (a round still under way has had no answer in time: no new flows),
// down, or probing (answering again, not yet trusted), with hysteresis,
// and its loss, RTT and jitter over a window of rounds.
package health

import (
	"fmt"
	"net/netip"
	"time"
)

// State of a line as its probes show it.
type State string

// States.
const (
	Up State = "up"
	// Late: up, but a round's answers are overdue (Prober.lateAfter) or a
	// round failed. The line gets no new flows, and keeps its flows, routes
	// and NAT, until a round is answered (up again) or down_after rounds
	// have failed (down). A silent gateway is avoided this way well before
	// it is judged down, and a line that was only slow loses nothing.
	Late    State = "late"
	Down    State = "down"
	Probing State = "probing" // down, answering again; up after enough good rounds
)

// Result is a round's probes of one target: the first, and the retries
// sent while it was silent.
type Result struct {
	Target netip.Addr
	Method string        // "icmp" or "arp"
	RTT    time.Duration // of the probe answered; valid when Err is nil
	Err    error         // nil: a probe was answered
	// Lost is how many probes went unanswered: those sent before the one
	// answered, or every one sent when none was (counted as at least one).
	Lost int
}

// lost is how many of the result's probes count as lost.
func (r Result) lost() int {
	if r.Err != nil {
		return max(r.Lost, 1)
	}
	return r.Lost
}

// Round is one round of probes of a line: its gateway (unless the line
// probes none) and its extra targets, sent together.
type Round struct {
	At      time.Time
	Gateway *Result
	Targets []Result
}

// ok reports whether the round counts as good: the gateway answered and
// at least minTargets of the extra targets did.
func (r Round) ok(minTargets int) (bool, string) {
	if r.Gateway != nil && r.Gateway.Err != nil {
		return false, fmt.Sprintf("gateway %s (%s): %v", r.Gateway.Target, r.Gateway.Method, r.Gateway.Err)
	}
	answered, why := 0, ""
	for _, t := range r.Targets {
		if t.Err == nil {
			answered++
		} else if why == "" {
			why = fmt.Sprintf("target %s (%s): %v", t.Target, t.Method, t.Err)
		}
	}
	if answered < minTargets {
		return false, fmt.Sprintf("%d of %d targets answered, %d needed; %s", answered, len(r.Targets), minTargets, why)
	}
	return true, ""
}

// Tracker judges a line from its rounds.
type Tracker struct {
	downAfter, upAfter, minTargets int

	state      State
	since      time.Time
	why        string
	fails, oks int // consecutive failed and good rounds

	// Over the last window probes: every probe answered or not (retries
	// included), and the RTTs of the answered ones (ring buffers).
	answered []bool
	rtts     []time.Duration
	nAns     int
	nRTT     int
	best     time.Duration // the lowest RTT ever seen
}

// NewTracker starts a line as up: a line is trusted until its probes say
// otherwise, so that starting the agent disturbs nothing. Loss and RTT
// are measured over the last windowProbes probes.
func NewTracker(downAfter, upAfter, minTargets, windowProbes int, now time.Time) *Tracker {
	return &Tracker{
		downAfter: downAfter, upAfter: upAfter, minTargets: minTargets,
		state: Up, since: now, why: "started",
		answered: make([]bool, 0, windowProbes),
		rtts:     make([]time.Duration, 0, windowProbes),
	}
}

// Observe takes a round and reports whether the state changed.
func (t *Tracker) Observe(r Round) bool {
	if r.Gateway != nil {
		t.count(*r.Gateway)
	}
	for _, p := range r.Targets {
		t.count(p)
	}
	ok, why := r.ok(t.minTargets)
	if ok {
		t.fails, t.oks = 0, t.oks+1
	} else {
		t.fails, t.oks = t.fails+1, 0
	}
	prev := t.state
	switch {
	case (t.state == Up || t.state == Late) && t.fails >= t.downAfter:
		t.set(Down, r.At, fmt.Sprintf("failed rounds in a row: %d, the last: %s", t.fails, why))
	case t.state == Up && !ok:
		t.set(Late, r.At, fmt.Sprintf("failed rounds in a row: %d of %d, the last: %s", t.fails, t.downAfter, why))
	case t.state == Late && ok:
		t.set(Up, r.At, "answering in time again")
	case t.state == Down && ok:
		t.set(Probing, r.At, "answering again")
	case t.state == Probing && !ok:
		t.set(Down, r.At, "failed again while probing: "+why)
	case t.state == Probing && t.oks >= t.upAfter:
		t.set(Up, r.At, fmt.Sprintf("%d good rounds", t.oks))
	}
	return t.state != prev
}

// Late takes an up line to late: a round still under way has had no
// answer in time (why says from which target). The round's own result
// decides the rest. It reports whether the state changed.
func (t *Tracker) Late(at time.Time, why string) bool {
	if t.state != Up {
		return false
	}
	t.set(Late, at, why)
	return true
}

// inherit takes the state of the tracker t replaces (new settings): its
// state, since and why; a line that was down or probing must then answer
// up_after rounds in a row as before.
func (t *Tracker) inherit(old *Tracker) {
	t.state, t.since, t.why = old.state, old.since, old.why
	if t.state == Down || t.state == Probing {
		t.fails = t.downAfter
	}
}

// count adds a result's probes to the window.
func (t *Tracker) count(p Result) {
	for range p.lost() {
		t.answered = ring(t.answered, &t.nAns, false)
	}
	if p.Err == nil {
		t.answered = ring(t.answered, &t.nAns, true)
		t.rtts = ring(t.rtts, &t.nRTT, p.RTT)
		if t.best == 0 || p.RTT < t.best {
			t.best = p.RTT
		}
	}
}

// Down takes the line down at once, for a failure seen without probes
// (carrier loss): it then comes back like any line, after up_after good
// rounds. It reports whether the state changed.
func (t *Tracker) Down(at time.Time, why string) bool {
	t.fails, t.oks = t.downAfter, 0
	if t.state == Down {
		return false
	}
	t.set(Down, at, why)
	return true
}

func (t *Tracker) set(s State, at time.Time, why string) {
	t.state, t.since, t.why = s, at, why
}

// ring appends v to a ring buffer of cap(buf) entries; *n counts all
// appends, so that the oldest entry is overwritten once it is full.
func ring[T any](buf []T, n *int, v T) []T {
	if len(buf) < cap(buf) {
		buf = append(buf, v)
	} else {
		buf[*n%cap(buf)] = v
	}
	*n++
	return buf
}

// Status is a line's health as operators see it.
type Status struct {
	State   State
	Since   time.Time
	Why     string
	Loss    float64 // fraction of probes unanswered over the window
	RTT     time.Duration
	Jitter  time.Duration // mean absolute difference of successive RTTs
	BestRTT time.Duration // the lowest RTT ever seen, the line's baseline
	Samples int           // probes in the window
}

// Status returns the line's state and its measurements over the window.
func (t *Tracker) Status() Status {
	s := Status{State: t.state, Since: t.since, Why: t.why, BestRTT: t.best, Samples: len(t.answered)}
	lost := 0
	for _, a := range t.answered {
		if !a {
			lost++
		}
	}
	if len(t.answered) > 0 {
		s.Loss = float64(lost) / float64(len(t.answered))
	}
	if n := len(t.rtts); n > 0 {
		// In arrival order: the ring's oldest entry first.
		ordered := append(append([]time.Duration(nil), t.rtts[t.nRTT%n:]...), t.rtts[:t.nRTT%n]...)
		var sum, jit time.Duration
		for i, r := range ordered {
			sum += r
			if i > 0 {
				jit += (r - ordered[i-1]).Abs()
			}
		}
		s.RTT = sum / time.Duration(n)
		if n > 1 {
			s.Jitter = jit / time.Duration(n-1)
		}
	}
	return s
}

// State is the line's state now.
func (t *Tracker) State() State { return t.state }
