package dns

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

var (
	ip4 = netip.MustParseAddr("1.2.3.4")
	ip6 = netip.MustParseAddr("2001:db8::1")
)

// TestQuestion: ID, lowercased name without the trailing dot, type; and
// refusal of responses, empty questions, and names text cannot carry.
func TestQuestion(t *testing.T) {
	var buf [255]byte
	q := buildQuery(t, 0x1234, "WWW.Example.COM.", dnsmessage.TypeAAAA, true)
	id, name, qtype, ok := Question(q, &buf)
	if !ok || id != 0x1234 || string(name) != "www.example.com" || qtype != uint16(dnsmessage.TypeAAAA) {
		t.Fatalf("Question = %#x %q %d %v", id, name, qtype, ok)
	}
	if _, name, _, ok := Question(buildQuery(t, 1, ".", dnsmessage.TypeNS, false), &buf); !ok || len(name) != 0 {
		t.Errorf("root: %q %v", name, ok)
	}
	long := ""
	for range 4 {
		long += "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijk" + "." // 63-byte labels
	}
	long = long[:253] + "." // the longest name: 253 characters
	if _, name, _, ok := Question(buildQuery(t, 1, long, dnsmessage.TypeA, false), &buf); !ok || string(name) != long[:253] {
		t.Errorf("longest name: %q %v", name, ok)
	}

	resp := buildResponse(t, "example.com.", dnsmessage.TypeA, false)
	if _, _, _, ok := Question(resp, &buf); ok {
		t.Error("a response was read as a query")
	}
	notify := slices.Clone(q)
	notify[2] |= 4 << 3 // opcode NOTIFY
	if _, _, _, ok := Question(notify, &buf); ok {
		t.Error("a NOTIFY was read as a query")
	}
	noq := q[:12:12]
	noq[4], noq[5] = 0, 0 // QDCOUNT 0
	if _, _, _, ok := Question(noq, &buf); ok {
		t.Error("a query without question was read")
	}
	for i := range len(q) - 4 - 11 { // every cut inside the header, name or type
		if _, _, _, ok := Question(q[:i], &buf); ok {
			t.Errorf("query cut to %d bytes was read", i)
		}
	}
	// A label with a space or a control byte, written by hand since the
	// Builder checks nothing.
	for _, label := range []string{"a b", "a\x00b", "a\xffb"} {
		raw := append([]byte{0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, byte(len(label))}, label...)
		raw = append(raw, 3, 'c', 'o', 'm', 0, 0, 1, 0, 1)
		if _, name, _, ok := Question(raw, &buf); ok {
			t.Errorf("label %q read as %q", label, name)
		}
	}
	// A label holding a dot would read as two labels.
	raw := append([]byte{0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 7}, "ads.com"...)
	raw = append(raw, 0, 0, 1, 0, 1)
	if _, name, _, ok := Question(raw, &buf); ok {
		t.Errorf("label with a dot read as %q", name)
	}
}

// TestQuestionAllocs: Question allocates nothing.
func TestQuestionAllocs(t *testing.T) {
	q := buildQuery(t, 1, "www.example.com.", dnsmessage.TypeA, true)
	var buf [255]byte
	if n := testing.AllocsPerRun(100, func() { Question(q, &buf) }); n != 0 {
		t.Errorf("Question allocates %v times", n)
	}
}

// TestLearnChain: a -> b -> c with A and AAAA records for c yields both
// addresses under the question name, with the smallest TTL of the chain,
// whatever the order of the records and with or without compression.
func TestLearnChain(t *testing.T) {
	recs := []rr{
		{name: "A.test.", ttl: 300, target: "b.test."},
		{name: "b.test.", ttl: 50, target: "c.test."},
		{name: "c.test.", ttl: 600, addr: ip4},
		{name: "C.TEST.", ttl: 20, addr: ip6},
	}
	want := []learned{{"a.test", ip4, 50 * time.Second}, {"a.test", ip6, 20 * time.Second}}
	for _, compress := range []bool{false, true} {
		for _, order := range [][]int{{0, 1, 2, 3}, {3, 2, 1, 0}, {2, 0, 3, 1}} {
			var answers []rr
			for _, i := range order {
				answers = append(answers, recs[i])
			}
			msg := buildResponse(t, "a.test.", dnsmessage.TypeA, compress, answers...)
			got, err := learnAll(msg)
			slices.SortFunc(got, func(x, y learned) int { return x.addr.Compare(y.addr) })
			if err != nil || !slices.Equal(got, want) {
				t.Errorf("compress %v order %v: %v, %v; want %v", compress, order, got, err, want)
			}
		}
	}
}

