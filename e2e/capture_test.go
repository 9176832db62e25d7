package e2e

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
)

// captureConfig captures everything the host namespace sends ([route]
// auto = true) and polices it with the same verdict per port and address
// as coreConfig, plus a rule on the server's link address (which a route
// list would not have covered: it is on a connected subnet).
const captureConfig = `
[tun]
name = "tunfw0"
addresses = ["198.18.0.1/30", "fd54:756e:6677::1/126"]

[route]
auto = true
fail = "%s"

[filter]
default = "allow"
log = "all"

[[rule]]
name = "dns"
action = "allow"
proto = ["udp", "tcp"]
dst_port = 53

[[rule]]
name = "deny-tcp"
action = "deny"
proto = "tcp"
dst_port = 9001

[[rule]]
name = "reject-tcp"
action = "reject"
proto = "tcp"
dst_port = 9002

[[rule]]
name = "deny-udp"
action = "deny"
proto = "udp"
dst_port = 7001

[[rule]]
name = "reject-udp"
action = "reject"
proto = "udp"
dst_port = 7002

[[rule]]
name = "deny-hosts"
action = "deny"
proto = "icmp"
dst = ["203.0.113.20", "2001:db8:99::20"]

[[rule]]
name = "reject-hosts"
action = "reject"
proto = "icmp"
dst = ["203.0.113.30", "2001:db8:99::30"]

[[rule]]
name = "reject-link-peer"
action = "reject"
proto = "tcp"
dst = ["10.99.0.2", "fd99::2"]
dst_port = 9100
`

// newCaptureTopo builds the usual host/server topology with servers on
// every port captureConfig names, for both families.
func newCaptureTopo(t *testing.T) *netnstest.Topology {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	for _, a := range []string{"203.0.113.20/32", "203.0.113.30/32", "2001:db8:99::20/128", "2001:db8:99::30/128"} {
		topo.Server.Run(t, "ip", "addr", "add", a, "dev", "lo")
	}
	for _, svc := range []netip.Addr{topo.ServiceV4, topo.ServiceV6, topo.ServerV4, topo.ServerV6} {
		for _, port := range []uint16{9001, 9002, 9100} {
			startTCPEcho(t, topo.Server, netip.AddrPortFrom(svc, port))
		}
		for _, port := range []uint16{7000, 7001, 7002} {
			startUDPEcho(t, topo.Server, netip.AddrPortFrom(svc, port))
		}
	}
	return topo
}

func captureCfg(t *testing.T, fail string) string {
	return writeConfig(t, fmt.Sprintf(captureConfig, fail))
}

// tcpEcho connects, sends a line and reads it back.
func tcpEcho(ns *netnstest.NS, at string, timeout time.Duration) error {
	c, err := ns.DialTimeout("tcp", at, timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte("hello\n")); err != nil {
		return err
	}
	buf := make([]byte, 6)
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != "hello\n" {
		return fmt.Errorf("echo returned %q", buf)
	}
	return nil
}

