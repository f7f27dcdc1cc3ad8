// SPDX-License-Identifier: Apache-2.0

package config

import (
	"errors"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"unicode"
)

// FuzzParse feeds mutated configs to Parse: it never panics, every error
// names the file (FILE[:LINE]: ...), the same input gives the same answer,
// and a config it accepts is consistent: 1..16 lines with unique names,
// interfaces, tables and marks inside the mask, weights 1..255, unicast
// IPv4 gateways, absolute paths and rule priorities in order; rules name
// policies of PolicyList (64 at most), LAN interfaces of lan.interfaces,
// and ports only with tcp or udp.
func FuzzParse(f *testing.F) {
	f.Add(seed)
	f.Add(seed + "routing:\n  table_base: 100\n  mark_mask: 0xff\n  protocol: 99\n")
	f.Add(seed + "health:\n  interval: 100ms\n  targets: [192.0.2.9]\n  min_targets: 1\n")
	f.Add(seed + "datapath:\n  enabled: false\n  pin_dir: /sys/fs/bpf/x\n  attach: tc\n")
	f.Add(strings.Replace(seed, "    weight: 4\n", "    weight: 4\n    table: 7\n    mark: 0x4000000\n    health: {gateway_probe: arp}\n", 1))
	f.Add("lan: {interfaces: [a]}\nuplinks: [{name: x, interface: b, gateway: 192.0.2.1}]\n---\n")
	f.Add("lan: &l {interfaces: [a]}\nuplinks: *l\n")
	// Policies and rules, without prefix sets: their files would be
	// relative to the test's directory.
	noSets := strings.NewReplacer("prefix_sets:\n  - name: banks\n    file: banks.txt\n", "", "dst_set: banks", "dst: 198.18.0.0/15").Replace(policyConfig)
	f.Add(noSets)
	f.Add(noSets + "  - {src: [10.0.0.0/8, \"2001:db8::1\"], proto: [6, udp], src_port: 1-1023, dscp: [cs1, 9], line: dsl}\n")
	f.Add(strings.Replace(policyConfig, "file: banks.txt", "file: /nonexistent/banks.txt", 1))
	for _, in := range controlCharInputs {
		f.Add(in)
	}
	f.Fuzz(func(t *testing.T, text string) {
		c, err := Parse("fuzz.yaml", []byte(text))
		_, err2 := Parse("fuzz.yaml", []byte(text))
		if (err == nil) != (err2 == nil) || err != nil && err.Error() != err2.Error() {
			t.Fatalf("two parses differ: %v / %v", err, err2)
		}
		if err != nil {
			for _, line := range strings.Split(err.Error(), "\n") {
				if !strings.HasPrefix(line, "fuzz.yaml") || strings.ContainsFunc(line, unicode.IsControl) {
					t.Fatalf("error line %q does not name the file or holds a control character", line)
				}
			}
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("error %v is no FieldError", err)
			}
			return
		}
		checkConsistent(t, c)
	})
}

func checkConsistent(t *testing.T, c *Config) {
	t.Helper()
	if n := len(c.Lines); n < 1 || n > MaxLines {
		t.Fatalf("%d lines accepted", n)
	}
	if len(c.LAN.Interfaces) == 0 || !filepath.IsAbs(c.StateDir) || !filepath.IsAbs(c.Datapath.PinDir) {
		t.Fatalf("accepted: lan %v, state_dir %q, pin_dir %q", c.LAN.Interfaces, c.StateDir, c.Datapath.PinDir)
	}
	seen := map[string]bool{}
	r := c.Routing
	for _, u := range c.Lines {
		for _, k := range []string{"name " + u.Name, "if " + u.Interface, "table " + strconv.Itoa(u.Table), "mark " + strconv.Itoa(int(u.Mark))} {
			if seen[k] {
				t.Fatalf("accepted a duplicate %s", k)
			}
			seen[k] = true
		}
		if slices.Contains(c.LAN.Interfaces, u.Interface) {
			t.Fatalf("line on LAN interface %s accepted", u.Interface)
		}
		switch {
		case u.Weight < 1 || u.Weight > 255:
			t.Fatalf("weight %d accepted", u.Weight)
		case !ValidTable(u.Table) || u.Table == r.MultipathTable:
			t.Fatalf("table %d accepted", u.Table)
		case u.Mark == 0 || u.Mark&^r.MarkMask != 0:
			t.Fatalf("mark %#x accepted with mask %#x", u.Mark, r.MarkMask)
		case !u.GatewayAddr.Is4() || !unicast(u.GatewayAddr):
			t.Fatalf("gateway %v accepted", u.GatewayAddr)
		case u.Prefix.IsValid() && !u.Prefix.Contains(u.GatewayAddr):
			t.Fatalf("gateway %v outside %v accepted", u.GatewayAddr, u.Prefix)
		}
	}
	n := len(c.Lines)
	if r.MainPriority >= r.FwmarkPriority || r.FwmarkPriority+n >= r.MultipathPriority ||
		r.SourcePriority+n >= r.MultipathPriority || r.MultipathPriority > 32765 || r.MainPriority < 1 {
		t.Fatalf("priorities out of order accepted: %+v", r)
	}
	if r.Protocol < 5 || r.Protocol > 255 || !ValidTable(r.MultipathTable) {
		t.Fatalf("routing accepted: %+v", r)
	}
	policies := map[string]bool{}
	list := c.PolicyList()
	for _, p := range list {
		policies[p.Name] = true
		for _, m := range p.Members {
			if !seen["name "+m.Line] || m.Weight < 1 || m.Weight > 255 || m.Metric < 0 {
				t.Fatalf("policy %s: member %+v accepted", p.Name, m)
			}
		}
	}
	if len(list) > MaxPolicies || len(policies) != len(list) {
		t.Fatalf("%d policies (%d names) accepted", len(list), len(policies))
	}
	for _, rule := range c.Rules {
		if !policies[rule.Policy] {
			t.Fatalf("rule %s: policy %q accepted", rule.Name, rule.Policy)
		}
		for _, l := range rule.LANs {
			if !slices.Contains(c.LAN.Interfaces, l) {
				t.Fatalf("rule %s: lan %s accepted", rule.Name, l)
			}
		}
		if len(rule.SrcPorts)+len(rule.DstPorts) > 0 && !portProtos(rule.Protos) {
			t.Fatalf("rule %s: ports with protocols %v accepted", rule.Name, rule.Protos)
		}
		if rule.Sticky < 0 || rule.Sticky > MaxSticky {
			t.Fatalf("rule %s: sticky %v accepted", rule.Name, rule.Sticky)
		}
	}
}
