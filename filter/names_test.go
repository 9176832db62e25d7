package filter

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"
	"github.com/tunfw/tunfw/dns"
	"golang.org/x/net/dns/dnsmessage"
)

const nameRules = `
[filter]
default = "deny"

[sets]
ads = ["doubleclick.net", "*.doubleclick.net"]

[[rule]]
name = "no-ads"
action = "reject"
domain = "@ads"

[[rule]]
name = "github"
action = "allow"
proto = "tcp"
dst_port = 443
domain = ["github.com", "*.github.com"]

[[rule]]
name = "dns"
action = "allow"
proto = "udp"
dst_port = 53

[[rule]]
name = "lan"
action = "allow"
dst = "10.0.0.0/8"
`

func TestMatchName(t *testing.T) {
	rs := mustCompile(t, nameRules)
	if !rs.HasNameRules() {
		t.Fatal("HasNameRules false for a ruleset with domain keys")
	}
	web, _ := parsed(tcp("192.0.2.1", 40000, "198.51.100.7", 443, TCPSyn))
	for _, c := range []struct {
		name string
		want string
	}{
		{"github.com", "github"},
		{"API.GitHub.com.", "github"},
		{"a.b.github.com", "github"},
		{"notgithub.com", "default"},
		{"", "default"},
		{"ad.doubleclick.net", "no-ads"},
		{"doubleclick.net", "no-ads"},
	} {
		_, ri := rs.MatchName(web, c.name)
		if got := rs.RuleName(ri); got != c.want {
			t.Errorf("MatchName(%q) = %s, want %s", c.name, got, c.want)
		}
	}
	// A domain rule never matches a flow whose other keys do not.
	other, _ := parsed(tcp("192.0.2.1", 40000, "198.51.100.7", 80, TCPSyn))
	if _, ri := rs.MatchName(other, "github.com"); rs.RuleName(ri) != "default" {
		t.Errorf("port 80 flow named github.com took %s, want default", rs.RuleName(ri))
	}
	// The name does not matter once a rule without one matched first.
	lan, _ := parsed(tcp("192.0.2.1", 40000, "10.1.2.3", 443, TCPSyn))
	if _, ri := rs.MatchName(lan, "ad.doubleclick.net"); rs.RuleName(ri) != "no-ads" {
		t.Errorf("lan flow named an ad took %s, want no-ads (it comes first)", rs.RuleName(ri))
	}
}

func TestNeedsName(t *testing.T) {
	rs := mustCompile(t, nameRules)
	for _, c := range []struct {
		p    pk
		want bool
	}{
		{tcp("192.0.2.1", 40000, "198.51.100.7", 443, TCPSyn), true}, // github or ads decide
		{tcp("192.0.2.1", 40000, "198.51.100.7", 80, TCPSyn), true},  // ads reject vs default deny
		{udp("192.0.2.1", 40000, "198.51.100.7", 53), true},          // ads reject vs dns allow
	} {
		p, _ := parsed(c.p)
		if got := rs.NeedsName(p); got != c.want {
			t.Errorf("NeedsName(%v) = %v, want %v", KeyOf(p), got, c.want)
		}
	}
	// Without domain keys nothing needs a name.
	plain := mustCompile(t, matchConfig)
	p, _ := parsed(tcp("192.0.2.1", 40000, "198.51.100.7", 443, TCPSyn))
	if plain.NeedsName(p) {
		t.Error("NeedsName true for a ruleset without domain keys")
	}
	// Name rules that cannot change the verdict need no name: a deny by
	// name before a default deny.
	same := mustCompile(t, `
[filter]
default = "deny"
[[rule]]
name = "ads"
action = "deny"
domain = "*.ads.example"
[[rule]]
name = "ssh"
action = "allow"
proto = "tcp"
dst_port = 22
`)
	if p, _ := parsed(tcp("192.0.2.1", 40000, "198.51.100.7", 443, TCPSyn)); same.NeedsName(p) {
		t.Error("a deny-by-name before a default deny makes the flow wait for its name")
	}
	if p, _ := parsed(tcp("192.0.2.1", 40000, "198.51.100.7", 22, TCPSyn)); !same.NeedsName(p) {
		t.Error("a deny-by-name before an allow does not make the flow wait for its name")
	}
}

