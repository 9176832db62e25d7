package filter

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	gcsum "gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

func gv(a netip.Addr) tcpip.Address { return tcpip.AddrFromSlice(a.AsSlice()) }

func dfFlag(df bool) uint8 {
	if df {
		return header.IPv4FlagDontFragment
	}
	return 0
}

// refIP writes with gVisor's encoder the IP header the builders should
// write: TTL 64, and for IPv4 identification 0, DF when df.
func refIP(b []byte, src, dst netip.Addr, proto uint8, plen int, df bool) int {
	if src.Is6() {
		header.IPv6(b).Encode(&header.IPv6Fields{
			PayloadLength: uint16(plen), TransportProtocol: tcpip.TransportProtocolNumber(proto), HopLimit: 64,
			SrcAddr: gv(src), DstAddr: gv(dst),
		})
		return header.IPv6MinimumSize
	}
	ip := header.IPv4(b)
	ip.Encode(&header.IPv4Fields{
		TotalLength: uint16(header.IPv4MinimumSize + plen), Flags: dfFlag(df), TTL: 64,
		Protocol: proto, SrcAddr: gv(src), DstAddr: gv(dst),
	})
	ip.SetChecksum(^ip.CalculateChecksum())
	return header.IPv4MinimumSize
}

// refUDP builds with gVisor's encoders the datagram BuildUDP should.
func refUDP(b []byte, src, dst netip.AddrPort, n int) int {
	hl := refIP(b, src.Addr(), dst.Addr(), ProtoUDP, 8+n, false)
	u := header.UDP(b[hl : hl+8+n])
	u.Encode(&header.UDPFields{SrcPort: src.Port(), DstPort: dst.Port(), Length: uint16(len(u))})
	x := header.PseudoHeaderChecksum(header.UDPProtocolNumber, gv(src.Addr()), gv(dst.Addr()), uint16(len(u)))
	c := ^u.CalculateChecksum(gcsum.Checksum(u.Payload(), x))
	if c == 0 {
		c = 0xffff
	}
	u.SetChecksum(c)
	return hl + len(u)
}

// refICMP builds with gVisor's encoders the message BuildICMP should.
func refICMP(b []byte, src, dst netip.Addr, typ, code uint8, rest uint32, n int) int {
	proto := uint8(header.ICMPv4ProtocolNumber)
	if src.Is6() {
		proto = uint8(header.ICMPv6ProtocolNumber)
	}
	echo := typ == 0 || typ == 8 || typ == 128 || typ == 129
	hl := refIP(b, src, dst, proto, 8+n, !echo)
	m := b[hl : hl+8+n]
	m[0], m[1] = typ, code
	binary.BigEndian.PutUint32(m[4:8], rest)
	if src.Is6() {
		h := header.ICMPv6(m)
		h.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: h, Src: gv(src), Dst: gv(dst)}))
	} else {
		h := header.ICMPv4(m)
		h.SetChecksum(0)
		h.SetChecksum(^gcsum.Checksum(m, 0))
	}
	return hl + len(m)
}

// refTCP builds with gVisor's encoders the segment buildTCP should.
func refTCP(b []byte, src, dst netip.AddrPort, seq, ack uint32, flags uint8) int {
	hl := refIP(b, src.Addr(), dst.Addr(), ProtoTCP, 20, true)
	t := header.TCP(b[hl : hl+20])
	t.Encode(&header.TCPFields{
		SrcPort: src.Port(), DstPort: dst.Port(), SeqNum: seq, AckNum: ack,
		DataOffset: 20, Flags: header.TCPFlags(flags),
	})
	x := header.PseudoHeaderChecksum(header.TCPProtocolNumber, gv(src.Addr()), gv(dst.Addr()), 20)
	t.SetChecksum(^t.CalculateChecksum(x))
	return hl + 20
}

