package tcpfwd

import (
	"encoding/binary"
	"sync"

	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/stack/internal/tunio"
	"gvisor.dev/gvisor/pkg/buffer"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// linkEndpoint bridges the gVisor stack and the TUN device. Inbound packets
// are injected by the read loop (after the filter allowed them); outbound
// packets are handed to write, which sends them to the TUN.
//
// It has no link header and no link address: it carries bare IP packets.
type linkEndpoint struct {
	mtu   uint32
	write func(pkts []*stack.PacketBuffer) // must not keep the buffers
	gso   bool                             // the TUN segments large TCP packets

	mu         sync.RWMutex
	dispatcher stack.NetworkDispatcher
}

var (
	_ stack.LinkEndpoint = (*linkEndpoint)(nil)
	_ stack.GSOEndpoint  = (*linkEndpoint)(nil)
)

// gsoMaxSize bounds the packets the netstack builds with GSO: it keeps a
// payload of up to gsoMaxSize-61 bytes, and the largest IPv6 packet with
// 60 bytes of TCP header must still fit a 64 KiB TUN buffer.
const gsoMaxSize = tunio.MaxPacket - header.IPv6MinimumSize

// SupportedGSO implements stack.GSOEndpoint. With a TUN that segments
// (virtio-net headers), the netstack sends TCP segments of up to 64 KiB
// and leaves their checksums partial (writePackets completes them or the
// kernel does): on a path whose MSS is 1460 (gateway mode, containers),
// one segment and one pass through the netstack where 45 were.
func (e *linkEndpoint) SupportedGSO() stack.SupportedGSO {
	if e.gso {
		return stack.HostGSOSupported
	}
	return stack.GSONotSupported
}

// GSOMaxSize implements stack.GSOEndpoint.
func (e *linkEndpoint) GSOMaxSize() uint32 {
	if e.gso {
		return gsoMaxSize
	}
	return 0
}

// splitPayload is the least payload a segment's headers are copied apart
// from (see deliver).
const splitPayload = 512

// deliver hands a TCP packet that arrived from the TUN to the stack; its
// IP and TCP headers are its first hdrLen bytes. The bytes are copied, so
// pkt may be reused when deliver returns.
//
// The headers of a segment with a payload go in a buffer of their own:
// gVisor's IP layer keeps a view of the network header while it slices
// the header again, and a slice of a buffer whose memory is shared is
// made by copying all of that memory first (buffer.Buffer.PullUp), 64 KiB
// for a large segment. Apart, that copy is of the headers only.
func (e *linkEndpoint) deliver(pkt []byte, hdrLen int, v6 bool) {
	e.mu.RLock()
	d := e.dispatcher
	e.mu.RUnlock()
	if d == nil {
		return
	}
	var data buffer.Buffer
	if h := hdrLen; h > 0 && len(pkt)-h >= splitPayload {
		// Prepended, not appended: Append would fill the headers'
		// chunk with the payload's first bytes.
		data = buffer.MakeWithView(buffer.NewViewWithData(pkt[h:]))
		data.Prepend(buffer.NewViewWithData(pkt[:h]))
	} else {
		data = buffer.MakeWithData(pkt)
	}
	pb := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: data})
	proto := header.IPv4ProtocolNumber
	if v6 {
		proto = header.IPv6ProtocolNumber
	}
	d.DeliverNetworkPacket(proto, pb)
	pb.DecRef()
}

// WritePackets implements stack.LinkWriter.
func (e *linkEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	s := pkts.AsSlice()
	e.write(s)
	return len(s), nil
}

// MTU implements stack.NetworkLinkEndpoint.
func (e *linkEndpoint) MTU() uint32 { return e.mtu }

// SetMTU implements stack.NetworkLinkEndpoint. The TUN's MTU is fixed at
// start, so this is ignored.
func (e *linkEndpoint) SetMTU(uint32) {}

// MaxHeaderLength implements stack.NetworkLinkEndpoint.
func (e *linkEndpoint) MaxHeaderLength() uint16 { return 0 }