// TestLearnCompressed: a response whose names are pointers into the
// question (as resolvers write them) is read; the compressed form is
// checked to be in use.
func TestLearnCompressed(t *testing.T) {
	plain := buildResponse(t, "www.example.com.", dnsmessage.TypeA, false,
		rr{name: "www.example.com.", ttl: 60, target: "cdn.example.com."},
		rr{name: "cdn.example.com.", ttl: 60, addr: ip4})
	msg := buildResponse(t, "www.example.com.", dnsmessage.TypeA, true,
		rr{name: "www.example.com.", ttl: 60, target: "cdn.example.com."},
		rr{name: "cdn.example.com.", ttl: 60, addr: ip4})
	if len(msg) >= len(plain) {
		t.Fatalf("not compressed: %d >= %d bytes", len(msg), len(plain))
	}
	got, err := learnAll(msg)
	if err != nil || !slices.Equal(got, []learned{{"www.example.com", ip4, time.Minute}}) {
		t.Errorf("got %v, %v", got, err)
	}
}

// TestLearnIgnores: addresses for a name the question does not lead to,
// a second CNAME for the same owner, error responses, and other classes
// teach nothing.
func TestLearnIgnores(t *testing.T) {
	msg := buildResponse(t, "a.test.", dnsmessage.TypeA, true,
		rr{name: "a.test.", ttl: 60, target: "b.test."},
		rr{name: "a.test.", ttl: 60, target: "evil.test."},
		rr{name: "evil.test.", ttl: 60, addr: netip.MustParseAddr("6.6.6.6")},
		rr{name: "other.test.", ttl: 60, addr: netip.MustParseAddr("7.7.7.7")},
		rr{name: "a.test.", ttl: 60, addr: netip.MustParseAddr("8.8.8.8")}, // a CNAME owner has no A
		rr{name: "b.test.", ttl: 30, addr: ip4})
	got, err := learnAll(msg)
	if err != nil || !slices.Equal(got, []learned{{"a.test", ip4, 30 * time.Second}}) {
		t.Errorf("got %v, %v", got, err)
	}

	nx := buildResponse(t, "a.test.", dnsmessage.TypeA, false, rr{name: "a.test.", ttl: 60, addr: ip4})
	nx[3] |= byte(dnsmessage.RCodeNameError)
	if got, err := learnAll(nx); err != nil || len(got) != 0 {
		t.Errorf("NXDOMAIN: %v, %v", got, err)
	}
	if got, err := learnAll(buildQuery(t, 1, "a.test.", dnsmessage.TypeA, false)); !errors.Is(err, ErrNotResponse) || len(got) != 0 {
		t.Errorf("query: %v, %v", got, err)
	}
	// No answers at all (NODATA).
	if got, err := learnAll(buildResponse(t, "a.test.", dnsmessage.TypeA, false)); err != nil || len(got) != 0 {
		t.Errorf("no data: %v, %v", got, err)
	}
}

