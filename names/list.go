package names

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
)

// maxLine bounds a line of a list file; adblock lists have cosmetic rules
// of a few KiB, nothing legitimate comes near this.
const maxLine = 64 << 10

// ReadList adds the names of a list file read from r; path names it in
// errors. It reads the formats block lists are published in, one entry a
// line:
//
//   - a name or pattern: "example.com", "*.example.com";
//   - hosts-file lines: "0.0.0.0 example.com", "127.0.0.1 a.com b.com"
//     (each name exactly; localhost-style entries such as "localhost",
//     "broadcasthost", "ip6-loopback" are left out);
//   - adblock network rules for a whole host: "||example.com^", with any
//     "$options" ignored, meaning example.com and every name below it.
//
// Blank lines and lines starting with '#' or '!' are comments, as is the
// rest of a line from a '#' after a space. Other adblock rules (exceptions
// "@@...", cosmetic "##", "#@#"..., URL and regex patterns, "[Adblock]"
// headers) are skipped; skipped returns how many.
//
// A bad line stops the read with an error "path:line: message". The names
// read before it stay in s: a caller discards the set on error.
func (s *Set) ReadList(r io.Reader, path string) (skipped int, err error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), maxLine)
	var buf [maxName]byte
	line := 0
	for sc.Scan() {
		line++
		b := sc.Bytes()
		if line == 1 {
			b = bytes.TrimPrefix(b, []byte("\xef\xbb\xbf")) // UTF-8 BOM
		}
		skip, err := s.readLine(b, &buf)
		if err != nil {
			return skipped, fmt.Errorf("%s:%d: %w", path, line, err)
		}
		if skip {
			skipped++
		}
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return skipped, fmt.Errorf("%s:%d: line longer than %d bytes", path, line+1, maxLine)
		}
		return skipped, fmt.Errorf("reading %s: %w", path, err)
	}
	return skipped, nil
}

// readLine adds the names of one line, or reports that it skipped it.
func (s *Set) readLine(b []byte, buf *[maxName]byte) (skip bool, err error) {
	b = bytes.TrimSpace(b)
	switch {
	case len(b) == 0 || b[0] == '#' || b[0] == '!':
		return false, nil
	case bytes.HasPrefix(b, []byte("||")):
		return s.adblock(b[2:], buf)
	case b[0] == '@' || b[0] == '|' || b[0] == '/' || b[0] == '[':
		return true, nil // exception, URL or regex rule, "[Adblock Plus 2.0]"
	case cosmetic(b):
		return true, nil
	}
	if i := commentAt(b); i >= 0 {
		b = bytes.TrimSpace(b[:i])
	}
	first, rest := field(b)
	if len(rest) == 0 {
		if bytes.ContainsAny(first, "^$|") {
			return true, nil // other adblock rule ("example.com^", "$domain=...")
		}
		n, err := canon(first, buf)
		if err != nil {
			return false, err
		}
		return false, s.addCanon(buf[:n])
	}
	if !isAddr(first) {
		return false, fmt.Errorf("%q is neither a name nor a hosts-file address before names", first)
	}
	for len(rest) > 0 {
		var name []byte
		name, rest = field(rest)
		n, err := canon(name, buf)
		if err != nil {
			return false, err
		}
		if localName(buf[:n]) {
			continue
		}
		if err := s.addCanon(buf[:n]); err != nil {
			return false, err
		}
	}
	return false, nil
}

// adblock reads what follows "||". Only "||host^" (then nothing, "|", or
// "$options") names a host and all below it; the rest are URL patterns.
func (s *Set) adblock(b []byte, buf *[maxName]byte) (skip bool, err error) {
	i := bytes.IndexByte(b, '^')
	if i < 0 {
		return true, nil
	}
	host, after := b[:i], b[i+1:]
	if len(after) > 0 && after[0] == '|' {
		after = after[1:]
	}
	if len(after) > 0 && after[0] != '$' {
		return true, nil
	}
	if len(host) == 0 || bytes.ContainsAny(host, "*/:?=&%|~,# \t") {
		return true, nil
	}
	n, err := canon(host, buf)
	if err != nil {
		return false, err
	}
	if err := s.insert(buf[:n], exact); err != nil {
		return false, err
	}
	return false, s.insert(buf[:n], below)
}

// cosmetic reports an adblock element-hiding or scriptlet rule:
// "example.com##.ad", "#@#", "#?#", "#$#", "#%#" after a domain list.
func cosmetic(b []byte) bool {
	for i := 1; i+1 < len(b); i++ {
		if b[i] != '#' || b[i-1] == ' ' || b[i-1] == '\t' {
			continue
		}
		switch b[i+1] {
		case '#', '@', '?', '$', '%':
			return true
		}
	}
	return false
}

// commentAt returns the index of a '#' that starts a trailing comment (at
// the start or after a blank), or -1.
func commentAt(b []byte) int {
	for i, c := range b {
		if c == '#' && (i == 0 || b[i-1] == ' ' || b[i-1] == '\t') {
			return i
		}
	}
	return -1
}

// field splits b, trimmed, at its first run of blanks.
func field(b []byte) (first, rest []byte) {
	i := bytes.IndexAny(b, " \t")
	if i < 0 {
		return b, nil
	}
	return b[:i], bytes.TrimLeft(b[i:], " \t")
}

// isAddr reports whether f is an IP address, as a hosts line starts with.
func isAddr(f []byte) bool {
	switch string(f) {
	case "0.0.0.0", "127.0.0.1", "::", "::1":
		return true
	}
	for _, c := range f {
		if c <= ' ' || c == 0x7f {
			return false // a control byte in a zone ("::%\r") is no address
		}
	}
	_, err := netip.ParseAddr(string(f))
	return err == nil
}

// localName reports the names hosts files give the machine itself, which a
// block list must not take in.
func localName(n []byte) bool {
	switch string(n) {
	case "localhost", "localhost.localdomain", "local", "broadcasthost",
		"ip6-localhost", "ip6-loopback", "ip6-localnet", "ip6-mcastprefix",
		"ip6-allnodes", "ip6-allrouters", "ip6-allhosts", "0.0.0.0":
		return true
	}
	return false
}
