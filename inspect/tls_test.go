package inspect

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net"
	"reflect"
	"strings"
	"testing"
)

// captureClientHello runs crypto/tls's client over a pipe and returns the
// first TLS record it writes: its ClientHello, as it would reach tunfw.
func captureClientHello(t testing.TB, cfg *tls.Config) []byte {
	t.Helper()
	c, s := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		tls.Client(c, cfg).Handshake() // fails when s closes: only the hello matters
		c.Close()
	}()
	var hdr [recordHeaderLen]byte
	if _, err := io.ReadFull(s, hdr[:]); err != nil {
		t.Fatalf("reading ClientHello record header: %v", err)
	}
	rec := make([]byte, recordHeaderLen+(int(hdr[3])<<8|int(hdr[4])))
	copy(rec, hdr[:])
	if _, err := io.ReadFull(s, rec[recordHeaderLen:]); err != nil {
		t.Fatalf("reading ClientHello record: %v", err)
	}
	s.Close()
	<-done
	return rec
}

// captureQUICClientHello returns the ClientHello crypto/tls's QUIC client
// puts in its Initial CRYPTO frames.
func captureQUICClientHello(t testing.TB, serverName string) []byte {
	t.Helper()
	q := tls.QUICClient(&tls.QUICConfig{TLSConfig: &tls.Config{
		ServerName: serverName,
		NextProtos: []string{"h3"},
		MinVersion: tls.VersionTLS13,
	}})
	defer q.Close()
	q.SetTransportParameters([]byte{0x04, 0x04, 0x80, 0x10, 0x00, 0x00}) // initial_max_data
	if err := q.Start(context.Background()); err != nil {
		t.Fatalf("starting QUIC client: %v", err)
	}
	var msg []byte
	for {
		e := q.NextEvent()
		if e.Kind == tls.QUICNoEvent {
			break
		}
		if e.Kind == tls.QUICWriteData && e.Level == tls.QUICEncryptionLevelInitial {
			msg = append(msg, e.Data...)
		}
	}
	if len(msg) == 0 {
		t.Fatal("QUIC client wrote no Initial data")
	}
	return msg
}

// reframe puts the handshake bytes msg in TLS records split at cuts
// (offsets into msg, increasing), as a client fragmenting its hello does.
func reframe(msg []byte, cuts ...int) []byte {
	var out []byte
	prev := 0
	for _, c := range append(cuts, len(msg)) {
		frag := msg[prev:c]
		prev = c
		for len(frag) > 0 {
			n := min(len(frag), maxRecordLen)
			out = append(out, recordTypeHandshake, 3, 1, byte(n>>8), byte(n))
			out = append(out, frag[:n]...)
			frag = frag[n:]
		}
	}
	return out
}

// chunked cuts msg every size bytes.
func chunked(msg []byte, size int) []int {
	var cuts []int
	for c := size; c < len(msg); c += size {
		cuts = append(cuts, c)
	}
	return cuts
}

type capture struct {
	name   string
	record []byte // one TLS record, as crypto/tls wrote it
	want   string // server name, "" for NoName
}

func alpn5k() []string {
	// crypto/tls has no padding extension; 20 long ALPN protocols make
	// its hello ~5 KB, more than three 1460-byte segments.
	protos := make([]string, 20)
	for i := range protos {
		protos[i] = strings.Repeat(string(rune('a'+i)), 250)
	}
	return protos
}

