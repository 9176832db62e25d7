package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"strconv"
	"strings"
	"time"

	"github.com/tunfw/tunfw/internal/config"
	"github.com/tunfw/tunfw/stack/tcpfwd"
	"github.com/tunfw/tunfw/stack/udpfwd"
)

// memoryConfig is the [limits] key this file owns: the memory budget. The
// rest of [limits] is decoded by the filter package.
type memoryConfig struct {
	// Memory is the budget of tunfw's own memory ("512MiB"); "" sizes it
	// from the machine.
	Memory string `toml:"memory"`
}

// minMemory is the smallest budget accepted.
const minMemory = 64 << 20

// validate parses the budget; 0 means "size it from the machine".
func (m memoryConfig) validate() (int64, error) {
	if m.Memory == "" || m.Memory == "auto" {
		return 0, nil
	}
	n, err := parseSize(m.Memory)
	if err != nil {
		return 0, config.Errorf("limits.memory", "%v", err)
	}
	if n < minMemory {
		return 0, config.Errorf("limits.memory", "%q is less than the 64MiB tunfw needs", m.Memory)
	}
	return n, nil
}

// parseSize reads a byte count: a number with an optional unit, binary
// (KiB, MiB, GiB, TiB) or decimal (kB, MB, GB, TB), or B.
func parseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	i := len(t)
	for i > 0 && (t[i-1] < '0' || t[i-1] > '9') && t[i-1] != '.' {
		i--
	}
	num, unit := t[:i], strings.TrimSpace(t[i:])
	mult := map[string]float64{
		"": 1, "B": 1,
		"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
		"kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
	}[unit]
	v, err := strconv.ParseFloat(num, 64)
	if mult == 0 || err != nil || v < 0 || math.IsInf(v, 0) || v*mult > 1<<62 {
		return 0, fmt.Errorf("%q is not a size (like \"512MiB\", \"2GiB\" or a number of bytes)", s)
	}
	return int64(v * mult), nil
}

// machineMemory returns the memory tunfw may use: MemTotal, or its memory
// cgroup's limit when that is lower (a systemd MemoryMax=, a container's
// --memory), and says which.
func machineMemory() (int64, string) {
	total := int64(0)
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			if f := strings.Fields(sc.Text()); len(f) >= 2 && f[0] == "MemTotal:" {
				kb, _ := strconv.ParseInt(f[1], 10, 64)
				total = kb << 10
			}
		}
	}
	if lim := cgroupMemoryLimit(); lim > 0 && (total == 0 || lim < total) {
		return lim, "cgroup"
	}
	return total, "MemTotal"
}

// cgroupMemoryLimit reads the memory limit of tunfw's cgroup (v2
// memory.max, or v1 memory.limit_in_bytes); 0 when there is none.
func cgroupMemoryLimit() int64 {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.SplitN(l, ":", 3)
		if len(f) != 3 {
			continue
		}
		var file string
		switch {
		case f[0] == "0" && f[1] == "":
			file = filepath.Join("/sys/fs/cgroup", f[2], "memory.max")
		case f[1] == "memory":
			file = filepath.Join("/sys/fs/cgroup/memory", f[2], "memory.limit_in_bytes")
		default:
			continue
		}
		v, err := os.ReadFile(file)
		if err != nil {
			continue
		}
		n, err := strconv.ParseInt(strings.TrimSpace(string(v)), 10, 64)
		if err == nil && n > 0 && n < 1<<60 { // "max" or v1's huge "unlimited"
			return n
		}
	}
	return 0
}

