// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Kernel is what the running kernel offers the datapath. Each field is nil
// where the feature is there, or an error naming what is missing.
type Kernel struct {
	// Release is uname -r.
	Release string
	// BTF, the kernel's type information (/sys/kernel/btf/vmlinux), is
	// required: the datapath reads conntrack's structures through CO-RE.
	BTF error
	// TCX links (6.6+) attach the programs; without them, clsact + cls_bpf.
	TCX error
	// CTKfuncs are bpf_skb_ct_lookup and bpf_ct_release, in vmlinux or the
	// nf_conntrack module: without them, flows the flow map lost are not
	// recovered from conntrack but picked afresh.
	CTKfuncs error
}

// Attach is the attach mode the datapath takes on this kernel.
func (k Kernel) Attach() AttachMode {
	if k.TCX == nil {
		return AttachTCX
	}
	return AttachTC
}

// ProbeKernel checks the running kernel. Finding the conntrack kfuncs may
// load the nf_conntrack module (as uplinkd's NAT would anyway).
func ProbeKernel() Kernel {
	var k Kernel
	var uts unix.Utsname
	if err := unix.Uname(&uts); err == nil {
		k.Release = unix.ByteSliceToString(uts.Release[:])
	}
	k.TCX = TCXSupported()
	kernel, err := btf.LoadKernelSpec()
	if err != nil {
		k.BTF = fmt.Errorf("kernel BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF): %w", err)
		k.CTKfuncs = fmt.Errorf("conntrack kfuncs: no kernel BTF: %w", err)
		return k
	}
	k.CTKfuncs = conntrackKfuncsIn(kernel)
	return k
}

// ctModule holds the conntrack kfuncs where conntrack is not built in (every
// stock Debian kernel).
const ctModule = "nf_conntrack"

// ctKfuncs are the kfuncs the datapath calls when ct_recovery is on.
var ctKfuncs = []string{"bpf_skb_ct_lookup", "bpf_ct_release"}

// conntrackKfuncs finds the conntrack kfuncs in the kernel's BTF or in the
// nf_conntrack module's, loading the module when it is not loaded yet.
func conntrackKfuncs() error {
	kernel, err := btf.LoadKernelSpec()
	if err != nil {
		return fmt.Errorf("conntrack kfuncs: no kernel BTF: %w", err)
	}
	return conntrackKfuncsIn(kernel)
}

// conntrackKfuncsIn is conntrackKfuncs with the kernel's BTF read already.
func conntrackKfuncsIn(kernel *btf.Spec) error {
	if hasFuncs(kernel) {
		return nil
	}
	if _, err := os.Stat("/sys/module/" + ctModule); errors.Is(err, os.ErrNotExist) {
		if err := loadModule(ctModule); err != nil {
			return fmt.Errorf("conntrack kfuncs: %s is not loaded: %w", ctModule, err)
		}
	}
	mod, err := btf.LoadKernelModuleSpec(ctModule)
	if err != nil {
		return fmt.Errorf("conntrack kfuncs: no BTF for module %s: %w", ctModule, err)
	}
	if !hasFuncs(mod) {
		return fmt.Errorf("conntrack kfuncs: %s not in the kernel (5.19+ with CONFIG_NF_CONNTRACK and CONFIG_DEBUG_INFO_BTF_MODULES)",
			strings.Join(ctKfuncs, ", "))
	}
	return nil
}

// loadModule loads a kernel module with its dependencies; a variable so
// that a test can stand for a kernel where it is missing.
var loadModule = modprobe

func modprobe(name string) error {
	if out, err := exec.Command("modprobe", name).CombinedOutput(); err != nil {
		return fmt.Errorf("modprobe %s: %v %s", name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

func hasFuncs(spec *btf.Spec) bool {
	for _, name := range ctKfuncs {
		var fn *btf.Func
		if err := spec.TypeByName(name, &fn); err != nil {
			return false
		}
	}
	return true
}

// TCXSupported is nil when the kernel has TCX links, else why not. It
// creates a TCX link on an interface that cannot exist: ENODEV means the
// kernel knows TCX, as in cilium/ebpf's own check.
func TCXSupported() error {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SchedCLS,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()},
	})
	if err != nil {
		return fmt.Errorf("tcx: loading a test program: %w", err)
	}
	defer prog.Close()
	l, err := link.AttachTCX(link.TCXOptions{Interface: 1 << 30, Program: prog, Attach: ebpf.AttachTCXIngress})
	switch {
	case err == nil:
		l.Close()
		return nil
	case errors.Is(err, link.ErrNotSupported):
		return fmt.Errorf("tcx: not in this kernel (6.6+)")
	case errors.Is(err, unix.ENODEV):
		return nil
	}
	return fmt.Errorf("tcx: %w", err)
}
