// SPDX-License-Identifier: Apache-2.0

package health

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/nsdo"
)

// The probe tests run in throwaway network namespaces of their own: the
// line's end of a veth pair (192.0.2.1) in one, the gateway's end
// (192.0.2.2, answered by the kernel) in another. Unnamed namespaces
// vanish with their last descriptor, and the veth pair with them, so
// nothing outlives the test, also when it fails.
var (
	probeSource  = netip.MustParseAddr("192.0.2.1")
	probeGateway = netip.MustParseAddr("192.0.2.2")
	probeNobody  = netip.MustParseAddr("192.0.2.99")
)

// probeLab is a line in a namespace of its own with a live gateway.
type probeLab struct {
	ns        netns.NsHandle // the line's
	line      Line
	lineNL    *netlink.Handle // in the line's namespace
	gatewayNL *netlink.Handle // in the gateway's
}

func (l probeLab) do(f func() error) error { return nsdo.Do(l.ns, f) }

// newNS makes an unnamed network namespace, closed by the test's cleanup.
func newNS(t *testing.T) netns.NsHandle {
	t.Helper()
	type made struct {
		ns  netns.NsHandle
		err error
	}
	c := make(chan made, 1)
	go func() {
		// Never unlocked: the thread, now in the new namespace, ends with
		// the goroutine instead of going back to the scheduler.
		runtime.LockOSThread()
		ns, err := netns.New()
		c <- made{ns, err}
	}()
	m := <-c
	if errors.Is(m.err, unix.EPERM) {
		t.Skipf("cannot create network namespaces: %v", m.err)
	}
	if m.err != nil {
		t.Fatalf("creating a network namespace: %v", m.err)
	}
	t.Cleanup(func() { m.ns.Close() })
	return m.ns
}

func newProbeLab(t *testing.T) probeLab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: raw sockets and network namespaces")
	}
	lineNS, gwNS := newNS(t), newNS(t)
	line := handleAt(t, lineNS)
	gw := handleAt(t, gwNS)

	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "ul0"}, PeerName: "gw0", PeerNamespace: netlink.NsFd(int(gwNS))}
	if err := line.LinkAdd(veth); err != nil {
		t.Fatalf("adding veth pair: %v", err)
	}
	setUp := func(h *netlink.Handle, name string, a netip.Addr) netlink.Link {
		t.Helper()
		link, err := h.LinkByName(name)
		if err != nil {
			t.Fatalf("finding %s: %v", name, err)
		}
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(24, 32)}}
		if err := h.AddrAdd(link, addr); err != nil {
			t.Fatalf("adding %s to %s: %v", a, name, err)
		}
		if err := h.LinkSetUp(link); err != nil {
			t.Fatalf("setting %s up: %v", name, err)
		}
		return link
	}
	gwLink := setUp(gw, "gw0", probeGateway)
	ulLink := setUp(line, "ul0", probeSource)

	// Wait for the carrier of both ends: a veth is up once both ends are,
	// and each end drops what it sends (its qdisc is still noop) until the
	// kernel's link watch has seen it up, which may come a second later
	// (the gateway's replies were lost then).
	for end := time.Now().Add(5 * time.Second); ; {
		l, err := line.LinkByIndex(ulLink.Attrs().Index)
		g, gerr := gw.LinkByIndex(gwLink.Attrs().Index)
		if err == nil && gerr == nil && l.Attrs().OperState == netlink.OperUp && g.Attrs().OperState == netlink.OperUp {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("ul0 and its peer %s did not come up", gwLink.Attrs().Name)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return probeLab{ns: lineNS, lineNL: line, gatewayNL: gw, line: Line{
		ID: 7, Name: "wan", Ifname: "ul0", Ifindex: ulLink.Attrs().Index, MAC: ulLink.Attrs().HardwareAddr,
		Mark: 0x42, Source: probeSource, Gateway: probeGateway,
	}}
}

func handleAt(t *testing.T, ns netns.NsHandle) *netlink.Handle {
	t.Helper()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatalf("netlink handle: %v", err)
	}
	t.Cleanup(h.Close)
	return h
}