// memoryPlan is what the budget decides at start.
type memoryPlan struct {
	Budget int64
	From   string // "limits.memory", or how the default was sized
	// Stack is [stack] with each connection's buffers bounded so that
	// max_flows connections with full buffers fit in the budget (but not
	// below tcpfwd.FlowBufferFloor).
	Stack tcpfwd.Config
	// PerFlow is the budget's share of one flow: budget / max_flows.
	PerFlow int64
	// WorstCase is max_flows connections with full buffers.
	WorstCase int64
	// UDPReceiveBuffer is the receive buffer a busy UDP flow's socket
	// grows to (kernel memory, which a cgroup is charged for):
	// udpfwd.DefaultReceiveBuffer, 4 MiB, what a 1 Gbit/s burst needed.
	// UDPLargeBuffers is how many flows may hold it at once: a quarter of
	// the budget's worth (at least 4, as the budget is at least 64 MiB),
	// one client's a quarter of those (udpfwd).
	// A share of budget / max_flows each, as TCP buffers get, would never
	// let one grow with the default max_flows (24 KiB each of a 6 GiB
	// budget), and a flow left at its first 256 KiB lost up to a quarter
	// of a 1 Gbit/s reply stream.
	UDPReceiveBuffer int
	UDPLargeBuffers  int
}

// planMemory sizes what the budget allows; budget 0 means the default: a
// quarter of the machine's memory, or three quarters of the cgroup's limit
// (the cgroup is charged for the kernel's socket memory too, the rest of a
// machine is for other programs).
func planMemory(budget int64, maxFlows, mtu int, sc tcpfwd.Config, machine int64, machineFrom string) memoryPlan {
	p := memoryPlan{Budget: budget, From: "limits.memory"}
	if budget == 0 {
		switch {
		case machineFrom == "cgroup":
			p.Budget, p.From = machine/4*3, "3/4 of the cgroup memory limit"
		case machine > 0:
			p.Budget, p.From = machine/4, "a quarter of MemTotal"
		default:
			p.Budget, p.From = 1<<30, "unknown machine memory: 1GiB"
		}
		p.Budget = max(p.Budget, minMemory)
	}
	maxFlows = max(maxFlows, 1)
	p.PerFlow = p.Budget / int64(maxFlows)
	p.Stack = sc.Bounded(p.PerFlow, tcpfwd.FlowBufferFloor(mtu))
	p.WorstCase = int64(maxFlows) * int64(p.Stack.ReceiveBufferMax+p.Stack.SendBufferMax)
	p.UDPReceiveBuffer = udpfwd.DefaultReceiveBuffer
	p.UDPLargeBuffers = int(max(p.Budget/4/int64(p.UDPReceiveBuffer), 1))
	return p
}

// applyMemoryBudget plans the budget of cfg, sets the Go runtime's soft
// memory limit (GOMEMLIMIT) to it unless the environment sets GOMEMLIMIT,
// and returns the [stack] config to build the stack with.
func applyMemoryBudget(cfg *Config, log *slog.Logger) memoryPlan {
	machine, from := machineMemory()
	p := planMemory(cfg.Memory, cfg.Limits.MaxFlows, cfg.Net.MTU, cfg.Stack, machine, from)
	gomem := "set"
	if os.Getenv("GOMEMLIMIT") != "" {
		gomem = "left to the GOMEMLIMIT environment variable"
	} else {
		debug.SetMemoryLimit(p.Budget)
	}
	log.Info("memory budget", "budget_mib", p.Budget>>20, "from", p.From, "gomemlimit", gomem,
		"tcp_buffer_max", p.Stack.ReceiveBufferMax, "max_flows", cfg.Limits.MaxFlows, "udp_receive_buffer", p.UDPReceiveBuffer,
		"udp_large_buffers", p.UDPLargeBuffers)
	if p.Stack != cfg.Stack {
		log.Info("[stack] buffers lowered so that max_flows connections fit in the memory budget",
			"receive_buffer_max", p.Stack.ReceiveBufferMax, "send_buffer_max", p.Stack.SendBufferMax)
	}
	if p.WorstCase > p.Budget {
		log.Info("max_flows connections with full buffers would exceed the memory budget even at the smallest buffers; "+
			"past the budget the Go runtime collects harder; lower limits.max_flows to make the bound hard",
			"worst_case_mib", p.WorstCase>>20, "budget_mib", p.Budget>>20)
	}
	return p
}

