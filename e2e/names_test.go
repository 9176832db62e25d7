package e2e

// End-to-end tests of rules by name (issue 13): real TLS, HTTP, QUIC and
// DNS clients in the Host namespace, real servers in the Server namespace,
// tunfw between them judging flows by the name they ask for.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"golang.org/x/sys/unix"

	"github.com/tunfw/tunfw/internal/netnstest"
)

// namesWebConfig lets through, by name, only the good.example names on
// the web ports: everything else is denied by default, so an allowed
// flow proves its name was read. bad names are denied (silence) and
// rude.example rejected (reset).
const namesWebConfig = namesBase + `
[filter]
default = "deny"
log = "all"

[inspect]
timeout = "300ms"
max_bytes = 16384

[sets]
bad = ["bad.example", "*.bad.example"]

[[rule]]
name = "good"
action = "allow"
proto = "tcp"
dst_port = [80, 443]
domain = ["good.example", "*.good.example"]

[[rule]]
name = "bad"
action = "deny"
domain = "@bad"

[[rule]]
name = "rude"
action = "reject"
domain = "rude.example"
`

// webNames are the names the web servers hold certificates for.
var webNames = []string{"good.example", "www.good.example", "bad.example", "x.bad.example", "rude.example", "other.example"}

// webEnv is the usual topology with an HTTPS and HTTP server on each
// service address, serving webNames with certificates of one CA.
type webEnv struct {
	topo *netnstest.Topology
	ca   *testCA
	web  map[netip.Addr]*webServer
	cfg  string
	fw   *tunfwProc
}

func newWebEnv(t *testing.T) *webEnv {
	t.Helper()
	netnstest.RequireRoot(t)
	e := &webEnv{topo: netnstest.NewTopology(t), ca: newTestCA(t, webNames...), web: map[netip.Addr]*webServer{}}
	for _, svc := range []netip.Addr{e.topo.ServiceV4, e.topo.ServiceV6} {
		e.web[svc] = startWebServer(t, e.topo.Server, svc, e.ca)
	}
	return e
}

// startTunfw starts tunfw with body as its config; until then the Host
// reaches the services straight over the veth.
func (e *webEnv) startTunfw(t *testing.T, body string) {
	t.Helper()
	e.cfg = writeConfig(t, body)
	e.fw = startTunfw(t, e.topo.Host, e.cfg)
}

// fetch is curl in the Host for scheme://name/ at svc, the certificate
// verified against the test CA, within maxTime seconds.
func (e *webEnv) fetch(t *testing.T, scheme, name string, svc netip.Addr, maxTime string) curlResult {
	t.Helper()
	port := uint16(80)
	if scheme == "https" {
		port = 443
	}
	return runCurl(t, e.topo.Host, "--max-time", maxTime, "--cacert", e.ca.pemPath,
		"--resolve", curlResolve(name, port, svc), scheme+"://"+name+"/")
}

func TestNameTLS(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl not installed")
	}
	e := newWebEnv(t)

	// The control: without tunfw every name, allowed or not, is served
	// (certificate verified), so a failure below is tunfw's doing.
	t.Run("direct", func(t *testing.T) {
		for _, svc := range []netip.Addr{e.topo.ServiceV4, e.topo.ServiceV6} {
			for _, scheme := range []string{"https", "http"} {
				for _, name := range []string{"good.example", "bad.example", "rude.example", "other.example"} {
					r := e.fetch(t, scheme, name, svc, "5")
					if want := fmt.Sprintf("hello %s over %s", name, scheme); r.code != 0 || !strings.Contains(r.out, want) {
						t.Errorf("direct %s://%s at %s: %v, want %q", scheme, name, svc, r, want)
					}
				}
			}
		}
	})
	if t.Failed() {
		return
	}

	e.startTunfw(t, namesWebConfig)
	for _, svc := range []netip.Addr{e.topo.ServiceV4, e.topo.ServiceV6} {
		t.Run(famName(svc), func(t *testing.T) {
			// The families have servers of their own: run side by side.
			t.Parallel()
			web := e.web[svc]
			for _, scheme := range []string{"https", "http"} {
				accepted := &web.tlsN
				if scheme == "http" {
					accepted = &web.plainN
				}
				// allowed fetches name and returns the page.
				allowed := func(t *testing.T, name string) {
					t.Helper()
					before := accepted.Load()
					r := e.fetch(t, scheme, name, svc, "10")
					if want := fmt.Sprintf("hello %s over %s", name, scheme); r.code != 0 || !strings.Contains(r.out, want) {
						t.Fatalf("%s://%s through tunfw: %v, want %q", scheme, name, r, want)
					}
					if n := accepted.Load() - before; n != 1 {
						t.Errorf("server accepted %d connections for one fetch of %s", n, name)
					}
				}
				// refused fetches name, which must fail as want says
				// (timeout or reset) and never reach the server: the
				// allowed fetch after it is the only connection the
				// server accepts meanwhile.
				refused := func(t *testing.T, name string, reset bool) {
					t.Helper()
					before := accepted.Load()
					r := e.fetch(t, scheme, name, svc, "1.2")
					switch {
					case reset && (!isResetCode(r.code) || r.took > time.Second):
						t.Errorf("%s://%s (rejected): %v, want a reset (curl exit 7, 35, 52 or 56) at once", scheme, name, r)
					case !reset && r.code != curlTimeout:
						t.Errorf("%s://%s (denied): %v, want a timeout (curl exit 28)", scheme, name, r)
					}
					allowed(t, "good.example")
					if n := accepted.Load() - before; n != 1 {
						t.Errorf("%s://%s reached the server: it accepted %d connections, want 1 (the allowed fetch after it)", scheme, name, n)
					}
				}
				t.Run(scheme, func(t *testing.T) {
					t.Run("allowed", func(t *testing.T) { allowed(t, "good.example") })
					if scheme == "https" {
						t.Run("allowed-wildcard", func(t *testing.T) { allowed(t, "www.good.example") })
						t.Run("denied-wildcard", func(t *testing.T) { refused(t, "x.bad.example", false) })
					}
					t.Run("denied", func(t *testing.T) { refused(t, "bad.example", false) })
					t.Run("rejected", func(t *testing.T) { refused(t, "rude.example", true) })
					t.Run("unlisted-default-deny", func(t *testing.T) { refused(t, "other.example", false) })
				})
			}
		})
	}
}

// chunkConn writes each Write in chunks of size bytes, one write(2) each
// on a TCP_NODELAY socket, gap apart, so a TLS ClientHello reaches tunfw
// in several TCP segments. It records how the first Write (the
// ClientHello) was cut and, from the kernel, how many data segments it
// took: nothing else is written until the server answers it.
type chunkConn struct {
	*net.TCPConn
	size int
	gap  time.Duration

	writes      int
	firstLen    int
	firstChunks int
	firstSegs   uint32
	segsErr     error
}

