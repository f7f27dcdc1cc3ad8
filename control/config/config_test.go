// SPDX-License-Identifier: Apache-2.0

package config

import (
	"fmt"
	"maps"
	"os"
	"strings"
	"testing"
	"unicode"
)

const seed = `lan:
  interfaces: [eth0]
uplinks:
  - name: dsl1
    interface: eth1
    gateway: 203.0.113.1
    address: 203.0.113.2/24
    weight: 4
  - name: dsl2
    interface: eth2
    gateway: 198.51.100.1
nat: masquerade
`

func TestParseSeedDefaults(t *testing.T) {
	c, err := Parse("seed.yaml", []byte(seed))
	if err != nil {
		t.Fatal(err)
	}
	r := c.Routing
	if r.MainPriority != 50 || r.SourcePriority != 200 || r.MultipathPriority != 222 || r.MultipathTable != 222 {
		t.Errorf("routing defaults are not the seed's: %+v", r)
	}
	u1, u2 := c.Lines[0], c.Lines[1]
	if u1.Table != 201 || u2.Table != 202 {
		t.Errorf("tables = %d, %d; want 201, 202", u1.Table, u2.Table)
	}
	if u1.Weight != 4 || u2.Weight != 1 {
		t.Errorf("weights = %d, %d; want 4, 1 (default)", u1.Weight, u2.Weight)
	}
	if u1.Mark != 0x01000000 || u2.Mark != 0x02000000 || u1.Mark&r.MarkMask != u1.Mark {
		t.Errorf("marks = %#x, %#x with mask %#x", u1.Mark, u2.Mark, r.MarkMask)
	}
	if u1.Prefix.String() != "203.0.113.2/24" || u2.Prefix.IsValid() {
		t.Errorf("prefixes = %v, %v", u1.Prefix, u2.Prefix)
	}
	if u1.GatewayAddr.String() != "203.0.113.1" {
		t.Errorf("gateway = %v", u1.GatewayAddr)
	}
	if c.NAT != "masquerade" || c.Firewall != "stateful" || c.StateDir != DefaultStateDir {
		t.Errorf("nat %q firewall %q state_dir %q", c.NAT, c.Firewall, c.StateDir)
	}
}

