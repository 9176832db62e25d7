package filter

import (
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"testing"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

func BenchmarkEstablished(b *testing.B) {
	e, _ := newTestEngine(b, matchConfig, EngineOptions{Logger: quiet})
	syn, _ := parsed(tcp("10.0.0.2", 40000, "1.1.1.1", 443, TCPSyn))
	if d := e.Inbound(syn, 0); d.Verdict != VerdictForward {
		b.Fatalf("SYN: %+v", d)
	}
	x := tcp("10.0.0.2", 40000, "1.1.1.1", 443, TCPAck|TCPPsh)
	x.payload = make([]byte, 1000)
	pkt := mk(x)
	var p Packet
	_ = ParsePacket(pkt, &p)
	e.Inbound(&p, 0) // warm-up: keeps one-time runtime allocations out of a -benchtime=1x run
	b.ReportAllocs()
	b.SetBytes(int64(len(pkt)))
	for i := 0; b.Loop(); i++ {
		if err := ParsePacket(pkt, &p); err != nil {
			b.Fatal(err)
		}
		if d := e.Inbound(&p, int64(i)); d.Verdict != VerdictForward {
			b.Fatalf("%+v", d)
		}
	}
}

func BenchmarkEstablishedV6Outbound(b *testing.B) {
	e, _ := newTestEngine(b, matchConfig, EngineOptions{Logger: quiet})
	syn, _ := parsed(tcp("fd00::2", 40000, "2606::1", 443, TCPSyn))
	e.Inbound(syn, 0)
	pkt := mk(tcp("2606::1", 443, "fd00::2", 40000, TCPAck))
	var p Packet
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if err := ParsePacket(pkt, &p); err != nil {
			b.Fatal(err)
		}
		if e.Outbound(&p, int64(i)) == OutboundNoFlow {
			b.Fatal("no flow")
		}
	}
}

// nthNet returns distinct, non-adjacent /24s (so they do not merge).
func nthNet(i int) string {
	a := uint32(0x0b000000) + uint32(i)*512
	return fmt.Sprintf("%d.%d.%d.0/24", a>>24, a>>16&0xff, a>>8&0xff)
}

// BenchmarkNewFlowDecision measures the rule evaluation of a new flow with
// n rules "tcp, dst nthNet(i), dst_port 80 or 8000-8080":
//   - miss-port: falls through every rule on its port (443), the worst case
//     of the old linear walk over rules;
//   - miss-addr: port 80, so every rule's port and proto match, and a
//     destination in the gap after nthNet(n/2): only the address rules it
//     out; the worst case for an index;
//   - late-match: matches the last rule only.
//
// set=100000cidrs times the binary search in a 100000-CIDR set.
func BenchmarkNewFlowDecision(b *testing.B) {
	p, _ := parsed(tcp("10.0.0.2", 40000, "1.1.1.1", 443, TCPSyn))
	for _, n := range []int{10, 1000, 100000} {
		b.Run(fmt.Sprintf("rules=%d", n), func(b *testing.B) {
			rules := make([]RuleConfig, n)
			for i := range rules {
				rules[i] = RuleConfig{Action: "deny", Proto: "tcp", Dst: nthNet(i), DstPort: []any{int64(80), "8000-8080"}}
			}
			rs, err := Compile(Options{}, nil, rules)
			if err != nil {
				b.Fatal(err)
			}
			b.Run("miss-port", func(b *testing.B) { benchMatch(b, rs, p, -1) })
			gap := netip.MustParsePrefix(nthNet(n / 2)).Addr().As4()
			gap[2]++ // the /24 after nthNet(n/2), in no rule
			miss, _ := parsed(tcp("10.0.0.2", 40000, netip.AddrFrom4(gap).String(), 80, TCPSyn))
			b.Run("miss-addr", func(b *testing.B) { benchMatch(b, rs, miss, -1) })
			last := netip.MustParsePrefix(nthNet(n - 1)).Addr().Next()
			late, _ := parsed(tcp("10.0.0.2", 40000, last.String(), 8080, TCPSyn))
			b.Run("late-match", func(b *testing.B) { benchMatch(b, rs, late, n-1) })
		})
	}
	b.Run("set=100000cidrs", func(b *testing.B) {
		set := make([]any, 100000)
		for i := range set {
			set[i] = nthNet(i)
		}
		set = append(set, "2001:db8::/32")
		rs, err := Compile(Options{}, map[string]any{"big": set},
			[]RuleConfig{{Action: "deny", Dst: "@big"}, {Action: "reject", Src: "@big"}})
		if err != nil {
			b.Fatal(err)
		}
		b.Run("miss", func(b *testing.B) { benchMatch(b, rs, p, -1) })
		in, _ := parsed(tcp("10.0.0.2", 40000, "11.1.0.1", 443, TCPSyn)) // inside nthNet(128)
		b.Run("hit", func(b *testing.B) { benchMatch(b, rs, in, 0) })
	})
}

func benchMatch(b *testing.B, rs *Ruleset, p *Packet, want int) {
	b.ReportAllocs()
	for b.Loop() {
		if _, i := rs.Match(p); i != want {
			b.Fatalf("matched rule %d, want %d", i, want)
		}
	}
}

