package tcpfwd

import (
	"context"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/tunfw/tunfw/stack/dial"
)

// loopbackPair returns a socket of tunfw's own (dial.Conn) connected to
// the returned peer on loopback.
func loopbackPair(t *testing.T, ln *net.TCPListener) (*dial.Conn, *net.TCPConn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := dial.New(dial.Outbound{}).DialTCP(ctx, ln.Addr().(*net.TCPAddr).AddrPort())
	if err != nil {
		t.Fatal(err)
	}
	p, err := ln.AcceptTCP()
	if err != nil {
		c.Close()
		t.Fatal(err)
	}
	return c, p
}

// isClosed reports whether c was closed: its descriptor is gone.
func isClosed(c *dial.Conn) bool { return c.SyscallConn().Control(func(uintptr) {}) != nil }

// TestSockCloser: sockets handed to the closer are closed (the peer reads
// EOF) without anything else happening; past closeBatchMax waiting, and
// once the closer is closed, a socket is closed before add returns, and
// close closes those waiting.
func TestSockCloser(t *testing.T) {
	ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:0")))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c := newSockCloser()
	defer c.close()

	var peers []*net.TCPConn
	for range 3 {
		s, p := loopbackPair(t, ln)
		defer p.Close()
		peers = append(peers, p)
		c.add(s)
	}
	for i, p := range peers {
		p.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := p.Read(make([]byte, 1)); n != 0 || err != io.EOF {
			t.Fatalf("peer %d read %d, %v; want EOF from the closed socket", i, n, err)
		}
	}

	// A full batch: the next socket does not wait.
	done, _ := loopbackPair(t, ln)
	done.Close()
	c.mu.Lock()
	c.timer.Stop()
	for len(c.pending) < closeBatchMax {
		c.pending = append(c.pending, done)
	}
	c.armed = true
	c.mu.Unlock()
	s, p := loopbackPair(t, ln)
	defer p.Close()
	c.add(s)
	if !isClosed(s) {
		t.Errorf("a socket added to %d waiting is still open", closeBatchMax)
	}

	waiting, p2 := loopbackPair(t, ln)
	defer p2.Close()
	c.mu.Lock()
	c.pending = append(c.pending[:0], waiting)
	c.mu.Unlock()
	c.close()
	if !isClosed(waiting) {
		t.Error("close left a waiting socket open")
	}
	late, p3 := loopbackPair(t, ln)
	defer p3.Close()
	c.add(late)
	if !isClosed(late) {
		t.Error("a socket added after close is still open")
	}
}
