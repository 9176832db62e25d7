// Package udpfwd forwards the UDP flows the filter allows: each flow's
// datagrams go out on a connected socket of its own, and its replies, and
// the ICMP errors the network sends about it, come back to the client
// through the TUN.
package udpfwd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/inspect"
	"github.com/tunfw/tunfw/stack/dial"
	"github.com/tunfw/tunfw/stack/internal/flows"
	"github.com/tunfw/tunfw/stack/internal/sockread"
	"github.com/tunfw/tunfw/stack/internal/tunio"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// UDP does not go through gVisor: a datagram needs no connection state the
// engine does not already keep, so the read loop hands its payload straight
// to the flow's connected socket, and one goroutine per flow wraps the
// replies in IP and UDP headers for the client. Datagrams that come in a
// burst travel in batches both ways (batch.go, udpReplies): one GSO
// sendmsg out, one coalesced TUN write back.

// DefaultReceiveBuffer is the largest receive buffer of a flow's socket,
// so a burst of replies waits there rather than being dropped by the
// kernel: at 1 Gbit/s offered, 1 MiB lost about 1% of the datagrams
// (2.5-18% on a loaded machine), 4 MiB none (0-5.6% loaded; make bench,
// udp-s2c). A flow starts with udpRcvBufStart and gets this only once its
// replies queue (udpReplies found a full batch waiting), and gives it back
// once no reply came for largeBufIdle, so the many quiet flows a client can
// open do not each ask for megabytes. It is kernel
// memory, used only while replies queue, and bounded overall by
// net.ipv4.udp_mem; Host.LargeBuffers bounds how many flows hold it.
const DefaultReceiveBuffer = 4 << 20

// udpRcvBufStart is a new flow's receive buffer: the kernel's usual
// default, room for a batch of full-size replies (udpReplyBatch) to queue
// before the buffer grows.
const udpRcvBufStart = 256 << 10

const (
	// DefaultMaxPerSource bounds the UDP flows of one client address
	// (see Host.MaxPerSource): a resolver's burst of queries from fresh
	// ports fits.
	DefaultMaxPerSource = 16384
	// Sockets are opened off the read loop by udpOpeners goroutines (few:
	// they must leave the cores to the read loop; one opens about 25,000
	// sockets a second). At most udpOpenQueue flows wait for theirs,
	// udpOpenPerSource of one client address; past that a flow's datagram
	// is dropped and counted, and its next datagram asks again.
	udpOpeners       = 2
	udpOpenQueue     = 1024
	udpOpenPerSource = 256
	// udpHeld and udpHeldBytes bound the datagrams a flow keeps while its
	// socket is being opened.
	udpHeld      = 8
	udpHeldBytes = 8 << 10
)

// Host is what a Forwarder needs from the stack that runs it.
type Host struct {
	Engine *filter.Engine
	Log    *slog.Logger
	// Now is the engine's monotonic clock.
	Now func() int64
	// MTU is the TUN's; replies larger than it are dropped and counted.
	MTU int
	// Dialer opens the flows' sockets.
	Dialer *dial.Dialer
	// TUN takes the replies and ICMP errors, and lends the buffers the
	// batches are built in.
	TUN tunio.Writer
	// TUNConn, when the device has a file, lets the forwarder ask whether
	// more packets wait to be read (ReadDone); nil: batches are sent after
	// every read.
	TUNConn syscall.RawConn
	// MaxPerSource returns how many UDP flows one client address may
	// hold now.
	MaxPerSource func() int
	// ReceiveBuffer is the largest receive buffer of a flow's socket; 0
	// means DefaultReceiveBuffer.
	ReceiveBuffer int
	// LargeBuffers bounds how many flows may hold ReceiveBuffer at once
	// (the others keep udpRcvBufStart); 0 means no bound.
	LargeBuffers int
	// DNS says how DNS traffic is read (names.go).
	DNS DNS
	// Inspect bounds how a flow is held while its name is read from its
	// QUIC Initial; its zero value means inspect.DefaultOptions.
	Inspect inspect.Options
}

