// SPDX-License-Identifier: Apache-2.0

package health

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"
)

var (
	gw     = netip.MustParseAddr("198.51.100.1")
	target = netip.MustParseAddr("203.0.113.101")
	t0     = time.Unix(1000, 0)
	lost   = errors.New("no answer in 200ms")
)

func round(i int, gwOK, targetOK bool, rtt time.Duration) Round {
	r := Round{At: t0.Add(time.Duration(i) * 200 * time.Millisecond), Gateway: &Result{Target: gw, Method: "icmp", RTT: rtt}}
	if !gwOK {
		r.Gateway.Err = lost
	}
	res := Result{Target: target, Method: "icmp", RTT: rtt}
	if !targetOK {
		res.Err = lost
	}
	r.Targets = []Result{res}
	return r
}

// Late at the first failed round (no new flows), up again at a good one;
// down after 3 failed rounds, probing at the first good one, up after 5
// good ones in a row; a failure while probing starts over.
func TestTrackerHysteresis(t *testing.T) {
	tr := NewTracker(3, 5, 1, 100, t0)
	var states []State
	for i, ok := range []bool{true, false, false, true, false, false, false, true, true, false, true, true, true, true, true} {
		if tr.Observe(round(i, ok, ok, time.Millisecond)) {
			states = append(states, tr.State())
		}
	}
	want := []State{Late, Up, Late, Down, Probing, Down, Probing, Up}
	if strings.Join(toStrings(states), " ") != strings.Join(toStrings(want), " ") {
		t.Errorf("states %v, want %v", states, want)
	}
}

// Word of a late round under way makes only an up line late; the round's
// result then decides: answered, up again (nothing counted against it);
// failed, down once down_after rounds have failed.
func TestTrackerLate(t *testing.T) {
	tr := NewTracker(2, 3, 1, 100, t0)
	if !tr.Late(t0, "gateway: no answer in 150ms") || tr.State() != Late {
		t.Fatalf("an up line told it is late: %s, want late", tr.State())
	}
	if tr.Late(t0, "again") {
		t.Error("a late line told again reported a change")
	}
	if !tr.Observe(round(0, true, true, time.Millisecond)) || tr.State() != Up {
		t.Fatalf("a late round answered after all: %s, want up", tr.State())
	}
	if st := tr.Status(); st.Why != "answering in time again" {
		t.Errorf("why %q", st.Why)
	}
	tr.Late(t0, "late")
	tr.Observe(round(1, false, false, 0))
	if tr.State() != Late {
		t.Fatalf("after one failed round of two: %s, want late", tr.State())
	}
	tr.Observe(round(2, false, false, 0))
	if tr.State() != Down {
		t.Fatalf("after two failed rounds: %s, want down", tr.State())
	}
	if tr.Late(t0, "late") || tr.State() != Down {
		t.Errorf("a down line told it is late: %s, want down", tr.State())
	}
	tr.Observe(round(3, true, true, time.Millisecond))
	if tr.Late(t0, "late") || tr.State() != Probing {
		t.Errorf("a probing line told it is late: %s, want probing", tr.State())
	}

	// With down_after 1 a failed round takes the line down at once.
	one := NewTracker(1, 3, 1, 100, t0)
	one.Late(t0, "late")
	one.Observe(round(0, false, false, 0))
	if one.State() != Down {
		t.Errorf("down_after 1, a failed late round: %s, want down", one.State())
	}
}

func toStrings(s []State) []string {
	out := make([]string, len(s))
	for i, v := range s {
		out[i] = string(v)
	}
	return out
}

