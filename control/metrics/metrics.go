// SPDX-License-Identifier: Apache-2.0

// Package metrics serves the agent's figures to Prometheus. Every scrape
// asks the agent for one Status (the run loop's view and the datapath's
// counters read from the pinned maps at that moment: per-CPU values summed,
// the flow map streamed in batches, never copied whole) and turns it into
// constant metrics: the values of one scrape are consistent with each
// other, and nothing is cached between scrapes.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/uplinkd/uplinkd/control/agent"
)

// StatusFunc returns the agent's status: (*agent.Agent).Status.
type StatusFunc func(ctx context.Context) (agent.Status, error)

// StatusTimeout bounds how long a scrape waits for the agent's status
// (below Prometheus's default scrape timeout of 10 s); past it the scrape
// says uplinkd_status_error 1.
const StatusTimeout = 9 * time.Second

// Health states, as in agent.LineStatus.Health.
var healthStates = []string{"up", "late", "down", "probing"}

// Metric names, with their help, type and labels.
var (
	lineInfo = prometheus.NewDesc("uplinkd_line_info",
		"A line of the config: its interface and number (the datapath index + 1); always 1.",
		[]string{"line", "interface", "number"}, nil)
	lineUp = prometheus.NewDesc("uplinkd_line_up",
		"1 when new flows may be sent over the line (carrier, not taken down, healthy and not late, addressed), else 0.",
		[]string{"line"}, nil)
	lineHealthState = prometheus.NewDesc("uplinkd_line_health_state",
		"The probes' judgement of the line: 1 for its current state (up, late, down or probing), 0 for the others.",
		[]string{"line", "state"}, nil)
	lineCarrier = prometheus.NewDesc("uplinkd_line_carrier",
		"1 when the line's interface has carrier, else 0.",
		[]string{"line"}, nil)
	lineOperatorDown = prometheus.NewDesc("uplinkd_line_operator_down",
		"1 when the line was taken out of service with `uplinkd line down`, else 0.",
		[]string{"line"}, nil)
	lineTxBytes = prometheus.NewDesc("uplinkd_line_tx_bytes_total",
		"Bytes sent out of the line's interface to the ISP, as the kernel counts them (the gateway's own traffic included).",
		[]string{"line"}, nil)
	lineRxBytes = prometheus.NewDesc("uplinkd_line_rx_bytes_total",
		"Bytes received on the line's interface from the ISP, as the kernel counts them (the gateway's own traffic included).",
		[]string{"line"}, nil)
	lineTxPackets = prometheus.NewDesc("uplinkd_line_tx_packets_total",
		"Packets sent out of the line's interface to the ISP, as the kernel counts them.",
		[]string{"line"}, nil)
	lineRxPackets = prometheus.NewDesc("uplinkd_line_rx_packets_total",
		"Packets received on the line's interface from the ISP, as the kernel counts them.",
		[]string{"line"}, nil)
	lineForwardedBytes = prometheus.NewDesc("uplinkd_line_forwarded_bytes_total",
		"Bytes of the LAN's flows pinned to the line, as the datapath counts them: direction tx out at LAN ingress, rx back at LAN egress.",
		[]string{"line", "direction"}, nil)
	lineRTT = prometheus.NewDesc("uplinkd_line_rtt_seconds",
		"Mean round-trip time of the line's answered probes over the health window.",
		[]string{"line"}, nil)
	lineJitter = prometheus.NewDesc("uplinkd_line_jitter_seconds",
		"Jitter of the line's probes over the health window: the mean absolute difference of successive round-trip times.",
		[]string{"line"}, nil)
	lineLoss = prometheus.NewDesc("uplinkd_line_loss_ratio",
		"Share of the line's probes lost over the health window, 0..1.",
		[]string{"line"}, nil)
	lineSamples = prometheus.NewDesc("uplinkd_line_probe_samples",
		"Probes in the health window that RTT, jitter and loss are measured over.",
		[]string{"line"}, nil)
	lineWeight = prometheus.NewDesc("uplinkd_line_weight",
		"The line's weight: kind=\"configured\" as in the config, kind=\"effective\" the share of new flows it gets now (adaptive weights lower it).",
		[]string{"line", "kind"}, nil)
	lineFlows = prometheus.NewDesc("uplinkd_line_flows",
		"Flows pinned to the line in the datapath's flow map.",
		[]string{"line"}, nil)
	lineStateChanges = prometheus.NewDesc("uplinkd_line_state_changes_total",
		"Health changes of the line (to up, late, down or probing) since the agent started.",
		[]string{"line"}, nil)
	datapathPackets = prometheus.NewDesc("uplinkd_datapath_packets_total",
		"Packets the datapath's LAN ingress handled, by reason (new_flow, existing_flow, recovered_ct, moved_flow, dead_line_tcp, ...).",
		[]string{"reason"}, nil)
	flowMapEntries = prometheus.NewDesc("uplinkd_flow_map_entries",
		"Flows in the datapath's flow map now.", nil, nil)
	flowMapCapacity = prometheus.NewDesc("uplinkd_flow_map_capacity",
		"Size of the datapath's flow map (datapath.flow_entries).", nil, nil)
	flowMapInserted = prometheus.NewDesc("uplinkd_flow_map_inserted_total",
		"Flows pinned since the datapath's maps were created.", nil, nil)
	flowMapEvicted = prometheus.NewDesc("uplinkd_flow_map_evicted_total",
		"Pinned flows the full flow map evicted for new ones since its maps were created (a lower bound).", nil, nil)
	slowParsed = prometheus.NewDesc("uplinkd_datapath_slow_parsed_packets_total",
		"LAN packets the datapath's fast, direct-access parser could not read (VLAN tags, IP options, IPv6 extension headers, ICMP, headers outside the linear data, packets not steered at all).", nil, nil)
	reconcileErrors = prometheus.NewDesc("uplinkd_reconcile_errors_total",
		"Applies of the config to the kernel that failed since the agent started.", nil, nil)
	restored = prometheus.NewDesc("uplinkd_restored_total",
		"Repairs of uplinkd's kernel state that someone else changed or deleted, since the agent started.", nil, nil)
	allLinesDown = prometheus.NewDesc("uplinkd_all_lines_down",
		"1 when every line failed its probes (the last usable lines are kept carrying traffic), else 0.", nil, nil)
	datapathError = prometheus.NewDesc("uplinkd_datapath_error",
		"1 when the datapath's figures (traffic, flows, reasons) could not be read for this scrape, else 0.", nil, nil)
	haMaster = prometheus.NewDesc("uplinkd_ha_master",
		"In an HA pair: 1 while this gateway is master (it holds the VIPs), 0 while standby.", nil, nil)
	haTakeovers = prometheus.NewDesc("uplinkd_ha_takeovers_total",
		"In an HA pair: times this gateway became master since the agent started.", nil, nil)
	haTakeoverApply = prometheus.NewDesc("uplinkd_ha_takeover_apply_seconds",
		"In an HA pair: from the last takeover (the LAN VIP seen here) until the kernel state followed it.", nil, nil)
	haResyncs = prometheus.NewDesc("uplinkd_ha_conntrack_resyncs_total",
		"In an HA pair: the master's periodic conntrackd resyncs (which keep the standby's copies of steady flows from timing out), by result (ok, error), since the agent started.", []string{"result"}, nil)
	ruleHits = prometheus.NewDesc("uplinkd_rule_hits_total",
		"New flows each rule matched since its rule set was installed (a reload that changes the rules starts it again).",
		[]string{"rule", "policy"}, nil)
	policyFlows = prometheus.NewDesc("uplinkd_policy_flows_total",
		"New flows the rules gave each policy since the datapath's maps were created (the balanced policy's include those no rule matched).",
		[]string{"policy"}, nil)
	policyBytes = prometheus.NewDesc("uplinkd_policy_bytes_total",
		"Bytes of the flows the rules gave each policy, as the datapath counts them (direction tx out at LAN ingress, rx back at LAN egress); a gateway without rules counts none: uplinkd_line_forwarded_bytes_total is then the balanced policy's.",
		[]string{"policy", "direction"}, nil)
	policyPackets = prometheus.NewDesc("uplinkd_policy_packets_total",
		"Packets of the flows the rules gave each policy, as uplinkd_policy_bytes_total counts their bytes.",
		[]string{"policy", "direction"}, nil)
	policyPinned = prometheus.NewDesc("uplinkd_policy_pinned_flows",
		"Flows of each policy in the datapath's flow map now (counted with uplinkd_line_flows).",
		[]string{"policy"}, nil)
	policyTier = prometheus.NewDesc("uplinkd_policy_tier",
		"The tier (1-based, by metric) whose lines get the policy's new flows now; 0 while none of its lines is usable (its last resort).",
		[]string{"policy"}, nil)
	statusError = prometheus.NewDesc("uplinkd_status_error",
		"1 when the agent did not give its status for this scrape (starting, busy or stopping): no other uplinkd metric is given then.", nil, nil)
)

