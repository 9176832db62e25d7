package filter

import (
	"encoding/binary"
	"errors"
	"net/netip"
)

// IP protocol numbers the filter knows about.
const (
	ProtoICMP   = 1
	ProtoTCP    = 6
	ProtoUDP    = 17
	ProtoICMPv6 = 58
)

// TCP flag bits as found in Packet.TCPFlags.
const (
	TCPFin = 0x01
	TCPSyn = 0x02
	TCPRst = 0x04
	TCPPsh = 0x08
	TCPAck = 0x10
	TCPUrg = 0x20
)

// ICMP echo types.
const (
	icmpv4EchoReply   = 0
	icmpv4EchoRequest = 8
	icmpv6EchoRequest = 128
	icmpv6EchoReply   = 129
)

// Errors returned by ParsePacket. They are sentinels so that the per-packet
// path does not allocate; use ParseErrorReason to classify them.
var (
	ErrTruncated  = errors.New("filter: truncated packet")
	ErrBadHeader  = errors.New("filter: malformed header")
	ErrBadVersion = errors.New("filter: unknown IP version")
	ErrFragment   = errors.New("filter: IP fragment")
)

// maxExtHeaders bounds the IPv6 extension header walk so that a crafted chain
// cannot make parsing expensive.
const maxExtHeaders = 8

// Packet is the parsed view of one IP packet. It is a value type filled in
// place by ParsePacket; it does not reference the packet buffer.
type Packet struct {
	Version uint8 // 4 or 6
	// Proto is the IP protocol number of the transport header, after
	// skipping IPv6 extension headers.
	Proto    uint8
	Src, Dst netip.Addr
	// SrcPort and DstPort are the TCP/UDP ports. For ICMP/ICMPv6 echo
	// request and reply, SrcPort is the echo identifier and DstPort is 0.
	SrcPort, DstPort   uint16
	TCPFlags           uint8
	TCPSeq, TCPAck     uint32 // TCP sequence and acknowledgment numbers
	ICMPType, ICMPCode uint8
	// IPHeaderLen is the number of bytes up to the transport header,
	// including IPv4 options and IPv6 extension headers.
	IPHeaderLen int
	// PayloadLen is the number of transport payload bytes (after the TCP
	// header with options, the UDP header, or the ICMP header). For UDP it
	// is what the UDP length says, which may be less than the IP packet
	// carries.
	PayloadLen int
	// Len is the total IP length from the header; bytes beyond it in the
	// buffer (TUN padding) are ignored.
	Len int
}

// icmpEcho reports whether p is an ICMPv4/ICMPv6 echo request or reply
// (the only ICMP messages carrying an identifier).
func (p *Packet) icmpEcho() (request, reply bool) {
	switch {
	case p.Version == 4 && p.Proto == ProtoICMP:
		return p.ICMPType == icmpv4EchoRequest, p.ICMPType == icmpv4EchoReply
	case p.Version == 6 && p.Proto == ProtoICMPv6:
		return p.ICMPType == icmpv6EchoRequest, p.ICMPType == icmpv6EchoReply
	}
	return false, false
}

// isICMP reports whether p carries the ICMP of its IP family.
func (p *Packet) isICMP() bool {
	return (p.Version == 4 && p.Proto == ProtoICMP) || (p.Version == 6 && p.Proto == ProtoICMPv6)
}

// ParsePacket parses the IPv4 or IPv6 packet in b into p. It returns one of
// ErrTruncated, ErrBadHeader, ErrBadVersion or ErrFragment for input it
// cannot use; it never panics and does not allocate. Transport protocols
// other than TCP, UDP and ICMP are not an error: only the IP fields are set.
func ParsePacket(b []byte, p *Packet) error { return parse(b, len(b), p) }

// ParseHeaders is ParsePacket for a packet of n bytes of which b holds
// the first, its IP and transport headers at least: p gets the fields
// ParsePacket would give it for the whole packet. A writer that sends a
// packet's payload from where it lies parses the headers it copied.
func ParseHeaders(b []byte, n int, p *Packet) error {
	if n < 0 {
		*p = Packet{}
		return ErrTruncated
	}
	if n < len(b) {
		b = b[:n]
	}
	return parse(b, n, p)
}