// Memory pressure, like the kernel's tcp_mem: above pressureHigh of the
// budget new and growing connections get the smallest buffers, until use
// falls below pressureLow.
const (
	pressureHigh = 0.75
	pressureLow  = 0.5
)

// underPressure decides the pressure state from the Go memory in use.
func underPressure(was bool, used, budget int64) bool {
	if was {
		return float64(used) > pressureLow*float64(budget)
	}
	return float64(used) > pressureHigh*float64(budget)
}

// goMemoryInUse is the Go heap held by objects (connection buffers among
// them) and goroutine stacks: what flows make grow and give back, unlike
// the free heap the runtime keeps.
func goMemoryInUse(s []metrics.Sample) int64 {
	metrics.Read(s)
	return int64(s[0].Value.Uint64() + s[1].Value.Uint64())
}

// bufferSetter is the part of the stack the pressure watcher changes.
type bufferSetter interface {
	SetBufferSizes(tcpfwd.Config) error
}

// watchMemory applies memory pressure to st once a second until ctx ends:
// under pressure every connection's buffers are bounded to the floor (new
// ones start there, and none grows past it), and the planned sizes come
// back when the pressure is gone.
func watchMemory(ctx context.Context, st bufferSetter, p memoryPlan, mtu int, log *slog.Logger) {
	samples := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}, {Name: "/memory/classes/heap/stacks:bytes"}}
	low := p.Stack.Bounded(0, tcpfwd.FlowBufferFloor(mtu))
	if low == p.Stack {
		return // nothing to lower
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	pressure := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		used := goMemoryInUse(samples)
		now := underPressure(pressure, used, p.Budget)
		if now == pressure {
			continue
		}
		pressure = now
		c := p.Stack
		if pressure {
			c = low
			log.Warn("memory pressure: new and growing connections get the smallest buffers",
				"in_use_mib", used>>20, "budget_mib", p.Budget>>20, "buffer", low.ReceiveBufferMax)
		} else {
			log.Info("memory pressure over: connection buffers back to their planned sizes",
				"in_use_mib", used>>20, "budget_mib", p.Budget>>20)
		}
		if err := st.SetBufferSizes(c); err != nil {
			log.Error("memory pressure: set stack buffer sizes", "err", err)
		}
	}
}

// runtimeInfo is the Go runtime's view of tunfw's memory and allocations,
// for `tunfw stats`: what the process's RSS is made of, and cumulative
// counters a benchmark divides by the connections it made.
type runtimeInfo struct {
	Goroutines uint64 `json:"goroutines"`
	// HeapObjects and HeapObjectsBytes are the objects the heap holds:
	// live, or garbage not yet collected.
	HeapObjects      uint64 `json:"heap_objects"`
	HeapObjectsBytes uint64 `json:"heap_objects_bytes"`
	// HeapFreeBytes is free heap the runtime keeps mapped for reuse;
	// HeapReleasedBytes is free heap given back to the kernel.
	HeapFreeBytes     uint64 `json:"heap_free_bytes"`
	HeapReleasedBytes uint64 `json:"heap_released_bytes"`
	StacksBytes       uint64 `json:"stacks_bytes"`
	// TotalBytes is all the memory the runtime mapped, released or not.
	TotalBytes    uint64 `json:"total_bytes"`
	HeapGoalBytes uint64 `json:"heap_goal_bytes"`
	// Allocs and AllocBytes count heap allocations since the start.
	Allocs     uint64 `json:"allocs_total"`
	AllocBytes uint64 `json:"alloc_bytes_total"`
	GCCycles   uint64 `json:"gc_cycles"`
}

