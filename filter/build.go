package filter

import (
	"encoding/binary"
	"math/bits"
	"net/netip"
)

// Building the packets tunfw writes to the TUN: UDP replies, echo replies,
// ICMP errors and TCP resets. Each builder writes the IP header (no IPv4
// options, no IPv6 extension headers) and the transport header in front of
// a payload the caller has already put in place at HeaderLen(src)+the
// transport header's length, fills in the checksums, and returns the
// Packet that ParsePacket would read from it, so that the packet is
// accounted (Engine.Outbound) without being parsed again. They return 0
// and the zero Packet when the addresses are of different families or
// not valid, or when the packet does not fit in out or in an IP packet.
// None allocates.

const (
	udpHeaderLen  = 8
	tcpHeaderLen  = 20 // no options
	icmpHeaderLen = 8  // type, code, checksum and the 4 bytes after them
	replyTTL      = 64
)

// HeaderLen is the length of the IP header the builders write for a
// packet from a: 20 for IPv4, 40 for IPv6.
func HeaderLen(a netip.Addr) int {
	if a.Is6() {
		return 40
	}
	return 20
}

// BuildUDP writes the IP and UDP headers of a datagram from src to dst
// whose payloadLen bytes are in out at HeaderLen(src.Addr())+8, and
// returns its description and length.
func BuildUDP(out []byte, src, dst netip.AddrPort, payloadLen int) (Packet, int) {
	hl, ok := room(out, src.Addr(), dst.Addr(), udpHeaderLen, payloadLen)
	if !ok {
		return Packet{}, 0
	}
	p := packetOf(src.Addr(), dst.Addr(), ProtoUDP, udpHeaderLen, payloadLen)
	p.SrcPort, p.DstPort = src.Port(), dst.Port()
	putIPHeader(out, p.Src, p.Dst, ProtoUDP, udpHeaderLen+payloadLen, false)
	u := out[hl:p.Len]
	binary.BigEndian.PutUint16(u[0:2], p.SrcPort)
	binary.BigEndian.PutUint16(u[2:4], p.DstPort)
	binary.BigEndian.PutUint16(u[4:6], uint16(len(u)))
	u[6], u[7] = 0, 0
	c := checksum(u, pseudoSum(p.Src, p.Dst, ProtoUDP, len(u)))
	if c == 0 {
		c = 0xffff // zero says "no checksum" (RFC 768)
	}
	binary.BigEndian.PutUint16(u[6:8], c)
	return p, p.Len
}

// BuildICMP writes the IP and ICMP (ICMPv6 for IPv6 addresses) headers of
// a message from src to dst of type typ and code whose bodyLen bytes are
// in out at HeaderLen(src)+8, and returns its description and length.
// rest is the header's second word: identifier and sequence number of an
// echo message, an MTU, or 0.
func BuildICMP(out []byte, src, dst netip.Addr, typ, code uint8, rest uint32, bodyLen int) (Packet, int) {
	hl, ok := room(out, src, dst, icmpHeaderLen, bodyLen)
	if !ok {
		return Packet{}, 0
	}
	proto := uint8(ProtoICMP)
	if src.Is6() {
		proto = ProtoICMPv6
	}
	// What ParsePacket counts as an ICMP message's payload: all after the
	// first word, or after the second for echo messages.
	p := packetOf(src, dst, proto, 4, 4+bodyLen)
	p.ICMPType, p.ICMPCode = typ, code
	req, rep := p.icmpEcho()
	if req || rep {
		p.SrcPort, p.PayloadLen = uint16(rest>>16), bodyLen
	}
	putIPHeader(out, src, dst, proto, icmpHeaderLen+bodyLen, !req && !rep)
	m := out[hl:p.Len]
	m[0], m[1], m[2], m[3] = typ, code, 0, 0
	binary.BigEndian.PutUint32(m[4:8], rest)
	var initial uint32
	if src.Is6() {
		initial = pseudoSum(src, dst, ProtoICMPv6, len(m)) // RFC 4443 2.3
	}
	binary.BigEndian.PutUint16(m[2:4], checksum(m, initial))
	return p, p.Len
}

// BuildICMPError writes the IP and ICMP (ICMPv6) headers of an error from
// src to dst of type typ and code quoting the quoteLen bytes in out at
// HeaderLen(src)+8, and returns its description and length. mtu is put
// where fragmentation needed (IPv4 3/4) and packet too big (IPv6 2) carry
// it and ignored for the others.
func BuildICMPError(out []byte, src, dst netip.Addr, typ, code uint8, mtu uint32, quoteLen int) (Packet, int) {
	var rest uint32
	switch {
	case src.Is4() && typ == 3 && code == 4:
		rest = min(mtu, 0xffff) // RFC 1191: the next-hop MTU in the low 16 bits
	case src.Is6() && typ == 2:
		rest = mtu
	}
	return BuildICMP(out, src, dst, typ, code, rest, quoteLen)
}

// buildTCP writes an option-less TCP segment with no payload from src to
// dst, the only kind tunfw builds itself (resets).
func buildTCP(out []byte, src, dst netip.AddrPort, seq, ack uint32, flags uint8) (Packet, int) {
	hl, ok := room(out, src.Addr(), dst.Addr(), tcpHeaderLen, 0)
	if !ok {
		return Packet{}, 0
	}
	p := packetOf(src.Addr(), dst.Addr(), ProtoTCP, tcpHeaderLen, 0)
	p.SrcPort, p.DstPort = src.Port(), dst.Port()
	p.TCPSeq, p.TCPAck, p.TCPFlags = seq, ack, flags
	putIPHeader(out, p.Src, p.Dst, ProtoTCP, tcpHeaderLen, true)
	t := out[hl:p.Len]
	binary.BigEndian.PutUint16(t[0:2], p.SrcPort)
	binary.BigEndian.PutUint16(t[2:4], p.DstPort)
	binary.BigEndian.PutUint32(t[4:8], seq)
	binary.BigEndian.PutUint32(t[8:12], ack)
	t[12], t[13] = 5<<4, flags
	clear(t[14:20]) // window, checksum, urgent pointer
	binary.BigEndian.PutUint16(t[16:18], checksum(t, pseudoSum(p.Src, p.Dst, ProtoTCP, len(t))))
	return p, p.Len
}

