// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/florianl/go-tc"
	"github.com/florianl/go-tc/core"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/uplinkd/uplinkd/test/foreign"
)

// These tests attach to veth pairs in a throwaway namespace and send real
// frames through them with packet sockets: cli0 -> lan0 (LAN) and
// isp0 -> up0 (uplink).

// lab creates the veth pairs lan0/cli0 and up0/isp0, with IPv6 off so that
// the kernel sends no frames of its own.
func lab() error {
	for _, f := range []string{"all", "default"} {
		if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+f+"/disable_ipv6", []byte("1"), 0); err != nil {
			return err
		}
	}
	for _, pair := range [][2]string{{"lan0", "cli0"}, {"up0", "isp0"}} {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: pair[0]}, PeerName: pair[1]}
		if err := netlink.LinkAdd(veth); err != nil {
			return err
		}
		for _, name := range pair {
			l, err := netlink.LinkByName(name)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
		}
	}
	return nil
}

// send writes frames to ifname with a packet socket.
func send(ifname string, frames ...[]byte) error {
	iface, err := net.InterfaceByName(ifname)
	if err != nil {
		return err
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	addr := &unix.SockaddrLinklayer{Ifindex: iface.Index}
	for _, f := range frames {
		if err := unix.Sendto(fd, f, 0, addr); err != nil {
			return err
		}
	}
	return nil
}

// lanFrames are n frames of one UDP flow from the client, addressed to lan0.
func lanFrames(n int) ([][]byte, error) {
	lan, err := net.InterfaceByName("lan0")
	if err != nil {
		return nil, err
	}
	p := udp4(50000)
	p.dstMAC = lan.HardwareAddr
	frames := make([][]byte, n)
	for i := range frames {
		frames[i] = p.bytes()
	}
	return frames, nil
}

func linkInfo(t *testing.T, pin string) *link.Info {
	t.Helper()
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		t.Fatal(err)
	}
	return info
}

func TestAttachTCX(t *testing.T) {
	ns := newNetns(t)
	dir := tempPinDir(t)
	foreignProg, counter := foreign.Program(t)
	first := load(t, Options{PinDir: dir})
	if err := first.SetLine(2, Line{Mark: 0x300}); err != nil {
		t.Fatal(err)
	}
	if err := first.SetBuckets(Buckets(nil, []int{0, 0, 1}, []bool{true, true, true})); err != nil {
		t.Fatal(err)
	}

	err := ns.do(func() error {
		if err := lab(); err != nil {
			return err
		}
		lan, err := net.InterfaceByName("lan0")
		if err != nil {
			return err
		}
		// Someone else's program, attached first.
		l, err := link.AttachTCX(link.TCXOptions{Interface: lan.Index, Program: foreignProg, Attach: ebpf.AttachTCXIngress})
		if errors.Is(err, link.ErrNotSupported) {
			return err
		}
		if err != nil {
			return err
		}
		t.Cleanup(func() { l.Close() })

		if err := first.AttachLAN("lan0"); err != nil {
			return err
		}
		frames, err := lanFrames(3)
		if err != nil {
			return err
		}
		reply := udp4(50000)
		reply.src, reply.dst, reply.sport, reply.dport = server4, client4, 53, 50000
		// Traffic on a line interface is no datapath's: nothing counts it.
		uplink := udp4(1).bytes()
		return errors.Join(
			send("cli0", frames...),
			send("lan0", reply.bytes()),
			send("isp0", uplink, uplink),
			send("up0", uplink),
		)
	})
	if errors.Is(err, link.ErrNotSupported) {
		t.Skip("no TCX in this kernel")
	}
	if err != nil {
		t.Fatal(err)
	}

	if n := foreign.Count(t, counter); n != 3 {
		t.Errorf("foreign program counted %d packets, want 3", n)
	}
	f, ok := lookupFlow(t, first, udp4(50000))
	if !ok || f.Line != 2 || f.TxPackets != 3 || f.RxPackets != 1 {
		t.Errorf("flow %+v, want line 2, 3 packets out, 1 in", f)
	}
	stats, err := first.LineStats()
	if err != nil {
		t.Fatal(err)
	}
	if s := stats[2]; s.TxPackets != 3 || s.RxPackets != 1 {
		t.Errorf("line 2 stats %+v, want the flow's 3 packets out, 1 in", s)
	}

	// Restart: a new datapath swaps its program into the same link.
	pin := filepath.Join(dir, linksDir, "lan0_ingress")
	before := linkInfo(t, pin)
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	second := load(t, Options{PinDir: dir})
	var progs []link.AttachedProgram
	err = ns.do(func() error {
		if err := second.AttachLAN("lan0"); err != nil {
			return err
		}
		lan, err := net.InterfaceByName("lan0")
		if err != nil {
			return err
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: lan.Index, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return err
		}
		progs = res.Programs
		frames, err := lanFrames(2)
		if err != nil {
			return err
		}
		return send("cli0", frames...)
	})
	if err != nil {
		t.Fatal(err)
	}
	after := linkInfo(t, pin)
	if after.ID != before.ID || after.Program == before.Program {
		t.Errorf("restart: link %d prog %d -> link %d prog %d, want the same link with a new program",
			before.ID, before.Program, after.ID, after.Program)
	}
	if len(progs) != 2 || progs[1].ID != after.Program {
		t.Errorf("programs on lan0 ingress %+v, want the foreign one, then %d", progs, after.Program)
	}
	if n := foreign.Count(t, counter); n != 5 {
		t.Errorf("foreign program counted %d packets, want 5", n)
	}
	if f, _ := lookupFlow(t, second, udp4(50000)); f.TxPackets != 5 || f.Line != 2 {
		t.Errorf("flow after restart %+v, want 5 packets on line 2", f)
	}
}

