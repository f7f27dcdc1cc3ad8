// SPDX-License-Identifier: Apache-2.0

package ctlsock

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func serve(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: the socket answers root only")
	}
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if err := Serve(ctx, dir, func(r Request) Reply { return Reply{Message: "ok " + r.Cmd} }); err != nil {
		t.Fatal(err)
	}
	return dir
}

func call(dir string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	return Call(ctx, dir, Request{Cmd: "ping"})
}

// Running out of descriptors for a while does not end the socket: once
// they are back, requests are answered again.
func TestSocketOutlivesEMFILE(t *testing.T) {
	dir := serve(t)
	var old unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	low := old
	low.Cur = 64
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	var conns []net.Conn
	for range 100 { // more than the limit: server and clients share it
		c, err := net.Dial("unix", filepath.Join(dir, Name))
		if err != nil {
			break
		}
		conns = append(conns, c)
	}
	time.Sleep(200 * time.Millisecond) // the server meets EMFILE meanwhile
	for _, c := range conns {
		c.Close()
	}
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	if msg, err := call(dir); err != nil || msg != "ok ping" {
		t.Fatalf("after running out of descriptors: %q, %v", msg, err)
	}
}

// Idle clients over the limit are turned away at once, and lose their
// place after requestWait: they cannot lock the socket.
func TestIdleClientsCannotLockTheSocket(t *testing.T) {
	dir := serve(t)
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range maxConns {
		c, err := net.Dial("unix", filepath.Join(dir, Name))
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	time.Sleep(100 * time.Millisecond)
	if _, err := call(dir); err == nil {
		t.Error("a request over the limit was served")
	}
	time.Sleep(requestWait + time.Second)
	if msg, err := call(dir); err != nil || msg != "ok ping" {
		t.Errorf("after the idle clients' time ran out: %q, %v", msg, err)
	}
}
