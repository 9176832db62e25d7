package tcpfwd

import (
	"bytes"
	"errors"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/internal/nbio"
	"github.com/tunfw/tunfw/stack/dial"
	"github.com/tunfw/tunfw/stack/internal/sockread"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/waiter"
)

// A TCP relay copies both ways between the client's gVisor endpoint and the
// destination's socket until both directions ended. EOF in one direction is
// passed on as a half close (FIN); an error (a reset) aborts both sides with
// a RST, so each peer sees the outcome the other one caused.
//
// An idle relay holds no goroutine and no buffer. Each direction is a pump
// that has a goroutine only while its connection is active: the client's
// direction is started by gVisor's readable notification, the destination's
// by the Forwarder's sockWatcher, one epoll instance for all idle sockets. A
// running pump copies, and between bursts waits for more in the usual way
// (netpoller, gVisor notification) for up to its linger (fw.linger); only
// a direction quiet that long goes back to the watcher and ends its
// goroutine, so a busy connection pays no goroutine start or epoll call
// per burst.
type tcpRelay struct {
	fw    *Forwarder
	flow  filter.FlowRef // released when the relay ends
	ep    tcpip.Endpoint // the client's
	wq    *waiter.Queue
	up    *dial.Conn
	upRaw syscall.RawConn
	entry waiter.Entry // gVisor readable notification -> toUp
	token uint64       // the socket's registration with the watcher

	// upRun is the running toUp pump's state, whose ready channel
	// gVisor's notification signals; nil while that direction is idle.
	upRun atomic.Pointer[toUpState]

	toUp, toClient pump
	left           atomic.Int32 // directions not ended yet
	aborted        atomic.Bool  // set by the one abort that closes both sides
}

// toUpState is what the client-to-destination direction works with while it
// runs; toClientState the same for the other way. Each run takes one from
// its pool and puts it back when it ends or idles, so that an idle relay
// holds neither and a run allocates nothing: in the relay, they and the
// channel and callbacks made for them took it from 256 bytes to 768. A run
// that panicked leaves its state to the collector: it may still be
// registered for gVisor's notification.
type toUpState struct {
	// ready wakes the run when it waits for the client. A notification
	// may reach a state after its run put it back (it loaded the state
	// just before): the next run drains what is there at its start, and
	// one that comes later wakes that run once for nothing.
	ready  chan struct{}
	bufs   relayBufs
	w      tcpip.SliceWriter // the buffer gVisor reads into
	linger *time.Timer       // made at the first wait; stopped between runs
	// What writeUp needs: the bytes still to write, the outcome, and
	// its callback, bound once so that a write allocates nothing.
	out    []byte
	outErr syscall.Errno
	outFn  func(fd uintptr) bool
}

// writeUp writes b to the destination's socket with raw system calls
// (internal/nbio), waiting in the netpoller while the socket is full.
func (s *toUpState) writeUp(raw syscall.RawConn, b []byte) error {
	s.out, s.outErr = b, 0
	err := raw.Write(s.outFn)
	s.out = nil
	if err != nil {
		return err
	}
	if s.outErr != 0 {
		return s.outErr
	}
	return nil
}

// writeFd is writeUp's RawConn.Write callback: false asks the netpoller
// to wait until the socket is writable.
func (s *toUpState) writeFd(fd uintptr) bool {
	n, e := nbio.WriteFull(fd, s.out)
	s.out = s.out[n:]
	if e == unix.EAGAIN {
		return false
	}
	s.outErr = e
	return true
}

type toClientState struct {
	r      *tcpRelay // the relay of the run; nil in the pool
	bufs   relayBufs
	fromUp sockread.Reader
	// What writeClient needs: the payload reader, and the writable
	// notification it waits on when the client's window is full.
	cliR     bytes.Reader
	cliEntry waiter.Entry
	cliReady chan struct{}
	// What moveToClient needs: the socket as gVisor's payload, and the
	// outcome of its last call (its callback is made once, with the
	// state, so a call allocates nothing).
	upPay  upPayload
	move   func(fd uintptr) bool
	moveSt moveState
}

// runStates are the Forwarder's pools of the relays' run states and of
// their copy buffers; the zero value is ready to use.
type runStates struct {
	up, cli sync.Pool
	bufs    bufPools
}