// TestLearnLoops: CNAME loops and chains past 8 links are errors and
// teach nothing; a chain of exactly 8 is followed.
func TestLearnLoops(t *testing.T) {
	loop := buildResponse(t, "a.test.", dnsmessage.TypeA, true,
		rr{name: "a.test.", ttl: 60, target: "b.test."},
		rr{name: "b.test.", ttl: 60, target: "c.test."},
		rr{name: "c.test.", ttl: 60, target: "A.test."},
		rr{name: "a.test.", ttl: 60, addr: ip4})
	if got, err := learnAll(loop); !errors.Is(err, ErrCNAMELoop) || len(got) != 0 {
		t.Errorf("loop: %v, %v", got, err)
	}
	self := buildResponse(t, "a.test.", dnsmessage.TypeA, true, rr{name: "a.test.", ttl: 60, target: "a.test."})
	if got, err := learnAll(self); !errors.Is(err, ErrCNAMELoop) || len(got) != 0 {
		t.Errorf("self loop: %v, %v", got, err)
	}
	chain := func(links int) []byte {
		var answers []rr
		for i := range links {
			answers = append(answers, rr{name: string(rune('a'+i)) + ".test.", ttl: 60, target: string(rune('a'+i+1)) + ".test."})
		}
		answers = append(answers, rr{name: string(rune('a'+links)) + ".test.", ttl: 60, addr: ip4})
		return buildResponse(t, "a.test.", dnsmessage.TypeA, true, answers...)
	}
	if got, err := learnAll(chain(maxChain)); err != nil || len(got) != 1 {
		t.Errorf("chain of %d: %v, %v", maxChain, got, err)
	}
	if got, err := learnAll(chain(maxChain + 1)); !errors.Is(err, ErrCNAMEChain) || len(got) != 0 {
		t.Errorf("chain of %d: %v, %v", maxChain+1, got, err)
	}
	// CNAMEs off the chain count towards the bound on CNAME records.
	answers := []rr{{name: "a.test.", ttl: 60, addr: ip4}}
	for i := range maxCNAMEs {
		answers = append(answers, rr{name: fmt.Sprintf("x%d.test.", i), ttl: 60, target: "y.test."})
	}
	if got, err := learnAll(buildResponse(t, "a.test.", dnsmessage.TypeA, true, answers...)); err != nil || len(got) != 1 {
		t.Errorf("%d CNAMEs: %v, %v", maxCNAMEs, got, err)
	}
	answers = append(answers, rr{name: "z.test.", ttl: 60, target: "y.test."})
	if got, err := learnAll(buildResponse(t, "a.test.", dnsmessage.TypeA, true, answers...)); !errors.Is(err, ErrCNAMEs) || len(got) != 0 {
		t.Errorf("%d CNAMEs: %v, %v", maxCNAMEs+1, got, err)
	}
}

// TestLearnTruncated: every cut of a response is an error or (cut at a
// record boundary with counts unchanged) never a panic, and fn is never
// called with a partial message's records.
func TestLearnTruncated(t *testing.T) {
	msg := buildResponse(t, "a.test.", dnsmessage.TypeA, true,
		rr{name: "a.test.", ttl: 60, target: "b.test."},
		rr{name: "b.test.", ttl: 60, addr: ip4},
		rr{name: "b.test.", ttl: 60, addr: ip6})
	for i := range len(msg) {
		got, err := learnAll(msg[:i])
		if err == nil || len(got) != 0 {
			t.Errorf("cut to %d bytes: %v, %v", i, got, err)
		}
	}
	// A length field that runs past the end.
	bad := slices.Clone(msg)
	bad[len(bad)-17] = 0xff // RDLENGTH high byte of the AAAA record
	if got, err := learnAll(bad); err == nil || len(got) != 0 {
		t.Errorf("long rdlength: %v, %v", got, err)
	}
	// An A record whose length field says 0 (dnsmessage would read the 4
	// bytes after it anyway), before an A record that is fine.
	two := buildResponse(t, "a.test.", dnsmessage.TypeA, false,
		rr{name: "other.test.", ttl: 60, addr: ip4},
		rr{name: "a.test.", ttl: 60, addr: ip4})
	i := bytes.Index(two, []byte{0, 4, 1, 2, 3, 4}) // RDLENGTH and data of the first
	two[i+1] = 0
	if got, err := learnAll(two); err == nil || len(got) != 0 {
		t.Errorf("A of 0 bytes: %v, %v", got, err)
	}
}

