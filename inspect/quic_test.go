package inspect

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

// quicCapture dials a real quic-go client at a UDP socket on host that
// only records what it receives, and returns the client's first
// datagrams: those up to the one that completes its ClientHello (at most
// 3, as the client sends no more before its first retransmission).
func quicCapture(t testing.TB, host string, version quic.Version, tlsConf *tls.Config) [][]byte {
	t.Helper()
	pc, err := net.ListenPacket("udp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Skipf("listening on %s: %v", host, err)
	}
	defer pc.Close()

	ctx, cancel := context.WithCancel(context.Background())
	dialed := make(chan error, 1)
	go func() {
		_, err := quic.DialAddr(ctx, pc.LocalAddr().String(), tlsConf, &quic.Config{Versions: []quic.Version{version}})
		dialed <- err
	}()
	defer func() {
		cancel()
		if err := <-dialed; !errors.Is(err, context.Canceled) {
			t.Errorf("dial: %v, want it canceled", err)
		}
	}()

	// The deadline only bounds a broken client; reading stops at the
	// datagram that completes the ClientHello.
	if err := pc.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	var got [][]byte
	var q QUICInitial
	buf := make([]byte, 65536)
	for len(got) < 3 {
		n, _, err := pc.ReadFrom(buf)
		if err != nil {
			t.Fatalf("reading the client's datagrams: %v", err)
		}
		d := bytes.Clone(buf[:n])
		got = append(got, d)
		if _, st := q.Add(d); st != NeedMore {
			break
		}
	}
	return got
}

// feed gives datagrams to a fresh QUICInitial and returns its last answer,
// checking that Add leaves every datagram as it was.
func feed(t testing.TB, ds ...[]byte) (*QUICInitial, string, Status) {
	t.Helper()
	var q QUICInitial
	var name []byte
	var st Status
	for _, d := range ds {
		before := bytes.Clone(d)
		name, st = q.Add(d)
		if !bytes.Equal(before, d) {
			t.Fatal("Add modified the datagram it was given")
		}
	}
	return &q, string(name), st
}

func TestQUICInitialRealClient(t *testing.T) {
	for _, tc := range []struct {
		name    string
		host    string
		version quic.Version
	}{
		{"v1/ipv4", "127.0.0.1", quic.Version1},
		{"v2/ipv4", "127.0.0.1", quic.Version2},
		{"v1/ipv6", "::1", quic.Version1},
		{"v2/ipv6", "::1", quic.Version2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const sni = "video.example.net"
			// Go's default key shares include X25519MLKEM768, whose 1.2 kB
			// share makes the ClientHello span two Initial packets.
			ds := quicCapture(t, tc.host, tc.version, &tls.Config{ServerName: sni, NextProtos: []string{"h3"}})
			if len(ds) < 2 {
				t.Fatalf("the ClientHello came in %d datagram, want it to span more", len(ds))
			}
			for i, d := range ds {
				if len(d) < quicMinInitialDatagram {
					t.Errorf("datagram %d is %d bytes", i, len(d))
				}
				if got := binary.BigEndian.Uint32(d[1:5]); got != uint32(tc.version) {
					t.Errorf("datagram %d has version %#x, want %#x", i, got, uint32(tc.version))
				}
			}

			q, name, st := feed(t, ds...)
			if st != Found || name != sni {
				t.Fatalf("in order: %q, %v; want %q, found", name, st, sni)
			}
			if n := int(q.crypto[1])<<16 | int(q.crypto[2])<<8 | int(q.crypto[3]); n < 1300 {
				t.Errorf("ClientHello of %d bytes, want one larger than an Initial packet", n)
			}
			// The first datagram's packet holds part of the ClientHello only.
			if _, _, st := feed(t, ds[0]); st != NeedMore {
				t.Errorf("first datagram alone: %v, want need-more", st)
			}

			// Reverse order: the keys come from the last datagram's
			// packet, the stream fills from its end.
			rev := make([][]byte, len(ds))
			for i, d := range ds {
				rev[len(ds)-1-i] = d
			}
			if _, name, st := feed(t, rev...); st != Found || name != sni {
				t.Errorf("reversed: %q, %v; want %q, found", name, st, sni)
			}
			// Retransmitted (repeated) datagrams change nothing.
			if _, name, st := feed(t, ds[0], ds[0], ds[1]); st != Found || name != sni {
				t.Errorf("repeated: %q, %v; want %q, found", name, st, sni)
			}
			// Final statuses stay.
			if name, st := q.Add(ds[0]); st != Found || string(name) != sni {
				t.Errorf("after found: %q, %v", name, st)
			}
			// A client has no 1-RTT keys before the server answers.
			short := bytes.Clone(ds[0])
			short[0] = 0x40 | short[0]&0x3f
			if _, _, st := feed(t, ds[0], short); st != Invalid {
				t.Errorf("short header after an Initial: %v, want invalid", st)
			}
		})
	}
}