func TestBlockedName(t *testing.T) {
	rs := mustCompile(t, nameRules)
	src := netip.MustParseAddr("192.0.2.1")
	if ri, ok := rs.BlockedName(src, []byte("x.doubleclick.net")); !ok || rs.RuleName(ri) != "no-ads" {
		t.Errorf("BlockedName(x.doubleclick.net) = %d %v, want no-ads true", ri, ok)
	}
	// github has proto and dst_port: a query for it is not the flow.
	if _, ok := rs.BlockedName(src, []byte("github.com")); ok {
		t.Error("a name whose rule has other conditions is blocked at DNS")
	}
	allowFirst := mustCompile(t, `
[[rule]]
name = "ok"
action = "allow"
domain = "good.doubleclick.net"
[[rule]]
name = "ads"
action = "deny"
domain = "*.doubleclick.net"
src = "192.0.2.0/24"
`)
	if _, ok := allowFirst.BlockedName(src, []byte("good.doubleclick.net")); ok {
		t.Error("an allow-by-name before the deny does not win")
	}
	if _, ok := allowFirst.BlockedName(src, []byte("bad.doubleclick.net")); !ok {
		t.Error("deny by name with a src condition does not block at DNS")
	}
	if _, ok := allowFirst.BlockedName(netip.MustParseAddr("198.18.0.1"), []byte("bad.doubleclick.net")); ok {
		t.Error("deny by name blocks a client its src does not cover")
	}
}

// TestBlockQuery: a blocked query counts for its rule and for the
// blocked-queries counter and is logged with its name; a query not blocked
// counts nowhere.
func TestBlockQuery(t *testing.T) {
	e, logs := newTestEngine(t, nameRules, EngineOptions{})
	src := netip.MustParseAddr("192.0.2.1")
	if !e.BlockQuery(src, []byte("Ad.DoubleClick.net."), 1) {
		t.Fatal("a query for an ad was not blocked")
	}
	for _, n := range []string{"github.com", "example.org", ""} {
		if e.BlockQuery(src, []byte(n), 1) {
			t.Errorf("BlockQuery(%q) = true", n)
		}
	}
	if got := e.Counters().DNSBlocked; got != 1 {
		t.Errorf("DNSBlocked = %d, want 1", got)
	}
	for _, r := range e.RuleStats() {
		want := uint64(0)
		if r.Name == "no-ads" {
			want = 1
		}
		if r.Flows != want {
			t.Errorf("rule %s counted %d, want %d", r.Name, r.Flows, want)
		}
	}
	if l := logs.String(); strings.Count(l, "dns query blocked") != 1 || !strings.Contains(l, "name=Ad.DoubleClick.net.") || !strings.Contains(l, "rule=no-ads") {
		t.Errorf("log:\n%s", l)
	}
}

// TestBlockQueryAllocatesNothing: DNS is read on every query while rules
// by name are in force; one it does not block costs no allocation, even
// when the name is in a set (github's rule has other conditions). The
// names are on the stack, as DNS reads them (dns.Question): BlockQuery
// must not make them escape.
func TestBlockQueryAllocatesNothing(t *testing.T) {
	e, _ := newTestEngine(t, nameRules, EngineOptions{Logger: quiet})
	src := netip.MustParseAddr("192.0.2.1")
	long := strings.Repeat("label.", 30) + "Example.ORG."
	if n := testing.AllocsPerRun(1000, func() {
		var buf [255]byte
		n := copy(buf[:], long)
		gh := [...]byte{'A', 'P', 'I', '.', 'g', 'i', 't', 'h', 'u', 'b', '.', 'c', 'o', 'm'}
		if e.BlockQuery(src, buf[:n], 1) || e.BlockQuery(src, gh[:], 1) {
			panic("blocked")
		}
	}); n != 0 {
		t.Errorf("BlockQuery allocates %v times a run", n)
	}
}

