package stack

import (
	"bytes"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/tunfw/tunfw/filter"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// TestBuildUDPReply checks the packets the UDP relay writes to the TUN: they
// parse, come from the flow's destination to its client, and their IP and
// UDP checksums verify, in both families.
func TestBuildUDPReply(t *testing.T) {
	for _, k := range []filter.FlowKey{
		{Proto: filter.ProtoUDP, Src: netip.MustParseAddrPort("198.18.0.1:40000"), Dst: netip.MustParseAddrPort("203.0.113.10:53")},
		{Proto: filter.ProtoUDP, Src: netip.MustParseAddrPort("[fd54::1]:40000"), Dst: netip.MustParseAddrPort("[2001:db8::10]:443")},
	} {
		payload := []byte("a reply of some length, odd: 37 bytes")
		ipLen := header.IPv4MinimumSize
		if k.Dst.Addr().Is6() {
			ipLen = header.IPv6MinimumSize
		}
		pkt := make([]byte, ipLen+header.UDPMinimumSize+len(payload))
		copy(pkt[ipLen+header.UDPMinimumSize:], payload)
		desc := buildUDPReply(pkt, k)

		var p filter.Packet
		if err := filter.ParsePacket(pkt, &p); err != nil {
			t.Fatalf("%v: reply does not parse: %v", k, err)
		}
		if p != desc {
			t.Errorf("%v: described as %+v, parses as %+v", k, desc, p)
		}
		if p.Src != k.Dst.Addr() || p.SrcPort != k.Dst.Port() || p.Dst != k.Src.Addr() || p.DstPort != k.Src.Port() || p.PayloadLen != len(payload) {
			t.Errorf("%v: reply %+v", k, p)
		}
		src, dst := tcpipAddr(p.Src), tcpipAddr(p.Dst)
		if k.Dst.Addr().Is4() && !header.IPv4(pkt).IsChecksumValid() {
			t.Errorf("%v: bad IPv4 header checksum", k)
		}
		udp := header.UDP(pkt[ipLen:])
		xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, src, dst, uint16(len(udp)))
		if got := checksum.Checksum(udp, xsum); got != 0xffff {
			t.Errorf("%v: UDP checksum does not verify (sum %#x)", k, got)
		}
	}
}

// BenchmarkBuildUDPReply is the per-datagram work of the UDP relay's reply
// path: it must not allocate.
func BenchmarkBuildUDPReply(b *testing.B) {
	k := filter.FlowKey{Proto: filter.ProtoUDP, Src: netip.MustParseAddrPort("[fd54::1]:40000"), Dst: netip.MustParseAddrPort("[2001:db8::10]:443")}
	pkt := make([]byte, header.IPv6MinimumSize+header.UDPMinimumSize+1200)
	b.ReportAllocs()
	for b.Loop() {
		buildUDPReply(pkt, k)
	}
}

// TestForwardUDPSendDoesNotAllocate checks the read loop's per-datagram send
// on a flow's socket (loopback here): the prepared send function keeps it
// allocation-free.
func TestForwardUDPSendDoesNotAllocate(t *testing.T) {
	_, c, raw := loopbackUDP(t)
	f := newUDPFlow(filter.FlowKey{}, c, raw)
	payload := []byte("datagram")
	if n := testing.AllocsPerRun(100, func() {
		f.sendBuf = payload
		raw.Write(f.send)
	}); n != 0 {
		t.Errorf("sending a datagram allocates %v times", n)
	}
	if f.sendErr != nil {
		t.Errorf("send: %v", f.sendErr)
	}
}

// TestUDPBatchKeepsDatagrams checks the read loop's batching: datagrams
// queued for one flow and flushed together (one GSO send) reach the server
// as the same datagrams, in order: equal sizes, a shorter last one, then a
// larger one that starts a new batch. The queue and flush allocate nothing.
func TestUDPBatchKeepsDatagrams(t *testing.T) {
	srv, c, raw := loopbackUDP(t)
	s := &Stack{}
	s.bufPool.New = func() any { b := make([]byte, tunOffset+maxIPPacket); return &b }
	f := newUDPFlow(filter.FlowKey{}, c, raw)
	var want [][]byte
	for i, size := range []int{1200, 1200, 1200, 700, 1300, 1300} {
		d := bytes.Repeat([]byte{byte('a' + i)}, size)
		want = append(want, d)
		s.queueUDP(f, d)
	}
	if f.out.segs != 2 || len(s.udpPending) != 2 {
		t.Fatalf("batch holds %d datagrams, %d flows pending; want the last 2 (a new batch after the short one), 2", f.out.segs, len(s.udpPending))
	}
	s.flushUDP()
	buf := make([]byte, 65536)
	for i, w := range want {
		srv.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, err := srv.Read(buf)
		if err != nil {
			t.Fatalf("datagram %d: %v", i, err)
		}
		if !bytes.Equal(buf[:n], w) {
			t.Fatalf("datagram %d: got %d bytes of %q, want %d of %q", i, n, buf[0], len(w), w[0])
		}
	}
	if !f.gso {
		t.Log("this kernel refused UDP GSO; datagrams went one by one")
	}
	d := make([]byte, 1000)
	if n := testing.AllocsPerRun(50, func() {
		s.queueUDP(f, d)
		s.queueUDP(f, d)
		s.flushUDP()
	}); n != 0 {
		t.Errorf("queue and flush allocate %v times", n)
	}
	if drops := s.udpWriteDrops.Load(); drops != 0 {
		t.Errorf("%d datagrams dropped", drops)
	}
}

// TestUDPBatchFallsBackWithoutGSO checks that a socket refusing UDP GSO
// (here through SO_NO_CHECK, with which the kernel refuses segmentation)
// still gets every datagram, one by one, and is not asked again.
func TestUDPBatchFallsBackWithoutGSO(t *testing.T) {
	srv, c, raw := loopbackUDP(t)
	var serr error
	raw.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_NO_CHECK, 1) })
	if serr != nil {
		t.Skipf("SO_NO_CHECK: %v", serr)
	}
	s := &Stack{}
	s.bufPool.New = func() any { b := make([]byte, tunOffset+maxIPPacket); return &b }
	f := newUDPFlow(filter.FlowKey{}, c, raw)
	for i := range 3 {
		s.queueUDP(f, bytes.Repeat([]byte{byte('a' + i)}, 500))
	}
	s.flushUDP()
	if f.gso {
		t.Error("GSO still on after the kernel refused it")
	}
	buf := make([]byte, 2048)
	for i := range 3 {
		srv.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, err := srv.Read(buf)
		if err != nil {
			t.Fatalf("datagram %d: %v", i, err)
		}
		if n != 500 || buf[0] != byte('a'+i) {
			t.Fatalf("datagram %d: %d bytes of %q", i, n, buf[0])
		}
	}
	if drops := s.udpWriteDrops.Load(); drops != 0 {
		t.Errorf("%d datagrams dropped", drops)
	}
}

// loopbackUDP returns a UDP server on loopback and a socket connected to
// it, as a flow's socket is to its destination; both close with the test.
func loopbackUDP(t *testing.T) (srv, c *net.UDPConn, raw syscall.RawConn) {
	t.Helper()
	srv, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	c, err = net.DialUDP("udp4", nil, srv.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if raw, err = c.SyscallConn(); err != nil {
		t.Fatal(err)
	}
	return srv, c, raw
}
