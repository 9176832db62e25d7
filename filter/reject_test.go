package filter

import (
	"bytes"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	gcsum "gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// checkIP verifies the IP header of a reply and returns its payload.
func checkIP(t *testing.T, b []byte, v6 bool, src, dst string, proto uint8) (payload []byte, s, d tcpip.Address) {
	t.Helper()
	if v6 {
		h := header.IPv6(b)
		if !h.IsValid(len(b)) || h.HopLimit() != 64 || h.TransportProtocol() != tcpip.TransportProtocolNumber(proto) {
			t.Fatalf("bad IPv6 header % x", b[:40])
		}
		s, d = h.SourceAddress(), h.DestinationAddress()
		payload = h.Payload()
	} else {
		h := header.IPv4(b)
		if !h.IsValid(len(b)) || !h.IsChecksumValid() || h.TTL() != 64 || h.Protocol() != proto || int(h.TotalLength()) != len(b) {
			t.Fatalf("bad IPv4 header % x", b[:20])
		}
		s, d = h.SourceAddress(), h.DestinationAddress()
		payload = h.Payload()
	}
	if s.String() != src || d.String() != dst {
		t.Fatalf("addresses %s -> %s, want %s -> %s", s, d, src, dst)
	}
	return payload, s, d
}

func TestBuildRejectTCP(t *testing.T) {
	tests := []struct {
		name     string
		in       pk
		seq, ack uint32
	}{
		{"v4 syn", pk{src: "10.0.0.2", dst: "1.2.3.4", proto: ProtoTCP, sport: 40000, dport: 80, flags: TCPSyn, seq: 1000, tcpOpts: 12}, 0, 1001},
		{"v6 syn", pk{src: "fd00::2", dst: "2001:db8::1", proto: ProtoTCP, sport: 40000, dport: 80, flags: TCPSyn, seq: 0xffffffff}, 0, 0},
		{"v4 data", pk{src: "10.0.0.2", dst: "1.2.3.4", proto: ProtoTCP, sport: 1, dport: 2, flags: TCPAck | TCPPsh, seq: 50, ack: 7000, payload: []byte("hello")}, 7000, 55},
		{"v6 fin", pk{src: "fd00::2", dst: "2001:db8::1", proto: ProtoTCP, sport: 1, dport: 2, flags: TCPAck | TCPFin, seq: 50, ack: 9, payload: []byte("xy")}, 9, 53},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, pkt := parsed(tt.in)
			out := make([]byte, 1500)
			n := BuildReject(p, pkt, out)
			if n == 0 {
				t.Fatal("no reply")
			}
			b := out[:n]
			seg, s, d := checkIP(t, b, p.Version == 6, tt.in.dst, tt.in.src, ProtoTCP)
			h := header.TCP(seg)
			if len(seg) != 20 || h.SourcePort() != tt.in.dport || h.DestinationPort() != tt.in.sport {
				t.Errorf("ports %d -> %d", h.SourcePort(), h.DestinationPort())
			}
			if h.Flags() != header.TCPFlagRst|header.TCPFlagAck {
				t.Errorf("flags %v", h.Flags())
			}
			if h.SequenceNumber() != tt.seq || h.AckNumber() != tt.ack {
				t.Errorf("seq %d ack %d, want %d %d", h.SequenceNumber(), h.AckNumber(), tt.seq, tt.ack)
			}
			if !h.IsChecksumValid(s, d, 0, 0) {
				t.Errorf("bad TCP checksum")
			}
			// The reply parses, and is seen by the engine as the reverse tuple.
			var rp Packet
			if err := ParsePacket(b, &rp); err != nil || rp.Src != p.Dst || rp.DstPort != p.SrcPort {
				t.Errorf("reply parse: %v %+v", err, rp)
			}
		})
	}
	// Never answer a RST.
	p, pkt := parsed(tcp("10.0.0.2", 1, "1.2.3.4", 2, TCPRst|TCPAck))
	if n := BuildReject(p, pkt, make([]byte, 1500)); n != 0 {
		t.Errorf("RST answered")
	}
}

