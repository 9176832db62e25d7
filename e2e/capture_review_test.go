package e2e

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
)

// Review of host capture (issue 11): connections that are busy while
// tunfw starts and restarts.

// stream is one TCP connection that carries data both ways all the time,
// paced, so that packets of it are in flight at any moment (an admin's
// session printing output, a running download or upload).
type stream struct {
	name string
	// got counts the bytes each end has read: [0] the dialling end, [1]
	// the accepting end.
	got  [2]atomic.Int64
	mu   sync.Mutex
	err  error
	stop chan struct{}
}

func (s *stream) fail(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.mu.Unlock()
}

func (s *stream) failed() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// pump writes a chunk every few milliseconds to c and reads everything
// that arrives, until s.stop is closed.
func (s *stream) pump(c net.Conn, end int) {
	go func() {
		chunk := make([]byte, 32<<10)
		tick := time.NewTicker(4 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-tick.C:
			}
			c.SetWriteDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Write(chunk); err != nil {
				s.fail(fmt.Errorf("write by end %d: %w", end, err))
				return
			}
		}
	}()
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := c.Read(buf)
			s.got[end].Add(int64(n))
			if err != nil {
				select {
				case <-s.stop:
				default:
					if err != io.EOF {
						s.fail(fmt.Errorf("read by end %d: %w", end, err))
					} else {
						s.fail(fmt.Errorf("end %d: EOF", end))
					}
				}
				return
			}
		}
	}()
}

// openStream connects from client to server's listener at addr and keeps
// data flowing both ways until the test ends.
func openStream(t *testing.T, name string, server *netnstest.NS, client *netnstest.NS, addr string) *stream {
	t.Helper()
	ln, err := server.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	s := &stream{name: name, stop: make(chan struct{})}
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		ln.Close()
		if err != nil {
			s.fail(err)
			close(accepted)
			return
		}
		accepted <- c
	}()
	c, err := client.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		ln.Close()
		t.Fatalf("%s: dial %s: %v", name, addr, err)
	}
	a, ok := <-accepted
	if !ok {
		t.Fatalf("%s: accept: %v", name, s.failed())
	}
	t.Cleanup(func() {
		close(s.stop)
		c.Close()
		a.Close()
	})
	s.pump(c, 0)
	s.pump(a, 1)
	return s
}

// flowing checks that s had no error and that both ends read more data
// within d.
func (s *stream) flowing(d time.Duration) error {
	if err := s.failed(); err != nil {
		return err
	}
	before := [2]int64{s.got[0].Load(), s.got[1].Load()}
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if err := s.failed(); err != nil {
			return err
		}
		if s.got[0].Load() > before[0] && s.got[1].Load() > before[1] {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("stalled: no data within %v (read %d and %d bytes so far)", d, s.got[0].Load(), s.got[1].Load())
}

// TestCaptureBusyPreexisting: connections that carry data at the moment
// tunfw starts (an upload, a download, an admin's session printing
// output), inbound and outbound, IPv4 and IPv6, keep flowing through
// `up`, a clean stop and the next `up` (README: "Connections open when
// tunfw starts ... keep working, unjudged").
func TestCaptureBusyPreexisting(t *testing.T) {
	requireNft(t)
	topo := newCaptureTopo(t)
	host := topo.Host
	var streams []*stream
	port := uint16(9500)
	for _, fam := range []struct {
		name         string
		host, server netip.Addr
	}{{"v4", topo.HostV4, topo.ServiceV4}, {"v6", topo.HostV6, topo.ServiceV6}} {
		streams = append(streams,
			openStream(t, "inbound "+fam.name, host, topo.Server, hostPort(fam.host, port)),
			openStream(t, "outbound "+fam.name, topo.Server, host, hostPort(fam.server, port+1)))
		port += 2
	}
	check := func(when string) {
		t.Helper()
		for _, s := range streams {
			if err := s.flowing(3 * time.Second); err != nil {
				t.Fatalf("%s stream opened before up, %s: %v", s.name, when, err)
			}
		}
	}
	check("before up")
	cfg := captureCfg(t, "open")
	// Each start races the streams' packets; a few rounds make a race
	// that cuts them show.
	for round := 1; round <= 3; round++ {
		fw := startTunfw(t, host, cfg)
		check(fmt.Sprintf("after up (round %d)", round))
		// Long enough for the windows to move far past where they were
		// when tunfw started.
		time.Sleep(time.Second)
		check(fmt.Sprintf("a second after up (round %d)", round))
		if code := fw.stop(); code != 0 {
			t.Fatalf("exit code %d after SIGTERM", code)
		}
		check(fmt.Sprintf("after a stop (round %d)", round))
	}
}

// TestCaptureGuardRefresh: with fail = "open" the output filter depends on
// an element tunfw refreshes every second. A tunfw that was stalled for
// longer than the element lives (SIGSTOP for 7 s) refuses bound sockets
// again once it runs; and when the refresh fails (the table was deleted
// by hand) the log says so.
func TestCaptureGuardRefresh(t *testing.T) {
	requireNft(t)
	topo := newCaptureTopo(t)
	host := topo.Host
	startHTTP(t, topo.Server, netip.AddrPortFrom(topo.ServiceV4, 8080))
	url := urlOf(topo.ServiceV4, 8080)
	bound := func() (int, string) {
		rc, out, _ := curlAs(host, "--interface", topo.HostIf, url)
		return rc, out
	}
	cfg := captureCfg(t, "open")
	fw := startTunfw(t, host, cfg)
	if rc, out := bound(); rc != 7 {
		t.Fatalf("bound curl while tunfw runs: rc %d, want 7\n%s", rc, out)
	}
	fw.cmd.Process.Signal(syscall.SIGSTOP)
	stopped := true
	t.Cleanup(func() {
		if stopped {
			fw.cmd.Process.Signal(syscall.SIGCONT)
		}
	})
	// The element times out 5 s after the last refresh.
	if err := eventually(8*time.Second, func() error {
		if rc, out := bound(); rc != 0 {
			return fmt.Errorf("rc %d: %s", rc, out)
		}
		return nil
	}); err != nil {
		t.Fatalf("tunfw stopped: the element did not time out: bound curl %v", err)
	}
	fw.cmd.Process.Signal(syscall.SIGCONT)
	stopped = false
	if err := eventually(3*time.Second, func() error {
		if rc, out := bound(); rc != 7 {
			return fmt.Errorf("rc %d: %s", rc, out)
		}
		return nil
	}); err != nil {
		t.Errorf("tunfw running again after a stall: bound sockets are not refused again: %v", err)
	}
	host.Run(t, "nft", "delete", "table", "inet", "tunfw")
	fw.waitLog(t, 5*time.Second, "cannot refresh the nftables table")
}