// Forwarder relays the UDP flows the filter allows between the TUN and
// connected sockets.
type Forwarder struct {
	h      Host
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // openers and reply loops

	guard   flows.Guard
	tracker flows.Tracker

	// flows are the UDP flows being relayed, their number by client
	// address, and the flows whose socket is being opened, by client
	// address too (open is their queue).
	mu      sync.Mutex
	flows   map[filter.FlowKey]*udpFlow
	perSrc  map[netip.Addr]int32
	opening map[netip.Addr]int32
	open    chan *udpFlow
	lim     udpLimits

	// writeDrops counts relayed datagrams dropped on a full queue.
	writeDrops atomic.Uint64
	// icmpErr counts and bounds the ICMP errors relayed to clients
	// (icmperr.go).
	icmpErr icmpErrors
	// names counts DNS answered and learned, and peeks (names.go).
	names nameStats

	// Read loop only: flows with datagrams waiting to be sent, and how to
	// ask the TUN whether more packets wait (batch.go).
	pending      []*udpFlow
	tunPollFds   [1]unix.PollFd
	tunPollReady bool
	pollTUN      func(fd uintptr)
}

// udpLimits are the UDP bounds and drop counters of a Forwarder.
type udpLimits struct {
	rcvBuf int
	// largeBufs counts the flows holding rcvBuf, in all and by client
	// address (guarded by Forwarder.mu): at most maxLargeBufs in all
	// (0: no bound), and a quarter of that (at least 1) for one client,
	// so that one client's busy flows cannot take them all.
	largeBufs    int32
	largeBySrc   map[netip.Addr]int32
	maxLargeBufs int32
	// maxSockets keeps UDP sockets to three quarters of the descriptors
	// the process may open, so a flood cannot take those of TCP, the
	// control socket and the TUN.
	maxSockets int

	sourceLimit, socketLimit, openBusy, openFailed atomic.Uint64
	// largeRefused counts the times a flow whose replies queued was
	// refused the largest receive buffer (either bound).
	largeRefused atomic.Uint64
}

// New starts a Forwarder's socket openers. Close stops them.
func New(h Host) *Forwarder {
	u := newForwarder(h)
	for range udpOpeners {
		u.wg.Add(1)
		go u.opener()
	}
	return u
}

// newForwarder makes a Forwarder without starting its openers.
func newForwarder(h Host) *Forwarder {
	u := &Forwarder{
		h:       h,
		flows:   make(map[filter.FlowKey]*udpFlow),
		perSrc:  make(map[netip.Addr]int32),
		opening: make(map[netip.Addr]int32),
		open:    make(chan *udpFlow, udpOpenQueue),
		guard:   flows.Guard{Engine: h.Engine, Log: h.Log, Now: h.Now},
	}
	if u.h.Inspect == (inspect.Options{}) {
		u.h.Inspect = inspect.DefaultOptions()
	}
	u.ctx, u.cancel = context.WithCancel(context.Background())
	u.pollTUN = u.pollTUNFd
	u.lim.rcvBuf = h.ReceiveBuffer
	if u.lim.rcvBuf <= 0 {
		u.lim.rcvBuf = DefaultReceiveBuffer
	}
	u.lim.maxLargeBufs = int32(max(h.LargeBuffers, 0))
	u.lim.largeBySrc = make(map[netip.Addr]int32)
	u.icmpErr.limit.init(icmpErrorsPerSecond, icmpErrorBurst)
	u.lim.maxSockets = 1 << 20
	var rl unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &rl) == nil && rl.Cur < 1<<22 {
		u.lim.maxSockets = max(64, int(rl.Cur)-int(rl.Cur)/4)
	}
	return u
}

