// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"errors"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// These tests run the programs with BPF_PROG_TEST_RUN on packets built in
// Go, with maps seeded through the Datapath API.

var (
	client4  = netip.MustParseAddr("192.168.1.10")
	server4  = netip.MustParseAddr("198.51.100.1")
	local4   = netip.MustParseAddr("192.168.1.1")
	client6  = netip.MustParseAddr("2001:db8:1::10")
	server6  = netip.MustParseAddr("2001:db8:ff::1")
	local6   = netip.MustParseAddr("2001:db8:1::1")
	lineMark = []uint32{0x100, 0x200, 0x300}
	// Bits of the input mark outside the mask, which must survive.
	foreignMark uint32 = 0x80000001
)

func natAddrs(line int) []netip.Addr {
	return []netip.Addr{
		netip.AddrFrom4([4]byte{203, 0, 113, byte(line + 1)}),
		netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0xee, 15: byte(line + 1)}),
	}
}

// steering loads a datapath with three lines, every bucket on line 1, and
// the gateway's own addresses in ul_local.
func steering(t *testing.T) *Datapath {
	t.Helper()
	d := load(t, Options{})
	for l, mark := range lineMark {
		if err := d.SetLine(l, Line{Mark: mark, Weight: 1, NATAddrs: natAddrs(l)}); err != nil {
			t.Fatal(err)
		}
	}
	setWeights(t, d, []int{0, 1, 0}, []bool{true, true, true})
	if err := d.SetLocal([]netip.Addr{local4, local6}); err != nil {
		t.Fatal(err)
	}
	return d
}

func setWeights(t *testing.T, d *Datapath, weights []int, live []bool) {
	t.Helper()
	prev, err := d.CurrentBuckets()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.SetBuckets(Buckets(prev, weights, live)); err != nil {
		t.Fatal(err)
	}
}

func setDead(t *testing.T, d *Datapath, line int) {
	t.Helper()
	if err := d.SetLine(line, Line{Mark: lineMark[line], Dead: true, NATAddrs: natAddrs(line)}); err != nil {
		t.Fatal(err)
	}
}

func keyOf(p packet) uplinkdFlowKey {
	k := uplinkdFlowKey{Family: 2, Proto: p.proto, Saddr: p.src.As16(), Daddr: p.dst.As16(), Sport: p.sport, Dport: p.dport}
	if p.src.Is6() {
		k.Family = 10
	}
	if p.proto == protoICMP || p.proto == protoICMPv6 {
		k.Dport = 0
	}
	return k
}

func lookupFlow(t *testing.T, d *Datapath, p packet) (uplinkdFlow, bool) {
	t.Helper()
	var f uplinkdFlow
	k := keyOf(p)
	err := d.objs.UlFlows.Lookup(&k, &f)
	return f, err == nil
}

