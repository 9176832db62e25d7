package e2e

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
	"golang.org/x/sys/unix"
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

// TestCaptureKillSwitchKeepsHostReachable: with fail = "closed", the kill
// switch that a killed tunfw leaves, and the one `tunfw down --block`
// installs at boot, block what the host itself sends to captured
// destinations, but the host stays reachable from outside (README: "The
// host stays reachable"): an admin's session opened before keeps echoing
// and new inbound TCP and UDP are answered, IPv4 and IPv6. Otherwise a
// crash, or a boot where `up` fails, locks the admin out for good.
func TestCaptureKillSwitchKeepsHostReachable(t *testing.T) {
	requireNft(t)
	topo := newCaptureTopo(t)
	host := topo.Host
	startTCPEcho(t, host, netip.MustParseAddrPort("[::]:2222"))
	for _, a := range []netip.Addr{topo.HostV4, topo.HostV6} {
		startUDPEcho(t, host, netip.AddrPortFrom(a, 5353))
	}
	in4 := openSession(t, topo.Server, hostPort(topo.HostV4, 2222))
	in6 := openSession(t, topo.Server, hostPort(topo.HostV6, 2222))
	reachable := func(when string) {
		t.Helper()
		for name, s := range map[string]*session{"v4": in4, "v6": in6} {
			if err := s.echo(); err != nil {
				t.Errorf("%s: inbound %s session opened before: %v", when, name, err)
			}
		}
		for _, a := range []netip.Addr{topo.HostV4, topo.HostV6} {
			if err := tcpEcho(topo.Server, hostPort(a, 2222), 3*time.Second); err != nil {
				t.Errorf("%s: new inbound TCP to %s: %v", when, a, err)
			}
			if got, err := udpEcho(topo.Server, hostPort(a, 5353)); err != nil || string(got) != "ping" {
				t.Errorf("%s: new inbound UDP to %s: %q, %v", when, a, got, err)
			}
		}
	}
	blocked := func(when string) {
		t.Helper()
		for _, svc := range []netip.Addr{topo.ServiceV4, topo.ServiceV6} {
			if err := tcpEcho(host, hostPort(svc, 9100), 2*time.Second); err == nil {
				t.Errorf("%s: the host's own connection to %s got through", when, svc)
			}
			if rc, out, _ := curlAs(host, "--interface", topo.HostIf, urlOf(svc, 9100)); rc != 7 {
				t.Errorf("%s: bound curl to %s: rc %d, want 7\n%s", when, svc, rc, out)
			}
		}
	}
	cfg := captureCfg(t, "closed")
	fw := startTunfw(t, host, cfg)
	reachable("tunfw up")
	fw.kill9()
	blocked("tunfw killed")
	reachable("tunfw killed")
	runDown(t, host, cfg)
	if out, err := host.Cmd(binary, "down", "--block", "-c", cfg).CombinedOutput(); err != nil {
		t.Fatalf("tunfw down --block: %v\n%s", err, out)
	}
	blocked("after down --block")
	reachable("after down --block")
	runDown(t, host, cfg)
}

// killSwitchArmed reports whether tunfw's nftables table in ns refuses
// for good (fail = "closed"): its alive set holds an element without a
// timeout.
func killSwitchArmed(t *testing.T, ns *netnstest.NS) bool {
	t.Helper()
	out, err := ns.Cmd("nft", "list", "set", "inet", "tunfw", "alive").CombinedOutput()
	if err != nil {
		return false
	}
	// The element that arms it has no timeout; the one saying tunfw runs
	// always has.
	for _, l := range strings.Split(string(out), "\n") {
		if _, elems, ok := strings.Cut(l, "elements = {"); ok {
			elems, _, _ = strings.Cut(elems, "}")
			for _, e := range strings.Split(elems, ",") {
				if !strings.Contains(e, "timeout") && !strings.Contains(e, "expires") {
					return true
				}
			}
		}
	}
	return false
}

