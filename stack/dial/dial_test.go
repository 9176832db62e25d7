package dial

import (
	"context"
	"net"
	"os"
	"testing"

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
}
