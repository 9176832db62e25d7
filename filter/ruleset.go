package filter

import (
	"encoding/binary"
	"net/netip"
	"sort"
	"strings"
)

// Action is what a rule (or the default) decides for a new flow.
type Action uint8

// Actions.
const (
	Allow  Action = iota // let the flow through
	Deny                 // drop silently
	Reject               // drop and answer with a TCP RST / ICMP unreachable
)

// String returns "allow", "deny" or "reject".
func (a Action) String() string {
	switch a {
	case Allow:
		return "allow"
	case Deny:
		return "deny"
	case Reject:
		return "reject"
	}
	return "unknown"
}

// parseAction reads an action's name, in any case.
func parseAction(s string) (Action, bool) {
	for _, a := range []Action{Allow, Deny, Reject} {
		if strings.EqualFold(s, a.String()) {
			return a, true
		}
	}
	return 0, false
}

// LogLevel selects which new-flow decisions are logged.
type LogLevel uint8

// Log levels.
const (
	LogDeny LogLevel = iota // deny and reject decisions (the default)
	LogNone                 // nothing
	LogAll                  // every new-flow decision
)

// String returns "deny", "none" or "all".
func (l LogLevel) String() string {
	switch l {
	case LogNone:
		return "none"
	case LogAll:
		return "all"
	}
	return "deny"
}

// Protocol classes of the rule proto bitmask. "any" also covers protocols
// tunfw does not forward, so that Match is total.
const (
	protoTCP   uint8 = 1 << iota
	protoUDP         // UDP
	protoICMP        // ICMPv4 and ICMPv6 (echo)
	protoOther       // anything else
	protoAny   = protoTCP | protoUDP | protoICMP | protoOther
	protoPorts = protoTCP | protoUDP // classes that have ports
)

// settings are a Ruleset's [filter] options.
type settings struct {
	def     Action
	log     LogLevel
	monitor bool
	recheck bool // [filter] on_reload = "recheck"
}

// Ruleset is a compiled, immutable rule list. It is safe for concurrent use
// and meant to be swapped atomically (Engine.Swap) on reload.
type Ruleset struct {
	settings
	rules []rule
	// stats has one entry per rule plus the default's, last. Counters are
	// shared with the previous ruleset for rules of the same name.
	stats []*ruleCounters
	idx   ruleIndex // built by buildIndex; Match uses it (index.go)
	// hasDomains: some rule has a domain key, so flows may need a name
	// (names.go); without, judging a flow costs what it always did.
	hasDomains bool
}

// rule is one compiled [[rule]]. Absent keys are "any" sets. The sets are
// shared between rules whose keys list the same entries (and never
// modified): the index groups rules by them.
type rule struct {
	name             string
	action           Action
	protos           uint8
	src, dst         *addrSet
	srcPort, dstPort *portSet
	// domains are the names the flow's name must match; nil: any name,
	// known or not.
	domains *nameSet
	// nameOnly: the rule has domain and no condition but src, so a DNS
	// query for one of its names stands for the flow (BlockedName).
	nameOnly bool
}

// u128 is an IPv6 address as a number, for cheap comparisons.
type u128 struct{ hi, lo uint64 }

func (a u128) less(b u128) bool { return a.hi < b.hi || (a.hi == b.hi && a.lo < b.lo) }

func (a u128) next() (u128, bool) { // a+1 and whether it overflowed
	lo := a.lo + 1
	hi := a.hi
	if lo == 0 {
		hi++
		if hi == 0 {
			return u128{}, true
		}
	}
	return u128{hi, lo}, false
}

func u128From(a netip.Addr) u128 {
	b := a.As16()
	return u128{binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])}
}

type range4 struct{ from, to uint32 }
type range6 struct{ from, to u128 }

// addrSet is a compiled address list: sorted, merged, non-overlapping ranges
// per family, searched by binary search. A v4 entry never matches a v6
// packet and vice versa.
type addrSet struct {
	any bool
	v4  []range4
	v6  []range6
}

