package inspect

// quicHelloServerName reads the host_name of the server_name extension
// from a complete TLS handshake message msg (type, 3-byte length, body).
// It is a minimal stand-in so that the QUIC reader compiles and is tested
// alone; it will be replaced by ClientHelloServerName when tls.go lands.
// The name is a slice of msg.
func quicHelloServerName(msg []byte) ([]byte, Status) {
	if len(msg) < 4 || msg[0] != 1 {
		return nil, Invalid
	}
	if int(msg[1])<<16|int(msg[2])<<8|int(msg[3]) != len(msg)-4 {
		return nil, Invalid
	}
	b := msg[4:]
	// legacy_version and random.
	if len(b) < 2+32 {
		return nil, Invalid
	}
	b = b[2+32:]
	var ok bool
	if _, b, ok = quicHelloCut8(b); !ok { // legacy_session_id
		return nil, Invalid
	}
	if _, b, ok = quicHelloCut16(b); !ok { // cipher_suites
		return nil, Invalid
	}
	if _, b, ok = quicHelloCut8(b); !ok { // legacy_compression_methods
		return nil, Invalid
	}
	if len(b) == 0 {
		return nil, NoName // no extensions at all
	}
	exts, rest, ok := quicHelloCut16(b)
	if !ok || len(rest) != 0 {
		return nil, Invalid
	}
	for len(exts) > 0 {
		if len(exts) < 2 {
			return nil, Invalid
		}
		typ := int(exts[0])<<8 | int(exts[1])
		var data []byte
		if data, exts, ok = quicHelloCut16(exts[2:]); !ok {
			return nil, Invalid
		}
		if typ != 0 { // server_name
			continue
		}
		list, rest, ok := quicHelloCut16(data)
		if !ok || len(rest) != 0 {
			return nil, Invalid
		}
		for len(list) > 0 {
			nameType := list[0]
			var name []byte
			if name, list, ok = quicHelloCut16(list[1:]); !ok {
				return nil, Invalid
			}
			if nameType == 0 { // host_name
				if len(name) == 0 {
					return nil, Invalid
				}
				return name, Found
			}
		}
		return nil, NoName
	}
	return nil, NoName
}

// quicHelloCut8 splits a vector with a 1-byte length off the front of b.
func quicHelloCut8(b []byte) (vec, rest []byte, ok bool) {
	if len(b) < 1 || len(b)-1 < int(b[0]) {
		return nil, nil, false
	}
	n := 1 + int(b[0])
	return b[1:n], b[n:], true
}

// quicHelloCut16 splits a vector with a 2-byte length off the front of b.
func quicHelloCut16(b []byte) (vec, rest []byte, ok bool) {
	if len(b) < 2 {
		return nil, nil, false
	}
	n := 2 + (int(b[0])<<8 | int(b[1]))
	if len(b) < n {
		return nil, nil, false
	}
	return b[2:n], b[n:], true
}
