// SPDX-License-Identifier: Apache-2.0

package agent

import (
	"context"
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

// A set file written in place, replaced by a rename or removed wakes the
// agent; another file in the same directory does not.
func TestWatchPrefixSets(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "banks.txt")
	write := func(name, text string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("banks.txt", "192.0.2.0/24\n")
	cfg := &config.Config{PrefixSets: []config.PrefixSet{{Name: "banks", File: file}}}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	out := make(chan struct{}, 1)
	if err := watchPrefixSets(ctx, cfg, out); err != nil {
		t.Fatal(err)
	}
	woke := func() bool {
		select {
		case <-out:
			return true
		case <-time.After(300 * time.Millisecond):
			return false
		}
	}
	write("other.txt", "198.51.100.0/24\n")
	if woke() {
		t.Error("another file of the directory woke the agent")
	}
	write("banks.txt", "192.0.2.0/25\n")
	if !woke() {
		t.Error("a set file written in place did not wake the agent")
	}
	write("banks.new", "203.0.113.0/24\n")
	if err := os.Rename(filepath.Join(dir, "banks.new"), file); err != nil {
		t.Fatal(err)
	}
	if !woke() {
		t.Error("a set file replaced by a rename did not wake the agent")
	}
	if err := os.Remove(file); err != nil {
		t.Fatal(err)
	}
	if !woke() {
		t.Error("a set file removed did not wake the agent")
	}
}

// A changed set file changes the config's set and the rules naming it; a
// file that no longer parses keeps the set as it was, with an event.
func TestRereadPrefixSets(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "banks.txt")
	if err := os.WriteFile(file, []byte("192.0.2.0/24\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	old := []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	cfg := &config.Config{
		PrefixSets: []config.PrefixSet{{Name: "banks", File: file, Prefixes: old}},
		Rules:      []config.Rule{{Name: "banks", DstSet: "banks", Dst: old}, {Name: "other"}},
	}
	a := &Agent{cfg: cfg, events: events.NewRing(events.DefaultSize, slog.New(slog.DiscardHandler))}
	if a.rereadPrefixSets() {
		t.Fatal("an unchanged file counted as a change")
	}
	if err := os.WriteFile(file, []byte("# now\n203.0.113.7\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if !a.rereadPrefixSets() {
		t.Fatal("a changed file did not count as a change")
	}
	want := []netip.Prefix{netip.MustParsePrefix("203.0.113.7/32")}
	if got := a.cfg.Rules[0].Dst; !slices.Equal(got, want) {
		t.Errorf("rule's dst %v, want %v", got, want)
	}
	if got := a.cfg.PrefixSets[0].Prefixes; !slices.Equal(got, want) {
		t.Errorf("set %v, want %v", got, want)
	}
	if !slices.Equal(cfg.Rules[0].Dst, old) {
		t.Errorf("the old config changed: %v", cfg.Rules[0].Dst)
	}
	if err := os.WriteFile(file, []byte("not a prefix\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if a.rereadPrefixSets() {
		t.Fatal("a bad file counted as a change")
	}
	if got := a.cfg.Rules[0].Dst; !slices.Equal(got, want) {
		t.Errorf("after a bad file the rule's dst is %v, want %v kept", got, want)
	}
	if n := a.events.Count(events.PrefixSet, ""); n != 2 {
		t.Errorf("%d prefix-set events, want 2 (the change, the refusal)", n)
	}
}
