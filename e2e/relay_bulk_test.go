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
	fw := startTunfw(t, topo.Host, writeConfig(t, bulkConfig))
	data := make([]byte, 24<<20)
	rng := rand.New(rand.NewPCG(seed, seed+4))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	return topo, fw, data
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
	size := len(data)
	for _, svc := range []netip.Addr{topo.ServiceV4, topo.ServiceV6} {
		t.Run(map[bool]string{false: "v4", true: "v6"}[svc.Is6()], func(t *testing.T) {
			at := netip.AddrPortFrom(svc, 9500)
			ln, err := topo.Server.Listen("tcp", at.String())
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			served := make(chan error, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					served <- err
					return
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(60 * time.Second))
				// A few small writes first (the relay's small
				// buffers), then the rest at once (bulk).
				for i := 0; i < 8; i++ {
					if _, err := c.Write(data[i*100 : (i+1)*100]); err != nil {
						served <- err
						return
					}
				}
				_, err = c.Write(data[800:])
				served <- err
			}()
			c, err := topo.Host.DialTimeout("tcp", at.String(), 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.(*net.TCPConn).SetReadBuffer(64 << 10)
			c.SetDeadline(time.Now().Add(60 * time.Second))
			// Read a little, then stop until the server is blocked:
			// its write cannot finish while tunfw waits for room.
			head := make([]byte, 800)
			if _, err := io.ReadFull(c, head); err != nil {
				t.Fatalf("read the first bytes: %v", err)
			}
			select {
			case err := <-served:
				t.Fatalf("the server wrote %d bytes to a client that does not read (err %v): nothing filled", size, err)
			case <-time.After(500 * time.Millisecond):
			}
			rest, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("read the rest: %v", err)
			}
			got := append(head, rest...)
			if len(got) != size || !bytes.Equal(got, data) {
				t.Fatalf("got %d bytes, want %d; first difference at %d", len(got), size, firstDiff(got, data))
			}
			if err := <-served; err != nil {
				t.Fatalf("server: %v", err)
			}
		})
	}
}

// TestBulkToSlowServer is TestBulkToSlowClient the other way: the client
// sends 24 MiB and closes its side to a server that does not read for a
// while, so the destination's socket fills and the relay waits for room
// with the rest in the netstack. Small writes first (gathered in the relay
// buffer), then bulk (written straight from the netstack's buffers).
func TestBulkToSlowServer(t *testing.T) {
	topo, _, data := newBulkEnv(t, 13)
	size := len(data)
	for _, svc := range []netip.Addr{topo.ServiceV4, topo.ServiceV6} {
		t.Run(map[bool]string{false: "v4", true: "v6"}[svc.Is6()], func(t *testing.T) {
			at := netip.AddrPortFrom(svc, 9501)
			ln, err := topo.Server.Listen("tcp", at.String())
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			type result struct {
				got []byte
				err error
			}
			resume := make(chan struct{})
			received := make(chan result, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					received <- result{err: err}
					return
				}
				defer c.Close()
				c.(*net.TCPConn).SetReadBuffer(64 << 10)
				c.SetDeadline(time.Now().Add(60 * time.Second))
				head := make([]byte, 800)
				if _, err := io.ReadFull(c, head); err != nil {
					received <- result{err: err}
					return
				}
				// Stop reading until the client is blocked.
				<-resume
				rest, err := io.ReadAll(c)
				received <- result{append(head, rest...), err}
			}()
			c, err := topo.Host.DialTimeout("tcp", at.String(), 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.(*net.TCPConn).SetWriteBuffer(64 << 10)
			c.SetDeadline(time.Now().Add(60 * time.Second))
			sent := make(chan error, 1)
			go func() {
				for i := 0; i < 8; i++ {
					if _, err := c.Write(data[i*100 : (i+1)*100]); err != nil {
						sent <- err
						return
					}
				}
				if _, err := c.Write(data[800:]); err != nil {
					sent <- err
					return
				}
				sent <- c.(*net.TCPConn).CloseWrite()
			}()
			select {
			case err := <-sent:
				t.Fatalf("the client wrote %d bytes to a server that does not read (err %v): nothing filled", size, err)
			case <-time.After(500 * time.Millisecond):
			}
			close(resume) // the server reads on
			r := <-received
			if r.err != nil {
				t.Fatalf("server read: %v", r.err)
			}
			if len(r.got) != size || !bytes.Equal(r.got, data) {
				t.Fatalf("server got %d bytes, want %d; first difference at %d", len(r.got), size, firstDiff(r.got, data))
			}
			if err := <-sent; err != nil {
				t.Fatalf("client: %v", err)
			}
		})
	}
}

