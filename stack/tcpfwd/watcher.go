package tcpfwd

import (
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// sockWatcher waits for idle relay sockets to become readable, for all of
// them in one goroutine, so that an idle TCP flow holds no goroutine of its
// own (each would keep a stack). A socket is watched one-shot: its event
// kicks its pump, which reads until the socket would block and then arms
// the watch again.
//
// The watcher's epoll instance is itself waited for in Go's netpoller (an
// epoll fd is readable while events are pending), not in a blocking
// epoll_wait: a goroutine blocked in a system call keeps the scheduler's
// P, so a pump it kicked waited for the runtime's monitor to take the P
// back and start another thread (tens to hundreds of microseconds on the
// first bytes after an idle spell, the whole of it on one P). Woken by the
// netpoller, the watcher and the pumps it kicks run on the P at once.
//
// Sockets are also in Go's netpoller (net.TCPConn); an fd may be in two
// epoll instances. Every epoll_ctl runs inside the RawConn.Control of both
// the socket and the epoll fd, so neither can be closed and its number
// reused meanwhile (a relay that comes late, after Close, gets an error).
type sockWatcher struct {
	file   *os.File // the epoll fd, in Go's netpoller; closing it ends run
	raw    syscall.RawConn
	closed atomic.Bool

	mu      sync.Mutex
	next    uint64
	waiting map[uint64]*pump

	// ctlMu serialises epoll_ctl calls, whose arguments and results go
	// through the fields below to callbacks made once (newSockWatcher):
	// closures made per call cost five allocations at every rearm, that
	// is at every request after a quiet spell.
	ctlMu              sync.Mutex
	ctlSock            syscall.RawConn
	ctlOp              int
	ctlEv              unix.EpollEvent
	ctlEpfd            uintptr
	ctlErr, ctlSockErr error
	ctlOuter           func(epfd uintptr)
	ctlInner           func(fd uintptr)
}

func newSockWatcher() (*sockWatcher, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create: %w", err)
	}
	// Nonblocking, os.NewFile puts it in the netpoller (epoll_wait
	// itself only ever runs with a zero timeout here).
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("epoll fd nonblocking: %w", err)
	}
	f := os.NewFile(uintptr(epfd), "relay-watcher")
	// NewFile leaves a file out of the netpoller when it cannot be put
	// there, silently; then run could not wait. Only a polled file takes
	// a deadline.
	if err := f.SetReadDeadline(time.Time{}); err != nil {
		f.Close()
		return nil, fmt.Errorf("epoll fd in the netpoller: %w", err)
	}
	raw, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("epoll fd in the netpoller: %w", err)
	}
	w := &sockWatcher{file: f, raw: raw, waiting: make(map[uint64]*pump)}
	w.ctlOuter = func(epfd uintptr) {
		w.ctlEpfd = epfd
		w.ctlSockErr = w.ctlSock.Control(w.ctlInner)
	}
	w.ctlInner = func(fd uintptr) { w.ctlErr = unix.EpollCtl(int(w.ctlEpfd), w.ctlOp, int(fd), &w.ctlEv) }
	return w, nil
}

func setToken(ev *unix.EpollEvent, t uint64) {
	ev.Fd = int32(uint32(t))
	ev.Pad = int32(uint32(t >> 32))
}

func eventToken(ev *unix.EpollEvent) uint64 {
	return uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
}

const watchEvents = unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT

// add watches rc for p. The registration's token is stored in *token
// under the watcher's lock, before the socket is armed: the goroutine an
// event starts sees it.
func (w *sockWatcher) add(rc syscall.RawConn, p *pump, token *uint64) error {
	w.mu.Lock()
	w.next++
	t := w.next
	w.waiting[t] = p
	*token = t
	w.mu.Unlock()
	if err := w.ctl(rc, unix.EPOLL_CTL_ADD, t); err != nil {
		w.mu.Lock()
		delete(w.waiting, t)
		*token = 0
		w.mu.Unlock()
		return err
	}
	return nil
}

// rearm watches rc again after its event fired.
func (w *sockWatcher) rearm(rc syscall.RawConn, t uint64) error {
	return w.ctl(rc, unix.EPOLL_CTL_MOD, t)
}

// forget drops token t (0: never added). The socket itself leaves the
// epoll set when it is closed, which its relay does next: no epoll_ctl.
// An event already taken for it finds no pump and is ignored.
func (w *sockWatcher) forget(t uint64) {
	if t == 0 {
		return
	}
	w.mu.Lock()
	delete(w.waiting, t)
	w.mu.Unlock()
}

func (w *sockWatcher) ctl(rc syscall.RawConn, op int, t uint64) error {
	w.ctlMu.Lock()
	defer w.ctlMu.Unlock()
	w.ctlSock, w.ctlOp, w.ctlErr, w.ctlSockErr = rc, op, nil, nil
	w.ctlEv = unix.EpollEvent{Events: watchEvents}
	setToken(&w.ctlEv, t)
	werr := w.raw.Control(w.ctlOuter)
	err, serr := w.ctlErr, w.ctlSockErr
	w.ctlSock = nil // holds no socket past the call
	switch {
	case werr != nil:
		return werr
	case serr != nil:
		return serr
	}
	return err
}

// run kicks the pump of each socket that became readable until close. It
// returns nil after close, else why it could not wait any more.
func (w *sockWatcher) run() error {
	events := make([]unix.EpollEvent, 128)
	var n int
	var werr error
	// Made once; false asks the netpoller to wait for the epoll fd.
	take := func(fd uintptr) bool {
		for {
			n, werr = unix.EpollWait(int(fd), events, 0)
			if werr != unix.EINTR {
				return werr != nil || n > 0
			}
		}
	}
	for {
		if err := w.raw.Read(take); err != nil {
			if w.closed.Load() {
				return nil
			}
			return fmt.Errorf("wait for the epoll fd: %w", err)
		}
		if werr != nil {
			return fmt.Errorf("epoll_wait: %w", werr)
		}
		for i := range events[:n] {
			t := eventToken(&events[i])
			w.mu.Lock()
			p := w.waiting[t]
			w.mu.Unlock()
			if p != nil {
				p.kick()
			}
		}
	}
}

// close ends run and then releases the epoll instance (the netpoller
// closes the fd once run's wait let go of it).
func (w *sockWatcher) close() {
	w.closed.Store(true)
	w.file.Close()
}
