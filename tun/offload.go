package tun

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"syscall"

	"github.com/tunfw/tunfw/internal/nbio"
	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"
)

// VirtioHeaderLen is the length of the virtio-net header in front of every
// packet read from or written to a TUN opened with IFF_VNET_HDR (as
// wireguard-go opens it): ReadPackets reads it into the offset bytes
// before each packet, so offset must be at least this.
const VirtioHeaderLen = 10

// MaxReadSize is the largest packet one TUN read can hand over: a GSO
// packet the kernel built or merged is up to 64 KiB whatever the MTU, so
// the first buffer given to ReadPackets needs offset + MaxReadSize bytes.
const MaxReadSize = 1 << 16

// The virtio-net header's fields (include/uapi/linux/virtio_net.h).
const (
	vnetNeedsCsum = 1 // checksum partial: only the pseudo-header is summed
	vnetDataValid = 2 // the kernel verified the checksum

	gsoNone   = 0
	gsoTCPv4  = 1
	gsoUDPL4  = 5
	gsoTCPv6  = 4
	gsoECNBit = 0x80
)

// ReadPackets reads what one read of the TUN hands over into bufs, each
// packet offset bytes into its buffer, and returns how many packets it
// wrote (their lengths in sizes). bufs[0] needs offset + MaxReadSize
// bytes. With offloads (the TUN carries virtio-net headers) the datagrams
// cut from a UDP GSO packet after the first go to a buffer of the
// device's own: bufs[1:n] are set to windows of it, valid until the next
// call, and need no memory of their own; without, ReadPackets reads one
// packet at a time (BatchSize is 1) into bufs[0].
//
// Unlike wireguard-go's Read, it does not cut a TCP GSO packet into
// segments: a train of up to 64 KiB of one connection, which the kernel
// built (a local sender) or merged (GRO on the interface it was forwarded
// from), stays one large TCP segment. The gVisor stack takes it as one
// segment and acknowledges it once, where 45 segments of a 1500-byte link
// cost it 45 passes (and as many ACKs). UDP GSO packets are cut into their
// datagrams, which the UDP forwarder sends one by one.
//
// checked reports that the kernel vouches for the TCP and UDP checksums of
// the packets: it built them itself (their checksum field then holds only
// the pseudo-header's sum and is not computed here, a pass over every byte
// saved) or verified them. Other packets, from a sender outside this
// kernel, have checksums as they arrived, which whoever delivers them to a
// transport must verify.
func (d *Device) ReadPackets(bufs [][]byte, sizes []int, offset int) (n int, checked bool, err error) {
	if !d.vnetHdr {
		n, err = d.Device.Read(bufs, sizes, offset)
		return n, false, err
	}
	if offset < VirtioHeaderLen {
		return 0, false, fmt.Errorf("read from TUN: offset %d leaves no room for the virtio-net header", offset)
	}
	in := bufs[0][offset-VirtioHeaderLen:]
	m, err := d.rd.read(in)
	if err != nil {
		return 0, false, err
	}
	if need := splitArenaSize(offset, len(bufs)); len(d.split) < need {
		d.split = make([]byte, need)
	}
	return splitVirtio(in[:m], bufs, sizes, offset, d.split)
}

// splitArenaSize is the room the datagrams of a UDP GSO packet other than
// the first need, at offset bytes each, cut into up to batch datagrams:
// the packet's payload, and a copy of its headers (60 + 8 bytes at most)
// for each datagram.
func splitArenaSize(offset, batch int) int {
	return MaxReadSize + batch*(offset+60+8)
}

// splitVirtio hands over the packet in in (a virtio-net header, then the
// packet, which starts offset bytes into bufs[0]) as ReadPackets does,
// the datagrams of a UDP GSO packet after the first in arena. The virtio
// header comes from the kernel, the packet possibly from a hostile
// sender: every length is checked against the packet.
func splitVirtio(in []byte, bufs [][]byte, sizes []int, offset int, arena []byte) (int, bool, error) {
	if len(in) < VirtioHeaderLen {
		return 0, false, errShortRead
	}
	flags, gso := in[0], in[1]&^gsoECNBit
	gsoSize := int(binary.NativeEndian.Uint16(in[4:6]))
	csumStart := int(binary.NativeEndian.Uint16(in[6:8]))
	pkt := in[VirtioHeaderLen:]
	checked := flags&(vnetNeedsCsum|vnetDataValid) != 0
	switch gso {
	case gsoNone, gsoTCPv4, gsoTCPv6:
		// In place: the packet already starts offset bytes into bufs[0].
		sizes[0] = len(pkt)
		return 1, checked, nil
	case gsoUDPL4:
		n, err := splitUDP(pkt, csumStart, gsoSize, bufs, sizes, offset, arena)
		return n, checked, err
	}
	return 0, false, fmt.Errorf("read from TUN: unsupported GSO type %d", gso)
}

