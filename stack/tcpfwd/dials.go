package tcpfwd

import (
	"context"
	"errors"
	"hash/maphash"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tunfw/tunfw/filter"
	"gvisor.dev/gvisor/pkg/waiter"
)

// A TCP connection is pending from the client's SYN until its handshake
// with the stack completed: first the destination is dialled, then the
// client is answered and its ACK awaited. Each pending connection holds a
// goroutine and a real socket, so a SYN flood would hold max_pending_dials
// of them and every new SYN, a legitimate one included, would wait for one
// to time out.
//
// The pool therefore bounds what a source holds (max_pending_dials_per_source)
// and, under pressure, asks clients to prove themselves the way SYN cookies
// do, but without answering for the destination. A source is under
// pressure when it holds its bound of dials, or an even share of a full
// pool. Its SYN is then dialled at once only if its destination answered a
// dial in the last answerMemory (a server it uses; a flood to addresses
// that never answer cannot make a destination answering) or if it is the
// retransmission of a SYN deferred before. Any other SYN is deferred: not
// dialled, remembered (deferred), and its flow leaves the table; a real
// client retransmits it after its initial RTO (1 s on Linux) and that one
// is dialled. The decision is taken on the read loop, before gVisor's
// forwarder starts a goroutine for the SYN (Forwarder.screenSYNs): a flood of
// SYNs to silent addresses thus costs a table lookup each, not a goroutine
// and a socket, and connections to servers in use are not delayed at all.
//
// An admitted SYN always gets a slot, made the way kernels prune a full SYN
// queue: the oldest dial of its own source gives way when that source
// holds its bound, else the oldest one of a source holding more than an
// even share of the full pool. A dial lives as long as the pool holds it
// (pool size / SYN rate), so a destination that answers within that time
// connects even under a flood that retransmits. What gives way is released
// at once (the dial's context is cancelled, or the client's half-done
// handshake woken so that it fails) and its flow leaves the table: the
// flood holds neither sockets nor flows beyond the pool.
//
// A pending dial also ends when its flow leaves the table (expiry, a
// reload's recheck): nothing is held for a flow that no longer exists.

// pendingDial is one TCP connection being set up.
type pendingDial struct {
	key    filter.FlowKey
	id     filter.FlowID      // the flow's identity (Engine.Claim)
	cancel context.CancelFunc // ends the dial to the destination
	// wq is the queue the client's handshake waits on, once the
	// destination answered; waking it makes the handshake fail.
	wq *waiter.Queue
	// end says why the dial left the pool; dialPending while in it.
	end dialEnd
	// released is closed once its handler holds no socket for it any
	// more (release), so that a newer dial that evicted it can wait for
	// that and the pool bounds sockets, not just dials.
	released chan struct{}
	closed   bool // released is closed; the handler's own

	age, srcQ dialLink // places in the pool's and the source's queues
}

// release says the handler holds no socket for d any more (or that the
// relay owns it). Only d's handler calls it.
func (d *pendingDial) release() {
	if !d.closed {
		d.closed = true
		close(d.released)
	}
}

// releaseWait bounds how long a dial waits for the socket of the dial it
// evicted to be closed; that takes a goroutine switch, unless a wake-up was
// missed (see stopDial).
const releaseWait = time.Second

// waitReleased waits until the handler of d, which was stopped, released
// its socket, or releaseWait passed, or ctx (the waiting dial's own) ended.
func waitReleased(ctx context.Context, d *pendingDial) {
	t := time.NewTimer(releaseWait)
	defer t.Stop()
	select {
	case <-d.released:
	case <-t.C:
	case <-ctx.Done():
	}
}

// dialEnd is why a pending dial left the pool.
type dialEnd uint8

const (
	dialPending   dialEnd = iota
	dialDone              // its handler finished with it
	dialEvicted           // it gave way to a newer SYN
	dialCancelled         // its flow left the table
)

