// SPDX-License-Identifier: Apache-2.0

package test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/uplinkd/uplinkd/test/lab"
)

// scrapeMetrics GETs http://addr/metrics from inside h's namespace and
// parses the text exposition. The connection is dialled in the namespace
// (nsdo's thread); the HTTP exchange then uses it from any goroutine.
func scrapeMetrics(t testing.TB, h *lab.Host, addr string) metricSet {
	t.Helper()
	var conn net.Conn
	if err := h.Do(func() (err error) {
		conn, err = net.DialTimeout("tcp", addr, 5*time.Second)
		return err
	}); err != nil {
		t.Fatalf("connecting to the metrics endpoint: %v", err)
	}
	tr := &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(context.Context, string, string) (net.Conn, error) {
			if conn == nil {
				return nil, errors.New("one connection a scrape")
			}
			c := conn
			conn = nil
			return c, nil
		},
	}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequest("GET", "http://"+addr+"/metrics", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", string(expfmt.NewFormat(expfmt.TypeTextPlain)))
	resp, err := (&http.Client{Transport: tr, Timeout: 15 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("scraping %s: %v", addr, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scraping %s: %s %v\n%s", addr, resp.Status, err, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("parsing the exposition: %v\n%s", err, body)
	}
	return metricSet(mfs)
}

// metricSet is a parsed scrape.
type metricSet map[string]*dto.MetricFamily

// get returns the value of the series of name whose labels include
// labels ("k=v" each); ok false when there is none.
func (m metricSet) get(name string, labels ...string) (v float64, ok bool) {
	for _, s := range m[name].GetMetric() {
		have := map[string]string{}
		for _, lp := range s.GetLabel() {
			have[lp.GetName()] = lp.GetValue()
		}
		match := true
		for _, kv := range labels {
			k, want, _ := strings.Cut(kv, "=")
			match = match && have[k] == want
		}
		if match {
			switch {
			case s.Gauge != nil:
				return s.GetGauge().GetValue(), true
			case s.Counter != nil:
				return s.GetCounter().GetValue(), true
			}
		}
	}
	return 0, false
}

// sum adds up every series of name.
func (m metricSet) sum(name string) float64 {
	total := 0.0
	for _, s := range m[name].GetMetric() {
		total += s.GetGauge().GetValue() + s.GetCounter().GetValue()
	}
	return total
}

// freePort returns a loopback address free in h's namespace.
func freePort(t testing.TB, h *lab.Host) string {
	t.Helper()
	var addr string
	if err := h.Do(func() error {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		addr = ln.Addr().String()
		return ln.Close()
	}); err != nil {
		t.Fatal(err)
	}
	return addr
}

// The metrics endpoint, scraped inside the gateway and parsed with expfmt:
// every line up, the traffic counters those of the agent's status and
// grown by at least the bytes sent through each line, flows per line,
// the flow map's size, packets by reason.
func TestMetricsEndpoint(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{Clients: 2})
	addr := freePort(t, l.Gateway)
	cfg := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, Extra: "metrics:\n  listen: " + addr + "\n"}))
	a := startAgent(t, l, cfg)
	srv := echoServer(t, l)
	fs := openFlows(t, l, srv.Addr, 20, true)
	if broken, _, detail := checkAll(fs); broken > 0 {
		t.Fatalf("flows broken: %v", detail)
	}
	pinned := checkPinned(t, l, fs)
	// Health is judged on the first probes: wait until both lines have
	// samples (RTT) to show.
	a.waitFor(t, "probing both lines", func() bool {
		for _, ln := range a.status(t).Lines {
			if ln.Samples == 0 || ln.Health != "up" {
				return false
			}
		}
		return true
	})

	// The status read between two scrapes lies between them: the
	// counters are the datapath's, read at scrape time (probes go on
	// adding to them).
	before := scrapeMetrics(t, l.Gateway, addr)
	st := a.status(t)
	after := scrapeMetrics(t, l.Gateway, addr)
	for _, ln := range st.Lines {
		for _, c := range []struct {
			name   string
			status uint64
		}{
			{"uplinkd_line_tx_bytes_total", ln.TxBytes},
			{"uplinkd_line_rx_bytes_total", ln.RxBytes},
			{"uplinkd_line_tx_packets_total", ln.TxPackets},
			{"uplinkd_line_rx_packets_total", ln.RxPackets},
		} {
			b, okb := before.get(c.name, "line="+ln.Name)
			a, oka := after.get(c.name, "line="+ln.Name)
			if !okb || !oka || b == 0 || b > float64(c.status) || float64(c.status) > a {
				t.Errorf("%s{line=%q}: scraped %v (%v), then status %d, then scraped %v (%v)", c.name, ln.Name, b, okb, c.status, a, oka)
			}
		}
	}

	m := after
	for _, ln := range l.Lines {
		for _, c := range []struct {
			name   string
			labels []string
			want   float64
		}{
			{"uplinkd_line_up", nil, 1},
			{"uplinkd_line_health_state", []string{"state=up"}, 1},
			{"uplinkd_line_health_state", []string{"state=down"}, 0},
			{"uplinkd_line_carrier", nil, 1},
			{"uplinkd_line_operator_down", nil, 0},
			{"uplinkd_line_weight", []string{"kind=configured"}, 1},
			{"uplinkd_line_weight", []string{"kind=effective"}, 1},
			{"uplinkd_line_info", []string{"interface=" + ln.Interface}, 1},
		} {
			if v, ok := m.get(c.name, append(c.labels, "line="+ln.Name)...); !ok || v != c.want {
				t.Errorf("%s{line=%q %v} = %v (present %v), want %v", c.name, ln.Name, c.labels, v, ok, c.want)
			}
		}
		if v, ok := m.get("uplinkd_line_rtt_seconds", "line="+ln.Name); !ok || v <= 0 || v > 1 {
			t.Errorf("uplinkd_line_rtt_seconds{line=%q} = %v (present %v), want a lab's RTT", ln.Name, v, ok)
		}
		if v, ok := m.get("uplinkd_line_loss_ratio", "line="+ln.Name); !ok || v < 0 || v > 1 {
			t.Errorf("uplinkd_line_loss_ratio{line=%q} = %v (present %v)", ln.Name, v, ok)
		}
		if _, ok := m.get("uplinkd_line_jitter_seconds", "line="+ln.Name); !ok {
			t.Errorf("no uplinkd_line_jitter_seconds{line=%q}", ln.Name)
		}
		if _, ok := m.get("uplinkd_line_state_changes_total", "line="+ln.Name); !ok {
			t.Errorf("no uplinkd_line_state_changes_total{line=%q}", ln.Name)
		}
	}
	perLine := map[string]int{}
	for _, i := range pinned {
		perLine[l.Lines[i].Name]++
	}
	for name, n := range perLine {
		if v, _ := m.get("uplinkd_line_flows", "line="+name); v < float64(n) {
			t.Errorf("uplinkd_line_flows{line=%q} = %v, want at least the %d flows pinned to it", name, v, n)
		}
	}
	for _, c := range []struct {
		name string
		ok   func(float64) bool
		want string
	}{
		{"uplinkd_line_flows", func(v float64) bool { return v >= float64(len(fs)) }, fmt.Sprintf(">= %d (summed)", len(fs))},
		{"uplinkd_flow_map_entries", func(v float64) bool { return v >= float64(len(fs)) }, fmt.Sprintf(">= %d", len(fs))},
		{"uplinkd_flow_map_capacity", func(v float64) bool { return v == 65536 }, "65536 (the lab's flow_entries)"},
		{"uplinkd_flow_map_evicted_total", func(v float64) bool { return v == 0 }, "0"},
		{"uplinkd_status_error", func(v float64) bool { return v == 0 }, "0"},
		{"uplinkd_datapath_error", func(v float64) bool { return v == 0 }, "0"},
		{"uplinkd_all_lines_down", func(v float64) bool { return v == 0 }, "0"},
		{"uplinkd_reconcile_errors_total", func(v float64) bool { return v == 0 }, "0"},
	} {
		if _, present := m[c.name]; !present || !c.ok(m.sum(c.name)) {
			t.Errorf("%s = %v (present %v), want %s", c.name, m.sum(c.name), present, c.want)
		}
	}
	if v, _ := m.get("uplinkd_datapath_packets_total", "reason=new_flow"); v < float64(len(fs)) {
		t.Errorf(`uplinkd_datapath_packets_total{reason="new_flow"} = %v, want at least %d`, v, len(fs))
	}
	if v, _ := m.get("uplinkd_datapath_packets_total", "reason=existing_flow"); v == 0 {
		t.Error(`uplinkd_datapath_packets_total{reason="existing_flow"} = 0`)
	}
	if m["go_goroutines"] == nil || m["process_resident_memory_bytes"] == nil {
		t.Error("no Go runtime or process metrics")
	}
	for name, mf := range m {
		if mf.GetHelp() == "" {
			t.Errorf("%s has no help", name)
		}
	}

	// A known amount of traffic through each line: 100 round trips of
	// 1000 bytes on every TCP flow. Each line's counters grow by at least
	// the payload of its flows, each way.
	const rounds, size = 100, 1000
	payload := bytes.Repeat([]byte("m"), size)
	sent := map[string]float64{}
	for _, f := range fs {
		if f.tcp == nil {
			continue
		}
		buf := make([]byte, size)
		_ = f.tcp.SetDeadline(time.Now().Add(10 * time.Second))
		for range rounds {
			if _, err := f.tcp.Write(payload); err != nil {
				t.Fatalf("%v: %v", f, err)
			}
			if _, err := io.ReadFull(f.rd, buf); err != nil || !bytes.Equal(buf, payload) {
				t.Fatalf("%v: echo %v", f, err)
			}
		}
		sent[l.Lines[pinned[f]].Name] += rounds * size
	}
	grown := scrapeMetrics(t, l.Gateway, addr)
	for _, ln := range l.Lines {
		for _, name := range []string{"uplinkd_line_tx_bytes_total", "uplinkd_line_rx_bytes_total"} {
			b, _ := m.get(name, "line="+ln.Name)
			g, _ := grown.get(name, "line="+ln.Name)
			if g-b < sent[ln.Name] {
				t.Errorf("%s{line=%q} grew by %v after %v payload bytes each way through it", name, ln.Name, g-b, sent[ln.Name])
			}
		}
		b, _ := m.get("uplinkd_line_tx_packets_total", "line="+ln.Name)
		g, _ := grown.get("uplinkd_line_tx_packets_total", "line="+ln.Name)
		if sent[ln.Name] > 0 && g-b < rounds {
			t.Errorf("uplinkd_line_tx_packets_total{line=%q} grew by %v after %d writes", ln.Name, g-b, rounds)
		}
	}
	if len(sent) != len(l.Lines) {
		t.Errorf("TCP flows on %d lines (%v), want traffic through every line", len(sent), sent)
	}
	t.Logf("payload per line each way: %v", sent)
}