// room reports whether a packet from src to dst with a thl-byte transport
// header and n bytes of payload may be built in out, and the IP header's
// length.
func room(out []byte, src, dst netip.Addr, thl, n int) (int, bool) {
	if !src.IsValid() || !dst.IsValid() || src.Is4() != dst.Is4() || src.Is4In6() || dst.Is4In6() {
		return 0, false
	}
	hl := HeaderLen(src)
	limit := 0xffff // IPv4 total length, IPv6 payload length
	if hl == 20 {
		limit -= hl
	}
	return hl, n >= 0 && n <= limit-thl && hl+thl+n <= len(out)
}

// packetOf describes a packet without options from src to dst whose
// transport header is thl bytes and payload plen bytes long.
func packetOf(src, dst netip.Addr, proto uint8, thl, plen int) Packet {
	p := Packet{Version: 4, Proto: proto, Src: src, Dst: dst, IPHeaderLen: HeaderLen(src), PayloadLen: plen}
	if src.Is6() {
		p.Version = 6
	}
	p.Len = p.IPHeaderLen + thl + plen
	return p
}

// putIPHeader writes an IPv4 (with checksum) or IPv6 header without options
// for a payload of plen bytes, of src's family.
//
// IPv4 identification is 0. What tunfw says itself (resets, ICMP errors:
// small) carries DF, as RFC 6864 wants of a constant identification.
// Relayed payloads (UDP replies, echo replies) do not (df false): in
// gateway mode the kernel forwards them to links of a smaller MTU, and a
// large reply (a 4 KB DNS answer the server sent in fragments) must be
// fragmented there, not dropped.
func putIPHeader(out []byte, src, dst netip.Addr, proto uint8, plen int, df bool) {
	if src.Is6() {
		h := out[:40]
		h[0], h[1], h[2], h[3] = 0x60, 0, 0, 0
		binary.BigEndian.PutUint16(h[4:6], uint16(plen))
		h[6], h[7] = proto, replyTTL
		s, d := src.As16(), dst.As16()
		copy(h[8:24], s[:])
		copy(h[24:40], d[:])
		return
	}
	h := out[:20]
	h[0], h[1] = 0x45, 0
	binary.BigEndian.PutUint16(h[2:4], uint16(20+plen))
	h[4], h[5] = 0, 0
	h[6], h[7] = 0, 0
	if df {
		h[6] = 0x40
	}
	h[8], h[9] = replyTTL, proto
	h[10], h[11] = 0, 0
	s, d := src.As4(), dst.As4()
	copy(h[12:16], s[:])
	copy(h[16:20], d[:])
	binary.BigEndian.PutUint16(h[10:12], checksum(h, 0))
}

// sum adds b as big-endian 16-bit words to the partial sum s (RFC 1071) and
// returns it folded to 16 bits. It adds 64-bit words with their carries: a
// one's complement sum of wider words folds to the same 16-bit sum.
func sum(b []byte, s uint32) uint32 {
	acc, carry := uint64(s), uint64(0)
	for len(b) >= 32 {
		acc, carry = bits.Add64(acc, binary.BigEndian.Uint64(b), carry)
		acc, carry = bits.Add64(acc, binary.BigEndian.Uint64(b[8:]), carry)
		acc, carry = bits.Add64(acc, binary.BigEndian.Uint64(b[16:]), carry)
		acc, carry = bits.Add64(acc, binary.BigEndian.Uint64(b[24:]), carry)
		b = b[32:]
	}
	for len(b) >= 8 {
		acc, carry = bits.Add64(acc, binary.BigEndian.Uint64(b), carry)
		b = b[8:]
	}
	acc, carry = bits.Add64(acc, carry, 0)
	acc += carry // the end-around carry; it cannot carry again
	// Fold to 32 bits, then add the last bytes as 16-bit words.
	acc = acc&0xffffffff + acc>>32
	for len(b) >= 2 {
		acc += uint64(b[0])<<8 | uint64(b[1])
		b = b[2:]
	}
	if len(b) == 1 {
		acc += uint64(b[0]) << 8
	}
	for acc > 0xffff {
		acc = acc&0xffff + acc>>16
	}
	return uint32(acc)
}

// checksum returns the Internet checksum of b with the partial sum initial.
func checksum(b []byte, initial uint32) uint16 {
	s := sum(b, initial)
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

// pseudoSum is the partial sum of the TCP/UDP/ICMPv6 pseudo header. The
// IPv4 and IPv6 layouts differ only in field widths, which do not change
// the one's complement sum.
func pseudoSum(src, dst netip.Addr, proto uint8, length int) uint32 {
	var s uint32
	if src.Is4() {
		a, b := src.As4(), dst.As4()
		s = sum(a[:], 0)
		s = sum(b[:], s)
	} else {
		a, b := src.As16(), dst.As16()
		s = sum(a[:], 0)
		s = sum(b[:], s)
	}
	return s + uint32(proto) + uint32(length)
}
