// SPDX-License-Identifier: Apache-2.0

package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/uplinkd/uplinkd/control/ha"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/events"
	"github.com/uplinkd/uplinkd/control/plan"
	"github.com/uplinkd/uplinkd/control/routing"
	"github.com/uplinkd/uplinkd/control/statefile"
	"github.com/uplinkd/uplinkd/control/sysctl"
	"github.com/uplinkd/uplinkd/loader"
)

// fakeKernel is ops without a kernel: interfaces with addresses and
// carrier, a /proc/sys in memory, the routing package's fake, and a log of
// every change in the order Apply made it.
type fakeKernel struct {
	addrs    map[string][]netip.Prefix
	carrier  map[string]bool
	proc     fakeProc
	routes   routing.Fake
	log      []string
	natErr   error // ApplyNAT fails with it
	clearErr error // ClearFlows fails with it
	synced   [][]plan.Line
	flowMap  loader.FlowMapUse
}

type fakeProc struct {
	k *fakeKernel
	v map[string]string
}

func (p fakeProc) Get(path string) (string, error) {
	v, ok := p.v[path]
	if !ok {
		return "", fs.ErrNotExist
	}
	return v, nil
}

func (p fakeProc) Set(path, v string) error {
	if _, ok := p.v[path]; !ok {
		return fs.ErrNotExist
	}
	p.v[path] = v
	p.k.log = append(p.k.log, "sysctl "+path+"="+v)
	return nil
}

func newFake() *fakeKernel {
	k := &fakeKernel{
		addrs: map[string][]netip.Prefix{
			"lan0": {netip.MustParsePrefix("192.0.2.1/24")},
			"wan1": {netip.MustParsePrefix("198.51.100.2/28")},
			"wan2": {netip.MustParsePrefix("198.51.100.18/28")},
		},
		carrier: map[string]bool{"lan0": true, "wan1": true, "wan2": true},
	}
	k.proc = fakeProc{k: k, v: map[string]string{}}
	for _, s := range plan.Build(&config.Config{}, nil).Sysctls {
		k.proc.v[s.Path] = "0"
	}
	for _, ifname := range []string{"wan1", "wan2"} {
		for _, s := range plan.LineSysctls(ifname) {
			k.proc.v[s.Path] = "0"
		}
	}
	return k
}

func (k *fakeKernel) Addrs(ifname string) ([]netip.Prefix, error) {
	a, ok := k.addrs[ifname]
	if !ok {
		return nil, plan.ErrNoInterface
	}
	return a, nil
}
func (k *fakeKernel) Carrier(ifname string) bool             { return k.carrier[ifname] }
func (k *fakeKernel) Sysctls() sysctl.FS                     { return k.proc }
func (k *fakeKernel) Routing(int, plan.Scope) routing.Kernel { return &k.routes }
func (k *fakeKernel) ForgetPolicies(ids []int) (int, error)  { return 0, nil }

func (k *fakeKernel) RemoveLine(index int) (int, error) {
	k.log = append(k.log, fmt.Sprintf("remove line %d", index))
	return 0, nil
}
func (k *fakeKernel) FlowClearer() func() (int, error) {
	return func() (int, error) {
		k.log = append(k.log, "clear flows")
		return 0, k.clearErr
	}
}
func (k *fakeKernel) Detach(ifname string) error {
	k.log = append(k.log, "detach "+ifname)
	return nil
}
func (k *fakeKernel) Close()                                 {}
func (k *fakeKernel) Attached() map[string]string            { return nil }
func (k *fakeKernel) FlowMapUse() (loader.FlowMapUse, error) { return k.flowMap, nil }
func (k *fakeKernel) FlushConntrack(a netip.Addr) (uint, error) {
	k.log = append(k.log, "flush "+a.String())
	return 0, nil
}
func (k *fakeKernel) ApplyNAT(n plan.NAT) (bool, error) {
	var dead []string
	for _, d := range n.Dead {
		dead = append(dead, d.Line)
	}
	k.log = append(k.log, "nat dead="+strings.Join(dead, ","))
	return true, k.natErr
}

