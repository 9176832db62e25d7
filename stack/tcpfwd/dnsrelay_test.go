package tcpfwd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"slices"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/tunfw/tunfw/dns"
	"golang.org/x/net/dns/dnsmessage"
)

// framed is msg after its length.
func framed(msg []byte) []byte {
	return append(binary.BigEndian.AppendUint16(nil, uint16(len(msg))), msg...)
}

// message is n bytes, each its index's low byte plus seed.
func message(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i) + seed
	}
	return b
}

// TestDNSMessages: messages of 1, 600 (past the first buffer) and 65535
// bytes (the most a length says), then short ones again, come out whole and
// in order, with their prefixes, from a stream read a byte at a time; the
// buffer starts small and grows only to the longest message.
func TestDNSMessages(t *testing.T) {
	msgs := [][]byte{message(1, 1), message(600, 2), message(65535, 3), message(0, 0), message(7, 4), message(600, 5)}
	var stream []byte
	for _, m := range msgs {
		stream = append(stream, framed(m)...)
	}
	var got [][]byte
	var caps []int
	err := dnsMessages(iotest.OneByteReader(bytes.NewReader(stream)), func(f []byte) error {
		got = append(got, bytes.Clone(f))
		caps = append(caps, cap(f))
		return nil
	})
	if err != nil {
		t.Fatalf("dnsMessages = %v", err)
	}
	if len(got) != len(msgs) {
		t.Fatalf("%d messages, want %d", len(got), len(msgs))
	}
	for i, m := range msgs {
		if !bytes.Equal(got[i], framed(m)) {
			t.Errorf("message %d (%d bytes) came out as %d bytes, not the same", i, len(m), len(got[i]))
		}
	}
	if caps[0] != dnsFirstBuf || caps[1] != 2+600 || caps[2] != 2+65535 || caps[5] != 2+65535 {
		t.Errorf("buffer capacities %v: want %d, then grown to 602 and 65537, kept", caps, dnsFirstBuf)
	}
}

func TestDNSMessagesEnds(t *testing.T) {
	one := framed(message(600, 1))
	fnErr := errors.New("write failed")
	for _, c := range []struct {
		name   string
		stream []byte
		fnErr  error
		want   error
		n      int // messages handed on
	}{
		{"empty", nil, nil, nil, 0},
		{"at a message's end", one, nil, nil, 1},
		{"in a length", slices.Concat(one, []byte{0}), nil, io.ErrUnexpectedEOF, 1},
		{"in a message", one[:300], nil, io.ErrUnexpectedEOF, 0},
		{"in a grown message", slices.Concat(one, framed(message(2000, 2))[:1000]), nil, io.ErrUnexpectedEOF, 1},
		{"fn fails", slices.Concat(one, one), fnErr, fnErr, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			n := 0
			err := dnsMessages(bytes.NewReader(c.stream), func([]byte) error {
				n++
				return c.fnErr
			})
			if !errors.Is(err, c.want) || n != c.n {
				t.Errorf("dnsMessages = %v after %d messages, want %v after %d", err, n, c.want, c.n)
			}
		})
	}
}

// FuzzDNSMessages: dnsMessages hands on exactly the messages that
// dns.NextTCPMessage splits off the stream, and ends without an error only
// at a message's end.
func FuzzDNSMessages(f *testing.F) {
	f.Add(framed(message(1, 0)))
	f.Add(append(framed(message(600, 1)), framed(message(3, 2))...))
	f.Add([]byte{0xff, 0xff, 1, 2})
	f.Add([]byte{0})
	f.Fuzz(func(t *testing.T, stream []byte) {
		rest := stream
		err := dnsMessages(bytes.NewReader(stream), func(f []byte) error {
			msg, r, ok := dns.NextTCPMessage(rest)
			if !ok || !bytes.Equal(f[2:], msg) || len(f) != 2+len(msg) || !bytes.Equal(f[:2], rest[:2]) {
				t.Fatalf("handed on %x, the stream has %x (ok %v)", f, msg, ok)
			}
			rest = r
			return nil
		})
		if _, _, ok := dns.NextTCPMessage(rest); ok {
			t.Fatalf("a whole message was left: %x", rest)
		}
		if (err == nil) != (len(rest) == 0) {
			t.Fatalf("dnsMessages = %v with %d bytes left", err, len(rest))
		}
	})
}

// TestFramedAnswer: the longest answer tunfw writes (BlockZero's AAAA for
// a 253-byte name, with EDNS) just fits the answer buffer; one that did
// not would still be framed.
func TestFramedAnswer(t *testing.T) {
	label := strings.Repeat("a", 63)
	name := label + "." + label + "." + label + "." + strings.Repeat("b", 61) + "."
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 7, RecursionDesired: true})
	b.StartQuestions()
	b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: dnsmessage.TypeAAAA, Class: dnsmessage.ClassINET})
	b.StartAdditionals()
	var rh dnsmessage.ResourceHeader
	rh.SetEDNS0(4096, dnsmessage.RCodeSuccess, false)
	b.OPTResource(rh, dnsmessage.OPTResource{})
	query, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	var buf [dnsAnswerBuf]byte
	a, err := dns.Answer(query, dns.BlockZero, buf[2:2])
	if err != nil {
		t.Fatal(err)
	}
	if len(a) != dnsAnswerBuf-2 || &a[0] != &buf[2] {
		t.Fatalf("the longest answer, %d bytes, is not the %d the answer buffer holds", len(a), dnsAnswerBuf-2)
	}
	f := framedAnswer(buf[:], a)
	if len(f) != 2+len(a) || &f[2] != &buf[2] || int(binary.BigEndian.Uint16(f)) != len(a) {
		t.Errorf("framed %d bytes, length %d, for %d", len(f), binary.BigEndian.Uint16(f), len(a))
	}
	// An answer Answer wrote elsewhere is copied after its length.
	big := message(1000, 9)
	f = framedAnswer(buf[:], big)
	if !bytes.Equal(f, framed(big)) {
		t.Error("an answer written elsewhere is not framed")
	}
}

// BenchmarkDNSMessagesConn is what one direction of a connection carrying a
// single 40-byte query allocates.
func BenchmarkDNSMessagesConn(b *testing.B) {
	stream := framed(message(40, 1))
	var r bytes.Reader
	b.ReportAllocs()
	for b.Loop() {
		r.Reset(stream)
		if err := dnsMessages(&r, func([]byte) error { return nil }); err != nil {
			b.Fatal(err)
		}
	}
}
