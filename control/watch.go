// SPDX-License-Identifier: Apache-2.0

package control

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// watch reports changes that may need a reconcile: links, IPv4
// addresses, IPv4 rules, and IPv4 routes carrying uplinkd's protocol tag
// (so a busy routing table elsewhere does not wake the agent). The channel
// carries no detail: the reconcile reads the kernel anyway.
func watch(ctx context.Context, ns netns.NsHandle, proto int, log *slog.Logger) (<-chan struct{}, error) {
	s, err := nl.SubscribeAt(ns, netns.None(), unix.NETLINK_ROUTE,
		unix.RTNLGRP_LINK, unix.RTNLGRP_IPV4_IFADDR, unix.RTNLGRP_IPV4_RULE, unix.RTNLGRP_IPV4_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("subscribing to netlink events: %w", err)
	}
	out := make(chan struct{}, 1)
	go func() {
		<-ctx.Done()
		s.Close()
	}()
	go func() {
		for {
			msgs, _, err := s.Receive()
			if err != nil {
				if ctx.Err() == nil {
					log.Error("netlink events", "err", err)
					notify(out) // an overrun may have lost events: reconcile
					time.Sleep(100 * time.Millisecond)
					continue
				}
				return
			}
			for _, m := range msgs {
				if relevant(m.Header.Type, m.Data, proto) {
					notify(out)
				}
			}
		}
	}()
	return out, nil
}

func relevant(typ uint16, data []byte, proto int) bool {
	switch typ {
	case unix.RTM_NEWROUTE, unix.RTM_DELROUTE:
		return len(data) >= unix.SizeofRtMsg && int(nl.DeserializeRtMsg(data).Protocol) == proto
	default:
		return true
	}
}

func notify(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}
