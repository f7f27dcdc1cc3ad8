// SPDX-License-Identifier: Apache-2.0

package agent

import (
	"errors"
	"fmt"
	"io/fs"

	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/plan"
	"github.com/uplinkd/uplinkd/control/statefile"
)

// scopeFile, in the state dir, keeps every rule priority and table that
// an agent of this state dir may have put rules and routes in: a restart
// or `down` with other numbers (a line's table changed while the agent
// was stopped) still finds what the earlier config created, and nothing
// else.
const scopeFile = "scope.json"

// savedScope is the scope kept in the state dir, empty where there is
// none. Entries that uplinkd never uses (the kernel's own tables and
// priorities, numbers out of range) are refused: the file is trusted
// only as far as uplinkd could have written it.
func savedScope(stateDir string) (plan.Scope, error) {
	var s plan.Scope
	if err := statefile.Check(stateDir); errors.Is(err, fs.ErrNotExist) {
		return s, nil
	} else if err != nil {
		return s, err
	}
	err := statefile.Read(stateDir, scopeFile, &s)
	if errors.Is(err, fs.ErrNotExist) {
		return plan.Scope{}, nil
	}
	if err != nil {
		return s, err
	}
	for p := range s.Priorities {
		if p < 1 || p > config.MaxPriority {
			return plan.Scope{}, fmt.Errorf("%s: rule priority %d is not one uplinkd uses", scopeFile, p)
		}
	}
	for t := range s.Tables {
		if !config.ValidTable(t) {
			return plan.Scope{}, fmt.Errorf("%s: table %d is not one uplinkd uses", scopeFile, t)
		}
	}
	return s, nil
}

func writeScope(stateDir string, s plan.Scope) error {
	return statefile.Write(stateDir, scopeFile, s)
}
