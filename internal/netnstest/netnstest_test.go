package netnstest

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// serveEcho accepts connections and echoes "pong:"+data back.
func serveEcho(t *testing.T, l net.Listener) {
	t.Helper()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				buf := make([]byte, 64)
				n, err := c.Read(buf)
				if err != nil {
					return
				}
				_, _ = c.Write(append([]byte("pong:"), buf[:n]...))
			}()
		}
	}()
}

func netnsList(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v: %s", err, out)
	}
	return string(out)
}

func TestTopologyTCP(t *testing.T) {
	RequireRoot(t)
	tp := NewTopology(t)

	for _, svc := range []netip.Addr{tp.ServiceV4, tp.ServiceV6} {
		t.Run(svc.String(), func(t *testing.T) {
			l, err := tp.Server.Listen("tcp", netip.AddrPortFrom(svc, 0).String())
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			serveEcho(t, l)

			c, err := tp.Host.DialTimeout("tcp", l.Addr().String(), 5*time.Second)
			if err != nil {
				t.Fatalf("dial %s from host: %v", l.Addr(), err)
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			local := netip.MustParseAddrPort(c.LocalAddr().String()).Addr()
			want := tp.HostV4
			if svc.Is6() {
				want = tp.HostV6
			}
			if local != want {
				t.Errorf("local address %s, want host veth address %s", local, want)
			}
			if _, err := c.Write([]byte("ping")); err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != "pong:ping" {
				t.Fatalf("got %q, want %q", got, "pong:ping")
			}
		})
	}

	t.Run("nothing-in-root-namespace", func(t *testing.T) {
		// The veth pair lives only in our namespaces.
		out, err := exec.Command("ip", "-o", "link").CombinedOutput()
		if err != nil {
			t.Fatalf("ip -o link: %v: %s", err, out)
		}
		if strings.Contains(string(out), tp.HostIf) || strings.Contains(string(out), tp.ServerIf) {
			t.Fatalf("veth visible in root namespace:\n%s", out)
		}
	})

	t.Run("udp", func(t *testing.T) {
		pc, err := tp.Server.ListenPacket("udp", netip.AddrPortFrom(tp.ServiceV4, 0).String())
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		go func() {
			buf := make([]byte, 64)
			n, from, err := pc.ReadFrom(buf)
			if err == nil {
				_, _ = pc.WriteTo(buf[:n], from)
			}
		}()
		c, err := tp.Host.DialTimeout("udp", pc.LocalAddr().String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte("u")); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 8)
		n, err := c.Read(buf)
		if err != nil || string(buf[:n]) != "u" {
			t.Fatalf("udp echo: %q %v", buf[:n], err)
		}
	})

	t.Run("http", func(t *testing.T) {
		l, err := tp.Server.Listen("tcp", "[2001:db8:99::10]:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "hello %s", r.RemoteAddr)
		})}
		go srv.Serve(l)
		defer srv.Close()
		resp, err := tp.Host.HTTPClient().Get("http://" + l.Addr().String() + "/")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.HasPrefix(string(body), "hello [fd99::1]:") {
			t.Fatalf("body %q", body)
		}
		// Context cancellation must be honoured by dials inside Do.
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := tp.Host.DialContext(ctx, "tcp", l.Addr().String()); err == nil {
			t.Fatal("dial with cancelled context succeeded")
		}
		if _, err := tp.Host.Dial("tcp", "example.invalid:80"); err == nil {
			t.Fatal("dial with host name accepted")
		}
	})

	t.Run("ping", func(t *testing.T) {
		if _, err := exec.LookPath("ping"); err != nil {
			t.Skip("ping not installed; ICMP check skipped")
		}
		tp.Host.Run(t, "ping", "-c1", "-W2", tp.ServiceV4.String())
	})

	t.Run("run-and-cmd", func(t *testing.T) {
		out := tp.Host.Run(t, "ip", "-o", "addr", "show", "dev", tp.HostIf)
		if !strings.Contains(out, "10.99.0.1/24") || !strings.Contains(out, "fd99::1/64") {
			t.Fatalf("addresses missing:\n%s", out)
		}
		if strings.Contains(out, "tentative") {
			t.Fatalf("IPv6 address still tentative:\n%s", out)
		}
		out = tp.Host.Run(t, "sysctl", "-n", "net.ipv6.conf.default.accept_dad")
		if strings.TrimSpace(out) != "0" {
			t.Fatalf("accept_dad = %q", out)
		}
		b, err := tp.Server.Cmd("ip", "-o", "addr", "show", "dev", "lo").CombinedOutput()
		if err != nil || !strings.Contains(string(b), "203.0.113.10/32") || !strings.Contains(string(b), "2001:db8:99::10/128") {
			t.Fatalf("service addresses: %v\n%s", err, b)
		}
	})
}

