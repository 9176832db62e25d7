// Package nbio makes the data path's system calls on non-blocking
// descriptors (the TUN, the destinations' sockets) without entering the Go
// scheduler's system call state.
//
// A call through syscall.Syscall tells the scheduler it may block
// (entersyscall). When tunfw had been idle, that wakes the runtime's
// monitor thread (sysmon), which then wakes every 20 us until tunfw is idle
// again and hands the P of any call it finds still running to another
// thread: on a path of short calls that was half of tunfw's context
// switches and a tenth or more of its CPU (README, Performance). A call on
// a non-blocking descriptor never waits (it fails with EAGAIN, and the
// caller waits in the netpoller through syscall.RawConn), so it may run as
// a raw system call, the goroutine keeping its P for its few microseconds.
// So does a socket's set-up: socket, setsockopt, and connect on a
// non-blocking socket, which starts the handshake and returns (the
// caller waits for it in the netpoller). Calls that can wait (blocking
// files) stay with the scheduler, and so does close, which Go's poller
// makes when the last user of a descriptor is done.
package nbio

import (
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Read reads into p from the non-blocking descriptor fd, retrying when
// interrupted. It returns the bytes read, or 0 and the error number
// (EAGAIN: nothing to read yet).
func Read(fd uintptr, p []byte) (int, syscall.Errno) {
	for {
		n, _, e := unix.RawSyscall(unix.SYS_READ, fd, uintptr(unsafe.Pointer(unsafe.SliceData(p))), uintptr(len(p)))
		switch e {
		case 0:
			return int(n), 0
		case unix.EINTR:
			continue
		}
		return 0, e
	}
}

// Write writes p to the non-blocking descriptor fd once, retrying when
// interrupted: it may write less than p (EAGAIN: no room yet).
func Write(fd uintptr, p []byte) (int, syscall.Errno) {
	for {
		n, _, e := unix.RawSyscall(unix.SYS_WRITE, fd, uintptr(unsafe.Pointer(unsafe.SliceData(p))), uintptr(len(p)))
		switch e {
		case 0:
			return int(n), 0
		case unix.EINTR:
			continue
		}
		return 0, e
	}
}

// WriteFull writes p to the non-blocking descriptor fd until all of it is
// written, fd is full or a write fails. It returns the bytes written and
// the error number: EAGAIN when the rest waits for room; EIO for a write
// that took nothing and gave no reason, which is never looped on.
func WriteFull(fd uintptr, p []byte) (int, syscall.Errno) {
	done := 0
	for done < len(p) {
		n, e := Write(fd, p[done:])
		if e != 0 {
			return done, e
		}
		if n == 0 {
			return done, unix.EIO
		}
		done += n
	}
	return done, 0
}

// Writev writes the buffers of iov to the non-blocking descriptor fd in
// one call, retrying when interrupted.
func Writev(fd uintptr, iov []unix.Iovec) (int, syscall.Errno) {
	for {
		n, _, e := unix.RawSyscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(unsafe.SliceData(iov))), uintptr(len(iov)))
		switch e {
		case 0:
			return int(n), 0
		case unix.EINTR:
			continue
		}
		return 0, e
	}
}

// Queued returns the bytes a socket holds to be read (SIOCINQ).
func Queued(fd uintptr) (int, syscall.Errno) {
	var v int32
	_, _, e := unix.RawSyscall(unix.SYS_IOCTL, fd, unix.SIOCINQ, uintptr(unsafe.Pointer(&v)))
	return int(v), e
}

// Socket opens a non-blocking, close-on-exec socket.
func Socket(domain, typ, proto int) (int, syscall.Errno) {
	fd, _, e := unix.RawSyscall(unix.SYS_SOCKET, uintptr(domain), uintptr(typ|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC), uintptr(proto))
	if e != 0 {
		return -1, e
	}
	return int(fd), 0
}

// SetsockoptInt sets the integer socket option level/opt of fd to v.
func SetsockoptInt(fd uintptr, level, opt, v int) syscall.Errno {
	i := int32(v)
	_, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, fd, uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&i)), 4, 0)
	return e
}

// SetsockoptString sets the socket option level/opt of fd to the bytes
// of v (SO_BINDTODEVICE's interface name).
func SetsockoptString(fd uintptr, level, opt int, v string) syscall.Errno {
	_, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, fd, uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(unsafe.StringData(v))), uintptr(len(v)), 0)
	return e
}

// SetLinger sets SO_LINGER on fd: on with sec seconds, or off.
func SetLinger(fd uintptr, on bool, sec int) syscall.Errno {
	l := unix.Linger{Linger: int32(sec)}
	if on {
		l.Onoff = 1
	}
	_, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, fd, unix.SOL_SOCKET, unix.SO_LINGER, uintptr(unsafe.Pointer(&l)), unsafe.Sizeof(l), 0)
	return e
}

// SockError returns and clears the pending error of the socket fd
// (SO_ERROR): a non-blocking connect's outcome.
func SockError(fd uintptr) syscall.Errno {
	var v int32
	n := uint32(4)
	_, _, e := unix.RawSyscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_SOCKET, unix.SO_ERROR, uintptr(unsafe.Pointer(&v)), uintptr(unsafe.Pointer(&n)), 0)
	if e != 0 {
		return e
	}
	return syscall.Errno(v)
}

// Connected reports whether the socket fd has a peer (getpeername); the
// error number when it has none (ENOTCONN: a connect still under way).
func Connected(fd uintptr) syscall.Errno {
	var sa unix.RawSockaddrAny
	n := uint32(unix.SizeofSockaddrAny)
	_, _, e := unix.RawSyscall(unix.SYS_GETPEERNAME, fd, uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&n)))
	return e
}

// Connect starts connecting the non-blocking socket fd to dst, an IPv4
// address for an AF_INET socket, IPv6 for AF_INET6: 0 when it connected
// at once, EINPROGRESS when the handshake goes on (the socket turns
// writable when it ends; SockError tells how).
func Connect(fd uintptr, dst netip.AddrPort) syscall.Errno {
	var e syscall.Errno
	if dst.Addr().Is4() {
		sa := unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: dst.Addr().As4()}
		sa.Port = htons(dst.Port())
		_, _, e = unix.RawSyscall(unix.SYS_CONNECT, fd, uintptr(unsafe.Pointer(&sa)), unsafe.Sizeof(sa))
	} else {
		sa := unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: dst.Addr().As16()}
		sa.Port = htons(dst.Port())
		_, _, e = unix.RawSyscall(unix.SYS_CONNECT, fd, uintptr(unsafe.Pointer(&sa)), unsafe.Sizeof(sa))
	}
	if e == unix.EINTR {
		// The handshake goes on, as after EINPROGRESS.
		return unix.EINPROGRESS
	}
	return e
}

// Shutdown shuts down the socket fd for how (unix.SHUT_WR, ...).
func Shutdown(fd uintptr, how int) syscall.Errno {
	_, _, e := unix.RawSyscall(unix.SYS_SHUTDOWN, fd, uintptr(how), 0)
	return e
}

// htons returns port in network byte order, as sockaddr's port field
// holds it.
func htons(port uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(&port))
	b[0], b[1] = byte(port>>8), byte(port)
	return port
}
