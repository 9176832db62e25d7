package filter

import (
	"fmt"
	"net/netip"
	"strings"
)

// RuleCheck is one rule's part in an Explanation.
type RuleCheck struct {
	Rule    string `json:"rule"`  // its name
	Index   int    `json:"index"` // N of rule[N] in the config, 1-based
	Action  string `json:"action"`
	Matched bool   `json:"matched"`
	// Why says, for a rule that did not match, the first condition that
	// failed; for one that did, "" (or that its name matched).
	Why string `json:"why,omitempty"`
}

// Explanation is how the rules judge a flow, rule by rule.
type Explanation struct {
	// Rules are the rules consulted, in order, up to the one that decided.
	Rules []RuleCheck `json:"rules"`
	// Verdict is the action taken and Rule the name of the rule that took
	// it ("default" when none matched).
	Verdict string `json:"verdict"`
	Rule    string `json:"rule"`
	// Peek: tunfw would read the flow's name from its first bytes before
	// deciding and dialling.
	Peek bool `json:"peek"`
	// Name is the name the flow was judged with, NameFrom where it came
	// from ("given" for a name on the command line).
	Name     string `json:"name,omitempty"`
	NameFrom string `json:"name_from,omitempty"`
}

// ExplainQuery is a flow to explain. Dst's address may be invalid when
// the destination was given by name: rules with a dst condition then do
// not match, and the name is the flow's.
type ExplainQuery struct {
	Proto    uint8 // ProtoTCP, ProtoUDP, ProtoICMP or ProtoICMPv6
	Src, Dst netip.AddrPort
	Name     string
	NameFrom string
	// Peekable: tunfw can read this flow's name from its first bytes
	// (EngineOptions.Peekable).
	Peekable bool
}

// Explain walks the rules for q as a flow's first packet and says, for
// each rule consulted, whether it matched and if not why, as Match and
// MatchName would judge it.
func (rs *Ruleset) Explain(q ExplainQuery) Explanation {
	p := Packet{Proto: q.Proto, Src: q.Src.Addr(), Dst: q.Dst.Addr(), SrcPort: q.Src.Port(), DstPort: q.Dst.Port(), Version: 4}
	if p.Src.Is6() {
		p.Version = 6
	}
	if p.isICMP() {
		p.SrcPort, p.DstPort = 0, 0
	}
	class := protoClass(&p)
	ex := Explanation{Name: q.Name, NameFrom: q.NameFrom, Verdict: rs.def.String(), Rule: "default"}
	// The verdict without a name, and whether some rule by name before it
	// acts otherwise: then tunfw would wait for the name (NeedsName).
	var byName []Action
	decided, plainMatch := false, false
	for i := range rs.rules {
		r := &rs.rules[i]
		why := r.mismatch(&p, class)
		if why == "" && r.domains != nil && !plainMatch {
			byName = append(byName, r.action)
		}
		plainMatch = plainMatch || (why == "" && r.domains == nil)
		if !decided {
			if why == "" && r.domains != nil {
				switch {
				case q.Name == "":
					why = "the flow's name is not known"
				case !r.domains.match(q.Name):
					why = fmt.Sprintf("name %s is not in its domain", q.Name)
				}
			}
			c := RuleCheck{Rule: r.name, Index: i + 1, Action: r.action.String(), Why: why, Matched: why == ""}
			ex.Rules = append(ex.Rules, c)
			if c.Matched {
				ex.Verdict, ex.Rule, decided = r.action.String(), r.name, true
			}
		}
		if decided && plainMatch {
			break
		}
	}
	noName, _ := rs.noNameVerdict(&p, class)
	for _, a := range byName {
		if a != noName {
			ex.Peek = q.Peekable
		}
	}
	return ex
}

// noNameVerdict is MatchName(p, "") without the index, for Explain, whose
// packet may lack a destination address.
func (rs *Ruleset) noNameVerdict(p *Packet, class uint8) (Action, int) {
	for i := range rs.rules {
		if r := &rs.rules[i]; r.domains == nil && r.mismatch(p, class) == "" {
			return r.action, i
		}
	}
	return rs.def, -1
}

// mismatch says which of r's conditions other than domain p fails, "" if
// none. A packet without a destination address fails every dst condition.
func (r *rule) mismatch(p *Packet, class uint8) string {
	switch {
	case r.protos&class == 0:
		return fmt.Sprintf("proto %s is not %s", protoName(p.Proto), protoMaskNames(r.protos))
	case !r.dstPort.contains(p.DstPort):
		return fmt.Sprintf("dst_port %d is not in its dst_port", p.DstPort)
	case !r.srcPort.contains(p.SrcPort):
		return fmt.Sprintf("src_port %d is not in its src_port", p.SrcPort)
	case !r.dst.any && !p.Dst.IsValid():
		return "it has a dst condition and the destination's address is not known"
	case !r.dst.contains(p.Dst):
		return fmt.Sprintf("dst %s is not in its dst", p.Dst)
	case !r.src.contains(p.Src):
		return fmt.Sprintf("src %s is not in its src", p.Src)
	}
	return ""
}

func protoMaskNames(m uint8) string {
	var n []string
	for _, c := range []struct {
		bit  uint8
		name string
	}{{protoTCP, "tcp"}, {protoUDP, "udp"}, {protoICMP, "icmp"}} {
		if m&c.bit != 0 {
			n = append(n, c.name)
		}
	}
	if len(n) == 0 {
		return "any protocol it forwards"
	}
	return strings.Join(n, " or ")
}
