// SPDX-License-Identifier: Apache-2.0

// Package nsdo runs a function inside a network namespace, for the kernel
// interfaces that act on the namespace of the calling thread (/proc/sys/net,
// attaching BPF programs by interface name, tc).
package nsdo

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Do runs f on an OS thread inside ns. The thread is locked and never
// unlocked, so the Go runtime discards it afterwards instead of running
// another goroutine in the wrong namespace. An ns that is not open
// (netns.None()) means the caller's own namespace: f runs directly.
//
// Where ns is the namespace the caller's thread is in already (the agent
// running inside its own namespace), f runs directly: no thread is made.
func Do(ns netns.NsHandle, f func() error) error {
	if !ns.IsOpen() || here(ns) {
		return f()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(int(ns), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("entering network namespace: %w", err)
			return
		}
		errc <- f()
	}()
	return <-errc
}

// here reports whether ns is the calling thread's namespace. An unlocked
// goroutine may move to another thread, but every thread the scheduler
// hands it is in the process's namespace: threads that entered another one
// are locked and discarded (see Do).
func here(ns netns.NsHandle) bool {
	var a, b unix.Stat_t
	return unix.Fstat(int(ns), &a) == nil && unix.Stat("/proc/thread-self/ns/net", &b) == nil &&
		a.Dev == b.Dev && a.Ino == b.Ino
}