// Collector turns the agent's status into metrics, one status a scrape.
type Collector struct {
	ctx    context.Context
	status StatusFunc
	log    *slog.Logger
}

// NewCollector returns a collector asking status for every scrape; ctx
// ends the scrapes' waiting (the agent stopping).
func NewCollector(ctx context.Context, status StatusFunc, log *slog.Logger) *Collector {
	return &Collector{ctx: ctx, status: status, log: log}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		lineInfo, lineUp, lineHealthState, lineCarrier, lineOperatorDown,
		lineTxBytes, lineRxBytes, lineTxPackets, lineRxPackets, lineForwardedBytes,
		lineRTT, lineJitter, lineLoss, lineSamples, lineWeight, lineFlows, lineStateChanges,
		datapathPackets, flowMapEntries, flowMapCapacity, flowMapInserted, flowMapEvicted,
		slowParsed, reconcileErrors, restored, allLinesDown, datapathError, statusError,
		haMaster, haTakeovers, haTakeoverApply, haResyncs, ruleHits, policyFlows, policyBytes, policyPackets, policyPinned, policyTier,
	} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(c.ctx, StatusTimeout)
	defer cancel()
	s, err := c.status(ctx)
	if err != nil {
		c.log.Warn("metrics: no status from the agent", "err", err)
		ch <- prometheus.MustNewConstMetric(statusError, prometheus.GaugeValue, 1)
		return
	}
	ch <- prometheus.MustNewConstMetric(statusError, prometheus.GaugeValue, 0)
	collect(ch, s)
}