type dialLink struct{ prev, next *pendingDial }

func byAge(d *pendingDial) *dialLink    { return &d.age }
func bySource(d *pendingDial) *dialLink { return &d.srcQ }

// dialQueue is a queue of pending dials, oldest first, linked through the
// dialLink link returns.
type dialQueue struct {
	head, tail *pendingDial
	n          int
}

func (q *dialQueue) push(d *pendingDial, link func(*pendingDial) *dialLink) {
	l := link(d)
	l.prev, l.next = q.tail, nil
	if q.tail != nil {
		link(q.tail).next = d
	} else {
		q.head = d
	}
	q.tail = d
	q.n++
}

func (q *dialQueue) remove(d *pendingDial, link func(*pendingDial) *dialLink) {
	l := link(d)
	if l.prev != nil {
		link(l.prev).next = l.next
	} else {
		q.head = l.next
	}
	if l.next != nil {
		link(l.next).prev = l.prev
	} else {
		q.tail = l.prev
	}
	l.prev, l.next = nil, nil
	q.n--
}

// maxVictimScan bounds how many of the oldest dials a full pool looks at
// to find one of a source over its share: under a flood nearly all are.
const maxVictimScan = 64

// dialPool holds the pending dials.
type dialPool struct {
	mu    sync.Mutex
	all   dialQueue
	bySrc map[netip.Addr]*dialQueue
	byKey map[filter.FlowKey]*pendingDial
	// deferred remembers the SYNs dropped under pressure; answering the
	// destinations that answered a dial lately.
	deferred  recentTable[filter.FlowKey]
	answering recentTable[netip.Addr]

	// fails counts dials that did not connect, by dialFailReason.
	fails [numDialFails]atomic.Uint64
}

func newDialPool() *dialPool {
	return &dialPool{
		bySrc: make(map[netip.Addr]*dialQueue), byKey: make(map[filter.FlowKey]*pendingDial),
		deferred:  newRecentTable[filter.FlowKey](deferredSlots),
		answering: newRecentTable[netip.Addr](answeredSlots),
	}
}

// deferSYN reports whether the SYN of key, seen at now, is deferred: its
// source is under pressure, its destination has not answered lately and it
// is not the retransmission of a SYN deferred before. A deferred SYN is
// remembered. It allocates nothing (but the table, once): the read loop
// calls it.
func (p *dialPool) deferSYN(key filter.FlowKey, total, perSrc int, now int64) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.byKey[key] != nil {
		// A retransmission while its dial is pending: the forwarder
		// ignores it.
		return false
	}
	n, sources := 0, len(p.bySrc)
	if q := p.bySrc[key.Src.Addr()]; q != nil {
		n = q.n
	} else {
		sources++
	}
	if n < perSrc && (p.all.n < total || n+1 <= total/sources) {
		return false
	}
	if p.answering.recall(key.Dst.Addr(), now, answerMemory, false) || p.deferred.recall(key, now, deferMemory, true) {
		return false
	}
	p.deferred.remember(key, now)
	return true
}

// admit adds d to the pool. When d's source holds perSrc dials or the pool
// holds total, it removes the dial that gives way and returns it; the
// caller stops it (stopDial) outside the pool's lock.
func (p *dialPool) admit(d *pendingDial, total, perSrc int) (victim *pendingDial) {
	src := d.key.Src.Addr()
	p.mu.Lock()
	defer p.mu.Unlock()
	q := p.bySrc[src]
	full := p.all.n >= total
	if q == nil {
		q = &dialQueue{}
		p.bySrc[src] = q
	}
	switch {
	case q.n >= perSrc:
		victim = q.head
	case full:
		share := total / len(p.bySrc)
		victim = p.all.head
		v := p.all.head
		for i := 0; v != nil && i < maxVictimScan; i, v = i+1, v.age.next {
			if p.bySrc[v.key.Src.Addr()].n > share {
				victim = v
				break
			}
		}
	}
	if victim != nil {
		p.removeLocked(victim, dialEvicted)
	}
	// The source's queue may have been dropped with the victim.
	if q = p.bySrc[src]; q == nil {
		q = &dialQueue{}
		p.bySrc[src] = q
	}
	p.all.push(d, byAge)
	q.push(d, bySource)
	p.byKey[d.key] = d
	return victim
}

