// SPDX-License-Identifier: Apache-2.0

package plan

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/uplinkd/uplinkd/control/config"
)

const policyYAML = seedYAML + `policies:
  - name: voip
    members:
      - {line: dsl2, metric: 1, weight: 3}
      - {line: dsl1, metric: 2}
    last_resort: unreachable
  - name: backup
    members:
      - {line: dsl1}
    last_resort: blackhole
rules:
  - name: sip
    proto: udp
    dst_port: [5060, 10000-20000]
    policy: voip
    sticky: 10m
  - dst_set: servers
    line: dsl2
prefix_sets:
  - name: servers
    file: servers.txt
`

// policyConfig is policyYAML, its prefix set file in a temp dir.
func policyConfig(t *testing.T) (*config.Config, []Line) {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "servers.txt"), []byte("203.0.113.0/24\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := config.Parse(filepath.Join(dir, "p.yaml"), []byte(policyYAML))
	if err != nil {
		t.Fatal(err)
	}
	lines, err := Resolve(c, labIfs)
	if err != nil {
		t.Fatal(err)
	}
	return c, lines
}

// Each last resort a policy uses gets a fwmark rule past every line's and a
// table of its own whose default route answers as the resort says.
func TestBuildLastResorts(t *testing.T) {
	c, lines := policyConfig(t)
	var b strings.Builder
	Render(&b, Build(c, lines), 85)
	for _, want := range []string{
		"ip rule add prio 117 fwmark 0x1f000000/0x1f000000 lookup 217 proto 85",
		"ip rule add prio 118 fwmark 0x1e000000/0x1f000000 lookup 218 proto 85",
		"ip route replace unreachable default proto 85 table 217",
		"ip route replace blackhole default proto 85 table 218",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("no %q in\n%s", want, b.String())
		}
	}
	needed := Needed(c)
	if !needed.Priorities[117] || !needed.Tables[218] {
		t.Errorf("Needed lacks the last resorts' numbers: %v", needed)
	}
	// Without them, neither rule nor table, and Needed claims neither.
	seed, err := config.Parse("seed.yaml", []byte(seedYAML))
	if err != nil {
		t.Fatal(err)
	}
	b.Reset()
	Render(&b, seedState(t), 85)
	if strings.Contains(b.String(), "table 217") || strings.Contains(b.String(), "prio 117") {
		t.Errorf("a config without last resorts got their rules:\n%s", b.String())
	}
	if n := Needed(seed); n.Priorities[117] || n.Tables[217] {
		t.Errorf("Needed claims the last resorts' numbers without them: %v", n)
	}
	// The scope always has them: a reload that drops a policy cleans up.
	if s := ScopeOf(seed); !s.Priorities[118] || !s.Tables[218] {
		t.Errorf("ScopeOf lacks the last resorts' numbers: %v", s)
	}
}

func TestRenderPolicies(t *testing.T) {
	c, lines := policyConfig(t)
	var b strings.Builder
	RenderPolicies(&b, c, lines)
	for _, want := range []string{
		"# policy 0 balanced: metric 0: dsl1 weight 1, dsl2 weight 1; last_resort default (now: tier 1)",
		"# policy 1 voip: metric 1: dsl2 weight 3 | metric 2: dsl1 weight 1; last_resort unreachable (now: tier 1)",
		"# policy 2 backup: metric 0: dsl1 weight 1; last_resort blackhole (now: tier 1)",
		"# policy 3 line:dsl2: metric 0: dsl2 weight 1; last_resort default (now: tier 1)",
		"# rule 1 sip: proto udp dst_port 5060,10000-20000 -> policy voip, sticky 10m0s per client and policy",
		"# rule 2 rule-2: dst @servers -> policy line:dsl2",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("no %q in\n%s", want, b.String())
		}
	}
	// dsl2 unusable: voip falls to its second tier, line:dsl2 to its last resort.
	for i := range lines {
		if lines[i].Name == "dsl2" {
			lines[i].Healthy = false
		}
	}
	b.Reset()
	RenderPolicies(&b, c, lines)
	for _, want := range []string{"voip: metric 1: dsl2 weight 3 | metric 2: dsl1 weight 1; last_resort unreachable (now: tier 2)", "line:dsl2: metric 0: dsl2 weight 1; last_resort default (now: none usable: last resort)"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("no %q in\n%s", want, b.String())
		}
	}
}