// collect emits the metrics of one status.
func collect(ch chan<- prometheus.Metric, s agent.Status) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	// The datapath's figures are there when it runs (its flow map has a
	// size) and its maps could be read; otherwise they are left out rather
	// than given as zeros, which would read as counter resets.
	datapath := s.FlowMap.Capacity > 0 && s.DatapathError == ""
	gauge(datapathError, b2f(s.DatapathError != ""))
	gauge(allLinesDown, b2f(s.AllLinesDown))
	counter(reconcileErrors, s.ReconcileErrors)
	counter(restored, s.Restored)
	if s.HA != nil {
		gauge(haMaster, b2f(s.HA.Role == "master"))
		counter(haTakeovers, s.HA.Takeovers)
		gauge(haTakeoverApply, s.HA.TakeoverApplySeconds)
		counter(haResyncs, s.HA.Resyncs, "ok")
		counter(haResyncs, s.HA.ResyncErrors, "error")
	}
	if s.FlowMap.Capacity > 0 {
		gauge(flowMapCapacity, float64(s.FlowMap.Capacity))
		counter(flowMapInserted, s.FlowMap.Inserted)
		counter(flowMapEvicted, s.FlowMap.EvictedAtLeast)
	}
	if datapath {
		gauge(flowMapEntries, float64(s.FlowMap.Entries))
		counter(slowParsed, s.SlowParsed)
		for reason, n := range s.Reasons {
			counter(datapathPackets, n, reason)
		}
	}
	for _, p := range s.Policies {
		gauge(policyTier, float64(p.Tier), p.Name)
		if datapath {
			counter(policyFlows, p.Flows, p.Name)
			counter(policyBytes, p.TxBytes, p.Name, "tx")
			counter(policyBytes, p.RxBytes, p.Name, "rx")
			counter(policyPackets, p.TxPackets, p.Name, "tx")
			counter(policyPackets, p.RxPackets, p.Name, "rx")
			gauge(policyPinned, float64(p.Pinned), p.Name)
		}
	}
	if datapath {
		for _, r := range s.Rules {
			counter(ruleHits, r.Hits, r.Name, r.Policy)
		}
	}
	for _, l := range s.Lines {
		gauge(lineInfo, 1, l.Name, l.Interface, strconv.Itoa(l.Number))
		gauge(lineUp, b2f(l.Usable), l.Name)
		for _, st := range healthStates {
			gauge(lineHealthState, b2f(l.Health == st), l.Name, st)
		}
		gauge(lineCarrier, b2f(l.Carrier), l.Name)
		gauge(lineOperatorDown, b2f(l.OperatorDown), l.Name)
		gauge(lineWeight, float64(l.WeightConfigured), l.Name, "configured")
		gauge(lineWeight, float64(l.WeightEffective), l.Name, "effective")
		counter(lineStateChanges, l.StateChanges, l.Name)
		gauge(lineSamples, float64(l.Samples), l.Name)
		if l.Samples > 0 {
			// Without probes in the window there is nothing measured: no
			// sample rather than a made-up zero.
			gauge(lineRTT, l.RTTSeconds, l.Name)
			gauge(lineJitter, l.JitterSeconds, l.Name)
			gauge(lineLoss, l.LossRatio, l.Name)
		}
		counter(lineTxBytes, l.TxBytes, l.Name)
		counter(lineRxBytes, l.RxBytes, l.Name)
		counter(lineTxPackets, l.TxPackets, l.Name)
		counter(lineRxPackets, l.RxPackets, l.Name)
		if datapath {
			counter(lineForwardedBytes, l.ForwardedTxBytes, l.Name, "tx")
			counter(lineForwardedBytes, l.ForwardedRxBytes, l.Name, "rx")
			gauge(lineFlows, float64(l.Flows), l.Name)
		}
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// NewRegistry returns a registry with the agent's collector and the Go
// runtime's and the process's.
func NewRegistry(ctx context.Context, status StatusFunc, log *slog.Logger) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		NewCollector(ctx, status, log),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return reg
}

