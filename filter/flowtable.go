package filter

import (
	"runtime"
	"time"
)

// insertLocked adds f, a new flow, to the table with a new identity; e.mu
// must be held. Flows keep their slot for life, so a walk of the slots in
// batches sees every flow that stays in the table, however others come and
// go between batches.
func (e *Engine) insertLocked(f *flow) {
	e.lastID++
	f.id = e.lastID
	if n := len(e.free); n > 0 {
		f.slot = e.free[n-1]
		e.free = e.free[:n-1]
		e.slots[f.slot] = f
	} else {
		f.slot = int32(len(e.slots))
		e.slots = append(e.slots, f)
	}
	e.flows[f.key] = f
	e.perSrc[f.key.Src.Addr()]++
	e.byState[f.state]++
}

// removeLocked deletes f from the table; e.mu must be held.
func (e *Engine) removeLocked(f *flow) {
	delete(e.flows, f.key)
	e.slots[f.slot] = nil
	e.free = append(e.free, f.slot)
	e.byState[f.state]--
	a := f.key.Src.Addr()
	if e.perSrc[a]--; e.perSrc[a] <= 0 {
		delete(e.perSrc, a)
	}
}

// setStateLocked moves f to state s, keeping the counts by state; e.mu
// must be held.
func (e *Engine) setStateLocked(f *flow, s uint8) {
	if f.state != s {
		e.byState[f.state]--
		e.byState[s]++
		f.state = s
	}
}

// Tombstones of released TCP flows. The relay ends when both directions
// have, which is when the stack has sent its FIN (or RST); the client's
// ACK of that FIN, or a retransmission of its own FIN, may still be on the
// way. Forwarding those to the stack lets its endpoint reach CLOSED at
// once instead of retransmitting its FIN for minutes. Across the TUN they
// come within a round trip or a few retransmission timeouts (gVisor's
// minimum RTO is 200 ms), so a few seconds are plenty; a client that
// sends nothing more needs no tombstone at all. Releasing only once the
// endpoint reached CLOSED would keep the slot counted for that round trip
// and needs a notification gVisor does not give after Close.
const (
	tombTTL  = int64(5 * time.Second)
	maxTombs = 16384 // at 4,600 closes/s (DESIGN.md) a bit more than 3 s of them
)

type tomb struct {
	id   FlowID
	rule int
}

type tombRef struct {
	key   FlowKey
	id    FlowID
	until int64
}

// tombstones is a FIFO of released flows (their TTL is constant, so the
// oldest expires first) with an index by key; guarded by Engine.mu.
type tombstones struct {
	byKey map[FlowKey]tomb
	q     []tombRef
	head  int
}

func (t *tombstones) add(k FlowKey, id FlowID, rule int, until int64) {
	if len(t.q)-t.head >= maxTombs {
		t.pop()
	}
	if t.head > 0 && t.head*2 >= len(t.q) {
		// Reuse the consumed front rather than growing the slice.
		n := copy(t.q, t.q[t.head:])
		clear(t.q[n:])
		t.q, t.head = t.q[:n], 0
	}
	t.q = append(t.q, tombRef{k, id, until})
	t.byKey[k] = tomb{id, rule}
}

func (t *tombstones) pop() {
	r := t.q[t.head]
	t.q[t.head] = tombRef{}
	t.head++
	if tb, ok := t.byKey[r.key]; ok && tb.id == r.id {
		delete(t.byKey, r.key)
	}
	if t.head == len(t.q) {
		t.q, t.head = t.q[:0], 0
	}
}

// expire drops up to max tombstones that expired at now and reports
// whether more may have.
func (t *tombstones) expire(now int64, max int) bool {
	for ; t.head < len(t.q) && t.q[t.head].until <= now; max-- {
		if max == 0 {
			return true
		}
		t.pop()
	}
	return false
}

// yieldBatch lets a goroutine waiting for Engine.mu run between two
// batches of a walk (more: another batch follows). Unlock only wakes the
// waiter, onto this goroutine's processor, and without a yield the walk
// would take the lock again first, batch after batch, until the mutex's
// starvation mode hands it over after a millisecond.
func yieldBatch(more bool) {
	if more {
		runtime.Gosched()
	}
}
