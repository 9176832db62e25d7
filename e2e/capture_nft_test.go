package e2e

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
)

// Host capture's nftables table (issue 11) and the gateway source check
// and kill switch (issue 10, items 8 and 11).

// eventually calls fn until it returns nil or d has passed; it returns
// fn's last error.
func eventually(d time.Duration, fn func() error) error {
	deadline := time.Now().Add(d)
	for {
		err := fn()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// nftTable returns `nft list table inet NAME` in ns, or "" when there is
// no such table.
func nftTable(t *testing.T, ns *netnstest.NS, name string) string {
	t.Helper()
	out, err := ns.Cmd("nft", "list", "table", "inet", name).CombinedOutput()
	if err != nil {
		if strings.Contains(string(out), "No such file or directory") {
			return ""
		}
		t.Fatalf("nft list table inet %s: %v\n%s", name, err, out)
	}
	return string(out)
}

func requireNft(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"nft", "curl", "setpriv"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (Debian: nftables, curl, util-linux)", tool)
		}
	}
}

// session is a TCP connection kept open across tunfw's start, reload and
// stop; each echo sends a line and reads it back.
type session struct {
	c net.Conn
	r *bufio.Reader
	n int
}

func openSession(t *testing.T, ns *netnstest.NS, at string) *session {
	t.Helper()
	c, err := ns.DialTimeout("tcp", at, 3*time.Second)
	if err != nil {
		t.Fatalf("open session to %s: %v", at, err)
	}
	t.Cleanup(func() { c.Close() })
	s := &session{c: c, r: bufio.NewReader(c)}
	if err := s.echo(); err != nil {
		t.Fatalf("session to %s before tunfw: %v", at, err)
	}
	return s
}

func (s *session) echo() error {
	s.n++
	line := fmt.Sprintf("line %d\n", s.n)
	// Long enough for a few retransmissions, short enough to fail fast.
	s.c.SetDeadline(time.Now().Add(4 * time.Second))
	if _, err := s.c.Write([]byte(line)); err != nil {
		return err
	}
	got, err := s.r.ReadString('\n')
	if err != nil {
		return err
	}
	if got != line {
		return fmt.Errorf("echoed %q, want %q", got, line)
	}
	return nil
}

// curlAs runs curl in ns as uid/gid 65534 (an unprivileged user) and
// returns its exit code, output and duration.
func curlAs(ns *netnstest.NS, args ...string) (int, string, time.Duration) {
	all := append([]string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
		"curl", "-sS", "--max-time", "3", "--connect-timeout", "3"}, args...)
	start := time.Now()
	out, err := ns.Cmd(all...).CombinedOutput()
	d := time.Since(start)
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), string(out), d
	}
	if err != nil {
		return -1, err.Error(), d
	}
	return 0, string(out), d
}

func urlOf(a netip.Addr, port uint16) string { return "http://" + hostPort(a, port) + "/" }

// captureStatusOf reads the capture part of `tunfw status --json`.
func captureStatusOf(t *testing.T, ns *netnstest.NS, cfg string) (preexisting int, refused, spoofed uint64) {
	t.Helper()
	out, err := ns.Cmd(binary, "status", "--json", "-c", cfg).Output()
	if err != nil {
		t.Fatalf("tunfw status: %v\n%s", err, out)
	}
	var st struct {
		Capture *struct {
			Preexisting int    `json:"preexisting_connections"`
			Refused     uint64 `json:"refused_outside_tun"`
			Spoofed     uint64 `json:"spoofed_dropped"`
			Error       string `json:"error"`
		} `json:"capture"`
	}
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatalf("tunfw status --json: %v\n%s", err, out)
	}
	if st.Capture == nil {
		t.Fatalf("tunfw status has no capture section:\n%s", out)
	}
	if st.Capture.Error != "" {
		t.Errorf("tunfw status: capture counters: %s", st.Capture.Error)
	}
	return st.Capture.Preexisting, st.Capture.Refused, st.Capture.Spoofed
}

// TestCaptureInbound: with auto = true the host stays reachable. Sessions
// opened before `up` (inbound to the host, and the host's own outbound)
// keep echoing after up, a reload and a stop; new inbound TCP and UDP
// connections are answered during capture, from the right address and
// port, in both families.
func TestCaptureInbound(t *testing.T) {
	requireNft(t)
	// In a fresh namespace conntrack tracks nothing before tunfw's table
	// uses it; on a host with a stateful firewall (Docker, firewalld) it
	// already tracks the sessions: both ways of finding them are tested.
	for _, tracked := range []bool{false, true} {
		t.Run(fmt.Sprintf("conntrack-before=%v", tracked), func(t *testing.T) { testCaptureInbound(t, tracked) })
	}
}

