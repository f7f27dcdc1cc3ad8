// SPDX-License-Identifier: Apache-2.0

package health

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

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
	MAC     net.HardwareAddr // for ARP
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

// Prober probes one line in rounds.
type Prober struct {
	line     Line
	interval time.Duration
	timeout  time.Duration
	icmp     *rawConn // nil when nothing is probed with ICMP
	arp      *rawConn // nil unless the gateway is probed with ARP
}

// NewProber opens the line's probe sockets; do runs a function in the
// line's network namespace (sockets stay in the namespace they are made
// in).
func NewProber(l Line, interval, timeout time.Duration, do func(func() error) error) (*Prober, error) {
	p := &Prober{line: l, interval: interval, timeout: timeout}
	err := do(func() error {
		var err error
		if l.Probe.Gateway == config.ProbeICMP || len(l.Probe.Targets) > 0 {
			if p.icmp, err = openICMP(l); err != nil {
				return fmt.Errorf("opening ICMP probe socket of %s: %w", l.Name, err)
			}
		}
		if l.Probe.Gateway == config.ProbeARP {
			if p.arp, err = openARP(l); err != nil {
				p.Close()
				return fmt.Errorf("opening ARP probe socket of %s: %w", l.Name, err)
			}
		}
		return nil
	})
	return p, err
}

// Close closes the sockets.
func (p *Prober) Close() {
	if p.icmp != nil {
		p.icmp.close()
	}
	if p.arp != nil {
		p.arp.close()
	}
}

// Run sends a round every interval and reports it on out until ctx ends;
// then it closes the prober.
func (p *Prober) Run(ctx context.Context, out chan<- Report) {
	defer p.Close()
	tick := time.NewTicker(p.interval)
	defer tick.Stop()
	for {
		r := p.round(ctx)
		select {
		case out <- Report{Line: p.line.Name, ID: p.line.ID, Round: r}:
		case <-ctx.Done():
			return
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			return
		}
	}
}

// round sends every probe of a round at once and waits for the answers
// until the timeout.
func (p *Prober) round(ctx context.Context) Round {
	r := Round{At: time.Now()}
	type probe struct {
		conn   *rawConn
		target netip.Addr
		method string
	}
	var probes []probe
	switch p.line.Probe.Gateway {
	case config.ProbeICMP:
		probes = append(probes, probe{p.icmp, p.line.Gateway, config.ProbeICMP})
	case config.ProbeARP:
		probes = append(probes, probe{p.arp, p.line.Gateway, config.ProbeARP})
	}
	for _, t := range p.line.Probe.Targets {
		probes = append(probes, probe{p.icmp, t, config.ProbeICMP})
	}
	for _, c := range []*rawConn{p.icmp, p.arp} {
		if c != nil {
			c.newRound()
		}
	}
	sendErr := make([]error, len(probes))
	for i, pr := range probes {
		sendErr[i] = pr.conn.send(pr.target)
	}
	select {
	case <-time.After(p.timeout):
	case <-ctx.Done():
	}
	for i, pr := range probes {
		res := Result{Target: pr.target, Method: pr.method, Err: sendErr[i]}
		if res.Err == nil {
			if rtt, ok := pr.conn.answer(pr.target); ok {
				res.RTT = rtt
			} else {
				res.Err = fmt.Errorf("%w in %v", errNoAnswer, p.timeout)
			}
		}
		if i == 0 && p.line.Probe.Gateway != config.ProbeNone {
			r.Gateway = &res
		} else {
			r.Targets = append(r.Targets, res)
		}
	}
	return r
}

// rawConn is one probe socket with its receiver: probes of the current
// round are matched to answers by the receiver goroutine.
type rawConn struct {
	fd      int
	request func(seq uint16, target netip.Addr) ([]byte, unix.Sockaddr)
	parse   func(b []byte, from unix.Sockaddr) (seq uint16, src netip.Addr, ok bool)

	mu      sync.Mutex
	seq     uint16
	sent    map[netip.Addr]time.Time
	answers map[netip.Addr]time.Duration

	closed atomic.Bool
	done   chan struct{}
}

// recvTimeout bounds a receive, so that the receiver notices Close.
const recvTimeout = 50 * time.Millisecond

