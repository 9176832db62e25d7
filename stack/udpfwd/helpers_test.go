package udpfwd

import (
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/stack/dial"
	"github.com/tunfw/tunfw/stack/internal/tunio"
)

// testTUN is a TUN writer that keeps copies of what is written to it.
type testTUN struct {
	pool    sync.Pool
	mu      sync.Mutex
	pkts    [][]byte
	discard bool // count writes only, keep nothing (for allocation counts)
	writes  int
	got     chan struct{}
}

func newTestTUN() *testTUN {
	d := &testTUN{got: make(chan struct{}, 100)}
	d.pool.New = func() any { b := make([]byte, tunio.Headroom+tunio.MaxPacket); return &b }
	return d
}

func (d *testTUN) Buffer() *[]byte    { return d.pool.Get().(*[]byte) }
func (d *testTUN) Release(bp *[]byte) { d.pool.Put(bp) }

func (d *testTUN) Write(bufs [][]byte) {
	d.mu.Lock()
	d.writes += len(bufs)
	for _, b := range bufs {
		if d.discard {
			break
		}
		d.pkts = append(d.pkts, append([]byte(nil), b[tunio.Headroom:]...))
	}
	d.mu.Unlock()
	select {
	case d.got <- struct{}{}:
	default:
	}
}

func (d *testTUN) take() [][]byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	p := d.pkts
	d.pkts = nil
	return p
}

// testHost returns a Host with an engine allowing everything, of limits
// lim, a dialer and tun, whose clients may hold perSource flows each.
func testHost(t *testing.T, lim filter.EngineLimits, tun tunio.Writer, perSource int) Host {
	t.Helper()
	rs, err := filter.Compile(filter.Options{}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	eng := filter.NewEngine(rs, filter.EngineOptions{})
	eng.SetLimits(lim)
	epoch := time.Now()
	return Host{
		Engine: eng, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Now: func() int64 { return int64(time.Since(epoch)) }, MTU: 1500,
		Dialer: dial.New(dial.Outbound{}), TUN: tun,
		MaxPerSource: func() int { return perSource },
	}
}

// newTestForwarder returns a running Forwarder writing to tun, closed with
// the test.
func newTestForwarder(t *testing.T, tun tunio.Writer, perSource int) *Forwarder {
	u := New(testHost(t, filter.EngineLimits{MaxFlows: 1000}, tun, perSource))
	t.Cleanup(u.Close)
	return u
}

// drops returns the forwarder's drops by reason.
func drops(u *Forwarder) map[string]uint64 {
	m := map[string]uint64{}
	u.Drops(m)
	return m
}
