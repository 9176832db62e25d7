package tun

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"testing"

	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"
)

const testOffset = 16

// virtioRead lays out what one TUN read writes at bufs[0][offset-10:]: a
// virtio-net header, then pkt. It returns that slice.
func virtioRead(bufs [][]byte, flags, gso uint8, gsoSize, csumStart uint16, pkt []byte) []byte {
	in := bufs[0][testOffset-VirtioHeaderLen:]
	clear(in[:VirtioHeaderLen])
	in[0], in[1] = flags, gso
	binary.NativeEndian.PutUint16(in[4:6], gsoSize)
	binary.NativeEndian.PutUint16(in[6:8], csumStart)
	return in[:VirtioHeaderLen+copy(in[VirtioHeaderLen:], pkt)]
}

// testBufs returns n buffers as the packet loop has them (only the first,
// which takes a whole read, has memory), their sizes and a split arena.
func testBufs(n int) ([][]byte, []int, []byte) {
	bufs := make([][]byte, n)
	bufs[0] = make([]byte, testOffset+MaxReadSize)
	return bufs, make([]int, n), make([]byte, splitArenaSize(testOffset, n))
}

// ipv4 builds an IPv4 packet of proto around l4 (no checksums needed).
func ipv4(proto byte, id uint16, l4 []byte) []byte {
	p := make([]byte, 20+len(l4))
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:4], uint16(len(p)))
	binary.BigEndian.PutUint16(p[4:6], id)
	p[8], p[9] = 64, proto
	copy(p[12:16], []byte{10, 0, 0, 1})
	copy(p[16:20], []byte{203, 0, 113, 10})
	binary.BigEndian.PutUint16(p[10:12], ^ipv4HeaderSum(p[:20]))
	copy(p[20:], l4)
	return p
}

func ipv6(proto byte, l4 []byte) []byte {
	p := make([]byte, 40+len(l4))
	p[0] = 0x60
	binary.BigEndian.PutUint16(p[4:6], uint16(len(l4)))
	p[6], p[7] = proto, 64
	p[8], p[39] = 0xfd, 1
	copy(p[40:], l4)
	return p
}

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i * 7)
	}
	return b
}

// A TCP GSO packet (what a local sender or GRO hands the TUN) is handed
// over whole, in place, as one large segment, with the kernel vouching
// for its checksum; so is a plain packet with a partial checksum.
func TestSplitVirtioKeepsTCPWhole(t *testing.T) {
	tcp := append(make([]byte, 20), pattern(45*1448)...)
	tcp[12] = 5 << 4
	for _, c := range []struct {
		name  string
		gso   uint8
		pkt   []byte
		flags uint8
	}{
		{"v4 gso", gsoTCPv4, ipv4(6, 1, tcp), vnetNeedsCsum},
		{"v6 gso", gsoTCPv6, ipv6(6, tcp), vnetNeedsCsum},
		{"v4 gso ecn", gsoTCPv4 | gsoECNBit, ipv4(6, 1, tcp), vnetNeedsCsum},
		{"v4 plain partial", gsoNone, ipv4(6, 1, tcp[:1000]), vnetNeedsCsum},
	} {
		t.Run(c.name, func(t *testing.T) {
			bufs, sizes, arena := testBufs(4)
			in := virtioRead(bufs, c.flags, c.gso, 1448, uint16(len(c.pkt)-len(tcp)), c.pkt)
			n, checked, err := splitVirtio(in, bufs, sizes, testOffset, arena)
			if err != nil || n != 1 || !checked {
				t.Fatalf("splitVirtio = %d, %v, %v; want 1 packet, checked", n, checked, err)
			}
			if got := bufs[0][testOffset : testOffset+sizes[0]]; !bytes.Equal(got, c.pkt) {
				t.Fatalf("packet of %d bytes handed over as %d bytes, or changed", len(c.pkt), len(got))
			}
		})
	}
}

// Only a partial checksum (the kernel built the packet) or one the kernel
// verified counts as checked; a packet as it arrived from elsewhere does not.
func TestSplitVirtioChecked(t *testing.T) {
	pkt := ipv4(6, 1, make([]byte, 20))
	for _, c := range []struct {
		flags uint8
		want  bool
	}{{0, false}, {vnetNeedsCsum, true}, {vnetDataValid, true}} {
		bufs, sizes, arena := testBufs(1)
		n, checked, err := splitVirtio(virtioRead(bufs, c.flags, gsoNone, 0, 0, pkt), bufs, sizes, testOffset, arena)
		if err != nil || n != 1 || checked != c.want {
			t.Errorf("flags %#x: splitVirtio = %d, %v, %v; want 1, checked %v", c.flags, n, checked, err, c.want)
		}
	}
}

