// SPDX-License-Identifier: Apache-2.0

package test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/uplinkd/uplinkd/test/lab"
)

// On a machine where nothing mounted bpffs (a fresh Debian machine), the
// agent mounts it itself, runs, and down removes its pins. The whole run
// happens in a private mount namespace with /sys/fs/bpf unmounted; the
// shell waits on the pinned flow map (kernel state), not on a log line.
func TestRunWithoutBPFFSMounted(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	pin := "/sys/fs/bpf/uplinkd-" + l.Prefix + "-nofs"
	cfg := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, PinDir: pin}))
	script := `set -eu
umount /sys/fs/bpf 2>/dev/null || true
if mountpoint -q /sys/fs/bpf; then echo "bpffs still mounted"; exit 3; fi
"$UPLINKD" run -c "$CFG" 2>"$LOG" & pid=$!
i=0; until [ -e "$PIN/ul_flows" ]; do i=$((i+1)); [ $i -lt 600 ] || { echo "no pins after 30s"; kill $pid; exit 4; }; sleep 0.05; done
mountpoint -q /sys/fs/bpf || { echo "agent pinned without bpffs"; exit 5; }
kill -TERM $pid; wait $pid
"$UPLINKD" down -c "$CFG"
[ ! -e "$PIN" ] || { echo "pins left after down"; exit 6; }
echo ok`
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	log := filepath.Join(t.TempDir(), "agent.log")
	cmd := l.Gateway.Command(ctx, "unshare", "--mount", "--propagation", "private", "sh", "-c", script)
	cmd.Env = append(os.Environ(), "UPLINKD="+uplinkd, "CFG="+cfg, "PIN="+pin, "LOG="+log)
	out, err := cmd.CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "ok" {
		agentLog, _ := os.ReadFile(log)
		t.Fatalf("%v\n%s\nagent log:\n%s", err, out, agentLog)
	}
	if _, err := os.Stat(pin); !os.IsNotExist(err) {
		t.Errorf("pin dir %s visible outside the private mount namespace: %v", pin, err)
	}
}

// A pin dir that is not on a bpf filesystem is a config error (exit 2,
// naming the field) for plan and run alike, and nothing is touched; down
// with such a pin dir deletes nothing there.
func TestPinDirNotOnBPFFS(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	dir := t.TempDir()
	keep := filepath.Join(dir, "keep")
	if err := os.WriteFile(keep, []byte("mine"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, PinDir: dir}))
	for _, c := range []string{"plan", "run"} {
		out, code := exitCode(t, l, c, "-c", cfg)
		if code != 2 || !strings.Contains(out, "datapath.pin_dir: "+dir+" is not on a bpf filesystem") {
			t.Errorf("%s: exit %d\n%s\nwant exit 2 naming datapath.pin_dir", c, code, out)
		}
	}
	out, _ := exitCode(t, l, "down", "-c", cfg)
	if b, err := os.ReadFile(keep); err != nil || string(b) != "mine" {
		t.Errorf("down touched %s (%v):\n%s", keep, err, out)
	}
}

// exitCode runs uplinkd in the lab gateway and returns its output and exit
// status.
func exitCode(t *testing.T, l *lab.Lab, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := l.Gateway.Command(ctx, uplinkd, args...)
	out, err := cmd.CombinedOutput()
	if err != nil && cmd.ProcessState == nil {
		t.Fatal(err)
	}
	return string(out), cmd.ProcessState.ExitCode()
}

// down while an agent runs would race it (the agent puts routing back and
// may save its own sysctl values as the originals): it is refused, naming
// the agent, and nothing is removed.
func TestDownRefusedWhileAgentRuns(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	cfg := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state}))
	a := startAgent(t, l, cfg)
	before := snapshot(t, l, "wan1", "wan2")
	out, code := exitCode(t, l, "down", "-c", cfg)
	if code != 1 || !strings.Contains(out, "an agent is running") || !strings.Contains(out, "pid "+strconv.Itoa(a.cmd.Process.Pid)) {
		t.Errorf("down: exit %d\n%s\nwant exit 1 naming the agent's pid %d", code, out, a.cmd.Process.Pid)
	}
	if after := snapshot(t, l, "wan1", "wan2"); after != before {
		t.Errorf("a refused down changed the kernel:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// A lock file left by a crashed agent, naming a pid that now belongs to an
// unrelated process, makes `line down` signal nobody.
func TestLineDownSignalsNoStranger(t *testing.T) {
	t.Parallel()
	l, state := newLab(t, lab.Options{})
	cfg := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state}))
	stranger := exec.Command("sleep", "30")
	if err := stranger.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stranger.Process.Kill(); stranger.Wait() })
	if err := os.WriteFile(filepath.Join(state, "uplinkd.lock"), []byte(strconv.Itoa(stranger.Process.Pid)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, code := exitCode(t, l, "line", "down", "dsl1", "-c", cfg)
	if code != 0 || !strings.Contains(out, "no agent runs") {
		t.Errorf("line down: exit %d\n%s\nwant no agent notified", code, out)
	}
	if err := stranger.Process.Signal(syscall.Signal(0)); err != nil {
		t.Errorf("the unrelated process is gone: %v", err)
	}
	if stranger.ProcessState != nil {
		t.Errorf("the unrelated process exited: %v", stranger.ProcessState)
	}
}