func udpEcho(ns *netnstest.NS, at string) ([]byte, error) {
	c, err := ns.DialTimeout("udp", at, time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if _, err := c.Write([]byte("ping")); err != nil {
		return nil, err
	}
	c.SetReadDeadline(time.Now().Add(1500 * time.Millisecond))
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	return buf[:n], err
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// kill9 kills tunfw with SIGKILL (no teardown) and waits for it.
func (p *tunfwProc) kill9() {
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// cpuTime is the user+system CPU time of a process so far.
func cpuTime(t *testing.T, pid int) time.Duration {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	// Fields after the command: state is f[0], utime is field 14 of the
	// whole line, i.e. f[11], stime f[12]; both in clock ticks (USER_HZ,
	// 100 on Linux).
	ut, _ := strconv.Atoi(f[11])
	st, _ := strconv.Atoi(f[12])
	return time.Duration(ut+st) * 10 * time.Millisecond
}

func runDown(t *testing.T, ns *netnstest.NS, cfg string) string {
	t.Helper()
	out, err := ns.Cmd(binary, "down", "-c", cfg).CombinedOutput()
	if err != nil {
		t.Fatalf("tunfw down: %v\n%s", err, out)
	}
	return string(out)
}

func TestHostCapture(t *testing.T) {
	topo := newCaptureTopo(t)
	host := topo.Host
	fw := startTunfw(t, host, captureCfg(t, "open"))

	state := netState(t, host)
	for _, want := range []string{
		"not from all fwmark 0x7466 lookup 29798 proto 116",
		"from all iif tunfw0 lookup main proto 116",
		"default dev tunfw0 table 29798 proto 116",
		"throw 169.254.0.0/16 table 29798",
		"throw fe80::/10",
	} {
		if !strings.Contains(state, want) {
			t.Errorf("while up, %q is missing from the namespace:\n%s", want, state)
		}
	}

	for _, fam := range []struct {
		name       string
		svc, link  netip.Addr
		denyHost   netip.Addr
		rejectHost netip.Addr
	}{
		{"v4", topo.ServiceV4, topo.ServerV4, sibling(topo.ServiceV4, 20), sibling(topo.ServiceV4, 30)},
		{"v6", topo.ServiceV6, topo.ServerV6, sibling(topo.ServiceV6, 20), sibling(topo.ServiceV6, 30)},
	} {
		t.Run(fam.name, func(t *testing.T) {
			svc := fam.svc
			if err := tcpEcho(host, hostPort(svc, 9100), 5*time.Second); err != nil {
				t.Errorf("allowed TCP: %v", err)
			}
			fw.waitLog(t, 5*time.Second, "msg=flow", "verdict=allow", "proto=tcp", "dst="+hostPort(svc, 9100))
			start := time.Now()
			if err := tcpEcho(host, hostPort(svc, 9001), 1200*time.Millisecond); !isTimeout(err) {
				t.Errorf("denied TCP: %v, want a timeout", err)
			} else if time.Since(start) < time.Second {
				t.Errorf("denied TCP failed before the timeout")
			}
			if err := tcpEcho(host, hostPort(svc, 9002), 5*time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("rejected TCP: %v, want connection refused", err)
			}
			// The server's own address on the uplink's subnet is captured
			// too: auto means everything, not only the default route.
			if err := tcpEcho(host, hostPort(fam.link, 9100), 5*time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("TCP to the link peer: %v, want refused by rule reject-link-peer", err)
			}
			fw.waitLog(t, 5*time.Second, "verdict=reject", "rule=reject-link-peer", hostPort(fam.link, 9100))

			if got, err := udpEcho(host, hostPort(svc, 7000)); err != nil || string(got) != "ping" {
				t.Errorf("allowed UDP: %q, %v", got, err)
			}
			if _, err := udpEcho(host, hostPort(svc, 7001)); !isTimeout(err) {
				t.Errorf("denied UDP: %v, want a timeout", err)
			}
			if _, err := udpEcho(host, hostPort(svc, 7002)); !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("rejected UDP: %v, want connection refused", err)
			}
			fw.waitLog(t, 5*time.Second, "verdict=deny", "rule=deny-udp", hostPort(svc, 7001))

			if _, err := exec.LookPath("ping"); err != nil {
				t.Log("ping (iputils-ping) not installed; ICMP not checked")
				return
			}
			ping := func(a netip.Addr) string {
				out, _ := host.Cmd("ping", "-n", "-c", "2", "-i", "0.2", "-W", "1", a.String()).CombinedOutput()
				return string(out)
			}
			if out := ping(svc); !strings.Contains(out, " 2 received") {
				t.Errorf("allowed ping:\n%s", out)
			}
			fw.waitLog(t, 5*time.Second, "verdict=allow", "proto=icmp", "dst="+svc.String())
			if out := ping(fam.denyHost); !strings.Contains(out, " 0 received") {
				t.Errorf("denied ping got a reply:\n%s", out)
			}
			if out := ping(fam.rejectHost); !regexp.MustCompile(`(?i)prohibited|filtered`).MatchString(out) {
				t.Errorf("rejected ping: want 'administratively prohibited' / 'packet filtered':\n%s", out)
			}
		})
	}

	t.Run("loopback-not-captured", func(t *testing.T) {
		ln, err := host.Listen("tcp", "127.0.0.1:9001")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			if c, err := ln.Accept(); err == nil {
				c.Close()
			}
		}()
		c, err := host.DialTimeout("tcp", "127.0.0.1:9001", 2*time.Second)
		if err != nil {
			t.Fatalf("loopback port 9001 (denied if captured): %v", err)
		}
		c.Close()
	})

	t.Run("dns", func(t *testing.T) { testHostDNS(t, topo, fw) })

	t.Run("bulk-no-loop", func(t *testing.T) {
		const size = 50 << 20
		at := netip.AddrPortFrom(topo.ServiceV4, 9200)
		ln, err := topo.Server.Listen("tcp", at.String())
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			buf := make([]byte, 256<<10)
			for sent := 0; sent < size; sent += len(buf) {
				if _, err := c.Write(buf); err != nil {
					return
				}
			}
		}()
		pid := fw.cmd.Process.Pid
		cpu0, t0 := cpuTime(t, pid), time.Now()
		c, err := host.DialTimeout("tcp", at.String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(60 * time.Second))
		n, err := io.Copy(io.Discard, c)
		if err != nil || n != size {
			t.Fatalf("download through tunfw: %d of %d bytes, %v", n, size, err)
		}
		cpu, wall := cpuTime(t, pid)-cpu0, time.Since(t0)
		t.Logf("50 MB in %v, tunfw CPU %v", wall, cpu)
		// Measured about 0.5 s of CPU; a loop through the TUN would spin
		// or never finish.
		if cpu > 15*time.Second {
			t.Errorf("tunfw used %v of CPU for 50 MB: its own sockets loop?", cpu)
		}
		// tunfw's own connection leaves from the uplink address; had it
		// been captured, it would show up as a flow from there.
		if strings.Contains(fw.log(), "src="+topo.HostV4.String()+":") {
			t.Errorf("tunfw's own outbound connection went through the TUN:\n%s", fw.log())
		}
	})
}

