// SPDX-License-Identifier: Apache-2.0

package statefile

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: the state dir must be root's")
	}
}

// A state dir that others may write, own or have replaced by a link is
// refused, and so is a relative one.
func TestPrepareRefusesUntrusted(t *testing.T) {
	requireRoot(t)
	base := t.TempDir()
	open := filepath.Join(base, "open")
	if err := os.Mkdir(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	nobody := filepath.Join(base, "nobody")
	if err := os.Mkdir(nobody, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(nobody, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(base, "link")
	if err := os.Symlink(t.TempDir(), link); err != nil {
		t.Fatal(err)
	}
	for dir, want := range map[string]string{
		open:             "writable by group or others",
		nobody:           "owned by uid 65534",
		link:             "not a directory (or a symbolic link)",
		"relative/state": "not an absolute path",
	} {
		if err := Prepare(dir); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Prepare(%s) = %v, want %q", dir, err, want)
		}
	}
	fresh := filepath.Join(base, "fresh", "state")
	if err := Prepare(fresh); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(fresh); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("created %v %v, want mode 0700", st.Mode(), err)
	}
}

// Neither the file nor its temporary name is followed through a link:
// the link's target stays as it was.
func TestWriteAndReadFollowNoLink(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	victim := filepath.Join(t.TempDir(), "victim")
	if err := os.WriteFile(victim, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"state.json", "state.json.tmp"} {
		if err := os.Symlink(victim, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	var v []string
	if err := Read(dir, "state.json", &v); err == nil {
		t.Errorf("Read followed a link")
	}
	if err := Write(dir, "state.json", []string{"a"}); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(victim); string(b) != "precious" {
		t.Errorf("the link's target was written: %q", b)
	}
	if err := Read(dir, "state.json", &v); err != nil || len(v) != 1 || v[0] != "a" {
		t.Errorf("Read = %v, %v", v, err)
	}
}

// One holder at a time, named by the kernel (/proc/locks), not by a pid
// file: a lock file left by a dead process, naming some pid, names nobody.
func TestLockNamesItsHolder(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, lockFile), []byte("4242\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	l, err := Acquire(dir)
	if err != nil {
		t.Fatalf("a stale lock file naming pid 4242: %v", err)
	}
	l.Release()
	// Another process holds it: flock(1) keeps it while sleeping.
	cmd := exec.Command("flock", "--exclusive", filepath.Join(dir, lockFile), "sleep", "30")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // flock and its sleep go together
	if err := cmd.Start(); err != nil {
		t.Skipf("flock(1): %v", err)
	}
	kill := func() { syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); cmd.Wait() }
	t.Cleanup(kill)
	want := "pid " + strconv.Itoa(cmd.Process.Pid)
	var got error
	for range 100 {
		var l *Lock
		if l, got = Acquire(dir); got != nil {
			break
		}
		l.Release() // flock(1) has not taken it yet
		exec.Command("sleep", "0.02").Run()
	}
	if !errors.Is(got, ErrLocked) || !strings.Contains(got.Error(), want) {
		t.Errorf("Acquire = %v, want ErrLocked naming %s", got, want)
	}
	other := t.TempDir()
	held, err := LockDir(other)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := LockDir(other); !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), "pid "+strconv.Itoa(os.Getpid())) {
		t.Errorf("second LockDir = %v, want ErrLocked naming this process", err)
	}
	held.Release()
	kill()
	for range 100 { // the killed sleep closes its files as it exits
		if l, err := Acquire(dir); err == nil {
			l.Release()
			return
		}
		exec.Command("sleep", "0.02").Run()
	}
	t.Error("the lock stayed taken after its holder died")
}
