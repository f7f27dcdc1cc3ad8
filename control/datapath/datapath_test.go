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

// syncLab is a Sync over a throwaway namespace with n lines, l1..ln on
// wan1..wanN, its config text extended by extra; its pins go with the test.
type syncLab struct {
	d     *Sync
	cfg   *config.Config
	lines []plan.Line
	base  string // the config's text without extra
}

func newSyncLab(t *testing.T, n int, extra string) *syncLab {
	t.Helper()
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
	cfg, err := config.Parse("unit.yaml", []byte(text+extra))
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
			Line: l, Index: l.Slot - 1, Carrier: true, Up: true, Healthy: true,
			Address: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 0, byte(i + 1), 2}), 24),
		})
	}
	return &syncLab{d: d, cfg: cfg, lines: lines, base: text}
}

// apply applies the lab's config and lines, returning the map writes made.
func (l *syncLab) apply(t *testing.T) uint64 {
	t.Helper()
	var before uint64
	if l.d.dp != nil {
		before = l.d.dp.Writes()
	}
	lan := []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if err := l.d.Apply(l.cfg, l.lines, lan, log, events.NewRing(16, log)); err != nil {
		t.Fatal(err)
	}
	return l.d.dp.Writes() - before
}

// A reconcile with nothing to change writes nothing to the datapath's
// maps: every write goes through the loader's counted map writer.
func TestApplyUnchangedWritesNothing(t *testing.T) {
	l := newSyncLab(t, 16, "")
	l.lines[3].Healthy = false // one line dead
	if w := l.apply(t); w == 0 {
		t.Fatal("the first apply wrote nothing")
	}
	for range 3 {
		if w := l.apply(t); w != 0 {
			t.Errorf("an apply with nothing to change made %d map writes, want 0", w)
		}
	}
	// The dead line is back: its entry, its buckets and the balanced
	// policy's set of lines (which sticky rules read).
	l.lines[3].Healthy = true
	if w := l.apply(t); w != 3 {
		t.Errorf("a line back: %d map writes, want 3 (its entry, one batch of buckets, the balanced policy's line set)", w)
	}
	if w := l.apply(t); w != 0 {
		t.Errorf("after the change, an apply with nothing to change made %d map writes, want 0", w)
	}
}

// A policy's new flows go to its first tier with a usable line, then to
// its last resort; the rules are installed once, and again only when they
// change.
func TestApplyPolicies(t *testing.T) {
	l := newSyncLab(t, 3, `policies:
  - name: tiered
    members: [{line: l1, metric: 1}, {line: l2, metric: 2}, {line: l3, metric: 2}]
    last_resort: unreachable
rules:
  - {dst_port: 5060, proto: udp, policy: tiered}
  - {dst: 203.0.113.0/24, line: l3}
`)
	l.apply(t)
	lineSet := func(id int) map[int]int {
		t.Helper()
		tables, err := l.d.dp.CurrentPolicies()
		if err != nil {
			t.Fatal(err)
		}
		set := map[int]int{}
		for _, line := range tables[id].Buckets {
			set[line]++
		}
		return set
	}
	if got := lineSet(1); len(got) != 1 || got[0] != loader.NumBuckets {
		t.Errorf("tiered with every line up: buckets %v, want all on l1 (index 0)", got)
	}
	if got := lineSet(2); len(got) != 1 || got[2] != loader.NumBuckets {
		t.Errorf("line:l3: buckets %v, want all on l3 (index 2)", got)
	}
	hits, err := l.d.dp.RuleHits()
	if err != nil || len(hits) != 2 {
		t.Fatalf("rule hits %v (%v): want the 2 rules installed", hits, err)
	}
	if w := l.apply(t); w != 0 {
		t.Errorf("an apply with nothing to change made %d map writes, want 0", w)
	}
	l.lines[0].Healthy = false
	l.apply(t)
	if got := lineSet(1); len(got) != 2 || got[1]+got[2] != loader.NumBuckets {
		t.Errorf("tiered with l1 down: buckets %v, want l2 and l3 (indexes 1, 2) only", got)
	}
	l.lines[1].Healthy, l.lines[2].Healthy = false, false
	l.apply(t)
	if got := lineSet(1); len(got) != 1 || got[loader.NoLine] != loader.NumBuckets {
		t.Errorf("tiered with every line down: buckets %v, want none (its last resort)", got)
	}
	tables, err := l.d.dp.CurrentPolicies()
	if err != nil || tables[1].LastResort != loader.LastResortUnreachable {
		t.Errorf("tiered's last resort %d (%v), want unreachable", tables[1].LastResort, err)
	}
	// A reload without rules or policies unsets them.
	noRules, err := config.Parse("unit.yaml", []byte(l.base))
	if err != nil {
		t.Fatal(err)
	}
	l.cfg = noRules
	l.apply(t)
	if hits, err := l.d.dp.RuleHits(); err != nil || len(hits) != 0 {
		t.Errorf("after a reload without rules: hits %v (%v), want no rules installed", hits, err)
	}
	if got := lineSet(1); len(got) != 0 {
		t.Errorf("after a reload without policies: policy 1's buckets %v, want none", got)
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
