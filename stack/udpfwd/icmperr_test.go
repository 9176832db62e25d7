package udpfwd

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/stack/internal/gaddr"
	"github.com/tunfw/tunfw/stack/internal/race"
	"github.com/tunfw/tunfw/stack/internal/sockread"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// checkUDPError checks an ICMP error built for flow k: from from to the
// client, of type typ and code, checksums that verify (outer IP, ICMP,
// quoted IP and UDP), quoting the client's datagram to k's destination with
// payload.
func checkUDPError(t *testing.T, pkt []byte, k filter.FlowKey, from netip.Addr, typ, code uint8, mtu uint32, payload []byte) {
	t.Helper()
	v6 := k.Dst.Addr().Is6()
	ipLen := header.IPv4MinimumSize
	if v6 {
		ipLen = header.IPv6MinimumSize
	}
	client, dst, src := gaddr.To(k.Src.Addr()), gaddr.To(k.Dst.Addr()), gaddr.To(from)
	var msg, inner []byte
	if v6 {
		ip := header.IPv6(pkt)
		if !ip.IsValid(len(pkt)) || ip.TransportProtocol() != header.ICMPv6ProtocolNumber || ip.SourceAddress() != src || ip.DestinationAddress() != client {
			t.Fatalf("outer IPv6 header: %v -> %v proto %d", ip.SourceAddress(), ip.DestinationAddress(), ip.TransportProtocol())
		}
		if int(ip.PayloadLength())+ipLen != len(pkt) || len(pkt) > header.IPv6MinimumMTU {
			t.Errorf("payload length %d in a %d-byte packet", ip.PayloadLength(), len(pkt))
		}
		msg = ip.Payload()
		m := header.ICMPv6(msg)
		if m.Type() != header.ICMPv6Type(typ) || m.Code() != header.ICMPv6Code(code) {
			t.Errorf("ICMPv6 %d/%d, want %d/%d", m.Type(), m.Code(), typ, code)
		}
		if got := checksum.Checksum(msg, header.PseudoHeaderChecksum(header.ICMPv6ProtocolNumber, src, client, uint16(len(msg)))); got != 0xffff {
			t.Errorf("ICMPv6 checksum does not verify (sum %#x)", got)
		}
		if m.Type() == header.ICMPv6PacketTooBig && m.MTU() != mtu {
			t.Errorf("MTU %d, want %d", m.MTU(), mtu)
		}
		inner = msg[header.ICMPv6MinimumSize:]
		q := header.IPv6(inner)
		if q.SourceAddress() != client || q.DestinationAddress() != dst || q.TransportProtocol() != header.UDPProtocolNumber {
			t.Errorf("quoted IPv6 header: %v -> %v proto %d", q.SourceAddress(), q.DestinationAddress(), q.TransportProtocol())
		}
	} else {
		ip := header.IPv4(pkt)
		if !ip.IsValid(len(pkt)) || !ip.IsChecksumValid() || ip.TransportProtocol() != header.ICMPv4ProtocolNumber ||
			ip.SourceAddress() != src || ip.DestinationAddress() != client {
			t.Fatalf("outer IPv4 header: %v -> %v proto %d, checksum valid %v", ip.SourceAddress(), ip.DestinationAddress(), ip.TransportProtocol(), ip.IsChecksumValid())
		}
		if int(ip.TotalLength()) != len(pkt) || len(pkt) > 576 {
			t.Errorf("total length %d in a %d-byte packet", ip.TotalLength(), len(pkt))
		}
		msg = ip.Payload()
		m := header.ICMPv4(msg)
		if m.Type() != header.ICMPv4Type(typ) || m.Code() != header.ICMPv4Code(code) {
			t.Errorf("ICMP %d/%d, want %d/%d", m.Type(), m.Code(), typ, code)
		}
		if got := checksum.Checksum(msg, 0); got != 0xffff {
			t.Errorf("ICMP checksum does not verify (sum %#x)", got)
		}
		if m.Type() == header.ICMPv4DstUnreachable && m.Code() == header.ICMPv4FragmentationNeeded && uint32(m.MTU()) != mtu {
			t.Errorf("MTU %d, want %d", m.MTU(), mtu)
		}
		inner = msg[header.ICMPv4MinimumSize:]
		q := header.IPv4(inner)
		if !q.IsChecksumValid() || q.SourceAddress() != client || q.DestinationAddress() != dst || q.TransportProtocol() != header.UDPProtocolNumber {
			t.Errorf("quoted IPv4 header: %v -> %v proto %d, checksum valid %v", q.SourceAddress(), q.DestinationAddress(), q.TransportProtocol(), q.IsChecksumValid())
		}
	}
	udp := header.UDP(inner[ipLen:])
	if udp.SourcePort() != k.Src.Port() || udp.DestinationPort() != k.Dst.Port() || int(udp.Length()) != len(udp) {
		t.Errorf("quoted UDP header: %d -> %d, length %d of %d", udp.SourcePort(), udp.DestinationPort(), udp.Length(), len(udp))
	}
	if got := checksum.Checksum(udp, header.PseudoHeaderChecksum(header.UDPProtocolNumber, client, dst, uint16(len(udp)))); got != 0xffff {
		t.Errorf("quoted UDP checksum does not verify (sum %#x)", got)
	}
	if !bytes.Equal(udp.Payload(), payload) {
		t.Errorf("quoted payload %q, want %q", udp.Payload(), payload)
	}
}