// dnsQuery is a query with ID 0x4242 for name (written with its dot),
// with EDNS when edns.
func dnsQuery(t testing.TB, name string, qtype dnsmessage.Type, edns bool) []byte {
	t.Helper()
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 0x4242, RecursionDesired: true})
	b.StartQuestions()
	b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: qtype, Class: dnsmessage.ClassINET})
	if edns {
		b.StartAdditionals()
		var rh dnsmessage.ResourceHeader
		rh.SetEDNS0(4096, dnsmessage.RCodeSuccess, false)
		b.OPTResource(rh, dnsmessage.OPTResource{})
	}
	q, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	return q
}

// TestAnswerQuery: what tunfw answers itself, and how, for each kind of
// query, whichever transport carries it.
func TestAnswerQuery(t *testing.T) {
	e, _ := newTestEngine(t, nameRules, EngineOptions{Logger: quiet})
	src := netip.MustParseAddr("192.0.2.1")
	canary := dnsQuery(t, dns.CanaryName+".", dnsmessage.TypeA, false)
	ad := dnsQuery(t, "X.DoubleClick.net.", dnsmessage.TypeA, true)
	response := append([]byte(nil), ad...)
	response[2] |= 0x80 // QR: an answer for the name is not a query
	for _, c := range []struct {
		name     string
		msg      []byte
		mode     dns.BlockMode
		answered bool
		rcode    dnsmessage.RCode
		records  int  // answer records
		opt      bool // EDNS in the answer
	}{
		{"canary", canary, dns.BlockZero, true, dnsmessage.RCodeNameError, 0, false},
		{"canary dropped", canary, dns.BlockDrop, true, dnsmessage.RCodeNameError, 0, false},
		{"blocked nxdomain", ad, dns.BlockNXDomain, true, dnsmessage.RCodeNameError, 0, true},
		{"blocked refused", ad, dns.BlockRefused, true, dnsmessage.RCodeRefused, 0, true},
		{"blocked zero", ad, dns.BlockZero, true, dnsmessage.RCodeSuccess, 1, true},
		{"blocked drop", ad, dns.BlockDrop, true, 0, -1, false},
		{"not blocked", dnsQuery(t, "example.org.", dnsmessage.TypeA, false), dns.BlockNXDomain, false, 0, 0, false},
		{"named with conditions", dnsQuery(t, "github.com.", dnsmessage.TypeA, false), dns.BlockNXDomain, false, 0, 0, false},
		{"truncated", ad[:20], dns.BlockNXDomain, false, 0, 0, false},
		{"response", response, dns.BlockNXDomain, false, 0, 0, false},
		{"garbage", []byte{1, 2, 3}, dns.BlockNXDomain, false, 0, 0, false},
		{"empty", nil, dns.BlockNXDomain, false, 0, 0, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			buf := make([]byte, 0, 1024)
			ans, answered := e.AnswerQuery(src, c.msg, c.mode, buf, 1)
			if answered != c.answered {
				t.Fatalf("answered = %v, want %v", answered, c.answered)
			}
			switch {
			case !answered:
				if ans != nil {
					t.Errorf("a forwarded query has an answer of %d bytes", len(ans))
				}
				return
			case c.records < 0:
				if ans == nil || len(ans) != 0 {
					t.Errorf("dropped query's answer %v (nil %v), want empty, not nil", ans, ans == nil)
				}
				return
			case len(ans) == 0 || &ans[0] != &buf[:1][0]:
				t.Fatal("the answer is not written into buf")
			}
			var m dnsmessage.Message
			if err := m.Unpack(ans); err != nil {
				t.Fatalf("answer does not parse: %v", err)
			}
			if !m.Response || m.ID != 0x4242 || m.RCode != c.rcode || len(m.Questions) != 1 || len(m.Answers) != c.records || (len(m.Additionals) == 1) != c.opt {
				t.Errorf("answer %+v", m)
			}
			if c.records == 1 {
				if a, ok := m.Answers[0].Body.(*dnsmessage.AResource); !ok || a.A != [4]byte{} {
					t.Errorf("zero answer's record %v", m.Answers[0].Body)
				}
			}
		})
	}
	// BlockQuery accounted the four blocked queries, not the canary.
	if got := e.Counters().DNSBlocked; got != 4 {
		t.Errorf("DNSBlocked = %d, want 4", got)
	}
	// Without rules by name tunfw answers nothing, the canary included.
	plain, _ := newTestEngine(t, matchConfig, EngineOptions{Logger: quiet})
	if _, answered := plain.AnswerQuery(src, canary, dns.BlockNXDomain, nil, 1); answered {
		t.Error("the canary was answered without rules by name")
	}
}

