// SPDX-License-Identifier: Apache-2.0

// Command udpflood sends small UDP datagrams as fast as it can for a fixed
// time, with sendmmsg (golang.org/x/net/ipv4 WriteBatch), to several
// destination ports so that the packets form several flows. It prints
// one JSON object: how many datagrams the kernel accepted and over how
// long. BenchmarkForwarding runs it in the lab's clients: iperf3 tops out
// near 70 kpps per client on a small machine, too slow to load a gateway.
//
//	udpflood -dst 203.0.113.100:9000 -flows 16 -size 64 -at UNIXNANO -for 3s
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"
)

// Result is what udpflood prints.
type Result struct {
	Sent    uint64  `json:"sent"`    // datagrams the kernel accepted
	Seconds float64 `json:"seconds"` // from the first send to the last
	NoBufs  uint64  `json:"nobufs"`  // batches refused with ENOBUFS (a full queue), retried
}

func main() {
	dst := flag.String("dst", "", "first destination ADDR:PORT (required)")
	flows := flag.Int("flows", 16, "destination ports, from the one in -dst up")
	size := flag.Int("size", 64, "UDP payload bytes")
	batch := flag.Int("batch", 64, "datagrams per sendmmsg")
	at := flag.Int64("at", 0, "start at this time (Unix nanoseconds), so that senders in several hosts start together; 0: now")
	dur := flag.Duration("for", 3*time.Second, "how long to send")
	flag.Parse()
	res, err := run(*dst, *flows, *size, *batch, time.Unix(0, *at), *dur)
	if err != nil {
		fmt.Fprintln(os.Stderr, "udpflood:", err)
		os.Exit(1)
	}
	_ = json.NewEncoder(os.Stdout).Encode(res)
}

func run(dst string, flows, size, batch int, at time.Time, dur time.Duration) (Result, error) {
	first, err := netip.ParseAddrPort(dst)
	if err != nil {
		return Result{}, fmt.Errorf("-dst: %w", err)
	}
	if flows < 1 || int(first.Port())+flows > 65536 || size < 0 || size > 1472 || batch < 1 || dur <= 0 {
		return Result{}, errors.New("want -flows ≥ 1 within the port range, -size 0..1472, -batch ≥ 1, -for > 0")
	}
	conn, err := net.ListenUDP("udp4", nil)
	if err != nil {
		return Result{}, err
	}
	defer conn.Close()
	pc := ipv4.NewPacketConn(conn)
	payload := make([]byte, size)
	msgs := make([]ipv4.Message, batch)
	for i := range msgs {
		port := first.Port() + uint16(i%flows)
		msgs[i] = ipv4.Message{Buffers: [][]byte{payload}, Addr: net.UDPAddrFromAddrPort(netip.AddrPortFrom(first.Addr(), port))}
	}
	time.Sleep(time.Until(at))
	var res Result
	start := time.Now()
	end := start.Add(dur)
	now := start
	for now.Before(end) {
		n, err := pc.WriteBatch(msgs, 0)
		res.Sent += uint64(max(n, 0))
		switch {
		case errors.Is(err, unix.ENOBUFS):
			res.NoBufs++
		case err != nil:
			return res, err
		}
		now = time.Now()
	}
	res.Seconds = now.Sub(start).Seconds()
	return res, nil
}
