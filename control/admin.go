// SPDX-License-Identifier: Apache-2.0

package control

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/uplinkd/uplinkd/control/statefile"
)

// Files in the state dir.
const (
	linesDownFile = "lines-down.json" // lines an operator took down (`uplinkd line down NAME`)
	pidFile       = "uplinkd.pid"     // the running agent, for `uplinkd line` to notify
)

// LinesDown returns the lines an operator took down.
func LinesDown(stateDir string) ([]string, error) {
	var names []string
	return names, statefile.Read(stateDir, linesDownFile, &names)
}

// SetLineDown takes a line down (down true) or brings it back, for the
// agent to act on at its next reconcile; it returns the pid of the
// running agent it notified (SIGHUP), or 0 when none runs.
func SetLineDown(stateDir, name string, down bool) (int, error) {
	names, err := LinesDown(stateDir)
	if err != nil {
		return 0, err
	}
	names = slices.DeleteFunc(names, func(n string) bool { return n == name })
	if down {
		names = append(names, name)
	}
	slices.Sort(names)
	if err := statefile.Write(stateDir, linesDownFile, names); err != nil {
		return 0, err
	}
	pid := runningAgent(stateDir)
	if pid != 0 {
		if err := syscall.Kill(pid, syscall.SIGHUP); err != nil {
			return 0, fmt.Errorf("notifying agent %d: %w", pid, err)
		}
	}
	return pid, nil
}

// runningAgent returns the pid in the state dir's pid file if that
// process is alive.
func runningAgent(stateDir string) int {
	b, err := os.ReadFile(filepath.Join(stateDir, pidFile))
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 || syscall.Kill(pid, 0) != nil {
		return 0
	}
	return pid
}

// writePid claims the state dir for this agent; another live agent on the
// same state dir is an error.
func writePid(stateDir string) error {
	if pid := runningAgent(stateDir); pid != 0 && pid != os.Getpid() {
		return fmt.Errorf("another agent (pid %d) runs with state dir %s", pid, stateDir)
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(stateDir, pidFile), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o600)
}
