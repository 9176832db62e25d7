package inspect

import (
	"bytes"
	"crypto/tls"
	"testing"

	"github.com/quic-go/quic-go"
)

// checkQUIC gives the datagrams to a fresh QUICInitial and checks what
// holds whatever they are: no datagram is changed, a name is a non-empty
// part of the gathered stream, and a final status stays.
func checkQUIC(t *testing.T, ds ...[]byte) {
	var q QUICInitial
	var name []byte
	var st Status
	for _, d := range ds {
		before := bytes.Clone(d)
		name, st = q.Add(d)
		if !bytes.Equal(before, d) {
			t.Fatal("Add modified its datagram")
		}
		if st > Invalid {
			t.Fatalf("status %d", st)
		}
		if (st == Found) != (name != nil) {
			t.Fatalf("%q, %v", name, st)
		}
	}
	if st == Found && (len(name) == 0 || !bytes.Contains(q.crypto, name)) {
		t.Fatalf("name %q is not in the stream", name)
	}
	if st != NeedMore {
		if again, st2 := q.Add(ds[0]); st2 != st || !bytes.Equal(again, name) {
			t.Fatalf("%q, %v became %q, %v", name, st, again, st2)
		}
	}
}

// Run the fuzzers with -fuzzminimizetime=5s or so: minimizing the large
// inputs they find interesting otherwise holds a worker for a minute.

// FuzzQUICInitial feeds two datagrams. Mutations rarely survive the
// AEAD, so this explores headers, coalescing and the flow's rules;
// FuzzQUICInitialPayload explores what is inside the encryption.
func FuzzQUICInitial(f *testing.F) {
	for _, v := range []quic.Version{quic.Version1, quic.Version2} {
		ds := quicCapture(f, "127.0.0.1", v, &tls.Config{ServerName: "fuzz.example", NextProtos: []string{"h3"}})
		f.Add(ds[0], ds[len(ds)-1])
		f.Add(ds[len(ds)-1], ds[0])
	}
	f.Add(hexFile(f, "testdata/rfc9001-a2-client-initial.hex"), []byte{})
	f.Add(hexFile(f, "testdata/rfc9369-a2-client-initial.hex"), []byte{0x40})
	f.Fuzz(func(t *testing.T, a, b []byte) {
		checkQUIC(t, a, b)
	})
}

// FuzzQUICInitialPayload seals two payloads as the Initial packets of a
// client and feeds them: frames, CRYPTO reassembly and the ClientHello.
func FuzzQUICInitialPayload(f *testing.F) {
	hello := quicHello("payload.example", 40)
	f.Add(cryptoFrame(0, hello), []byte{})
	f.Add(cat([]byte{0x01, 0x00}, cryptoFrame(30, hello[30:])), cat([]byte{0x02, 0x00, 0x00, 0x00, 0x00}, cryptoFrame(0, hello[:40])))
	f.Add(cryptoFrame(0, hello[:50]), cryptoFrame(20, hello[20:]))
	f.Add([]byte{0x1c, 0x00, 0x06, 0x02, 'n', 'o', 0x03, 0x01, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00}, []byte{0x06, 0x00, 0x04, 0x01, 0x00, 0x00, 0x00})
	dcid := []byte{8, 7, 6, 5, 4, 3, 2, 1}
	f.Fuzz(func(t *testing.T, p1, p2 []byte) {
		if len(p1) > 1100 || len(p2) > 1100 {
			return // one packet each
		}
		checkQUIC(t, quicSeal(t, dcid, 0, p1), quicSeal(t, dcid, 1, p2))
	})
}