func TestBuildRejectICMP(t *testing.T) {
	big := bytes.Repeat([]byte{0xab}, 1400)
	tests := []struct {
		name       string
		in         pk
		typ, code  uint8
		quote, max int
	}{
		{"v4 udp", udp("10.0.0.2", 5000, "8.8.8.8", 53), 3, 3, 33, 576},
		{"v4 udp big", pk{src: "10.0.0.2", dst: "8.8.8.8", proto: ProtoUDP, sport: 1, dport: 2, payload: big}, 3, 3, 576 - 28, 576},
		{"v6 udp", udp("fd00::2", 5000, "2001:db8::53", 53), 1, 4, 53, 1280},
		{"v6 udp big", pk{src: "fd00::2", dst: "2001:db8::53", proto: ProtoUDP, sport: 1, dport: 2, payload: big}, 1, 4, 1280 - 48, 1280},
		{"v4 echo", ping("10.0.0.2", "8.8.8.8", 5), 3, 13, 28, 576},
		{"v6 echo", ping("fd00::2", "2001:db8::53", 5), 1, 1, 48, 1280},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, pkt := parsed(tt.in)
			out := make([]byte, 2000)
			n := BuildReject(p, pkt, out)
			if n == 0 || n > tt.max {
				t.Fatalf("length %d (max %d)", n, tt.max)
			}
			b := out[:n]
			if p.Version == 4 {
				m, _, _ := checkIP(t, b, false, tt.in.dst, tt.in.src, ProtoICMP)
				h := header.ICMPv4(m)
				if h.Type() != header.ICMPv4Type(tt.typ) || h.Code() != header.ICMPv4Code(tt.code) {
					t.Errorf("type %d code %d", h.Type(), h.Code())
				}
				if gcsum.Checksum(m, 0) != 0xffff {
					t.Errorf("bad ICMPv4 checksum")
				}
				if !bytes.Equal(h.Payload(), pkt[:tt.quote]) {
					t.Errorf("quote: %d bytes, want %d", len(h.Payload()), tt.quote)
				}
			} else {
				m, s, d := checkIP(t, b, true, tt.in.dst, tt.in.src, ProtoICMPv6)
				h := header.ICMPv6(m)
				if h.Type() != header.ICMPv6Type(tt.typ) || h.Code() != header.ICMPv6Code(tt.code) {
					t.Errorf("type %d code %d", h.Type(), h.Code())
				}
				want := header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
					Header: h[:header.ICMPv6MinimumSize], Src: s, Dst: d,
					PayloadCsum: gcsum.Checksum(h.Payload(), 0), PayloadLen: len(h.Payload()),
				})
				if want != h.Checksum() {
					t.Errorf("ICMPv6 checksum %#x, want %#x", h.Checksum(), want)
				}
				if !bytes.Equal(m[8:], pkt[:tt.quote]) {
					t.Errorf("quote: %d bytes, want %d", len(m)-8, tt.quote)
				}
			}
		})
	}
}

func TestBuildRejectNone(t *testing.T) {
	out := make([]byte, 1500)
	for name, x := range map[string]pk{
		"echo reply":       {src: "10.0.0.2", dst: "8.8.8.8", proto: ProtoICMP, icmpType: 0},
		"icmp error":       {src: "10.0.0.2", dst: "8.8.8.8", proto: ProtoICMP, icmpType: 3},
		"multicast dst":    udp("10.0.0.2", 1, "224.0.0.251", 5353),
		"broadcast dst":    udp("10.0.0.2", 1, "255.255.255.255", 67),
		"unspecified src":  udp("0.0.0.0", 68, "10.0.0.1", 67),
		"v6 multicast dst": udp("fd00::2", 1, "ff02::fb", 5353),
		"other protocol":   {src: "10.0.0.2", dst: "8.8.8.8", proto: 47},
	} {
		p, pkt := parsed(x)
		if n := BuildReject(p, pkt, out); n != 0 {
			t.Errorf("%s: %d-byte reply", name, n)
		}
	}
	// A too small out buffer or a hand-made Packet does not panic.
	p, pkt := parsed(udp("10.0.0.2", 1, "8.8.8.8", 53))
	if n := BuildReject(p, pkt, make([]byte, 30)); n != 0 {
		t.Errorf("tiny out: %d", n)
	}
	q := *p
	q.Version = 6
	if n := BuildReject(&q, pkt, out); n != 0 {
		t.Errorf("inconsistent packet: %d", n)
	}
}
