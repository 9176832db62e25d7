package main

import (
	"context"
	"io"
	"log/slog"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"
	"time"

	"github.com/tunfw/tunfw/stack/tcpfwd"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{
		"512MiB": 512 << 20, "2GiB": 2 << 30, "1.5GiB": 3 << 29, "100MB": 100e6, "67108864": 64 << 20, "64 MiB": 64 << 20, "1TiB": 1 << 40,
	} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "MiB", "12 parsecs", "-1GiB", "1e400", "9999999TiB", "1..2GiB"} {
		if got, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) = %d, want an error", in, got)
		}
	}
}

func TestMemoryConfigKey(t *testing.T) {
	base := "[tun]\naddresses = [\"198.18.0.1/30\"]\n[limits]\nmax_flows = 1000\n"
	cfg, err := parseConfig("m.toml", []byte(base+"memory = \"256MiB\"\n"))
	if err != nil || cfg.Memory != 256<<20 || cfg.Limits.MaxFlows != 1000 {
		t.Fatalf("memory = 256MiB: %+v, %v", cfg, err)
	}
	if cfg, err := parseConfig("m.toml", []byte(base)); err != nil || cfg.Memory != 0 {
		t.Fatalf("no memory key: %v, %v", cfg.Memory, err)
	}
	_, err = parseConfig("m.toml", []byte(base+"memory = \"lots\"\nmemroy = 1\n"))
	for _, want := range []string{`m.toml:5: limits.memory: "lots" is not a size`, "m.toml:6: limits.memroy: unknown key"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("bad memory key: %v; want %q", err, want)
		}
	}
	if _, err = parseConfig("m.toml", []byte(base+"memory = \"1MiB\"\n")); err == nil || !strings.Contains(err.Error(), "less than the 64MiB") {
		t.Errorf("1MiB: %v, want a lower bound error", err)
	}
}

func TestPlanMemory(t *testing.T) {
	sc := tcpfwd.DefaultConfig()
	// Sized from the machine: a quarter of MemTotal, 3/4 of a cgroup limit.
	if p := planMemory(0, 100, 1500, sc, 16<<30, "MemTotal"); p.Budget != 4<<30 || p.Stack != sc {
		t.Errorf("16 GiB machine, 100 flows: %+v; want 4 GiB and the [stack] buffers untouched", p)
	}
	if p := planMemory(0, 1000, 1500, sc, 4<<30, "cgroup"); p.Budget != 3<<30 {
		t.Errorf("4 GiB cgroup: budget %d, want 3 GiB", p.Budget)
	}
	// 512 MiB over 1024 flows: 512 KiB each, 256 KiB each way.
	p := planMemory(512<<20, 1024, 1500, sc, 16<<30, "MemTotal")
	if p.Stack.ReceiveBufferMax != 256<<10 || p.Stack.SendBufferMax != 256<<10 || p.WorstCase > p.Budget {
		t.Errorf("512 MiB, 1024 flows: %+v", p)
	}
	// UDP: 4 MiB for busy flows, 32 of them (a quarter of 512 MiB).
	if p.UDPReceiveBuffer != 4<<20 || p.UDPLargeBuffers != 32 {
		t.Errorf("UDP receive buffer %d for %d flows, want 4 MiB for 32", p.UDPReceiveBuffer, p.UDPLargeBuffers)
	}
	// Too many flows for the budget: the floor, and the worst case says so.
	p = planMemory(512<<20, 262144, 1500, sc, 16<<30, "MemTotal")
	if p.Stack.ReceiveBufferMax != tcpfwd.FlowBufferFloor(1500) || p.WorstCase <= p.Budget {
		t.Errorf("512 MiB, 262144 flows: %+v", p)
	}
	// However many flows there may be, busy UDP flows still grow (the
	// default max_flows left a 1 Gbit/s reply stream at 256 KiB).
	if p.UDPReceiveBuffer != 4<<20 || p.UDPLargeBuffers != 32 {
		t.Errorf("512 MiB, 262144 flows: UDP receive buffer %d for %d flows, want 4 MiB for 32", p.UDPReceiveBuffer, p.UDPLargeBuffers)
	}
	// The smallest budget: a quarter of 64 MiB, 4 flows of 4 MiB.
	if p = planMemory(minMemory, 262144, 1500, sc, 16<<30, "MemTotal"); p.UDPReceiveBuffer != 4<<20 || p.UDPLargeBuffers != 4 {
		t.Errorf("64 MiB: UDP receive buffer %d for %d flows, want 4 MiB for 4", p.UDPReceiveBuffer, p.UDPLargeBuffers)
	}
}

