// SPDX-License-Identifier: Apache-2.0

package health

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mdlayher/arp"
	"github.com/mdlayher/ethernet"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"github.com/uplinkd/uplinkd/control/config"
)

// Line is what probing a line needs. Probes are bound to the line's
// interface and marked for its routing table, from its own address, so
// that a probe can never leave by another line.
type Line struct {
	ID      uint64 // set by the caller, copied into every Report
	Name    string
	Ifname  string
	Ifindex int
	MAC     net.HardwareAddr // the interface's; ARP requests use the one the kernel has when the prober opens
	Mark    uint32
	Source  netip.Addr
	Gateway netip.Addr
	Probe   config.Probe
}

// Report is one round of one line, or word that a round under way is late.
type Report struct {
	Line  string
	ID    uint64 // the prober's Line.ID: rounds of a replaced prober are told apart
	Round Round
	// Late, when not empty, says why a round still under way is late: its
	// answers are overdue (Prober.lateAfter).
	// Round then holds only the time of the word; the round's result
	// follows in a report of its own.
	Late string
}

// lateFraction is the part of the timeout after which a round without
// the answers it needs makes a quiet line late: with the default 200 ms
// timeout and probes 20 ms apart, 150 ms and 8 probes unanswered (20%
// loss makes that one round in 400,000). A slower line waits longer
// (Prober.lateAfter).
const lateFraction = 0.75

// lateMinSamples is how many answers a target needs before its rounds may
// be late mid-round: the first RTTs of a line (an agent starting on a busy
// machine) say little about the next ones.
const lateMinSamples = 10

// lateQuietRounds is how many rounds follow a false late word (the round
// was answered after all) without another: 5 s at the default interval. A
// silent gateway is still late at the end of its first failed round.
const lateQuietRounds = 25

// errNoAnswer is a probe that timed out.
var errNoAnswer = errors.New("no answer")

// echoData is the payload of every echo request.
var echoData = []byte("uplinkd!")

// echoIDs tells the echo IDs of the probers of this process apart: a raw
// ICMP socket sees every echo reply of its namespace that reaches it.
var echoIDs atomic.Uint32

// Prober probes one line in rounds. Each round sends a probe to every
// target and reads the sockets until every target has answered or its
// wait is over; a target still silent after the retry interval gets
// another probe, and another every retry interval, up to timeout/retry
// probes (a fast retry, like TCP's early retransmit); a target whose
// lowest RTT so far is more than half the retry interval waits twice that
// RTT instead. A target fails the round once it has had all its probes,
// each with its full wait, and the round's wait has passed: the timeout,
// or longer where the line's answers have lately come later (rttEstimate). An answer to any
// probe of the round answers the target. Nothing reads between rounds.
type Prober struct {
	line     Line
	interval time.Duration
	timeout  time.Duration
	retry    time.Duration                // 0: one probe per target and round
	best     map[netip.Addr]time.Duration // each target's lowest RTT so far
	rtt      map[netip.Addr]*rttEstimate  // each target's smoothed RTT

	icmp   net.PacketConn // nil when nothing is probed with ICMP
	buf    []byte         // echo replies are read into it
	echoID uint16
	seq    uint16 // echo sequence number of the next request; one goroutine sends them at a time

	arp    *arp.Client // nil unless the gateway is probed with ARP
	arpMAC net.HardwareAddr

	// late, when set, is told that a round under way is late (Run sets
	// it); lateMu orders that word before the round's own report.
	late   func(at time.Time, why string)
	lateMu sync.Mutex
	// saidLate: the round under way was reported late (under lateMu).
	// quiet counts the rounds left without late words after one proved
	// false (the round was answered after all): on a line whose answers
	// jitter past the threshold, a word at most every lateQuietRounds.
	saidLate bool
	quiet    int
	lastOK   bool // the last round was good

	closeOnce sync.Once
	closed    chan struct{}
}

