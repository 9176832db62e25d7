package filter

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"runtime"
	"testing"
	"time"
)

// ruleGen draws random rules and packets from shared pools of prefixes and
// ports, so that rules overlap, nest and share boundaries, and packets land
// on, next to and between those boundaries.
type ruleGen struct {
	r     *rand.Rand
	wild  int // a key is absent ("any") with probability about 1/wild
	v4    []netip.Prefix
	v6    []netip.Prefix
	ports []uint16
}

func newRuleGen(seed uint64, nAddrs, nPorts int) *ruleGen {
	g := &ruleGen{r: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
	g.wild = []int{2, 2, 20, 1000}[seed%4]
	for range nAddrs {
		// Mostly inside 10.0.0.0/12 (dense: many bounds per /16, to reach
		// the jump tables' second level), some anywhere.
		var a [4]byte
		if g.r.IntN(4) > 0 {
			a = [4]byte{10, byte(g.r.IntN(16)), byte(g.r.IntN(256)), byte(g.r.IntN(256))}
		} else {
			a = [4]byte{byte(g.r.IntN(256)), byte(g.r.IntN(256)), byte(g.r.IntN(256)), byte(g.r.IntN(256))}
		}
		bits := []int{0, 1, 8, 12, 16, 20, 24, 24, 28, 30, 31, 32, 32}[g.r.IntN(13)]
		p, _ := netip.AddrFrom4(a).Prefix(bits)
		g.v4 = append(g.v4, p)
		var b [16]byte
		b[0], b[1] = 0xfd, byte(g.r.IntN(4))
		switch g.r.IntN(4) {
		case 0:
			for i := range b {
				b[i] = byte(g.r.Uint32())
			}
		case 1:
			b[0] = 0xff // near the top of the space
			for i := 1; i < 16; i++ {
				b[i] = 0xff
			}
		default:
			for i := 8; i < 16; i++ {
				b[i] = byte(g.r.IntN(4))
			}
		}
		bits = []int{0, 1, 8, 16, 48, 64, 64, 96, 120, 127, 128, 128}[g.r.IntN(12)]
		p6, _ := netip.AddrFrom16(b).Prefix(bits)
		g.v6 = append(g.v6, p6)
	}
	g.ports = []uint16{0, 1, 22, 53, 80, 443, 1024, 8080, 65534, 65535}
	for range nPorts {
		g.ports = append(g.ports, uint16(g.r.IntN(65536)))
	}
	return g
}

func (g *ruleGen) addrs() any {
	n := 1 + g.r.IntN(3)
	if g.r.IntN(20) == 0 {
		n = 50 + g.r.IntN(200) // a set-sized list
	}
	var out []any
	for range n {
		if g.r.IntN(3) == 0 {
			out = append(out, g.v6[g.r.IntN(len(g.v6))].String())
		} else {
			out = append(out, g.v4[g.r.IntN(len(g.v4))].String())
		}
	}
	return out
}

func (g *ruleGen) portList() any {
	var out []any
	for range 1 + g.r.IntN(3) {
		a, b := g.ports[g.r.IntN(len(g.ports))], g.ports[g.r.IntN(len(g.ports))]
		switch {
		case g.r.IntN(2) == 0:
			out = append(out, int64(a))
		case a <= b:
			out = append(out, fmt.Sprintf("%d-%d", a, b))
		default:
			out = append(out, fmt.Sprintf("%d-%d", b, a))
		}
	}
	return out
}

func (g *ruleGen) rule() RuleConfig {
	rc := RuleConfig{Action: []string{"allow", "deny", "reject"}[g.r.IntN(3)]}
	// Each key absent ("any") half the time or more.
	absent := func() bool { return g.r.IntN(g.wild) == 0 }
	switch g.r.IntN(6) {
	case 0:
		rc.Proto = "tcp"
	case 1:
		rc.Proto = "udp"
	case 2:
		rc.Proto = "icmp"
	case 3:
		rc.Proto = []any{"tcp", "udp"}
	case 4:
		rc.Proto = "any"
	}
	if !absent() {
		rc.Src = g.addrs()
	}
	if !absent() {
		rc.Dst = g.addrs()
	}
	if rc.Proto != "icmp" {
		if !absent() && g.r.IntN(2) == 0 {
			rc.SrcPort = g.portList()
		}
		if !absent() {
			rc.DstPort = g.portList()
		}
	}
	return rc
}

// addrNear returns an address on, next to or inside a pool prefix.
func (g *ruleGen) addrNear(v6 bool) netip.Addr {
	pool := g.v4
	if v6 {
		pool = g.v6
	}
	p := pool[g.r.IntN(len(pool))]
	first := p.Addr()
	var last netip.Addr
	if v6 {
		to := prefixRange6(p).to
		var b [16]byte
		binary.BigEndian.PutUint64(b[:8], to.hi)
		binary.BigEndian.PutUint64(b[8:], to.lo)
		last = netip.AddrFrom16(b)
	} else {
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], prefixRange4(p).to)
		last = netip.AddrFrom4(b)
	}
	var a netip.Addr
	switch g.r.IntN(7) {
	case 5: // anywhere in the dense part, between the bounds
		if v6 {
			var b [16]byte
			b[0], b[1] = 0xfd, byte(g.r.IntN(4))
			for i := 8; i < 16; i++ {
				b[i] = byte(g.r.IntN(4))
			}
			return netip.AddrFrom16(b)
		}
		return netip.AddrFrom4([4]byte{10, byte(g.r.IntN(16)), byte(g.r.IntN(256)), byte(g.r.IntN(256))})
	case 0:
		a = first
	case 1:
		a = first.Prev()
	case 2:
		a = last
	case 3:
		a = last.Next()
	default:
		b := first.AsSlice()
		for i := p.Bits()/8 + 1; i < len(b); i++ {
			b[i] = byte(g.r.Uint32())
		}
		a, _ = netip.AddrFromSlice(b)
	}
	if !a.IsValid() {
		a = first
	}
	return a
}

