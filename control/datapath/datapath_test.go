// SPDX-License-Identifier: Apache-2.0

package datapath

import (
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/events"
	"github.com/uplinkd/uplinkd/control/nsdo"
	"github.com/uplinkd/uplinkd/control/plan"
	"github.com/uplinkd/uplinkd/loader"
)

// testNS makes a throwaway network namespace with the veths lan0 and
// wan1..wanN (their peers stay in it), removed with the test.
func testNS(t *testing.T, lines int) (netns.NsHandle, *netlink.Handle) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (a network namespace, BPF)")
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	ns, err := netns.New()
	if serr := netns.Set(orig); serr != nil {
		panic(serr) // this thread must not go on in the new namespace
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	names := []string{"lan0"}
	for i := 1; i <= lines; i++ {
		names = append(names, fmt.Sprintf("wan%d", i))
	}
	for _, name := range names {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}
		if err := h.LinkAdd(veth); err != nil {
			t.Fatal(err)
		}
		if err := h.LinkSetUp(veth); err != nil {
			t.Fatal(err)
		}
	}
	return ns, h
}

// A reconcile with nothing to change writes nothing to the datapath's
// maps: every write goes through the loader's counted map writer.
func TestApplyUnchangedWritesNothing(t *testing.T) {
	const n = 16
	ns, h := testNS(t, n)
	pinDir, err := os.MkdirTemp(loader.BPFFSRoot, "uplinkd-test-")
	if err != nil {
		t.Fatal(err)
	}
	text := "lan: {interfaces: [lan0]}\nuplinks:\n"
	for i := 1; i <= n; i++ {
		text += fmt.Sprintf("  - {name: l%d, interface: wan%d, gateway: 10.0.%d.1}\n", i, i, i)
	}
	text += fmt.Sprintf("state_dir: %s\ndatapath: {pin_dir: %s, flow_entries: 4096}\n", t.TempDir(), pinDir)
	cfg, err := config.Parse("unit.yaml", []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	do := func(f func() error) error { return nsdo.Do(ns, f) }
	d := New(Kernel{
		Do: do,
		LinkIndex: func(ifname string) (int, error) {
			l, err := h.LinkByName(ifname)
			if err != nil {
				return 0, err
			}
			return l.Attrs().Index, nil
		},
		LocalAddrs: func() ([]netip.Addr, error) { return []netip.Addr{netip.MustParseAddr("192.0.2.1")}, nil },
	})
	t.Cleanup(func() {
		d.Close()
		if err := do(func() error { return loader.Remove(pinDir) }); err != nil {
			t.Error(err)
		}
	})
	var lines []plan.Line
	for i, l := range cfg.Lines {
		lines = append(lines, plan.Line{
			Line: l, Index: l.Slot - 1, Carrier: true, Up: true, Healthy: i != 3, // one line dead
			Address: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 0, byte(i + 1), 2}), 24),
		})
	}
	lan := []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ev := events.NewRing(16, log)
	apply := func() uint64 {
		t.Helper()
		var before uint64
		if d.dp != nil {
			before = d.dp.Writes()
		}
		if err := d.Apply(cfg, lines, lan, log, ev); err != nil {
			t.Fatal(err)
		}
		return d.dp.Writes() - before
	}
	if w := apply(); w == 0 {
		t.Fatal("the first apply wrote nothing")
	}
	for range 3 {
		if w := apply(); w != 0 {
			t.Errorf("an apply with nothing to change made %d map writes, want 0", w)
		}
	}
	lines[3].Healthy = true // the dead line is back: its entry and its buckets
	if w := apply(); w != 2 {
		t.Errorf("a line back: %d map writes, want 2 (its entry, one batch of buckets)", w)
	}
	if w := apply(); w != 0 {
		t.Errorf("after the change, an apply with nothing to change made %d map writes, want 0", w)
	}
}

// A late line keeps its flows (not dead) and a line that stopped serving
// loses them; both get no buckets (Apply builds them from Usable).
func TestLineEntry(t *testing.T) {
	l := plan.Line{Line: config.Line{Mark: 0x1000000, Weight: 3}, Up: true, Carrier: true, Healthy: true,
		Address: netip.MustParsePrefix("198.51.100.2/28")}
	for _, c := range []struct {
		name string
		edit func(*plan.Line)
		dead bool
	}{
		{"up", func(*plan.Line) {}, false},
		{"late", func(l *plan.Line) { l.Late = true }, false},
		{"down", func(l *plan.Line) { l.Healthy = false }, true},
		{"no carrier", func(l *plan.Line) { l.Carrier = false }, true},
		{"operator down", func(l *plan.Line) { l.Up = false }, true},
	} {
		l := l
		c.edit(&l)
		e := lineEntry(l)
		if e.Dead != c.dead || e.Mark != 0x1000000 || e.Weight != 3 || len(e.NATAddrs) != 1 || e.NATAddrs[0] != l.Address.Addr() {
			t.Errorf("%s: entry %+v, want dead %v, the line's mark, weight and address", c.name, e, c.dead)
		}
	}
}

// In an HA pair a line's VIP comes first among its NAT addresses: new
// flows record it, and conntrack entries NAT'd to it recover the line.
func TestLineEntryVIP(t *testing.T) {
	l := plan.Line{Line: config.Line{VIPPrefix: netip.MustParsePrefix("198.51.100.4/28")}, Up: true, Carrier: true, Healthy: true,
		Address: netip.MustParsePrefix("198.51.100.2/28")}
	e := lineEntry(l)
	if len(e.NATAddrs) != 2 || e.NATAddrs[0].String() != "198.51.100.4" || e.NATAddrs[1].String() != "198.51.100.2" {
		t.Errorf("NAT addresses %v, want the VIP, then the own address", e.NATAddrs)
	}
}
