package e2e

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
	"golang.org/x/sys/unix"
)

// bulkConfig allows everything to the test topology's service prefixes.
const bulkConfig = `
[tun]
name = "tunfw0"
addresses = ["198.18.0.1/30", "fd54:756e:6677::1/126"]
[route]
include = ["203.0.113.0/24", "2001:db8:99::/48"]
[filter]
default = "allow"
`

// newBulkEnv starts tunfw with bulkConfig in a new topology and returns
// both with 24 MiB of a pseudo-random stream seeded with seed.
func newBulkEnv(t *testing.T, seed uint64) (*netnstest.Topology, *tunfwProc, []byte) {
	t.Helper()
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	// The slow-peer tests need the path's buffers to hold less than the
	// data: a namespace inherits the machine's tcp_rmem, and one of 32 MiB
	// (these VMs') let a socket's receive buffer, grown while the relay
	// read fast, take in all 24 MiB. Linux's default maximum (6 MiB)
	// keeps every buffer on the path well below it.
	for _, ns := range []*netnstest.NS{topo.Host, topo.Server} {
		ns.Run(t, "sysctl", "-qw", "net.ipv4.tcp_rmem=4096 131072 6291456", "net.ipv4.tcp_wmem=4096 16384 4194304")
	}
	fw := startTunfw(t, topo.Host, writeConfig(t, bulkConfig))
	data := make([]byte, 24<<20)
	rng := rand.New(rand.NewPCG(seed, seed+4))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	return topo, fw, data
}

// serveOne listens at at in ns and runs handle on the one connection it
// accepts, with a 60 s deadline, closing it after; the channel gets
// handle's error (or the accept's).
func serveOne(t *testing.T, ns *netnstest.NS, at netip.AddrPort, handle func(c *net.TCPConn) error) <-chan error {
	t.Helper()
	ln, err := ns.Listen("tcp", at.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(60 * time.Second))
		done <- handle(c.(*net.TCPConn))
	}()
	return done
}

// dialBulk connects from topo's host to at, with a 60 s deadline.
func dialBulk(t *testing.T, topo *netnstest.Topology, at netip.AddrPort) *net.TCPConn {
	t.Helper()
	c, err := topo.Host.DialTimeout("tcp", at.String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(60 * time.Second))
	return c.(*net.TCPConn)
}

// smallHead is how much writeSmallThenBulk writes in small pieces.
const smallHead = 800

// writeSmallThenBulk writes data's first smallHead bytes in writes of 100
// (the relay's small buffers), then the rest at once (its bulk path).
func writeSmallThenBulk(c net.Conn, data []byte) error {
	for i := 0; i < smallHead; i += 100 {
		if _, err := c.Write(data[i : i+100]); err != nil {
			return err
		}
	}
	_, err := c.Write(data[smallHead:])
	return err
}

// expectStalled fails t when done reports before the writer it watches
// had time to fill every buffer on its way and block: the peer has not
// read yet.
func expectStalled(t *testing.T, done <-chan error, who string, size int) {
	t.Helper()
	select {
	case err := <-done:
		t.Fatalf("the %s wrote %d bytes to a peer that does not read (err %v): nothing filled", who, size, err)
	case <-time.After(500 * time.Millisecond):
	}
}

// checkSame fails t unless got is want.
func checkSame(t *testing.T, got, want []byte, what string) {
	t.Helper()
	if len(got) != len(want) || !bytes.Equal(got, want) {
		t.Fatalf("%s %d bytes, want %d; first difference at %d", what, len(got), len(want), firstDiff(got, want))
	}
}

// TestBulkToSlowClient: a server sends 24 MiB and closes to a client that
// does not read for a while, so that the client's window and the netstack's
// send buffer fill and the relay has to wait for room with the server's
// bytes still queued in its socket; then the client reads everything. Every
// byte arrives once and in order, and the server's close arrives as EOF.
// Both ways of moving the server's bytes run: small reads through a relay
// buffer first, then the bulk path straight from the socket into the
// netstack.
func TestBulkToSlowClient(t *testing.T) {
	topo, _, data := newBulkEnv(t, 7)
	topoFamilies(t, topo, func(t *testing.T, svc netip.Addr) {
		at := netip.AddrPortFrom(svc, 9500)
		served := serveOne(t, topo.Server, at, func(c *net.TCPConn) error { return writeSmallThenBulk(c, data) })
		c := dialBulk(t, topo, at)
		c.SetReadBuffer(64 << 10)
		// Read a little, then stop until the server is blocked: its
		// write cannot finish while tunfw waits for room.
		head := make([]byte, smallHead)
		if _, err := io.ReadFull(c, head); err != nil {
			t.Fatalf("read the first bytes: %v", err)
		}
		expectStalled(t, served, "server", len(data))
		rest, err := io.ReadAll(c)
		if err != nil {
			t.Fatalf("read the rest: %v", err)
		}
		checkSame(t, append(head, rest...), data, "client got")
		if err := <-served; err != nil {
			t.Fatalf("server: %v", err)
		}
	})
}

