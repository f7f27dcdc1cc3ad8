// SPDX-License-Identifier: Apache-2.0

package config

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// policyConfig has a prefix set, a policy and one rule of each kind; its
// set file is banks.txt next to it (see withSets).
const policyConfig = `lan:
  interfaces: [eth0, eth9]
uplinks:
  - {name: fiber, interface: eth1, gateway: 203.0.113.1, weight: 4}
  - {name: dsl, interface: eth2, gateway: 198.51.100.1}
  - {name: cheap, interface: eth3, gateway: 192.0.2.1, weight: 2}
prefix_sets:
  - name: banks
    file: banks.txt
policies:
  - name: voip
    members:
      - {line: fiber, metric: 1, weight: 1}
      - {line: dsl, metric: 2}
    last_resort: unreachable
rules:
  - name: sip
    src: [192.0.2.0/24, 2001:db8::/32]
    proto: udp
    dst_port: [5060, 10000-20000]
    dscp: ef
    lan: eth0
    policy: voip
  - name: backup
    dst: 203.0.113.10
    proto: [tcp, udp]
    src_port: 873
    line: cheap
  - name: banks
    dst_set: banks
    policy: balanced
    sticky: 30m
    sticky_per_rule: true
`

const banksFile = `# the banks' ranges
198.18.0.0/15   # one bank
203.0.113.7

2001:db8:b::/48
198.18.0.0/15
`

// withSets writes banks.txt into a new directory and returns the path
// the config is to be parsed as, next to it.
func withSets(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "banks.txt"), []byte(banksFile), 0o600); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, "p.yaml")
}

func prefixes(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range s {
		out = append(out, netip.MustParsePrefix(p))
	}
	return out
}

func TestParsePolicies(t *testing.T) {
	file := withSets(t)
	c, err := Parse(file, []byte(policyConfig))
	if err != nil {
		t.Fatal(err)
	}
	banks := prefixes("198.18.0.0/15", "203.0.113.7/32", "2001:db8:b::/48")
	wantSets := []PrefixSet{{Name: "banks", File: filepath.Join(filepath.Dir(file), "banks.txt"), Prefixes: banks}}
	if !reflect.DeepEqual(c.PrefixSets, wantSets) {
		t.Errorf("prefix sets\n%+v\nwant\n%+v", c.PrefixSets, wantSets)
	}
	wantPolicies := []Policy{{Name: "voip", Members: []PolicyMember{{"fiber", 1, 1}, {"dsl", 2, 1}}, LastResort: LastResortUnreachable}}
	if !reflect.DeepEqual(c.Policies, wantPolicies) {
		t.Errorf("policies\n%+v\nwant\n%+v", c.Policies, wantPolicies)
	}
	wantRules := []Rule{
		{
			Name: "sip", Src: prefixes("192.0.2.0/24", "2001:db8::/32"), Protos: []uint8{17},
			DstPorts: []PortRange{{5060, 5060}, {10000, 20000}}, DSCPs: []uint8{46}, LANs: []string{"eth0"}, Policy: "voip",
		},
		{Name: "backup", ID: 1, Dst: prefixes("203.0.113.10/32"), Protos: []uint8{6, 17}, SrcPorts: []PortRange{{873, 873}}, Policy: "line:cheap"},
		{Name: "banks", ID: 2, Dst: banks, DstSet: "banks", Policy: "balanced", Sticky: 30 * time.Minute, StickyPerRule: true},
	}
	for i := range c.Rules {
		c.Rules[i].Text = RuleText{}
	}
	if !reflect.DeepEqual(c.Rules, wantRules) {
		t.Errorf("rules\n%+v\nwant\n%+v", c.Rules, wantRules)
	}
	if len(c.Warnings) != 0 {
		t.Errorf("warnings %q", c.Warnings)
	}
}

