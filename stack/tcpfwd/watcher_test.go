package tcpfwd

import (
	"net"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
)

// kickDir is a pump direction that reports each run on ran and its going
// idle (the pump's state is idle by then) on idled.
type kickDir struct{ ran, idled chan struct{} }

func newKickDir() *kickDir {
	return &kickDir{ran: make(chan struct{}, 4), idled: make(chan struct{}, 4)}
}

func (d *kickDir) drain() bool    { d.ran <- struct{}{}; return false }
func (d *kickDir) idle() bool     { d.idled <- struct{}{}; return true }
func (d *kickDir) end()           {}
func (d *kickDir) panicked(v any) { panic(v) }

// await fails t unless c delivers within 5s.
func await(t *testing.T, c <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-c:
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: nothing within 5s", what)
	}
}

// watched is a socket the watcher watches for a kickDir pump.
type watched struct {
	d     *kickDir
	p     *pump
	raw   syscall.RawConn
	token uint64
	peer  *net.TCPConn // writes to the watched socket
}

func watch(t *testing.T, w *sockWatcher) *watched {
	t.Helper()
	a, b := netnstest.LoopbackTCP(t)
	raw, err := a.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	x := &watched{d: newKickDir(), raw: raw, peer: b}
	x.p = &pump{dir: x.d}
	if err := w.add(raw, x.p, &x.token); err != nil {
		t.Fatal(err)
	}
	if x.token == 0 {
		t.Fatal("add left the token 0")
	}
	return x
}

// TestWatcherKicksReadableSockets: a watched socket's pump is kicked when
// data comes, once per arming (one-shot), and again after a rearm; the
// watcher waits in Go's netpoller (not in a blocking system call, which
// would keep the scheduler's P from the pumps it kicks), and close ends it.
func TestWatcherKicksReadableSockets(t *testing.T) {
	w, err := newSockWatcher()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- w.run() }()

	a := watch(t, w)
	a.peer.Write([]byte("x"))
	await(t, a.d.ran, "first bytes: the pump's run")
	await(t, a.d.idled, "first bytes: the pump going idle")

	// a's watch fired and is not rearmed: more data must not kick it.
	// b's bytes come after, and the watcher kicks in the order epoll
	// reports, first in first out: by b's run, a kick for a would have
	// happened, and a's pump would be running or have run.
	a.peer.Write([]byte("y"))
	b := watch(t, w)
	b.peer.Write([]byte("z"))
	await(t, b.d.ran, "second socket's bytes")
	if st := a.p.state.Load(); st != pumpIdle || len(a.d.ran) != 0 {
		t.Fatalf("a one-shot watch kicked again before its rearm (state %d, runs %d)", st, len(a.d.ran))
	}

	if err := w.rearm(a.raw, a.token); err != nil {
		t.Fatal(err)
	}
	await(t, a.d.ran, "after the rearm, with bytes unread")

	// Between events the watcher waits in the netpoller: "IO wait".
	deadline := time.Now().Add(5 * time.Second)
	for !watcherInIOWait() {
		if time.Now().After(deadline) {
			t.Fatal("the watcher's goroutine is not waiting in the netpoller ([IO wait])")
		}
		runtime.Gosched()
	}

	w.forget(a.token)
	w.forget(b.token)
	w.close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run after close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("run did not return after close")
	}
}

// watcherInIOWait reports whether a goroutine in sockWatcher.run waits in
// the netpoller.
func watcherInIOWait() bool {
	buf := make([]byte, 1<<20)
	for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
		if strings.Contains(g, "sockWatcher).run") {
			return strings.Contains(strings.SplitN(g, "\n", 2)[0], "[IO wait")
		}
	}
	return false
}

// TestWatcherRearmAllocatesNothing: a rearm, made by every relay direction
// that goes idle, so after every quiet spell, allocates nothing.
func TestWatcherRearmAllocatesNothing(t *testing.T) {
	w, err := newSockWatcher()
	if err != nil {
		t.Fatal(err)
	}
	defer w.close()
	a := watch(t, w) // not run: no event is taken, the arming is all
	if n := testing.AllocsPerRun(100, func() {
		if err := w.rearm(a.raw, a.token); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("a rearm allocates %v times", n)
	}
}