func (p *runStates) getUp() *toUpState {
	if s, ok := p.up.Get().(*toUpState); ok {
		return s
	}
	s := &toUpState{ready: make(chan struct{}, 1), bufs: relayBufs{pools: &p.bufs}}
	s.outFn = s.writeFd
	return s
}

func (p *runStates) getCli() *toClientState {
	if s, ok := p.cli.Get().(*toClientState); ok {
		return s
	}
	// The reader's and the move's callbacks are bound to the state once.
	s := &toClientState{bufs: relayBufs{pools: &p.bufs}}
	s.fromUp.Init(s.bufs.get, func(bp *[]byte) { s.bufs.put(bp, 0) }, 0)
	s.fromUp.Wait = true
	s.move = s.moveFd
	s.cliEntry, s.cliReady = waiter.NewChannelEntry(waiter.WritableEvents)
	return s
}

// relayLinger is how long a direction may be quiet before its goroutine
// ends and the watcher (or gVisor's notification) waits for it instead,
// while at most maxLingering directions are running (a goroutine each,
// copying, waiting for a full side, or lingering); beyond that they
// linger for relayLingerBusy only. A running direction holds a goroutine
// and its 16 KiB stack: a burst of connections opened at once would
// otherwise hold two each for relayLinger, and the memory a burst
// reaches stays with tunfw (its peak decides the runtime's metadata, and
// the goroutines' descriptors are kept for reuse): 1,000 idle flows
// opened in 0.2 s cost 9.8-10.0 KiB each with relayLinger for all, 8.8-9.3
// with this bound (64: 8.9-9.0, 256: 9.2-9.4). 32 connections at a time
// run about 64 directions, below it.
const (
	relayLinger     = 100 * time.Millisecond
	relayLingerBusy = 10 * time.Millisecond
	maxLingering    = 128
)

// linger is how long a direction may be quiet now (relayLinger), shorter
// when many are running.
func (fw *Forwarder) linger() time.Duration {
	if fw.running.Load() > maxLingering {
		return relayLingerBusy
	}
	return relayLinger
}

// pump runs one direction of a relay.
type pump struct {
	state atomic.Int32 // pumpIdle, pumpRunning or pumpDone
	dir   direction
}

// direction is what a pump runs. The relay's two are the relay itself
// under two types (toUpDir, toClientDir): an interface holding a pointer
// costs no allocation, where six method values and a closure cost
// seven per connection.
type direction interface {
	// drain copies, waiting between bursts, until the direction ended
	// (true) or was quiet for its linger (false).
	drain() bool
	// idle hands the direction to its waiter; false when data is
	// already there.
	idle() bool
	end()           // the direction ended: called once
	panicked(v any) // after a panic in drain or idle
}

type (
	toUpDir     tcpRelay
	toClientDir tcpRelay
)

func (d *toUpDir) drain() bool    { return (*tcpRelay)(d).drainToUp() }
func (d *toUpDir) idle() bool     { return (*tcpRelay)(d).toUpIdle() }
func (d *toUpDir) end()           { (*tcpRelay)(d).directionEnded() }
func (d *toUpDir) panicked(v any) { (*tcpRelay)(d).panicked(v) }

// NotifyEvent is gVisor's readable notification (the relay's entry): it
// wakes the toUp pump when it runs and waits, or starts it.
func (d *toUpDir) NotifyEvent(waiter.EventMask) {
	r := (*tcpRelay)(d)
	if s := r.upRun.Load(); s != nil {
		select {
		case s.ready <- struct{}{}:
		default:
		}
	}
	r.toUp.kick()
}
func (d *toClientDir) drain() bool    { return (*tcpRelay)(d).drainToClient() }
func (d *toClientDir) idle() bool     { return (*tcpRelay)(d).toClientIdle() }
func (d *toClientDir) end()           { (*tcpRelay)(d).directionEnded() }
func (d *toClientDir) panicked(v any) { (*tcpRelay)(d).panicked(v) }

const (
	pumpIdle int32 = iota
	pumpRunning
	pumpDone
)

