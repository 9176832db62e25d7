package inspect

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
)

// QUICMaxCrypto bounds the CRYPTO stream bytes a QUICInitial keeps. A
// ClientHello longer than this, or CRYPTO data past it, gives Invalid: the
// flow is judged without a name rather than by holding more of it.
const QUICMaxCrypto = 16 << 10

const (
	quicVersion1 = 0x00000001 // RFC 9000
	quicVersion2 = 0x6b3343cf // RFC 9369

	// Initial salts, RFC 9001 section 5.2 and RFC 9369 section 3.3.1.
	quicSaltV1 = "\x38\x76\x2c\xf7\xf5\x59\x34\xb3\x4d\x17\x9a\xe6\xa4\xc8\x0c\xad\xcc\xbb\x7f\x0a"
	quicSaltV2 = "\x0d\xed\xe3\xde\xf7\x00\xa6\xdb\x81\x93\x81\xbe\x6e\x26\x9d\xcb\xf9\xbd\x2e\xd9"

	// A server drops a datagram carrying a client Initial that is
	// shorter (RFC 9000 section 14.1), so such a datagram starts nothing.
	quicMinInitialDatagram = 1200
	// A client's first Destination Connection ID is 8 to 20 bytes
	// (RFC 9000 section 7.2 and 17.2).
	quicMinDCID = 8
	quicMaxCID  = 20

	quicMaxVarint = 1<<62 - 1
)

// Long header packet types, as numbered by QUIC version 1.
const (
	quicInitial = iota
	quic0RTT
	quicHandshake
	quicRetry
)

// QUICInitial gathers the CRYPTO stream of a client's QUIC Initial packets
// (QUIC v1, RFC 9000/9001, and v2, RFC 9369) until the ClientHello inside
// is complete, and reads its server_name. The zero value is ready; use one
// per flow.
//
// Unlike the other parsers of this package it decrypts, so it keeps a
// copy: the name it returns is a slice of its own buffer, valid as long
// as the QUICInitial is. The datagrams given to Add are never modified.
// Memory stays under QUICMaxCrypto (plus an eighth for the map of the
// bytes received) and one datagram.
type QUICInitial struct {
	// Set from the first Initial packet; aead is nil until then.
	version uint32
	dcid    [quicMaxCID]byte
	dcidLen uint8
	aead    cipher.AEAD
	hp      cipher.Block
	iv      [12]byte

	nonce  [12]byte
	mask   [16]byte
	nextPN int64 // one past the largest packet number decrypted
	proven bool  // a packet decrypted: this is QUIC, breaking rules is Invalid

	pkt    []byte // one packet, copied to be decrypted in place
	crypto []byte // the CRYPTO stream from offset 0
	have   []byte // bit i set once crypto[i] was received
	contig int    // crypto[:contig] is all received

	done   bool // status is final
	status Status
	name   []byte
}

// Add takes one UDP datagram the client sent. The datagram may hold
// several coalesced QUIC packets; all but Initial packets are skipped.
//
// The Initial keys are derived from the first Initial packet's
// Destination Connection ID (HKDF-SHA256 with the version's salt and
// labels, AES-128-GCM, AES header protection); each Initial packet is
// unprotected and decrypted, and its CRYPTO frames (in any order,
// overlapping, over several packets and datagrams) are gathered. PADDING,
// PING, ACK and CONNECTION_CLOSE frames are skipped; any other frame is
// Invalid in an Initial packet.
//
// Add returns Found with the server_name once the ClientHello is
// complete, and NeedMore until then. It returns NoName when the first
// datagram is not a QUIC Initial of version 1 or 2 (a short header, an
// unknown version, a packet that does not decrypt with the keys its own
// connection ID gives: that is not a QUIC client starting a connection),
// when the ClientHello has no server_name, or when the CRYPTO data would
// pass QUICMaxCrypto. It returns Invalid once a packet has decrypted and
// a later one does not, or breaks the rules: another connection ID or
// version, a malformed frame, CRYPTO data contradicting earlier data.
//
// Found, NoName and Invalid are final: later calls return them again.
func (q *QUICInitial) Add(datagram []byte) ([]byte, Status) {
	if !q.done {
		if st := q.add(datagram); st != NeedMore {
			q.done, q.status = true, st
		}
	}
	if q.done {
		return q.name, q.status
	}
	return nil, NeedMore
}

