// Package sockread reads nonblocking sockets without holding a buffer while
// they are empty; the TCP relay and the UDP reply loop share it.
package sockread

import (
	"github.com/tunfw/tunfw/internal/nbio"
	"golang.org/x/sys/unix"
)

// Reader reads once from a nonblocking socket into a buffer it takes only
// when data is there, so that a connection or flow with nothing to read
// holds no buffer. Both relays use it: the TCP relay's
// destination-to-client direction and the UDP reply loop.
//
// Read (for RawConn.Read) and ReadNow (for RawConn.Control) are made once
// by Init, so a read allocates nothing. After a call, BP holds the data
// (N bytes from the offset; N == 0 is EOF on a stream), or BP is nil and
// Err says why: nil when there was nothing to read without waiting, else
// the socket's error (ECONNRESET, ECONNREFUSED...).
type Reader struct {
	get func() *[]byte
	put func(*[]byte) // for a buffer that got no data
	off int           // bytes left free in front of the data

	// Wait: when the socket is empty, Read asks RawConn.Read to wait in
	// the netpoller instead of returning.
	Wait    bool
	Read    func(fd uintptr) bool
	ReadNow func(fd uintptr)

	// ErrQueue, when set, is called with the socket whenever its error
	// queue (IP_RECVERR) may hold something: after a read returned the
	// socket's pending error, and when the netpoller woke a read that
	// then found nothing, which is what an error queued after another
	// call consumed the pending error looks like. Woken: this Read
	// already waited once (or its caller asks for a first look).
	ErrQueue func(fd int)
	Woken    bool

	BP  *[]byte
	N   int
	Err error
}

// Init sets where buffers come from and go back to, and the bytes to leave
// free in front of the data.
func (r *Reader) Init(get func() *[]byte, put func(*[]byte), off int) {
	r.get, r.put, r.off = get, put, off
	r.Read = r.readFd
	r.ReadNow = func(fd uintptr) { r.readFd(fd) }
}

func (r *Reader) readFd(fd uintptr) bool {
	r.BP = r.get()
	n, e := nbio.Read(fd, (*r.BP)[r.off:])
	r.N, r.Err = n, nil
	if e != 0 {
		r.N, r.Err = 0, e
	}
	if r.Err == nil {
		r.Woken = false
		return true
	}
	r.put(r.BP)
	r.BP = nil
	if r.Err == unix.EAGAIN {
		r.Err = nil
		if r.Woken && r.ErrQueue != nil {
			r.ErrQueue(int(fd))
		}
		r.Woken = r.Wait
		return !r.Wait
	}
	r.Woken = false
	if r.ErrQueue != nil {
		r.ErrQueue(int(fd))
	}
	return true
}