// TestBuildUDPError checks the ICMP errors relayed to UDP clients, in both
// families: addresses, types and codes, MTUs, checksums and the quoted
// datagram.
func TestBuildUDPError(t *testing.T) {
	k4 := filter.FlowKey{Proto: filter.ProtoUDP, Src: netip.MustParseAddrPort("198.18.0.1:40000"), Dst: netip.MustParseAddrPort("203.0.113.10:53")}
	k6 := filter.FlowKey{Proto: filter.ProtoUDP, Src: netip.MustParseAddrPort("[fd54::1]:40000"), Dst: netip.MustParseAddrPort("[2001:db8::10]:443")}
	router4, router6 := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8:ffff::1")
	for _, c := range []struct {
		name      string
		k         filter.FlowKey
		from      netip.Addr
		typ, code uint8
		mtu       uint32
	}{
		{"v4 port unreachable", k4, k4.Dst.Addr(), 3, 3, 0},
		{"v4 host unreachable", k4, router4, 3, 1, 0},
		{"v4 fragmentation needed", k4, router4, 3, 4, 1400},
		{"v4 time exceeded", k4, router4, 11, 0, 0},
		{"v6 port unreachable", k6, k6.Dst.Addr(), 1, 4, 0},
		{"v6 packet too big", k6, router6, 2, 0, 1280},
		{"v6 time exceeded", k6, router6, 3, 0, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			for _, payload := range [][]byte{nil, []byte("an odd-length query: 29 bytes"), bytes.Repeat([]byte("q"), 1100)} {
				ipLen := header.IPv4MinimumSize
				if c.k.Dst.Addr().Is6() {
					ipLen = header.IPv6MinimumSize
				}
				q := newErrQueue(&Forwarder{h: Host{MTU: 1500}}, &udpFlow{key: c.k})
				payload = payload[:min(len(payload), q.room)] // the quote's limit
				pkt := make([]byte, 1500)
				copy(pkt[icmpQuoteOffset(ipLen):], payload)
				n := buildUDPError(pkt, c.k, c.from, c.typ, c.code, c.mtu, len(payload))
				if n == 0 {
					t.Fatal("nothing built")
				}
				checkUDPError(t, pkt[:n], c.k, c.from, c.typ, c.code, c.mtu, payload)
			}
		})
	}
	// An address of the other family is refused, not mixed in.
	if n := buildUDPError(make([]byte, 1500), k4, router6, 3, 3, 0, 0); n != 0 {
		t.Errorf("an IPv6 sender for an IPv4 flow built %d bytes", n)
	}
	// The quote's room keeps errors within 576 / 1280 bytes and the MTU.
	if q := newErrQueue(&Forwarder{h: Host{MTU: 1500}}, &udpFlow{key: k4}); q.room != 576-56 {
		t.Errorf("IPv4 quote room %d, want %d", q.room, 576-56)
	}
	if q := newErrQueue(&Forwarder{h: Host{MTU: 1400}}, &udpFlow{key: k6}); q.room != 1280-96 {
		t.Errorf("IPv6 quote room %d, want %d", q.room, 1280-96)
	}
}