// A UDP GSO packet is cut into its datagrams, each with its own IP and UDP
// lengths (and, for IPv4, identifier and a valid header checksum).
func TestSplitVirtioCutsUDP(t *testing.T) {
	const seg = 1400
	payload := pattern(3*seg + 100)
	udp := append(make([]byte, 8), payload...)
	binary.BigEndian.PutUint16(udp[0:2], 5000)
	binary.BigEndian.PutUint16(udp[2:4], 53)
	for _, v6 := range []bool{false, true} {
		pkt, ipLen := ipv4(17, 0xfffe, udp), 20
		if v6 {
			pkt, ipLen = ipv6(17, udp), 40
		}
		bufs, sizes, arena := testBufs(8)
		in := virtioRead(bufs, vnetNeedsCsum, gsoUDPL4, seg, uint16(ipLen), pkt)
		n, checked, err := splitVirtio(in, bufs, sizes, testOffset, arena)
		if err != nil || n != 4 || !checked {
			t.Fatalf("v6 %v: splitVirtio = %d, %v, %v; want 4 datagrams, checked", v6, n, checked, err)
		}
		for i := range n {
			d := bufs[i][testOffset : testOffset+sizes[i]]
			want := payload[i*seg : min((i+1)*seg, len(payload))]
			if !bytes.Equal(d[ipLen+8:], want) {
				t.Fatalf("v6 %v: datagram %d carries the wrong bytes", v6, i)
			}
			if got := binary.BigEndian.Uint16(d[ipLen+4:]); int(got) != 8+len(want) {
				t.Errorf("v6 %v: datagram %d UDP length %d, want %d", v6, i, got, 8+len(want))
			}
			if binary.BigEndian.Uint16(d[ipLen:]) != 5000 || binary.BigEndian.Uint16(d[ipLen+2:]) != 53 {
				t.Errorf("v6 %v: datagram %d lost its ports", v6, i)
			}
			if v6 {
				if got := binary.BigEndian.Uint16(d[4:6]); int(got) != len(d)-40 {
					t.Errorf("datagram %d IPv6 payload length %d, want %d", i, got, len(d)-40)
				}
				continue
			}
			if got := binary.BigEndian.Uint16(d[2:4]); int(got) != len(d) {
				t.Errorf("datagram %d IPv4 total length %d, want %d", i, got, len(d))
			}
			if got := binary.BigEndian.Uint16(d[4:6]); got != 0xfffe+uint16(i) {
				t.Errorf("datagram %d IPv4 id %#x, want %#x", i, got, 0xfffe+uint16(i))
			}
			if ipv4HeaderSum(d[:20]) != 0xffff {
				t.Errorf("datagram %d IPv4 header checksum is wrong", i)
			}
		}
	}
}

func TestSplitVirtioRefuses(t *testing.T) {
	udp := append(make([]byte, 8), pattern(10*100)...)
	for _, c := range []struct {
		name      string
		gso       uint8
		gsoSize   uint16
		csumStart uint16
		pkt       []byte
		bufs      int
		wantErr   error
	}{
		{"too many datagrams", gsoUDPL4, 100, 20, ipv4(17, 1, udp), 4, wgtun.ErrTooManySegments},
		{"zero segment size", gsoUDPL4, 0, 20, ipv4(17, 1, udp), 16, nil},
		{"header length past the packet", gsoUDPL4, 100, 60, ipv4(17, 1, udp[:30]), 16, nil},
		{"IPv4 header length below 20", gsoUDPL4, 100, 8, ipv4(17, 1, udp), 16, nil},
		{"unknown GSO type", 3, 100, 20, ipv4(17, 1, udp), 16, nil},
		{"empty", gsoUDPL4, 100, 20, nil, 16, nil},
		{"IP length not the read's", gsoUDPL4, 100, 20, append(ipv4(17, 1, udp), 0, 0), 16, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			bufs, sizes, arena := testBufs(c.bufs)
			n, _, err := splitVirtio(virtioRead(bufs, vnetNeedsCsum, c.gso, c.gsoSize, c.csumStart, c.pkt), bufs, sizes, testOffset, arena)
			if err == nil || n != 0 {
				t.Fatalf("splitVirtio = %d, %v; want an error", n, err)
			}
			if c.wantErr != nil && !errors.Is(err, c.wantErr) {
				t.Fatalf("error %v, want %v", err, c.wantErr)
			}
		})
	}
	if _, _, err := splitVirtio(make([]byte, 5), nil, nil, testOffset, nil); err == nil {
		t.Fatal("a read shorter than the virtio header was taken")
	}
}