func reasons(t *testing.T, d *Datapath) map[string]uint64 {
	t.Helper()
	r, err := d.Reasons()
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// steer runs LAN ingress on p and checks that exactly one packet was
// counted, for reason; it returns the output mark.
func steer(t *testing.T, d *Datapath, p packet, reason string) uint32 {
	t.Helper()
	before := reasons(t, d)
	mark := run(t, d.objs.UplinkdLanIn, p.bytes(), foreignMark)
	after := reasons(t, d)
	for name, n := range after {
		want := before[name]
		if name == reason {
			want++
		}
		if n != want {
			t.Errorf("reason %s: %d packets, want %d", name, n-before[name], want-before[name])
		}
	}
	if _, ok := after[reason]; !ok {
		t.Errorf("no reason %q", reason)
	}
	return mark
}

func tcp4(sport uint16) packet {
	return packet{src: client4, dst: server4, proto: protoTCP, sport: sport, dport: 443}
}

func udp4(sport uint16) packet {
	return packet{src: client4, dst: server4, proto: protoUDP, sport: sport, dport: 53, payload: 20}
}

func TestLANIngress(t *testing.T) {
	d := steering(t)
	steered := foreignMark | lineMark[1]

	tests := []struct {
		name   string
		pkt    packet
		reason string
	}{
		{"ipv4 tcp", tcp4(40000), "new_flow"},
		{"ipv4 udp", udp4(40000), "new_flow"},
		{"ipv4 icmp echo", packet{src: client4, dst: server4, proto: protoICMP, icmpType: icmpEcho, sport: 7}, "new_flow"},
		{"ipv4 icmp echo reply", packet{src: client4, dst: server4, proto: protoICMP, icmpType: icmpEchoReply, sport: 8}, "new_flow"},
		{"ipv6 tcp", packet{src: client6, dst: server6, proto: protoTCP, sport: 40000, dport: 443}, "new_flow"},
		{"ipv6 udp", packet{src: client6, dst: server6, proto: protoUDP, sport: 40000, dport: 53}, "new_flow"},
		{"ipv6 icmp echo", packet{src: client6, dst: server6, proto: protoICMPv6, icmpType: icmp6Echo, sport: 7}, "new_flow"},
		{"ipv6 icmp echo reply", packet{src: client6, dst: server6, proto: protoICMPv6, icmpType: icmp6Reply, sport: 8}, "new_flow"},
		{"802.1q", packet{vlans: []uint16{tpid8021Q}, src: client4, dst: server4, proto: protoTCP, sport: 40001, dport: 443}, "new_flow"},
		{"qinq", packet{vlans: []uint16{tpid8021AD, tpid8021Q}, src: client6, dst: server6, proto: protoUDP, sport: 40001, dport: 443}, "new_flow"},
		{"ipv4 options", packet{src: client4, dst: server4, proto: protoUDP, sport: 40002, dport: 53, ipOptions: 12}, "new_flow"},
		{"ipv6 extension headers", packet{src: client6, dst: server6, proto: protoTCP, sport: 40002, dport: 443, extHdrs: []uint8{extHopByHop, extDestOpts, extRouting, extDestOpts}}, "new_flow"},
		{"ipv4 first fragment", packet{src: client4, dst: server4, proto: protoUDP, sport: 40003, dport: 53, moreFrags: true, payload: 64}, "new_flow"},
		{"ipv6 first fragment", packet{src: client6, dst: server6, proto: protoUDP, sport: 40003, dport: 53, extHdrs: []uint8{extHopByHop, extFragment}, moreFrags: true, payload: 64}, "new_flow"},
		{"ipv4 non-first fragment", packet{src: client4, dst: server4, proto: protoUDP, fragOffset: 8, payload: 64}, "fragment"},
		{"ipv6 non-first fragment", packet{src: client6, dst: server6, proto: protoUDP, extHdrs: []uint8{extFragment}, fragOffset: 8, payload: 64}, "fragment"},
		// BPF_PROG_TEST_RUN refuses IP frames shorter than an IP header; a
		// VLAN tag gets them through.
		{"ipv4 truncated header", packet{vlans: []uint16{tpid8021Q}, src: client4, dst: server4, proto: protoTCP, cut: 30}, "truncated"},
		{"ipv6 truncated header", packet{vlans: []uint16{tpid8021Q}, src: client6, dst: server6, proto: protoUDP, cut: 40}, "truncated"},
		{"ipv4 truncated ports", packet{src: client4, dst: server4, proto: protoUDP, sport: 1, dport: 2, cut: 6}, "truncated"},
		{"ipv6 truncated extension", packet{src: client6, dst: server6, proto: protoTCP, extHdrs: []uint8{extHopByHop}, cut: 27}, "truncated"},
		{"vlan truncated", packet{vlans: []uint16{tpid8021Q}, etherType: etherLLDP, cut: 30}, "truncated"},
		{"ipv4 bad version", packet{src: client4, dst: server4, proto: protoTCP, version: 7}, "malformed"},
		{"ipv4 short ihl", packet{src: client4, dst: server4, proto: protoTCP, ihl: 3}, "malformed"},
		{"ipv6 bad version", packet{src: client6, dst: server6, proto: protoTCP, version: 4}, "malformed"},
		{"arp", packet{etherType: etherARP, dstMAC: net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}}, "arp"},
		{"lldp", packet{etherType: etherLLDP}, "not_ip"},
		{"gre", packet{src: client4, dst: server4, proto: protoGRE}, "other_l4"},
		{"icmp unreachable", packet{src: client4, dst: server4, proto: protoICMP, icmpType: icmpUnreach}, "other_l4"},
		{"icmpv6 in ipv4", packet{src: client4, dst: server4, proto: protoICMPv6, icmpType: icmp6Echo}, "other_l4"},
		{"too many extension headers", packet{src: client6, dst: server6, proto: protoTCP, extHdrs: []uint8{0, 60, 60, 60, 60, 60, 60, 60, 60}}, "other_l4"},
		{"neighbour solicitation", packet{src: client6, dst: netip.MustParseAddr("ff02::1:ff00:1"), proto: protoICMPv6, icmpType: icmp6NS}, "nd"},
		{"ipv4 multicast", packet{src: client4, dst: netip.MustParseAddr("224.0.0.251"), proto: protoUDP, sport: 5353, dport: 5353}, "multicast"},
		{"ipv4 broadcast", packet{src: client4, dst: netip.MustParseAddr("255.255.255.255"), proto: protoUDP, sport: 68, dport: 67}, "multicast"},
		{"ipv6 multicast", packet{src: client6, dst: netip.MustParseAddr("ff02::fb"), proto: protoUDP, sport: 5353, dport: 5353}, "multicast"},
		{"l2 broadcast", packet{dstMAC: net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, src: client4, dst: server4, proto: protoUDP, sport: 1, dport: 2}, "multicast"},
		{"ipv4 link-local", packet{src: client4, dst: netip.MustParseAddr("169.254.1.1"), proto: protoTCP, sport: 1, dport: 2}, "link_local"},
		{"ipv6 link-local", packet{src: client6, dst: netip.MustParseAddr("fe80::1"), proto: protoTCP, sport: 1, dport: 2}, "link_local"},
		{"ipv4 local", packet{src: client4, dst: local4, proto: protoTCP, sport: 40000, dport: 22}, "local_dst"},
		{"ipv6 local", packet{src: client6, dst: local6, proto: protoUDP, sport: 40000, dport: 53}, "local_dst"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mark := steer(t, d, tt.pkt, tt.reason)
			f, pinned := lookupFlow(t, d, tt.pkt)
			if tt.reason != "new_flow" {
				if mark != foreignMark {
					t.Errorf("mark %#x, want %#x (untouched)", mark, foreignMark)
				}
				if pinned {
					t.Errorf("flow pinned: %+v", f)
				}
				return
			}
			if mark != steered {
				t.Errorf("mark %#x, want %#x", mark, steered)
			}
			if !pinned {
				t.Fatal("flow not pinned")
			}
			wantNAT := natAddrs(1)[0].As16()
			if tt.pkt.src.Is6() {
				wantNAT = natAddrs(1)[1].As16()
			}
			pktLen := uint64(len(tt.pkt.bytes()))
			if f.Line != 1 || f.NatAddr != wantNAT || f.TxPackets != 1 || f.TxBytes != pktLen ||
				f.RxPackets != 0 || f.FirstSeen == 0 || f.LastSeen != f.FirstSeen || f.Flags != 0 {
				t.Errorf("flow %+v, want line 1, NAT %v, 1 packet of %d bytes", f, netip.AddrFrom16(wantNAT).Unmap(), pktLen)
			}
		})
	}
}

