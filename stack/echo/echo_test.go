package echo

import (
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/stack/internal/gaddr"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// testForwarder returns a Forwarder with an engine and no sockets, for the
// parts that only keep state; one client may hold maxPerSource flows.
func testForwarder(t testing.TB, maxPerSource int) *Forwarder {
	t.Helper()
	rs, err := filter.Compile(filter.Options{}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	epoch := time.Now()
	return &Forwarder{
		h: Host{
			Engine:       filter.NewEngine(rs, filter.EngineOptions{}),
			Log:          slog.New(slog.NewTextHandler(io.Discard, nil)),
			Now:          func() int64 { return int64(time.Since(epoch)) },
			Write:        func([]byte) {},
			MaxPerSource: func() int { return maxPerSource },
		},
		byFlow: make(map[pingFlow]uint16), perSrc: make(map[netip.Addr]int32), head: -1, tail: -1, salt: 0x1234,
	}
}

// TestEchoIDs checks the echo identifier allocator: once every identifier
// is in use the next flow gets none at once (dropped and counted, never a
// search that does not end) unless the flow idle longest has been idle for
// echoEvictAge, whose identifier it then takes; identifiers come back when
// their flows expire, a flow in use is not expired, and one client gets
// only its share.
func TestEchoIDs(t *testing.T) {
	pg := testForwarder(t, 1<<20) // no share: run out of identifiers
	dst := netip.MustParseAddr("192.0.2.1")
	flow := func(i int) pingFlow {
		return pingFlow{src: netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), dst: dst, id: uint16(i)}
	}
	pg.mu.Lock()
	defer pg.mu.Unlock()
	seen := make(map[uint16]bool)
	for i := range maxEchoIDs {
		id, ok := pg.openLocked(flow(i), 1)
		if !ok || seen[id] {
			t.Fatalf("flow %d: identifier %d, %v; want a new one", i, id, ok)
		}
		seen[id] = true
	}
	t0 := time.Now()
	if _, ok := pg.openLocked(flow(maxEchoIDs), 1); ok {
		t.Fatal("a flow got an identifier with all in use")
	}
	if d := time.Since(t0); d > 10*time.Millisecond {
		t.Errorf("refusing a flow took %v", d)
	}
	if pg.noID.Load() != 1 {
		t.Errorf("no-identifier drops: %d, want 1", pg.noID.Load())
	}
	// Later, the flow idle longest (flow 0) gives its identifier up.
	first := pg.byFlow[flow(0)]
	if id, ok := pg.openLocked(flow(maxEchoIDs), 1+echoEvictAge); !ok || id != first {
		t.Fatalf("with every identifier idle for %v: got %d, %v; want flow 0's %d", time.Duration(echoEvictAge), id, ok, first)
	}
	if _, ok := pg.byFlow[flow(0)]; ok || len(pg.byFlow) != maxEchoIDs {
		t.Fatalf("flow 0 kept its identifier, or flows were lost: %d flows", len(pg.byFlow))
	}

	// Flow 5 stays in use; the others expire.
	idle := int64(pg.h.Engine.Timeouts().ICMPIdle)
	pg.touchLocked(int32(pg.byFlow[flow(5)]), 1+idle)
	pg.mu.Unlock()
	pg.Expire(2 + idle)
	pg.mu.Lock()
	// Flow 5, in use, and the flow that took flow 0's identifier, newer,
	// stay.
	if len(pg.byFlow) != 2 || len(pg.free) != maxEchoIDs-2 || len(pg.perSrc) != 2 {
		t.Fatalf("after expiry: %d flows, %d free identifiers, %d sources; want 2, %d, 2", len(pg.byFlow), len(pg.free), len(pg.perSrc), maxEchoIDs-2)
	}
	if _, ok := pg.byFlow[flow(5)]; !ok {
		t.Fatal("the flow in use expired")
	}
	if _, ok := pg.openLocked(flow(maxEchoIDs+1), 3+idle); !ok {
		t.Fatal("no identifier after the others expired")
	}

	// One client's share.
	pg.mu.Unlock()
	share := testForwarder(t, 250)
	src := netip.MustParseAddr("10.9.9.9")
	n := 0
	share.mu.Lock()
	for i := range 2 * DefaultMaxPerSource {
		if _, ok := share.openLocked(pingFlow{src: src, dst: dst, id: uint16(i)}, 1); ok {
			n++
		}
	}
	share.mu.Unlock()
	if n != 250 || int(share.srcLimit.Load()) != 2*DefaultMaxPerSource-250 {
		t.Errorf("one client got %d identifiers (%d refused), want 250", n, share.srcLimit.Load())
	}
	pg.mu.Lock()
}

// TestEchoSendDoesNotAllocate sends echo requests of an open flow through
// a real raw socket to loopback: the per-packet path allocates nothing.
func TestEchoSendDoesNotAllocate(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("raw ICMP sockets need root")
	}
	h := testForwarder(t, DefaultMaxPerSource).h
	pg, err := New(h)
	if err != nil {
		t.Skipf("no raw ICMP socket: %v", err)
	}
	t.Cleanup(pg.Close)
	pkt := make([]byte, header.IPv4MinimumSize+8+32)
	ip := header.IPv4(pkt)
	ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(pkt)), TTL: 64, Protocol: uint8(header.ICMPv4ProtocolNumber),
		SrcAddr: gaddr.To(netip.MustParseAddr("127.0.0.2")), DstAddr: gaddr.To(netip.MustParseAddr("127.0.0.1"))})
	ip.SetChecksum(^ip.CalculateChecksum())
	icmp := pkt[header.IPv4MinimumSize:]
	icmp[0] = byte(header.ICMPv4Echo)
	binary.BigEndian.PutUint16(icmp[4:], 77)
	var p filter.Packet
	if err := filter.ParsePacket(pkt, &p); err != nil {
		t.Fatal(err)
	}
	// The MTU is 0: the loopback's replies are read and dropped as too
	// large for the TUN, which there is none of.
	pg.Send(&p, pkt) // opens the flow
	if n := testing.AllocsPerRun(100, func() { pg.Send(&p, pkt) }); n != 0 {
		t.Errorf("an echo request of an open flow allocates %v times", n)
	}
	if len(pg.byFlow) != 1 || pg.sendDrops.Load() != 0 {
		t.Errorf("%d flows, %d send drops; want 1, 0", len(pg.byFlow), pg.sendDrops.Load())
	}
}