// Splitting allocates nothing: it runs for every packet read.
func TestSplitVirtioDoesNotAllocate(t *testing.T) {
	udp := append(make([]byte, 8), pattern(4*1000)...)
	pkt := ipv4(17, 1, udp)
	bufs, sizes, arena := testBufs(8)
	allocs := testing.AllocsPerRun(100, func() {
		in := virtioRead(bufs, vnetNeedsCsum, gsoUDPL4, 1000, 20, pkt)
		if n, _, err := splitVirtio(in, bufs, sizes, testOffset, arena); err != nil || n != 4 {
			t.Fatalf("splitVirtio = %d, %v", n, err)
		}
	})
	if allocs != 0 {
		t.Fatalf("splitVirtio allocates %v times a read", allocs)
	}
}

// What the kernel hands over is parsed without trusting any length: no
// input panics or writes past the buffers.
func FuzzSplitVirtio(f *testing.F) {
	udp := append(make([]byte, 8), pattern(3*100)...)
	f.Add(uint8(vnetNeedsCsum), uint8(gsoUDPL4), uint16(100), uint16(20), ipv4(17, 1, udp))
	f.Add(uint8(vnetNeedsCsum), uint8(gsoUDPL4), uint16(100), uint16(40), ipv6(17, udp))
	f.Add(uint8(vnetNeedsCsum), uint8(gsoTCPv4), uint16(1448), uint16(20), ipv4(6, 1, make([]byte, 3000)))
	f.Add(uint8(0), uint8(gsoNone), uint16(0), uint16(0), ipv4(1, 1, make([]byte, 8)))
	f.Fuzz(func(t *testing.T, flags, gso uint8, gsoSize, csumStart uint16, pkt []byte) {
		if len(pkt) > 4000 {
			return
		}
		bufs, sizes, arena := testBufs(8)
		n, _, err := splitVirtio(virtioRead(bufs, flags, gso, gsoSize, csumStart, pkt), bufs, sizes, testOffset, arena)
		if err != nil {
			return
		}
		for i := range n {
			if sizes[i] > len(bufs[i])-testOffset {
				t.Fatalf("packet %d of %d bytes overflows its buffer", i, sizes[i])
			}
		}
	})
}

// The header WriteTSO puts before a TCP packet: checksum partial from the
// TCP header on; GSO of mss bytes only when the payload is longer.
func TestTSOHeader(t *testing.T) {
	tcp := make([]byte, 32+3000) // a 32-byte TCP header (timestamps)
	tcp[12] = 8 << 4
	for _, c := range []struct {
		name        string
		pkt         []byte
		mss         int
		gso         uint8
		gsoSize, l3 uint16
		wantErr     bool
	}{
		{"v4 segmented", ipv4(6, 1, tcp), 1448, gsoTCPv4, 1448, 20, false},
		{"v6 segmented", ipv6(6, tcp), 1428, gsoTCPv6, 1428, 40, false},
		{"v4 one segment", ipv4(6, 1, tcp), 3000, gsoNone, 0, 20, false},
		{"no segment size", ipv4(6, 1, tcp), 0, 0, 0, 0, true},
		{"not IP", make([]byte, 100), 1000, 0, 0, 0, true},
		{"TCP header past the packet", ipv4(6, 1, tcp[:20]), 1000, 0, 0, 0, true},
	} {
		h := make([]byte, VirtioHeaderLen)
		if c.name == "TCP header past the packet" {
			c.pkt[20+12] = 15 << 4
		}
		err := tsoHeader(h, c.pkt, len(c.pkt), c.mss)
		if (err != nil) != c.wantErr {
			t.Errorf("%s: err %v, want error %v", c.name, err, c.wantErr)
			continue
		}
		if err != nil {
			continue
		}
		if h[0] != vnetNeedsCsum || h[1] != c.gso || binary.NativeEndian.Uint16(h[4:6]) != c.gsoSize ||
			binary.NativeEndian.Uint16(h[6:8]) != c.l3 || binary.NativeEndian.Uint16(h[8:10]) != 16 ||
			binary.NativeEndian.Uint16(h[2:4]) != c.l3+32 {
			t.Errorf("%s: header % x", c.name, h)
		}
	}
}

