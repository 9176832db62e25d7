// Package inspect reads the name a client asks for from the first bytes of
// its flow: the server_name of a TLS ClientHello, the Host header of an
// HTTP/1.x request, the server_name of the ClientHello inside a QUIC
// Initial. The TLS and HTTP parsers allocate nothing: a name they return
// is a slice of the caller's bytes (or of its scratch buffer). The QUIC
// reader decrypts, so it holds its own buffers, set up once per flow.
//
// A parser is given everything the client has sent so far and answers
// whether it found the name, needs more bytes, or can tell that none will
// come (another protocol, or a message without the extension).
package inspect

// Status is what a parser learned from the bytes it was given.
type Status uint8

const (
	// NeedMore: the bytes so far are a valid prefix of a message that
	// may carry a name; read more and call again with all of them.
	NeedMore Status = iota
	// Found: the name was read.
	Found
	// NoName: the message is complete (or not this protocol at all)
	// and carries no name.
	NoName
	// Invalid: the bytes claim to be this protocol but break its rules.
	Invalid
)

func (s Status) String() string {
	switch s {
	case NeedMore:
		return "need-more"
	case Found:
		return "found"
	case NoName:
		return "no-name"
	case Invalid:
		return "invalid"
	}
	return "unknown"
}
