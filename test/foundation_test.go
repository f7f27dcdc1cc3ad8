// SPDX-License-Identifier: Apache-2.0

package test

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	uagent "github.com/uplinkd/uplinkd/control/agent"
	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/events"
	"github.com/uplinkd/uplinkd/test/lab"
)

// The seed's two-line config applied in the lab gives the seed's `ip rule`
// listing and route tables, with uplinkd's additions (fwmark rules for the
// datapath, proto tag, suppress_prefixlength), and `ip route get from
// IPEn` leaves by line n.
func TestSeedLayout(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	startAgent(t, l, writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state})))

	rules := gw(t, l, "ip", "-4", "rule", "show")
	want := `0:	from all lookup local
50:	from all lookup main suppress_prefixlength 0 proto 85
101:	from all fwmark 0x1000000/0x1f000000 lookup 201 proto 85
102:	from all fwmark 0x2000000/0x1f000000 lookup 202 proto 85
201:	from 198.51.100.0/28 lookup 201 proto 85
202:	from 198.51.100.16/28 lookup 202 proto 85
222:	from all lookup 222 proto 85
32766:	from all lookup main
32767:	from all lookup default
`
	if rules != want {
		t.Errorf("ip rule:\n%s\nwant:\n%s", rules, want)
	}
	for table, want := range map[string]string{
		"201": "default via 198.51.100.1 dev wan1 proto 85 src 198.51.100.2 \nprohibit default proto 85 metric 1 \n",
		"202": "default via 198.51.100.17 dev wan2 proto 85 src 198.51.100.18 \nprohibit default proto 85 metric 1 \n",
		"222": "default proto 85 \n\tnexthop via 198.51.100.1 dev wan1 weight 1 \n\tnexthop via 198.51.100.17 dev wan2 weight 1 \n",
	} {
		if got := gw(t, l, "ip", "route", "list", "table", table); got != want {
			t.Errorf("ip route list table %s:\n%q\nwant:\n%q", table, got, want)
		}
	}
	if got := gw(t, l, "ip", "route", "list", "table", "main"); strings.Contains(got, "default") {
		t.Errorf("a default route in main:\n%s", got)
	}
	server := l.ServerAddrs[0].String()
	for _, u := range l.Lines {
		got := gw(t, l, "ip", "route", "get", "from", u.Address.Addr().String(), "to", server)
		if !strings.Contains(got, "via "+u.Gateway.String()+" dev "+u.Interface) {
			t.Errorf("ip route get from %s to %s: %s; want via %s dev %s", u.Address.Addr(), server, got, u.Gateway, u.Interface)
		}
	}
}

// Many connections from the clients reach the server through both lines,
// and the server sees each line's own address (NAT works: the server has
// no route back to the LAN).
func TestNATBothLines(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{Clients: 2})
	startAgent(t, l, writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state})))
	srv := echoServer(t, l)

	lines := map[netip.Addr]string{}
	for _, u := range l.Lines {
		lines[u.Address.Addr()] = u.Name
	}
	const n = 100
	per := map[string]int{}
	for i := range n {
		c, seen, err := lab.DialTCP(l.Clients[i%2], srv.Addr, 2*time.Second)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		c.Close()
		name, ok := lines[seen.Addr()]
		if !ok {
			t.Fatalf("server saw source %s, not a line's address", seen)
		}
		per[name]++
	}
	// 100 flows hashed over two equal lines: each gets at least 25 with
	// probability 1 - 2e-7.
	for _, u := range l.Lines {
		if per[u.Name] < 25 {
			t.Errorf("line %s carried %d of %d connections: %v", u.Name, per[u.Name], n, per)
		}
	}
	// UDP too, each flow keeping its source.
	f, err := lab.OpenUDPFlow(l.Clients[0], srv.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	first, err := f.Query([]byte("a"), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := lines[first.Addr()]; !ok {
		t.Errorf("UDP: server saw %s", first)
	}
	for range 5 {
		again, err := f.Query([]byte("b"), 2*time.Second)
		if err != nil || again != first {
			t.Fatalf("UDP flow moved: %v then %v (%v)", first, again, err)
		}
	}
}

// Apply twice: the second changes nothing. Down: the gateway is exactly
// as before, and a rule, a route and an nftables table that are not
// uplinkd's survive apply and down.
func TestIdempotentAndDown(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	// Someone else's objects, including a main default route that the
	// seed would have deleted and uplinkd must leave alone.
	gw(t, l, "ip", "rule", "add", "prio", "150", "from", "192.0.2.77", "lookup", "77")
	gw(t, l, "ip", "route", "add", "default", "via", "198.51.100.1", "table", "77")
	gw(t, l, "ip", "route", "add", "default", "via", "198.51.100.17")
	gw(t, l, "nft", "add table inet other; add chain inet other c { type filter hook forward priority 10; }; add rule inet other c counter")
	gw(t, l, "sysctl", "-qw", "net.ipv4.conf.wan1.rp_filter=1")
	before := snapshot(t, l, "wan1", "wan2")

	file := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state}))
	cfg, err := config.Load(file)
	if err != nil {
		t.Fatal(err)
	}
	env := gatewayEnv(t, l)
	defer env.Close()
	ag, err := uagent.NewAgent(cfg, env, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer ag.Close()
	rep, err := ag.Apply()
	if err != nil || !rep.Changed() {
		t.Fatalf("first apply: %v %v", rep, err)
	}
	applied := snapshot(t, l, "wan1", "wan2")
	rep, err = ag.Apply()
	if err != nil || rep.Changed() {
		t.Errorf("second apply changed something: %v %v", rep, err)
	}
	if again := snapshot(t, l, "wan1", "wan2"); again != applied {
		t.Errorf("second apply changed the kernel:\n%s\nthen:\n%s", applied, again)
	}
	for _, foreign := range []string{"150:\tfrom 192.0.2.77 lookup 77", "default via 198.51.100.1 dev wan1 table 77", "table inet other"} {
		if !strings.Contains(applied, foreign) {
			t.Errorf("applying removed someone else's %q", foreign)
		}
	}

	if _, err := os.Stat(l.PinDir()); err != nil {
		t.Errorf("the datapath is not pinned: %v", err)
	}
	gw(t, l, uplinkd, "down", "-c", file)
	if after := snapshot(t, l, "wan1", "wan2"); after != before {
		t.Errorf("after apply and down:\n%s\nwant as before:\n%s", after, before)
	}
	if _, err := os.Stat(l.PinDir()); !os.IsNotExist(err) {
		t.Errorf("pins left after down: %v", err)
	}

	// The same through the agent process: run, SIGTERM, down.
	t.Run("run then down", func(t *testing.T) {
		startAgent(t, l, file)
	})
	if after := snapshot(t, l, "wan1", "wan2"); after != before {
		t.Errorf("after run and down:\n%s\nwant as before:\n%s", after, before)
	}
}

