// SPDX-License-Identifier: Apache-2.0

package test

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/uplinkd/uplinkd/test/lab"
)

// flow is a long-lived connection from a lab client to the echo server:
// TCP (echo round trips over one connection) or UDP (queries from one
// local port; the reply says which source the server saw).
type flow struct {
	client *lab.Host
	tcp    net.Conn
	rd     *bufio.Reader
	udp    *lab.UDPFlow
	seen   netip.AddrPort // the source the server saw first
}

// openFlows opens n flows, alternating clients; every other one is UDP
// when udp is set.
func openFlows(t *testing.T, l *lab.Lab, dst netip.AddrPort, n int, udp bool) []*flow {
	t.Helper()
	var fs []*flow
	t.Cleanup(func() {
		for _, f := range fs {
			f.close()
		}
	})
	for i := range n {
		f := &flow{client: l.Clients[i%len(l.Clients)]}
		var err error
		if udp && i%2 == 1 {
			if f.udp, err = lab.OpenUDPFlow(f.client, dst); err == nil {
				f.seen, err = f.udp.Query([]byte("hello"), emulated(2*time.Second))
			}
		} else {
			f.tcp, f.seen, err = lab.DialTCP(f.client, dst, emulated(2*time.Second))
			if err == nil {
				f.rd = bufio.NewReader(f.tcp)
			}
		}
		if err != nil {
			t.Fatalf("flow %d: %v", i, err)
		}
		fs = append(fs, f)
	}
	return fs
}

func (f *flow) close() {
	if f.tcp != nil {
		f.tcp.Close()
	}
	if f.udp != nil {
		f.udp.Close()
	}
}

func (f *flow) String() string {
	proto := "tcp"
	if f.udp != nil {
		proto = "udp"
	}
	return fmt.Sprintf("%s flow seen as %s", proto, f.seen)
}

// check makes one round trip. It returns errBroken when the flow no
// longer works and errMoved when the server now sees another source.
func (f *flow) check() error {
	if f.udp != nil {
		seen, err := f.udp.Query([]byte("ping"), time.Second)
		switch {
		case err != nil:
			return fmt.Errorf("%w: %v", errBroken, err)
		case seen != f.seen:
			return fmt.Errorf("%w: now seen as %s", errMoved, seen)
		}
		return nil
	}
	_ = f.tcp.SetDeadline(time.Now().Add(time.Second))
	if _, err := f.tcp.Write([]byte("ping\n")); err != nil {
		return fmt.Errorf("%w: %v", errBroken, err)
	}
	line, err := f.rd.ReadString('\n')
	if err != nil || line != "ping\n" {
		return fmt.Errorf("%w: read %q, %v", errBroken, line, err)
	}
	return nil
}

var (
	errBroken = errors.New("broken")
	errMoved  = errors.New("moved")
)

// checkAll checks every flow and counts the broken and moved ones.
func checkAll(fs []*flow) (broken, moved int, detail []string) {
	for _, f := range fs {
		err := f.check()
		switch {
		case errors.Is(err, errBroken):
			broken++
		case errors.Is(err, errMoved):
			moved++
		}
		if err != nil {
			detail = append(detail, fmt.Sprintf("%v: %v", f, err))
		}
	}
	return broken, moved, detail
}

// share counts flows per line by the source the server saw.
func share(l *lab.Lab, fs []*flow) map[string]int {
	per := map[string]int{}
	for _, f := range fs {
		for _, u := range l.Lines {
			if u.Address.Addr() == f.seen.Addr() {
				per[u.Name]++
			}
		}
	}
	return per
}
