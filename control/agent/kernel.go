// SPDX-License-Identifier: Apache-2.0

package agent

import (
	"errors"
	"fmt"
	"io"
	"log/slog"

	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/nat"
	"github.com/uplinkd/uplinkd/loader"
)

// MinKernel is the oldest kernel uplinkd is tested on (Debian 12's 6.1):
// every feature below is there from it on.
const MinKernel = "6.1"

// hashFieldsSysctl is the multipath hash field selection (5.12+) that keeps
// the unmarked fallback's hash stable across TCP retransmissions.
const hashFieldsSysctl = "net/ipv4/fib_multipath_hash_fields"

// Kernel is what the running kernel offers uplinkd, checked at start. Each
// error field is nil where the feature is there, else it names what is
// missing. Required features refuse the start; optional ones turn a
// feature off, and the agent logs which.
type Kernel struct {
	loader.Kernel
	// RejectPrerouting: nftables reject in a prerouting chain answers a
	// dead line's TCP flows with a reset (optional: without it those
	// clients retransmit until their timeout).
	RejectPrerouting error
	// HashFields: net.ipv4.fib_multipath_hash_fields (required).
	HashFields error
}

// CheckKernel probes the kernel of env's namespace. table names the
// nftables table whose "-probe-PID" sibling the reject check creates and
// deletes.
func CheckKernel(env *Env, table string) Kernel {
	var k Kernel
	_ = env.Do(func() error { k.Kernel = loader.ProbeKernel(); return nil })
	k.RejectPrerouting = nat.ProbeReject(env.NFT, table)
	if _, err := env.Sysctl.Get(hashFieldsSysctl); err != nil {
		k.HashFields = fmt.Errorf("sysctl %s (5.12+): %w", hashFieldsSysctl, err)
	}
	return k
}

// Refuse returns why cfg cannot run on this kernel, naming every missing
// required feature, or nil.
func (k Kernel) Refuse(cfg *config.Config) error {
	var errs []error
	if k.HashFields != nil {
		errs = append(errs, k.HashFields)
	}
	if cfg.Datapath.On() {
		if k.BTF != nil {
			errs = append(errs, fmt.Errorf("%w (or datapath.enabled: false)", k.BTF))
		}
		if cfg.Datapath.Attach == config.AttachTCX && k.TCX != nil {
			errs = append(errs, fmt.Errorf("datapath.attach: tcx: %w (or attach: auto)", k.TCX))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("kernel %s lacks what uplinkd needs (tested from %s on):\n%w", k.Release, MinKernel, err)
	}
	return nil
}

// Log says, once at start, which optional features are off and why.
func (k Kernel) Log(log *slog.Logger, cfg *config.Config) {
	if cfg.Datapath.On() {
		log.Info("kernel", "release", k.Release, "attach", k.Attach(), "ct_recovery", onOff(k.CTKfuncs))
		if k.TCX != nil && cfg.Datapath.Attach != config.AttachTC {
			log.Warn("kernel: no TCX, attaching with clsact and cls_bpf", "why", k.TCX)
		}
	}
	if k.RejectPrerouting != nil {
		log.Warn("kernel: dead lines' TCP flows get no reset (their clients wait for their own timeout)", "why", k.RejectPrerouting)
	}
}

// Report prints the check as `uplinkd features` shows it, one feature a
// line: "name: value", then the reason where it is missing.
func (k Kernel) Report(w io.Writer) {
	fmt.Fprintf(w, "kernel: %s\n", k.Release)
	line := func(name, value string, err error) {
		if err != nil {
			fmt.Fprintf(w, "%s: %s\t(%v)\n", name, value, err)
		} else {
			fmt.Fprintf(w, "%s: %s\n", name, value)
		}
	}
	line("btf", yesNo(k.BTF), k.BTF)
	line("attach", string(k.Attach()), k.TCX)
	line("ct_recovery", onOff(k.CTKfuncs), k.CTKfuncs)
	line("nft_reject_prerouting", yesNo(k.RejectPrerouting), k.RejectPrerouting)
	line("multipath_hash_fields", yesNo(k.HashFields), k.HashFields)
}

func onOff(err error) string {
	if err != nil {
		return "off"
	}
	return "on"
}

func yesNo(err error) string {
	if err != nil {
		return "no"
	}
	return "yes"
}