// The split arena holds the largest UDP GSO packet cut into as many
// datagrams as the batch takes, and into a few large ones.
func TestSplitVirtioLargest(t *testing.T) {
	const batch = 128
	payload := pattern(MaxReadSize - 1 - 28)
	pkt := ipv4(17, 1, append(make([]byte, 8), payload...))
	for _, seg := range []int{(len(payload) + batch - 1) / batch, 20000} {
		bufs, sizes, arena := testBufs(batch)
		n, _, err := splitVirtio(virtioRead(bufs, vnetNeedsCsum, gsoUDPL4, uint16(seg), 20, pkt), bufs, sizes, testOffset, arena)
		if want := (len(payload) + seg - 1) / seg; err != nil || n != want {
			t.Fatalf("segment size %d: splitVirtio = %d, %v; want %d datagrams", seg, n, err, want)
		}
		var got []byte
		for i := range n {
			got = append(got, bufs[i][testOffset+28:testOffset+sizes[i]]...)
		}
		if !bytes.Equal(got, payload) {
			t.Fatalf("segment size %d: the datagrams do not carry the packet's payload", seg)
		}
	}
}

// WriteTSO writes the virtio-net header, the packet's first bytes and its
// payload slices as one write, allocating nothing; a packet in more
// slices than it takes is refused. A pipe stands in for the TUN.
func TestWriteTSOVectored(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	d := &Device{vnetHdr: true}
	if err := d.tso.init(w); err != nil {
		t.Fatal(err)
	}
	tcp := make([]byte, 20)
	tcp[12] = 5 << 4
	payload := pattern(3000)
	pkt := ipv4(6, 1, append(tcp, payload...))
	const off = 16
	head := append(make([]byte, off), pkt[:40]...)
	slices := [][]byte{pkt[40:1000], pkt[1000:2500], pkt[2500:]}
	if err := d.WriteTSO(head, off, slices, 1448); err != nil {
		t.Fatalf("WriteTSO: %v", err)
	}
	got := make([]byte, 2*len(pkt))
	n, err := r.Read(got)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, VirtioHeaderLen)
	if err := tsoHeader(want, pkt, len(pkt), 1448); err != nil {
		t.Fatal(err)
	}
	want = append(want, pkt...)
	if !bytes.Equal(got[:n], want) {
		t.Fatalf("wrote %d bytes, want the header and the packet's %d", n, len(want))
	}
	for i, v := range d.tso.iov {
		if v.Base != nil {
			t.Fatalf("iovec %d still points at a buffer after the write", i)
		}
	}
	if err := d.WriteTSO(head, off, make([][]byte, MaxTSOSlices+1), 1448); err == nil {
		t.Errorf("WriteTSO of %d slices: no error", MaxTSOSlices+2)
	}
	// Read what the writes put in the pipe as they go.
	done := make(chan struct{})
	go func() {
		defer close(done)
		io.Copy(io.Discard, r)
	}()
	if a := testing.AllocsPerRun(100, func() { d.WriteTSO(head, off, slices, 1448) }); a != 0 {
		t.Errorf("WriteTSO allocates %v times a packet", a)
	}
	w.Close()
	<-done
}

// A single packet is written with a virtio-net header that asks for
// nothing and read back through the raw reader, both allocation-free; a
// closed device reads as os.ErrClosed. A pipe stands in for the TUN.
func TestSinglePacketRawPath(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	d := &Device{vnetHdr: true}
	if err := d.tso.init(w); err != nil {
		t.Fatal(err)
	}
	if err := d.rd.init(r); err != nil {
		t.Fatal(err)
	}
	pkt := ipv4(17, 1, pattern(100))
	const off = 16
	buf := append(bytes.Repeat([]byte{0xff}, off), pkt...)
	if n, err := d.Write([][]byte{buf}, off); n != 1 || err != nil {
		t.Fatalf("Write: %d, %v", n, err)
	}
	got := make([]byte, 2*len(pkt))
	n, err := d.rd.read(got)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	want := append(make([]byte, VirtioHeaderLen), pkt...)
	if !bytes.Equal(got[:n], want) {
		t.Fatalf("read %d bytes %x, want a zero header and the packet", n, got[:n])
	}
	bufs := [][]byte{buf}
	if a := testing.AllocsPerRun(100, func() {
		d.Write(bufs, off)
		d.rd.read(got)
	}); a != 0 {
		t.Errorf("write and read allocate %v times a packet", a)
	}
	r.Close()
	if _, err := d.rd.read(got); !errors.Is(err, os.ErrClosed) {
		t.Errorf("read from a closed device: %v, want os.ErrClosed", err)
	}
}