// Scalars and lists, names and numbers, say the same.
func TestParseRuleForms(t *testing.T) {
	file := withSets(t)
	c, err := Parse(file, []byte(policyConfig+`  - src: 192.0.2.1
    dst: ["2001:db8::1", 198.51.100.0/24]
    proto: 6
    src_port: [0, 1-1023, 65535]
    dscp: [0, cs1, af11, af12, af13, af21, af22, af23, af31, af32, af33, af41, af42, af43, cs5, va, ef, cs7, 63]
    lan: [eth9, eth0]
    line: dsl
    sticky: 24h
`))
	if err != nil {
		t.Fatal(err)
	}
	r := c.Rules[3]
	want := Rule{
		Name: "rule-4", ID: 3, Src: prefixes("192.0.2.1/32"), Dst: prefixes("2001:db8::1/128", "198.51.100.0/24"), Protos: []uint8{6},
		SrcPorts: []PortRange{{0, 0}, {1, 1023}, {65535, 65535}},
		DSCPs:    []uint8{0, 8, 10, 12, 14, 18, 20, 22, 26, 28, 30, 34, 36, 38, 40, 44, 46, 56, 63},
		LANs:     []string{"eth9", "eth0"}, Policy: "line:dsl", Sticky: 24 * time.Hour,
	}
	r.Text = RuleText{}
	if !reflect.DeepEqual(r, want) {
		t.Errorf("rule\n%+v\nwant\n%+v", r, want)
	}
}

