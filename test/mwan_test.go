// SPDX-License-Identifier: Apache-2.0

package test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/uplinkd/uplinkd/test/lab"
)

// mwan is an mwan3-style way of spreading connections over the lines,
// added to a lab gateway next to an agent that runs without its datapath
// (which leaves the line tables, NAT per line and the multipath default):
// in prerouting on the LAN interface the connection's mark is restored
// from conntrack; a packet that has none (a new connection) gets a line's
// mark by weighted random choice, saved to conntrack; and a fwmark rule
// per line leads to the line's table. mwan3 does the same with iptables
// (CONNMARK --restore-mark, statistic --mode random, --save-mark) and
// `ip rule ... fwmark 0x100/0x3f00 lookup 1` at priorities 2001+; here the
// rules must come before uplinkd's multipath rule (222).
type mwan struct {
	l     *lab.Lab
	table bool     // its nftables table is in place
	marks []uint32 // per line
	prios []int    // per line whose rule is in place
}

const (
	mwanFamily   = "ip"
	mwanTable    = "uplinkd_bench_mwan" // not uplinkd's own table (inet uplinkd)
	mwanMask     = 0x3f00               // mwan3's default mark mask
	mwanPrioBase = 150                  // line n's rule at 150+n: after uplinkd's 50 and 10n, before 222
)

// add installs the mwan3-style setup in the lab's gateway: weights per
// line (as in the agent's config; nil: 1 each). The line tables are read
// from the agent's `from LINE-SUBNET` rules, so the agent must have
// applied its config. remove takes out what it installed, also when it
// failed halfway.
func (m *mwan) add(tb testing.TB, weights []int) {
	tb.Helper()
	l := m.l
	tables := lineTables(tb, l)
	var pick []string
	for i := range l.Lines {
		mark := uint32(i+1) << 8
		m.marks = append(m.marks, mark)
		w := 1
		if i < len(weights) {
			w = weights[i]
		}
		for range w {
			pick = append(pick, fmt.Sprintf("%d : %#x", len(pick), mark))
		}
	}
	script := fmt.Sprintf(`table %[1]s
delete table %[1]s
table %[1]s {
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		iifname %[2]q meta mark set ct mark and %#[3]x comment "restore the connection's line"
		iifname %[2]q meta mark and %#[3]x == 0 meta mark set numgen random mod %[4]d map { %[5]s } ct mark set meta mark comment "a new connection: a line by weight, saved"
	}
}
`, mwanFamily+" "+mwanTable, l.LANInterface, mwanMask, len(pick), strings.Join(pick, ", "))
	nftApply(tb, l.Gateway, script)
	m.table = true
	for i := range l.Lines {
		prio := mwanPrioBase + i + 1
		gw(tb, l, "ip", "rule", "add", "prio", fmt.Sprint(prio),
			"fwmark", fmt.Sprintf("%#x/%#x", m.marks[i], mwanMask), "lookup", fmt.Sprint(tables[i]))
		m.prios = append(m.prios, prio)
	}
}

// remove deletes the rules and the nftables table add installed, and
// only those; errors are reported, not fatal (it runs in defers).
func (m *mwan) remove(tb testing.TB) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i, prio := range m.prios {
		if out, err := m.l.Gateway.Run(ctx, "ip", "rule", "del", "prio", fmt.Sprint(prio),
			"fwmark", fmt.Sprintf("%#x/%#x", m.marks[i], mwanMask)); err != nil {
			tb.Errorf("removing mwan rule: %v\n%s", err, out)
		}
	}
	m.prios = nil
	if !m.table {
		return
	}
	if out, err := m.l.Gateway.Run(ctx, "nft", "delete", "table", mwanFamily, mwanTable); err != nil {
		tb.Errorf("removing mwan table: %v\n%s", err, out)
	}
	m.table = false
}

// lineTables returns each line's routing table, from the agent's rule
// `from LINE-SUBNET lookup TABLE` in the gateway.
func lineTables(tb testing.TB, l *lab.Lab) []int {
	tb.Helper()
	h := netlinkIn(tb, l.Gateway)
	defer h.Close()
	rules, err := h.RuleList(unix.AF_INET)
	if err != nil {
		tb.Fatal(err)
	}
	var tables []int
	for _, u := range l.Lines {
		i := slices.IndexFunc(rules, func(r netlink.Rule) bool {
			return r.Src != nil && r.Src.String() == u.Address.Masked().String() && r.Table > 0
		})
		if i < 0 {
			tb.Fatalf("no rule from %s (line %s) in the gateway", u.Address.Masked(), u.Name)
		}
		tables = append(tables, rules[i].Table)
	}
	return tables
}

// usesEveryLine opens n UDP flows from the lab's first client to dst and
// fails the benchmark unless conntrack in the gateway shows them NAT'd to
// every line's address: M must be a real competitor, spreading
// connections as mwan3 does, not a single line.
func (m *mwan) usesEveryLine(tb testing.TB, dst netip.AddrPort, n int) {
	tb.Helper()
	ports := map[uint16]bool{}
	err := m.l.Clients[0].Do(func() error {
		for range n {
			c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(dst))
			if err != nil {
				return err
			}
			_, err = c.Write([]byte("mwan"))
			ports[uint16(c.LocalAddr().(*net.UDPAddr).Port)] = true
			c.Close()
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		tb.Fatal(err)
	}
	h := netlinkIn(tb, m.l.Gateway)
	defer h.Close()
	var perLine map[netip.Addr]int
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		flows, err := h.ConntrackTableList(netlink.ConntrackTable, unix.AF_INET)
		if err != nil {
			tb.Fatal(err)
		}
		perLine = map[netip.Addr]int{}
		seen := 0
		for _, f := range flows {
			if f.Forward.Protocol == unix.IPPROTO_UDP && f.Forward.DstPort == dst.Port() && ports[f.Forward.SrcPort] {
				seen++
				nat, _ := netip.AddrFromSlice(f.Reverse.DstIP.To4())
				perLine[nat]++
			}
		}
		if seen == n || time.Now().After(deadline) {
			break
		}
	}
	var counts []string
	missing := false
	for _, u := range m.l.Lines {
		c := perLine[u.Address.Addr()]
		counts = append(counts, fmt.Sprintf("%s %d", u.Name, c))
		missing = missing || c == 0
	}
	if missing {
		tb.Fatalf("M does not use every line: of %d new UDP flows, %s (NAT sources %v)", n, strings.Join(counts, ", "), perLine)
	}
	tb.Logf("M spreads %d new UDP flows: %s", n, strings.Join(counts, ", "))
}

// TestMwanEmulation checks the benchmark's M: it spreads new connections
// over every line, by the configured weights' map, and remove leaves the
// gateway as the agent had it.
func TestMwanEmulation(t *testing.T) {
	l, state := newLab(t, lab.Options{})
	startAgent(t, l, writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, NoDatapath: true})))
	before := snapshot(t, l)
	m := &mwan{l: l}
	defer m.remove(t)
	m.add(t, []int{1, 2})
	if nft := gw(t, l, "nft", "list", "table", mwanFamily, mwanTable); !strings.Contains(nft, "numgen random mod 3 map { 0 : 0x00000100, 1 : 0x00000200, 2 : 0x00000200 }") {
		t.Errorf("weights 1:2 not in the map:\n%s", nft)
	}
	m.usesEveryLine(t, netip.AddrPortFrom(l.ServerAddrs[0], 9), 32)
	m.remove(t)
	if after := snapshot(t, l); after != before {
		t.Errorf("remove left the gateway changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}
