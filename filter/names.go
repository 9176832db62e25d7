package filter

import (
	"context"
	"log/slog"
	"net/netip"

	"github.com/tunfw/tunfw/dns"
	"github.com/tunfw/tunfw/names"
)

// Rules by name. A rule with a domain key matches a flow only when the
// flow's name is known and in the rule's names. The name comes from the
// flow's first bytes (TLS server_name, HTTP Host, the QUIC Initial's
// server_name), which the stack reads before it dials, or else from the
// DNS answers tunfw forwarded to the client.
//
// The rule index ignores domain keys: Match finds the first rule whose
// other keys match. When that rule has a domain key, the name decides,
// and the search goes on past it when the name does not match.

// NameFrom says where a flow's name came from.
type NameFrom uint8

// Name sources.
const (
	NameNone NameFrom = iota // no name known
	NameSNI                  // the TLS ClientHello's server_name
	NameHost                 // the HTTP/1.x Host header
	NameQUIC                 // the server_name of the QUIC Initial's ClientHello
	NameDNS                  // a DNS answer tunfw forwarded to the client
)

var nameFromStrings = [...]string{"", "sni", "host", "quic", "dns"}

// String returns "sni", "host", "quic", "dns", or "" for NameNone.
func (n NameFrom) String() string {
	if int(n) < len(nameFromStrings) {
		return nameFromStrings[n]
	}
	return "unknown"
}

// nameSet is a compiled domain key: the name matches when one of the sets
// holds it. The sets are shared with [sets] and other rules, never copied:
// a list of a million names is held once.
type nameSet struct {
	sets []*names.Set
}

func (s *nameSet) match(name string) bool {
	if name == "" {
		return false
	}
	for _, ns := range s.sets {
		if ns.MatchString(name) {
			return true
		}
	}
	return false
}

// matchBytes is match for a name read from a message, without making a
// string of it.
func (s *nameSet) matchBytes(name []byte) bool {
	if len(name) == 0 {
		return false
	}
	for _, ns := range s.sets {
		if ns.Match(name) {
			return true
		}
	}
	return false
}

// HasNameRules reports whether some rule has a domain key.
func (rs *Ruleset) HasNameRules() bool { return rs.hasDomains }

// MatchName is Match for a flow whose name is name ("" when unknown): the
// first rule that matches p and, if it has a domain key, the name.
func (rs *Ruleset) MatchName(p *Packet, name string) (a Action, rule int) {
	a, i := rs.Match(p)
	if i < 0 || rs.rules[i].domains == nil || rs.rules[i].domains.match(name) {
		return a, i
	}
	class := protoClass(p)
	for j := i + 1; j < len(rs.rules); j++ {
		r := &rs.rules[j]
		if r.matches(p, class) && (r.domains == nil || r.domains.match(name)) {
			return r.action, j
		}
	}
	return rs.def, -1
}

// NeedsName reports whether p's flow could be judged differently
// depending on its name: some rule with a domain key and an action other
// than the flow's verdict without a name comes before the rule that
// decides without one.
func (rs *Ruleset) NeedsName(p *Packet) bool {
	if !rs.hasDomains {
		return false
	}
	a, i := rs.Match(p)
	if i < 0 || rs.rules[i].domains == nil {
		return false
	}
	noName, _ := rs.MatchName(p, "")
	if a != noName {
		return true
	}
	class := protoClass(p)
	for j := i + 1; j < len(rs.rules); j++ {
		r := &rs.rules[j]
		if !r.matches(p, class) {
			continue
		}
		if r.domains == nil {
			return false
		}
		if r.action != noName {
			return true
		}
	}
	return false
}

// BlockedName reports whether a DNS query for name, from client src,
// is answered by tunfw instead of forwarded: the first rule that has a
// domain key and no condition but src, whose src and names match, denies
// or rejects. It returns that rule's index. name is taken as Match takes
// it (any case, perhaps a trailing dot), as DNS reads it: a slice, so that
// a query costs no string.
func (rs *Ruleset) BlockedName(src netip.Addr, name []byte) (rule int, blocked bool) {
	if !rs.hasDomains {
		return NoRule, false
	}
	for i := range rs.rules {
		r := &rs.rules[i]
		if r.nameOnly && r.src.contains(src) && r.domains.matchBytes(name) {
			return i, r.action != Allow
		}
	}
	return NoRule, false
}

// HasNameRules reports whether the rules in force have a domain key.
func (e *Engine) HasNameRules() bool { return e.policy.Load().rules.hasDomains }

// BlockQuery reports whether tunfw answers a DNS query for name from
// client src itself instead of forwarding it (Ruleset.BlockedName), and
// accounts it: the rule's counters, the blocked-queries counter and a
// decision log line, like a denied flow. A query it does not block costs
// no allocation.
func (e *Engine) BlockQuery(src netip.Addr, name []byte, now int64) bool {
	rs := e.policy.Load().rules
	ri, blocked := rs.BlockedName(src, name)
	if !blocked {
		return false
	}
	rs.counters(ri).flows.Add(1)
	e.ctr[ctrDNSBlocked].Add(1)
	if rs.log != LogNone && e.log.Enabled(context.Background(), slog.LevelInfo) {
		if ok, suppressed := e.logLim.allow(now, e.policy.Load().limits.LogRate); ok {
			e.log.LogAttrs(context.Background(), slog.LevelInfo, "dns query blocked",
				slog.String("verdict", rs.rules[ri].action.String()), slog.String("rule", rs.RuleName(ri)),
				slog.String("src", src.String()), slog.String("name", string(name)))
		} else if suppressed > 0 {
			e.logSuppressed(suppressed)
		}
	}
	return true
}

// AnswerQuery decides whether tunfw answers the DNS query msg, from client
// src, itself instead of forwarding it, and writes that answer; the UDP and
// TCP forwarders frame and send it. tunfw answers while rules by name are in
// force: a query for a name a rule blocks (BlockQuery, which accounts it)
// as mode says, and one for dns.CanaryName with NXDOMAIN, so that browsers
// keep to the system's resolver, whose answers tunfw can read. A message
// that does not read as a query (dns.Question) is forwarded.
//
// answered is false for a query to forward unchanged. Otherwise ans is the
// answer, written into buf from its start (grown when too small, as
// dns.Answer does), or buf[:0] when nothing is to be sent: mode
// dns.BlockDrop, or a query dns.Answer cannot answer, which is not
// forwarded all the same. A query forwarded costs no allocation, nor does
// an answer that fits buf.
func (e *Engine) AnswerQuery(src netip.Addr, msg []byte, mode dns.BlockMode, buf []byte, now int64) (ans []byte, answered bool) {
	if !e.HasNameRules() {
		return nil, false
	}
	var nb [255]byte
	_, name, _, ok := dns.Question(msg, &nb)
	if !ok {
		return nil, false
	}
	if string(name) == dns.CanaryName {
		mode = dns.BlockNXDomain
	} else if !e.BlockQuery(src, name, now) {
		return nil, false
	}
	if mode == dns.BlockDrop {
		return buf[:0], true
	}
	ans, err := dns.Answer(msg, mode, buf)
	if err != nil {
		return buf[:0], true
	}
	return ans, true
}

// Peeking reports whether flow r waits for its name (Decision.Peek): the
// stack reads its first bytes and calls Decide before it dials.
func (e *Engine) Peeking(r FlowRef) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	f := e.flows[r.Key]
	return f != nil && f.id == r.ID && f.dec.Peek
}
