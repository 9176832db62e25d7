package inspect

// MaxHello is the largest ClientHello handshake message, its 4-byte header
// included, that the TLS parsers read: a body of up to 16 KiB, the most one
// TLS record carries. Real ClientHellos, post-quantum key shares included,
// are a few KiB. A longer one is Invalid, not NoName: padding a hello past
// what a firewall reassembles is a way to hide its name, so it must not
// pass as a flow that simply has none.
const MaxHello = 4 + maxRecordLen

const (
	recordHeaderLen    = 5
	maxRecordLen       = 1 << 14 // TLSPlaintext.length limit, RFC 8446 5.1
	handshakeHeaderLen = 4

	recordTypeHandshake      = 0x16
	handshakeTypeClientHello = 1
	extensionServerName      = 0
	serverNameTypeHostName   = 0

	maxNameLen = 255
)

// TLSServerName reads the server_name (SNI, host_name type) of the TLS
// ClientHello at the start of a TCP stream: stream is every byte the client
// has sent so far, from the first TLS record on.
//
// The ClientHello may be split over several TLS records and over any number
// of TCP segments. When it sits in its first record, the name returned is a
// slice of stream; when it spans records, its handshake bytes are gathered
// into *scratch and the name is a slice of scratch.
//
// The status is NeedMore while the ClientHello is incomplete; NoName when
// the stream is not TLS (its first byte is not 0x16, a handshake record,
// its second not 3, TLS's major version, or the first handshake message is
// not a ClientHello) or the ClientHello has no
// server_name; Invalid when lengths are inconsistent, a record of another
// type comes before the ClientHello ends, the ClientHello is longer than
// MaxHello, or it names two host names.
func TLSServerName(stream []byte, scratch *[MaxHello]byte) (name []byte, st Status) {
	n := 0     // handshake bytes gathered into scratch
	want := -1 // length of the handshake message, once its header is known
	for off := 0; ; {
		rest := stream[off:]
		if len(rest) == 0 {
			return nil, NeedMore
		}
		// Anything else than a TLS handshake record first is another
		// protocol; after the first record it breaks the rule that
		// handshake messages are not interleaved with other records.
		notTLS := rest[0] != recordTypeHandshake || (len(rest) > 1 && rest[1] != 3)
		if notTLS && off == 0 {
			return nil, NoName
		}
		if notTLS {
			return nil, Invalid
		}
		if len(rest) < recordHeaderLen {
			return nil, NeedMore
		}
		rlen := int(rest[3])<<8 | int(rest[4])
		if rlen == 0 || rlen > maxRecordLen {
			// Empty handshake records are forbidden (RFC 8446 5.1).
			return nil, Invalid
		}
		frag := rest[recordHeaderLen:]
		whole := len(frag) >= rlen
		if whole {
			frag = frag[:rlen]
		}
		if off == 0 && len(frag) > 0 && frag[0] != handshakeTypeClientHello {
			return nil, NoName
		}
		if off == 0 && len(frag) >= handshakeHeaderLen {
			want = handshakeHeaderLen + uint24(frag[1:])
			if want > MaxHello {
				return nil, Invalid
			}
			if want <= rlen {
				// The common case: the ClientHello fits its first
				// record and is read in place.
				if len(frag) < want {
					return nil, NeedMore
				}
				return parseClientHello(frag[:want])
			}
		}

		limit := MaxHello
		if want >= 0 {
			limit = want
		}
		n += copy(scratch[n:limit], frag)
		if want < 0 && n >= handshakeHeaderLen {
			// The header itself was split over records.
			if scratch[0] != handshakeTypeClientHello {
				return nil, NoName
			}
			want = handshakeHeaderLen + uint24(scratch[1:])
			if want > MaxHello {
				return nil, Invalid
			}
			// Bytes past the message belong to the next one.
			n = min(n, want)
		}
		if want >= 0 && n == want {
			return parseClientHello(scratch[:want])
		}
		if !whole {
			return nil, NeedMore
		}
		off += recordHeaderLen + rlen
	}
}

