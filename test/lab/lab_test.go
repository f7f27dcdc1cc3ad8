// SPDX-License-Identifier: Apache-2.0

package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

// newLab builds a lab for t, or skips t when this machine cannot.
func newLab(t *testing.T, opts Options) *Lab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	l, err := New(opts)
	if err != nil {
		if errors.Is(err, os.ErrPermission) { // e.g. a container without CAP_SYS_ADMIN
			t.Skipf("cannot create network namespaces here: %v", err)
		}
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return l
}

// eventually retries f up to n times, a bounded way to wait for ARP etc.
func eventually(n int, f func() error) (err error) {
	for range n {
		if err = f(); err == nil {
			return nil
		}
	}
	return err
}

func labNamespaces(t *testing.T, prefix string) []string {
	t.Helper()
	ents, err := os.ReadDir(NetnsDir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefix+"-") {
			out = append(out, e.Name())
		}
	}
	return out
}

func TestTopology(t *testing.T) {
	t.Parallel()
	l := newLab(t, Options{Clients: 2, ISPs: 3})

	want := []string{l.Prefix + "-gw", l.Prefix + "-sw", l.Prefix + "-c1", l.Prefix + "-c2",
		l.Prefix + "-isp1", l.Prefix + "-isp2", l.Prefix + "-isp3", l.Prefix + "-srv"}
	got := labNamespaces(t, l.Prefix)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("namespaces = %v, want %v", got, want)
	}
	if !Exists(l.Prefix) {
		t.Errorf("Exists(%q) = false", l.Prefix)
	}
	if ps, err := List(); err != nil || !slices.Contains(ps, l.Prefix) {
		t.Errorf("List() = %v, %v; want it to contain %q", ps, err, l.Prefix)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := l.Gateway.Run(ctx, "ip", "-o", "-4", "addr", "show")
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{"192.0.2.1/24", "198.51.100.2/28", "198.51.100.18/28", "198.51.100.34/28"} {
		if !strings.Contains(out, a) {
			t.Errorf("gateway lacks %s:\n%s", a, out)
		}
	}
	if out, _ := l.Gateway.Run(ctx, "ip", "route", "show", "default"); strings.TrimSpace(out) != "" {
		t.Errorf("gateway has a default route: %s", out)
	}

	for i, u := range l.Lines {
		if err := eventually(3, func() error { return Ping(l.Gateway, u.Gateway, time.Second) }); err != nil {
			t.Errorf("gateway → ISP %d: %v", i+1, err)
		}
		if err := eventually(3, func() error { return Ping(l.ISPs[i], l.ServerAddrs[0], time.Second) }); err != nil {
			t.Errorf("ISP %d → server: %v", i+1, err)
		}
	}
	for i, c := range l.Clients {
		if err := eventually(3, func() error { return Ping(c, l.LANAddress.Addr(), time.Second) }); err != nil {
			t.Errorf("client %d → gateway: %v", i+1, err)
		}
	}
	// Without an agent, client traffic goes nowhere.
	if err := Ping(l.Clients[0], l.ServerAddrs[0], 500*time.Millisecond); err == nil {
		t.Error("client reached the server through an unconfigured gateway")
	}

	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if left := labNamespaces(t, l.Prefix); len(left) != 0 {
		t.Errorf("namespaces left after Close: %v", left)
	}
	if err := l.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if Exists(l.Prefix) {
		t.Errorf("Exists(%q) after Close", l.Prefix)
	}
}

