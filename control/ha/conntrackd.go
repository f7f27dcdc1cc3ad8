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
	// gives it. It sends nothing to the peer.
	ctResyncMaster = 1
	// sendBulk (conntrackd -B): send every entry of the internal cache to
	// the peer.
	sendBulk = 22
)

// Resync has this gateway's conntrackd, over its control socket, dump the
// kernel's conntrack table and send every entry to the peer (conntrackd
// -R, then -B: what keepalived's notify script does at a takeover). The
// master does it periodically: the kernel sends no event when a packet
// only refreshes an entry's timeout, so without it the standby's copy of a
// long, steady UDP flow (a VPN, a call) would time out there while the
// flow runs on, and break at a takeover.
func Resync(ctx context.Context, socket string) error {
	if err := request(ctx, socket, ctResyncMaster); err != nil {
		return fmt.Errorf("dumping the kernel table: %w", err)
	}
	if err := request(ctx, socket, sendBulk); err != nil {
		return fmt.Errorf("sending it to the peer: %w", err)
	}
	return nil
}

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
