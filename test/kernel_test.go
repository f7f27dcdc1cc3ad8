// SPDX-License-Identifier: Apache-2.0

package test

import (
	"context"
	"errors"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/uplinkd/uplinkd/loader"
	"github.com/uplinkd/uplinkd/test/lab"
)

// features runs `uplinkd features` in the lab gateway and returns its
// lines as name → value, and its exit status.
func features(t *testing.T, l *lab.Lab, cfg string) (map[string]string, int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := l.Gateway.Command(ctx, uplinkd, "features", "-c", cfg).CombinedOutput()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, line := range strings.Split(string(out), "\n") {
		name, value, ok := strings.Cut(line, ": ")
		if ok {
			got[name], _, _ = strings.Cut(value, "\t")
		}
	}
	return got, code, string(out)
}

// The kernel check names what the agent will use on this kernel: TCX where
// the kernel has it, else tc; recovery from conntrack on every kernel of
// the matrix (conntrack is a module on stock Debian kernels); and it leaves
// nothing behind (its nftables probe table is gone).
func TestKernelFeatures(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	cfg := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state}))
	before := snapshot(t, l)
	got, code, out := features(t, l, cfg)
	if code != 0 {
		t.Fatalf("uplinkd features: exit %d\n%s", code, out)
	}
	attach := "tcx"
	if loader.TCXSupported() != nil {
		attach = "tc"
	}
	for name, want := range map[string]string{
		"btf": "yes", "attach": attach, "ct_recovery": "on",
		"nft_reject_prerouting": "yes", "multipath_hash_fields": "yes",
	} {
		if got[name] != want {
			t.Errorf("%s: %q, want %q\n%s", name, got[name], want, out)
		}
	}
	if after := snapshot(t, l); after != before {
		t.Errorf("uplinkd features changed the kernel:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// `datapath.attach: tcx` on a kernel without TCX is refused at start with
// a message naming TCX, and nothing is applied.
func TestTCXRefusedWithoutTCX(t *testing.T) {
	t.Parallel()
	if loader.TCXSupported() == nil {
		t.Skip("the kernel has TCX: nothing to refuse")
	}
	l, state := newLab(t, lab.Options{})
	cfg := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, Attach: "tcx"}))
	before := snapshot(t, l, "wan1", "wan2")
	_, code, out := features(t, l, cfg)
	if code != 1 || !strings.Contains(out, "datapath.attach: tcx: tcx: not in this kernel") {
		t.Errorf("uplinkd features: exit %d\n%s\nwant exit 1 naming tcx", code, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	run, err := l.Gateway.Command(ctx, uplinkd, "run", "-c", cfg).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(run), "tcx: not in this kernel") {
		t.Errorf("uplinkd run: %v\n%s\nwant exit 1 naming tcx", err, run)
	}
	if after := snapshot(t, l, "wan1", "wan2"); after != before {
		t.Errorf("a refused start changed the kernel:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}