// checkBuilt verifies a built packet: it parses to the description the
// builder returned and its checksums verify by gVisor's checks.
func checkBuilt(t *testing.T, b []byte, desc Packet) {
	t.Helper()
	var p Packet
	if err := ParsePacket(b, &p); err != nil {
		t.Fatalf("does not parse: %v", err)
	}
	if p != desc {
		t.Fatalf("described as %+v, parses as %+v", desc, p)
	}
	if p.Len != len(b) {
		t.Fatalf("length %d, built %d", p.Len, len(b))
	}
	src, dst := gv(p.Src), gv(p.Dst)
	if p.Version == 4 {
		h := header.IPv4(b)
		req, rep := p.icmpEcho()
		wantDF := p.Proto != ProtoUDP && !req && !rep // what tunfw says itself, not what it relays
		if !h.IsValid(len(b)) || !h.IsChecksumValid() || h.TTL() != 64 || h.Flags() != dfFlag(wantDF) {
			t.Fatalf("bad IPv4 header % x", b[:20])
		}
	} else if h := header.IPv6(b); !h.IsValid(len(b)) || h.HopLimit() != 64 {
		t.Fatalf("bad IPv6 header % x", b[:40])
	}
	l4 := b[p.IPHeaderLen:]
	switch p.Proto {
	case ProtoUDP:
		u := header.UDP(l4)
		if u.Checksum() == 0 || !u.IsChecksumValid(src, dst, gcsum.Checksum(u.Payload(), 0)) {
			t.Fatalf("UDP checksum %#x does not verify", u.Checksum())
		}
	case ProtoTCP:
		s := header.TCP(l4)
		if !s.IsChecksumValid(src, dst, gcsum.Checksum(s.Payload(), 0), uint16(len(s.Payload()))) {
			t.Fatalf("TCP checksum %#x does not verify", s.Checksum())
		}
	case ProtoICMP:
		if gcsum.Checksum(l4, 0) != 0xffff {
			t.Fatalf("ICMP checksum %#x does not verify", header.ICMPv4(l4).Checksum())
		}
	case ProtoICMPv6:
		h := header.ICMPv6(l4)
		if c := header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: h, Src: src, Dst: dst}); c != h.Checksum() {
			t.Fatalf("ICMPv6 checksum %#x, want %#x", h.Checksum(), c)
		}
	default:
		t.Fatalf("protocol %d", p.Proto)
	}
}

var (
	client4, server4 = netip.MustParseAddrPort("198.18.0.1:40000"), netip.MustParseAddrPort("203.0.113.10:53")
	client6, server6 = netip.MustParseAddrPort("[fd54::1]:40000"), netip.MustParseAddrPort("[2001:db8::10]:443")
)

// fill puts n bytes of a payload that differs by length at off in both buffers.
func fill(a, b []byte, off, n int) {
	for i := range n {
		a[off+i] = byte(i*7 + n)
		b[off+i] = byte(i*7 + n)
	}
}

// TestBuildUDP: the datagrams BuildUDP writes are those gVisor's encoders
// write, byte for byte, parse to what it returns and verify, with payloads
// of even, odd and large lengths in both families.
func TestBuildUDP(t *testing.T) {
	for _, c := range [][2]netip.AddrPort{{server4, client4}, {server6, client6}} {
		for _, n := range []int{0, 1, 37, 64, 1400} {
			out, ref := make([]byte, 1500), make([]byte, 1500)
			fill(out, ref, HeaderLen(c[0].Addr())+8, n)
			p, l := BuildUDP(out, c[0], c[1], n)
			if want := refUDP(ref, c[0], c[1], n); l != want || !bytes.Equal(out[:l], ref[:want]) {
				t.Fatalf("%v %d bytes:\n got % x\nwant % x", c, n, out[:l], ref[:want])
			}
			checkBuilt(t, out[:l], p)
			if p.PayloadLen != n || p.Src != c[0].Addr() || p.DstPort != c[1].Port() {
				t.Errorf("%v %d bytes: %+v", c, n, p)
			}
		}
	}
}