// Each mistake gives one error naming the file, the line and the field.
func TestParsePolicyErrors(t *testing.T) {
	policies := func(n int) string {
		var b strings.Builder
		for i := range n {
			fmt.Fprintf(&b, "  - {name: p%d, members: [{line: dsl}]}\n", i)
		}
		return b.String()
	}
	sub := func(old, new string) string {
		if !strings.Contains(policyConfig, old) {
			panic(old)
		}
		return strings.Replace(policyConfig, old, new, 1)
	}
	for _, tc := range []struct{ name, yaml, want string }{
		{"unknown policy", sub("policy: voip", "policy: video"), `p.yaml:23: rules[0].policy: unknown policy "video" (policies: balanced, voip)`},
		{"unknown line in a rule", sub("line: cheap", "line: cable"), `p.yaml:28: rules[1].line: unknown line "cable" (uplinks: cheap, dsl, fiber)`},
		{"unknown line in a policy", sub("{line: dsl, metric: 2}", "{line: adsl, metric: 2}"), `p.yaml:14: policies[0].members[1].line: unknown line "adsl"`},
		{"member without line", sub("{line: dsl, metric: 2}", "{metric: 2}"), `p.yaml:14: policies[0].members[1].line: missing`},
		{"unknown prefix set", sub("dst_set: banks", "dst_set: bank"), `p.yaml:30: rules[2].dst_set: unknown prefix set "bank" (prefix_sets: banks)`},
		{"unknown lan interface", sub("lan: eth0", "lan: eth5"), `p.yaml:22: rules[0].lan: unknown lan interface "eth5" (lan.interfaces: eth0, eth9)`},
		{"a line's interface as lan", sub("lan: eth0", "lan: [eth0, eth1]"), `p.yaml:22: rules[0].lan[1]: unknown lan interface "eth1"`},
		{"duplicate policy", sub("rules:\n", "  - {name: voip, members: [{line: dsl}]}\nrules:\n"), `p.yaml:16: policies[1].name: "voip" is also the name of policies[0]`},
		{"duplicate rule", sub("name: backup", "name: sip"), `p.yaml:24: rules[1].name: "sip" is also the name of rules[0]`},
		{"rule named as another's default", strings.NewReplacer("name: backup", "name: rule-3", "name: banks\n    dst_set", "dst_set").Replace(policyConfig), `p.yaml:29: rules[2].name: "rule-3" is also the name of rules[1]`},
		{"duplicate prefix set", sub("policies:\n", "  - {name: banks, file: banks.txt}\npolicies:\n"), `p.yaml:10: prefix_sets[1].name: "banks" is also the name of prefix_sets[0]`},
		{"bad policy name", strings.NewReplacer("name: voip", "name: VoIP", "policy: voip", "policy: VoIP").Replace(policyConfig), `p.yaml:11: policies[0].name: want 1 to 32 characters of [a-z0-9_-], got "VoIP"`},
		{"balanced is reserved", sub("rules:\n", "  - {name: balanced, members: [{line: dsl}]}\nrules:\n"), `p.yaml:16: policies[1].name: balanced is the built-in policy`},
		{"empty members", sub("    members:\n      - {line: fiber, metric: 1, weight: 1}\n      - {line: dsl, metric: 2}\n", "    members: []\n"), `p.yaml:12: policies[0].members: at least one member is needed`},
		{"no members", sub("    members:\n      - {line: fiber, metric: 1, weight: 1}\n      - {line: dsl, metric: 2}\n", ""), `p.yaml:11: policies[0].members: at least one member is needed`},
		{"a line twice in a policy", sub("{line: dsl, metric: 2}", "{line: fiber, metric: 2}"), `p.yaml:14: policies[0].members[1].line: fiber is also policies[0].members[0]: a line is in a policy once`},
		{"negative metric", sub("metric: 2", "metric: -1"), `p.yaml:14: policies[0].members[1].metric: want 0 or more (lower tiers first), got -1`},
		{"member weight 0", sub("metric: 2}", "metric: 2, weight: 0}"), `p.yaml:14: policies[0].members[1].weight: want 1..255, got 0`},
		{"bad last resort", sub("last_resort: unreachable", "last_resort: drop"), `p.yaml:15: policies[0].last_resort: want default, unreachable or blackhole, got "drop"`},
		{"no marks left for the last resort", policyConfig + "routing:\n  mark_mask: 0x3000000\n", `p.yaml:15: policies[0].last_resort: unreachable needs two values of routing.mark_mask 0x3000000 that no line's mark takes`},
		{"bad address", sub("dst: 203.0.113.10", "dst: 203.0.113.300"), `p.yaml:25: rules[1].dst: want a prefix (192.0.2.0/24, 2001:db8::/32) or an address, got "203.0.113.300"`},
		{"host name", sub("dst: 203.0.113.10", "dst: bank.example"), `p.yaml:25: rules[1].dst: want a prefix`},
		{"host bits", sub("[192.0.2.0/24, 2001", "[192.0.2.1/24, 2001"), `p.yaml:18: rules[0].src[0]: 192.0.2.1/24 has host bits set: 192.0.2.0/24?`},
		{"IPv6 host bits", sub("2001:db8::/32]", "2001:db8::1/32]"), `p.yaml:18: rules[0].src[1]: 2001:db8::1/32 has host bits set: 2001:db8::/32?`},
		{"IPv4 as IPv6", sub("dst: 203.0.113.10", `dst: "::ffff:203.0.113.10"`), `p.yaml:25: rules[1].dst: ::ffff:203.0.113.10 is IPv4 written as IPv6`},
		{"prefix twice", sub("2001:db8::/32]", "192.0.2.0/24]"), `p.yaml:18: rules[0].src[1]: 192.0.2.0/24 is listed twice`},
		{"port range backwards", sub("10000-20000", "20000-10000"), `p.yaml:20: rules[0].dst_port[1]: 20000-10000: the range's first port is above its last`},
		{"port too big", sub("src_port: 873", "src_port: 65536"), `p.yaml:27: rules[1].src_port: want a port 0..65535 or a range N-M, got "65536"`},
		{"port range too big", sub("10000-20000", "10000-70000"), `p.yaml:20: rules[0].dst_port[1]: want a port 0..65535 or a range N-M, got "10000-70000"`},
		{"negative port", sub("src_port: 873", "src_port: -1"), `p.yaml:27: rules[1].src_port: want a port 0..65535 or a range N-M, got "-1"`},
		{"port name", sub("src_port: 873", "src_port: rsync"), `p.yaml:27: rules[1].src_port: want a port`},
		{"ports with icmp", sub("proto: [tcp, udp]", "proto: [tcp, icmp]"), `p.yaml:27: rules[1].src_port: ports need proto tcp, udp or both (only their packets have ports), got proto tcp, icmp`},
		{"ports with any proto", sub("    proto: udp\n", ""), `p.yaml:19: rules[0].dst_port: ports need proto tcp, udp or both (only their packets have ports), got proto any`},
		{"unknown proto", sub("proto: udp", "proto: sctp"), `p.yaml:19: rules[0].proto: want tcp, udp, icmp, icmpv6 or a protocol number 0..255, got "sctp"`},
		{"proto too big", sub("proto: udp", "proto: 256"), `p.yaml:19: rules[0].proto: want tcp, udp, icmp, icmpv6 or a protocol number 0..255, got "256"`},
		{"proto twice", sub("proto: [tcp, udp]", "proto: [tcp, 6]"), `p.yaml:26: rules[1].proto[1]: 6 is listed twice`},
		{"dscp too big", sub("dscp: ef", "dscp: 64"), `p.yaml:21: rules[0].dscp: want 0..63 or a name (cs0..cs7, af11..af43, ef, va), got "64"`},
		{"dscp unknown name", sub("dscp: ef", "dscp: [ef, af44]"), `p.yaml:21: rules[0].dscp[1]: want 0..63 or a name (cs0..cs7, af11..af43, ef, va), got "af44"`},
		{"dscp twice", sub("dscp: ef", "dscp: [ef, 46]"), `p.yaml:21: rules[0].dscp[1]: 46 is listed twice`},
		{"empty list", sub("lan: eth0", "lan: []"), `p.yaml:22: rules[0].lan: an empty list: leave the key out to match any value`},
		{"src and src_set", sub("    proto: udp\n", "    src_set: banks\n    proto: udp\n"), `p.yaml:19: rules[0].src_set: src and src_set both: a rule takes one of them`},
		{"dst and dst_set", sub("    dst_set: banks\n", "    dst_set: banks\n    dst: 192.0.2.0/24\n"), `p.yaml:30: rules[2].dst_set: dst and dst_set both`},
		{"policy and line", sub("line: cheap", "line: cheap\n    policy: voip"), `p.yaml:28: rules[1].line: policy and line both: a rule takes one of them`},
		{"neither policy nor line", sub("    policy: balanced\n", ""), `p.yaml:29: rules[2]: want policy: NAME or line: NAME, the lines its flows take`},
		{"sticky zero", sub("sticky: 30m", "sticky: 0s"), `p.yaml:32: rules[2].sticky: want more than 0 and at most 24h0m0s, got 0s`},
		{"sticky negative", sub("sticky: 30m", "sticky: -1m"), `p.yaml:32: rules[2].sticky: want more than 0 and at most 24h0m0s, got -1m0s`},
		{"sticky over a day", sub("sticky: 30m", "sticky: 25h"), `p.yaml:32: rules[2].sticky: want more than 0 and at most 24h0m0s, got 25h0m0s`},
		{"sticky not a duration", sub("sticky: 30m", "sticky: long"), `p.yaml:32: rules[2].sticky: want a duration such as 200ms, got "long"`},
		{"sticky_per_rule without sticky", sub("    sticky: 30m\n", ""), `p.yaml:32: rules[2].sticky_per_rule: without sticky: there is nothing to keep`},
		{"unknown rule key", sub("sticky_per_rule:", "sticky_per_flow:"), `p.yaml:33: rules[2].sticky_per_flow: unknown key (known here: name, src, dst, proto, src_port, dst_port, dscp, lan, line, src_set, dst_set, policy, sticky, sticky_per_rule)`},
		{"too many rules", policyConfig + strings.Repeat("  - {policy: balanced}\n", MaxRules-2), `p.yaml:17: rules: at most 4096 rules, got 4097`},
		{"too many policies", sub("rules:\n", policies(MaxPolicies-1)+"rules:\n"), `p.yaml:11: policies: at most 64 policies with balanced, got 65`},
		{"too many with the line shorthands", sub("rules:\n", policies(MaxPolicies-2)+"rules:\n"), `p.yaml:90: rules[1].line: the policy line:cheap would be the 65th: at most 64 in all`},
		{"set file missing", sub("file: banks.txt", "file: nope.txt"), `p.yaml:9: prefix_sets[0].file: DIR/nope.txt: no such file or directory`},
		{"no prefix sets", sub("prefix_sets:\n  - name: banks\n    file: banks.txt\n", ""), `p.yaml:27: rules[2].dst_set: unknown prefix set "banks" (prefix_sets: none)`},
		{"set without file", sub("    file: banks.txt\n", ""), `p.yaml:8: prefix_sets[0].file: missing`},
		{"set file a directory", sub("file: banks.txt", "file: ."), `p.yaml:9: prefix_sets[0].file: DIR: not a regular file (d---------)`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			file := withSets(t)
			want := strings.ReplaceAll(tc.want, "DIR", filepath.Dir(file))
			_, err := Parse(file, []byte(tc.yaml))
			if err == nil {
				t.Fatalf("no error; want %q", want)
			}
			if !strings.Contains(err.Error(), want) {
				t.Fatalf("error:\n%v\nwant it to contain:\n%s", err, want)
			}
			if n := strings.Count(err.Error(), "\n") + 1; n != 1 {
				t.Errorf("want one error, got %d:\n%v", n, err)
			}
		})
	}
}