func TestParseOverrides(t *testing.T) {
	c, err := Parse("o.yaml", []byte(seed+`routing:
  main_priority: 10
  table_base: 100
  mark_mask: 0xf0
  protocol: 200
  nft_table: gw
state_dir: /tmp/x
`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Lines[0].Table != 101 || c.Lines[1].Mark != 0x20 || c.Routing.Protocol != 200 || c.Routing.NFTTable != "gw" || c.StateDir != "/tmp/x" {
		t.Errorf("overrides not applied: %+v %+v", c.Routing, c.Lines)
	}
}

// Each bad config gives one error naming the file, the line and the field.
func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		name, yaml string
		want       string // substring: "file:line: field: message"
	}{
		{"unknown top key", seed + "colour: blue\n", "bad.yaml:13: colour: unknown key"},
		{"unknown uplink key", strings.Replace(seed, "    weight: 4\n", "    wieght: 4\n", 1), "bad.yaml:8: uplinks[0].wieght: unknown key"},
		{"duplicate name", strings.Replace(seed, "name: dsl2", "name: dsl1", 1), `bad.yaml:9: uplinks[1].name: "dsl1" is also the name of uplinks[0]`},
		{"bad name", strings.Replace(seed, "name: dsl2", "name: DSL_2", 1), `bad.yaml:9: uplinks[1].name: want 1 to 15 characters`},
		{"duplicate table", strings.Replace(seed, "    weight: 4\n", "    weight: 4\n    table: 202\n", 1), "bad.yaml:10: uplinks[1]: its default table (routing.table_base + its number) 202 is also the table of uplinks[0]"},
		{"table is multipath", strings.Replace(seed, "    weight: 4\n", "    weight: 4\n    table: 222\n", 1), "uplinks[0].table: table 222 is also the multipath table"},
		{"duplicate mark", strings.Replace(seed, "    weight: 4\n", "    weight: 4\n    mark: 0x02000000\n", 1), "bad.yaml:10: uplinks[1]: its default mark (its number in routing.mark_mask) 0x2000000 is also the mark of uplinks[0]"},
		{"mark outside mask", strings.Replace(seed, "    weight: 4\n", "    weight: 4\n    mark: 0x5\n", 1), "bad.yaml:9: uplinks[0].mark: mark 0x5 does not fit in mark_mask"},
		{"gateway outside subnet", strings.Replace(seed, "gateway: 203.0.113.1", "gateway: 192.0.2.1", 1), "bad.yaml:6: uplinks[0].gateway: 192.0.2.1 is outside the line's subnet 203.0.113.0/24"},
		{"gateway not an address", strings.Replace(seed, "gateway: 203.0.113.1", "gateway: isp.example", 1), `bad.yaml:6: uplinks[0].gateway: want an IPv4 address, got "isp.example"`},
		{"missing gateway", strings.Replace(seed, "    gateway: 198.51.100.1\n", "", 1), "bad.yaml:9: uplinks[1].gateway: missing"},
		{"address without length", strings.Replace(seed, "203.0.113.2/24", "203.0.113.2", 1), "bad.yaml:7: uplinks[0].address: want an IPv4 address with prefix length"},
		{"weight too big", strings.Replace(seed, "weight: 4", "weight: 256", 1), "bad.yaml:8: uplinks[0].weight: want 1..255, got 256"},
		{"weight negative", strings.Replace(seed, "weight: 4", "weight: -1", 1), "bad.yaml:8: uplinks[0].weight: want 1..255, got -1"},
		{"weight zero", strings.Replace(seed, "weight: 4", "weight: 0", 1), "bad.yaml:8: uplinks[0].weight: want 1..255, got 0"},
		{"table not whole", strings.Replace(seed, "    weight: 4\n", "    weight: 4\n    table: 2.5\n", 1), `bad.yaml:9: uplinks[0].table: want a whole number, got "2.5"`},
		{"table zero", strings.Replace(seed, "    weight: 4\n", "    weight: 4\n    table: 0\n", 1), "bad.yaml:9: uplinks[0].table: table 0 is reserved or out of range"},
		{"table over 32 bits", strings.Replace(seed, "    weight: 4\n", "    weight: 4\n    table: 4294967296\n", 1), "bad.yaml:9: uplinks[0].table: table 4294967296 is reserved or out of range"},
		{"multipath table over 32 bits", seed + "routing:\n  multipath_table: 4294967518\n", "bad.yaml:14: routing.multipath_table: table 4294967518 is reserved or out of range"},
		{"table base over 32 bits", seed + "routing:\n  table_base: 4294967290\n", "bad.yaml:14: routing.table_base: want 0..4294967279"},
		{"priority over range", seed + "routing:\n  fwmark_priority: 32764\n", "bad.yaml:14: routing.fwmark_priority: want a priority in 1..32749, got 32764"},
		{"priority over 32 bits", seed + "routing:\n  main_priority: 4294967346\n", "bad.yaml:14: routing.main_priority: want a priority in 1..32765"},
		{"LAN interface twice", strings.Replace(seed, "[eth0]", "[eth0, eth0]", 1), "bad.yaml:2: lan.interfaces[1]: eth0 is listed twice"},
		{"second document", seed + "---\nnat: none\n", "bad.yaml:13: a second YAML document"},
		{"relative state dir", seed + "state_dir: run/uplinkd\n", `bad.yaml:13: state_dir: want an absolute path, got "run/uplinkd"`},
		{"enabled not a bool", seed + "datapath:\n  enabled: maybe\n", `bad.yaml:14: datapath.enabled: want true or false, got "maybe"`},
		{"broadcast gateway", strings.Replace(seed, "gateway: 198.51.100.1", "gateway: 255.255.255.255", 1), "bad.yaml:11: uplinks[1].gateway: 255.255.255.255 is not a unicast address"},
		{"subnet broadcast gateway", strings.Replace(seed, "gateway: 203.0.113.1", "gateway: 203.0.113.255", 1), "bad.yaml:6: uplinks[0].gateway: 203.0.113.255 is the network or broadcast address of 203.0.113.0/24"},
		{"multicast gateway", strings.Replace(seed, "gateway: 198.51.100.1", "gateway: 224.0.0.1", 1), "bad.yaml:11: uplinks[1].gateway: 224.0.0.1 is not a unicast address"},
		{"unspecified target", seed + "health:\n  targets: [0.0.0.0]\n", "bad.yaml:14: health.targets[0]: 0.0.0.0 is not a unicast address"},
		{"loopback target", seed + "health:\n  targets: [127.0.0.1]\n", "bad.yaml:14: health.targets[0]: 127.0.0.1 is not a unicast address"},
		{"broadcast target", seed + "health:\n  targets: [255.255.255.255]\n", "bad.yaml:14: health.targets[0]: 255.255.255.255 is not a unicast address"},
		{"multicast target", seed + "health:\n  targets: [239.1.1.1]\n", "bad.yaml:14: health.targets[0]: 239.1.1.1 is not a unicast address"},
		{"target twice", seed + "health:\n  targets: [192.0.2.9, 192.0.2.9]\n", "bad.yaml:14: health.targets[1]: 192.0.2.9 is listed twice"},
		{"gateway as target", seed + "health:\n  targets: [198.51.100.1]\n", "bad.yaml:14: health.targets[0]: 198.51.100.1 is the gateway of uplinks[1]: it is probed anyway"},
		{"weight not a number", strings.Replace(seed, "weight: 4", "weight: four", 1), `bad.yaml:8: uplinks[0].weight: want a whole number, got "four"`},
		{"bad nat", strings.Replace(seed, "nat: masquerade", "nat: yes-please", 1), `bad.yaml:12: nat: want masquerade, snat or none, got "yes-please"`},
		{"snat needs addresses", strings.Replace(seed, "nat: masquerade", "nat: snat", 1), "bad.yaml:9: uplinks[1].address: nat: snat needs each line's address"},
		{"same interface twice", strings.Replace(seed, "interface: eth2", "interface: eth1", 1), "bad.yaml:10: uplinks[1].interface: eth1 is also the interface of uplinks[0]"},
		{"uplink on the LAN", strings.Replace(seed, "interface: eth2", "interface: eth0", 1), "bad.yaml:10: uplinks[1].interface: eth0 is also a LAN interface"},
		{"no uplinks", "lan:\n  interfaces: [eth0]\nuplinks: []\n", "bad.yaml:3: uplinks: want 1 to 16 lines, got 0"},
		{"no lan", "uplinks:\n  - {name: a, interface: e1, gateway: 192.0.2.1}\n", "bad.yaml: lan.interfaces: at least one LAN interface is needed"},
		{"uplinks not a list", "lan: {interfaces: [eth0]}\nuplinks: dsl1\n", `bad.yaml:2: uplinks: want a list, got "dsl1"`},
		{"malformed yaml", "lan:\n  interfaces: [eth0\nuplinks:\n", "bad.yaml:1: malformed YAML"},
		{"duplicate key", seed + "nat: none\n", "bad.yaml:13: nat: duplicate key (first at line 12)"},
		{"priorities out of order", seed + "routing:\n  multipath_priority: 150\n", "bad.yaml:14: routing.multipath_priority: 150 must come after"},
		{"empty file", "", "bad.yaml: empty config"},
		{"bands too narrow for every line number", seed + "routing:\n  fwmark_priority: 100\n  source_priority: 110\n  multipath_priority: 300\n", "routing.source_priority: the source rules (111..126) overlap the fwmark rules (101..116)"},
		{"4-in-6 LAN subnet", strings.Replace(seed, "interfaces: [eth0]", "interfaces: [eth0]\n  subnets: [\"::ffff:10.0.0.0/104\"]", 1), "lan.subnets[0]: ::ffff:10.0.0.0/104 is IPv4 written as IPv6"},
		{"LAN subnet with host bits", strings.Replace(seed, "interfaces: [eth0]", "interfaces: [eth0]\n  subnets: [192.0.2.1/24]", 1), "lan.subnets[0]: 192.0.2.1/24 has host bits set"},
		{"dhcp's protocol", seed + "routing:\n  protocol: 16\n", "bad.yaml:14: routing.protocol: 16 is dhcp's (rtnetlink RTPROT_DHCP)"},
		{"bird's protocol", seed + "routing:\n  protocol: 12\n", "bad.yaml:14: routing.protocol: 12 is bird's"},
		{"kernel's protocol", seed + "routing:\n  protocol: 4\n", "bad.yaml:14: routing.protocol: want 5..255, got 4"},
		{"metrics listen without port", seed + "metrics:\n  listen: 127.0.0.1\n", `bad.yaml:14: metrics.listen: want host:port such as 127.0.0.1:9488, got "127.0.0.1"`},
		{"metrics listen port zero", seed + "metrics:\n  listen: 127.0.0.1:0\n", `bad.yaml:14: metrics.listen: want a port number 1..65535, got "0"`},
		{"metrics listen port too big", seed + "metrics:\n  listen: \"[::1]:65536\"\n", `bad.yaml:14: metrics.listen: want a port number 1..65535, got "65536"`},
		{"metrics listen port name", seed + "metrics:\n  listen: 127.0.0.1:http\n", `bad.yaml:14: metrics.listen: want a port number 1..65535, got "http"`},
		{"metrics listen host name", seed + "metrics:\n  listen: gw.example:9488\n", `bad.yaml:14: metrics.listen: want an IP address of this host (or none for every address) before the port, got "gw.example"`},
		{"metrics listen multicast", seed + "metrics:\n  listen: 224.0.0.1:9488\n", `bad.yaml:14: metrics.listen: want an IP address`},
		{"metrics listen a number", seed + "metrics:\n  listen: 9488\n", `bad.yaml:14: metrics.listen: want host:port`},
		{"metrics unknown key", seed + "metrics:\n  port: 9488\n", "bad.yaml:14: metrics.port: unknown key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("bad.yaml", []byte(tc.yaml))
			if err == nil {
				t.Fatalf("no error; want %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error:\n%v\nwant it to contain:\n%s", err, tc.want)
			}
			if n := strings.Count(err.Error(), "\n") + 1; n != 1 {
				t.Errorf("want one error, got %d:\n%v", n, err)
			}
		})
	}
}