// TestBuildICMP: echo replies and errors, with and without an MTU, in
// both families, are those gVisor's encoders write and verify; an echo
// reply's identifier is its flow's port, as ParsePacket reads it.
func TestBuildICMP(t *testing.T) {
	s4, c4, s6, c6 := server4.Addr(), client4.Addr(), server6.Addr(), client6.Addr()
	for _, c := range []struct {
		name      string
		src, dst  netip.Addr
		typ, code uint8
		mtu       uint32
		rest      uint32 // what the header's second word should be
		err       bool
	}{
		{"v4 echo reply", s4, c4, 0, 0, 0x1234_0007, 0x1234_0007, false},
		{"v6 echo reply", s6, c6, 129, 0, 0xfedc_0100, 0xfedc_0100, false},
		{"v4 port unreachable", s4, c4, 3, 3, 1400, 0, true},
		{"v4 fragmentation needed", s4, c4, 3, 4, 1400, 1400, true},
		{"v4 fragmentation needed, MTU too large", s4, c4, 3, 4, 70000, 0xffff, true},
		{"v6 port unreachable", s6, c6, 1, 4, 1280, 0, true},
		{"v6 packet too big", s6, c6, 2, 0, 1280, 1280, true},
		{"v6 time exceeded", s6, c6, 3, 0, 0, 0, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			for _, n := range []int{0, 1, 56, 1001} {
				out, ref := make([]byte, 1500), make([]byte, 1500)
				fill(out, ref, HeaderLen(c.src)+8, n)
				var p Packet
				var l int
				if c.err {
					p, l = BuildICMPError(out, c.src, c.dst, c.typ, c.code, c.mtu, n)
				} else {
					p, l = BuildICMP(out, c.src, c.dst, c.typ, c.code, c.rest, n)
				}
				if want := refICMP(ref, c.src, c.dst, c.typ, c.code, c.rest, n); l != want || !bytes.Equal(out[:l], ref[:want]) {
					t.Fatalf("%d bytes:\n got % x\nwant % x", n, out[:l], ref[:want])
				}
				checkBuilt(t, out[:l], p)
				if !c.err && (p.SrcPort != uint16(c.rest>>16) || p.PayloadLen != n) {
					t.Errorf("echo reply described as %+v", p)
				}
			}
		})
	}
}

// TestBuildTCP: resets with and without an acknowledgement, in both
// families, are those gVisor's encoders write and verify.
func TestBuildTCP(t *testing.T) {
	for _, c := range []struct {
		src, dst netip.AddrPort
		seq, ack uint32
		flags    uint8
	}{
		{server4, client4, 1000, 2001, TCPRst | TCPAck},
		{server6, client6, 0xffffffff, 0, TCPRst},
	} {
		out, ref := make([]byte, 100), make([]byte, 100)
		p, l := buildTCP(out, c.src, c.dst, c.seq, c.ack, c.flags)
		if want := refTCP(ref, c.src, c.dst, c.seq, c.ack, c.flags); l != want || !bytes.Equal(out[:l], ref[:want]) {
			t.Fatalf("%v:\n got % x\nwant % x", c.src, out[:l], ref[:want])
		}
		checkBuilt(t, out[:l], p)
	}
}

// TestBuildRefuses: nothing is built for addresses of mixed families,
// invalid or IPv4-mapped addresses, a buffer too small, or a payload
// larger than an IP packet carries.
func TestBuildRefuses(t *testing.T) {
	big := make([]byte, 70000)
	mapped := netip.AddrPortFrom(netip.AddrFrom16(client4.Addr().As16()), 1)
	for name, l := range map[string]int{
		"mixed families":       second(BuildUDP(big, server4, client6, 0)),
		"invalid source":       second(BuildUDP(big, netip.AddrPort{}, client4, 0)),
		"IPv4-mapped":          second(BuildUDP(big, server6, mapped, 0)),
		"buffer too small":     second(BuildUDP(make([]byte, 20+8+9), server4, client4, 10)),
		"v4 payload too long":  second(BuildUDP(big, server4, client4, 65535-28+1)),
		"v6 payload too long":  second(BuildUDP(big, server6, client6, 65535-8+1)),
		"negative payload":     second(BuildICMP(big, server4.Addr(), client4.Addr(), 0, 0, 0, -1)),
		"ICMP mixed families":  second(BuildICMPError(big, server6.Addr(), client4.Addr(), 3, 3, 0, 0)),
		"TCP buffer too small": second(buildTCP(make([]byte, 59), server6, client6, 0, 0, TCPRst)),
	} {
		if l != 0 {
			t.Errorf("%s: built %d bytes", name, l)
		}
	}
	// The largest that fit are built.
	if _, l := BuildUDP(big, server4, client4, 65535-28); l != 65535 {
		t.Errorf("largest IPv4 datagram: %d bytes", l)
	}
	if _, l := BuildUDP(big, server6, client6, 65535-8); l != 40+65535 {
		t.Errorf("largest IPv6 datagram: %d bytes", l)
	}
}

func second(_ Packet, n int) int { return n }

// TestBuildDoesNotAllocate: the builders are on the per-packet path.
func TestBuildDoesNotAllocate(t *testing.T) {
	out := make([]byte, 1500)
	for name, f := range map[string]func(){
		"UDP v4":     func() { BuildUDP(out, server4, client4, 1200) },
		"UDP v6":     func() { BuildUDP(out, server6, client6, 1200) },
		"echo v4":    func() { BuildICMP(out, server4.Addr(), client4.Addr(), 0, 0, 1, 56) },
		"echo v6":    func() { BuildICMP(out, server6.Addr(), client6.Addr(), 129, 0, 1, 56) },
		"error v6":   func() { BuildICMPError(out, server6.Addr(), client6.Addr(), 2, 0, 1280, 1000) },
		"TCP v6 RST": func() { buildTCP(out, server6, client6, 1, 2, TCPRst|TCPAck) },
	} {
		if n := testing.AllocsPerRun(100, f); n != 0 {
			t.Errorf("%s: %v allocations", name, n)
		}
	}
}