func TestPinnedFlowKeepsLine(t *testing.T) {
	d := steering(t)
	first := tcp4(41000)
	steer(t, d, first, "new_flow")

	// Weights change: every bucket moves to line 2.
	setWeights(t, d, []int{0, 0, 1}, []bool{true, true, true})
	if mark := steer(t, d, first, "existing_flow"); mark != foreignMark|lineMark[1] {
		t.Errorf("pinned flow marked %#x, want line 1's %#x", mark, lineMark[1])
	}
	if f, _ := lookupFlow(t, d, first); f.Line != 1 || f.TxPackets != 2 || f.LastSeen < f.FirstSeen {
		t.Errorf("flow %+v, want line 1 and 2 packets", f)
	}
	if mark := steer(t, d, tcp4(41001), "new_flow"); mark != foreignMark|lineMark[2] {
		t.Errorf("new flow marked %#x, want line 2's %#x", mark, lineMark[2])
	}
}

func TestDeadLine(t *testing.T) {
	d := steering(t)
	udp, tcp := udp4(42000), tcp4(42000)
	steer(t, d, udp, "new_flow")
	steer(t, d, tcp, "new_flow")

	setDead(t, d, 1)
	setWeights(t, d, []int{0, 1, 1}, []bool{true, false, true})

	if mark := steer(t, d, udp, "moved_flow"); mark != foreignMark|lineMark[2] {
		t.Errorf("UDP flow marked %#x, want line 2's %#x", mark, lineMark[2])
	}
	if f, _ := lookupFlow(t, d, udp); f.Line != 2 || f.NatAddr != natAddrs(2)[0].As16() {
		t.Errorf("UDP flow %+v, want it moved to line 2 with its NAT address", f)
	}
	if mark := steer(t, d, udp, "existing_flow"); mark != foreignMark|lineMark[2] {
		t.Errorf("moved UDP flow marked %#x, want %#x", mark, lineMark[2])
	}

	// TCP stays: the dead line's table answers prohibit.
	if mark := steer(t, d, tcp, "dead_line_tcp"); mark != foreignMark|lineMark[1] {
		t.Errorf("TCP flow marked %#x, want its dead line's %#x", mark, lineMark[1])
	}
	if f, _ := lookupFlow(t, d, tcp); f.Line != 1 {
		t.Errorf("TCP flow moved to line %d", f.Line)
	}
}

func TestNoLiveLine(t *testing.T) {
	d := steering(t)
	udp := udp4(43000)
	steer(t, d, udp, "new_flow")

	setDead(t, d, 1)
	setWeights(t, d, []int{1, 1, 1}, []bool{false, false, false})
	if mark := steer(t, d, udp4(43001), "no_live_line"); mark != foreignMark {
		t.Errorf("new flow marked %#x with no live line", mark)
	}
	if _, pinned := lookupFlow(t, d, udp4(43001)); pinned {
		t.Error("flow pinned with no live line")
	}
	// A pinned UDP flow with nowhere to go stays on its dead line.
	if mark := steer(t, d, udp, "no_live_line"); mark != foreignMark|lineMark[1] {
		t.Errorf("pinned flow marked %#x, want %#x", mark, lineMark[1])
	}
}

