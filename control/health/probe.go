// SPDX-License-Identifier: Apache-2.0

package health

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
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

// Report is one round of one line.
type Report struct {
	Line  string
	ID    uint64 // the prober's Line.ID: rounds of a replaced prober are told apart
	Round Round
}

// errNoAnswer is a probe that timed out.
var errNoAnswer = errors.New("no answer")

// echoData is the payload of every echo request.
var echoData = []byte("uplinkd!")

// echoIDs tells the echo IDs of the probers of this process apart: a raw
// ICMP socket sees every echo reply of its namespace that reaches it.
var echoIDs atomic.Uint32

// Prober probes one line in rounds. Each round sets a deadline of its
// start plus the timeout on the sockets and reads them until every probe
// has answered or the deadline passes; nothing reads between rounds.
type Prober struct {
	line     Line
	interval time.Duration
	timeout  time.Duration

	icmp   net.PacketConn // nil when nothing is probed with ICMP
	echoID uint16
	seq    uint16 // echo sequence number of the next request; rounds run one at a time

	arp    *arp.Client // nil unless the gateway is probed with ARP
	arpMAC net.HardwareAddr

	closeOnce sync.Once
	closed    chan struct{}
}

// NewProber opens the line's probe sockets; do runs a function in the
// line's network namespace (sockets stay in the namespace they are made
// in).
func NewProber(l Line, interval, timeout time.Duration, do func(func() error) error) (*Prober, error) {
	p := &Prober{
		line: l, interval: interval, timeout: timeout,
		echoID: uint16(os.Getpid()) ^ uint16(echoIDs.Add(1)),
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
	for {
		r := p.round(ctx)
		if ctx.Err() != nil || p.isClosed() {
			return
		}
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

func (p *Prober) isClosed() bool {
	select {
	case <-p.closed:
		return true
	default:
		return false
	}
}

// probe is one probe of a round.
type probe struct {
	target   netip.Addr
	method   string
	seq      uint16 // echo sequence number (ICMP)
	sent     time.Time
	sendErr  error
	answered bool
	rtt      time.Duration
}

// deadliner is what a round sets deadlines on.
type deadliner interface{ SetDeadline(time.Time) error }

// round sends every probe of a round at once and reads the answers until
// all have come or the timeout passes. Rounds must not overlap.
func (p *Prober) round(ctx context.Context) Round {
	r := Round{At: time.Now()}
	var gw *probe
	var echo []*probe // the ICMP probes, gateway first
	switch p.line.Probe.Gateway {
	case config.ProbeICMP:
		gw = &probe{target: p.line.Gateway, method: config.ProbeICMP}
		echo = append(echo, gw)
	case config.ProbeARP:
		gw = &probe{target: p.line.Gateway, method: config.ProbeARP}
	}
	targets := make([]*probe, len(p.line.Probe.Targets))
	for i, t := range p.line.Probe.Targets {
		targets[i] = &probe{target: t, method: config.ProbeICMP}
		echo = append(echo, targets[i])
	}

	// Deadlines first, then the cancellation that cuts them short: a
	// context that is done already ends the round at once.
	var conns []deadliner
	if p.icmp != nil {
		conns = append(conns, p.icmp)
	}
	if p.arp != nil {
		conns = append(conns, p.arp)
	}
	deadline := r.At.Add(p.timeout)
	for _, c := range conns {
		c.SetDeadline(deadline) // fails only once closed: the reads say so
	}
	stop := context.AfterFunc(ctx, func() {
		for _, c := range conns {
			c.SetDeadline(time.Now())
		}
	})
	defer stop()

	// Send everything, then read both sockets at once. Every probe of the
	// round gets its own sequence number, so that a reply answers exactly
	// one probe.
	for i, pr := range echo {
		pr.seq = p.seq + uint16(i)
		pr.sendErr = p.sendEcho(pr)
	}
	p.seq += uint16(len(echo))
	arpGW := gw != nil && gw.method == config.ProbeARP
	if arpGW {
		gw.sendErr = p.sendARP(gw)
	}
	var icmpErr, arpErr error
	var wg sync.WaitGroup
	if len(echo) > 0 {
		wg.Go(func() { icmpErr = p.readEcho(echo) })
	}
	if arpGW {
		wg.Go(func() { arpErr = p.readARP(gw) })
	}
	wg.Wait()

	result := func(pr *probe, readErr error) Result {
		res := Result{Target: pr.target, Method: pr.method}
		switch {
		case pr.sendErr != nil:
			res.Err = pr.sendErr
		case pr.answered:
			res.RTT = pr.rtt
		case ctx.Err() != nil:
			res.Err = fmt.Errorf("round cut short: %w", ctx.Err())
		case readErr == nil || errors.Is(readErr, os.ErrDeadlineExceeded):
			res.Err = fmt.Errorf("%w in %v", errNoAnswer, p.timeout)
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

// sendEcho sends an echo request.
func (p *Prober) sendEcho(pr *probe) error {
	m := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: int(p.echoID), Seq: int(pr.seq), Data: echoData}}
	b, err := m.Marshal(nil)
	if err != nil {
		return fmt.Errorf("building echo request: %w", err)
	}
	pr.sent = time.Now()
	if _, err := p.icmp.WriteTo(b, &net.IPAddr{IP: pr.target.AsSlice()}); err != nil {
		return fmt.Errorf("sending echo request: %w", err)
	}
	return nil
}

// readEcho reads echo replies until every probe that was sent has its
// answer (nil) or reading fails (the deadline, or Close).
func (p *Prober) readEcho(probes []*probe) error {
	pending := 0
	for _, pr := range probes {
		if pr.sendErr == nil {
			pending++
		}
	}
	buf := make([]byte, 1500)
	for pending > 0 {
		n, from, err := p.icmp.ReadFrom(buf)
		if err != nil {
			return err
		}
		now := time.Now()
		m, err := icmp.ParseMessage(ipv4.ICMPTypeEchoReply.Protocol(), buf[:n])
		if err != nil || m.Type != ipv4.ICMPTypeEchoReply {
			continue
		}
		e, ok := m.Body.(*icmp.Echo)
		if !ok || e.ID != int(p.echoID) {
			continue
		}
		i := int(uint16(e.Seq) - probes[0].seq)
		if i >= len(probes) {
			continue // another round's, or not ours
		}
		pr := probes[i]
		ipa, ok := from.(*net.IPAddr)
		if !ok || pr.sendErr != nil || pr.answered {
			continue
		}
		if src, ok := netip.AddrFromSlice(ipa.IP); !ok || src.Unmap() != pr.target {
			continue
		}
		pr.answered, pr.rtt = true, now.Sub(pr.sent)
		pending--
	}
	return nil
}

// sendARP broadcasts an ARP request for the gateway from the line's
// address (not the interface's first one, as arp.Client.Request would),
// so that the gateway sees the line's own address.
func (p *Prober) sendARP(pr *probe) error {
	req, err := arp.NewPacket(arp.OperationRequest, p.arpMAC, p.line.Source, make(net.HardwareAddr, 6), pr.target)
	if err != nil {
		return fmt.Errorf("building ARP request: %w", err)
	}
	pr.sent = time.Now()
	if err := p.arp.WriteTo(req, ethernet.Broadcast); err != nil {
		return fmt.Errorf("sending ARP request: %w", err)
	}
	return nil
}

// readARP reads ARP packets until the gateway's reply (nil) or reading
// fails (the deadline, or Close). ARP has no sequence number: any reply
// of the gateway during the round answers it.
func (p *Prober) readARP(pr *probe) error {
	if pr.sendErr != nil {
		return nil
	}
	for {
		pkt, _, err := p.arp.Read()
		if err != nil {
			if _, ok := errors.AsType[*net.OpError](err); ok {
				return err // the socket's: deadline, closed, or failed
			}
			continue // a malformed frame
		}
		if pkt.Operation == arp.OperationReply && pkt.SenderIP == pr.target {
			pr.answered, pr.rtt = true, time.Since(pr.sent)
			return nil
		}
	}
}