// listeners returns the TCP sockets uplinkd listens on in the gateway.
func listeners(t testing.TB, l *lab.Lab) []string {
	t.Helper()
	var out []string
	for _, line := range strings.Split(gw(t, l, "ss", "-ltnpH"), "\n") {
		if f := strings.Fields(line); len(f) >= 4 && strings.Contains(line, `"uplinkd"`) {
			out = append(out, f[3])
		}
	}
	return out
}

// Without a metrics block the endpoint is on 127.0.0.1:9488 only; a
// reload cannot move it; an address in use stops `run` with exit 1
// naming it; listen "" turns it off.
func TestMetricsDefaultAndOff(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	cfg := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state}))
	a := startAgent(t, l, cfg)
	var got []string
	a.waitFor(t, "listening for metrics", func() bool {
		got = listeners(t, l)
		return len(got) > 0
	})
	if len(got) != 1 || got[0] != "127.0.0.1:9488" {
		t.Errorf("uplinkd listens on %v, want 127.0.0.1:9488 alone", got)
	}
	if v, ok := scrapeMetrics(t, l.Gateway, "127.0.0.1:9488").get("uplinkd_line_up", "line=dsl1"); !ok || v != 1 {
		t.Errorf(`uplinkd_line_up{line="dsl1"} = %v (present %v)`, v, ok)
	}

	moved := l.Config(lab.ConfigOptions{StateDir: state, Extra: "metrics:\n  listen: 127.0.0.1:9489\n"})
	if err := os.WriteFile(cfg, []byte(moved), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, code := exitCode(t, l, "reload", "-c", cfg); code != 1 || !strings.Contains(out, "metrics.listen cannot change while running") {
		t.Errorf("reload moving the endpoint: exit %d\n%s\nwant it refused", code, out)
	}
	if got := listeners(t, l); len(got) != 1 || got[0] != "127.0.0.1:9488" {
		t.Errorf("after the refused reload uplinkd listens on %v", got)
	}
	a.stop(t)

	// Someone else holds the address.
	var other net.Listener
	if err := l.Gateway.Do(func() (err error) {
		other, err = net.Listen("tcp", "127.0.0.1:9489")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	out, code := exitCode(t, l, "run", "-c", cfg)
	if code != 1 || !strings.Contains(out, "metrics.listen") || !strings.Contains(out, "127.0.0.1:9489") || !strings.Contains(out, "address already in use") {
		t.Errorf("run with the metrics address taken: exit %d\n%s\nwant exit 1 naming the address", code, out)
	}
	other.Close()

	off := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, Extra: "metrics:\n  listen: \"\"\n"}))
	startAgent(t, l, off)
	if got := listeners(t, l); len(got) != 0 {
		t.Errorf("with metrics.listen \"\" uplinkd listens on %v", got)
	}
}