// A bad prefix-set file is reported with its own line numbers, each bad
// line once, under the prefix set's field of the config.
func TestLoadPrefixSetErrors(t *testing.T) {
	for _, tc := range badSetFiles {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			cfg := filepath.Join(dir, "p.yaml")
			for f, text := range map[string]string{cfg: policyConfig, filepath.Join(dir, "banks.txt"): tc.text} {
				if err := os.WriteFile(f, []byte(text), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			_, err := Load(cfg)
			lines := strings.Split(fmt.Sprint(err), "\n")
			if len(lines) != len(tc.want) {
				t.Fatalf("Load:\n%v\nwant %d errors", err, len(tc.want))
			}
			for i, w := range tc.want {
				w = cfg + ":9: prefix_sets[0].file: " + filepath.Join(dir, strings.Replace(w, "set.txt", "banks.txt", 1))
				if !strings.HasPrefix(lines[i], w) {
					t.Errorf("error %d: %s\nwant: %s", i, lines[i], w)
				}
			}
		})
	}
}

// A rule that one earlier rule covers in every field is a warning, not an
// error; narrower earlier rules, or ones that miss a value, are not.
func TestShadowWarnings(t *testing.T) {
	for _, tc := range []struct {
		name, rules string
		want        string // "" for none
	}{
		{"catch-all first", "  - {line: dsl}\n  - {src: 192.0.2.0/24, line: cheap}\n", "p.yaml:35: rules[4]: shadowed by rules[3] (rule-4)"},
		{"wider prefix and port range", "  - {src: 10.0.0.0/8, proto: [tcp, udp], dst_port: [1-1000, 1001-2000], line: dsl}\n  - {name: web, src: [10.1.0.0/16, 10.2.0.1], proto: tcp, dst_port: [443, 1000-1500], line: cheap}\n", "p.yaml:35: rules[4]: shadowed by rules[3] (rule-4)"},
		{"same rule twice", "  - {name: a, src_set: banks, dscp: ef, lan: eth0, line: dsl}\n  - {name: b, src_set: banks, dscp: [46], lan: [eth0], line: cheap}\n", "p.yaml:35: rules[4]: shadowed by rules[3] (a)"},
		{"set covers listed prefixes", "  - {name: a, src_set: banks, line: dsl}\n  - {name: b, src: [198.18.1.0/24, 203.0.113.7], line: cheap}\n", "p.yaml:35: rules[4]: shadowed by rules[3] (a)"},
		{"the first of several", "  - {name: a, proto: udp, line: dsl}\n  - {name: b, line: dsl}\n  - {name: c, proto: udp, dscp: ef, line: cheap}\n", "p.yaml:36: rules[5]: shadowed by rules[3] (a)"},
		{"earlier rule of the base", "  - {src: 192.0.2.0/25, proto: udp, dst_port: 5060, dscp: 46, lan: eth0, line: dsl}\n", "p.yaml:34: rules[3]: shadowed by rules[0] (sip)"},
		{"narrower prefix", "  - {src: 10.1.0.0/16, line: dsl}\n  - {src: 10.0.0.0/8, line: cheap}\n", ""},
		{"other family", "  - {src: 0.0.0.0/0, line: dsl}\n  - {src: \"2001:db8::/32\", line: cheap}\n", ""},
		{"ports only with ports", "  - {proto: udp, dst_port: 0-65535, line: dsl}\n  - {proto: udp, line: cheap}\n", ""},
		{"a port outside", "  - {proto: udp, dst_port: [1-100, 102-200], line: dsl}\n  - {proto: udp, dst_port: 50-150, line: cheap}\n", ""},
		{"any lan after one", "  - {lan: eth0, line: dsl}\n  - {line: cheap}\n", ""},
		{"other dscp", "  - {dscp: [ef, cs1], line: dsl}\n  - {dscp: [ef, cs2], line: cheap}\n", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			file := withSets(t)
			c, err := Parse(file, []byte(policyConfig+tc.rules))
			if err != nil {
				t.Fatal(err)
			}
			var want []string
			if tc.want != "" {
				want = []string{filepath.Dir(file) + "/" + tc.want}
			}
			if !reflect.DeepEqual(c.Warnings, want) {
				t.Errorf("warnings %q, want %q", c.Warnings, want)
			}
		})
	}
}

