// SPDX-License-Identifier: Apache-2.0

// Package sysctl sets the kernel settings uplinkd needs and remembers, in
// a file, the values it replaced, so that Restore puts them back even
// from another process (`uplinkd down` after `uplinkd run`).
package sysctl

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/vishvananda/netns"

	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/nsdo"
	"github.com/uplinkd/uplinkd/control/plan"
	"github.com/uplinkd/uplinkd/control/statefile"
)

// FS reads and writes sysctls by their path below /proc/sys.
type FS interface {
	Get(path string) (string, error)
	Set(path, value string) error
}

// Proc is /proc/sys of a network namespace. The zero NS (or -1) means
// the namespace of the calling thread.
type Proc struct {
	NS netns.NsHandle
}

// Get reads one sysctl.
func (p Proc) Get(path string) (string, error) {
	var v []byte
	err := p.do(func() (err error) {
		v, err = os.ReadFile(filepath.Join("/proc/sys", path))
		return err
	})
	return strings.TrimSpace(string(v)), err
}

// Set writes one sysctl.
func (p Proc) Set(path, value string) error {
	return p.do(func() error {
		return os.WriteFile(filepath.Join("/proc/sys", path), []byte(value), 0)
	})
}

// do runs f in p.NS: /proc/sys/net shows the namespace of the thread
// that opens it.
func (p Proc) do(f func() error) error {
	if p.NS <= 0 {
		return f()
	}
	return nsdo.Do(p.NS, f)
}

// SavedFile is where the replaced values are kept, in the state dir.
const SavedFile = "sysctl-saved.json"

// Same compares two sysctl values, numerically where both are numbers
// ("0x37" and "55" are the same).
func Same(a, b string) bool {
	x, errx := strconv.ParseInt(a, 0, 64)
	y, erry := strconv.ParseInt(b, 0, 64)
	if errx == nil && erry == nil {
		return x == y
	}
	return a == b
}

// Apply sets every sysctl that differs from want. Before the first change
// of a sysctl its old value is written to the state dir, once: a crashed
// run that is started again does not record its own values as the
// originals. It returns how many it changed and every error, joined.
func Apply(f FS, want []plan.Sysctl, stateDir string) (int, error) {
	saved, err := load(stateDir)
	if err != nil {
		return 0, err
	}
	var errs []error
	changed := 0
	for _, s := range want {
		cur, err := f.Get(s.Path)
		if err != nil {
			errs = append(errs, fmt.Errorf("reading sysctl %s: %w", s.Name(), err))
			continue
		}
		if Same(cur, s.Value) {
			continue
		}
		if _, ok := saved[s.Path]; !ok {
			saved[s.Path] = cur
			if err := store(stateDir, saved); err != nil {
				return changed, errors.Join(append(errs, err)...)
			}
		}
		if err := f.Set(s.Path, s.Value); err != nil {
			errs = append(errs, fmt.Errorf("setting sysctl %s=%s: %w", s.Name(), s.Value, err))
			continue
		}
		changed++
	}
	return changed, errors.Join(errs...)
}

// Restore writes back every saved value and removes the file. A sysctl of
// an interface that is gone is skipped.
func Restore(f FS, stateDir string) (int, error) {
	saved, err := load(stateDir)
	if err != nil {
		return 0, err
	}
	var errs []error
	n := 0
	// Forwarding first: it is off (if it was) before the rest goes.
	paths := slices.Sorted(maps.Keys(saved))
	slices.SortStableFunc(paths, func(a, b string) int { return boolCmp(b == plan.ForwardingSysctl, a == plan.ForwardingSysctl) })
	for _, path := range paths {
		v := saved[path]
		err := f.Set(path, v)
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			errs = append(errs, fmt.Errorf("restoring sysctl %s=%s: %w", path, v, err))
		default:
			n++
		}
	}
	if len(errs) == 0 {
		errs = append(errs, statefile.Remove(stateDir, SavedFile))
	}
	return n, errors.Join(errs...)
}

// load reads the saved values. The file's keys become paths below
// /proc/sys, so only the sysctls uplinkd itself sets, with numeric values,
// are accepted: a file edited to name another path is refused whole.
func load(dir string) (map[string]string, error) {
	saved := map[string]string{}
	if err := statefile.Read(dir, SavedFile, &saved); err != nil {
		return nil, err
	}
	var errs []error
	for path, v := range saved {
		if !Owned(path) {
			errs = append(errs, fmt.Errorf("%s names %q, which uplinkd never sets: refused", filepath.Join(dir, SavedFile), path))
		} else if _, err := strconv.ParseInt(v, 0, 64); err != nil {
			errs = append(errs, fmt.Errorf("%s: %s=%q is not a number: refused", filepath.Join(dir, SavedFile), path, v))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return saved, nil
}

func boolCmp(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return 1
	}
	return -1
}

// global are the sysctls uplinkd sets outside interfaces' conf/.
var global = []string{
	"net/ipv4/ip_forward",
	"net/ipv4/fib_multipath_hash_policy",
	"net/ipv4/fib_multipath_hash_fields",
	"net/ipv4/fib_multipath_use_neigh",
}

// perInterface are the sysctls uplinkd sets in net/ipv4/conf/IFNAME/.
var perInterface = []string{"rp_filter", "ignore_routes_with_linkdown"}

// Owned reports whether path is a sysctl uplinkd sets (plan.Build's).
func Owned(path string) bool {
	if slices.Contains(global, path) {
		return true
	}
	rest, ok := strings.CutPrefix(path, "net/ipv4/conf/")
	if !ok {
		return false
	}
	ifname, name, ok := strings.Cut(rest, "/")
	return ok && config.ValidIfname(ifname) && slices.Contains(perInterface, name)
}

func store(dir string, saved map[string]string) error {
	return statefile.Write(dir, SavedFile, saved)
}

// RestorePaths writes back the saved values of paths only (the sysctls of
// a line a new config removed) and forgets them; the others stay saved.
func RestorePaths(f FS, stateDir string, paths []string) (int, error) {
	saved, err := load(stateDir)
	if err != nil {
		return 0, err
	}
	var errs []error
	n := 0
	for _, path := range paths {
		v, ok := saved[path]
		if !ok {
			continue
		}
		if err := f.Set(path, v); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("restoring sysctl %s=%s: %w", path, v, err))
			continue
		}
		delete(saved, path)
		n++
	}
	if n > 0 {
		errs = append(errs, store(stateDir, saved))
	}
	return n, errors.Join(errs...)
}