func TestCleanup(t *testing.T) {
	RequireRoot(t)
	var name string
	t.Run("create", func(t *testing.T) {
		a := New(t, "tfc-")
		b := New(t, "tfd-")
		name = a.Name
		if len(a.Name) > 15 || !strings.HasPrefix(a.Name, "tfc-") {
			t.Fatalf("bad name %q", a.Name)
		}
		Link(t, a, "tfa-c", []string{"10.98.0.1/24"}, b, "tfb-c", []string{"10.98.0.2/24"})
		if !strings.Contains(netnsList(t), a.Name) {
			t.Fatalf("%s not listed", a.Name)
		}
		// A process started in the namespace must be killed by cleanup.
		cmd := a.Cmd("sleep", "300")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go cmd.Wait()
		// A socket held open past cleanup must not block deletion.
		l, err := a.Listen("tcp", "10.98.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		// Do must leave the caller's namespace untouched.
		self, _ := os.Readlink("/proc/thread-self/ns/net")
		_ = a.Do(func() error { return nil })
		if now, _ := os.Readlink("/proc/thread-self/ns/net"); now != self {
			t.Fatalf("thread namespace changed: %s -> %s", self, now)
		}
	})
	if strings.Contains(netnsList(t), name) {
		t.Fatalf("namespace %s still present after cleanup", name)
	}
	if _, err := os.Stat("/run/netns/" + name); err == nil {
		t.Fatalf("/run/netns/%s still present", name)
	}
}

func TestGatewayClient(t *testing.T) {
	RequireRoot(t)
	tp := NewTopology(t)
	g := tp.AddGatewayClient(t)
	for _, ns := range []struct {
		ns *NS
		If string
	}{{tp.Host, g.HostIf}, {g.NS, g.ClientIf}} {
		if out := ns.ns.Run(t, "ip", "-o", "link", "show", "dev", ns.If); !strings.Contains(out, " mtu 1500 ") {
			t.Errorf("%s: want mtu 1500: %s", ns.If, out)
		}
	}
	// Without a route back the Server cannot answer; with one, the Host
	// forwards both ways and the Server sees the client's own address.
	tp.Server.Run(t, "ip", "route", "add", g.Prefix4.String(), "via", tp.HostV4.String())
	tp.Server.Run(t, "ip", "-6", "route", "add", g.Prefix6.String(), "via", tp.HostV6.String())
	for _, c := range []struct{ dst, src netip.Addr }{{tp.ServerV4, g.ClientV4}, {tp.ServiceV6, g.ClientV6}} {
		l, err := tp.Server.Listen("tcp", netip.AddrPortFrom(c.dst, 0).String())
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		serveEcho(t, l)
		conn, err := g.NS.DialTimeout("tcp", l.Addr().String(), 5*time.Second)
		if err != nil {
			t.Fatalf("dial %s from the gateway client: %v", l.Addr(), err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		if local := netip.MustParseAddrPort(conn.LocalAddr().String()).Addr(); local != c.src {
			t.Errorf("local address %s, want %s", local, c.src)
		}
		if _, err := conn.Write([]byte("gw")); err != nil {
			t.Fatal(err)
		}
		if got, err := io.ReadAll(conn); err != nil || string(got) != "pong:gw" {
			t.Fatalf("echo via the host: %q, %v", got, err)
		}
	}
	if out := tp.Server.Run(t, "sysctl", "-n", "net.ipv4.ip_forward"); strings.TrimSpace(out) != "0" {
		t.Errorf("forwarding turned on in the server namespace too: %q", out)
	}
}