// NewProber opens the line's probe sockets; do runs a function in the
// line's network namespace (sockets stay in the namespace they are made
// in). retry is the retry interval (0: no retries).
func NewProber(l Line, interval, timeout, retry time.Duration, do func(func() error) error) (*Prober, error) {
	p := &Prober{
		line: l, interval: interval, timeout: timeout, retry: retry, best: map[netip.Addr]time.Duration{},
		rtt:    map[netip.Addr]*rttEstimate{},
		echoID: uint16(os.Getpid()) ^ uint16(echoIDs.Add(1)), buf: make([]byte, 1500),
		closed: make(chan struct{}),
	}
	err := do(func() error {
		var err error
		if l.Probe.Gateway == config.ProbeICMP || len(l.Probe.Targets) > 0 {
			if p.icmp, err = openICMP(l); err != nil {
				return fmt.Errorf("opening ICMP probe socket of %s: %w", l.Name, err)
			}
		}
		if l.Probe.Gateway == config.ProbeARP {
			if err = p.openARP(); err != nil {
				return fmt.Errorf("opening ARP probe socket of %s: %w", l.Name, err)
			}
		}
		return nil
	})
	if err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

// openICMP opens a raw ICMP socket bound to the line's interface and
// address and marked for its table. It only receives echo replies.
func openICMP(l Line) (net.PacketConn, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		if cerr := c.Control(func(fd uintptr) { err = bindLine(int(fd), l) }); cerr != nil {
			return cerr
		}
		return err
	}}
	c, err := lc.ListenPacket(context.Background(), "ip4:icmp", l.Source.String())
	if err != nil {
		return nil, err
	}
	var f ipv4.ICMPFilter
	f.SetAll(true)
	f.Accept(ipv4.ICMPTypeEchoReply)
	if err := ipv4.NewPacketConn(c).SetICMPFilter(&f); err != nil {
		c.Close()
		return nil, fmt.Errorf("filtering echo replies: %w", err)
	}
	return c, nil
}

