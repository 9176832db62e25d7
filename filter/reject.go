package filter

import (
	"encoding/binary"
	"net/netip"
)

// Limits on ICMP error size: RFC 1812 (IPv4, 576) and RFC 4443 (IPv6, the
// minimum MTU 1280), so the error itself never needs fragmenting.
const (
	maxICMPv4Error = 576
	maxICMPv6Error = 1280
	replyTTL       = 64
)

// BuildReject writes into out the reply that rejects packet p (parsed from
// pkt) and returns its length, or 0 when nothing should be sent:
//
//   - TCP: a RST|ACK from p.Dst:DstPort to p.Src:SrcPort (none for a RST).
//   - UDP: ICMP port unreachable (v4 3/3, v6 1/4), so a connected socket
//     sees ECONNREFUSED.
//   - ICMP echo request: ICMP administratively prohibited (v4 3/13, v6 1/1).
//
// ICMP errors quote as much of pkt as fits in 576 (IPv4) or 1280 (IPv6)
// bytes. Nothing is sent to or from multicast, broadcast or unspecified
// addresses. out should hold at least 1280 bytes; BuildReject does not
// allocate.
func BuildReject(p *Packet, pkt []byte, out []byte) int {
	if !unicast(p.Src) || !unicast(p.Dst) || p.Len > len(pkt) || p.Len < p.IPHeaderLen ||
		p.Src.Is4() != (p.Version == 4) || p.Dst.Is4() != (p.Version == 4) {
		return 0 // not a packet ParsePacket produced: refuse rather than panic
	}
	switch {
	case p.Proto == ProtoTCP:
		return buildRST(p, out)
	case p.Proto == ProtoUDP:
		if p.Version == 4 {
			return buildICMPError(p, pkt, out, 3, 3)
		}
		return buildICMPError(p, pkt, out, 1, 4)
	case p.isICMP():
		if req, _ := p.icmpEcho(); !req {
			return 0 // never answer an ICMP error or reply with an error
		}
		if p.Version == 4 {
			return buildICMPError(p, pkt, out, 3, 13)
		}
		return buildICMPError(p, pkt, out, 1, 1)
	}
	return 0
}

// unicast reports whether a may be the source or target of an error reply.
func unicast(a netip.Addr) bool {
	if !a.IsValid() || a.IsUnspecified() || a.IsMulticast() {
		return false
	}
	return !a.Is4() || a != netip.AddrFrom4([4]byte{255, 255, 255, 255})
}

func buildRST(p *Packet, out []byte) int {
	if p.TCPFlags&TCPRst != 0 {
		return 0 // never answer a RST (RFC 793)
	}
	hl := ipHeaderLen(p.Version)
	n := hl + 20
	if len(out) < n {
		return 0
	}
	// Reply with the addresses swapped.
	putIPHeader(out, p.Version, p.Dst, p.Src, ProtoTCP, 20)
	t := out[hl:n]
	var seq uint32
	if p.TCPFlags&TCPAck != 0 {
		seq = p.TCPAck
	}
	ack := p.TCPSeq + uint32(p.PayloadLen)
	if p.TCPFlags&TCPSyn != 0 {
		ack++
	}
	if p.TCPFlags&TCPFin != 0 {
		ack++
	}
	binary.BigEndian.PutUint16(t[0:2], p.DstPort)
	binary.BigEndian.PutUint16(t[2:4], p.SrcPort)
	binary.BigEndian.PutUint32(t[4:8], seq)
	binary.BigEndian.PutUint32(t[8:12], ack)
	t[12] = 5 << 4
	t[13] = TCPRst | TCPAck
	clear(t[14:20]) // window, checksum, urgent pointer
	csum := checksum(t, pseudoSum(p.Dst, p.Src, ProtoTCP, len(t)))
	binary.BigEndian.PutUint16(t[16:18], csum)
	return n
}

func buildICMPError(p *Packet, pkt []byte, out []byte, typ, code uint8) int {
	hl := ipHeaderLen(p.Version)
	limit := maxICMPv4Error
	proto := uint8(ProtoICMP)
	if p.Version == 6 {
		limit, proto = maxICMPv6Error, ProtoICMPv6
	}
	limit = min(limit, len(out))
	quote := min(p.Len, limit-hl-8)
	if quote < p.IPHeaderLen {
		return 0 // out too small to say anything useful
	}
	n := hl + 8 + quote
	putIPHeader(out, p.Version, p.Dst, p.Src, proto, 8+quote)
	m := out[hl:n]
	m[0], m[1] = typ, code
	clear(m[2:8]) // checksum, unused
	copy(m[8:], pkt[:quote])
	var initial uint32
	if p.Version == 6 {
		initial = pseudoSum(p.Dst, p.Src, ProtoICMPv6, len(m)) // RFC 4443 2.3
	}
	binary.BigEndian.PutUint16(m[2:4], checksum(m, initial))
	return n
}

func ipHeaderLen(version uint8) int {
	if version == 6 {
		return 40
	}
	return 20
}

// putIPHeader writes an IPv4 (with checksum) or IPv6 header without options
// for a payload of plen bytes.
func putIPHeader(out []byte, version uint8, src, dst netip.Addr, proto uint8, plen int) {
	if version == 6 {
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
	h[4], h[5] = 0, 0 // id: DF is set, so it identifies no fragments
	h[6], h[7] = 0x40, 0
	h[8], h[9] = replyTTL, proto
	h[10], h[11] = 0, 0
	s, d := src.As4(), dst.As4()
	copy(h[12:16], s[:])
	copy(h[16:20], d[:])
	binary.BigEndian.PutUint16(h[10:12], checksum(h, 0))
}

// sum adds b as big-endian 16-bit words to the partial sum s (RFC 1071)
// and returns it folded to 16 bits; callers may add a few more small
// terms before folding again. It reads 8 bytes per step: a one's complement sum of 32-bit
// words folds to the same 16-bit sum.
func sum(b []byte, s uint32) uint32 {
	acc := uint64(s)
	for len(b) >= 8 {
		acc += uint64(binary.BigEndian.Uint32(b)) + uint64(binary.BigEndian.Uint32(b[4:]))
		b = b[8:]
	}
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

// buildReset writes into out a bare RST from src to dst with sequence
// number seq (no ACK: RFC 9293 3.10.7.3 for a reset that answers an
// acknowledgement) and returns its length, or 0 when out is too small or
// the addresses cannot carry one.
func buildReset(src, dst netip.AddrPort, seq uint32, out []byte) int {
	if !unicast(src.Addr()) || !unicast(dst.Addr()) || src.Addr().Is4() != dst.Addr().Is4() {
		return 0
	}
	version := uint8(4)
	if src.Addr().Is6() {
		version = 6
	}
	hl := ipHeaderLen(version)
	n := hl + 20
	if len(out) < n {
		return 0
	}
	putIPHeader(out, version, src.Addr(), dst.Addr(), ProtoTCP, 20)
	t := out[hl:n]
	binary.BigEndian.PutUint16(t[0:2], src.Port())
	binary.BigEndian.PutUint16(t[2:4], dst.Port())
	binary.BigEndian.PutUint32(t[4:8], seq)
	clear(t[8:12])
	t[12] = 5 << 4
	t[13] = TCPRst
	clear(t[14:20])
	binary.BigEndian.PutUint16(t[16:18], checksum(t, pseudoSum(src.Addr(), dst.Addr(), ProtoTCP, len(t))))
	return n
}