func TestLANEgressCountsReplies(t *testing.T) {
	d := steering(t)
	for _, p := range []packet{
		udp4(44000),
		{src: client6, dst: server6, proto: protoTCP, sport: 44000, dport: 443},
		{src: client4, dst: server4, proto: protoICMP, icmpType: icmpEcho, sport: 44},
	} {
		steer(t, d, p, "new_flow")
		reply := p
		reply.src, reply.dst = p.dst, p.src
		reply.sport, reply.dport = p.dport, p.sport
		reply.payload = 100
		if p.proto == protoICMP {
			reply.icmpType, reply.sport = icmpEchoReply, p.sport
		}
		for range 2 {
			run(t, d.objs.UplinkdLanOut, reply.bytes(), 0)
		}
		f, _ := lookupFlow(t, d, p)
		if f.RxPackets != 2 || f.RxBytes != 2*uint64(len(reply.bytes())) || f.TxPackets != 1 {
			t.Errorf("%v %v: flow %+v, want 2 replies of %d bytes", p.proto, p.src, f, len(reply.bytes()))
		}
	}
	// Replies of flows never pinned are not counted anywhere.
	stray := udp4(44999)
	stray.src, stray.dst = stray.dst, stray.src
	run(t, d.objs.UplinkdLanOut, stray.bytes(), 0)
}

// TestParserFallback pins which packets the fast, direct-access parser
// reads and which fall back to the full one, and that both give a flow
// the same key: the plain packet of a flow first pinned from a tagged,
// optioned or extended one finds that flow.
func TestParserFallback(t *testing.T) {
	d := steering(t)
	tests := []struct {
		name  string
		pkt   packet
		plain packet // the same flow without what made it slow; zero: none
		slow  bool
	}{
		{"ipv4 tcp", tcp4(41000), packet{}, false},
		{"ipv6 udp", packet{src: client6, dst: server6, proto: protoUDP, sport: 41000, dport: 53}, packet{}, false},
		{"802.1q", packet{vlans: []uint16{tpid8021Q}, src: client4, dst: server4, proto: protoTCP, sport: 41001, dport: 443}, tcp4(41001), true},
		{"qinq", packet{vlans: []uint16{tpid8021AD, tpid8021Q}, src: client6, dst: server6, proto: protoUDP, sport: 41001, dport: 53},
			packet{src: client6, dst: server6, proto: protoUDP, sport: 41001, dport: 53}, true},
		{"ipv4 options", packet{src: client4, dst: server4, proto: protoUDP, sport: 41002, dport: 53, ipOptions: 12}, udp4(41002), true},
		{"ipv6 extension headers", packet{src: client6, dst: server6, proto: protoTCP, sport: 41002, dport: 443, extHdrs: []uint8{extHopByHop, extDestOpts}},
			packet{src: client6, dst: server6, proto: protoTCP, sport: 41002, dport: 443}, true},
		{"icmp echo", packet{src: client4, dst: server4, proto: protoICMP, icmpType: icmpEcho, sport: 41003}, packet{}, true},
		{"ipv4 truncated ports", packet{src: client4, dst: server4, proto: protoTCP, sport: 41004, dport: 443, cut: 18}, packet{}, true},
		{"ipv6 truncated ports", packet{src: client6, dst: server6, proto: protoUDP, sport: 41004, dport: 53, cut: 6}, packet{}, true},
		{"multicast mac", packet{dstMAC: net.HardwareAddr{0x01, 0, 0x5e, 0, 0, 1}, src: client4, dst: server4, proto: protoUDP, sport: 41005, dport: 53}, packet{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before, err := d.SlowParsed()
			if err != nil {
				t.Fatal(err)
			}
			run(t, d.objs.UplinkdLanIn, tt.pkt.bytes(), 0)
			after, err := d.SlowParsed()
			if err != nil {
				t.Fatal(err)
			}
			if slow := after > before; slow != tt.slow {
				t.Errorf("slow parser used: %v, want %v", slow, tt.slow)
			}
			if tt.plain.proto == 0 {
				return
			}
			run(t, d.objs.UplinkdLanIn, tt.plain.bytes(), 0)
			if again, _ := d.SlowParsed(); again != after {
				t.Errorf("the plain packet took the slow parser")
			}
			if f, ok := lookupFlow(t, d, tt.plain); !ok || f.TxPackets != 2 {
				t.Errorf("flow %+v (pinned %v): want both packets on one flow", f, ok)
			}
		})
	}
}

