package filter

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"
)

func TestParsePacket(t *testing.T) {
	a := netip.MustParseAddr
	tests := []struct {
		name string
		in   pk
		pad  int
		want Packet
	}{
		{"v4 tcp syn", pk{src: "10.0.0.2", dst: "1.2.3.4", proto: ProtoTCP, sport: 40000, dport: 443, flags: TCPSyn, seq: 7, tcpOpts: 8},
			0, Packet{Version: 4, Proto: 6, Src: a("10.0.0.2"), Dst: a("1.2.3.4"), SrcPort: 40000, DstPort: 443, TCPFlags: TCPSyn, TCPSeq: 7, IPHeaderLen: 20, Len: 48}},
		{"v4 tcp payload options padding", pk{src: "10.0.0.2", dst: "1.2.3.4", proto: ProtoTCP, sport: 1, dport: 2, flags: TCPAck | TCPPsh, seq: 5, ack: 9, v4opts: 4, payload: []byte("abc")},
			7, Packet{Version: 4, Proto: 6, Src: a("10.0.0.2"), Dst: a("1.2.3.4"), SrcPort: 1, DstPort: 2, TCPFlags: TCPAck | TCPPsh, TCPSeq: 5, TCPAck: 9, IPHeaderLen: 24, PayloadLen: 3, Len: 47}},
		{"v4 udp", udp("10.0.0.2", 5353, "8.8.8.8", 53),
			0, Packet{Version: 4, Proto: 17, Src: a("10.0.0.2"), Dst: a("8.8.8.8"), SrcPort: 5353, DstPort: 53, IPHeaderLen: 20, PayloadLen: 5, Len: 33}},
		{"v4 echo", ping("10.0.0.2", "8.8.8.8", 77),
			0, Packet{Version: 4, Proto: 1, Src: a("10.0.0.2"), Dst: a("8.8.8.8"), SrcPort: 77, ICMPType: 8, IPHeaderLen: 20, Len: 28}},
		{"v4 icmp unreachable", pk{src: "10.0.0.2", dst: "8.8.8.8", proto: ProtoICMP, icmpType: 3, icmpCode: 1, sport: 99},
			0, Packet{Version: 4, Proto: 1, Src: a("10.0.0.2"), Dst: a("8.8.8.8"), ICMPType: 3, ICMPCode: 1, IPHeaderLen: 20, PayloadLen: 4, Len: 28}},
		{"v4 gre", pk{src: "10.0.0.2", dst: "8.8.8.8", proto: 47, payload: []byte{1, 2, 3, 4}},
			0, Packet{Version: 4, Proto: 47, Src: a("10.0.0.2"), Dst: a("8.8.8.8"), IPHeaderLen: 20, PayloadLen: 4, Len: 24}},
		{"v6 tcp", pk{src: "fd00::2", dst: "2001:db8::1", proto: ProtoTCP, sport: 1234, dport: 80, flags: TCPFin | TCPAck, seq: 1, ack: 2},
			3, Packet{Version: 6, Proto: 6, Src: a("fd00::2"), Dst: a("2001:db8::1"), SrcPort: 1234, DstPort: 80, TCPFlags: TCPFin | TCPAck, TCPSeq: 1, TCPAck: 2, IPHeaderLen: 40, Len: 60}},
		{"v6 udp after ext headers", pk{src: "fd00::2", dst: "2001:db8::1", proto: ProtoUDP, sport: 1, dport: 53, v6ext: []byte{0, 60, 43}},
			0, Packet{Version: 6, Proto: 17, Src: a("fd00::2"), Dst: a("2001:db8::1"), SrcPort: 1, DstPort: 53, IPHeaderLen: 64, Len: 72}},
		{"v6 echo", ping("fd00::2", "2001:db8::1", 0xbeef),
			0, Packet{Version: 6, Proto: 58, Src: a("fd00::2"), Dst: a("2001:db8::1"), SrcPort: 0xbeef, ICMPType: 128, IPHeaderLen: 40, Len: 48}},
		{"v6 echo reply", pk{src: "2001:db8::1", dst: "fd00::2", proto: ProtoICMPv6, icmpType: icmpv6EchoReply, sport: 5},
			0, Packet{Version: 6, Proto: 58, Src: a("2001:db8::1"), Dst: a("fd00::2"), SrcPort: 5, ICMPType: 129, IPHeaderLen: 40, Len: 48}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := append(mk(tt.in), make([]byte, tt.pad)...)
			var p Packet
			if err := ParsePacket(b, &p); err != nil {
				t.Fatalf("ParsePacket: %v", err)
			}
			if p != tt.want {
				t.Errorf("got  %+v\nwant %+v", p, tt.want)
			}
		})
	}
}

