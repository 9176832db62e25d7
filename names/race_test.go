//go:build race

package names

// raceEnabled: the race detector slows loading a million names tenfold and
// its instrumentation allocates, so the load test and allocation counts
// mean nothing in this build.
const raceEnabled = true
