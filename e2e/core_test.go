package e2e

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
)

// coreConfig polices the server's documentation prefixes. Ports and
// addresses each stand for one verdict, so every case below has a server
// that would answer if the filter let it through.
const coreConfig = `
[tun]
name = "tunfw0"
mtu = 1500
addresses = ["198.18.0.1/30", "fd54:756e:6677::1/126"]

[route]
include = ["203.0.113.0/24", "2001:db8:99::/48"]

[filter]
default = "allow"
log = "all"

[sets]
denied_hosts = ["203.0.113.20", "2001:db8:99::20"]
rejected_hosts = ["203.0.113.30/32", "2001:db8:99::30/128"]

[[rule]]
name = "deny-tcp"
action = "deny"
proto = "tcp"
dst_port = 9001

[[rule]]
name = "reject-tcp"
action = "reject"
proto = "tcp"
dst_port = ["9002-9002"]

[[rule]]
name = "deny-udp"
action = "deny"
proto = "udp"
dst_port = 7001

[[rule]]
name = "reject-udp"
action = "reject"
proto = ["udp"]
dst_port = 7002

[[rule]]
name = "deny-hosts"
action = "deny"
proto = "icmp"
dst = "@denied_hosts"

[[rule]]
name = "reject-hosts"
action = "reject"
proto = "icmp"
dst = ["@rejected_hosts"]
`

// coreEnv is a host namespace running tunfw with coreConfig, and a server
// namespace with servers on every port the config names.
type coreEnv struct {
	topo *netnstest.Topology
	fw   *tunfwProc
}

func newCoreEnv(t *testing.T) *coreEnv {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	for _, a := range []string{"203.0.113.20/32", "203.0.113.30/32", "2001:db8:99::20/128", "2001:db8:99::30/128"} {
		topo.Server.Run(t, "ip", "addr", "add", a, "dev", "lo")
	}
	for _, svc := range []netip.Addr{topo.ServiceV4, topo.ServiceV6} {
		startHTTP(t, topo.Server, netip.AddrPortFrom(svc, 8080))
		for _, port := range []uint16{9001, 9002} {
			startTCPEcho(t, topo.Server, netip.AddrPortFrom(svc, port))
		}
		for _, port := range []uint16{7000, 7001, 7002} {
			startUDPEcho(t, topo.Server, netip.AddrPortFrom(svc, port))
		}
	}
	fw := startTunfw(t, topo.Host, writeConfig(t, coreConfig))
	return &coreEnv{topo: topo, fw: fw}
}

