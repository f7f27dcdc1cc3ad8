// SPDX-License-Identifier: Apache-2.0

package control

import (
	"fmt"
	"slices"
	"syscall"

	"github.com/uplinkd/uplinkd/control/statefile"
)

// linesDownFile, in the state dir, lists the lines an operator took down
// (`uplinkd line down NAME`).
const linesDownFile = "lines-down.json"

// LinesDown returns the lines an operator took down.
func LinesDown(stateDir string) ([]string, error) {
	var names []string
	return names, statefile.Read(stateDir, linesDownFile, &names)
}

// SetLineDown takes a line down (down true) or brings it back, for the
// agent to act on at its next reconcile; it returns the pid of the
// running agent it notified (SIGHUP), or 0 when none runs. Only the
// process that holds the state dir's lock is signalled, never a pid from a
// stale file.
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
	pid := statefile.Holder(stateDir)
	if pid != 0 {
		if err := syscall.Kill(pid, syscall.SIGHUP); err != nil {
			return 0, fmt.Errorf("notifying agent %d: %w", pid, err)
		}
	}
	return pid, nil
}