var errShortRead = errors.New("read from TUN: shorter than its virtio-net header")

// splitUDP cuts a UDP GSO packet (one IP and UDP header, then datagrams of
// gsoSize bytes, the last possibly shorter) into its datagrams, the first
// in place, the others one after the other in arena (bufs[i] set to each
// one's window). Each gets its own lengths and, for IPv4, identifier and
// header checksum; the UDP checksum is left as the kernel left it
// (partial): the UDP forwarder sends the payload to a socket and reads no
// checksum.
func splitUDP(pkt []byte, ipLen, gsoSize int, bufs [][]byte, sizes []int, offset int, arena []byte) (int, error) {
	if len(pkt) < 1 {
		return 0, errShortRead
	}
	v6 := pkt[0]>>4 == 6
	switch {
	case !v6 && (pkt[0]>>4 != 4 || ipLen < 20 || ipLen > 60):
		return 0, fmt.Errorf("read from TUN: UDP GSO packet with IP header length %d", ipLen)
	case v6 && ipLen < 40:
		return 0, fmt.Errorf("read from TUN: UDP GSO packet with IP header length %d", ipLen)
	case gsoSize == 0 || len(pkt) < ipLen+8:
		return 0, fmt.Errorf("read from TUN: UDP GSO packet of %d bytes, segment size %d", len(pkt), gsoSize)
	case !v6 && int(binary.BigEndian.Uint16(pkt[2:4])) != len(pkt),
		v6 && int(binary.BigEndian.Uint16(pkt[4:6]))+40 != len(pkt):
		return 0, fmt.Errorf("read from TUN: UDP GSO packet of %d bytes says another length", len(pkt))
	}
	hdrLen := ipLen + 8
	payload := len(pkt) - hdrLen
	n := (payload + gsoSize - 1) / gsoSize
	if n == 0 {
		n = 1
	}
	if n > len(bufs) {
		return 0, wgtun.ErrTooManySegments
	}
	var id uint16
	if !v6 {
		id = binary.BigEndian.Uint16(pkt[4:6])
	}
	// The others first: the first's header is rewritten last.
	for i := n - 1; i >= 0; i-- {
		start := hdrLen + i*gsoSize
		end := min(start+gsoSize, len(pkt))
		seg := end - start
		var out []byte
		if i == 0 {
			out = pkt[:hdrLen+seg]
		} else {
			// Datagram i starts after i-1 full ones.
			at, w := (i-1)*(offset+hdrLen+gsoSize), offset+hdrLen+seg
			if at+w > len(arena) {
				return 0, fmt.Errorf("read from TUN: UDP GSO datagram of %d bytes overflows its buffer", hdrLen+seg)
			}
			bufs[i] = arena[at : at+w : at+w]
			out = bufs[i][offset:]
			copy(out, pkt[:hdrLen])
			copy(out[hdrLen:], pkt[start:end])
		}
		if v6 {
			binary.BigEndian.PutUint16(out[4:6], uint16(len(out)-40))
		} else {
			binary.BigEndian.PutUint16(out[2:4], uint16(len(out)))
			binary.BigEndian.PutUint16(out[4:6], id+uint16(i))
			out[10], out[11] = 0, 0
			binary.BigEndian.PutUint16(out[10:12], ^ipv4HeaderSum(out[:ipLen]))
		}
		binary.BigEndian.PutUint16(out[ipLen+4:ipLen+6], uint16(8+seg))
		sizes[i] = len(out)
	}
	return n, nil
}