func startHTTP(t *testing.T, ns *netnstest.NS, at netip.AddrPort) {
	ln, err := ns.Listen("tcp", at.String())
	if err != nil {
		t.Fatalf("listen %s: %v", at, err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s, you are %s", at, r.RemoteAddr)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}

// startTCPEcho serves an echo on at. The channel it returns hears of each
// connection accepted (up to 16 not yet received are kept), for tests that
// need to know whether one got through.
func startTCPEcho(t *testing.T, ns *netnstest.NS, at netip.AddrPort) <-chan struct{} {
	ln, err := ns.Listen("tcp", at.String())
	if err != nil {
		t.Fatalf("listen %s: %v", at, err)
	}
	t.Cleanup(func() { ln.Close() })
	accepted := make(chan struct{}, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			select {
			case accepted <- struct{}{}:
			default:
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return accepted
}

// startUDPEcho binds the service address itself, so replies leave from the
// address the client sent to.
func startUDPEcho(t *testing.T, ns *netnstest.NS, at netip.AddrPort) {
	serveUDP(t, ns, at, func(q []byte) []byte { return q })
}

// serveUDP answers each datagram received at at with reply(datagram); a
// nil reply sends nothing. It binds at itself, so replies leave from the
// address the client sent to.
func serveUDP(t *testing.T, ns *netnstest.NS, at netip.AddrPort, reply func(q []byte) []byte) {
	pc, err := ns.ListenPacket("udp", at.String())
	if err != nil {
		t.Fatalf("listen udp %s: %v", at, err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if r := reply(buf[:n]); r != nil {
				pc.WriteTo(r, from)
			}
		}
	}()
}

// families runs f for IPv4 and IPv6 service addresses.
func families(t *testing.T, env *coreEnv, f func(t *testing.T, svc netip.Addr)) {
	topoFamilies(t, env.topo, f)
}

// topoFamilies runs f as subtests v4 and v6 with topo's service address of
// each family.
func topoFamilies(t *testing.T, topo *netnstest.Topology, f func(t *testing.T, svc netip.Addr)) {
	for _, svc := range []netip.Addr{topo.ServiceV4, topo.ServiceV6} {
		name := "v4"
		if svc.Is6() {
			name = "v6"
		}
		t.Run(name, func(t *testing.T) { f(t, svc) })
	}
}

// sibling returns the service address with its last group replaced by n,
// written the same in both families: 203.0.113.10 -> 203.0.113.n,
// 2001:db8:99::10 -> 2001:db8:99::n.
func sibling(a netip.Addr, n int) netip.Addr {
	s := a.String()
	return netip.MustParseAddr(s[:strings.LastIndexAny(s, ".:")+1] + fmt.Sprint(n))
}

func hostPort(a netip.Addr, port uint16) string { return netip.AddrPortFrom(a, port).String() }

func TestCore(t *testing.T) {
	env := newCoreEnv(t)
	host := env.topo.Host

	t.Run("http-allowed", func(t *testing.T) {
		families(t, env, func(t *testing.T, svc netip.Addr) {
			c := host.HTTPClient()
			resp, err := c.Get("http://" + hostPort(svc, 8080) + "/")
			if err != nil {
				t.Fatalf("GET: %v", err)
			}
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil {
				t.Fatalf("read body: %v", err)
			}
			want := "hello from " + hostPort(svc, 8080)
			if resp.StatusCode != 200 || !strings.HasPrefix(string(body), want) {
				t.Fatalf("got %d %q, want 200 %q...", resp.StatusCode, body, want)
			}
			// The server sees tunfw's outbound address, not the TUN's.
			if strings.Contains(string(body), "198.18.0.1") || strings.Contains(string(body), "fd54:") {
				t.Errorf("server saw the client's TUN address: %q", body)
			}
			env.fw.waitLog(t, 5*time.Second, "msg=flow", "verdict=allow", "rule=default", "proto=tcp", hostPort(svc, 8080))
		})
	})

	t.Run("http-allowed-curl", func(t *testing.T) {
		if _, err := exec.LookPath("curl"); err != nil {
			t.Skip("curl not installed")
		}
		families(t, env, func(t *testing.T, svc netip.Addr) {
			url := "http://" + hostPort(svc, 8080) + "/"
			out, err := host.Cmd("curl", "-sS", "-m", "5", url).CombinedOutput()
			if err != nil || !strings.HasPrefix(string(out), "hello from") {
				t.Fatalf("curl %s: %v: %s", url, err, out)
			}
		})
	})

	t.Run("tcp-denied-times-out", func(t *testing.T) {
		families(t, env, func(t *testing.T, svc netip.Addr) {
			start := time.Now()
			c, err := host.DialTimeout("tcp", hostPort(svc, 9001), 1500*time.Millisecond)
			if err == nil {
				c.Close()
				t.Fatal("connect to a denied port succeeded")
			}
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() {
				t.Fatalf("connect to denied port: %v, want a timeout", err)
			}
			if d := time.Since(start); d < time.Second {
				t.Fatalf("denied connect failed after %v, before the timeout", d)
			}
			env.fw.waitLog(t, 5*time.Second, "verdict=deny", "rule=deny-tcp", hostPort(svc, 9001))
		})
	})

	t.Run("tcp-rejected-refused-fast", func(t *testing.T) {
		families(t, env, func(t *testing.T, svc netip.Addr) {
			start := time.Now()
			c, err := host.DialTimeout("tcp", hostPort(svc, 9002), 5*time.Second)
			if err == nil {
				c.Close()
				t.Fatal("connect to a rejected port succeeded")
			}
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("connect to rejected port: %v, want connection refused", err)
			}
			if d := time.Since(start); d >= time.Second {
				t.Fatalf("refused after %v, want < 1s", d)
			}
			env.fw.waitLog(t, 5*time.Second, "verdict=reject", "rule=reject-tcp", hostPort(svc, 9002))
		})
	})

	t.Run("tcp-upstream-refused-gives-rst", func(t *testing.T) {
		families(t, env, func(t *testing.T, svc netip.Addr) {
			// Allowed by the rules, but nothing listens on 9003.
			_, err := host.DialTimeout("tcp", hostPort(svc, 9003), 5*time.Second)
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("connect to closed upstream port: %v, want connection refused", err)
			}
		})
	})

	t.Run("tcp-silent-upstream-no-fake-handshake", func(t *testing.T) {
		families(t, env, func(t *testing.T, svc netip.Addr) {
			// .11 exists nowhere: the server namespace drops it. A
			// forwarder that completed handshakes itself would connect.
			_, err := host.DialTimeout("tcp", hostPort(sibling(svc, 11), 80), 1500*time.Millisecond)
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() {
				t.Fatalf("connect to a host that is not there: %v, want a timeout", err)
			}
		})
	})

	t.Run("tcp-echo-large", func(t *testing.T) {
		families(t, env, func(t *testing.T, svc netip.Addr) {
			// The echo servers above sit on denied ports; this one
			// is on an allowed port.
			at := netip.AddrPortFrom(svc, 9100)
			startTCPEcho(t, env.topo.Server, at)
			c, err := host.DialTimeout("tcp", at.String(), 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			payload := make([]byte, 4<<20)
			for i := range payload {
				payload[i] = byte(i * 7)
			}
			go func() {
				c.Write(payload)
				c.(*net.TCPConn).CloseWrite()
			}()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("read echo: %v", err)
			}
			if string(got) != string(payload) {
				t.Fatalf("echo returned %d bytes, want the %d sent, identical", len(got), len(payload))
			}
		})
	})

	t.Run("udp", func(t *testing.T) {
		families(t, env, func(t *testing.T, svc netip.Addr) {
			udpRoundTrip := func(port uint16) ([]byte, error) {
				c, err := host.DialTimeout("udp", hostPort(svc, port), time.Second)
				if err != nil {
					return nil, err
				}
				defer c.Close()
				msg := []byte(fmt.Sprintf("ping %d", port))
				if _, err := c.Write(msg); err != nil {
					return nil, err
				}
				c.SetReadDeadline(time.Now().Add(1500 * time.Millisecond))
				buf := make([]byte, 1500)
				n, err := c.Read(buf)
				return buf[:n], err
			}
			got, err := udpRoundTrip(7000)
			if err != nil || string(got) != "ping 7000" {
				t.Errorf("allowed UDP echo: %q, %v", got, err)
			}
			_, err = udpRoundTrip(7001)
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() {
				t.Errorf("denied UDP: %v, want a read timeout", err)
			}
			_, err = udpRoundTrip(7002)
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("rejected UDP: %v, want connection refused", err)
			}
			env.fw.waitLog(t, 5*time.Second, "verdict=deny", "rule=deny-udp", "proto=udp", hostPort(svc, 7001))
			env.fw.waitLog(t, 5*time.Second, "verdict=reject", "rule=reject-udp", "proto=udp", hostPort(svc, 7002))
		})
	})

	t.Run("ping", func(t *testing.T) {
		if _, err := exec.LookPath("ping"); err != nil {
			t.Skip("ping (iputils-ping) not installed")
		}
		families(t, env, func(t *testing.T, svc netip.Addr) {
			ping := func(a netip.Addr) (string, error) {
				out, err := host.Cmd("ping", "-n", "-c", "2", "-i", "0.2", "-W", "1", a.String()).CombinedOutput()
				return string(out), err
			}
			out, err := ping(svc)
			if err != nil || !strings.Contains(out, "2 received") {
				t.Errorf("allowed ping %s: %v\n%s", svc, err, out)
			}
			// Replies are relayed from the real host, never made up:
			// an allowed ping to a host that is not there gets none.
			if out, err := ping(sibling(svc, 11)); err == nil || !strings.Contains(out, " 0 received") {
				t.Errorf("ping to a missing host got a reply: %v\n%s", err, out)
			}
			if out, err := ping(sibling(svc, 20)); err == nil || !strings.Contains(out, " 0 received") {
				t.Errorf("denied ping got a reply: %v\n%s", err, out)
			}
			out, err = ping(sibling(svc, 30))
			if err == nil || !regexp.MustCompile(`(?i)prohibited|filtered`).MatchString(out) {
				t.Errorf("rejected ping: want 'administratively prohibited' / 'packet filtered', got %v\n%s", err, out)
			}
			env.fw.waitLog(t, 5*time.Second, "verdict=deny", "rule=deny-hosts", "proto=icmp", sibling(svc, 20).String())
		})
	})
}