// parse parses a packet of n bytes, len(b) <= n of which are in b: the
// headers must be, the lengths are checked against n.
func parse(b []byte, n int, p *Packet) error {
	*p = Packet{}
	if len(b) < 1 {
		return ErrTruncated
	}
	// l4 is the transport header and what of the payload b holds; l4Len
	// is the transport header's and payload's length in the packet.
	var l4 []byte
	var l4Len int
	switch b[0] >> 4 {
	case 4:
		if len(b) < 20 {
			return ErrTruncated
		}
		ihl := int(b[0]&0x0f) * 4
		if ihl < 20 {
			return ErrBadHeader
		}
		total := int(binary.BigEndian.Uint16(b[2:4]))
		if total < ihl {
			return ErrBadHeader
		}
		if total > n || ihl > len(b) {
			return ErrTruncated
		}
		b = b[:min(total, len(b))] // drop TUN padding
		// MF flag or a non-zero offset: see the package fragment policy.
		if b[6]&0x20 != 0 || binary.BigEndian.Uint16(b[6:8])&0x1fff != 0 {
			return ErrFragment
		}
		p.Version = 4
		p.Proto = b[9]
		p.Src = netip.AddrFrom4([4]byte(b[12:16]))
		p.Dst = netip.AddrFrom4([4]byte(b[16:20]))
		p.IPHeaderLen = ihl
		p.Len = total
		l4 = b[ihl:]
		l4Len = total - ihl
	case 6:
		if len(b) < 40 {
			return ErrTruncated
		}
		total := 40 + int(binary.BigEndian.Uint16(b[4:6]))
		if total > n {
			return ErrTruncated
		}
		b = b[:min(total, len(b))]
		next := b[6]
		off := 40
	ext:
		for i := 0; ; i++ {
			switch next {
			case 0, 43, 60: // hop-by-hop, routing, destination options
				if i == maxExtHeaders {
					return ErrBadHeader
				}
				if off+8 > len(b) {
					return ErrTruncated
				}
				next = b[off]
				off += (int(b[off+1]) + 1) * 8
				if off > len(b) {
					return ErrTruncated
				}
			case 44: // fragment header
				return ErrFragment
			default:
				break ext
			}
		}
		p.Version = 6
		p.Proto = next
		p.Src = netip.AddrFrom16([16]byte(b[8:24]))
		p.Dst = netip.AddrFrom16([16]byte(b[24:40]))
		p.IPHeaderLen = off
		p.Len = total
		l4 = b[off:]
		l4Len = total - off
	default:
		return ErrBadVersion
	}

	switch {
	case p.Proto == ProtoTCP:
		if len(l4) < 20 {
			return ErrTruncated
		}
		doff := int(l4[12]>>4) * 4
		if doff < 20 {
			return ErrBadHeader
		}
		if doff > len(l4) {
			return ErrTruncated
		}
		p.SrcPort = binary.BigEndian.Uint16(l4[0:2])
		p.DstPort = binary.BigEndian.Uint16(l4[2:4])
		p.TCPSeq = binary.BigEndian.Uint32(l4[4:8])
		p.TCPAck = binary.BigEndian.Uint32(l4[8:12])
		p.TCPFlags = l4[13]
		p.PayloadLen = l4Len - doff
		// SYN with FIN or RST has no meaning; scanners use it to probe.
		if p.TCPFlags&TCPSyn != 0 && p.TCPFlags&(TCPFin|TCPRst) != 0 {
			return ErrBadHeader
		}
		if p.SrcPort == 0 || p.DstPort == 0 {
			return ErrBadHeader
		}
	case p.Proto == ProtoUDP:
		if len(l4) < 8 {
			return ErrTruncated
		}
		p.SrcPort = binary.BigEndian.Uint16(l4[0:2])
		p.DstPort = binary.BigEndian.Uint16(l4[2:4])
		// The UDP length may not claim more than the IP packet holds (the
		// stack would read past the datagram); bytes past it, inside the
		// IP packet, are not part of the datagram and are not forwarded,
		// as the kernel trims them.
		ul := int(binary.BigEndian.Uint16(l4[4:6]))
		if ul < 8 || ul > l4Len {
			return ErrBadHeader
		}
		p.PayloadLen = ul - 8
		if p.SrcPort == 0 || p.DstPort == 0 {
			return ErrBadHeader
		}
	case p.isICMP():
		if len(l4) < 4 {
			return ErrTruncated
		}
		p.ICMPType, p.ICMPCode = l4[0], l4[1]
		p.PayloadLen = l4Len - 4
		if req, rep := p.icmpEcho(); req || rep {
			if len(l4) < 8 {
				return ErrTruncated
			}
			p.SrcPort = binary.BigEndian.Uint16(l4[4:6]) // echo identifier
			p.PayloadLen = l4Len - 8
		}
	default:
		p.PayloadLen = l4Len
	}
	return nil
}

// ParseErrorReason classifies an error returned by ParsePacket as the
// DropReason to count: ReasonFragment for fragments, ReasonMalformed for the
// rest.
func ParseErrorReason(err error) DropReason {
	if err == ErrFragment {
		return ReasonFragment
	}
	return ReasonMalformed
}