func captures(t testing.TB) []capture {
	t.Helper()
	cs := []capture{
		{"x25519", captureClientHello(t, &tls.Config{ServerName: "example.com", CurvePreferences: []tls.CurveID{tls.X25519}}), "example.com"},
		{"p521-alpn", captureClientHello(t, &tls.Config{ServerName: "www.example.org", CurvePreferences: []tls.CurveID{tls.CurveP521}, NextProtos: []string{"h2", "http/1.1"}}), "www.example.org"},
		{"x25519mlkem768", captureClientHello(t, &tls.Config{ServerName: "pq.example.net", CurvePreferences: []tls.CurveID{tls.X25519MLKEM768, tls.X25519}}), "pq.example.net"},
		{"alpn-5k", captureClientHello(t, &tls.Config{ServerName: "big.example.com", NextProtos: alpn5k()}), "big.example.com"},
		{"tls12", captureClientHello(t, &tls.Config{ServerName: "old.example", MaxVersion: tls.VersionTLS12}), "old.example"},
		{"long-name", captureClientHello(t, &tls.Config{ServerName: strings.Repeat("a23456789.", 25) + "abc"}), strings.Repeat("a23456789.", 25) + "abc"},
		{"no-sni", captureClientHello(t, &tls.Config{InsecureSkipVerify: true}), ""},
		{"ip-server-name", captureClientHello(t, &tls.Config{ServerName: "192.0.2.1"}), ""},
	}
	if n := len(cs[2].record); n <= 1460 {
		t.Fatalf("X25519MLKEM768 hello is %d bytes, want more than a segment", n)
	}
	if n := len(cs[3].record); n <= 3*1460 {
		t.Fatalf("ALPN-padded hello is %d bytes, want more than three segments", n)
	}
	return cs
}

func wantStatus(want string) Status {
	if want == "" {
		return NoName
	}
	return Found
}

// within tells whether sub's bytes lie inside buf's.
func within(sub, buf []byte) bool {
	if len(sub) == 0 || len(buf) == 0 {
		return false
	}
	s, b := reflect.ValueOf(sub).Pointer(), reflect.ValueOf(buf).Pointer()
	return s >= b && s+uintptr(len(sub)) <= b+uintptr(len(buf))
}

func checkResult(t *testing.T, what string, name []byte, st Status, want string) {
	t.Helper()
	if st != wantStatus(want) || string(name) != want {
		t.Fatalf("%s: got %q %v, want %q %v", what, name, st, want, wantStatus(want))
	}
}

func TestTLSServerNameCaptured(t *testing.T) {
	var scratch [MaxHello]byte
	for _, c := range captures(t) {
		t.Run(c.name, func(t *testing.T) {
			name, st := TLSServerName(c.record, &scratch)
			checkResult(t, "whole record", name, st, c.want)
			if st == Found && !within(name, c.record) {
				t.Fatal("name from a single-record hello is not a slice of the stream")
			}
			// Every TCP segmentation: each prefix the caller may hold.
			for i := range len(c.record) {
				if name, st := TLSServerName(c.record[:i], &scratch); st != NeedMore {
					t.Fatalf("prefix of %d/%d bytes: got %q %v, want need-more", i, len(c.record), name, st)
				}
			}
			// Bytes after the hello (a client's early data, CCS) change nothing.
			more := append(bytes.Clone(c.record), 0x14, 3, 3, 0, 1, 1)
			name, st = TLSServerName(more, &scratch)
			checkResult(t, "hello then CCS", name, st, c.want)

			msg := c.record[recordHeaderLen:]
			name, st = ClientHelloServerName(msg)
			checkResult(t, "bare handshake message", name, st, c.want)
		})
	}
}

func TestTLSServerNameRecordSplits(t *testing.T) {
	var scratch [MaxHello]byte
	for _, c := range captures(t) {
		t.Run(c.name, func(t *testing.T) {
			msg := c.record[recordHeaderLen:]
			// Two records, split at every byte boundary of the message.
			for i := 1; i < len(msg); i++ {
				stream := reframe(msg, i)
				name, st := TLSServerName(stream, &scratch)
				checkResult(t, "split at "+itoa(i), name, st, c.want)
				if st == Found && !within(name, scratch[:]) {
					t.Fatal("name from a multi-record hello is not a slice of scratch")
				}
			}
			// Three records, the middle one short, across the message.
			for i := 1; i+7 < len(msg); i += 3 {
				name, st := TLSServerName(reframe(msg, i, i+7), &scratch)
				checkResult(t, "split at "+itoa(i)+" and "+itoa(i+7), name, st, c.want)
			}
			// One byte per record.
			name, st := TLSServerName(reframe(msg, chunked(msg, 1)...), &scratch)
			checkResult(t, "1-byte records", name, st, c.want)

			// Segment-sized records, fed as TCP delivers them: every
			// prefix needs more, the whole stream is complete.
			stream := reframe(msg, chunked(msg, 1400)...)
			for i := range len(stream) {
				if name, st := TLSServerName(stream[:i], &scratch); st != NeedMore {
					t.Fatalf("prefix of %d/%d bytes of 1400-byte records: got %q %v", i, len(stream), name, st)
				}
			}
			name, st = TLSServerName(stream, &scratch)
			checkResult(t, "1400-byte records", name, st, c.want)
		})
	}
}

