// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func TestLoadAdoptsPinnedMaps(t *testing.T) {
	requireBPF(t)
	dir := tempPinDir(t)
	first, err := Load(Options{PinDir: dir, FlowEntries: 4096, MarkMask: testMarkMask})
	if err != nil {
		t.Fatal(err)
	}
	if err := first.SetLine(1, Line{Mark: 0x200}); err != nil {
		t.Fatal(err)
	}
	if err := first.SetBuckets(Buckets(nil, []int{0, 1}, []bool{true, true})); err != nil {
		t.Fatal(err)
	}
	p := tcp4(48000)
	run(t, first.objs.UplinkdLanIn, p.bytes(), 0)
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}

	second := load(t, Options{PinDir: dir})
	var flows []Flow
	if err := second.Flows(func(f Flow) bool { flows = append(flows, f); return true }); err != nil {
		t.Fatal(err)
	}
	if len(flows) != 1 || flows[0].Src != netip.AddrPortFrom(client4, 48000) || flows[0].Line != 1 {
		t.Fatalf("flows after reload: %+v", flows)
	}
	if mark := run(t, second.objs.UplinkdLanIn, p.bytes(), 0); mark != 0x200 {
		t.Errorf("mark after reload %#x, want 0x200", mark)
	}
	r := reasons(t, second)
	if r["new_flow"] != 1 || r["existing_flow"] != 1 {
		t.Errorf("reasons after reload: %v", r)
	}
}