// Drops adds, by reason, the datagrams the forwarder dropped after the
// engine let them through: "udp-source-limit" (the client holds its share
// of flows), "udp-socket-limit" (as many UDP sockets as tunfw may hold),
// "udp-open-busy" (too many sockets being opened), "udp-open-failed" (the
// socket could not be opened), "udp-queue" (the flow's queue was full) and
// "icmp-error-rate" (an ICMP error past the rate limit, not relayed).
func (u *Forwarder) Drops(m map[string]uint64) {
	m["udp-source-limit"] = u.lim.sourceLimit.Load()
	m["udp-socket-limit"] = u.lim.socketLimit.Load()
	m["udp-open-busy"] = u.lim.openBusy.Load()
	m["udp-open-failed"] = u.lim.openFailed.Load()
	m["udp-queue"] = u.writeDrops.Load()
	m["icmp-error-rate"] = u.icmpErr.rateDrops.Load()
}

// LargeBuffers is what the pool of the largest UDP receive buffers holds:
// busy flows grow their socket's buffer from it (growRcvBuf).
type LargeBuffers struct {
	// Held is how many flows hold one now; Max how many may (0: no
	// bound); a client's flows may hold a quarter of Max (at least 1).
	Held int `json:"held"`
	Max  int `json:"max"`
	// Refused counts the refusals: a busy flow refused one because the
	// pool or its client's share was full asks again a second later, and
	// each ask refused counts.
	// While it is refused, its replies may overflow the smaller buffer.
	Refused uint64 `json:"refused"`
}

// LargeBuffers returns the state of the pool of large receive buffers.
func (u *Forwarder) LargeBuffers() LargeBuffers {
	u.mu.Lock()
	held := int(u.lim.largeBufs)
	u.mu.Unlock()
	return LargeBuffers{Held: held, Max: int(u.lim.maxLargeBufs), Refused: u.lim.largeRefused.Load()}
}

// WriteDrops returns how many relayed datagrams were dropped because a
// queue on the way was full.
func (u *Forwarder) WriteDrops() uint64 { return u.writeDrops.Load() }

// Panics returns how many flow handlers panicked and were recovered.
func (u *Forwarder) Panics() uint64 { return u.guard.Panics() }

// CloseFlows closes the sockets of the UDP flows refs names (the other
// protocols' are not tracked here), as when they expired or a reload cut
// them; a flow whose key now names a newer flow is left alone. It returns
// how many it closed.
func (u *Forwarder) CloseFlows(refs []filter.FlowRef) int { return u.tracker.Close(refs) }

// Close stops the openers and closes every flow.
func (u *Forwarder) Close() {
	u.cancel()
	u.closeFlows()
	u.wg.Wait()
}

// udpFlow is one relayed UDP flow. Its socket is opened by an opener
// goroutine; until then (ready false) its datagrams wait in held.
type udpFlow struct {
	key  filter.FlowKey
	ref  filter.FlowRef // the engine's flow: released by its identity, never a newer one's
	conn *net.UDPConn   // set before ready
	raw  syscall.RawConn
	last atomic.Int64 // engine clock of the last datagram either way
	// errTaken: a send returned the socket's pending ICMP error, whose
	// queued copy the reply loop must look for.
	errTaken atomic.Bool
	ready    atomic.Bool // the socket is open and held was sent

	// mu guards the hand-over from the opener to the read loop.
	mu        sync.Mutex
	held      [][]byte
	heldBytes int
	closed    bool // the flow left the table: its socket goes at once

	// send, sendGSO and their arguments are set up once, so forwarding
	// a datagram from the read loop allocates nothing.
	send, sendGSO func(fd uintptr) bool
	sendBuf       []byte
	oob           []byte // UDP_SEGMENT control message
	sendErr       error

	// Read loop only: datagrams waiting to be sent (batch.go), and
	// whether the socket takes GSO sends.
	out udpBatch
	gso bool

	// bigRcvBuf: the reply goroutine gave the socket its largest receive
	// buffer; largeRetryAt: refused one, it asks again no earlier;
	// lastReply: engine clock of the last reply read (all three the
	// reply goroutine's own).
	bigRcvBuf    bool
	largeRetryAt int64
	lastReply    int64
	// queued: the flow is in the openers' queue (set once, by the read
	// loop, or by a peek's decision, see names.go).
	queued atomic.Bool
	// peek is set, once, at the start of a flow whose verdict waits for
	// the name in its first datagrams (QUIC, names.go).
	peek *udpPeek
}

