package inspect

import "bytes"

// HTTPHost reads the name an HTTP/1.x request at the start of a TCP stream
// asks for: stream is every byte the client has sent so far. The name comes
// from the request target when it carries an authority (CONNECT's
// authority-form, or absolute-form, which RFC 9112 3.2.2 makes win over
// the Host header), else from the Host header. The port is stripped. The
// name returned is a slice of stream.
//
// The status is NeedMore until the header block ends; the caller bounds how
// long it waits. NoName when the stream is not an HTTP/1.x request (a
// method other than GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE
// and PATCH, told from the first bytes; a version other than HTTP/1.x), when the request has no
// Host or an empty one, and when the host is an IP literal (v4, [v6], or a
// host ending in a numeric label, which URL parsers take for IPv4). Invalid
// when the request breaks rules a server enforces: two Host headers, a
// folded header line (obs-fold), whitespace before a header's colon, a bare
// CR, a malformed request line or authority, a name longer than 255 bytes.
// Those are refused, not skipped, because servers that read them otherwise
// than the firewall would serve a name it did not judge.
func HTTPHost(stream []byte) ([]byte, Status) {
	// Method: decided on the first bytes, so other protocols leave at once.
	i := 0
	for i < len(stream) && i <= maxMethodLen && stream[i] != ' ' {
		i++
	}
	isMethod, isPrefix := knownMethod(stream[:i])
	if !isPrefix {
		return nil, NoName
	}
	if i == len(stream) {
		return nil, NeedMore
	}
	if stream[i] != ' ' || !isMethod {
		return nil, NoName
	}
	connect := string(stream[:i]) == "CONNECT"
	b := stream[i+1:]

	// Request line: target SP "HTTP/1." DIGIT, then CRLF or LF.
	eol := bytes.IndexByte(b, '\n')
	line := b
	if eol >= 0 {
		line = b[:eol]
	}
	// A final CR is the line end's, or may be once the LF comes.
	line = trimCR(line)
	sp := bytes.IndexByte(line, ' ')
	target := line
	if sp >= 0 {
		target = line[:sp]
	}
	for _, c := range target {
		if c < 0x21 || c == 0x7f {
			return nil, Invalid
		}
	}
	if sp < 0 {
		if eol >= 0 {
			// HTTP/0.9, which has no headers.
			return nil, NoName
		}
		return nil, NeedMore
	}
	if len(target) == 0 {
		return nil, Invalid
	}
	version := line[sp+1:]
	const v1 = "HTTP/1."
	if k := min(len(version), len(v1)); string(version[:k]) != v1[:k] {
		return nil, NoName
	}
	if eol < 0 {
		return nil, NeedMore
	}
	if len(version) != len(v1)+1 || !isDigit(version[len(v1)]) {
		return nil, Invalid
	}
	b = b[eol+1:]

	// Header block, up to the empty line.
	var host []byte
	hostSeen := false
	for {
		if len(b) > 0 && (b[0] == ' ' || b[0] == '\t') {
			return nil, Invalid // obs-fold (RFC 9112 5.2)
		}
		eol := bytes.IndexByte(b, '\n')
		if eol < 0 {
			return nil, NeedMore
		}
		line := trimCR(b[:eol])
		b = b[eol+1:]
		if len(line) == 0 {
			break
		}
		if bytes.IndexByte(line, '\r') >= 0 {
			return nil, Invalid
		}
		colon := bytes.IndexByte(line, ':')
		if colon <= 0 {
			return nil, Invalid
		}
		field := line[:colon]
		for _, c := range field {
			if !isTokenChar(c) {
				return nil, Invalid // includes "Host :" (RFC 9112 5.1)
			}
		}
		if !isHost(field) {
			continue
		}
		if hostSeen {
			return nil, Invalid // RFC 9112 3.2
		}
		hostSeen = true
		host = trimOWS(line[colon+1:])
	}

	switch {
	case connect:
		if target[0] == '/' || target[0] == '*' {
			return nil, Invalid
		}
		return hostName(target)
	case target[0] == '/' || string(target) == "*":
		return hostName(host)
	}
	// Absolute-form: scheme "://" authority [path].
	s := bytes.Index(target, []byte("://"))
	if s <= 0 {
		return nil, Invalid
	}
	for j, c := range target[:s] {
		if !isAlpha(c) && (j == 0 || !isDigit(c) && c != '+' && c != '-' && c != '.') {
			return nil, Invalid
		}
	}
	authority := target[s+3:]
	for j, c := range authority {
		if c == '/' || c == '?' || c == '#' {
			authority = authority[:j]
			break
		}
	}
	if at := bytes.LastIndexByte(authority, '@'); at >= 0 {
		authority = authority[at+1:]
	}
	return hostName(authority)
}

