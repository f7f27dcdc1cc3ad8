// SPDX-License-Identifier: Apache-2.0

package lab

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/uplinkd/uplinkd/control/nsdo"
)

// Host is one named network namespace of a lab.
type Host struct {
	Name string // namespace name, e.g. "ul1a2b3c-gw"
}

// Path returns the namespace's bind mount, /run/netns/NAME.
func (h *Host) Path() string { return filepath.Join(NetnsDir, h.Name) }

// NetNS opens the namespace. The caller closes the handle.
func (h *Host) NetNS() (netns.NsHandle, error) {
	ns, err := netns.GetFromPath(h.Path())
	if err != nil {
		return ns, fmt.Errorf("opening namespace %s: %w", h.Name, err)
	}
	return ns, nil
}

// Netlink returns a netlink handle bound to the namespace; the calling
// thread is not switched. The caller closes the handle.
func (h *Host) Netlink() (*netlink.Handle, error) {
	ns, err := h.NetNS()
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	nh, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("opening netlink in %s: %w", h.Name, err)
	}
	return nh, nil
}

// Do runs fn on an OS thread inside the namespace (nsdo.Do: the thread is
// discarded afterwards). Sockets fn creates belong to the namespace for
// good and may be used from any goroutine afterwards; goroutines fn starts
// run outside the namespace.
func (h *Host) Do(fn func() error) error {
	target, err := h.NetNS()
	if err != nil {
		return err
	}
	defer target.Close()
	if err := nsdo.Do(target, fn); err != nil {
		return fmt.Errorf("in %s: %w", h.Name, err)
	}
	return nil
}

// Command returns `nsenter --net=PATH -- name args...`. The process gets
// SIGKILL when ctx is done.
func (h *Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + h.Path(), "--", name}, args...)...)
	cmd.WaitDelay = 2 * time.Second
	return cmd
}

// Run runs a command in the namespace and returns its combined output; the
// error includes the output.
func (h *Host) Run(ctx context.Context, name string, args ...string) (string, error) {
	out, err := h.Command(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("running %s %s in %s: %w: %s",
			name, strings.Join(args, " "), h.Name, err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}
