// SPDX-License-Identifier: Apache-2.0

package test

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/uplinkd/uplinkd/control/events"
	"github.com/uplinkd/uplinkd/test/lab"
)

// iperf3 measures TCP throughput from the lab's first client to the
// server, through the gateway, in Gbit/s.
func iperf3(b *testing.B, l *lab.Lab, streams int, secs int) float64 {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs+20)*time.Second)
	defer cancel()
	out, err := l.Clients[0].Command(ctx, "iperf3", "-c", l.ServerAddrs[0].String(), "-t", fmt.Sprint(secs),
		"-P", fmt.Sprint(streams), "-J").Output()
	if err != nil {
		b.Fatalf("iperf3: %v\n%s", err, out)
	}
	var res struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		b.Fatalf("iperf3 output: %v", err)
	}
	return res.End.SumReceived.BitsPerSecond / 1e9
}

// BenchmarkForwarding compares TCP throughput through the lab gateway
// with the datapath attached and without it (the kernel's multipath
// alone), alternating A/B rounds in one run so that the shared machine's
// noise hits both. Run with -benchtime=1x: each b.N is three rounds of each.
func BenchmarkForwarding(b *testing.B) {
	if uplinkd == "" {
		b.Skip("needs root")
	}
	if _, err := exec.LookPath("iperf3"); err != nil {
		b.Skip("needs iperf3 (make deps installs it)")
	}
	for _, streams := range []int{1, 4} {
		b.Run(fmt.Sprintf("streams=%d", streams), func(b *testing.B) {
			l, err := lab.New(lab.Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			srv := l.Server.Command(context.Background(), "iperf3", "-s", "-B", l.ServerAddrs[0].String())
			if err := srv.Start(); err != nil {
				b.Fatal(err)
			}
			defer func() { _ = srv.Process.Kill(); _ = srv.Wait() }()
			time.Sleep(200 * time.Millisecond)

			const rounds = 3
			var with, without float64
			for range b.N * rounds {
				for _, dp := range []bool{true, false} {
					state := b.TempDir()
					file := writeConfig(b, l.Config(lab.ConfigOptions{StateDir: state, NoDatapath: !dp}))
					a := spawnAgent(b, l, file)
					a.waitReady(b)
					g := iperf3(b, l, streams, 3)
					a.stop(b)
					gw(b, l, uplinkd, "down", "-c", file)
					if dp {
						with += g
					} else {
						without += g
					}
				}
			}
			with /= float64(b.N * rounds)
			without /= float64(b.N * rounds)
			b.ReportMetric(with, "Gbit/s-datapath")
			b.ReportMetric(without, "Gbit/s-kernel")
			b.ReportMetric(with/without, "ratio")
		})
	}
}

// waitFor polls cond every 2 ms for up to 10 s and returns how long it took.
func waitFor(b *testing.B, what string, cond func() bool) time.Duration {
	start := time.Now()
	for time.Since(start) < 10*time.Second {
		if cond() {
			return time.Since(start)
		}
		time.Sleep(2 * time.Millisecond)
	}
	b.Fatalf("%s: not within 10s", what)
	return 0
}

// allVia asserts that n new connections all succeed, all through line
// want (1-based) or, with want 0, none through line 1.
func allVia(b *testing.B, l *lab.Lab, srv *lab.EchoServer, n, want int) {
	for i := range n {
		c, seen, err := lab.DialTCP(l.Clients[0], srv.Addr, time.Second)
		if err != nil {
			b.Fatalf("connection %d after the agent acted: %v", i, err)
		}
		c.Close()
		on1 := seen.Addr() == l.Lines[0].Address.Addr()
		if want == 0 && on1 {
			b.Fatalf("connection %d went through the failed line", i)
		}
	}
}

// BenchmarkFailover measures, over trials, the time from a fault on line 1
// to the moment uplinkd has taken the line out of service (every new
// connection then succeeds through line 2, which each trial checks), and
// from the end of the fault to the line's return, with the default health
// settings. Run with -benchtime=1x.
func BenchmarkFailover(b *testing.B) {
	const trials = 20
	for _, fault := range []struct {
		name string
		set  func(l *lab.Lab, on bool) error
	}{
		{"gateway-silent", func(l *lab.Lab, on bool) error { return l.SetGatewaySilent(1, on) }},
		{"carrier-down", func(l *lab.Lab, on bool) error { return l.SetCarrier(1, !on) }},
	} {
		b.Run(fault.name, func(b *testing.B) {
			l, state := newLab(b, lab.Options{})
			startAgent(b, l, writeConfig(b, l.Config(lab.ConfigOptions{StateDir: state})))
			srv := echoServer(b, l)

			var down, up []time.Duration
			for range b.N * trials {
				// A fault at any point of the probe cycle (rounds every
				// 100 ms: a fixed pause would always hit the same point).
				time.Sleep(300*time.Millisecond + rand.N(200*time.Millisecond))
				if err := fault.set(l, true); err != nil {
					b.Fatal(err)
				}
				down = append(down, waitFor(b, "failover", func() bool { return lineOut(b, l, 1) }))
				allVia(b, l, srv, 20, 0)
				if err := fault.set(l, false); err != nil {
					b.Fatal(err)
				}
				up = append(up, waitFor(b, "recovery", func() bool { return lineIn(b, l, 1) }))
			}
			slices.Sort(down)
			slices.Sort(up)
			b.ReportMetric(float64(down[len(down)/2].Milliseconds()), "failover-median-ms")
			b.ReportMetric(float64(down[len(down)-1].Milliseconds()), "failover-max-ms")
			b.ReportMetric(float64(up[len(up)/2].Milliseconds()), "recovery-median-ms")
			b.ReportMetric(float64(up[len(up)-1].Milliseconds()), "recovery-max-ms")
			b.ReportMetric(float64(len(down)), "trials")
		})
	}
}

// BenchmarkLossNoFalseDown runs 5 minutes of 20% random loss on line 1
// (the lab's line-loss fault: ISP 1 drops a fifth of what it sends the
// gateway, probe answers included) with the default health settings, and
// counts the times the agent took the line down: its line-down events and
// the line's health changes, asked over the control socket. It fails on
// any. Run with -benchtime=1x (each b.N is 5 minutes).
func BenchmarkLossNoFalseDown(b *testing.B) {
	const (
		period  = 5 * time.Minute
		percent = 20
	)
	l, state := newLab(b, lab.Options{})
	a := startAgent(b, l, writeConfig(b, l.Config(lab.ConfigOptions{StateDir: state})))
	line := l.Lines[0].Name
	for range b.N {
		before := a.lineStatus(b, line).StateChanges
		if err := l.SetLoss(1, percent); err != nil {
			b.Fatal(err)
		}
		var worst float64
		for end := time.Now().Add(period); time.Now().Before(end); {
			time.Sleep(10 * time.Second)
			worst = max(worst, a.lineStatus(b, line).LossRatio)
		}
		st := a.lineStatus(b, line)
		if err := l.SetLoss(1, 0); err != nil {
			b.Fatal(err)
		}
		downs := a.countEvents(events.LineDown, line)
		b.ReportMetric(float64(downs), "false-downs")
		b.ReportMetric(float64(st.StateChanges-before), "state-changes")
		b.ReportMetric(100*st.LossRatio, "loss-%-last")
		b.ReportMetric(100*worst, "loss-%-worst")
		if downs > 0 || st.StateChanges != before || !st.Usable {
			b.Errorf("%d line-down events, %d health changes in %v of %d%% loss; usable at the end: %v",
				downs, st.StateChanges-before, period, percent, st.Usable)
		}
	}
}

// BenchmarkAgentSteadyState measures the agent's CPU and memory with 4
// and with 16 lines (the most the datapath knows) probed with the default
// health settings, over b.N periods of 10 s of no change (cpu-% is their
// mean).
func BenchmarkAgentSteadyState(b *testing.B) {
	for _, lines := range []int{4, 16} {
		b.Run(fmt.Sprintf("lines=%d", lines), func(b *testing.B) {
			l, state := newLab(b, lab.Options{ISPs: lines})
			a := startAgent(b, l, writeConfig(b, l.Config(lab.ConfigOptions{StateDir: state})))
			time.Sleep(time.Second)
			pid := a.cmd.Process.Pid
			const period = 10 * time.Second
			before := cpuTicks(b, pid)
			for range b.N {
				time.Sleep(period)
			}
			used := float64(cpuTicks(b, pid)-before) / 100 // USER_HZ
			b.ReportMetric(100*used/(period.Seconds()*float64(b.N)), "cpu-%")
			b.ReportMetric(float64(rssKiB(b, pid))/1024, "rss-MiB")
			if a.countEvents(events.LineDown, "") > 0 {
				b.Error("a line went down at steady state")
			}
		})
	}
}

// cpuTicks is a process's user+system time in clock ticks.
func cpuTicks(b *testing.B, pid int) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// Fields after the command name, which is in parentheses.
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return utime + stime
}

func rssKiB(b *testing.B, pid int) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, _ := strconv.ParseInt(strings.Fields(rest)[0], 10, 64)
			return n
		}
	}
	b.Fatal("no VmRSS")
	return 0
}
