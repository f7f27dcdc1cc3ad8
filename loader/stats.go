// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/cilium/ebpf"
)

// Stats reads what the datapath counts: the flow map, the per-line
// counters and the per-reason counters. A Datapath has one over the maps
// its programs use; OpenStats opens one over the pinned maps alone, for
// readers that load no program (`uplinkd flows`, metrics), with or
// without a running agent.
type Stats struct {
	flows, lineStats, reasons *ebpf.Map
	reasonNames               []string // by code
	owned                     bool     // opened by OpenStats: Close closes the maps
}

// ErrNoDatapath says the pin dir holds no datapath maps (no agent has run
// with it, or `down` removed them).
var ErrNoDatapath = errors.New("no datapath pinned there")

// OpenStats opens the maps pinned in pinDir read-only.
func OpenStats(pinDir string) (*Stats, error) {
	spec, err := loadUplinkd()
	if err != nil {
		return nil, err
	}
	names, err := reasonNames(spec.Types)
	if err != nil {
		return nil, err
	}
	s := &Stats{reasonNames: names, owned: true}
	ro := &ebpf.LoadPinOptions{ReadOnly: true}
	for _, m := range []struct {
		name string
		to   **ebpf.Map
	}{{"ul_flows", &s.flows}, {"ul_line_stats", &s.lineStats}, {"ul_reasons", &s.reasons}} {
		*m.to, err = ebpf.LoadPinnedMap(filepath.Join(pinDir, m.name), ro)
		if errors.Is(err, os.ErrNotExist) {
			s.Close()
			return nil, fmt.Errorf("%s: %w", pinDir, ErrNoDatapath)
		}
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("opening pinned map %s: %w", m.name, err)
		}
		want := spec.Maps[m.name]
		if got := *m.to; got.KeySize() != want.KeySize || got.ValueSize() != want.ValueSize || got.Type() != want.Type {
			s.Close()
			return nil, fmt.Errorf("pinned map %s in %s has another layout than this uplinkd's (another version's?)", m.name, pinDir)
		}
	}
	return s, nil
}

// Close closes the maps OpenStats opened (a Datapath's close with it).
func (s *Stats) Close() {
	if !s.owned {
		return
	}
	for _, m := range []*ebpf.Map{s.flows, s.lineStats, s.reasons} {
		if m != nil {
			m.Close()
		}
	}
}

// SeedFlows writes n flows, flow(i) for each i, into the flow map as if
// the datapath had pinned them: for benchmarks and tests of the readers
// (a million-flow map is built in seconds, not by a million packets).
func (d *Datapath) SeedFlows(n int, flow func(i int) Flow) error {
	boot, err := bootTime()
	if err != nil {
		return err
	}
	const batch = 1 << 14
	keys := make([]uplinkdFlowKey, batch)
	vals := make([]uplinkdFlow, batch)
	for start := 0; start < n; start += batch {
		m := min(batch, n-start)
		for i := range m {
			f := flow(start + i)
			family := uint8(unix.AF_INET6)
			if f.Src.Addr().Is4() {
				family = unix.AF_INET
			}
			keys[i] = uplinkdFlowKey{Family: family, Proto: f.Proto, Saddr: f.Src.Addr().As16(), Daddr: f.Dst.Addr().As16(), Sport: f.Src.Port(), Dport: f.Dst.Port()}
			v := uplinkdFlow{
				Line: uint32(f.Line), TxPackets: f.TxPackets, TxBytes: f.TxBytes, RxPackets: f.RxPackets, RxBytes: f.RxBytes,
				FirstSeen: uint64(f.FirstSeen.Sub(boot)), LastSeen: uint64(f.LastSeen.Sub(boot)),
			}
			if f.NATAddr.IsValid() {
				v.NatAddr = f.NATAddr.As16()
			}
			if f.Recovered {
				v.Flags |= flowRecovered
			}
			vals[i] = v
		}
		if err := d.w.batchUpdate(d.objs.UlFlows, keys[:m], vals[:m]); err != nil {
			return fmt.Errorf("seeding flows: %w", err)
		}
	}
	return nil
}
