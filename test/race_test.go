// SPDX-License-Identifier: Apache-2.0

//go:build race

package test

// raceEnabled: the tests run with -race, and so the agent they build.
const raceEnabled = true