// testHostDNS resolves a name with the host's own resolver (glibc, through
// getent) against a DNS server in the server namespace: the query is an
// ordinary captured UDP flow that rules can allow or deny.
func testHostDNS(t *testing.T, topo *netnstest.Topology, fw *tunfwProc) {
	if _, err := exec.LookPath("getent"); err != nil {
		t.Skip("getent not installed")
	}
	// getent runs in a mount namespace of its own where the test's
	// resolv.conf is bind-mounted over /etc/resolv.conf: nothing is written
	// to the machine's /etc.
	resolv := filepath.Join(t.TempDir(), "resolv.conf")
	conf := "nameserver " + topo.ServiceV4.String() + "\noptions timeout:2 attempts:1\n"
	if err := os.WriteFile(resolv, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	startDNS(t, topo.Server, netip.AddrPortFrom(topo.ServiceV4, 53), netip.MustParseAddr("203.0.113.77"))
	out, err := topo.Host.Cmd("unshare", "--mount", "--propagation", "private", "sh", "-c",
		`mount --bind "$0" /etc/resolv.conf && exec getent ahostsv4 svc.tunfw.test`, resolv).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "203.0.113.77") {
		t.Fatalf("getent ahostsv4 svc.tunfw.test: %v\n%s", err, out)
	}
	fw.waitLog(t, 5*time.Second, "verdict=allow", "rule=dns", "proto=udp", "dst="+hostPort(topo.ServiceV4, 53))
}

// startDNS answers every A query with answer (and other types with no
// data): just enough of DNS for a stub resolver.
func startDNS(t *testing.T, ns *netnstest.NS, at netip.AddrPort, answer netip.Addr) {
	serveUDP(t, ns, at, func(q []byte) []byte {
		n := len(q)
		if n < 12 {
			return nil
		}
		i := 12
		for i < n && q[i] != 0 {
			i += int(q[i]) + 1
		}
		if i+5 > n {
			return nil
		}
		qtype := int(q[i+1])<<8 | int(q[i+2])
		end := i + 5
		resp := append([]byte{}, q[:end]...)
		resp[2], resp[3] = 0x81, 0x80 // response, recursion desired+available
		resp[6], resp[7], resp[8], resp[9], resp[10], resp[11] = 0, 0, 0, 0, 0, 0
		if qtype == 1 {
			resp[7] = 1
			a := answer.As4()
			resp = append(resp, 0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, a[0], a[1], a[2], a[3])
		}
		return resp
	})
}