// FuzzChecksum: the checksum agrees with gVisor's for any bytes, length,
// alignment and partial sum.
func FuzzChecksum(f *testing.F) {
	f.Add([]byte{}, uint16(0), uint8(0))
	f.Add([]byte{0xff}, uint16(0xffff), uint8(1))
	f.Add(bytes.Repeat([]byte{0xff}, 67), uint16(0xfffe), uint8(3))
	f.Add([]byte("an odd-length payload: 33 bytes.."), uint16(0x1234), uint8(0))
	f.Fuzz(func(t *testing.T, b []byte, initial uint16, skip uint8) {
		b = b[min(int(skip), len(b)):] // any alignment in memory
		if got, want := checksum(b, uint32(initial)), ^gcsum.Checksum(b, initial); got != want {
			t.Fatalf("checksum %#x, gVisor's %#x", got, want)
		}
	})
}

// FuzzBuild: whatever the addresses, ports and lengths, the builders do
// not panic, and what they build parses to what they return.
func FuzzBuild(f *testing.F) {
	f.Add(server4.Addr().AsSlice(), client4.Addr().AsSlice(), uint16(53), uint16(40000), 100, uint8(0), uint8(3), uint16(1500))
	f.Add(server6.Addr().AsSlice(), client6.Addr().AsSlice(), uint16(443), uint16(1), 0, uint8(129), uint8(0), uint16(48))
	f.Add(server6.Addr().AsSlice(), client4.Addr().AsSlice(), uint16(1), uint16(1), -1, uint8(2), uint8(0), uint16(0))
	f.Fuzz(func(t *testing.T, a, b []byte, sport, dport uint16, n int, typ, code uint8, size uint16) {
		src, _ := netip.AddrFromSlice(a)
		dst, _ := netip.AddrFromSlice(b)
		out := make([]byte, size)
		s, d := netip.AddrPortFrom(src, sport), netip.AddrPortFrom(dst, dport)
		check := func(p Packet, l int) {
			if l == 0 {
				return
			}
			var q Packet
			if err := ParsePacket(out[:l], &q); err != nil && !(p.Proto == ProtoUDP && (sport == 0 || dport == 0)) {
				t.Fatalf("built %+v does not parse: %v", p, err)
			} else if err == nil && q != p {
				t.Fatalf("described as %+v, parses as %+v", p, q)
			}
		}
		check(BuildUDP(out, s, d, n))
		check(BuildICMP(out, src, dst, typ, code, uint32(sport)<<16|uint32(dport), n))
		check(BuildICMPError(out, src, dst, typ, code, uint32(sport), n))
		if sport != 0 && dport != 0 {
			check(buildTCP(out, s, d, uint32(n), uint32(size), code&^TCPSyn))
		}
	})
}

// BenchmarkBuildUDP is the UDP relay's and the DNS answers' per-datagram
// work: headers and the checksum over a 1200-byte payload.
func BenchmarkBuildUDP(b *testing.B) {
	for _, c := range []struct {
		name     string
		src, dst netip.AddrPort
	}{{"v4", server4, client4}, {"v6", server6, client6}} {
		b.Run(c.name, func(b *testing.B) {
			out := make([]byte, 1500)
			b.ReportAllocs()
			b.SetBytes(1200)
			for b.Loop() {
				BuildUDP(out, c.src, c.dst, 1200)
			}
		})
	}
}

// BenchmarkBuildEchoReply is the echo forwarder's per-reply work for a
// default ping (56 bytes of data).
func BenchmarkBuildEchoReply(b *testing.B) {
	for _, c := range []struct {
		name     string
		src, dst netip.Addr
		typ      uint8
	}{{"v4", server4.Addr(), client4.Addr(), 0}, {"v6", server6.Addr(), client6.Addr(), 129}} {
		b.Run(c.name, func(b *testing.B) {
			out := make([]byte, 1500)
			b.ReportAllocs()
			for b.Loop() {
				BuildICMP(out, c.src, c.dst, c.typ, 0, 0x1234_0001, 56)
			}
		})
	}
}
