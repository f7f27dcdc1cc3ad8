// SPDX-License-Identifier: Apache-2.0

package lab

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// EchoIdle is how long the echo server keeps an idle TCP connection.
const EchoIdle = 60 * time.Second

// EchoServer answers on TCP and UDP with the source address it saw:
// TCP gets "SRC ip:port\n" on accept and then an echo of everything it
// sends; each UDP datagram gets "SRC ip:port\n" followed by its payload.
type EchoServer struct {
	Addr netip.AddrPort // where it listens (TCP and UDP share the port)

	tcp net.Listener
	udp *net.UDPConn
	wg  sync.WaitGroup

	mu     sync.Mutex
	closed bool
	peers  map[netip.AddrPort]bool
	conns  map[net.Conn]bool
}

// StartEchoServer listens on addr:port (TCP and UDP) inside h's namespace.
// Port 0 picks a free port.
func StartEchoServer(h *Host, addr netip.Addr, port uint16) (*EchoServer, error) {
	s := &EchoServer{peers: map[netip.AddrPort]bool{}, conns: map[net.Conn]bool{}}
	err := h.Do(func() error {
		ln, err := net.Listen("tcp", netip.AddrPortFrom(addr, port).String())
		if err != nil {
			return err
		}
		s.tcp = ln
		s.Addr = ln.Addr().(*net.TCPAddr).AddrPort()
		s.Addr = netip.AddrPortFrom(s.Addr.Addr().Unmap(), s.Addr.Port())
		s.udp, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(s.Addr))
		if err != nil {
			ln.Close()
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("starting echo server on %s in %s: %w", netip.AddrPortFrom(addr, port), h.Name, err)
	}
	s.wg.Add(2)
	go s.acceptLoop()
	go s.udpLoop()
	return s, nil
}

// Peers returns the distinct sources the server has seen, sorted.
func (s *EchoServer) Peers() []netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]netip.AddrPort, 0, len(s.peers))
	for p := range s.peers {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Compare(out[j]) < 0 })
	return out
}

// Close stops the server, closes its connections and waits for its
// goroutines.
func (s *EchoServer) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	err := errors.Join(s.tcp.Close(), s.udp.Close())
	s.wg.Wait()
	return err
}

// Push writes data on the server's end of the TCP connection from peer
// (the source the server saw): the server speaks first.
func (s *EchoServer) Push(peer netip.AddrPort, data []byte) error {
	var c net.Conn
	s.mu.Lock()
	for conn := range s.conns {
		if a := conn.RemoteAddr().(*net.TCPAddr).AddrPort(); netip.AddrPortFrom(a.Addr().Unmap(), a.Port()) == peer {
			c = conn
		}
	}
	s.mu.Unlock()
	if c == nil {
		return fmt.Errorf("no TCP connection from %s", peer)
	}
	if _, err := c.Write(data); err != nil {
		return fmt.Errorf("pushing to %s: %w", peer, err)
	}
	return nil
}

// PushUDP sends peer a datagram it did not ask for: "SRC peer\n" and
// data, as if it answered a query of data.
func (s *EchoServer) PushUDP(peer netip.AddrPort, data []byte) error {
	msg := append([]byte(fmt.Sprintf("SRC %s\n", peer)), data...)
	if _, err := s.udp.WriteToUDPAddrPort(msg, peer); err != nil {
		return fmt.Errorf("pushing to %s: %w", peer, err)
	}
	return nil
}

func (s *EchoServer) seen(p netip.AddrPort) netip.AddrPort {
	p = netip.AddrPortFrom(p.Addr().Unmap(), p.Port())
	s.mu.Lock()
	s.peers[p] = true
	s.mu.Unlock()
	return p
}

func (s *EchoServer) acceptLoop() {
	defer s.wg.Done()
	for {
		c, err := s.tcp.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(10 * time.Millisecond) // e.g. EMFILE
			continue
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return
		}
		s.conns[c] = true
		s.wg.Add(1)
		s.mu.Unlock()
		go s.serveTCP(c)
	}
}

