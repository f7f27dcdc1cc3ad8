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

// The flows are counted by a walk of the flow map, reused while younger
// than flowCountReuse times the walk: a large map is walked seldom however
// often statuses ask, a small one almost every time.
func TestFlowCountBounded(t *testing.T) {
	clock := time.Unix(1e9, 0)
	now := func() time.Time { return clock }
	var r statsReader
	src := &walkSource{n: 3, took: time.Second, clock: &clock}
	count := func() int {
		t.Helper()
		perLine, total, err := r.countFlows(src, now)
		if err != nil {
			t.Fatal(err)
		}
		if perLine[1] != total {
			t.Fatalf("flows by line %v, total %d", perLine, total)
		}
		return total
	}
	if got := count(); got != 3 || src.walks != 1 {
		t.Fatalf("first count: %d flows in %d walks, want 3 in 1", got, src.walks)
	}
	// A status every second for a while: the map is walked about once per
	// flowCountReuse seconds.
	src.n = 5
	for range 2 * flowCountReuse {
		clock = clock.Add(time.Second)
		count()
	}
	if src.walks < 2 || src.walks > 4 {
		t.Errorf("%d walks of a 1 s map over %d s, want 2 to 4", src.walks, 2*flowCountReuse)
	}
	if got := count(); got != 5 {
		t.Errorf("count %d, want the map's 5 flows", got)
	}
	// A walk of a millisecond is redone after 50 ms.
	src.took = time.Millisecond
	clock = clock.Add(time.Hour)
	count()
	walks := src.walks
	clock = clock.Add(flowCountReuse * time.Millisecond)
	src.n = 7
	if got := count(); got != 7 || src.walks != walks+1 {
		t.Errorf("count %d after %d walks, want 7 after %d", got, src.walks, walks+1)
	}
}