// bad is the status of input that breaks QUIC's rules: Invalid once the
// flow has proven to be QUIC, NoName before.
func (q *QUICInitial) bad() Status {
	if q.proven {
		return Invalid
	}
	return NoName
}

// add reads the packets of one datagram.
func (q *QUICInitial) add(d []byte) Status {
	datagramLen := len(d)
	if datagramLen == 0 {
		return q.bad()
	}
	for first := true; len(d) > 0; first = false {
		// Past the first packet, what does not parse as another packet
		// of this connection is ignored, as a server does (RFC 9000
		// section 12.2): some clients pad datagrams with bytes that are
		// not packets.
		bad := q.bad()
		if !first {
			bad = NeedMore
		}
		h, ok := quicParseLong(d)
		if !ok {
			return bad
		}
		if h.typ != quicInitial {
			if h.typ == quicRetry { // a server's packet, never a client's
				return bad
			}
			d = d[h.end:] // 0-RTT or Handshake: nothing to read here
			continue
		}
		if q.aead == nil {
			if datagramLen < quicMinInitialDatagram || len(h.dcid) < quicMinDCID {
				return bad
			}
			q.setKeys(h.version, h.dcid)
			if cap(q.pkt) < datagramLen {
				q.pkt = make([]byte, datagramLen)
			}
		} else if h.version != q.version || string(h.dcid) != string(q.dcid[:q.dcidLen]) || datagramLen < quicMinInitialDatagram {
			return bad
		}
		payload, ok := q.open(d[:h.end], h.pnOffset)
		if !ok {
			// Packets coalesced after the first one share its keys, so
			// one that does not decrypt is damaged too.
			return q.bad()
		}
		q.proven = true
		if st := q.frames(payload); st != NeedMore {
			return st
		}
		if st := q.hello(); st != NeedMore {
			return st
		}
		d = d[h.end:]
	}
	return NeedMore
}

// quicLong is what quicParseLong read of a long header packet.
type quicLong struct {
	version  uint32
	typ      int // as numbered by version 1
	dcid     []byte
	pnOffset int // where the protected packet number starts
	end      int // where the packet ends
}

// quicParseLong reads the long header at the front of d (RFC 9000 section
// 17.2): a packet of version 1 or 2 whose length fits in d.
func quicParseLong(d []byte) (h quicLong, ok bool) {
	if len(d) < 7 || d[0]&0x80 == 0 {
		return h, false
	}
	// The fixed bit (0x40) is not checked: a client may grease it
	// (RFC 9287).
	h.version = binary.BigEndian.Uint32(d[1:5])
	h.typ = int(d[0]>>4) & 3
	switch h.version {
	case quicVersion1:
	case quicVersion2:
		// Version 2 rotates the type numbers (RFC 9369 section 3.2).
		h.typ = (h.typ + 3) & 3
	default:
		return h, false
	}
	if h.typ == quicRetry {
		return h, true
	}
	b := d[5:]
	dcid, b, ok := quicCID(b)
	if !ok {
		return h, false
	}
	h.dcid = dcid
	if _, b, ok = quicCID(b); !ok {
		return h, false
	}
	if h.typ == quicInitial {
		var n uint64
		if n, b, ok = quicVarint(b); !ok || n > uint64(len(b)) {
			return h, false
		}
		b = b[n:] // token
	}
	n, b, ok := quicVarint(b)
	if !ok || n > uint64(len(b)) {
		return h, false
	}
	h.pnOffset = len(d) - len(b)
	h.end = h.pnOffset + int(n)
	return h, true
}

// quicCID splits a connection ID with its 1-byte length off the front of b.
func quicCID(b []byte) (cid, rest []byte, ok bool) {
	if len(b) < 1 || b[0] > quicMaxCID || len(b)-1 < int(b[0]) {
		return nil, nil, false
	}
	n := 1 + int(b[0])
	return b[1:n], b[n:], true
}

