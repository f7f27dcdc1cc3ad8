// SPDX-License-Identifier: Apache-2.0

package metrics

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/uplinkd/uplinkd/control/agent"
)

var quiet = slog.New(slog.DiscardHandler)

// twoLines is a status as the agent gives it: dsl1 up and carrying
// traffic, dsl2 down (no carrier) and never probed.
func twoLines() agent.Status {
	return agent.Status{
		Config: "/etc/uplinkd.yaml",
		Lines: []agent.LineStatus{
			{
				Name: "dsl1", Number: 1, Interface: "wan1", Usable: true, Carrier: true, Health: "up",
				LossRatio: 0.02, RTTSeconds: 0.0125, JitterSeconds: 0.0005, Samples: 50,
				WeightConfigured: 4, WeightEffective: 3, StateChanges: 2,
				TxPackets: 10, TxBytes: 1500, RxPackets: 20, RxBytes: 30000, Flows: 7,
				ForwardedTxPackets: 8, ForwardedTxBytes: 1200, ForwardedRxPackets: 19, ForwardedRxBytes: 29000,
			},
			{
				Name: "dsl2", Number: 2, Interface: "wan2", Health: "down", OperatorDown: true,
				WeightConfigured: 1, WeightEffective: 1, StateChanges: 5,
				TxPackets: 1, TxBytes: 60, Flows: 0,
			},
		},
		FlowMap:         agent.FlowMapStatus{Entries: 7, Capacity: 65536, Inserted: 9, EvictedAtLeast: 0},
		Reasons:         map[string]uint64{"new_flow": 9, "existing_flow": 120, "not_ip": 3},
		ReconcileErrors: 1,
		Restored:        4,
	}
}

func fixed(s agent.Status) StatusFunc {
	return func(context.Context) (agent.Status, error) { return s, nil }
}

func registry(t *testing.T, status StatusFunc) *prometheus.Registry {
	t.Helper()
	reg := prometheus.NewPedanticRegistry() // checks the metrics against Describe
	reg.MustRegister(NewCollector(context.Background(), status, quiet))
	return reg
}