func TestGatewayLineAndFaults(t *testing.T) {
	t.Parallel()
	l := newLab(t, Options{})
	u := l.Lines[0]
	srv := netip.AddrPortFrom(l.ServerAddrs[0], 7007)

	es, err := StartEchoServer(l.Server, srv.Addr(), srv.Port())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { es.Close() })

	nh, err := l.Gateway.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	wan, err := nh.LinkByName(u.Interface)
	if err != nil {
		t.Fatal(err)
	}
	if err := nh.RouteAdd(&netlink.Route{LinkIndex: wan.Attrs().Index, Gw: u.Gateway.AsSlice()}); err != nil {
		t.Fatalf("adding default route: %v", err)
	}

	c, seen, err := DialTCP(l.Gateway, srv, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if seen.Addr() != u.Address.Addr() {
		t.Errorf("server saw %s, want %s", seen, u.Address.Addr())
	}
	if _, err := c.Write([]byte("hello\n")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 6)
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hello\n" {
		t.Errorf("echo = %q, %v", buf, err)
	}
	c.Close()

	flow, err := OpenUDPFlow(l.Gateway, srv)
	if err != nil {
		t.Fatal(err)
	}
	defer flow.Close()
	for i := range 3 {
		seen, err := flow.Query([]byte{'q', byte('0' + i)}, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if seen != netip.AddrPortFrom(u.Address.Addr(), flow.LocalAddr().Port()) {
			t.Errorf("UDP query %d: server saw %s, local is %s", i, seen, flow.LocalAddr())
		}
	}
	if got := len(es.Peers()); got != 2 {
		t.Errorf("server saw %d peers (%v), want 2 (one TCP, one UDP flow)", got, es.Peers())
	}

	gwLink := func() netlink.Link {
		t.Helper()
		wl, err := nh.LinkByName(u.Interface)
		if err != nil {
			t.Fatal(err)
		}
		return wl
	}

	// Carrier.
	if err := l.SetCarrier(1, false); err != nil {
		t.Fatal(err)
	}
	// Linux reports the veth end as "down" (not "lowerlayerdown") here.
	if wl := gwLink(); HasCarrier(wl) || wl.Attrs().OperState == netlink.OperUp {
		t.Errorf("after SetCarrier(1,false): carrier=%v operstate=%s", HasCarrier(wl), wl.Attrs().OperState)
	}
	if err := l.SetCarrier(1, true); err != nil {
		t.Fatal(err)
	}
	if wl := gwLink(); !HasCarrier(wl) || wl.Attrs().OperState != netlink.OperUp {
		t.Errorf("after SetCarrier(1,true): carrier=%v operstate=%s", HasCarrier(wl), wl.Attrs().OperState)
	}
	if err := eventually(3, func() error { return Ping(l.Gateway, u.Gateway, time.Second) }); err != nil {
		t.Errorf("ISP 1 after carrier restored: %v", err)
	}

	// Silent ISP.
	if err := l.SetGatewaySilent(1, true); err != nil {
		t.Fatal(err)
	}
	if err := Ping(l.Gateway, u.Gateway, time.Second); err == nil {
		t.Error("ISP 1 answered while silent")
	}
	if !HasCarrier(gwLink()) {
		t.Error("wan1 lost carrier while ISP 1 is silent")
	}
	if err := l.SetGatewaySilent(1, true); err != nil { // idempotent
		t.Fatal(err)
	}
	if err := l.SetGatewaySilent(1, false); err != nil {
		t.Fatal(err)
	}
	if err := eventually(3, func() error { return Ping(l.Gateway, u.Gateway, time.Second) }); err != nil {
		t.Errorf("ISP 1 after silence lifted: %v", err)
	}

	// Loss beyond the ISP.
	if err := l.SetLossBeyond(1, 100); err != nil {
		t.Fatal(err)
	}
	if err := Ping(l.Gateway, srv.Addr(), time.Second); err == nil {
		t.Error("server reachable through ISP 1 with 100% loss beyond it")
	}
	if _, err := flow.Query([]byte("lost"), 500*time.Millisecond); err == nil {
		t.Error("UDP query answered with 100% loss beyond ISP 1")
	}
	if err := Ping(l.Gateway, u.Gateway, time.Second); err != nil {
		t.Errorf("ISP 1 router unreachable with loss beyond it: %v", err)
	}
	if err := l.SetLossBeyond(1, 0); err != nil {
		t.Fatal(err)
	}
	if err := l.SetLossBeyond(1, 0); err != nil { // idempotent
		t.Fatal(err)
	}
	if err := eventually(3, func() error { return Ping(l.Gateway, srv.Addr(), time.Second) }); err != nil {
		t.Errorf("server after loss removed: %v", err)
	}
	if _, err := flow.Query([]byte("back"), 2*time.Second); err != nil {
		t.Errorf("UDP flow after loss removed: %v", err)
	}

	// Loss on the line itself, towards the gateway: at 100% nothing of
	// the ISP reaches it, carrier up.
	if err := l.SetLoss(1, 100); err != nil {
		t.Fatal(err)
	}
	if err := Ping(l.Gateway, u.Gateway, time.Second); err == nil {
		t.Error("ISP 1 router answered with 100% loss on the line")
	}
	if !HasCarrier(gwLink()) {
		t.Error("wan1 lost carrier with loss on the line")
	}
	if err := l.SetLoss(1, 0); err != nil {
		t.Fatal(err)
	}
	if err := eventually(3, func() error { return Ping(l.Gateway, u.Gateway, time.Second) }); err != nil {
		t.Errorf("ISP 1 router after line loss removed: %v", err)
	}
}

