package e2e

import (
	bo "encoding/binary"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
)

// cpuLatencyBound reads the machine's CPU latency bound (PM QoS), in
// microseconds: the lowest of all requests held.
func cpuLatencyBound(t *testing.T) int32 {
	t.Helper()
	f, err := os.Open("/dev/cpu_dma_latency")
	if err != nil {
		t.Skipf("no CPU latency QoS device: %v", err)
	}
	defer f.Close()
	var b [4]byte
	if _, err := io.ReadFull(f, b[:]); err != nil {
		t.Fatal(err)
	}
	return int32(bo.NativeEndian.Uint32(b[:]))
}

// TestCPULatencyWhileForwarding: with [cpu] wakeup_latency set, tunfw holds
// the request while a connection trades messages through it and lets it go
// about a second after the traffic stops; the bound is the machine's, so
// "let go" means back to what it was before tunfw started.
func TestCPULatencyWhileForwarding(t *testing.T) {
	netnstest.RequireRoot(t)
	before := cpuLatencyBound(t)
	if before == 0 {
		t.Skip("another process already holds the CPU latency bound at 0 us: nothing to observe")
	}
	topo := netnstest.NewTopology(t)
	at := netip.AddrPortFrom(topo.ServiceV4, 9000)
	startTCPEcho(t, topo.Server, at)
	fw := startTunfw(t, topo.Host, writeConfig(t, `
[tun]
name = "tunfw0"
addresses = ["198.18.0.1/30"]
[route]
include = ["203.0.113.0/24"]
[filter]
default = "allow"
[cpu]
wakeup_latency = "0us"
`))
	// The kernel's own first packets into a new TUN (IPv6 neighbour
	// discovery, MLD) are traffic too: wait until their hold is over.
	back := func() error {
		if got := cpuLatencyBound(t); got != before {
			return fmt.Errorf("bound is %d us, want %d as before", got, before)
		}
		return nil
	}
	if err := eventually(5*time.Second, back); err != nil {
		t.Fatalf("with tunfw up and no traffic: %v", err)
	}
	held := func(v bool) int { return strings.Count(fw.log(), fmt.Sprintf(`msg="CPU latency request" held=%v`, v)) }
	heldBefore, releasedBefore := held(true), held(false)
	// expectOnce waits (the log is read from tunfw's stderr as it comes)
	// until the exchanges changed the request to v exactly once.
	expectOnce := func(v bool, before int, what string) {
		t.Helper()
		if err := eventually(5*time.Second, func() error {
			if n := held(v) - before; n != 1 {
				return fmt.Errorf("the exchanges %s the request %d times, want once", what, n)
			}
			return nil
		}); err != nil {
			t.Error(err)
		}
	}

	c, err := topo.Host.DialTimeout("tcp", at.String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 64)
	for i := 0; i < 100; i++ {
		if _, err := c.Write(buf); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatal(err)
		}
	}
	if got := cpuLatencyBound(t); got != 0 {
		t.Fatalf("bound right after 100 exchanges is %d us, want 0", got)
	}
	expectOnce(true, heldBefore, "held")
	start := time.Now()
	if err := eventually(5*time.Second, back); err != nil {
		t.Fatalf("after the traffic stopped: %v", err)
	}
	if d := time.Since(start); d < 500*time.Millisecond {
		t.Errorf("request let go %v after the traffic stopped, before the hold of a second", d)
	}
	expectOnce(false, releasedBefore, "let go of")
}