// TestGatewayKillSwitch: in gateway mode with fail = "closed", a killed
// tunfw leaves the namespaces it routed blocked (the nftables table's
// forward chain refuses them, link-local destinations included), while the
// host's own traffic, not captured without auto, still flows; `tunfw down`
// lifts it.
func TestGatewayKillSwitch(t *testing.T) {
	requireNft(t)
	topo := newCaptureTopo(t)
	host := topo.Host
	client, lanIf := addGatewayClient(t, host)
	// The server can answer the client directly: without a kill switch,
	// forwarded traffic would get through unfiltered.
	topo.Server.Run(t, "ip", "route", "add", "10.98.0.0/24", "via", topo.HostV4.String())
	topo.Server.Run(t, "ip", "-6", "route", "add", "fd98::/64", "via", topo.HostV6.String())
	topo.Server.Run(t, "ip", "addr", "add", "169.254.169.254/32", "dev", "lo")
	host.Run(t, "ip", "route", "add", "169.254.169.254/32", "via", topo.ServerV4.String())
	startTCPEcho(t, topo.Server, netip.MustParseAddrPort("169.254.169.254:9100"))
	targets := []string{hostPort(topo.ServiceV4, 9100), hostPort(topo.ServiceV6, 9100), "169.254.169.254:9100"}

	cfg := writeConfig(t, fmt.Sprintf(`
[tun]
name = "tunfw0"
addresses = ["198.18.0.1/30", "fd54:756e:6677::1/126"]
[route]
from = [%q]
fail = "closed"
`, lanIf))
	fw := startTunfw(t, host, cfg)
	for _, at := range targets {
		if err := tcpEcho(client, at, 3*time.Second); err != nil {
			t.Errorf("client to %s through tunfw: %v", at, err)
		}
	}
	fw.kill9()
	for _, at := range targets {
		// Forwarded traffic is refused once the running element,
		// refreshed every second, has timed out (5 s).
		if err := eventually(8*time.Second, func() error {
			if tcpEcho(client, at, time.Second) == nil {
				return fmt.Errorf("the client reached %s", at)
			}
			return nil
		}); err != nil {
			t.Errorf("fail = closed, tunfw killed: %v", err)
		}
		if err := tcpEcho(host, at, 2*time.Second); err != nil {
			t.Errorf("fail = closed, tunfw killed: the host's own (uncaptured) connection to %s: %v", at, err)
		}
	}
	runDown(t, host, cfg)
	for _, at := range targets {
		if err := tcpEcho(client, at, 3*time.Second); err != nil {
			t.Errorf("after tunfw down: client to %s: %v", at, err)
		}
	}
}