func TestCollectStatus(t *testing.T) {
	reg := registry(t, fixed(twoLines()))
	want := `
# HELP uplinkd_line_up 1 when new flows may be sent over the line (carrier, not taken down, healthy and not late, addressed), else 0.
# TYPE uplinkd_line_up gauge
uplinkd_line_up{line="dsl1"} 1
uplinkd_line_up{line="dsl2"} 0
# HELP uplinkd_line_health_state The probes' judgement of the line: 1 for its current state (up, late, down or probing), 0 for the others.
# TYPE uplinkd_line_health_state gauge
uplinkd_line_health_state{line="dsl1",state="down"} 0
uplinkd_line_health_state{line="dsl1",state="late"} 0
uplinkd_line_health_state{line="dsl1",state="probing"} 0
uplinkd_line_health_state{line="dsl1",state="up"} 1
uplinkd_line_health_state{line="dsl2",state="down"} 1
uplinkd_line_health_state{line="dsl2",state="late"} 0
uplinkd_line_health_state{line="dsl2",state="probing"} 0
uplinkd_line_health_state{line="dsl2",state="up"} 0
# HELP uplinkd_line_tx_bytes_total Bytes sent out of the line's interface to the ISP, as the kernel counts them (the gateway's own traffic included).
# TYPE uplinkd_line_tx_bytes_total counter
uplinkd_line_tx_bytes_total{line="dsl1"} 1500
uplinkd_line_tx_bytes_total{line="dsl2"} 60
# HELP uplinkd_line_rx_bytes_total Bytes received on the line's interface from the ISP, as the kernel counts them (the gateway's own traffic included).
# TYPE uplinkd_line_rx_bytes_total counter
uplinkd_line_rx_bytes_total{line="dsl1"} 30000
uplinkd_line_rx_bytes_total{line="dsl2"} 0
# HELP uplinkd_line_rx_packets_total Packets received on the line's interface from the ISP, as the kernel counts them.
# TYPE uplinkd_line_rx_packets_total counter
uplinkd_line_rx_packets_total{line="dsl1"} 20
uplinkd_line_rx_packets_total{line="dsl2"} 0
# HELP uplinkd_line_weight The line's weight: kind="configured" as in the config, kind="effective" the share of new flows it gets now (adaptive weights lower it).
# TYPE uplinkd_line_weight gauge
uplinkd_line_weight{kind="configured",line="dsl1"} 4
uplinkd_line_weight{kind="configured",line="dsl2"} 1
uplinkd_line_weight{kind="effective",line="dsl1"} 3
uplinkd_line_weight{kind="effective",line="dsl2"} 1
# HELP uplinkd_line_rtt_seconds Mean round-trip time of the line's answered probes over the health window.
# TYPE uplinkd_line_rtt_seconds gauge
uplinkd_line_rtt_seconds{line="dsl1"} 0.0125
# HELP uplinkd_line_loss_ratio Share of the line's probes lost over the health window, 0..1.
# TYPE uplinkd_line_loss_ratio gauge
uplinkd_line_loss_ratio{line="dsl1"} 0.02
# HELP uplinkd_line_flows Flows pinned to the line in the datapath's flow map.
# TYPE uplinkd_line_flows gauge
uplinkd_line_flows{line="dsl1"} 7
uplinkd_line_flows{line="dsl2"} 0
# HELP uplinkd_line_state_changes_total Health changes of the line (to up, late, down or probing) since the agent started.
# TYPE uplinkd_line_state_changes_total counter
uplinkd_line_state_changes_total{line="dsl1"} 2
uplinkd_line_state_changes_total{line="dsl2"} 5
# HELP uplinkd_datapath_packets_total Packets the datapath's LAN ingress handled, by reason (new_flow, existing_flow, recovered_ct, moved_flow, dead_line_tcp, ...).
# TYPE uplinkd_datapath_packets_total counter
uplinkd_datapath_packets_total{reason="existing_flow"} 120
uplinkd_datapath_packets_total{reason="new_flow"} 9
uplinkd_datapath_packets_total{reason="not_ip"} 3
# HELP uplinkd_flow_map_entries Flows in the datapath's flow map now.
# TYPE uplinkd_flow_map_entries gauge
uplinkd_flow_map_entries 7
# HELP uplinkd_flow_map_capacity Size of the datapath's flow map (datapath.flow_entries).
# TYPE uplinkd_flow_map_capacity gauge
uplinkd_flow_map_capacity 65536
# HELP uplinkd_reconcile_errors_total Applies of the config to the kernel that failed since the agent started.
# TYPE uplinkd_reconcile_errors_total counter
uplinkd_reconcile_errors_total 1
# HELP uplinkd_restored_total Repairs of uplinkd's kernel state that someone else changed or deleted, since the agent started.
# TYPE uplinkd_restored_total counter
uplinkd_restored_total 4
# HELP uplinkd_status_error 1 when the agent did not give its status for this scrape (starting, busy or stopping): no other uplinkd metric is given then.
# TYPE uplinkd_status_error gauge
uplinkd_status_error 0
`
	names := []string{
		"uplinkd_line_up", "uplinkd_line_health_state", "uplinkd_line_tx_bytes_total", "uplinkd_line_rx_bytes_total",
		"uplinkd_line_rx_packets_total", "uplinkd_line_weight", "uplinkd_line_rtt_seconds", "uplinkd_line_loss_ratio",
		"uplinkd_line_flows", "uplinkd_line_state_changes_total", "uplinkd_datapath_packets_total",
		"uplinkd_flow_map_entries", "uplinkd_flow_map_capacity", "uplinkd_reconcile_errors_total", "uplinkd_restored_total",
		"uplinkd_status_error",
	}
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), names...); err != nil {
		t.Error(err)
	}
	for name, v := range map[string]float64{
		"uplinkd_line_jitter_seconds":     0.0005,
		"uplinkd_line_tx_packets_total":   11,
		"uplinkd_flow_map_evicted_total":  0,
		"uplinkd_flow_map_inserted_total": 9,
		"uplinkd_all_lines_down":          0,
		"uplinkd_datapath_error":          0,
		"uplinkd_line_operator_down":      1,
		"uplinkd_line_carrier":            1,
		"uplinkd_line_info":               2,
		"uplinkd_line_probe_samples":      50,
	} {
		if got := sum(t, reg, name); got != v {
			t.Errorf("%s summed over its series = %v, want %v", name, got, v)
		}
	}
}

