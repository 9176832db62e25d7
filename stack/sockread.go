package stack

import "golang.org/x/sys/unix"

// sockReader reads once from a nonblocking socket into a buffer it takes
// only when data is there, so that a connection or flow with nothing to
// read holds no buffer. Both relays use it: the TCP relay's
// destination-to-client direction and the UDP reply loop.
//
// read (for RawConn.Read) and readNow (for RawConn.Control) are made once
// by init, so a read allocates nothing. After a call, bp holds the data
// (n bytes from off; n == 0 is EOF on a stream), or bp is nil and err
// says why: nil when there was nothing to read without waiting, else the
// socket's error (ECONNRESET, ECONNREFUSED...).
type sockReader struct {
	get func() *[]byte
	put func(*[]byte) // for a buffer that got no data
	off int           // bytes left free in front of the data

	// wait: when the socket is empty, read asks RawConn.Read to wait in
	// the netpoller instead of returning.
	wait    bool
	read    func(fd uintptr) bool
	readNow func(fd uintptr)

	// errQueue, when set, is called with the socket whenever its error
	// queue (IP_RECVERR) may hold something: after a read returned the
	// socket's pending error, and when the netpoller woke a read that
	// then found nothing, which is what an error queued after another
	// call consumed the pending error looks like. woken: this Read
	// already waited once (or its caller asks for a first look).
	errQueue func(fd int)
	woken    bool

	bp  *[]byte
	n   int
	err error
}

func (r *sockReader) init(get func() *[]byte, put func(*[]byte), off int) {
	r.get, r.put, r.off = get, put, off
	r.read = r.readFd
	r.readNow = func(fd uintptr) { r.readFd(fd) }
}

func (r *sockReader) readFd(fd uintptr) bool {
	r.bp = r.get()
	for {
		r.n, r.err = unix.Read(int(fd), (*r.bp)[r.off:])
		if r.err != unix.EINTR {
			break
		}
	}
	if r.err == nil {
		r.woken = false
		return true
	}
	r.put(r.bp)
	r.bp = nil
	if r.err == unix.EAGAIN {
		r.err = nil
		if r.woken && r.errQueue != nil {
			r.errQueue(int(fd))
		}
		r.woken = r.wait
		return !r.wait
	}
	r.woken = false
	if r.errQueue != nil {
		r.errQueue(int(fd))
	}
	return true
}
