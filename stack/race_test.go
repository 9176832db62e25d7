//go:build race

package stack

// raceEnabled: the race detector's instrumentation allocates, so
// allocation counts mean nothing in this build (make test also runs the
// package without it).
const raceEnabled = true
