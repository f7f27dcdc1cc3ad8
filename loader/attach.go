// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/florianl/go-tc"
	"github.com/florianl/go-tc/core"
	"golang.org/x/sys/unix"
)

// linksDir, under the pin directory, holds one pinned TCX link per
// interface and direction: links/<ifname>_<direction>.
const linksDir = "links"

// LinksDir is where the TCX links of a pin dir are pinned.
func LinksDir(pinDir string) string { return filepath.Join(pinDir, linksDir) }

// AttachMode is how the programs are attached to an interface.
type AttachMode string

const (
	// AttachTCX is a TCX link (kernel 6.6+), pinned under the pin dir.
	AttachTCX AttachMode = "tcx"
	// AttachTC is a cls_bpf filter on a clsact qdisc.
	AttachTC AttachMode = "tc"
)

type direction struct {
	name     string
	tcx      ebpf.AttachType
	tcParent uint32 // clsact minor
}

var (
	ingress = direction{"ingress", ebpf.AttachTCXIngress, tc.HandleMinIngress}
	egress  = direction{"egress", ebpf.AttachTCXEgress, tc.HandleMinEgress}
)

// AttachLAN attaches the steering programs to the LAN interface ifname.
//
// Interface names are resolved, and programs attached, in the network
// namespace of the calling OS thread: to work in another namespace, lock the
// goroutine to its thread (runtime.LockOSThread) and enter the namespace
// (unix.Setns) before calling, or run the agent inside it.
func (d *Datapath) AttachLAN(ifname string) error {
	iface, err := net.InterfaceByName(ifname)
	if err != nil {
		return fmt.Errorf("attaching to %s: %w", ifname, err)
	}
	return errors.Join(
		d.attach(iface, ingress, d.objs.UplinkdLanIn),
		d.attach(iface, egress, d.objs.UplinkdLanOut),
	)
}

// attach puts prog on a hook of iface with TCX, or with tc where TCX is
// missing or not wanted, and removes an attachment of the other kind left
// there by an earlier run.
func (d *Datapath) attach(iface *net.Interface, dir direction, prog *ebpf.Program) error {
	pin := filepath.Join(d.pinDir, linksDir, iface.Name+"_"+dir.name)
	if d.mode != AttachTC {
		err := attachTCX(iface.Index, dir, prog, pin)
		switch {
		case errors.Is(err, link.ErrNotSupported) && d.mode == AttachTCX:
			return fmt.Errorf("attaching tcx to %s %s: attach mode tcx asked for, but this kernel has no TCX (6.6+): %w",
				iface.Name, dir.name, err)
		case err == nil:
			if err := tcDetach(d.tcState, iface.Index, dir); err != nil {
				return fmt.Errorf("detaching tc from %s %s: %w", iface.Name, dir.name, err)
			}
			d.attached[iface.Name] = AttachTCX
			return nil
		case !errors.Is(err, link.ErrNotSupported):
			return fmt.Errorf("attaching tcx to %s %s: %w", iface.Name, dir.name, err)
		}
	}
	if err := tcAttach(d.tcState, iface.Index, dir, prog); err != nil {
		return fmt.Errorf("attaching tc to %s %s: %w", iface.Name, dir.name, err)
	}
	if err := detachLink(pin); err != nil {
		return fmt.Errorf("detaching tcx from %s %s: %w", iface.Name, dir.name, err)
	}
	d.attached[iface.Name] = AttachTC
	return nil
}

// attachTCX updates the program of the link pinned at pin (an atomic swap:
// no packet misses the datapath on restart), or attaches a new link and pins
// it there. The link goes after the programs already on the hook.
func attachTCX(ifindex int, dir direction, prog *ebpf.Program, pin string) error {
	l, err := link.LoadPinnedLink(pin, nil)
	switch {
	case err == nil:
		defer l.Close()
		if info, err := l.Info(); err == nil && info.TCX() != nil &&
			int(info.TCX().Ifindex) == ifindex && ebpf.AttachType(info.TCX().AttachType) == dir.tcx {
			return l.Update(prog)
		}
		// The interface went away, or was replaced: the link is stale.
		if err := l.Unpin(); err != nil {
			return err
		}
	case !errors.Is(err, os.ErrNotExist):
		return err
	}

	l, err = link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: dir.tcx})
	if err != nil {
		return err
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		return errors.Join(err, l.Detach())
	}
	return nil
}