// TestRelayedICMP checks which errors are relayed and how they count.
func TestRelayedICMP(t *testing.T) {
	for _, c := range []struct {
		v6        bool
		typ, code uint8
		kind      icmpKind
		ok        bool
	}{
		{false, 3, 3, icmpPortUnreachable, true},
		{false, 3, 0, icmpNetUnreachable, true},
		{false, 3, 1, icmpHostUnreachable, true},
		{false, 3, 13, icmpProhibited, true},
		{false, 3, 4, icmpTooBig, true},
		{false, 3, 2, icmpUnreachable, true},
		{false, 11, 0, icmpTimeExceeded, true},
		{false, 12, 0, 0, false}, // parameter problem
		{false, 5, 0, 0, false},  // redirect
		{true, 1, 4, icmpPortUnreachable, true},
		{true, 1, 0, icmpNetUnreachable, true},
		{true, 1, 3, icmpHostUnreachable, true},
		{true, 1, 1, icmpProhibited, true},
		{true, 2, 0, icmpTooBig, true},
		{true, 3, 0, icmpTimeExceeded, true},
		{true, 4, 0, 0, false},
	} {
		kind, ok := relayedICMP(c.v6, c.typ, c.code)
		if ok != c.ok || (ok && kind != c.kind) {
			t.Errorf("v6 %v %d/%d: %v %v, want %v %v", c.v6, c.typ, c.code, kind, ok, c.kind, c.ok)
		}
	}
}

// TestTokenBucket checks the error relay's rate limit: a burst, then the
// rate.
func TestTokenBucket(t *testing.T) {
	var b tokenBucket
	b.init(10, 3) // one every 100 ms
	now := int64(time.Hour)
	for i := range 3 {
		if !b.allow(now) {
			t.Fatalf("burst: token %d refused", i)
		}
	}
	if b.allow(now) {
		t.Fatal("a fourth token in the same instant")
	}
	if b.allow(now + int64(50*time.Millisecond)) {
		t.Fatal("a token after half an interval")
	}
	if !b.allow(now + int64(100*time.Millisecond)) {
		t.Fatal("no token after an interval")
	}
	if !b.allow(now+int64(time.Hour)) || !b.allow(now+int64(time.Hour)) || !b.allow(now+int64(time.Hour)) || b.allow(now+int64(time.Hour)) {
		t.Fatal("a long pause gives more than the burst")
	}
}

// TestUDPErrorsRelayed runs a UDP flow to a closed loopback port through a
// Forwarder: the kernel's port unreachable comes back to the client as an ICMP
// error quoting its datagram, in both families, and is counted; reading the
// socket's error queue allocates nothing; past the rate limit errors are
// dropped and counted.
func TestUDPErrorsRelayed(t *testing.T) {
	for _, c := range []struct {
		name       string
		client     netip.AddrPort
		closed     netip.Addr
		typ, code  uint8
		listenAddr string
	}{
		{"v4", netip.MustParseAddrPort("10.1.1.1:40000"), netip.MustParseAddr("127.0.0.1"), 3, 3, "127.0.0.1:0"},
		{"v6", netip.MustParseAddrPort("[fd00::1]:40000"), netip.MustParseAddr("::1"), 1, 4, "[::1]:0"},
	} {
		t.Run(c.name, func(t *testing.T) {
			// A port that was just free: nothing listens there.
			pc, err := net.ListenPacket("udp", c.listenAddr)
			if err != nil {
				t.Skipf("no %s loopback: %v", c.name, err)
			}
			dst := netip.AddrPortFrom(c.closed, pc.LocalAddr().(*net.UDPAddr).AddrPort().Port())
			pc.Close()
			dev := newTestTUN()
			s := newTestForwarder(t, dev, DefaultMaxPerSource)
			key := filter.FlowKey{Proto: filter.ProtoUDP, Src: c.client, Dst: dst}
			payload := []byte("a query nobody answers")
			pkt, p := udpPacketFor(t, key, payload)
			s.Forward(&p, pkt, s.h.Now())
			s.flushUDP()
			deadline := time.After(3 * time.Second)
			var got [][]byte
			for len(got) == 0 {
				select {
				case <-dev.got:
					got = dev.take()
				case <-deadline:
					t.Fatal("no ICMP error written to the TUN")
				}
			}
			checkUDPError(t, got[0], key, c.closed, c.typ, c.code, 0, payload)
			if n := s.ICMPErrors()["port-unreachable"]; n != 1 {
				t.Errorf("port-unreachable relayed: %d, want 1", n)
			}

			// The flow stays and keeps relaying; reading the error
			// queue allocates nothing.
			s.mu.Lock()
			f := s.flows[key]
			s.mu.Unlock()
			if f == nil {
				t.Fatal("the flow ended with its first error")
			}
			q := newErrQueue(s, f)
			drain := func(fd uintptr) { q.drain(int(fd)) }
			s.icmpErr.limit.init(1e6, 1e6)
			sent := func() {
				f.sendBuf = payload
				f.raw.Write(f.send)
				f.raw.Control(drain)
			}
			sent()
			if !race.Enabled {
				dev.mu.Lock()
				dev.discard = true
				w := dev.writes
				dev.mu.Unlock()
				if n := testing.AllocsPerRun(20, sent); n != 0 {
					t.Errorf("relaying an error allocates %v times", n)
				}
				dev.mu.Lock()
				dev.discard = false
				if dev.writes == w {
					t.Error("no errors written while counting allocations")
				}
				dev.mu.Unlock()
			}

			// The rate limit: a burst of one, then nothing for a while.
			s.icmpErr.limit.init(1, 1)
			dev.take()
			relayed, dropped := s.ICMPErrors()["port-unreachable"], drops(s)["icmp-error-rate"]
			for range 5 {
				sent()
			}
			// The flow's own reply goroutine may read some of them.
			for end := time.Now().Add(3 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				r, d := s.ICMPErrors()["port-unreachable"]-relayed, drops(s)["icmp-error-rate"]-dropped
				if r+d == 5 {
					if r > 1 {
						t.Errorf("5 errors past a burst of 1: %d relayed, %d dropped", r, d)
					}
					break
				}
				if time.Now().After(end) {
					t.Fatalf("5 errors: %d relayed, %d dropped after 3s", r, d)
				}
			}
		})
	}
}

