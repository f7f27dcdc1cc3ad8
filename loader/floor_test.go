// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"testing"

	"github.com/cilium/ebpf"
)

// The floor programs work on the flow map they are given: the insert pins
// a new flow there, and the lookups find it (they return TC_ACT_UNSPEC
// either way, so the map is what shows it).
func TestFloorInsertsIntoTheFlowMap(t *testing.T) {
	d := load(t, Options{})
	f, err := LoadFloor(d.objs.UlFlows)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := tcp4(7)
	run(t, f.Insert, p.bytes(), 0)
	var flows []Flow
	if err := d.Stats.Flows(func(f Flow) bool { flows = append(flows, f); return true }); err != nil {
		t.Fatal(err)
	}
	if len(flows) != 1 || flows[0].Src.Port() != p.sport || flows[0].Dst.Port() != p.dport {
		t.Fatalf("flows after the floor's insert: %+v, want the one of %v:%d -> %v:%d", flows, p.src, p.sport, p.dst, p.dport)
	}
	for _, prog := range []*ebpf.Program{f.Lookup, f.LookupReply} {
		run(t, prog, p.bytes(), 0)
	}
}