// TestLineStats: a line counts the forwarded packets of the flows pinned
// to it, out at LAN ingress and back at LAN egress, and nothing else.
func TestLineStats(t *testing.T) {
	d := steering(t)
	p := udp4(45000)
	pkt := p.bytes()
	for range 3 {
		run(t, d.objs.UplinkdLanIn, pkt, 0)
	}
	reply := p
	reply.src, reply.dst, reply.sport, reply.dport = p.dst, p.src, p.dport, p.sport
	run(t, d.objs.UplinkdLanOut, reply.bytes(), 0)
	// Not a flow: no line counts it.
	stray := udp4(44999)
	stray.src, stray.dst = stray.dst, stray.src
	run(t, d.objs.UplinkdLanOut, stray.bytes(), 0)
	run(t, d.objs.UplinkdLanIn, packet{etherType: etherARP}.bytes(), 0)

	f, ok := lookupFlow(t, d, p)
	if !ok {
		t.Fatal("flow not pinned")
	}
	stats, err := d.LineStats()
	if err != nil {
		t.Fatal(err)
	}
	n := uint64(len(pkt))
	line := int(f.Line)
	if want := (LineStats{TxPackets: 3, TxBytes: 3 * n, RxPackets: 1, RxBytes: uint64(len(reply.bytes()))}); stats[line] != want {
		t.Errorf("line %d: %+v, want %+v", line, stats[line], want)
	}
	for l, s := range stats {
		if l != line && s != (LineStats{}) {
			t.Errorf("line %d counted %+v", l, s)
		}
	}
}

func TestFlows(t *testing.T) {
	d := steering(t)
	p := packet{src: client6, dst: server6, proto: protoUDP, sport: 46000, dport: 53}
	steer(t, d, p, "new_flow")
	steer(t, d, packet{src: client4, dst: server4, proto: protoICMP, icmpType: icmpEcho, sport: 46}, "new_flow")

	var flows []Flow
	if err := d.Flows(func(f Flow) bool { flows = append(flows, f); return true }); err != nil {
		t.Fatal(err)
	}
	if len(flows) != 2 {
		t.Fatalf("%d flows, want 2: %+v", len(flows), flows)
	}
	for _, f := range flows {
		if f.Proto == protoUDP {
			if f.Src != netip.AddrPortFrom(client6, 46000) || f.Dst != netip.AddrPortFrom(server6, 53) ||
				f.Line != 1 || f.NATAddr != natAddrs(1)[1] || f.TxPackets != 1 || f.FirstSeen.IsZero() {
				t.Errorf("UDP flow %+v", f)
			}
		} else if f.Src != netip.AddrPortFrom(client4, 46) || f.Dst != netip.AddrPortFrom(server4, 0) || f.NATAddr != natAddrs(1)[0] {
			t.Errorf("ICMP flow %+v", f)
		}
	}

	var seen int
	if err := d.Flows(func(Flow) bool { seen++; return false }); err != nil || seen != 1 {
		t.Errorf("stopping early: %d flows, %v", seen, err)
	}
}

func TestSetLine(t *testing.T) {
	d := load(t, Options{MarkMask: 0xff00})
	if err := d.SetLine(0, Line{Mark: 0x10000}); err == nil {
		t.Error("mark outside the mask accepted")
	}
	if err := d.SetLine(MaxLines, Line{Mark: 0x100}); err == nil {
		t.Error("line out of range accepted")
	}
	a, b := natAddrs(0), natAddrs(1)
	if err := d.SetLine(0, Line{Mark: 0x100, NATAddrs: a}); err != nil {
		t.Fatal(err)
	}
	if err := d.SetLine(1, Line{Mark: 0x200, NATAddrs: b[:1]}); err != nil {
		t.Fatal(err)
	}
	// Line 0 gives up its IPv6 address and takes line 1's IPv4 one.
	if err := d.SetLine(0, Line{Mark: 0x100, NATAddrs: []netip.Addr{a[0], b[0]}}); err != nil {
		t.Fatal(err)
	}
	want := map[netip.Addr]uint32{a[0]: 0, b[0]: 0}
	var (
		addr [16]byte
		line uint32
		got  = map[netip.Addr]uint32{}
	)
	for it := d.objs.UlNatSrc.Iterate(); it.Next(&addr, &line); {
		got[netip.AddrFrom16(addr).Unmap()] = line
	}
	if len(got) != len(want) || got[a[0]] != 0 || got[b[0]] != 0 {
		t.Errorf("NAT addresses %v, want %v", got, want)
	}
}

func TestMarkMask(t *testing.T) {
	d := load(t, Options{MarkMask: 0xff0000})
	if err := d.SetLine(0, Line{Mark: 0x10000}); err != nil {
		t.Fatal(err)
	}
	if err := d.SetBuckets(Buckets(nil, []int{1}, []bool{true})); err != nil {
		t.Fatal(err)
	}
	if mark := run(t, d.objs.UplinkdLanIn, tcp4(51000).bytes(), 0xff3f00); mark != 0x013f00 {
		t.Errorf("mark %#x, want 0x13f00: line mark inside the mask, the rest kept", mark)
	}
}