// TestApplyMemoryBudget: GOMEMLIMIT is set from the budget, unless the
// environment sets it.
func TestApplyMemoryBudget(t *testing.T) {
	old := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(old) })
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	cfg := &Config{Memory: 300 << 20, Stack: tcpfwd.DefaultConfig()}
	cfg.Net.MTU = 1500
	cfg.Limits.MaxFlows = 1000
	t.Setenv("GOMEMLIMIT", "")
	applyMemoryBudget(cfg, log)
	if got := debug.SetMemoryLimit(-1); got != 300<<20 {
		t.Errorf("GOMEMLIMIT %d after a 300 MiB budget", got)
	}
	debug.SetMemoryLimit(old)
	t.Setenv("GOMEMLIMIT", "1GiB")
	applyMemoryBudget(cfg, log)
	if got := debug.SetMemoryLimit(-1); got != old {
		t.Errorf("GOMEMLIMIT changed to %d although the environment sets it", got)
	}
}

func TestUnderPressure(t *testing.T) {
	for _, c := range []struct {
		was        bool
		used, want int64
		now        bool
	}{
		{false, 70, 100, false}, {false, 80, 100, true}, {true, 60, 100, true}, {true, 40, 100, false},
	} {
		if got := underPressure(c.was, c.used, c.want); got != c.now {
			t.Errorf("underPressure(%v, %d of %d) = %v, want %v", c.was, c.used, c.want, got, c.now)
		}
	}
}

type fakeStack struct{ set chan tcpfwd.Config }

func (f fakeStack) SetBufferSizes(c tcpfwd.Config) error { f.set <- c; return nil }

// TestWatchMemory: over the budget, the stack's buffers go to the floor.
func TestWatchMemory(t *testing.T) {
	p := planMemory(1<<40, 10, 1500, tcpfwd.DefaultConfig(), 0, "")
	p.Budget = 1 << 10 // far below what this test process holds
	f := fakeStack{set: make(chan tcpfwd.Config, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go watchMemory(ctx, f, p, 1500, slog.New(slog.NewTextHandler(io.Discard, nil)))
	select {
	case c := <-f.set:
		if c.ReceiveBufferMax != tcpfwd.FlowBufferFloor(1500) || c.SendBufferMax != tcpfwd.FlowBufferFloor(1500) {
			t.Errorf("under pressure the stack got %+v, want the floor", c)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no pressure after 5s with a 1 KiB budget")
	}
}

// TestReadRuntime: every runtime figure `tunfw stats` shows is one the
// running Go version has (none reads as a missing metric's 0), and the
// allocation counters count allocations.
func TestReadRuntime(t *testing.T) {
	r0 := readRuntime()
	for name, v := range map[string]uint64{
		"goroutines": r0.Goroutines, "heap objects": r0.HeapObjects, "heap bytes": r0.HeapObjectsBytes,
		"stacks": r0.StacksBytes, "total": r0.TotalBytes, "heap goal": r0.HeapGoalBytes, "allocs": r0.Allocs, "alloc bytes": r0.AllocBytes,
	} {
		if v == 0 {
			t.Errorf("%s: 0", name)
		}
	}
	const n = 10000
	keep := make([]*[64]byte, n)
	for i := range keep {
		keep[i] = new([64]byte)
	}
	r1 := readRuntime()
	// The runtime counts small allocations a span at a time: the
	// counters are exact only to a span's worth of objects.
	if d := r1.Allocs - r0.Allocs; d < n*9/10 {
		t.Errorf("allocs grew by %d after %d allocations", d, n)
	}
	if d := r1.AllocBytes - r0.AllocBytes; d < n*64*9/10 {
		t.Errorf("alloc bytes grew by %d after %d allocations of 64 B", d, n)
	}
	runtime.KeepAlive(keep)
}

// Free memory goes back only when tunfw is quiet, there is enough of it
// and the last return is not recent.
func TestShouldReturn(t *testing.T) {
	const mib = 1 << 20
	for _, c := range []struct {
		allocated, free, objects, live uint64
		since                          time.Duration
		want                           bool
	}{
		{0, 20 * mib, 30 * mib, 30 * mib, time.Minute, true},
		{512 << 10, 5 * mib, 10 * mib, 10 * mib, returnEvery, true},
		{2 * mib, 20 * mib, 30 * mib, 30 * mib, time.Minute, false}, // busy
		{0, 3 * mib, 10 * mib, 10 * mib, time.Minute, false},        // too little free
		{0, 9 * mib, 100 * mib, 100 * mib, time.Minute, false},      // little against the live heap
		{0, 20 * mib, 30 * mib, 30 * mib, time.Second, false},       // returned recently
		// A burst's garbage, not yet collected, counts with the free
		// heap: 1 MiB free and 6 MiB allocated since the collection
		// that found 10 MiB live.
		{0, 1 * mib, 16 * mib, 10 * mib, time.Minute, true},
		// Right after a collection objects and live agree.
		{0, 1 * mib, 10 * mib, 10 * mib, time.Minute, false},
		// live above objects (metrics of different moments of the
		// collector's cycle): no underflow.
		{0, 1 * mib, 10 * mib, 11 * mib, time.Minute, false},
	} {
		if got := shouldReturn(c.allocated, c.free, c.objects, c.live, c.since); got != c.want {
			t.Errorf("shouldReturn(%d, %d, %d, %d, %v) = %v, want %v", c.allocated, c.free, c.objects, c.live, c.since, got, c.want)
		}
	}
}