// recentTable remembers keys for a while, in a fixed table (allocated at
// first use) of recentWays-way sets in which a new key replaces the oldest
// of its set. Memory and time per operation are constant whatever is
// thrown at it; a key is pushed out early only when recentWays newer keys
// land in its set, which for the SYNs deferred by a flood of S new
// connections a second happens within a second with a probability of
// P(Poisson(S*recentWays/slots) >= recentWays): 0.4% for 10,000 a second
// and 65,536 slots.
type recentTable[K comparable] struct {
	seed  maphash.Seed
	size  int // slots, a multiple of recentWays
	slots []recentSlot
}

type recentSlot struct {
	hash uint64 // of the key; 0: empty
	at   int64  // when it was remembered (Host.Now)
}

const recentWays = 4

func newRecentTable[K comparable](size int) recentTable[K] {
	return recentTable[K]{seed: maphash.MakeSeed(), size: size}
}

func (t *recentTable[K]) set(k K) (uint64, []recentSlot) {
	h := maphash.Comparable(t.seed, k) | 1
	i := int(h>>1%uint64(t.size/recentWays)) * recentWays
	return h, t.slots[i : i+recentWays]
}

// recall reports whether k was remembered less than within ago; forget
// also forgets it.
func (t *recentTable[K]) recall(k K, now, within int64, forget bool) bool {
	if t.slots == nil {
		return false
	}
	h, set := t.set(k)
	for i := range set {
		if set[i].hash == h {
			at := set[i].at
			if forget {
				set[i] = recentSlot{}
			}
			return now-at < within
		}
	}
	return false
}

// remember records k at now.
func (t *recentTable[K]) remember(k K, now int64) {
	if t.slots == nil {
		t.slots = make([]recentSlot, t.size)
	}
	h, set := t.set(k)
	oldest := 0
	for i := range set {
		if set[i].hash == h || set[i].hash == 0 {
			oldest = i
			break
		}
		if set[i].at < set[oldest].at {
			oldest = i
		}
	}
	set[oldest] = recentSlot{hash: h, at: now}
}

const (
	// deferredSlots bounds the SYNs remembered as deferred (1 MiB).
	deferredSlots = 1 << 16
	// deferMemory is how long a deferred SYN is remembered: a client's
	// third SYN retransmission comes 7 s after its first SYN.
	deferMemory = int64(10 * time.Second)
	// answeredSlots bounds the destinations remembered as answering
	// (64 KiB).
	answeredSlots = 1 << 12
	// answerMemory is how long a destination counts as answering after
	// its last answer.
	answerMemory = int64(5 * time.Minute)
)

// removeLocked takes d out of the pool for reason why.
func (p *dialPool) removeLocked(d *pendingDial, why dialEnd) {
	d.end = why
	p.all.remove(d, byAge)
	src := d.key.Src.Addr()
	q := p.bySrc[src]
	q.remove(d, bySource)
	if q.n == 0 {
		delete(p.bySrc, src)
	}
	if p.byKey[d.key] == d {
		delete(p.byKey, d.key)
	}
}

// destinationAnswered records that dst answered a dial (connected or
// refused) at now.
func (p *dialPool) destinationAnswered(dst netip.Addr, now int64) {
	p.mu.Lock()
	p.answering.remember(dst, now)
	p.mu.Unlock()
}

// answered records that the destination answered d and the client's
// handshake will wait on wq. It is false if d left the pool meanwhile:
// the caller gives up.
func (p *dialPool) answered(d *pendingDial, wq *waiter.Queue) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if d.end != dialPending {
		return false
	}
	d.wq = wq
	return true
}