func (c *chunkConn) Write(b []byte) (int, error) {
	c.writes++
	first := c.writes == 1
	if !first {
		return c.TCPConn.Write(b)
	}
	c.firstLen = len(b)
	n := 0
	for len(b) > 0 {
		k := min(c.size, len(b))
		w, err := c.TCPConn.Write(b[:k])
		n += w
		if err != nil {
			return n, err
		}
		b = b[k:]
		c.firstChunks++
		if len(b) > 0 {
			// Spread the hello over time as a slow link would: tunfw
			// must wait for the rest within [inspect] timeout.
			time.Sleep(c.gap)
		}
	}
	c.firstSegs, c.segsErr = dataSegsSent(c.TCPConn, 2*time.Second)
	return n, nil
}

// dataSegsSent waits until c's socket has sent every byte written to it
// and returns the number of data segments it sent.
func dataSegsSent(c *net.TCPConn, within time.Duration) (uint32, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	deadline := time.Now().Add(within)
	for {
		var info *unix.TCPInfo
		var ierr error
		if err := raw.Control(func(fd uintptr) {
			info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
		}); err != nil {
			return 0, err
		}
		if ierr != nil {
			return 0, fmt.Errorf("TCP_INFO: %w", ierr)
		}
		if info.Notsent_bytes == 0 {
			return info.Data_segs_out, nil
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("%d bytes still not sent after %v", info.Notsent_bytes, within)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// segmentedTLS dials svc:443 from the Host and runs a TLS handshake for
// name whose ClientHello goes out 200 bytes a segment, then GETs / over
// it. It returns the page and the conn wrapper, which tells how the hello
// was cut.
func segmentedTLS(ctx context.Context, e *webEnv, svc netip.Addr, name string) (page string, cc *chunkConn, err error) {
	raw, err := e.topo.Host.DialContext(ctx, "tcp", hostPort(svc, 443))
	if err != nil {
		return "", nil, err
	}
	defer raw.Close()
	tc := raw.(*net.TCPConn)
	tc.SetNoDelay(true)
	if dl, ok := ctx.Deadline(); ok {
		tc.SetDeadline(dl)
	}
	cc = &chunkConn{TCPConn: tc, size: 200, gap: 10 * time.Millisecond}
	tlsc := tls.Client(cc, &tls.Config{ServerName: name, RootCAs: e.ca.pool, NextProtos: []string{"http/1.1"}})
	if err := tlsc.HandshakeContext(ctx); err != nil {
		return "", cc, fmt.Errorf("TLS handshake for %s: %w", name, err)
	}
	req, _ := http.NewRequest("GET", "https://"+name+"/", nil)
	req.Close = true
	if err := req.Write(tlsc); err != nil {
		return "", cc, fmt.Errorf("send request: %w", err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(tlsc), req)
	if err != nil {
		return "", cc, fmt.Errorf("read response: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return string(body), cc, err
}

func TestNameTLSSegmented(t *testing.T) {
	e := newWebEnv(t)
	// Autocorking would merge writes the socket has not sent yet.
	e.topo.Host.Run(t, "sysctl", "-qw", "net.ipv4.tcp_autocorking=0")

	check := func(t *testing.T, svc netip.Addr, name string, wantOK bool) {
		t.Helper()
		web := e.web[svc]
		before := web.tlsN.Load()
		d := 10 * time.Second
		if !wantOK {
			d = 1500 * time.Millisecond
		}
		ctx, cancel := context.WithTimeout(context.Background(), d)
		defer cancel()
		page, cc, err := segmentedTLS(ctx, e, svc, name)
		if cc != nil {
			t.Logf("%s at %s: ClientHello of %d bytes written in %d chunks, %d data segments (%v)", name, svc, cc.firstLen, cc.firstChunks, cc.firstSegs, cc.segsErr)
			if cc.firstChunks < 3 || cc.segsErr != nil || cc.firstSegs < 3 {
				t.Fatalf("ClientHello of %d bytes went in %d chunks, %d data segments (%v); want at least 3", cc.firstLen, cc.firstChunks, cc.firstSegs, cc.segsErr)
			}
		}
		var ne net.Error
		timedOut := errors.As(err, &ne) && ne.Timeout()
		if wantOK {
			if want := "hello " + name + " over https"; err != nil || !strings.Contains(page, want) {
				t.Fatalf("segmented TLS to %s: %q, %v; want %q", name, page, err, want)
			}
			if n := web.tlsN.Load() - before; n != 1 {
				t.Errorf("server accepted %d connections for one handshake", n)
			}
			return
		}
		if !timedOut {
			t.Errorf("segmented TLS to denied %s: %q, %v; want a timeout", name, page, err)
		}
		// Then an allowed one: the only connection the server sees.
		ctx2, cancel2 := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel2()
		if _, _, err := segmentedTLS(ctx2, e, svc, "good.example"); err != nil {
			t.Fatalf("allowed handshake after the denied one: %v", err)
		}
		if n := web.tlsN.Load() - before; n != 1 {
			t.Errorf("denied %s reached the server: %d connections accepted, want 1 (the allowed one after it)", name, n)
		}
	}

	t.Run("direct", func(t *testing.T) {
		for _, svc := range []netip.Addr{e.topo.ServiceV4, e.topo.ServiceV6} {
			check(t, svc, "good.example", true)
			check(t, svc, "bad.example", true)
		}
	})
	if t.Failed() {
		return
	}
	e.startTunfw(t, namesWebConfig)
	for _, svc := range []netip.Addr{e.topo.ServiceV4, e.topo.ServiceV6} {
		t.Run(famName(svc), func(t *testing.T) {
			t.Run("allowed", func(t *testing.T) { check(t, svc, "www.good.example", true) })
			t.Run("denied", func(t *testing.T) { check(t, svc, "bad.example", false) })
		})
	}
}

// namesQUICConfig lets QUIC through to the good.example names only.
const namesQUICConfig = namesBase + `
[filter]
default = "deny"
log = "all"

[sets]
bad = ["bad.example", "*.bad.example"]

[[rule]]
name = "good-quic"
action = "allow"
proto = "udp"
dst_port = 443
domain = ["good.example", "*.good.example"]

[[rule]]
name = "refused-quic"
action = "reject"
proto = "udp"
dst_port = 443
domain = "refused.example"

[[rule]]
name = "bad"
action = "deny"
domain = "@bad"
`

// countingPacketConn counts the Initial packets a server read: any
// packet of a denied QUIC flow that got through would show here (a denied
// client sends nothing else). Packets of connections that end meanwhile
// (1-RTT short headers, their CONNECTION_CLOSE) are not counted.
type countingPacketConn struct {
	net.PacketConn
	n *atomic.Int64
}

func (c countingPacketConn) ReadFrom(b []byte) (int, net.Addr, error) {
	n, a, err := c.PacketConn.ReadFrom(b)
	if err == nil && n > 0 && b[0]&0x80 != 0 && quicInitial(b[:n]) {
		c.n.Add(1)
	}
	return n, a, err
}

// quicInitial reports whether a long-header packet is an Initial: type 0
// in QUIC v1, 1 in v2 (RFC 9369).
func quicInitial(b []byte) bool {
	if len(b) < 5 {
		return false
	}
	typ := b[0] >> 4 & 3
	switch uint32(b[1])<<24 | uint32(b[2])<<16 | uint32(b[3])<<8 | uint32(b[4]) {
	case 1:
		return typ == 0
	case 0x6b3343cf:
		return typ == 1
	}
	return false
}

// quicServer is a QUIC server on UDP 443 of one address: each stream
// gets back "quic NAME: " and what it sent, NAME being the server_name.
type quicServer struct {
	packets, accepted atomic.Int64
}

const quicALPN = "tunfw-test"

func startQUICServer(t *testing.T, ns *netnstest.NS, addr netip.Addr, ca *testCA) *quicServer {
	t.Helper()
	s := &quicServer{}
	pc, err := ns.ListenPacket("udp", hostPort(addr, 443))
	if err != nil {
		t.Fatalf("listen udp %s: %v", hostPort(addr, 443), err)
	}
	t.Cleanup(func() { pc.Close() })
	ln, err := quic.Listen(countingPacketConn{pc, &s.packets}, ca.serverTLS(quicALPN), &quic.Config{})
	if err != nil {
		t.Fatalf("quic listen: %v", err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept(context.Background())
			if err != nil {
				return
			}
			s.accepted.Add(1)
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				str, err := conn.AcceptStream(ctx)
				if err != nil {
					return
				}
				str.SetDeadline(time.Now().Add(10 * time.Second))
				req, _ := io.ReadAll(io.LimitReader(str, 4096))
				fmt.Fprintf(str, "quic %s: %s", conn.ConnectionState().TLS.ServerName, req)
				str.Close()
			}()
		}
	}()
	return s
}

// quicAsk connects from the Host to svc:443 over QUIC for name and sends
// one stream; it returns the answer and the connection, open until the
// caller closes it.
// quicInitials returns the first flight a quic-go client sends for name
// (its Initial packets, with the whole ClientHello), read on loopback in
// the test's own namespace.
func quicInitials(t *testing.T, name string) [][]byte {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	ctx, cancel := context.WithCancel(context.Background())
	dialed := make(chan struct{})
	go func() {
		defer close(dialed)
		quic.DialAddr(ctx, pc.LocalAddr().String(), &tls.Config{ServerName: name, NextProtos: []string{quicALPN}}, nil)
	}()
	defer func() {
		cancel()
		<-dialed
	}()
	// The flight's datagrams come back to back; the client's first
	// retransmission comes much later.
	var got [][]byte
	buf := make([]byte, 65536)
	pc.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		n, _, err := pc.ReadFrom(buf)
		if err != nil {
			if len(got) == 0 {
				t.Fatalf("no Initial from the QUIC client: %v", err)
			}
			return got
		}
		got = append(got, bytes.Clone(buf[:n]))
		pc.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	}
}

func quicAsk(ctx context.Context, host *netnstest.NS, ca *testCA, svc netip.Addr, name string) (string, func(), error) {
	network, local := "udp4", "0.0.0.0:0"
	if svc.Is6() {
		network, local = "udp6", "[::]:0"
	}
	pc, err := host.ListenPacket(network, local)
	if err != nil {
		return "", nil, err
	}
	hs := 10 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		hs = time.Until(dl)
	}
	conn, err := quic.Dial(ctx, pc, net.UDPAddrFromAddrPort(netip.AddrPortFrom(svc, 443)),
		&tls.Config{ServerName: name, RootCAs: ca.pool, NextProtos: []string{quicALPN}},
		&quic.Config{HandshakeIdleTimeout: hs})
	if err != nil {
		pc.Close()
		return "", nil, fmt.Errorf("QUIC handshake for %s: %w", name, err)
	}
	closeAll := func() {
		conn.CloseWithError(0, "")
		pc.Close()
	}
	str, err := conn.OpenStreamSync(ctx)
	if err != nil {
		closeAll()
		return "", nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		str.SetDeadline(dl)
	}
	fmt.Fprintf(str, "ping %s", name)
	str.Close()
	got, err := io.ReadAll(str)
	if err != nil {
		closeAll()
		return "", nil, fmt.Errorf("QUIC stream for %s: %w", name, err)
	}
	return string(got), closeAll, nil
}

func TestNameQUIC(t *testing.T) {
	netnstest.RequireRoot(t)
	// The server's counting wrapper is no *net.UDPConn, whose buffers
	// quic-go would size: it says so, harmlessly.
	t.Setenv("QUIC_GO_DISABLE_RECEIVE_BUFFER_WARNING", "true")
	topo := netnstest.NewTopology(t)
	ca := newTestCA(t, webNames...)
	servers := map[netip.Addr]*quicServer{}
	for _, svc := range []netip.Addr{topo.ServiceV4, topo.ServiceV6} {
		servers[svc] = startQUICServer(t, topo.Server, svc, ca)
	}
	ask := func(t *testing.T, svc netip.Addr, name string, d time.Duration) (string, func(), error) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), d)
		defer cancel()
		return quicAsk(ctx, topo.Host, ca, svc, name)
	}
	allowed := func(t *testing.T, svc netip.Addr, name string) func() {
		t.Helper()
		got, closeConn, err := ask(t, svc, name, 10*time.Second)
		if want := fmt.Sprintf("quic %s: ping %s", name, name); err != nil || got != want {
			t.Fatalf("QUIC to %s at %s: %q, %v; want %q", name, svc, got, err, want)
		}
		return closeConn
	}

	t.Run("direct", func(t *testing.T) {
		for _, svc := range []netip.Addr{topo.ServiceV4, topo.ServiceV6} {
			for _, name := range []string{"good.example", "bad.example", "other.example"} {
				allowed(t, svc, name)()
			}
		}
	})
	if t.Failed() {
		return
	}

	cfg := writeConfig(t, namesQUICConfig)
	startTunfw(t, topo.Host, cfg)
	for _, svc := range []netip.Addr{topo.ServiceV4, topo.ServiceV6} {
		t.Run(famName(svc), func(t *testing.T) {
			srv := servers[svc]
			t.Run("allowed", func(t *testing.T) {
				before := srv.accepted.Load()
				closeConn := allowed(t, svc, "www.good.example")
				defer closeConn()
				if n := srv.accepted.Load() - before; n != 1 {
					t.Errorf("server accepted %d QUIC connections for one", n)
				}
				// The flow is listed with the name its Initial gave.
				f := findNameFlow(nameFlows(t, cfg, "--proto", "udp"), "udp", netip.AddrPortFrom(svc, 443))
				if f == nil || f.Name != "www.good.example" || f.NameFrom != "quic" || f.Rule != "good-quic" || f.Verdict != "allow" {
					t.Errorf("QUIC flow listed as %+v, want name www.good.example from quic, rule good-quic, allow", f)
				}
			})
			t.Run("rejected", func(t *testing.T) {
				// A name rejected after its Initial was read: the
				// client's socket is refused at once, for the
				// datagrams that were held, as for a datagram rejected
				// on arrival; nothing reaches the server.
				packets := srv.packets.Load()
				initials := quicInitials(t, "refused.example")
				c, err := topo.Host.Dial("udp", netip.AddrPortFrom(svc, 443).String())
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				start := time.Now()
				for _, d := range initials {
					if _, err := c.Write(d); err != nil {
						t.Fatalf("send Initial: %v", err)
					}
				}
				c.SetReadDeadline(time.Now().Add(3 * time.Second))
				_, err = c.Read(make([]byte, 1500))
				if !errors.Is(err, syscall.ECONNREFUSED) {
					t.Fatalf("QUIC Initial for a rejected name: %v after %v, want connection refused", err, time.Since(start))
				}
				if n := srv.packets.Load() - packets; n != 0 {
					t.Errorf("server read %d datagrams of a rejected flow, want none", n)
				}
			})
			for _, name := range []string{"bad.example", "other.example"} {
				t.Run("denied-"+name, func(t *testing.T) {
					packets, accepted := srv.packets.Load(), srv.accepted.Load()
					got, closeConn, err := ask(t, svc, name, time.Second)
					if err == nil {
						closeConn()
						t.Fatalf("QUIC to denied %s: got %q", name, got)
					}
					// The client gave up after sending its Initials
					// for a second: not one may have reached the server.
					if n := srv.packets.Load() - packets; n != 0 {
						t.Errorf("QUIC to denied %s: server read %d datagrams, want none", name, n)
					}
					// The server still serves allowed names, and its
					// only new connection is that one.
					allowed(t, svc, "good.example")()
					if n := srv.accepted.Load() - accepted; n != 1 {
						t.Errorf("QUIC to denied %s: server accepted %d connections, want 1 (the allowed one after it)", name, n)
					}
				})
			}
		})
	}
}