func (s *addrSet) contains(a netip.Addr) bool {
	if s.any {
		return true
	}
	if a.Is4() {
		v4 := s.v4
		if len(v4) == 0 {
			return false
		}
		a4 := a.As4()
		x := binary.BigEndian.Uint32(a4[:])
		// First range whose end is >= x; hand-rolled to stay inlinable and
		// closure-free on the hot path.
		lo, hi := 0, len(v4)
		for lo < hi {
			m := int(uint(lo+hi) >> 1)
			if v4[m].to < x {
				lo = m + 1
			} else {
				hi = m
			}
		}
		return lo < len(v4) && v4[lo].from <= x
	}
	v6 := s.v6
	if len(v6) == 0 {
		return false
	}
	x := u128From(a)
	lo, hi := 0, len(v6)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if v6[m].to.less(x) {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo < len(v6) && !x.less(v6[lo].from)
}

// portRange is an inclusive range of ports.
type portRange struct{ from, to uint16 }

// portSet is a compiled port list: sorted merged ranges.
type portSet struct {
	any    bool
	ranges []portRange
}

func (s *portSet) contains(port uint16) bool {
	if s.any {
		return true
	}
	r := s.ranges
	lo, hi := 0, len(r)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if r[m].to < port {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo < len(r) && r[lo].from <= port
}

// protoClass maps a packet to its bit in the rule proto bitmask.
func protoClass(p *Packet) uint8 {
	switch {
	case p.Proto == ProtoTCP:
		return protoTCP
	case p.Proto == ProtoUDP:
		return protoUDP
	case p.isICMP():
		return protoICMP
	}
	return protoOther
}

// matchLinear is Match without the index: the rules in order, first match
// wins. It is the reference the index must agree with (and the path for
// packets whose source and destination families differ, which ParsePacket
// never produces).
func (rs *Ruleset) matchLinear(p *Packet) (a Action, rule int) {
	class := protoClass(p)
	for i := range rs.rules {
		if r := &rs.rules[i]; r.matches(p, class) {
			return r.action, i
		}
	}
	return rs.def, -1
}

// matches reports whether r matches p, whose protoClass is class.
func (r *rule) matches(p *Packet, class uint8) bool {
	// Cheapest checks first: the proto bitmask, then ports, then the
	// address binary searches.
	return r.protos&class != 0 &&
		r.dstPort.contains(p.DstPort) &&
		r.srcPort.contains(p.SrcPort) &&
		r.dst.contains(p.Dst) &&
		r.src.contains(p.Src)
}

// NoRule is the Decision.Rule of decisions that no rule took (unknown
// protocol, no flow, table full, ...).
const NoRule = -2

// RuleName returns the name of rule i: "default" for -1, "" for NoRule or
// an index out of range.
func (rs *Ruleset) RuleName(i int) string {
	if i == -1 {
		return "default"
	}
	if i < 0 || i >= len(rs.rules) {
		return ""
	}
	return rs.rules[i].name
}

// Len returns the number of rules.
func (rs *Ruleset) Len() int { return len(rs.rules) }

// Default returns the action taken when no rule matches.
func (rs *Ruleset) Default() Action { return rs.def }

// RecheckOnReload reports whether existing flows are run through this
// ruleset when it replaces another ([filter] on_reload = "recheck").
func (rs *Ruleset) RecheckOnReload() bool { return rs.recheck }

// Monitor reports whether the ruleset is in monitor mode: deny and reject
// decisions are logged and the flow is forwarded anyway.
func (rs *Ruleset) Monitor() bool { return rs.monitor }

// span is a range of addresses or ports, for mergeRanges.
type span[R any] interface {
	startsBefore(R) bool // its start is below the other's
	// reaches reports whether next, which does not start before it,
	// overlaps it or follows it at once.
	reaches(next R) bool
	union(R) R // the range covering both, given reaches
}

func (a range4) startsBefore(b range4) bool { return a.from < b.from }
func (a range4) reaches(b range4) bool      { return a.to == ^uint32(0) || b.from <= a.to+1 }
func (a range4) union(b range4) range4      { return range4{a.from, max(a.to, b.to)} }

func (a range6) startsBefore(b range6) bool { return a.from.less(b.from) }
func (a range6) reaches(b range6) bool {
	n, overflow := a.to.next()
	return overflow || !n.less(b.from) // b.from <= a.to+1
}
func (a range6) union(b range6) range6 {
	if a.to.less(b.to) {
		a.to = b.to
	}
	return a
}

func (a portRange) startsBefore(b portRange) bool { return a.from < b.from }
func (a portRange) reaches(b portRange) bool      { return a.to == 0xffff || b.from <= a.to+1 }
func (a portRange) union(b portRange) portRange   { return portRange{a.from, max(a.to, b.to)} }

// mergeRanges sorts r and merges overlapping or adjacent ranges.
func mergeRanges[R span[R]](r []R) []R {
	if len(r) == 0 {
		return r
	}
	sort.Slice(r, func(i, j int) bool { return r[i].startsBefore(r[j]) })
	out := r[:1]
	for _, x := range r[1:] {
		if last := out[len(out)-1]; last.reaches(x) {
			out[len(out)-1] = last.union(x)
			continue
		}
		out = append(out, x)
	}
	return clip(out)
}

// clip copies s into a right-sized slice so the compiled ruleset does not
// pin the larger compile-time buffers.
func clip[T any](s []T) []T { return append([]T(nil), s...) }

// prefixRange4 and prefixRange6 return the first and last address of a
// masked prefix.
func prefixRange4(p netip.Prefix) range4 {
	a4 := p.Addr().As4()
	from := binary.BigEndian.Uint32(a4[:])
	host := uint32(0)
	if bits := p.Bits(); bits < 32 {
		host = ^uint32(0) >> bits
	}
	return range4{from, from | host}
}

func prefixRange6(p netip.Prefix) range6 {
	from := u128From(p.Addr())
	to := from
	switch bits := p.Bits(); {
	case bits == 0:
		to = u128{^uint64(0), ^uint64(0)}
	case bits < 64:
		to.hi |= ^uint64(0) >> bits
		to.lo = ^uint64(0)
	case bits < 128:
		to.lo |= ^uint64(0) >> (bits - 64)
	}
	return range6{from, to}
}