// startRelay relays between the client's endpoint and the destination's
// socket. It returns when the client's direction is first quiet; the relay
// ends itself.
func (fw *Forwarder) startRelay(flow filter.FlowRef, wq *waiter.Queue, ep tcpip.Endpoint, up *dial.Conn) {
	r := &tcpRelay{fw: fw, flow: flow, ep: ep, wq: wq, up: up, upRaw: up.SyscallConn()}
	r.left.Store(2)
	r.toUp.dir, r.toClient.dir = (*toUpDir)(r), (*toClientDir)(r)
	fw.wg.Add(1)
	fw.tracker.Track(flow, r.abort)
	r.entry.Init((*toUpDir)(r), waiter.ReadableEvents)
	wq.EventRegister(&r.entry)
	// Data or a FIN may have come before the entry was registered, and
	// the socket may hold the destination's first bytes: look at both.
	// The caller's goroutine, which exists anyway, pumps the client's
	// first bytes itself (a client usually speaks first); it ends once
	// that direction is quiet.
	r.toClient.kick()
	if r.toUp.state.CompareAndSwap(pumpIdle, pumpRunning) {
		r.toUp.run()
	}
}

// abort ends both sides with a RST. The pumps see the closed socket and
// endpoint and end; the destination's pump is kicked because a closed
// socket is no longer watched.
func (r *tcpRelay) abort() {
	// Only the first caller closes, and kicks after it closed: the pump
	// sees the closed socket even if a later caller's kick came first.
	if r.aborted.CompareAndSwap(false, true) {
		r.up.Abort()
		r.ep.Abort()
	}
	r.toClient.kick()
}

// panicked ends the relay after a panic in one of its pumps.
func (r *tcpRelay) panicked(v any) {
	r.abort()
	r.fw.guard.Panicked(r.flow, v)
}

// directionEnded is each pump's end; the second one releases the relay:
// the notification entry, the watcher's token, both sockets, the flow's
// tracking and the flow itself, which leaves the table at once (closed
// connections count against no limit; see filter.Engine.Release for the
// client's last segments). Both name the flow by identity, so a new
// connection that reuses the tuple keeps its own.
func (r *tcpRelay) directionEnded() {
	if r.left.Add(-1) != 0 {
		// Half closed (the stack accepted the client's FIN, or the
		// destination closed): the flow has tcp_closing from now on.
		r.fw.h.Engine.Closing(r.flow)
		return
	}
	r.wq.EventUnregister(&r.entry)
	r.fw.watcher.forget(r.token)
	// Untracked first, so that no abort reaches the socket the closer
	// holds; an aborted relay's socket is closed already.
	r.fw.tracker.Untrack(r.flow)
	if !r.aborted.Load() {
		r.fw.closer.add(r.up)
	}
	r.ep.Close()
	r.fw.h.Engine.Release(r.flow, r.fw.h.Now())
	r.fw.wg.Done()
}

// kick starts the pump unless it runs or has ended. It never blocks: gVisor
// and the watcher call it.
func (p *pump) kick() {
	if p.state.CompareAndSwap(pumpIdle, pumpRunning) {
		go p.run()
	}
}

func (p *pump) run() {
	growStack(0)
	defer func() {
		if v := recover(); v != nil {
			p.finish()
			p.dir.panicked(v)
		}
	}()
	for {
		if p.dir.drain() {
			p.finish()
			return
		}
		p.state.Store(pumpIdle)
		if p.dir.idle() {
			return
		}
		// Data came while going idle; run again unless a kick did.
		if !p.state.CompareAndSwap(pumpIdle, pumpRunning) {
			return
		}
	}
}

func (p *pump) finish() {
	if p.state.Swap(pumpDone) != pumpDone {
		p.dir.end()
	}
}

// drainToUp copies what the client sent into the destination's socket.
func (r *tcpRelay) drainToUp() bool {
	r.fw.running.Add(1)
	defer r.fw.running.Add(-1)
	s := r.fw.states.getUp()
	s.bufs.reset() // each run starts with small buffers
	select {
	case <-s.ready:
	default:
	}
	// Published before the first read: data that comes later finds it.
	r.upRun.Store(s)
	ended := r.copyToUp(s)
	r.upRun.Store(nil)
	if s.linger != nil {
		s.linger.Stop()
	}
	r.fw.states.up.Put(s)
	return ended
}

