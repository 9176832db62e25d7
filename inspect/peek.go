package inspect

// IP protocol numbers, as in filter.Proto*.
const (
	protoTCP = 6
	protoUDP = 17
)

const dnsPort = 53

// QUICPort is the UDP port whose flows are read as QUIC.
const QUICPort = 443

// CanPeek reports whether tunfw can read the name of a flow of proto
// (an IP protocol number) to dstPort from its first bytes: TCP where the
// client speaks first (TLS, HTTP) and QUIC on UDP 443. Other flows are
// judged by the name DNS gave their destination, if any.
func CanPeek(proto uint8, dstPort uint16) bool {
	switch proto {
	case protoTCP:
		// DNS over TCP carries no TLS or HTTP name; tunfw reads its
		// queries and answers instead (the DNS relay).
		return dstPort != dnsPort && !IsServerFirstPort(dstPort)
	case protoUDP:
		return dstPort == QUICPort
	}
	return false
}