// A gateway that answers while nothing beyond it does takes the line
// down when a target is required; the reason names the target.
func TestTrackerLossBeyondGateway(t *testing.T) {
	tr := NewTracker(3, 5, 1, 100, t0)
	for i := range 3 {
		tr.Observe(round(i, true, false, time.Millisecond))
	}
	s := tr.Status()
	if s.State != Down || !strings.Contains(s.Why, "target 203.0.113.101") {
		t.Errorf("status %+v: want down because of the target", s)
	}
	// With no target required, the same rounds are good.
	tr = NewTracker(3, 5, 0, 100, t0)
	for i := range 5 {
		tr.Observe(round(i, true, false, time.Millisecond))
	}
	if tr.State() != Up {
		t.Errorf("min_targets 0: state %s", tr.State())
	}
}

func TestTrackerStats(t *testing.T) {
	tr := NewTracker(100, 5, 0, 8, t0)
	// 4 rounds of 2 probes: RTTs 10, 20, 10, 20 ms on the gateway, the
	// target never answers: loss 50%.
	for i, rtt := range []time.Duration{10, 20, 10, 20} {
		tr.Observe(round(i, true, false, rtt*time.Millisecond))
	}
	s := tr.Status()
	if s.Loss != 0.5 || s.RTT != 15*time.Millisecond || s.Jitter != 10*time.Millisecond || s.BestRTT != 10*time.Millisecond || s.Samples != 8 {
		t.Errorf("status %+v: want loss 0.5, RTT 15ms, jitter 10ms, best 10ms, 8 samples", s)
	}
	// The window slides: 8 more good probes push the lost ones out.
	for i := range 4 {
		tr.Observe(round(4+i, true, true, 30*time.Millisecond))
	}
	if s := tr.Status(); s.Loss != 0 || s.RTT != 30*time.Millisecond {
		t.Errorf("after the window slid: %+v", s)
	}
}

func TestAdaptiveWeight(t *testing.T) {
	for _, tc := range []struct {
		w    int
		loss float64
		rtt  time.Duration
		want int
	}{
		{8, 0, 10 * time.Millisecond, 8},    // healthy: as configured
		{8, 0.25, 10 * time.Millisecond, 4}, // 25% loss: half
		{8, 0.9, 10 * time.Millisecond, 2},  // bounded below at a quarter
		{8, 0, 40 * time.Millisecond, 4},    // 4x its best RTT: half
		{1, 0.9, 10 * time.Millisecond, 1},  // never below 1
		{8, 0, 40 * time.Microsecond, 8},    // 4x a tiny RTT is noise
	} {
		best := 10 * time.Millisecond
		if tc.rtt < time.Millisecond {
			best = 10 * time.Microsecond
		}
		if got := AdaptiveWeight(tc.w, Status{Loss: tc.loss, RTT: tc.rtt, BestRTT: best}); got != tc.want {
			t.Errorf("AdaptiveWeight(%d, loss %v, rtt %v) = %d, want %d", tc.w, tc.loss, tc.rtt, got, tc.want)
		}
	}
}

// Carrier loss takes a line down at once; it comes back after up_after
// good rounds, like any line.
func TestTrackerDown(t *testing.T) {
	tr := NewTracker(3, 2, 0, 10, t0)
	if !tr.Down(t0, "no carrier") || tr.State() != Down || tr.Down(t0, "again") {
		t.Fatalf("Down: state %s", tr.State())
	}
	tr.Observe(round(1, true, true, time.Millisecond))
	tr.Observe(round(2, true, true, time.Millisecond))
	if tr.State() != Up {
		t.Errorf("after 2 good rounds: %s", tr.State())
	}
}