func (s *EchoServer) serveTCP(c net.Conn) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		c.Close()
	}()
	peer := s.seen(c.RemoteAddr().(*net.TCPAddr).AddrPort())
	c.SetWriteDeadline(time.Now().Add(EchoIdle))
	if _, err := fmt.Fprintf(c, "SRC %s\n", peer); err != nil {
		return
	}
	buf := make([]byte, 32<<10)
	for {
		c.SetDeadline(time.Now().Add(EchoIdle))
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (s *EchoServer) udpLoop() {
	defer s.wg.Done()
	buf := make([]byte, 64<<10)
	for {
		n, from, err := s.udp.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue // e.g. ICMP errors reported on the socket
		}
		peer := s.seen(from)
		reply := append([]byte(fmt.Sprintf("SRC %s\n", peer)), buf[:n]...)
		s.udp.WriteToUDPAddrPort(reply, from)
	}
}

// parseSRC parses "SRC ip:port".
func parseSRC(line string) (netip.AddrPort, error) {
	rest, ok := strings.CutPrefix(strings.TrimSpace(line), "SRC ")
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("unexpected greeting %q", line)
	}
	return netip.ParseAddrPort(rest)
}

// DialTCP connects from h's namespace to an echo server at dst and returns
// the connection (positioned after the greeting) and the source address the
// server saw. The source is chosen by h's routing.
func DialTCP(h *Host, dst netip.AddrPort, timeout time.Duration) (net.Conn, netip.AddrPort, error) {
	return dialTCP(h, dst, &net.Dialer{Timeout: timeout}, timeout)
}

// DialTCPTOS is DialTCP with the socket's traffic class set before it
// connects (IP_TOS, or IPV6_TCLASS towards an IPv6 dst), so that every
// packet of the connection, its SYN included, carries it: tos is the
// whole byte, DSCP<<2 (the kernel keeps TCP's ECN bits to itself).
func DialTCPTOS(h *Host, dst netip.AddrPort, tos int, timeout time.Duration) (net.Conn, netip.AddrPort, error) {
	level, opt := unix.IPPROTO_IP, unix.IP_TOS
	if dst.Addr().Is6() && !dst.Addr().Is4In6() {
		level, opt = unix.IPPROTO_IPV6, unix.IPV6_TCLASS
	}
	d := &net.Dialer{Timeout: timeout, Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), level, opt, tos) }); err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("setting the traffic class %#x: %w", tos, serr)
		}
		return nil
	}}
	return dialTCP(h, dst, d, timeout)
}

// dialTCP dials with d in h's namespace and reads the echo server's
// greeting.
func dialTCP(h *Host, dst netip.AddrPort, d *net.Dialer, timeout time.Duration) (net.Conn, netip.AddrPort, error) {
	var c net.Conn
	err := h.Do(func() (err error) {
		c, err = d.Dial("tcp", dst.String())
		return err
	})
	if err != nil {
		return nil, netip.AddrPort{}, fmt.Errorf("dialing %s from %s: %w", dst, h.Name, err)
	}
	// Read the greeting a byte at a time so nothing after it is consumed.
	c.SetReadDeadline(time.Now().Add(timeout))
	var line []byte
	b := make([]byte, 1)
	for len(line) < 64 {
		if _, err := c.Read(b); err != nil {
			c.Close()
			return nil, netip.AddrPort{}, fmt.Errorf("reading greeting from %s: %w", dst, err)
		}
		if b[0] == '\n' {
			break
		}
		line = append(line, b[0])
	}
	c.SetReadDeadline(time.Time{})
	seen, err := parseSRC(string(line))
	if err != nil {
		c.Close()
		return nil, netip.AddrPort{}, err
	}
	return c, seen, nil
}

// UDPFlow is a connected UDP socket in a host's namespace: every query uses
// the same 5-tuple, so the flow stays on one line through the gateway.
type UDPFlow struct {
	Conn *net.UDPConn
}

