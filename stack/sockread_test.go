package stack

import (
	"errors"
	"net"
	"syscall"
	"testing"
)

// TestSockReader checks the relays' socket read: data lands in a buffer
// taken for it, an empty socket holds no buffer, EOF and a reset are told
// apart, and a read allocates nothing.
func TestSockReader(t *testing.T) {
	peer, raw := loopbackTCP(t)

	held := 0 // buffers taken and not given back
	buf := make([]byte, 64)
	var r sockReader
	r.init(func() *[]byte { held++; return &buf }, func(*[]byte) { held-- }, 0)

	// Empty: nothing read, no buffer held.
	if err := raw.Control(r.readNow); err != nil || r.bp != nil || r.err != nil || held != 0 {
		t.Fatalf("empty socket: bp %v, err %v, control %v, %d buffers held", r.bp, r.err, err, held)
	}
	// Data, waiting for it in the netpoller.
	r.wait = true
	peer.Write([]byte("hello"))
	if err := raw.Read(r.read); err != nil || r.bp == nil || string((*r.bp)[:r.n]) != "hello" {
		t.Fatalf("read: %q, err %v / %v", buf[:r.n], r.err, err)
	}
	held--
	if raceEnabled {
		t.Skip("allocation counts are meaningless under -race; make test checks them without it")
	}
	if n := testing.AllocsPerRun(50, func() {
		peer.Write([]byte("x"))
		raw.Read(r.read)
		held--
	}); n != 0 {
		t.Errorf("a read allocates %v times", n)
	}
	// EOF: a buffer with nothing in it.
	peer.CloseWrite()
	if err := raw.Read(r.read); err != nil || r.bp == nil || r.n != 0 || r.err != nil {
		t.Fatalf("after the peer's FIN: n %d, err %v / %v; want EOF (n 0)", r.n, r.err, err)
	}
	held--
	// A reset (on a second connection): the error, no buffer.
	peer, raw = loopbackTCP(t)
	peer.SetLinger(0)
	peer.Close()
	if err := raw.Read(r.read); err != nil || !errors.Is(r.err, syscall.ECONNRESET) || r.bp != nil {
		t.Fatalf("after the peer's reset: err %v / %v, bp %v; want ECONNRESET and no buffer", r.err, err, r.bp)
	}
	if held != 0 {
		t.Errorf("%d buffers not given back", held)
	}
}

// loopbackTCP returns the accepting end of a loopback TCP connection and
// the raw connection of the dialling end; both close with the test.
func loopbackTCP(t *testing.T) (*net.TCPConn, syscall.RawConn) {
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
	t.Cleanup(func() { c.Close() })
	a, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	return a.(*net.TCPConn), raw
}
