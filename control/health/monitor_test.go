// SPDX-License-Identifier: Apache-2.0

package health

import (
	"testing"
	"time"

	"github.com/uplinkd/uplinkd/control/config"
)

// A report of a prober the monitor no longer runs changes nothing, and a
// line without a tracker cannot be taken down or read.
func TestMonitorIgnoresStrangers(t *testing.T) {
	m := NewMonitor(func(f func() error) error { return f() })
	if err := m.Sync([]Line{{Name: "dsl1"}}, config.Default().Health); err != nil {
		t.Fatal(err)
	}
	if m.Started() || len(m.Statuses()) != 0 {
		t.Fatal("a monitor not started judges lines")
	}
	if _, changed := m.Observe(Report{Line: "dsl1", ID: 1, Round: Round{At: time.Now()}}); changed {
		t.Error("a report of no prober changed a line")
	}
	if m.Down("dsl1", time.Now(), "no carrier") {
		t.Error("Down on a line without a tracker changed it")
	}
	if _, ok := m.Status("dsl1"); ok {
		t.Error("status of a line not monitored")
	}
}