// LinkAddress implements stack.NetworkLinkEndpoint.
func (e *linkEndpoint) LinkAddress() tcpip.LinkAddress { return "" }

// SetLinkAddress implements stack.NetworkLinkEndpoint.
func (e *linkEndpoint) SetLinkAddress(tcpip.LinkAddress) {}

// Capabilities implements stack.NetworkLinkEndpoint. Received checksums
// are verified before deliver (Forwarder.Deliver), where the kernel does
// not vouch for them.
func (e *linkEndpoint) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityRXChecksumOffload
}

// Attach implements stack.NetworkLinkEndpoint.
func (e *linkEndpoint) Attach(d stack.NetworkDispatcher) {
	e.mu.Lock()
	e.dispatcher = d
	e.mu.Unlock()
}

// IsAttached implements stack.NetworkLinkEndpoint.
func (e *linkEndpoint) IsAttached() bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.dispatcher != nil
}

// Wait implements stack.NetworkLinkEndpoint; there are no workers.
func (e *linkEndpoint) Wait() {}

// ARPHardwareType implements stack.NetworkLinkEndpoint.
func (e *linkEndpoint) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareNone }

// AddHeader implements stack.NetworkLinkEndpoint; there is no link header.
func (e *linkEndpoint) AddHeader(*stack.PacketBuffer) {}

// ParseHeader implements stack.NetworkLinkEndpoint; there is no link header.
func (e *linkEndpoint) ParseHeader(*stack.PacketBuffer) bool { return true }

// Close implements stack.NetworkLinkEndpoint.
func (e *linkEndpoint) Close() {}

// SetOnCloseAction implements stack.NetworkLinkEndpoint.
func (e *linkEndpoint) SetOnCloseAction(func()) {}

// writePackets sends the stack's outbound packets to the TUN, letting the
// engine account them to their flows first. The buffers' pointers are kept
// beside the packets, so giving them back allocates nothing.
//
// With GSO on, the netstack leaves TCP checksums partial (the pseudo-
// header's sum only): a small packet of one segment gets its checksum
// here, summing the bytes just copied (the netstack would have summed
// them otherwise); a larger one goes to the kernel with its checksum
// partial, to be segmented too when it carries more than the MSS. The
// batch written so far goes first, so a flow's packets keep their order.
func (fw *Forwarder) writePackets(pkts []*stack.PacketBuffer) {
	fw.writeMu.Lock()
	defer fw.writeMu.Unlock()
	now := fw.h.Now()
	var p filter.Packet
	for _, pb := range pkts {
		bp := fw.h.TUN.Buffer()
		if fw.h.TSO != nil && fw.writeTSO(pb, (*bp)[:tunio.Headroom], &p, now) {
			fw.h.TUN.Release(bp)
			continue
		}
		b := appendPacket((*bp)[:tunio.Headroom], pb)
		// The copy is parsed again, though gVisor keeps the headers
		// apart: reaching them (PacketBuffer.NetworkHeader().Slice()
		// and TransportHeader's pull the views up) cost 80 ns a packet
		// more than parsing the 60 bytes just copied, which are in the
		// cache (BenchmarkWritePackets: 200 against 120 ns a segment).
		parsed := filter.ParsePacket(b[tunio.Headroom:], &p) == nil
		if parsed && fw.h.Engine.Outbound(&p, now) == filter.OutboundSilenced {
			// A flow denied after its name was read: the stack's RST
			// as it closes is not sent (deny is silence).
			fw.h.TUN.Release(bp)
			continue
		}
		if gso := pb.GSOOptions; parsed && gso.Type != stack.GSONone && gso.NeedsCsum {
			if kernelFinishes(gso, p.PayloadLen) {
				// In more slices than a vectored write takes.
				fw.flushWrites()
				fw.h.TSO.WriteTSO(b, nil, int(gso.MSS))
				fw.h.TUN.Release(bp)
				continue
			}
			l4 := b[tunio.Headroom+p.IPHeaderLen : tunio.Headroom+p.Len]
			binary.BigEndian.PutUint16(l4[16:18], ^checksum.Checksum(l4, 0))
		}
		fw.writeBufs = append(fw.writeBufs, b)
		fw.writeBps = append(fw.writeBps, bp)
	}
	fw.flushWrites()
}