func (g *ruleGen) packet() *Packet {
	p := &Packet{Version: 4}
	v6 := g.r.IntN(3) == 0
	if v6 {
		p.Version = 6
	}
	p.Src, p.Dst = g.addrNear(v6), g.addrNear(v6)
	switch g.r.IntN(20) {
	case 0: // not something ParsePacket returns: families differ
		p.Src = g.addrNear(!v6)
	case 1: // v4-mapped IPv6, on the IPv6 side of every set
		p.Src = netip.AddrFrom16(p.Src.As16())
		p.Dst = netip.AddrFrom16(p.Dst.As16())
	}
	switch g.r.IntN(5) {
	case 0, 1:
		p.Proto = ProtoTCP
	case 2:
		p.Proto = ProtoUDP
	case 3:
		p.Proto = ProtoICMP
		if v6 {
			p.Proto = ProtoICMPv6
		}
	default:
		p.Proto = 47
	}
	port := func() uint16 {
		x := g.ports[g.r.IntN(len(g.ports))]
		return x + uint16(g.r.IntN(3)) - 1
	}
	p.SrcPort, p.DstPort = port(), port()
	return p
}

// TestIndexMatchesLinear checks the indexed Match against the linear walk
// on random rule sets and packets.
func TestIndexMatchesLinear(t *testing.T) {
	sets, packets := 200, 3000
	if testing.Short() {
		sets = 60
	}
	for s := range sets {
		sizes := []int{1, 3, 5, 8, 20, 100, 400, 1500}
		n := sizes[s%len(sizes)]
		g := newRuleGen(uint64(s), 5+s%300, s%200)
		rules := make([]RuleConfig, n)
		for i := range rules {
			rules[i] = g.rule()
		}
		def := []string{"allow", "deny", "reject"}[s%3]
		rs, err := Compile(Options{Default: def}, nil, rules)
		if err != nil {
			t.Fatalf("set %d: %v", s, err)
		}
		checkLeaves(t, rs, g.r)
		matched := 0
		for k := range packets {
			p := g.packet()
			a, i := rs.Match(p)
			wa, wi := rs.matchLinear(p)
			if a != wa || i != wi {
				t.Fatalf("set %d (%d rules): packet %+v: index %v/%d, linear %v/%d\nrule: %+v",
					s, n, p, a, i, wa, wi, rulesAt(rules, wi))
			}
			if i >= 0 {
				matched++
			}
			if k%4 == 0 {
				checkCounts(t, rs, p)
			}
		}
		if n >= 20 && matched == 0 {
			t.Errorf("set %d: no packet matched any rule; the test is not testing much", s)
		}
	}
}