func testCaptureInbound(t *testing.T, tracked bool) {
	topo := newCaptureTopo(t)
	host := topo.Host
	if tracked {
		host.Run(t, "nft", "add table inet other; add chain inet other in { type filter hook input priority 0; }; add rule inet other in ct state established counter")
	}
	for _, a := range []netip.Addr{topo.HostV4, topo.HostV6} {
		startUDPEcho(t, host, netip.AddrPortFrom(a, 5353))
	}
	// A dual-stack wildcard listener, like sshd's: its IPv4 connections
	// are IPv4-mapped sockets.
	startTCPEcho(t, host, netip.MustParseAddrPort("[::]:2222"))

	in4 := openSession(t, topo.Server, hostPort(topo.HostV4, 2222))
	in6 := openSession(t, topo.Server, hostPort(topo.HostV6, 2222))
	out4 := openSession(t, host, hostPort(topo.ServiceV4, 9100))
	out6 := openSession(t, host, hostPort(topo.ServiceV6, 9100))
	sessions := map[string]*session{"inbound v4": in4, "inbound v6": in6, "outbound v4": out4, "outbound v6": out6}
	checkSessions := func(when string) {
		t.Helper()
		for name, s := range sessions {
			if err := s.echo(); err != nil {
				t.Errorf("%s session opened before up, %s: %v", name, when, err)
			}
		}
	}
	newInbound := func(when string) {
		t.Helper()
		for _, a := range []netip.Addr{topo.HostV4, topo.HostV6} {
			if err := tcpEcho(topo.Server, hostPort(a, 2222), 3*time.Second); err != nil {
				t.Errorf("new inbound TCP to %s %s: %v", a, when, err)
			}
			// udpEcho's socket is connected: a reply from another address
			// or port would not be read.
			if got, err := udpEcho(topo.Server, hostPort(a, 5353)); err != nil || string(got) != "ping" {
				t.Errorf("new inbound UDP to %s %s: %q, %v", a, when, got, err)
			}
		}
	}

	cfg := captureCfg(t, "open")
	fw := startTunfw(t, host, cfg)
	checkSessions("after up")
	newInbound("during capture")
	// The host's own new connections are still captured and judged.
	if err := tcpEcho(host, hostPort(topo.ServiceV4, 9002), 3*time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("host's own TCP to port 9002 (reject rule): %v, want refused", err)
	}
	if n, _, _ := captureStatusOf(t, host, cfg); n < 2 {
		t.Errorf("tunfw status counts %d connections open at start, want at least the 2 outbound sessions", n)
	}
	if out, err := host.Cmd(binary, "status", "-c", cfg).CombinedOutput(); err != nil || !strings.Contains(string(out), "connections open at start left unjudged") {
		t.Errorf("tunfw status: %v\n%s", err, out)
	}
	if table := nftTable(t, host, "tunfw"); !strings.Contains(table, "ct mark set") {
		t.Errorf("nftables table inet tunfw while up:\n%s", table)
	}

	if out, err := host.Cmd(binary, "reload", "-c", cfg).CombinedOutput(); err != nil {
		t.Fatalf("tunfw reload: %v\n%s", err, out)
	}
	checkSessions("after a reload")
	newInbound("after a reload")

	if code := fw.stop(); code != 0 {
		t.Errorf("exit code %d after SIGTERM", code)
	}
	checkSessions("after a stop")
	newInbound("after a stop")
	if table := nftTable(t, host, "tunfw"); table != "" {
		t.Errorf("nftables table left after a clean stop:\n%s", table)
	}
}

