package dns

import (
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

func mustName(t testing.TB, s string) dnsmessage.Name {
	t.Helper()
	n, err := dnsmessage.NewName(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// rr is a record for buildMsg: A/AAAA when addr is valid, else CNAME to target.
type rr struct {
	name   string
	ttl    uint32
	addr   netip.Addr
	target string
}

// buildQuery builds a query for name/qtype, with EDNS when edns is set.
func buildQuery(t testing.TB, id uint16, name string, qtype dnsmessage.Type, edns bool) []byte {
	t.Helper()
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: id, RecursionDesired: true})
	b.EnableCompression()
	check(t, b.StartQuestions())
	check(t, b.Question(dnsmessage.Question{Name: mustName(t, name), Type: qtype, Class: dnsmessage.ClassINET}))
	if edns {
		check(t, b.StartAdditionals())
		var h dnsmessage.ResourceHeader
		check(t, h.SetEDNS0(4096, dnsmessage.RCodeSuccess, true))
		check(t, b.OPTResource(h, dnsmessage.OPTResource{Options: []dnsmessage.Option{{Code: 10, Data: []byte("cookie12")}}}))
	}
	msg, err := b.Finish()
	check(t, err)
	return msg
}

// buildResponse builds a response to qname/qtype with the given answers,
// names compressed when compress is set.
func buildResponse(t testing.TB, qname string, qtype dnsmessage.Type, compress bool, answers ...rr) []byte {
	t.Helper()
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 7, Response: true, RecursionDesired: true, RecursionAvailable: true})
	if compress {
		b.EnableCompression()
	}
	check(t, b.StartQuestions())
	check(t, b.Question(dnsmessage.Question{Name: mustName(t, qname), Type: qtype, Class: dnsmessage.ClassINET}))
	check(t, b.StartAnswers())
	for _, a := range answers {
		h := dnsmessage.ResourceHeader{Name: mustName(t, a.name), Class: dnsmessage.ClassINET, TTL: a.ttl}
		switch {
		case a.addr.Is4():
			check(t, b.AResource(h, dnsmessage.AResource{A: a.addr.As4()}))
		case a.addr.Is6():
			check(t, b.AAAAResource(h, dnsmessage.AAAAResource{AAAA: a.addr.As16()}))
		default:
			check(t, b.CNAMEResource(h, dnsmessage.CNAMEResource{CNAME: mustName(t, a.target)}))
		}
	}
	msg, err := b.Finish()
	check(t, err)
	return msg
}

func check(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// learned is what Learn reported, for comparison.
type learned struct {
	name string
	addr netip.Addr
	ttl  time.Duration
}

func learnAll(msg []byte) ([]learned, error) {
	var out []learned
	err := Learn(msg, func(name string, addr netip.Addr, ttl time.Duration) {
		out = append(out, learned{name, addr, ttl})
	})
	return out, err
}
