// SPDX-License-Identifier: Apache-2.0

package health

import (
	"math"
	"time"
)

// Bounds of adaptive weights.
const (
	// MinWeightShare is the smallest fraction of its configured weight a
	// live line keeps: a lossy line still gets some new flows, so that its
	// recovery is seen in real traffic too.
	MinWeightShare = 0.25
	// SlowRTT is how many times its best RTT a line's mean RTT may be
	// before its weight is halved...
	SlowRTT = 3
	// ...when it is also this much slower: sub-millisecond RTTs vary by
	// multiples on an idle link and say nothing about its quality.
	SlowRTTExcess = 20 * time.Millisecond
)

// AdaptiveWeight is a line's share of new flows from its configured
// weight (its capacity) and its measured health: loss lowers it linearly
// (to half at 25% loss), an RTT over SlowRTT times the line's best seen
// (and SlowRTTExcess over it) halves it, and it never falls below MinWeightShare of the configured
// weight, nor below 1.
func AdaptiveWeight(configured int, s Status) int {
	f := 1 - 2*s.Loss
	if s.BestRTT > 0 && s.RTT > SlowRTT*s.BestRTT && s.RTT-s.BestRTT > SlowRTTExcess {
		f /= 2
	}
	f = math.Max(MinWeightShare, math.Min(1, f))
	return max(1, int(math.Round(float64(configured)*f)))
}
