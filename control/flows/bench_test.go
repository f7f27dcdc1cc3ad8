// SPDX-License-Identifier: Apache-2.0

package flows

import (
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/uplinkd/uplinkd/loader"
)

// BenchmarkFlowsCommand1M runs `uplinkd flows` against a pinned flow map
// of a million flows: the full listing (NDJSON) and a filtered top 20,
// each a separate process, so that its peak RSS is its own.
func BenchmarkFlowsCommand1M(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root (bpffs, BPF maps)")
	}
	const flows = 1 << 20
	pinDir := filepath.Join(loader.BPFFSRoot, fmt.Sprintf("uplinkd-bench-flows-%d", os.Getpid()))
	d, err := loader.Load(loader.Options{PinDir: pinDir, FlowEntries: flows})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		d.Close()
		if err := loader.Remove(pinDir); err != nil {
			b.Error(err)
		}
	})
	now := time.Now()
	if err := d.SeedFlows(flows, func(i int) loader.Flow {
		return loader.Flow{
			Proto: 6, Line: i % 3,
			Src:     netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), uint16(1024+i%60000)),
			Dst:     netip.AddrPortFrom(netip.AddrFrom4([4]byte{203, 0, 113, byte(i)}), 443),
			NATAddr: netip.AddrFrom4([4]byte{198, 51, 100, byte(1 + i%3)}),
			TxBytes: uint64(i), RxBytes: uint64(i * 3), TxPackets: 10, RxPackets: 20,
			FirstSeen: now.Add(-time.Hour), LastSeen: now,
		}
	}); err != nil {
		b.Fatal(err)
	}
	bin := filepath.Join(b.TempDir(), "uplinkd")
	if out, err := exec.Command("go", "build", "-o", bin, "../../cmd/uplinkd").CombinedOutput(); err != nil {
		b.Fatalf("building uplinkd: %v\n%s", err, out)
	}
	for _, c := range []struct {
		name string
		args []string
	}{
		{"list-all-json", []string{"--json"}},
		{"list-all-text", nil},
		{"top20-line-sort-bytes", []string{"--line", "2", "--sort", "bytes", "--limit", "20"}},
	} {
		b.Run(c.name, func(b *testing.B) {
			var peak int64
			var lines int
			for range b.N {
				cmd := exec.Command(bin, append([]string{"flows", "--pin-dir", pinDir}, c.args...)...)
				out, err := cmd.StdoutPipe()
				if err != nil {
					b.Fatal(err)
				}
				if err := cmd.Start(); err != nil {
					b.Fatal(err)
				}
				n, _ := io.Copy(countLines{&lines}, out)
				if err := cmd.Wait(); err != nil {
					b.Fatalf("%v (%d bytes out)", err, n)
				}
				peak = max(peak, cmd.ProcessState.SysUsage().(*syscall.Rusage).Maxrss)
			}
			b.ReportMetric(float64(peak)/1024, "peak-RSS-MiB")
			b.ReportMetric(float64(lines)/float64(b.N), "lines/op")
		})
	}
}

type countLines struct{ n *int }

func (c countLines) Write(p []byte) (int, error) {
	for _, ch := range p {
		if ch == '\n' {
			*c.n++
		}
	}
	return len(p), nil
}
