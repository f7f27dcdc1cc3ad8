// SPDX-License-Identifier: Apache-2.0

package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/events"
)

// watchLab watches one prefix set, banks, at file; next returns the next
// read, or fails the test after within.
type watchLab struct {
	t   *testing.T
	out chan prefixSetRead
}

func newWatchLab(t *testing.T, file string) *watchLab {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	cfg := &config.Config{PrefixSets: []config.PrefixSet{{Name: "banks", File: file}}}
	w := &watchLab{t: t, out: make(chan prefixSetRead, 1)}
	if err := watchPrefixSets(ctx, cfg, 7, w.out); err != nil {
		t.Fatal(err)
	}
	return w
}

// next waits for a read within d: its banks set, or nil and false.
func (w *watchLab) next(d time.Duration) ([]netip.Prefix, bool) {
	select {
	case r := <-w.out:
		if r.watch != 7 {
			w.t.Errorf("read of watch %d, want 7", r.watch)
		}
		return r.sets["banks"], true
	case <-time.After(d):
		return nil, false
	}
}

func writeFile(t *testing.T, path, text string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}

func prefixesOf(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range s {
		out = append(out, netip.MustParsePrefix(p))
	}
	return out
}

// A set file written in place or replaced by a rename is read again once
// the writer is done; another file of the directory is not; reads come
// at most once a prefixSetEvery, the last state always read.
func TestWatchPrefixSets(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "banks.txt")
	writeFile(t, file, "192.0.2.0/24\n")
	w := newWatchLab(t, file)
	writeFile(t, filepath.Join(dir, "other.txt"), "198.51.100.0/24\n")
	if _, ok := w.next(prefixSetEvery + 300*time.Millisecond); ok {
		t.Error("another file of the directory made a read")
	}
	writeFile(t, file, "192.0.2.0/25\n")
	if got, ok := w.next(time.Second); !ok || !slices.Equal(got, prefixesOf("192.0.2.0/25")) {
		t.Errorf("written in place: read %v (%v), want 192.0.2.0/25", got, ok)
	}
	// A burst of rewrites: the next read no sooner than prefixSetEvery,
	// and it holds the last one.
	start := time.Now()
	for i := range 20 {
		writeFile(t, filepath.Join(dir, "banks.new"), netip.PrefixFrom(netip.AddrFrom4([4]byte{203, 0, 113, byte(i)}), 32).String()+"\n")
		if err := os.Rename(filepath.Join(dir, "banks.new"), file); err != nil {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	got, ok := w.next(3 * time.Second)
	if took := time.Since(start); ok && took < prefixSetEvery-100*time.Millisecond {
		t.Errorf("a read %v after the last, want at least %v", took, prefixSetEvery)
	}
	for ok && !slices.Equal(got, prefixesOf("203.0.113.19/32")) {
		got, ok = w.next(3 * time.Second)
	}
	if !ok {
		t.Error("the last of a burst of renames was never read")
	}
}

// What inotify on the directory cannot see is found by looking at the
// files: a symbolic link pointed elsewhere (a Kubernetes ConfigMap's
// ..data swap), the directory removed and made again.
func TestWatchPrefixSetsPolled(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for the poll")
	}
	dir := t.TempDir()
	for _, v := range []string{"v1", "v2"} {
		if err := os.Mkdir(filepath.Join(dir, v), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, filepath.Join(dir, "v1", "banks.txt"), "192.0.2.0/24\n")
	writeFile(t, filepath.Join(dir, "v2", "banks.txt"), "198.51.100.0/24\n")
	if err := os.Symlink("v1", filepath.Join(dir, "data")); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "conf")
	if err := os.Mkdir(conf, 0o755); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(conf, "banks.txt")
	if err := os.Symlink("../data/banks.txt", file); err != nil {
		t.Fatal(err)
	}
	w := newWatchLab(t, file)
	// The ConfigMap way: a new link renamed over data.
	if err := os.Symlink("v2", filepath.Join(dir, "data.new")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(dir, "data.new"), filepath.Join(dir, "data")); err != nil {
		t.Fatal(err)
	}
	if got, ok := w.next(prefixSetPoll + 2*time.Second); !ok || !slices.Equal(got, prefixesOf("198.51.100.0/24")) {
		t.Errorf("link pointed elsewhere: read %v (%v), want 198.51.100.0/24", got, ok)
	}
	// The directory removed and made again.
	if err := os.RemoveAll(conf); err != nil {
		t.Fatal(err)
	}
	if _, ok := w.next(prefixSetPoll + 2*time.Second); !ok {
		t.Error("the directory's removal was not read")
	}
	if err := os.Mkdir(conf, 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, file, "203.0.113.0/24\n")
	if got, ok := w.next(prefixSetPoll + 2*time.Second); !ok || !slices.Equal(got, prefixesOf("203.0.113.0/24")) {
		t.Errorf("the directory made again: read %v (%v), want 203.0.113.0/24", got, ok)
	}
}

