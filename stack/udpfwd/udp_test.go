package udpfwd

import (
	"bytes"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/stack/internal/gaddr"
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
		desc, _ := filter.BuildUDP(pkt, k.Dst, k.Src, len(payload))

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
		src, dst := gaddr.To(p.Src), gaddr.To(p.Dst)
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
	s := &Forwarder{h: Host{TUN: newTestTUN()}}
	f := newUDPFlow(filter.FlowKey{}, c, raw)
	var want [][]byte
	for i, size := range []int{1200, 1200, 1200, 700, 1300, 1300} {
		d := bytes.Repeat([]byte{byte('a' + i)}, size)
		want = append(want, d)
		s.queueUDP(f, d)
	}
	if f.out.segs != 2 || len(s.pending) != 2 {
		t.Fatalf("batch holds %d datagrams, %d flows pending; want the last 2 (a new batch after the short one), 2", f.out.segs, len(s.pending))
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
	if drops := s.writeDrops.Load(); drops != 0 {
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
	s := &Forwarder{h: Host{TUN: newTestTUN()}}
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
	if drops := s.writeDrops.Load(); drops != 0 {
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

// udpPacket builds an IPv4 UDP packet and its description.
func udpPacket(t *testing.T, src, dst netip.AddrPort, payload []byte) ([]byte, filter.Packet) {
	t.Helper()
	pkt := make([]byte, header.IPv4MinimumSize+header.UDPMinimumSize+len(payload))
	copy(pkt[header.IPv4MinimumSize+header.UDPMinimumSize:], payload)
	filter.BuildUDP(pkt, src, dst, len(payload))
	var p filter.Packet
	if err := filter.ParsePacket(pkt, &p); err != nil {
		t.Fatal(err)
	}
	return pkt, p
}

// TestUDPFlowOpensOffTheReadLoop runs UDP flows to a loopback server as
// the read loop does: a new flow's datagrams wait while an opener makes its
// socket, then reach the server in order; later datagrams go straight out
// without allocating; a client past its share of UDP flows is refused and
// counted; a flow that leaves the table has its socket closed at once.
func TestUDPFlowOpensOffTheReadLoop(t *testing.T) {
	srv, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	s := newTestForwarder(t, newTestTUN(), 2)
	dst := srv.LocalAddr().(*net.UDPAddr).AddrPort()
	client := netip.MustParseAddr("10.1.1.1")
	// The engine would not forward to loopback: the datagrams go to the
	// stack directly.
	send := func(port uint16, payload string) {
		pkt, p := udpPacket(t, netip.AddrPortFrom(client, port), dst, []byte(payload))
		s.Forward(&p, pkt, s.h.Now())
		s.flushUDP()
	}
	recv := func(want string) {
		t.Helper()
		buf := make([]byte, 100)
		srv.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, err := srv.Read(buf)
		if err != nil || string(buf[:n]) != want {
			t.Fatalf("server got %q, %v; want %q", buf[:n], err, want)
		}
	}
	for _, m := range []string{"one", "two", "three"} {
		send(1000, m)
	}
	for _, m := range []string{"one", "two", "three"} {
		recv(m)
	}
	key := filter.FlowKey{Proto: filter.ProtoUDP, Src: netip.AddrPortFrom(client, 1000), Dst: dst}
	s.mu.Lock()
	f := s.flows[key]
	s.mu.Unlock()
	if f == nil {
		t.Fatal("the flow is not relayed")
	}
	// The opener sends the held datagrams and then marks the flow ready,
	// both under f.mu: the server may have them before ready is set, and
	// taking f.mu waits for the opener to finish.
	f.mu.Lock()
	ready := f.ready.Load()
	f.mu.Unlock()
	if !ready {
		t.Fatal("the flow's socket is not open")
	}
	pkt, p := udpPacket(t, key.Src, dst, []byte("steady"))
	if n := testing.AllocsPerRun(50, func() {
		s.Forward(&p, pkt, s.h.Now())
		s.flushUDP()
	}); n != 0 {
		t.Errorf("a datagram of an open flow allocates %v times", n)
	}
	for range 51 { // AllocsPerRun's runs and its warm-up
		recv("steady")
	}

	send(1001, "second flow")
	recv("second flow")
	send(1002, "third flow")
	if n := drops(s)["udp-source-limit"]; n != 1 {
		t.Errorf("udp-source-limit drops: %d, want 1", n)
	}
	s.mu.Lock()
	n := len(s.flows)
	s.mu.Unlock()
	if n != 2 {
		t.Errorf("%d UDP flows relayed, want the 2 of the client's share", n)
	}

	// The flow leaves the table: its socket goes at once.
	if n := s.CloseFlows([]filter.FlowRef{{Key: key}}); n != 1 {
		t.Fatalf("CloseFlows closed %d relays, want 1", n)
	}
	s.mu.Lock()
	_, still := s.flows[key]
	s.mu.Unlock()
	if still {
		t.Error("the closed flow is still relayed")
	}
	if _, err := f.conn.Write([]byte("x")); err == nil {
		t.Error("the closed flow's socket still writes")
	}
}

// TestUDPOpenQueueBounded checks the bounds on flows waiting for their
// socket, with no opener running: one client may have udpOpenPerSource
// waiting, all clients udpOpenQueue; a flow that finds the queue full is
// kept (its next datagram asks again) but its datagram is dropped and
// counted; each waiting flow holds at most udpHeld datagrams. UDP sockets
// stop at maxSockets, and a flow refused then is not kept.
func TestUDPOpenQueueBounded(t *testing.T) {
	s := newForwarder(testHost(t, filter.EngineLimits{MaxFlows: 1 << 20}, newTestTUN(), DefaultMaxPerSource))
	t.Cleanup(s.cancel)
	dst := netip.MustParseAddrPort("192.0.2.1:53")
	send := func(src netip.AddrPort) {
		pkt, p := udpPacket(t, src, dst, []byte("datagram"))
		s.Forward(&p, pkt, 1)
	}
	flows := func() int {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.flows)
	}
	client := netip.MustParseAddr("10.0.0.1")
	for i := range udpOpenPerSource + 10 {
		send(netip.AddrPortFrom(client, uint16(1000+i)))
	}
	// The refused flows hold nothing and leave: only the queued stay.
	if n, busy := len(s.open), s.lim.openBusy.Load(); n != udpOpenPerSource || busy != 10 || flows() != udpOpenPerSource {
		t.Fatalf("one client: %d flows queued, %d datagrams refused, %d flows; want %d, 10, %d", n, busy, flows(), udpOpenPerSource, udpOpenPerSource)
	}
	for i := 0; len(s.open) < udpOpenQueue; i++ {
		if i > udpOpenQueue {
			t.Fatalf("the queue does not fill: %d", len(s.open))
		}
		send(netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 1000))
	}
	busy := s.lim.openBusy.Load()
	send(netip.MustParseAddrPort("10.2.0.1:1000"))
	if len(s.open) != udpOpenQueue || s.lim.openBusy.Load() != busy+1 {
		t.Fatal("a flow was queued past udpOpenQueue")
	}

	// A waiting flow holds udpHeld datagrams, no more.
	src := netip.AddrPortFrom(client, 1000)
	for range udpHeld + 3 {
		send(src)
	}
	s.mu.Lock()
	f := s.flows[filter.FlowKey{Proto: filter.ProtoUDP, Src: src, Dst: dst}]
	s.mu.Unlock()
	if len(f.held) != udpHeld || s.writeDrops.Load() != 4 { // and the first
		t.Errorf("a waiting flow holds %d datagrams, %d dropped; want %d, 4", len(f.held), s.writeDrops.Load(), udpHeld)
	}

	// The bound on sockets.
	s.lim.maxSockets = flows()
	send(netip.MustParseAddrPort("10.3.0.1:1000"))
	if s.lim.socketLimit.Load() != 1 || flows() != s.lim.maxSockets {
		t.Errorf("a flow past maxSockets was not refused (%d socket-limit drops)", s.lim.socketLimit.Load())
	}
	tracked := s.tracker.Len()
	if tracked != flows() {
		t.Errorf("%d flows tracked, want the %d kept: refused flows must not stay tracked", tracked, flows())
	}
}

// TestUDPCloseKeepsNewerFlow: a UDP flow's relay that ends after its flow
// left the table and a new datagram made a new flow on the same tuple
// releases only its own flow: the new one stays in the engine (the old
// relay's cleanup removed it by its key).
func TestUDPCloseKeepsNewerFlow(t *testing.T) {
	s := newTestForwarder(t, newTestTUN(), DefaultMaxPerSource)
	eng := s.h.Engine
	src, dst := netip.MustParseAddrPort("10.1.1.1:1000"), netip.MustParseAddrPort("192.0.2.1:53")
	key := filter.FlowKey{Proto: filter.ProtoUDP, Src: src, Dst: dst}
	_, p := udpPacket(t, src, dst, []byte("q"))
	if d := eng.Inbound(&p, s.h.Now()); d.Verdict != filter.VerdictForward {
		t.Fatalf("engine verdict %v", d)
	}
	old := startTestFlow(t, s, key)
	// The flow leaves the table (as when it expires) and the client's
	// next datagram makes a new one.
	eng.Forget(key)
	if d := eng.Inbound(&p, s.h.Now()); d.Verdict != filter.VerdictForward {
		t.Fatalf("engine verdict %v", d)
	}
	s.closeUDP(old) // the old relay's reply loop ends late
	if n := eng.Counters().FlowsActive; n != 1 {
		t.Errorf("%d flows in the engine after the old relay ended, want the new one", n)
	}
}

// TestLargeBuffersBounded: at most Host.LargeBuffers flows hold the largest
// receive buffer at once, and one client a quarter of them; a flow that
// ends (closeUDP) gives its back, and the next busy flow gets it.
func TestLargeBuffersBounded(t *testing.T) {
	s := newTestForwarder(t, newTestTUN(), DefaultMaxPerSource)
	s.lim.maxLargeBufs = 4 // 1 per client
	dst := netip.MustParseAddrPort("192.0.2.1:53")
	flow := func(client string, port uint16) *udpFlow {
		t.Helper()
		key := filter.FlowKey{Proto: filter.ProtoUDP, Src: netip.AddrPortFrom(netip.MustParseAddr(client), port), Dst: dst}
		return startTestFlow(t, s, key)
	}
	// What udpReplies does at each full batch, a second apart unless
	// said: a refused flow asks again only after largeBufRetry.
	now := s.h.Now()
	grow := func(f *udpFlow) bool {
		now += largeBufRetry
		s.growRcvBuf(f, now)
		return f.bigRcvBuf
	}
	a1, a2 := flow("10.1.1.1", 1000), flow("10.1.1.1", 1001)
	if !grow(a1) {
		t.Fatal("a client's first busy flow did not get the large buffer")
	}
	// Setting it takes CAP_NET_ADMIN (SO_RCVBUFFORCE); without, the
	// kernel's default stays (setUDPRcvBuf is best effort).
	if got := rcvBuf(t, a1); os.Geteuid() == 0 && got < DefaultReceiveBuffer {
		t.Errorf("the flow given the large buffer has a receive buffer of %d bytes, want at least %d", got, DefaultReceiveBuffer)
	}
	if grow(a2) {
		t.Fatal("a client got a second large buffer past its quarter of 4")
	}
	for _, c := range []string{"10.1.1.2", "10.1.1.3", "10.1.1.4"} {
		if !grow(flow(c, 1000)) {
			t.Fatalf("client %s's busy flow did not get a large buffer", c)
		}
	}
	e := flow("10.1.1.5", 1000)
	if grow(e) {
		t.Fatal("a fifth busy flow got a large buffer past the bound of 4")
	}
	s.closeUDP(a1)
	if s.growRcvBuf(e, now); e.bigRcvBuf {
		t.Fatal("a refused flow asked again within largeBufRetry")
	}
	if !grow(e) {
		t.Fatal("a busy flow did not get the buffer an ended flow gave back")
	}
	s.closeUDP(e)
	if !grow(a2) {
		t.Fatal("the client's second flow did not get a buffer once its first ended")
	}
	s.mu.Lock()
	bySrc := len(s.lim.largeBySrc)
	s.mu.Unlock()
	// Refused twice: a2 past its client's share, e past the pool; e's
	// early second ask was not an ask.
	if got, want := s.LargeBuffers(), (LargeBuffers{Held: 4, Max: 4, Refused: 2}); got != want || bySrc != 4 {
		t.Fatalf("large buffers %+v of %d clients, want %+v of 4", got, bySrc, want)
	}
}

// TestQuietFlowGivesLargeBufferBack: a flow no reply came to for
// largeBufIdle gives its large buffer back, for its client's next busy
// flow, and its socket goes back to the starting size; one still
// receiving keeps it, whether or not its replies queue.
func TestQuietFlowGivesLargeBufferBack(t *testing.T) {
	s := newTestForwarder(t, newTestTUN(), DefaultMaxPerSource)
	s.lim.maxLargeBufs = 4 // 1 per client
	dst := netip.MustParseAddrPort("192.0.2.1:53")
	client := netip.MustParseAddr("10.1.1.1")
	f := startTestFlow(t, s, filter.FlowKey{Proto: filter.ProtoUDP, Src: netip.AddrPortFrom(client, 1000), Dst: dst})
	g := startTestFlow(t, s, filter.FlowKey{Proto: filter.ProtoUDP, Src: netip.AddrPortFrom(client, 1001), Dst: dst})
	// What udpReplies does at a read (reply) and at a full batch (busy).
	reply := func(f *udpFlow, at int64) { f.lastReply = at }
	busy := func(f *udpFlow, at int64) { reply(f, at); s.growRcvBuf(f, at) }
	now := s.h.Now()
	if busy(f, now); !f.bigRcvBuf {
		t.Fatal("a busy flow did not get the large buffer")
	}
	// Replies keep coming without queueing (a stream the loop keeps up
	// with): the buffer stays.
	reply(f, now+largeBufIdle/2)
	if s.shrinkRcvBuf(f, now+largeBufIdle) || !f.bigRcvBuf {
		t.Fatal("a flow a reply came to 5 s ago gave its buffer back")
	}
	if busy(g, now+largeBufIdle); g.bigRcvBuf {
		t.Fatal("the client's second busy flow got a buffer past its quarter")
	}
	if !s.shrinkRcvBuf(f, now+largeBufIdle/2+largeBufIdle) || f.bigRcvBuf {
		t.Fatal("a flow no reply came to for largeBufIdle kept its large buffer")
	}
	if got := s.LargeBuffers().Held; got != 0 {
		t.Fatalf("%d large buffers held after the only one was given back", got)
	}
	// The kernel reports twice what was set.
	if got := rcvBuf(t, f); os.Geteuid() == 0 && got > 2*udpRcvBufStart {
		t.Errorf("the quiet flow's socket kept a receive buffer of %d bytes, want at most %d", got, 2*udpRcvBufStart)
	}
	if busy(g, now+3*largeBufIdle); !g.bigRcvBuf {
		t.Fatal("the client's other busy flow did not get the buffer given back")
	}
}

// TestReplyWait: the reply goroutine of a flow holding the large buffer
// wakes when the buffer is due back, not only at the flow's idle timeout.
func TestReplyWait(t *testing.T) {
	const idle = int64(60 * time.Second)
	f := &udpFlow{lastReply: 100}
	if got := replyWait(f, 100, idle); got != idle {
		t.Errorf("without the large buffer: waits %v, want the idle timeout %v", time.Duration(got), time.Duration(idle))
	}
	f.bigRcvBuf = true
	if got := replyWait(f, 100+int64(time.Second), idle); got != largeBufIdle-int64(time.Second) {
		t.Errorf("holding the large buffer, 1 s after the last reply: waits %v, want %v", time.Duration(got), time.Duration(largeBufIdle-int64(time.Second)))
	}
	if got := replyWait(f, 100, int64(time.Second)); got != int64(time.Second) {
		t.Errorf("holding it with 1 s of idle timeout left: waits %v, want 1s", time.Duration(got))
	}
}

// rcvBuf returns the receive buffer size of f's socket (the kernel
// reports twice what was set, its bookkeeping included).
func rcvBuf(t *testing.T, f *udpFlow) int {
	t.Helper()
	var n int
	var err error
	if cerr := f.raw.Control(func(fd uintptr) { n, err = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF) }); cerr != nil {
		t.Fatal(cerr)
	}
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// startTestFlow starts the UDP flow of key on s with a socket of its own on
// loopback in place of a dialled one (no reply goroutine reads it).
func startTestFlow(t *testing.T, s *Forwarder, key filter.FlowKey) *udpFlow {
	t.Helper()
	f := s.startUDP(key, s.h.Now())
	if f == nil {
		t.Fatal("no UDP flow")
	}
	conn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	f.conn = conn
	if f.raw, err = conn.SyscallConn(); err != nil {
		t.Fatal(err)
	}
	return f
}
