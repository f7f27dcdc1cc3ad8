// SPDX-License-Identifier: Apache-2.0

// Package events keeps what happened to the lines (up, down, degraded,
// weight changes, address changes, restored kernel objects) in a bounded
// ring, for operators to read, and logs each with log/slog.
package events

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// Kinds of events.
const (
	LineUp         = "line-up"
	LineDown       = "line-down"
	LineProbing    = "line-probing"
	LineLate       = "line-late"    // a round had no answer in time: no new flows
	LineOnTime     = "line-on-time" // a late line answered in time again
	Carrier        = "carrier"
	Address        = "address"
	Operator       = "operator"
	Weight         = "weight"
	AllDown        = "all-lines-down"
	Restored       = "restored"
	Config         = "config"
	ConntrackFlush = "conntrack-flush"
	FlowMapFull    = "flow-map-full"
	HARole         = "ha-role"          // this gateway became master or standby (the LAN VIP came or went)
	HATakeover     = "ha-takeover"      // the kernel state applied after becoming master
	HANotify       = "ha-notify"        // keepalived's notify script said a state
	HAResyncFailed = "ha-resync-failed" // the master's periodic conntrackd resync failed
	HAFlowsCleared = "ha-flows-cleared" // the flow map emptied on becoming standby
	PrefixSet      = "prefix-set"       // a prefix set's file changed, or was refused
)

// Event is one thing that happened. Its JSON form is the one `uplinkd
// events --json` prints, one per line.
type Event struct {
	Seq   uint64    `json:"seq"` // 1 for the agent's first event, then one more each
	Time  time.Time `json:"time"`
	Kind  string    `json:"kind"`
	Line  string    `json:"line,omitempty"` // "" for events of the whole gateway
	Msg   string    `json:"msg"`
	Attrs []any     `json:"-"` // slog key/value pairs
	// Fields holds Attrs as text, by key, for readers outside the agent.
	Fields map[string]string `json:"fields,omitempty"`
}

// Ring holds the last events, oldest overwritten first.
type Ring struct {
	mu      sync.Mutex
	buf     []Event
	next    int
	full    bool
	seq     uint64
	counts  map[[2]string]uint64 // events ever added, by kind and line
	changed chan struct{}        // closed and replaced at each Add
	log     *slog.Logger
}

// DefaultSize is how many events a Ring keeps.
const DefaultSize = 1024

// NewRing returns a ring of size events that also logs to log.
func NewRing(size int, log *slog.Logger) *Ring {
	return &Ring{buf: make([]Event, size), counts: map[[2]string]uint64{}, changed: make(chan struct{}), log: log}
}

// Add records and logs an event.
func (r *Ring) Add(kind, line, msg string, attrs ...any) {
	e := Event{Time: time.Now(), Kind: kind, Line: line, Msg: msg, Attrs: attrs, Fields: fields(attrs)}
	level := slog.LevelInfo
	if kind == AllDown || kind == LineDown || kind == FlowMapFull {
		level = slog.LevelWarn
		if kind == AllDown {
			level = slog.LevelError
		}
	}
	args := []any{"event", kind}
	if line != "" {
		args = append(args, "line", line)
	}
	args = append(args, attrs...)
	r.log.Log(context.Background(), level, msg, args...)
	r.mu.Lock()
	r.seq++
	e.Seq = r.seq
	r.counts[[2]string{kind, line}]++
	r.buf[r.next] = e
	r.next = (r.next + 1) % len(r.buf)
	r.full = r.full || r.next == 0
	close(r.changed)
	r.changed = make(chan struct{})
	r.mu.Unlock()
}

// Count is how many events of kind about line ("": the whole gateway)
// were ever added, also those the ring no longer keeps.
func (r *Ring) Count(kind, line string) uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.counts[[2]string{kind, line}]
}

// CountKind is how many events of kind were ever added, about any line.
func (r *Ring) CountKind(kind string) uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	var n uint64
	for k, c := range r.counts {
		if k[0] == kind {
			n += c
		}
	}
	return n
}

// fields turns slog key/value pairs into text by key.
func fields(attrs []any) map[string]string {
	if len(attrs) < 2 {
		return nil
	}
	m := make(map[string]string, len(attrs)/2)
	for i := 0; i+1 < len(attrs); i += 2 {
		m[fmt.Sprint(attrs[i])] = fmt.Sprint(attrs[i+1])
	}
	return m
}

// Since returns the events kept whose Seq is above seq, oldest first, and
// a channel that is closed at the next Add (to wait for more).
func (r *Ring) Since(seq uint64) ([]Event, <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []Event
	for _, e := range r.ordered() {
		if e.Seq > seq {
			out = append(out, e)
		}
	}
	return out, r.changed
}

// List returns the events kept, oldest first.
func (r *Ring) List() []Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ordered()
}

func (r *Ring) ordered() []Event {
	if !r.full {
		return append([]Event(nil), r.buf[:r.next]...)
	}
	return append(append([]Event(nil), r.buf[r.next:]...), r.buf[:r.next]...)
}