func newTestProber(t *testing.T, lab probeLab, l Line, interval, timeout time.Duration) *Prober {
	t.Helper()
	return newRetryingProber(t, lab, l, interval, timeout, 0)
}

func newRetryingProber(t *testing.T, lab probeLab, l Line, interval, timeout, retry time.Duration) *Prober {
	t.Helper()
	p, err := NewProber(l, interval, timeout, retry, lab.do)
	if err != nil {
		t.Fatalf("NewProber: %v", err)
	}
	t.Cleanup(p.Close)
	return p
}

func TestProbeLiveGateway(t *testing.T) {
	lab := newProbeLab(t)
	const timeout = 5 * time.Second
	for _, gwProbe := range []string{config.ProbeICMP, config.ProbeARP} {
		t.Run(gwProbe, func(t *testing.T) {
			l := lab.line
			// The gateway a second time as an extra target: the two echo
			// requests must be answered one each.
			l.Probe = config.Probe{Gateway: gwProbe, Targets: []netip.Addr{probeGateway}, MinTargets: 1}
			p := newTestProber(t, lab, l, time.Second, timeout)
			for i := range 3 {
				start := time.Now()
				r := p.round(t.Context())
				took := time.Since(start)
				if r.Gateway == nil || len(r.Targets) != 1 {
					t.Fatalf("round %d: want a gateway and 1 target, got %+v", i, r)
				}
				for _, res := range append([]Result{*r.Gateway}, r.Targets...) {
					if res.Err != nil || res.RTT <= 0 || res.Target != probeGateway {
						t.Errorf("round %d: want an RTT from %s, got %+v", i, probeGateway, res)
					}
				}
				if r.Gateway.Method != gwProbe || r.Targets[0].Method != config.ProbeICMP {
					t.Errorf("round %d: methods %s and %s, want %s and icmp", i, r.Gateway.Method, r.Targets[0].Method, gwProbe)
				}
				if took >= timeout {
					t.Errorf("round %d took %v: it must end once every probe has answered", i, took)
				}
				if ok, why := r.ok(1); !ok {
					t.Errorf("round %d not ok: %s", i, why)
				}
			}
		})
	}
}

// TestProbeARPSource probes from a secondary address of the interface:
// the gateway must learn that one, not the interface's first.
func TestProbeARPSource(t *testing.T) {
	lab := newProbeLab(t)
	secondary := netip.MustParseAddr("192.0.2.10")
	link, err := lab.lineNL.LinkByName("ul0")
	if err != nil {
		t.Fatal(err)
	}
	if err := lab.lineNL.AddrAdd(link, &netlink.Addr{IPNet: &net.IPNet{IP: secondary.AsSlice(), Mask: net.CIDRMask(24, 32)}}); err != nil {
		t.Fatalf("adding %s: %v", secondary, err)
	}
	l := lab.line
	l.Source = secondary
	l.Probe = config.Probe{Gateway: config.ProbeARP}
	p := newTestProber(t, lab, l, time.Second, 5*time.Second)
	r := p.round(t.Context())
	if r.Gateway == nil || r.Gateway.Err != nil || r.Gateway.Method != config.ProbeARP {
		t.Fatalf("want an ARP answer from the gateway, got %+v", r.Gateway)
	}
	neighs, err := lab.gatewayNL.NeighList(0, unix.AF_INET)
	if err != nil {
		t.Fatal(err)
	}
	learnt := map[netip.Addr]string{}
	for _, n := range neighs {
		if a, ok := netip.AddrFromSlice(n.IP); ok {
			learnt[a.Unmap()] = n.HardwareAddr.String()
		}
	}
	if mac := learnt[secondary]; mac != l.MAC.String() {
		t.Errorf("the gateway has %s at %q, want %s (all: %v)", secondary, mac, l.MAC, learnt)
	}
	if mac, ok := learnt[probeSource]; ok {
		t.Errorf("the gateway learnt the interface's first address %s (%s): the request was not from the line's", probeSource, mac)
	}
}