// Retries count in the loss figure one probe each: a gateway answered at
// its third probe lost two; one that never answered lost every probe sent
// (at least one). Default 1 round down: one failed round of retries takes
// the line down, and one answer, however late in its round, does not.
func TestTrackerRetries(t *testing.T) {
	tr := NewTracker(1, 5, 0, 100, t0)
	at := func(i int) time.Time { return t0.Add(time.Duration(i) * 100 * time.Millisecond) }
	answeredAt := func(i, lost int) Round {
		return Round{At: at(i), Gateway: &Result{Target: gw, Method: "icmp", RTT: time.Millisecond, Lost: lost}}
	}
	for i := range 4 {
		if tr.Observe(answeredAt(i, 9)) {
			t.Fatalf("round %d: answered at its 10th probe, yet the state changed to %s", i, tr.State())
		}
	}
	if s := tr.Status(); s.Loss != 0.9 || s.Samples != 40 {
		t.Errorf("status %+v: want loss 0.9 over 40 probes", s)
	}
	silent := Round{At: at(4), Gateway: &Result{Target: gw, Method: "icmp", Err: lost, Lost: 10}}
	if !tr.Observe(silent) || tr.State() != Down {
		t.Fatalf("a round of 10 unanswered probes: state %s, want down", tr.State())
	}
	if s := tr.Status(); s.Samples != 50 || s.Loss != 46.0/50 {
		t.Errorf("status %+v: want 46 of 50 probes lost", s)
	}
	// An unanswered probe that reports no count is one lost probe.
	tr = NewTracker(1, 5, 0, 100, t0)
	tr.Observe(Round{At: at(0), Gateway: &Result{Target: gw, Method: "icmp", Err: lost}})
	if s := tr.Status(); s.Samples != 1 || s.Loss != 1 {
		t.Errorf("status %+v: want 1 probe, lost", s)
	}
}

// A round waits for a target as long as its answers have lately taken
// (TCP's retransmission timeout): a loaded line whose probes come back in
// 20 to 140 ms gets more than its slowest answer, a quiet line's wait
// stays under the configured timeout, and no wait exceeds maxRoundWait.
func TestRoundWaitFollowsRTT(t *testing.T) {
	var slow, fast, huge *rttEstimate = &rttEstimate{}, &rttEstimate{}, &rttEstimate{}
	for i := range 40 {
		slow.add(time.Duration(20+120*(i%2)) * time.Millisecond)
		fast.add(300 * time.Microsecond)
		huge.add(3 * time.Second)
	}
	if got := slow.rto(); got < 140*time.Millisecond || got > maxRoundWait {
		t.Errorf("slow line waits %v, want more than its slowest answer (140ms)", got)
	}
	if got := fast.rto(); got >= 100*time.Millisecond {
		t.Errorf("quiet line waits %v, want under the 100ms timeout", got)
	}
	if got := huge.rto(); got != maxRoundWait {
		t.Errorf("a 3 s line waits %v, want %v", got, maxRoundWait)
	}
	if got := (*rttEstimate)(nil).rto(); got != 0 {
		t.Errorf("no answer yet: %v, want 0 (the timeout applies)", got)
	}
}

// A tracker that replaces another (new health settings) starts from its
// state: a down line still needs up_after good rounds, a late one is up
// again at its next good round.
func TestTrackerInherits(t *testing.T) {
	old := NewTracker(2, 3, 1, 100, t0)
	old.Down(t0, "no carrier")
	nt := NewTracker(2, 3, 1, 100, t0.Add(time.Second))
	nt.inherit(old)
	if nt.State() != Down || nt.Status().Why != "no carrier" {
		t.Fatalf("inherited %s (%s), want down (no carrier)", nt.State(), nt.Status().Why)
	}
	var states []State
	for i := range 4 {
		if nt.Observe(round(i, true, true, time.Millisecond)) {
			states = append(states, nt.State())
		}
	}
	if want := []State{Probing, Up}; strings.Join(toStrings(states), " ") != strings.Join(toStrings(want), " ") {
		t.Errorf("states %v, want %v", states, want)
	}

	late := NewTracker(2, 3, 1, 100, t0)
	late.Late(t0, "no answer in 150ms")
	nt = NewTracker(2, 3, 1, 100, t0)
	nt.inherit(late)
	if nt.State() != Late || !nt.Observe(round(0, true, true, time.Millisecond)) || nt.State() != Up {
		t.Errorf("a late line under new settings: %s after a good round, want up", nt.State())
	}
}
