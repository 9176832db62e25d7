package udpfwd

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
	buf     *[]byte // from Host.TUN, payloads back to back
	n       int     // bytes in buf
	segSize int     // size of every datagram but the last
	segs    int
	short   bool // the last datagram is shorter than segSize: it must stay last
}

// queueUDP adds payload to f's batch, sending what is there first when
// payload cannot join it.
func (u *Forwarder) queueUDP(f *udpFlow, payload []byte) {
	b := &f.out
	if !f.gso || len(payload) == 0 || 2*len(payload) > udpMaxBatch {
		u.flushUDPFlow(f)
		u.sendUDP(f, payload)
		return
	}
	if b.segs > 0 && (b.short || len(payload) > b.segSize || b.n+len(payload) > udpMaxBatch || b.segs == udpMaxSegs) {
		u.flushUDPFlow(f)
	}
	if b.segs == 0 {
		if len(u.pending) >= udpMaxPending {
			u.flushUDP()
		}
		b.buf = u.h.TUN.Buffer()
		b.segSize = len(payload)
		u.pending = append(u.pending, f)
	}
	b.n += copy((*b.buf)[b.n:], payload)
	b.segs++
	if len(payload) < b.segSize {
		b.short = true
	}
}

// flushUDP sends every batch the read loop collected.
func (u *Forwarder) flushUDP() {
	for i, f := range u.pending {
		u.flushUDPFlow(f)
		u.pending[i] = nil
	}
	u.pending = u.pending[:0]
}

// flushUDPFlow sends f's batch, if any: one datagram as it is, several
// with UDP GSO. A kernel or path that refuses GSO (no checksum offload on
// the way out, datagrams larger than the path MTU) gets the datagrams one
// by one, now and from then on.
func (u *Forwarder) flushUDPFlow(f *udpFlow) {
	b := &f.out
	if b.segs == 0 {
		return
	}
	data := (*b.buf)[:b.n]
	if b.segs == 1 {
		u.sendUDP(f, data)
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
				u.sendUDP(f, data[:n])
				data = data[n:]
			}
		case err != nil || (f.sendErr != nil && !errors.Is(f.sendErr, unix.ECONNREFUSED)):
			u.writeDrops.Add(uint64(b.segs))
		}
	}
	u.h.TUN.Release(b.buf)
	*b = udpBatch{}
}

// sendUDP sends one datagram on f's socket. It never blocks: a datagram
// that finds the socket's buffer full is dropped and counted.
func (u *Forwarder) sendUDP(f *udpFlow, payload []byte) {
	f.sendBuf = payload
	if err := f.raw.Write(f.send); err != nil || (f.sendErr != nil && !errors.Is(f.sendErr, unix.ECONNREFUSED)) {
		u.writeDrops.Add(1)
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

// ReadDone is called by the read loop after it handled a batch read from
// the TUN: the datagrams collected for batching leave before the next read
// could block.
func (u *Forwarder) ReadDone() {
	if len(u.pending) > 0 && !u.tunHasMore() {
		u.flushUDP()
	}
}

// tunHasMore reports whether a read of the TUN would return at once. It is
// asked only while UDP batches wait; without a pollable device it says no,
// so batches are sent after every read.
func (u *Forwarder) tunHasMore() bool {
	if u.h.TUNConn == nil {
		return false
	}
	u.tunPollReady = false
	if u.h.TUNConn.Control(u.pollTUN) != nil {
		return false
	}
	return u.tunPollReady
}

func (u *Forwarder) pollTUNFd(fd uintptr) {
	u.tunPollFds[0] = unix.PollFd{Fd: int32(fd), Events: unix.POLLIN}
	n, err := unix.Poll(u.tunPollFds[:], 0)
	u.tunPollReady = err == nil && n > 0 && u.tunPollFds[0].Revents&unix.POLLIN != 0
}
