package tun

import "net/netip"

// Subtract returns the prefixes covering exactly the addresses of include
// that are in no prefix of exclude. Routing the result leaves excluded
// destinations on whatever route they had before, which is what "never routed
// into the TUN" means without policy routing.
func Subtract(include, exclude []netip.Prefix) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(include))
	for _, p := range include {
		out = append(out, subtractAll(p, exclude)...)
	}
	return out
}

func subtractAll(p netip.Prefix, exclude []netip.Prefix) []netip.Prefix {
	for _, e := range exclude {
		if e.Addr().Is4() != p.Addr().Is4() || !e.Overlaps(p) {
			continue
		}
		if e.Bits() <= p.Bits() {
			return nil // e covers all of p
		}
		// e lies inside p: split p into its two halves and cut each.
		lo, hi := halves(p)
		return append(subtractAll(lo, exclude), subtractAll(hi, exclude)...)
	}
	return []netip.Prefix{p}
}

// halves splits p (which must be shorter than a host prefix) in two.
func halves(p netip.Prefix) (netip.Prefix, netip.Prefix) {
	bits := p.Bits() + 1
	lo := netip.PrefixFrom(p.Addr(), bits)
	b := p.Addr().AsSlice()
	i := p.Bits()
	b[i/8] |= 0x80 >> (i % 8)
	a, _ := netip.AddrFromSlice(b)
	return lo, netip.PrefixFrom(a, bits)
}