// echoReplyCase opens an echo flow from client to dst (in the engine and
// the forwarder) and returns the reply dst's kernel hands the raw socket
// for it: its ICMP header, with the forwarder's identifier, and 56 bytes
// of data.
func echoReplyCase(t testing.TB, pg *Forwarder, client, dst netip.Addr, id, seq uint16) []byte {
	t.Helper()
	reqType, repType := uint8(8), uint8(0)
	if client.Is6() {
		reqType, repType = 128, 129
	}
	req := make([]byte, 1500)
	_, n := filter.BuildICMP(req, client, dst, reqType, 0, uint32(id)<<16|uint32(seq), 56)
	var p filter.Packet
	if err := filter.ParsePacket(req[:n], &p); err != nil {
		t.Fatal(err)
	}
	if d := pg.h.Engine.Inbound(&p, pg.h.Now()); d.Verdict != filter.VerdictForward {
		t.Fatalf("request not forwarded: %+v", d)
	}
	pg.mu.Lock()
	i, ok := pg.openLocked(pingFlow{src: client, dst: dst, id: id}, pg.h.Now())
	pg.mu.Unlock()
	if !ok {
		t.Fatal("no identifier")
	}
	msg := make([]byte, 8+56)
	msg[0] = repType
	binary.BigEndian.PutUint16(msg[4:6], i^pg.salt)
	binary.BigEndian.PutUint16(msg[6:8], seq)
	for j := range 56 {
		msg[8+j] = byte(j)
	}
	return msg
}

