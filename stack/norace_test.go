//go:build !race

package stack

// raceEnabled: see race_test.go.
const raceEnabled = false
