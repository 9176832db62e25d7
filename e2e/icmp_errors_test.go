package e2e

import (
	endian "encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
	"golang.org/x/sys/unix"
)

// icmpErrorsConfig lets every UDP flow through, so the errors the network
// sends about the clients' datagrams are what is tested.
const icmpErrorsConfig = `
[tun]
addresses = ["198.18.0.1/30", "fd54:756e:6677::1/126"]
[route]
include = ["203.0.113.0/24", "2001:db8:99::/48"]
[filter]
default = "allow"
[metrics]
listen = "127.0.0.1:9477"
`

// icmpErrorsTopology is the usual topology with a UDP echo server on port
// 7000 of the service addresses and nothing on 5399 and 5400. Two more
// addresses answer with ICMP errors, as a firewall on the way would: .50
// "host unreachable" (v6: "address unreachable"), .51 "administratively
// prohibited" (v4: "communication administratively filtered"), and .70 is
// routed to a link with an MTU of 1280, so larger datagrams get
// "fragmentation needed" / "packet too big" from the Server. nftables
// sends them rather than unreachable routes: the kernel lets those answer
// about once a second per client, with no knob but a global one. The
// Server has no ICMP rate limit, so every probe gets its error at once.
func icmpErrorsTopology(t *testing.T) *netnstest.Topology {
	topo := netnstest.NewTopology(t)
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("nft is not installed (apt-get install nftables)")
	}
	for _, s := range []string{"net.ipv4.icmp_ratelimit=0", "net.ipv6.icmp.ratelimit=0", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"} {
		topo.Server.Run(t, "sysctl", "-qw", s)
	}
	// A veth pair inside the Server: only datagrams too large for it are
	// routed there, and those never leave.
	topo.Server.Run(t, "ip", "link", "add", "narrow", "mtu", "1280", "type", "veth", "peer", "name", "narrowp", "mtu", "1280")
	topo.Server.Run(t, "ip", "link", "set", "narrow", "up")
	topo.Server.Run(t, "ip", "link", "set", "narrowp", "up")
	rules := "table inet icmperr {\n chain in {\n  type filter hook input priority 0;\n"
	for _, svc := range []netip.Addr{topo.ServiceV4, topo.ServiceV6} {
		startUDPEcho(t, topo.Server, netip.AddrPortFrom(svc, 7000))
		topo.Server.Run(t, "ip", "route", "add", sibling(svc, 70).String(), "dev", "narrow")
		ip, unreach, prohibit := "ip", "icmp type host-unreachable", "icmp type admin-prohibited"
		if svc.Is6() {
			ip, unreach, prohibit = "ip6", "icmpv6 type addr-unreachable", "icmpv6 type admin-prohibited"
		}
		for _, r := range []struct {
			n      int
			answer string
		}{{50, unreach}, {51, prohibit}} {
			a := sibling(svc, r.n)
			args := []string{"ip", "addr", "add", netip.PrefixFrom(a, a.BitLen()).String(), "dev", "lo"}
			if a.Is6() {
				args = append(args, "nodad")
			}
			topo.Server.Run(t, args...)
			rules += fmt.Sprintf("  %s daddr %s reject with %s\n", ip, a, r.answer)
		}
	}
	rules += " }\n}\n"
	cmd := topo.Server.Cmd("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v\n%s\n%s", err, out, rules)
	}
	return topo
}

// connectedUDPError sends a datagram from a connected UDP socket in ns to
// dst, as any client does, and returns the error its read gets within d
// (nil when a reply comes, os.ErrDeadlineExceeded when nothing does) and
// how long it took.
func connectedUDPError(t *testing.T, ns *netnstest.NS, dst netip.AddrPort, d time.Duration) (error, time.Duration) {
	t.Helper()
	c, err := ns.Dial("udp", dst.String())
	if err != nil {
		t.Fatalf("dial %s: %v", dst, err)
	}
	defer c.Close()
	t0 := time.Now()
	if _, err := c.Write([]byte("probe")); err != nil {
		return err, time.Since(t0)
	}
	c.SetReadDeadline(t0.Add(d))
	_, err = c.Read(make([]byte, 100))
	return err, time.Since(t0)
}

// queuedICMP is an error read from a socket's error queue (IP_RECVERR).
type queuedICMP struct {
	errno      syscall.Errno
	typ, code  uint8
	info       uint32 // the MTU of fragmentation needed / packet too big
	from       netip.Addr
	quotedData string // the payload the error quoted
}