// bindLine binds a socket to the line's interface and marks it for the
// line's routing table.
func bindLine(fd int, l Line) error {
	if err := unix.SetsockoptString(fd, unix.SOL_SOCKET, unix.SO_BINDTODEVICE, l.Ifname); err != nil {
		return fmt.Errorf("binding to %s: %w", l.Ifname, err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(l.Mark)); err != nil {
		return fmt.Errorf("marking: %w", err)
	}
	return nil
}

// openARP opens an ARP client on the line's interface, looked up in the
// calling thread's namespace.
func (p *Prober) openARP() error {
	ifi, err := net.InterfaceByName(p.line.Ifname)
	if err != nil {
		return err
	}
	if len(ifi.HardwareAddr) != 6 {
		return fmt.Errorf("%s has no Ethernet address for ARP", p.line.Ifname)
	}
	if p.arp, err = arp.Dial(ifi); err != nil {
		return err
	}
	p.arpMAC = ifi.HardwareAddr
	return nil
}

// Close closes the sockets: a round under way ends, and Run returns.
func (p *Prober) Close() {
	p.closeOnce.Do(func() {
		close(p.closed)
		if p.icmp != nil {
			p.icmp.Close()
		}
		if p.arp != nil {
			p.arp.Close()
		}
	})
}

// Run sends a round every interval and reports it on out until ctx ends
// or the prober is closed; then it closes the prober. A round cut short
// by either is not reported.
func (p *Prober) Run(ctx context.Context, out chan<- Report) {
	defer p.Close()
	tick := time.NewTicker(p.interval)
	defer tick.Stop()
	p.late = func(at time.Time, why string) {
		select { // never blocks a round: the owner reads reports at once
		case out <- Report{Line: p.line.Name, ID: p.line.ID, Round: Round{At: at}, Late: why}:
		default:
		}
	}
	for {
		r := p.round(ctx)
		if ctx.Err() != nil || p.isClosed() {
			return
		}
		p.afterRound(r)
		select {
		case out <- Report{Line: p.line.Name, ID: p.line.ID, Round: r}:
		case <-ctx.Done():
			return
		case <-p.closed:
			return
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			return
		case <-p.closed:
			return
		}
	}
}

// afterRound quiets the late words for lateQuietRounds when the round was
// reported late and answered after all.
func (p *Prober) afterRound(r Round) {
	p.lateMu.Lock()
	defer p.lateMu.Unlock()
	// A word in the round that ended an outage (the target answered
	// again after it) was not false: only one after a good round is.
	ok, _ := r.ok(p.line.Probe.MinTargets)
	if ok && p.saidLate && p.lastOK {
		p.quiet = lateQuietRounds
	}
	p.saidLate, p.lastOK = false, ok
}

func (p *Prober) isClosed() bool {
	select {
	case <-p.closed:
		return true
	default:
		return false
	}
}

// probe is one target of a round and the probes sent to it.
type probe struct {
	target   netip.Addr
	method   string
	seqs     []uint16      // echo sequence numbers of the probes sent (ICMP)
	sent     []time.Time   // when each probe went out
	sendErr  error         // the first probe could not be sent
	retry    time.Duration // how long each probe may stay silent before the next
	want     int           // how many probes it gets before the round gives up on it
	answered int           // the index of the probe answered; -1: none yet
	rtt      time.Duration
	done     atomic.Bool // answered, for the lateness check of another goroutine
}

// pending reports whether the target is still awaited.
func (pr *probe) pending() bool { return pr.sendErr == nil && pr.answered < 0 }

// answer records the answer to the target's probe i.
func (pr *probe) answer(i int, at time.Time) {
	pr.answered, pr.rtt = i, at.Sub(pr.sent[i])
	pr.done.Store(true)
}

// deadliner is what a round sets deadlines on: read deadlines while it
// waits (retries are written meanwhile), both on a cancellation.
type deadliner interface {
	SetDeadline(time.Time) error
	SetReadDeadline(time.Time) error
}

// probesPerRound is how many probes a silent target gets in a round: one
// every retry interval that still has a full interval before the timeout
// (timeout/retry), or one without retries.
func probesPerRound(timeout, retry time.Duration) int {
	if retry <= 0 {
		return 1
	}
	return max(1, int(timeout/retry))
}

// next returns when the round next needs a silent target: another probe
// at at (retry true); or, once it has had all its probes, each with its
// full retry interval, and the round's deadline has passed, the end of
// its wait at at. A prober that ran late still sends every probe: a
// failed round always means want probes unanswered.
func (pr *probe) next(deadline time.Time) (at time.Time, retry bool) {
	last := pr.sent[len(pr.sent)-1]
	if len(pr.sent) < pr.want {
		return last.Add(pr.retry), true
	}
	if end := last.Add(pr.retry); end.After(deadline) {
		return end, false
	}
	return deadline, false
}

// round sends a probe to every target at once and reads the answers until
// all have come or the timeout passes, retrying silent targets meanwhile.
// Rounds must not overlap.
func (p *Prober) round(ctx context.Context) Round {
	r := Round{At: time.Now()}
	var gw *probe
	var echo []*probe // the ICMP probes, gateway first
	switch p.line.Probe.Gateway {
	case config.ProbeICMP:
		gw = &probe{target: p.line.Gateway, method: config.ProbeICMP, answered: -1}
		echo = append(echo, gw)
	case config.ProbeARP:
		gw = &probe{target: p.line.Gateway, method: config.ProbeARP, answered: -1}
	}
	targets := make([]*probe, len(p.line.Probe.Targets))
	for i, t := range p.line.Probe.Targets {
		targets[i] = &probe{target: t, method: config.ProbeICMP, answered: -1}
		echo = append(echo, targets[i])
	}

	// A cancellation cuts the reads short: each read loop sets its
	// deadlines first and checks the context after, so that a context
	// that is done ends the round at once.
	var conns []deadliner
	if p.icmp != nil {
		conns = append(conns, p.icmp)
	}
	if p.arp != nil {
		conns = append(conns, p.arp)
	}
	stop := context.AfterFunc(ctx, func() {
		for _, c := range conns {
			c.SetDeadline(time.Now())
		}
	})
	defer stop()

	// Send everything, then read both sockets at once. Every ICMP probe
	// has its own sequence number, so that a reply answers exactly one
	// probe; ARP has none: a reply answers the latest request.
	all := slices.Clone(targets)
	if gw != nil {
		all = append(all, gw)
	}
	wait := p.timeout
	for _, pr := range all {
		wait = max(wait, p.rtt[pr.target].rto())
	}
	deadline := r.At.Add(wait)
	if p.quiet > 0 {
		p.quiet--
	} else if lateAfter := p.lateAfter(all, wait); p.late != nil && lateAfter < wait {
		over := false
		lateTimer := time.AfterFunc(lateAfter, func() {
			p.lateMu.Lock()
			defer p.lateMu.Unlock()
			if why := p.lateness(gw, targets, lateAfter); !over && why != "" {
				p.late(time.Now(), why)
				p.saidLate = true
			}
		})
		defer func() {
			lateTimer.Stop()
			p.lateMu.Lock()
			over = true
			p.lateMu.Unlock()
		}()
	}
	for _, pr := range all {
		pr.retry, pr.want = p.retry, probesPerRound(p.timeout, p.retry)
		if b := p.best[pr.target]; 2*b > p.retry && p.retry > 0 {
			pr.retry = 2 * b
		}
	}
	for _, pr := range echo {
		pr.sendErr = p.sendEcho(pr)
	}
	arpGW := gw != nil && gw.method == config.ProbeARP
	if arpGW {
		gw.sendErr = p.sendARP(gw)
	}
	// The ARP socket is read by a goroutine of its own only when there
	// is ICMP to read too (a goroutine a round costs, with 16 lines).
	var icmpErr, arpErr error
	var wg sync.WaitGroup
	if arpGW {
		arp := func() {
			arpErr = p.await(ctx, p.arp, []*probe{gw}, deadline, func() error { return p.readARP(gw) }, p.sendARP)
		}
		if len(echo) == 0 {
			arp()
		} else {
			wg.Go(arp)
		}
	}
	if len(echo) > 0 {
		icmpErr = p.await(ctx, p.icmp, echo, deadline, func() error { return p.readEcho(p.buf, echo) }, p.sendEcho)
	}
	wg.Wait()
	for _, pr := range all {
		if pr.answered < 0 {
			continue
		}
		if b, ok := p.best[pr.target]; !ok || pr.rtt < b {
			p.best[pr.target] = pr.rtt
		}
		if p.rtt[pr.target] == nil {
			p.rtt[pr.target] = &rttEstimate{}
		}
		p.rtt[pr.target].add(pr.rtt)
	}

	result := func(pr *probe, readErr error) Result {
		res := Result{Target: pr.target, Method: pr.method}
		switch {
		case pr.sendErr != nil:
			res.Err = pr.sendErr
		case pr.answered >= 0:
			res.RTT, res.Lost = pr.rtt, pr.answered
		case ctx.Err() != nil:
			res.Err = fmt.Errorf("round cut short: %w", ctx.Err())
		case readErr == nil || errors.Is(readErr, os.ErrDeadlineExceeded):
			res.Err = fmt.Errorf("%w to %d probes in %v", errNoAnswer, len(pr.sent), time.Since(r.At).Round(time.Millisecond))
			res.Lost = len(pr.sent)
		default:
			res.Err = fmt.Errorf("reading replies: %w", readErr)
		}
		return res
	}
	if gw != nil {
		readErr := icmpErr
		if arpGW {
			readErr = arpErr
		}
		res := result(gw, readErr)
		r.Gateway = &res
	}
	for _, pr := range targets {
		r.Targets = append(r.Targets, result(pr, icmpErr))
	}
	return r
}

// lateAfter is when a round without its answers is late: lateFraction of
// the timeout, but never before any target's answer is due: twice its
// smoothed RTT, or its retransmission timeout, whichever is longer (a
// healthy line whose answers come in 180 ms is never late). A target with
// fewer than lateMinSamples answers gives the whole round's wait (no word
// before the round ends). At wait or later there is no word: the round's result decides.
func (p *Prober) lateAfter(all []*probe, wait time.Duration) time.Duration {
	after := time.Duration(lateFraction * float64(p.timeout))
	for _, pr := range all {
		e := p.rtt[pr.target]
		if e == nil || e.samples < lateMinSamples {
			return wait
		}
		after = max(after, 2*e.srtt, e.rto())
	}
	return after
}

// lateness says why a round under way cannot be good yet (its gateway or
// too many targets unanswered), or "" when it can.
func (p *Prober) lateness(gw *probe, targets []*probe, after time.Duration) string {
	after = after.Round(time.Millisecond)
	if gw != nil && !gw.done.Load() {
		return fmt.Sprintf("gateway %s (%s): no answer in %v", gw.target, gw.method, after)
	}
	answered := 0
	for _, t := range targets {
		if t.done.Load() {
			answered++
		}
	}
	if answered < p.line.Probe.MinTargets {
		return fmt.Sprintf("%d of %d targets answered in %v, %d needed", answered, len(targets), after, p.line.Probe.MinTargets)
	}
	return ""
}

// await reads c (one packet a read) until none of probes is pending (nil)
// or reading fails: the round's end, a cancellation, or Close. It sends
// the retries as they fall due. Once every silent target's wait is over,
// it reads once more what has arrived already: an answer that was in time
// counts even when this goroutine ran late.
func (p *Prober) await(ctx context.Context, c deadliner, probes []*probe, deadline time.Time, read func() error, resend func(*probe) error) error {
	var drain time.Time
	for {
		now := time.Now()
		var wake time.Time
		pending, over := false, true
		for _, pr := range probes {
			if !pr.pending() {
				continue
			}
			pending = true
			at, retry := pr.next(deadline)
			if retry && !now.Before(at) {
				if resend(pr) != nil {
					pr.want = len(pr.sent) // one probe fewer, and no more this round
				}
				at, retry = pr.next(deadline)
			}
			over = over && !retry && !now.Before(at)
			if wake.IsZero() || at.Before(wake) {
				wake = at
			}
		}
		if !pending {
			return nil
		}
		if over {
			if drain.IsZero() {
				drain = now.Add(time.Millisecond)
			}
			wake = drain
		}
		c.SetReadDeadline(wake) // fails only once closed: the read says so
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := read(); err != nil && (over || ctx.Err() != nil || !errors.Is(err, os.ErrDeadlineExceeded)) {
			return err
		}
	}
}

// sendEcho sends an echo request to the probe's target.
func (p *Prober) sendEcho(pr *probe) error {
	seq := p.seq
	p.seq++
	m := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: int(p.echoID), Seq: int(seq), Data: echoData}}
	b, err := m.Marshal(nil)
	if err != nil {
		return fmt.Errorf("building echo request: %w", err)
	}
	sent := time.Now()
	if _, err := p.icmp.WriteTo(b, &net.IPAddr{IP: pr.target.AsSlice()}); err != nil {
		return fmt.Errorf("sending echo request: %w", err)
	}
	pr.seqs, pr.sent = append(pr.seqs, seq), append(pr.sent, sent)
	return nil
}