// TestLearnTTL: TTLs with the top bit set count as 0 (RFC 2181).
func TestLearnTTL(t *testing.T) {
	msg := buildResponse(t, "a.test.", dnsmessage.TypeA, false, rr{name: "a.test.", ttl: 1 << 31, addr: ip4})
	if got, err := learnAll(msg); err != nil || !slices.Equal(got, []learned{{"a.test", ip4, 0}}) {
		t.Errorf("got %v, %v", got, err)
	}
}

// TestLearnAllocs: one allocation per response with addresses (the name
// string), none for a response without.
func TestLearnAllocs(t *testing.T) {
	msg := buildResponse(t, "a.test.", dnsmessage.TypeA, true,
		rr{name: "a.test.", ttl: 60, target: "b.test."},
		rr{name: "b.test.", ttl: 60, addr: ip4},
		rr{name: "b.test.", ttl: 60, addr: ip6})
	fn := func(string, netip.Addr, time.Duration) {}
	if n := testing.AllocsPerRun(100, func() { Learn(msg, fn) }); n > 1 {
		t.Errorf("Learn allocates %v times", n)
	}
	empty := buildResponse(t, "a.test.", dnsmessage.TypeA, true)
	if n := testing.AllocsPerRun(100, func() { Learn(empty, fn) }); n != 0 {
		t.Errorf("Learn of no answers allocates %v times", n)
	}
}

// parseAnswer checks that reply is a valid response to query and returns
// its header and answers.
func parseAnswer(t *testing.T, query, reply []byte) (dnsmessage.Header, []dnsmessage.Resource, bool) {
	t.Helper()
	var p dnsmessage.Parser
	h, err := p.Start(reply)
	check(t, err)
	qs, err := p.AllQuestions()
	check(t, err)
	ans, err := p.AllAnswers()
	check(t, err)
	check(t, p.SkipAllAuthorities())
	adds, err := p.AllAdditionals()
	check(t, err)

	var qp dnsmessage.Parser
	qh, err := qp.Start(query)
	check(t, err)
	q, err := qp.Question()
	check(t, err)
	if !h.Response || h.ID != qh.ID || h.RecursionDesired != qh.RecursionDesired || !h.RecursionAvailable || h.Truncated {
		t.Errorf("header %+v for query %+v", h, qh)
	}
	if len(qs) != 1 || qs[0] != q {
		t.Errorf("questions %v, want %v", qs, q)
	}
	edns := false
	for _, a := range adds {
		if a.Header.Type == dnsmessage.TypeOPT {
			edns = true
		}
	}
	return h, ans, edns
}

