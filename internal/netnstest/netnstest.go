// Package netnstest provides helpers for end-to-end tests that need a small
// topology of Linux network namespaces.
//
// Everything these helpers create lives inside network namespaces that the
// helpers themselves create; the root namespace of the machine is never
// modified. Namespaces are removed via t.Cleanup, also when a test fails.
//
// Configuration is done by shelling out to iproute2's `ip` (and `sysctl`
// via `ip netns exec`) so that what happens is simple and visible. Sockets
// are opened inside a namespace from the test process with [NS.Do] and the
// wrappers built on it.
package netnstest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// RequireRoot skips the test unless it runs as root, /dev/net/tun exists and
// the `ip` command (iproute2) is in PATH.
func RequireRoot(t testing.TB) {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skipf("netnstest: network namespaces need linux, running on %s", runtime.GOOS)
	}
	if os.Geteuid() != 0 {
		t.Skip("netnstest: test needs root (creates network namespaces); skipping as non-root")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skipf("netnstest: /dev/net/tun not available: %v", err)
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skipf("netnstest: `ip` (iproute2) not found in PATH: %v", err)
	}
}

// NS is a network namespace created for a test.
type NS struct {
	// Name is the namespace name as shown by `ip netns list`.
	Name string
}

// maxNameLen keeps names short enough to be usable as interface names too.
const maxNameLen = 15

func randHex(nbytes int) string {
	b := make([]byte, nbytes)
	if _, err := rand.Read(b); err != nil {
		panic("netnstest: crypto/rand: " + err.Error())
	}
	return hex.EncodeToString(b)
}

