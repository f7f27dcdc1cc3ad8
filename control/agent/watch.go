// SPDX-License-Identifier: Apache-2.0

package agent

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// watch reports changes that may need a reconcile, from three sources:
//   - rtnetlink: links, IPv4 addresses, IPv4 rules, IPv4 routes carrying
//     uplinkd's protocol tag (so a busy routing table elsewhere does not
//     wake the agent), the forwarding, rp_filter and linkdown settings
//     (netconf), and tc (someone deleting uplinkd's filters);
//   - nfnetlink: changes to uplinkd's nftables table;
//   - inotify: a datapath link unpinned from linksDir (which detaches it).
//
// The channels carry no detail: the reconcile reads the kernel anyway.
// The second one says a link lost its carrier, which is acted on at once
// (the first one's events wait a little, to come together). What has no
// event (the fib_multipath_* sysctls, a TCX link detached without
// unpinning) waits for the periodic reconcile.
func watch(ctx context.Context, ns netns.NsHandle, proto int, nftTable, linksDir string, log *slog.Logger) (changes, carrierLost <-chan struct{}, err error) {
	out, lost := make(chan struct{}, 1), make(chan struct{}, 1)
	route, err := nl.SubscribeAt(ns, netns.None(), unix.NETLINK_ROUTE,
		unix.RTNLGRP_LINK, unix.RTNLGRP_IPV4_IFADDR, unix.RTNLGRP_IPV4_RULE, unix.RTNLGRP_IPV4_ROUTE,
		unix.RTNLGRP_IPV4_NETCONF, unix.RTNLGRP_TC)
	if err != nil {
		return nil, nil, fmt.Errorf("subscribing to netlink events: %w", err)
	}
	nft, err := nl.SubscribeAt(ns, netns.None(), unix.NETLINK_NETFILTER, unix.NFNLGRP_NFTABLES)
	if err != nil {
		route.Close()
		return nil, nil, fmt.Errorf("subscribing to nftables events: %w", err)
	}
	go func() {
		<-ctx.Done()
		route.Close()
		nft.Close()
	}()
	receive(ctx, "netlink events", route, func(typ uint16, data []byte) chan struct{} {
		switch {
		case noCarrier(typ, data):
			return lost
		case routeRelevant(typ, data, proto):
			return out
		}
		return nil
	}, out, log)
	receive(ctx, "nftables events", nft, func(typ uint16, data []byte) chan struct{} {
		if nftRelevant(typ, data, nftTable) {
			return out
		}
		return nil
	}, out, log)
	if linksDir != "" {
		if err := watchUnpins(ctx, linksDir, out); err != nil {
			log.Warn("not watching datapath pins: the periodic reconcile repairs them", "err", err)
		}
	}
	return out, lost, nil
}

// receive forwards the messages of s as notifications on the channel
// route picks for each (nil: irrelevant) until ctx ends; a failed receive
// notifies out.
func receive(ctx context.Context, what string, s *nl.NetlinkSocket, route func(uint16, []byte) chan struct{}, out chan struct{}, log *slog.Logger) {
	go func() {
		for {
			msgs, _, err := s.Receive()
			if err != nil {
				if ctx.Err() == nil {
					log.Error(what, "err", err)
					notify(out) // an overrun may have lost events: reconcile
					time.Sleep(100 * time.Millisecond)
					continue
				}
				return
			}
			for _, m := range msgs {
				if c := route(m.Header.Type, m.Data); c != nil {
					notify(c)
				}
			}
		}
	}()
}

// noCarrier: a link message of a link without carrier (IFF_LOWER_UP
// clear), such as a line losing it.
func noCarrier(typ uint16, data []byte) bool {
	return typ == unix.RTM_NEWLINK && len(data) >= unix.SizeofIfInfomsg &&
		nl.DeserializeIfInfomsg(data).Flags&unix.IFF_LOWER_UP == 0
}

func routeRelevant(typ uint16, data []byte, proto int) bool {
	switch typ {
	case unix.RTM_NEWROUTE, unix.RTM_DELROUTE:
		return len(data) >= unix.SizeofRtMsg && int(nl.DeserializeRtMsg(data).Protocol) == proto
	default:
		return true
	}
}

// nftRelevant: a table, chain or rule message whose first attribute (the
// table's name in all three: NFTA_TABLE_NAME, NFTA_CHAIN_TABLE,
// NFTA_RULE_TABLE) is uplinkd's table. The payload starts with a 4-byte
// nfgenmsg.
func nftRelevant(typ uint16, data []byte, table string) bool {
	switch typ & 0xff {
	case unix.NFT_MSG_NEWTABLE, unix.NFT_MSG_DELTABLE, unix.NFT_MSG_NEWCHAIN, unix.NFT_MSG_DELCHAIN,
		unix.NFT_MSG_NEWRULE, unix.NFT_MSG_DELRULE:
	default:
		return false
	}
	const nfgenmsg = 4
	if len(data) < nfgenmsg+4 {
		return false
	}
	attr := data[nfgenmsg:]
	l, t := int(binary.NativeEndian.Uint16(attr)), binary.NativeEndian.Uint16(attr[2:])&0x3fff
	if t != 1 || l < 4 || l > len(attr) {
		return false
	}
	name := attr[4:l]
	for len(name) > 0 && name[len(name)-1] == 0 {
		name = name[:len(name)-1]
	}
	return string(name) == table
}

// watchUnpins notifies when a pin in dir is removed or renamed away.
func watchUnpins(ctx context.Context, dir string, out chan struct{}) error {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return fmt.Errorf("inotify: %w", err)
	}
	if _, err := unix.InotifyAddWatch(fd, filepath.Clean(dir), unix.IN_DELETE|unix.IN_MOVED_FROM|unix.IN_DELETE_SELF); err != nil {
		unix.Close(fd)
		return fmt.Errorf("watching %s: %w", dir, err)
	}
	// Non-blocking, through the runtime's poller: Close ends a Read.
	f := os.NewFile(uintptr(fd), "inotify")
	go func() {
		<-ctx.Done()
		f.Close()
	}()
	go func() {
		buf := make([]byte, 4096)
		for {
			if _, err := f.Read(buf); err != nil {
				return
			}
			notify(out)
		}
	}()
	return nil
}

func notify(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}
