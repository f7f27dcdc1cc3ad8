// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// BPFFSRoot is where bpffs is mounted on a systemd machine, and where
// uplinkd mounts it when nothing is mounted there (as Cilium's agent does):
// a fresh Debian machine without systemd's mount has none.
const BPFFSRoot = "/sys/fs/bpf"

// CheckPinDir reports, changing nothing, whether pinDir can hold the
// datapath's pins: on a bpf filesystem, or below BPFFSRoot where none is
// mounted yet (PreparePinDir mounts it); if it exists, a directory owned
// by uplinkd's user that nobody else may write.
func CheckPinDir(pinDir string) error {
	if !filepath.IsAbs(pinDir) {
		return fmt.Errorf("%q is not an absolute path", pinDir)
	}
	if filepath.Clean(pinDir) == BPFFSRoot || mountRoot(pinDir) {
		return fmt.Errorf("%s is a file system's root: pick a directory of uplinkd's own in it", pinDir)
	}
	onBPF, err := onBPFFS(pinDir)
	if err != nil {
		return err
	}
	if !onBPF && !(below(pinDir, BPFFSRoot) && !isBPFFS(BPFFSRoot)) {
		return fmt.Errorf("%s is not on a bpf filesystem", pinDir)
	}
	var st unix.Stat_t
	switch err := unix.Lstat(pinDir, &st); {
	case errors.Is(err, unix.ENOENT):
		return nil
	case err != nil:
		return err
	case st.Mode&unix.S_IFMT != unix.S_IFDIR:
		return fmt.Errorf("%s is not a directory (or is a symbolic link)", pinDir)
	case int(st.Uid) != os.Geteuid():
		return fmt.Errorf("%s is owned by uid %d, not by uplinkd's uid %d: someone else made it", pinDir, st.Uid, os.Geteuid())
	case st.Mode&0o022 != 0:
		return fmt.Errorf("%s is writable by group or others (mode %#o)", pinDir, st.Mode&0o7777)
	}
	return nil
}

// PreparePinDir checks pinDir (CheckPinDir), mounts bpffs at BPFFSRoot
// when the pin dir is below it and nothing is mounted there, and creates
// the pin dir (0700). It reports whether it mounted bpffs.
func PreparePinDir(pinDir string) (mounted bool, err error) {
	if err := CheckPinDir(pinDir); err != nil {
		return false, fmt.Errorf("pin dir: %w", err)
	}
	if below(pinDir, BPFFSRoot) && !isBPFFS(BPFFSRoot) {
		if err := os.MkdirAll(BPFFSRoot, 0o755); err != nil {
			return false, fmt.Errorf("mounting bpffs: %w", err)
		}
		if err := unix.Mount("bpf", BPFFSRoot, "bpf", 0, "mode=0700"); err != nil {
			return false, fmt.Errorf("mounting bpffs at %s: %w", BPFFSRoot, err)
		}
		mounted = true
	}
	if err := os.MkdirAll(filepath.Join(pinDir, linksDir), 0o700); err != nil {
		return mounted, fmt.Errorf("creating pin directory: %w", err)
	}
	return mounted, nil
}

// onBPFFS reports whether path, or the nearest of its parents that exists,
// is on a bpf filesystem.
func onBPFFS(path string) (bool, error) {
	for p := filepath.Clean(path); ; p = filepath.Dir(p) {
		var st unix.Statfs_t
		err := unix.Statfs(p, &st)
		if err == nil {
			return st.Type == unix.BPF_FS_MAGIC, nil
		}
		if !errors.Is(err, unix.ENOENT) || p == "/" {
			return false, &fs.PathError{Op: "statfs", Path: p, Err: err}
		}
	}
}

func isBPFFS(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == unix.BPF_FS_MAGIC
}

func below(path, dir string) bool {
	return strings.HasPrefix(filepath.Clean(path), dir+"/")
}

// CheckPins compares the maps pinned in opts.PinDir with those the
// datapath would create from opts (size, layout, type), without loading
// anything: a pinned map that does not fit is never replaced, so the
// error says which map differs and how, before anything is changed.
func CheckPins(opts Options) error {
	opts = opts.withDefaults()
	spec, err := loadUplinkd()
	if err != nil {
		return err
	}
	spec.Maps[uplinkdMapUlFlows].MaxEntries = opts.FlowEntries
	var errs []error
	for name, ms := range spec.Maps {
		if ms.Pinning != ebpf.PinByName {
			continue
		}
		m, err := ebpf.LoadPinnedMap(filepath.Join(opts.PinDir, name), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("pinned map %s: %w", name, err))
			continue
		}
		info, err := m.Info()
		m.Close()
		if err != nil {
			errs = append(errs, fmt.Errorf("pinned map %s: %w", name, err))
			continue
		}
		switch {
		case info.MaxEntries != ms.MaxEntries:
			errs = append(errs, fmt.Errorf("pinned map %s has %d entries, this config wants %d", name, info.MaxEntries, ms.MaxEntries))
		case info.Type != ms.Type || info.KeySize != ms.KeySize || info.ValueSize != ms.ValueSize:
			errs = append(errs, fmt.Errorf("pinned map %s is a %v of %d-byte keys and %d-byte values, this datapath's a %v of %d and %d",
				name, info.Type, info.KeySize, info.ValueSize, ms.Type, ms.KeySize, ms.ValueSize))
		}
	}
	return errors.Join(errs...)
}

// mountRoot reports whether path exists and is the root of a mount (its
// parent is on another device): others' pins may live there.
func mountRoot(path string) bool {
	var st, parent unix.Stat_t
	if unix.Stat(path, &st) != nil || unix.Stat(filepath.Dir(filepath.Clean(path)), &parent) != nil {
		return false
	}
	return st.Dev != parent.Dev
}