func TestProbeNoAnswer(t *testing.T) {
	lab := newProbeLab(t)
	const timeout = 300 * time.Millisecond
	for _, gwProbe := range []string{config.ProbeICMP, config.ProbeARP} {
		t.Run(gwProbe, func(t *testing.T) {
			l := lab.line
			l.Gateway = probeNobody
			// A live target next to the dead gateway: it answers, the round
			// still waits out the timeout for the gateway.
			l.Probe = config.Probe{Gateway: gwProbe, Targets: []netip.Addr{probeGateway, probeNobody}, MinTargets: 1}
			p := newTestProber(t, lab, l, time.Second, timeout)
			start := time.Now()
			r := p.round(t.Context())
			took := time.Since(start)
			if took < timeout || took > timeout+time.Second {
				t.Errorf("round took %v, want about the timeout %v", took, timeout)
			}
			if r.Gateway == nil || len(r.Targets) != 2 {
				t.Fatalf("want a gateway and 2 targets, got %+v", r)
			}
			for _, res := range []Result{*r.Gateway, r.Targets[1]} {
				if !errors.Is(res.Err, errNoAnswer) || res.Target != probeNobody {
					t.Errorf("want no answer from %s, got %+v", probeNobody, res)
				}
			}
			if res := r.Targets[0]; res.Err != nil || res.RTT <= 0 {
				t.Errorf("want an RTT from %s, got %+v", probeGateway, res)
			}
			if ok, _ := r.ok(1); ok {
				t.Error("a round whose gateway did not answer is ok")
			}
		})
	}
}

// TestProbeEndsPromptly cuts a round with a long timeout short in every
// way it can be: it must end at once, not at the timeout.
func TestProbeEndsPromptly(t *testing.T) {
	lab := newProbeLab(t)
	const timeout, bound = 10 * time.Second, 2 * time.Second
	l := lab.line
	l.Gateway = probeNobody
	l.Probe = config.Probe{Gateway: config.ProbeARP, Targets: []netip.Addr{probeNobody}, MinTargets: 1}

	within := func(t *testing.T, what string, done <-chan struct{}) {
		t.Helper()
		select {
		case <-done:
		case <-time.After(bound):
			t.Fatalf("%s did not return within %v (timeout %v)", what, bound, timeout)
		}
	}

	t.Run("cancel round", func(t *testing.T) {
		p := newTestProber(t, lab, l, time.Second, timeout)
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		var r Round
		go func() { defer close(done); r = p.round(ctx) }()
		time.Sleep(200 * time.Millisecond)
		cancel()
		within(t, "round", done)
		if r.Gateway == nil || !errors.Is(r.Gateway.Err, context.Canceled) {
			t.Errorf("gateway: want the cancellation, got %+v", r.Gateway)
		}
	})

	t.Run("close round", func(t *testing.T) {
		p := newTestProber(t, lab, l, time.Second, timeout)
		done := make(chan struct{})
		var r Round
		go func() { defer close(done); r = p.round(t.Context()) }()
		time.Sleep(200 * time.Millisecond)
		p.Close()
		within(t, "round", done)
		if r.Gateway == nil || r.Gateway.Err == nil || len(r.Targets) != 1 || r.Targets[0].Err == nil {
			t.Errorf("want every probe failed, got %+v", r)
		}
	})

	for _, how := range []string{"cancel", "close"} {
		t.Run(how+" run", func(t *testing.T) {
			p := newTestProber(t, lab, l, time.Second, timeout)
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			out := make(chan Report, 1)
			done := make(chan struct{})
			go func() { defer close(done); p.Run(ctx, out) }()
			time.Sleep(200 * time.Millisecond)
			if how == "cancel" {
				cancel()
			} else {
				p.Close()
			}
			within(t, "Run", done)
			select {
			case r := <-out:
				t.Errorf("a round cut short was reported: %+v", r)
			default:
			}
		})
	}
}

