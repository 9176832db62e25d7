package dns

import (
	"bytes"
	"encoding/hex"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// Captured from dig 9 querying the test server of dig_test.go: dig's query
// for a.test AAAA (EDNS with a cookie, AD set) and the server's compressed
// answer a.test CNAME b.test (300) CNAME c.test (50) AAAA 2001:db8::1 (20).
var (
	digQuery, _  = hex.DecodeString("a80c012000010000000000010161047465737400001c000100002904d000000000000c000a000844cacb43a785ebd7")
	digAnswer, _ = hex.DecodeString("a80c850000010003000000010161047465737400001c0001c00c000500010000012c00040162c00ec024000500010000003200040163c00ec034001c000100000014001020010db800000000000000000000000100002904d0000000000000")
)

// TestCaptured reads the captured exchange without dig.
func TestCaptured(t *testing.T) {
	var buf [255]byte
	id, name, qtype, ok := Question(digQuery, &buf)
	if !ok || id != 0xa80c || string(name) != "a.test" || qtype != uint16(dnsmessage.TypeAAAA) {
		t.Errorf("Question = %#x %q %d %v", id, name, qtype, ok)
	}
	got, err := learnAll(digAnswer)
	if err != nil || len(got) != 1 || got[0] != (learned{"a.test", ip6, 20 * time.Second}) {
		t.Errorf("Learn = %v, %v", got, err)
	}
}

func fuzzSeeds(f *testing.F) {
	f.Add(digQuery)
	f.Add(digAnswer)
	f.Add(buildQuery(f, 1, "www.Example.com.", dnsmessage.TypeA, false))
	f.Add(buildQuery(f, 2, ".", dnsmessage.TypeHTTPS, true))
	f.Add(buildResponse(f, "a.test.", dnsmessage.TypeA, true,
		rr{name: "a.test.", ttl: 60, target: "b.test."},
		rr{name: "b.test.", ttl: 60, target: "a.test."}))
	f.Add(buildResponse(f, "a.test.", dnsmessage.TypeA, false,
		rr{name: "a.test.", ttl: 60, target: "b.test."},
		rr{name: "b.test.", ttl: 30, addr: ip4},
		rr{name: "B.test.", ttl: 1 << 31, addr: ip6}))
	f.Add([]byte{})
	f.Add([]byte{0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1}) // name points at itself
}

// FuzzQuestion: never panics; a name it returns is what dnsmessage reads,
// lowercased, printable and without the trailing dot.
func FuzzQuestion(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, msg []byte) {
		var buf [255]byte
		id, name, _, ok := Question(msg, &buf)
		if !ok {
			return
		}
		var p dnsmessage.Parser
		h, err := p.Start(msg)
		if err != nil || h.ID != id || h.Response || h.OpCode != 0 {
			t.Fatalf("Question read %q from a message dnsmessage reads as %+v, %v", name, h, err)
		}
		q, err := p.Question()
		if err != nil {
			t.Fatal(err)
		}
		want := bytes.ToLower(bytes.TrimSuffix([]byte(q.Name.String()), []byte(".")))
		if !bytes.Equal(name, want) || len(name) > 253 {
			t.Fatalf("name %q, dnsmessage reads %q", name, q.Name.String())
		}
		for _, c := range name {
			if c < 0x21 || c > 0x7e || 'A' <= c && c <= 'Z' {
				t.Fatalf("name %q has byte %#x", name, c)
			}
		}
	})
}

// FuzzLearn: never panics; on error nothing was learned; what is learned
// is for the question's name with a TTL below 2^31 s.
func FuzzLearn(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, msg []byte) {
		var got []learned
		err := Learn(msg, func(name string, addr netip.Addr, ttl time.Duration) {
			got = append(got, learned{name, addr, ttl})
		})
		if err != nil && len(got) > 0 {
			t.Fatalf("learned %v and failed: %v", got, err)
		}
		if len(got) == 0 {
			return
		}
		var p dnsmessage.Parser
		p.Start(msg)
		q, _ := p.Question()
		want := string(bytes.ToLower(bytes.TrimSuffix([]byte(q.Name.String()), []byte("."))))
		for _, l := range got {
			if l.name != want || !l.addr.IsValid() || l.ttl < 0 || l.ttl > (1<<31)*time.Second {
				t.Fatalf("learned %+v for question %q", l, want)
			}
		}
	})
}

// FuzzAnswer: never panics; every answer it writes parses, is a response
// with the query's ID, and carries its question.
func FuzzAnswer(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, msg []byte) {
		var buf [512]byte
		for mode := range BlockDrop + 2 {
			reply, err := Answer(msg, mode, buf[:0])
			if err != nil || reply == nil {
				if mode != BlockDrop && err == nil {
					t.Fatalf("%v: no answer and no error", mode)
				}
				continue
			}
			var qp, rp dnsmessage.Parser
			qh, _ := qp.Start(msg)
			q, _ := qp.Question()
			rh, err := rp.Start(reply)
			if err != nil || !rh.Response || rh.ID != qh.ID {
				t.Fatalf("%v: answer header %+v, %v", mode, rh, err)
			}
			rq, err := rp.Question()
			if err != nil || rq != q {
				t.Fatalf("%v: answer question %v, %v; want %v", mode, rq, err, q)
			}
			if err := rp.SkipAllQuestions(); err != nil {
				t.Fatalf("%v: %v", mode, err)
			}
			if _, err := rp.AllAnswers(); err != nil {
				t.Fatalf("%v: %v", mode, err)
			}
			if err := rp.SkipAllAuthorities(); err != nil {
				t.Fatalf("%v: %v", mode, err)
			}
			if _, err := rp.AllAdditionals(); err != nil {
				t.Fatalf("%v: %v", mode, err)
			}
		}
	})
}