// namesDNSConfig (with the [dns] block answer as %s) lets DNS through and
// TCP ports 7000 (client-first) and 22 (server-first) only to addresses DNS
// answered for svc.example or cdn.example; names of a deny rule by domain alone are answered by tunfw
// itself, from a list, a set and a list file.
const namesDNSConfig = namesBase + `
[filter]
default = "deny"
log = "all"

[dns]
snoop = true
block = "%s"
max_names = 100000

[sets]
ads = ["doubleclick.net", "*.doubleclick.net"]
blocklist = { file = "blocklist.txt" }

[[rule]]
name = "blocked"
action = "deny"
domain = ["blocked.example", "@ads", "@blocklist"]

[[rule]]
name = "resolver"
action = "allow"
proto = ["udp", "tcp"]
dst_port = 53

[[rule]]
name = "svc"
action = "allow"
proto = "tcp"
dst_port = [7000, 22]
domain = ["svc.example", "cdn.example"]
`

// blocklistFile holds one name of each form a list file may use.
const blocklistFile = `# names tunfw answers for itself
plain-blocked.example
0.0.0.0 hosts-blocked.example
||adblock-blocked.example^
! an adblock comment
`

// dnsTTL is the TTL of every record dnsmasq gives.
const dnsTTL = 2 * time.Second

