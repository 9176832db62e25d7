package dial

import (
	"context"
	"io"
	"net/netip"
	"os"
	"syscall"
	"time"

	"github.com/tunfw/tunfw/internal/nbio"
	"golang.org/x/sys/unix"
)

// Keep-alive of tunfw's TCP sockets, net.Dialer's defaults: gVisor answers
// the client's own probes, so only these find a destination that vanished.
const (
	keepAliveIdle     = 15 // seconds before the first probe
	keepAliveInterval = 15 // seconds between probes
	keepAliveCount    = 9  // unanswered probes before the socket fails
)

// Conn is a connected TCP socket of tunfw's own, in Go's netpoller. It is
// opened, set up and connected with raw system calls (internal/nbio: on a
// connection-per-request load the scheduler's system call entries of
// net.Dialer, ten a connection, kept waking Go's sysmon thread); only its
// close takes the scheduler's path. A Conn is safe for concurrent use as
// an os.File is.
type Conn struct {
	f  *os.File
	rc syscall.RawConn
}

// DialTCP connects to dst with a socket marked and bound as Control does,
// with no-delay and keep-alive set. It returns when the handshake ended,
// or ctx did: ctx's error then. Errors carry the system call and its
// error number (errors.Is(err, syscall.ECONNREFUSED)).
func (d *Dialer) DialTCP(ctx context.Context, dst netip.AddrPort) (*Conn, error) {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	family, network := unix.AF_INET, "tcp4"
	if dst.Addr().Is6() {
		family, network = unix.AF_INET6, "tcp6"
	}
	sfd, e := nbio.Socket(family, unix.SOCK_STREAM, unix.IPPROTO_TCP)
	if e != 0 {
		return nil, os.NewSyscallError("socket", e)
	}
	fd := uintptr(sfd)
	if err := d.setupTCP(fd, network); err != nil {
		unix.Close(sfd)
		return nil, err
	}
	e = nbio.Connect(fd, dst)
	if e != 0 && e != unix.EINPROGRESS {
		unix.Close(sfd)
		return nil, os.NewSyscallError("connect", e)
	}
	c := &Conn{f: os.NewFile(fd, "tcp")}
	c.rc, _ = c.f.SyscallConn() // fails only for a nil File
	if e == 0 {
		return c, nil
	}
	if err := c.awaitConnect(ctx); err != nil {
		c.Abort()
		return nil, err
	}
	return c, nil
}

// setupTCP sets a new TCP socket's options before it connects.
func (d *Dialer) setupTCP(fd uintptr, network string) error {
	if err := d.control(fd, network); err != nil {
		return err
	}
	for _, o := range [...]struct{ level, opt, v int }{
		{unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, keepAliveIdle},
		{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, keepAliveInterval},
		{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, keepAliveCount},
	} {
		if e := nbio.SetsockoptInt(fd, o.level, o.opt, o.v); e != 0 {
			return os.NewSyscallError("setsockopt", e)
		}
	}
	return nil
}

// awaitConnect waits in the netpoller until the handshake c started ends
// or ctx is done.
func (c *Conn) awaitConnect(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	// ctx's end interrupts the wait through a past write deadline; the
	// deadline is cleared again only once that function cannot run.
	stop := context.AfterFunc(ctx, func() { c.f.SetWriteDeadline(time.Unix(1, 0)) })
	var cerr syscall.Errno
	// The handshake may have ended before the socket joined the netpoller,
	// its one edge-triggered event taken by a poll that RawConn.Write's
	// start then forgets: look before the first wait, not only after.
	err := c.rc.Write(func(fd uintptr) bool {
		if cerr = nbio.Connected(fd); cerr != unix.ENOTCONN {
			return true
		}
		switch cerr = nbio.SockError(fd); cerr {
		case 0, unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
			// Under way: wait for the socket to turn writable (or an
			// early wake-up of the poller).
			return false
		}
		return true
	})
	if !stop() {
		// ctx ended: whatever the handshake did, the dial failed.
		return ctx.Err()
	}
	if err != nil {
		return err
	}
	if cerr != 0 {
		return os.NewSyscallError("connect", cerr)
	}
	return nil
}

// control marks fd and binds it to network's interface, as Control does,
// with raw system calls.
func (d *Dialer) control(fd uintptr, network string) error {
	if d.mark != 0 {
		if e := nbio.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(d.mark)); e != 0 {
			return os.NewSyscallError("set SO_MARK", e)
		}
	}
	if iface := d.iface(network); iface != "" {
		if e := nbio.SetsockoptString(fd, unix.SOL_SOCKET, unix.SO_BINDTODEVICE, iface); e != 0 {
			return os.NewSyscallError("bind to device "+iface, e)
		}
	}
	return nil
}

// Read reads from the socket with raw system calls, waiting in the
// netpoller until bytes come, the read deadline passes (an error that is
// os.ErrDeadlineExceeded) or the destination ends (io.EOF).
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	var n int
	var e syscall.Errno
	err := c.rc.Read(func(fd uintptr) bool {
		n, e = nbio.Read(fd, p)
		return e != unix.EAGAIN
	})
	switch {
	case err != nil:
		return 0, err
	case e != 0:
		return 0, os.NewSyscallError("read", e)
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// Write writes all of p to the socket with raw system calls, waiting in
// the netpoller while the socket is full, until the write deadline.
func (c *Conn) Write(p []byte) (int, error) {
	done := 0
	var e syscall.Errno
	err := c.rc.Write(func(fd uintptr) bool {
		var n int
		n, e = nbio.WriteFull(fd, p[done:])
		done += n
		return e != unix.EAGAIN
	})
	switch {
	case err != nil:
		return done, err
	case e != 0:
		return done, os.NewSyscallError("write", e)
	}
	return done, nil
}

// SetReadDeadline sets the deadline of Read and of RawConn reads.
func (c *Conn) SetReadDeadline(t time.Time) error { return c.f.SetReadDeadline(t) }

// SetWriteDeadline sets the deadline of Write and of RawConn writes.
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.f.SetWriteDeadline(t) }

// SyscallConn returns the socket's descriptor for raw system calls that
// wait in the netpoller.
func (c *Conn) SyscallConn() syscall.RawConn { return c.rc }

// CloseWrite sends the destination a FIN (shutdown for writing).
func (c *Conn) CloseWrite() error {
	var e syscall.Errno
	if err := c.rc.Control(func(fd uintptr) { e = nbio.Shutdown(fd, unix.SHUT_WR) }); err != nil {
		return err
	}
	if e != 0 {
		return os.NewSyscallError("shutdown", e)
	}
	return nil
}

// Abort closes the socket with a RST to the destination (SO_LINGER 0).
func (c *Conn) Abort() error {
	c.rc.Control(func(fd uintptr) { nbio.SetLinger(fd, true, 0) })
	return c.f.Close()
}

// Close closes the socket; the kernel sends what is left and a FIN.
func (c *Conn) Close() error { return c.f.Close() }
