// Package tun owns the TUN device tunfw reads packets from and the host
// routing that sends traffic into it: creation, addresses, MTU, routes, and
// their removal.
package tun

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"
)

// Device is an open TUN device with the addresses and routes tunfw gave it.
// Everything it installed is removed by Close.
type Device struct {
	wgtun.Device
	name   string
	link   netlink.Link
	routes []netlink.Route
	policy *policy // policy routing, when used (policy.go)
	noIPv6 bool    // IPv6 is disabled in this network namespace

	// file is the TUN's character device and vnetHdr whether it carries
	// virtio-net headers: ReadPackets and WriteTSO use it directly (offload.go).
	file    *os.File
	vnetHdr bool
	// tso is WriteTSO's vectored write, made once so that a write
	// allocates nothing; WriteTSO's callers serialise its use.
	tso tsoWriter
	// rd is ReadPackets' reader, used by the reading goroutine only.
	rd tunReader
	// split holds the datagrams ReadPackets cuts from a UDP GSO packet
	// (all but the first); only the reading goroutine uses it.
	split []byte

	// OnGuardError, when set before Install, hears when refreshing the
	// nftables table's alive element starts failing (err) and when it
	// works again (nil): with fail = "open", bound sockets are no longer
	// refused a few seconds after it fails.
	OnGuardError func(err error)
}

// Open creates the TUN device, gives it its addresses and MTU and brings it
// up. On error nothing is left behind.
func Open(s Settings) (_ *Device, err error) {
	dev, err := wgtun.CreateTUN(s.Name, s.MTU)
	if err != nil {
		return nil, fmt.Errorf("create TUN %s: %w", s.Name, err)
	}
	d := &Device{Device: dev, name: s.Name}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()
	if d.name, err = dev.Name(); err != nil {
		return nil, fmt.Errorf("name of TUN %s: %w", s.Name, err)
	}
	if d.file = d.File(); d.file != nil {
		d.vnetHdr = vnetHeaderOn(d.file, d.name)
		if err := d.tso.init(d.file); err != nil {
			return nil, fmt.Errorf("TUN %s: %w", d.name, err)
		}
		if err := d.rd.init(d.file); err != nil {
			return nil, fmt.Errorf("TUN %s: %w", d.name, err)
		}
	}
	if d.link, err = netlink.LinkByName(d.name); err != nil {
		return nil, fmt.Errorf("find link %s: %w", d.name, err)
	}
	// Docker and others disable IPv6 in a container's namespace: then
	// there is no IPv6 traffic to police, and the v6 half is left out.
	d.noIPv6 = readSysctl("net/ipv6/conf/"+d.name+"/disable_ipv6") == 1
	for _, p := range s.Addresses {
		if p.Addr().Is6() && d.noIPv6 {
			continue
		}
		a := &netlink.Addr{IPNet: prefixIPNet(p)}
		if p.Addr().Is6() {
			// Usable at once: nothing else can own an address on a TUN.
			a.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrAdd(d.link, a); err != nil {
			return nil, fmt.Errorf("add address %s to %s: %w", p, d.name, err)
		}
	}
	if s.QueueLength > 0 { // 0: settings not from Validate; the kernel's default
		if err := netlink.LinkSetTxQLen(d.link, s.QueueLength); err != nil {
			return nil, fmt.Errorf("set queue length of %s to %d: %w", d.name, s.QueueLength, err)
		}
	}
	if err := netlink.LinkSetUp(d.link); err != nil {
		return nil, fmt.Errorf("bring %s up: %w", d.name, err)
	}
	return d, nil
}

// WatchEvents logs changes of the device's link (down, up, MTU) until the
// device is closed. Something must read its events: wireguard-go's netlink
// listener blocks once its queue of five events is full, and with it the
// listener goroutine, for the life of the process. The events only say
// that something changed (wireguard-go does not report a first "down"
// before it saw the link running), so each one is followed by a look at
// the link itself.
func (d *Device) WatchEvents(log *slog.Logger) {
	up, mtu := true, d.link.Attrs().MTU
	for range d.Events() {
		l, err := netlink.LinkByIndex(d.link.Attrs().Index)
		if err != nil {
			continue // gone: the device is being closed
		}
		a := l.Attrs()
		if isUp := a.Flags&net.FlagUp != 0; isUp != up {
			up = isUp
			if up {
				log.Info("TUN device is up again", "tun", d.name)
			} else {
				log.Warn("TUN device is down: traffic routed into it is dropped, and the kernel may remove its routes; restart tunfw if they are gone", "tun", d.name)
			}
		}
		if a.MTU != mtu {
			log.Warn("TUN device MTU changed outside tunfw; packets are still sized by [tun] mtu", "tun", d.name, "mtu", a.MTU, "was", mtu)
			mtu = a.MTU
		}
	}
}

// InterfaceName returns the kernel's name of the device.
func (d *Device) InterfaceName() string { return d.name }

// File returns the TUN's character device, for polling it (never for
// reading: ReadPackets, or the wireguard device, reads it), or nil.
func (d *Device) File() *os.File {
	if f, ok := d.Device.(interface{ File() *os.File }); ok {
		return f.File()
	}
	return nil
}

// AddRoutes routes include minus exclude into the device, in the main table.
// On error the routes added so far stay recorded and Close removes them.
func (d *Device) AddRoutes(include, exclude []netip.Prefix) error {
	for _, p := range Subtract(include, exclude) {
		if p.Addr().Is6() && d.noIPv6 {
			continue
		}
		r := netlink.Route{
			LinkIndex: d.link.Attrs().Index,
			Dst:       prefixIPNet(p),
			Scope:     netlink.SCOPE_LINK,
			Protocol:  unix.RTPROT_STATIC,
		}
		if err := netlink.RouteAdd(&r); err != nil {
			return fmt.Errorf("add route %s dev %s: %w", p, d.name, err)
		}
		d.routes = append(d.routes, r)
	}
	return nil
}

// Routes returns the destinations routed into the device (in the main
// table, or in tunfw's table under policy routing).
func (d *Device) Routes() []netip.Prefix {
	routes := d.routes
	if d.policy != nil {
		routes = d.policy.routes
	}
	out := make([]netip.Prefix, 0, len(routes))
	for _, r := range routes {
		if r.LinkIndex == d.link.Attrs().Index {
			out = append(out, ipNetPrefix(r.Dst))
		}
	}
	return out
}

// Close removes the routes and ip rules tunfw added and the device itself.
func (d *Device) Close() error {
	var errs []error
	if d.policy != nil {
		// Rules first: traffic takes the normal routes again at once.
		errs = append(errs, d.policy.remove())
	}
	for i := len(d.routes) - 1; i >= 0; i-- {
		r := d.routes[i]
		if err := netlink.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("delete route %s: %w", r.Dst, err))
		}
	}
	d.routes = nil
	if d.Device != nil {
		// A non-persistent TUN vanishes with its last file descriptor, and
		// with it the addresses and any route still pointing at it.
		if err := d.Device.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close %s: %w", d.name, err))
		}
	}
	return errors.Join(errs...)
}