// blockedNames are the names whose queries tunfw answers itself.
var blockedNames = []string{"blocked.example", "doubleclick.net", "ad.doubleclick.net",
	"plain-blocked.example", "hosts-blocked.example", "adblock-blocked.example", "use-application-dns.net"}

// dnsEnv is the usual topology with dnsmasq on port 53 of the service
// addresses and TCP servers on the addresses its names give: .40 for
// svc.example (echo on 7000, SSH-like banner on 22), .41 for
// edge.cdnhost.example (cdn.example is a CNAME of it; echo on 7000), .42
// for the blocked names, which dnsmasq would answer.
type dnsEnv struct {
	topo *netnstest.Topology
	dns  *dnsServer
	srv  map[netip.AddrPort]*tcpServer
}

func newDNSEnv(t *testing.T) *dnsEnv {
	t.Helper()
	netnstest.RequireRoot(t)
	if _, err := exec.LookPath("dig"); err != nil {
		t.Skip("dig not installed (apt-get install dnsutils)")
	}
	e := &dnsEnv{topo: netnstest.NewTopology(t), srv: map[netip.AddrPort]*tcpServer{}}
	v4, v6 := e.topo.ServiceV4, e.topo.ServiceV6
	for _, svc := range []netip.Addr{v4, v6} {
		for _, n := range []int{40, 41} {
			addServerAddr(t, e.topo, sibling(svc, n))
		}
		for _, at := range []netip.AddrPort{
			netip.AddrPortFrom(sibling(svc, 40), 7000),
			netip.AddrPortFrom(sibling(svc, 40), sshPort),
			netip.AddrPortFrom(sibling(svc, 41), 7000),
		} {
			e.srv[at] = startTCPServer(t, e.topo.Server, at)
		}
	}
	rec := func(name string, n int) string {
		return fmt.Sprintf("--host-record=%s,%s,%s,%d", name, sibling(v4, n), sibling(v6, n), dnsTTL/time.Second)
	}
	records := []string{
		rec("svc.example", 40),
		rec("edge.cdnhost.example", 41),
		fmt.Sprintf("--cname=cdn.example,edge.cdnhost.example,%d", dnsTTL/time.Second),
		rec("marker.example", 43),
	}
	for _, n := range blockedNames {
		records = append(records, rec(n, 42))
	}
	e.dns = startDnsmasq(t, e.topo.Server, []netip.Addr{v4, v6}, records...)
	return e
}

// startTunfw writes namesDNSConfig with block, and the list file beside
// it, and starts tunfw.
func (e *dnsEnv) startTunfw(t *testing.T, block string) (string, *tunfwProc) {
	t.Helper()
	cfg := writeConfig(t, fmt.Sprintf(namesDNSConfig, block))
	if err := os.WriteFile(filepath.Join(filepath.Dir(cfg), "blocklist.txt"), []byte(blocklistFile), 0o600); err != nil {
		t.Fatal(err)
	}
	return cfg, startTunfw(t, e.topo.Host, cfg)
}

// dig asks the dnsmasq of svc's family from the Host.
func (e *dnsEnv) dig(t *testing.T, svc netip.Addr, name, qtype string) digResult {
	t.Helper()
	return dig(t, e.topo.Host, svc, name, qtype)
}

// qtypeOf is the query type for addresses of svc's family.
func qtypeOf(svc netip.Addr) string {
	if svc.Is6() {
		return "AAAA"
	}
	return "A"
}

// resolve asks for name in svc's family, as the Host's client for that
// family (tunfw learns per client), and wants exactly want.
func (e *dnsEnv) resolve(t *testing.T, svc netip.Addr, name string, want netip.Addr) {
	t.Helper()
	r := e.dig(t, svc, name, qtypeOf(svc))
	if got := r.addrs(); r.status != "NOERROR" || len(got) != 1 || got[0] != want {
		t.Fatalf("dig %s %s: %s %v, want NOERROR %s\n%s", name, qtypeOf(svc), r.status, got, want, r.out)
	}
}