func TestQUICInitialSinglePacket(t *testing.T) {
	// X25519 alone keeps the ClientHello within one packet.
	ds := quicCapture(t, "127.0.0.1", quic.Version1, &tls.Config{
		ServerName: "one.example", NextProtos: []string{"h3"}, CurvePreferences: []tls.CurveID{tls.X25519},
	})
	if len(ds) != 1 {
		t.Fatalf("%d datagrams, want 1", len(ds))
	}
	if _, name, st := feed(t, ds[0]); st != Found || name != "one.example" {
		t.Errorf("%q, %v; want one.example, found", name, st)
	}
}

func TestQUICInitialNoServerName(t *testing.T) {
	// crypto/tls sends no server_name for an IP address.
	ds := quicCapture(t, "127.0.0.1", quic.Version1, &tls.Config{
		InsecureSkipVerify: true, NextProtos: []string{"h3"},
	})
	if _, name, st := feed(t, ds...); st != NoName {
		t.Errorf("%q, %v; want no-name", name, st)
	}
}

// TestQUICInitialTampered flips each byte of each datagram in turn: a
// change inside a packet must never give a name, and none may give
// another name.
func TestQUICInitialTampered(t *testing.T) {
	const sni = "tamper.example"
	ds := quicCapture(t, "127.0.0.1", quic.Version1, &tls.Config{ServerName: sni, NextProtos: []string{"h3"}})
	for k := range ds {
		h, ok := quicParseLong(ds[k])
		if !ok {
			t.Fatalf("datagram %d does not parse", k)
		}
		for i := range ds[k] {
			for _, flip := range []byte{0x01, 0x80} {
				bad := bytes.Clone(ds[k])
				bad[i] ^= flip
				in := append(append(append([][]byte(nil), ds[:k]...), bad), ds[k+1:]...)
				_, name, st := feed(t, in...)
				if st == Found && (name != sni || i < h.end) {
					t.Fatalf("datagram %d byte %d ^%#x: %q, found", k, i, flip, name)
				}
				if i < h.end && k == 0 && st != NoName {
					// Nothing decrypted yet: not a QUIC client's start.
					t.Errorf("datagram 0 byte %d ^%#x: %v, want no-name", i, flip, st)
				}
				if i < h.end && k > 0 && st != Invalid {
					t.Errorf("datagram %d byte %d ^%#x: %v, want invalid", k, i, flip, st)
				}
			}
		}
	}
}

func TestQUICInitialNotQUIC(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 2000 {
		d := make([]byte, rng.IntN(1500))
		for j := range d {
			d[j] = byte(rng.Uint32())
		}
		if i%2 == 0 && len(d) > 5 {
			// A long header of a known version, to go past the version
			// check into the rest of the header and the decryption.
			d[0] |= 0x80
			binary.BigEndian.PutUint32(d[1:5], []uint32{quicVersion1, quicVersion2}[i/2%2])
		}
		if _, name, st := feed(t, d); st == Found || st == Invalid {
			t.Fatalf("random datagram %x: %q, %v", d, name, st)
		}
	}
	for _, d := range [][]byte{
		nil,
		{0x40},
		append([]byte{0x41}, make([]byte, 1300)...),                                  // short header
		append([]byte{0xc0, 0, 0, 0, 0}, make([]byte, 1300)...),                      // version negotiation
		append([]byte{0xc0, 0xff, 0, 0, 0x1d, 8}, make([]byte, 1300)...),             // draft 29
		append([]byte{0xf0, 0, 0, 0, 1, 8}, make([]byte, 1300)...),                   // v1 Retry
		append([]byte{0xc0, 0, 0, 0, 1, 21}, make([]byte, 1300)...),                  // CID too long
		append([]byte{0xc0, 0, 0, 0, 1, 4, 1, 2, 3, 4, 0, 0}, make([]byte, 1300)...), // DCID too short
	} {
		if _, name, st := feed(t, d); st != NoName {
			t.Errorf("%x...: %q, %v; want no-name", d[:min(len(d), 12)], name, st)
		}
	}
}