// done takes d out of the pool if it is still there and returns why it
// left: dialDone if only now. It may be called more than once.
func (p *dialPool) done(d *pendingDial) dialEnd {
	p.mu.Lock()
	defer p.mu.Unlock()
	if d.end == dialPending {
		p.removeLocked(d, dialDone)
	}
	return d.end
}

// cancelFlows ends the pending dials of the flows refs, which left the
// table; a dial of a newer flow with the same key is left alone.
func (p *dialPool) cancelFlows(refs []filter.FlowRef) {
	var stop []*pendingDial
	p.mu.Lock()
	for _, r := range refs {
		if d := p.byKey[r.Key]; d != nil && (r.ID == 0 || d.id == r.ID) {
			p.removeLocked(d, dialCancelled)
			stop = append(stop, d)
		}
	}
	p.mu.Unlock()
	for _, d := range stop {
		stopDial(d)
	}
}

// len returns how many dials are pending.
func (p *dialPool) len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.all.n
}

// stopDial makes the handler of d, which left the pool, give up: a dial in
// progress returns, a client handshake in progress fails. d.wq is no longer
// written once d left the pool.
func stopDial(d *pendingDial) {
	d.cancel()
	if d.wq != nil {
		// gVisor's CreateEndpoint waits for this event and then finds
		// the handshake incomplete. Were it sent just before gVisor
		// registered its waiter, the dial's holdUp timer sends it again.
		d.wq.Notify(waiter.WritableEvents)
	}
}

// dialFailReason classifies why a dial did not connect.
type dialFailReason uint8

const (
	dialFailRefused dialFailReason = iota
	dialFailTimeout
	dialFailUnreachable
	dialFailDescriptors // EMFILE, ENFILE, ENOBUFS: out of sockets
	dialFailPorts       // EADDRNOTAVAIL, EADDRINUSE: no local port free
	dialFailEvicted
	dialFailDeferred
	dialFailCancelled
	dialFailOther
	numDialFails
)

var dialFailNames = [numDialFails]string{"refused", "timeout", "unreachable", "descriptors", "ports", "evicted", "deferred", "cancelled", "other"}

// classify names the reason of a failed dial, err.
func classifyDial(err error) dialFailReason {
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return dialFailRefused
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, syscall.ETIMEDOUT):
		return dialFailTimeout
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH), errors.Is(err, syscall.EHOSTDOWN),
		errors.Is(err, syscall.ENETDOWN):
		return dialFailUnreachable
	case errors.Is(err, syscall.EMFILE), errors.Is(err, syscall.ENFILE), errors.Is(err, syscall.ENOBUFS), errors.Is(err, syscall.ENOMEM):
		return dialFailDescriptors
	case errors.Is(err, syscall.EADDRNOTAVAIL), errors.Is(err, syscall.EADDRINUSE):
		// Every local port to the destination is taken (TIME_WAIT
		// included; the kernel's ephemeral range is shared with the
		// host's own sockets in host mode), or, rarer, the source
		// address the route picked is gone.
		return dialFailPorts
	}
	return dialFailOther
}

// DialFailures returns how many TCP dials did not connect, by reason:
// refused, timeout, unreachable, descriptors (tunfw was out of sockets),
// ports (no local port to the destination was free),
// evicted (gave way to newer SYNs in a full pool), deferred (not dialled:
// the SYN came under pressure and was no retransmission), cancelled (the flow left
// the table first), other.
func (fw *Forwarder) DialFailures() map[string]uint64 {
	m := make(map[string]uint64, numDialFails)
	for i := range fw.dials.fails {
		m[dialFailNames[i]] = fw.dials.fails[i].Load()
	}
	return m
}

// PendingDials returns how many TCP connections are being set up.
func (fw *Forwarder) PendingDials() int { return fw.dials.len() }