func newUDPFlow(key filter.FlowKey, conn *net.UDPConn, raw syscall.RawConn) *udpFlow {
	f := &udpFlow{key: key, conn: conn, raw: raw, oob: newGSOControl(), gso: true}
	// A send that returns the socket's pending error (an ICMP error for
	// an earlier datagram, relayed to the client by udpReplies) did not
	// send this one: it is tried once more.
	f.send = func(fd uintptr) bool {
		_, f.sendErr = unix.Write(int(fd), f.sendBuf)
		if pendingICMPError(f.sendErr) {
			f.errTaken.Store(true)
			_, f.sendErr = unix.Write(int(fd), f.sendBuf)
		}
		return true // never wait: a full buffer drops the datagram
	}
	f.sendGSO = func(fd uintptr) bool {
		_, f.sendErr = unix.SendmsgN(int(fd), f.sendBuf, f.oob, nil, 0)
		if pendingICMPError(f.sendErr) {
			f.errTaken.Store(true)
			_, f.sendErr = unix.SendmsgN(int(fd), f.sendBuf, f.oob, nil, 0)
		}
		return true
	}
	return f
}

// Forward sends the payload of an allowed datagram read from the TUN to
// its destination. It runs on the read loop and never blocks: a new flow's
// datagrams wait (bounded) while an opener makes its socket; a datagram
// that finds the socket's buffer full is dropped and counted, as a router
// would. The send may wait in the flow's batch until the read loop has read
// what the TUN holds (batch.go).
func (u *Forwarder) Forward(p *filter.Packet, pkt []byte, now int64) {
	if p.DstPort == dnsPort && u.answerQuery(p, pkt, now) {
		return // a blocked query, answered by tunfw (names.go)
	}
	key := filter.KeyOf(p)
	u.mu.Lock()
	f := u.flows[key]
	u.mu.Unlock()
	if f == nil {
		if f = u.startUDP(key, now); f == nil {
			return
		}
	}
	f.last.Store(now)
	payload := pkt[p.IPHeaderLen+header.UDPMinimumSize:][:p.PayloadLen] // the UDP length's, not the IP packet's
	if f.ready.Load() {
		u.queueUDP(f, payload)
		return
	}
	if f.peek != nil && u.peekUDP(f, payload, now) {
		return // held until the flow is judged
	}
	if !f.queued.Load() && !u.queueOpen(f) {
		// Never queued, it holds nothing: it leaves at once, as one
		// refused by startUDP does, so a burst past the openers' queue
		// does not fill the client's share with empty flows.
		u.lim.openBusy.Add(1)
		u.mu.Lock()
		u.removeUDPLocked(f)
		u.mu.Unlock()
		u.tracker.Untrack(f.ref)
		u.h.Engine.Release(f.ref, now)
		return
	}
	u.holdUDP(f, payload)
}