// TestAutoKillSwitchBlocksForwarded: with auto = true the host's table
// also captures what it forwards for others (a namespace routed through
// it, with no from); with fail = "closed", a killed tunfw must leave that
// blocked too, not only the host's own traffic. It passed unfiltered: only
// from interfaces had a forward chain.
func TestAutoKillSwitchBlocksForwarded(t *testing.T) {
	requireNft(t)
	topo := newCaptureTopo(t)
	host := topo.Host
	client, _ := addGatewayClient(t, host)
	topo.Server.Run(t, "ip", "route", "add", "10.98.0.0/24", "via", topo.HostV4.String())
	topo.Server.Run(t, "ip", "-6", "route", "add", "fd98::/64", "via", topo.HostV6.String())
	targets := []string{hostPort(topo.ServiceV4, 9100), hostPort(topo.ServiceV6, 9100)}

	cfg := writeConfig(t, `
[tun]
name = "tunfw0"
addresses = ["198.18.0.1/30", "fd54:756e:6677::1/126"]
[route]
auto = true
fail = "closed"
[filter]
log = "all"
`)
	fw := startTunfw(t, host, cfg)
	for _, at := range targets {
		if err := tcpEcho(client, at, 3*time.Second); err != nil {
			t.Errorf("client to %s through tunfw: %v", at, err)
		}
	}
	// Judged by tunfw: the flows carry the client's own address.
	fw.waitLog(t, 5*time.Second, "verdict=allow", "src=10.98.0.2:")
	// While tunfw runs the forward chain refuses nothing: what the host
	// forwards past the TUN (here by an ip rule of the admin's; bridged
	// traffic under br_netfilter looks the same to it) passes.
	for _, dir := range []string{"from", "to"} {
		host.Run(t, "ip", "rule", "add", dir, "10.98.0.2", "lookup", "main", "priority", "100")
	}
	if err := tcpEcho(client, targets[0], 3*time.Second); err != nil {
		t.Errorf("tunfw running: forwarded traffic outside the TUN was refused: %v", err)
	}
	for _, dir := range []string{"from", "to"} {
		host.Run(t, "ip", "rule", "del", dir, "10.98.0.2", "lookup", "main", "priority", "100")
	}
	fw.kill9()
	for _, at := range targets {
		if err := eventually(8*time.Second, func() error {
			if tcpEcho(client, at, time.Second) == nil {
				return fmt.Errorf("the forwarded client reached %s", at)
			}
			return nil
		}); err != nil {
			t.Errorf("fail = closed, tunfw killed: %v", err)
		}
	}
	runDown(t, host, cfg)
	for _, at := range targets {
		if err := tcpEcho(client, at, 3*time.Second); err != nil {
			t.Errorf("after tunfw down: client to %s: %v", at, err)
		}
	}
}

// TestCaptureDirectedBroadcast: broadcast is never captured (README), and
// that includes a subnet's directed broadcast, which the local table
// routes straight to the link: the output filter must not refuse it as a
// bypass (it did: sendto failed with EPERM, even for root).
func TestCaptureDirectedBroadcast(t *testing.T) {
	requireNft(t)
	topo := newCaptureTopo(t)
	host := topo.Host
	rx, err := topo.Server.ListenPacket("udp4", "0.0.0.0:9977")
	if err != nil {
		t.Fatal(err)
	}
	defer rx.Close()
	fw := startTunfw(t, host, captureCfg(t, "open"))
	defer fw.stop()
	bcast := netip.MustParsePrefix(topo.HostV4.String() + "/24").Masked().Addr().As4()
	bcast[3] = 255
	var sendErr error
	if err := host.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_BROADCAST, 1); err != nil {
			return err
		}
		sendErr = unix.Sendto(fd, []byte("bcast"), 0, &unix.SockaddrInet4{Port: 9977, Addr: bcast})
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if sendErr != nil {
		t.Fatalf("send to the directed broadcast %v: %v", netip.AddrFrom4(bcast), sendErr)
	}
	rx.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 16)
	if n, _, err := rx.ReadFrom(buf); err != nil || string(buf[:n]) != "bcast" {
		t.Errorf("directed broadcast not received: %q, %v", buf[:n], err)
	}
}

// connPair is one TCP connection: c the dialling end, a the accepting one.
type connPair struct{ c, a net.Conn }

