package filter

import (
	"fmt"
	"testing"
)

// TestIndexSharedSets: rules that use the same set (by "@name" or by
// listing the same entries) share one compiled set, the index holds it once
// as a group, and Match still agrees with the linear walk.
func TestIndexSharedSets(t *testing.T) {
	for seed := range 40 {
		g := newRuleGen(uint64(1000+seed), 5+seed*7%300, seed*13%200)
		sets := map[string]any{}
		const nAddr, nPort = 6, 4
		for i := range nAddr {
			sets[fmt.Sprintf("a%d", i)] = g.addrs()
		}
		for i := range nPort {
			sets[fmt.Sprintf("p%d", i)] = g.portList()
		}
		literal := g.addrs() // listed the same way by several rules
		n := []int{8, 30, 200, 600}[seed%4]
		rules := make([]RuleConfig, n)
		for i := range rules {
			rc := g.rule()
			share := func(v any, prefix string, count int) any {
				if v == nil || g.r.IntN(4) == 0 {
					return v
				}
				return fmt.Sprintf("@%s%d", prefix, g.r.IntN(count))
			}
			rc.Src = share(rc.Src, "a", nAddr)
			rc.Dst = share(rc.Dst, "a", nAddr)
			if rc.Dst != nil && g.r.IntN(5) == 0 {
				rc.Dst = literal
			}
			rc.SrcPort = share(rc.SrcPort, "p", nPort)
			rc.DstPort = share(rc.DstPort, "p", nPort)
			rules[i] = rc
		}
		rs, err := Compile(Options{}, sets, rules)
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		grouped := false
		for ci := range rs.idx.tables {
			for fam := range rs.idx.tables[ci] {
				for d := range rs.idx.tables[ci][fam].dims {
					grouped = grouped || rs.idx.tables[ci][fam].dims[d].mstart != nil
				}
			}
		}
		if n >= 30 && !grouped {
			t.Errorf("seed %d: %d rules on %d sets, but no dimension groups rules", seed, n, nAddr+nPort)
		}
		checkLeaves(t, rs, g.r)
		for k := range 3000 {
			p := g.packet()
			a, i := rs.Match(p)
			wa, wi := rs.matchLinear(p)
			if a != wa || i != wi {
				t.Fatalf("seed %d (%d rules): packet %+v: index %v/%d, linear %v/%d\nrule: %+v",
					seed, n, p, a, i, wa, wi, rulesAt(rules, wi))
			}
			if k%4 == 0 {
				checkCounts(t, rs, p)
			}
		}
	}
}

// TestSharedSetCompiledOnce: 300 rules on one 20,000-address set hold one
// copy of it, and the index does not grow with the rule count.
func TestSharedSetCompiledOnce(t *testing.T) {
	addrs := make([]any, 20000)
	for i := range addrs {
		addrs[i] = fmt.Sprintf("10.%d.%d.%d", i>>12, (i>>4)&0xff, (i&0xf)*16+1)
	}
	build := func(n int) *Ruleset {
		rules := make([]RuleConfig, n)
		for i := range rules {
			rules[i] = RuleConfig{Action: "deny", Proto: "tcp", Dst: "@big", DstPort: int64(1000 + i)}
		}
		rs, err := Compile(Options{}, map[string]any{"big": addrs}, rules)
		if err != nil {
			t.Fatal(err)
		}
		return rs
	}
	rs := build(300)
	for i := range rs.rules {
		if rs.rules[i].dst != rs.rules[0].dst {
			t.Fatalf("rule %d has its own copy of the set", i)
		}
	}
	small, large := build(10).indexBytes(), rs.indexBytes()
	if large > 2*small {
		t.Errorf("index of 300 rules on one set: %d bytes, of 10 rules: %d; want it not to grow with the rules", large, small)
	}
	for i, want := range []int{0, 150, 299} {
		p, _ := parsed(tcp("192.0.2.1", 40000, "10.0.0.17", uint16(1000+want), TCPSyn))
		if a, r := rs.Match(p); a != Deny || r != want {
			t.Errorf("case %d: Match = %v, rule %d; want deny, rule %d", i, a, r, want)
		}
	}
	p, _ := parsed(tcp("192.0.2.1", 40000, "10.0.0.18", 1000, TCPSyn))
	if a, r := rs.Match(p); a != Allow || r != -1 {
		t.Errorf("address outside the set: Match = %v, rule %d; want the default", a, r)
	}
}