// detachLink detaches and unpins the link pinned at pin, if there is one
// and it runs one of uplinkd's programs (ProgPrefix).
func detachLink(pin string) error {
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer l.Close()
	if info, err := l.Info(); err == nil && info.Program != 0 {
		if p, err := ebpf.NewProgramFromID(info.Program); err == nil {
			pi, ierr := p.Info()
			p.Close()
			if ierr == nil && !strings.HasPrefix(pi.Name, ProgPrefix) {
				return fmt.Errorf("link %s runs %q, not uplinkd's: left alone", pin, pi.Name)
			}
		}
	}
	// A link whose interface is gone is already detached.
	if err := l.Detach(); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return l.Unpin()
}

// detachLinks detaches and unpins every link pinned in dir.
func detachLinks(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("listing links: %w", err)
	}
	var errs []error
	for _, e := range entries {
		// Only the names attach gives its pins: IFNAME_ingress, IFNAME_egress.
		if !strings.HasSuffix(e.Name(), "_"+ingress.name) && !strings.HasSuffix(e.Name(), "_"+egress.name) {
			continue
		}
		if err := detachLink(filepath.Join(dir, e.Name())); err != nil {
			errs = append(errs, fmt.Errorf("detaching %s: %w", e.Name(), err))
		}
	}
	return errors.Join(errs...)
}

// Verify checks, in the calling thread's network namespace, that the
// programs this Datapath attached to ifname are still there: the pinned
// TCX links attached to the interface, or uplinkd's cls_bpf filters. Someone
// may have unpinned a link (which detaches it) or deleted a filter; the
// error says what is missing, and attaching again repairs it.
func (d *Datapath) Verify(ifname string) error {
	mode, ok := d.attached[ifname]
	if !ok {
		return fmt.Errorf("%s: not attached", ifname)
	}
	index, err := ifindex(ifname)
	if err != nil {
		return fmt.Errorf("%s: %w", ifname, err)
	}
	for _, dir := range []direction{ingress, egress} {
		if mode == AttachTCX {
			if err := verifyTCX(index, dir, filepath.Join(d.pinDir, linksDir, ifname+"_"+dir.name)); err != nil {
				return fmt.Errorf("%s %s: %w", ifname, dir.name, err)
			}
			continue
		}
		nl, err := tcOpen()
		if err != nil {
			return err
		}
		f, err := findFilter(nl, index, core.BuildHandle(tc.HandleRoot, dir.tcParent))
		nl.Close()
		if err != nil {
			return fmt.Errorf("%s %s: %w", ifname, dir.name, err)
		}
		if f == nil || !ours(f) {
			return fmt.Errorf("%s %s: uplinkd's cls_bpf filter is gone", ifname, dir.name)
		}
	}
	return nil
}

// ifindex is the index of the interface name in the calling thread's
// namespace, by one ioctl: net.InterfaceByName reads every interface of
// the namespace, which Verify, run for each interface on every
// reconcile, made quadratic in the lines.
func ifindex(name string) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("finding interface: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return 0, fmt.Errorf("finding interface: %w", err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFINDEX, ifr); err != nil {
		return 0, fmt.Errorf("finding interface: %w", err)
	}
	return int(ifr.Uint32()), nil
}

func verifyTCX(ifindex int, dir direction, pin string) error {
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("link pin %s is gone", pin)
	}
	if err != nil {
		return err
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return fmt.Errorf("link info: %w", err)
	}
	if tcx := info.TCX(); tcx == nil || int(tcx.Ifindex) != ifindex || ebpf.AttachType(tcx.AttachType) != dir.tcx {
		return fmt.Errorf("link %d is detached", info.ID)
	}
	return nil
}

// Detach undoes AttachLAN for an interface the config no longer has in
// that role: uplinkd's programs leave ifname (TCX links unpinned, or
// uplinkd's tc filters deleted). It also takes the per-line counters that
// earlier uplinkd attached to line interfaces off them. An interface that no longer exists took its attachments with it;
// its pins are removed.
func (d *Datapath) Detach(ifname string) error {
	var errs []error
	for _, dir := range []direction{ingress, egress} {
		if err := detachLink(filepath.Join(d.pinDir, linksDir, ifname+"_"+dir.name)); err != nil {
			errs = append(errs, fmt.Errorf("detaching tcx from %s %s: %w", ifname, dir.name, err))
		}
	}
	delete(d.attached, ifname)
	iface, err := net.InterfaceByName(ifname)
	if err != nil {
		return errors.Join(errs...)
	}
	for _, dir := range []direction{ingress, egress} {
		if err := tcDetach(d.tcState, iface.Index, dir); err != nil {
			errs = append(errs, fmt.Errorf("detaching tc from %s %s: %w", ifname, dir.name, err))
		}
	}
	return errors.Join(errs...)
}