// ClientHelloServerName reads the server_name of a bare ClientHello
// handshake message (type 1, 3-byte length, body), as QUIC carries it in
// CRYPTO frames. msg holds the message's bytes received so far; bytes after
// the message are ignored. The name returned is a slice of msg. Statuses are
// those of TLSServerName.
func ClientHelloServerName(msg []byte) ([]byte, Status) {
	if len(msg) == 0 {
		return nil, NeedMore
	}
	if msg[0] != handshakeTypeClientHello {
		return nil, NoName
	}
	if len(msg) < handshakeHeaderLen {
		return nil, NeedMore
	}
	want := handshakeHeaderLen + uint24(msg[1:])
	if want > MaxHello {
		return nil, Invalid
	}
	if len(msg) < want {
		return nil, NeedMore
	}
	return parseClientHello(msg[:want])
}

// parseClientHello reads the host name in the server_name extension of
// the complete ClientHello m (handshake header included). Every length is
// checked against the one that holds it, and the whole extension list is
// walked so that a second server_name cannot hide behind the first.
func parseClientHello(m []byte) ([]byte, Status) {
	b := m[handshakeHeaderLen:]
	// legacy_version, random.
	if len(b) < 2+32 || b[0] != 3 {
		return nil, Invalid
	}
	b = b[2+32:]
	sessionID, b, ok := vec8(b)
	if !ok || len(sessionID) > 32 {
		return nil, Invalid
	}
	suites, b, ok := vec16(b)
	if !ok || len(suites) < 2 || len(suites)%2 != 0 {
		return nil, Invalid
	}
	compression, b, ok := vec8(b)
	if !ok || len(compression) < 1 {
		return nil, Invalid
	}
	if len(b) == 0 {
		// A TLS 1.2 hello may end here, without extensions.
		return nil, NoName
	}
	exts, b, ok := vec16(b)
	if !ok || len(b) != 0 {
		return nil, Invalid
	}

	var name []byte
	seen := false
	for len(exts) > 0 {
		if len(exts) < 4 {
			return nil, Invalid
		}
		typ := int(exts[0])<<8 | int(exts[1])
		var data []byte
		data, exts, ok = vec16(exts[2:])
		if !ok {
			return nil, Invalid
		}
		if typ != extensionServerName {
			continue
		}
		if seen {
			// RFC 8446 4.2: at most one extension of a type.
			return nil, Invalid
		}
		seen = true
		var st Status
		name, st = parseServerNameList(data)
		if st == Invalid {
			return nil, Invalid
		}
	}
	if name == nil {
		return nil, NoName
	}
	return name, Found
}

// parseServerNameList reads the host_name of a server_name extension's
// data (RFC 6066 3).
func parseServerNameList(data []byte) ([]byte, Status) {
	list, rest, ok := vec16(data)
	if !ok || len(rest) != 0 || len(list) == 0 {
		return nil, Invalid
	}
	var name []byte
	for len(list) > 0 {
		typ := list[0]
		var v []byte
		v, list, ok = vec16(list[1:])
		if !ok {
			return nil, Invalid
		}
		if typ != serverNameTypeHostName {
			continue
		}
		// Two host names would leave the server free to pick the one
		// the firewall did not judge.
		if name != nil || len(v) == 0 || len(v) > maxNameLen {
			return nil, Invalid
		}
		name = v
	}
	if name == nil {
		return nil, NoName
	}
	return name, Found
}

// vec8 splits off a vector with a 1-byte length prefix.
func vec8(b []byte) (v, rest []byte, ok bool) {
	if len(b) < 1 {
		return nil, nil, false
	}
	n := int(b[0])
	if len(b)-1 < n {
		return nil, nil, false
	}
	return b[1 : 1+n], b[1+n:], true
}

// vec16 splits off a vector with a 2-byte length prefix.
func vec16(b []byte) (v, rest []byte, ok bool) {
	if len(b) < 2 {
		return nil, nil, false
	}
	n := int(b[0])<<8 | int(b[1])
	if len(b)-2 < n {
		return nil, nil, false
	}
	return b[2 : 2+n], b[2+n:], true
}

func uint24(b []byte) int {
	return int(b[0])<<16 | int(b[1])<<8 | int(b[2])
}
