package tcpfwd

import (
	"bytes"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/tunfw/tunfw/filter"
)

// TestPanicClosesOnlyItsFlow checks the recovery of a relay pump and of a
// flow's handler before its relay exists: a panic closes that flow's
// connections, is logged and counted, and leaves the other flows alone.
func TestPanicClosesOnlyItsFlow(t *testing.T) {
	var logs bytes.Buffer
	s := stateOnly(testHost(t, slog.New(slog.NewTextHandler(&logs, nil))))
	bad := filter.FlowKey{Proto: 6, Src: netip.MustParseAddrPort("10.0.0.2:1000"), Dst: netip.MustParseAddrPort("192.0.2.1:80")}
	good := filter.FlowKey{Proto: 6, Src: netip.MustParseAddrPort("10.0.0.2:1001"), Dst: netip.MustParseAddrPort("192.0.2.1:80")}
	var badClosed, goodClosed bool
	s.tracker.Track(filter.FlowRef{Key: good}, func() { goodClosed = true })

	// A relay direction whose copy panics, wired as startRelay wires it:
	// its end untracks the flow, its panic hook closes it.
	closeFn := func() { badClosed = true }
	s.tracker.Track(filter.FlowRef{Key: bad}, closeFn)
	p := pump{dir: &testDirection{
		onEnd:   func() { s.tracker.Untrack(filter.FlowRef{Key: bad}) },
		onPanic: func(v any) { closeFn(); s.guard.Panicked(filter.FlowRef{Key: bad}, v) },
	}}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // as a pump runs: in a goroutine of its own
		defer wg.Done()
		p.run()
	}()
	wg.Wait()

	if !badClosed {
		t.Error("the panicking flow was not closed")
	}
	if goodClosed {
		t.Error("another flow was closed")
	}
	if s.Panics() != 1 {
		t.Errorf("panics counted: %d, want 1", s.Panics())
	}
	if n := s.CloseFlows([]filter.FlowRef{{Key: bad}}); n != 0 {
		t.Error("the panicked flow is still tracked")
	}
	if !strings.Contains(logs.String(), "flow handler panicked") || !strings.Contains(logs.String(), "assignment to entry in nil map") {
		t.Errorf("panic not logged:\n%s", logs.String())
	}
	// A panic before the relay exists is recovered too.
	wg.Add(1)
	go func() {
		defer wg.Done()
		ref := filter.FlowRef{Key: bad}
		defer s.guard.Recover(&ref)
		panic("before dial")
	}()
	wg.Wait()
	if s.Panics() != 2 {
		t.Errorf("panics counted: %d, want 2", s.Panics())
	}
}

// testDirection is a relay direction whose copy panics.
type testDirection struct {
	onEnd   func()
	onPanic func(any)
}

func (d *testDirection) drain() bool {
	var m map[string]int
	m["boom"]++ // a nil map write: a real runtime panic
	return true
}
func (d *testDirection) idle() bool     { return true }
func (d *testDirection) end()           { d.onEnd() }
func (d *testDirection) panicked(v any) { d.onPanic(v) }