func dialPair(t *testing.T, server, client *netnstest.NS, addr string) connPair {
	t.Helper()
	ln, err := server.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	defer ln.Close()
	c, err := client.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	a, err := ln.Accept()
	if err != nil {
		t.Fatalf("accept %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close(); a.Close() })
	return connPair{c, a}
}

// bulkTransfer sends n bytes from one end to the other and reads them there,
// within d.
func bulkTransfer(from, to net.Conn, n int, d time.Duration) error {
	deadline := time.Now().Add(d)
	from.SetWriteDeadline(deadline)
	to.SetReadDeadline(deadline)
	errc := make(chan error, 1)
	go func() {
		_, err := from.Write(make([]byte, n))
		errc <- err
	}()
	got, err := io.CopyN(io.Discard, to, int64(n))
	if werr := <-errc; werr != nil && err == nil {
		err = werr
	}
	if err != nil {
		return fmt.Errorf("%d of %d bytes: %w", got, n, err)
	}
	return nil
}

// TestCapturePreexistingWindow: a connection open but idle when tunfw
// starts (an admin's quiet SSH session, a paused download) gets its
// conntrack entry from the socket table, without the sequence and window
// history conntrack normally learns; one that carried data while tunfw
// was stopped has an entry whose window is far behind. Either way, bulk
// data afterwards must not be taken for out-of-window packets: those lose
// the connection's mark, their replies are captured, and the transfer
// stalls (it did, for good) or is reset.
func TestCapturePreexistingWindow(t *testing.T) {
	requireNft(t)
	topo := newCaptureTopo(t)
	host := topo.Host
	type conn struct {
		name string
		p    connPair
	}
	var conns []conn
	port := uint16(9600)
	for _, fam := range []struct {
		name         string
		host, server netip.Addr
	}{{"v4", topo.HostV4, topo.ServiceV4}, {"v6", topo.HostV6, topo.ServiceV6}} {
		conns = append(conns,
			conn{"inbound " + fam.name, dialPair(t, host, topo.Server, hostPort(fam.host, port))},
			conn{"outbound " + fam.name, dialPair(t, topo.Server, host, hostPort(fam.server, port+1))})
		port += 2
	}
	const size = 16 << 20
	bulk := func(when string) {
		t.Helper()
		for _, c := range conns {
			if err := bulkTransfer(c.p.c, c.p.a, size, 5*time.Second); err != nil {
				t.Errorf("%s, %s: dialler to acceptor: %v", c.name, when, err)
			}
			if err := bulkTransfer(c.p.a, c.p.c, size, 5*time.Second); err != nil {
				t.Errorf("%s, %s: acceptor to dialler: %v", c.name, when, err)
			}
		}
	}
	bulk("before up")
	cfg := captureCfg(t, "open")
	fw := startTunfw(t, host, cfg)
	bulk("after up")
	if code := fw.stop(); code != 0 {
		t.Fatalf("exit code %d after SIGTERM", code)
	}
	bulk("after a stop")
	fw = startTunfw(t, host, cfg)
	bulk("after a restart")
	fw.stop()
}

// TestCaptureHostToGatewayClient: with auto and from, the host's own
// connections to the namespaces it routes (a container's port) are
// captured and judged like the rest, and they reach them: tunfw's socket
// must leave by the interface the main table says, not always by the
// default route's (it was bound to that one, and timed out).
func TestCaptureHostToGatewayClient(t *testing.T) {
	requireNft(t)
	topo := newCaptureTopo(t)
	host := topo.Host
	client, lanIf := addGatewayClient(t, host)
	for _, a := range []string{"10.98.0.2:2323", "[fd98::2]:2323"} {
		startTCPEcho(t, client, netip.MustParseAddrPort(a))
	}
	fw := startTunfw(t, host, writeConfig(t, fmt.Sprintf(`
[tun]
name = "tunfw0"
addresses = ["198.18.0.1/30", "fd54:756e:6677::1/126"]
[route]
auto = true
from = [%q]
[filter]
log = "all"
`, lanIf)))
	for _, at := range []string{"10.98.0.2:2323", "[fd98::2]:2323"} {
		if err := tcpEcho(host, at, 3*time.Second); err != nil {
			t.Errorf("the host's own connection to its gateway client %s: %v", at, err)
		}
		fw.waitLog(t, 5*time.Second, "verdict=allow", "dst="+at)
	}
	// The uplink still works the same way.
	if err := tcpEcho(host, hostPort(topo.ServiceV4, 9100), 3*time.Second); err != nil {
		t.Errorf("the host's own connection to %s: %v", topo.ServiceV4, err)
	}
}
