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
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/events"
)

// prefixSetSettle lets a writer finish: an editor or a deploy tool writes a
// set file in steps (truncate, write, rename).
const prefixSetSettle = 50 * time.Millisecond

// watchPrefixSets notifies out whenever one of cfg's prefix-set files is
// written, replaced or removed, until ctx ends. It watches the files'
// directories, so that a file replaced by a rename is followed too.
func watchPrefixSets(ctx context.Context, cfg *config.Config, out chan struct{}) error {
	if len(cfg.PrefixSets) == 0 {
		return nil
	}
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return fmt.Errorf("inotify: %w", err)
	}
	names := map[int32]map[string]bool{} // watch descriptor → file names watched in its directory
	for _, s := range cfg.PrefixSets {
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
					notify(out)
				}
				off = end
			}
		}
	}()
	return nil
}

// restartPrefixSetWatch watches the prefix sets of the config in force,
// ending the watch of the previous one.
func (a *Agent) restartPrefixSetWatch(ctx context.Context) {
	if a.stopSetWatch != nil {
		a.stopSetWatch()
	}
	wctx, cancel := context.WithCancel(ctx)
	a.stopSetWatch = cancel
	if err := watchPrefixSets(wctx, a.cfg, a.setChanged); err != nil {
		a.events.Add(events.PrefixSet, "", "prefix set files not followed: a change needs a reload", "err", err)
	}
}

// rereadPrefixSets reads every prefix-set file again and reports whether
// a set changed; the config in force then holds the new prefixes. A file
// that cannot be read or parsed keeps its set as it was, with an event.
func (a *Agent) rereadPrefixSets() bool {
	changed := map[string][]netip.Prefix{}
	total := 0
	for _, s := range a.cfg.PrefixSets {
		p, err := config.ReadPrefixSet(s.File)
		if err != nil {
			a.events.Add(events.PrefixSet, "", "prefix set file refused: the set stays as it was", "set", s.Name, "err", err)
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
	a.cfg = a.cfg.WithPrefixSets(changed)
	for name, p := range changed {
		a.events.Add(events.PrefixSet, "", "prefix set changed: new flows follow it", "set", name, "prefixes", len(p))
	}
	return true
}
