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
// Calls that can wait (connect, close, blocking files) stay with the
// scheduler.
package nbio

import (
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
