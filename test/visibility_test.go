// SPDX-License-Identifier: Apache-2.0

package test

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	agentpkg "github.com/uplinkd/uplinkd/control/agent"
	"github.com/uplinkd/uplinkd/control/events"
	"github.com/uplinkd/uplinkd/test/lab"
)

// `uplinkd status` and `uplinkd events` answer from the running agent:
// the status names every line with its health, events --follow streams a
// line taken down as it happens, and without an agent both say so at once.
func TestStatusAndEvents(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	cfg := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state}))

	start := time.Now()
	out, err := l.Gateway.Run(context.Background(), uplinkd, "status", "-c", cfg)
	if err == nil || !strings.Contains(out, "no agent runs with state dir "+state) {
		t.Errorf("status without an agent: %v\n%s\nwant an error naming the state dir", err, out)
	}
	// No hang: a missing agent is said at once (a process start alone
	// takes seconds in the kernel matrix's emulated VMs).
	if d := time.Since(start); d > agentWait {
		t.Errorf("status without an agent took %v", d)
	}

	a := startAgent(t, l, cfg)
	var st agentpkg.Status
	if err := json.Unmarshal([]byte(gw(t, l, uplinkd, "status", "--json", "-c", cfg)), &st); err != nil {
		t.Fatal(err)
	}
	if len(st.Lines) != 2 || st.Lines[0].Name != "dsl1" || st.Lines[1].Number != 2 {
		t.Fatalf("status lines: %+v", st.Lines)
	}
	for _, ln := range st.Lines {
		if !ln.Usable || ln.Health != "up" || ln.Address == "" || ln.WeightEffective != ln.WeightConfigured {
			t.Errorf("line %s at start: %+v", ln.Name, ln)
		}
	}
	// The datapath is on the LAN only: the lines carry no program.
	if len(st.Attached) != 1 || st.Attached[l.LANInterface] == "" {
		t.Errorf("attached: %v, want the LAN only", st.Attached)
	}
	if text := gw(t, l, uplinkd, "status", "-c", cfg); !strings.Contains(text, "dsl2") || !strings.Contains(text, "wan1") {
		t.Errorf("status text:\n%s", text)
	}

	follow := l.Gateway.Command(context.Background(), uplinkd, "events", "--follow", "--json", "-c", cfg)
	stdout, err := follow.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := follow.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = follow.Process.Kill()
		_ = follow.Wait()
	}()
	got := make(chan events.Event)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var e events.Event
			if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
				t.Errorf("events --json line %q: %v", sc.Text(), err)
				continue
			}
			got <- e
		}
		close(got)
	}()
	gw(t, l, uplinkd, "line", "down", "dsl1", "-c", cfg)
	deadline := time.After(agentWait)
	for found := false; !found; {
		select {
		case e, ok := <-got:
			if !ok {
				t.Fatal("events --follow ended")
			}
			found = e.Kind == events.Operator && e.Line == "dsl1" && e.Fields["up"] == "false"
		case <-deadline:
			t.Fatal("events --follow did not stream the line taken down")
		}
	}
	if ln := a.status(t).Lines[0]; ln.Usable || !ln.OperatorDown {
		t.Errorf("dsl1 after line down: %+v", ln)
	}
}