// Each bad config gets one clear error naming file, line and field, exit
// status 2, and the kernel is untouched.
func TestBadConfigTouchesNothing(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	rep := faults(t, l, "bad configs to run and plan")
	before := snapshot(t, l, "wan1", "wan2")
	good := l.Config(lab.ConfigOptions{StateDir: state})
	for _, tc := range []struct{ name, cfg, want string }{
		{"unknown key", good + "colour: blue\n", ": colour: unknown key"},
		{"duplicate name", strings.Replace(good, "name: dsl2", "name: dsl1", 1), `uplinks[1].name: "dsl1" is also the name of uplinks[0]`},
		{"duplicate table", strings.Replace(good, "    gateway: 198.51.100.1\n", "    gateway: 198.51.100.1\n    table: 202\n", 1), "table (routing.table_base + its number) 202 is also the table of uplinks[0]"},
		{"duplicate mark", strings.Replace(good, "    gateway: 198.51.100.17\n", "    gateway: 198.51.100.17\n    mark: 0x1000000\n", 1), "uplinks[1].mark: mark 0x1000000 is also the mark of uplinks[0]"},
		{"gateway outside subnet", strings.Replace(good, "gateway: 198.51.100.17", "gateway: 203.0.113.9", 1), "uplinks[1].gateway: 203.0.113.9 is outside the subnets of wan2"},
		{"missing interface", strings.Replace(good, "interface: wan2", "interface: wan9", 1), "uplinks[1].interface: wan9: no such interface"},
		{"weight out of range", strings.Replace(good, "    gateway: 198.51.100.1\n", "    gateway: 198.51.100.1\n    weight: 300\n", 1), "uplinks[0].weight: want 1..255, got 300"},
		{"malformed", "lan: [\n", "malformed YAML"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := writeConfig(t, tc.cfg)
			for _, cmd := range []string{"run", "plan"} {
				rep.BadInputs++
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				out, err := l.Gateway.Command(ctx, uplinkd, cmd, "-c", f).CombinedOutput()
				cancel()
				var ee *exec.ExitError
				if !errors.As(err, &ee) || ee.ExitCode() != 2 {
					t.Errorf("%s: exit %v, want status 2\n%s", cmd, err, out)
				}
				if !strings.Contains(string(out), f+":") || !strings.Contains(string(out), tc.want) {
					t.Errorf("%s: output\n%s\nwant the file name and %q", cmd, out, tc.want)
				}
			}
		})
	}
	if after := snapshot(t, l, "wan1", "wan2"); after != before {
		rep.ForeignTouched++
		t.Errorf("a bad config changed the kernel:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// The running agent restores a rule and a route someone deleted, and
// follows a line's address when it changes (DHCP-like), without restart.
func TestRunRestoresAndFollows(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	a := startAgent(t, l, writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state})))

	gw(t, l, "ip", "rule", "del", "prio", "222")
	eventually(t, "rule 222 restored", func() bool {
		return strings.Contains(gw(t, l, "ip", "rule", "show", "prio", "222"), "lookup 222")
	})
	a.waitEvent(t, 1, events.Restored, "")
	gw(t, l, "ip", "route", "del", "default", "table", "201")
	eventually(t, "route in table 201 restored", func() bool {
		return strings.Contains(gw(t, l, "ip", "route", "show", "table", "201"), "default via 198.51.100.1")
	})

	// Line 2 is renumbered inside its ISP's subnet, as a DHCP client does
	// with a new lease: the old address goes, the new one comes.
	gw(t, l, "ip", "addr", "del", "198.51.100.18/28", "dev", "wan2")
	gw(t, l, "ip", "addr", "add", "198.51.100.20/28", "dev", "wan2")
	eventually(t, "table 202 uses the new address", func() bool {
		return strings.Contains(gw(t, l, "ip", "route", "show", "table", "202"), "src 198.51.100.20")
	})
	srv := echoServer(t, l)
	seen := map[netip.Addr]bool{}
	for range 40 {
		c, s, err := lab.DialTCP(l.Clients[0], srv.Addr, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		seen[s.Addr()] = true
	}
	if !seen[netip.MustParseAddr("198.51.100.20")] || seen[netip.MustParseAddr("198.51.100.18")] {
		t.Errorf("after the address change the server saw %v", seen)
	}
}