// OpenUDPFlow opens a UDP flow from h's namespace to dst.
func OpenUDPFlow(h *Host, dst netip.AddrPort) (*UDPFlow, error) {
	var c *net.UDPConn
	err := h.Do(func() (err error) {
		c, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("opening UDP flow to %s from %s: %w", dst, h.Name, err)
	}
	return &UDPFlow{Conn: c}, nil
}

// LocalAddr returns the flow's local address and port.
func (f *UDPFlow) LocalAddr() netip.AddrPort {
	return f.Conn.LocalAddr().(*net.UDPAddr).AddrPort()
}

// Query sends payload and waits up to timeout for the echo server's answer
// to it; replies to earlier (timed out) queries are skipped. It returns the
// source address the server saw.
func (f *UDPFlow) Query(payload []byte, timeout time.Duration) (netip.AddrPort, error) {
	deadline := time.Now().Add(timeout)
	if err := f.Conn.SetDeadline(deadline); err != nil {
		return netip.AddrPort{}, err
	}
	if _, err := f.Conn.Write(payload); err != nil {
		return netip.AddrPort{}, fmt.Errorf("sending to %s: %w", f.Conn.RemoteAddr(), err)
	}
	buf := make([]byte, len(payload)+64)
	for {
		n, err := f.Conn.Read(buf)
		if err != nil {
			return netip.AddrPort{}, fmt.Errorf("waiting for reply from %s: %w", f.Conn.RemoteAddr(), err)
		}
		line, rest, ok := bytes.Cut(buf[:n], []byte("\n"))
		if !ok || !bytes.Equal(rest, payload) {
			continue // stale or foreign reply; the deadline bounds this loop
		}
		return parseSRC(string(line))
	}
}

// Receive waits up to timeout for the datagram the server pushed with
// payload (EchoServer.PushUDP), skipping others, and returns the source
// the server addressed it to.
func (f *UDPFlow) Receive(payload []byte, timeout time.Duration) (netip.AddrPort, error) {
	if err := f.Conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		return netip.AddrPort{}, err
	}
	buf := make([]byte, len(payload)+64)
	for {
		n, err := f.Conn.Read(buf)
		if err != nil {
			return netip.AddrPort{}, fmt.Errorf("waiting for a push from %s: %w", f.Conn.RemoteAddr(), err)
		}
		line, rest, ok := bytes.Cut(buf[:n], []byte("\n"))
		if ok && bytes.Equal(rest, payload) {
			return parseSRC(string(line))
		}
	}
}

// Close closes the flow's socket.
func (f *UDPFlow) Close() error { return f.Conn.Close() }

// UDPQuery sends one datagram from a fresh socket in h's namespace to the
// echo server at dst and returns the source address the server saw.
func UDPQuery(h *Host, dst netip.AddrPort, payload []byte, timeout time.Duration) (netip.AddrPort, error) {
	f, err := OpenUDPFlow(h, dst)
	if err != nil {
		return netip.AddrPort{}, err
	}
	defer f.Close()
	return f.Query(payload, timeout)
}

// Ping sends one ICMP echo request from h's namespace to dst and waits up
// to timeout for the reply (no ping binary needed).
func Ping(h *Host, dst netip.Addr, timeout time.Duration) error {
	var c net.PacketConn
	err := h.Do(func() (err error) {
		c, err = net.ListenPacket("ip4:icmp", "0.0.0.0")
		return err
	})
	if err != nil {
		return fmt.Errorf("opening ICMP socket in %s: %w", h.Name, err)
	}
	defer c.Close()

	id, seq := uint16(rand.Uint32()), uint16(rand.Uint32())
	req := make([]byte, 8+16)
	req[0] = 8 // echo request
	binary.BigEndian.PutUint16(req[4:], id)
	binary.BigEndian.PutUint16(req[6:], seq)
	copy(req[8:], "uplinkd lab ping")
	binary.BigEndian.PutUint16(req[2:], checksum(req))

	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.WriteTo(req, &net.IPAddr{IP: dst.AsSlice()}); err != nil {
		return fmt.Errorf("pinging %s from %s: %w", dst, h.Name, err)
	}
	buf := make([]byte, 1500)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return fmt.Errorf("pinging %s from %s: no reply within %v", dst, h.Name, timeout)
			}
			return fmt.Errorf("pinging %s from %s: %w", dst, h.Name, err)
		}
		// The raw socket sees every ICMP packet in the namespace.
		src, _ := netip.AddrFromSlice(from.(*net.IPAddr).IP)
		if n >= 8 && buf[0] == 0 && src.Unmap() == dst &&
			binary.BigEndian.Uint16(buf[4:]) == id && binary.BigEndian.Uint16(buf[6:]) == seq {
			return nil
		}
	}
}

func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