// TestAnswerQueryAllocatesNothing: a query forwarded, or answered into a
// buffer with room, costs no allocation.
func TestAnswerQueryAllocatesNothing(t *testing.T) {
	e, _ := newTestEngine(t, nameRules, EngineOptions{Logger: quiet})
	src := netip.MustParseAddr("192.0.2.1")
	pass := dnsQuery(t, "www.example.org.", dnsmessage.TypeA, true)
	canary := dnsQuery(t, dns.CanaryName+".", dnsmessage.TypeAAAA, true)
	buf := make([]byte, 0, 1024)
	if n := testing.AllocsPerRun(1000, func() {
		if _, ok := e.AnswerQuery(src, pass, dns.BlockZero, buf, 1); ok {
			panic("answered")
		}
		if a, ok := e.AnswerQuery(src, canary, dns.BlockZero, buf, 1); !ok || len(a) == 0 {
			panic("not answered")
		}
	}); n != 0 {
		t.Errorf("AnswerQuery allocates %v times a run", n)
	}
}

// FuzzAnswerQuery: whatever a client sends to port 53, AnswerQuery does not
// panic, and what it answers is a response to the query's ID.
func FuzzAnswerQuery(f *testing.F) {
	f.Add(dnsQuery(f, dns.CanaryName+".", dnsmessage.TypeA, false))
	f.Add(dnsQuery(f, "a.doubleclick.net.", dnsmessage.TypeAAAA, true))
	f.Add(dnsQuery(f, "example.org.", dnsmessage.TypeHTTPS, true))
	f.Add([]byte{0x42, 0x42, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0})
	e := NewEngine(mustCompile(f, nameRules), EngineOptions{Logger: quiet})
	src := netip.MustParseAddr("192.0.2.1")
	f.Fuzz(func(t *testing.T, msg []byte) {
		for _, mode := range []dns.BlockMode{dns.BlockZero, dns.BlockDrop} {
			ans, answered := e.AnswerQuery(src, msg, mode, make([]byte, 0, 64), 1)
			if !answered || len(ans) == 0 {
				continue
			}
			var p dnsmessage.Parser
			h, err := p.Start(ans)
			if err != nil || !h.Response || h.ID != uint16(msg[0])<<8|uint16(msg[1]) {
				t.Fatalf("answer %x (%v) to %x", ans, err, msg)
			}
		}
	})
}

