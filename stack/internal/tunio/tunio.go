// Package tunio is the TUN device as a forwarder sees it: where to write
// the packets it builds, and the buffers to build them in.
package tunio

// Headroom is the room left in front of each packet buffer handed to the
// TUN device: wireguard's tun writes its virtio-net header there.
const Headroom = 16

// MaxPacket is the largest IP packet (IPv4 total length).
const MaxPacket = 65535

// Writer writes packets to the TUN. It is safe for concurrent use: the
// packet loop serialises writes, so batches are not interleaved.
type Writer interface {
	// Write writes bufs in one call; each packet starts Headroom bytes
	// into its buffer, which the device may use. Errors are counted by
	// the writer: a packet the TUN refuses is lost, as on a wire.
	Write(bufs [][]byte)
	// Buffer lends a buffer of Headroom+MaxPacket bytes (room for a whole
	// 64 KiB packet: the device coalesces TCP and UDP segments of one
	// flow into the buffer of the first); Release gives it back.
	Buffer() *[]byte
	Release(*[]byte)
}

// Segmenter writes TCP packets whose checksum the kernel completes and,
// when they are larger than their segment size, cuts into segments (TSO):
// see tun.Device.WriteTSO.
type Segmenter interface {
	// WriteTSO writes the packet made of head (Headroom bytes into its
	// buffer, the packet's headers at least, the TCP checksum field
	// holding the pseudo-header's sum) and then the slices of payload
	// (at most MaxPayloadSlices), to be cut into segments of mss
	// payload bytes if it carries more. The slices are written where
	// they lie, not copied. Errors are counted by the writer, as
	// Write's are.
	WriteTSO(head []byte, payload [][]byte, mss int)
}

// MaxPayloadSlices is the most payload slices Segmenter.WriteTSO takes
// (tun.MaxTSOSlices).
const MaxPayloadSlices = 31