// copyToUp is drainToUp's loop, with the run's state s.
func (r *tcpRelay) copyToUp(s *toUpState) bool {
	for {
		bp := s.bufs.get()
		s.w = tcpip.SliceWriter(*bp)
		res, terr := r.ep.Read(&s.w, tcpip.ReadOptions{})
		s.w = nil
		if res.Count > 0 {
			r.ep.ModerateRecvBuf(res.Count)
			werr := s.writeUp(r.upRaw, (*bp)[:res.Count])
			s.bufs.put(bp, res.Count)
			if werr != nil {
				r.abort()
				return true
			}
			continue
		}
		s.bufs.put(bp, 0)
		switch terr.(type) {
		case *tcpip.ErrWouldBlock:
			if s.linger == nil {
				s.linger = time.NewTimer(r.fw.linger())
			} else {
				s.linger.Reset(r.fw.linger())
			}
			select {
			case <-s.ready:
				continue
			case <-s.linger.C:
				return false
			}
		case *tcpip.ErrClosedForReceive:
			r.up.CloseWrite()
			return true
		default:
			r.abort()
			return true
		}
	}
}

// toUpIdle reports whether the endpoint is still without data: gVisor's
// notification will kick the pump.
func (r *tcpRelay) toUpIdle() bool { return r.ep.Readiness(waiter.ReadableEvents) == 0 }

// drainToClient copies what the destination sent to the client. Between
// bursts it waits in the netpoller, with its linger as read deadline.
// Each run starts reading into small buffers; once one filled (bulk), the
// bytes go from the socket straight into the netstack (moveToClient).
func (r *tcpRelay) drainToClient() bool {
	r.fw.running.Add(1)
	defer r.fw.running.Add(-1)
	s := r.fw.states.getCli()
	s.r, s.fromUp.Woken = r, false
	s.bufs.reset()
	ended := s.copyToClient()
	s.r, s.fromUp.BP = nil, nil // the buffer went back to its pool
	s.cliR.Reset(nil)
	select {
	case <-s.cliReady: // a notification that came after its wait
	default:
	}
	r.fw.states.cli.Put(s)
	return ended
}

// copyToClient is drainToClient's loop.
func (s *toClientState) copyToClient() bool {
	r := s.r
	for {
		if err := r.up.SetReadDeadline(time.Now().Add(r.fw.linger())); err != nil {
			r.abort()
			return true
		}
		done, ended := false, false
		if s.bufs.large {
			done, ended = s.moveToClient()
		} else {
			done, ended = s.readToClient()
		}
		if done {
			return ended
		}
	}
}

// readToClient reads the socket once into a relay buffer, waiting for it
// to be readable, and writes what it read to the client. done: the
// direction ended (ended true) or idled for its linger (ended false).
func (s *toClientState) readToClient() (done, ended bool) {
	r, rd := s.r, &s.fromUp
	rd.BP = nil
	err := r.upRaw.Read(rd.Read)
	// Closed by abort, or reset by the destination: no buffer is held.
	failed := err != nil || rd.Err != nil
	if !failed && rd.N == 0 {
		s.bufs.put(rd.BP, 0)
	}
	if done, ended = r.readEnded(err, failed, !failed && rd.N == 0); done {
		return done, ended
	}
	ok := s.writeClient((*rd.BP)[:rd.N])
	s.bufs.put(rd.BP, rd.N)
	if !ok {
		r.abort()
		return true, true
	}
	return false, false
}

// readEnded is what a read from the socket toward the client (err from
// the netpoller, failed by the socket or the endpoint, eof from the
// destination) means for the direction, the same for both ways of
// reading: the idle deadline (done, not ended), a failure (the relay is
// aborted) or the destination's FIN (passed on to the client); otherwise
// not done.
func (r *tcpRelay) readEnded(err error, failed, eof bool) (done, ended bool) {
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return true, false
	case err != nil || failed:
		r.abort()
		return true, true
	case eof:
		r.ep.Shutdown(tcpip.ShutdownWrite)
		return true, true
	}
	return false, false
}

// writeClient writes b to the client's endpoint, waiting while its send
// buffer is full, as gonet.TCPConn.Write does but without allocating: the
// reader and the notification entry are the run's state (one writer, the
// toClient pump). false: the endpoint failed (reset or aborted; an abort
// notifies the entry).
func (s *toClientState) writeClient(b []byte) bool {
	for len(b) > 0 {
		s.cliR.Reset(b)
		n, err := s.r.ep.Write(&s.cliR, tcpip.WriteOptions{})
		b = b[n:]
		switch err.(type) {
		case nil:
		case *tcpip.ErrWouldBlock:
			s.waitClientWritable()
		default:
			return false
		}
	}
	return true
}

// moveState is what moveFd found.
type moveState struct {
	full  bool  // the endpoint's send buffer is full
	eof   bool  // the destination closed its side
	plain bool  // bytes SIOCINQ does not count: read them the plain way
	err   error // the socket failed, or the endpoint did
}