// filters lists the filters on a hook of ifname, by name.
func filters(nl *tc.Tc, ifname string, dir direction) ([]string, error) {
	iface, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil, err
	}
	objs, err := listFilters(nl, iface.Index, core.BuildHandle(tc.HandleRoot, dir.tcParent))
	if err != nil {
		return nil, err
	}
	var names []string
	for _, o := range objs {
		if o.BPF != nil && o.BPF.Name != nil {
			names = append(names, *o.BPF.Name)
		}
	}
	return names, nil
}

func hasClsact(nl *tc.Tc, ifname string) (bool, error) {
	iface, err := net.InterfaceByName(ifname)
	if err != nil {
		return false, err
	}
	qdiscs, err := nl.Qdisc().Get()
	if err != nil {
		return false, err
	}
	for _, q := range qdiscs {
		if int(q.Ifindex) == iface.Index && q.Kind == "clsact" {
			return true, nil
		}
	}
	return false, nil
}

func TestAttachTC(t *testing.T) {
	ns := newNetns(t)
	dir := tempPinDir(t)
	foreignProg, counter := foreign.Program(t)
	d := load(t, Options{PinDir: dir, Attach: AttachTC})
	if err := d.SetLine(0, Line{Mark: 0x100}); err != nil {
		t.Fatal(err)
	}
	if err := d.SetBuckets(Buckets(nil, []int{1}, []bool{true})); err != nil {
		t.Fatal(err)
	}

	var report []string
	check := func(ok bool, format string) {
		if !ok {
			report = append(report, format)
		}
	}
	err := ns.do(func() error {
		if err := lab(); err != nil {
			return err
		}
		nl, err := tcOpen()
		if err != nil {
			return err
		}
		defer nl.Close()

		// Someone else's clsact and filter on lan0, before uplinkd.
		lan, err := net.InterfaceByName("lan0")
		if err != nil {
			return err
		}
		if err := nl.Qdisc().Add(clsact(lan.Index)); err != nil {
			return err
		}
		fd, name, direct := uint32(foreignProg.FD()), "foreign", uint32(tc.BpfActDirect)
		if err := nl.Filter().Add(&tc.Object{
			Msg:       tc.Msg{Family: unix.AF_UNSPEC, Ifindex: uint32(lan.Index), Handle: 1, Parent: core.BuildHandle(tc.HandleRoot, tc.HandleMinIngress), Info: 1<<16 | uint32(htons(unix.ETH_P_ALL))},
			Attribute: tc.Attribute{Kind: "bpf", BPF: &tc.Bpf{FD: &fd, Name: &name, Flags: &direct}},
		}); err != nil {
			return err
		}

		if err := d.AttachLAN("lan0"); err != nil {
			return err
		}
		// Again, as after a restart: our filters are replaced, not added.
		if err := d.AttachLAN("lan0"); err != nil {
			return err
		}
		frames, err := lanFrames(3)
		if err != nil {
			return err
		}
		if err := send("cli0", frames...); err != nil {
			return err
		}
		if err := send("isp0", frames[0]); err != nil {
			return err
		}

		in, err := filters(nl, "lan0", ingress)
		if err != nil {
			return err
		}
		check(len(in) == 2 && in[0] == "foreign" && strings.HasPrefix(in[1], "uplinkd_lan_in"), "lan0 ingress filters "+strings.Join(in, ","))

		if err := Remove(dir); err != nil {
			return err
		}

		in, err = filters(nl, "lan0", ingress)
		if err != nil {
			return err
		}
		out, err := filters(nl, "lan0", egress)
		if err != nil {
			return err
		}
		check(len(in) == 1 && in[0] == "foreign" && len(out) == 0, "after Remove, lan0 filters "+strings.Join(append(in, out...), ","))
		kept, err := hasClsact(nl, "lan0")
		if err != nil {
			return err
		}
		check(kept, "Remove deleted the foreign clsact of lan0")
		return send("cli0", frames[0])
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range report {
		t.Error(r)
	}
	if n := foreign.Count(t, counter); n != 4 {
		t.Errorf("foreign program counted %d packets, want 4", n)
	}
	if f, _ := lookupFlow(t, d, udp4(50000)); f.TxPackets != 3 || f.Line != 0 {
		t.Errorf("flow %+v, want 3 packets on line 0", f)
	}
	if stats, err := d.LineStats(); err != nil || stats[0].TxPackets != 3 {
		t.Errorf("line 0 stats %+v (%v), want the flow's 3 packets out", stats[0], err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin directory still there after Remove: %v", err)
	}
}

// TestDetachTakesEarlierUplinkCounters: earlier uplinkd attached counting
// programs to the line interfaces and pinned ul_if_line. Detach takes such
// a program off a line interface (another one stays), and Remove unpins
// the old map by name.
func TestDetachTakesEarlierUplinkCounters(t *testing.T) {
	ns := newNetns(t)
	dir := tempPinDir(t)
	foreignProg, _ := foreign.Program(t)
	var old emptyObjects // its program is named uplinkd_empty: uplinkd's
	if err := loadEmptyObjects(&old, nil); err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	d := load(t, Options{PinDir: dir})
	legacy, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: 4, MaxEntries: 64})
	if err != nil {
		t.Fatal(err)
	}
	defer legacy.Close()
	if err := legacy.Pin(filepath.Join(dir, "ul_if_line")); err != nil {
		t.Fatal(err)
	}

	err = ns.do(func() error {
		if err := lab(); err != nil {
			return err
		}
		up, err := net.InterfaceByName("up0")
		if err != nil {
			return err
		}
		pin := filepath.Join(LinksDir(dir), "up0_ingress")
		if err := os.MkdirAll(LinksDir(dir), 0o700); err != nil {
			return err
		}
		l, err := link.AttachTCX(link.TCXOptions{Interface: up.Index, Program: old.UplinkdEmpty, Attach: ebpf.AttachTCXIngress})
		if errors.Is(err, link.ErrNotSupported) {
			return err
		}
		if err != nil {
			return err
		}
		if err := l.Pin(pin); err != nil {
			return err
		}
		l.Close()
		other, err := link.AttachTCX(link.TCXOptions{Interface: up.Index, Program: foreignProg, Attach: ebpf.AttachTCXEgress})
		if err != nil {
			return err
		}
		defer other.Close()

		if err := d.Detach("up0"); err != nil {
			return err
		}
		if _, err := os.Stat(pin); !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("the earlier counter's link pin is still there: %v", err)
		}
		progs, err := link.QueryPrograms(link.QueryOptions{Target: up.Index, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return err
		}
		if len(progs.Programs) != 0 {
			return fmt.Errorf("up0 ingress still runs %d programs", len(progs.Programs))
		}
		if progs, err = link.QueryPrograms(link.QueryOptions{Target: up.Index, Attach: ebpf.AttachTCXEgress}); err != nil || len(progs.Programs) != 1 {
			return fmt.Errorf("up0 egress runs %v (%v), want the foreign program alone", progs, err)
		}
		return nil
	})
	if errors.Is(err, link.ErrNotSupported) {
		t.Skip("no TCX in this kernel")
	}
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	if err := Remove(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin dir left after Remove (ul_if_line?): %v", err)
	}
}

func TestIfindex(t *testing.T) {
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if got, err := ifindex("lo"); err != nil || got != lo.Index {
		t.Errorf("ifindex(lo) = %d, %v; want %d", got, err, lo.Index)
	}
	if _, err := ifindex("nosuch0"); !errors.Is(err, unix.ENODEV) {
		t.Errorf("ifindex of a missing interface: %v, want ENODEV", err)
	}
}
