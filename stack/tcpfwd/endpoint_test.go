package tcpfwd

import (
	"bytes"
	"fmt"
	"net/netip"
	"testing"

	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/stack/internal/gaddr"
	"github.com/tunfw/tunfw/stack/internal/race"
	"github.com/tunfw/tunfw/stack/internal/tunio"
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

// segment builds, as the netstack does (transport header first, network
// header in front), a TCP segment from dst to src with the given flags, a
// 12-byte option block and payload.
func segment(src, dst netip.AddrPort, flags header.TCPFlags, payload []byte) *stack.PacketBuffer {
	return segmentInViews(src, dst, flags, payload, len(payload))
}

// segmentInViews is segment with the payload in views of at most size
// bytes each (a power of two fills each view's chunk, so they stay apart).
func segmentInViews(src, dst netip.AddrPort, flags header.TCPFlags, payload []byte, size int) *stack.PacketBuffer {
	var data buffer.Buffer
	for rest := payload; len(rest) > 0; rest = rest[min(size, len(rest)):] {
		data.Append(buffer.NewViewWithData(rest[:min(size, len(rest))]))
	}
	pb := stack.NewPacketBuffer(stack.PacketBufferOptions{ReserveHeaderBytes: 80, Payload: data})
	tcpLen := header.TCPMinimumSize + 12
	th := header.TCP(pb.TransportHeader().Push(tcpLen))
	th.Encode(&header.TCPFields{
		SrcPort: dst.Port(), DstPort: src.Port(), SeqNum: 1000, AckNum: 2000,
		DataOffset: uint8(tcpLen), Flags: flags, WindowSize: 1000,
	})
	copy(th[header.TCPMinimumSize:], []byte{1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2}) // NOP NOP timestamps
	from, to := gaddr.To(dst.Addr()), gaddr.To(src.Addr())
	if dst.Addr().Is4() {
		pb.NetworkProtocolNumber = header.IPv4ProtocolNumber
		header.IPv4(pb.NetworkHeader().Push(header.IPv4MinimumSize)).Encode(&header.IPv4Fields{
			TotalLength: uint16(header.IPv4MinimumSize + tcpLen + len(payload)),
			TTL:         64, Protocol: uint8(header.TCPProtocolNumber), SrcAddr: from, DstAddr: to,
		})
	} else {
		pb.NetworkProtocolNumber = header.IPv6ProtocolNumber
		header.IPv6(pb.NetworkHeader().Push(header.IPv6MinimumSize)).Encode(&header.IPv6Fields{
			PayloadLength: uint16(tcpLen + len(payload)), TransportProtocol: header.TCPProtocolNumber,
			HopLimit: 64, SrcAddr: from, DstAddr: to,
		})
	}
	pb.TransportProtocolNumber = header.TCPProtocolNumber
	return pb
}

// TestWritePacketsAccounts: the segments the netstack writes are accounted
// to their flows (a reply each, its bytes), once.
func TestWritePacketsAccounts(t *testing.T) {
	s := stateOnly(testHost(t, nil))
	src, dst := netip.MustParseAddrPort("[fd54::1]:40000"), netip.MustParseAddrPort("[2001:db8::10]:443")
	syn := segment(dst, src, header.TCPFlagSyn, nil) // the client's SYN
	defer syn.DecRef()
	var p filter.Packet
	if err := filter.ParsePacket(appendPacket(nil, syn), &p); err != nil {
		t.Fatal(err)
	}
	if d := s.h.Engine.Inbound(&p, s.h.Now()); d.Verdict != filter.VerdictForward {
		t.Fatalf("engine verdict %v", d)
	}
	synAck := segment(src, dst, header.TCPFlagSyn|header.TCPFlagAck, nil)
	defer synAck.DecRef()
	data := segment(src, dst, header.TCPFlagAck, bytes.Repeat([]byte("x"), 1000))
	defer data.DecRef()
	before := s.h.Engine.Counters()
	s.writePackets([]*stack.PacketBuffer{synAck, data})
	after := s.h.Engine.Counters()
	wantBytes := uint64(synAck.Size() + data.Size())
	if r, by := after.Replies-before.Replies, after.BytesOut-before.BytesOut; r != 2 || by != wantBytes {
		t.Errorf("accounted %d replies of %d bytes, want 2 of %d", r, by, wantBytes)
	}
}

// BenchmarkWritePackets is the netstack's outbound path for a batch of
// full-size segments of flows in the engine's table: copy out, engine
// accounting, TUN write.
func BenchmarkWritePackets(b *testing.B) {
	s := stateOnly(testHost(b, nil))
	var pkts []*stack.PacketBuffer
	payload := bytes.Repeat([]byte("x"), 1400)
	for _, c := range [][2]string{{"198.18.0.1:40000", "203.0.113.10:443"}, {"[fd54::1]:40000", "[2001:db8::10]:443"}} {
		src, dst := netip.MustParseAddrPort(c[0]), netip.MustParseAddrPort(c[1])
		var syn filter.Packet
		synPB := segment(dst, src, header.TCPFlagSyn, nil) // the client's SYN: src to dst
		if err := filter.ParsePacket(appendPacket(nil, synPB), &syn); err != nil {
			b.Fatal(err)
		}
		synPB.DecRef()
		if d := s.h.Engine.Inbound(&syn, s.h.Now()); d.Verdict != filter.VerdictForward {
			b.Fatalf("engine verdict %v", d)
		}
		for range 16 {
			pb := segment(src, dst, header.TCPFlagAck, payload)
			defer pb.DecRef()
			pkts = append(pkts, pb)
		}
	}
	s.writePackets(pkts)
	b.ReportAllocs()
	for b.Loop() {
		s.writePackets(pkts)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(pkts)), "ns/pkt")
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

// TestWriteTSODoesNotAllocate: a segment the kernel is to cut goes out
// with its payload where it lies, allocating nothing.
func TestWriteTSODoesNotAllocate(t *testing.T) {
	h := testHost(t, nil)
	d := &countTSO{discardTUN: *newDiscardTUN()}
	h.TUN, h.TSO = d, d
	s := stateOnly(h)
	pb := segmentInViews(netip.MustParseAddrPort("198.18.0.1:40000"), netip.MustParseAddrPort("203.0.113.10:443"),
		header.TCPFlagAck, make([]byte, 60000), 16384)
	defer pb.DecRef()
	pb.GSOOptions = stack.GSO{Type: stack.GSOTCPv4, NeedsCsum: true, MSS: 1400, L3HdrLen: header.IPv4MinimumSize}
	pkts := []*stack.PacketBuffer{pb}
	s.writePackets(pkts)
	// 60,000 bytes in views of 16 KiB: four slices, not copied.
	if d.calls != 1 || d.slices != 4 {
		t.Fatalf("WriteTSO called %d times with %d payload slices, want once with 4", d.calls, d.slices)
	}
	if race.Enabled {
		t.Skip("allocation counts are meaningless under -race; make test checks them without it")
	}
	if n := testing.AllocsPerRun(100, func() { s.writePackets(pkts) }); n != 0 {
		t.Errorf("writing a segment to cut allocates %v times", n)
	}
}

// countTSO is a segmenter that counts its writes, allocating nothing.
type countTSO struct {
	discardTUN
	calls, slices int // slices: of the last write's payload
}

func (c *countTSO) WriteTSO(_ []byte, payload [][]byte, _ int) {
	c.calls, c.slices = c.calls+1, len(payload)
}

// recordTUN is a TUN writer (and segmenter) that keeps what it is given,
// in order: "w" for a packet of a Write, "tso" for WriteTSO.
type recordTUN struct {
	discardTUN
	kinds  []string
	pkts   [][]byte
	mss    []int
	slices []int // of the payload of each WriteTSO
}

func (r *recordTUN) Write(bufs [][]byte) {
	for _, b := range bufs {
		r.kinds, r.pkts, r.mss = append(r.kinds, "w"), append(r.pkts, bytes.Clone(b[tunio.Headroom:])), append(r.mss, 0)
	}
}

func (r *recordTUN) WriteTSO(head []byte, payload [][]byte, mss int) {
	pkt := bytes.Clone(head[tunio.Headroom:])
	for _, p := range payload {
		pkt = append(pkt, p...)
	}
	r.kinds, r.pkts, r.mss = append(r.kinds, "tso"), append(r.pkts, pkt), append(r.mss, mss)
	r.slices = append(r.slices, len(payload))
}

// With GSO on, the netstack's segments carry partial checksums: a small
// one that fits its MSS leaves with its checksum completed, a larger one
// goes to the kernel to segment (or, within the MSS but of at least
// partialCsumMin, to sum), and the order of a batch is kept around it.
func TestWritePacketsGSO(t *testing.T) {
	rec := &recordTUN{discardTUN: *newDiscardTUN()}
	h := testHost(t, nil)
	h.TUN, h.TSO = rec, rec
	s := stateOnly(h)
	for _, c := range [][2]string{{"198.18.0.1:40000", "203.0.113.10:443"}, {"[fd54::1]:40000", "[2001:db8::10]:443"}} {
		src, dst := netip.MustParseAddrPort(c[0]), netip.MustParseAddrPort(c[1])
		rec.kinds, rec.pkts, rec.mss = nil, nil, nil
		const mss = 1000
		var pkts []*stack.PacketBuffer
		// The last: a payload in more views than one write takes.
		for i, n := range []int{500, 3 * mss, mss, partialCsumMin, 40 * 64} {
			pb := segment(src, dst, header.TCPFlagAck, bytes.Repeat([]byte{byte(n)}, n))
			switch i {
			case 3: // in four views
				pb.DecRef()
				pb = segmentInViews(src, dst, header.TCPFlagAck, bytes.Repeat([]byte{byte(n)}, n), n/4)
			case 4:
				pb.DecRef()
				pb = segmentInViews(src, dst, header.TCPFlagAck, bytes.Repeat([]byte{byte(n)}, n), 64)
			}
			defer pb.DecRef()
			// As the netstack leaves it with GSO: the pseudo-header's sum
			// (over the TCP length) in the checksum field.
			b := appendPacket(nil, pb)
			l3 := header.IPv4MinimumSize
			segSize := uint16(mss)
			if n == partialCsumMin {
				segSize = 65000 // a large one within the MSS
			}
			pb.GSOOptions = stack.GSO{Type: stack.GSOTCPv4, NeedsCsum: true, MSS: segSize, L3HdrLen: uint16(l3)}
			if src.Addr().Is6() {
				l3 = header.IPv6MinimumSize
				pb.GSOOptions.Type, pb.GSOOptions.L3HdrLen = stack.GSOTCPv6, uint16(l3)
			}
			xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, gaddr.To(dst.Addr()), gaddr.To(src.Addr()), uint16(len(b)-l3))
			header.TCP(pb.TransportHeader().Slice()).SetChecksum(xsum)
			if ip := header.IPv4(pb.NetworkHeader().Slice()); !src.Addr().Is6() {
				ip.SetChecksum(^ip.CalculateChecksum()) // as the IPv4 layer does
			}
			pkts = append(pkts, pb)
		}
		want := pktsBytes(pkts)
		rec.slices = nil
		s.writePackets(pkts)
		if got := fmt.Sprint(rec.kinds, rec.mss); got != "[w tso w tso tso] [0 1000 0 65000 1000]" {
			t.Fatalf("%s: written as %s, want [w tso w tso tso] [0 1000 0 65000 1000]", c[0], got)
		}
		// Segmented ones go with their payload where the stack keeps it,
		// unless it lies in more slices than a write takes.
		if got := fmt.Sprint(rec.slices); got != "[1 4 0]" {
			t.Errorf("%s: payload slices of the segmented packets %s, want [1 4 0]", c[0], got)
		}
		for i := range want {
			// The checksum field is the one difference: completed for
			// the small ones.
			if g, w := rec.pkts[i], want[i]; len(g) != len(w) || !bytes.Equal(g[l3Len(src)+18:], w[l3Len(src)+18:]) || !bytes.Equal(g[:l3Len(src)+16], w[:l3Len(src)+16]) {
				t.Errorf("%s: packet %d written differs from the stack's", c[0], i)
			}
		}
		for i, pkt := range rec.pkts {
			l3 := header.IPv4MinimumSize
			if src.Addr().Is6() {
				l3 = header.IPv6MinimumSize
			}
			if valid := checksumsValid(pkt, l3, src.Addr().Is6()); valid != (rec.kinds[i] == "w") {
				t.Errorf("%s: packet %d (%s) has a complete checksum: %v", c[0], i, rec.kinds[i], valid)
			}
		}
	}
}