// TestCaptureBoundSockets: an unprivileged user cannot leave past the TUN
// by binding a socket to the uplink device (SO_BINDTODEVICE, curl
// --interface DEV): it is refused at once, whatever the rules say, and
// counted. Binding to the host's address is captured and judged.
func TestCaptureBoundSockets(t *testing.T) {
	requireNft(t)
	topo := newCaptureTopo(t)
	host := topo.Host
	for _, svc := range []netip.Addr{topo.ServiceV4, topo.ServiceV6} {
		for _, port := range []uint16{80, 8080} {
			startHTTP(t, topo.Server, netip.AddrPortFrom(svc, port))
		}
	}
	cfg := writeConfig(t, `
[tun]
name = "tunfw0"
addresses = ["198.18.0.1/30", "fd54:756e:6677::1/126"]
[route]
auto = true
[filter]
default = "allow"
log = "all"
[[rule]]
name = "no-http"
action = "reject"
proto = "tcp"
dst_port = 80
`)
	fw := startTunfw(t, host, cfg)
	for _, fam := range []struct {
		name      string
		svc, self netip.Addr
	}{{"v4", topo.ServiceV4, topo.HostV4}, {"v6", topo.ServiceV6, topo.HostV6}} {
		t.Run(fam.name, func(t *testing.T) {
			for _, port := range []uint16{80, 8080} {
				rc, out, d := curlAs(host, "--interface", topo.HostIf, urlOf(fam.svc, port))
				if rc != 7 || d > 2*time.Second {
					t.Errorf("curl --interface %s to port %d as uid 65534: rc %d after %v, want 7 (refused) at once:\n%s", topo.HostIf, port, rc, d, out)
				}
			}
			// Bound to the host's own address: routed into the TUN and
			// judged by the rules.
			if rc, out, _ := curlAs(host, "--interface", fam.self.String(), urlOf(fam.svc, 8080)); rc != 0 || !strings.Contains(out, "hello from") {
				t.Errorf("curl --interface %s to an allowed port: rc %d\n%s", fam.self, rc, out)
			}
			fw.waitLog(t, 5*time.Second, "verdict=allow", "dst="+hostPort(fam.svc, 8080))
			if rc, out, _ := curlAs(host, "--interface", fam.self.String(), urlOf(fam.svc, 80)); rc != 7 {
				t.Errorf("curl --interface %s to a rejected port: rc %d, want 7\n%s", fam.self, rc, out)
			}
			fw.waitLog(t, 5*time.Second, "verdict=reject", "rule=no-http", "dst="+hostPort(fam.svc, 80))
		})
	}
	if _, refused, _ := captureStatusOf(t, host, cfg); refused < 4 {
		t.Errorf("tunfw status counts %d refused packets, want at least the 4 bound connects", refused)
	}
}

