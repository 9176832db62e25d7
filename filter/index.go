package filter

import (
	"encoding/binary"
	"math/bits"
	"net/netip"
	"slices"
	"unsafe"
)

// The rule index: what makes Match cost nearly independent of the number of
// rules: a rule set of 100,000 rules must judge a flow as fast as one of 10.
//
// Rules are split into tables by the packet's protocol class (tcp, udp,
// icmp, other) and address family; a rule is in every table it could match
// (its proto bit is set and neither address key excludes the family). Each
// table indexes four dimensions: destination port, source port, destination
// address and source address. In a dimension, the packet's value selects the
// rules that can match there: the rules that are "any" in it (wild) plus the
// rules whose set covers the value. The latter are found in a segment tree
// over the elementary intervals cut by the rules' range boundaries: a rule's
// range is stored in the O(log n) canonical nodes that cover it, so a query
// collects the lists on one leaf-to-root path, and memory stays
// O(rules * log(intervals)) even for nested or overlapping ranges (flat
// per-interval lists would grow quadratically).
//
// Each leaf also stores the number of candidates on its path, so a query
// computes the candidate count of every dimension in one lookup each, stops at
// the first dimension with none (the common miss: no rule for that port or
// address), and otherwise walks only the smallest candidate set, in rule
// order per list, checking each candidate with the full rule match. The
// result is the lowest matching rule index, as the linear walk returns.
//
// Finding the leaf is a branch-free binary search over the bounds; ports
// with many bounds use a 65536-entry leaf table, and IPv4 addresses with many
// bounds a jump table on the top 16 bits (then 8 more for dense /16s), so
// that the lookup is a few dependent loads whatever the rule count.
//
// The cost of a lookup is a leaf lookup per dimension plus the candidates
// of the most selective dimension. It is linear only when every dimension of
// the packet is matched by many rules that still fail together (for example
// half the rules "src A, dst any" and half "src any, dst B", all failing on
// some other key); no one-dimensional index avoids that.

// Indexed dimensions, in the order Match evaluates them (cheapest first:
// port bounds are short; address bounds may hold 2 entries per CIDR).
const (
	dimDstPort = iota
	dimSrcPort
	dimDst
	dimSrc
	numDims
)

// smallTable is the rule count up to which a table is walked directly.
const smallTable = 4

// goodEnough stops evaluating more dimensions once one has at most this
// many candidates: checking them is cheaper than another binary search.
const goodEnough = 4

// ruleIndex is the compiled index of a Ruleset.
type ruleIndex struct {
	// tables[class][family], class as in classIndex, family 0 = IPv4,
	// 1 = IPv6 (what addrSet.contains treats as IPv6: every non-IPv4
	// address).
	tables [4][2]table
}

// table indexes the rules that can match one protocol class and family.
type table struct {
	all  []int32 // the table's rules in order
	dims [numDims]dim
}

// dim indexes one dimension. Exactly one of b16, b32, b128 holds the
// boundaries, by the dimension's key type; none when no rule of the table
// restricts this dimension (every rule is wild and the dimension is skipped).
// Leaf j is the interval [b[j], b[j+1]-1] (the last one ends at the maximum),
// b[0] is 0.
type dim struct {
	used  bool
	b16   []uint16
	b32   []uint32
	b128  []u128
	wild  []int32  // rules that are "any" here, ascending
	size  int      // leaves rounded up to a power of two; node 1 is the root
	start []uint32 // node n's entries are ids[start[n]:start[n+1]], ascending
	ids   []int32
	count []uint32 // per leaf: len(wild) + the rules on its root path

	// Rules sharing one compiled set (a "@set" used by many rules) are
	// indexed once, as a group: then ids holds group numbers and group g's
	// rules are members[mstart[g]:mstart[g+1]], ascending, groups numbered
	// in the order of their first rule. nil mstart: no two rules share a
	// set here, and ids holds rule indexes.
	mstart  []uint32
	members []int32

	// Accelerators for dimensions with many bounds, so that a lookup is a
	// few dependent loads rather than ~log2(bounds) of them.
	port []uint16 // ports: the leaf of every port
	j4   *jump4   // IPv4 addresses: jump tables on the top 16 and 8 bits
}

// jump4 narrows an IPv4 leaf search. top[h].lo is the leaf of address
// h<<16, so the leaf of x is in [top[h].lo, top[h+1].lo]; when that /16 holds
// many bounds, top[h].sub is 1 + the offset in mid of 257 leaves for the
// /24s of the /16, the same way.
type jump4 struct {
	top [65537]struct{ lo, sub uint32 }
	mid []uint32
}