// startUDP makes the flow of key's first datagram, unless its client holds
// its share of UDP flows or tunfw as many sockets as it may: then the
// datagram is dropped and counted, and the flow leaves the engine's table
// (it holds nothing and counts against no limit; its next datagram tries
// again).
func (u *Forwarder) startUDP(key filter.FlowKey, now int64) *udpFlow {
	src := key.Src.Addr()
	ref := filter.FlowRef{Key: key, ID: u.h.Engine.Claim(key)}
	var f *udpFlow
	var drop *atomic.Uint64
	u.mu.Lock()
	switch {
	case u.ctx.Err() != nil:
		drop = &u.lim.openFailed
	case int(u.perSrc[src]) >= u.h.MaxPerSource():
		drop = &u.lim.sourceLimit
	case len(u.flows) >= u.lim.maxSockets:
		drop = &u.lim.socketLimit
	default:
		f = newUDPFlow(key, nil, nil)
		f.ref = ref
		f.last.Store(now)
		u.flows[key] = f
		u.perSrc[src]++
	}
	u.mu.Unlock()
	if drop != nil {
		// Refused before anything is made for it: a flood of new
		// flows past the bounds costs little.
		drop.Add(1)
		u.h.Engine.Release(ref, now)
		return nil
	}
	if u.h.Engine.HasNameRules() && u.h.Engine.Peeking(ref) {
		if int(u.names.peeking.Add(1)) > u.h.Inspect.MaxPending {
			// Too many flows held for their name: this one holds
			// nothing and leaves, its next datagram tries again.
			u.names.peeking.Add(-1)
			u.names.peekBusy.Add(1)
			u.mu.Lock()
			u.removeUDPLocked(f)
			u.mu.Unlock()
			u.h.Engine.Release(ref, now)
			return nil
		}
		f.peek = &udpPeek{}
	}
	u.tracker.Track(ref, func() { u.endUDP(f) })
	return f
}

// queueOpen asks the openers for f's socket; false when too many flows, or
// too many of f's client, wait for one already.
func (u *Forwarder) queueOpen(f *udpFlow) bool {
	src := f.key.Src.Addr()
	u.mu.Lock()
	if !f.queued.Load() && u.opening[src] < udpOpenPerSource {
		select {
		case u.open <- f:
			u.opening[src]++
			f.queued.Store(true)
		default:
		}
	}
	u.mu.Unlock()
	return f.queued.Load()
}

// holdUDP keeps a datagram of a flow whose socket is being opened, or
// sends it if the socket opened meanwhile.
func (u *Forwarder) holdUDP(f *udpFlow, payload []byte) {
	f.mu.Lock()
	if f.ready.Load() {
		f.mu.Unlock()
		u.queueUDP(f, payload)
		return
	}
	if f.closed || len(f.held) == udpHeld || f.heldBytes+len(payload) > udpHeldBytes {
		f.mu.Unlock()
		u.writeDrops.Add(1)
		return
	}
	f.held = append(f.held, append([]byte(nil), payload...))
	f.heldBytes += len(payload)
	f.mu.Unlock()
}

// opener opens the sockets of new flows, so that the read loop never
// waits for socket, setsockopt and connect calls or a goroutine start.
func (u *Forwarder) opener() {
	defer u.wg.Done()
	for {
		select {
		case <-u.ctx.Done():
			return
		case f := <-u.open:
			u.openUDP(f)
			// A flood keeps the openers busy: let a read loop that
			// is ready run first, whatever the number of cores.
			runtime.Gosched()
		}
	}
}

// openUDP connects a socket for flow f, sends what it held and starts
// relaying its replies.
func (u *Forwarder) openUDP(f *udpFlow) {
	defer u.guard.Recover(&f.ref)
	conn, raw, err := u.dialUDP(f.key)
	src := f.key.Src.Addr()
	u.mu.Lock()
	if u.opening[src]--; u.opening[src] <= 0 {
		delete(u.opening, src)
	}
	u.mu.Unlock()
	f.mu.Lock()
	if err != nil || f.closed {
		held := len(f.held)
		f.held, f.heldBytes = nil, 0
		byTable := f.closed
		f.closed = true
		f.mu.Unlock()
		if conn != nil {
			conn.Close()
		}
		if !byTable {
			u.lim.openFailed.Add(uint64(held))
			u.h.Log.Debug("dial failed", "proto", "udp", "src", f.key.Src, "dst", f.key.Dst, "err", err)
			u.mu.Lock()
			u.removeUDPLocked(f)
			u.mu.Unlock()
			u.tracker.Untrack(f.ref)
			u.h.Engine.Release(f.ref, u.h.Now())
		}
		return
	}
	f.conn, f.raw = conn, raw
	for _, d := range f.held {
		u.sendUDP(f, d)
	}
	f.held, f.heldBytes = nil, 0
	f.ready.Store(true)
	f.mu.Unlock()
	u.wg.Add(1) // this opener is counted in wg: it cannot be zero here
	go u.udpReplies(f)
}