func TestClientHelloServerNameQUIC(t *testing.T) {
	msg := captureQUICClientHello(t, "quic.example.com")
	name, st := ClientHelloServerName(msg)
	checkResult(t, "QUIC ClientHello", name, st, "quic.example.com")
	if !within(name, msg) {
		t.Fatal("name is not a slice of the message")
	}
	for i := range len(msg) {
		if name, st := ClientHelloServerName(msg[:i]); st != NeedMore {
			t.Fatalf("prefix of %d/%d bytes: got %q %v, want need-more", i, len(msg), name, st)
		}
	}
}

func TestTLSServerNameNotTLS(t *testing.T) {
	var scratch [MaxHello]byte
	for _, tc := range []struct {
		name   string
		stream string
		decide int // bytes after which the answer is NoName
	}{
		{"ssh banner", "SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n", 1},
		{"http request", "GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", 1},
		{"sslv2 hello", "\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10", 1},
		{"handshake type but not TLS", "\x16\x00\x01\x02\x03", 2},
		{"server hello first", "\x16\x03\x03\x00\x30\x02\x00\x00\x2c\x03\x03", 6},
		{"application data", "\x17\x03\x03\x00\x10", 1},
	} {
		for i := 1; i <= len(tc.stream); i++ {
			_, st := TLSServerName([]byte(tc.stream[:i]), &scratch)
			want := NoName
			if i < tc.decide {
				want = NeedMore
			}
			if st != want {
				t.Errorf("%s, %d bytes: got %v, want %v", tc.name, i, st, want)
			}
		}
	}
	// Random streams not starting with a handshake record byte: NoName at
	// the first byte.
	seed := uint32(1)
	for range 1000 {
		b := make([]byte, 64)
		for i := range b {
			seed = seed*1664525 + 1013904223
			b[i] = byte(seed >> 24)
		}
		if b[0] == recordTypeHandshake {
			continue
		}
		if _, st := TLSServerName(b[:1], &scratch); st != NoName {
			t.Fatalf("random stream % x: got %v on its first byte", b[:8], st)
		}
	}
}

// Hand-built hellos for what crypto/tls never sends.

func buildHello(exts ...[]byte) []byte {
	body := []byte{3, 3}
	body = append(body, make([]byte, 32)...) // random
	body = append(body, 0)                   // session id
	body = append(body, 0, 2, 0x13, 0x01)    // cipher suites
	body = append(body, 1, 0)                // compression
	var e []byte
	for _, x := range exts {
		e = append(e, x...)
	}
	body = append(body, byte(len(e)>>8), byte(len(e)))
	body = append(body, e...)
	return append([]byte{handshakeTypeClientHello, byte(len(body) >> 16), byte(len(body) >> 8), byte(len(body))}, body...)
}

func ext(typ uint16, data []byte) []byte {
	return append([]byte{byte(typ >> 8), byte(typ), byte(len(data) >> 8), byte(len(data))}, data...)
}

func sniExt(names ...string) []byte {
	var list []byte
	for _, n := range names {
		list = append(list, serverNameTypeHostName, byte(len(n)>>8), byte(len(n)))
		list = append(list, n...)
	}
	return ext(extensionServerName, append([]byte{byte(len(list) >> 8), byte(len(list))}, list...))
}