// The metrics endpoint listens on loopback unless the config names
// another address; "" turns it off, and an empty value keeps the default.
func TestParseMetrics(t *testing.T) {
	for _, tc := range []struct{ add, want string }{
		{"", "127.0.0.1:9488"},
		{"metrics:\n", "127.0.0.1:9488"},
		{"metrics:\n  listen:\n", "127.0.0.1:9488"},
		{"metrics:\n  listen: \"\"\n", ""},
		{"metrics:\n  listen: 192.0.2.1:9100\n", "192.0.2.1:9100"},
		{"metrics:\n  listen: \"[::1]:9488\"\n", "[::1]:9488"},
		{"metrics:\n  listen: \":9488\"\n", ":9488"},
	} {
		c, err := Parse("m.yaml", []byte(seed+tc.add))
		if err != nil {
			t.Errorf("%q: %v", tc.add, err)
			continue
		}
		if c.Metrics.Listen != tc.want {
			t.Errorf("%q: metrics.listen = %q, want %q", tc.add, c.Metrics.Listen, tc.want)
		}
	}
	if d := Default(); d.Metrics.Listen != DefaultMetricsListen {
		t.Errorf("default metrics.listen %q", d.Metrics.Listen)
	}
}

func TestSeventeenLines(t *testing.T) {
	var b strings.Builder
	b.WriteString("lan: {interfaces: [eth0]}\nuplinks:\n")
	for i := range 17 {
		b.WriteString("  - {name: l" + string(rune('a'+i)) + ", interface: e" + string(rune('a'+i)) + ", gateway: 192.0.2.1}\n")
	}
	_, err := Parse("many.yaml", []byte(b.String()))
	if err == nil || !strings.Contains(err.Error(), "want 1 to 16 lines, got 17") {
		t.Fatalf("err = %v", err)
	}
}