func TestProbeRun(t *testing.T) {
	lab := newProbeLab(t)
	l := lab.line
	l.Probe = config.Probe{Gateway: config.ProbeARP, Targets: []netip.Addr{probeGateway}, MinTargets: 1}
	p := newTestProber(t, lab, l, 50*time.Millisecond, 2*time.Second)
	ctx, cancel := context.WithCancel(t.Context())
	out := make(chan Report)
	done := make(chan struct{})
	go func() { defer close(done); p.Run(ctx, out) }()
	for i := range 3 {
		select {
		case r := <-out:
			if r.Line != l.Name || r.ID != l.ID {
				t.Errorf("report %d of %s/%d, want %s/%d", i, r.Line, r.ID, l.Name, l.ID)
			}
			if ok, why := r.Round.ok(1); !ok {
				t.Errorf("report %d: round not ok: %s", i, why)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no report %d", i)
		}
	}
	cancel()
	<-done
}

// A silent target gets retries within the round; a live one is answered
// by its first probe.
func TestProbeRetries(t *testing.T) {
	lab := newProbeLab(t)
	const timeout, retry = 300 * time.Millisecond, 20 * time.Millisecond
	for _, gwProbe := range []string{config.ProbeICMP, config.ProbeARP} {
		t.Run(gwProbe, func(t *testing.T) {
			l := lab.line
			l.Probe = config.Probe{Gateway: gwProbe}
			p := newRetryingProber(t, lab, l, time.Second, timeout, retry)
			if r := p.round(t.Context()); r.Gateway == nil || r.Gateway.Err != nil || r.Gateway.Lost != 0 {
				t.Errorf("want %s answered at its first probe, got %+v", probeGateway, r.Gateway)
			}
			l.Gateway = probeNobody
			l.Probe = config.Probe{Gateway: gwProbe, Targets: []netip.Addr{probeNobody}, MinTargets: 1}
			p = newRetryingProber(t, lab, l, time.Second, timeout, retry)
			r := p.round(t.Context())
			if r.Gateway == nil || len(r.Targets) != 1 {
				t.Fatalf("want a gateway and 1 target, got %+v", r)
			}
			for _, res := range []Result{*r.Gateway, r.Targets[0]} {
				if !errors.Is(res.Err, errNoAnswer) || res.Lost != probesPerRound(timeout, retry) {
					t.Errorf("want no answer from %s to %d probes, got %+v", probeNobody, probesPerRound(timeout, retry), res)
				}
			}
		})
	}
}

// A silent target gets timeout/retry probes a retry interval apart, and
// fails the round when the last has had its interval and the timeout has
// passed; a late probe pushes the rest back, none is skipped; a line of a
// slow RTT waits its own gap.
func TestProbeSchedule(t *testing.T) {
	start := time.Unix(1000, 0)
	ms := func(n int) time.Time { return start.Add(time.Duration(n) * time.Millisecond) }
	schedule := func(gap time.Duration, late map[int]int) (sent []int, end int) {
		pr := &probe{retry: gap, want: probesPerRound(100*time.Millisecond, 10*time.Millisecond), sent: []time.Time{ms(0)}}
		for {
			at, retry := pr.next(ms(100))
			n := int(at.Sub(start).Milliseconds())
			if !retry {
				for _, s := range pr.sent {
					sent = append(sent, int(s.Sub(start).Milliseconds()))
				}
				return sent, n
			}
			pr.sent = append(pr.sent, ms(n+late[n]))
		}
	}
	for _, tc := range []struct {
		gap     time.Duration
		late    map[int]int // a probe due at key ms went out value ms late
		sent    []int
		givesUp int
	}{
		{10 * time.Millisecond, nil, []int{0, 10, 20, 30, 40, 50, 60, 70, 80, 90}, 100},
		{10 * time.Millisecond, map[int]int{20: 75}, []int{0, 10, 95, 105, 115, 125, 135, 145, 155, 165}, 175},
		{60 * time.Millisecond, nil, []int{0, 60, 120, 180, 240, 300, 360, 420, 480, 540}, 600},
	} {
		sent, end := schedule(tc.gap, tc.late)
		if !slices.Equal(sent, tc.sent) || end != tc.givesUp {
			t.Errorf("gap %v, late %v: probes at %v ms, given up at %d; want %v, %d", tc.gap, tc.late, sent, end, tc.sent, tc.givesUp)
		}
	}
	if n := probesPerRound(100*time.Millisecond, 0); n != 1 {
		t.Errorf("no retries: %d probes a round", n)
	}
	// Without retries the round gives up at its deadline.
	pr := &probe{want: 1, sent: []time.Time{ms(0)}}
	if at, retry := pr.next(ms(100)); retry || !at.Equal(ms(100)) {
		t.Errorf("no retries: next %v %v, want the deadline", at, retry)
	}
}

// A round whose gateway is silent is reported late three quarters into
// the timeout (its RTT known to be short), before its own result; a live
// line's rounds never are. Both on ICMP and ARP gateways, and on targets
// alone (min_targets).
func TestProbeLate(t *testing.T) {
	lab := newProbeLab(t)
	const timeout, retry = 400 * time.Millisecond, 20 * time.Millisecond
	for _, c := range []struct {
		name  string
		probe config.Probe
		gw    netip.Addr
		late  bool
	}{
		{"icmp gateway silent", config.Probe{Gateway: config.ProbeICMP}, probeNobody, true},
		{"arp gateway silent", config.Probe{Gateway: config.ProbeARP}, probeNobody, true},
		{"targets silent", config.Probe{Gateway: config.ProbeNone, Targets: []netip.Addr{probeGateway, probeNobody}, MinTargets: 2}, probeGateway, true},
		{"icmp gateway live", config.Probe{Gateway: config.ProbeICMP}, probeGateway, false},
		{"arp gateway live", config.Probe{Gateway: config.ProbeARP}, probeGateway, false},
		{"enough targets live", config.Probe{Gateway: config.ProbeNone, Targets: []netip.Addr{probeGateway, probeNobody}, MinTargets: 1}, probeGateway, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := lab.line
			l.Gateway, l.Probe = c.gw, c.probe
			p := newRetryingProber(t, lab, l, 50*time.Millisecond, timeout, retry)
			for _, a := range append([]netip.Addr{c.gw}, c.probe.Targets...) {
				p.rtt[a] = &rttEstimate{srtt: time.Millisecond, rttvar: time.Millisecond / 2, samples: lateMinSamples}
			}
			out := make(chan Report, 8)
			ctx, cancel := context.WithCancel(t.Context())
			done := make(chan struct{})
			start := time.Now()
			go func() { defer close(done); p.Run(ctx, out) }()
			defer func() { cancel(); <-done }()
			var lateAt time.Duration // of the first round
			lateWord := false        // for the round under way
			for got := 0; got < 2; {
				select {
				case r := <-out:
					if r.Late != "" {
						if lateWord {
							t.Fatalf("late word twice for one round: %q", r.Late)
						}
						lateWord = true
						if got == 0 {
							lateAt = time.Since(start)
						}
						if r.Round.At.Before(start) || r.Round.Gateway != nil || r.Round.Targets != nil {
							t.Errorf("late word with a round %+v: want only its start", r.Round)
						}
						continue
					}
					got++
					ok, _ := r.Round.ok(l.Probe.MinTargets)
					if c.late != !ok {
						t.Fatalf("round ok %v, want %v", ok, !c.late)
					}
					if lateWord != c.late {
						t.Fatalf("round %d: late word before its result %v, want %v", got, lateWord, c.late)
					}
					lateWord = false
					if got == 1 && c.late {
						// Measured from before Run: only the lower bound is
						// tight (a loaded machine runs timers late).
						want := time.Duration(lateFraction * float64(timeout))
						if lateAt < want || lateAt > timeout+2*time.Second {
							t.Errorf("late word after %v, want from %v to about the round's wait %v", lateAt, want, timeout)
						}
					}
				case <-time.After(5 * time.Second):
					t.Fatal("no report")
				}
			}
		})
	}
}

