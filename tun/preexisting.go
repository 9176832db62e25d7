package tun

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Connections the host has open when capture starts are left unjudged:
// tunfw never saw their first packet, so it could only drop them, which
// would cut an admin's SSH session or a running download. markExisting
// gives each of them the guard's conntrack mark, which the output-route
// chain turns into the fwmark that keeps them on the normal routes.
//
// Conntrack only knows connections it was tracking when they started,
// and in a network namespace it tracks nothing until some rule uses it
// (the guard's table is the first, often). So the sockets are the other
// source: every TCP socket with a peer and every connected UDP socket
// gets a conntrack entry of its own (marked) when it has none.

// connKey is one direction of a connection.
type connKey struct {
	proto    uint8
	src, dst netip.AddrPort
}

// markExisting marks the host's existing connections (see above) and
// returns how many it marked. Connections of the TUN's addresses (left
// from an earlier run) are not marked: they belonged to captured flows.
func markExisting(s Settings) (int, error) {
	skip := func(a netip.Addr) bool {
		for _, p := range s.Addresses {
			if p.Addr() == a {
				return true
			}
		}
		return a.IsLoopback()
	}
	// Only the host's own connections: marking a forwarded one would
	// change nothing (the mark is restored on output only) but the count.
	local := map[netip.Addr]bool{}
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return 0, fmt.Errorf("list the host's addresses: %w", err)
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			local[ip.Unmap()] = true
		}
	}
	seen := map[connKey]bool{}
	n := 0
	var errs []error
	for _, fam := range []netlink.InetFamily{unix.AF_INET, unix.AF_INET6} {
		flows, err := netlink.ConntrackTableList(netlink.ConntrackTable, fam)
		if err != nil {
			errs = append(errs, fmt.Errorf("list conntrack table: %w", err))
			continue
		}
		for _, f := range flows {
			if f.Forward.Protocol != unix.IPPROTO_TCP && f.Forward.Protocol != unix.IPPROTO_UDP {
				continue
			}
			fw, rv := tupleKey(f.Forward), tupleKey(f.Reverse)
			seen[fw], seen[rv] = true, true
			mine := local[fw.src.Addr()] || local[fw.dst.Addr()] || local[rv.src.Addr()] || local[rv.dst.Addr()]
			if f.Mark != 0 || !mine || skip(fw.src.Addr()) || skip(fw.dst.Addr()) || skip(rv.src.Addr()) || skip(rv.dst.Addr()) {
				continue
			}
			f.Mark, f.ProtoInfo = s.FWMark, nil
			if f.TimeOut == 0 {
				f.TimeOut = 60
			}
			if err := netlink.ConntrackUpdate(netlink.ConntrackTable, fam, f); err != nil {
				if !errors.Is(err, unix.ENOENT) { // gone meanwhile
					errs = append(errs, fmt.Errorf("mark conntrack entry %s: %w", fw, err))
				}
				continue
			}
			n++
		}
	}
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		tcp, err := netlink.SocketDiagTCP(fam)
		if err != nil {
			errs = append(errs, fmt.Errorf("list TCP sockets: %w", err))
		}
		udp, err := netlink.SocketDiagUDP(fam)
		if err != nil {
			errs = append(errs, fmt.Errorf("list UDP sockets: %w", err))
		}
		for i, list := range [][]*netlink.Socket{tcp, udp} {
			proto := uint8(unix.IPPROTO_TCP)
			if i == 1 {
				proto = unix.IPPROTO_UDP
			}
			for _, sk := range list {
				k, ok := socketKey(proto, sk)
				if !ok || skip(k.src.Addr()) || skip(k.dst.Addr()) {
					continue
				}
				var err error
				switch {
				case proto == unix.IPPROTO_TCP:
					// Also when conntrack has an entry: its window
					// may be unknown or stale (ctliberal.go).
					err = markTCPLiberal(k, s.FWMark)
				case !seen[k]:
					err = createMarkedUDP(k, s.FWMark)
				}
				if err != nil {
					errs = append(errs, err)
					continue
				}
				if !seen[k] {
					seen[k] = true
					n++
				}
			}
		}
	}
	return n, errors.Join(errs...)
}

func (k connKey) String() string { return fmt.Sprintf("proto %d %s -> %s", k.proto, k.src, k.dst) }

func tupleKey(t netlink.IPTuple) connKey {
	src, _ := netip.AddrFromSlice(t.SrcIP)
	dst, _ := netip.AddrFromSlice(t.DstIP)
	return connKey{t.Protocol, netip.AddrPortFrom(src.Unmap(), t.SrcPort), netip.AddrPortFrom(dst.Unmap(), t.DstPort)}
}

// socketKey returns the connection of a socket that has a peer: TCP in a
// synchronised state, UDP connected. A dual-stack socket's IPv4 peer is
// unmapped.
func socketKey(proto uint8, sk *netlink.Socket) (connKey, bool) {
	if proto == unix.IPPROTO_TCP {
		switch sk.State {
		case 1, 4, 5, 8, 9, 11: // established, fin-wait-1/2, close-wait, last-ack, closing
		default:
			return connKey{}, false
		}
	}
	if sk.ID.DestinationPort == 0 {
		return connKey{}, false
	}
	src, ok1 := netip.AddrFromSlice(sk.ID.Source)
	dst, ok2 := netip.AddrFromSlice(sk.ID.Destination)
	src, dst = src.Unmap(), dst.Unmap()
	if !ok1 || !ok2 || dst.IsUnspecified() || src.Is4() != dst.Is4() {
		return connKey{}, false
	}
	return connKey{proto, netip.AddrPortFrom(src, sk.ID.SourcePort), netip.AddrPortFrom(dst, sk.ID.DestinationPort)}, true
}

// createMarkedUDP adds a conntrack entry for the UDP connection k with the
// mark; if one appeared meanwhile (its next packet), that one is marked
// instead.
func createMarkedUDP(k connKey, mark uint32) error {
	fam := netlink.InetFamily(unix.AF_INET)
	if k.src.Addr().Is6() {
		fam = unix.AF_INET6
	}
	f := &netlink.ConntrackFlow{
		FamilyType: uint8(fam),
		Forward: netlink.IPTuple{Protocol: k.proto, SrcIP: net.IP(k.src.Addr().AsSlice()), SrcPort: k.src.Port(),
			DstIP: net.IP(k.dst.Addr().AsSlice()), DstPort: k.dst.Port()},
		Reverse: netlink.IPTuple{Protocol: k.proto, SrcIP: net.IP(k.dst.Addr().AsSlice()), SrcPort: k.dst.Port(),
			DstIP: net.IP(k.src.Addr().AsSlice()), DstPort: k.src.Port()},
		Mark: mark,
		// The kernel's own timeout for an idle UDP stream.
		TimeOut: 120,
	}
	err := netlink.ConntrackCreate(netlink.ConntrackTable, fam, f)
	if errors.Is(err, unix.EEXIST) {
		err = netlink.ConntrackUpdate(netlink.ConntrackTable, fam, f)
	}
	if err != nil {
		return fmt.Errorf("add conntrack entry for %s: %w", k, err)
	}
	return nil
}