// sum gathers reg and adds up the values of every series of name.
func sum(t *testing.T, reg prometheus.Gatherer, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	total := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			total += value(m)
		}
	}
	return total
}

func value(m *dto.Metric) float64 {
	switch {
	case m.Gauge != nil:
		return m.GetGauge().GetValue()
	case m.Counter != nil:
		return m.GetCounter().GetValue()
	}
	return 0
}

// Every metric has a help text and follows Prometheus's naming rules
// (base units, _total on counters).
func TestMetricsLint(t *testing.T) {
	s := twoLines()
	s.DatapathError = ""
	mfs, err := registry(t, fixed(s)).Gather()
	if err != nil {
		t.Fatal(err)
	}
	if len(mfs) < 20 {
		t.Fatalf("only %d metric families", len(mfs))
	}
	for _, mf := range mfs {
		if mf.GetHelp() == "" {
			t.Errorf("%s has no help", mf.GetName())
		}
	}
	problems, err := promlint.NewWithMetricFamilies(mfs).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
}

// A failed status call gives uplinkd_status_error 1 and nothing else of
// uplinkd's: no made-up zeros.
func TestStatusError(t *testing.T) {
	var asked atomic.Int32
	reg := registry(t, func(ctx context.Context) (agent.Status, error) {
		asked.Add(1)
		if _, ok := ctx.Deadline(); !ok {
			t.Error("the status is asked without a deadline")
		}
		return agent.Status{}, errors.New("the agent is stopping")
	})
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	if len(mfs) != 1 || mfs[0].GetName() != "uplinkd_status_error" || value(mfs[0].GetMetric()[0]) != 1 {
		t.Errorf("gathered %v, want uplinkd_status_error 1 alone", mfs)
	}
	if asked.Load() != 1 {
		t.Errorf("status asked %d times for one scrape", asked.Load())
	}
}

// Without the datapath's figures (its maps unreadable, or no datapath)
// the datapath's traffic metrics are left out, not zero: a zero would read as a
// counter reset. Lines never probed have no RTT, jitter or loss.
func TestMissingFigures(t *testing.T) {
	s := twoLines()
	s.DatapathError = "opening ul_flows: no such file"
	reg := registry(t, fixed(s))
	for _, name := range []string{"uplinkd_line_forwarded_bytes_total", "uplinkd_line_flows", "uplinkd_datapath_packets_total", "uplinkd_flow_map_entries"} {
		if n, err := testutil.GatherAndCount(reg, name); err != nil || n != 0 {
			t.Errorf("%s: %d series (%v) with the datapath's figures missing", name, n, err)
		}
	}
	if got := sum(t, reg, "uplinkd_datapath_error"); got != 1 {
		t.Errorf("uplinkd_datapath_error = %v, want 1", got)
	}
	if n, _ := testutil.GatherAndCount(reg, "uplinkd_line_rtt_seconds"); n != 1 {
		t.Errorf("%d RTT series, want dsl1's only (dsl2 has no samples)", n)
	}
	if n, _ := testutil.GatherAndCount(reg, "uplinkd_line_up"); n != 2 {
		t.Errorf("%d uplinkd_line_up series, want 2", n)
	}

	off := twoLines()
	off.FlowMap, off.Reasons = agent.FlowMapStatus{}, nil // datapath.enabled: false
	reg = registry(t, fixed(off))
	for _, name := range []string{"uplinkd_line_forwarded_bytes_total", "uplinkd_flow_map_capacity", "uplinkd_flow_map_evicted_total"} {
		if n, _ := testutil.GatherAndCount(reg, name); n != 0 {
			t.Errorf("%s: %d series without a datapath", name, n)
		}
	}
	if got := sum(t, reg, "uplinkd_datapath_error"); got != 0 {
		t.Errorf("uplinkd_datapath_error = %v without a datapath, want 0", got)
	}
}

// Every scrape asks for a new status: nothing is cached.
func TestEveryScrapeAsks(t *testing.T) {
	var n atomic.Uint64
	reg := registry(t, func(context.Context) (agent.Status, error) {
		s := twoLines()
		s.Restored = n.Add(1)
		return s, nil
	})
	for want := 1.0; want <= 3; want++ {
		if got := sum(t, reg, "uplinkd_restored_total"); got != want {
			t.Errorf("scrape %v: restored %v", want, got)
		}
	}
}