func TestTLSServerNameBuilt(t *testing.T) {
	var scratch [MaxHello]byte
	padding := ext(21, make([]byte, 4000))
	otherType := ext(extensionServerName, []byte{0, 6, 7, 0, 3, 'x', 'y', 'z'}) // name_type 7 only
	mixed := ext(extensionServerName, []byte{0, 12, 7, 0, 3, 'x', 'y', 'z', 0, 0, 3, 'a', '.', 'b'})
	noExts := buildHello()[:4+2+32+1+4+2] // TLS 1.2 hello ending after compression
	noExts[3] = byte(len(noExts) - 4)
	tooLong := []byte{1, 0, 0x40, 0x01} // body of 16385 bytes
	for _, tc := range []struct {
		name string
		msg  []byte
		want Status
		host string
	}{
		{"padding extension", buildHello(padding, sniExt("pad.example")), Found, "pad.example"},
		{"name after padding", buildHello(sniExt("a.example"), padding), Found, "a.example"},
		{"only unknown name type", buildHello(otherType), NoName, ""},
		{"unknown name type first", buildHello(mixed), Found, "a.b"},
		{"no extensions", noExts, NoName, ""},
		{"name of 255", buildHello(sniExt(strings.Repeat("n", 255))), Found, strings.Repeat("n", 255)},
		{"name of 256", buildHello(sniExt(strings.Repeat("n", 256))), Invalid, ""},
		{"empty name", buildHello(sniExt("")), Invalid, ""},
		{"two host names", buildHello(sniExt("a.example", "b.example")), Invalid, ""},
		{"two server_name extensions", buildHello(sniExt("a.example"), sniExt("b.example")), Invalid, ""},
		{"empty server_name extension", buildHello(ext(extensionServerName, nil)), Invalid, ""},
		{"list longer than extension", buildHello(ext(extensionServerName, []byte{0, 9, 0, 0, 3, 'a', 'b', 'c'})), Invalid, ""},
		{"bytes after list", buildHello(ext(extensionServerName, []byte{0, 6, 0, 0, 3, 'a', 'b', 'c', 0})), Invalid, ""},
		{"truncated extension header", buildHello([]byte{0, 1, 0}), Invalid, ""},
		{"hello longer than MaxHello", tooLong, Invalid, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, stream := range [][]byte{reframe(tc.msg), reframe(tc.msg, 3), reframe(tc.msg, chunked(tc.msg, 1000)...)} {
				name, st := TLSServerName(stream, &scratch)
				if st != tc.want || string(name) != tc.host {
					t.Errorf("%d-byte stream: got %q %v, want %q %v", len(stream), name, st, tc.host, tc.want)
				}
			}
			if name, st := ClientHelloServerName(tc.msg); st != tc.want || string(name) != tc.host {
				t.Errorf("bare message: got %q %v, want %q %v", name, st, tc.host, tc.want)
			}
		})
	}
}

func TestTLSServerNameBadFraming(t *testing.T) {
	var scratch [MaxHello]byte
	msg := buildHello(sniExt("frame.example"))
	split := reframe(msg, 10)
	second := 5 + 10 // offset of the second record
	for _, tc := range []struct {
		name   string
		stream []byte
	}{
		{"empty record", []byte{0x16, 3, 1, 0, 0}},
		{"record over 16 KiB", []byte{0x16, 3, 1, 0x40, 0x01}},
		{"CCS inside the hello", append(append(bytes.Clone(split[:second]), 0x14, 3, 3, 0, 1, 1), split[second:]...)},
		{"second record not TLS 1.x", func() []byte { b := bytes.Clone(split); b[second+1] = 2; return b }()},
		{"empty second record", append(bytes.Clone(split[:second]), 0x16, 3, 1, 0, 0)},
		{"byte after the extensions", func() []byte { m := append(bytes.Clone(msg), 0); m[3]++; return reframe(m) }()},
		{"extensions length short", func() []byte {
			m := bytes.Clone(msg)
			m[4+2+32+1+4+2+1]-- // low byte of the extensions length
			return reframe(m)
		}()},
		{"bad legacy version", func() []byte { m := bytes.Clone(msg); m[4] = 2; return reframe(m) }()},
		{"session id over 32", func() []byte { m := bytes.Clone(msg); m[4+34] = 33; return reframe(m) }()},
		{"odd cipher suites", func() []byte { m := bytes.Clone(msg); m[4+35+1] = 3; return reframe(m) }()},
	} {
		if name, st := TLSServerName(tc.stream, &scratch); st != Invalid {
			t.Errorf("%s: got %q %v, want invalid", tc.name, name, st)
		}
	}
}