// writeTSO writes pb for writePackets, if the kernel is to segment it or
// complete its checksum (kernelFinishes), without copying its payload: head (a TUN buffer's
// headroom) gets its headers, the payload is written from the stack's own
// buffers. It reports whether pb was dealt with (written, or silenced by
// the engine); p and now are writePackets'. writeMu is held.
func (fw *Forwarder) writeTSO(pb *stack.PacketBuffer, head []byte, p *filter.Packet, now int64) bool {
	gso := pb.GSOOptions
	hdrs := pb.HeaderSize()
	if gso.Type == stack.GSONone || !gso.NeedsCsum || !kernelFinishes(gso, pb.Size()-hdrs) {
		return false
	}
	head, slices, ok := splitPacket(head, pb, hdrs, fw.tsoSlices[:0])
	if !ok || filter.ParseHeaders(head[tunio.Headroom:], pb.Size(), p) != nil {
		clear(slices)
		return false // in too many slices, or not parsed: copied whole
	}
	if fw.h.Engine.Outbound(p, now) != filter.OutboundSilenced {
		fw.flushWrites()
		fw.h.TSO.WriteTSO(head, slices, int(gso.MSS))
	}
	clear(slices) // keeps no buffer of the stack's alive
	fw.tsoSlices = slices[:0]
	return true
}

// splitPacket appends pb's first n bytes (from its network header on) to
// head and its other bytes, as the slices of pb's own buffers they lie
// in, to slices; ok is false when they take more than
// tunio.MaxPayloadSlices.
func splitPacket(head []byte, pb *stack.PacketBuffer, n int, slices [][]byte) (_ []byte, _ [][]byte, ok bool) {
	vl, off := pb.AsViewList()
	for v := vl.Front(); v != nil; v = v.Next() {
		b := v.AsSlice()
		if off >= len(b) {
			off -= len(b)
			continue
		}
		b = b[off:]
		off = 0
		if n > 0 {
			k := min(n, len(b))
			head = append(head, b[:k]...)
			n -= k
			b = b[k:]
		}
		if len(b) == 0 {
			continue
		}
		if len(slices) == tunio.MaxPayloadSlices {
			return head, slices, false
		}
		slices = append(slices, b)
	}
	return head, slices, true
}

// flushWrites writes the packets writePackets gathered and gives their
// buffers back; writeMu is held.
func (fw *Forwarder) flushWrites() {
	if len(fw.writeBufs) == 0 {
		return
	}
	fw.h.TUN.Write(fw.writeBufs)
	for i, bp := range fw.writeBps {
		fw.h.TUN.Release(bp)
		fw.writeBps[i], fw.writeBufs[i] = nil, nil
	}
	fw.writeBufs, fw.writeBps = fw.writeBufs[:0], fw.writeBps[:0]
}

// appendPacket appends the bytes of pb, from its network header on, to dst.
// It walks the views in place (splitPacket): PacketBuffer.AsSlices would
// allocate per packet.
func appendPacket(dst []byte, pb *stack.PacketBuffer) []byte {
	dst, _, _ = splitPacket(dst, pb, pb.Size(), nil)
	return dst
}

// kernelFinishes reports whether a segment of payload bytes, built by the
// netstack with gso (a partial checksum), goes to the TUN for the kernel
// to cut into segments or to sum (tunio.Segmenter): more than its MSS, or
// at least partialCsumMin.
func kernelFinishes(gso stack.GSO, payload int) bool {
	return payload > int(gso.MSS) || payload >= partialCsumMin
}

// partialCsumMin is the payload from which a segment of one MSS also goes
// to the TUN with its checksum left partial (tunio.Segmenter): neither
// tunfw nor, for a local client, the kernel then sums it (server->client
// bulk TCP: 8% less CPU per GB, 3-5% faster). Smaller segments get their
// checksum here, so that the TUN writer can still merge those of a batch.
const partialCsumMin = 16 << 10
