// SPDX-License-Identifier: Apache-2.0

package agent

import (
	"fmt"
	"time"

	"github.com/uplinkd/uplinkd/control/ctlsock"
	"github.com/uplinkd/uplinkd/control/events"
)

// HA roles: the master holds the VIPs (keepalived moved them here) and
// forwards; the standby probes its lines from its own addresses and keeps
// its datapath loaded, ready for a takeover.
const (
	RoleMaster  = "master"
	RoleStandby = "standby"
)

// haState is this gateway's part in an HA pair, as the agent sees it.
type haState struct {
	role      string // "" until the first refresh
	since     time.Time
	takeovers uint64 // times this gateway became master since the agent started
	// The last takeover: when the LAN VIP was seen here, and how long from
	// then until the kernel state was applied for it (routes, NAT, the
	// datapath's NAT sources that recover the synced flows' lines).
	lastTakeover time.Time
	applyTook    time.Duration
	pending      bool // a takeover seen, its Apply not done yet
	// What keepalived's notify script said last, and when.
	notified   string
	notifiedAt time.Time
}

// refreshHA follows the LAN VIP: on the first LAN interface, this gateway
// is master. It reports whether the role changed.
func (a *Agent) refreshHA(now time.Time) bool {
	ha := a.cfg.HA
	if ha == nil {
		return false
	}
	role := RoleStandby
	if addrs, err := a.k.Addrs(a.cfg.LAN.Interfaces[0]); err == nil {
		for _, p := range addrs {
			if p.Addr() == ha.LANVIPPrefix.Addr() {
				role = RoleMaster
			}
		}
	}
	if role == a.ha.role {
		return false
	}
	first := a.ha.role == ""
	a.ha.role, a.ha.since = role, now
	if role == RoleMaster && !first {
		a.ha.takeovers++
		a.ha.lastTakeover, a.ha.pending = now, true
	}
	a.events.Add(events.HARole, "", "HA role", "role", role, "vip", ha.LANVIPPrefix.Addr(), "first", first)
	return true
}

// appliedHA notes that an Apply ended: a pending takeover is complete
// once an Apply after it succeeded (ok).
func (a *Agent) appliedHA(now time.Time, ok bool) {
	if !a.ha.pending || !ok {
		return
	}
	a.ha.pending = false
	a.ha.applyTook = now.Sub(a.ha.lastTakeover)
	a.events.Add(events.HATakeover, "", "took over as master", "applied_in", a.ha.applyTook)
}

// controlHANotify records what keepalived's notify script says and
// reconciles at once (the VIPs have moved, or are about to).
func (a *Agent) controlHANotify(state string) ctlsock.Reply {
	if a.cfg.HA == nil {
		return ctlsock.Reply{Error: fmt.Sprintf("%s has no ha block", a.cfg.File())}
	}
	if state != "master" && state != "backup" && state != "fault" {
		return ctlsock.Reply{Error: fmt.Sprintf("unknown HA state %q: want master, backup or fault", state)}
	}
	a.ha.notified, a.ha.notifiedAt = state, time.Now()
	a.events.Add(events.HANotify, "", "keepalived notify", "state", state)
	if _, err := a.Apply(); err != nil {
		return ctlsock.Reply{Message: "noted: " + state, Error: "applying: " + err.Error()}
	}
	return ctlsock.Reply{Message: fmt.Sprintf("noted: %s; this gateway is %s", state, a.ha.role)}
}