func TestNameSetsConfig(t *testing.T) {
	dir := t.TempDir()
	list := filepath.Join(dir, "block.txt")
	if err := os.WriteFile(list, []byte("# ads\ntracker.example\n\nads.example\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	src := `
[sets]
block = { file = "block.txt" }
mixed = ["example.com", "10.0.0.1"]
bad = ["exa mple.com"]
ports = [80]
missing = { file = "nope.txt" }

[[rule]]
action = "deny"
domain = "@block"

[[rule]]
action = "deny"
domain = "@ports"

[[rule]]
action = "deny"
domain = ["ok.example", 7]

[[rule]]
action = "deny"
domain = []
`
	var fc fileConfig
	if _, err := toml.Decode(src, &fc); err != nil {
		t.Fatal(err)
	}
	fc.Filter.Dir = dir
	_, err := Compile(fc.Filter, fc.Sets, fc.Rule)
	if err == nil {
		t.Fatal("Compile accepted bad name sets")
	}
	for _, want := range []string{
		"sets.mixed: mixes names and addresses",
		"sets.bad:",
		"sets.missing:",
		`rule[2].domain: set "@ports" holds ports, not names`,
		"rule[3].domain: 7 (int64) is not a name",
		"rule[4].domain: empty list",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("errors lack %q:\n%v", want, err)
		}
	}
	if strings.Contains(err.Error(), "sets.block") || strings.Contains(err.Error(), "rule[1]") {
		t.Errorf("the valid list file set was reported:\n%v", err)
	}

	// The list file's names match through the set.
	var ok fileConfig
	if _, err := toml.Decode("[sets]\nblock = { file = \"block.txt\" }\n[[rule]]\nname = \"b\"\naction = \"deny\"\ndomain = \"@block\"\n", &ok); err != nil {
		t.Fatal(err)
	}
	ok.Filter.Dir = dir
	rs, err := Compile(ok.Filter, ok.Sets, ok.Rule)
	if err != nil {
		t.Fatal(err)
	}
	p, _ := parsed(tcp("192.0.2.1", 1, "198.51.100.7", 443, TCPSyn))
	if _, ri := rs.MatchName(p, "ads.example"); rs.RuleName(ri) != "b" {
		t.Errorf("a name from the list file did not match its rule")
	}
}

func TestEnginePeekAndDecide(t *testing.T) {
	dnsNames := map[[2]netip.Addr]string{}
	opts := EngineOptions{
		Names: func(c, a netip.Addr) (string, bool) { n, ok := dnsNames[[2]netip.Addr{c, a}]; return n, ok },
		Peekable: func(p *Packet) bool {
			return p.Proto == ProtoTCP && p.DstPort == 443
		},
	}
	e, logs := newTestEngine(t, strings.Replace(nameRules, `default = "deny"`, "default = \"deny\"\nlog = \"all\"", 1), opts)
	syn := tcp("192.0.2.1", 40000, "198.51.100.7", 443, TCPSyn)
	d := in(e, syn, 1)
	if d.Verdict != VerdictForward || !d.Peek || d.Rule != NoRule {
		t.Fatalf("SYN of a flow a name decides: %+v, want forward+peek", d)
	}
	// The handshake and first bytes go to the stack meanwhile.
	if d := in(e, tcp("192.0.2.1", 40000, "198.51.100.7", 443, TCPAck), 2); d.Verdict != VerdictForward {
		t.Fatalf("ACK while peeking: %+v", d)
	}
	if fl := e.Flows(3); len(fl) != 1 || fl[0].Verdict != "peek" {
		t.Fatalf("listing while peeking: %+v", fl)
	}
	key := KeyOf(mustParsed(syn))
	id := e.Claim(key)
	if !e.Peeking(FlowRef{key, id}) || e.Peeking(FlowRef{key, id + 1}) {
		t.Errorf("Peeking: want true for the flow's identity only")
	}
	if got := e.Decide(FlowRef{key, id + 1}, "github.com", NameSNI, 3); got.Reason != ReasonNoFlow {
		t.Errorf("Decide with a stale identity: %+v, want no-flow", got)
	}
	got := e.Decide(FlowRef{key, id}, "ad.doubleclick.net", NameSNI, 3)
	if got.Verdict != VerdictReject || got.Peek || e.ruleName(got) != "no-ads" {
		t.Fatalf("Decide(ad) = %+v, want reject by no-ads", got)
	}
	if again := e.Decide(FlowRef{key, id}, "github.com", NameSNI, 4); again.Reason != ReasonNoFlow {
		t.Errorf("second Decide on a judged flow: %+v, want no-flow", again)
	}
	if d := in(e, tcp("192.0.2.1", 40000, "198.51.100.7", 443, TCPAck), 5); d.Verdict != VerdictReject {
		t.Errorf("packet after a reject by name: %+v", d)
	}
	fl := e.Flows(6)
	if len(fl) != 1 || fl[0].Name != "ad.doubleclick.net" || fl[0].NameFrom != "sni" || fl[0].Rule != "no-ads" {
		t.Errorf("listing after Decide: %+v", fl)
	}
	if !strings.Contains(logs.String(), "name=ad.doubleclick.net name_from=sni") {
		t.Errorf("decision log lacks the name:\n%s", logs)
	}
	if c := e.Counters(); c.Peeked != 1 {
		t.Errorf("Counters.Peeked = %d, want 1", c.Peeked)
	}

	// No name read: the DNS name decides; without one, the rules without.
	syn2 := tcp("192.0.2.1", 40001, "198.51.100.8", 443, TCPSyn)
	in(e, syn2, 10)
	k2 := KeyOf(mustParsed(syn2))
	dnsNames[[2]netip.Addr{k2.Src.Addr(), k2.Dst.Addr()}] = "www.github.com"
	if got := e.Decide(FlowRef{k2, e.Claim(k2)}, "", NameNone, 11); got.Verdict != VerdictForward || e.ruleName(got) != "github" {
		t.Errorf("Decide without a read name, DNS knows it: %+v", got)
	}
	syn3 := tcp("192.0.2.1", 40002, "198.51.100.9", 443, TCPSyn)
	in(e, syn3, 12)
	k3 := KeyOf(mustParsed(syn3))
	if got := e.Decide(FlowRef{k3, e.Claim(k3)}, "", NameNone, 13); got.Verdict != VerdictDrop || got.Reason != ReasonDenied {
		t.Errorf("Decide with no name at all: %+v, want the default deny", got)
	}
	// Deny is silence: what the stack sends as it closes its side of the
	// denied flow is not written.
	if r := e.Outbound(mustParsed(tcp("198.51.100.9", 443, "192.0.2.1", 40002, TCPRst|TCPAck)), 14); r != OutboundSilenced {
		t.Errorf("Outbound for a flow denied by name: %v, want OutboundSilenced", r)
	}
	if r := e.Outbound(mustParsed(tcp("198.51.100.8", 443, "192.0.2.1", 40001, TCPAck)), 14); r != OutboundFlow {
		t.Errorf("Outbound for a flow allowed by name: %v, want OutboundFlow", r)
	}

	// A flow that cannot be peeked takes its DNS name at once.
	udpFlow := udp("192.0.2.1", 5000, "198.51.100.10", 53)
	dnsNames[[2]netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("198.51.100.10")}] = "x.doubleclick.net"
	if d := in(e, udpFlow, 14); d.Peek || d.Verdict != VerdictReject {
		t.Errorf("UDP flow with a DNS name of an ad: %+v, want reject without peek", d)
	}
}

func mustParsed(x pk) *Packet { p, _ := parsed(x); return p }

func (e *Engine) ruleName(d Decision) string { return e.policy.Load().rules.RuleName(d.Rule) }

func TestExplain(t *testing.T) {
	rs := mustCompile(t, nameRules)
	src := netip.MustParseAddrPort("192.0.2.1:40000")
	// By name, destination address unknown: github decides; tunfw would
	// peek (the ads rule rejects where the default denies).
	ex := rs.Explain(ExplainQuery{Proto: ProtoTCP, Src: src, Dst: netip.AddrPortFrom(netip.Addr{}, 443),
		Name: "www.github.com", NameFrom: "given", Peekable: true})
	if ex.Verdict != "allow" || ex.Rule != "github" || !ex.Peek || len(ex.Rules) != 2 {
		t.Fatalf("explain github: %+v", ex)
	}
	if ex.Rules[0].Matched || !strings.Contains(ex.Rules[0].Why, "not in its domain") || !ex.Rules[1].Matched {
		t.Errorf("explain github rules: %+v", ex.Rules)
	}
	// An address in lan, no name: lan allows; the ads rule comes first
	// and rejects, so a name could change it.
	ex = rs.Explain(ExplainQuery{Proto: ProtoTCP, Src: src, Dst: netip.MustParseAddrPort("10.1.1.1:22"), Peekable: true})
	if ex.Verdict != "allow" || ex.Rule != "lan" || !ex.Peek {
		t.Errorf("explain lan: %+v", ex)
	}
	if ex.Rules[0].Why != "the flow's name is not known" || !strings.Contains(ex.Rules[1].Why, "dst_port 22") {
		t.Errorf("explain lan rules: %+v", ex.Rules)
	}
	// Denied: no rule matches an ICMP flow to elsewhere but ads, by name.
	ex = rs.Explain(ExplainQuery{Proto: ProtoICMP, Src: netip.AddrPortFrom(src.Addr(), 0), Dst: netip.MustParseAddrPort("198.51.100.1:0")})
	if ex.Verdict != "deny" || ex.Rule != "default" || ex.Peek {
		t.Errorf("explain icmp: %+v", ex)
	}
	if w := ex.Rules[1].Why; !strings.Contains(w, "proto icmp is not tcp") {
		t.Errorf("explain icmp, github: %q", w)
	}
}

// BenchmarkBlockQuery is the cost the rules add to a DNS query they do
// not block.
func BenchmarkBlockQuery(b *testing.B) {
	e, _ := newTestEngine(b, nameRules, EngineOptions{Logger: quiet})
	src := netip.MustParseAddr("192.0.2.1")
	name := []byte("www.example.org")
	b.ReportAllocs()
	for b.Loop() {
		e.BlockQuery(src, name, 1)
	}
}

// A verdict given by the name one connection carried is that connection's:
// a new connection reusing the tuple is read and judged again, whether the
// old one was denied (its SYN starts a new flow) or allowed (the stack's
// new connection claims the flow and must wait for its own name).
func TestEngineTupleReuseAfterDecide(t *testing.T) {
	opts := EngineOptions{Peekable: func(p *Packet) bool { return p.Proto == ProtoTCP && p.DstPort == 443 }}
	e, _ := newTestEngine(t, nameRules, opts)
	syn := tcp("192.0.2.1", 40000, "198.51.100.7", 443, TCPSyn)
	key := KeyOf(mustParsed(syn))
	in(e, syn, 1)
	if d := e.Decide(FlowRef{key, e.Claim(key)}, "", NameNone, 2); d.Verdict != VerdictDrop {
		t.Fatalf("no name: %+v, want the default deny", d)
	}
	if d := in(e, tcp("192.0.2.1", 40000, "198.51.100.7", 443, TCPAck), 3); d.Verdict != VerdictDrop {
		t.Errorf("the denied connection's ACK: %+v, want its verdict", d)
	}
	if d := in(e, syn, 4); d.Verdict != VerdictForward || !d.Peek {
		t.Fatalf("a new SYN on a tuple denied by name: %+v, want a new peek", d)
	}
	id := e.Claim(key)
	if d := e.Decide(FlowRef{key, id}, "www.github.com", NameSNI, 5); d.Verdict != VerdictForward {
		t.Fatalf("Decide(github): %+v", d)
	}
	// The allowed connection ends and a new one on the tuple is set up
	// by the stack before the flow left the table.
	id2 := e.Claim(key)
	if id2 == 0 || !e.Peeking(FlowRef{key, id2}) {
		t.Fatalf("a new connection claiming a flow allowed by name is not read for its name")
	}
	if d := e.Decide(FlowRef{key, id2}, "ad.doubleclick.net", NameSNI, 6); d.Verdict != VerdictReject {
		t.Errorf("the new connection's own name: %+v, want reject by no-ads", d)
	}
	if c := e.Counters(); c.Peeked != 3 {
		t.Errorf("Counters.Peeked = %d, want 3 (each connection read)", c.Peeked)
	}
}