func TestLoadRejectsIncompatiblePin(t *testing.T) {
	requireBPF(t)
	dir := tempPinDir(t)
	load(t, Options{PinDir: dir, FlowEntries: 4096})
	_, err := Load(Options{PinDir: dir, FlowEntries: 8192})
	if !errors.Is(err, ebpf.ErrMapIncompatible) || !strings.Contains(err.Error(), "ul_flows") {
		t.Fatalf("loading with another flow map size: %v, want an incompatible ul_flows", err)
	}
	// Nothing was replaced.
	m, err := ebpf.LoadPinnedMap(dir+"/ul_flows", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if m.MaxEntries() != 4096 {
		t.Errorf("pinned flow map has %d entries, want 4096", m.MaxEntries())
	}
}

// TestRecoveryFromConntrack creates conntrack entries with ctnetlink in a
// throwaway namespace, as NAT would have, and runs LAN ingress there on
// packets of flows the flow map does not know.
func TestRecoveryFromConntrack(t *testing.T) {
	ns := newNetns(t)
	d := steering(t) // new flows go to line 1

	lanServer := netip.MustParseAddr("192.168.1.20")
	remote := netip.MustParseAddr("198.51.100.9")
	nat := func(line int) netip.Addr { return natAddrs(line)[0] }
	tuple := func(proto uint8, src netip.Addr, sport uint16, dst netip.Addr, dport uint16) netlink.IPTuple {
		return netlink.IPTuple{Protocol: proto, SrcIP: net.IP(src.AsSlice()), SrcPort: sport, DstIP: net.IP(dst.AsSlice()), DstPort: dport}
	}
	outbound := tcp4(49000) // SNATed to line 2's address
	outbound.tcpFlags = tcpACK
	// Came in by line 0 (DNAT): the LAN server's SYN-ACK is recovered.
	forwarded := packet{src: lanServer, dst: remote, proto: protoTCP, sport: 80, dport: 5555, tcpFlags: tcpSYN | tcpACK}
	// A SYN opens a connection conntrack cannot know: the lookup is
	// skipped, so even this (made-up) entry of line 2 is not looked at.
	syn := tcp4(49002)
	syn.tcpFlags = tcpSYN
	movedUDP := udp4(49001) // SNATed to line 2's address, but line 2 will be dead
	entries := []netlink.ConntrackFlow{
		{Forward: tuple(protoTCP, client4, 49000, server4, 443), Reverse: tuple(protoTCP, server4, 443, nat(2), 49000)},
		{Forward: tuple(protoTCP, remote, 5555, nat(0), 8080), Reverse: tuple(protoTCP, lanServer, 80, remote, 5555)},
		{Forward: tuple(protoUDP, client4, 49001, server4, 53), Reverse: tuple(protoUDP, server4, 53, nat(2), 49001)},
		{Forward: tuple(protoTCP, client4, 49002, server4, 443), Reverse: tuple(protoTCP, server4, 443, nat(2), 49002)},
	}

	var marks []uint32
	err := ns.do(func() error {
		for _, e := range entries {
			e.FamilyType = unix.AF_INET
			e.TimeOut = 60
			if err := netlink.ConntrackCreate(netlink.ConntrackTable, netlink.FAMILY_V4, &e); err != nil {
				return err
			}
		}
		for _, p := range []packet{outbound, forwarded, syn} {
			out := make([]byte, skbCtxOutSize)
			if _, err := d.objs.UplinkdLanIn.Run(&ebpf.RunOptions{Data: p.bytes(), ContextOut: out}); err != nil {
				return err
			}
			marks = append(marks, skbMark(out))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if marks[0] != lineMark[2] || marks[1] != lineMark[0] || marks[2] != lineMark[1] {
		t.Errorf("marks %#x, want %#x (outbound, line 2), %#x (port forward, line 0) and %#x (SYN, from the buckets)",
			marks, lineMark[2], lineMark[0], lineMark[1])
	}
	if f, ok := lookupFlow(t, d, syn); !ok || f.Line != 1 || f.Flags != 0 {
		t.Errorf("SYN's flow %+v, want a new one on line 1", f)
	}
	for _, c := range []struct {
		p    packet
		line int
	}{{outbound, 2}, {forwarded, 0}} {
		f, ok := lookupFlow(t, d, c.p)
		if !ok || f.Line != uint32(c.line) || f.Flags != flowRecovered || f.NatAddr != nat(c.line).As16() {
			t.Errorf("flow %v: %+v, want recovered on line %d with NAT address %v", c.p.src, f, c.line, nat(c.line))
		}
	}
	if r := reasons(t, d); r["recovered_ct"] != 2 || r["new_flow"] != 1 {
		t.Errorf("reasons %v, want 2 recovered_ct, 1 new_flow", r)
	}

	// A UDP flow whose line died is not recovered onto it: it moves.
	setDead(t, d, 2)
	err = ns.do(func() error {
		out := make([]byte, skbCtxOutSize)
		_, err := d.objs.UplinkdLanIn.Run(&ebpf.RunOptions{Data: movedUDP.bytes(), ContextOut: out})
		marks = append(marks, skbMark(out))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if f, _ := lookupFlow(t, d, movedUDP); f.Line != 1 || f.Flags != 0 || marks[3] != lineMark[1] {
		t.Errorf("UDP flow of a dead line: %+v, mark %#x; want it on line 1", f, marks[3])
	}
}

// On a kernel without the conntrack kfuncs (here: conntrack is a module
// that cannot be loaded) the programs still load, with recovery off and
// said so, and steer new flows from the buckets. Only a fresh kernel whose
// nf_conntrack is a module not loaded yet shows this: the VM matrix runs
// this test first on each boot (test/vm/guest.sh).
func TestLoadWithoutConntrackKfuncs(t *testing.T) {
	requireBPF(t)
	if _, err := os.Stat("/sys/module/" + ctModule); err == nil {
		t.Skipf("%s is loaded (or built in): its kfuncs cannot be hidden here", ctModule)
	}
	loadModule = func(string) error { return errors.New("not available (test)") }
	t.Cleanup(func() { loadModule = modprobe })
	d := steering(t)
	if err := d.CTRecovery(); err == nil || !strings.Contains(err.Error(), "not available (test)") {
		t.Errorf("CTRecovery() = %v, want recovery off, saying why", err)
	}
	if mark := steer(t, d, tcp4(40000), "new_flow"); mark&d.markMask != lineMark[1] {
		t.Errorf("mark %#x, want line 1's %#x", mark, lineMark[1])
	}
}

// Remove unpins uplinkd's maps and links by name and leaves anything else
// in the pin dir alone (with the dir itself, then not empty).
func TestRemoveOnlyOwnPins(t *testing.T) {
	dir := tempPinDir(t)
	d := load(t, Options{PinDir: dir})
	d.Close()
	foreign, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer foreign.Close()
	pin := filepath.Join(dir, "someone_else")
	if err := foreign.Pin(pin); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(pin) })
	if err := Remove(dir); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != "someone_else" {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Errorf("after Remove the pin dir holds %v, want only someone_else", names)
	}
}

// A pin dir off bpffs, or one that others made or may write, is refused
// before anything is pinned or removed.
func TestCheckPinDir(t *testing.T) {
	requireBPF(t)
	shared := tempPinDir(t)
	if err := os.Chmod(shared, 0o777); err != nil {
		t.Fatal(err)
	}
	for dir, want := range map[string]string{
		t.TempDir(): "is not on a bpf filesystem",
		shared:      "writable by group or others",
		"relative":  "not an absolute path",
	} {
		if err := CheckPinDir(dir); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("CheckPinDir(%s) = %v, want %q", dir, err, want)
		}
		if _, err := Load(Options{PinDir: dir, FlowEntries: 4096}); err == nil {
			t.Errorf("Load(%s) succeeded", dir)
		}
	}
	os.Chmod(shared, 0o700)
}

// With nothing mounted at /sys/fs/bpf (a fresh machine), PreparePinDir
// mounts bpffs there. In a private mount namespace of its own thread.
func TestPreparePinDirMountsBPFFS(t *testing.T) {
	requireBPF(t)
	err := onLockedThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
			return err
		}
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
			return err
		}
		for isBPFFS(BPFFSRoot) {
			if err := unix.Unmount(BPFFSRoot, 0); err != nil {
				return err
			}
		}
		mounted, err := PreparePinDir(BPFFSRoot + "/uplinkd-mount-test")
		if err != nil {
			return err
		}
		if !mounted || !isBPFFS(BPFFSRoot) {
			t.Errorf("mounted %v, bpffs at %s: %v", mounted, BPFFSRoot, isBPFFS(BPFFSRoot))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestSYNSkipOnlyOpensConnections: only a SYN that opens a connection
// skips the conntrack lookup. A packet of a flow the map lost whose flags
// merely include SYN (SYN-FIN, SYN-RST: no opening, conntrack calls them
// invalid), or whose TCP header ends before the flags, is looked up and
// stays on its conntrack line: were it pinned from the buckets, the
// connection's later packets would follow that pin out of another line
// than their NAT address.
func TestSYNSkipOnlyOpensConnections(t *testing.T) {
	ns := newNetns(t)
	d := steering(t) // new flows go to line 1
	nat2 := natAddrs(2)[0]
	tests := []struct {
		name  string
		flags uint8
		cut   int
		line  uint32
	}{
		{"syn", tcpSYN, 0, 1},
		{"syn-ack", tcpSYN | tcpACK, 0, 2},
		{"syn-fin", tcpSYN | 0x01, 0, 2},
		{"syn-rst", tcpSYN | 0x04, 0, 2},
		{"syn-fin-psh-urg", tcpSYN | 0x01 | 0x08 | 0x20, 0, 2},
		{"header cut before the flags", tcpSYN, 20 - 13, 2},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := tcp4(49100 + uint16(i))
			p.tcpFlags, p.cut = tt.flags, tt.cut
			ct := netlink.ConntrackFlow{
				FamilyType: unix.AF_INET, TimeOut: 60,
				Forward: netlink.IPTuple{Protocol: protoTCP, SrcIP: client4.AsSlice(), SrcPort: p.sport, DstIP: server4.AsSlice(), DstPort: p.dport},
				Reverse: netlink.IPTuple{Protocol: protoTCP, SrcIP: server4.AsSlice(), SrcPort: p.dport, DstIP: nat2.AsSlice(), DstPort: p.sport},
			}
			err := ns.do(func() error {
				if err := netlink.ConntrackCreate(netlink.ConntrackTable, netlink.FAMILY_V4, &ct); err != nil {
					return err
				}
				_, err := runMark(d.objs.UplinkdLanIn, p.bytes(), 0)
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			if f, ok := lookupFlow(t, d, p); !ok || f.Line != tt.line {
				t.Errorf("flow %+v (pinned %v), want line %d", f, ok, tt.line)
			}
		})
	}
}

// A TCP segment that is not a SYN, of a connection neither the flow map
// nor conntrack knows (after an HA takeover, one that arrives before
// conntrackd committed the connection), is not pinned from the buckets:
// a guess would pin it to the wrong line for good. It passes unmarked,
// and once conntrack knows the connection, the next one is recovered.
func TestUnknownTCPNotPinned(t *testing.T) {
	ns := newNetns(t)
	d := steering(t) // new flows go to line 1
	p := tcp4(49200)
	p.tcpFlags = tcpACK
	var first, second uint32
	err := ns.do(func() error {
		var err error
		if first, err = runMark(d.objs.UplinkdLanIn, p.bytes(), 0); err != nil {
			return err
		}
		ct := netlink.ConntrackFlow{
			FamilyType: unix.AF_INET, TimeOut: 60,
			Forward: netlink.IPTuple{Protocol: protoTCP, SrcIP: client4.AsSlice(), SrcPort: p.sport, DstIP: server4.AsSlice(), DstPort: p.dport},
			Reverse: netlink.IPTuple{Protocol: protoTCP, SrcIP: server4.AsSlice(), SrcPort: p.dport, DstIP: natAddrs(2)[0].AsSlice(), DstPort: p.sport},
		}
		if err := netlink.ConntrackCreate(netlink.ConntrackTable, netlink.FAMILY_V4, &ct); err != nil {
			return err
		}
		second, err = runMark(d.objs.UplinkdLanIn, p.bytes(), 0)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if first != 0 {
		t.Errorf("an unknown connection's segment got mark %#x, want none", first)
	}
	if r := reasons(t, d); r["tcp_unknown"] != 1 || r["recovered_ct"] != 1 {
		t.Errorf("reasons %v, want 1 tcp_unknown, then 1 recovered_ct", r)
	}
	if f, ok := lookupFlow(t, d, p); !ok || f.Line != 2 || second != lineMark[2] {
		t.Errorf("after conntrack knew it: flow %+v (pinned %v), mark %#x; want line 2, mark %#x", f, ok, second, lineMark[2])
	}
	// A UDP datagram conntrack does not know is a new flow: UDP has no
	// opening segment to wait for.
	u := udp4(49201)
	if err := ns.do(func() error { _, err := runMark(d.objs.UplinkdLanIn, u.bytes(), 0); return err }); err != nil {
		t.Fatal(err)
	}
	if f, ok := lookupFlow(t, d, u); !ok || f.Line != 1 {
		t.Errorf("an unknown UDP flow: %+v (pinned %v), want a new one on line 1", f, ok)
	}
}

// TestLoadRetiresLegacyCounters: over the pins of an uplinkd that counted
// on the uplinks (ul_if_line pinned), Load cuts the old uplink programs off
// (ul_if_line emptied, then unpinned) and restarts the line counters,
// which held the uplinks' whole traffic, at zero; a later Load keeps them.
func TestLoadRetiresLegacyCounters(t *testing.T) {
	requireBPF(t)
	dir := tempPinDir(t)
	d := load(t, Options{PinDir: dir})
	run(t, d.objs.UplinkdLanIn, udp4(40000).bytes(), 0) // nowhere to go: no line
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	old := make([]uplinkdLineStats, cpus)
	old[0] = uplinkdLineStats{TxPackets: 1000, TxBytes: 1 << 20, RxPackets: 900, RxBytes: 1 << 21}
	if err := d.objs.UlLineStats.Put(uint32(1), old); err != nil {
		t.Fatal(err)
	}
	d.Close()
	legacy, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: 4, MaxEntries: 64})
	if err != nil {
		t.Fatal(err)
	}
	defer legacy.Close()
	if err := legacy.Put(uint32(7), uint32(1)); err != nil {
		t.Fatal(err)
	}
	if err := legacy.Pin(filepath.Join(dir, "ul_if_line")); err != nil {
		t.Fatal(err)
	}

	d = load(t, Options{PinDir: dir})
	if s, err := d.LineStats(); err != nil || s[1] != (LineStats{}) {
		t.Errorf("line 1 after the upgrade: %+v (%v), want zero", s[1], err)
	}
	var line uint32
	if err := legacy.Lookup(uint32(7), &line); !errors.Is(err, ebpf.ErrKeyNotExist) {
		t.Errorf("ul_if_line still maps an uplink (to %d, %v): the old programs go on counting", line, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "ul_if_line")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("ul_if_line still pinned: %v", err)
	}
	// Counted from now on, and kept by the next Load.
	if err := d.objs.UlLineStats.Put(uint32(1), old); err != nil {
		t.Fatal(err)
	}
	d.Close()
	d = load(t, Options{PinDir: dir})
	if s, _ := d.LineStats(); s[1].TxPackets != 1000 {
		t.Errorf("line 1 after a plain restart: %+v, want the counts kept", s[1])
	}
}