// maxMethodLen is the length of the longest method knownMethod accepts.
const maxMethodLen = 7

// knownMethod tells whether m is a method tunfw reads requests of, and
// whether it is a prefix of one.
func knownMethod(m []byte) (isMethod, isPrefix bool) {
	for _, k := range [...]string{"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"} {
		if len(m) <= len(k) && string(m) == k[:len(m)] {
			isPrefix = true
			if len(m) == len(k) {
				return true, true
			}
		}
	}
	return false, isPrefix
}

// hostName splits the port off an authority (host [":" port]) and tells an
// IP literal, which is no name, from a name.
func hostName(a []byte) ([]byte, Status) {
	if len(a) == 0 {
		return nil, NoName
	}
	h := a
	if a[0] == '[' {
		end := bytes.IndexByte(a, ']')
		if end < 0 || !isPort(a[end+1:]) {
			return nil, Invalid
		}
		return nil, NoName
	}
	if colon := bytes.LastIndexByte(a, ':'); colon >= 0 {
		if !isPort(a[colon:]) {
			return nil, Invalid
		}
		h = a[:colon]
	}
	if len(h) == 0 || len(h) > maxNameLen || bytes.IndexByte(h, ':') >= 0 || bytes.IndexByte(h, '@') >= 0 {
		return nil, Invalid
	}
	if endsInNumber(h) {
		return nil, NoName
	}
	return h, Found
}

// isPort tells whether p is empty or ":" followed by digits.
func isPort(p []byte) bool {
	if len(p) == 0 {
		return true
	}
	if p[0] != ':' {
		return false
	}
	for _, c := range p[1:] {
		if !isDigit(c) {
			return false
		}
	}
	return true
}

// endsInNumber tells whether the last label of h (a trailing dot aside) is
// a decimal or 0x-hex number: the WHATWG URL parser reads such a host as
// IPv4 ("127.1", "0x7f.1"), so it is an address, not a name.
func endsInNumber(h []byte) bool {
	if h[len(h)-1] == '.' {
		h = h[:len(h)-1]
	}
	label := h[bytes.LastIndexByte(h, '.')+1:]
	if len(label) == 0 {
		return false
	}
	if len(label) >= 2 && label[0] == '0' && (label[1] == 'x' || label[1] == 'X') {
		for _, c := range label[2:] {
			if !isDigit(c) && !('a' <= c|0x20 && c|0x20 <= 'f') {
				return false
			}
		}
		return true
	}
	for _, c := range label {
		if !isDigit(c) {
			return false
		}
	}
	return true
}

func isHost(field []byte) bool {
	if len(field) != 4 {
		return false
	}
	for i, c := range field {
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != "host"[i] {
			return false
		}
	}
	return true
}

// isTokenChar reports whether c may appear in a header field name
// (RFC 9110 5.6.2 tchar).
func isTokenChar(c byte) bool {
	if isAlpha(c) || isDigit(c) {
		return true
	}
	switch c {
	case '!', '#', '$', '%', '&', '\'', '*', '+', '-', '.', '^', '_', '`', '|', '~':
		return true
	}
	return false
}

func isAlpha(c byte) bool { return 'a' <= c|0x20 && c|0x20 <= 'z' }
func isDigit(c byte) bool { return '0' <= c && c <= '9' }

func trimCR(b []byte) []byte {
	if len(b) > 0 && b[len(b)-1] == '\r' {
		return b[:len(b)-1]
	}
	return b
}

// trimOWS trims the spaces and tabs around a field value.
func trimOWS(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\t') {
		b = b[1:]
	}
	for len(b) > 0 && (b[len(b)-1] == ' ' || b[len(b)-1] == '\t') {
		b = b[:len(b)-1]
	}
	return b
}