// recvErrUDPError is connectedUDPError for a client that asks for
// IP_RECVERR (as ping and traceroute do): its socket reports every error,
// soft ones (host and network unreachable) included, with the ICMP type,
// code and sender. It returns the errno of the read and the error queued
// (os.ErrDeadlineExceeded and nothing when nothing came within d).
func recvErrUDPError(t *testing.T, ns *netnstest.NS, dst netip.AddrPort, payload string, d time.Duration) (error, queuedICMP) {
	t.Helper()
	var readErr error
	var q queuedICMP
	err := ns.Do(func() error {
		family, level, opt := unix.AF_INET, unix.SOL_IP, unix.IP_RECVERR
		var sa unix.Sockaddr
		if dst.Addr().Is4() {
			sa = &unix.SockaddrInet4{Port: int(dst.Port()), Addr: dst.Addr().As4()}
		} else {
			family, level, opt = unix.AF_INET6, unix.SOL_IPV6, unix.IPV6_RECVERR
			sa = &unix.SockaddrInet6{Port: int(dst.Port()), Addr: dst.Addr().As16()}
		}
		fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if err := unix.SetsockoptInt(fd, level, opt, 1); err != nil {
			return err
		}
		if err := unix.Connect(fd, sa); err != nil {
			return err
		}
		if _, err := unix.Write(fd, []byte(payload)); err != nil {
			return err
		}
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		if n, err := unix.Poll(pfd, int(d/time.Millisecond)); err != nil || n == 0 {
			readErr = os.ErrDeadlineExceeded // nothing came
			return err
		}
		_, readErr = unix.Read(fd, make([]byte, 100))
		buf, oob := make([]byte, 2000), make([]byte, 256)
		n, oobn, _, _, err := unix.Recvmsg(fd, buf, oob, unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
		if err != nil {
			return fmt.Errorf("nothing in the error queue: %w", err)
		}
		q.quotedData = string(buf[:n])
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil || len(msgs) == 0 {
			return fmt.Errorf("error queue control messages: %v", err)
		}
		data := msgs[0].Data
		q.errno = syscall.Errno(endian.NativeEndian.Uint32(data[0:]))
		q.typ, q.code = data[5], data[6]
		q.info = endian.NativeEndian.Uint32(data[8:])
		if sa := data[16:]; family == unix.AF_INET {
			q.from = netip.AddrFrom4([4]byte(sa[4:8]))
		} else {
			q.from = netip.AddrFrom16([16]byte(sa[8:24]))
		}
		return nil
	})
	if err != nil {
		t.Fatalf("probe %s: %v", dst, err)
	}
	return readErr, q
}

// nmapUDP runs nmap's UDP scan of ports on dst from ns and returns each
// port's state ("5399" -> "closed").
func nmapUDP(t *testing.T, ns *netnstest.NS, dst netip.Addr, ports string) map[string]string {
	t.Helper()
	if _, err := exec.LookPath("nmap"); err != nil {
		t.Skip("nmap is not installed (apt-get install nmap)")
	}
	args := []string{"nmap", "-sU", "-Pn", "-n", "-T4", "--max-retries", "2", "-p", ports}
	if dst.Is6() {
		args = append(args, "-6")
	}
	out, err := ns.Cmd(append(args, dst.String())...).CombinedOutput()
	if err != nil {
		t.Fatalf("nmap: %v\n%s", err, out)
	}
	states := make(map[string]string)
	for _, m := range regexp.MustCompile(`(?m)^(\d+)/udp\s+(\S+)`).FindAllStringSubmatch(string(out), -1) {
		states[m[1]] = m[2]
	}
	if len(states) == 0 {
		t.Fatalf("nmap reported no ports:\n%s", out)
	}
	return states
}

// TestICMPErrorsReachUDPClients: the ICMP errors the network sends about a
// UDP flow's datagrams reach the client through tunfw as on the direct
// path: a connected socket sending to a closed port gets ECONNREFUSED within
// a second, dig fails at once with "connection refused" instead of timing
// out, nmap sees closed ports as closed, a host behind an unreachable route
// gives EHOSTUNREACH from the address that said so, and a prohibited one
// EHOSTUNREACH (v6: EACCES) even to a client that did not ask for soft
// errors, and a datagram too large for a link on the way tells the client
// that link's MTU (fragmentation needed / packet too big). Each error is counted by kind in `tunfw
// stats` and the metrics. Before, every one of these waited for a timeout.
func TestICMPErrorsReachUDPClients(t *testing.T) {
	netnstest.RequireRoot(t)
	topo := icmpErrorsTopology(t)
	host := topo.Host
	const ports = "5399,5400,7000"
	// The direct path (routes via the veth), for comparison.
	direct := map[netip.Addr]map[string]string{}
	directUnreach := map[netip.Addr]queuedICMP{}
	for _, svc := range []netip.Addr{topo.ServiceV4, topo.ServiceV6} {
		direct[svc] = nmapUDP(t, host, svc, ports)
		_, directUnreach[svc] = recvErrUDPError(t, host, netip.AddrPortFrom(sibling(svc, 50), 5399), "probe", time.Second)
	}
	cfg := writeConfig(t, icmpErrorsConfig)
	startTunfw(t, host, cfg)

	families := []struct {
		name string
		svc  netip.Addr
		// what the unreachable and prohibited hosts give
		unreachType, unreachCode uint8
		prohibitErrno            syscall.Errno
		tooBigType, tooBigCode   uint8
		router                   netip.Addr
	}{
		{"v4", topo.ServiceV4, 3, 1, unix.EHOSTUNREACH, 3, 4, topo.ServerV4},
		{"v6", topo.ServiceV6, 1, 3, unix.EACCES, 2, 0, topo.ServerV6},
	}
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			closed := netip.AddrPortFrom(f.svc, 5399)
			// A reply still comes back on an open port.
			if err, _ := connectedUDPError(t, host, netip.AddrPortFrom(f.svc, 7000), 2*time.Second); err != nil {
				t.Fatalf("the echo server's reply: %v", err)
			}
			err, took := connectedUDPError(t, host, closed, time.Second)
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("connected socket to closed port %v: %v after %v, want ECONNREFUSED within 1s", closed, err, took.Round(time.Millisecond))
			} else {
				t.Logf("closed port refused in %v", took.Round(time.Microsecond))
			}

			// dig, which would otherwise wait 3 s and say "timed out".
			t0 := time.Now()
			out, _ := host.Cmd("dig", "@"+f.svc.String(), "-p", "5399", "+tries=1", "+time=3", "example.com").CombinedOutput()
			took = time.Since(t0)
			if !strings.Contains(string(out), "connection refused") || took > 2*time.Second {
				t.Errorf("dig to a closed port, after %v:\n%s\nwant \"connection refused\" at once", took.Round(time.Millisecond), out)
			} else {
				t.Logf("dig refused in %v", took.Round(time.Millisecond))
			}

			got := nmapUDP(t, host, f.svc, ports)
			t.Logf("nmap -sU through tunfw: %v; direct: %v", got, direct[f.svc])
			for port, want := range direct[f.svc] {
				if got[port] != want {
					t.Errorf("nmap -sU: port %s is %q through tunfw, %q on the direct path", port, got[port], want)
				}
			}
			if direct[f.svc]["5399"] != "closed" || direct[f.svc]["7000"] != "open" {
				t.Errorf("the direct path's nmap states are not the expected ones: %v", direct[f.svc])
			}

			// An unreachable host, as a client asking for IP_RECVERR
			// sees it: the same error from the same address as on the
			// direct path.
			unreach := sibling(f.svc, 50)
			err, q := recvErrUDPError(t, host, netip.AddrPortFrom(unreach, 5399), "probe", time.Second)
			if !errors.Is(err, unix.EHOSTUNREACH) || q.errno != unix.EHOSTUNREACH || q.typ != f.unreachType || q.code != f.unreachCode || q.from != unreach {
				t.Errorf("unreachable host: read %v, queued %+v; want EHOSTUNREACH, ICMP %d/%d from %v", err, q, f.unreachType, f.unreachCode, unreach)
			}
			if d := directUnreach[f.svc]; d != q {
				t.Errorf("unreachable host: %+v through tunfw, %+v on the direct path", q, d)
			}
			if q.quotedData != "probe" {
				t.Errorf("the error quotes %q of the datagram, want %q", q.quotedData, "probe")
			}
			// A prohibited one: a hard error, which any connected
			// socket reports.
			err, _ = connectedUDPError(t, host, netip.AddrPortFrom(sibling(f.svc, 51), 5399), time.Second)
			if !errors.Is(err, f.prohibitErrno) {
				t.Errorf("prohibited host: %v, want %v", err, f.prohibitErrno)
			}

			// A datagram larger than a link on the way: the client
			// learns that link's MTU, from the router on it.
			big := strings.Repeat("b", 1400)
			err, q = recvErrUDPError(t, host, netip.AddrPortFrom(sibling(f.svc, 70), 5399), big, time.Second)
			if !errors.Is(err, unix.EMSGSIZE) || q.errno != unix.EMSGSIZE || q.typ != f.tooBigType || q.code != f.tooBigCode || q.info != 1280 || q.from != f.router {
				t.Errorf("too big: read %v, queued %+v; want EMSGSIZE, ICMP %d/%d MTU 1280 from %v", err, q, f.tooBigType, f.tooBigCode, f.router)
			}
			if len(q.quotedData) < 500 || !strings.HasPrefix(big, q.quotedData) {
				t.Errorf("the error quotes %d bytes of the datagram, want its first 500 or more", len(q.quotedData))
			}
		})
	}

	relayed := statsCounts(t, cfg, "icmp_errors_relayed")
	t.Logf("relayed: %v; stack drops: %v", relayed, stackDrops(t, cfg))
	// v4 and v6: 1 connected socket, dig, nmap's probes of 2 ports.
	if relayed["port-unreachable"] < 2*(1+1+2) {
		t.Errorf("port-unreachable relayed: %d, want at least %d", relayed["port-unreachable"], 2*(1+1+2))
	}
	if relayed["host-unreachable"] < 2 || relayed["prohibited"] < 2 || relayed["too-big"] < 2 {
		t.Errorf("relayed by kind: %v; want host-unreachable 2, prohibited 2, too-big 2", relayed)
	}
	m := scrapeMetrics(t, host, "127.0.0.1:9477")
	for kind, n := range relayed {
		if got := m["tunfw_icmp_errors_relayed_total,kind="+kind]; got != float64(n) {
			t.Errorf("metric tunfw_icmp_errors_relayed_total{kind=%q} is %v, stats say %d", kind, got, n)
		}
	}
}