func TestCaptureTeardown(t *testing.T) {
	topo := newCaptureTopo(t)
	host := topo.Host
	before := netState(t, host)
	echo := hostPort(topo.ServiceV4, 9100)
	echo6 := hostPort(topo.ServiceV6, 9100)

	t.Run("sigterm", func(t *testing.T) {
		fw := startTunfw(t, host, captureCfg(t, "closed"))
		if err := tcpEcho(host, echo, 5*time.Second); err != nil {
			t.Fatalf("allowed TCP: %v", err)
		}
		// The kill switch is the nftables table's refusal, for good.
		if !killSwitchArmed(t, host) {
			t.Errorf("fail = closed: the nftables table does not refuse for good:\n%s", nftTable(t, host, "tunfw"))
		}
		if code := fw.stop(); code != 0 {
			t.Errorf("exit code after SIGTERM = %d, want 0", code)
		}
		if after := netState(t, host); after != before {
			t.Errorf("namespace not restored after SIGTERM (fail = closed lifts the kill switch on a clean stop).\nbefore:\n%s\nafter:\n%s", before, after)
		}
	})

	t.Run("kill9-open", func(t *testing.T) {
		cfg := captureCfg(t, "open")
		fw := startTunfw(t, host, cfg)
		fw.kill9()
		// fail = open: the rules point into a table that lost its routes
		// with the device, so traffic takes the main table again, and
		// the nftables output filter stops refusing once its alive
		// element times out (5 s).
		for _, at := range []string{echo, echo6, hostPort(topo.ServiceV4, 9001)} {
			if err := eventually(8*time.Second, func() error { return tcpEcho(host, at, 3*time.Second) }); err != nil {
				t.Errorf("after kill -9 with fail = open, %s: %v", at, err)
			}
		}
		if strings.Contains(host.Run(t, "ip", "-o", "link", "show"), "tunfw0") {
			t.Errorf("tunfw0 survived kill -9")
		}
		// A new `up` removes the leftovers first, and its clean stop
		// leaves nothing.
		fw = startTunfw(t, host, cfg)
		fw.waitLog(t, 5*time.Second, "removed leftovers of an earlier run")
		fw.kill9()
		out := runDown(t, host, cfg)
		if !regexp.MustCompile(`removed [1-9]\d* ip rules`).MatchString(out) {
			t.Errorf("tunfw down removed no rules: %s", out)
		}
		if after := netState(t, host); after != before {
			t.Errorf("namespace not restored after kill -9 and tunfw down.\nbefore:\n%s\nafter:\n%s", before, after)
		}
		if out := runDown(t, host, cfg); !strings.Contains(out, "removed 0 ip rules, 0 routes and 0 nftables tables") {
			t.Errorf("a second tunfw down found something: %s", out)
		}
	})

	t.Run("kill9-closed", func(t *testing.T) {
		cfg := captureCfg(t, "closed")
		fw := startTunfw(t, host, cfg)
		if err := tcpEcho(host, echo, 5*time.Second); err != nil {
			t.Fatalf("allowed TCP: %v", err)
		}
		fw.kill9()
		for _, at := range []string{echo, echo6} {
			err := tcpEcho(host, at, 2*time.Second)
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("after kill -9 with fail = closed, %s: %v, want refused", at, err)
			}
		}
		if _, err := exec.LookPath("ping"); err != nil {
			t.Log("ping (iputils-ping) not installed; ICMP not checked")
		} else if out, err := host.Cmd("ping", "-n", "-c", "1", "-W", "1", topo.ServiceV4.String()).CombinedOutput(); err == nil {
			t.Errorf("ping got through the kill switch:\n%s", out)
		}
		// While running, `down` refuses: it would open the firewall.
		fw2 := startTunfw(t, host, cfg)
		if out, err := host.Cmd(binary, "down", "-c", cfg).CombinedOutput(); err == nil || !strings.Contains(string(out), "still running") {
			t.Errorf("tunfw down while tunfw runs: %v\n%s", err, out)
		}
		fw2.kill9()
		runDown(t, host, cfg)
		for _, at := range []string{echo, echo6} {
			if err := tcpEcho(host, at, 3*time.Second); err != nil {
				t.Errorf("after tunfw down, %s: %v", at, err)
			}
		}
		if after := netState(t, host); after != before {
			t.Errorf("namespace not restored after kill -9 and tunfw down.\nbefore:\n%s\nafter:\n%s", before, after)
		}
	})
}

const gatewayConfig = `
[tun]
name = "tunfw0"
addresses = ["198.18.0.1/30", "fd54:756e:6677::1/126"]

[route]
from = ["%s"]

[filter]
default = "allow"
log = "all"

[sets]
lan_client = ["10.98.0.2", "fd98::2"]

[[rule]]
name = "client-no-9001"
action = "deny"
proto = "tcp"
src = "@lan_client"
dst_port = 9001

[[rule]]
name = "client-no-9002"
action = "reject"
proto = "tcp"
src = "@lan_client"
dst_port = 9002

[[rule]]
name = "others-no-9100"
action = "deny"
src = ["10.98.0.3", "fd98::3"]
dst_port = 9100
`

