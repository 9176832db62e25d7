package tcpfwd

import (
	"net"
	"testing"
	"time"
)

// kickDir is a pump direction that reports each run on ran and then idles.
type kickDir struct{ ran chan struct{} }

func (d *kickDir) drain() bool    { d.ran <- struct{}{}; return false }
func (d *kickDir) idle() bool     { return true }
func (d *kickDir) end()           {}
func (d *kickDir) panicked(v any) { panic(v) }

// loopbackPair returns the two ends of a TCP connection on loopback.
func loopbackPair(t *testing.T) (a, b *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		c.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// TestWatcherKicksReadableSockets: a watched socket's pump is kicked when
// data comes, once per arming (one-shot), and again after a rearm; close
// ends the watcher's goroutine, which waits in Go's netpoller.
func TestWatcherKicksReadableSockets(t *testing.T) {
	w, err := newSockWatcher()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); w.run() }()

	a, b := loopbackPair(t)
	raw, err := a.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	d := &kickDir{ran: make(chan struct{}, 4)}
	p := &pump{dir: d}
	var token uint64
	if err := w.add(raw, p, &token); err != nil {
		t.Fatal(err)
	}
	if token == 0 {
		t.Fatal("add left the token 0")
	}
	kicked := func(what string) {
		t.Helper()
		select {
		case <-d.ran:
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: the pump was not kicked within 5s", what)
		}
	}
	b.Write([]byte("x"))
	kicked("first bytes")
	// The byte is still unread and the watch one-shot: no second kick
	// until rearmed. The pump went idle on its own (kickDir.idle).
	buf := make([]byte, 8)
	a.Read(buf)
	b.Write([]byte("y"))
	select {
	case <-d.ran:
		t.Fatal("kicked again before the rearm")
	case <-time.After(50 * time.Millisecond):
	}
	if err := w.rearm(raw, token); err != nil {
		t.Fatal(err)
	}
	kicked("after the rearm")
	w.forget(token)

	w.close()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("run did not return after close")
	}
}