// hexFile reads a file of hex digits split over lines.
func hexFile(t testing.TB, path string) []byte {
	t.Helper()
	s, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b, err := hex.DecodeString(strings.Join(strings.Fields(string(s)), ""))
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return b
}

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The client Initial keys of RFC 9001 appendix A.1 and RFC 9369 appendix
// A.1, and their sample packets of appendix A.2.
func TestQUICInitialRFCVectors(t *testing.T) {
	dcid := unhex(t, "8394c8f03e515708")
	for _, tc := range []struct {
		version     uint32
		key, iv, hp string
		packet      string
	}{
		{quicVersion1, "1f369613dd76d5467730efcbe3b1a22d", "fa044b2f42a3fd3b46fb255c", "9f50449e04a0e810283a1e9933adedd2",
			"testdata/rfc9001-a2-client-initial.hex"},
		{quicVersion2, "8b1a0bc121284290a29e0971b5cd045d", "91f73e2351d8fa91660e909f", "45b95e15235d6f45a6b19cbcb0294ba9",
			"testdata/rfc9369-a2-client-initial.hex"},
	} {
		key, iv, hp := quicClientInitialKeys(tc.version, dcid)
		if got := hex.EncodeToString(key[:]); got != tc.key {
			t.Errorf("version %#x key %s, want %s", tc.version, got, tc.key)
		}
		if got := hex.EncodeToString(iv[:]); got != tc.iv {
			t.Errorf("version %#x iv %s, want %s", tc.version, got, tc.iv)
		}
		if got := hex.EncodeToString(hp[:]); got != tc.hp {
			t.Errorf("version %#x hp %s, want %s", tc.version, got, tc.hp)
		}
		if _, name, st := feed(t, hexFile(t, tc.packet)); st != Found || name != "example.com" {
			t.Errorf("version %#x sample packet: %q, %v; want example.com, found", tc.version, name, st)
		}
	}
}

// quicSeal builds a client Initial datagram of version 1 for dcid with
// packet number pn, holding payload padded to a 1200-byte datagram, as
// a client would; it lets tests choose the frames.
func quicSeal(t testing.TB, dcid []byte, pn uint32, payload []byte) []byte {
	t.Helper()
	key, iv, hpKey := quicClientInitialKeys(quicVersion1, dcid)
	block, _ := aes.NewCipher(key[:])
	aead, _ := cipher.NewGCM(block)
	hp, _ := aes.NewCipher(hpKey[:])

	hdr := []byte{0xc3, 0, 0, 0, 1, byte(len(dcid))} // 4-byte packet number
	hdr = append(hdr, dcid...)
	hdr = append(hdr, 0, 0) // no SCID, no token
	pnOffset := len(hdr) + 2
	padded := len(payload)
	if n := quicMinInitialDatagram - pnOffset - 4 - 16; padded < n {
		padded = n
	}
	payload = append(bytes.Clone(payload), make([]byte, padded-len(payload))...)
	length := 4 + len(payload) + 16
	hdr = binary.BigEndian.AppendUint16(hdr, 0x4000|uint16(length))
	hdr = binary.BigEndian.AppendUint32(hdr, pn)

	nonce := iv
	for i := range 8 {
		nonce[4+i] ^= byte(uint64(pn) >> (56 - 8*i))
	}
	pkt := aead.Seal(hdr, nonce[:], payload, hdr)
	var mask [16]byte
	hp.Encrypt(mask[:], pkt[pnOffset+4:pnOffset+20])
	pkt[0] ^= mask[0] & 0x0f
	for i := range 4 {
		pkt[pnOffset+i] ^= mask[1+i]
	}
	return pkt
}

