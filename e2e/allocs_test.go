package e2e

import (
	"encoding/json"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
)

// tunfwAllocs returns the heap allocations tunfw made since it started
// (`tunfw stats --json`, runtime.allocs_total). The runtime counts small
// objects when a cached span is handed back, so the count moves in steps
// of up to a few hundred: what a test measures with it must span enough
// operations for that not to matter.
func tunfwAllocs(t *testing.T, cfg string) uint64 {
	t.Helper()
	out, errOut, code := ctl(t, cfg, "stats", "--json")
	if code != 0 {
		t.Fatalf("tunfw stats: exit %d: %s", code, errOut)
	}
	var st struct {
		Runtime struct {
			Allocs uint64 `json:"allocs_total"`
		} `json:"runtime"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("stats --json: %v\n%s", err, out)
	}
	return st.Runtime.Allocs
}

// TestRelayRunsAllocate: a 64-byte request and its answer through an
// established connection allocate nothing in tunfw on a busy connection
// (its relay running). On connections quiet between requests, each
// request starts both relay directions again, their working state from
// the Forwarder's pools and their epoll rearm allocation-free: what is
// left is starting two goroutines (a go statement with an argument
// allocates its closure, 16 bytes) and the error of the linger that
// expired (net wraps it), 3 allocations; a relay state or rearm made per
// run would cost 3 to 5 more.
func TestRelayRunsAllocate(t *testing.T) {
	netnstest.RequireRoot(t)
	if raceRequested() {
		t.Skip("tunfw is built with the race detector, whose instrumentation allocates: its allocation counts mean nothing")
	}
	topo := netnstest.NewTopology(t)
	svc := netip.AddrPortFrom(topo.ServiceV4, 7000)
	startTCPEcho(t, topo.Server, svc)
	cfg := writeConfig(t, minimalConfig)
	startTunfw(t, topo.Host, cfg)
	const conns = 64
	cs := make([]net.Conn, conns)
	for i := range cs {
		c, err := topo.Host.Dial("tcp", svc.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		cs[i] = c
	}
	exchange := func(c net.Conn) error {
		msg, buf := make([]byte, 64), make([]byte, 64)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(msg); err != nil {
			return err
		}
		_, err := io.ReadFull(c, buf)
		return err
	}
	// One exchange on every connection at once, then quiet past the
	// relays' 100 ms linger (the workload, not a wait): each next
	// request starts both directions again.
	quietRound := func() {
		t.Helper()
		var wg sync.WaitGroup
		errs := make(chan error, conns)
		for _, c := range cs {
			wg.Go(func() {
				if err := exchange(c); err != nil {
					errs <- err
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		time.Sleep(150 * time.Millisecond)
	}
	busy := func(n int) {
		t.Helper()
		for range n {
			if err := exchange(cs[0]); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Buffers, pools and gVisor's caches warm.
	busy(1000)
	for range 3 {
		quietRound()
	}

	const busyN, quietRounds = 20000, 15
	b0 := tunfwAllocs(t, cfg)
	busy(busyN)
	b1 := tunfwAllocs(t, cfg)
	for range quietRounds {
		quietRound()
	}
	q1 := tunfwAllocs(t, cfg)
	perBusy := float64(b1-b0) / busyN
	perQuiet := float64(q1-b1) / (quietRounds * conns)
	t.Logf("heap allocations in tunfw: %.3f per exchange on a busy connection (%d in %d), %.2f per exchange after a quiet spell (%d in %d)",
		perBusy, b1-b0, busyN, perQuiet, q1-b1, quietRounds*conns)
	// Allowances: the counter's steps and tunfw's own work meanwhile (its
	// once-a-second housekeeping, the stats requests): a few hundred.
	if perBusy > 0.05 {
		t.Errorf("%.3f heap allocations per request/response on a busy connection, want none", perBusy)
	}
	if perQuiet > 4.5 {
		t.Errorf("%.2f heap allocations per request/response after a quiet spell, want 3 (two goroutines started, one linger's error)", perQuiet)
	}
}
