// SPDX-License-Identifier: Apache-2.0

package agent

import (
	"testing"
	"time"

	"github.com/uplinkd/uplinkd/loader"
)

// walkSource is a flow map of n flows on line 0 whose every walk takes
// took of a fake clock.
type walkSource struct {
	n, walks int
	took     time.Duration
	clock    *time.Time
}

func (s *walkSource) Flows(fn func(loader.Flow) bool) error {
	s.walks++
	*s.clock = s.clock.Add(s.took)
	for range s.n {
		fn(loader.Flow{})
	}
	return nil
}

// The flows are counted by a walk of the flow map. The count is reused
// while the map's inserts and removals stay the same; when they change, a
// cheap walk is redone at once, an expensive one (a large map) only once
// it is flowCountReuse times its walk old: a large map is walked seldom
// however often statuses ask.
func TestFlowCountBounded(t *testing.T) {
	clock := time.Unix(1e9, 0)
	now := func() time.Time { return clock }
	var r statsReader
	const big = flowCountSmall // a large map: its walk may be reused
	src := &walkSource{n: big + 3, took: time.Second, clock: &clock}
	changes := uint64(0)
	count := func() int {
		t.Helper()
		counts, err := r.countFlows(src, changes, now)
		if err != nil {
			t.Fatal(err)
		}
		if counts.PerLine[1] != counts.Total || counts.PerPolicy[0] != counts.Total {
			t.Fatalf("flows by line %v, by policy %v, total %d", counts.PerLine, counts.PerPolicy, counts.Total)
		}
		return counts.Total
	}
	if got := count(); got != big+3 || src.walks != 1 {
		t.Fatalf("first count: %d flows in %d walks, want %d in 1", got, src.walks, big+3)
	}
	// Nothing inserted or removed: no walk, however long since.
	clock = clock.Add(time.Hour)
	if count(); src.walks != 1 {
		t.Errorf("%d walks of an unchanged map, want 1", src.walks)
	}
	// A status every second while flows come and go: the 1 s map is
	// walked about once per flowCountReuse seconds.
	src.n = big + 5
	for range 2 * flowCountReuse {
		clock = clock.Add(time.Second)
		changes++
		count()
	}
	if src.walks < 2 || src.walks > 4 {
		t.Errorf("%d walks of a 1 s map over %d s, want 2 to 4", src.walks, 2*flowCountReuse)
	}
	if got := count(); got != big+5 {
		t.Errorf("count %d, want the map's %d flows", got, big+5)
	}
	// A cheap walk is redone as soon as the map changed.
	src.took = time.Millisecond
	clock = clock.Add(time.Hour)
	changes++
	count()
	walks := src.walks
	src.n = 7
	changes++
	if got := count(); got != 7 || src.walks != walks+1 {
		t.Errorf("count %d after %d walks, want 7 after %d", got, src.walks, walks+1)
	}
	// A slow walk of a small map (an emulated VM under load) is redone as
	// soon as the map changed, too.
	src.took = time.Second
	count()
	walks = src.walks
	src.n = 9
	changes++
	if got := count(); got != 9 || src.walks != walks+1 {
		t.Errorf("slow small map: count %d after %d walks, want 9 after %d", got, src.walks, walks+1)
	}
}