// readEcho reads one packet and records the answer it is, if any.
func (p *Prober) readEcho(buf []byte, probes []*probe) error {
	n, from, err := p.icmp.ReadFrom(buf)
	if err != nil {
		return err
	}
	now := time.Now()
	m, err := icmp.ParseMessage(ipv4.ICMPTypeEchoReply.Protocol(), buf[:n])
	if err != nil || m.Type != ipv4.ICMPTypeEchoReply {
		return nil
	}
	e, ok := m.Body.(*icmp.Echo)
	if !ok || e.ID != int(p.echoID) {
		return nil
	}
	ipa, ok := from.(*net.IPAddr)
	if !ok {
		return nil
	}
	src, ok := netip.AddrFromSlice(ipa.IP)
	if !ok {
		return nil
	}
	for _, pr := range probes {
		if !pr.pending() || src.Unmap() != pr.target {
			continue
		}
		if i := slices.Index(pr.seqs, uint16(e.Seq)); i >= 0 {
			pr.answer(i, now)
			return nil
		}
	}
	return nil // another round's, or not ours
}

// sendARP broadcasts an ARP request for the gateway from the line's
// address (not the interface's first one, as arp.Client.Request would),
// so that the gateway sees the line's own address.
func (p *Prober) sendARP(pr *probe) error {
	req, err := arp.NewPacket(arp.OperationRequest, p.arpMAC, p.line.Source, make(net.HardwareAddr, 6), pr.target)
	if err != nil {
		return fmt.Errorf("building ARP request: %w", err)
	}
	sent := time.Now()
	if err := p.arp.WriteTo(req, ethernet.Broadcast); err != nil {
		return fmt.Errorf("sending ARP request: %w", err)
	}
	pr.sent = append(pr.sent, sent)
	return nil
}

