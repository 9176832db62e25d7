package main

import (
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// keptCaps are the capabilities tunfw still needs once it is up:
// CAP_NET_ADMIN for SO_MARK, the routes and rules it removes at exit and the
// device, CAP_NET_RAW for the raw ICMP sockets and SO_BINDTODEVICE.
const keptCaps = 1<<unix.CAP_NET_ADMIN | 1<<unix.CAP_NET_RAW

// dropCapabilities reduces every thread of the process to keptCaps (or
// fewer, if it holds fewer): effective, permitted and bounding sets, with
// the inheritable and ambient sets emptied and no_new_privs set, so that
// neither a bug in tunfw nor anything it could exec regains more. It runs
// once setup is done (device, routes, sockets): a started-by-hand or
// container tunfw then holds what a systemd unit would have given it.
//
// Linux keeps credentials per thread and the Go runtime already runs
// several, so every call goes through syscall.AllThreadsSyscall. That is
// refused in binaries built with cgo; `make build` and the image use
// CGO_ENABLED=0.
func dropCapabilities() (kept uint64, err error) {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return 0, fmt.Errorf("read capabilities: %w", err)
	}
	permitted := uint64(data[0].Permitted) | uint64(data[1].Permitted)<<32
	kept = permitted & keptCaps
	all := func(trap, a1, a2, a3 uintptr) error {
		if _, _, e := syscall.AllThreadsSyscall(trap, a1, a2, a3); e != 0 {
			return e
		}
		return nil
	}
	if err := all(unix.SYS_PRCTL, unix.PR_SET_NO_NEW_PRIVS, 1, 0); err != nil {
		return 0, fmt.Errorf("set no_new_privs: %w", wrapCgo(err))
	}
	if err := all(unix.SYS_PRCTL, unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0); err != nil && !errors.Is(err, unix.EINVAL) {
		return 0, fmt.Errorf("clear ambient capabilities: %w", err)
	}
	// The bounding set needs CAP_SETPCAP to shrink, so it goes first.
	// Without CAP_SETPCAP (not root) it stays: with no_new_privs set and
	// nothing to exec it grants nothing.
	if permitted&(1<<unix.CAP_SETPCAP) != 0 {
		for c := uintptr(0); c < 64; c++ {
			if keptCaps&(1<<c) != 0 {
				continue
			}
			if err := all(unix.SYS_PRCTL, unix.PR_CAPBSET_DROP, c, 0); err != nil {
				if errors.Is(err, unix.EINVAL) {
					break // past the kernel's last capability
				}
				return 0, fmt.Errorf("drop capability %d from the bounding set: %w", c, err)
			}
		}
	}
	data[0] = unix.CapUserData{Effective: uint32(kept), Permitted: uint32(kept)}
	data[1] = unix.CapUserData{Effective: uint32(kept >> 32), Permitted: uint32(kept >> 32)}
	err = all(unix.SYS_CAPSET, uintptr(unsafe.Pointer(&hdr)), uintptr(unsafe.Pointer(&data[0])), 0)
	runtime.KeepAlive(&hdr)
	runtime.KeepAlive(&data)
	if err != nil {
		return 0, fmt.Errorf("set capabilities: %w", err)
	}
	return kept, nil
}

func wrapCgo(err error) error {
	if errors.Is(err, syscall.ENOTSUP) {
		return fmt.Errorf("%w (a binary built with cgo cannot change every thread's credentials: build with CGO_ENABLED=0)", err)
	}
	return err
}

// dropPrivileges is dropCapabilities for `up`: it logs what is kept, and a
// failure is a warning, since the firewall running matters more.
func dropPrivileges(log *slog.Logger) {
	kept, err := dropCapabilities()
	if err != nil {
		log.Warn("could not drop capabilities; running with those it was started with", "err", err)
		return
	}
	log.Info("capabilities dropped", "kept", capNames(kept))
}

// capNames names the capabilities of keptCaps present in set.
func capNames(set uint64) string {
	s := ""
	for _, c := range []struct {
		bit  uint
		name string
	}{{unix.CAP_NET_ADMIN, "CAP_NET_ADMIN"}, {unix.CAP_NET_RAW, "CAP_NET_RAW"}} {
		if set&(1<<c.bit) != 0 {
			if s != "" {
				s += ","
			}
			s += c.name
		}
	}
	if s == "" {
		return "none"
	}
	return s
}
