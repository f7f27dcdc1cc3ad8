// SPDX-License-Identifier: Apache-2.0

package test

import (
	"testing"

	"github.com/uplinkd/uplinkd/test/lab"
)

// Without the datapath uplinkd is the seed on a stock kernel: a weight
// change re-hashes established NAT'd flows onto another line, and they
// break (TCP: the server answers the new source with RST) or move (UDP: a
// new NAT source). This is the failure the datapath exists for; the
// datapath test runs the same change and sees none.
func TestWeightChangeWithoutDatapathBreaksFlows(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{Clients: 2})
	opts := lab.ConfigOptions{StateDir: state, NoDatapath: true, Weights: []int{1, 1}}
	file := writeConfig(t, l.Config(opts))
	a := startAgent(t, l, file)
	srv := echoServer(t, l)

	flows := openFlows(t, l, srv.Addr, 64, true)
	if broken, moved, detail := checkAll(flows); broken+moved > 0 {
		t.Fatalf("before any change: %d broken, %d moved: %v", broken, moved, detail)
	}
	opts.Weights = []int{1, 3}
	a.reload(t, file, l.Config(opts))
	broken, moved, _ := checkAll(flows)
	t.Logf("kernel multipath alone, weights 1:1 -> 1:3, 64 flows (half TCP, half UDP): %d broken, %d moved", broken, moved)
	// Hash-threshold multipath moves the flows in a quarter of the hash
	// space: none of 64 moving has probability 0.75^64 < 1e-7.
	if broken+moved == 0 {
		t.Error("no flow broke or moved: this test no longer shows what the datapath fixes")
	}
}
