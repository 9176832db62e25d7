package e2e

// Hostile clients of peeked flows (rules by name): a flood of silent
// clients past [inspect] max_pending while a transfer runs, a tuple reused
// while its connection is still being read, and segments forged into a
// connection whose ClientHello is half read.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	endian "encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/internal/netnstest"
)

// peekMaxPending is [inspect] max_pending in peekHostileConfig: small, so
// a few hundred silent clients are far past it.
const peekMaxPending = 16

// peekHostileConfig peeks TCP 443, where only the good.example names are
// let through (a catch-all rule denies the rest, silently), and TCP 80,
// where bad.example is denied and the default allows the rest. Port 9100
// (the transfer) has no rule by name: it is never peeked. A silent client
// holds its peek for 4 s, longer than any step of the tests, so the slots
// it takes stay taken until the test lets them go.
var peekHostileConfig = namesBase + fmt.Sprintf(`
[filter]
default = "allow"
log = "deny"

[inspect]
timeout = "4s"
max_pending = %d

[limits]
tcp_handshake = "3s"
tcp_closing = "2s"

[[rule]]
name = "good"
action = "allow"
proto = "tcp"
dst_port = 443
domain = ["good.example", "*.good.example"]

[[rule]]
name = "only-good"
action = "deny"
proto = "tcp"
dst_port = 443

[[rule]]
name = "bad"
action = "deny"
proto = "tcp"
dst_port = 80
domain = "bad.example"
`, peekMaxPending)

type peekEnv struct {
	topo *netnstest.Topology
	ca   *testCA
	svc  netip.Addr
	cfg  string
	fw   *tunfwProc
	pid  int
}

// newPeekEnv starts tunfw with peekHostileConfig; the tests start the
// servers they need on the Server's IPv4 service address.
func newPeekEnv(t *testing.T) *peekEnv {
	t.Helper()
	netnstest.RequireRoot(t)
	e := &peekEnv{topo: netnstest.NewTopology(t), ca: newTestCA(t, webNames...)}
	e.svc = e.topo.ServiceV4
	e.cfg = writeConfig(t, peekHostileConfig)
	e.fw = startTunfw(t, e.topo.Host, e.cfg, "--log-level", "info")
	e.pid = e.fw.cmd.Process.Pid
	return e
}

// peekCounters are `tunfw stats --json`'s names counters (peek_busy, sni, ...).
func (e *peekEnv) peekCounters(t *testing.T) map[string]uint64 {
	t.Helper()
	return statsCounts(t, e.cfg, "names")
}

// flowFrom returns the TCP flow from the Host's client address and port
// to dst, if the table holds one.
func (e *peekEnv) flowFrom(t *testing.T, port uint16, dst netip.AddrPort) *filter.FlowInfo {
	t.Helper()
	src := netip.AddrPortFrom(namesClientV4, port)
	for _, f := range flowsJSON(t, e.cfg, "--proto", "tcp") {
		if f.Src == src && f.Dst == dst {
			return &f
		}
	}
	return nil
}

// peeking counts the flows whose name is being read (verdict "peek").
func (e *peekEnv) peeking(t *testing.T) int {
	t.Helper()
	n := 0
	for _, f := range flowsJSON(t, e.cfg, "--proto", "tcp") {
		if f.Verdict == "peek" {
			n++
		}
	}
	return n
}