// ipv4HeaderSum is the ones' complement sum of an IPv4 header.
func ipv4HeaderSum(h []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(h); i += 2 {
		s += uint32(h[i])<<8 | uint32(h[i+1])
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return uint16(s)
}

// vnetHeaderOn reports whether the TUN behind f was opened with
// IFF_VNET_HDR, which wireguard-go asks for where the kernel has it.
func vnetHeaderOn(f *os.File, name string) bool {
	rc, err := f.SyscallConn()
	if err != nil {
		return false
	}
	on := false
	rc.Control(func(fd uintptr) {
		ifr, err := unix.NewIfreq(name)
		if err != nil {
			return
		}
		if unix.IoctlIfreq(int(fd), unix.TUNGETIFF, ifr) == nil {
			on = ifr.Uint16()&unix.IFF_VNET_HDR != 0
		}
	})
	return on
}

// WriteTSO writes a TCP packet whose checksum the kernel completes (its
// checksum field holds the sum of the pseudo-header only), and which the
// kernel cuts into segments of mss bytes of payload when it carries more
// (TSO, as a NIC would): the netstack builds one 64 KiB segment where a
// 1500-byte path would need 45, and neither tunfw nor, for a local client,
// the kernel sums its bytes. The packet is buf[offset:] (its headers at
// least) followed by the slices of payload, written as they lie in one
// writev: the netstack's buffers need not be copied. buf must leave
// VirtioHeaderLen bytes before offset, and payload hold at most
// MaxTSOSlices slices. It fails when the device carries no virtio-net
// headers (TSO reports which). Calls must not overlap.
func (d *Device) WriteTSO(buf []byte, offset int, payload [][]byte, mss int) error {
	if !d.vnetHdr || offset < VirtioHeaderLen {
		return errors.New("write to TUN: the device takes no segmentation offload")
	}
	if len(payload) > MaxTSOSlices {
		return fmt.Errorf("write to TUN: a packet in %d slices, more than %d", len(payload)+1, MaxTSOSlices+1)
	}
	total := len(buf) - offset
	for _, p := range payload {
		total += len(p)
	}
	if err := tsoHeader(buf[offset-VirtioHeaderLen:offset], buf[offset:], total, mss); err != nil {
		return err
	}
	if err := d.tso.write(buf[offset-VirtioHeaderLen:], payload); err != nil {
		if errors.Is(err, syscall.EBADFD) {
			return os.ErrClosed
		}
		return fmt.Errorf("write to TUN: %w", err)
	}
	return nil
}

// Write writes the packets of bufs, each starting offset bytes in (gVisor's
// and the packet loop's packets). On a device with virtio-net headers,
// a batch in which no two packets could be merged (GRO: see mayCoalesce)
// is written here, a packet at a time with a header that asks for nothing
// (each is whole and summed), as raw system calls (internal/nbio): most
// writes are one packet, or a connection's few (an answer and a FIN), and
// Go's system call path woke the runtime's monitor thread for each burst.
// Other batches go to the device's own Write, which coalesces the segments
// of a flow. It returns the packets written (0 when a packet failed; the
// others were still written). Calls must not overlap each other or
// WriteTSO.
func (d *Device) Write(bufs [][]byte, offset int) (int, error) {
	if !d.vnetHdr || offset < VirtioHeaderLen || mayCoalesce(bufs, offset) {
		return d.Device.Write(bufs, offset)
	}
	var errs error
	for _, b := range bufs {
		pkt := b[offset-VirtioHeaderLen:]
		clear(pkt[:VirtioHeaderLen])
		if err := d.tso.write(pkt, nil); err != nil {
			if errors.Is(err, syscall.EBADFD) {
				return 0, os.ErrClosed
			}
			// As the device's Write: the other packets still go.
			errs = errors.Join(errs, fmt.Errorf("write to TUN: %w", err))
		}
	}
	if errs != nil {
		return 0, errs
	}
	return len(bufs), nil
}

// mayCoalesce reports whether the device's Write could merge packets of
// bufs into one (GRO), which takes two candidates: TCP segments that carry
// data and no flag but ACK and PSH, or UDP datagrams. Packets it cannot
// tell (too short for their headers) count as candidates, and a buffer
// shorter than offset sends the batch to the device's Write at once, so
// that they meet the device's own checks.
func mayCoalesce(bufs [][]byte, offset int) bool {
	n := 0
	for _, b := range bufs {
		if len(b) <= offset {
			return true // the device's Write reports the bad offset
		}
		if groCandidate(b[offset:]) {
			if n++; n == 2 {
				return true
			}
		}
	}
	return false
}

// groCandidate reports whether the IP packet p may merge with another of
// its flow (mayCoalesce).
func groCandidate(p []byte) bool {
	if len(p) < 1 {
		return true
	}
	var proto byte
	var l4 int
	switch p[0] >> 4 {
	case 4:
		if len(p) < 20 {
			return true
		}
		proto, l4 = p[9], int(p[0]&0x0f)*4
	case 6:
		if len(p) < 40 {
			return true
		}
		proto, l4 = p[6], 40
	default:
		return true
	}
	switch proto {
	case unix.IPPROTO_TCP:
		if len(p) < l4+20 {
			return true
		}
		const ack, psh = 0x10, 0x08
		if f := p[l4+13]; f != ack && f != ack|psh {
			return false
		}
		return len(p) > l4+int(p[l4+12]>>4)*4
	case unix.IPPROTO_UDP:
		return true
	}
	return false
}

// tunReader reads the TUN's packets through Go's poller with raw system
// calls (internal/nbio). Its method value is made once: a read allocates
// nothing. Only the reading goroutine uses it.
type tunReader struct {
	raw syscall.RawConn
	fn  func(fd uintptr) bool
	buf []byte
	n   int
	err syscall.Errno
}

func (r *tunReader) init(f *os.File) error {
	raw, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("descriptor for reads: %w", err)
	}
	r.raw, r.fn = raw, r.readFd
	return nil
}

