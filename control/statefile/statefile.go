// SPDX-License-Identifier: Apache-2.0

// Package statefile keeps small JSON files in uplinkd's state dir, written
// atomically (a crash leaves the old file or the new one, never half of
// one), and the lock that makes one agent the owner of a state dir. The
// state dir is trusted only when root owns it and nobody else may write
// it; no file in it is followed through a symbolic link.
package statefile

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// maxSize bounds a state file: they hold a few names and numbers.
const maxSize = 1 << 20

// Prepare creates dir (0700) where it is missing and checks that it can
// be trusted: an absolute path to a directory, not a symbolic link, owned
// by the user uplinkd runs as (root), writable by nobody else.
func Prepare(dir string) error {
	if !filepath.IsAbs(dir) {
		return fmt.Errorf("state dir %q: not an absolute path", dir)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	return Check(dir)
}

// Check checks, without creating it, that dir can be trusted (see
// Prepare). A missing dir is fs.ErrNotExist.
func Check(dir string) error {
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		return fmt.Errorf("state dir %s: %w", dir, err)
	}
	switch {
	case st.Mode&unix.S_IFMT != unix.S_IFDIR:
		return fmt.Errorf("state dir %s: not a directory (or a symbolic link)", dir)
	case int(st.Uid) != os.Geteuid():
		return fmt.Errorf("state dir %s: owned by uid %d, not by uplinkd's uid %d", dir, st.Uid, os.Geteuid())
	case st.Mode&0o022 != 0:
		return fmt.Errorf("state dir %s: writable by group or others (mode %#o)", dir, st.Mode&0o7777)
	}
	return nil
}

// open opens dir/name without following a symbolic link there.
func open(dir, name string, flags int, perm uint32) (*os.File, error) {
	fd, err := unix.Open(filepath.Join(dir, name), flags|unix.O_NOFOLLOW|unix.O_CLOEXEC, perm)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: filepath.Join(dir, name), Err: err}
	}
	return os.NewFile(uintptr(fd), filepath.Join(dir, name)), nil
}

// Read decodes dir/name into v; a missing file leaves v as it is and is
// no error.
func Read(dir, name string, v any) error {
	f, err := open(dir, name, unix.O_RDONLY, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	var b []byte
	if err == nil {
		defer f.Close()
		b, err = io.ReadAll(io.LimitReader(f, maxSize))
	}
	if err == nil {
		err = json.Unmarshal(b, v)
	}
	if err != nil {
		return fmt.Errorf("reading %s: %w", filepath.Join(dir, name), err)
	}
	return nil
}

// Write encodes v into dir/name atomically and durably: a temporary file,
// synced, renamed over the old one, and the directory synced. dir must
// pass Prepare.
func Write(dir, name string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if err := Prepare(dir); err != nil {
		return err
	}
	tmp := name + ".tmp"
	// A leftover (a crash, or someone's link) is removed, never followed.
	if err := os.Remove(filepath.Join(dir, tmp)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("writing %s: %w", name, err)
	}
	f, err := open(dir, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("writing %s: %w", name, err)
	}
	_, err = f.Write(b)
	err = errors.Join(err, f.Sync(), f.Close())
	if err == nil {
		err = os.Rename(filepath.Join(dir, tmp), filepath.Join(dir, name))
	}
	if err == nil {
		err = syncDir(dir)
	}
	if err != nil {
		return fmt.Errorf("writing %s: %w", name, err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	return errors.Join(d.Sync(), d.Close())
}

// Remove deletes dir/name; a missing file is no error.
func Remove(dir, name string) error {
	if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// lockFile, in the state dir, is locked (flock) by the agent that owns the
// dir; it holds the agent's pid, for people.
const lockFile = "uplinkd.lock"

// Lock is a held flock: on a state dir's lock file, or on a directory.
type Lock struct{ f *os.File }

// ErrLocked says another process holds the lock; the error names it.
var ErrLocked = errors.New("locked")

// Acquire takes the state dir's lock without waiting, for as long as this
// process lives or until Release. Held by another process, it fails with
// an error wrapping ErrLocked that names the holder's pid.
func Acquire(dir string) (*Lock, error) {
	if err := Prepare(dir); err != nil {
		return nil, err
	}
	f, err := open(dir, lockFile, unix.O_RDWR|unix.O_CREAT, 0o600)
	if err != nil {
		return nil, fmt.Errorf("locking state dir: %w", err)
	}
	l, err := lock(f, "state dir "+dir)
	if err != nil {
		return nil, err
	}
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return l, nil
}

// LockDir takes a lock on a directory itself (the datapath's pin dir),
// like Acquire.
func LockDir(dir string) (*Lock, error) {
	f, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, fmt.Errorf("locking %s: %w", dir, err)
	}
	return lock(f, dir)
}

func lock(f *os.File, what string) (*Lock, error) {
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		defer f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%s is in use by pid %d: %w", what, holder(f), ErrLocked)
		}
		return nil, fmt.Errorf("locking %s: %w", what, err)
	}
	return &Lock{f}, nil
}

// Release gives the lock up.
func (l *Lock) Release() {
	if l != nil && l.f != nil {
		l.f.Close()
		l.f = nil
	}
}

// holder finds in /proc/locks the pid holding a flock on f's file, or 0:
// the kernel's word, not a pid file's, so a crashed holder names nobody.
func holder(f *os.File) int {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return 0
	}
	id := fmt.Sprintf("%02x:%02x:%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	b, err := os.ReadFile("/proc/locks")
	if err != nil {
		return 0
	}
	// On overlayfs (a VM's root) /proc/locks names the upper layer's
	// device: then the inode alone, if only one flock has it.
	byIno, matches := 0, 0
	for _, line := range strings.Split(string(b), "\n") {
		// 1: FLOCK  ADVISORY  WRITE 1234 00:2d:5678 0 EOF
		fs := strings.Fields(line)
		if len(fs) < 6 || fs[1] != "FLOCK" {
			continue
		}
		pid, _ := strconv.Atoi(fs[4])
		if fs[5] == id {
			return pid
		}
		if strings.HasSuffix(fs[5], fmt.Sprintf(":%d", st.Ino)) {
			byIno, matches = pid, matches+1
		}
	}
	if matches == 1 {
		return byIno
	}
	// A state dir's lock file holds its holder's pid; it is locked now.
	if b, err := io.ReadAll(io.LimitReader(f, 32)); err == nil {
		pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		return pid
	}
	return 0
}