// PolicyList gives balanced id 0, the configured policies in file order,
// then one policy per line: shorthand in the order rules name them.
func TestPolicyList(t *testing.T) {
	c, err := Parse(withSets(t), []byte(strings.Replace(policyConfig, "rules:\n", "  - {name: bulk, members: [{line: cheap, metric: 0}, {line: dsl, metric: 1, weight: 3}], last_resort: blackhole}\nrules:\n", 1)+
		"  - {line: dsl, policy: }\n  - {line: cheap}\n  - {policy: bulk}\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := []Policy{
		{ID: 0, Name: "balanced", Members: []PolicyMember{{"fiber", 0, 4}, {"dsl", 0, 1}, {"cheap", 0, 2}}, LastResort: LastResortDefault},
		{ID: 1, Name: "voip", Members: []PolicyMember{{"fiber", 1, 1}, {"dsl", 2, 1}}, LastResort: LastResortUnreachable},
		{ID: 2, Name: "bulk", Members: []PolicyMember{{"cheap", 0, 2}, {"dsl", 1, 3}}, LastResort: LastResortBlackhole},
		{ID: 3, Name: "line:cheap", Members: []PolicyMember{{"cheap", 0, 2}}, LastResort: LastResortDefault},
		{ID: 4, Name: "line:dsl", Members: []PolicyMember{{"dsl", 0, 1}}, LastResort: LastResortDefault},
	}
	if got := c.PolicyList(); !reflect.DeepEqual(got, want) {
		t.Errorf("PolicyList\n%+v\nwant\n%+v", got, want)
	}
	var names []string
	for _, r := range c.Rules {
		names = append(names, r.Policy)
	}
	if want := []string{"voip", "line:cheap", "balanced", "line:dsl", "line:cheap", "bulk"}; !reflect.DeepEqual(names, want) {
		t.Errorf("rules' policies %q, want %q", names, want)
	}
	// Without rules or policies: balanced alone.
	s, err := Parse("s.yaml", []byte(seed))
	if err != nil {
		t.Fatal(err)
	}
	if got := s.PolicyList(); len(got) != 1 || got[0].Name != BalancedPolicy || len(got[0].Members) != 2 || got[0].Members[0].Weight != 4 {
		t.Errorf("seed's PolicyList %+v", got)
	}
}

// The last resorts' marks are the two highest values of the mask that no
// line takes.
func TestLastResortMarks(t *testing.T) {
	for _, tc := range []struct {
		add    string
		u, b   uint32
		marked string
	}{
		{"", 0x1f000000, 0x1e000000, ""},
		{"routing:\n  mark_mask: 0x700\n", 0x700, 0x600, ""},
		{"routing:\n  mark_mask: 0x700\n", 0x600, 0x500, "    mark: 0x700\n"},
		{"routing:\n  mark_mask: 0x300\n", 0x300, 0, ""}, // dsl1 0x100, dsl2 0x200
	} {
		text := seed + tc.add
		if tc.marked != "" {
			text = strings.Replace(text, "    weight: 4\n", "    weight: 4\n"+tc.marked, 1)
		}
		c, err := Parse("m.yaml", []byte(text))
		if err != nil {
			t.Fatal(err)
		}
		if u, b := c.LastResortMarks(); u != tc.u || b != tc.b {
			t.Errorf("%q %q: marks %#x, %#x; want %#x, %#x", tc.add, tc.marked, u, b, tc.u, tc.b)
		}
	}
}

// README's example of policies parses, without warnings.
func TestREADMEPolicyExample(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(readme), "### Policies, rules, prefix_sets\n")
	_, example, ok2 := strings.Cut(section, "```yaml\n")
	example, _, ok3 := strings.Cut(example, "```\n")
	if !ok || !ok2 || !ok3 {
		t.Fatal("README has no yaml example under ### Policies, rules, prefix_sets")
	}
	file := withSets(t)
	c, err := Parse(file, []byte("lan: {interfaces: [eth0]}\n"+example))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Rules) != 4 || len(c.Warnings) > 0 || c.Rules[2].Policy != "line:cheap" || c.Rules[3].Sticky != 30*time.Minute {
		t.Errorf("rules %+v, warnings %q", c.Rules, c.Warnings)
	}
}