// talkFails wants every at to refuse the Host's exchange (talkThrough),
// all tried at once, and no new connection at its server.
func (e *dnsEnv) talkFails(t *testing.T, why string, ats ...netip.AddrPort) {
	t.Helper()
	errs := make([]error, len(ats))
	before := make([]int64, len(ats))
	var wg sync.WaitGroup
	for i, at := range ats {
		before[i] = e.srv[at].n.Load()
		wg.Go(func() { errs[i] = talkThrough(e.topo.Host, at, 800*time.Millisecond) })
	}
	wg.Wait()
	for i, at := range ats {
		if errs[i] == nil {
			t.Errorf("%s: talk through %s worked, want it refused", why, at)
		}
		if n := e.srv[at].n.Load() - before[i]; n != 0 {
			t.Errorf("%s: %s's server accepted %d connections, want none", why, at, n)
		}
	}
}

func TestNameDNS(t *testing.T) {
	e := newDNSEnv(t)
	host := e.topo.Host
	v4, v6 := e.topo.ServiceV4, e.topo.ServiceV6
	fams := []netip.Addr{v4, v6}

	// The control: straight over the veth, dnsmasq answers every name,
	// the blocked ones too, and every echo server answers.
	t.Run("direct", func(t *testing.T) {
		for _, svc := range fams {
			e.resolve(t, svc, "svc.example", sibling(svc, 40))
			e.resolve(t, svc, "blocked.example", sibling(svc, 42))
			e.resolve(t, svc, "use-application-dns.net", sibling(svc, 42))
			for _, at := range []netip.AddrPort{
				netip.AddrPortFrom(sibling(svc, 40), 7000),
				netip.AddrPortFrom(sibling(svc, 40), sshPort),
				netip.AddrPortFrom(sibling(svc, 41), 7000),
			} {
				if err := talkThrough(host, at, 5*time.Second); err != nil {
					t.Error(err)
				}
			}
		}
	})
	if t.Failed() {
		return
	}

	// tunfw without rules by name forwards every query, the canary's too,
	// and lets the echo through by address.
	t.Run("no-name-rules", func(t *testing.T) {
		fw := startTunfw(t, host, writeConfig(t, namesBase+"[filter]\ndefault = \"allow\"\n"))
		defer fw.stop()
		before := e.dns.queries("use-application-dns.net")
		for _, svc := range fams {
			e.resolve(t, svc, "use-application-dns.net", sibling(svc, 42))
			e.resolve(t, svc, "blocked.example", sibling(svc, 42))
			if err := talkThrough(host, netip.AddrPortFrom(sibling(svc, 40), 7000), 5*time.Second); err != nil {
				t.Error(err)
			}
		}
		e.dns.waitQueries(t, "use-application-dns.net", before+2, 5*time.Second)
	})
	if t.Failed() {
		return
	}

	_, fw := e.startTunfw(t, "nxdomain")

	t.Run("blocked-nxdomain", func(t *testing.T) {
		before := map[string]int{}
		for _, n := range blockedNames {
			before[n] = e.dns.queries(n)
		}
		for i, name := range blockedNames {
			svc := fams[i%2]
			for _, qtype := range []string{"A", "AAAA"} {
				r := e.dig(t, svc, name, qtype)
				if r.status != "NXDOMAIN" || len(r.answers) != 0 {
					t.Errorf("dig @%s %s %s through tunfw: %s %v, want NXDOMAIN from tunfw\n%s", svc, name, qtype, r.status, r.answers, r.out)
				}
			}
		}
		// A query dnsmasq answers after them: once it is logged, the
		// blocked ones would be too had they been forwarded.
		m := e.dns.queries("marker.example")
		e.resolve(t, v4, "marker.example", sibling(v4, 43))
		e.dns.waitQueries(t, "marker.example", m+1, 5*time.Second)
		for _, n := range blockedNames {
			if got := e.dns.queries(n) - before[n]; got != 0 {
				t.Errorf("%d queries for blocked %s reached dnsmasq, want none", got, n)
			}
		}
	})

	t.Run("learned", func(t *testing.T) {
		// svc.example's address on a client-first port (tunfw reads the
		// first bytes, finds no name in them, and takes the DNS one) and
		// on a server-first one (judged at the first packet by the DNS
		// name); cdn.example's.
		var svcAt, cdnAt []netip.AddrPort
		for _, svc := range fams {
			svcAt = append(svcAt, netip.AddrPortFrom(sibling(svc, 40), 7000), netip.AddrPortFrom(sibling(svc, 40), sshPort))
			cdnAt = append(cdnAt, netip.AddrPortFrom(sibling(svc, 41), 7000))
		}
		// Before any answer named them, the addresses are nobody's.
		e.talkFails(t, "before any DNS answer", append(svcAt, cdnAt...)...)
		// The CNAME's target asked for by its own name is not a name
		// the rule lists.
		for _, svc := range fams {
			e.resolve(t, svc, "edge.cdnhost.example", sibling(svc, 41))
		}
		e.talkFails(t, "named edge.cdnhost.example", cdnAt...)

		// Now by the names the rule lists: directly, and through the
		// CNAME chain cdn.example -> edge.cdnhost.example.
		learned := time.Now()
		n := e.dns.queries("svc.example")
		for _, svc := range fams {
			e.resolve(t, svc, "svc.example", sibling(svc, 40))
			r := e.dig(t, svc, "cdn.example", qtypeOf(svc))
			if got := r.addrs(); r.status != "NOERROR" || len(got) != 1 || got[0] != sibling(svc, 41) || !strings.Contains(r.out, "CNAME") {
				t.Fatalf("dig cdn.example %s: %s %v, want a CNAME to edge.cdnhost.example and %s\n%s", qtypeOf(svc), r.status, got, sibling(svc, 41), r.out)
			}
		}
		// Allowed names were forwarded to dnsmasq.
		e.dns.waitQueries(t, "svc.example", n+2, 5*time.Second)
		all := append(append([]netip.AddrPort(nil), svcAt...), cdnAt...)
		for _, at := range all {
			before := e.srv[at].n.Load()
			if err := talkThrough(host, at, 2*time.Second); err != nil {
				t.Fatalf("after the DNS answer: %v", err)
			}
			if n := e.srv[at].n.Load() - before; n != 1 {
				t.Errorf("%s's server accepted %d connections for one", at, n)
			}
		}
		if took := time.Since(learned); took > dnsTTL*3/4 {
			t.Logf("learning and checking took %v of the %v TTL: the expiry check below is weaker", took, dnsTTL)
		}

		// The names expire with their answers' TTL: poll each address
		// until it is refused, which must happen within the TTL and a
		// second of margin, and not before the TTL.
		var wg sync.WaitGroup
		for _, at := range all {
			wg.Go(func() {
				for {
					start := time.Now()
					err := talkThrough(host, at, 800*time.Millisecond)
					if err != nil {
						if start.Before(learned.Add(dnsTTL - 500*time.Millisecond)) {
							t.Errorf("%s refused %v after the DNS answer, before its %v TTL: %v", at, start.Sub(learned).Round(time.Millisecond), dnsTTL, err)
						}
						t.Logf("%s refused %v after the DNS answer (TTL %v)", at, start.Sub(learned).Round(time.Millisecond), dnsTTL)
						return
					}
					if start.After(learned.Add(dnsTTL + time.Second)) {
						t.Errorf("%s still let through %v after the DNS answer (TTL %v)", at, start.Sub(learned).Round(time.Millisecond), dnsTTL)
						return
					}
					time.Sleep(100 * time.Millisecond)
				}
			})
		}
		wg.Wait()
	})

	t.Run("tcp", func(t *testing.T) {
		// DNS over TCP is read too: a blocked query is answered by
		// tunfw and never reaches dnsmasq; an answer names its address.
		before := e.dns.queries("blocked.example")
		for _, svc := range fams {
			r := dig(t, host, svc, "blocked.example", qtypeOf(svc), "+tcp")
			if r.status != "NXDOMAIN" || len(r.answers) != 0 {
				t.Errorf("dig +tcp @%s blocked.example: %s %v, want NXDOMAIN from tunfw\n%s", svc, r.status, r.answers, r.out)
			}
		}
		var svcAt []netip.AddrPort
		for _, svc := range fams {
			svcAt = append(svcAt, netip.AddrPortFrom(sibling(svc, 40), 7000))
		}
		// The names learned over UDP have expired (learned, above).
		e.talkFails(t, "before the TCP answer", svcAt...)
		m := e.dns.queries("svc.example")
		for _, svc := range fams {
			r := dig(t, host, svc, "svc.example", qtypeOf(svc), "+tcp")
			if got := r.addrs(); r.status != "NOERROR" || len(got) != 1 || got[0] != sibling(svc, 40) {
				t.Fatalf("dig +tcp svc.example: %s %v\n%s", r.status, got, r.out)
			}
		}
		e.dns.waitQueries(t, "svc.example", m+2, 5*time.Second)
		for _, at := range svcAt {
			if err := talkThrough(host, at, 2*time.Second); err != nil {
				t.Errorf("after the DNS-over-TCP answer: %v", err)
			}
		}
		if got := e.dns.queries("blocked.example") - before; got != 0 {
			t.Errorf("%d TCP queries for blocked.example reached dnsmasq, want none", got)
		}
	})

	t.Run("blocked-zero", func(t *testing.T) {
		fw.stop()
		e.startTunfw(t, "zero")
		before := e.dns.queries("blocked.example")
		for _, svc := range fams {
			for _, qtype := range []string{"A", "AAAA"} {
				want := netip.IPv4Unspecified()
				if qtype == "AAAA" {
					want = netip.IPv6Unspecified()
				}
				r := e.dig(t, svc, "blocked.example", qtype)
				if got := r.addrs(); r.status != "NOERROR" || len(got) != 1 || got[0] != want {
					t.Errorf("dig @%s blocked.example %s with block = zero: %s %v, want NOERROR %s\n%s", svc, qtype, r.status, got, want, r.out)
				}
			}
		}
		// The canary is NXDOMAIN whatever the block answer: a browser
		// must not take 0.0.0.0 for "DNS over HTTPS allowed".
		canary := e.dns.queries("use-application-dns.net")
		for _, svc := range fams {
			if r := e.dig(t, svc, "use-application-dns.net", qtypeOf(svc)); r.status != "NXDOMAIN" || len(r.answers) != 0 {
				t.Errorf("dig @%s use-application-dns.net with block = zero: %s %v, want NXDOMAIN\n%s", svc, r.status, r.answers, r.out)
			}
		}
		m := e.dns.queries("marker.example")
		e.resolve(t, v6, "marker.example", sibling(v6, 43))
		e.dns.waitQueries(t, "marker.example", m+1, 5*time.Second)
		if n := e.dns.queries("blocked.example") - before; n != 0 {
			t.Errorf("%d queries for blocked.example reached dnsmasq, want none", n)
		}
		if n := e.dns.queries("use-application-dns.net") - canary; n != 0 {
			t.Errorf("%d queries for use-application-dns.net reached dnsmasq, want none", n)
		}
	})
}

