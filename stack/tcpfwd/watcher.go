package tcpfwd

import (
	"errors"
	"fmt"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// sockWatcher waits for idle relay sockets to become readable, for all of
// them in one goroutine, so that an idle TCP flow holds no goroutine of its
// own (each would keep a stack). A socket is watched one-shot: its event
// kicks its pump, which reads until the socket would block and then arms
// the watch again.
//
// Sockets are also in Go's netpoller (net.TCPConn); an fd may be in two
// epoll instances. Every epoll_ctl runs inside RawConn.Control, so the fd
// cannot be closed and its number reused meanwhile.
type sockWatcher struct {
	epfd   int
	wakefd int // eventfd that ends run

	mu      sync.Mutex
	next    uint64
	waiting map[uint64]*pump
}

// wakeToken is the event data of wakefd; socket tokens start at 1.
const wakeToken = 0

func newSockWatcher() (*sockWatcher, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create: %w", err)
	}
	wakefd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN}
	setToken(&ev, wakeToken)
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wakefd, &ev); err != nil {
		unix.Close(epfd)
		unix.Close(wakefd)
		return nil, fmt.Errorf("epoll_ctl add eventfd: %w", err)
	}
	return &sockWatcher{epfd: epfd, wakefd: wakefd, waiting: make(map[uint64]*pump)}, nil
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
	var err error
	ev := unix.EpollEvent{Events: watchEvents}
	setToken(&ev, t)
	if cerr := rc.Control(func(fd uintptr) { err = unix.EpollCtl(w.epfd, op, int(fd), &ev) }); cerr != nil {
		return cerr
	}
	return err
}

// run kicks the pump of each socket that became readable until close.
// It blocks an OS thread in epoll_wait, as the netpoller does.
func (w *sockWatcher) run() {
	events := make([]unix.EpollEvent, 128)
	for {
		n, err := unix.EpollWait(w.epfd, events, -1)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return
		}
		for i := range events[:n] {
			t := eventToken(&events[i])
			if t == wakeToken {
				return
			}
			w.mu.Lock()
			p := w.waiting[t]
			w.mu.Unlock()
			if p != nil {
				p.kick()
			}
		}
	}
}

// wake ends run.
func (w *sockWatcher) wake() {
	var one [8]byte
	one[0] = 1 // any non-zero value wakes
	unix.Write(w.wakefd, one[:])
}

// close releases the epoll instance once run has returned.
func (w *sockWatcher) close() {
	unix.Close(w.epfd)
	unix.Close(w.wakefd)
}
