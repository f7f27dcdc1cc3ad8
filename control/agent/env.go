// SPDX-License-Identifier: Apache-2.0

// Package agent is uplinkd's run loop: it turns the config and the lines'
// health into kernel state (plan), applies it through the kernel packages
// (routing, nat, sysctl, the datapath), keeps it applied against outside
// changes, answers the control socket, and removes it all on down.
package agent

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/uplinkd/uplinkd/control/nsdo"
	"github.com/uplinkd/uplinkd/control/plan"
	"github.com/uplinkd/uplinkd/control/sysctl"
)

// Env is the kernel of one network namespace, as the control plane sees
// it: netlink for links, rules and routes, nftables, and /proc/sys.
type Env struct {
	NS     netns.NsHandle
	NL     *netlink.Handle
	NFT    *nftables.Conn
	Sysctl sysctl.FS
}

// OpenEnv opens handles into the network namespace ns; netns.None() means
// the caller's namespace. The handles stay in that namespace whatever
// thread uses them.
func OpenEnv(ns netns.NsHandle) (*Env, error) {
	if !ns.IsOpen() {
		cur, err := netns.Get()
		if err != nil {
			return nil, fmt.Errorf("opening current network namespace: %w", err)
		}
		ns = cur
	} else {
		dup, err := unix.Dup(int(ns))
		if err != nil {
			return nil, fmt.Errorf("duplicating netns handle: %w", err)
		}
		ns = netns.NsHandle(dup)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("opening netlink: %w", err)
	}
	nft, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		h.Close()
		ns.Close()
		return nil, fmt.Errorf("opening nftables: %w", err)
	}
	return &Env{NS: ns, NL: h, NFT: nft, Sysctl: sysctl.Proc{NS: ns}}, nil
}

// Close releases the handles.
func (e *Env) Close() {
	e.NL.Close()
	e.NS.Close()
}

// Addrs lists the IPv4 addresses of an interface (plan.Interfaces).
func (e *Env) Addrs(ifname string) ([]netip.Prefix, error) {
	link, err := e.NL.LinkByName(ifname)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil, plan.ErrNoInterface
		}
		return nil, err
	}
	addrs, err := e.NL.AddrList(link, unix.AF_INET)
	if err != nil {
		return nil, fmt.Errorf("listing addresses of %s: %w", ifname, err)
	}
	out := make([]netip.Prefix, 0, len(addrs))
	for _, a := range addrs {
		if p, ok := prefixFromIPNet(a.IPNet); ok {
			out = append(out, p)
		}
	}
	return out, nil
}

func prefixFromIPNet(n *net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}

// Do runs f inside the namespace, for the calls that act on the calling
// thread's namespace (attaching BPF programs by interface name, tc).
func (e *Env) Do(f func() error) error { return nsdo.Do(e.NS, f) }

// LocalAddrs lists every address of every interface in the namespace:
// traffic to them is the gateway's own and is not steered.
func (e *Env) LocalAddrs() ([]netip.Addr, error) {
	addrs, err := e.NL.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("listing addresses: %w", err)
	}
	out := make([]netip.Addr, 0, len(addrs))
	for _, a := range addrs {
		if p, ok := prefixFromIPNet(a.IPNet); ok {
			out = append(out, p.Addr())
		}
	}
	return out, nil
}

// FlushConntrack deletes the connection tracking entries NAT'd to addr (a
// line's address): only that line's connections, never the whole table.
// Their next packet starts afresh on the line the datapath now picks,
// instead of being lost to masquerade's cleanup of the old entry.
func (e *Env) FlushConntrack(addr netip.Addr) (uint, error) {
	f := &netlink.ConntrackFilter{}
	if err := f.AddIP(netlink.ConntrackReplyDstIP, addr.AsSlice()); err != nil {
		return 0, err
	}
	n, err := e.NL.ConntrackDeleteFilters(netlink.ConntrackTable, unix.AF_INET, f)
	if err != nil {
		return n, fmt.Errorf("flushing conntrack entries of %s: %w", addr, err)
	}
	return n, nil
}

// Carrier reports whether an interface is up and has carrier: a line
// without it is avoided at once, without waiting for probes.
func (e *Env) Carrier(ifname string) bool {
	link, err := e.NL.LinkByName(ifname)
	if err != nil {
		return false
	}
	a := link.Attrs()
	return a.Flags&net.FlagUp != 0 && a.RawFlags&unix.IFF_LOWER_UP != 0
}