// TestAnswer: each mode answers A, AAAA and other types validly, with the
// query's ID, question (case kept), flags and EDNS presence.
func TestAnswer(t *testing.T) {
	buf := make([]byte, 0, 512)
	for _, qtype := range []dnsmessage.Type{dnsmessage.TypeA, dnsmessage.TypeAAAA, dnsmessage.TypeHTTPS, dnsmessage.TypeMX} {
		for _, edns := range []bool{false, true} {
			query := buildQuery(t, 0xbeef, "Ads.Example.com.", qtype, edns)
			for _, mode := range []BlockMode{BlockNXDomain, BlockRefused, BlockZero} {
				reply, err := Answer(query, mode, buf)
				check(t, err)
				h, ans, gotEDNS := parseAnswer(t, query, reply)
				if gotEDNS != edns {
					t.Errorf("%v %v: EDNS in answer %v, in query %v", mode, qtype, gotEDNS, edns)
				}
				wantRCode := map[BlockMode]dnsmessage.RCode{BlockNXDomain: dnsmessage.RCodeNameError, BlockRefused: dnsmessage.RCodeRefused, BlockZero: dnsmessage.RCodeSuccess}[mode]
				if h.RCode != wantRCode {
					t.Errorf("%v %v: rcode %v", mode, qtype, h.RCode)
				}
				wantAns := 0
				if mode == BlockZero && (qtype == dnsmessage.TypeA || qtype == dnsmessage.TypeAAAA) {
					wantAns = 1
				}
				if len(ans) != wantAns {
					t.Fatalf("%v %v: %d answers", mode, qtype, len(ans))
				}
				if wantAns == 0 {
					continue
				}
				a := ans[0]
				if a.Header.Name.String() != "Ads.Example.com." || a.Header.Type != qtype || a.Header.TTL != ZeroTTL {
					t.Errorf("%v %v: answer header %+v", mode, qtype, a.Header)
				}
				switch b := a.Body.(type) {
				case *dnsmessage.AResource:
					if b.A != [4]byte{} {
						t.Errorf("A %v", b.A)
					}
				case *dnsmessage.AAAAResource:
					if b.AAAA != [16]byte{} {
						t.Errorf("AAAA %v", b.AAAA)
					}
				}
			}
			if reply, err := Answer(query, BlockDrop, buf); reply != nil || err != nil {
				t.Errorf("drop: %v, %v", reply, err)
			}
		}
	}
	// Queries Answer will not answer.
	resp := buildResponse(t, "a.test.", dnsmessage.TypeA, false)
	if _, err := Answer(resp, BlockNXDomain, buf); err == nil {
		t.Error("answered a response")
	}
	q := buildQuery(t, 1, "a.test.", dnsmessage.TypeA, false)
	for i := range len(q) - 1 {
		if _, err := Answer(q[:i], BlockZero, buf); err == nil {
			t.Errorf("answered a query cut to %d bytes", i)
		}
	}
	notify := slices.Clone(q)
	notify[2] |= 4 << 3 // opcode NOTIFY
	if _, err := Answer(notify, BlockNXDomain, buf); err == nil {
		t.Error("answered a NOTIFY")
	}
	if _, err := Answer(q, BlockMode(9), buf); err == nil {
		t.Error("answered with an unknown mode")
	}
}

// TestAnswerAllocs: with room in buf, Answer allocates nothing.
func TestAnswerAllocs(t *testing.T) {
	q := buildQuery(t, 1, "ads.example.com.", dnsmessage.TypeAAAA, true)
	buf := make([]byte, 0, 512)
	for _, mode := range []BlockMode{BlockNXDomain, BlockZero} {
		if n := testing.AllocsPerRun(100, func() { Answer(q, mode, buf) }); n != 0 {
			t.Errorf("Answer %v allocates %v times", mode, n)
		}
	}
}

// TestNextTCPMessage: a stream splits into its messages, and a partial
// one waits for more bytes.
func TestNextTCPMessage(t *testing.T) {
	a := buildQuery(t, 1, "a.test.", dnsmessage.TypeA, false)
	b := buildQuery(t, 2, "b.test.", dnsmessage.TypeAAAA, true)
	var stream []byte
	for _, m := range [][]byte{a, b} {
		stream = append(stream, byte(len(m)>>8), byte(len(m)))
		stream = append(stream, m...)
	}
	for cut := range len(stream) + 1 {
		var got [][]byte
		rest := stream[:cut]
		for {
			msg, r, ok := NextTCPMessage(rest)
			if !ok {
				if len(r) != len(rest) {
					t.Fatalf("cut %d: rest changed without a message", cut)
				}
				break
			}
			got, rest = append(got, msg), r
		}
		want := 0
		if cut >= 2+len(a) {
			want++
		}
		if cut == len(stream) {
			want++
		}
		if len(got) != want || len(got) > 0 && !slices.Equal(got[0], a) || len(got) > 1 && !slices.Equal(got[1], b) {
			t.Errorf("cut %d: %d messages, want %d", cut, len(got), want)
		}
		if len(rest) != cut-consumed(got) {
			t.Errorf("cut %d: %d bytes left", cut, len(rest))
		}
	}
}

func consumed(msgs [][]byte) int {
	n := 0
	for _, m := range msgs {
		n += 2 + len(m)
	}
	return n
}