// read reads one packet into b, waiting in the poller for one to come.
func (r *tunReader) read(b []byte) (int, error) {
	r.buf = b
	err := r.raw.Read(r.fn)
	r.buf = nil
	switch {
	case err != nil:
		// The poller fails only when the file is closing.
		return 0, os.ErrClosed
	case r.err == unix.EBADFD:
		return 0, os.ErrClosed
	case r.err != 0:
		return 0, fmt.Errorf("read from TUN: %w", r.err)
	}
	return r.n, nil
}

// readFd is the RawConn.Read callback: false asks the poller to wait
// until the descriptor is readable.
func (r *tunReader) readFd(fd uintptr) bool {
	n, e := nbio.Read(fd, r.buf)
	if e == unix.EAGAIN {
		return false
	}
	r.n, r.err = n, e
	return true
}

// MaxTSOSlices is the most payload slices WriteTSO takes.
const MaxTSOSlices = 31

// tsoWriter writes a packet in slices with one writev on the TUN's
// descriptor, through Go's poller (the descriptor is non-blocking). Its
// method value and iovec array are made once: a write allocates nothing.
type tsoWriter struct {
	raw   syscall.RawConn
	fn    func(fd uintptr) bool
	iov   [MaxTSOSlices + 1]unix.Iovec
	n     int // iovecs in use
	wrote int
	err   syscall.Errno
}

func (w *tsoWriter) init(f *os.File) error {
	raw, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("descriptor for vectored writes: %w", err)
	}
	w.raw, w.fn = raw, w.writev
	return nil
}

// write writes head and then payload as one packet.
func (w *tsoWriter) write(head []byte, payload [][]byte) error {
	want := len(head)
	w.iov[0] = unix.Iovec{Base: &head[0]}
	w.iov[0].SetLen(len(head))
	w.n = 1
	for _, p := range payload {
		if len(p) == 0 {
			continue
		}
		w.iov[w.n] = unix.Iovec{Base: &p[0]}
		w.iov[w.n].SetLen(len(p))
		w.n++
		want += len(p)
	}
	w.wrote, w.err = 0, 0
	err := w.raw.Write(w.fn)
	// Cleared, the array keeps no buffer alive past the write.
	for i := range w.n {
		w.iov[i] = unix.Iovec{}
	}
	switch {
	case err != nil:
		return err
	case w.err != 0:
		return w.err
	case w.wrote != want:
		return fmt.Errorf("wrote %d of %d bytes", w.wrote, want)
	}
	return nil
}

// writev is the RawConn.Write callback: false asks the poller to wait
// until the descriptor is writable.
func (w *tsoWriter) writev(fd uintptr) bool {
	n, e := nbio.Writev(fd, w.iov[:w.n])
	if e == unix.EAGAIN {
		return false
	}
	w.wrote, w.err = n, e
	return true
}

// tsoHeader writes into h the virtio-net header of the TCP packet of
// total bytes whose first bytes (its headers at least) are pkt, for
// WriteTSO: checksum partial from the TCP header on, and GSO of mss bytes
// when the payload is longer.
func tsoHeader(h, pkt []byte, total, mss int) error {
	gso, l3 := byte(gsoTCPv4), 0
	switch {
	case len(pkt) >= 40 && pkt[0]>>4 == 6:
		gso, l3 = gsoTCPv6, 40
	case len(pkt) >= 20 && pkt[0]>>4 == 4:
		l3 = int(pkt[0]&0xf) * 4
	}
	if l3 < 20 || len(pkt) < l3+20 || mss <= 0 || mss > 0xffff {
		return fmt.Errorf("write to TUN: not a TCP packet to segment (%d bytes, segment size %d)", len(pkt), mss)
	}
	hdrLen := l3 + int(pkt[l3+12]>>4)*4
	if hdrLen > len(pkt) {
		return fmt.Errorf("write to TUN: TCP header past the packet (%d bytes)", len(pkt))
	}
	if total-hdrLen <= mss {
		gso, mss = gsoNone, 0 // one segment: only its checksum is left to the kernel
	}
	h[0], h[1] = vnetNeedsCsum, gso
	binary.NativeEndian.PutUint16(h[2:4], uint16(hdrLen))
	binary.NativeEndian.PutUint16(h[4:6], uint16(mss))
	binary.NativeEndian.PutUint16(h[6:8], uint16(l3))
	binary.NativeEndian.PutUint16(h[8:10], 16) // the TCP checksum's offset
	return nil
}

// TSO reports whether WriteTSO works: the device carries virtio-net
// headers (wireguard-go opens it so where the kernel can).
func (d *Device) TSO() bool { return d.vnetHdr }
