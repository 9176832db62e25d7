package stack

import (
	"bytes"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
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
	if n := testing.AllocsPerRun(100, func() { appendPacket(dst[:0], pb) }); n != 0 {
		t.Errorf("appendPacket allocates %v times per packet", n)
	}
}