// moveToClient waits until the socket is readable, then moves what it
// holds into the client's endpoint, waiting for room there when the send
// buffer is full. done: the direction ended (ended true) or idled for
// linger (ended false); otherwise the caller loops.
func (s *toClientState) moveToClient() (done, ended bool) {
	r := s.r
	s.moveSt = moveState{}
	err := r.upRaw.Read(s.move)
	st := &s.moveSt
	if done, ended = r.readEnded(err, st.err != nil, st.eof); done {
		return done, ended
	}
	switch {
	case st.full:
		s.waitClientWritable()
	case st.plain:
		return s.readToClient()
	}
	return false, false
}

// moveFd is moveToClient's RawConn.Read callback: false asks the netpoller
// to wait for the socket.
func (s *toClientState) moveFd(fd uintptr) bool {
	r, st := s.r, &s.moveSt
	queued, e := nbio.Queued(fd)
	if e != 0 {
		st.err = e
		return true
	}
	if queued == 0 {
		// Empty, closed or failed: a peek tells which. A pending
		// error is consumed by it, so it is kept here.
		var one [1]byte
		n, _, err := unix.Recvfrom(int(fd), one[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		switch {
		case err == unix.EAGAIN || err == unix.EINTR:
			return false
		case err != nil:
			st.err = err
			return true
		case n == 0:
			st.eof = true
			return true
		}
		// Readable, yet nothing counted: bytes that came after the
		// ioctl, or the destination's urgent byte (SIOCINQ stops
		// short of it, a peek skips it): a plain read steps past it,
		// as the small-buffer path always did.
		st.plain = true
		return true
	}
	// Atomic: gVisor reads the payload under the endpoint's lock and
	// queues all it read; otherwise it may drop what it read when the
	// send buffer shrank meanwhile (a lowered [stack] maximum), which
	// would leave a hole. maxMove bounds how long the lock is held.
	s.upPay = upPayload{fd: int(fd), left: min(queued, maxMove)}
	for s.upPay.left > 0 {
		before := s.upPay.left
		n, werr := r.ep.Write(&s.upPay, tcpip.WriteOptions{Atomic: true})
		if taken := before - s.upPay.left; int64(taken) != n && s.upPay.err == nil {
			st.err = errShortWrite
			return true
		}
		switch werr.(type) {
		case nil:
			if n == 0 {
				return true
			}
		case *tcpip.ErrWouldBlock:
			st.full = true
			return true
		default:
			st.err = s.upPay.err
			if st.err == nil {
				st.err = errEndpointWrite
			}
			return true
		}
	}
	return true
}

// maxMove is the most moveFd hands the client's endpoint in one write.
const maxMove = 256 << 10

// errShortWrite: the endpoint queued other than what it read from the
// socket.
var errShortWrite = errors.New("client endpoint queued other than it read")

// errEndpointWrite: the client's endpoint refused a write (reset, closed).
var errEndpointWrite = errors.New("client endpoint refused the write")

// errShortRead: the socket held fewer bytes than SIOCINQ said.
var errShortRead = errors.New("socket held fewer bytes than it said")

// upPayload is the destination's socket as the payload of a write to the
// client's endpoint: gVisor reads the bytes straight from the socket into
// its own buffers, one copy where a relay buffer made two. gVisor reads
// until it has Len bytes or the send buffer's room, so Len is exact: what
// SIOCINQ said was queued (only the pump reads the socket, so that much is
// there). A read that comes up short fails the write, and the relay is
// aborted rather than left with a hole in the stream; so is a write that
// queued other than it read (moveFd writes atomically, so it does not).
type upPayload struct {
	fd   int
	left int
	err  error
}

// Len implements tcpip.Payloader.
func (p *upPayload) Len() int { return p.left }

// Read implements io.Reader.
func (p *upPayload) Read(b []byte) (int, error) {
	if p.left == 0 {
		return 0, io.EOF
	}
	if len(b) == 0 {
		return 0, nil
	}
	if len(b) > p.left {
		b = b[:p.left]
	}
	for {
		n, e := nbio.Read(uintptr(p.fd), b)
		var err error
		switch {
		case n > 0: // nbio returns 0 with an error
			p.left -= n
			return n, nil
		case e == 0 || e == unix.EAGAIN:
			err = errShortRead
		default:
			err = e
		}
		p.err = err
		return 0, err
	}
}

// waitClientWritable waits until the client's endpoint has room to send,
// or failed: a closed or reset endpoint is ready for anything, and the
// write that follows says which.
func (s *toClientState) waitClientWritable() {
	r := s.r
	r.wq.EventRegister(&s.cliEntry)
	// Room may have been made before the entry was registered.
	if r.ep.Readiness(waiter.WritableEvents) == 0 {
		<-s.cliReady
	}
	r.wq.EventUnregister(&s.cliEntry)
}

// toClientIdle hands the socket (back) to the watcher. When it cannot, the
// relay is aborted and the pump runs again to end.
func (r *tcpRelay) toClientIdle() bool {
	var err error
	if r.token == 0 {
		err = r.fw.watcher.add(r.upRaw, &r.toClient, &r.token)
	} else {
		err = r.fw.watcher.rearm(r.upRaw, r.token)
	}
	if err != nil {
		// Closed meanwhile, or epoll refused it: either way the relay
		// cannot wait for this socket any more.
		r.abort()
		return false
	}
	return true
}

// Relay copy buffers: a direction starts each run with a small buffer and
// takes large ones once a read filled a small one, so that connections
// trading small messages neither hold large buffers nor make the pools
// grow by them. A read that filled a large buffer (a bulk upload: the
// client's data queues in gVisor faster than the socket takes it) moves
// to a bulk buffer, while fewer than maxBulkBufs are out: each socket
// write of 128 KiB instead of 32 costs the kernel one transmit and one
// wake-up of the destination where it cost four, 15-20% less of tunfw's
// CPU per GB client->server (alternating pairs in `make bench`). The
// bound keeps what flows blocked on slow destinations hold at 8 MiB
// beyond their 32 KiB each.
const (
	smallRelayBuf = 2 << 10
	largeRelayBuf = 32 << 10
	bulkRelayBuf  = 128 << 10
	maxBulkBufs   = 64
)

// bufPools are the Forwarder's pools of relay copy buffers, by size; the
// zero value is ready to use.
type bufPools struct {
	small, large, bulk sync.Pool
	// bulkOut counts the bulk buffers handed out and not put back, at
	// most maxBulkBufs.
	bulkOut atomic.Int32
}

// relayBufs hands out the copy buffers of a pump from the Forwarder's
// pools.
type relayBufs struct {
	pools *bufPools
	large bool // a read filled a small buffer in this run
	bulk  bool // a read filled a large buffer in this run
}

// reset starts a run with small buffers.
func (r *relayBufs) reset() { r.large, r.bulk = false, false }

func (r *relayBufs) get() *[]byte {
	if r.bulk {
		if r.pools.bulkOut.Add(1) <= maxBulkBufs {
			if bp, ok := r.pools.bulk.Get().(*[]byte); ok {
				return bp
			}
			b := make([]byte, bulkRelayBuf)
			return &b
		}
		r.pools.bulkOut.Add(-1)
	}
	if r.large {
		if bp, ok := r.pools.large.Get().(*[]byte); ok {
			return bp
		}
		b := make([]byte, largeRelayBuf)
		return &b
	}
	if bp, ok := r.pools.small.Get().(*[]byte); ok {
		return bp
	}
	b := make([]byte, smallRelayBuf)
	return &b
}

// put returns bp, which a read filled with n bytes.
func (r *relayBufs) put(bp *[]byte, n int) {
	switch len(*bp) {
	case bulkRelayBuf:
		r.pools.bulkOut.Add(-1)
		r.pools.bulk.Put(bp)
	case largeRelayBuf:
		if n == len(*bp) {
			r.bulk = true
		}
		r.pools.large.Put(bp)
	default:
		if n == len(*bp) {
			r.large = true
		}
		r.pools.small.Put(bp)
	}
}

// growStack gives a new goroutine, while its stack is shallow, the 16 KiB
// the netstack's call chains need: grown on demand deep inside gVisor (2 to
// 16 KiB, three times), the runtime copied it adjusting every frame, 6% of
// tunfw's CPU with 32 connections at a time. An 8 KiB frame makes any
// stack smaller than 16 KiB grow to 16 KiB at once. i defeats constant
// folding.
//
//go:noinline
func growStack(i int) byte {
	var b [8 << 10]byte
	return b[i&(len(b)-1)]
}
