// SPDX-License-Identifier: Apache-2.0

package agent

import (
	"context"
	"errors"
	"fmt"

	"github.com/uplinkd/uplinkd/control/ctlsock"
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

// SetLineDown takes a line down (down true) or brings it back. A running
// agent is asked over its control socket and acts at once; where none
// runs, the state dir records it for the next one. It says which.
func SetLineDown(ctx context.Context, stateDir, name string, down bool) (string, error) {
	verb := map[bool]string{true: "down", false: "up"}[down]
	msg, err := ctlsock.Call(ctx, stateDir, ctlsock.Request{Cmd: "line", Line: name, Down: down})
	if !errors.Is(err, ctlsock.ErrNoAgent) {
		return msg, err
	}
	// No agent answers; one may be starting: only the state dir's owner
	// writes its files.
	lock, err := statefile.Acquire(stateDir)
	if errors.Is(err, statefile.ErrLocked) {
		return "", fmt.Errorf("an agent is starting (%w): try again", err)
	}
	if err != nil {
		return "", err
	}
	defer lock.Release()
	if err := setLineDown(stateDir, name, down); err != nil {
		return "", err
	}
	return fmt.Sprintf("line %s %s; no agent runs with state dir %s: it takes effect when one starts", name, verb, stateDir), nil
}