// pollUntil calls cond every 10 ms until it returns nil or within has
// passed, and returns its last error.
func pollUntil(within time.Duration, cond func() error) error {
	deadline := time.Now().Add(within)
	for {
		err := cond()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// silentClients are non-blocking connects from the Host that never send a
// byte: each one that completes its handshake holds a peek.
type silentClients struct{ fds []int }

// openSilent starts n connects to at from the Host, from ports the kernel
// picks. The sockets are reset at cleanup if still open.
func openSilent(t *testing.T, ns *netnstest.NS, at netip.AddrPort, n int) *silentClients {
	t.Helper()
	s := &silentClients{}
	t.Cleanup(s.reset)
	err := ns.Do(func() error {
		for range n {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			s.fds = append(s.fds, fd)
			if err := unix.Connect(fd, &unix.SockaddrInet4{Addr: at.Addr().As4(), Port: int(at.Port())}); err != unix.EINPROGRESS {
				return fmt.Errorf("connect: %v", err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("silent clients to %s: %v", at, err)
	}
	return s
}

// states counts the clients whose handshake completed and those whose SYN
// was sent again (the first one went unanswered).
func (s *silentClients) states() (established, retransmitted int) {
	for _, fd := range s.fds {
		info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			continue
		}
		if info.State == tcpEstablished {
			established++
		}
		if info.Total_retrans > 0 || info.Retransmits > 0 {
			retransmitted++
		}
	}
	return
}

// reset closes every client with a RST (SO_LINGER 0), as a flooder that
// gives up does: no FIN left to retransmit.
func (s *silentClients) reset() {
	for _, fd := range s.fds {
		unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
		unix.Close(fd)
	}
	s.fds = nil
}

// requireSlotsFree checks that no peek slot is held: with no flow being
// peeked, max_pending new silent clients all complete their handshake at
// once (a leaked slot makes the last one wait for its SYN retransmission,
// counted peek_busy, until a probe's peek times out, 4 s), and then go.
func (e *peekEnv) requireSlotsFree(t *testing.T) {
	t.Helper()
	if err := pollUntil(3*time.Second, func() error {
		if n := e.peeking(t); n > 0 {
			return fmt.Errorf("%d flows still being peeked", n)
		}
		return nil
	}); err != nil {
		t.Fatalf("before probing the peek slots: %v", err)
	}
	busy := e.peekCounters(t)["peek_busy"]
	probe := openSilent(t, e.topo.Host, netip.AddrPortFrom(e.svc, 443), peekMaxPending)
	var est, re int
	err := pollUntil(2500*time.Millisecond, func() error {
		if est, re = probe.states(); est < peekMaxPending {
			return fmt.Errorf("%d of %d silent clients connected", est, peekMaxPending)
		}
		return nil
	})
	probe.reset()
	if err != nil {
		t.Fatalf("peek slots leaked: %v (%d SYNs retransmitted; peek_busy %d -> %d)", err, re, busy, e.peekCounters(t)["peek_busy"])
	}
	if re > 0 {
		// A slot held a moment longer (a relay's first pump) is fine;
		// one never given back is not.
		t.Logf("slot probe: %d of %d clients needed a SYN retransmission", re, peekMaxPending)
	}
}

// dialFrom connects from the Host's local port (0: any) to at within d,
// with SO_REUSEADDR, so a port whose connection was just reset can be
// bound again at once.
func dialFrom(ns *netnstest.NS, port uint16, at netip.AddrPort, d time.Duration) (*net.TCPConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	dl := net.Dialer{
		LocalAddr: &net.TCPAddr{Port: int(port)},
		Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
			}); err != nil {
				return err
			}
			return serr
		},
	}
	var c net.Conn
	err := ns.Do(func() (err error) {
		c, err = dl.DialContext(ctx, "tcp4", at.String())
		return err
	})
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// localPort is c's local port.
func localPort(c net.Conn) uint16 { return c.LocalAddr().(*net.TCPAddr).AddrPort().Port() }

// resetConn closes c with a RST.
func resetConn(c *net.TCPConn) {
	c.SetLinger(0)
	c.Close()
}

// tlsGet runs a TLS handshake for name over c and GETs / from the web
// server, within d; it returns the page.
func (e *peekEnv) tlsGet(c net.Conn, name string, d time.Duration) (string, error) {
	c.SetDeadline(time.Now().Add(d))
	tc := tls.Client(c, &tls.Config{ServerName: name, RootCAs: e.ca.pool, NextProtos: []string{"http/1.1"}})
	if err := tc.Handshake(); err != nil {
		return "", fmt.Errorf("TLS handshake for %s: %w", name, err)
	}
	return httpGet(tc, name)
}

// httpGet sends a GET / for name over c and returns the body.
func httpGet(c io.ReadWriter, name string) (string, error) {
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", name)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return "", fmt.Errorf("GET for %s: %w", name, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return string(body), err
}

// TestPeekSilentFlood: hundreds of clients connect to a peeked port and
// send nothing, far past [inspect] max_pending, while a transfer to a port
// without rules by name runs. At most max_pending of them get a handshake
// (a peek slot); the SYNs of the others are dropped unanswered (peek_busy)
// and retransmitted, as are those of a well-behaved client meanwhile: it
// sees a slow connect, never a reset, and gets through once slots free.
// The transfer keeps going, and everything drains once the flood ends.
func TestPeekSilentFlood(t *testing.T) {
	e := newPeekEnv(t)
	startStreamServer(t, e.topo.Server, netip.AddrPortFrom(e.svc, 9100))
	web := startWebServer(t, e.topo.Server, e.svc, e.ca)
	peeked := netip.AddrPortFrom(e.svc, 443)

	tr := startTransfer(t, e.topo.Host, netip.AddrPortFrom(e.svc, 9100))
	time.Sleep(300 * time.Millisecond) // past slow start
	before := tr.rate(700 * time.Millisecond)
	c0 := e.peekCounters(t)

	const floodN = 400
	flood := openSilent(t, e.topo.Host, peeked, floodN)
	start, t0 := tr.total.Load(), time.Now()
	// The slots fill at once: the handshakes tunfw completes are the
	// peeks it holds.
	if err := pollUntil(3*time.Second, func() error {
		if est, _ := flood.states(); est < peekMaxPending {
			return fmt.Errorf("%d flood clients connected, want max_pending (%d)", est, peekMaxPending)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	// A well-behaved TLS client while every slot is held.
	good := openSilent(t, e.topo.Host, peeked, 1)
	// Its SYN is dropped unanswered: the kernel sends it again (after
	// 1 s). A RST would fail its connect instead.
	if err := pollUntil(2500*time.Millisecond, func() error {
		if est, re := good.states(); est == 0 && re == 0 {
			return errors.New("its first SYN is neither answered nor retransmitted")
		}
		return nil
	}); err != nil {
		t.Fatalf("client past max_pending: %v", err)
	}
	if est, _ := good.states(); est != 0 {
		t.Fatalf("a client past max_pending got a handshake at once although %d peeks are pending", peekMaxPending)
	}
	if soErr, _ := unix.GetsockoptInt(good.fds[0], unix.SOL_SOCKET, unix.SO_ERROR); soErr != 0 {
		t.Fatalf("client past max_pending: connect failed with %v, want it pending (SYN dropped, not refused)", syscall.Errno(soErr))
	}
	during := float64(tr.total.Load()-start) / time.Since(t0).Seconds()
	est, re := flood.states()
	c1 := e.peekCounters(t)
	pending := e.peeking(t)
	t.Logf("flood: %d of %d clients connected, %d SYNs retransmitted; %d flows peeked; peek_busy %d -> %d; transfer %.0f MB/s before, %.0f MB/s during",
		est, floodN, re, pending, c0["peek_busy"], c1["peek_busy"], before/1e6, during/1e6)
	if est != peekMaxPending {
		t.Errorf("%d flood clients got a handshake, want exactly max_pending (%d): one per peek slot", est, peekMaxPending)
	}
	if pending > peekMaxPending {
		t.Errorf("%d flows being peeked at once, max_pending is %d", pending, peekMaxPending)
	}
	if got := c1["peek_busy"] - c0["peek_busy"]; got < floodN-peekMaxPending {
		t.Errorf("peek_busy grew by %d, want at least the %d SYNs past max_pending", got, floodN-peekMaxPending)
	}
	if during < before/4 {
		t.Errorf("the transfer ran at %.0f%% of its throughput during the flood, want at least 25%%", 100*during/before)
	}
	if web.tlsN.Load() != 0 {
		t.Errorf("%d connections reached the server although no client sent a name", web.tlsN.Load())
	}

	// The flood ends: its peeks end at their client's RST and free
	// their slots, and the waiting client's next SYN gets one.
	flood.reset()
	gt0 := time.Now()
	if err := pollUntil(5*time.Second, func() error {
		if est, _ := good.states(); est == 0 {
			return errors.New("not connected")
		}
		return nil
	}); err != nil {
		t.Fatalf("the well-behaved client once the flood ended: %v", err)
	}
	f := os.NewFile(uintptr(good.fds[0]), "good")
	gc, err := net.FileConn(f) // a dup: good's reset closes the original
	f.Close()
	good.fds = nil
	if err != nil {
		t.Fatal(err)
	}
	page, err := e.tlsGet(gc, "good.example", 5*time.Second)
	gc.Close()
	if err != nil || page != "hello good.example over https\n" {
		t.Fatalf("the well-behaved client after the flood: %q, %v", page, err)
	}
	t.Logf("the well-behaved client connected %v after the flood ended", time.Since(gt0).Round(time.Millisecond))

	if mark := tr.total.Load(); waitProgress(tr, mark, time.Second) == mark {
		t.Fatal("the transfer made no progress for 1s after the flood")
	}
	tr.finish(t)

	// The flood's flows go: reset peeks, decided as nameless (denied),
	// leave after tcp_closing (2 s); tunfw holds no socket to the
	// server but in TIME-WAIT, and every peek slot is free.
	if err := pollUntil(6*time.Second, func() error {
		if n := statusFlows(t, e.cfg); n > 0 {
			return fmt.Errorf("%d flows in the table", n)
		}
		socks := tunfwSockets(t, e.pid, e.topo.HostV4, e.topo.HostV6, peeked)
		delete(socks, tcpTimeWait)
		if len(socks) > 0 {
			return fmt.Errorf("tunfw sockets to %s by state: %v", peeked, socks)
		}
		return nil
	}); err != nil {
		t.Fatalf("after the flood: %v", err)
	}
	if n := e.flowPanics(t); n != 0 {
		t.Errorf("%d flow handlers recovered from a panic", n)
	}
	e.requireSlotsFree(t)
}

// flowPanics is `tunfw stats --json`'s flow_panics: flow handlers that
// recovered from a panic.
func (e *peekEnv) flowPanics(t *testing.T) uint64 {
	t.Helper()
	out, errOut, code := ctl(t, e.cfg, "stats", "--json")
	if code != 0 {
		t.Fatalf("tunfw stats: exit %d: %s", code, errOut)
	}
	var st struct {
		FlowPanics uint64 `json:"flow_panics"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("stats --json: %v\n%s", err, out)
	}
	return st.FlowPanics
}

// waitPeek waits until the flow from the Host's port to dst is being
// peeked: its handshake is complete and tunfw waits for its name.
func (e *peekEnv) waitPeek(t *testing.T, port uint16, dst netip.AddrPort) *filter.FlowInfo {
	t.Helper()
	var f *filter.FlowInfo
	if err := pollUntil(2*time.Second, func() error {
		if f = e.flowFrom(t, port, dst); f == nil || f.Verdict != "peek" {
			return fmt.Errorf("flow from port %d to %s: %+v, want verdict peek", port, dst, f)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return f
}

// wantFlow checks the verdict and name of the flow from the Host's port
// to dst.
func (e *peekEnv) wantFlow(t *testing.T, port uint16, dst netip.AddrPort, verdict, name string) {
	t.Helper()
	if f := e.flowFrom(t, port, dst); f == nil || f.Verdict != verdict || f.Name != name {
		t.Errorf("flow from port %d to %s: %+v, want verdict %s, name %q", port, dst, f, verdict, name)
	}
}

// TestPeekTupleReuse: a client resets a connection tunfw is still reading
// for its name (or one already judged by it) and at once connects again
// from the same port. The new connection is judged by its own name: let
// through for an allowed one, silence for a denied one, or at worst
// refused with a RST; never held by the old one, never let through on the
// old one's verdict. No peek slot stays taken and no flow handler panics.
func TestPeekTupleReuse(t *testing.T) {
	e := newPeekEnv(t)
	startWebServer(t, e.topo.Server, e.svc, e.ca)
	https, plain := netip.AddrPortFrom(e.svc, 443), netip.AddrPortFrom(e.svc, 80)
	host := e.topo.Host

	// silentThenReset connects to at, sends nothing, waits until tunfw
	// peeks the flow, resets it and returns the port it used.
	silentThenReset := func(t *testing.T, at netip.AddrPort) uint16 {
		t.Helper()
		c, err := dialFrom(host, 0, at, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		port := localPort(c)
		e.waitPeek(t, port, at)
		resetConn(c)
		return port
	}
	// redial connects again from port to at. A RST is a clean answer
	// (logged; it returns nil), a hang is not.
	redial := func(t *testing.T, port uint16, at netip.AddrPort) *net.TCPConn {
		t.Helper()
		c, err := dialFrom(host, port, at, 3*time.Second)
		switch {
		case errors.Is(err, syscall.ECONNREFUSED):
			t.Logf("the connection reusing port %d was refused (a RST): acceptable", port)
			return nil
		case err != nil:
			t.Fatalf("connect again from port %d right after resetting the connection to %s: %v (flow %+v)", port, at, err, e.flowFrom(t, port, at))
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	// deniedGet sends a GET for name over c and wants silence: no
	// answer within 1 s (the name is read at once, and a denied flow is
	// never dialled). A connection let through on the old verdict is
	// answered by the server. (The server's count of connections cannot
	// tell: the old connection, judged once its client reset it, may be
	// dialled meanwhile.)
	deniedGet := func(t *testing.T, c net.Conn, name string) {
		t.Helper()
		c.SetDeadline(time.Now().Add(time.Second))
		page, err := httpGet(c, name)
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("GET for denied %s over a reused tuple: %q, %v; want no answer (flow %+v)",
				name, page, err, e.flowFrom(t, localPort(c), c.RemoteAddr().(*net.TCPAddr).AddrPort()))
		}
	}

	t.Run("silent-then-allowed", func(t *testing.T) {
		// Port 443 denies a flow without a name: the old peek, cut
		// short by its client's RST, must not leave a denial that
		// swallows the new connection's SYN.
		port := silentThenReset(t, https)
		c := redial(t, port, https)
		if c == nil {
			return
		}
		page, err := e.tlsGet(c, "good.example", 3*time.Second)
		if err != nil || page != "hello good.example over https\n" {
			t.Fatalf("allowed name over a reused tuple: %q, %v", page, err)
		}
		e.wantFlow(t, port, https, "allow", "good.example")
	})

	t.Run("silent-then-denied", func(t *testing.T) {
		// Port 80 allows a flow without a name: the old peek, judged
		// as nameless, must not pass its verdict on to the new
		// connection, which names bad.example.
		port := silentThenReset(t, plain)
		c := redial(t, port, plain)
		if c == nil {
			return
		}
		deniedGet(t, c, "bad.example")
		e.wantFlow(t, port, plain, "deny", "bad.example")
	})

	t.Run("allowed-then-denied", func(t *testing.T) {
		// The old connection was judged by its name and is being
		// relayed when its client resets it and reuses the tuple.
		c, err := dialFrom(host, 0, plain, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		port := localPort(c)
		c.SetDeadline(time.Now().Add(3 * time.Second))
		fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: good.example\r\n\r\n")
		want := "HTTP/1.1 200 OK"
		got := make([]byte, len(want))
		if _, err := io.ReadFull(c, got); err != nil || string(got) != want {
			t.Fatalf("allowed GET: %q, %v", got, err)
		}
		e.wantFlow(t, port, plain, "allow", "good.example")
		resetConn(c)
		c2 := redial(t, port, plain)
		if c2 == nil {
			return
		}
		deniedGet(t, c2, "bad.example")
		e.wantFlow(t, port, plain, "deny", "bad.example")
	})

	t.Run("syn-while-peeking", func(t *testing.T) {
		// A SYN with another ISN on the tuple of a connection being
		// peeked (from the raw sender, the client's socket still
		// open): the stack answers it within that connection, which
		// then goes on as if nothing happened.
		c, err := dialFrom(host, 0, https, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		port := localPort(c)
		f := e.waitPeek(t, port, https)
		raw := newRawSender(t, host)
		if err := raw.send(namesClientV4, e.svc, unix.IPPROTO_TCP, tcpSYN(port, 443, rand.Uint32())); err != nil {
			t.Fatal(err)
		}
		if err := pollUntil(2*time.Second, func() error {
			if g := e.flowFrom(t, port, https); g == nil || g.PacketsIn <= f.PacketsIn {
				return fmt.Errorf("the forged SYN did not reach the flow: %+v", g)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		page, err := e.tlsGet(c, "good.example", 3*time.Second)
		if err != nil || page != "hello good.example over https\n" {
			t.Fatalf("after a SYN on its tuple, the connection being peeked: %q, %v", page, err)
		}
		e.wantFlow(t, port, https, "allow", "good.example")
	})

	if n := e.flowPanics(t); n != 0 {
		t.Errorf("%d flow handlers recovered from a panic", n)
	}
	e.requireSlotsFree(t)
}

// holdConn writes the first half of its first Write (the ClientHello),
// says so on half, and writes the rest once release is closed. It keeps
// everything written.
type holdConn struct {
	*net.TCPConn
	half, release chan struct{}
	mu            sync.Mutex
	written       []byte
	halfLen       int
}

func (c *holdConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	first := c.written == nil
	c.written = append(c.written, b...)
	c.mu.Unlock()
	if !first {
		return c.TCPConn.Write(b)
	}
	c.halfLen = len(b) / 2
	n, err := c.TCPConn.Write(b[:c.halfLen])
	close(c.half)
	if err != nil {
		return n, err
	}
	<-c.release
	m, err := c.TCPConn.Write(b[c.halfLen:])
	return n + m, err
}

func (c *holdConn) sent() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return bytes.Clone(c.written)
}

// recordingTLSServer serves one TLS connection on at: it echoes one line,
// then sends on wire every byte it read off the socket.
func recordingTLSServer(t *testing.T, ns *netnstest.NS, at netip.AddrPort, cfg *tls.Config) (wire <-chan []byte, accepted *atomic.Int64) {
	t.Helper()
	ln, err := ns.Listen("tcp", at.String())
	if err != nil {
		t.Fatalf("listen %s: %v", at, err)
	}
	t.Cleanup(func() { ln.Close() })
	out := make(chan []byte, 1)
	accepted = new(atomic.Int64)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		accepted.Add(1)
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		rec := &recordingConn{Conn: c}
		tc := tls.Server(rec, cfg)
		line, err := bufio.NewReader(tc).ReadString('\n')
		if err == nil {
			io.WriteString(tc, line)
		}
		out <- rec.bytes()
	}()
	return out, accepted
}

// recordingConn keeps what is read from it.
type recordingConn struct {
	net.Conn
	mu  sync.Mutex
	got []byte
}

func (c *recordingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.mu.Lock()
	c.got = append(c.got, b[:n]...)
	c.mu.Unlock()
	return n, err
}

func (c *recordingConn) bytes() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return bytes.Clone(c.got)
}

// tcpSniffer reads the TCP segments crossing tunfw's TUN in the Host
// namespace, both ways, to learn a connection's sequence numbers.
type tcpSniffer struct{ fd int }

func newTCPSniffer(t *testing.T, ns *netnstest.NS, ifName string) *tcpSniffer {
	t.Helper()
	var fd int
	err := ns.Do(func() error {
		ifi, err := net.InterfaceByName(ifName)
		if err != nil {
			return err
		}
		proto := int(htons(unix.ETH_P_ALL))
		if fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM, proto); err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index})
	})
	if err != nil {
		t.Fatalf("sniff %s: %v", ifName, err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000})
	return &tcpSniffer{fd: fd}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// sniffedSeg is the part of an IPv4 TCP segment the tests look at.
type sniffedSeg struct {
	sport, dport uint16
	seq, ack     uint32
	flags        byte
}

// wait returns the first segment for which match is true, within d.
func (s *tcpSniffer) wait(d time.Duration, match func(sniffedSeg) bool) (sniffedSeg, error) {
	buf := make([]byte, 65536)
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		n, _, err := unix.Recvfrom(s.fd, buf, 0)
		if err != nil {
			continue // the receive timeout: look at the deadline
		}
		p := buf[:n]
		if len(p) < 20 || p[0]>>4 != 4 || p[9] != unix.IPPROTO_TCP {
			continue
		}
		ihl := int(p[0]&0xf) * 4
		if len(p) < ihl+20 {
			continue
		}
		h := p[ihl:]
		seg := sniffedSeg{sport: endian.BigEndian.Uint16(h[0:]), dport: endian.BigEndian.Uint16(h[2:]),
			seq: endian.BigEndian.Uint32(h[4:]), ack: endian.BigEndian.Uint32(h[8:]), flags: h[13]}
		if match(seg) {
			return seg, nil
		}
	}
	return sniffedSeg{}, fmt.Errorf("no such segment within %v", d)
}

// TCP flags of forged segments.
const (
	flagFIN = 0x01
	flagSYN = 0x02
	flagRST = 0x04
	flagPSH = 0x08
	flagACK = 0x10
)

// TestPeekForgedSegments: while tunfw holds half a ClientHello of a
// connection it reads for its name, segments are forged on the tuple with
// sequence numbers the stack must not accept: data ahead of the window,
// behind it, and rewriting bytes already received; RST and FIN out of
// window, a RST in window but not at the next sequence number, a SYN with
// another ISN. Then the client sends the rest of its hello: the
// connection is judged by its real name, relayed, and the server reads
// exactly the bytes the client wrote, none of the forged ones.
func TestPeekForgedSegments(t *testing.T) {
	e := newPeekEnv(t)
	at := netip.AddrPortFrom(e.svc, 443)
	wire, accepted := recordingTLSServer(t, e.topo.Server, at, e.ca.serverTLS())
	sniff := newTCPSniffer(t, e.topo.Host, "tunfw0")

	c, err := dialFrom(e.topo.Host, 0, at, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetNoDelay(true)
	port := localPort(c)
	syn, err := sniff.wait(time.Second, func(s sniffedSeg) bool { return s.sport == port && s.flags&(flagSYN|flagACK) == flagSYN })
	if err != nil {
		t.Fatalf("the client's SYN: %v", err)
	}
	synAck, err := sniff.wait(time.Second, func(s sniffedSeg) bool { return s.dport == port && s.flags&(flagSYN|flagACK) == flagSYN|flagACK })
	if err != nil {
		t.Fatalf("tunfw's SYN-ACK: %v", err)
	}

	hc := &holdConn{TCPConn: c, half: make(chan struct{}), release: make(chan struct{})}
	defer func() {
		select {
		case <-hc.release:
		default:
			close(hc.release)
		}
	}()
	const line = "through the peek, untouched\n"
	echoed := make(chan error, 1)
	go func() {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		tc := tls.Client(hc, &tls.Config{ServerName: "good.example", RootCAs: e.ca.pool})
		if _, err := io.WriteString(tc, line); err != nil {
			echoed <- err
			return
		}
		got, err := bufio.NewReader(tc).ReadString('\n')
		if err == nil && got != line {
			err = fmt.Errorf("echo %q, want %q", got, line)
		}
		echoed <- err
	}()
	select {
	case <-hc.half:
	case err := <-echoed:
		t.Fatalf("before the first half of the ClientHello went out: %v", err)
	}
	// Half the hello is in tunfw (the stack acknowledged it) and the
	// flow is still waiting for its name.
	if _, err := dataSegsSent(c, 2*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := pollUntil(2*time.Second, func() error {
		info, err := tcpInfoOf(c)
		if err == nil && info.Unacked != 0 {
			err = fmt.Errorf("%d segments not acknowledged", info.Unacked)
		}
		return err
	}); err != nil {
		t.Fatalf("first half of the ClientHello: %v", err)
	}
	f := e.waitPeek(t, port, at)
	if accepted.Load() != 0 {
		t.Fatal("the server was dialled before the ClientHello was complete")
	}

	forgedData := bytes.Repeat([]byte("FORGED!"), 10)
	if hc.halfLen < len(forgedData) {
		t.Fatalf("half the ClientHello is %d bytes, too short to rewrite %d of them", hc.halfLen, len(forgedData))
	}
	nxt, ack := syn.seq+1+uint32(hc.halfLen), synAck.seq+1
	data := func(seq uint32) []byte {
		return append(tcpSegment(port, 443, seq, ack, flagPSH|flagACK), forgedData...)
	}
	forged := []struct {
		what string
		seg  []byte
	}{
		{"data 1 GiB ahead of the window", data(nxt + 1<<30)},
		{"data 1 GiB behind", data(nxt - 1<<30)},
		{"data rewriting bytes already received", data(syn.seq + 1)},
		{"data ending at the next sequence number", data(nxt - uint32(len(forgedData)))},
		{"RST ahead of the window", tcpSegment(port, 443, nxt+1<<30, 0, flagRST)},
		{"RST|ACK behind the window", tcpSegment(port, 443, nxt-1<<30, ack, flagRST|flagACK)},
		{"RST in the window, not at the next sequence number", tcpSegment(port, 443, nxt+1000, ack, flagRST|flagACK)},
		{"FIN|ACK ahead of the window", tcpSegment(port, 443, nxt+1<<30, ack, flagFIN|flagACK)},
		{"FIN|ACK behind", tcpSegment(port, 443, nxt-1<<29, ack, flagFIN|flagACK)},
		{"SYN with another ISN", tcpSYN(port, 443, syn.seq+1<<31)},
	}
	raw := newRawSender(t, e.topo.Host)
	for _, s := range forged {
		if err := raw.send(namesClientV4, e.svc, unix.IPPROTO_TCP, s.seg); err != nil {
			t.Fatalf("send %s: %v", s.what, err)
		}
	}
	// Every forged segment went through the filter to the stack, which
	// handles a connection's segments in order: all of them before the
	// rest of the hello.
	if err := pollUntil(2*time.Second, func() error {
		if g := e.flowFrom(t, port, at); g == nil || g.PacketsIn < f.PacketsIn+uint64(len(forged)) {
			return fmt.Errorf("flow %+v; want at least %d packets in", g, f.PacketsIn+uint64(len(forged)))
		}
		return nil
	}); err != nil {
		t.Fatalf("forged segments: %v", err)
	}
	if g := e.flowFrom(t, port, at); g == nil || g.Verdict != "peek" {
		t.Fatalf("after the forged segments, the flow is %+v; want it still being peeked", g)
	}

	close(hc.release)
	echoErr := <-echoed
	var got []byte
	select {
	case got = <-wire:
	case <-time.After(5 * time.Second):
		t.Fatalf("the server did not finish its connection (client: %v)", echoErr)
	}
	if bytes.Contains(got, []byte("FORGED")) {
		t.Fatalf("forged bytes reached the server: %q", got)
	}
	if echoErr != nil {
		t.Fatalf("the connection after forged segments: %v", echoErr)
	}
	e.wantFlow(t, port, at, "allow", "good.example")
	if sent := hc.sent(); !bytes.Equal(got, sent) {
		t.Fatalf("the server read %d bytes, not the %d the client wrote (first difference at %d)", len(got), len(sent), firstDiff(got, sent))
	}
	if n := e.flowPanics(t); n != 0 {
		t.Errorf("%d flow handlers recovered from a panic", n)
	}
}

// tcpInfoOf is c's TCP_INFO.
func tcpInfoOf(c *net.TCPConn) (*unix.TCPInfo, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var info *unix.TCPInfo
	var ierr error
	if err := raw.Control(func(fd uintptr) {
		info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	}); err != nil {
		return nil, err
	}
	return info, ierr
}