// run executes a command in the root mount/pid context (typically `ip ...`)
// and returns its combined output or an error that includes the command
// line and its output.
func run(args ...string) (string, error) {
	cmd := exec.Command(args[0], args[1:]...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("netnstest: %q failed: %v; output: %s",
			strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

func mustRun(t testing.TB, args ...string) string {
	t.Helper()
	out, err := run(args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// New creates a network namespace whose name is prefix followed by random
// hex (at most 15 characters in total), brings its lo up and disables IPv6
// duplicate address detection inside it. A t.Cleanup kills any processes
// still running inside the namespace and deletes it.
func New(t testing.TB, prefix string) *NS {
	t.Helper()
	const suffixLen = 8
	if len(prefix) > maxNameLen-suffixLen {
		prefix = prefix[:maxNameLen-suffixLen]
	}
	n := &NS{Name: prefix + randHex(suffixLen/2)}
	mustRun(t, "ip", "netns", "add", n.Name)
	t.Cleanup(func() {
		if err := n.destroy(); err != nil {
			t.Errorf("netnstest: cleanup of namespace %s: %v", n.Name, err)
		}
	})
	mustRun(t, "ip", "-n", n.Name, "link", "set", "lo", "up")
	n.Run(t, "sysctl", "-qw",
		"net.ipv6.conf.all.accept_dad=0",
		"net.ipv6.conf.default.accept_dad=0",
	)
	return n
}

// destroy kills the processes inside the namespace (they can only have been
// started by the test, since the namespace is ours) and deletes it.
func (n *NS) destroy() error {
	var errs []error
	self := os.Getpid()
	for attempt := 0; attempt < 50; attempt++ {
		out, err := run("ip", "netns", "pids", n.Name)
		if err != nil {
			errs = append(errs, err)
			break
		}
		var pids []int
		for _, f := range strings.Fields(out) {
			pid, err := strconv.Atoi(f)
			if err != nil || pid <= 1 || pid == self {
				continue
			}
			pids = append(pids, pid)
		}
		if len(pids) == 0 {
			break
		}
		for _, pid := range pids {
			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
				errs = append(errs, fmt.Errorf("kill %d in %s: %w", pid, n.Name, err))
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := run("ip", "netns", "del", n.Name); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Cmd returns an unstarted *exec.Cmd that runs args inside the namespace
// (`ip netns exec NAME args...`).
func (n *NS) Cmd(args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", n.Name}, args...)...)
}

// Run runs args inside the namespace and returns the combined output. It
// fails the test, showing the output, if the command fails.
func (n *NS) Run(t testing.TB, args ...string) string {
	t.Helper()
	return mustRun(t, append([]string{"ip", "netns", "exec", n.Name}, args...)...)
}

func (n *NS) path() string {
	for _, dir := range []string{"/run/netns", "/var/run/netns"} {
		p := dir + "/" + n.Name
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return "/run/netns/" + n.Name
}

// Do runs fn on an OS thread that is switched into the namespace. Sockets
// created by fn stay in the namespace after fn returns; this is how a test
// opens listeners and client sockets in a namespace.
//
// fn runs on its own locked goroutine: goroutines started by fn run on other
// threads and thus NOT in the namespace, and blocking calls inside fn must
// therefore not rely on helper goroutines to create sockets (use IP
// literals, not host names). If switching back fails, the thread is left
// locked so that the runtime discards it when the goroutine exits.
func (n *NS) Do(fn func() error) error {
	target, err := os.Open(n.path())
	if err != nil {
		return fmt.Errorf("netnstest: open namespace %s: %w", n.Name, err)
	}
	defer target.Close()

	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// No deferred UnlockOSThread: only unlock when the thread is known
		// to be back in its original namespace.
		orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netnstest: open current namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netnstest: setns into %s: %w", n.Name, err)
			return
		}
		var fnErr error
		func() {
			defer func() {
				if r := recover(); r != nil {
					fnErr = fmt.Errorf("netnstest: panic in Do(%s): %v", n.Name, r)
				}
			}()
			fnErr = fn()
		}()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// Thread stays locked and dies with this goroutine.
			errc <- errors.Join(fnErr, fmt.Errorf("netnstest: setns back from %s: %w", n.Name, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- fnErr
	}()
	return <-errc
}

// Listen is net.Listen inside the namespace.
func (n *NS) Listen(network, addr string) (net.Listener, error) {
	var l net.Listener
	err := n.Do(func() (err error) {
		l, err = net.Listen(network, addr)
		return err
	})
	return l, err
}

// ListenPacket is net.ListenPacket inside the namespace.
func (n *NS) ListenPacket(network, addr string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := n.Do(func() (err error) {
		pc, err = net.ListenPacket(network, addr)
		return err
	})
	return pc, err
}

// checkLiteral rejects dial addresses whose host is not an IP literal: name
// resolution may run on other threads (outside the namespace) and could send
// queries out of the test's namespaces.
func checkLiteral(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("netnstest: bad address %q: %w", addr, err)
	}
	if i := strings.IndexByte(host, '%'); i >= 0 {
		host = host[:i]
	}
	if _, err := netip.ParseAddr(host); err != nil {
		return fmt.Errorf("netnstest: dial address %q must use an IP literal host", addr)
	}
	return nil
}

// DialContext dials addr from inside the namespace, honouring ctx. The host
// part of addr must be an IP literal.
func (n *NS) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	if err := checkLiteral(addr); err != nil {
		return nil, err
	}
	// A negative FallbackDelay keeps the dial serial on the calling
	// (namespace-switched) goroutine.
	d := net.Dialer{FallbackDelay: -1}
	var c net.Conn
	err := n.Do(func() (err error) {
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// Dial is net.Dial inside the namespace (host must be an IP literal).
func (n *NS) Dial(network, addr string) (net.Conn, error) {
	return n.DialContext(context.Background(), network, addr)
}

// DialTimeout is net.DialTimeout inside the namespace (host must be an IP
// literal).
func (n *NS) DialTimeout(network, addr string, d time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	return n.DialContext(ctx, network, addr)
}

// HTTPClient returns an *http.Client whose connections are dialled inside
// the namespace. Proxies from the environment are ignored, URLs must use IP
// literal hosts, and the client has a 30s overall timeout.
func (n *NS) HTTPClient() *http.Client {
	return &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{
			Proxy:               nil,
			DialContext:         n.DialContext,
			DisableKeepAlives:   true,
			TLSHandshakeTimeout: 10 * time.Second,
		},
	}
}

// Link connects namespaces a and b with a veth pair: interface aName in a and
// bName in b, both up. The pair is created directly inside a (never in the
// root namespace). Addresses are CIDR strings ("10.99.0.1/24",
// "fd99::1/64") and are added with nodad.
func Link(t testing.TB, a *NS, aName string, aAddrs []string, b *NS, bName string, bAddrs []string) {
	t.Helper()
	for _, name := range []string{aName, bName} {
		if len(name) == 0 || len(name) > maxNameLen {
			t.Fatalf("netnstest: interface name %q must be 1..%d characters", name, maxNameLen)
		}
	}
	mustRun(t, "ip", "-n", a.Name, "link", "add", aName, "type", "veth", "peer", "name", bName, "netns", b.Name)
	t.Cleanup(func() {
		// Best effort: deleting one end deletes the pair; the namespaces'
		// own cleanup removes it anyway.
		_, _ = run("ip", "-n", a.Name, "link", "del", aName)
	})
	for _, side := range []struct {
		ns    *NS
		name  string
		addrs []string
	}{{a, aName, aAddrs}, {b, bName, bAddrs}} {
		for _, cidr := range side.addrs {
			p, err := netip.ParsePrefix(cidr)
			if err != nil {
				t.Fatalf("netnstest: bad address %q: %v", cidr, err)
			}
			args := []string{"ip", "-n", side.ns.Name, "addr", "add", p.String(), "dev", side.name}
			if p.Addr().Is6() {
				args = append(args, "nodad")
			}
			mustRun(t, args...)
		}
		mustRun(t, "ip", "-n", side.ns.Name, "link", "set", side.name, "up")
	}
	// The kernel reports carrier (and activates the qdisc and IPv6 on the
	// device) asynchronously, rate-limited by linkwatch; packets sent
	// before that are dropped. Wait so that the first packets of a test
	// are not lost (which would show up as ~1s TCP SYN retransmits).
	waitOperUp(t, a, aName)
	waitOperUp(t, b, bName)
}

func waitOperUp(t testing.TB, n *NS, name string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		out := mustRun(t, "ip", "-n", n.Name, "-o", "link", "show", "dev", name)
		if strings.Contains(out, "state UP") && strings.Contains(out, "LOWER_UP") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("netnstest: %s in %s not operationally up after 5s: %s", name, n.Name, strings.TrimSpace(out))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Topology is the typical tunfw end-to-end setup: a Host namespace (where
// tunfw runs) and a Server namespace, connected by a veth pair. The Host has
// default routes via the Server; the Server has "service" addresses on lo.
type Topology struct {
	Host, Server         *NS
	HostIf, ServerIf     string
	HostV4, HostV6       netip.Addr
	ServerV4, ServerV6   netip.Addr
	ServiceV4, ServiceV6 netip.Addr
}

// NewTopology builds a Host and Server namespace connected by veth
// ("tfa-<suffix>" 10.99.0.1/24 + fd99::1/64 in Host, "tfb-<suffix>"
// 10.99.0.2/24 + fd99::2/64 in Server), puts 203.0.113.10/32 and
// 2001:db8:99::10/128 on the Server's lo, and gives the Host default routes
// via 10.99.0.2 and fd99::2. Everything is removed by t.Cleanup.
func NewTopology(t testing.TB) *Topology {
	t.Helper()
	suffix := randHex(4)
	tp := &Topology{
		Host:      New(t, "tfh-"),
		Server:    New(t, "tfs-"),
		HostIf:    "tfa-" + suffix,
		ServerIf:  "tfb-" + suffix,
		HostV4:    netip.MustParseAddr("10.99.0.1"),
		HostV6:    netip.MustParseAddr("fd99::1"),
		ServerV4:  netip.MustParseAddr("10.99.0.2"),
		ServerV6:  netip.MustParseAddr("fd99::2"),
		ServiceV4: netip.MustParseAddr("203.0.113.10"),
		ServiceV6: netip.MustParseAddr("2001:db8:99::10"),
	}
	Link(t,
		tp.Host, tp.HostIf, []string{tp.HostV4.String() + "/24", tp.HostV6.String() + "/64"},
		tp.Server, tp.ServerIf, []string{tp.ServerV4.String() + "/24", tp.ServerV6.String() + "/64"},
	)
	s := tp.Server.Name
	mustRun(t, "ip", "-n", s, "addr", "add", tp.ServiceV4.String()+"/32", "dev", "lo")
	mustRun(t, "ip", "-n", s, "-6", "addr", "add", tp.ServiceV6.String()+"/128", "dev", "lo", "nodad")
	h := tp.Host.Name
	mustRun(t, "ip", "-n", h, "route", "add", "default", "via", tp.ServerV4.String(), "dev", tp.HostIf)
	mustRun(t, "ip", "-n", h, "-6", "route", "add", "default", "via", tp.ServerV6.String(), "dev", tp.HostIf)
	return tp
}

// GatewayClient is a namespace routed through a Topology's Host, the way a
// container or a VM uses the machine it runs on: tunfw's gateway mode
// ([route] from) captures what the Host forwards from it.
type GatewayClient struct {
	NS *NS
	// HostIf is the Host's end of the link (the interface gateway mode
	// names in from), ClientIf the client's.
	HostIf, ClientIf string
	// MTU of the link: 1500 on both ends, an Ethernet-sized link like a
	// container's.
	MTU                int
	HostV4, HostV6     netip.Addr // on HostIf: the client's gateway
	ClientV4, ClientV6 netip.Addr
	// Prefix4 and Prefix6 are the link's subnets. The Server has no route
	// to them: add one if the Server must answer the client directly.
	Prefix4, Prefix6 netip.Prefix
}

// AddGatewayClient adds a namespace routed through tp.Host: a veth link of
// MTU 1500, 10.98.0.1/24 and fd98::1/64 on the Host's end ("tfl-<suffix>"),
// 10.98.0.2/24 and fd98::2/64 on the client's ("tfm-<suffix>"), default
// routes via the Host, and IPv4 and IPv6 forwarding on in the Host
// namespace (only there). Everything is removed by t.Cleanup.
func (tp *Topology) AddGatewayClient(t testing.TB) *GatewayClient {
	t.Helper()
	g := &GatewayClient{
		NS:       New(t, "tfg-"),
		MTU:      1500,
		HostV4:   netip.MustParseAddr("10.98.0.1"),
		HostV6:   netip.MustParseAddr("fd98::1"),
		ClientV4: netip.MustParseAddr("10.98.0.2"),
		ClientV6: netip.MustParseAddr("fd98::2"),
		Prefix4:  netip.MustParsePrefix("10.98.0.0/24"),
		Prefix6:  netip.MustParsePrefix("fd98::/64"),
	}
	suffix := g.NS.Name[len("tfg-"):]
	g.HostIf, g.ClientIf = "tfl-"+suffix, "tfm-"+suffix
	Link(t,
		tp.Host, g.HostIf, []string{prefixOf(g.HostV4, g.Prefix4), prefixOf(g.HostV6, g.Prefix6)},
		g.NS, g.ClientIf, []string{prefixOf(g.ClientV4, g.Prefix4), prefixOf(g.ClientV6, g.Prefix6)},
	)
	mtu := strconv.Itoa(g.MTU)
	mustRun(t, "ip", "-n", tp.Host.Name, "link", "set", g.HostIf, "mtu", mtu)
	mustRun(t, "ip", "-n", g.NS.Name, "link", "set", g.ClientIf, "mtu", mtu)
	mustRun(t, "ip", "-n", g.NS.Name, "route", "add", "default", "via", g.HostV4.String(), "dev", g.ClientIf)
	mustRun(t, "ip", "-n", g.NS.Name, "-6", "route", "add", "default", "via", g.HostV6.String(), "dev", g.ClientIf)
	tp.Host.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
	return g
}

func prefixOf(a netip.Addr, p netip.Prefix) string {
	return netip.PrefixFrom(a, p.Bits()).String()
}

// LoopbackTCP returns the two ends of a TCP connection on 127.0.0.1 in the
// test's own namespace (nothing is created there), the dialling end first,
// for unit tests that need a real socket. Both close with the test.
func LoopbackTCP(t testing.TB) (dialled, accepted *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	a, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return c.(*net.TCPConn), a.(*net.TCPConn)
}
