// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"fmt"

	"github.com/cilium/ebpf"
)

// Floor holds the floor programs (bpf/floor.c): the least a datapath that
// pins flows in the kernel's LRU hash pays per packet, with uplinkd's own
// flow map, key and header parser and nothing else. Benchmarks time them
// beside uplinkd's programs in one run, to tell what the kernel's map
// costs from what uplinkd adds on top. The agent never loads them.
type Floor struct {
	// Lookup finds an existing flow's packet at LAN ingress.
	Lookup *ebpf.Program
	// LookupReply finds the flow of a reply at LAN egress.
	LookupReply *ebpf.Program
	// Insert misses and inserts a new flow.
	Insert *ebpf.Program
}

// LoadFloor loads the floor programs over flows, a datapath's flow map
// (PinnedFlowMap opens an agent's). The caller closes them.
func LoadFloor(flows *ebpf.Map) (*Floor, error) {
	spec, err := loadFloor()
	if err != nil {
		return nil, fmt.Errorf("loading the floor programs: %w", err)
	}
	// The programs use the flow map alone, and that one is flows: no map
	// is created or pinned.
	spec.Maps[floorMapUlFlows].MaxEntries = flows.MaxEntries()
	var progs floorPrograms
	opts := &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{floorMapUlFlows: flows}}
	if err := spec.LoadAndAssign(&progs, opts); err != nil {
		return nil, fmt.Errorf("loading the floor programs: %w", err)
	}
	return &Floor{Lookup: progs.UplinkdFloorLookup, LookupReply: progs.UplinkdFloorLookupReply, Insert: progs.UplinkdFloorInsert}, nil
}

// Close closes the programs.
func (f *Floor) Close() error {
	return (&floorPrograms{UplinkdFloorLookup: f.Lookup, UplinkdFloorLookupReply: f.LookupReply, UplinkdFloorInsert: f.Insert}).Close()
}
