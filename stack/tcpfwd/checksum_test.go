package tcpfwd

import (
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// gvisorSegment builds an IP packet carrying a TCP segment with payload,
// its checksums computed by gVisor's own header code (not by the code
// under test).
func gvisorSegment(src, dst netip.Addr, payload []byte) (pkt []byte, l4 int) {
	v6 := src.Is6()
	l4 = header.IPv4MinimumSize
	if v6 {
		l4 = header.IPv6MinimumSize
	}
	pkt = make([]byte, l4+header.TCPMinimumSize+len(payload))
	srcA, dstA := tcpip.AddrFromSlice(src.AsSlice()), tcpip.AddrFromSlice(dst.AsSlice())
	if v6 {
		header.IPv6(pkt).Encode(&header.IPv6Fields{
			PayloadLength: uint16(len(pkt) - l4), TransportProtocol: header.TCPProtocolNumber,
			HopLimit: 64, SrcAddr: srcA, DstAddr: dstA,
		})
	} else {
		ip := header.IPv4(pkt)
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(len(pkt)), TTL: 64, Protocol: uint8(header.TCPProtocolNumber),
			SrcAddr: srcA, DstAddr: dstA,
		})
		ip.SetChecksum(^ip.CalculateChecksum())
	}
	tcp := header.TCP(pkt[l4:])
	tcp.Encode(&header.TCPFields{
		SrcPort: 40000, DstPort: 443, SeqNum: 1, AckNum: 2,
		DataOffset: header.TCPMinimumSize, Flags: header.TCPFlagAck | header.TCPFlagPsh, WindowSize: 1000,
	})
	copy(pkt[l4+header.TCPMinimumSize:], payload)
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, srcA, dstA, uint16(len(tcp)))
	xsum = checksum.Checksum(payload, xsum)
	tcp.SetChecksum(^tcp.CalculateChecksum(xsum))
	return pkt, l4
}

// The stack is told not to verify checksums (the kernel vouches for most
// packets): Deliver verifies those it does not, so a corrupted segment
// from elsewhere still never reaches a connection.
func TestChecksumsValid(t *testing.T) {
	payload := []byte("odd-length payload: 27 byte")
	for _, c := range []struct{ src, dst string }{{"10.0.0.1", "203.0.113.10"}, {"fd00::1", "2001:db8::10"}} {
		pkt, l4 := gvisorSegment(netip.MustParseAddr(c.src), netip.MustParseAddr(c.dst), payload)
		v6 := l4 == header.IPv6MinimumSize
		if !checksumsValid(pkt, l4, v6) {
			t.Fatalf("%s: a segment with gVisor's checksums is refused", c.src)
		}
		for _, at := range []int{len(pkt) - 1, l4 + 4, 12} {
			bad := append([]byte(nil), pkt...)
			bad[at] ^= 0x40
			if checksumsValid(bad, l4, v6) {
				t.Errorf("%s: a segment with byte %d changed is taken", c.src, at)
			}
		}
		if !v6 {
			bad := append([]byte(nil), pkt...)
			bad[10] ^= 1 // the IPv4 header checksum only
			if checksumsValid(bad, l4, v6) {
				t.Errorf("a bad IPv4 header checksum is taken")
			}
		}
	}
}