// dialUDP opens and connects the socket of flow key.
func (u *Forwarder) dialUDP(key filter.FlowKey) (*net.UDPConn, syscall.RawConn, error) {
	network := "udp4"
	if key.Dst.Addr().Is6() {
		network = "udp6"
	}
	c, err := u.h.Dialer.DialContext(u.ctx, network, key.Dst.String())
	if err != nil {
		return nil, nil, err
	}
	uc := c.(*net.UDPConn)
	raw, err := uc.SyscallConn()
	if err != nil {
		uc.Close()
		return nil, nil, err
	}
	u.setUDPRcvBuf(raw, min(udpRcvBufStart, u.lim.rcvBuf))
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = setRecvErr(int(fd), key.Dst.Addr().Is6()) }); err != nil || serr != nil {
		uc.Close()
		return nil, nil, fmt.Errorf("ask for ICMP errors of the socket to %s: %w", key.Dst, errors.Join(err, serr))
	}
	return uc, raw, nil
}

// takeLargeBuf reports whether one more flow of client src may hold the
// largest receive buffer, and counts it if so; shrinkRcvBuf or closeUDP
// gives it back (giveLargeBuf). A flow refused asks again at a full batch
// largeBufRetry later.
func (u *Forwarder) takeLargeBuf(src netip.Addr) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	l := &u.lim
	if m := l.maxLargeBufs; m > 0 && (l.largeBufs >= m || l.largeBySrc[src] >= max(m/4, 1)) {
		return false
	}
	l.largeBufs++
	l.largeBySrc[src]++
	return true
}

// largeBufRetry is how long a flow refused the largest receive buffer
// waits before it asks again: a busy flow fills a batch many times a
// second, and each ask takes the forwarder's lock.
const largeBufRetry = int64(time.Second)

// largeBufIdle is how long a flow keeps the largest receive buffer with no
// reply coming: then it gives it back for another busy flow, and its
// socket goes back to udpRcvBufStart. Its buffer is empty by then; the
// slot is what the flow kept from others (until it left the table,
// udp_idle, 60 s by default, before this). A flow still receiving keeps
// it even when its replies no longer queue: a steady stream the reply
// loop keeps up with would otherwise be left 2 ms of buffer at 1 Gbit/s
// against any pause of tunfw's.
const largeBufIdle = int64(10 * time.Second)

// growRcvBuf gives flow f, whose replies queue, the largest receive buffer
// if it has not got it and the bounds allow; the reply goroutine calls it
// at each full batch, read at now.
func (u *Forwarder) growRcvBuf(f *udpFlow, now int64) {
	if f.bigRcvBuf || now < f.largeRetryAt {
		return
	}
	if !u.takeLargeBuf(f.key.Src.Addr()) {
		u.lim.largeRefused.Add(1)
		f.largeRetryAt = now + largeBufRetry
		return
	}
	f.bigRcvBuf = true
	u.setUDPRcvBuf(f.raw, u.lim.rcvBuf)
}

// shrinkRcvBuf gives flow f's largest receive buffer back once no reply
// came for largeBufIdle, and reports whether it did; the reply goroutine
// calls it, at now, while f holds one.
func (u *Forwarder) shrinkRcvBuf(f *udpFlow, now int64) bool {
	if !f.bigRcvBuf || now-f.lastReply < largeBufIdle {
		return false
	}
	u.setUDPRcvBuf(f.raw, min(udpRcvBufStart, u.lim.rcvBuf))
	f.bigRcvBuf = false
	u.giveLargeBuf(f.key.Src.Addr())
	return true
}