// Thresholds for the accelerators (bounds in the dimension / in a /16).
const (
	portTableMin = 32
	jump4Min     = 64
	jump4MidMin  = 16
)

func (j *jump4) leaf(b []uint32, x uint32) int {
	h := x >> 16
	lo, hi := j.top[h].lo, j.top[h+1].lo
	if s := j.top[h].sub; s != 0 {
		m := s - 1 + (x>>8)&0xff
		lo, hi = j.mid[m], j.mid[m+1]
	}
	return int(lo) + leaf32(b[lo:hi+1], x)
}

func newJump4(b []uint32) *jump4 {
	j := new(jump4)
	for h := range j.top {
		j.top[h].lo = uint32(leaf32(b, uint32(h)<<16))
	}
	j.top[65536].lo = uint32(len(b) - 1)
	for h := range 65536 {
		if j.top[h+1].lo-j.top[h].lo < jump4MidMin {
			continue
		}
		j.top[h].sub = uint32(len(j.mid)) + 1
		for s := range 256 {
			j.mid = append(j.mid, uint32(leaf32(b, uint32(h)<<16|uint32(s)<<8)))
		}
		j.mid = append(j.mid, j.top[h+1].lo)
	}
	j.mid = slices.Clip(j.mid)
	return j
}

func classIndex(c uint8) int {
	switch c {
	case protoTCP:
		return 0
	case protoUDP:
		return 1
	case protoICMP:
		return 2
	}
	return 3
}

func family(a netip.Addr) int {
	if a.Is4() {
		return 0
	}
	return 1
}

func addr4(a netip.Addr) uint32 {
	b := a.As4()
	return binary.BigEndian.Uint32(b[:])
}

// leaf16, leaf32 and leaf128 return the interval holding x: the index of
// the last bound <= x (b[0] is 0). Branch-free binary search: the loop
// count depends only on len(b), and the step is a mask from the sign or
// borrow of x - bound (the compiler does not turn the if-form into a
// conditional move inside a loop; a mispredicted step costs more than the
// load when the bounds are hot).
func leaf16(b []uint16, x uint16) int {
	base, n := 0, len(b)
	for n > 1 {
		half := n >> 1
		base += half &^ int((int64(x)-int64(b[base+half]))>>63)
		n -= half
	}
	return base
}

func leaf32(b []uint32, x uint32) int {
	base, n := 0, len(b)
	for n > 1 {
		half := n >> 1
		base += half &^ int((int64(x)-int64(b[base+half]))>>63)
		n -= half
	}
	return base
}

func leaf128(b []u128, x u128) int {
	base, n := 0, len(b)
	for n > 1 {
		half := n >> 1
		m := &b[base+half]
		_, borrow := bits.Sub64(x.lo, m.lo, 0)
		_, borrow = bits.Sub64(x.hi, m.hi, borrow)
		base += half & int(borrow-1) // borrow 0: x >= m
		n -= half
	}
	return base
}

// leafOf returns the packet's leaf in dimension d of a table of family fam.
func (t *table) leafOf(d int, p *Packet, fam int) int {
	x := &t.dims[d]
	switch d {
	case dimDstPort, dimSrcPort:
		port := p.DstPort
		if d == dimSrcPort {
			port = p.SrcPort
		}
		if x.port != nil {
			return int(x.port[port])
		}
		return leaf16(x.b16, port)
	}
	a := p.Dst
	if d == dimSrc {
		a = p.Src
	}
	if fam == 0 {
		if x.j4 != nil {
			return x.j4.leaf(x.b32, addr4(a))
		}
		return leaf32(x.b32, addr4(a))
	}
	return leaf128(x.b128, u128From(a))
}

