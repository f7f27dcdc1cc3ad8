// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/cilium/ebpf"
)

// refFlow is what LAN ingress must make of a frame, by a parser written
// apart from the C ones, from the protocols' definitions: the flow key,
// and where the ports (or the echo identifier) and the addresses are, so
// that a reply can be built. ok is false for a frame that is no TCP, UDP
// or ICMP echo flow (or is L2 multicast or broadcast).
type refFlow struct {
	key            uplinkdFlowKey
	addrOff, l4Off int // offsets of the source address and the transport header
	addrLen        int
	tags           int // VLAN tags
	// routable: the destination is neither multicast, broadcast nor
	// link-local. Only a new flow needs it; a reply is counted on its
	// pinned flow whatever its destination, by either parser.
	routable bool
}

func refParse(frame []byte) (refFlow, bool) {
	var r refFlow
	be16 := binary.BigEndian.Uint16
	if len(frame) < 14 || frame[0]&1 != 0 {
		return r, false
	}
	off, etherType := 14, be16(frame[12:])
	for i := 0; i < 2 && (etherType == tpid8021Q || etherType == tpid8021AD); i++ {
		if len(frame) < off+4 {
			return r, false
		}
		etherType = be16(frame[off+2:])
		off += 4
		r.tags++
	}
	ip := frame[off:]
	var next uint8
	switch etherType {
	case etherIPv4:
		if len(ip) < 20 || ip[0]>>4 != 4 || ip[0]&0xf < 5 || be16(ip[6:])&0x1fff != 0 {
			return r, false
		}
		r.key.Family, next = 2, ip[9]
		r.key.Saddr = [16]byte{10: 0xff, 11: 0xff}
		r.key.Daddr = r.key.Saddr
		copy(r.key.Saddr[12:], ip[12:16])
		copy(r.key.Daddr[12:], ip[16:20])
		d := ip[16:20]
		r.routable = !(d[0]&0xf0 == 0xe0 || (d[0] == 255 && d[1] == 255 && d[2] == 255 && d[3] == 255) || (d[0] == 169 && d[1] == 254))
		r.addrOff, r.addrLen, r.l4Off = off+12, 4, off+int(ip[0]&0xf)*4
	case etherIPv6:
		if len(ip) < 40 || ip[0]>>4 != 6 {
			return r, false
		}
		r.key.Family, next = 10, ip[6]
		copy(r.key.Saddr[:], ip[8:24])
		copy(r.key.Daddr[:], ip[24:40])
		r.routable = !(ip[24] == 0xff || (ip[24] == 0xfe && ip[25]&0xc0 == 0x80))
		r.addrOff, r.addrLen = off+8, 16
		l4 := 40
		ext := 0
	walk:
		for ; ext < 8; ext++ {
			switch next {
			case extHopByHop, extRouting, extDestOpts:
				if len(ip) < l4+2 {
					return r, false
				}
				next, l4 = ip[l4], l4+(int(ip[l4+1])+1)*8
			case extFragment:
				if len(ip) < l4+8 || be16(ip[l4+2:])&0xfff8 != 0 {
					return r, false
				}
				next, l4 = ip[l4], l4+8
			default:
				break walk
			}
		}
		if ext == 8 {
			return r, false
		}
		r.l4Off = off + l4
	default:
		return r, false
	}
	r.key.Proto = next
	l4 := []byte{}
	if r.l4Off <= len(frame) {
		l4 = frame[r.l4Off:]
	}
	switch {
	case next == protoTCP || next == protoUDP:
		if len(l4) < 4 {
			return r, false
		}
		r.key.Sport, r.key.Dport = be16(l4[0:]), be16(l4[2:])
	case next == protoICMP && r.key.Family == 2, next == protoICMPv6 && r.key.Family == 10:
		if len(l4) < 8 {
			return r, false
		}
		echo := l4[0] == icmpEcho || l4[0] == icmpEchoReply
		if r.key.Family == 10 {
			echo = l4[0] == icmp6Echo || l4[0] == icmp6Reply
		}
		if !echo {
			return r, false
		}
		r.key.Sport = be16(l4[4:])
	default:
		return r, false
	}
	return r, true
}

