// SPDX-License-Identifier: Apache-2.0

// Package control is uplinkd's control plane, one job a package: config
// (the YAML), plan (the desired kernel state as a value), routing, nat and
// sysctl (applying it), health (probing the lines), events, statefile and
// ctlsock (the state dir), nsdo (namespaces), and agent (the run loop that
// ties them together).
package control