// TestCaptureNftLifecycle: the table goes with a clean stop and `tunfw
// down`, is replaced after kill -9, and with fail = "closed" it keeps
// blocking bound sockets while tunfw is down: after kill -9, after an
// error exit, and from `tunfw down --block` at boot.
func TestCaptureNftLifecycle(t *testing.T) {
	requireNft(t)
	topo := newCaptureTopo(t)
	host := topo.Host
	startHTTP(t, topo.Server, netip.AddrPortFrom(topo.ServiceV4, 8080))
	url := urlOf(topo.ServiceV4, 8080)
	before := netState(t, host)
	restored := func(when string) {
		t.Helper()
		if after := netState(t, host); after != before {
			t.Errorf("namespace not restored %s.\nbefore:\n%s\nafter:\n%s", when, before, after)
		}
		if table := nftTable(t, host, "tunfw"); table != "" {
			t.Errorf("nftables table left %s:\n%s", when, table)
		}
	}
	bound := func() (int, string) {
		rc, out, _ := curlAs(host, "--interface", topo.HostIf, url)
		return rc, out
	}

	t.Run("open-kill9-replaced", func(t *testing.T) {
		cfg := captureCfg(t, "open")
		fw := startTunfw(t, host, cfg)
		old := regexp.MustCompile(`# handle (\d+)`).FindString(tableHandles(t, host))
		fw.kill9()
		if nftTable(t, host, "tunfw") == "" {
			t.Fatalf("no table after kill -9: nothing to replace")
		}
		// fail = open: bound sockets pass again once the alive element
		// has timed out.
		if err := eventually(8*time.Second, func() error {
			if rc, out := bound(); rc != 0 {
				return fmt.Errorf("rc %d: %s", rc, out)
			}
			return nil
		}); err != nil {
			t.Errorf("fail = open, after kill -9: bound curl %v", err)
		}
		fw = startTunfw(t, host, cfg)
		fw.waitLog(t, 5*time.Second, "removed leftovers of an earlier run", "nftables=1")
		if now := regexp.MustCompile(`# handle (\d+)`).FindString(tableHandles(t, host)); now == old || now == "" {
			t.Errorf("table not replaced: handle %s before, %s after", old, now)
		}
		if rc, out := bound(); rc != 7 {
			t.Errorf("after up replaced the table, bound curl: rc %d, want 7\n%s", rc, out)
		}
		fw.kill9()
		out := runDown(t, host, cfg)
		if !strings.Contains(out, "1 nftables tables") {
			t.Errorf("tunfw down: %s", out)
		}
		restored("after kill -9 and tunfw down")
	})

	t.Run("closed-kill9", func(t *testing.T) {
		cfg := captureCfg(t, "closed")
		fw := startTunfw(t, host, cfg)
		fw.kill9()
		// Checked at once and after fail = "open"'s 5 s grace would have
		// ended: the closed block does not time out.
		for _, wait := range []time.Duration{0, 6 * time.Second} {
			time.Sleep(wait)
			if rc, out := bound(); rc != 7 {
				t.Errorf("fail = closed, %v after tunfw was killed: bound curl rc %d, want 7 (refused)\n%s", wait, rc, out)
			}
		}
		if err := tcpEcho(host, hostPort(topo.ServiceV4, 8080), 2*time.Second); err == nil {
			t.Errorf("fail = closed, tunfw killed: an unbound connection got through")
		}
		// A restart adopts the kill switch's routes and rules as they are
		// (nothing removed before the new ones are in) and replaces the
		// nftables table in one transaction.
		fw = startTunfw(t, host, cfg)
		fw.waitLog(t, 5*time.Second, "removed leftovers of an earlier run", "rules=0", "routes=0", "nftables=1")
		if rc, out, _ := curlAs(host, url); rc != 0 {
			t.Errorf("tunfw up after kill -9: curl rc %d\n%s", rc, out)
		}
		fw.kill9()
		runDown(t, host, cfg)
		if rc, out := bound(); rc != 0 {
			t.Errorf("after tunfw down: bound curl rc %d\n%s", rc, out)
		}
		restored("after tunfw down")
	})

	t.Run("closed-error-exit", func(t *testing.T) {
		cfg := captureCfg(t, "closed")
		fw := startTunfw(t, host, cfg)
		// Deleting the device makes every TUN read fail: an error exit.
		host.Run(t, "ip", "link", "del", "tunfw0")
		select {
		case <-fw.done:
		case <-time.After(10 * time.Second):
			t.Fatalf("tunfw still running 10 s after its device was deleted")
		}
		if code := fw.cmd.ProcessState.ExitCode(); code == 0 {
			t.Errorf("exit code 0 after losing the device")
		}
		state := netState(t, host)
		if want := "not from all fwmark 0x7466 lookup 29798"; !strings.Contains(state, want) {
			t.Errorf("fail = closed, after an error exit: %q is gone:\n%s", want, state)
		}
		if !killSwitchArmed(t, host) {
			t.Errorf("fail = closed, after an error exit: the nftables table no longer refuses:\n%s", nftTable(t, host, "tunfw"))
		}
		if rc, out := bound(); rc != 7 {
			t.Errorf("fail = closed, after an error exit: bound curl rc %d, want 7\n%s", rc, out)
		}
		runDown(t, host, cfg)
		restored("after an error exit and tunfw down")
	})

	t.Run("nftables-off", func(t *testing.T) {
		// The documented opt-out: no table, and bound sockets are not
		// refused (README: what is then unprotected).
		cfg := writeConfig(t, strings.Replace(fmt.Sprintf(captureConfig, "open"), "auto = true", "auto = true\nnftables = false", 1))
		fw := startTunfw(t, host, cfg)
		if table := nftTable(t, host, "tunfw"); table != "" {
			t.Errorf("nftables = false, but a table is installed:\n%s", table)
		}
		if err := tcpEcho(host, hostPort(topo.ServiceV4, 9100), 3*time.Second); err != nil {
			t.Errorf("capture with nftables = false: %v", err)
		}
		fw.waitLog(t, 5*time.Second, "verdict=allow", "dst="+hostPort(topo.ServiceV4, 9100))
		fw.stop()
		restored("after nftables = false")
	})

	t.Run("down-block", func(t *testing.T) {
		cfg := captureCfg(t, "closed")
		out, err := host.Cmd(binary, "down", "--block", "-c", cfg).CombinedOutput()
		if err != nil {
			t.Fatalf("tunfw down --block: %v\n%s", err, out)
		}
		if rc, out := bound(); rc != 7 {
			t.Errorf("after tunfw down --block: bound curl rc %d, want 7\n%s", rc, out)
		}
		err = tcpEcho(host, hostPort(topo.ServiceV4, 8080), 2*time.Second)
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("after tunfw down --block: unbound connect %v, want refused", err)
		}
		fw := startTunfw(t, host, cfg)
		if rc, out, _ := curlAs(host, url); rc != 0 {
			t.Errorf("tunfw up after down --block: curl rc %d\n%s", rc, out)
		}
		fw.waitLog(t, 5*time.Second, "verdict=allow", "dst="+hostPort(topo.ServiceV4, 8080))
		fw.stop()
		restored("after down --block, up and a clean stop")
	})
}