// explainCase is one `tunfw explain` query and what it must say.
type explainCase struct {
	args        []string // PROTO SRC DST
	verdict     string
	rule        string
	peek        bool
	name        string   // the flow's name, "" for none
	matched     string   // the rule that matched, "" for the default
	notMatching []string // rules consulted before it that did not match
}

// checkExplain runs `tunfw explain` with how (-c FILE or --socket PATH)
// for c, as text and as JSON.
func checkExplain(t *testing.T, how []string, c explainCase) {
	t.Helper()
	ex := explainJSON(t, append(append([]string(nil), how...), c.args...)...)
	if ex.Verdict != c.verdict || ex.Rule != c.rule || ex.Peek != c.peek || ex.Name != c.name {
		t.Errorf("explain %v: verdict %q rule %q peek %v name %q, want %q %q %v %q\n%+v",
			c.args, ex.Verdict, ex.Rule, ex.Peek, ex.Name, c.verdict, c.rule, c.peek, c.name, ex)
	}
	byRule := map[string]int{}
	for i, r := range ex.Rules {
		byRule[r.Rule] = i
		if r.Index < 1 {
			t.Errorf("explain %v: rule %q has index %d, want its 1-based place", c.args, r.Rule, r.Index)
		}
		if !r.Matched && r.Why == "" {
			t.Errorf("explain %v: rule %q did not match and says no why", c.args, r.Rule)
		}
	}
	for _, n := range c.notMatching {
		if i, ok := byRule[n]; !ok || ex.Rules[i].Matched {
			t.Errorf("explain %v: rule %q not listed as consulted and not matching: %+v", c.args, n, ex.Rules)
		}
	}
	if c.matched != "" {
		if len(ex.Rules) == 0 || !ex.Rules[len(ex.Rules)-1].Matched || ex.Rules[len(ex.Rules)-1].Rule != c.matched ||
			ex.Rules[len(ex.Rules)-1].Action != c.verdict {
			t.Errorf("explain %v: last rule consulted %+v, want %q matching with %s", c.args, ex.Rules, c.matched, c.verdict)
		}
	}

	text := runExplain(t, append(append([]string(nil), how...), c.args...)...)
	want := []string{fmt.Sprintf("verdict: %s (rule %s)", c.verdict, c.rule), "peek: no"}
	if c.peek {
		want[1] = "peek: yes"
	}
	if c.matched != "" {
		want = append(want, "MATCH")
	}
	if len(c.notMatching) > 0 {
		want = append(want, "no: ")
	}
	if c.name != "" {
		want = append(want, c.name)
	}
	for _, w := range want {
		if !strings.Contains(text, w) {
			t.Errorf("explain %v (text) lacks %q:\n%s", c.args, w, text)
		}
	}
}

