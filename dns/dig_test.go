package dns

import (
	"context"
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// exchange is one query a test server received and the reply it sent.
type exchange struct {
	query, reply []byte
}

// authServer is a tiny authoritative server for tests on 127.0.0.1 (UDP
// and TCP, one port), written with dnsmessage alone, so that dig's real
// queries meet real answers:
//
//	a.test     CNAME b.test     TTL 300
//	b.test     CNAME c.test     TTL 50
//	c.test     A 1.2.3.4 TTL 600, AAAA 2001:db8::1 TTL 20
//
// and names under ads.test are blocked: answered by Answer, with the mode
// named by their first label (nxdomain.ads.test, zero.ads.test, ...).
type authServer struct {
	port int
	got  chan exchange
}

func startAuthServer(t *testing.T) *authServer {
	t.Helper()
	var (
		uc  *net.UDPConn
		tl  *net.TCPListener
		err error
	)
	for range 10 { // the UDP port may be taken for TCP: try another
		uc, err = net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		tl, err = net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: uc.LocalAddr().(*net.UDPAddr).Port})
		if err == nil {
			break
		}
		uc.Close()
	}
	if err != nil {
		t.Fatal(err)
	}
	s := &authServer{port: uc.LocalAddr().(*net.UDPAddr).Port, got: make(chan exchange, 16)}
	var wg sync.WaitGroup
	t.Cleanup(func() { uc.Close(); tl.Close(); wg.Wait() })
	wg.Go(func() {
		buf := make([]byte, 65535)
		for {
			n, from, err := uc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			q := slices.Clone(buf[:n])
			if r := s.reply(t, q); r != nil {
				uc.WriteToUDPAddrPort(r, from)
			}
		}
	})
	wg.Go(func() {
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				var stream []byte
				buf := make([]byte, 4096)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					stream = append(stream, buf[:n]...)
					for {
						msg, rest, ok := NextTCPMessage(stream)
						if !ok {
							break
						}
						if r := s.reply(t, slices.Clone(msg)); r != nil {
							c.Write(append([]byte{byte(len(r) >> 8), byte(len(r))}, r...))
						}
						stream = rest
					}
				}
			})
		}
	})
	return s
}

func (s *authServer) reply(t *testing.T, query []byte) []byte {
	var p dnsmessage.Parser
	qh, err := p.Start(query)
	if err != nil {
		t.Errorf("server: %v", err)
		return nil
	}
	q, err := p.Question()
	if err != nil {
		t.Errorf("server: %v", err)
		return nil
	}
	name := strings.ToLower(q.Name.String())
	if first, rest, _ := strings.Cut(name, "."); rest == "ads.test." {
		mode, err := ParseBlockMode(first)
		if err != nil {
			t.Errorf("server: %v", err)
			return nil
		}
		r, err := Answer(query, mode, nil)
		if err != nil {
			t.Errorf("server: Answer: %v", err)
		}
		s.got <- exchange{query, r}
		return r
	}
	edns := false
	if p.SkipAllQuestions() == nil && p.SkipAllAnswers() == nil && p.SkipAllAuthorities() == nil {
		adds, _ := p.AllAdditionals()
		for _, a := range adds {
			edns = edns || a.Header.Type == dnsmessage.TypeOPT
		}
	}
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: qh.ID, Response: true, Authoritative: true, RecursionDesired: qh.RecursionDesired})
	b.EnableCompression() // as real servers do
	b.StartQuestions()
	b.Question(q)
	b.StartAnswers()
	mk := func(s string) dnsmessage.Name { return dnsmessage.MustNewName(s) }
	type link struct {
		next string
		ttl  uint32
	}
	chain := map[string]link{"a.test.": {"b.test.", 300}, "b.test.": {"c.test.", 50}}
	owner := q.Name
	for {
		l, ok := chain[strings.ToLower(owner.String())]
		if !ok {
			break
		}
		b.CNAMEResource(dnsmessage.ResourceHeader{Name: owner, Class: dnsmessage.ClassINET, TTL: l.ttl}, dnsmessage.CNAMEResource{CNAME: mk(l.next)})
		owner = mk(l.next)
	}
	if strings.ToLower(owner.String()) == "c.test." {
		h := dnsmessage.ResourceHeader{Name: owner, Class: dnsmessage.ClassINET}
		switch q.Type {
		case dnsmessage.TypeA:
			h.TTL = 600
			b.AResource(h, dnsmessage.AResource{A: ip4.As4()})
		case dnsmessage.TypeAAAA:
			h.TTL = 20
			b.AAAAResource(h, dnsmessage.AAAAResource{AAAA: ip6.As16()})
		}
	}
	if edns {
		b.StartAdditionals()
		var h dnsmessage.ResourceHeader
		h.SetEDNS0(1232, dnsmessage.RCodeSuccess, false)
		b.OPTResource(h, dnsmessage.OPTResource{})
	}
	r, err := b.Finish()
	if err != nil {
		t.Errorf("server: %v", err)
		return nil
	}
	s.got <- exchange{query, r}
	return r
}

