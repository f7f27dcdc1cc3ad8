// SPDX-License-Identifier: Apache-2.0

package ha

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"time"
)

// conntrackd's control requests (conntrack-tools' conntrackd.h).
const (
	// ctResyncMaster (conntrackd -R): dump the kernel's conntrack table
	// into the internal cache, each entry with its timeout as the dump
	// gives it. It sends nothing to the peer (ctnl.c's dump_handler only
	// fills the cache).
	ctResyncMaster = 1
	// sendBulk (conntrackd -B): send every entry of the internal cache to
	// the peer.
	sendBulk = 22
)

// Resync has this gateway's conntrackd, over its control socket, send
// every connection of its internal cache to the peer (conntrackd -B), each
// with the timeout it had when conntrackd last heard of it, after a dump
// of the kernel's table into that cache (conntrackd -R) when dump is set.
// The master does it periodically: the kernel sends no event when a
// packet only refreshes an entry's timeout, so without it the standby's
// copy of a long, steady UDP flow (a VPN, a call) would time out there
// while the flow runs on, and break at a takeover.
//
// The send alone refreshes a steady flow (its cached timeout is the full
// one its last event gave). A dump corrects the timeouts cached from an
// earlier dump (an idle flow's remaining time, kept although the flow got
// busy again) but holds up conntrackd's event loop for its length (about
// a second per 200,000 connections), so it is done less often.
func Resync(ctx context.Context, socket string, dump bool) error {
	if dump {
		if err := request(ctx, socket, ctResyncMaster); err != nil {
			return fmt.Errorf("dumping the kernel table: %w", err)
		}
	}
	if err := request(ctx, socket, sendBulk); err != nil {
		return fmt.Errorf("sending the connections to the peer: %w", err)
	}
	return nil
}

// DumpEvery is how many resyncs make one with a dump of the kernel table
// (every tenth: 400 s at the default UDP stream timeout).
const DumpEvery = 10

// request makes one request of conntrackd: its control protocol is one
// native-endian int per connection; the daemon answers (nothing, for
// these) and closes once it has done it.
func request(ctx context.Context, socket string, req uint32) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return fmt.Errorf("connecting to conntrackd: %w", err)
	}
	defer conn.Close()
	if deadline, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(deadline)
	}
	if _, err := conn.Write(binary.NativeEndian.AppendUint32(nil, req)); err != nil {
		return fmt.Errorf("asking conntrackd: %w", err)
	}
	if _, err := io.Copy(io.Discard, conn); err != nil {
		return fmt.Errorf("waiting for conntrackd: %w", err)
	}
	return nil
}

// ResyncEvery is how often the master resyncs so that the standby's copy
// of a flow is refreshed well before it could time out: a third of the
// shortest timeout of a steady flow, conntrack's UDP stream timeout
// (nf_conntrack_udp_timeout_stream, 120 s by default: every 40 s), and
// not more often than once a second.
func ResyncEvery(udpStreamTimeout time.Duration) time.Duration {
	return max(time.Second, udpStreamTimeout/3)
}
