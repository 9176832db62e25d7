package main

import (
	"io"
	"log/slog"
	"runtime"
	"testing"
)

// tunfw takes half the CPUs for its goroutines unless GOMAXPROCS is set.
func TestApplyProcs(t *testing.T) {
	was := runtime.GOMAXPROCS(0)
	t.Cleanup(func() { runtime.GOMAXPROCS(was) })
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	t.Setenv("GOMAXPROCS", "")
	runtime.GOMAXPROCS(8)
	if n := applyProcs(log); n != 4 || runtime.GOMAXPROCS(0) != 4 {
		t.Errorf("8 CPUs: applyProcs = %d, GOMAXPROCS %d; want 4", n, runtime.GOMAXPROCS(0))
	}
	runtime.GOMAXPROCS(1)
	if n := applyProcs(log); n != 1 {
		t.Errorf("1 CPU: applyProcs = %d, want 1", n)
	}
	t.Setenv("GOMAXPROCS", "3")
	runtime.GOMAXPROCS(3) // as the runtime read it at start
	if n := applyProcs(log); n != 3 || runtime.GOMAXPROCS(0) != 3 {
		t.Errorf("GOMAXPROCS=3 in the environment: applyProcs = %d; want it left at 3", n)
	}
}
