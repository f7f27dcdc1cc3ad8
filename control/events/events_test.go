// SPDX-License-Identifier: Apache-2.0

package events

import (
	"fmt"
	"log/slog"
	"testing"
)

func TestRingKeepsTheLast(t *testing.T) {
	r := NewRing(3, slog.New(slog.DiscardHandler))
	if len(r.List()) != 0 {
		t.Fatal("new ring not empty")
	}
	for i := range 5 {
		r.Add(Weight, "dsl1", fmt.Sprint(i))
	}
	got := r.List()
	if len(got) != 3 || got[0].Msg != "2" || got[2].Msg != "4" {
		t.Errorf("ring holds %v, want the events 2, 3, 4", got)
	}
}

func TestSinceAndWait(t *testing.T) {
	r := NewRing(3, slog.New(slog.DiscardHandler))
	_, changed := r.Since(0)
	r.Add(LineDown, "dsl1", "down", "why", "no carrier", "loss", 0.5)
	select {
	case <-changed:
	default:
		t.Fatal("Add did not wake a waiter")
	}
	for i := range 4 {
		r.Add(Weight, "dsl1", fmt.Sprint(i))
	}
	got, _ := r.Since(3)
	if len(got) != 2 || got[0].Seq != 4 || got[1].Seq != 5 {
		t.Fatalf("Since(3) = %+v, want the events 4 and 5", got)
	}
	all, _ := r.Since(0)
	if len(all) != 3 || all[0].Seq != 3 {
		t.Errorf("Since(0) = %+v, want the 3 kept, from 3", all)
	}
	first := NewRing(2, slog.New(slog.DiscardHandler))
	first.Add(LineDown, "dsl1", "down", "why", "no carrier", "loss", 0.5)
	e, _ := first.Since(0)
	if e[0].Fields["why"] != "no carrier" || e[0].Fields["loss"] != "0.5" {
		t.Errorf("fields = %v", e[0].Fields)
	}
}

func TestCountsOutliveTheRing(t *testing.T) {
	r := NewRing(2, slog.New(slog.DiscardHandler))
	for range 5 {
		r.Add(LineDown, "dsl1", "down")
	}
	r.Add(Restored, "", "back")
	if r.Count(LineDown, "dsl1") != 5 || r.Count(LineDown, "dsl2") != 0 || r.CountKind(Restored) != 1 {
		t.Errorf("counts: %d %d %d", r.Count(LineDown, "dsl1"), r.Count(LineDown, "dsl2"), r.CountKind(Restored))
	}
}
