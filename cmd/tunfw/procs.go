package main

import (
	"log/slog"
	"os"
	"runtime"
)

// applyProcs gives the Go scheduler half the CPUs tunfw may use (at least
// one; runtime.GOMAXPROCS already counts a container's CPU limit), unless
// the GOMAXPROCS environment variable says otherwise, and returns the
// number. With a P idle, the scheduler wakes a thread for nearly every
// goroutine readied, and tunfw readies one at each hop of a packet (TUN
// reader, netstack processor, relay, TUN writer); the kernel's share of
// the forwarding runs in tunfw's threads inside system calls, outside the
// Ps, and needs the other CPUs. Measured on 2 cores (README,
// Performance): one P instead of two makes a sequential connection cost 8
// context switches instead of 18 and 60% of the CPU, and bulk TCP 12-20%
// less CPU per GB at the same or better speed; only 4 parallel downloads
// lose (7.3 against 9.2 Gbit/s).
func applyProcs(log *slog.Logger) int {
	n := runtime.GOMAXPROCS(0)
	how := "left to the GOMAXPROCS environment variable"
	if os.Getenv("GOMAXPROCS") == "" {
		n = max(1, n/2)
		runtime.GOMAXPROCS(n)
		how = "half the CPUs"
	}
	log.Info("scheduler", "gomaxprocs", n, "set", how)
	return n
}