func TestParseHealth(t *testing.T) {
	c, err := Parse("h.yaml", []byte(strings.Replace(seed, "    weight: 4\n", "    weight: 4\n    health:\n      gateway_probe: arp\n      targets: [192.0.2.7, 192.0.2.8]\n", 1)+`health:
  interval: 100ms
  timeout: 50ms
  down_after: 2
  targets: [198.51.100.200]
weights: adaptive
`))
	if err != nil {
		t.Fatal(err)
	}
	h := c.Health
	if h.Interval.Milliseconds() != 100 || h.Timeout.Milliseconds() != 50 || h.RetryInterval.Milliseconds() != 20 || h.DownAfter != 2 || h.UpAfter != 3 || c.Weights != WeightsAdaptive {
		t.Errorf("health %+v weights %q", h, c.Weights)
	}
	p1, p2 := c.Lines[0].Probe, c.Lines[1].Probe
	if p1.Gateway != ProbeARP || len(p1.Targets) != 2 || p1.MinTargets != 1 {
		t.Errorf("line 1 probe %+v: want arp, its own two targets, 1 must answer", p1)
	}
	if p2.Gateway != ProbeICMP || len(p2.Targets) != 1 || p2.Targets[0].String() != "198.51.100.200" || p2.MinTargets != 1 {
		t.Errorf("line 2 probe %+v: want the global block", p2)
	}
	d, err := Parse("d.yaml", []byte(seed))
	if err != nil {
		t.Fatal(err)
	}
	if p := d.Lines[0].Probe; p.Gateway != ProbeICMP || len(p.Targets) != 0 {
		t.Errorf("default probe %+v: want icmp to the gateway only", p)
	}
	n, err := Parse("n.yaml", []byte(seed+"health:\n  retry_interval: 0s\n"))
	if err != nil || n.Health.RetryInterval != 0 {
		t.Errorf("retry_interval 0 (no retries): %v, %v", err, n)
	}
}