// A round is late only once every target's answer is overdue: a quiet
// line at three quarters of the timeout, a slow one (a saturated line, a
// satellite hop) not before twice its RTT or its RTO, and one whose RTT is
// not known yet not before the round ends.
func TestLateAfter(t *testing.T) {
	const timeout = 200 * time.Millisecond
	p := &Prober{timeout: timeout, rtt: map[netip.Addr]*rttEstimate{}}
	quiet, slow, jittery, unknown, young := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2"), netip.MustParseAddr("192.0.2.3"), netip.MustParseAddr("192.0.2.4"), netip.MustParseAddr("192.0.2.5")
	p.rtt[young] = &rttEstimate{srtt: 500 * time.Microsecond, rttvar: 100 * time.Microsecond, samples: lateMinSamples - 1}
	p.rtt[quiet] = &rttEstimate{srtt: 500 * time.Microsecond, rttvar: 100 * time.Microsecond, samples: lateMinSamples}
	p.rtt[slow] = &rttEstimate{srtt: 180 * time.Millisecond, rttvar: 2 * time.Millisecond, samples: lateMinSamples}
	p.rtt[jittery] = &rttEstimate{srtt: 80 * time.Millisecond, rttvar: 60 * time.Millisecond, samples: lateMinSamples}
	for _, c := range []struct {
		name    string
		targets []netip.Addr
		want    time.Duration
	}{
		{"quiet", []netip.Addr{quiet}, 150 * time.Millisecond},
		{"slow and steady", []netip.Addr{quiet, slow}, 360 * time.Millisecond},
		{"jittery", []netip.Addr{jittery}, 320 * time.Millisecond},
		{"not known yet", []netip.Addr{quiet, unknown}, 250 * time.Millisecond},
		{"too few answers yet", []netip.Addr{young}, 250 * time.Millisecond},
	} {
		var all []*probe
		for _, a := range c.targets {
			all = append(all, &probe{target: a})
		}
		if got := p.lateAfter(all, 250*time.Millisecond); got != c.want {
			t.Errorf("%s: late after %v, want %v", c.name, got, c.want)
		}
	}
}