// TestBulkUrgentByte: a server that sends an urgent byte (MSG_OOB, as
// telnet and FTP's ABOR do) in the middle of a bulk transfer. tunfw's
// socket does not take urgent data inline, so the client gets the stream
// without it, all of it and in order, and the relay neither spins nor
// stalls at the urgent mark (the kernel's count of readable bytes stops
// short of it while a peek already skips it: the relay spun there, until
// something else moved the socket on). The client reads nothing
// until the server sent everything, so that the relay meets the mark with
// bytes behind it already queued and nothing more to come (met as they
// come, the kernel skips the byte itself).
func TestBulkUrgentByte(t *testing.T) {
	topo, fw, data := newBulkEnv(t, 19)
	half := 2 << 20
	data = data[:half+64<<10]
	for _, svc := range []netip.Addr{topo.ServiceV4, topo.ServiceV6} {
		t.Run(map[bool]string{false: "v4", true: "v6"}[svc.Is6()], func(t *testing.T) {
			at := netip.AddrPortFrom(svc, 9502)
			ln, err := topo.Server.Listen("tcp", at.String())
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			served := make(chan error, 1)
			urgent := make(chan struct{})
			go func() {
				c, err := ln.Accept()
				if err != nil {
					served <- err
					return
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(30 * time.Second))
				if _, err := c.Write(data[:half]); err != nil {
					served <- err
					return
				}
				rc, err := c.(*net.TCPConn).SyscallConn()
				if err != nil {
					served <- err
					return
				}
				var serr error
				if err := rc.Write(func(fd uintptr) bool {
					serr = unix.Sendto(int(fd), []byte{'!'}, unix.MSG_OOB, nil)
					return serr != unix.EAGAIN
				}); err != nil {
					served <- err
					return
				}
				if serr != nil {
					served <- fmt.Errorf("send the urgent byte: %w", serr)
					return
				}
				_, err = c.Write(data[half:])
				close(urgent)
				served <- err
			}()
			c, err := topo.Host.DialTimeout("tcp", at.String(), 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.(*net.TCPConn).SetReadBuffer(64 << 10)
			c.SetDeadline(time.Now().Add(20 * time.Second))
			select {
			case <-urgent:
			case err := <-served:
				t.Fatalf("server ended before the urgent byte: %v", err)
			}
			cpu := cpuTime(t, fw.cmd.Process.Pid)
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("read after %d bytes: %v", len(got), err)
			}
			// Relaying 2 MiB costs a few milliseconds; a relay
			// spinning at the mark burnt a second or more.
			if spent := cpuTime(t, fw.cmd.Process.Pid) - cpu; spent > 500*time.Millisecond {
				t.Errorf("tunfw spent %v of CPU relaying %d bytes: the relay spun at the urgent mark", spent, len(got))
			}
			if len(got) != len(data) || !bytes.Equal(got, data) {
				t.Fatalf("got %d bytes, want %d without the urgent byte; first difference at %d", len(got), len(data), firstDiff(got, data))
			}
			if err := <-served; err != nil {
				t.Fatalf("server: %v", err)
			}
		})
	}
}