// addGatewayClient adds a namespace (a container, say) routed through
// host: 10.98.0.2/24 and fd98::2/64 behind host's interface lanIf
// (10.98.0.1, fd98::1), with forwarding on in host.
func addGatewayClient(t *testing.T, host *netnstest.NS) (client *netnstest.NS, lanIf string) {
	t.Helper()
	client = netnstest.New(t, "tfg-")
	lanIf = "tfl-" + client.Name[4:]
	netnstest.Link(t, host, lanIf, []string{"10.98.0.1/24", "fd98::1/64"}, client, "tfm-"+client.Name[4:], []string{"10.98.0.2/24", "fd98::2/64"})
	client.Run(t, "ip", "route", "add", "default", "via", "10.98.0.1")
	client.Run(t, "ip", "-6", "route", "add", "default", "via", "fd98::1")
	host.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
	return client, lanIf
}

func TestGateway(t *testing.T) {
	topo := newCaptureTopo(t)
	host := topo.Host
	// A third namespace (a container, say) routed through the host.
	client, lanIf := addGatewayClient(t, host)

	fw := startTunfw(t, host, writeConfig(t, fmt.Sprintf(gatewayConfig, lanIf)))
	for _, svc := range []netip.Addr{topo.ServiceV4, topo.ServiceV6} {
		name := "v4"
		src := "src=10.98.0.2:"
		if svc.Is6() {
			name, src = "v6", "src=[fd98::2]:"
		}
		t.Run(name, func(t *testing.T) {
			// The server has no route back to 10.98.0.0/24: only tunfw,
			// dialling from the host's uplink address, can connect it.
			if err := tcpEcho(client, hostPort(svc, 9100), 5*time.Second); err != nil {
				t.Errorf("allowed TCP from the client namespace: %v", err)
			}
			fw.waitLog(t, 5*time.Second, "verdict=allow", src, "dst="+hostPort(svc, 9100))
			if err := tcpEcho(client, hostPort(svc, 9001), 1200*time.Millisecond); !isTimeout(err) {
				t.Errorf("denied TCP from the client: %v, want a timeout", err)
			}
			fw.waitLog(t, 5*time.Second, "verdict=deny", "rule=client-no-9001")
			if err := tcpEcho(client, hostPort(svc, 9002), 5*time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("rejected TCP from the client: %v, want connection refused", err)
			}
			if got, err := udpEcho(client, hostPort(svc, 7000)); err != nil || string(got) != "ping" {
				t.Errorf("allowed UDP from the client: %q, %v", got, err)
			}
			if _, err := exec.LookPath("ping"); err == nil {
				out, _ := client.Cmd("ping", "-n", "-c", "1", "-W", "2", svc.String()).CombinedOutput()
				if !strings.Contains(string(out), " 1 received") {
					t.Errorf("allowed ping from the client:\n%s", out)
				}
			}
			// The host's own traffic is not captured in gateway mode:
			// the client's deny rules do not apply to it, and no flow
			// from the host's addresses shows up.
			if err := tcpEcho(host, hostPort(svc, 9001), 3*time.Second); err != nil {
				t.Errorf("host's own TCP to 9001 (not captured without auto): %v", err)
			}
		})
	}
	if l := fw.log(); strings.Contains(l, "src=198.18.0.1") || strings.Contains(l, "src=10.99.0.1") || strings.Contains(l, "src=[fd99::1]") {
		t.Errorf("host traffic was captured in gateway mode:\n%s", l)
	}
}

// TestStrictRPFilterWarning checks that tunfw says so when strict
// reverse-path filtering would drop the replies to its captured traffic.
func TestStrictRPFilterWarning(t *testing.T) {
	topo := newCaptureTopo(t)
	topo.Host.Run(t, "sysctl", "-qw", "net.ipv4.conf."+topo.HostIf+".rp_filter=1")
	fw := startTunfw(t, topo.Host, captureCfg(t, "open"))
	fw.waitLog(t, 5*time.Second, "level=WARN", "rp_filter = 1", topo.HostIf)
}
