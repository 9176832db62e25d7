package tcpfwd

import (
	"bytes"
	"testing"

	"github.com/tunfw/tunfw/stack/internal/race"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// TestAppendPacket checks that the outbound copy takes the packet from its
// headers on, across views, without allocating.
func TestAppendPacket(t *testing.T) {
	payload := bytes.Repeat([]byte("0123456789"), 1000)
	pb := stack.NewPacketBuffer(stack.PacketBufferOptions{ReserveHeaderBytes: 60, Payload: buffer.MakeWithData(payload)})
	defer pb.DecRef()
	// As the stack builds packets: transport header first, network in front.
	copy(pb.TransportHeader().Push(20), bytes.Repeat([]byte{'T'}, 20))
	copy(pb.NetworkHeader().Push(40), bytes.Repeat([]byte{'N'}, 40))
	var want []byte
	for _, v := range pb.AsSlices() {
		want = append(want, v...)
	}
	dst := make([]byte, 0, 16+len(want))
	got := appendPacket(dst, pb)
	if !bytes.Equal(got, want) {
		t.Fatalf("appendPacket gave %d bytes, want the %d of AsSlices", len(got), len(want))
	}
	if race.Enabled {
		t.Skip("allocation counts are meaningless under -race; make test checks them without it")
	}
	if n := testing.AllocsPerRun(100, func() { appendPacket(dst[:0], pb) }); n != 0 {
		t.Errorf("appendPacket allocates %v times per packet", n)
	}
}

// TestWritePacketsDoesNotAllocate checks the netstack's whole outbound
// path per packet (copy out, parse, engine accounting, TUN write, buffer
// back) allocates nothing once the pool is warm.
func TestWritePacketsDoesNotAllocate(t *testing.T) {
	s := stateOnly(testHost(t, nil))
	payload := bytes.Repeat([]byte("x"), 1000)
	pb := stack.NewPacketBuffer(stack.PacketBufferOptions{ReserveHeaderBytes: 60, Payload: buffer.MakeWithData(payload)})
	defer pb.DecRef()
	header.TCP(pb.TransportHeader().Push(header.TCPMinimumSize)).Encode(&header.TCPFields{
		SrcPort: 80, DstPort: 40000, DataOffset: header.TCPMinimumSize, Flags: header.TCPFlagAck, WindowSize: 1000,
	})
	header.IPv4(pb.NetworkHeader().Push(header.IPv4MinimumSize)).Encode(&header.IPv4Fields{
		TotalLength: uint16(header.IPv4MinimumSize + header.TCPMinimumSize + len(payload)),
		TTL:         64, Protocol: uint8(header.TCPProtocolNumber),
		SrcAddr: tcpip.AddrFrom4([4]byte{203, 0, 113, 10}), DstAddr: tcpip.AddrFrom4([4]byte{198, 18, 0, 1}),
	})
	pkts := []*stack.PacketBuffer{pb, pb, pb}
	s.writePackets(pkts) // warm the pool and the scratch slices
	if race.Enabled {
		t.Skip("allocation counts are meaningless under -race; make test checks them without it")
	}
	if n := testing.AllocsPerRun(100, func() { s.writePackets(pkts) }); n != 0 {
		t.Errorf("writing 3 packets allocates %v times", n)
	}
}