// checkLeaves compares the accelerated leaf lookups (port tables, IPv4 jump
// tables) with the plain binary search, on and next to every bound and at
// random.
func checkLeaves(t *testing.T, rs *Ruleset, r *rand.Rand) {
	t.Helper()
	for ci := range rs.idx.tables {
		for fam := range rs.idx.tables[ci] {
			for d := range numDims {
				x := &rs.idx.tables[ci][fam].dims[d]
				if x.port != nil {
					for port := range 65536 {
						if got, want := int(x.port[port]), leaf16(x.b16, uint16(port)); got != want {
							t.Fatalf("port %d: leaf %d, want %d", port, got, want)
						}
					}
				}
				if x.j4 == nil {
					continue
				}
				check := func(a uint32) {
					if got, want := x.j4.leaf(x.b32, a), leaf32(x.b32, a); got != want {
						t.Fatalf("address %#x: leaf %d, want %d", a, got, want)
					}
				}
				for _, b := range x.b32 {
					check(b)
					check(b - 1)
					check(b + 1)
					check(b | 0xff)
					check(b | 0xffff)
				}
				check(^uint32(0))
				for range 10000 {
					check(r.Uint32())
					check(0x0a000000 | r.Uint32()>>12)
				}
			}
		}
	}
}

// checkCounts checks that the index is exact: in every indexed dimension,
// the candidate count of p's leaf is the number of the table's rules whose
// key in that dimension holds p's value.
func checkCounts(t *testing.T, rs *Ruleset, p *Packet) {
	t.Helper()
	fam := family(p.Dst)
	if family(p.Src) != fam {
		return
	}
	tb := &rs.idx.tables[classIndex(protoClass(p))][fam]
	for d := range numDims {
		x := &tb.dims[d]
		if !x.used {
			continue
		}
		want := 0
		for _, i := range tb.all {
			r := &rs.rules[i]
			var ok bool
			switch d {
			case dimDstPort:
				ok = r.dstPort.contains(p.DstPort)
			case dimSrcPort:
				ok = r.srcPort.contains(p.SrcPort)
			case dimDst:
				ok = r.dst.contains(p.Dst)
			case dimSrc:
				ok = r.src.contains(p.Src)
			}
			if ok {
				want++
			}
		}
		if got := x.count[tb.leafOf(d, p, fam)]; int(got) != want {
			t.Fatalf("dimension %d of packet %+v: %d candidates, want %d", d, p, got, want)
		}
	}
}

func rulesAt(rules []RuleConfig, i int) any {
	if i < 0 {
		return "default"
	}
	return rules[i]
}