func TestTLSParsersAllocateNothing(t *testing.T) {
	cs := captures(t)
	single := cs[2].record
	multi := reframe(cs[3].record[recordHeaderLen:], chunked(cs[3].record[recordHeaderLen:], 1400)...)
	quic := captureQUICClientHello(t, "quic.example.com")
	scratch := new([MaxHello]byte)
	for _, tc := range []struct {
		name string
		f    func() Status
	}{
		{"single record", func() Status { _, st := TLSServerName(single, scratch); return st }},
		{"multi record", func() Status { _, st := TLSServerName(multi, scratch); return st }},
		{"partial", func() Status { _, st := TLSServerName(multi[:3000], scratch); return st }},
		{"quic", func() Status { _, st := ClientHelloServerName(quic); return st }},
	} {
		if a := testing.AllocsPerRun(100, func() { tc.f() }); a != 0 {
			t.Errorf("%s: %v allocations per run, want 0", tc.name, a)
		}
	}
}

func itoa(i int) string {
	var b [20]byte
	n := len(b)
	for {
		n--
		b[n] = byte('0' + i%10)
		i /= 10
		if i == 0 {
			return string(b[n:])
		}
	}
}

func FuzzTLSServerName(f *testing.F) {
	for _, c := range captures(f) {
		msg := c.record[recordHeaderLen:]
		f.Add(c.record, uint16(len(c.record)/2), uint16(100))
		f.Add(reframe(msg, chunked(msg, 700)...), uint16(len(c.record)/3), uint16(7))
	}
	f.Add(captureQUICClientHello(f, "quic.example.com"), uint16(40), uint16(300))
	f.Add(reframe(buildHello(sniExt("a.example"), sniExt("b.example"))), uint16(0), uint16(1))
	f.Fuzz(func(t *testing.T, data []byte, cut, split uint16) {
		var s1, s2 [MaxHello]byte
		name, st := TLSServerName(data, &s1)
		if st == Found && (len(name) == 0 || len(name) > maxNameLen || !within(name, data) && !within(name, s1[:])) {
			t.Fatalf("found %d-byte name outside input and scratch", len(name))
		}
		if st != Found && name != nil {
			t.Fatalf("%v with a name", st)
		}
		// What a prefix decides, the whole stream decides alike.
		p := data[:int(cut)%(len(data)+1)]
		pname, pst := TLSServerName(p, &s2)
		if pst != NeedMore && (pst != st || !bytes.Equal(pname, name)) {
			t.Fatalf("prefix of %d/%d bytes: %q %v, whole: %q %v", len(p), len(data), pname, pst, name, st)
		}
		// The input as a bare handshake message, framed into records
		// anywhere, reads the same as in place.
		if len(data) > 2*maxRecordLen {
			return
		}
		mname, mst := ClientHelloServerName(data)
		var cuts []int
		if k := int(split) % (len(data) + 1); k > 0 && k < len(data) {
			cuts = chunked(data, k)
		}
		fname, fst := TLSServerName(reframe(data, cuts...), &s2)
		if fst != mst || !bytes.Equal(fname, mname) {
			t.Fatalf("bare message: %q %v, framed in records of %d: %q %v", mname, mst, split, fname, fst)
		}
	})
}

func BenchmarkTLSServerName(b *testing.B) {
	cs := captures(b)
	single := cs[1].record
	big := cs[3].record[recordHeaderLen:]
	multi := reframe(big, chunked(big, 1400)...)
	scratch := new([MaxHello]byte)
	for _, bc := range []struct {
		name   string
		stream []byte
	}{
		{"single-record-" + itoa(len(single)) + "B", single},
		{"records-of-1400-" + itoa(len(multi)) + "B", multi},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(bc.stream)))
			for b.Loop() {
				if _, st := TLSServerName(bc.stream, scratch); st != Found {
					b.Fatal(st)
				}
			}
		})
	}
}