func (k *fakeKernel) SyncDatapath(_ *config.Config, lines []plan.Line, _ []netip.Prefix, _ *slog.Logger, _ *events.Ring) error {
	var s []string
	for _, l := range lines {
		state := "live"
		switch {
		case l.Serving() && !l.Usable():
			state = "late"
		case !l.Usable():
			state = "dead"
		}
		s = append(s, l.Name+"="+state)
	}
	k.synced = append(k.synced, lines)
	k.log = append(k.log, "datapath "+strings.Join(s, ","))
	return nil
}

// haPair is one gateway of an HA pair, its LAN VIP 192.0.2.1.
const haPair = `lan: {interfaces: [lan0]}
nat: snat
uplinks:
  - {name: dsl1, interface: wan1, gateway: 198.51.100.1, address: 198.51.100.2/28, vip: 198.51.100.4/28}
  - {name: dsl2, interface: wan2, gateway: 198.51.100.17, address: 198.51.100.18/28, vip: 198.51.100.20/28}
ha: {sync_interface: sync0, address: 203.0.113.249, peer: 203.0.113.250, lan_vip: 192.0.2.1/24}
datapath: {pin_dir: /sys/fs/bpf/uplinkd-unit-test-unused}
`

const twoLines = `lan: {interfaces: [lan0]}
uplinks:
  - {name: dsl1, interface: wan1, gateway: 198.51.100.1}
  - {name: dsl2, interface: wan2, gateway: 198.51.100.17}
datapath: {pin_dir: /sys/fs/bpf/uplinkd-unit-test-unused}
`

