// SPDX-License-Identifier: Apache-2.0

// Package ctlsock is the agent's control socket: a unix socket in the
// state dir (mode 0600, in a root-only dir, peers checked to be root) over
// which uplinkd's commands talk to the running agent, one JSON request and
// one JSON answer per connection. It replaces signalling a pid from a file,
// which could hit an unrelated process after a crash and pid reuse.
package ctlsock

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// Name is the socket's file name in the state dir.
const Name = "uplinkd.sock"

// Request is one command to the agent.
type Request struct {
	// Cmd: "ping" (answered once the agent runs its loop), "line" (Line,
	// Down), "reload", "status", "events" (those after Since; with Wait,
	// waiting a while for one when there is none yet).
	Cmd   string `json:"cmd"`
	Line  string `json:"line,omitempty"`
	Down  bool   `json:"down,omitempty"`
	Since uint64 `json:"since,omitempty"`
	Wait  bool   `json:"wait,omitempty"`
}

// Reply is the agent's answer: Error empty on success, Message for people,
// Data for the commands that return a value.
type Reply struct {
	Message string          `json:"message,omitempty"`
	Error   string          `json:"error,omitempty"`
	Data    json.RawMessage `json:"data,omitempty"`
}

// ErrNoAgent says no agent listens on the state dir's socket.
var ErrNoAgent = errors.New("no agent runs with this state dir")

// maxRequest bounds a request: they are a few words.
const maxRequest = 64 << 10

// maxConns bounds the requests served at once (each holds a descriptor
// and a goroutine; a follower holds one for a long poll).
const maxConns = 128

// requestWait bounds how long a client may take to send its request.
const requestWait = 5 * time.Second

// acceptRetry is the pause after a failed accept (out of descriptors).
const acceptRetry = 50 * time.Millisecond

// maxReply bounds an answer: a status or the event ring.
const maxReply = 16 << 20

// Serve listens on dir's socket until ctx ends, answering each request
// with handle. The caller holds the state dir's lock, so a socket file
// found there is a dead agent's and is replaced.
func Serve(ctx context.Context, dir string, handle func(Request) Reply) error {
	path := filepath.Join(dir, Name)
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("control socket: %w", err)
	}
	old := unix.Umask(0o177) // the socket is created 0600
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	unix.Umask(old)
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	l.SetUnlinkOnClose(true)
	go func() {
		<-ctx.Done()
		l.Close()
	}()
	go func() {
		busy := make(chan struct{}, maxConns)
		for {
			c, err := l.AcceptUnix()
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err != nil {
				// EMFILE and the like pass: the socket must outlive them.
				time.Sleep(acceptRetry)
				continue
			}
			select {
			case busy <- struct{}{}:
				go func() {
					defer func() { <-busy }()
					serveOne(c, handle)
				}()
			default:
				// Over the limit: answer at once, hold nothing.
				_ = c.SetDeadline(time.Now().Add(time.Second))
				_ = json.NewEncoder(c).Encode(Reply{Error: fmt.Sprintf("the agent is busy: %d requests at once", maxConns)})
				c.Close()
			}
		}
	}()
	return nil
}

func serveOne(c *net.UnixConn, handle func(Request) Reply) {
	defer c.Close()
	// A request is a few words: a client that sends none soon loses its
	// place. The answer may take a while (a long poll, a reload).
	_ = c.SetDeadline(time.Now().Add(requestWait))
	var rep Reply
	var req Request
	switch err := peerIsRoot(c); {
	case err != nil:
		rep.Error = err.Error()
	default:
		if err := json.NewDecoder(io.LimitReader(c, maxRequest)).Decode(&req); err != nil {
			rep.Error = "bad request: " + err.Error()
		} else {
			_ = c.SetDeadline(time.Now().Add(time.Minute))
			rep = handle(req)
		}
	}
	_ = json.NewEncoder(c).Encode(rep)
}

// peerIsRoot checks the connecting process's uid (SO_PEERCRED): the
// socket's mode already keeps others out; this keeps them out even where
// the state dir's permissions were loosened.
func peerIsRoot(c *net.UnixConn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if cerr != nil {
		return cerr
	}
	if int(cred.Uid) != os.Geteuid() {
		return fmt.Errorf("uid %d may not control the agent", cred.Uid)
	}
	return nil
}

// Call sends req to the agent of dir's state dir and returns its reply;
// ErrNoAgent where none listens. The agent's own error comes back as an
// error.
func Call(ctx context.Context, dir string, req Request) (string, error) {
	rep, err := roundTrip(ctx, dir, req)
	if err != nil {
		return "", err
	}
	if rep.Error != "" {
		return rep.Message, errors.New(rep.Error)
	}
	return rep.Message, nil
}

// CallData sends req and decodes the reply's Data into out.
func CallData(ctx context.Context, dir string, req Request, out any) error {
	rep, err := roundTrip(ctx, dir, req)
	if err != nil {
		return err
	}
	if rep.Error != "" {
		return errors.New(rep.Error)
	}
	if err := json.Unmarshal(rep.Data, out); err != nil {
		return fmt.Errorf("control socket: decoding the agent's answer: %w", err)
	}
	return nil
}

// DataReply is a successful reply carrying v.
func DataReply(v any) Reply {
	b, err := json.Marshal(v)
	if err != nil {
		return Reply{Error: "encoding the answer: " + err.Error()}
	}
	return Reply{Data: b}
}

func roundTrip(ctx context.Context, dir string, req Request) (Reply, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", filepath.Join(dir, Name))
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ECONNREFUSED) {
		return Reply{}, ErrNoAgent
	}
	if err != nil {
		return Reply{}, fmt.Errorf("control socket: %w", err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	if err := json.NewEncoder(c).Encode(req); err != nil {
		return Reply{}, fmt.Errorf("control socket: %w", err)
	}
	var rep Reply
	if err := json.NewDecoder(io.LimitReader(c, maxReply)).Decode(&rep); err != nil {
		return Reply{}, fmt.Errorf("control socket: reading the agent's answer: %w", err)
	}
	return rep, nil
}