// Only the LAN's subnets get flows: a spoofed or bogon source is not
// steered and not pinned (nftables drops it); a family without subnets
// given stays allowed.
func TestForeignSourceGetsNoFlow(t *testing.T) {
	d := steering(t)
	if err := d.SetLANSubnets([]netip.Prefix{netip.MustParsePrefix("192.168.1.0/24")}); err != nil {
		t.Fatal(err)
	}
	bogon := tcp4(40000)
	bogon.src = netip.MustParseAddr("10.66.0.1")
	if mark := steer(t, d, bogon, "foreign_src"); mark != foreignMark {
		t.Errorf("a foreign source was marked %#x", mark)
	}
	if _, ok := lookupFlow(t, d, bogon); ok {
		t.Error("a foreign source got a flow entry")
	}
	if mark := steer(t, d, tcp4(40001), "new_flow"); mark&d.markMask != lineMark[1] {
		t.Errorf("a LAN client's flow was marked %#x", mark)
	}
	v6 := tcp4(40002)
	v6.src, v6.dst = client6, server6
	steer(t, d, v6, "new_flow")
	// Narrowed again, and widened back: no stale prefix stays.
	if err := d.SetLANSubnets(nil); err != nil {
		t.Fatal(err)
	}
	steer(t, d, bogon, "new_flow")
}

// More new flows than the flow map holds: FlowMapUse counts every insert
// and says at least the excess was evicted, and the map holds no more
// than its capacity.
func TestFlowMapUseCountsEvictions(t *testing.T) {
	d := steering(t)
	use, err := d.FlowMapUse()
	if err != nil {
		t.Fatal(err)
	}
	if use.Capacity != 4096 || use.Inserted != 0 || use.EvictedAtLeast != 0 {
		t.Fatalf("empty map: %+v", use)
	}
	const flows = 4096 + 300
	for i := range flows {
		steer(t, d, tcp4(uint16(1000+i)), "new_flow")
	}
	if use, err = d.FlowMapUse(); err != nil {
		t.Fatal(err)
	}
	if use.Inserted != flows || use.EvictedAtLeast != 300 {
		t.Errorf("after %d new flows into 4096 entries: %+v, want %d inserted, at least 300 evicted", flows, use, flows)
	}
	held := 0
	if err := d.Flows(func(Flow) bool { held++; return true }); err != nil {
		t.Fatal(err)
	}
	if held > use.Capacity || uint64(held) > use.Inserted-use.EvictedAtLeast {
		t.Errorf("the map holds %d flows; capacity %d, at least %d evicted", held, use.Capacity, use.EvictedAtLeast)
	}
}

// RemoveLine takes the line's flows with it, and only its own: a line
// given the number later inherits none.
func TestRemoveLineTakesItsFlows(t *testing.T) {
	d := steering(t)
	setWeights(t, d, []int{0, 1, 1}, []bool{true, true, true})
	for i := range 200 {
		steer(t, d, tcp4(uint16(2000+i)), "new_flow")
	}
	perLine := func() map[int]int {
		m := map[int]int{}
		if err := d.Flows(func(f Flow) bool { m[f.Line]++; return true }); err != nil {
			t.Fatal(err)
		}
		return m
	}
	before := perLine()
	if before[1] == 0 || before[2] == 0 {
		t.Fatalf("flows per line %v: want both lines used", before)
	}
	n, err := d.RemoveLine(1)
	if err != nil {
		t.Fatal(err)
	}
	after := perLine()
	if n != before[1] || after[1] != 0 || after[2] != before[2] {
		t.Errorf("RemoveLine(1) removed %d; flows per line %v -> %v", n, before, after)
	}
	if _, ok := lookupNATOwner(t, d, natAddrs(1)[0]); ok {
		t.Error("the removed line's NAT address still recovers flows onto it")
	}
	// Removed flows are no evictions: refill to just the capacity (the
	// buckets moved off the removed line, as the agent's next apply does).
	setWeights(t, d, []int{0, 0, 1}, []bool{true, false, true})
	for i := range 4096 - after[2] {
		steer(t, d, tcp4(uint16(10000+i)), "new_flow")
	}
	use, err := d.FlowMapUse()
	if err != nil {
		t.Fatal(err)
	}
	if use.Removed != uint64(n) || use.EvictedAtLeast != 0 {
		t.Errorf("after removing %d flows and refilling to the capacity: %+v, want none evicted", n, use)
	}
}

// ClearFlows empties the flow map (an HA standby's pins are stale) and
// counts what it removed as removed, not evicted; the lines stay.
func TestClearFlows(t *testing.T) {
	d := steering(t)
	setWeights(t, d, []int{0, 1, 1}, []bool{true, true, true})
	for i := range 300 {
		steer(t, d, tcp4(uint16(2000+i)), "new_flow")
	}
	n, err := d.ClearFlows()
	if err != nil {
		t.Fatal(err)
	}
	left := 0
	if err := d.Flows(func(Flow) bool { left++; return true }); err != nil {
		t.Fatal(err)
	}
	use, err := d.FlowMapUse()
	if err != nil {
		t.Fatal(err)
	}
	if n != 300 || left != 0 || use.Removed != 300 || use.EvictedAtLeast != 0 {
		t.Errorf("ClearFlows removed %d of 300, %d left, map use %+v", n, left, use)
	}
	steer(t, d, tcp4(2000), "new_flow") // pinned afresh, on a live line
}

