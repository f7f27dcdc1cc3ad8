// SPDX-License-Identifier: Apache-2.0

package plan

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/uplinkd/uplinkd/control/config"
)

const seedYAML = `lan:
  interfaces: [lan0]
uplinks:
  - name: dsl1
    interface: wan1
    gateway: 198.51.100.1
    address: 198.51.100.2/28
  - name: dsl2
    interface: wan2
    gateway: 198.51.100.17
`

// fakeIfs is a kernel with fixed interfaces and addresses.
type fakeIfs map[string][]netip.Prefix

func (f fakeIfs) Addrs(name string) ([]netip.Prefix, error) {
	a, ok := f[name]
	if !ok {
		return nil, ErrNoInterface
	}
	return a, nil
}

var labIfs = fakeIfs{
	"lan0": {netip.MustParsePrefix("192.0.2.1/24")},
	"wan1": {netip.MustParsePrefix("198.51.100.2/28")},
	"wan2": {netip.MustParsePrefix("198.51.100.18/28")},
}

func seedState(t *testing.T) State {
	t.Helper()
	c, err := config.Parse("seed.yaml", []byte(seedYAML))
	if err != nil {
		t.Fatal(err)
	}
	lines, err := Resolve(c, labIfs)
	if err != nil {
		t.Fatal(err)
	}
	return Build(c, lines)
}

// The rendered plan is the seed's section 2.3 listing, plus what the
// datapath needs (fwmark rules) and what uplinkd adds for ownership
// (proto tag) and safety (suppress_prefixlength instead of deleting
// main's default route).
func TestRenderSeed(t *testing.T) {
	var b strings.Builder
	Render(&b, seedState(t), 85)
	got := b.String()
	for _, want := range []string{
		"ip rule add prio 50 lookup main suppress_prefixlength 0 proto 85",
		"ip rule add prio 101 fwmark 0x1000000/0x1f000000 lookup 201 proto 85",
		"ip rule add prio 102 fwmark 0x2000000/0x1f000000 lookup 202 proto 85",
		"ip rule add prio 201 from 198.51.100.0/28 lookup 201 proto 85",
		"ip rule add prio 202 from 198.51.100.16/28 lookup 202 proto 85",
		"ip rule add prio 222 lookup 222 proto 85",
		"ip route replace default via 198.51.100.1 dev wan1 src 198.51.100.2 proto 85 table 201",
		"ip route replace prohibit default metric 1 proto 85 table 201",
		"ip route replace default via 198.51.100.17 dev wan2 src 198.51.100.18 proto 85 table 202",
		"ip route replace prohibit default metric 1 proto 85 table 202",
		"ip route replace default proto 85 table 222 \\\n    nexthop via 198.51.100.1 dev wan1 weight 1 \\\n    nexthop via 198.51.100.17 dev wan2 weight 1",
		"sysctl -w net.ipv4.ip_forward=1",
		"sysctl -w net.ipv4.fib_multipath_hash_policy=3",
		"sysctl -w net.ipv4.fib_multipath_hash_fields=0x37",
		"sysctl -w net.ipv4.conf.wan1.rp_filter=2",
		"sysctl -w net.ipv4.conf.wan2.ignore_routes_with_linkdown=1",
		"table inet uplinkd {",
		`iifname "lan0" oifname "wan1" counter masquerade comment "uplinkd: NAT for dsl1 [`,
		`iifname "wan2" oifname "lan0" counter drop comment`,
		"ct state established,related counter accept",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("plan lacks %q\nplan:\n%s", want, got)
		}
	}
	// Routes before rules, so no rule points to an empty table.
	if strings.Index(got, "ip route") > strings.Index(got, "ip rule") {
		t.Error("rules are printed before routes")
	}
}

func TestResolveErrors(t *testing.T) {
	c, err := config.Parse("seed.yaml", []byte(seedYAML))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		ifs  fakeIfs
		want string
	}{
		{"missing interface", fakeIfs{"lan0": nil, "wan1": labIfs["wan1"]}, "seed.yaml:9: uplinks[1].interface: wan2: no such interface"},
		{"missing lan", fakeIfs{"wan1": labIfs["wan1"], "wan2": labIfs["wan2"]}, "seed.yaml:2: lan.interfaces[0]: lan0: no such interface"},
		{"configured address not assigned", fakeIfs{"lan0": nil, "wan1": {netip.MustParsePrefix("198.51.100.3/28")}, "wan2": labIfs["wan2"]}, "seed.yaml:7: uplinks[0].address: 198.51.100.2/28 is not assigned to wan1"},
		{"gateway outside the interface's subnets", fakeIfs{"lan0": nil, "wan1": labIfs["wan1"], "wan2": {netip.MustParsePrefix("203.0.113.2/24")}}, "seed.yaml:10: uplinks[1].gateway: 198.51.100.17 is outside the subnets of wan2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Resolve(c, tc.ifs)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v; want %q", err, tc.want)
			}
			var fe *config.FieldError
			if !errors.As(err, &fe) {
				t.Errorf("error is not a FieldError: %T", err)
			}
		})
	}
}