// replyWait is how long, from at, the reply goroutine of flow f waits for
// a datagram: until the flow's idle timeout (left, above 0) or, while it
// holds the large buffer, until that goes back (shrinkRcvBuf, which was
// asked at at), whichever comes first. Above 0.
func replyWait(f *udpFlow, at, left int64) int64 {
	if f.bigRcvBuf {
		return min(left, f.lastReply+largeBufIdle-at)
	}
	return left
}

// giveLargeBuf uncounts a large buffer of client src.
func (u *Forwarder) giveLargeBuf(src netip.Addr) {
	u.mu.Lock()
	defer u.mu.Unlock()
	l := &u.lim
	l.largeBufs--
	if l.largeBySrc[src]--; l.largeBySrc[src] <= 0 {
		delete(l.largeBySrc, src)
	}
}

// setUDPRcvBuf sets the receive buffer of a flow's socket. Best effort:
// without CAP_NET_ADMIN the default stays.
func (u *Forwarder) setUDPRcvBuf(raw syscall.RawConn, size int) {
	raw.Control(func(fd uintptr) {
		unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, size)
	})
}

// endUDP releases flow f the moment it leaves the engine's table (expired,
// cut by a reload) or the forwarder closes: its socket, its entry, its
// tracking. Its reply goroutine sees the closed socket and ends.
func (u *Forwarder) endUDP(f *udpFlow) {
	f.mu.Lock()
	f.closed = true
	c := f.conn
	f.mu.Unlock()
	if c != nil {
		c.Close()
	}
	u.mu.Lock()
	u.removeUDPLocked(f)
	u.mu.Unlock()
	u.tracker.Untrack(f.ref)
}

// removeUDPLocked deletes f from the flows, if it is still there; udpMu
// must be held.
func (u *Forwarder) removeUDPLocked(f *udpFlow) {
	if u.flows[f.key] != f {
		return
	}
	delete(u.flows, f.key)
	src := f.key.Src.Addr()
	if u.perSrc[src]--; u.perSrc[src] <= 0 {
		delete(u.perSrc, src)
	}
}

// closeFlows releases every flow, when the forwarder closes.
func (u *Forwarder) closeFlows() {
	u.mu.Lock()
	fs := make([]*udpFlow, 0, len(u.flows))
	for _, f := range u.flows {
		fs = append(fs, f)
	}
	u.mu.Unlock()
	for _, f := range fs {
		u.endUDP(f)
	}
}

// udpReplyBatch is how many datagrams udpReplies reads before writing
// them to the TUN in one call, which coalesces those of one size into a
// single UDP GSO packet (wireguard's GRO on write).
const udpReplyBatch = 32