// BenchmarkNewFlowEngine is the whole new-flow path of Inbound (rules,
// flow insertion; the Forget keeps the table size constant). The flow entry
// is its one allocation.
func BenchmarkNewFlowEngine(b *testing.B) {
	e, _ := newTestEngine(b, matchConfig, EngineOptions{Logger: quiet})
	p, _ := parsed(tcp("10.0.0.2", 40000, "1.1.1.1", 443, TCPSyn))
	k := FlowKey{ProtoTCP, netip.AddrPortFrom(p.Src, p.SrcPort), netip.AddrPortFrom(p.Dst, p.DstPort)}
	b.ReportAllocs()
	for b.Loop() {
		e.Inbound(p, 0)
		e.Forget(k)
	}
}

func BenchmarkBuildReject(b *testing.B) {
	for _, c := range []struct {
		name string
		x    pk
	}{
		{"tcp4", tcp("10.0.0.2", 40000, "1.1.1.1", 80, TCPSyn)},
		{"udp6", pk{src: "fd00::2", dst: "2001:db8::53", proto: ProtoUDP, sport: 1, dport: 2, payload: make([]byte, 1200)}},
	} {
		b.Run(c.name, func(b *testing.B) {
			p, pkt := parsed(c.x)
			out := make([]byte, 1500)
			b.ReportAllocs()
			for b.Loop() {
				if BuildReject(p, pkt, out) == 0 {
					b.Fatal("no reply")
				}
			}
		})
	}
}

// TestZeroAllocs enforces the zero-allocation hot paths in plain test runs.
func TestZeroAllocs(t *testing.T) {
	e, _ := newTestEngine(t, matchConfig, EngineOptions{Logger: quiet})
	syn, _ := parsed(tcp("10.0.0.2", 40000, "1.1.1.1", 443, TCPSyn))
	e.Inbound(syn, 0)
	pkt := mk(tcp("10.0.0.2", 40000, "1.1.1.1", 443, TCPAck))
	reply := mk(tcp("1.1.1.1", 443, "10.0.0.2", 40000, TCPAck))
	rej, rejPkt := parsed(udp("fd00::2", 1, "2001:db8::1", 2))
	out := make([]byte, 1500)
	// A released flow's tombstone forwards the client's last segments.
	in(e, tcp("10.0.0.3", 40000, "1.1.1.1", 443, TCPSyn), 0)
	k := FlowKey{ProtoTCP, netip.MustParseAddrPort("10.0.0.3:40000"), netip.MustParseAddrPort("1.1.1.1:443")}
	e.Release(FlowRef{k, e.flowID(k)}, 0)
	late := mk(tcp("10.0.0.3", 40000, "1.1.1.1", 443, TCPAck))
	var p Packet
	for name, f := range map[string]func(){
		"established": func() { _ = ParsePacket(pkt, &p); e.Inbound(&p, 1) },
		"outbound":    func() { _ = ParsePacket(reply, &p); e.Outbound(&p, 1) },
		"tombstone":   func() { _ = ParsePacket(late, &p); e.Inbound(&p, 1) },
		"match":       func() { e.rules().Match(rej) },
		"reject":      func() { BuildReject(rej, rejPkt, out) },
		"parse error": func() { _ = ParsePacket(pkt[:30], &p) },
	} {
		if n := testing.AllocsPerRun(100, f); n != 0 {
			t.Errorf("%s: %v allocs", name, n)
		}
	}
}

func FuzzParsePacket(f *testing.F) {
	for _, x := range []pk{
		tcp("10.0.0.2", 1, "1.2.3.4", 80, TCPSyn),
		tcp("fd00::2", 1, "2001:db8::1", 80, TCPAck|TCPFin),
		udp("10.0.0.2", 1, "8.8.8.8", 53),
		{src: "fd00::2", dst: "2001:db8::1", proto: ProtoUDP, sport: 1, dport: 2, v6ext: []byte{0, 60}},
		ping("10.0.0.2", "8.8.8.8", 1),
		ping("fd00::2", "2001:db8::1", 1),
		{src: "10.0.0.2", dst: "8.8.8.8", proto: ProtoICMP, icmpType: 3},
	} {
		f.Add(mk(x))
	}
	f.Add([]byte{0x45})
	f.Add([]byte{0x60, 0, 0, 0, 0, 8, 44, 64})
	rs, err := Compile(Options{Default: "reject"}, nil, []RuleConfig{{Action: "allow", Proto: "udp"}})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		e := NewEngine(rs, EngineOptions{Logger: quiet, Limits: EngineLimits{MaxFlows: 4}})
		out := make([]byte, 1500)
		var p Packet
		err := ParsePacket(b, &p)
		// ParseHeaders of any first bytes of b parses only what
		// ParsePacket of the whole parses, into the same fields.
		for k := 0; k <= len(b); k++ {
			var h Packet
			if herr := ParseHeaders(b[:k], len(b), &h); herr == nil && (err != nil || h != p) {
				t.Fatalf("ParseHeaders of %d of %d bytes: %+v; ParsePacket: %+v, %v", k, len(b), h, p, err)
			}
			if k == 256 && k < len(b) {
				k = len(b) - 1 // past 256 bytes only the whole, to keep each run short
			}
		}
		if err != nil {
			e.Count(ParseErrorReason(err))
			return
		}
		if p.Len > len(b) || p.IPHeaderLen > p.Len || p.PayloadLen < 0 {
			t.Fatalf("inconsistent parse: %+v of %d bytes", p, len(b))
		}
		if d := e.Inbound(&p, 0); d.Verdict == VerdictReject {
			if n := BuildReject(&p, b, out); n > 0 {
				var r Packet
				if err := ParsePacket(out[:n], &r); err != nil {
					t.Fatalf("reject reply does not parse: %v", err)
				}
			}
		}
		e.Outbound(&p, 1)
		e.expire(1 << 62)
	})
}
