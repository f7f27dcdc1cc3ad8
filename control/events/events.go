// SPDX-License-Identifier: Apache-2.0

// Package events keeps what happened to the lines (up, down, degraded,
// weight changes, address changes, restored kernel objects) in a bounded
// ring, for operators to read, and logs each with log/slog.
package events

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// Kinds of events.
const (
	LineUp         = "line-up"
	LineDown       = "line-down"
	LineProbing    = "line-probing"
	Carrier        = "carrier"
	Address        = "address"
	Operator       = "operator"
	Weight         = "weight"
	AllDown        = "all-lines-down"
	Restored       = "restored"
	Config         = "config"
	ConntrackFlush = "conntrack-flush"
)

// Event is one thing that happened.
type Event struct {
	Time  time.Time
	Kind  string
	Line  string // "" for events of the whole gateway
	Msg   string
	Attrs []any // slog key/value pairs
}

// Ring holds the last events, oldest overwritten first.
type Ring struct {
	mu   sync.Mutex
	buf  []Event
	next int
	full bool
	log  *slog.Logger
}

// DefaultSize is how many events a Ring keeps.
const DefaultSize = 1024

// NewRing returns a ring of size events that also logs to log.
func NewRing(size int, log *slog.Logger) *Ring {
	return &Ring{buf: make([]Event, size), log: log}
}

// Add records and logs an event.
func (r *Ring) Add(kind, line, msg string, attrs ...any) {
	e := Event{Time: time.Now(), Kind: kind, Line: line, Msg: msg, Attrs: attrs}
	level := slog.LevelInfo
	if kind == AllDown || kind == LineDown {
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
	r.buf[r.next] = e
	r.next = (r.next + 1) % len(r.buf)
	r.full = r.full || r.next == 0
	r.mu.Unlock()
}

// List returns the events kept, oldest first.
func (r *Ring) List() []Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.full {
		return append([]Event(nil), r.buf[:r.next]...)
	}
	return append(append([]Event(nil), r.buf[r.next:]...), r.buf[:r.next]...)
}