// A flood of new flows into a flow map too small for them: the agent
// reports the map full with its eviction count (rate-limited) and its
// status shows the use.
func TestFlowMapFullReported(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	a := startAgent(t, l, writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, Flows: 1024})))
	const flows = 3000
	srv := netip.AddrPortFrom(l.ServerAddrs[0], 9)
	if err := l.Clients[0].Do(func() error {
		for range flows { // each socket a new source port: a new flow
			c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(srv))
			if err != nil {
				return err
			}
			_, err = c.Write([]byte("x"))
			c.Close()
			if err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	a.waitEvent(t, 1, events.FlowMapFull, "", "capacity=1024")
	fm := a.status(t).FlowMap
	// A few source ports repeat (the kernel picks them at random): those
	// are no new flow.
	if fm.Capacity != 1024 || fm.Inserted < 2*1024 || fm.EvictedAtLeast != fm.Inserted-1024 {
		t.Errorf("status flow map after %d new flows: %+v", flows, fm)
	}
	if n := a.countEvents(events.FlowMapFull, ""); n != 1 {
		t.Errorf("%d flow-map-full events within a minute, want 1", n)
	}
}

// `uplinkd flows` lists every flow with its line, NAT source and bytes
// each way, from the pinned map (also with the agent stopped); filters
// select exactly, --sort with --limit gives the top; status counts the
// lines' bytes and flows.
func TestFlowsAndStatusFigures(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{Clients: 2})
	cfg := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state}))
	a := startAgent(t, l, cfg)
	srv := echoServer(t, l)
	fs := openFlows(t, l, srv.Addr, 20, true)
	for range 3 {
		if broken, _, detail := checkAll(fs); broken > 0 {
			t.Fatalf("flows broken: %v", detail)
		}
	}
	pinned := checkPinned(t, l, fs)

	list := func(args ...string) []flowRow {
		t.Helper()
		out := gw(t, l, uplinkd, append([]string{"flows", "--json", "-c", cfg}, args...)...)
		var rows []flowRow
		sc := bufio.NewScanner(strings.NewReader(out))
		for sc.Scan() {
			var r flowRow
			if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
				t.Fatalf("flows --json line %q: %v", sc.Text(), err)
			}
			rows = append(rows, r)
		}
		return rows
	}
	byClient := map[netip.AddrPort]flowRow{}
	for _, r := range list() {
		byClient[netip.AddrPortFrom(netip.MustParseAddr(r.Client), r.ClientPort)] = r
	}
	for _, f := range fs {
		r, ok := byClient[f.id().src]
		line := l.Lines[pinned[f]]
		switch {
		case !ok:
			t.Errorf("%v (%v) not listed", f, f.id().src)
		case r.Line != line.Name || r.NATSource != line.Address.Addr().String() || r.NATSource != f.seen.Addr().String():
			t.Errorf("%v listed on %s NAT %s, want %s NAT %s", f, r.Line, r.NATSource, line.Name, f.seen.Addr())
		case r.TxBytes == 0 || r.RxBytes == 0 || r.TxPackets < 3 || r.RxPackets < 3:
			t.Errorf("%v: %+v, want packets and bytes each way", f, r)
		}
	}
	for _, r := range list("--line", "dsl2", "--proto", "udp") {
		if r.Line != "dsl2" || r.Proto != "udp" {
			t.Errorf("--line dsl2 --proto udp listed %+v", r)
		}
	}
	c1 := lab.ClientAddr(1).Addr().String()
	for _, r := range list("--client", c1) {
		if r.Client != c1 {
			t.Errorf("--client %s listed %+v", c1, r)
		}
	}
	top := list("--sort", "bytes", "--limit", "3")
	if len(top) != 3 || top[0].TxBytes+top[0].RxBytes < top[2].TxBytes+top[2].RxBytes {
		t.Errorf("--sort bytes --limit 3: %+v", top)
	}
	if out, code := exitCode(t, l, "flows", "-c", cfg, "--line", "nosuch"); code != 2 {
		t.Errorf("flows --line nosuch: exit %d\n%s", code, out)
	}
	if text := gw(t, l, uplinkd, "flows", "-c", cfg, "--limit", "2"); strings.Count(text, "\n") != 3 || !strings.Contains(text, "NAT SOURCE") {
		t.Errorf("flows text:\n%s", text)
	}

	st := a.status(t)
	for _, ln := range st.Lines {
		if ln.TxBytes == 0 || ln.RxBytes == 0 || ln.Flows == 0 {
			t.Errorf("status of %s: tx %d rx %d flows %d, want traffic on every line", ln.Name, ln.TxBytes, ln.RxBytes, ln.Flows)
		}
	}
	if st.Totals.Flows < len(fs) || st.FlowMap.Entries != st.Totals.Flows || st.Reasons["new_flow"] == 0 || st.DatapathError != "" {
		t.Errorf("status totals %+v, flow map %+v, reasons %v, error %q", st.Totals, st.FlowMap, st.Reasons, st.DatapathError)
	}

	a.stop(t)
	if n := len(list()); n < len(fs) {
		t.Errorf("with the agent stopped, flows lists %d flows, want at least %d", n, len(fs))
	}
}

// flowRow is a line of `uplinkd flows --json`.
type flowRow struct {
	Client     string `json:"client"`
	ClientPort uint16 `json:"client_port"`
	Proto      string `json:"proto"`
	Line       string `json:"line"`
	NATSource  string `json:"nat_source"`
	TxPackets  uint64 `json:"tx_packets"`
	TxBytes    uint64 `json:"tx_bytes"`
	RxPackets  uint64 `json:"rx_packets"`
	RxBytes    uint64 `json:"rx_bytes"`
}

// `uplinkd top --once` renders one frame without a terminal: every line
// with its state and throughput bars, and the busiest flows with their
// rates while traffic runs.
func TestTopOnce(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	cfg := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state}))
	startAgent(t, l, cfg)
	srv := echoServer(t, l)
	fs := openFlows(t, l, srv.Addr, 6, false)
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			select {
			case <-done:
				return
			default:
				checkAll(fs)
			}
		}
	}()
	out := gw(t, l, uplinkd, "top", "--once", "-c", cfg, "--flows", "3")
	t.Logf("top --once:\n%s", out)
	close(done)
	<-stopped
	for _, want := range []string{"dsl1", "dsl2", "#", "PROTO", "tcp"} {
		if !strings.Contains(out, want) {
			t.Errorf("top --once lacks %q:\n%s", want, out)
		}
	}
	rows := 0
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "tcp ") && strings.Contains(line, "bit") {
			rows++
		}
	}
	if rows == 0 || rows > 3 {
		t.Errorf("top --once --flows 3 shows %d flows with a rate:\n%s", rows, out)
	}
	if out, code := exitCode(t, l, "top", "-c", cfg); code != 2 || !strings.Contains(out, "needs a terminal") {
		t.Errorf("top without a terminal: exit %d\n%s", code, out)
	}
}