// A policy keeps its id across reorders, insertions and removals (flows
// record it); a new policy avoids the ids of removed ones while others
// are free; balanced is 0.
func TestRenumberPolicies(t *testing.T) {
	ids := func(c *Config) map[string]int {
		m := map[string]int{}
		for _, p := range c.PolicyList() {
			m[p.Name] = p.ID
		}
		return m
	}
	parse := func(policies string) *Config {
		t.Helper()
		text := strings.Replace(policyConfig, "rules:\n", policies+"rules:\n", 1)
		c, err := Parse(withSets(t), []byte(text))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	a := parse("  - {name: pa, members: [{line: dsl}]}\n  - {name: pb, members: [{line: cheap}]}\n")
	kept := a.RenumberPolicies(nil)
	first := ids(a)
	if first["balanced"] != 0 || first["voip"] != 1 || first["pa"] != 2 || first["pb"] != 3 {
		t.Fatalf("first numbering %v, want balanced 0, then by place", first)
	}
	// pb moved before voip, pa removed, pc added.
	b := parse("  - {name: pb, members: [{line: cheap}]}\n  - {name: pc, members: [{line: dsl}]}\n")
	kept = b.RenumberPolicies(kept)
	second := ids(b)
	if second["pb"] != 3 || second["voip"] != 1 || second["balanced"] != 0 {
		t.Errorf("after a reorder: %v, want pb and voip to keep 3 and 1", second)
	}
	if second["pc"] == first["pa"] {
		t.Errorf("pc took the removed pa's id %d while others were free: %v", second["pc"], second)
	}
	if kept["pa"] != first["pa"] {
		t.Errorf("the removed pa's id is not kept: %v", kept)
	}
	seen := map[int]string{}
	for name, id := range second {
		if other, ok := seen[id]; ok {
			t.Errorf("%s and %s share id %d", name, other, id)
		}
		seen[id] = name
	}
}

// A rule keeps its id when a reload moves it (flows record it); a new
// rule avoids a removed one's id while others are free.
func TestRenumberRules(t *testing.T) {
	c := &Config{Rules: []Rule{{Name: "a"}, {Name: "b"}, {Name: "c"}}}
	kept := c.RenumberRules(nil)
	if c.Rules[0].ID != 0 || c.Rules[1].ID != 1 || c.Rules[2].ID != 2 {
		t.Fatalf("first numbering %+v, want by place", c.Rules)
	}
	d := &Config{Rules: []Rule{{Name: "c"}, {Name: "new"}, {Name: "a"}}}
	kept = d.RenumberRules(kept)
	if d.Rules[0].ID != 2 || d.Rules[2].ID != 0 || d.Rules[1].ID != 3 {
		t.Errorf("after moving c first, dropping b, adding new: %+v, want c 2, a 0, new 3 (not b's 1)", d.Rules)
	}
	if kept["b"] != 1 {
		t.Errorf("b's id not kept: %v", kept)
	}
}