// pktsBytes returns the bytes of each of pkts.
func pktsBytes(pkts []*stack.PacketBuffer) [][]byte {
	var out [][]byte
	for _, pb := range pkts {
		out = append(out, appendPacket(nil, pb))
	}
	return out
}

// l3Len is the IP header length of packets from src in these tests.
func l3Len(src netip.AddrPort) int {
	if src.Addr().Is6() {
		return header.IPv6MinimumSize
	}
	return header.IPv4MinimumSize
}

// recordDispatcher keeps the views of the packets the link endpoint
// delivers.
type recordDispatcher struct{ views [][][]byte }

func (r *recordDispatcher) DeliverNetworkPacket(_ tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	var vs [][]byte
	for _, s := range pkt.AsSlices() {
		vs = append(vs, bytes.Clone(s))
	}
	r.views = append(r.views, vs)
}

func (r *recordDispatcher) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}

// TestDeliverHeadersApart checks that a segment with a payload reaches the
// stack with its IP and TCP headers in a buffer of their own (gVisor's IP
// layer would otherwise copy the whole packet's memory to slice its
// header), whole and unchanged; a small one, or one without payload, in
// one buffer.
func TestDeliverHeadersApart(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		src, dst := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
		if v6 {
			src, dst = netip.MustParseAddr("fd00::1"), netip.MustParseAddr("fd00::2")
		}
		large, l4 := gvisorSegment(src, dst, bytes.Repeat([]byte("0123456789abcdef"), 4000))
		small, _ := gvisorSegment(src, dst, make([]byte, splitPayload-1))
		hdrLen := l4 + header.TCPMinimumSize
		cases := []struct {
			name  string
			pkt   []byte
			views int
		}{
			{"large", large, 2},
			{"small", small, 1},
			{"headers only", large[:hdrLen], 1},
		}
		for _, c := range cases {
			var rec recordDispatcher
			e := &linkEndpoint{}
			e.Attach(&rec)
			e.deliver(c.pkt, hdrLen, v6)
			if len(rec.views) != 1 {
				t.Fatalf("v6 %v %s: %d packets delivered, want 1", v6, c.name, len(rec.views))
			}
			vs := rec.views[0]
			if len(vs) != c.views {
				t.Errorf("v6 %v %s: %d views, want %d", v6, c.name, len(vs), c.views)
			}
			if c.views == 2 && len(vs[0]) != l4+header.TCPMinimumSize {
				t.Errorf("v6 %v %s: first view %d bytes, want the %d of the headers", v6, c.name, len(vs[0]), l4+header.TCPMinimumSize)
			}
			if got := bytes.Join(vs, nil); !bytes.Equal(got, c.pkt) {
				t.Errorf("v6 %v %s: delivered bytes differ from the packet", v6, c.name)
			}
		}
	}
}

// discardDispatcher drops what it is delivered.
type discardDispatcher struct{}

func (discardDispatcher) DeliverNetworkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}
func (discardDispatcher) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer)    {}

// TestDeliverDoesNotAllocate: a large segment's two buffers come from
// gVisor's pools.
func TestDeliverDoesNotAllocate(t *testing.T) {
	if race.Enabled {
		t.Skip("the race detector makes sync.Pool drop items at random")
	}
	pkt, l4 := gvisorSegment(netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2"), make([]byte, 60000))
	e := &linkEndpoint{}
	e.Attach(discardDispatcher{})
	if a := testing.AllocsPerRun(100, func() { e.deliver(pkt, l4+header.TCPMinimumSize, false) }); a != 0 {
		t.Errorf("deliver allocates %v times a segment", a)
	}
}