// udpReplies turns the datagrams the destination sends into packets for the
// client until the flow has been idle for the engine's UDP timeout or is
// closed. The socket is connected, so the kernel drops datagrams from any
// other source: replies reach the client only from the address and port it
// sent to. Buffers are taken only while datagrams are there: after the
// first one, what else the socket already holds (up to udpReplyBatch) is
// read without waiting and written with it.
func (u *Forwarder) udpReplies(f *udpFlow) {
	defer u.wg.Done()
	defer u.closeUDP(f)
	defer u.guard.Recover(&f.ref)
	ipLen := filter.HeaderLen(f.key.Dst.Addr())
	var r sockread.Reader
	r.Init(func() *[]byte { return u.h.TUN.Buffer() }, func(bp *[]byte) { u.h.TUN.Release(bp) },
		tunio.Headroom+ipLen+header.UDPMinimumSize)
	var errs *errQueue
	r.ErrQueue = func(fd int) {
		if errs == nil {
			errs = newErrQueue(u, f)
		}
		errs.drain(fd)
	}
	held := make([]*[]byte, 0, udpReplyBatch)
	pkts := make([][]byte, 0, udpReplyBatch)
	for {
		at := u.h.Now()
		idle := int64(u.h.Engine.Timeouts().UDPIdle)
		left := idle - (at - f.last.Load())
		if left <= 0 {
			return
		}
		// A large buffer goes back when replies stopped coming: the
		// wait ends then too.
		u.shrinkRcvBuf(f, at)
		left = replyWait(f, at, left)
		f.conn.SetReadDeadline(time.Now().Add(time.Duration(left)))
		// The first datagram: wait in the netpoller for it. When a send
		// took the socket's pending error, its queued ICMP error may have
		// woken nobody (the netpoller's edge went before this Read): it
		// is looked for once first, as if woken.
		r.Wait, r.Woken = true, f.errTaken.Swap(false)
		err := f.raw.Read(r.Read)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				continue // idle so far; the loop checks the timeout
			}
			return
		}
		if r.Err != nil {
			// The socket's pending error: an ICMP error for an
			// earlier datagram (port unreachable...), relayed to the
			// client by r.ErrQueue. Keep the flow: a server may come
			// up, a route come back.
			continue
		}
		now := u.h.Now()
		f.last.Store(now)
		f.lastReply = now
		for {
			if pkt := u.udpReplyPacket(f, r.BP, r.N, ipLen, now); pkt != nil {
				held = append(held, r.BP)
				pkts = append(pkts, pkt)
			} else {
				u.h.TUN.Release(r.BP)
			}
			r.BP = nil
			if len(held) == udpReplyBatch {
				// Replies queue: this flow is busy enough for the
				// largest buffer.
				u.growRcvBuf(f, now)
				break
			}
			// More already there? Read without waiting.
			r.Wait = false
			if f.raw.Control(r.ReadNow) != nil || r.BP == nil {
				break
			}
		}
		if len(pkts) > 0 {
			u.h.TUN.Write(pkts)
		}
		for i, bp := range held {
			u.h.TUN.Release(bp)
			held[i], pkts[i] = nil, nil
		}
		held, pkts = held[:0], pkts[:0]
	}
}

// pendingICMPError reports whether err from a send on a flow's socket may
// be the socket's pending error, left by an ICMP error for an earlier
// datagram (see icmp_err_convert and icmpv6_err_convert in Linux).
func pendingICMPError(err error) bool {
	switch err {
	case unix.ECONNREFUSED, unix.EHOSTUNREACH, unix.ENETUNREACH, unix.EACCES, unix.EPROTO,
		unix.EHOSTDOWN, unix.ENONET, unix.EMSGSIZE:
		return true
	}
	return false
}

// udpReplyPacket wraps the n-byte datagram in bp in IP and UDP headers for
// the client and accounts it to the flow; nil when it is larger than the
// TUN takes (dropped and counted).
func (u *Forwarder) udpReplyPacket(f *udpFlow, bp *[]byte, n, ipLen int, now int64) []byte {
	total := ipLen + header.UDPMinimumSize + n
	if total > u.h.MTU {
		u.writeDrops.Add(1)
		return nil
	}
	b := *bp
	p, l := filter.BuildUDP(b[tunio.Headroom:tunio.Headroom+total], f.key.Dst, f.key.Src, n)
	if l == 0 || u.h.Engine.Outbound(&p, now) == filter.OutboundSilenced {
		return nil // the flow was denied since (a reload's recheck)
	}
	if f.key.Dst.Port() == dnsPort {
		u.learnAnswer(f, b[tunio.Headroom+ipLen+header.UDPMinimumSize:tunio.Headroom+total])
	}
	return b[:tunio.Headroom+total]
}

// closeUDP ends a flow whose reply loop ended: its socket, its table
// entries and its flow in the engine, unless the flow already left the
// engine's table (endUDP did the rest then).
func (u *Forwarder) closeUDP(f *udpFlow) {
	f.conn.Close()
	if f.bigRcvBuf {
		f.bigRcvBuf = false
		u.giveLargeBuf(f.key.Src.Addr())
	}
	f.mu.Lock()
	byTable := f.closed
	f.closed = true
	f.mu.Unlock()
	if byTable {
		return
	}
	u.mu.Lock()
	u.removeUDPLocked(f)
	u.mu.Unlock()
	u.tracker.Untrack(f.ref)
	u.h.Engine.Release(f.ref, u.h.Now())
}
