// SPDX-License-Identifier: Apache-2.0

package test

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// The demo's short variant runs to completion: traffic on every line, a
// silenced gateway taken out and brought back, no flow on a healthy line
// broken, everything removed.
func TestDemoShort(t *testing.T) {
	if uplinkd == "" {
		t.Skip("needs root")
	}
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, uplinkd, "lab", "demo", "-short").CombinedOutput()
	if err != nil {
		t.Fatalf("demo: %v\n%s", err, out)
	}
	for _, want := range []string{"out of service", "back in service", "summary", "flows on the healthy lines: none broken", "removed"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("the demo's output lacks %q:\n%s", want, out)
		}
	}
}