func fakeAgent(t *testing.T, text string, k *fakeKernel) *Agent {
	t.Helper()
	c, err := config.Parse("unit.yaml", []byte(text+"state_dir: "+t.TempDir()+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	a, err := newAgent(c, k, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	a.spawn = func(f func()) { f() } // the fake kernel's log in order
	return a
}

func index(log []string, prefix string) int {
	return slices.IndexFunc(log, func(s string) bool { return strings.HasPrefix(s, prefix) })
}

// Forwarding goes on only after the firewall is in place, and not at all
// when the nftables table could not be written; Apply goes on past a
// failure and reports every error.
func TestApplyForwardingAfterTheFirewall(t *testing.T) {
	k := newFake()
	a := fakeAgent(t, twoLines, k)
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	nat, fwd := index(k.log, "nat"), index(k.log, "sysctl net/ipv4/ip_forward=1")
	if nat < 0 || fwd < nat {
		t.Errorf("order %v: want forwarding after the nftables table", k.log)
	}

	k = newFake()
	k.natErr = errors.New("nft refused")
	k.routes.Fail = map[string]string{"AddRule": plan.Rule{Priority: 222, Table: 222, SuppressPrefixLen: -1}.Key()}
	a = fakeAgent(t, twoLines, k)
	_, err := a.Apply()
	if err == nil || !strings.Contains(err.Error(), "nft refused") || !strings.Contains(err.Error(), "injected AddRule failure") {
		t.Errorf("Apply = %v, want both failures reported", err)
	}
	if index(k.log, "sysctl net/ipv4/ip_forward") >= 0 {
		t.Errorf("forwarding set although the firewall failed: %v", k.log)
	}
	if index(k.log, "datapath") < 0 {
		t.Errorf("Apply stopped at the routing failure: %v", k.log)
	}
}

// A line going down: the datapath stops giving it new flows before its
// TCP reset goes in, and its conntrack entries go last. Coming back: the
// reset goes before the datapath gives it flows again.
func TestApplyDeadLineOrder(t *testing.T) {
	k := newFake()
	a := fakeAgent(t, twoLines, k)
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	k.log = nil
	k.carrier["wan1"] = false
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	dp, reset, flush := index(k.log, "datapath dsl1=dead"), index(k.log, "nat dead=dsl1"), index(k.log, "flush 198.51.100.2")
	if dp < 0 || reset < dp || flush < reset {
		t.Errorf("going down, order %v: want datapath, then reset, then conntrack flush", k.log)
	}
	k.log = nil
	k.carrier["wan1"] = true
	a.lines[0].Healthy = true
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	noReset, dp := index(k.log, "nat dead="), index(k.log, "datapath dsl1=live")
	if noReset < 0 || dp < noReset || k.log[noReset] != "nat dead=" {
		t.Errorf("coming back, order %v: want the reset gone before the datapath", k.log)
	}
}

// A late line (a round under way had no answer in time) gets no new flows
// and keeps everything else: its routes, its share of the multipath
// route, its NAT, its flows and their conntrack entries. When every
// serving line is late, they all keep their new flows (no fallback event).
func TestLateLineKeepsItsFlows(t *testing.T) {
	k := newFake()
	a := fakeAgent(t, twoLines, k)
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	routes := slices.Clone(k.routes.RouteSet)
	k.log = nil
	a.lines[0].Late = true
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	if i := index(k.log, "datapath dsl1=late,dsl2=live"); i < 0 {
		t.Errorf("log %v: want dsl1 late in the datapath, dsl2 live", k.log)
	}
	nat := 0
	for _, e := range k.log {
		if strings.HasPrefix(e, "nat dead=") {
			nat++
			if e != "nat dead=" {
				t.Errorf("log %v: want no TCP reset for a late line", k.log)
			}
		}
	}
	if nat == 0 {
		t.Errorf("log %v: NAT not applied", k.log)
	}
	if i := index(k.log, "flush"); i >= 0 {
		t.Errorf("log %v: a late line's conntrack entries were flushed", k.log)
	}
	if !slices.EqualFunc(routes, k.routes.RouteSet, func(a, b plan.Route) bool { return a.Key() == b.Key() && fmt.Sprint(a) == fmt.Sprint(b) }) {
		t.Errorf("routes changed for a late line:\nbefore %v\nafter  %v", routes, k.routes.RouteSet)
	}

	k.log = nil
	a.lines[1].Late = true
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	if i := index(k.log, "datapath dsl1=live,dsl2=live"); i < 0 || a.allDown {
		t.Errorf("log %v (all down %v): want both late lines kept in use, no fallback", k.log, a.allDown)
	}
	for _, e := range a.Events() {
		if e.Kind == events.AllDown {
			t.Errorf("event %+v for lines that are only late", e)
		}
	}
}

// Every line failing its probes: the lines in use before stay in use.
func TestAllLinesDownKeepsTheLast(t *testing.T) {
	k := newFake()
	a := fakeAgent(t, twoLines, k)
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	for i := range a.lines {
		a.lines[i].Healthy = false
	}
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	last := k.synced[len(k.synced)-1]
	if !last[0].Usable() || !last[1].Usable() || !a.allDown {
		t.Errorf("every line down: datapath got %+v, want both kept in use", last)
	}
	if got := a.Events(); got[len(got)-1].Kind != events.AllDown {
		t.Errorf("last event %+v, want all-down", got[len(got)-1])
	}
}

// Reordered lines keep their numbers (datapath index, marks, tables) once
// an agent has run with them.
func TestReorderKeepsNumbers(t *testing.T) {
	k := newFake()
	dir := t.TempDir()
	c, err := config.Parse("unit.yaml", []byte(twoLines+"state_dir: "+dir+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if err := writeSlots(dir, c.Slots()); err != nil {
		t.Fatal(err)
	}
	reordered := `lan: {interfaces: [lan0]}
uplinks:
  - {name: dsl2, interface: wan2, gateway: 198.51.100.17}
  - {name: dsl1, interface: wan1, gateway: 198.51.100.1}
datapath: {pin_dir: /sys/fs/bpf/uplinkd-unit-test-unused}
`
	c2, err := config.Parse("unit.yaml", []byte(reordered+"state_dir: "+dir+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	a, err := newAgent(c2, k, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range a.Lines() {
		want := map[string]int{"dsl1": 0, "dsl2": 1}[l.Name]
		if l.Index != want || l.Table != 201+want || l.Mark != uint32(want+1)<<24 {
			t.Errorf("%s after reorder: index %d table %d mark %#x", l.Name, l.Index, l.Table, l.Mark)
		}
	}
}

// A reload that drops a LAN interface takes the datapath off it at once; a
// reload that removes a line does so for the line's interface.
func TestReloadDetachesWhatItDrops(t *testing.T) {
	k := newFake()
	k.addrs["lan1"] = []netip.Prefix{netip.MustParsePrefix("192.0.2.129/25")}
	a := fakeAgent(t, strings.Replace(twoLines, "[lan0]", "[lan0, lan1]", 1), k)
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	k.log = nil
	next := strings.Replace(twoLines, "  - {name: dsl2, interface: wan2, gateway: 198.51.100.17}\n", "", 1)
	c, err := config.Parse("unit.yaml", []byte(next+"state_dir: "+a.cfg.StateDir+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.reconfigure(c); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"detach wan2", "detach lan1"} {
		if !slices.Contains(k.log, want) {
			t.Errorf("log %v lacks %q", k.log, want)
		}
	}
	if slices.Contains(k.log, "detach lan0") || slices.Contains(k.log, "detach wan1") {
		t.Errorf("log %v: an interface still in use was detached", k.log)
	}
}

// A flow map that evicts is reported at once, then at most once a
// minute and only when it evicted more; the status shows its use.
func TestFlowMapFullIsReportedRateLimited(t *testing.T) {
	k := newFake()
	a := fakeAgent(t, twoLines, k)
	count := func() int {
		n := 0
		for _, e := range a.Events() {
			if e.Kind == events.FlowMapFull {
				n++
			}
		}
		return n
	}
	now := time.Now()
	k.flowMap = loader.FlowMapUse{Capacity: 1024, Inserted: 1000}
	a.checkFlowMap(now)
	if count() != 0 {
		t.Fatal("a map that never evicted reported full")
	}
	k.flowMap = loader.FlowMapUse{Capacity: 1024, Inserted: 7024, EvictedAtLeast: 6000}
	a.checkFlowMap(now)
	if count() != 1 {
		t.Fatalf("%d flow-map-full events after 6000 evictions, want 1", count())
	}
	if e := a.Events()[len(a.Events())-1]; e.Fields["evicted_at_least"] != "6000" || e.Fields["capacity"] != "1024" {
		t.Errorf("event fields %v", e.Fields)
	}
	k.flowMap.EvictedAtLeast = 9000
	a.checkFlowMap(now.Add(30 * time.Second))
	if count() != 1 {
		t.Error("reported again within a minute")
	}
	a.checkFlowMap(now.Add(61 * time.Second))
	if count() != 2 {
		t.Error("not reported again after a minute of more evictions")
	}
	a.checkFlowMap(now.Add(200 * time.Second))
	if count() != 2 {
		t.Error("reported again without new evictions")
	}
	if st := a.status(); st.FlowMap.EvictedAtLeast != 9000 || st.FlowMap.Capacity != 1024 {
		t.Errorf("status flow map %+v", st.FlowMap)
	}
}

// The scope kept in the state dir widens where the agent looks for its
// own rules and routes, but never to the kernel's own tables or
// priorities, whatever the file says.
func TestSavedScopeTrustsOnlyOurNumbers(t *testing.T) {
	dir := t.TempDir()
	if err := statefile.Prepare(dir); err != nil {
		t.Fatal(err)
	}
	if s, err := savedScope(dir); err != nil || len(s.Tables) != 0 {
		t.Fatalf("no scope file: %+v, %v", s, err)
	}
	if err := writeScope(dir, plan.Scope{Priorities: map[int]bool{150: true}, Tables: map[int]bool{301: true}}); err != nil {
		t.Fatal(err)
	}
	if s, err := savedScope(dir); err != nil || !s.Tables[301] || !s.Priorities[150] {
		t.Fatalf("saved scope read back as %+v, %v", s, err)
	}
	for _, bad := range []plan.Scope{
		{Tables: map[int]bool{254: true}},
		{Tables: map[int]bool{0: true}},
		{Priorities: map[int]bool{32766: true}},
		{Priorities: map[int]bool{0: true}},
	} {
		if err := writeScope(dir, bad); err != nil {
			t.Fatal(err)
		}
		if s, err := savedScope(dir); err == nil {
			t.Errorf("scope %+v accepted as %+v", bad, s)
		}
	}
}

// A link message without IFF_LOWER_UP is a carrier loss, acted on at
// once; one with it, or another message, is not.
func TestNoCarrier(t *testing.T) {
	msg := func(flags uint32) []byte {
		return (&nl.IfInfomsg{IfInfomsg: unix.IfInfomsg{Family: unix.AF_UNSPEC, Flags: flags}}).Serialize()
	}
	for _, tc := range []struct {
		typ  uint16
		data []byte
		want bool
	}{
		{unix.RTM_NEWLINK, msg(unix.IFF_UP), true},
		{unix.RTM_NEWLINK, msg(unix.IFF_UP | unix.IFF_LOWER_UP), false},
		{unix.RTM_NEWADDR, msg(unix.IFF_UP), false},
		{unix.RTM_NEWLINK, nil, false},
	} {
		if got := noCarrier(tc.typ, tc.data); got != tc.want {
			t.Errorf("noCarrier(%d, flags of %x) = %v, want %v", tc.typ, tc.data, got, tc.want)
		}
	}
}

// In an HA pair: the agent is master while the LAN VIP is here. Becoming
// master flushes the synced connections of a line that does not serve
// here (by its VIP), and only those; a takeover is counted.
func TestHATakeoverFlushesOnlyDeadLines(t *testing.T) {
	k := newFake()
	k.addrs["lan0"] = []netip.Prefix{netip.MustParsePrefix("192.0.2.3/24")}
	a := fakeAgent(t, haPair, k)
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	if a.ha.role != RoleStandby {
		t.Fatalf("role %q without the LAN VIP, want standby", a.ha.role)
	}
	a.lines[0].Healthy = false // dsl1 dead here (by its probes)
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	if slices.Contains(k.log, "flush 198.51.100.4") {
		t.Fatalf("log %v: the standby flushed the master's connections (dsl1's VIP)", k.log)
	}
	k.log = nil
	k.addrs["lan0"] = append(k.addrs["lan0"], netip.MustParsePrefix("192.0.2.1/24"))
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	if a.ha.role != RoleMaster || a.ha.takeovers != 1 || a.ha.pending {
		t.Errorf("after the VIP came: role %q, %d takeovers, pending %v; want master, 1, false", a.ha.role, a.ha.takeovers, a.ha.pending)
	}
	var flushed []string
	for _, e := range k.log {
		if strings.HasPrefix(e, "flush ") {
			flushed = append(flushed, e)
		}
	}
	if !slices.Equal(flushed, []string{"flush 198.51.100.4"}) {
		t.Errorf("flushed %v at the takeover, want only dsl1's VIP", flushed)
	}
	k.log = nil
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	if i := index(k.log, "flush 198.51.100.4"); i >= 0 {
		t.Errorf("log %v: flushed again after the takeover", k.log)
	}
}

// An ex-master's pins are stale (the peer forwarded meanwhile): becoming
// standby, at start too, empties the flow map once the datapath is
// synced, and again only at the next demotion; a failed clear is tried
// again. A master keeps its pins.
func TestHAStandbyClearsFlows(t *testing.T) {
	k := newFake()
	k.addrs["lan0"] = []netip.Prefix{netip.MustParsePrefix("192.0.2.3/24"), netip.MustParsePrefix("192.0.2.1/24")}
	a := fakeAgent(t, haPair, k)
	apply := func(what string, wantClears int) {
		t.Helper()
		k.log = nil
		_, _ = a.Apply()
		clears := 0
		for i, e := range k.log {
			if e == "clear flows" {
				clears++
				if i == 0 || !strings.HasPrefix(k.log[i-1], "datapath ") {
					t.Errorf("%s: log %v: flows cleared before the datapath was synced", what, k.log)
				}
			}
		}
		if clears != wantClears {
			t.Errorf("%s: log %v: %d clears, want %d", what, k.log, clears, wantClears)
		}
	}
	apply("master at start", 0)
	k.addrs["lan0"] = k.addrs["lan0"][:1]
	apply("demoted", 1)
	apply("standby", 0)
	k.addrs["lan0"] = append(k.addrs["lan0"], netip.MustParsePrefix("192.0.2.1/24"))
	apply("master again", 0)
	k.addrs["lan0"] = k.addrs["lan0"][:1]
	k.clearErr = errors.New("boom")
	apply("demoted, the clear fails", 1)
	k.clearErr = nil
	apply("the failed clear again", 1)
	apply("standby", 0)

	b := fakeAgent(t, haPair, newFake())
	b.k.(*fakeKernel).addrs["lan0"] = []netip.Prefix{netip.MustParsePrefix("192.0.2.3/24")}
	if _, err := b.Apply(); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(b.k.(*fakeKernel).log, "clear flows") {
		t.Errorf("standby at start: log %v, want its flows cleared", b.k.(*fakeKernel).log)
	}
}

// reloadWith gives a running fake agent a new config text (its state dir
// kept).
func reloadWith(t *testing.T, a *Agent, text string) {
	t.Helper()
	c, err := config.Parse("unit.yaml", []byte(text+"state_dir: "+a.cfg.StateDir+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.reconfigure(c); err != nil {
		t.Fatal(err)
	}
}

// A reload that removes the ha block makes a single gateway: it is no
// master for the conntrackd resync, and a clear still pending (it failed)
// is dropped; one that adds the block back while the LAN VIP is here
// makes it master again, resyncing.
func TestHABlockRemovedAndBack(t *testing.T) {
	k := newFake()
	k.addrs["lan0"] = []netip.Prefix{netip.MustParsePrefix("192.0.2.3/24")}
	k.clearErr = errors.New("boom")
	a := fakeAgent(t, haPair, k)
	_, _ = a.Apply() // standby; its clear fails
	k.clearErr = nil
	single := strings.Replace(haPair, "ha: {sync_interface: sync0, address: 203.0.113.249, peer: 203.0.113.250, lan_vip: 192.0.2.1/24}\n", "", 1)
	single = strings.NewReplacer(", vip: 198.51.100.4/28", "", ", vip: 198.51.100.20/28", "").Replace(single)
	if strings.Contains(single, "ha:") || strings.Contains(single, "vip") {
		t.Fatalf("not a single gateway's config:\n%s", single)
	}
	k.addrs["lan0"] = append(k.addrs["lan0"], netip.MustParsePrefix("192.0.2.1/24"))
	if _, err := a.Apply(); err != nil || a.ha.role != RoleMaster || a.ha.takeovers != 1 {
		t.Fatalf("the LAN VIP came: role %q, %d takeovers, %v", a.ha.role, a.ha.takeovers, err)
	}
	reloadWith(t, a, single)
	k.log = nil
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	if slices.Contains(k.log, "clear flows") {
		t.Errorf("log %v: a single gateway emptied its flow map", k.log)
	}
	if a.ha.master.Load() {
		t.Error("a single gateway holding the address counts as master for the resync")
	}
	reloadWith(t, a, haPair)
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	if a.ha.role != RoleMaster || !a.ha.master.Load() {
		t.Errorf("ha block back with the LAN VIP here: role %q, master for the resync %v; want master, true", a.ha.role, a.ha.master.Load())
	}
	if a.ha.takeovers != 1 {
		t.Errorf("%d takeovers after a reload, want still 1", a.ha.takeovers)
	}
}

// A clear that fails does not fail the Apply (a standby starting would
// refuse to run): it is tried again at the next one.
func TestHAFailedClearDoesNotFailApply(t *testing.T) {
	k := newFake()
	k.addrs["lan0"] = []netip.Prefix{netip.MustParsePrefix("192.0.2.3/24")}
	k.clearErr = errors.New("boom")
	a := fakeAgent(t, haPair, k)
	if _, err := a.Apply(); err != nil {
		t.Errorf("the first Apply failed with the clear: %v", err)
	}
}

// oneSysctl answers every sysctl with one value.
type oneSysctl string

func (o oneSysctl) Get(string) (string, error) { return string(o), nil }
func (o oneSysctl) Set(string, string) error   { return nil }

// The master has conntrackd send its connections to the peer every third
// of the UDP stream timeout (3 s here: every second), not before it is
// master; with conntrackd gone, every failure is counted and one event
// made.
func TestResyncConntrack(t *testing.T) {
	k := newFake()
	k.addrs["lan0"] = []netip.Prefix{netip.MustParsePrefix("192.0.2.3/24")}
	a := fakeAgent(t, haPair, k)
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	sock := ha.ConntrackdSocket(a.cfg.StateDir)
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var reqs []uint32
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			b := make([]byte, 4)
			if _, err := io.ReadFull(c, b); err == nil {
				mu.Lock()
				reqs = append(reqs, binary.NativeEndian.Uint32(b))
				mu.Unlock()
			}
			c.Close()
		}
	}()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go a.resyncConntrack(ctx, sock, oneSysctl("3"))
	time.Sleep(1500 * time.Millisecond)
	mu.Lock()
	if len(reqs) > 0 {
		t.Errorf("a standby resynced: %v", reqs)
	}
	mu.Unlock()
	k.addrs["lan0"] = append(k.addrs["lan0"], netip.MustParsePrefix("192.0.2.1/24"))
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3500 * time.Millisecond)
	st := a.status().HA
	mu.Lock()
	got := slices.Clone(reqs)
	mu.Unlock()
	// One resync may be under way: conntrackd got it, the status not yet.
	if st.ResyncEverySeconds != 1 || st.Resyncs < 2 || st.ResyncErrors > 0 || len(got) < int(st.Resyncs) || len(got) > int(st.Resyncs)+1 {
		t.Errorf("as master for 3.5 s: status %+v, conntrackd got %v; want a resync a second, each one -B (22)", st, got)
	}
	for _, r := range got {
		if r != 22 {
			t.Errorf("conntrackd got request %d before the tenth resync, want only -B (22)", r)
		}
	}
	l.Close()
	time.Sleep(3500 * time.Millisecond)
	st = a.status().HA
	if st.ResyncErrors < 2 || st.ResyncError == "" || a.events.CountKind(events.HAResyncFailed) != 1 {
		t.Errorf("without conntrackd for 3.5 s: status %+v, %d ha-resync-failed events; want failures counted, one event",
			st, a.events.CountKind(events.HAResyncFailed))
	}
}

// keepalived's track script (uplinkd ha check) fails while the agent is
// starting (unless it starts on the master: a restart must not hand the
// VIPs over), and on the master while a line's VIP is missing; a standby
// does not hold them.
func TestHACheck(t *testing.T) {
	k := newFake()
	k.addrs["lan0"] = []netip.Prefix{netip.MustParsePrefix("192.0.2.3/24")}
	k.addrs["wan1"] = []netip.Prefix{netip.MustParsePrefix("198.51.100.2/28"), netip.MustParsePrefix("198.51.100.4/28")}
	k.addrs["wan2"] = []netip.Prefix{netip.MustParsePrefix("198.51.100.18/28"), netip.MustParsePrefix("198.51.100.20/28")}
	a := fakeAgent(t, haPair, k)
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	a.started = now
	check := func(a *Agent, what string, at time.Time, wantErr string) {
		t.Helper()
		r := a.controlHACheck(at)
		if (wantErr == "") != (r.Error == "") || !strings.Contains(r.Error, wantErr) {
			t.Errorf("%s: %+v, want error %q", what, r, wantErr)
		}
	}
	check(a, "standby, just started", now.Add(time.Second), "starting")
	check(a, "standby, ready", now.Add(ha.ReadyAfter(a.cfg)), "")
	k.addrs["lan0"] = append(k.addrs["lan0"], netip.MustParsePrefix("192.0.2.1/24"))
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	check(a, "became master while starting", now.Add(time.Second), "")
	check(a, "master", now.Add(time.Minute), "")
	a.lines[1].Carrier = false
	check(a, "dsl2 without carrier", now.Add(time.Minute), "dsl2 has no carrier")
	a.lines[1].Up = false
	check(a, "dsl2 without carrier, taken down by the operator", now.Add(time.Minute), "")
	a.lines[1].Carrier, a.lines[1].Up = true, true
	k.addrs["wan2"] = k.addrs["wan2"][:1]
	check(a, "master without dsl2's VIP", now.Add(time.Minute), "dsl2's VIP")
	k.addrs["lan0"] = k.addrs["lan0"][:1]
	if _, err := a.Apply(); err != nil {
		t.Fatal(err)
	}
	check(a, "standby without the VIPs", now.Add(time.Minute), "")

	k.addrs["lan0"] = append(k.addrs["lan0"], netip.MustParsePrefix("192.0.2.1/24"))
	k.addrs["wan2"] = append(k.addrs["wan2"], netip.MustParsePrefix("198.51.100.20/28"))
	b := fakeAgent(t, haPair, k)
	if _, err := b.Apply(); err != nil {
		t.Fatal(err)
	}
	b.started = now
	check(b, "started on the master", now.Add(100*time.Millisecond), "")
}

// On the master, a line that stops serving keeps its VIP's connections
// for vipFlushGrace: the failing check hands the VIPs to the peer, which
// may carry the line, and conntrackd would pass a flush on. Still master
// after it, the line still down: they go. Demoted before: they stay.
func TestHAMasterDefersVIPFlush(t *testing.T) {
	for _, demote := range []bool{false, true} {
		k := newFake()
		k.addrs["lan0"] = []netip.Prefix{netip.MustParsePrefix("192.0.2.3/24"), netip.MustParsePrefix("192.0.2.1/24")}
		a := fakeAgent(t, haPair, k)
		if _, err := a.Apply(); err != nil {
			t.Fatal(err)
		}
		a.lines[0].Healthy = false // dsl1 down by its probes
		k.log = nil
		if _, err := a.Apply(); err != nil {
			t.Fatal(err)
		}
		if slices.Contains(k.log, "flush 198.51.100.4") || !slices.Contains(k.log, "flush 198.51.100.2") {
			t.Errorf("dsl1 down on the master: log %v, want its own address flushed, not its VIP yet", k.log)
		}
		if demote {
			k.addrs["lan0"] = k.addrs["lan0"][:1]
		}
		a.ha.vipFlush["dsl1"] = time.Now().Add(-time.Millisecond) // the grace is over
		k.log = nil
		if _, err := a.Apply(); err != nil {
			t.Fatal(err)
		}
		if got := slices.Contains(k.log, "flush 198.51.100.4"); got == demote {
			t.Errorf("demoted %v, grace over: log %v, VIP flushed %v", demote, k.log, got)
		}
		if len(a.ha.vipFlush) != 0 {
			t.Errorf("demoted %v: flushes still pending: %v", demote, a.ha.vipFlush)
		}
	}
}
