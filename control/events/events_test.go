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
