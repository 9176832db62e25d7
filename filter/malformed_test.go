package filter

import (
	"encoding/binary"
	"net/netip"
	"testing"
)

// TestMalformedClassesCounted takes each class of hostile or broken packet a
// client can put into the TUN through the same path the stack uses
// (ParsePacket, then Inbound or Count) and checks it is dropped and counted
// under its reason, without a panic.
func TestMalformedClassesCounted(t *testing.T) {
	mutate := func(x pk, f func(b []byte)) []byte {
		b := mk(x)
		f(b)
		return b
	}
	syn := tcp("10.0.0.2", 40000, "192.0.2.1", 80, TCPSyn)
	u := udp("10.0.0.2", 40000, "192.0.2.1", 53)
	tests := []struct {
		name   string
		pkt    []byte
		reason DropReason
	}{
		{"empty", nil, ReasonMalformed},
		{"truncated v4 header", mk(syn)[:19], ReasonMalformed},
		{"truncated v6 header", mk(tcp("fd00::2", 1, "2001:db8::1", 80, TCPSyn))[:39], ReasonMalformed},
		{"truncated tcp header", mk(syn)[:30], ReasonMalformed},
		{"truncated udp header", mutate(u, func(b []byte) { binary.BigEndian.PutUint16(b[2:], 24) })[:24], ReasonMalformed},
		{"truncated icmp echo", mk(ping("10.0.0.2", "192.0.2.1", 1))[:26], ReasonMalformed},
		{"IHL below 5", mutate(syn, func(b []byte) { b[0] = 0x44 }), ReasonMalformed},
		{"total length beyond buffer", mutate(syn, func(b []byte) { binary.BigEndian.PutUint16(b[2:], 1500) }), ReasonMalformed},
		{"total length below IHL", mutate(syn, func(b []byte) { binary.BigEndian.PutUint16(b[2:], 10) }), ReasonMalformed},
		{"v6 payload length beyond buffer", mutate(tcp("fd00::2", 1, "2001:db8::1", 80, TCPSyn), func(b []byte) { binary.BigEndian.PutUint16(b[4:], 900) }), ReasonMalformed},
		{"bad version", mutate(syn, func(b []byte) { b[0] = 0x55 }), ReasonMalformed},
		{"tcp data offset below 5", mutate(syn, func(b []byte) { b[20+12] = 0x40 }), ReasonMalformed},
		{"udp length lies", mutate(u, func(b []byte) { binary.BigEndian.PutUint16(b[20+4:], 4000) }), ReasonMalformed},
		{"v4 first fragment", mutate(u, func(b []byte) { b[6] |= 0x20 }), ReasonFragment},
		{"v4 later fragment", mutate(u, func(b []byte) { b[7] = 0x10 }), ReasonFragment},
		{"v6 fragment header", mk(pk{src: "fd00::2", dst: "2001:db8::1", proto: ProtoUDP, sport: 1, dport: 2, v6ext: []byte{44}}), ReasonFragment},
		{"v6 too many extension headers", mk(pk{src: "fd00::2", dst: "2001:db8::1", proto: ProtoUDP, sport: 1, dport: 2, v6ext: []byte{0, 60, 43, 60, 60, 60, 60, 60, 60, 60}}), ReasonMalformed},
		{"SYN+FIN", mk(tcp("10.0.0.2", 40000, "192.0.2.1", 80, TCPSyn|TCPFin)), ReasonMalformed},
		{"SYN+RST", mk(tcp("10.0.0.2", 40000, "192.0.2.1", 80, TCPSyn|TCPRst)), ReasonMalformed},
		{"null scan", mk(tcp("10.0.0.2", 40000, "192.0.2.1", 80, 0)), ReasonNoFlow},
		{"xmas scan", mk(tcp("10.0.0.2", 40000, "192.0.2.1", 80, TCPFin|TCPPsh|TCPUrg)), ReasonNoFlow},
		{"tcp port 0", mk(tcp("10.0.0.2", 40000, "192.0.2.1", 0, TCPSyn)), ReasonMalformed},
		{"udp source port 0", mk(udp("10.0.0.2", 0, "192.0.2.1", 53)), ReasonMalformed},
		{"broadcast destination", mk(udp("10.0.0.2", 68, "255.255.255.255", 67)), ReasonUnsupported},
		{"multicast destination", mk(udp("10.0.0.2", 5353, "224.0.0.251", 5353)), ReasonUnsupported},
		{"v6 multicast destination", mk(udp("fd00::2", 5353, "ff02::fb", 5353)), ReasonUnsupported},
		{"multicast source", mk(udp("224.0.0.1", 1, "192.0.2.1", 53)), ReasonMalformed},
		{"unspecified source", mk(tcp("0.0.0.0", 1, "192.0.2.1", 80, TCPSyn)), ReasonMalformed},
		{"to the TUN's own address", mk(tcp("10.0.0.9", 1, "198.18.0.1", 80, TCPSyn)), ReasonMalformed},
		{"icmp other than echo", mk(pk{src: "10.0.0.2", dst: "192.0.2.1", proto: ProtoICMP, icmpType: 3, icmpCode: 3}), ReasonUnsupported},
		{"unknown protocol (GRE)", mk(pk{src: "10.0.0.2", dst: "192.0.2.1", proto: 47, payload: make([]byte, 8)}), ReasonUnsupported},
	}
	e, _ := newTestEngine(t, "", EngineOptions{Logger: quiet, LocalAddrs: []netip.Addr{netip.MustParseAddr("198.18.0.1")}})
	var p Packet
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := e.Counters()
			var got DropReason
			if err := ParsePacket(tt.pkt, &p); err != nil {
				got = ParseErrorReason(err)
				e.Count(got)
			} else {
				d := e.Inbound(&p, 0)
				if d.Verdict == VerdictForward {
					t.Fatalf("forwarded: %+v", d)
				}
				got = d.Reason
			}
			if got != tt.reason {
				t.Fatalf("reason %v, want %v", got, tt.reason)
			}
			after := e.Counters()
			if counter(after, got)-counter(before, got) != 1 {
				t.Errorf("counter %v moved by %d, want 1", got, counter(after, got)-counter(before, got))
			}
		})
	}
	if c := e.Counters(); c.FlowsActive != 0 || c.Forwarded != 0 {
		t.Errorf("hostile packets created flows or were forwarded: %+v", c)
	}
}

func counter(c Counters, r DropReason) uint64 {
	switch r {
	case ReasonMalformed:
		return c.Malformed
	case ReasonFragment:
		return c.Fragment
	case ReasonNoFlow:
		return c.NoFlow
	case ReasonUnsupported:
		return c.Unsupported
	}
	return 0
}