// TestIndexLarge checks the index on the benchmark's 100,000 rules and a
// rule set whose wide and narrow ranges nest (flat per-interval lists would
// be quadratic): agreement, zero allocations, bounded memory.
func TestIndexLarge(t *testing.T) {
	if testing.Short() {
		t.Skip("large rule sets")
	}
	n := 100000
	rules := make([]RuleConfig, n)
	for i := range rules {
		rules[i] = RuleConfig{Action: "deny", Proto: "tcp", Dst: nthNet(i), DstPort: []any{int64(80), "8000-8080"}}
	}
	rs, err := Compile(Options{}, nil, rules)
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(1, 2))
	const packets = 300 // the linear walk takes milliseconds each
	for range packets {
		a := uint32(0x0b000000) + uint32(r.IntN(n*512+1024)) - 512
		p := &Packet{Version: 4, Proto: ProtoTCP, Src: netip.MustParseAddr("10.0.0.2"),
			Dst:     netip.AddrFrom4([4]byte{byte(a >> 24), byte(a >> 16), byte(a >> 8), byte(a)}),
			SrcPort: 40000, DstPort: []uint16{79, 80, 81, 443, 7999, 8000, 8080, 8081}[r.IntN(8)]}
		x, i := rs.Match(p)
		wx, wi := rs.matchLinear(p)
		if x != wx || i != wi {
			t.Fatalf("packet %+v: index %v/%d, linear %v/%d", p, x, i, wx, wi)
		}
	}
	late, _ := parsed(tcp("10.0.0.2", 40000, netip.MustParsePrefix(nthNet(n-1)).Addr().Next().String(), 8080, TCPSyn))
	if allocs := testing.AllocsPerRun(100, func() { rs.Match(late) }); allocs != 0 {
		t.Errorf("Match: %v allocs", allocs)
	}
	t.Logf("benchmark rules: %d rules, index %d KiB", n, rs.indexBytes()>>10)

	// Nested: 50,000 rules over 10.0.0.0/8 ... /23 (wide) interleaved
	// with 50,000 host rules inside them (narrow).
	rules = rules[:0]
	for i := range n / 2 {
		bits := 8 + i%16
		wide, _ := netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0}).Prefix(bits)
		host := netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), byte(i >> 16)})
		rules = append(rules,
			RuleConfig{Action: "deny", Proto: "udp", Dst: wide.String(), DstPort: int64(1 + i%1000)},
			RuleConfig{Action: "allow", Proto: "udp", Dst: host.String(), Src: wide.String()})
	}
	rs, err = Compile(Options{}, nil, rules)
	if err != nil {
		t.Fatal(err)
	}
	if b := rs.indexBytes(); b > 64<<20 {
		t.Errorf("nested rules: index %d MiB", b>>20)
	} else {
		t.Logf("nested rules: %d rules, index %d KiB", len(rules), b>>10)
	}
	for range packets {
		p := &Packet{Version: 4, Proto: ProtoUDP,
			Src:     netip.AddrFrom4([4]byte{10, byte(r.IntN(256)), byte(r.IntN(256)), byte(r.IntN(4))}),
			Dst:     netip.AddrFrom4([4]byte{10, byte(r.IntN(256)), byte(r.IntN(256)), byte(r.IntN(4))}),
			SrcPort: 5, DstPort: uint16(r.IntN(1100))}
		x, i := rs.Match(p)
		wx, wi := rs.matchLinear(p)
		if x != wx || i != wi {
			t.Fatalf("packet %+v: index %v/%d, linear %v/%d", p, x, i, wx, wi)
		}
	}
}

// BenchmarkRulesetCompile times Compile of the 100,000 benchmark rules and
// reports the index size and the heap the compiled Ruleset keeps.
func BenchmarkRulesetCompile(b *testing.B) {
	n := 100000
	rules := make([]RuleConfig, n)
	for i := range rules {
		rules[i] = RuleConfig{Action: "deny", Proto: "tcp", Dst: nthNet(i), DstPort: []any{int64(80), "8000-8080"}}
	}
	var rs *Ruleset
	var idx time.Duration
	b.ReportAllocs()
	for b.Loop() {
		var err error
		if rs, err = Compile(Options{}, nil, rules); err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		rs.buildIndex()
		idx += time.Since(start)
	}
	b.ReportMetric(float64(idx.Nanoseconds())/float64(b.N), "index-ns/op")
	b.ReportMetric(float64(rs.indexBytes()), "index-bytes")
	rs = nil
	var m0, m1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&m0)
	rs, _ = Compile(Options{}, nil, rules)
	runtime.GC()
	runtime.ReadMemStats(&m1)
	runtime.KeepAlive(rs)
	b.ReportMetric(float64(int64(m1.HeapAlloc)-int64(m0.HeapAlloc)), "ruleset-bytes")
}