// quicVarint splits a variable-length integer (RFC 9000 section 16) off
// the front of b.
func quicVarint(b []byte) (v uint64, rest []byte, ok bool) {
	if len(b) == 0 {
		return 0, nil, false
	}
	n := 1 << (b[0] >> 6)
	if len(b) < n {
		return 0, nil, false
	}
	v = uint64(b[0] & 0x3f)
	for _, c := range b[1:n] {
		v = v<<8 | uint64(c)
	}
	return v, b[n:], true
}

// setKeys derives the client's Initial keys for the version and the
// Destination Connection ID of its first Initial packet.
func (q *QUICInitial) setKeys(version uint32, dcid []byte) {
	key, iv, hp := quicClientInitialKeys(version, dcid)
	// NewCipher fails only on a key of the wrong size, and NewGCM only on
	// a block of the wrong size; both sizes are fixed here.
	block, err := aes.NewCipher(key[:])
	if err != nil {
		panic("inspect: AES-128 key: " + err.Error())
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		panic("inspect: AES-128-GCM: " + err.Error())
	}
	hpBlock, err := aes.NewCipher(hp[:])
	if err != nil {
		panic("inspect: AES-128 header protection key: " + err.Error())
	}
	q.version = version
	q.dcidLen = uint8(copy(q.dcid[:], dcid))
	q.aead, q.hp, q.iv = aead, hpBlock, iv
}

// quicClientInitialKeys derives the client's Initial packet protection
// key, IV and header protection key (RFC 9001 section 5.2, RFC 9369
// section 3.3).
func quicClientInitialKeys(version uint32, dcid []byte) (key [16]byte, iv [12]byte, hp [16]byte) {
	salt, prefix := quicSaltV1, "quic "
	if version == quicVersion2 {
		salt, prefix = quicSaltV2, "quicv2 "
	}
	initial, err := hkdf.Extract(sha256.New, dcid, []byte(salt))
	if err != nil {
		panic("inspect: HKDF-Extract of the QUIC initial secret: " + err.Error())
	}
	client := quicExpandLabel(initial, "client in", 32)
	copy(key[:], quicExpandLabel(client, prefix+"key", len(key)))
	copy(iv[:], quicExpandLabel(client, prefix+"iv", len(iv)))
	copy(hp[:], quicExpandLabel(client, prefix+"hp", len(hp)))
	return key, iv, hp
}

// quicExpandLabel is TLS 1.3's HKDF-Expand-Label with an empty context
// (RFC 8446 section 7.1).
func quicExpandLabel(secret []byte, label string, length int) []byte {
	const tls13 = "tls13 "
	info := make([]byte, 0, 4+len(tls13)+len(label))
	info = append(info, byte(length>>8), byte(length), byte(len(tls13)+len(label)))
	info = append(info, tls13...)
	info = append(info, label...)
	info = append(info, 0) // empty context
	out, err := hkdf.Expand(sha256.New, secret, string(info), length)
	if err != nil {
		// Only a length beyond 255 hashes fails; ours are fixed and small.
		panic("inspect: HKDF-Expand-Label " + label + ": " + err.Error())
	}
	return out
}