// reply is frame's reply as LAN egress sees it: addresses swapped, and the
// ports for TCP and UDP.
func (r refFlow) reply(frame []byte) []byte {
	b := append([]byte{}, frame...)
	s, d := r.addrOff, r.addrOff+r.addrLen
	copy(b[s:], frame[d:d+r.addrLen])
	copy(b[d:], frame[s:s+r.addrLen])
	if r.key.Proto == protoTCP || r.key.Proto == protoUDP {
		copy(b[r.l4Off:], frame[r.l4Off+2:r.l4Off+4])
		copy(b[r.l4Off+2:], frame[r.l4Off:r.l4Off+2])
	}
	return b
}

// tagged is frame with an 802.1Q tag inserted after the MAC addresses,
// which the fast parser never reads: the full parser must find the same
// flow.
func tagged(frame []byte) []byte {
	b := append([]byte{}, frame[:12]...)
	b = binary.BigEndian.AppendUint16(b, tpid8021Q)
	b = binary.BigEndian.AppendUint16(b, 42)
	return append(b, frame[12:]...)
}

func flowKeys(t *testing.T, d *Datapath) map[uplinkdFlowKey]uplinkdFlow {
	t.Helper()
	var (
		k uplinkdFlowKey
		v uplinkdFlow
	)
	m := map[uplinkdFlowKey]uplinkdFlow{}
	it := d.objs.UlFlows.Iterate()
	for it.Next(&k, &v) {
		m[k] = v
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return m
}

// checkKeys runs frame (and, when it is untagged, the same frame with a
// VLAN tag, and the reply) through the programs and checks that the only
// flow touched is the one whose key the reference parser derives: a new
// flow has exactly that key, a pinned one counts the packet, and the
// reply is counted on it. run runs a program in the fuzz's namespace.
func checkKeys(t *testing.T, d *Datapath, frame []byte, run func(*ebpf.Program, []byte) error) {
	t.Helper()
	ref, ok := refParse(frame)
	ok = ok && ref.routable // steerable: a new flow may be pinned
	variants := [][]byte{frame}
	if ref.tags == 0 && len(frame) <= 1500 {
		variants = append(variants, tagged(frame))
	}
	for i, f := range variants {
		before := flowKeys(t, d)
		if err := run(d.objs.UplinkdLanIn, f); err != nil {
			if errors.Is(err, errTestRunRefused) {
				return
			}
			t.Fatal(err)
		}
		after := flowKeys(t, d)
		for k, v := range after {
			old, existed := before[k]
			switch {
			case !existed && (!ok || k != ref.key):
				t.Errorf("variant %d: new flow %+v; the reference key is %+v (steerable %v)", i, k, ref.key, ok)
			case existed && v.TxPackets != old.TxPackets && (!ok || k != ref.key):
				t.Errorf("variant %d: flow %+v counted a packet; the reference key is %+v (steerable %v)", i, k, ref.key, ok)
			case existed && ok && k == ref.key && v.TxPackets != old.TxPackets+1:
				t.Errorf("variant %d: pinned flow %+v: tx packets %d -> %d, want one more", i, k, old.TxPackets, v.TxPackets)
			}
		}
	}
	if !ok {
		return
	}
	if _, pinned := flowKeys(t, d)[ref.key]; !pinned {
		return // no live line in its bucket, or the gateway's own address
	}
	reply := ref.reply(frame)
	rref, rok := refParse(reply)
	// LAN egress counts a reply on the flow whose key is the reply's
	// reversed, whoever parses it and whatever its destination (the
	// flow's source) is.
	want := rok && rref.key.Family == ref.key.Family && rref.key.Proto == ref.key.Proto
	replies := [][]byte{reply}
	if ref.tags == 0 && len(reply) <= 1500 {
		replies = append(replies, tagged(reply))
	}
	for i, r := range replies {
		before := flowKeys(t, d)[ref.key]
		if err := run(d.objs.UplinkdLanOut, r); err != nil {
			if errors.Is(err, errTestRunRefused) {
				return
			}
			t.Fatal(err)
		}
		after := flowKeys(t, d)[ref.key]
		if got := after.RxPackets - before.RxPackets; got != map[bool]uint64{true: 1}[want] {
			t.Errorf("reply variant %d of %+v: rx packets %d -> %d, want counted: %v", i, ref.key, before.RxPackets, after.RxPackets, want)
		}
	}
}

var errTestRunRefused = errors.New("BPF_PROG_TEST_RUN refused the frame")
