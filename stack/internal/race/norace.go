//go:build !race

// Package race tells tests whether the race detector is on (see race.go).
package race

// Enabled is true in a -race build.
const Enabled = false
