//go:build race

// Package race tells tests whether the race detector is on: its
// instrumentation allocates, so allocation counts mean nothing in that
// build (make test also runs the packages without it).
package race

// Enabled is true in a -race build.
const Enabled = true