// quicHello is a ClientHello naming name (or none when empty), with
// extra bytes of another extension to give it a size.
func quicHello(name string, extra int) []byte {
	var ext []byte
	if name != "" {
		ext = binary.BigEndian.AppendUint16(ext, 0) // server_name
		ext = binary.BigEndian.AppendUint16(ext, uint16(len(name)+5))
		ext = binary.BigEndian.AppendUint16(ext, uint16(len(name)+3))
		ext = append(ext, 0)
		ext = binary.BigEndian.AppendUint16(ext, uint16(len(name)))
		ext = append(ext, name...)
	}
	ext = binary.BigEndian.AppendUint16(ext, 0xfafa) // a GREASE extension
	ext = binary.BigEndian.AppendUint16(ext, uint16(extra))
	ext = append(ext, make([]byte, extra)...)

	body := []byte{3, 3}
	body = append(body, make([]byte, 32)...) // random
	body = append(body, 0)                   // session id
	body = append(body, 0, 2, 0x13, 0x01)    // cipher suites
	body = append(body, 1, 0)                // compression
	body = binary.BigEndian.AppendUint16(body, uint16(len(ext)))
	body = append(body, ext...)
	msg := []byte{1, byte(len(body) >> 16), byte(len(body) >> 8), byte(len(body))}
	return append(msg, body...)
}

// cryptoFrame is a CRYPTO frame carrying data at off.
func cryptoFrame(off int, data []byte) []byte {
	f := []byte{0x06}
	f = binary.BigEndian.AppendUint32(f, 0x80000000|uint32(off))
	f = binary.BigEndian.AppendUint16(f, 0x4000|uint16(len(data)))
	return append(f, data...)
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func TestQUICInitialFrames(t *testing.T) {
	dcid := unhex(t, "0001020304050607")
	hello := quicHello("frames.example", 100)
	ack := []byte{0x03, 0x05, 0x00, 0x01, 0x00, 0x01, 0x01, 0x00, 0x00, 0x00} // ACK+ECN, one extra range
	closeFrame := []byte{0x1c, 0x00, 0x06, 0x02, 'n', 'o'}
	for _, tc := range []struct {
		name     string
		payloads [][]byte // one packet each, numbered from 0
		want     Status
	}{
		{"whole", [][]byte{cryptoFrame(0, hello)}, Found},
		{"split and shuffled in one packet", [][]byte{cat(
			[]byte{0x01, 0x00}, cryptoFrame(50, hello[50:]), ack, cryptoFrame(10, hello[10:50]), cryptoFrame(0, hello[:10]))}, Found},
		{"across packets, overlapping", [][]byte{cryptoFrame(40, hello[40:]), cryptoFrame(0, hello[:60])}, Found},
		{"gap", [][]byte{cryptoFrame(0, hello[:10]), cryptoFrame(11, hello[11:])}, NeedMore},
		{"overlap that differs", [][]byte{cryptoFrame(0, hello[:60]), cryptoFrame(30, cat([]byte{hello[30] ^ 1}, hello[31:]))}, Invalid},
		{"repeat that differs", [][]byte{cryptoFrame(0, hello[:60]), cryptoFrame(0, cat(hello[:17], []byte{hello[17] ^ 1}, hello[18:]))}, Invalid},
		{"no server_name", [][]byte{cryptoFrame(0, quicHello("", 100))}, NoName},
		{"not a ClientHello", [][]byte{cryptoFrame(0, cat([]byte{2}, hello[1:]))}, Invalid},
		{"ClientHello over the bound", [][]byte{cryptoFrame(0, []byte{1, 0, 0x40, 0x00})}, Invalid},
		{"CRYPTO over the bound", [][]byte{cryptoFrame(QUICMaxCrypto-2, []byte{1, 2, 3})}, Invalid},
		{"CRYPTO up to the bound", [][]byte{cryptoFrame(QUICMaxCrypto-3, []byte{1, 2, 3})}, NeedMore},
		{"CONNECTION_CLOSE skipped", [][]byte{cat(closeFrame, cryptoFrame(0, hello))}, Found},
		{"STREAM frame", [][]byte{cat(cryptoFrame(0, hello), []byte{0x08, 0x00, 0x00})}, Invalid},
		{"frame type not minimal", [][]byte{cat([]byte{0x40, 0x06, 0x00, 0x00})}, Invalid},
		{"CRYPTO longer than the packet", [][]byte{{0x06, 0x00, 0x44, 0xd0, 1}}, Invalid},
		{"ACK with a huge range count", [][]byte{{0x02, 0x00, 0x00, 0x80, 0xff, 0xff, 0xff, 0x00}}, Invalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var ds [][]byte
			for i, p := range tc.payloads {
				ds = append(ds, quicSeal(t, dcid, uint32(i), p))
			}
			_, name, st := feed(t, ds...)
			if st != tc.want || (st == Found) != (name == "frames.example") {
				t.Errorf("%q, %v; want %v", name, st, tc.want)
			}
		})
	}

	// Two packets in one datagram, and junk after them.
	a := quicSeal(t, dcid, 0, cryptoFrame(0, hello[:70]))
	b := quicSeal(t, dcid, 1, cryptoFrame(70, hello[70:]))
	if _, name, st := feed(t, cat(a, b, []byte{0, 0, 0})); st != Found || name != "frames.example" {
		t.Errorf("coalesced: %q, %v", name, st)
	}
	// 0-RTT packets are skipped, even before any Initial: a client may
	// send them right behind its Initial, and the network reorder them.
	zeroRTT := cat([]byte{0xd0, 0, 0, 0, 1, 8}, dcid, []byte{0, 0x40, 20}, make([]byte, 20))
	if _, _, st := feed(t, zeroRTT); st != NeedMore {
		t.Errorf("0-RTT alone: %v, want need-more", st)
	}
	if _, name, st := feed(t, zeroRTT, cat(a, zeroRTT), b); st != Found || name != "frames.example" {
		t.Errorf("with 0-RTT: %q, %v", name, st)
	}
	// A packet of another connection in a later datagram.
	other := quicSeal(t, unhex(t, "0706050403020100"), 1, cryptoFrame(70, hello[70:]))
	if _, _, st := feed(t, a, other); st != Invalid {
		t.Errorf("other connection ID: %v, want invalid", st)
	}
}

