// Package gaddr converts addresses between net/netip and gVisor's tcpip,
// without allocating: the forwarders convert per packet.
package gaddr

import (
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
)

// To converts a netip.Addr for gVisor.
func To(a netip.Addr) tcpip.Address {
	if a.Is4() {
		return tcpip.AddrFrom4(a.As4())
	}
	return tcpip.AddrFrom16(a.As16())
}

// From converts a gVisor address (AsSlice would allocate).
func From(a tcpip.Address) netip.Addr {
	if a.Len() == 4 {
		return netip.AddrFrom4(a.As4())
	}
	return netip.AddrFrom16(a.As16())
}
