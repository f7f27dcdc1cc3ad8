// SPDX-License-Identifier: Apache-2.0

package test

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"testing"
	"time"

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
// noise hits both. Run with -benchtime=1x: each b.N is one round of each.
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

			var with, without float64
			for range b.N {
				for _, dp := range []bool{true, false} {
					state := b.TempDir()
					file := writeConfig(b, l.Config(lab.ConfigOptions{StateDir: state, NoDatapath: !dp}))
					a := spawnAgent(b, l, file)
					a.waitLog(b, "msg=applied", 1)
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
			with /= float64(b.N)
			without /= float64(b.N)
			b.ReportMetric(with, "Gbit/s-datapath")
			b.ReportMetric(without, "Gbit/s-kernel")
			b.ReportMetric(with/without, "ratio")
		})
	}
}