// udpPacketFor builds the client's datagram of flow k and its description.
func udpPacketFor(t *testing.T, k filter.FlowKey, payload []byte) ([]byte, filter.Packet) {
	t.Helper()
	ipLen := header.IPv4MinimumSize
	if k.Dst.Addr().Is6() {
		ipLen = header.IPv6MinimumSize
	}
	pkt := make([]byte, ipLen+header.UDPMinimumSize+len(payload))
	copy(pkt[ipLen+header.UDPMinimumSize:], payload)
	filter.BuildUDP(pkt, k.Src, k.Dst, len(payload))
	var p filter.Packet
	if err := filter.ParsePacket(pkt, &p); err != nil {
		t.Fatal(err)
	}
	return pkt, p
}

// TestSockReaderFindsQueuedError: an ICMP error whose pending socket error
// another call took (the read loop's send does) is still read from the
// error queue: the netpoller wakes the reader, which then finds nothing to
// read and looks at the queue.
func TestSockReaderFindsQueuedError(t *testing.T) {
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := pc.LocalAddr().(*net.UDPAddr)
	pc.Close()
	c, err := net.DialUDP("udp4", nil, closed)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	raw.Control(func(fd uintptr) {
		if err := setRecvErr(int(fd), false); err != nil {
			t.Fatal(err)
		}
	})
	// Send until a send returns the port unreachable of an earlier one:
	// that took the pending error; the queued one stays. Then clear any
	// error still pending, so only the queue holds one.
	for end := time.Now().Add(2 * time.Second); ; {
		if _, err := c.Write([]byte("x")); errors.Is(err, unix.ECONNREFUSED) {
			break
		}
		if time.Now().After(end) {
			t.Fatal("no port unreachable for a closed loopback port")
		}
	}
	raw.Control(func(fd uintptr) { unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR) })

	found := 0
	var r sockread.Reader
	buf := make([]byte, 100)
	r.Init(func() *[]byte { return &buf }, func(*[]byte) {}, 0)
	r.ErrQueue = func(fd int) {
		for {
			_, _, _, _, err := unix.Recvmsg(fd, make([]byte, 100), make([]byte, 128), unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
			if err != nil {
				return
			}
			found++
		}
	}
	// As the reply loop does: the netpoller's edge for the queued error
	// came before this Read (which resets readiness), so it looks first.
	r.Wait, r.Woken = true, true
	c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	err = raw.Read(r.Read)
	if found == 0 {
		t.Fatalf("the queued error was not read (read: %v, %v)", err, r.Err)
	}
}