// freeAddr returns a loopback address with a port nobody listens on.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// scrape GETs url and parses the text exposition.
func scrape(url string) (map[string]*dto.MetricFamily, error) {
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", string(expfmt.NewFormat(expfmt.TypeTextPlain)))
	resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		return nil, errors.New(resp.Status + ": " + string(body))
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	return p.TextToMetricFamilies(resp.Body)
}

// Serve listens at once (an address in use is an error right away),
// serves the uplinkd, Go and process metrics, and stops with its context.
func TestServe(t *testing.T) {
	addr := freeAddr(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := Serve(ctx, addr, fixed(twoLines()), quiet); err != nil {
		t.Fatal(err)
	}
	err := Serve(ctx, addr, fixed(twoLines()), quiet)
	if err == nil || !strings.Contains(err.Error(), addr) || !strings.Contains(err.Error(), "address already in use") {
		t.Errorf("a second Serve on %s: %v, want address already in use", addr, err)
	}
	mfs, err := scrape("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"uplinkd_line_up", "uplinkd_line_tx_bytes_total", "go_goroutines", "process_resident_memory_bytes"} {
		if mfs[name] == nil {
			t.Errorf("no %s served", name)
		}
	}
	if mf := mfs["uplinkd_line_rx_bytes_total"]; mf == nil || mf.GetType() != dto.MetricType_COUNTER || len(mf.GetMetric()) != 2 {
		t.Errorf("uplinkd_line_rx_bytes_total served as %v", mf)
	}
	if _, err := scrape("http://" + addr + "/nosuch"); err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("GET /nosuch: %v, want 404", err)
	}

	cancel()
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			break
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatal("still listening 5 s after its context ended")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// ServeOnceRunning listens only once the agent answers, and not at all
// when it stops first.
func TestServeOnceRunning(t *testing.T) {
	addr := freeAddr(t)
	var ready atomic.Bool
	status := func(ctx context.Context) (agent.Status, error) {
		if !ready.Load() {
			return agent.Status{}, errors.New("the agent is busy")
		}
		return twoLines(), nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- ServeOnceRunning(ctx, addr, status, quiet) }()
	time.Sleep(300 * time.Millisecond)
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
		t.Fatal("listening before the agent answers")
	}
	ready.Store(true)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("not serving 5 s after the agent answered")
	}
	if _, err := scrape("http://" + addr + "/metrics"); err != nil {
		t.Fatal(err)
	}

	stopped, stop := context.WithCancel(context.Background())
	stop()
	never := func(context.Context) (agent.Status, error) {
		return agent.Status{}, errors.New("the agent is stopping")
	}
	if err := ServeOnceRunning(stopped, freeAddr(t), never, quiet); err != nil {
		t.Errorf("agent stopped before it ran: %v, want nil", err)
	}
}

// An HA gateway's status gives its role, takeovers and conntrackd
// resyncs by result.
func TestCollectHA(t *testing.T) {
	s := twoLines()
	s.HA = &agent.HAStatus{Role: "master", Takeovers: 2, TakeoverApplySeconds: 0.05, Resyncs: 7, ResyncErrors: 1}
	reg := registry(t, fixed(s))
	want := `
# HELP uplinkd_ha_conntrack_resyncs_total In an HA pair: the master's periodic conntrackd resyncs (which keep the standby's copies of steady flows from timing out), by result (ok, error), since the agent started.
# TYPE uplinkd_ha_conntrack_resyncs_total counter
uplinkd_ha_conntrack_resyncs_total{result="error"} 1
uplinkd_ha_conntrack_resyncs_total{result="ok"} 7
# HELP uplinkd_ha_master In an HA pair: 1 while this gateway is master (it holds the VIPs), 0 while standby.
# TYPE uplinkd_ha_master gauge
uplinkd_ha_master 1
# HELP uplinkd_ha_takeovers_total In an HA pair: times this gateway became master since the agent started.
# TYPE uplinkd_ha_takeovers_total counter
uplinkd_ha_takeovers_total 2
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"uplinkd_ha_conntrack_resyncs_total", "uplinkd_ha_master", "uplinkd_ha_takeovers_total"); err != nil {
		t.Error(err)
	}
}