// TestBulkToSlowServer is TestBulkToSlowClient the other way: the client
// sends 24 MiB and closes its side to a server that does not read for a
// while, so the destination's socket fills and the relay waits for room
// with the rest in the netstack. Small writes first, then bulk.
func TestBulkToSlowServer(t *testing.T) {
	topo, _, data := newBulkEnv(t, 13)
	topoFamilies(t, topo, func(t *testing.T, svc netip.Addr) {
		at := netip.AddrPortFrom(svc, 9501)
		resume := make(chan struct{})
		var got []byte
		served := serveOne(t, topo.Server, at, func(c *net.TCPConn) error {
			c.SetReadBuffer(64 << 10)
			head := make([]byte, smallHead)
			if _, err := io.ReadFull(c, head); err != nil {
				return err
			}
			// Stop reading until the client is blocked.
			<-resume
			rest, err := io.ReadAll(c)
			got = append(head, rest...)
			return err
		})
		c := dialBulk(t, topo, at)
		c.SetWriteBuffer(64 << 10)
		sent := make(chan error, 1)
		go func() {
			if err := writeSmallThenBulk(c, data); err != nil {
				sent <- err
				return
			}
			sent <- c.CloseWrite()
		}()
		expectStalled(t, sent, "client", len(data))
		close(resume) // the server reads on
		if err := <-served; err != nil {
			t.Fatalf("server read: %v", err)
		}
		checkSame(t, got, data, "server got")
		if err := <-sent; err != nil {
			t.Fatalf("client: %v", err)
		}
	})
}

// TestBulkUrgentByte: a server sends an urgent byte (MSG_OOB, as telnet
// and FTP's ABOR do) in the middle of a bulk transfer. tunfw's socket does
// not take urgent data inline, so the client gets the stream without it,
// whole and in order. At the urgent mark the kernel's count of readable
// bytes (SIOCINQ) stops short of the byte while a peek already skips it; a
// relay trusting the two spun there. The client reads nothing until the
// server sent everything, so that the relay meets the mark with bytes
// behind it already queued and nothing more to come (met as they come,
// the kernel skips the byte itself).
func TestBulkUrgentByte(t *testing.T) {
	topo, fw, data := newBulkEnv(t, 19)
	half := 2 << 20
	data = data[:half+64<<10]
	topoFamilies(t, topo, func(t *testing.T, svc netip.Addr) {
		at := netip.AddrPortFrom(svc, 9502)
		sentAll := make(chan struct{})
		served := serveOne(t, topo.Server, at, func(c *net.TCPConn) error {
			if _, err := c.Write(data[:half]); err != nil {
				return err
			}
			rc, err := c.SyscallConn()
			if err != nil {
				return err
			}
			var serr error
			if err := rc.Write(func(fd uintptr) bool {
				serr = unix.Sendto(int(fd), []byte{'!'}, unix.MSG_OOB, nil)
				return serr != unix.EAGAIN
			}); err != nil {
				return err
			}
			if serr != nil {
				return fmt.Errorf("send the urgent byte: %w", serr)
			}
			_, err = c.Write(data[half:])
			close(sentAll)
			return err
		})
		c := dialBulk(t, topo, at)
		c.SetReadBuffer(64 << 10)
		select {
		case <-sentAll:
		case err := <-served:
			// sentAll is closed just before a server that sent
			// everything returns; select may see either first.
			select {
			case <-sentAll:
			default:
				t.Fatalf("server ended before it sent everything: %v", err)
			}
			reported := make(chan error, 1)
			reported <- err
			served = reported
		}
		cpu := cpuTime(t, fw.cmd.Process.Pid)
		got, err := io.ReadAll(c)
		if err != nil {
			t.Fatalf("read after %d bytes: %v", len(got), err)
		}
		// Relaying 2 MiB costs a few milliseconds; the relay spinning
		// at the mark burnt 510-690 ms.
		if spent := cpuTime(t, fw.cmd.Process.Pid) - cpu; spent > 200*time.Millisecond {
			t.Errorf("tunfw spent %v of CPU relaying %d bytes: the relay spun at the urgent mark", spent, len(got))
		}
		checkSame(t, got, data, "client got (without the urgent byte)")
		if err := <-served; err != nil {
			t.Fatalf("server: %v", err)
		}
	})
}
