// SPDX-License-Identifier: Apache-2.0

package lab

import (
	"context"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Faults are injected on the ISP routers, never on the gateway, so the
// agent under test sees them the way it would see a real line fail.
// The lab kernel has no netem, matchall or gact, so drops are nftables rules
// (the nft binary must be installed).

// faultTimeout bounds one fault's nft or ip command: generous, since an
// emulated VM of the kernel matrix, busy with the demo's traffic, took
// more than 5 s for one nft -f.
const faultTimeout = 20 * time.Second

func (l *Lab) isp(n int) (*Host, error) {
	if n < 1 || n > len(l.ISPs) {
		return nil, fmt.Errorf("no ISP %d (lab has %d)", n, len(l.ISPs))
	}
	return l.ISPs[n-1], nil
}

// SetCarrier sets the ISP's down0 link down or up, so the gateway's wanN
// loses or regains carrier. It returns once the gateway reports the new
// operational state.
func (l *Lab) SetCarrier(n int, up bool) error {
	isp, err := l.isp(n)
	if err != nil {
		return err
	}
	nh, err := isp.Netlink()
	if err != nil {
		return err
	}
	defer nh.Close()
	link, err := nh.LinkByName("down0")
	if err != nil {
		return fmt.Errorf("finding down0 in %s: %w", isp.Name, err)
	}
	if up {
		err = nh.LinkSetUp(link)
	} else {
		err = nh.LinkSetDown(link)
	}
	if err != nil {
		return fmt.Errorf("setting down0 in %s up=%v: %w", isp.Name, up, err)
	}

	gw, err := l.Gateway.Netlink()
	if err != nil {
		return err
	}
	defer gw.Close()
	wan := l.Lines[n-1].Interface
	deadline := time.Now().Add(faultTimeout)
	for {
		wl, err := gw.LinkByName(wan)
		if err != nil {
			return fmt.Errorf("finding %s in %s: %w", wan, l.Gateway.Name, err)
		}
		if HasCarrier(wl) == up && (wl.Attrs().OperState == netlink.OperUp) == up {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s still has operstate %s after %v", wan, wl.Attrs().OperState, faultTimeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// HasCarrier reports whether the link has carrier (IFF_LOWER_UP).
func HasCarrier(l netlink.Link) bool {
	return l.Attrs().RawFlags&unix.IFF_LOWER_UP != 0
}

// SetGatewaySilent makes ISP n's router drop every frame the gateway sends
// it, ARP included (nftables netdev ingress on down0), while the carrier
// stays up.
func (l *Lab) SetGatewaySilent(n int, silent bool) error {
	rules := ""
	if silent {
		rules = `table netdev uplinkd_lab_silent {
	chain in { type filter hook ingress device "down0" priority -500; policy drop; }
}`
	}
	return l.nftTable(n, "netdev uplinkd_lab_silent", rules)
}

// SetLossBeyond drops percent (0..100) of the packets ISP n's router sends
// towards the server (nftables on up0 egress); 0 removes the loss.
func (l *Lab) SetLossBeyond(n int, percent float64) error {
	return l.setLoss(n, "uplinkd_lab_loss", "up0", percent)
}

// SetLoss drops percent (0..100) of the frames ISP n's router sends the
// gateway (nftables on down0 egress: echo and ARP replies included), at
// random, while the carrier stays up: a lossy line. 0 removes the loss.
func (l *Lab) SetLoss(n int, percent float64) error {
	return l.setLoss(n, "uplinkd_lab_line_loss", "down0", percent)
}

// setLoss drops percent of the packets leaving dev of ISP n's router, in
// its own netdev table.
func (l *Lab) setLoss(n int, table, dev string, percent float64) error {
	if percent < 0 || percent > 100 || math.IsNaN(percent) {
		return fmt.Errorf("loss %v%% out of range 0..100", percent)
	}
	rules := ""
	if perTenK := int(math.Round(percent * 100)); perTenK > 0 {
		rule := "drop"
		if perTenK < 10000 {
			rule = fmt.Sprintf("numgen random mod 10000 < %d drop", perTenK)
		}
		rules = `table netdev ` + table + ` {
	chain out { type filter hook egress device "` + dev + `" priority 0; ` + rule + `; }
}`
	}
	return l.nftTable(n, "netdev "+table, rules)
}

// nftTable atomically replaces table (family and name) in ISP n's namespace
// with rules, or deletes it when rules is empty.
func (l *Lab) nftTable(n int, table, rules string) error {
	isp, err := l.isp(n)
	if err != nil {
		return err
	}
	// Declaring the table first makes the delete valid when it is absent.
	script := "table " + table + "\ndelete table " + table + "\n" + rules + "\n"
	ctx, cancel := context.WithTimeout(context.Background(), faultTimeout)
	defer cancel()
	cmd := isp.Command(ctx, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("applying nft table %s in %s: %w: %s", table, isp.Name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// SetRate limits ISP n's line to mbit Mbit/s each way (a token bucket on
// its router's interfaces towards the gateway and towards the server), as
// lines of different capacity are; 0 removes the limit.
func (l *Lab) SetRate(n int, mbit int) error {
	isp, err := l.isp(n)
	if err != nil {
		return err
	}
	if mbit < 0 || mbit > 100000 {
		return fmt.Errorf("rate %d Mbit/s out of range 0..100000", mbit)
	}
	ctx, cancel := context.WithTimeout(context.Background(), faultTimeout)
	defer cancel()
	for _, dev := range []string{"down0", "up0"} {
		args := []string{"qdisc", "del", "dev", dev, "root"}
		if mbit > 0 {
			// A burst of a few ms at the rate, at least a few frames.
			burst := max(32<<10, mbit*1000*1000/8/200)
			args = []string{"qdisc", "replace", "dev", dev, "root", "tbf", "rate", fmt.Sprintf("%dmbit", mbit),
				"burst", fmt.Sprint(burst), "latency", "50ms"}
		}
		if out, err := isp.Run(ctx, "tc", args...); err != nil && mbit > 0 {
			return fmt.Errorf("limiting %s of %s: %w: %s", dev, isp.Name, err, strings.TrimSpace(out))
		}
	}
	return nil
}