// tableHandles lists tunfw's nftables table with handles.
func tableHandles(t *testing.T, ns *netnstest.NS) string {
	t.Helper()
	return ns.Run(t, "nft", "-a", "list", "table", "inet", "tunfw")
}

// gatewaySpoofConfig: gateway mode with host capture; link-local
// destinations of gateway clients go through the rules.
const gatewaySpoofConfig = `
[tun]
name = "tunfw0"
addresses = ["198.18.0.1/30", "fd54:756e:6677::1/126"]

[route]
auto = %v
from = ["%s", "%s"]

[filter]
default = "allow"
log = "all"

[[rule]]
name = "no-metadata-9001"
action = "deny"
proto = "tcp"
dst = "169.254.169.254"
dst_port = 9001
`

// TestGatewaySourceCheck: a gateway client that spoofs its neighbour's
// address (on another from interface), or any address that does not route
// back through its own interface, is dropped before tunfw judges it, and
// counted; legitimate clients still pass. Gateway clients reach
// 169.254.0.0/16 only through tunfw's rules, the host's own link-local
// traffic bypasses it.
func TestGatewaySourceCheck(t *testing.T) {
	requireNft(t)
	for _, auto := range []bool{false, true} {
		t.Run(fmt.Sprintf("auto=%v", auto), func(t *testing.T) { testGatewaySourceCheck(t, auto) })
	}
}

