// SPDX-License-Identifier: Apache-2.0

package nat

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/google/nftables"

	"github.com/uplinkd/uplinkd/control/plan"
	"github.com/uplinkd/uplinkd/test/lab"
)

// gateway returns an nftables connection into a fresh lab gateway.
func gateway(t *testing.T) (*nftables.Conn, *lab.Lab) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a network namespace")
	}
	l, err := lab.New(lab.Options{ISPs: 2})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	ns, err := l.Gateway.NetNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		t.Fatal(err)
	}
	return c, l
}

var handles = regexp.MustCompile(`counter packets \d+ bytes \d+`)

// The expressions uplinkd builds are the rules plan prints: `nft list`
// shows each rule's Text and Comment.
func TestApplyMatchesPlan(t *testing.T) {
	c, l := gateway(t)
	for _, n := range []plan.NAT{
		{Table: "uplinkd", Mode: "masquerade", LAN: []string{"lan0"}, Firewall: true,
			Lines: []plan.NATLine{{Line: "dsl1", Interface: "wan1"}, {Line: "dsl2", Interface: "wan2"}},
			Dead:  []plan.DeadLine{{Line: "dsl2", Mark: 0x2000000, Mask: 0x1f000000}}},
		{Table: "uplinkd", Mode: "snat", LAN: []string{"lan0"},
			Lines: []plan.NATLine{{Line: "dsl1", Interface: "wan1", Address: netip.MustParseAddr("198.51.100.2")}}},
		{Table: "uplinkd", Mode: "snat", LAN: []string{"lan0"}, HAGuard: true,
			Lines: []plan.NATLine{{Line: "dsl1", Interface: "wan1", Address: netip.MustParseAddr("198.51.100.4")}}},
	} {
		changed, err := Apply(c, n)
		if err != nil || !changed {
			t.Fatalf("Apply = %v, %v", changed, err)
		}
		out, err := l.Gateway.Run(context.Background(), "nft", "list", "table", "inet", "uplinkd")
		if err != nil {
			t.Fatal(err)
		}
		out = handles.ReplaceAllString(out, "counter")
		for _, r := range plan.NFTRules(n) {
			want := r.Text() + ` comment "` + r.Comment() + `"`
			if !strings.Contains(out, want) {
				t.Errorf("nft list lacks %q:\n%s", want, out)
			}
		}
		if changed, err := Apply(c, n); err != nil || changed {
			t.Errorf("second Apply = %v, %v; want no change", changed, err)
		}
	}
	if err := Remove(c, "uplinkd"); err != nil {
		t.Fatal(err)
	}
	if err := Remove(c, "uplinkd"); err != nil {
		t.Errorf("second Remove: %v", err)
	}
	if out, _ := l.Gateway.Run(context.Background(), "nft", "list", "ruleset"); strings.TrimSpace(out) != "" {
		t.Errorf("ruleset after Remove:\n%s", out)
	}
}

// A rule someone edited or deleted in uplinkd's table is noticed and the
// table is rebuilt.
func TestApplyRepairsTable(t *testing.T) {
	c, l := gateway(t)
	n := plan.NAT{Table: "uplinkd", Mode: "masquerade", LAN: []string{"lan0"}, Firewall: true,
		Lines: []plan.NATLine{{Line: "dsl1", Interface: "wan1"}}}
	if _, err := Apply(c, n); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Gateway.Run(context.Background(), "nft", "flush", "chain", "inet", "uplinkd", "forward"); err != nil {
		t.Fatal(err)
	}
	if changed, err := Apply(c, n); err != nil || !changed {
		t.Errorf("Apply after a flush = %v, %v; want the table rebuilt", changed, err)
	}
	if changed, _ := Apply(c, n); changed {
		t.Error("third Apply changed the table again")
	}
}

// A table of uplinkd's name that uplinkd did not create (the host's
// firewall, say, with routing.nft_table: filter) is neither replaced nor
// deleted, and the error names it.
func TestForeignTableUntouched(t *testing.T) {
	c, l := gateway(t)
	ctx := context.Background()
	for _, cmd := range [][]string{
		{"nft", "add", "table", "inet", "filter"},
		{"nft", "add", "chain", "inet", "filter", "input", "{ type filter hook input priority 0; policy accept; }"},
		{"nft", "add", "rule", "inet", "filter", "input", "tcp", "dport", "22", "accept", "comment", `"the host's ssh"`},
	} {
		if _, err := l.Gateway.Run(ctx, cmd[0], cmd[1:]...); err != nil {
			t.Fatal(err)
		}
	}
	before, _ := l.Gateway.Run(ctx, "nft", "list", "ruleset")
	n := plan.NAT{Table: "filter", Mode: "masquerade", LAN: []string{"lan0"}, Lines: []plan.NATLine{{Line: "dsl1", Interface: "wan1"}}}
	if _, err := Apply(c, n); !errors.Is(err, ErrNotOurs) || !strings.Contains(err.Error(), "inet filter") {
		t.Errorf("Apply = %v, want ErrNotOurs naming inet filter", err)
	}
	if err := Remove(c, "filter"); !errors.Is(err, ErrNotOurs) {
		t.Errorf("Remove = %v, want ErrNotOurs", err)
	}
	if err := CheckOwned(c, "filter"); !errors.Is(err, ErrNotOurs) {
		t.Errorf("CheckOwned = %v, want ErrNotOurs", err)
	}
	if err := ProbeReject(c, "filter"); err != nil {
		t.Errorf("ProbeReject: %v", err)
	}
	if after, _ := l.Gateway.Run(ctx, "nft", "list", "ruleset"); after != before {
		t.Errorf("ruleset changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}
