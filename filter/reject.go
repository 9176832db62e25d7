package filter

import "net/netip"

// Limits on ICMP error size: RFC 1812 (IPv4, 576) and RFC 4443 (IPv6, the
// minimum MTU 1280), so the error itself never needs fragmenting.
const (
	maxICMPv4Error = 576
	maxICMPv6Error = 1280
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
	// Reply with the addresses swapped.
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
	_, n := buildTCP(out, netip.AddrPortFrom(p.Dst, p.DstPort), netip.AddrPortFrom(p.Src, p.SrcPort), seq, ack, TCPRst|TCPAck)
	return n
}

func buildICMPError(p *Packet, pkt []byte, out []byte, typ, code uint8) int {
	limit := maxICMPv4Error
	if p.Version == 6 {
		limit = maxICMPv6Error
	}
	off := HeaderLen(p.Dst) + icmpHeaderLen
	quote := min(p.Len, min(limit, len(out))-off)
	if quote < p.IPHeaderLen {
		return 0 // out too small to say anything useful
	}
	copy(out[off:], pkt[:quote])
	_, n := BuildICMPError(out, p.Dst, p.Src, typ, code, 0, quote)
	return n
}

// buildReset writes into out a bare RST from src to dst with sequence
// number seq (no ACK: RFC 9293 3.10.7.3 for a reset that answers an
// acknowledgement) and returns its length, or 0 when out is too small or
// the addresses cannot carry one.
func buildReset(src, dst netip.AddrPort, seq uint32, out []byte) int {
	if !unicast(src.Addr()) || !unicast(dst.Addr()) {
		return 0
	}
	_, n := buildTCP(out, src, dst, seq, 0, TCPRst)
	return n
}
