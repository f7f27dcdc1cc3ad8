// SPDX-License-Identifier: Apache-2.0

package agent

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/events"
)

// How prefix-set files are followed. A change is read once the writer is
// done (an editor or a deploy tool writes in steps: truncate, write,
// rename), at most once a prefixSetEvery however often the files change
// (reading and applying 65536 prefixes takes a good part of a second, and
// the agent has lines to watch), and the files are also looked at every
// prefixSetPoll, for what inotify on their directories misses: a
// directory removed and made again, a symbolic link that now points
// elsewhere (a Kubernetes ConfigMap), a link's target edited.
const (
	prefixSetSettle = 50 * time.Millisecond
	prefixSetEvery  = time.Second
	prefixSetPoll   = 2 * time.Second
)

// prefixSetRead is the prefix-set files as read once: each set's
// prefixes, or why its file could not be read.
type prefixSetRead struct {
	watch int // the watch that read them (Agent.setWatch)
	sets  map[string][]netip.Prefix
	errs  map[string]error
}

// watchPrefixSets reads cfg's prefix-set files whenever one changes and
// hands what it read to out (the newest read replaces one not taken
// yet), until ctx ends.
func watchPrefixSets(ctx context.Context, cfg *config.Config, watch int, out chan prefixSetRead) error {
	if len(cfg.PrefixSets) == 0 {
		return nil
	}
	changed := make(chan struct{}, 1)
	if err := inotifyDirs(ctx, cfg.PrefixSets, changed); err != nil {
		return err
	}
	seen := fileStates(cfg.PrefixSets)
	go func() {
		poll := time.NewTicker(prefixSetPoll)
		defer poll.Stop()
		var last time.Time
		for {
			select {
			case <-ctx.Done():
				return
			case <-changed:
			case <-poll.C:
				if now := fileStates(cfg.PrefixSets); !slices.Equal(now, seen) {
					seen = now
					break
				}
				continue
			}
			wait := max(prefixSetSettle, prefixSetEvery-time.Since(last))
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
			drain(changed)
			seen, last = fileStates(cfg.PrefixSets), time.Now()
			r := prefixSetRead{watch: watch, sets: map[string][]netip.Prefix{}, errs: map[string]error{}}
			for _, s := range cfg.PrefixSets {
				p, err := config.ReadPrefixSet(s.File)
				if err != nil {
					r.errs[s.Name] = err
				} else {
					r.sets[s.Name] = p
				}
			}
			select { // the newest read only
			case <-out:
			default:
			}
			out <- r
		}
	}()
	return nil
}

// inotifyDirs notifies changed when a set's file is written, replaced or
// removed in its directory.
func inotifyDirs(ctx context.Context, sets []config.PrefixSet, changed chan struct{}) error {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return fmt.Errorf("inotify: %w", err)
	}
	names := map[int32]map[string]bool{} // watch descriptor → file names watched in its directory
	for _, s := range sets {
		dir, name := filepath.Split(filepath.Clean(s.File))
		wd, err := unix.InotifyAddWatch(fd, filepath.Clean(dir), unix.IN_CLOSE_WRITE|unix.IN_MOVED_TO|unix.IN_DELETE|unix.IN_CREATE)
		if err != nil {
			unix.Close(fd)
			return fmt.Errorf("watching prefix set %s (%s): %w", s.Name, s.File, err)
		}
		if names[int32(wd)] == nil {
			names[int32(wd)] = map[string]bool{}
		}
		names[int32(wd)][name] = true
	}
	f := os.NewFile(uintptr(fd), "inotify")
	go func() {
		<-ctx.Done()
		f.Close()
	}()
	go func() {
		buf := make([]byte, 64*1024)
		for {
			n, err := f.Read(buf)
			if err != nil {
				return
			}
			for off := 0; off+unix.SizeofInotifyEvent <= n; {
				ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
				end := off + unix.SizeofInotifyEvent + int(ev.Len)
				if end > n {
					break
				}
				name := string(bytes.TrimRight(buf[off+unix.SizeofInotifyEvent:end], "\x00"))
				if names[ev.Wd][name] {
					notify(changed)
				}
				off = end
			}
		}
	}()
	return nil
}

// fileState is what tells a file's content changed without reading it,
// through symbolic links: which file it is, its size and its time.
type fileState struct {
	dev, ino uint64
	size     int64
	mtime    int64
	err      bool
}

func fileStates(sets []config.PrefixSet) []fileState {
	out := make([]fileState, len(sets))
	for i, s := range sets {
		var st syscall.Stat_t
		if err := syscall.Stat(s.File, &st); err != nil {
			out[i].err = true
			continue
		}
		out[i] = fileState{dev: st.Dev, ino: st.Ino, size: st.Size, mtime: st.Mtim.Nano()}
	}
	return out
}

// restartPrefixSetWatch follows the prefix sets of the config in force,
// ending the watch of the previous one (a read it had under way is
// dropped: its watch number is no longer the agent's).
func (a *Agent) restartPrefixSetWatch(ctx context.Context) {
	if ctx == nil { // not running (unit tests of reconfigure)
		return
	}
	if a.stopSetWatch != nil {
		a.stopSetWatch()
	}
	a.setWatch++
	wctx, cancel := context.WithCancel(ctx)
	a.stopSetWatch = cancel
	if err := watchPrefixSets(wctx, a.cfg, a.setWatch, a.setRead); err != nil {
		a.events.Add(events.PrefixSet, "", "prefix set files not followed: a change needs a reload", "err", err)
	}
}

// takePrefixSets makes what the watch read the config in force, and
// reports whether a set changed. A file that could not be read keeps its
// set as it was, with an event.
func (a *Agent) takePrefixSets(r prefixSetRead) bool {
	if r.watch != a.setWatch {
		return false // a read of the config before a reload
	}
	changed := map[string][]netip.Prefix{}
	total := 0
	for _, s := range a.cfg.PrefixSets {
		p, ok := r.sets[s.Name]
		if !ok {
			a.events.Add(events.PrefixSet, "", "prefix set file refused: the set stays as it was", "set", s.Name, "err", r.errs[s.Name])
			total += len(s.Prefixes)
			continue
		}
		total += len(p)
		if !slices.Equal(p, s.Prefixes) {
			changed[s.Name] = p
		}
	}
	if len(changed) == 0 {
		return false
	}
	if total > config.MaxPrefixes {
		a.events.Add(events.PrefixSet, "", "prefix set files refused: the sets stay as they were", "prefixes", total, "max", config.MaxPrefixes)
		return false
	}
	next := a.cfg.WithPrefixSets(changed)
	if err := CheckRules(next); err != nil {
		a.events.Add(events.PrefixSet, "", "prefix set files refused: the sets stay as they were", "err", err)
		return false
	}
	a.cfg = next
	for name, p := range changed {
		a.events.Add(events.PrefixSet, "", "prefix set changed: applying it to new flows", "set", name, "prefixes", len(p))
	}
	return true
}
