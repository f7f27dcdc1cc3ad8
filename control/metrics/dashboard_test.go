// SPDX-License-Identifier: Apache-2.0

package metrics

import (
	"context"
	"encoding/json"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/uplinkd/uplinkd/control/agent"
)

const dashboardFile = "grafana-dashboard.json"

// metricRE finds uplinkd's metric names in a PromQL expression.
var metricRE = regexp.MustCompile(`\buplinkd_[a-zA-Z0-9_:]*`)

// queries returns every PromQL text of a Grafana dashboard: the targets'
// exprs, and the template variables' queries.
func queries(dashboard []byte) ([]string, error) {
	var root any
	if err := json.Unmarshal(dashboard, &root); err != nil {
		return nil, err
	}
	var out []string
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, sub := range v {
				if s, ok := sub.(string); ok && (k == "expr" || k == "query" || k == "definition") {
					out = append(out, s)
				}
				walk(sub)
			}
		case []any:
			for _, sub := range v {
				walk(sub)
			}
		}
	}
	walk(root)
	return out, nil
}

// exported returns the names of the metrics the agent exports, gathered
// from a collector fed a status with one line on which every figure is
// there.
func exported(t *testing.T) map[string]bool {
	t.Helper()
	s := agent.Status{
		Lines: []agent.LineStatus{{
			Name: "dsl1", Number: 1, Interface: "wan1", Usable: true, Carrier: true, Health: "up",
			Samples: 10, RTTSeconds: 0.01, WeightConfigured: 1, WeightEffective: 1,
		}},
		FlowMap: agent.FlowMapStatus{Capacity: 1024},
		Reasons: map[string]uint64{"new_flow": 1},
	}
	mfs, err := NewRegistry(context.Background(), fixed(s), quiet).Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		names[mf.GetName()] = true
	}
	return names
}

// unknown lists the uplinkd metric names the dashboard's queries use that
// are not in exported, and every name it uses.
func unknown(t *testing.T, dashboard []byte, exported map[string]bool) (missing []string, used map[string]bool) {
	t.Helper()
	qs, err := queries(dashboard)
	if err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	used = map[string]bool{}
	for _, q := range qs {
		for _, name := range metricRE.FindAllString(q, -1) {
			used[name] = true
			if !exported[name] && !slices.Contains(missing, name) {
				missing = append(missing, name)
			}
		}
	}
	return missing, used
}

// Every query of the Grafana dashboard names metrics the agent exports,
// and the dashboard shows the figures it is for.
func TestDashboardQueriesExportedMetrics(t *testing.T) {
	data, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	have := exported(t)
	missing, used := unknown(t, data, have)
	for _, name := range missing {
		t.Errorf("%s queries %s, which the agent does not export", dashboardFile, name)
	}
	for _, name := range []string{
		"uplinkd_line_tx_bytes_total", "uplinkd_line_rx_bytes_total", "uplinkd_line_rtt_seconds",
		"uplinkd_line_jitter_seconds", "uplinkd_line_loss_ratio", "uplinkd_line_health_state", "uplinkd_line_up",
		"uplinkd_line_flows", "uplinkd_datapath_packets_total", "uplinkd_flow_map_entries",
		"uplinkd_flow_map_capacity", "uplinkd_reconcile_errors_total", "uplinkd_restored_total",
	} {
		if !used[name] {
			t.Errorf("%s shows no %s", dashboardFile, name)
		}
	}

	// The check catches a query of a metric the agent does not export.
	broken := strings.Replace(string(data), "uplinkd_line_flows{", "uplinkd_line_flow_count{", 1)
	if broken == string(data) {
		t.Fatal("no uplinkd_line_flows query to break")
	}
	if missing, _ := unknown(t, []byte(broken), have); !slices.Equal(missing, []string{"uplinkd_line_flow_count"}) {
		t.Errorf("a dashboard querying uplinkd_line_flow_count: unknown %v, want that name", missing)
	}
}

// The dashboard imports into Grafana: one Prometheus data source input
// that every panel uses, a state timeline of the lines, unique panel ids.
func TestDashboardShape(t *testing.T) {
	data, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	type target struct {
		Expr       string `json:"expr"`
		Datasource struct {
			UID string `json:"uid"`
		} `json:"datasource"`
	}
	var d struct {
		Inputs []struct {
			Name     string `json:"name"`
			PluginID string `json:"pluginId"`
		} `json:"__inputs"`
		SchemaVersion int    `json:"schemaVersion"`
		UID           string `json:"uid"`
		Panels        []struct {
			ID         int    `json:"id"`
			Type       string `json:"type"`
			Title      string `json:"title"`
			Datasource *struct {
				UID string `json:"uid"`
			} `json:"datasource"`
			Targets []target `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(data, &d); err != nil {
		t.Fatal(err)
	}
	if len(d.Inputs) != 1 || d.Inputs[0].Name != "DS_PROMETHEUS" || d.Inputs[0].PluginID != "prometheus" {
		t.Errorf("inputs %+v, want DS_PROMETHEUS (prometheus)", d.Inputs)
	}
	if d.SchemaVersion < 36 || d.UID == "" {
		t.Errorf("schemaVersion %d uid %q", d.SchemaVersion, d.UID)
	}
	ids, types, targets := map[int]bool{}, map[string]int{}, 0
	for _, p := range d.Panels {
		if ids[p.ID] {
			t.Errorf("panel id %d twice", p.ID)
		}
		ids[p.ID] = true
		types[p.Type]++
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.UID != "${DS_PROMETHEUS}" || len(p.Targets) == 0 {
			t.Errorf("panel %q: data source %v, %d targets", p.Title, p.Datasource, len(p.Targets))
		}
		for _, tg := range p.Targets {
			targets++
			if tg.Datasource.UID != "${DS_PROMETHEUS}" || !metricRE.MatchString(tg.Expr) {
				t.Errorf("panel %q: target %+v", p.Title, tg)
			}
		}
	}
	if types["state-timeline"] == 0 || types["timeseries"] < 8 || targets < 20 {
		t.Errorf("panels by type %v, %d targets", types, targets)
	}
}