// tcpSeg returns a TCP header with flags and a data offset of 5 words,
// followed by payload.
func tcpSeg(flags byte, payload []byte) []byte {
	h := make([]byte, 20+len(payload))
	h[12], h[13] = 5<<4, flags
	copy(h[20:], payload)
	return h
}

// TestMayCoalesce: a batch goes to the device's GRO only when two of its
// packets could merge.
func TestMayCoalesce(t *testing.T) {
	const ack, psh, fin, syn = 0x10, 0x08, 0x01, 0x02
	data := ipv4(6, 1, tcpSeg(ack|psh, pattern(64)))
	data6 := ipv6(6, tcpSeg(ack, pattern(64)))
	finSeg := ipv4(6, 2, tcpSeg(ack|fin, nil))
	pureACK := ipv4(6, 3, tcpSeg(ack, nil))
	synACK := ipv4(6, 4, tcpSeg(syn|ack, nil))
	udp := ipv4(17, 5, pattern(30))
	icmp := ipv4(1, 6, pattern(30))
	for _, c := range []struct {
		name string
		pkts [][]byte
		want bool
	}{
		{"answer and FIN", [][]byte{data, finSeg}, false},
		{"SYN-ACK and ACK", [][]byte{synACK, pureACK}, false},
		{"pure ACKs", [][]byte{pureACK, pureACK, pureACK}, false},
		{"data with ICMP", [][]byte{data, icmp, finSeg}, false},
		{"two data segments", [][]byte{data, finSeg, data}, true},
		{"IPv6 data segments", [][]byte{data6, data6}, true},
		{"UDP datagrams", [][]byte{udp, udp}, true},
		{"a packet too short to tell", [][]byte{data, data[:10]}, true},
	} {
		const off = 16
		bufs := make([][]byte, len(c.pkts))
		for i, p := range c.pkts {
			bufs[i] = append(make([]byte, off), p...)
		}
		if got := mayCoalesce(bufs, off); got != c.want {
			t.Errorf("%s: mayCoalesce %v, want %v", c.name, got, c.want)
		}
	}
	// A buffer shorter than the offset: the device's Write says so.
	if !mayCoalesce([][]byte{make([]byte, 4)}, 16) {
		t.Error("a buffer shorter than the offset goes the raw way")
	}
}

// TestBatchRawPath: a batch whose packets cannot merge is written a packet
// at a time with raw system calls (the device's own Write, nil here, is not
// called), each with a header that asks for nothing.
func TestBatchRawPath(t *testing.T) {
	// A TUN keeps packets apart; so does a datagram socket pair, a pipe
	// does not.
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	r, w := os.NewFile(uintptr(fds[0]), "r"), os.NewFile(uintptr(fds[1]), "w")
	defer r.Close()
	defer w.Close()
	d := &Device{vnetHdr: true}
	if err := d.tso.init(w); err != nil {
		t.Fatal(err)
	}
	if err := d.rd.init(r); err != nil {
		t.Fatal(err)
	}
	const off = 16
	pkts := [][]byte{ipv4(6, 1, tcpSeg(0x18, pattern(64))), ipv4(6, 2, tcpSeg(0x11, nil))}
	bufs := make([][]byte, len(pkts))
	for i, p := range pkts {
		bufs[i] = append(bytes.Repeat([]byte{0xff}, off), p...)
	}
	if n, err := d.Write(bufs, off); n != 2 || err != nil {
		t.Fatalf("Write: %d, %v", n, err)
	}
	got := make([]byte, 256)
	for i, p := range pkts {
		n, err := d.rd.read(got)
		if err != nil {
			t.Fatalf("read %d: %v", i, err)
		}
		if want := append(make([]byte, VirtioHeaderLen), p...); !bytes.Equal(got[:n], want) {
			t.Fatalf("packet %d: read %x, want a zero header and %x", i, got[:n], p)
		}
	}
	if a := testing.AllocsPerRun(100, func() {
		d.Write(bufs, off)
		d.rd.read(got)
		d.rd.read(got)
	}); a != 0 {
		t.Errorf("a batch's write and reads allocate %v times", a)
	}
}