// DialTCPTOS's packets carry the DSCP asked for, the SYN included (where a
// gateway classifies a new flow), and DialTCP's do not: the server counts
// them by DSCP (nftables). ISP 1's router dials, it routes to the server
// without a gateway. LineOf names the line of a line's address.
func TestDialTCPTOS(t *testing.T) {
	t.Parallel()
	l := newLab(t, Options{ISPs: 1})
	if n := l.LineOf(l.Lines[0].Address.Addr()); n != 1 {
		t.Errorf("LineOf(line 1's address) = %d, want 1", n)
	}
	if n := l.LineOf(l.ServerAddrs[0]); n != 0 {
		t.Errorf("LineOf(a server address) = %d, want 0", n)
	}
	srv := netip.AddrPortFrom(l.ServerAddrs[0], 7008)
	es, err := StartEchoServer(l.Server, srv.Addr(), srv.Port())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { es.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := l.Server.Run(ctx, "nft", "add table inet dscp; "+
		"add chain inet dscp c { type filter hook input priority 0; }; "+
		"add rule inet dscp c tcp dport 7008 tcp flags syn ip dscp ef counter comment \"ef-syn\"; "+
		"add rule inet dscp c tcp dport 7008 ip dscp ef counter comment \"ef\"; "+
		"add rule inet dscp c tcp dport 7008 ip dscp != ef counter comment \"other\""); err != nil {
		t.Fatal(err, out)
	}
	counts := func() map[string]int {
		out, err := l.Server.Run(ctx, "nft", "list", "table", "inet", "dscp")
		if err != nil {
			t.Fatal(err)
		}
		m := map[string]int{}
		for _, line := range strings.Split(out, "\n") {
			var n int
			if i := strings.Index(line, "counter packets "); i >= 0 {
				fmt.Sscanf(line[i+len("counter packets "):], "%d", &n)
				if j := strings.Index(line, `comment "`); j >= 0 {
					m[strings.TrimSuffix(line[j+len(`comment "`):], `"`)] = n
				}
			}
		}
		return m
	}

	c, _, err := eventuallyDial(func() (net.Conn, netip.AddrPort, error) { return DialTCP(l.ISPs[0], srv, 2*time.Second) })
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if m := counts(); m["ef"] != 0 || m["other"] == 0 {
		t.Fatalf("DialTCP: counters %v, want no packet with DSCP ef and some without", m)
	}
	const ef = 46 << 2
	c, _, err = DialTCPTOS(l.ISPs[0], srv, ef, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if m := counts(); m["ef-syn"] != 1 || m["ef"] < 2 {
		t.Errorf("DialTCPTOS(ef): counters %v, want its SYN and its other packets with DSCP ef", m)
	}
}

// eventuallyDial retries dial a few times (the first one may wait for ARP).
func eventuallyDial(dial func() (net.Conn, netip.AddrPort, error)) (c net.Conn, seen netip.AddrPort, err error) {
	err = eventually(3, func() (err error) {
		c, seen, err = dial()
		return err
	})
	return c, seen, err
}

// TestParallelLabs builds two labs at once; their prefixes must differ and
// both must work.
func TestParallelLabs(t *testing.T) {
	t.Parallel()
	a := newLab(t, Options{ISPs: 1})
	b := newLab(t, Options{ISPs: 1})
	if a.Prefix == b.Prefix {
		t.Fatalf("two labs share prefix %q", a.Prefix)
	}
	for _, l := range []*Lab{a, b} {
		if err := eventually(3, func() error { return Ping(l.Gateway, l.Lines[0].Gateway, time.Second) }); err != nil {
			t.Errorf("%s: %v", l.Prefix, err)
		}
	}
}

func TestRemoveAndOptions(t *testing.T) {
	t.Parallel()
	if err := Remove(""); err == nil {
		t.Error("Remove(\"\") succeeded")
	}
	for _, o := range []Options{{ISPs: 17}, {Clients: 17}, {Servers: -1}, {Prefix: "bad/name"}} {
		if _, err := New(o); err == nil {
			t.Errorf("New(%+v) succeeded", o)
		}
	}
	l := newLab(t, Options{})
	if _, err := New(Options{Prefix: l.Prefix}); err == nil {
		t.Error("second lab with the same prefix was built")
	}
	if err := Remove(l.Prefix); err != nil {
		t.Fatal(err)
	}
	if left := labNamespaces(t, l.Prefix); len(left) != 0 {
		t.Errorf("namespaces left after Remove: %v", left)
	}
}

// TestDoLeavesNoThreadBehind checks that after many Do calls every OS
// thread the scheduler hands out is still in the original namespace.
func TestDoLeavesNoThreadBehind(t *testing.T) {
	l := newLab(t, Options{ISPs: 1})
	home, err := os.Readlink("/proc/thread-self/ns/net")
	if err != nil {
		t.Skip(err)
	}
	for range 50 {
		if err := l.Server.Do(func() error { return nil }); err != nil {
			t.Fatal(err)
		}
		if err := Ping(l.Gateway, l.Lines[0].Gateway, time.Second); err != nil {
			t.Fatal(err)
		}
	}
	results := make(chan string, 20)
	for range cap(results) {
		go func() {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			ns, _ := os.Readlink("/proc/thread-self/ns/net")
			time.Sleep(5 * time.Millisecond) // keep the thread busy so others are used
			results <- ns
		}()
	}
	for range cap(results) {
		if ns := <-results; ns != home {
			t.Errorf("a thread is in %s, want %s", ns, home)
		}
	}
}

// The HA lab: two gateways on the LAN bridge and on each line's bridge, a
// sync link between them, every segment reachable; a hard failure takes
// a gateway off every segment and Revive brings it back.
func TestHATopology(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	t.Parallel()
	hl, err := NewHA(HAOptions{Clients: 2})
	if err != nil {
		t.Fatalf("NewHA: %v", err)
	}
	t.Cleanup(func() {
		if err := hl.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	want := []string{"c1", "c2", "gw1", "gw2", "isp1", "isp2", "srv", "sw"}
	for i := range want {
		want[i] = hl.Prefix + "-" + want[i]
	}
	if got := labNamespaces(t, hl.Prefix); !slices.Equal(got, want) {
		t.Fatalf("namespaces = %v, want %v", got, want)
	}
	g1, g2 := hl.Gateways[0], hl.Gateways[1]
	reach := func(from *Host, to netip.Addr) error {
		return eventually(3, func() error { return Ping(from, to, time.Second) })
	}
	for _, g := range hl.Gateways {
		if err := reach(g.Host, hl.Other(g).SyncAddress); err != nil {
			t.Errorf("sync link: %v", err)
		}
		for i, u := range g.Lines {
			if err := reach(g.Host, u.Gateway); err != nil {
				t.Errorf("%s → ISP %d: %v", g.Name, i+1, err)
			}
			if err := reach(g.Host, hl.Other(g).Lines[i].Address.Addr()); err != nil {
				t.Errorf("%s → the other gateway on line %d: %v", g.Name, i+1, err)
			}
		}
		for _, c := range hl.Clients {
			if err := reach(c, g.LANAddress.Addr()); err != nil {
				t.Errorf("client → %s: %v", g.Name, err)
			}
		}
	}
	for i, isp := range hl.ISPs {
		if err := reach(isp, hl.ServerAddrs[0]); err != nil {
			t.Errorf("ISP %d → server: %v", i+1, err)
		}
	}
	if hl.HasVIP(g1) || hl.HasVIP(g2) {
		t.Error("a gateway holds the LAN VIP without keepalived")
	}

	if _, err := hl.HardFail(g1); err != nil {
		t.Fatalf("HardFail: %v", err)
	}
	if err := Ping(g2.Host, g1.SyncAddress, 300*time.Millisecond); err == nil {
		t.Error("gw1 answers on the sync link after its hard failure")
	}
	if err := g1.Revive(); err != nil {
		t.Fatalf("Revive: %v", err)
	}
	if err := reach(g2.Host, g1.SyncAddress); err != nil {
		t.Errorf("sync link after Revive: %v", err)
	}
	if err := reach(g1.Host, g1.Lines[0].Gateway); err != nil {
		t.Errorf("gw1 → ISP 1 after Revive: %v", err)
	}

	if err := hl.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if left := labNamespaces(t, hl.Prefix); len(left) != 0 {
		t.Errorf("namespaces left after Close: %v", left)
	}
}
