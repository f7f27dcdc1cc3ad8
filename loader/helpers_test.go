// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"testing"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// requireBPF skips the test unless it runs as root with bpffs mounted at
// /sys/fs/bpf (mounted here if missing).
func requireBPF(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("needs root: loads BPF programs, pins in bpffs, creates network namespaces")
	}
	if err := mountBPFFS(); err != nil {
		tb.Skipf("bpffs unavailable at /sys/fs/bpf: %v", err)
	}
}

var mountBPFFS = sync.OnceValue(func() error {
	var st unix.Statfs_t
	if err := unix.Statfs("/sys/fs/bpf", &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := os.MkdirAll("/sys/fs/bpf", 0o755); err != nil {
		return err
	}
	return unix.Mount("bpf", "/sys/fs/bpf", "bpf", 0, "")
})

// tempPinDir is a fresh pin directory, removed with everything in it when
// the test ends.
func tempPinDir(tb testing.TB) string {
	tb.Helper()
	dir, err := os.MkdirTemp("/sys/fs/bpf", "uplinkd-test-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := Remove(dir); err != nil {
			tb.Errorf("removing %s: %v", dir, err)
		}
	})
	return dir
}

// load loads a datapath with a small flow map pinned in a fresh directory,
// skipping the test where BPF is not available.
func load(tb testing.TB, opts Options) *Datapath {
	tb.Helper()
	requireBPF(tb)
	if opts.PinDir == "" {
		opts.PinDir = tempPinDir(tb)
	}
	if opts.FlowEntries == 0 {
		opts.FlowEntries = 4096
	}
	if opts.MarkMask == 0 {
		opts.MarkMask = testMarkMask
	}
	d, err := Load(opts)
	if errors.Is(err, unix.EPERM) || errors.Is(err, ebpf.ErrNotSupported) {
		tb.Skipf("bpf unavailable: %v", err)
	}
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { d.Close() })
	return d
}

// testMarkMask holds the tests' marks (lineMark: 0x100, 0x200, 0x300).
const testMarkMask = 0x3f00

// skbCtx is the head of struct __sk_buff, with the fields BPF_PROG_TEST_RUN
// lets a caller set (mark, priority, ifindex, ...).
type skbCtx struct {
	Len            uint32
	PktType        uint32
	Mark           uint32
	QueueMapping   uint32
	Protocol       uint32
	VlanPresent    uint32
	VlanTCI        uint32
	VlanProto      uint32
	Priority       uint32
	IngressIfindex uint32
	Ifindex        uint32
	TCIndex        uint32
	CB             [5]uint32
}

// tcActUnspec is TC_ACT_UNSPEC (-1), as BPF_PROG_TEST_RUN returns it.
const tcActUnspec = ^uint32(0)

// run runs prog on one packet with the given input mark and returns the
// output mark, failing the test unless the program returned TC_ACT_UNSPEC.
func run(tb testing.TB, prog *ebpf.Program, pkt []byte, mark uint32) uint32 {
	tb.Helper()
	return runOn(tb, prog, pkt, mark, 0)
}

// runOn runs prog on one packet as if it came in by the interface of
// index ifindex (skb->ingress_ifindex), with the given input mark, and
// returns the output mark.
func runOn(tb testing.TB, prog *ebpf.Program, pkt []byte, mark, ifindex uint32) uint32 {
	tb.Helper()
	in := skbCtx{Mark: mark, IngressIfindex: ifindex}
	// The kernel returns all of __sk_buff, or ENOSPC.
	out := make([]byte, skbCtxOutSize)
	ret, err := prog.Run(&ebpf.RunOptions{Data: pkt, Context: in, ContextOut: out})
	if err != nil {
		tb.Fatal(err)
	}
	if ret != tcActUnspec {
		tb.Fatalf("program returned %d, want TC_ACT_UNSPEC", int32(ret))
	}
	return skbMark(out)
}

// skbMark reads the mark from an output context.
func skbMark(out []byte) uint32 {
	return binary.NativeEndian.Uint32(out[unsafe.Offsetof(skbCtx{}.Mark):])
}

// skbCtxOutSize is at least sizeof(struct __sk_buff) (192 on Linux 6.18).
const skbCtxOutSize = 512

// Protocol numbers and header constants used by the packet builder.
const (
	protoICMP     = 1
	protoTCP      = 6
	protoUDP      = 17
	protoGRE      = 47
	protoICMPv6   = 58
	extHopByHop   = 0
	extRouting    = 43
	extFragment   = 44
	extDestOpts   = 60
	etherIPv4     = 0x0800
	etherARP      = 0x0806
	etherIPv6     = 0x86dd
	etherLLDP     = 0x88cc
	tpid8021Q     = 0x8100
	tpid8021AD    = 0x88a8
	icmpEcho      = 8
	icmpEchoReply = 0
	icmpUnreach   = 3
	icmp6Echo     = 128
	icmp6Reply    = 129
	icmp6NS       = 135
	tcpSYN        = 0x02
	tcpACK        = 0x10
)

var (
	gatewayMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 1}
	clientMAC  = net.HardwareAddr{0x02, 0, 0, 0, 0, 2}
)

// packet describes an Ethernet frame for the tests.
type packet struct {
	dstMAC       net.HardwareAddr // gatewayMAC if nil
	vlans        []uint16         // TPIDs of VLAN tags, outermost first
	etherType    uint16           // from the addresses if 0
	src, dst     netip.Addr
	proto        uint8
	sport, dport uint16 // ICMP echo: sport is the identifier
	icmpType     uint8
	tcpFlags     uint8   // TCP: SYN 0x02, ACK 0x10, ...; 0: a SYN (a segment that opens a connection)
	ipOptions    int     // IPv4 option bytes, a multiple of 4
	ihl          int     // overrides the IPv4 header length (words)
	version      int     // overrides the IP version
	extHdrs      []uint8 // IPv6 extension headers, in order
	fragOffset   uint16  // in 8-byte units
	moreFrags    bool
	dscp         uint8 // IPv4 TOS, IPv6 traffic class: DSCP << 2 (ECN 0)
	payload      int
	cut          int // bytes cut from the end
}