// maxScrapes bounds the scrapes served at once: each one reads the whole
// flow map. More get 503 Service Unavailable.
const maxScrapes = 4

// Handler serves reg's metrics (GET /metrics) and a pointer to them (GET /).
func Handler(reg *prometheus.Registry, log *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog:            slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		ErrorHandling:       promhttp.ContinueOnError,
		MaxRequestsInFlight: maxScrapes,
	}))
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "uplinkd: metrics at /metrics")
	})
	return mux
}

// Serve listens on listen (host:port) and serves the agent's metrics there
// until ctx ends. It returns at once: an error when it cannot listen (the
// address in use, not this host's), else nil with the server running.
func Serve(ctx context.Context, listen string, status StatusFunc, log *slog.Logger) error {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", listen)
	if err != nil {
		return fmt.Errorf("metrics endpoint: %w", err)
	}
	srv := &http.Server{
		Handler:           Handler(NewRegistry(ctx, status, log), log),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      StatusTimeout + 20*time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	log.Info("metrics endpoint listening", "address", ln.Addr().String(), "path", "/metrics")
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics endpoint stopped", "address", listen, "err", err)
		}
	}()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil {
			srv.Close()
		}
	}()
	return nil
}

// ServeOnceRunning waits until the agent answers (it has taken its state
// and pin dirs and applied its config: a second agent is refused for
// those, not for the port), then serves as Serve does. It returns nil
// without serving when ctx ends first.
func ServeOnceRunning(ctx context.Context, listen string, status StatusFunc, log *slog.Logger) error {
	for {
		if _, err := status(ctx); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(100 * time.Millisecond):
		}
	}
	return Serve(ctx, listen, status, log)
}
