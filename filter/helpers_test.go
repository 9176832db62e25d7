package filter

import (
	"encoding/binary"
	"net/netip"
)

// pk describes a test packet; mk builds its bytes (IPv4 or IPv6 after the
// family of src).
type pk struct {
	src, dst     string
	proto        uint8
	sport, dport uint16 // ICMP echo: sport is the identifier
	flags        uint8
	seq, ack     uint32
	icmpType     uint8
	icmpCode     uint8
	payload      []byte
	tcpOpts      int    // bytes of TCP options (multiple of 4)
	v6ext        []byte // IPv6 extension header types to insert (0, 43, 60, 44)
	v4opts       int    // bytes of IPv4 options (multiple of 4)
}

func mk(x pk) []byte {
	src, dst := netip.MustParseAddr(x.src), netip.MustParseAddr(x.dst)
	var l4 []byte
	switch x.proto {
	case ProtoTCP:
		l4 = make([]byte, 20+x.tcpOpts)
		binary.BigEndian.PutUint16(l4[0:], x.sport)
		binary.BigEndian.PutUint16(l4[2:], x.dport)
		binary.BigEndian.PutUint32(l4[4:], x.seq)
		binary.BigEndian.PutUint32(l4[8:], x.ack)
		l4[12] = uint8((20+x.tcpOpts)/4) << 4
		l4[13] = x.flags
		binary.BigEndian.PutUint16(l4[14:], 65535)
		for i := 20; i < len(l4); i++ {
			l4[i] = 1 // NOP
		}
	case ProtoUDP:
		l4 = make([]byte, 8)
		binary.BigEndian.PutUint16(l4[0:], x.sport)
		binary.BigEndian.PutUint16(l4[2:], x.dport)
		binary.BigEndian.PutUint16(l4[4:], uint16(8+len(x.payload)))
	case ProtoICMP, ProtoICMPv6:
		l4 = make([]byte, 8)
		l4[0], l4[1] = x.icmpType, x.icmpCode
		binary.BigEndian.PutUint16(l4[4:], x.sport)
		binary.BigEndian.PutUint16(l4[6:], 1) // sequence
	default:
		l4 = nil
	}
	l4 = append(l4, x.payload...)
	var ip []byte
	if src.Is4() {
		hl := 20 + x.v4opts
		ip = make([]byte, hl, hl+len(l4))
		ip[0] = 0x40 | uint8(hl/4)
		binary.BigEndian.PutUint16(ip[2:], uint16(hl+len(l4)))
		ip[8], ip[9] = 64, x.proto
		s, d := src.As4(), dst.As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		binary.BigEndian.PutUint16(ip[10:], checksum(ip, 0))
	} else {
		ip = make([]byte, 40)
		ip[0] = 0x60
		ip[7] = 64
		s, d := src.As16(), dst.As16()
		copy(ip[8:], s[:])
		copy(ip[24:], d[:])
		next := &ip[6]
		for _, e := range x.v6ext {
			*next = e
			h := make([]byte, 8)
			ip = append(ip, h...)
			next = &ip[len(ip)-8]
		}
		*next = x.proto
		binary.BigEndian.PutUint16(ip[4:], uint16(len(ip)-40+len(l4)))
	}
	off := len(ip)
	ip = append(ip, l4...)
	// Transport checksums, so that packets are realistic.
	t := ip[off:]
	switch x.proto {
	case ProtoTCP:
		binary.BigEndian.PutUint16(t[16:], checksum(t, pseudoSum(src, dst, ProtoTCP, len(t))))
	case ProtoUDP:
		binary.BigEndian.PutUint16(t[6:], checksum(t, pseudoSum(src, dst, ProtoUDP, len(t))))
	case ProtoICMP:
		binary.BigEndian.PutUint16(t[2:], checksum(t, 0))
	case ProtoICMPv6:
		binary.BigEndian.PutUint16(t[2:], checksum(t, pseudoSum(src, dst, ProtoICMPv6, len(t))))
	}
	return ip
}

// parsed builds and parses x, panicking on error.
func parsed(x pk) (*Packet, []byte) {
	b := mk(x)
	var p Packet
	if err := ParsePacket(b, &p); err != nil {
		panic(err)
	}
	return &p, b
}

func tcp(src string, sport uint16, dst string, dport uint16, flags uint8) pk {
	return pk{src: src, dst: dst, proto: ProtoTCP, sport: sport, dport: dport, flags: flags, seq: 1000}
}

func udp(src string, sport uint16, dst string, dport uint16) pk {
	return pk{src: src, dst: dst, proto: ProtoUDP, sport: sport, dport: dport, payload: []byte("hello")}
}

func ping(src, dst string, id uint16) pk {
	a := netip.MustParseAddr(src)
	if a.Is4() {
		return pk{src: src, dst: dst, proto: ProtoICMP, icmpType: icmpv4EchoRequest, sport: id}
	}
	return pk{src: src, dst: dst, proto: ProtoICMPv6, icmpType: icmpv6EchoRequest, sport: id}
}