func (p packet) bytes() []byte {
	b := append([]byte{}, p.dstMAC...)
	if p.dstMAC == nil {
		b = append(b, gatewayMAC...)
	}
	b = append(b, clientMAC...)
	for i, tpid := range p.vlans {
		b = binary.BigEndian.AppendUint16(b, tpid)
		b = binary.BigEndian.AppendUint16(b, uint16(100+i)) // TCI
	}
	etherType := p.etherType
	if etherType == 0 {
		etherType = etherIPv4
		if p.dst.Is6() {
			etherType = etherIPv6
		}
	}
	b = binary.BigEndian.AppendUint16(b, etherType)

	switch etherType {
	case etherIPv4:
		b = append(b, p.ipv4()...)
	case etherIPv6:
		b = append(b, p.ipv6()...)
	default:
		b = append(b, make([]byte, 28)...) // ARP, LLDP: contents do not matter
	}
	return b[:len(b)-p.cut]
}

// l4 is the transport header and payload; nothing for a non-first fragment.
func (p packet) l4() []byte {
	if p.fragOffset != 0 {
		return make([]byte, p.payload)
	}
	var h []byte
	switch p.proto {
	case protoTCP:
		h = make([]byte, 20)
		binary.BigEndian.PutUint16(h[0:], p.sport)
		binary.BigEndian.PutUint16(h[2:], p.dport)
		h[12] = 5 << 4
		h[13] = p.tcpFlags
		if h[13] == 0 {
			h[13] = tcpSYN
		}
	case protoUDP:
		h = make([]byte, 8)
		binary.BigEndian.PutUint16(h[0:], p.sport)
		binary.BigEndian.PutUint16(h[2:], p.dport)
		binary.BigEndian.PutUint16(h[4:], uint16(8+p.payload))
	case protoICMP, protoICMPv6:
		h = make([]byte, 8)
		h[0] = p.icmpType
		binary.BigEndian.PutUint16(h[4:], p.sport)
		binary.BigEndian.PutUint16(h[6:], 1)
	default:
		h = make([]byte, 4)
	}
	return append(h, make([]byte, p.payload)...)
}

func (p packet) ipv4() []byte {
	l4 := p.l4()
	ihl := 5 + p.ipOptions/4
	h := make([]byte, ihl*4)
	if p.ihl != 0 {
		ihl = p.ihl
	}
	version := 4
	if p.version != 0 {
		version = p.version
	}
	h[0] = byte(version<<4 | ihl)
	h[1] = p.dscp << 2
	binary.BigEndian.PutUint16(h[2:], uint16(len(h)+len(l4)))
	frag := p.fragOffset
	if p.moreFrags {
		frag |= 0x2000
	}
	binary.BigEndian.PutUint16(h[6:], frag)
	h[8] = 64
	h[9] = p.proto
	src, dst := p.src.As4(), p.dst.As4()
	copy(h[12:], src[:])
	copy(h[16:], dst[:])
	for i := 20; i < len(h); i++ {
		h[i] = 1 // NOP options
	}
	return append(h, l4...)
}

func (p packet) ipv6() []byte {
	var ext []byte
	next := p.proto
	for i := len(p.extHdrs) - 1; i >= 0; i-- {
		e := make([]byte, 8)
		e[0] = next
		if p.extHdrs[i] == extFragment {
			frag := p.fragOffset << 3
			if p.moreFrags {
				frag |= 1
			}
			binary.BigEndian.PutUint16(e[2:], frag)
			binary.BigEndian.PutUint32(e[4:], 0x1234)
		} else {
			e[2], e[3] = 1, 4 // PadN over the remaining 6 bytes; hdrlen 0
		}
		ext = append(e, ext...)
		next = p.extHdrs[i]
	}
	l4 := p.l4()
	h := make([]byte, 40)
	version := 6
	if p.version != 0 {
		version = p.version
	}
	tc := p.dscp << 2
	h[0] = byte(version<<4) | tc>>4
	h[1] = tc << 4
	binary.BigEndian.PutUint16(h[4:], uint16(len(ext)+len(l4)))
	h[6] = next
	h[7] = 64
	src, dst := p.src.As16(), p.dst.As16()
	copy(h[8:], src[:])
	copy(h[24:], dst[:])
	return append(append(h, ext...), l4...)
}

// netns is a throwaway network namespace, gone when the test ends.
type netns struct{ fd int }

func newNetns(tb testing.TB) *netns {
	tb.Helper()
	requireBPF(tb)
	var fd int
	err := onLockedThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return err
		}
		var err error
		fd, err = unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		return err
	})
	if err != nil {
		tb.Skipf("creating a network namespace: %v", err)
	}
	tb.Cleanup(func() { unix.Close(fd) })
	return &netns{fd}
}

// do runs fn on an OS thread inside the namespace.
func (n *netns) do(fn func() error) error {
	return onLockedThread(func() error {
		if err := unix.Setns(n.fd, unix.CLONE_NEWNET); err != nil {
			return err
		}
		return fn()
	})
}

// onLockedThread runs fn on a thread of its own, which ends with fn: any
// namespace fn enters goes away with it.
func onLockedThread(fn func() error) error {
	errc := make(chan error)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		errc <- fn()
	}()
	return <-errc
}