// readARP reads one ARP packet; a reply of the gateway answers its latest
// request (ARP has no sequence number). Only the socket's errors are
// returned (deadline, closed, failed), not a malformed frame's.
func (p *Prober) readARP(pr *probe) error {
	pkt, _, err := p.arp.Read()
	if err != nil {
		if _, ok := errors.AsType[*net.OpError](err); ok {
			return err
		}
		return nil
	}
	if pkt.Operation == arp.OperationReply && pkt.SenderIP == pr.target {
		pr.answer(len(pr.sent)-1, time.Now())
	}
	return nil
}

// maxRoundWait bounds how long a round waits for a slow target's answer.
const maxRoundWait = time.Second

// rttEstimate is a target's smoothed round-trip time and its variation,
// as TCP keeps them (RFC 6298). A loaded line's queue delays the answers:
// a round waits for them as TCP's retransmission timeout would, instead of
// failing a line whose probes are only late (a demo line saturated by bulk
// flows had 80 ms ± 60 ms, and a fixed 100 ms wait took it down).
type rttEstimate struct {
	srtt, rttvar time.Duration
	samples      int
}

func (e *rttEstimate) add(r time.Duration) {
	e.samples++
	if e.srtt == 0 {
		e.srtt, e.rttvar = r, r/2
		return
	}
	d := e.srtt - r
	if d < 0 {
		d = -d
	}
	e.rttvar = (3*e.rttvar + d) / 4
	e.srtt = (7*e.srtt + r) / 8
}

// rto is how long a round waits for the target: srtt + 4 rttvar, at most
// maxRoundWait; 0 before any answer (the configured timeout applies).
func (e *rttEstimate) rto() time.Duration {
	if e == nil {
		return 0
	}
	return min(e.srtt+4*e.rttvar, maxRoundWait)
}