// open copies the packet p, removes its header protection and decrypts
// it in the copy (RFC 9001 sections 5.3 and 5.4). It returns the
// plaintext payload, a slice of q.pkt.
func (q *QUICInitial) open(p []byte, pnOffset int) ([]byte, bool) {
	// The sample starts 4 bytes past the packet number's start, as if
	// the number were 4 bytes long; a packet without room for it and the
	// AEAD tag cannot be one a client sealed.
	if len(p) < pnOffset+4+16 {
		return nil, false
	}
	if cap(q.pkt) < len(p) {
		q.pkt = make([]byte, len(p))
	}
	pkt := q.pkt[:len(p)]
	copy(pkt, p)
	q.hp.Encrypt(q.mask[:], pkt[pnOffset+4:pnOffset+4+16])
	pkt[0] ^= q.mask[0] & 0x0f
	pnLen := int(pkt[0]&3) + 1
	var truncated uint64
	for i := range pnLen {
		pkt[pnOffset+i] ^= q.mask[1+i]
		truncated = truncated<<8 | uint64(pkt[pnOffset+i])
	}
	pn := quicDecodePN(q.nextPN, truncated, pnLen*8)
	q.nonce = q.iv
	for i := range 8 {
		q.nonce[4+i] ^= byte(pn >> (56 - 8*i))
	}
	hdr := pnOffset + pnLen
	payload, err := q.aead.Open(pkt[hdr:hdr], q.nonce[:], pkt[hdr:], pkt[:hdr])
	if err != nil {
		return nil, false
	}
	// The reserved bits are checked only once the packet is known to be
	// authentic (RFC 9000 section 17.2); set, they make it unusable.
	if pkt[0]&0x0c != 0 {
		return nil, false
	}
	q.nextPN = max(q.nextPN, pn+1)
	return payload, true
}

// quicDecodePN recovers a full packet number from its truncated bits
// given the next expected one (RFC 9000 section 17.1 and appendix A.3).
func quicDecodePN(expected int64, truncated uint64, bits int) int64 {
	win := int64(1) << bits
	hwin := win / 2
	candidate := expected&^(win-1) | int64(truncated)
	switch {
	case candidate <= expected-hwin && candidate < 1<<62-win:
		return candidate + win
	case candidate > expected+hwin && candidate >= win:
		return candidate - win
	}
	return candidate
}

// frames reads the frames of a decrypted Initial packet's payload.
func (q *QUICInitial) frames(p []byte) Status {
	if len(p) == 0 { // a packet holds at least one frame
		return Invalid
	}
	for len(p) > 0 {
		// Frame types use their shortest encoding (RFC 9000 section
		// 12.4), so each type allowed here is one byte.
		switch p[0] {
		case 0x00: // PADDING
			p = p[1:]
		case 0x01: // PING
			p = p[1:]
		case 0x02, 0x03: // ACK, ACK with ECN counts
			var ok bool
			if p, ok = quicSkipAck(p); !ok {
				return Invalid
			}
		case 0x06: // CRYPTO
			off, rest, ok := quicVarint(p[1:])
			if !ok {
				return Invalid
			}
			n, rest, ok := quicVarint(rest)
			if !ok || n > uint64(len(rest)) || off > quicMaxVarint-n {
				return Invalid
			}
			if off+n > QUICMaxCrypto {
				return Invalid // as TLSServerName: a padded hello must not hide its name
			}
			if !q.store(int(off), rest[:n]) {
				return Invalid
			}
			p = rest[n:]
		case 0x1c: // CONNECTION_CLOSE
			var ok bool
			if p, ok = quicSkipClose(p); !ok {
				return Invalid
			}
		default:
			return Invalid
		}
	}
	return NeedMore
}

// quicSkipAck returns what follows the ACK frame at the front of p.
func quicSkipAck(p []byte) ([]byte, bool) {
	ecn := p[0] == 0x03
	p = p[1:]
	var ranges uint64
	var ok bool
	// Largest Acknowledged, ACK Delay, ACK Range Count, First ACK Range.
	for i := range 4 {
		var v uint64
		if v, p, ok = quicVarint(p); !ok {
			return nil, false
		}
		if i == 2 {
			ranges = v
		}
	}
	// Each range is two varints of at least a byte: a count larger than
	// that cannot fit, and bounding it bounds the loop.
	if ranges > uint64(len(p))/2 {
		return nil, false
	}
	n := 2 * ranges
	if ecn {
		n += 3
	}
	for range n {
		if _, p, ok = quicVarint(p); !ok {
			return nil, false
		}
	}
	return p, true
}

