// Package flows holds what the forwarders share about the flows they
// relay: how to close each one by its key and identity, and the recovery
// that turns a panic in a flow's handler into the end of that flow alone.
package flows

import (
	"fmt"
	"log/slog"
	"runtime/debug"
	"sync"
	"sync/atomic"

	"github.com/tunfw/tunfw/filter"
)

// Tracker records how to close the relay of each flow. Its zero value is
// ready to use.
type Tracker struct {
	mu sync.Mutex
	m  map[filter.FlowKey]tracked
}

// tracked is how to close the relay of one flow.
type tracked struct {
	id    filter.FlowID // 0: whichever flow has the key
	close func()
}

// Track records how to close the relay of flow r. A relay for the same
// key, ending, is replaced: it untracks only itself.
func (t *Tracker) Track(r filter.FlowRef, closeFn func()) {
	t.mu.Lock()
	if t.m == nil {
		t.m = make(map[filter.FlowKey]tracked)
	}
	t.m[r.Key] = tracked{r.ID, closeFn}
	t.mu.Unlock()
}

// Untrack forgets the relay of flow r, unless a relay of a newer flow with
// the same key replaced it.
func (t *Tracker) Untrack(r filter.FlowRef) {
	t.mu.Lock()
	if e, ok := t.m[r.Key]; ok && (r.ID == 0 || e.id == 0 || e.id == r.ID) {
		delete(t.m, r.Key)
	}
	t.mu.Unlock()
}

// Close ends the relays of the flows refs names, leaving alone a flow whose
// key now names a newer flow, and returns how many it ended. The relays
// are closed outside the lock: closing one untracks it.
func (t *Tracker) Close(refs []filter.FlowRef) int {
	var fns []func()
	t.mu.Lock()
	for _, r := range refs {
		if e, ok := t.m[r.Key]; ok && (e.id == 0 || r.ID == 0 || e.id == r.ID) {
			fns = append(fns, e.close)
		}
	}
	t.mu.Unlock()
	for _, fn := range fns {
		fn()
	}
	return len(fns)
}

// Len returns how many relays are tracked.
func (t *Tracker) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.m)
}

// Guard turns a panic in a flow's handler into the end of that flow alone:
// it is logged with its stack and counted, the flow leaves the engine's
// table, and every other flow and the firewall go on.
type Guard struct {
	Engine *filter.Engine
	Log    *slog.Logger
	Now    func() int64

	panics atomic.Uint64
}

// Recover, deferred by a flow's handler, recovers a panic of that handler.
// The flow is named by its identity (as far as the handler got), so that
// a newer flow on the tuple is left alone.
func (g *Guard) Recover(flow *filter.FlowRef) {
	if r := recover(); r != nil {
		g.Panicked(*flow, r)
	}
}

// Panicked logs and counts the panic r of flow's handler, recovered by
// its caller, and releases the flow.
func (g *Guard) Panicked(flow filter.FlowRef, r any) {
	g.panics.Add(1)
	g.Log.Error("flow handler panicked; closing that flow", "flow", flow.Key.String(),
		"panic", fmt.Sprint(r), "stack", string(debug.Stack()))
	g.Engine.Release(flow, g.Now())
}

// Panics returns how many flow handlers panicked and were recovered.
func (g *Guard) Panics() uint64 { return g.panics.Load() }