// dig queries the server and returns dig's output and the exchange.
func (s *authServer) dig(t *testing.T, args ...string) (string, exchange) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	args = append([]string{"@127.0.0.1", "-p", strconv.Itoa(s.port), "+tries=1", "+time=5"}, args...)
	out, err := exec.CommandContext(ctx, "dig", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("dig %v: %v\n%s", args, err, out)
	}
	for _, bad := range []string{"malformed", "mismatch", "bad packet", "FORMERR", "timed out"} {
		if strings.Contains(string(out), bad) {
			t.Errorf("dig %v: %q in\n%s", args, bad, out)
		}
	}
	select {
	case x := <-s.got:
		return string(out), x
	default:
		t.Fatalf("dig %v answered but the server recorded nothing", args)
		return "", exchange{}
	}
}

// TestDig: dig's own queries, over UDP and TCP, read by Question; the
// answers of a real (if tiny) server read by Learn; tunfw's answers
// accepted by dig.
func TestDig(t *testing.T) {
	if _, err := exec.LookPath("dig"); err != nil {
		t.Skip("dig not installed")
	}
	s := startAuthServer(t)
	for _, transport := range []string{"+notcp", "+tcp"} {
		for _, c := range []struct {
			qtype string
			want  learned
		}{
			{"A", learned{"a.test", ip4, 50 * time.Second}},
			{"AAAA", learned{"a.test", ip6, 20 * time.Second}},
		} {
			out, x := s.dig(t, transport, "A.Test", c.qtype)
			if !strings.Contains(out, "status: NOERROR") {
				t.Errorf("%s %s: dig says\n%s", transport, c.qtype, out)
			}
			var buf [255]byte
			_, name, qtype, ok := Question(x.query, &buf)
			if !ok || string(name) != "a.test" || dnsmessage.Type(qtype).String() != "Type"+c.qtype {
				t.Errorf("%s %s: Question(dig's query) = %q %d %v", transport, c.qtype, name, qtype, ok)
			}
			got, err := learnAll(x.reply)
			if err != nil || !slices.Equal(got, []learned{c.want}) {
				t.Errorf("%s %s: Learn = %v, %v; want %v", transport, c.qtype, got, err, c.want)
			}
			// Learn sees the same when the chain starts half way.
			if c.qtype == "A" {
				_, x := s.dig(t, transport, "b.test", "A")
				if got, err := learnAll(x.reply); err != nil || !slices.Equal(got, []learned{{"b.test", ip4, 50 * time.Second}}) {
					t.Errorf("%s b.test: Learn = %v, %v", transport, got, err)
				}
			}
		}

		for _, c := range []struct {
			args   []string
			status string
			short  string
		}{
			{[]string{"nxdomain.ads.test", "A"}, "NXDOMAIN", ""},
			{[]string{"refused.ads.test", "AAAA"}, "REFUSED", ""},
			{[]string{"Zero.Ads.Test", "A"}, "NOERROR", "0.0.0.0"},
			{[]string{"zero.ads.test", "AAAA"}, "NOERROR", "::"},
			{[]string{"zero.ads.test", "MX"}, "NOERROR", ""},
			{[]string{"+noedns", "zero.ads.test", "A"}, "NOERROR", "0.0.0.0"},
		} {
			args := append([]string{transport}, c.args...)
			out, x := s.dig(t, args...)
			if !strings.Contains(out, "status: "+c.status) {
				t.Errorf("dig %v: want status %s in\n%s", args, c.status, out)
			}
			if strings.Contains(out, "recursion requested but not available") {
				t.Errorf("dig %v: RA not set", args)
			}
			var p dnsmessage.Parser
			if _, err := p.Start(x.reply); err != nil {
				t.Fatal(err)
			}
			p.SkipAllQuestions()
			ans, err := p.AllAnswers()
			if err != nil {
				t.Fatal(err)
			}
			var addrs []string
			for _, a := range ans {
				switch b := a.Body.(type) {
				case *dnsmessage.AResource:
					addrs = append(addrs, netip.AddrFrom4(b.A).String())
				case *dnsmessage.AAAAResource:
					addrs = append(addrs, netip.AddrFrom16(b.AAAA).String())
				}
			}
			if strings.Join(addrs, " ") != c.short {
				t.Errorf("dig %v: answers %v, want %q", args, addrs, c.short)
			}
			if c.short != "" && !strings.Contains(out, "IN\t"+map[bool]string{true: "A", false: "AAAA"}[c.short == "0.0.0.0"]+"\t"+c.short) {
				t.Errorf("dig %v: dig does not show %s:\n%s", args, c.short, out)
			}
			// tunfw's own answers teach nothing but the zero address.
			if got, err := learnAll(x.reply); err != nil || len(got) != len(addrs) {
				t.Errorf("dig %v: Learn of own answer = %v, %v", args, got, err)
			}
		}
	}
}