// lookupNATOwner is the line that ul_nat_src gives a NAT address.
func lookupNATOwner(t *testing.T, d *Datapath, a netip.Addr) (uint32, bool) {
	t.Helper()
	var owner uint32
	err := d.objs.UlNatSrc.Lookup(a.As16(), &owner)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return 0, false
	}
	if err != nil {
		t.Fatal(err)
	}
	return owner, true
}

// OpenStats reads the pinned maps of a datapath it did not load, and
// says so clearly where there is none.
func TestOpenStatsReadsPins(t *testing.T) {
	d := steering(t)
	steer(t, d, tcp4(3000), "new_flow")
	s, err := OpenStats(d.pinDir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	n := 0
	if err := s.Flows(func(f Flow) bool { n++; return f.Src.Port() != 3000 }); err != nil || n != 1 {
		t.Errorf("flows through the pins: %d, %v", n, err)
	}
	if r, err := s.Reasons(); err != nil || r["new_flow"] != 1 {
		t.Errorf("reasons through the pins: %v, %v", r, err)
	}
	if _, err := OpenStats(t.TempDir()); !errors.Is(err, ErrNoDatapath) {
		t.Errorf("an empty dir: %v, want ErrNoDatapath", err)
	}
}

// Seeded flows read back as they were written.
func TestSeedFlowsRoundTrip(t *testing.T) {
	d := steering(t)
	now := time.Now().Truncate(time.Millisecond)
	want := Flow{Proto: 17, Src: netip.MustParseAddrPort("192.0.2.10:5353"), Dst: netip.MustParseAddrPort("[2001:db8::1]:53"),
		Line: 2, NATAddr: netip.MustParseAddr("198.51.100.2"), Recovered: true,
		TxPackets: 1, TxBytes: 2, RxPackets: 3, RxBytes: 4, FirstSeen: now.Add(-time.Minute), LastSeen: now}
	if err := d.SeedFlows(1, func(int) Flow { return want }); err != nil {
		t.Fatal(err)
	}
	var got []Flow
	if err := d.Flows(func(f Flow) bool { got = append(got, f); return true }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Src != want.Src || got[0].Dst != want.Dst || got[0].Line != 2 || got[0].NATAddr != want.NATAddr ||
		!got[0].Recovered || got[0].RxBytes != 4 || got[0].LastSeen.Sub(now).Abs() > time.Millisecond {
		t.Errorf("read back %+v, want %+v", got, want)
	}
}

// TestLineStatsCountOnlyWhatLeaves: a packet held on a dead line (a TCP
// flow, which cannot move, or a UDP flow with no live line to move to)
// meets the dead line's prohibit route and never leaves by it: it is not
// the line's forwarded traffic. A UDP flow moved off the dead line counts
// on its new line from its first moved packet.
func TestLineStatsCountOnlyWhatLeaves(t *testing.T) {
	d := steering(t)
	udp, tcp := udp4(47000), tcp4(47000)
	steer(t, d, udp, "new_flow")
	steer(t, d, tcp, "new_flow")
	lineStats := func() []LineStats {
		t.Helper()
		s, err := d.LineStats()
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	pinned := lineStats()[1]
	if pinned.TxPackets != 2 {
		t.Fatalf("line 1: %+v, want the 2 packets pinned there", pinned)
	}

	setDead(t, d, 1)
	setWeights(t, d, []int{1, 1, 1}, []bool{false, false, false})
	steer(t, d, tcp, "dead_line_tcp")
	steer(t, d, udp, "no_live_line")
	if s := lineStats()[1]; s != pinned {
		t.Errorf("dead line 1 counted packets that its prohibit route refuses: %+v, want %+v", s, pinned)
	}

	if err := d.SetLine(2, Line{Mark: lineMark[2], Weight: 1, NATAddrs: natAddrs(2)}); err != nil {
		t.Fatal(err)
	}
	setWeights(t, d, []int{0, 0, 1}, []bool{false, false, true})
	steer(t, d, udp, "moved_flow")
	s := lineStats()
	if n := uint64(len(udp.bytes())); s[2] != (LineStats{TxPackets: 1, TxBytes: n}) {
		t.Errorf("line 2: %+v, want the moved flow's packet", s[2])
	}
	if s[1] != pinned {
		t.Errorf("line 1: %+v, want %+v", s[1], pinned)
	}
}

// TestLastSeenNeverGoesBack: each CPU caches the coarse clock per tick
// (ul_now), and two CPUs may hold different values for one tick: the
// kernel advances jiffies before it updates the coarse clock
// (tick_do_update_jiffies64, then update_wall_time), so a CPU that reads
// in between keeps the previous tick's time for the whole new tick. A flow
// pinned on one CPU and touched on such a CPU must not get a last_seen
// before its first_seen. The stale CPU is simulated by writing its cache.
func TestLastSeenNeverGoesBack(t *testing.T) {
	if runtime.NumCPU() < 2 {
		t.Skip("needs two CPUs")
	}
	d := steering(t)
	onCPU := func(cpu int, fn func() error) error {
		return onLockedThread(func() error {
			var set unix.CPUSet
			set.Set(cpu)
			if err := unix.SchedSetaffinity(0, &set); err != nil {
				return err
			}
			return fn()
		})
	}
	const tick = 4 * time.Millisecond
	for try := range 50 {
		p := udp4(48000 + uint16(try))
		var caches []uplinkdClockCache
		err := onCPU(0, func() error {
			if _, err := runMark(d.objs.UplinkdLanIn, p.bytes(), 0); err != nil {
				return err
			}
			return d.objs.UlClock.Lookup(uint32(0), &caches)
		})
		if err != nil {
			t.Fatal(err)
		}
		stale := caches
		stale[1] = uplinkdClockCache{Jiffies: caches[0].Jiffies, Ns: caches[0].Ns - uint64(tick)}
		err = onCPU(1, func() error {
			if err := d.objs.UlClock.Put(uint32(0), stale); err != nil {
				return err
			}
			if _, err := runMark(d.objs.UplinkdLanIn, p.bytes(), 0); err != nil {
				return err
			}
			return d.objs.UlClock.Lookup(uint32(0), &caches)
		})
		if err != nil {
			t.Fatal(err)
		}
		if caches[1] != stale[1] {
			continue // the tick moved on: CPU 1 read the clock afresh
		}
		f, ok := lookupFlow(t, d, p)
		if !ok {
			t.Fatal("flow not pinned")
		}
		if f.LastSeen < f.FirstSeen {
			t.Errorf("flow touched on a CPU a tick behind: first seen %d, last seen %d (%v before)",
				f.FirstSeen, f.LastSeen, time.Duration(f.FirstSeen-f.LastSeen))
		}
		return
	}
	t.Skip("the tick moved on in every try")
}

// A second write of the same configuration writes nothing to the maps;
// a change writes only itself.
func TestUnchangedConfigWritesNothing(t *testing.T) {
	d := load(t, Options{})
	lines := make([]Line, MaxLines)
	for l, mark := range lineMark {
		lines[l] = Line{Mark: mark, Weight: 1, Ifindex: 10 + l, NATAddrs: natAddrs(l)}
	}
	buckets := Buckets(nil, []int{1, 2, 1}, []bool{true, true, true})
	local := []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")}
	lan := []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("10.1.0.0/16")}
	apply := func() uint64 {
		t.Helper()
		before := d.Writes()
		for _, err := range []error{d.SetLines(lines), d.SetBuckets(buckets), d.SetLocal(local), d.SetLANSubnets(lan)} {
			if err != nil {
				t.Fatal(err)
			}
		}
		return d.Writes() - before
	}
	if n := apply(); n == 0 {
		t.Fatal("a first configuration wrote nothing")
	}
	if n := apply(); n != 0 {
		t.Errorf("the same configuration again: %d map writes, want 0", n)
	}

	lines[1].Weight = 5                                                   // one ul_lines entry
	lines[2].NATAddrs = lines[2].NATAddrs[:1]                             // one ul_lines entry, one NAT address gone
	buckets = Buckets(buckets, []int{1, 2, 0}, []bool{true, true, false}) // one batch, and policy 0's line set
	lan = lan[:1]                                                         // one prefix gone
	if n := apply(); n != 6 {
		t.Errorf("a changed configuration: %d map writes, want 6", n)
	}
	if n := apply(); n != 0 {
		t.Errorf("the changed configuration again: %d map writes, want 0", n)
	}

	// What the maps hold is what was asked, read back the slow way.
	got, err := d.CurrentBuckets()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, buckets) {
		t.Error("buckets differ from the table written")
	}
	var (
		k    uplinkdLanPrefix
		v    uint8
		keys []uplinkdLanPrefix
	)
	for it := d.objs.UlLanSrc.Iterate(); it.Next(&k, &v); {
		keys = append(keys, k)
	}
	// IPv6 has no prefix given: all of it is allowed.
	if want := []uplinkdLanPrefix{lanKey(lan[0]), lanKey(allPrefixes[1])}; len(keys) != 2 || !slices.Contains(keys, want[0]) || !slices.Contains(keys, want[1]) {
		t.Errorf("LAN subnets %v, want %v", keys, want)
	}
	owners, err := readAll[[16]byte, uint32](d.objs.UlNatSrc)
	if err != nil {
		t.Fatal(err)
	}
	if len(owners) != 5 || owners[natAddrs(2)[0].As16()] != 2 {
		t.Errorf("NAT addresses %v, want lines 0 and 1's two each and line 2's IPv4 one", owners)
	}
}