func newRawConn(fd int) (*rawConn, error) {
	tv := unix.NsecToTimeval(recvTimeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &rawConn{fd: fd, done: make(chan struct{})}, nil
}

func (c *rawConn) start() { go c.receive() }

func (c *rawConn) newRound() {
	c.mu.Lock()
	c.seq++
	c.sent = map[netip.Addr]time.Time{}
	c.answers = map[netip.Addr]time.Duration{}
	c.mu.Unlock()
}

func (c *rawConn) send(target netip.Addr) error {
	c.mu.Lock()
	seq := c.seq
	c.sent[target] = time.Now()
	c.mu.Unlock()
	b, to := c.request(seq, target)
	return unix.Sendto(c.fd, b, 0, to)
}

func (c *rawConn) answer(target netip.Addr) (time.Duration, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	rtt, ok := c.answers[target]
	return rtt, ok
}

func (c *rawConn) receive() {
	defer close(c.done)
	buf := make([]byte, 1500)
	for !c.closed.Load() {
		n, from, err := unix.Recvfrom(c.fd, buf, 0)
		if err != nil {
			continue // timeout (EAGAIN) or EINTR: look at closed again
		}
		now := time.Now()
		seq, src, ok := c.parse(buf[:n], from)
		if !ok {
			continue
		}
		c.mu.Lock()
		if sent, asked := c.sent[src]; asked && seq == c.seq {
			if _, dup := c.answers[src]; !dup {
				c.answers[src] = now.Sub(sent)
			}
		}
		c.mu.Unlock()
	}
}

// close stops the receiver, then closes the socket (never the other way
// round: the descriptor number could be reused under the receiver).
func (c *rawConn) close() {
	if c.closed.Swap(true) {
		return
	}
	<-c.done
	unix.Close(c.fd)
}

// openICMP opens a raw ICMP socket bound to the line's interface and
// address and marked for its table; echo ids are the socket's own.
func openICMP(l Line) (*rawConn, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
	if err != nil {
		return nil, err
	}
	if err := bindLine(fd, l); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: l.Source.As4()}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("binding to %s: %w", l.Source, err)
	}
	c, err := newRawConn(fd)
	if err != nil {
		return nil, err
	}
	id := uint16(fd) ^ uint16(unix.Getpid())
	c.request = func(seq uint16, target netip.Addr) ([]byte, unix.Sockaddr) {
		return echoRequest(id, seq), &unix.SockaddrInet4{Addr: target.As4()}
	}
	c.parse = func(b []byte, from unix.Sockaddr) (uint16, netip.Addr, bool) {
		return parseEchoReply(b, id)
	}
	c.start()
	return c, nil
}

func bindLine(fd int, l Line) error {
	if err := unix.SetsockoptString(fd, unix.SOL_SOCKET, unix.SO_BINDTODEVICE, l.Ifname); err != nil {
		return fmt.Errorf("binding to %s: %w", l.Ifname, err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(l.Mark)); err != nil {
		return fmt.Errorf("marking: %w", err)
	}
	return nil
}

const (
	icmpEchoReply   = 0
	icmpEchoRequest = 8
)

// echoRequest builds an ICMP echo request.
func echoRequest(id, seq uint16) []byte {
	b := make([]byte, 16)
	b[0] = icmpEchoRequest
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], seq)
	copy(b[8:], "uplinkd!")
	binary.BigEndian.PutUint16(b[2:], checksum(b))
	return b
}

// parseEchoReply reads an IPv4 packet holding an echo reply with our id.
func parseEchoReply(b []byte, id uint16) (uint16, netip.Addr, bool) {
	if len(b) < 20 {
		return 0, netip.Addr{}, false
	}
	ihl := int(b[0]&0x0f) * 4
	if ihl < 20 || len(b) < ihl+8 {
		return 0, netip.Addr{}, false
	}
	icmp := b[ihl:]
	if icmp[0] != icmpEchoReply || binary.BigEndian.Uint16(icmp[4:]) != id {
		return 0, netip.Addr{}, false
	}
	src := netip.AddrFrom4([4]byte(b[12:16]))
	return binary.BigEndian.Uint16(icmp[6:]), src, true
}

func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// openARP opens a packet socket on the line's interface for ARP requests
// to its gateway, broadcast each time (a gateway whose MAC address
// changes is still found).
func openARP(l Line) (*rawConn, error) {
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ARP)))
	if err != nil {
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: l.Ifindex}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("binding to %s: %w", l.Ifname, err)
	}
	c, err := newRawConn(fd)
	if err != nil {
		return nil, err
	}
	broadcast := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: l.Ifindex, Halen: 6, Addr: [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}}
	c.request = func(_ uint16, target netip.Addr) ([]byte, unix.Sockaddr) {
		return arpRequest(l.MAC, l.Source, target), broadcast
	}
	c.parse = func(b []byte, _ unix.Sockaddr) (uint16, netip.Addr, bool) {
		// An ARP reply answers the current round whatever it carries: ARP
		// has no sequence number.
		src, ok := parseARPReply(b)
		c.mu.Lock()
		seq := c.seq
		c.mu.Unlock()
		return seq, src, ok
	}
	c.start()
	return c, nil
}

const (
	arpRequestOp = 1
	arpReplyOp   = 2
)

func arpRequest(mac net.HardwareAddr, src, target netip.Addr) []byte {
	b := make([]byte, 28)
	binary.BigEndian.PutUint16(b[0:], 1)      // Ethernet
	binary.BigEndian.PutUint16(b[2:], 0x0800) // IPv4
	b[4], b[5] = 6, 4
	binary.BigEndian.PutUint16(b[6:], arpRequestOp)
	copy(b[8:14], mac)
	s, t := src.As4(), target.As4()
	copy(b[14:18], s[:])
	copy(b[24:28], t[:])
	return b
}

func parseARPReply(b []byte) (netip.Addr, bool) {
	if len(b) < 28 || binary.BigEndian.Uint16(b[6:]) != arpReplyOp {
		return netip.Addr{}, false
	}
	return netip.AddrFrom4([4]byte(b[14:18])), true
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
