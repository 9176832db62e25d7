// Package dial opens tunfw's own sockets to the real destinations so that
// the kernel routes them past the TUN: marked with the fwmark and bound to
// the outbound interface, which follows the default route.
package dial

import (
	"context"
	"net"
	"sync/atomic"
	"syscall"
)

// Outbound says how tunfw's own sockets leave the host without being routed
// back into the TUN.
type Outbound struct {
	// IfaceV4 and IfaceV6 are the interfaces IPv4 and IPv6 sockets are bound
	// to (SO_BINDTODEVICE); "" binds none.
	IfaceV4, IfaceV6 string
	// Mark is set as SO_MARK on every socket; 0 sets none.
	Mark uint32
}

// Dialer opens and sets up tunfw's own sockets. It is safe for concurrent
// use.
type Dialer struct {
	mark uint32
	// ifaces holds the interfaces new sockets are bound to: Outbound's at
	// first, then where the default route moved (SetInterfaces).
	ifaces atomic.Pointer[[2]string]
	net    net.Dialer
}

// New returns a Dialer for o.
func New(o Outbound) *Dialer {
	d := &Dialer{mark: o.Mark}
	d.ifaces.Store(&[2]string{o.IfaceV4, o.IfaceV6})
	d.net.Control = d.Control
	return d
}

// DialContext connects to address on network ("tcp", "udp4", ...) with a
// socket set up by Control.
func (d *Dialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return d.net.DialContext(ctx, network, address)
}

// Interfaces returns the interfaces new IPv4 and IPv6 sockets are bound to.
func (d *Dialer) Interfaces() (v4, v6 string) {
	i := d.ifaces.Load()
	return i[0], i[1]
}

// SetInterfaces binds new sockets to v4 and v6 from now on; sockets open
// keep theirs.
func (d *Dialer) SetInterfaces(v4, v6 string) { d.ifaces.Store(&[2]string{v4, v6}) }

// iface returns the interface sockets of network are bound to, "" for none.
func (d *Dialer) iface(network string) string {
	if network == "tcp6" || network == "udp6" || network == "ip6" {
		return d.ifaces.Load()[1]
	}
	return d.ifaces.Load()[0]
}

// Control marks and binds a socket before it connects (net.Dialer's and
// net.ListenConfig's Control), so the kernel routes it past the TUN.
func (d *Dialer) Control(network, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) { serr = d.control(fd, network) }); err != nil {
		return err
	}
	return serr
}