// CloseKeepKillSwitch closes the device but leaves tunfw's rules, table
// and nftables table as they are: with fail = "closed", only a clean stop
// lifts the kill switch, so an error exit keeps it. The routes into the
// TUN vanish with the device; the nftables table (or, without it, the
// unreachable routes) stays and blocks.
func (d *Device) CloseKeepKillSwitch() error {
	var err error
	if d.policy != nil {
		d.policy.stopKeepAlive()
		if d.policy.guard {
			// Block what the host forwards at once, not when the
			// running element times out.
			err = armGuard(d.policy.s, true, false)
		}
	}
	d.policy = nil
	return errors.Join(err, d.Close())
}

// DefaultRouteInterface returns the interface of the main table's default
// route for the family of v4 (true: IPv4), or "" if there is none: of
// several, the one with the lowest metric, the kernel's choice. Routes
// through the interface skip (the TUN: include = ["0.0.0.0/0"] puts a
// default route there) do not count.
func DefaultRouteInterface(v4 bool, skip string) (string, error) {
	family := netlink.FAMILY_V6
	if v4 {
		family = netlink.FAMILY_V4
	}
	routes, err := netlink.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return "", fmt.Errorf("list routes: %w", err)
	}
	var best string
	var bestPrio int
	for _, r := range routes {
		if r.Dst != nil && r.Dst.IP != nil {
			if ones, _ := r.Dst.Mask.Size(); ones != 0 {
				continue
			}
		}
		idx := r.LinkIndex
		if idx == 0 && len(r.MultiPath) > 0 {
			idx = r.MultiPath[0].LinkIndex
		}
		if idx == 0 || (best != "" && r.Priority >= bestPrio) {
			continue
		}
		l, err := netlink.LinkByIndex(idx)
		if err != nil {
			return "", fmt.Errorf("link of default route: %w", err)
		}
		if name := l.Attrs().Name; name != skip {
			best, bestPrio = name, r.Priority
		}
	}
	return best, nil
}

func prefixIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{
		IP:   p.Addr().AsSlice(),
		Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen()),
	}
}

func ipNetPrefix(n *net.IPNet) netip.Prefix {
	a, _ := netip.AddrFromSlice(n.IP)
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones)
}
