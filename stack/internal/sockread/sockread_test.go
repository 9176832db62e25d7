package sockread

import (
	"errors"
	"net"
	"syscall"
	"testing"

	"github.com/tunfw/tunfw/internal/netnstest"
	"github.com/tunfw/tunfw/stack/internal/race"
)

// TestSockReader checks the relays' socket read: data lands in a buffer
// taken for it, an empty socket holds no buffer, EOF and a reset are told
// apart, and a read allocates nothing.
func TestSockReader(t *testing.T) {
	peer, raw := loopbackTCP(t)

	held := 0 // buffers taken and not given back
	buf := make([]byte, 64)
	var r Reader
	r.Init(func() *[]byte { held++; return &buf }, func(*[]byte) { held-- }, 0)

	// Empty: nothing read, no buffer held.
	if err := raw.Control(r.ReadNow); err != nil || r.BP != nil || r.Err != nil || held != 0 {
		t.Fatalf("empty socket: bp %v, err %v, control %v, %d buffers held", r.BP, r.Err, err, held)
	}
	// Data, waiting for it in the netpoller.
	r.Wait = true
	peer.Write([]byte("hello"))
	if err := raw.Read(r.Read); err != nil || r.BP == nil || string((*r.BP)[:r.N]) != "hello" {
		t.Fatalf("read: %q, err %v / %v", buf[:r.N], r.Err, err)
	}
	held--
	if race.Enabled {
		t.Skip("allocation counts are meaningless under -race; make test checks them without it")
	}
	if n := testing.AllocsPerRun(50, func() {
		peer.Write([]byte("x"))
		raw.Read(r.Read)
		held--
	}); n != 0 {
		t.Errorf("a read allocates %v times", n)
	}
	// EOF: a buffer with nothing in it.
	peer.CloseWrite()
	if err := raw.Read(r.Read); err != nil || r.BP == nil || r.N != 0 || r.Err != nil {
		t.Fatalf("after the peer's FIN: n %d, err %v / %v; want EOF (n 0)", r.N, r.Err, err)
	}
	held--
	// A reset (on a second connection): the error, no buffer.
	peer, raw = loopbackTCP(t)
	peer.SetLinger(0)
	peer.Close()
	if err := raw.Read(r.Read); err != nil || !errors.Is(r.Err, syscall.ECONNRESET) || r.BP != nil {
		t.Fatalf("after the peer's reset: err %v / %v, bp %v; want ECONNRESET and no buffer", r.Err, err, r.BP)
	}
	if held != 0 {
		t.Errorf("%d buffers not given back", held)
	}
}

// loopbackTCP returns the accepting end of a loopback TCP connection and
// the raw connection of the dialling end; both close with the test.
func loopbackTCP(t *testing.T) (*net.TCPConn, syscall.RawConn) {
	t.Helper()
	c, a := netnstest.LoopbackTCP(t)
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	return a, raw
}