// TestQUICInitialAllocs checks that past the flow's set-up (keys,
// buffers), Add allocates nothing.
func TestQUICInitialAllocs(t *testing.T) {
	ds := quicCapture(t, "127.0.0.1", quic.Version1, &tls.Config{ServerName: "allocs.example", NextProtos: []string{"h3"}})
	if len(ds) < 2 {
		t.Fatalf("%d datagrams, want 2", len(ds))
	}
	var q QUICInitial
	q.Add(ds[0])
	if n := testing.AllocsPerRun(100, func() {
		if _, st := q.Add(ds[0]); st != NeedMore {
			t.Fatalf("repeated first datagram: %v", st)
		}
	}); n != 0 {
		t.Errorf("Add of a further datagram: %v allocations, want 0", n)
	}

	const runs = 50
	qs := make([]QUICInitial, runs+1) // AllocsPerRun runs once more to warm up
	for i := range qs {
		qs[i].Add(ds[0])
	}
	i := 0
	if n := testing.AllocsPerRun(runs, func() {
		if name, st := qs[i].Add(ds[1]); st != Found || string(name) != "allocs.example" {
			t.Fatalf("completing datagram: %q, %v", name, st)
		}
		i++
	}); n != 0 {
		t.Errorf("Add of the completing datagram: %v allocations, want 0", n)
	}
}

func BenchmarkQUICInitial(b *testing.B) {
	ds := quicCapture(b, "127.0.0.1", quic.Version1, &tls.Config{ServerName: "bench.example", NextProtos: []string{"h3"}})
	b.Run("fresh", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(ds[0])))
		for b.Loop() {
			var q QUICInitial
			if _, st := q.Add(ds[0]); st != NeedMore {
				b.Fatal(st)
			}
		}
	})
	b.Run("reuse", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(ds[0])))
		var q QUICInitial
		q.Add(ds[0])
		for b.Loop() {
			if _, st := q.Add(ds[0]); st != NeedMore {
				b.Fatal(st)
			}
		}
	})
}