// A changed set changes the config's set and the rules naming it; a file
// that could not be read keeps the set as it was, with an event; a read of
// an earlier watch (before a reload) is dropped.
func TestTakePrefixSets(t *testing.T) {
	old := prefixesOf("192.0.2.0/24")
	cfg := &config.Config{
		PrefixSets: []config.PrefixSet{{Name: "banks", File: "banks.txt", Prefixes: old}},
		Rules:      []config.Rule{{Name: "banks", DstSet: "banks", Dst: old, Policy: config.BalancedPolicy}, {Name: "other", ID: 1, Policy: config.BalancedPolicy}},
	}
	a := &Agent{cfg: cfg, setWatch: 3, events: events.NewRing(events.DefaultSize, slog.New(slog.DiscardHandler))}
	read := func(watch int, p []netip.Prefix, err error) prefixSetRead {
		r := prefixSetRead{watch: watch, sets: map[string][]netip.Prefix{}, errs: map[string]error{}}
		if err != nil {
			r.errs["banks"] = err
		} else {
			r.sets["banks"] = p
		}
		return r
	}
	if a.takePrefixSets(read(3, old, nil)) {
		t.Fatal("an unchanged set counted as a change")
	}
	want := prefixesOf("203.0.113.7/32")
	if a.takePrefixSets(read(2, want, nil)) {
		t.Fatal("a read of an earlier watch was taken")
	}
	if !a.takePrefixSets(read(3, want, nil)) {
		t.Fatal("a changed set did not count as a change")
	}
	if got := a.cfg.Rules[0].Dst; !slices.Equal(got, want) {
		t.Errorf("rule's dst %v, want %v", got, want)
	}
	if got := a.cfg.PrefixSets[0].Prefixes; !slices.Equal(got, want) {
		t.Errorf("set %v, want %v", got, want)
	}
	if !slices.Equal(cfg.Rules[0].Dst, old) {
		t.Errorf("the old config changed: %v", cfg.Rules[0].Dst)
	}
	if a.takePrefixSets(read(3, nil, os.ErrNotExist)) {
		t.Fatal("a file that could not be read counted as a change")
	}
	if got := a.cfg.Rules[0].Dst; !slices.Equal(got, want) {
		t.Errorf("after a failed read the rule's dst is %v, want %v kept", got, want)
	}
	if n := a.events.Count(events.PrefixSet, ""); n != 2 {
		t.Errorf("%d prefix-set events, want 2 (the change, the refusal)", n)
	}
}

// A policy that takes an id another name had is found, so that that
// name's pinned flows are made no policy's first.
func TestReusedIDs(t *testing.T) {
	cfg := &config.Config{Policies: []config.Policy{{Name: "pz"}, {Name: "pa"}}}
	cfg.RenumberPolicies(config.IDs{"balanced": 0, "p1": 1, "pa": 2})
	// Ids 3.. are free: pz avoids p1's.
	if got := reusedIDs(config.IDs{"balanced": 0, "p1": 1, "pa": 2}, cfg); len(got) != 0 {
		t.Errorf("reused %v with free ids left, want none", got)
	}
	prev := config.IDs{"balanced": 0}
	for id := 1; id < config.MaxPolicies; id++ {
		prev[fmt.Sprintf("p%d", id)] = id
	}
	full := &config.Config{}
	for id := 2; id < config.MaxPolicies; id++ {
		full.Policies = append(full.Policies, config.Policy{Name: fmt.Sprintf("p%d", id)})
	}
	full.Policies = append(full.Policies, config.Policy{Name: "pz"})
	full.RenumberPolicies(prev)
	if got := reusedIDs(prev, full); !slices.Equal(got, []int{1}) {
		t.Errorf("every id taken, p1 swapped for pz: reused %v, want [1]", got)
	}
}