func TestBuildLineWithoutAddress(t *testing.T) {
	c, err := config.Parse("seed.yaml", []byte(seedYAML))
	if err != nil {
		t.Fatal(err)
	}
	lines, err := Resolve(c, labIfs)
	if err != nil {
		t.Fatal(err)
	}
	lines[1].Address = netip.Prefix{} // DHCP lease lost
	s := Build(c, lines)
	for _, r := range s.Routes {
		if r.Table == 202 && r.Type == Unicast {
			t.Errorf("line without address keeps its default route: %+v", r)
		}
		if r.Table == 222 && len(r.Nexthops) != 1 {
			t.Errorf("multipath still has %d nexthops", len(r.Nexthops))
		}
	}
	var prohibit bool
	for _, r := range s.Routes {
		prohibit = prohibit || r.Table == 202 && r.Type == Prohibit
	}
	if !prohibit {
		t.Error("line without address lost its prohibit route: its traffic would leave by another line")
	}
}

func TestRouteEqualIgnoresSingleNexthopWeight(t *testing.T) {
	a := Route{Table: 1, Dst: defaultRoute4, Nexthops: []Nexthop{{Gateway: netip.MustParseAddr("192.0.2.1"), Device: "x", Weight: 4}}}
	b := a
	b.Nexthops = []Nexthop{{Gateway: netip.MustParseAddr("192.0.2.1"), Device: "x", Weight: 1}}
	if !a.Equal(b) {
		t.Error("a single nexthop's weight is not kept by the kernel and must not cause a diff")
	}
	b.Nexthops = append(b.Nexthops, b.Nexthops[0])
	if a.Equal(b) {
		t.Error("different nexthop counts compare equal")
	}
}

func TestSysctlName(t *testing.T) {
	s := Sysctl{Path: "net/ipv4/conf/eth0.100/rp_filter"}
	if got := s.Name(); got != "net.ipv4.conf.eth0/100.rp_filter" {
		t.Errorf("Name() = %q", got)
	}
}

// In an HA pair each line NATs to its VIP, not to the gateway's own
// address, and new TCP from a line that is not a SYN is dropped (the
// takeover race); a single gateway has neither.
func TestBuildHAPair(t *testing.T) {
	const pair = `lan: {interfaces: [lan0]}
nat: snat
uplinks:
  - {name: dsl1, interface: wan1, gateway: 198.51.100.1, address: 198.51.100.2/28, vip: 198.51.100.4/28}
  - {name: dsl2, interface: wan2, gateway: 198.51.100.17, address: 198.51.100.18/28, vip: 198.51.100.20/28}
ha: {sync_interface: sync0, address: 203.0.113.249, peer: 203.0.113.250, lan_vip: 192.0.2.1/24}
`
	c, err := config.Parse("pair.yaml", []byte(pair))
	if err != nil {
		t.Fatal(err)
	}
	lines, err := Resolve(c, labIfs)
	if err != nil {
		t.Fatal(err)
	}
	script := NFTScript(Build(c, lines).NAT)
	for _, want := range []string{
		`iifname "lan0" oifname "wan1" counter snat ip to 198.51.100.4`,
		`iifname "lan0" oifname "wan2" counter snat ip to 198.51.100.20`,
		`iifname "wan1" ct state new tcp flags != syn / syn,ack counter drop`,
		`iifname "wan2" ct state new tcp flags != syn / syn,ack counter drop`,
		`iifname "lan0" ct state new tcp flags != syn / syn,ack counter drop`,
	} {
		if !strings.Contains(script, want) {
			t.Errorf("nft script lacks %q:\n%s", want, script)
		}
	}
	if strings.Contains(script, "snat ip to 198.51.100.2 ") || strings.Contains(script, "snat ip to 198.51.100.18 ") {
		t.Errorf("NAT to a gateway's own address in an HA pair:\n%s", script)
	}
	if single := NFTScript(seedState(t).NAT); strings.Contains(single, "syn,ack") {
		t.Errorf("a single gateway got the HA guard:\n%s", single)
	}
}