// A late word that proved false (the round was answered after all) quiets
// the next lateQuietRounds rounds: no word, while a failed round still
// says the line is late through its result. A true one quiets nothing.
func TestProbeLateQuiet(t *testing.T) {
	lab := newProbeLab(t)
	l := lab.line
	l.Gateway, l.Probe = probeNobody, config.Probe{Gateway: config.ProbeICMP}
	p := newRetryingProber(t, lab, l, 50*time.Millisecond, 200*time.Millisecond, 20*time.Millisecond)
	p.rtt[probeNobody] = &rttEstimate{srtt: time.Millisecond, rttvar: time.Millisecond / 2, samples: lateMinSamples}
	words := 0
	p.late = func(time.Time, string) { words++ }

	answered := Round{Gateway: &Result{Target: probeNobody, RTT: 190 * time.Millisecond}}
	failed := Round{Gateway: &Result{Target: probeNobody, Err: errNoAnswer}}
	p.saidLate = true
	p.afterRound(failed)
	if p.quiet != 0 {
		t.Fatalf("a true late word quieted %d rounds", p.quiet)
	}
	// The round that ends an outage: its word was not false.
	p.saidLate = true
	p.afterRound(answered)
	if p.quiet != 0 {
		t.Fatalf("a late word in the round that ended an outage quieted %d rounds", p.quiet)
	}
	p.saidLate = true
	p.afterRound(answered)
	if p.quiet != lateQuietRounds || p.saidLate {
		t.Fatalf("a false late word: quiet %d, said %v; want %d, false", p.quiet, p.saidLate, lateQuietRounds)
	}
	p.quiet = 1
	if r := p.round(t.Context()); r.Gateway.Err == nil || words != 0 || p.quiet != 0 {
		t.Fatalf("a quiet round: %d words (quiet now %d), gateway %+v; want none and a failed round", words, p.quiet, r.Gateway)
	}
	if p.round(t.Context()); words != 1 {
		t.Errorf("the round after the quiet ones: %d words, want 1", words)
	}
}