// quicSkipClose returns what follows the CONNECTION_CLOSE frame (type
// 0x1c) at the front of p.
func quicSkipClose(p []byte) ([]byte, bool) {
	p = p[1:]
	var ok bool
	for range 2 { // Error Code, Frame Type
		if _, p, ok = quicVarint(p); !ok {
			return nil, false
		}
	}
	n, p, ok := quicVarint(p)
	if !ok || n > uint64(len(p)) {
		return nil, false
	}
	return p[n:], true
}

// store puts CRYPTO data at offset off of the stream, off+len(data) being
// at most QUICMaxCrypto. Data overlapping earlier data must repeat it
// (RFC 9000 section 2.2): were it allowed to differ, a client could show
// this reader one name and the server, which keeps what it got first,
// another.
func (q *QUICInitial) store(off int, data []byte) bool {
	end := off + len(data)
	if end > len(q.crypto) {
		q.grow(end)
	}
	if q.anyReceived(off, end) && !q.sameAsReceived(off, data) {
		return false
	}
	copy(q.crypto[off:], data)
	q.markReceived(off, end)
	if off <= q.contig {
		for q.contig < len(q.crypto) && q.have[q.contig>>3]&(1<<(q.contig&7)) != 0 {
			if q.contig&7 == 0 && q.contig+8 <= len(q.crypto) && q.have[q.contig>>3] == 0xff {
				q.contig += 8
				continue
			}
			q.contig++
		}
	}
	return true
}

// grow makes room for the stream up to end (at most QUICMaxCrypto),
// doubling from a size most ClientHellos fit in.
func (q *QUICInitial) grow(end int) {
	size := max(len(q.crypto), 4096)
	for size < end {
		size *= 2
	}
	size = min(size, QUICMaxCrypto)
	// One allocation holds the stream and its map of received bytes.
	b := make([]byte, size+size/8)
	copy(b, q.crypto)
	copy(b[size:], q.have)
	q.crypto, q.have = b[:size:size], b[size:]
}

// anyReceived reports whether any byte of crypto[off:end] was received.
func (q *QUICInitial) anyReceived(off, end int) bool {
	if off >= end {
		return false
	}
	for i := off >> 3; i <= (end-1)>>3; i++ {
		if q.have[i] != 0 {
			// Whole map bytes are checked; the edge ones may hold bits
			// outside the range, which only costs the exact check.
			return true
		}
	}
	return false
}

// sameAsReceived reports whether data, at offset off, matches the bytes
// of the stream received so far. Retransmissions repeat whole packets, so
// runs of received bytes are compared eight at a time.
func (q *QUICInitial) sameAsReceived(off int, data []byte) bool {
	for i := 0; i < len(data); {
		j := off + i
		if j&7 == 0 && i+8 <= len(data) && q.have[j>>3] == 0xff {
			if string(q.crypto[j:j+8]) != string(data[i:i+8]) {
				return false
			}
			i += 8
			continue
		}
		if q.have[j>>3]&(1<<(j&7)) != 0 && q.crypto[j] != data[i] {
			return false
		}
		i++
	}
	return true
}

// markReceived sets the bits of crypto[off:end] in the map.
func (q *QUICInitial) markReceived(off, end int) {
	for ; off < end && off&7 != 0; off++ {
		q.have[off>>3] |= 1 << (off & 7)
	}
	for ; off+8 <= end; off += 8 {
		q.have[off>>3] = 0xff
	}
	for ; off < end; off++ {
		q.have[off>>3] |= 1 << (off & 7)
	}
}

// hello reads the ClientHello once the stream holds all of it.
func (q *QUICInitial) hello() Status {
	if q.contig < 4 {
		return NeedMore
	}
	// A client's Initial CRYPTO stream is its ClientHello (RFC 9001
	// section 4.1.1).
	if q.crypto[0] != 1 {
		return Invalid
	}
	n := 4 + (int(q.crypto[1])<<16 | int(q.crypto[2])<<8 | int(q.crypto[3]))
	if n > QUICMaxCrypto {
		return Invalid
	}
	if q.contig < n {
		return NeedMore
	}
	name, st := ClientHelloServerName(q.crypto[:n])
	switch st {
	case Found:
		q.name = name
	case NeedMore: // the whole message was given
		st = Invalid
	}
	return st
}