// readRuntime reads runtimeInfo (without stopping the world).
func readRuntime() runtimeInfo {
	names := [...]string{
		"/sched/goroutines:goroutines",
		"/gc/heap/objects:objects",
		"/memory/classes/heap/objects:bytes",
		"/memory/classes/heap/free:bytes",
		"/memory/classes/heap/released:bytes",
		"/memory/classes/heap/stacks:bytes",
		"/memory/classes/total:bytes",
		"/gc/heap/goal:bytes",
		"/gc/heap/allocs:objects",
		"/gc/heap/tiny/allocs:objects",
		"/gc/heap/allocs:bytes",
		"/gc/cycles/total:gc-cycles",
	}
	var s [len(names)]metrics.Sample
	for i, n := range names {
		s[i].Name = n
	}
	metrics.Read(s[:])
	v := func(i int) uint64 {
		if s[i].Value.Kind() != metrics.KindUint64 {
			return 0 // not in this Go version
		}
		return s[i].Value.Uint64()
	}
	return runtimeInfo{
		Goroutines: v(0), HeapObjects: v(1), HeapObjectsBytes: v(2), HeapFreeBytes: v(3), HeapReleasedBytes: v(4),
		StacksBytes: v(5), TotalBytes: v(6), HeapGoalBytes: v(7), Allocs: v(8) + v(9), AllocBytes: v(10), GCCycles: v(11),
	}
}

// Returning idle memory. The Go runtime keeps the free heap a burst of
// work left (up to its next collection's goal, twice the live heap) for
// reuse, and returns it to the kernel only above that: after 1,000
// connections opened at once, some 20 MB more than they hold. It also
// keeps the burst's garbage until its next collection, which an idle
// process may not reach for minutes. When tunfw has gone quiet, both are
// handed back (two collections, then every free page returned: 10 ms with
// 1,000 connections open, 95 ms with 10,000, measured).
const (
	// idleAllocRate: allocating less than this in a second is quiet.
	idleAllocRate = 1 << 20
	// minReturn is the least memory worth a collection (the free heap
	// and what was allocated since the last collection); an eighth of
	// the live heap at least, so that a slow allocator with a large heap
	// is not collected for it too often.
	minReturn = 4 << 20
	// returnEvery bounds how often memory is returned: a slow allocator
	// that keeps making minReturn of garbage costs a collection that
	// often at most.
	returnEvery = 5 * time.Second
)

// shouldReturn decides, once a second, whether to return memory:
// allocated bytes since the last tick, free heap kept, the heap's objects
// (live or not yet collected), the heap marked live by the last
// collection, and the time since memory was last returned. What objects
// holds beyond live was allocated since that collection: garbage, or new
// live objects that a collection leaves alone (after it, live catches up
// and the pair asks for nothing more).
func shouldReturn(allocated, free, objects, live uint64, since time.Duration) bool {
	reclaimable := free + objects - min(live, objects)
	return allocated < idleAllocRate && reclaimable >= max(minReturn, live/8) && since >= returnEvery
}

// returnIdleMemory returns the free heap to the kernel when tunfw is
// quiet (shouldReturn), until ctx ends.
func returnIdleMemory(ctx context.Context, log *slog.Logger) {
	s := []metrics.Sample{{Name: "/gc/heap/allocs:bytes"}, {Name: "/memory/classes/heap/free:bytes"},
		{Name: "/memory/classes/heap/objects:bytes"}, {Name: "/gc/heap/live:bytes"}}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var last uint64
	returned := time.Now().Add(-returnEvery)
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		metrics.Read(s)
		allocs, free, objects, live := s[0].Value.Uint64(), s[1].Value.Uint64(), s[2].Value.Uint64(), s[3].Value.Uint64()
		allocated := allocs - last
		last = allocs
		if !shouldReturn(allocated, free, objects, live, time.Since(returned)) {
			continue
		}
		// The first collection moves what the sync.Pools (packet and
		// copy buffers) keep to their victim caches, the second (inside
		// FreeOSMemory) frees it: an idle tunfw does not need them.
		t0 := time.Now()
		runtime.GC()
		debug.FreeOSMemory()
		returned = time.Now()
		log.Debug("returned idle memory to the kernel", "free_mib", free>>20, "objects_mib", objects>>20, "live_mib", live>>20, "took", returned.Sub(t0))
	}
}