func TestParseHealthErrors(t *testing.T) {
	for _, tc := range []struct{ add, want string }{
		{"health:\n  interval: soon\n", `bad.yaml:14: health.interval: want a duration such as 200ms, got "soon"`},
		{"health:\n  timeout: 1s\n", "bad.yaml:14: health.timeout: want more than 0 and at most the interval (200ms), got 1s"},
		{"health:\n  retry_interval: 110ms\n", "bad.yaml:14: health.retry_interval: want 0 (no retries) or 1ms..half the timeout (200ms), got 110ms"},
		{"health:\n  retry_interval: -1ms\n", "bad.yaml:14: health.retry_interval: want 0 (no retries) or 1ms..half the timeout (200ms), got -1ms"},
		{"health:\n  down_after: 0\n", "bad.yaml:14: health.down_after: want 1..100, got 0"},
		{"health:\n  gateway_probe: snmp\n", `bad.yaml:14: health.gateway_probe: want icmp, arp or none, got "snmp"`},
		{"health:\n  targets: [example.net]\n", `bad.yaml:14: health.targets[0]: want an IPv4 address, got "example.net"`},
		{"health:\n  targets: [192.0.2.9]\n  min_targets: 2\n", "bad.yaml:15: health.min_targets: want 0..1 (the number of targets), got 2"},
		{"health:\n  gateway_probe: none\n", "health.gateway_probe: none needs targets"},
		{"weights: dynamic\n", `bad.yaml:13: weights: want static or adaptive, got "dynamic"`},
	} {
		_, err := Parse("bad.yaml", []byte(seed+tc.add))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: err = %v; want %q", tc.add, err, tc.want)
		}
	}
}

