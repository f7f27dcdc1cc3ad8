// SPDX-License-Identifier: Apache-2.0

package test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/uplinkd/uplinkd/test/lab"
)

// legacyCommit is the last uplinkd that counted on the uplinks, with two
// programs on each line interface and a pinned ul_if_line.
const legacyCommit = "743b16b"

// legacyBinary builds uplinkd as of legacyCommit (from `git archive`, no
// worktree), or takes UPLINKD_OLD_BIN; it skips the test where neither
// works.
func legacyBinary(t *testing.T) string {
	t.Helper()
	if bin := os.Getenv("UPLINKD_OLD_BIN"); bin != "" {
		return bin
	}
	src := t.TempDir()
	archive := exec.Command("sh", "-c", fmt.Sprintf("git archive %s | tar -x -C %s", legacyCommit, src))
	archive.Dir = ".." // the whole repository, not test/
	if out, err := archive.CombinedOutput(); err != nil {
		t.Skipf("no source of %s (set UPLINKD_OLD_BIN): %v\n%s", legacyCommit, err, out)
	}
	bin := filepath.Join(t.TempDir(), "uplinkd-old")
	build := exec.Command("go", "build", "-o", bin, "./cmd/uplinkd")
	build.Dir = src
	if out, err := build.CombinedOutput(); err != nil {
		t.Skipf("building uplinkd %s: %v\n%s", legacyCommit, err, out)
	}
	return bin
}

// ifPrograms counts the TCX programs on each hook of the gateway's
// interface ifname.
func ifPrograms(t *testing.T, l *lab.Lab, ifname string) (in, out int) {
	t.Helper()
	err := l.Gateway.Do(func() error {
		iface, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		for _, h := range []struct {
			attach ebpf.AttachType
			n      *int
		}{{ebpf.AttachTCXIngress, &in}, {ebpf.AttachTCXEgress, &out}} {
			r, err := link.QueryPrograms(link.QueryOptions{Target: iface.Index, Attach: h.attach})
			if err != nil {
				return err
			}
			*h.n = len(r.Programs)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return in, out
}

// An agent of before (uplink programs on the lines, ul_if_line pinned)
// is replaced by this one on the same pin dir: the uplink programs leave
// the lines, the pinned flows go on, a line's forwarded counters count the
// LAN's forwarded packets only (not the uplink's traffic the old programs
// counted into the same pinned map, nor twice), and `uplinkd down` leaves
// nothing.
func TestUpgradeFromUplinkCounters(t *testing.T) {
	l, state := newLab(t, lab.Options{})
	old := legacyBinary(t)
	file := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, Attach: "tcx"}))
	t.Cleanup(func() {
		// Whatever happened, nothing of either agent stays.
		if out, err := l.Gateway.Run(context.Background(), uplinkd, "down", "-c", file); err != nil {
			t.Errorf("uplinkd down: %v\n%s", err, out)
		}
		if _, err := os.Stat(l.PinDir()); !os.IsNotExist(err) {
			t.Errorf("pin dir %s left after down: %v", l.PinDir(), err)
			os.RemoveAll(l.PinDir())
		}
	})

	saved := uplinkd
	uplinkd = old
	first := spawnAgent(t, l, file)
	uplinkd = saved
	t.Cleanup(func() { first.stop(t) })
	first.waitReady(t)
	if in, out := ifPrograms(t, l, l.Lines[0].Interface); in != 1 || out != 1 {
		t.Skipf("the old agent attached %d/%d programs to %s, not its uplink counters", in, out, l.Lines[0].Interface)
	}
	if _, err := os.Stat(filepath.Join(l.PinDir(), "ul_if_line")); err != nil {
		t.Fatalf("the old agent pinned no ul_if_line: %v", err)
	}
	srv := echoServer(t, l)
	flows := openFlows(t, l, srv.Addr, 4, false)
	// The old agent's probes and the flows count on the uplinks.
	time.Sleep(time.Second)
	first.stop(t)

	second := startAgent(t, l, file)
	for _, u := range l.Lines {
		if in, out := ifPrograms(t, l, u.Interface); in != 0 || out != 0 {
			t.Errorf("%s still runs %d/%d programs after the upgrade", u.Interface, in, out)
		}
	}
	if broken, moved, detail := checkAll(flows); broken+moved > 0 {
		t.Fatalf("after the upgrade: %d broken, %d moved: %v", broken, moved, detail)
	}
	// Forwarded counters: per line, the flows' packets, no more.
	time.Sleep(500 * time.Millisecond) // the new agent's probes on the lines
	for range 3 {
		if broken, _, detail := checkAll(flows); broken > 0 {
			t.Fatal(detail)
		}
	}
	stats := lineStats(t, l)
	var tx, rx [16]uint64
	for _, f := range pins(t, l) {
		tx[f.Line] += f.TxPackets
		rx[f.Line] += f.RxPackets
	}
	for i := range l.Lines {
		if stats[i].TxPackets > tx[i] || stats[i].RxPackets > rx[i] {
			t.Errorf("line %d: forwarded %d/%d packets (tx/rx), but its flows hold %d/%d: the count carries the old uplink programs' (the gateway's own traffic included)",
				i+1, stats[i].TxPackets, stats[i].RxPackets, tx[i], rx[i])
		}
	}
	st := second.status(t)
	for _, ls := range st.Lines {
		if ls.TxPackets == 0 || ls.RxPackets == 0 {
			t.Errorf("line %s: interface counters %d/%d packets, want the kernel's", ls.Name, ls.TxPackets, ls.RxPackets)
		}
	}

	second.stop(t)
	if out, err := l.Gateway.Run(context.Background(), uplinkd, "down", "-c", file); err != nil {
		t.Fatalf("uplinkd down: %v\n%s", err, out)
	}
	if _, err := os.Stat(l.PinDir()); !os.IsNotExist(err) {
		entries, _ := os.ReadDir(l.PinDir())
		t.Errorf("pin dir left after down: %v %v", err, entries)
	}
	for _, ifname := range append([]string{l.LANInterface}, l.Lines[0].Interface, l.Lines[1].Interface) {
		if in, out := ifPrograms(t, l, ifname); in != 0 || out != 0 {
			t.Errorf("%s runs %d/%d programs after down", ifname, in, out)
		}
	}
}