// Match returns the action of the first rule matching p and its index, or
// the default action and -1 when no rule matches. It does not allocate.
func (rs *Ruleset) Match(p *Packet) (a Action, rule int) {
	class := protoClass(p)
	fam := family(p.Dst)
	if family(p.Src) != fam {
		// Not from ParsePacket; keep the exact semantics the slow way.
		return rs.matchLinear(p)
	}
	t := &rs.idx.tables[classIndex(class)][fam]
	if len(t.all) <= smallTable {
		for _, i := range t.all {
			if rs.rules[i].matches(p, class) {
				return rs.rules[i].action, int(i)
			}
		}
		return rs.def, -1
	}
	// Pick the dimension with the fewest candidates; none means no match.
	best, bestLeaf, bestN := -1, 0, uint32(len(t.all))
	for d := range numDims {
		x := &t.dims[d]
		if !x.used || uint32(len(x.wild)) >= bestN {
			continue
		}
		l := t.leafOf(d, p, fam)
		n := x.count[l]
		if n == 0 {
			return rs.def, -1
		}
		if n < bestN {
			best, bestLeaf, bestN = d, l, n
			if n <= goodEnough {
				break
			}
		}
	}
	found := len(rs.rules) // lowest matching index so far
	if best < 0 {
		for _, i := range t.all {
			if rs.rules[i].matches(p, class) {
				found = int(i)
				break
			}
		}
	} else {
		x := &t.dims[best]
		found = rs.firstIn(x.wild, p, class, found)
		for n := x.size + bestLeaf; n > 0; n >>= 1 {
			s, e := x.start[n], x.start[n+1]
			if s == e {
				continue
			}
			if x.mstart == nil {
				found = rs.firstIn(x.ids[s:e], p, class, found)
				continue
			}
			for _, g := range x.ids[s:e] {
				m := x.members[x.mstart[g]:x.mstart[g+1]]
				if int(m[0]) >= found {
					break // later groups start later still
				}
				found = rs.firstIn(m, p, class, found)
			}
		}
	}
	if found == len(rs.rules) {
		return rs.def, -1
	}
	return rs.rules[found].action, found
}

// firstIn returns the lowest index in ids (ascending) below found whose
// rule matches, or found.
func (rs *Ruleset) firstIn(ids []int32, p *Packet, class uint8, found int) int {
	for _, i := range ids {
		if int(i) >= found {
			break
		}
		if rs.rules[i].matches(p, class) {
			return int(i)
		}
	}
	return found
}

// buildIndex compiles rs.rules into rs.idx.
func (rs *Ruleset) buildIndex() {
	for ci, class := range [4]uint8{protoTCP, protoUDP, protoICMP, protoOther} {
		for fam := range 2 {
			var all []int32
			for i := range rs.rules {
				r := &rs.rules[i]
				if r.protos&class != 0 && r.src.hasFamily(fam) && r.dst.hasFamily(fam) {
					all = append(all, int32(i))
				}
			}
			t := &rs.idx.tables[ci][fam]
			t.all = all
			if len(all) <= smallTable {
				continue
			}
			for d := range numDims {
				t.dims[d] = rs.buildDim(all, d, fam)
			}
		}
	}
}

func (s *addrSet) hasFamily(fam int) bool {
	if s.any {
		return true
	}
	if fam == 0 {
		return len(s.v4) > 0
	}
	return len(s.v6) > 0
}

