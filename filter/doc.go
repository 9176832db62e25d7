// Package filter is tunfw's policy: the rule configuration and its
// validation, the compiled Ruleset, IPv4/IPv6 header parsing, the stateful
// flow table that judges each flow on its first packet, and the builder of
// every packet tunfw writes itself (BuildUDP, BuildICMP, BuildICMPError,
// BuildReject), which returns the Packet it built for Engine.Outbound.
//
// The package never touches sockets. The per-packet path (ParsePacket,
// Engine.Inbound/Outbound for known flows, the builders) does not allocate.
//
// Fragment policy: tunfw drops IP fragments (IPv4 with MF or a non-zero
// offset, IPv6 with a Fragment header). The TUN MTU is the local senders'
// path MTU, so they have no reason to fragment; reassembly would be a memory
// and complexity cost for traffic that should not exist.
package filter
