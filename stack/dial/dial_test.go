package dial

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestControlMarksAndBinds: a socket set up by Control carries the mark,
// and is bound to its family's interface, the one set last.
func TestControlMarksAndBinds(t *testing.T) {
	d := New(Outbound{IfaceV4: "lo", IfaceV6: "", Mark: 0x7466})
	if v4, v6 := d.Interfaces(); v4 != "lo" || v6 != "" {
		t.Fatalf("interfaces %q %q", v4, v6)
	}
	if d.iface("udp6") != "" || d.iface("tcp4") != "lo" || d.iface("ip6") != "" {
		t.Errorf("interface by network: udp6 %q, tcp4 %q", d.iface("udp6"), d.iface("tcp4"))
	}
	d.SetInterfaces("", "lo")
	if d.iface("tcp6") != "lo" || d.iface("udp4") != "" {
		t.Errorf("after SetInterfaces: tcp6 %q, udp4 %q", d.iface("tcp6"), d.iface("udp4"))
	}
	if os.Geteuid() != 0 {
		t.Skip("SO_MARK and SO_BINDTODEVICE on a socket need root (CAP_NET_ADMIN, CAP_NET_RAW)")
	}
	d.SetInterfaces("lo", "lo")
	ln, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := d.DialContext(context.Background(), "udp4", ln.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	raw, err := c.(*net.UDPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var mark int
	var dev string
	raw.Control(func(fd uintptr) {
		mark, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK)
		dev, _ = unix.GetsockoptString(int(fd), unix.SOL_SOCKET, unix.SO_BINDTODEVICE)
	})
	if mark != 0x7466 || dev != "lo" {
		t.Errorf("socket mark %#x, device %q; want 0x7466, lo", mark, dev)
	}
	tl, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer tl.Close()
	tc, err := d.DialTCP(context.Background(), tl.Addr().(*net.TCPAddr).AddrPort())
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	tc.SyscallConn().Control(func(fd uintptr) {
		mark, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK)
		dev, _ = unix.GetsockoptString(int(fd), unix.SOL_SOCKET, unix.SO_BINDTODEVICE)
	})
	if mark != 0x7466 || dev != "lo" {
		t.Errorf("TCP socket mark %#x, device %q; want 0x7466, lo", mark, dev)
	}
}

// TestDialTCP: a socket from DialTCP is connected, with no-delay and
// keep-alive set, carries bytes both ways and half-closes; a refused
// destination's error names ECONNREFUSED; a done context stops the dial.
func TestDialTCP(t *testing.T) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	d := New(Outbound{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := d.DialTCP(ctx, ln.Addr().(*net.TCPAddr).AddrPort())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	p, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	opts := map[string][2]int{
		"TCP_NODELAY":   {unix.IPPROTO_TCP, unix.TCP_NODELAY},
		"SO_KEEPALIVE":  {unix.SOL_SOCKET, unix.SO_KEEPALIVE},
		"TCP_KEEPIDLE":  {unix.IPPROTO_TCP, unix.TCP_KEEPIDLE},
		"TCP_KEEPINTVL": {unix.IPPROTO_TCP, unix.TCP_KEEPINTVL},
		"TCP_KEEPCNT":   {unix.IPPROTO_TCP, unix.TCP_KEEPCNT},
	}
	want := map[string]int{"TCP_NODELAY": 1, "SO_KEEPALIVE": 1, "TCP_KEEPIDLE": keepAliveIdle, "TCP_KEEPINTVL": keepAliveInterval, "TCP_KEEPCNT": keepAliveCount}
	c.SyscallConn().Control(func(fd uintptr) {
		for name, o := range opts {
			if v, err := unix.GetsockoptInt(int(fd), o[0], o[1]); err != nil || v != want[name] {
				t.Errorf("%s = %d, %v; want %d", name, v, err, want[name])
			}
		}
	})
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8)
	p.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := io.ReadFull(p, buf[:4]); n != 4 || string(buf[:4]) != "ping" {
		t.Fatalf("peer read %q, %v", buf[:n], err)
	}
	p.Write([]byte("pong"))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := io.ReadFull(c, buf[:4]); n != 4 || string(buf[:4]) != "pong" {
		t.Fatalf("read %q, %v", buf[:n], err)
	}
	c.SetReadDeadline(time.Now().Add(-time.Second))
	if n, err := c.Read(buf); n != 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("read past its deadline: %d, %v; want os.ErrDeadlineExceeded", n, err)
	}
	c.SetReadDeadline(time.Time{})
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if n, err := p.Read(buf); n != 0 || err != io.EOF {
		t.Errorf("peer read %d, %v after CloseWrite; want EOF", n, err)
	}
	p.Close()
	if n, err := c.Read(buf); n != 0 || err != io.EOF {
		t.Errorf("read %d, %v after the peer closed; want EOF", n, err)
	}

	// A port nobody listens on: the listener's, closed.
	closed, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	dst := closed.Addr().(*net.TCPAddr).AddrPort()
	closed.Close()
	if _, err := d.DialTCP(ctx, dst); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("dial to a closed port: %v, want ECONNREFUSED", err)
	}
	done, stop := context.WithCancel(context.Background())
	stop()
	if _, err := d.DialTCP(done, ln.Addr().(*net.TCPAddr).AddrPort()); !errors.Is(err, context.Canceled) {
		t.Errorf("dial with a cancelled context: %v, want context.Canceled", err)
	}
}
