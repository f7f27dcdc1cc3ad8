// SPDX-License-Identifier: Apache-2.0

package agent

import (
	"time"

	"github.com/uplinkd/uplinkd/control/events"
)

// flowMapReportEvery rate-limits the flow-map-full event: a map that is
// too small for the gateway evicts all the time, and says so once a
// period with the count so far.
const flowMapReportEvery = time.Minute

// flowMapWatch remembers what was last said about the flow map.
type flowMapWatch struct {
	reported uint64    // EvictedAtLeast when last reported
	at       time.Time // when
}

// checkFlowMap reports a flow map that evicted flows since the last
// report, at most once per flowMapReportEvery. An evicted flow loses its
// pin: its next packet is pinned afresh (recovered from conntrack where
// it can be).
func (a *Agent) checkFlowMap(now time.Time) {
	use, err := a.k.FlowMapUse()
	if err != nil {
		a.log.Error("reading the flow map's use", "err", err)
		return
	}
	if use.EvictedAtLeast <= a.flowMap.reported || now.Sub(a.flowMap.at) < flowMapReportEvery {
		return
	}
	a.events.Add(events.FlowMapFull, "", "flow map full: pinned flows are being evicted; raise datapath.flow_entries",
		"capacity", use.Capacity, "evicted_at_least", use.EvictedAtLeast,
		"evicted_since_last", use.EvictedAtLeast-a.flowMap.reported, "inserted", use.Inserted)
	a.flowMap = flowMapWatch{reported: use.EvictedAtLeast, at: now}
}