func TestParsePacketErrors(t *testing.T) {
	v4 := func(f func(b []byte)) []byte { b := mk(tcp("10.0.0.2", 1, "1.2.3.4", 80, TCPSyn)); f(b); return b }
	v6 := func(x pk, f func(b []byte)) []byte { b := mk(x); f(b); return b }
	v6tcp := pk{src: "fd00::2", dst: "2001:db8::1", proto: ProtoTCP, sport: 1, dport: 2, flags: TCPSyn}
	tests := []struct {
		name string
		b    []byte
		want error
	}{
		{"empty", nil, ErrTruncated},
		{"short v4", []byte{0x45, 0, 0, 20}, ErrTruncated},
		{"version 5", v4(func(b []byte) { b[0] = 0x55 }), ErrBadVersion},
		{"version 0", make([]byte, 40), ErrBadVersion},
		{"ihl 4", v4(func(b []byte) { b[0] = 0x44 }), ErrBadHeader},
		{"total < ihl", v4(func(b []byte) { binary.BigEndian.PutUint16(b[2:], 10) }), ErrBadHeader},
		{"total > buffer", v4(func(b []byte) { binary.BigEndian.PutUint16(b[2:], 1000) }), ErrTruncated},
		{"ihl > total", v4(func(b []byte) { b[0] = 0x4f }), ErrBadHeader},
		{"total cuts tcp", v4(func(b []byte) { binary.BigEndian.PutUint16(b[2:], 30) }), ErrTruncated},
		{"tcp doff 4", v4(func(b []byte) { b[32] = 4 << 4 }), ErrBadHeader},
		{"tcp doff > len", v4(func(b []byte) { b[32] = 15 << 4 }), ErrTruncated},
		{"v4 MF", v4(func(b []byte) { b[6] = 0x20 }), ErrFragment},
		{"v4 offset", v4(func(b []byte) { b[7] = 1 }), ErrFragment},
		{"v4 DF ok", v4(func(b []byte) { b[6] = 0x40 }), nil},
		{"short v6", append([]byte{0x60}, make([]byte, 38)...), ErrTruncated},
		{"v6 plen > buffer", v6(v6tcp, func(b []byte) { binary.BigEndian.PutUint16(b[4:], 100) }), ErrTruncated},
		{"v6 fragment", v6(pk{src: "fd00::2", dst: "2001:db8::1", proto: ProtoUDP, v6ext: []byte{0, 44}}, func([]byte) {}), ErrFragment},
		{"v6 ext len lies", v6(pk{src: "fd00::2", dst: "2001:db8::1", proto: ProtoUDP, v6ext: []byte{60}}, func(b []byte) { b[41] = 200 }), ErrTruncated},
		{"v6 ext header cut", v6(pk{src: "fd00::2", dst: "2001:db8::1", proto: 59}, func(b []byte) { b[6] = 0 }), ErrTruncated},
		{"udp short", v6(pk{src: "fd00::2", dst: "2001:db8::1", proto: 59, payload: []byte{1, 2, 3}}, func(b []byte) { b[6] = ProtoUDP }), ErrTruncated},
		{"echo short", v4(func(b []byte) { b[9] = ProtoICMP; b[20] = 8; binary.BigEndian.PutUint16(b[2:], 26) }), ErrTruncated},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var p Packet
			if err := ParsePacket(tt.b, &p); !errors.Is(err, tt.want) {
				t.Errorf("got %v, want %v", err, tt.want)
			}
		})
	}
	var p Packet
	if r := ParseErrorReason(ErrFragment); r != ReasonFragment {
		t.Errorf("ParseErrorReason(ErrFragment) = %v", r)
	}
	if r := ParseErrorReason(ParsePacket(nil, &p)); r != ReasonMalformed {
		t.Errorf("ParseErrorReason(ErrTruncated) = %v", r)
	}
}

// Every prefix of valid packets must fail cleanly, never panic.
func TestParsePacketPrefixes(t *testing.T) {
	for _, x := range []pk{
		tcp("10.0.0.2", 1, "1.2.3.4", 80, TCPSyn),
		{src: "fd00::2", dst: "2001:db8::1", proto: ProtoUDP, v6ext: []byte{0, 43}},
		ping("fd00::2", "2001:db8::1", 1),
	} {
		b := mk(x)
		for i := range b {
			var p Packet
			if err := ParsePacket(b[:i], &p); err == nil {
				t.Errorf("%d-byte prefix of %v parsed", i, x)
			}
		}
	}
}

// ParseHeaders gives, from the headers alone, what ParsePacket gives for
// the whole packet; without the whole headers, or for a packet shorter
// than its IP header says, it fails as ParsePacket does.
func TestParseHeaders(t *testing.T) {
	payload := make([]byte, 3000)
	for _, x := range []pk{
		{src: "10.0.0.2", dst: "1.2.3.4", proto: ProtoTCP, sport: 1, dport: 2, flags: TCPAck, v4opts: 4, tcpOpts: 12, payload: payload},
		{src: "fd00::2", dst: "2001:db8::1", proto: ProtoTCP, sport: 1, dport: 2, flags: TCPAck, v6ext: []byte{0, 60}, payload: payload},
		{src: "10.0.0.2", dst: "8.8.8.8", proto: ProtoUDP, sport: 5, dport: 53, payload: payload},
		{src: "fd00::2", dst: "2001:db8::1", proto: ProtoICMPv6, icmpType: icmpv6EchoReply, sport: 5, payload: payload},
	} {
		b := mk(x)
		var whole, head Packet
		if err := ParsePacket(b, &whole); err != nil {
			t.Fatalf("ParsePacket %v: %v", x.proto, err)
		}
		hdr := len(b) - len(payload)
		if err := ParseHeaders(b[:hdr], len(b), &head); err != nil || head != whole {
			t.Errorf("ParseHeaders of the %d header bytes: %v\n got  %+v\n want %+v", hdr, err, head, whole)
		}
		if err := ParseHeaders(b[:hdr-1], len(b), &head); err == nil {
			t.Errorf("ParseHeaders of %d of the %d header bytes: no error", hdr-1, hdr)
		}
		if err := ParseHeaders(b[:hdr], len(b)-1, &head); err == nil {
			t.Errorf("ParseHeaders of a packet a byte shorter than its IP header says: no error")
		}
		if err := ParseHeaders(b, hdr, &head); err == nil {
			t.Errorf("ParseHeaders of a packet said to end after its headers: no error")
		}
		if err := ParseHeaders(b[:hdr], -1, &head); err == nil {
			t.Errorf("ParseHeaders of a packet of -1 bytes: no error")
		}
	}
}