func TestLoadRefusesHugeFile(t *testing.T) {
	f := t.TempDir() + "/big.yaml"
	big := seed + "# " + strings.Repeat("x", MaxFileSize) + "\n"
	if err := os.WriteFile(f, []byte(big), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load(f)
	if err == nil || !strings.Contains(err.Error(), f+": larger than 1048576 bytes") {
		t.Fatalf("err = %v", err)
	}
}

// A line keeps its number (and with it its default table and mark) by
// name: across a reorder, the removal of another line and the addition of
// a new one, which takes its position's number if free, else the lowest.
func TestRenumberFollowsNames(t *testing.T) {
	three := func(names ...string) *Config {
		var b strings.Builder
		b.WriteString("lan: {interfaces: [eth0]}\nuplinks:\n")
		for i, n := range names {
			fmt.Fprintf(&b, "  - {name: %s, interface: e%s, gateway: 192.0.2.%d}\n", n, n, i+1)
		}
		c, err := Parse("c.yaml", []byte(b.String()))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	first := three("a", "b", "c")
	slots := first.Slots()
	if slots["a"] != 1 || slots["b"] != 2 || slots["c"] != 3 {
		t.Fatalf("fresh numbers %v, want positions", slots)
	}
	for _, tc := range []struct {
		names []string
		want  Slots
	}{
		{[]string{"c", "a", "b"}, Slots{"a": 1, "b": 2, "c": 3}},              // reordered
		{[]string{"c", "b"}, Slots{"b": 2, "c": 3}},                           // a removed
		{[]string{"c", "d", "b"}, Slots{"b": 2, "c": 3, "d": 1}},              // d takes a's freed number
		{[]string{"a", "b", "c", "d"}, Slots{"a": 1, "b": 2, "c": 3, "d": 4}}, // d at its position
	} {
		c := three(tc.names...)
		if err := c.Renumber(slots); err != nil {
			t.Fatal(err)
		}
		if got := c.Slots(); !maps.Equal(got, tc.want) {
			t.Errorf("%v: numbers %v, want %v", tc.names, got, tc.want)
		}
		for _, u := range c.Lines {
			if u.Table != 200+u.Slot || u.Mark != uint32(u.Slot)<<24 {
				t.Errorf("%v: line %s number %d has table %d mark %#x", tc.names, u.Name, u.Slot, u.Table, u.Mark)
			}
		}
	}
	// An explicit table that a kept number's default now takes is a
	// collision, reported on the line.
	c, err := Parse("c.yaml", []byte("lan: {interfaces: [eth0]}\nuplinks:\n  - {name: b, interface: eb, gateway: 192.0.2.1, table: 203}\n  - {name: c, interface: ec, gateway: 192.0.2.2}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Renumber(slots); err == nil || !strings.Contains(err.Error(), "its default table (routing.table_base + its number) 203 is also the table of uplinks[0]") {
		t.Errorf("Renumber = %v, want the collision of c's table 203", err)
	}
}

// controlCharInputs put a newline into text that error messages repeat: a
// LAN interface, a line and a policy name listed in "unknown ..." errors,
// a key, an interface in "listed twice". Found by FuzzParse in CI: the
// newline split one error into a line that named no file.
var controlCharInputs = []string{
	"lan:\n  interfaces: [\"a\\n0\"]\nuplinks:\n  - {name: dsl1, interface: eth1, gateway: 203.0.113.1}\nrules:\n  - {lan: zz, line: dsl1}\n",
	"lan:\n  interfaces: [eth0]\nuplinks:\n  - {name: \"d\\n0\", interface: eth1, gateway: 203.0.113.1}\nrules:\n  - {line: zz}\n",
	"lan:\n  interfaces: [eth0]\nuplinks:\n  - {name: dsl1, interface: eth1, gateway: 203.0.113.1}\npolicies:\n  - {name: \"p\\n0\", members: [{line: dsl1}]}\nrules:\n  - {policy: zz}\n",
	"lan:\n  interfaces: [eth0]\n\"a\\r\\n0\": 1\nuplinks:\n  - {name: dsl1, interface: eth1, gateway: 203.0.113.1}\n",
	"lan:\n  interfaces: [\"e\\x1b[2J\", \"e\\x1b[2J\"]\nuplinks:\n  - {name: dsl1, interface: eth1, gateway: 203.0.113.1}\n",
}

func TestErrorsStayOneLine(t *testing.T) {
	for _, in := range controlCharInputs {
		_, err := Parse("x.yaml", []byte(in))
		if err == nil {
			t.Fatalf("accepted %q", in)
		}
		lines := strings.Split(err.Error(), "\n")
		for _, line := range lines {
			if !strings.HasPrefix(line, "x.yaml:") || strings.ContainsFunc(line, unicode.IsControl) {
				t.Errorf("error line %q (of %q) does not name the file or holds a control character", line, err)
			}
		}
		if !strings.Contains(err.Error(), `\n`) && !strings.Contains(err.Error(), `\x1b`) {
			t.Errorf("error %q does not show the escaped character", err)
		}
	}
}