// buildDim indexes dimension d over the rules in all.
func (rs *Ruleset) buildDim(all []int32, d, fam int) dim {
	var x dim
	// Each set's ranges in this dimension, as [from, to] with the "+1"
	// boundary; keys widened to u128 during the build.
	type span struct{ from, to u128 }
	var buf []span
	// setOf returns rule r's set in this dimension (shared by the rules
	// that list the same entries); nil when r is "any" here.
	setOf := func(r *rule) any {
		switch d {
		case dimDstPort:
			if !r.dstPort.any {
				return r.dstPort
			}
		case dimSrcPort:
			if !r.srcPort.any {
				return r.srcPort
			}
		case dimDst:
			if !r.dst.any {
				return r.dst
			}
		default:
			if !r.src.any {
				return r.src
			}
		}
		return nil
	}
	spans := func(set any) []span {
		sp := buf[:0]
		switch set := set.(type) {
		case *portSet:
			for _, pr := range set.ranges {
				sp = append(sp, span{u128{0, uint64(pr.from)}, u128{0, uint64(pr.to)}})
			}
		case *addrSet:
			if fam == 0 {
				for _, ar := range set.v4 {
					sp = append(sp, span{u128{0, uint64(ar.from)}, u128{0, uint64(ar.to)}})
				}
			} else {
				for _, ar := range set.v6 {
					sp = append(sp, span{ar.from, ar.to})
				}
			}
		}
		buf = sp
		return sp
	}

	// Group the rules by set: a set is indexed once however many rules
	// use it.
	groupOf := map[any]int32{}
	var groups []any      // group -> set
	var members [][]int32 // group -> its rules, ascending
	restricted := 0
	for _, i := range all {
		set := setOf(&rs.rules[i])
		if set == nil {
			x.wild = append(x.wild, i)
			continue
		}
		restricted++
		g, ok := groupOf[set]
		if !ok {
			g = int32(len(groups))
			groupOf[set] = g
			groups = append(groups, set)
			members = append(members, nil)
		}
		members[g] = append(members[g], i)
	}
	x.used = restricted > 0
	top := u128{0, 0xffff}
	switch {
	case d == dimDst || d == dimSrc:
		if fam == 0 {
			top = u128{0, 0xffffffff}
		} else {
			top = u128{^uint64(0), ^uint64(0)}
		}
	}

	// Boundaries: 0, every range start and every range end + 1.
	bounds := []u128{{}}
	for _, set := range groups {
		for _, s := range spans(set) {
			bounds = append(bounds, s.from)
			if s.to != top {
				n, _ := s.to.next()
				bounds = append(bounds, n)
			}
		}
	}
	if !x.used {
		return dim{} // skipped by Match: every rule is wild here
	}
	x.wild = slices.Clip(x.wild)
	slices.SortFunc(bounds, func(a, b u128) int {
		switch {
		case a.less(b):
			return -1
		case b.less(a):
			return 1
		}
		return 0
	})
	bounds = slices.Compact(bounds)
	leaves := len(bounds)
	find := func(v u128) int { return leaf128(bounds, v) } // v is a bound
	x.size = 1
	for x.size < leaves {
		x.size <<= 1
	}

	// Canonical nodes of every set's ranges: counted, then filled (CSR),
	// in group order so each node's list is ascending (in rule order when
	// every group is one rule).
	grouped := len(groups) < restricted
	entry := func(g int) int32 {
		if grouped {
			return int32(g)
		}
		return members[g][0]
	}
	x.start = make([]uint32, 2*x.size+1)
	weight := make([]uint32, 2*x.size) // rules per node
	visit := func(fn func(node int, g int)) {
		for g, set := range groups {
			for _, s := range spans(set) {
				l := find(s.from)
				r := leaves // exclusive
				if s.to != top {
					n, _ := s.to.next()
					r = find(n)
				}
				for l, r = l+x.size, r+x.size; l < r; l, r = l>>1, r>>1 {
					if l&1 == 1 {
						fn(l, g)
						l++
					}
					if r&1 == 1 {
						r--
						fn(r, g)
					}
				}
			}
		}
	}
	visit(func(n int, g int) { x.start[n+1]++; weight[n] += uint32(len(members[g])) })
	for n := 1; n < len(x.start); n++ {
		x.start[n] += x.start[n-1]
	}
	x.ids = make([]int32, x.start[len(x.start)-1])
	fill := slices.Clone(x.start)
	visit(func(n int, g int) { x.ids[fill[n]] = entry(g); fill[n]++ })
	if grouped {
		x.mstart = make([]uint32, len(groups)+1)
		x.members = make([]int32, 0, restricted)
		for g, m := range members {
			x.members = append(x.members, m...)
			x.mstart[g+1] = uint32(len(x.members))
		}
	}

	// Candidate count per leaf: wild plus the rules on its root path.
	acc := make([]uint32, 2*x.size)
	acc[1] = uint32(len(x.wild)) + weight[1]
	for n := 2; n < 2*x.size; n++ {
		acc[n] = acc[n>>1] + weight[n]
	}
	x.count = slices.Clone(acc[x.size : x.size+leaves])

	switch {
	case d == dimDstPort || d == dimSrcPort:
		x.b16 = make([]uint16, leaves)
		for j, b := range bounds {
			x.b16[j] = uint16(b.lo)
		}
		if leaves >= portTableMin {
			x.port = make([]uint16, 65536)
			for port := range x.port {
				x.port[port] = uint16(leaf16(x.b16, uint16(port)))
			}
		}
	case fam == 0:
		x.b32 = make([]uint32, leaves)
		for j, b := range bounds {
			x.b32[j] = uint32(b.lo)
		}
		if leaves >= jump4Min {
			x.j4 = newJump4(x.b32)
		}
	default:
		x.b128 = slices.Clip(bounds)
	}
	return x
}

// indexBytes is the memory held by the index (slice backing arrays).
func (rs *Ruleset) indexBytes() int {
	n := int(unsafe.Sizeof(rs.idx))
	for ci := range rs.idx.tables {
		for fam := range rs.idx.tables[ci] {
			t := &rs.idx.tables[ci][fam]
			n += 4 * cap(t.all)
			for d := range t.dims {
				x := &t.dims[d]
				n += 2*cap(x.b16) + 4*cap(x.b32) + 16*cap(x.b128) +
					4*(cap(x.wild)+cap(x.start)+cap(x.ids)+cap(x.count)+cap(x.mstart)+cap(x.members)) + 2*cap(x.port)
				if x.j4 != nil {
					n += int(unsafe.Sizeof(*x.j4)) + 4*cap(x.j4.mid)
				}
			}
		}
	}
	return n
}