func testGatewaySourceCheck(t *testing.T, auto bool) {
	topo := newCaptureTopo(t)
	host := topo.Host
	host.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
	// Two client namespaces on two from interfaces.
	a := netnstest.New(t, "tfg-")
	b := netnstest.New(t, "tfg-")
	lanA, lanB := "tfl-"+a.Name[4:], "tfl-"+b.Name[4:]
	netnstest.Link(t, host, lanA, []string{"10.98.0.1/24", "fd98::1/64"}, a, "tfm-"+a.Name[4:], []string{"10.98.0.2/24", "fd98::2/64"})
	netnstest.Link(t, host, lanB, []string{"10.96.0.1/24", "fd96::1/64"}, b, "tfm-"+b.Name[4:], []string{"10.96.0.2/24", "fd96::2/64"})
	for _, c := range []struct {
		ns     *netnstest.NS
		v4, v6 string
	}{{a, "10.98.0.1", "fd98::1"}, {b, "10.96.0.1", "fd96::1"}} {
		c.ns.Run(t, "ip", "route", "add", "default", "via", c.v4)
		c.ns.Run(t, "ip", "-6", "route", "add", "default", "via", c.v6)
	}
	// Client A also holds B's addresses, to send from them.
	a.Run(t, "ip", "addr", "add", "10.96.0.2/32", "dev", "tfm-"+a.Name[4:])
	a.Run(t, "ip", "addr", "add", "fd96::2/128", "dev", "tfm-"+a.Name[4:], "nodad")
	a.Run(t, "ip", "addr", "add", "10.97.0.9/32", "dev", "tfm-"+a.Name[4:])
	// A metadata service on the server, reached from the host by a route.
	topo.Server.Run(t, "ip", "addr", "add", "169.254.169.254/32", "dev", "lo")
	host.Run(t, "ip", "route", "add", "169.254.169.254/32", "via", topo.ServerV4.String())
	for _, port := range []uint16{9001, 9100} {
		startTCPEcho(t, topo.Server, netip.MustParseAddrPort(fmt.Sprintf("169.254.169.254:%d", port)))
	}

	startTCPEcho(t, host, netip.MustParseAddrPort("[::]:2222"))
	cfg := writeConfig(t, fmt.Sprintf(gatewaySpoofConfig, auto, lanA, lanB))
	fw := startTunfw(t, host, cfg)
	// Clients reach the host's own services (with auto, the replies must
	// not be captured).
	for _, at := range []string{"10.98.0.1:2222", "[fd98::1]:2222"} {
		if err := tcpEcho(a, at, 3*time.Second); err != nil {
			t.Errorf("client A to the host's service %s: %v", at, err)
		}
	}

	dialFrom := func(ns *netnstest.NS, src netip.Addr, dst string) error {
		var c net.Conn
		err := ns.Do(func() (err error) {
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}, Timeout: 1500 * time.Millisecond}
			c, err = d.Dial("tcp", dst)
			return err
		})
		if c != nil {
			c.Close()
		}
		return err
	}
	for _, svc := range []netip.Addr{topo.ServiceV4, topo.ServiceV6} {
		legit, spoofs := netip.MustParseAddr("10.98.0.2"), []netip.Addr{netip.MustParseAddr("10.96.0.2"), netip.MustParseAddr("10.97.0.9")}
		if svc.Is6() {
			legit, spoofs = netip.MustParseAddr("fd98::2"), []netip.Addr{netip.MustParseAddr("fd96::2")}
		}
		if err := dialFrom(a, legit, hostPort(svc, 9100)); err != nil {
			t.Errorf("client A from its own address %s: %v", legit, err)
		}
		for _, src := range spoofs {
			if err := dialFrom(a, src, hostPort(svc, 9100)); err == nil {
				t.Errorf("client A spoofing %s got a connection", src)
			}
		}
		if err := tcpEcho(b, hostPort(svc, 9100), 3*time.Second); err != nil {
			t.Errorf("client B from its own address: %v", err)
		}
	}
	fw.waitLog(t, 5*time.Second, "verdict=allow", "src=[fd96::2]:")
	if strings.Contains(fw.log(), "src=10.97.0.9:") {
		t.Errorf("tunfw judged a packet from 10.97.0.9, which does not route back through A's interface:\n%s", fw.log())
	}
	// B's one legitimate connection per family is the only flow from its
	// addresses: A's spoofed SYNs were not judged as B's.
	for _, src := range []string{"src=10.96.0.2:", "src=[fd96::2]:"} {
		if n := strings.Count(fw.log(), src); n != 1 {
			t.Errorf("%d flows with %s, want 1 (B's own):\n%s", n, src, fw.log())
		}
	}
	if _, _, spoofed := captureStatusOf(t, host, cfg); spoofed < 3 {
		t.Errorf("tunfw status counts %d spoofed packets, want at least 3", spoofed)
	}

	// Link-local: a gateway client reaches 169.254.169.254 only through
	// tunfw's rules (the server has no route back to the clients: only a
	// connection tunfw dials works).
	if err := tcpEcho(a, "169.254.169.254:9100", 3*time.Second); err != nil {
		t.Errorf("client to 169.254.169.254:9100 (allowed): %v", err)
	}
	fw.waitLog(t, 5*time.Second, "verdict=allow", "src=10.98.0.2:", "dst=169.254.169.254:9100")
	if err := tcpEcho(a, "169.254.169.254:9001", 1200*time.Millisecond); !isTimeout(err) {
		t.Errorf("client to 169.254.169.254:9001 (denied): %v, want a timeout", err)
	}
	fw.waitLog(t, 5*time.Second, "verdict=deny", "rule=no-metadata-9001")
	// The host's own link-local traffic is not captured.
	if err := tcpEcho(host, "169.254.169.254:9001", 3*time.Second); err != nil {
		t.Errorf("host's own connection to 169.254.169.254:9001: %v", err)
	}
	for _, l := range strings.Split(fw.log(), "\n") {
		if strings.Contains(l, "dst=169.254.169.254:9001") && !strings.Contains(l, "src=10.98.0.2:") {
			t.Errorf("the host's own link-local connection was captured: %s", l)
		}
	}
}

// TestFailClosedNeedsCapture: fail = "closed" without auto or from has no
// kill switch to keep; it is a config error with file:line, not ignored.
func TestFailClosedNeedsCapture(t *testing.T) {
	cfg := writeConfig(t, `
[tun]
addresses = ["198.18.0.1/30"]
[route]
include = ["203.0.113.0/24"]
fail = "closed"
`)
	out, err := exec.Command(binary, "check", "-c", cfg).CombinedOutput()
	if err == nil || !regexp.MustCompile(`config\.toml:6: route\.fail: .*needs auto = true or from`).Match(out) {
		t.Errorf("tunfw check: %v\n%s", err, out)
	}
}