// TestEchoReply: a reply is relayed to the client from the address it
// pinged, with the client's identifier, the sequence number and data it
// came with and a valid checksum, and is accounted to the client's flow;
// relaying it does not allocate.
func TestEchoReply(t *testing.T) {
	for _, c := range []struct{ client, dst netip.Addr }{
		{netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("192.0.2.1")},
		{netip.MustParseAddr("fd00::2"), netip.MustParseAddr("2001:db8::1")},
	} {
		pg := testForwarder(t, DefaultMaxPerSource)
		var wrote []byte
		pg.h.Headroom, pg.h.MTU = 10, 1500
		pg.h.Write = func(b []byte) { wrote = b }
		msg := echoReplyCase(t, pg, c.client, c.dst, 0x4242, 9)
		out := make([]byte, pg.h.Headroom+pg.h.MTU)
		pg.reply(c.dst, msg, out)
		if wrote == nil {
			t.Fatalf("%v: no reply written", c.dst)
		}
		pkt := wrote[pg.h.Headroom:]
		var p filter.Packet
		if err := filter.ParsePacket(pkt, &p); err != nil {
			t.Fatalf("%v: reply does not parse: %v", c.dst, err)
		}
		if p.Src != c.dst || p.Dst != c.client || p.SrcPort != 0x4242 || p.ICMPType != msg[0] || p.PayloadLen != 56 {
			t.Errorf("%v: reply %+v", c.dst, p)
		}
		icmp := pkt[p.IPHeaderLen:]
		if seq := binary.BigEndian.Uint16(icmp[6:8]); seq != 9 || string(icmp[8:]) != string(msg[8:]) {
			t.Errorf("%v: sequence %d, data % x", c.dst, seq, icmp[8:])
		}
		if c.dst.Is4() {
			if !header.IPv4(pkt).IsChecksumValid() || checksum.Checksum(icmp, 0) != 0xffff {
				t.Errorf("%v: bad checksum", c.dst)
			}
		} else if h := header.ICMPv6(icmp); header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
			Header: h, Src: gaddr.To(p.Src), Dst: gaddr.To(p.Dst),
		}) != h.Checksum() {
			t.Errorf("%v: bad checksum", c.dst)
		}
		flows := pg.h.Engine.Flows(pg.h.Now())
		if len(flows) != 1 || flows[0].PacketsOut != 1 || flows[0].BytesOut != uint64(len(pkt)) {
			t.Errorf("%v: reply not accounted: %+v", c.dst, flows)
		}
		if n := testing.AllocsPerRun(100, func() { pg.reply(c.dst, msg, out) }); n != 0 {
			t.Errorf("%v: relaying a reply allocates %v times", c.dst, n)
		}
	}
}

// BenchmarkEchoReply is the echo forwarder's per-reply work: find the
// flow, build the reply and account it.
func BenchmarkEchoReply(b *testing.B) {
	for _, c := range []struct {
		name        string
		client, dst netip.Addr
	}{
		{"v4", netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("192.0.2.1")},
		{"v6", netip.MustParseAddr("fd00::2"), netip.MustParseAddr("2001:db8::1")},
	} {
		b.Run(c.name, func(b *testing.B) {
			pg := testForwarder(b, DefaultMaxPerSource)
			pg.h.Headroom, pg.h.MTU = 10, 1500
			msg := echoReplyCase(b, pg, c.client, c.dst, 0x4242, 9)
			out := make([]byte, pg.h.Headroom+pg.h.MTU)
			b.ReportAllocs()
			for b.Loop() {
				pg.reply(c.dst, msg, out)
			}
		})
	}
}

// The reply reader gets an echo reply and its sender from a raw socket
// without allocating: it runs for every reply.
func TestReplyReaderDoesNotAllocate(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("raw ICMP sockets need root")
	}
	c, err := net.ListenPacket("ip4:icmp", "127.0.0.1")
	if err != nil {
		t.Skipf("no raw ICMP socket: %v", err)
	}
	defer c.Close()
	rc, err := c.(*net.IPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	req := make([]byte, 8+16)
	req[0] = byte(header.ICMPv4Echo)
	binary.BigEndian.PutUint16(req[4:], 0x4242)
	binary.BigEndian.PutUint16(req[2:], ^checksum.Checksum(req, 0))
	dst := &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}
	var serr error
	send := func(fd uintptr) bool { serr = unix.Sendto(int(fd), req, 0, dst); return true }
	r := replyReader{buf: make([]byte, 65535), v4: true}
	r.read = r.readFd
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	exchange := func() {
		if err := rc.Write(send); err != nil || serr != nil {
			t.Fatalf("send: %v %v", err, serr)
		}
		// The socket sees the request it sent to loopback, then the reply.
		for {
			if err := rc.Read(r.read); err != nil || r.err != nil {
				t.Fatalf("read: %v %v", err, r.err)
			}
			if len(r.msg) == len(req) && r.msg[0] == byte(header.ICMPv4EchoReply) {
				return
			}
		}
	}
	exchange()
	if r.from != netip.MustParseAddr("127.0.0.1") || binary.BigEndian.Uint16(r.msg[4:]) != 0x4242 {
		t.Fatalf("reply from %v, identifier %#x; want 127.0.0.1, 0x4242", r.from, binary.BigEndian.Uint16(r.msg[4:]))
	}
	if n := testing.AllocsPerRun(50, exchange); n != 0 {
		t.Errorf("an echo request and the reading of its reply allocate %v times", n)
	}
}