func TestNameExplain(t *testing.T) {
	e := newDNSEnv(t)
	cfg, _ := e.startTunfw(t, "nxdomain")
	client := namesClientV4.String() + ":40000"
	svcAt := hostPort(sibling(e.topo.ServiceV4, 40), 7000)

	offline := []string{"-c", cfg}
	t.Run("offline-allowed", func(t *testing.T) {
		checkExplain(t, offline, explainCase{args: []string{"tcp", client, "svc.example:7000"},
			verdict: "allow", rule: "svc", peek: true, name: "svc.example", matched: "svc", notMatching: []string{"blocked", "resolver"}})
	})
	t.Run("offline-denied", func(t *testing.T) {
		// Denied by name where the default denies too: no name could
		// change the verdict, so nothing is read first.
		checkExplain(t, offline, explainCase{args: []string{"tcp", client, "ad.doubleclick.net:443"},
			verdict: "deny", rule: "blocked", peek: false, name: "ad.doubleclick.net", matched: "blocked"})
	})
	t.Run("offline-peeked-no-name", func(t *testing.T) {
		// An address nobody named: the svc rule could allow it once a
		// name is known, so tunfw would read the flow first.
		checkExplain(t, offline, explainCase{args: []string{"tcp", client, svcAt},
			verdict: "deny", rule: "default", peek: true, notMatching: []string{"blocked", "resolver", "svc"}})
	})
	t.Run("offline-not-peeked", func(t *testing.T) {
		// DNS over UDP: no name can be read from it, decided at once.
		checkExplain(t, offline, explainCase{args: []string{"udp", client, hostPort(e.topo.ServiceV4, 53)},
			verdict: "allow", rule: "resolver", peek: false, matched: "resolver"})
	})

	t.Run("offline-server-first", func(t *testing.T) {
		// On a port where the server speaks first tunfw cannot wait for
		// the client's bytes: the DNS name alone decides, at once.
		sshAt := hostPort(sibling(e.topo.ServiceV4, 40), sshPort)
		checkExplain(t, offline, explainCase{args: []string{"tcp", client, sshAt},
			verdict: "deny", rule: "default", peek: false, notMatching: []string{"blocked", "resolver", "svc"}})
		checkExplain(t, offline, explainCase{args: []string{"tcp", client, fmt.Sprintf("svc.example:%d", sshPort)},
			verdict: "allow", rule: "svc", peek: false, name: "svc.example", matched: "svc"})
	})

	running := []string{"--socket", socketOf(cfg)}
	for _, svc := range []netip.Addr{e.topo.ServiceV4, e.topo.ServiceV6} {
		t.Run("running-dns-"+famName(svc), func(t *testing.T) {
			src := netip.AddrPortFrom(clientAddr(svc), 40000).String()
			at := hostPort(sibling(svc, 40), 7000)
			// Before the answer the running tunfw knows no name either.
			checkExplain(t, running, explainCase{args: []string{"tcp", src, at},
				verdict: "deny", rule: "default", peek: true, notMatching: []string{"svc"}})
			e.resolve(t, svc, "svc.example", sibling(svc, 40))
			c := explainCase{args: []string{"tcp", src, at}, verdict: "allow", rule: "svc", peek: true,
				name: "svc.example", matched: "svc", notMatching: []string{"blocked", "resolver"}}
			checkExplain(t, running, c)
			if ex := explainJSON(t, append(running, c.args...)...); ex.NameFrom != "dns" {
				t.Errorf("explain %v: name_from %q, want dns", c.args, ex.NameFrom)
			}
			if text := runExplain(t, append(running, c.args...)...); !strings.Contains(text, "dns") {
				t.Errorf("explain %v (text) does not say the name came from dns:\n%s", c.args, text)
			}
			// Another client asked nothing: names are per client.
			other := netip.AddrPortFrom(sibling(clientAddr(svc), 2), 40000).String()
			checkExplain(t, running, explainCase{args: []string{"tcp", other, at},
				verdict: "deny", rule: "default", peek: true, notMatching: []string{"svc"}})
		})
	}
}

// namesFlowsConfig lets the good.example names through on the web ports
// and svc.example, as DNS names it, on 7000.
const namesFlowsConfig = namesBase + `
[filter]
default = "deny"
log = "all"

[dns]
snoop = true

[[rule]]
name = "resolver"
action = "allow"
proto = "udp"
dst_port = 53

[[rule]]
name = "good"
action = "allow"
proto = "tcp"
dst_port = [80, 443]
domain = ["good.example", "*.good.example"]

[[rule]]
name = "svc"
action = "allow"
proto = "tcp"
dst_port = 7000
domain = "svc.example"
`

