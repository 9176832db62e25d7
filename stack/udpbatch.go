package stack

import (
	"encoding/binary"
	"errors"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Outbound UDP batching. The read loop does not send a datagram the moment
// it reads it: while the TUN has more packets waiting, datagrams of one flow
// are collected, then sent with one sendmsg as a UDP GSO super-datagram
// (UDP_SEGMENT): the kernel routes it once and splits it at the device or
// at the receiving socket. A flow's datagrams keep their order, and
// everything collected is sent before the read loop could block, so a
// datagram that arrives alone waits for nothing.

const (
	// udpMaxSegs is the kernel's UDP_MAX_SEGMENTS.
	udpMaxSegs = 64
	// udpMaxBatch is the largest payload of one GSO send (that of one
	// IPv4 UDP datagram).
	udpMaxBatch = 65507
	// udpMaxPending bounds the flows with a batch at once (each holds a
	// 64 KiB buffer): a burst over many flows, a flood of DNS queries
	// say, is sent as it comes rather than held in buffers.
	udpMaxPending = 32
)

// udpBatch is the datagrams of one flow waiting to be sent. Only the read
// loop touches it.
type udpBatch struct {
	buf     *[]byte // from Stack.bufPool, payloads back to back
	n       int     // bytes in buf
	segSize int     // size of every datagram but the last
	segs    int
	short   bool // the last datagram is shorter than segSize: it must stay last
}

// queueUDP adds payload to f's batch, sending what is there first when
// payload cannot join it.
func (s *Stack) queueUDP(f *udpFlow, payload []byte) {
	b := &f.out
	if !f.gso || len(payload) == 0 || 2*len(payload) > udpMaxBatch {
		s.flushUDPFlow(f)
		s.sendUDP(f, payload)
		return
	}
	if b.segs > 0 && (b.short || len(payload) > b.segSize || b.n+len(payload) > udpMaxBatch || b.segs == udpMaxSegs) {
		s.flushUDPFlow(f)
	}
	if b.segs == 0 {
		if len(s.udpPending) >= udpMaxPending {
			s.flushUDP()
		}
		b.buf = s.bufPool.Get().(*[]byte)
		b.segSize = len(payload)
		s.udpPending = append(s.udpPending, f)
	}
	b.n += copy((*b.buf)[b.n:], payload)
	b.segs++
	if len(payload) < b.segSize {
		b.short = true
	}
}

// flushUDP sends every batch the read loop collected.
func (s *Stack) flushUDP() {
	for i, f := range s.udpPending {
		s.flushUDPFlow(f)
		s.udpPending[i] = nil
	}
	s.udpPending = s.udpPending[:0]
}

// flushUDPFlow sends f's batch, if any: one datagram as it is, several
// with UDP GSO. A kernel or path that refuses GSO (no checksum offload on
// the way out, datagrams larger than the path MTU) gets the datagrams one
// by one, now and from then on.
func (s *Stack) flushUDPFlow(f *udpFlow) {
	b := &f.out
	if b.segs == 0 {
		return
	}
	data := (*b.buf)[:b.n]
	if b.segs == 1 {
		s.sendUDP(f, data)
	} else {
		binary.NativeEndian.PutUint16(f.oob[unix.CmsgLen(0):], uint16(b.segSize))
		f.sendBuf = data
		err := f.raw.Write(f.sendGSO)
		f.sendBuf = nil
		switch {
		case err == nil && (errors.Is(f.sendErr, unix.EIO) || errors.Is(f.sendErr, unix.EINVAL) ||
			errors.Is(f.sendErr, unix.ENOPROTOOPT) || errors.Is(f.sendErr, unix.EOPNOTSUPP)):
			f.gso = false
			for len(data) > 0 {
				n := min(b.segSize, len(data))
				s.sendUDP(f, data[:n])
				data = data[n:]
			}
		case err != nil || (f.sendErr != nil && !errors.Is(f.sendErr, unix.ECONNREFUSED)):
			s.udpWriteDrops.Add(uint64(b.segs))
		}
	}
	s.bufPool.Put(b.buf)
	*b = udpBatch{}
}

// sendUDP sends one datagram on f's socket. It never blocks: a datagram
// that finds the socket's buffer full is dropped and counted.
func (s *Stack) sendUDP(f *udpFlow, payload []byte) {
	f.sendBuf = payload
	if err := f.raw.Write(f.send); err != nil || (f.sendErr != nil && !errors.Is(f.sendErr, unix.ECONNREFUSED)) {
		s.udpWriteDrops.Add(1)
	}
	f.sendBuf = nil
}

// newGSOControl returns the control message of a UDP GSO send; its segment
// size is filled in at each send.
func newGSOControl() []byte {
	oob := make([]byte, unix.CmsgSpace(2))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
	h.Level = unix.SOL_UDP
	h.Type = unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	return oob
}

// tunHasMore reports whether a read of the TUN would return at once. It is
// asked only while UDP batches wait; without a pollable device it says no,
// so batches are sent after every read.
func (s *Stack) tunHasMore() bool {
	if s.tunRaw == nil {
		return false
	}
	s.tunPollReady = false
	if s.tunRaw.Control(s.pollTUN) != nil {
		return false
	}
	return s.tunPollReady
}

func (s *Stack) pollTUNFd(fd uintptr) {
	s.tunPollFds[0] = unix.PollFd{Fd: int32(fd), Events: unix.POLLIN}
	n, err := unix.Poll(s.tunPollFds[:], 0)
	s.tunPollReady = err == nil && n > 0 && s.tunPollFds[0].Revents&unix.POLLIN != 0
}
