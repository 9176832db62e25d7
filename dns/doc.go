// Package dns reads the DNS traffic tunfw forwards to the real resolver
// without changing it: the name a query asks for, and which addresses the
// answers give for that name, remembered per client so that a later flow to
// one of those addresses can be told by name. It also writes the answers
// tunfw gives itself to queries for blocked names.
//
// Messages are read with golang.org/x/net/dns/dnsmessage. DNS over TCP is
// the same messages, each after a 2-byte length (RFC 1035 4.2.2); see
// NextTCPMessage.
package dns

// CanaryName is the name Firefox (and resolvers following Mozilla's
// scheme) ask before turning on DNS over HTTPS by default: when the local
// resolver answers NXDOMAIN (or no address) for it, the browser keeps
// using the system resolver. tunfw must see DNS to learn names and block
// them, and DoH to a public resolver would hide every later query, so the
// caller answers this name itself with Answer(query, BlockNXDomain, ...)
// whatever the rules say.
const CanaryName = "use-application-dns.net"
