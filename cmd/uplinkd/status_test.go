// SPDX-License-Identifier: Apache-2.0

package main

import (
	"strings"
	"testing"
	"time"

	"github.com/uplinkd/uplinkd/control/agent"
)

// An HA gateway's status says its role and, on the master or once it
// resynced, its conntrackd resyncs with the last error.
func TestPrintStatusHA(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		ha   agent.HAStatus
		want []string
		not  []string
	}{
		{agent.HAStatus{Role: "master", Since: now.Add(-time.Minute), Takeovers: 1, ResyncEverySeconds: 40, Resyncs: 3, ResyncErrors: 2, ResyncError: "connecting to conntrackd: no such file"},
			[]string{"ha: master for 1m0s, 1 takeovers", "conntrackd resyncs every 40s: 3 done, 2 failed; failing: connecting to conntrackd"}, nil},
		{agent.HAStatus{Role: "standby", Since: now.Add(-time.Minute), ResyncEverySeconds: 40},
			[]string{"ha: standby for 1m0s"}, []string{"resyncs"}},
	} {
		var b strings.Builder
		h := tc.ha
		printStatus(&b, agent.Status{Config: "/etc/uplinkd/uplinkd.yaml", HA: &h}, now)
		for _, w := range tc.want {
			if !strings.Contains(b.String(), w) {
				t.Errorf("status lacks %q:\n%s", w, b.String())
			}
		}
		for _, n := range tc.not {
			if strings.Contains(b.String(), n) {
				t.Errorf("status has %q:\n%s", n, b.String())
			}
		}
	}
}