func TestNameFlowsListing(t *testing.T) {
	e := newDNSEnv(t)
	ca := newTestCA(t, webNames...)
	for _, svc := range []netip.Addr{e.topo.ServiceV4, e.topo.ServiceV6} {
		startWebServer(t, e.topo.Server, svc, ca)
	}
	cfg := writeConfig(t, namesFlowsConfig+"\n[metrics]\nlisten = \"127.0.0.1:9479\"\n")
	startTunfw(t, e.topo.Host, cfg)
	host := e.topo.Host
	v4 := e.topo.ServiceV4
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()

	// Three live connections, each named its own way.
	type named struct {
		dst        netip.AddrPort
		name, from string
		rule       string
		open       func() (net.Conn, error)
	}
	get := func(c io.ReadWriter, name string) error {
		fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", name)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return err
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err == nil && !strings.HasPrefix(string(body), "hello "+name) {
			err = fmt.Errorf("page %q", body)
		}
		return err
	}
	var conns []named
	for _, svc := range []netip.Addr{v4, e.topo.ServiceV6} {
		conns = append(conns, named{dst: netip.AddrPortFrom(svc, 443), name: "good.example", from: "sni", rule: "good",
			open: func() (net.Conn, error) {
				raw, err := host.DialContext(ctx, "tcp", hostPort(svc, 443))
				if err != nil {
					return nil, err
				}
				c := tls.Client(raw, &tls.Config{ServerName: "good.example", RootCAs: ca.pool, NextProtos: []string{"http/1.1"}})
				c.SetDeadline(time.Now().Add(10 * time.Second))
				return c, get(c, "good.example")
			}})
	}
	conns = append(conns,
		named{dst: netip.AddrPortFrom(v4, 80), name: "www.good.example", from: "host", rule: "good",
			open: func() (net.Conn, error) {
				c, err := host.DialContext(ctx, "tcp", hostPort(v4, 80))
				if err != nil {
					return nil, err
				}
				c.SetDeadline(time.Now().Add(10 * time.Second))
				return c, get(c, "www.good.example")
			}},
		named{dst: netip.AddrPortFrom(sibling(v4, 40), 7000), name: "svc.example", from: "dns", rule: "svc",
			open: func() (net.Conn, error) {
				e.resolve(t, v4, "svc.example", sibling(v4, 40))
				c, err := host.DialContext(ctx, "tcp", hostPort(sibling(v4, 40), 7000))
				if err != nil {
					return nil, err
				}
				c.SetDeadline(time.Now().Add(10 * time.Second))
				fmt.Fprintf(c, "ping\n")
				line, err := bufio.NewReader(c).ReadString('\n')
				if err == nil && line != "ping\n" {
					err = fmt.Errorf("echo %q", line)
				}
				return c, err
			}})
	for _, n := range conns {
		c, err := n.open()
		if c != nil {
			defer c.Close()
		}
		if err != nil {
			t.Fatalf("%s (%s) through tunfw: %v", n.dst, n.name, err)
		}
	}

	flows := nameFlows(t, cfg)
	for _, n := range conns {
		f := findNameFlow(flows, "tcp", n.dst)
		if f == nil || f.Name != n.name || f.NameFrom != n.from || f.Rule != n.rule || f.Verdict != "allow" || f.State != "established" {
			t.Errorf("flow to %s: %+v, want name %s from %s, rule %s, allow, established", n.dst, f, n.name, n.from, n.rule)
		}
	}

	t.Run("filter-name", func(t *testing.T) {
		got := nameFlows(t, cfg, "--name", "good.example")
		for _, f := range got {
			if f.Name != "good.example" {
				t.Errorf("--name good.example listed %+v", f)
			}
		}
		for _, svc := range []netip.Addr{v4, e.topo.ServiceV6} {
			if findNameFlow(got, "tcp", netip.AddrPortFrom(svc, 443)) == nil {
				t.Errorf("--name good.example did not list the flow to %s:443: %+v", svc, got)
			}
		}
		got = nameFlows(t, cfg, "--name", "*.good.example")
		for _, f := range got {
			if !strings.HasSuffix(f.Name, ".good.example") {
				t.Errorf("--name *.good.example listed %+v", f)
			}
		}
		if findNameFlow(got, "tcp", netip.AddrPortFrom(v4, 80)) == nil {
			t.Errorf("--name *.good.example did not list the HTTP flow: %+v", got)
		}
		got = nameFlows(t, cfg, "--name", "svc.example")
		if len(got) == 0 || findNameFlow(got, "tcp", netip.AddrPortFrom(sibling(v4, 40), 7000)) == nil {
			t.Errorf("--name svc.example: %+v, want the flow to .40:7000", got)
		}
		for _, f := range got {
			if f.Name != "svc.example" {
				t.Errorf("--name svc.example listed %+v", f)
			}
		}
	})

	t.Run("counters", func(t *testing.T) {
		// tunfw stats and the metrics count the flows peeked, the names
		// read by source and learned from DNS.
		out, errOut, code := ctl(t, cfg, "stats", "--json")
		if code != 0 {
			t.Fatalf("tunfw stats: exit %d: %s", code, errOut)
		}
		var st struct {
			Names      map[string]uint64 `json:"names"`
			NamesKnown int               `json:"dns_names"`
		}
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			t.Fatalf("stats --json: %v\n%s", err, out)
		}
		if st.Names["peeked"] < 3 || st.Names["sni"] < 2 || st.Names["host"] < 1 || st.Names["names_learned"] < 1 || st.NamesKnown < 1 {
			t.Errorf("stats names: %v, %d names known; want peeked >= 3, sni >= 2, host >= 1, names_learned >= 1", st.Names, st.NamesKnown)
		}
		m := scrapeMetrics(t, host, "127.0.0.1:9479")
		for _, k := range []string{"tunfw_name_events_total,event=peeked", "tunfw_name_events_total,event=sni", "tunfw_name_events_total,event=host",
			"tunfw_name_events_total,event=names_learned", "tunfw_dns_names"} {
			if m[k] < 1 {
				t.Errorf("metric %s = %v, want at least 1", k, m[k])
			}
		}
		text, _, _ := ctl(t, cfg, "stats")
		if !strings.Contains(text, "rules by name") || !strings.Contains(text, "names remembered from DNS answers") {
			t.Errorf("tunfw stats text lacks the rules-by-name counters:\n%s", text)
		}
	})

	t.Run("table", func(t *testing.T) {
		out, errOut, code := ctl(t, cfg, "flows")
		if code != 0 {
			t.Fatalf("tunfw flows: exit %d: %s", code, errOut)
		}
		header, _, _ := strings.Cut(out, "\n")
		if !strings.Contains(header, "NAME") {
			t.Errorf("flows table header has no NAME column: %q", header)
		}
		for _, n := range conns {
			if !strings.Contains(out, n.name) {
				t.Errorf("flows table does not show %s:\n%s", n.name, out)
			}
		}
	})
}

// namesPeekLimitsConfig peeks every TCP flow to port 7000 (a rule by name
// denies one name there; the default allows), with short [inspect] bounds.
const namesPeekLimitsConfig = namesBase + `
[filter]
default = "allow"

[inspect]
timeout = "300ms"
max_bytes = 512

[[rule]]
name = "not-this"
action = "deny"
proto = "tcp"
dst_port = 7000
domain = "nope.example"
`

// TestNamePeekLimits: a client that sends nothing is decided at [inspect]
// timeout as if no name were known, and one whose first bytes carry no
// name within max_bytes at that bound; in both cases everything it sent
// reaches the destination, and the counters say why.
func TestNamePeekLimits(t *testing.T) {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	at := netip.AddrPortFrom(topo.ServiceV4, 7000)
	srv := startTCPServer(t, topo.Server, at)
	cfg := writeConfig(t, namesPeekLimitsConfig)
	startTunfw(t, topo.Host, cfg)

	t.Run("silent-client", func(t *testing.T) {
		before := srv.n.Load()
		c, err := topo.Host.DialTimeout("tcp", at.String(), 2*time.Second)
		if err != nil {
			t.Fatalf("connect: %v", err)
		}
		defer c.Close()
		start := time.Now()
		// The handshake completed at once; the destination is dialled
		// only when tunfw gives up waiting for a name.
		for srv.n.Load() == before {
			if time.Since(start) > 3*time.Second {
				t.Fatal("the destination was never dialled for a client that sent nothing")
			}
			time.Sleep(10 * time.Millisecond)
		}
		if took := time.Since(start); took < 250*time.Millisecond {
			t.Errorf("destination dialled %v after the connect, before [inspect] timeout (300ms)", took)
		}
		// The connection works once decided.
		c.SetDeadline(time.Now().Add(2 * time.Second))
		io.WriteString(c, "late\n")
		if got, err := bufio.NewReader(c).ReadString('\n'); err != nil || got != "late\n" {
			t.Errorf("echo after the timeout: %q, %v", got, err)
		}
	})

	t.Run("max-bytes", func(t *testing.T) {
		// An HTTP request whose headers never end within max_bytes.
		req := "GET / HTTP/1.1\r\nX-Pad: " + strings.Repeat("a", 700) + "\n"
		c, err := topo.Host.DialTimeout("tcp", at.String(), 2*time.Second)
		if err != nil {
			t.Fatalf("connect: %v", err)
		}
		defer c.Close()
		start := time.Now()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := io.WriteString(c, req); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(req))
		if _, err := io.ReadFull(c, got); err != nil || string(got) != req {
			t.Fatalf("echo of %d bytes sent before the decision: %d bytes, %v", len(req), len(got), err)
		}
		if took := time.Since(start); took > 250*time.Millisecond {
			t.Errorf("decided after %v: max_bytes should decide before the 300ms timeout", took)
		}
	})

	out, _, _ := ctl(t, cfg, "stats", "--json")
	var st struct {
		Names map[string]uint64 `json:"names"`
	}
	json.Unmarshal([]byte(out), &st)
	if st.Names["peeked"] != 2 || st.Names["peek_timeouts"] != 1 || st.Names["peek_no_name"] != 1 {
		t.Errorf("stats names: %v; want peeked 2, peek_timeouts 1, peek_no_name 1", st.Names)
	}
}
