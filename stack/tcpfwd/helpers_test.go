package tcpfwd

import (
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/stack/dial"
	"github.com/tunfw/tunfw/stack/internal/flows"
	"github.com/tunfw/tunfw/stack/internal/tunio"
)

// discardTUN is a TUN writer that drops what is written to it.
type discardTUN struct{ pool sync.Pool }

func newDiscardTUN() *discardTUN {
	d := &discardTUN{}
	d.pool.New = func() any { b := make([]byte, tunio.Headroom+tunio.MaxPacket); return &b }
	return d
}

func (d *discardTUN) Write([][]byte)                 {}
func (d *discardTUN) WriteTSO([]byte, [][]byte, int) {}
func (d *discardTUN) Buffer() *[]byte                { return d.pool.Get().(*[]byte) }
func (d *discardTUN) Release(bp *[]byte)             { d.pool.Put(bp) }

// testHost returns a Host with an engine allowing everything, logging to
// log (nil: nowhere) and writing to a discardTUN.
func testHost(t testing.TB, log *slog.Logger) Host {
	t.Helper()
	rs, err := filter.Compile(filter.Options{}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	epoch := time.Now()
	return Host{
		Engine: filter.NewEngine(rs, filter.EngineOptions{}), Log: log,
		Now: func() int64 { return int64(time.Since(epoch)) }, MTU: 1500,
		Dialer: dial.New(dial.Outbound{}), TUN: newDiscardTUN(),
	}
}

// stateOnly returns a Forwarder with h and no netstack or watcher, for the
// parts that only keep state.
func stateOnly(h Host) *Forwarder {
	return &Forwarder{h: h, dials: newDialPool(), guard: flows.Guard{Engine: h.Engine, Log: h.Log, Now: h.Now},
		tsoSlices: make([][]byte, 0, tunio.MaxPayloadSlices)}
}
