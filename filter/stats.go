package filter

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// ruleCounters count what one rule (or the default) decided. A flow points
// at the counters of the rule that judged it, so its packets keep counting
// there for its whole life.
type ruleCounters struct {
	flows, packets, bytes atomic.Uint64
}

// initStats gives every rule, and the default, its counters.
func (rs *Ruleset) initStats() {
	rs.stats = make([]*ruleCounters, len(rs.rules)+1)
	for i := range rs.stats {
		rs.stats[i] = new(ruleCounters)
	}
}

// counters returns the counters of rule i (-1: the default).
func (rs *Ruleset) counters(i int) *ruleCounters {
	if i < 0 || i >= len(rs.rules) {
		return rs.stats[len(rs.rules)]
	}
	return rs.stats[i]
}

// inheritStats makes rules of rs that have the same name as a rule of old
// (and the default) continue old's counters, so statistics survive a reload
// that keeps a rule.
func (rs *Ruleset) inheritStats(old *Ruleset) {
	if old == nil {
		return
	}
	byName := make(map[string]*ruleCounters, len(old.rules))
	for i, r := range old.rules {
		if _, dup := byName[r.name]; !dup {
			byName[r.name] = old.stats[i]
		}
	}
	for i, r := range rs.rules {
		if c, ok := byName[r.name]; ok {
			rs.stats[i] = c
			delete(byName, r.name) // a name used twice gets fresh counters
		}
	}
	rs.stats[len(rs.rules)] = old.stats[len(old.rules)]
}

// RuleStat is what one rule of the current ruleset has decided since it was
// loaded (or since a rule of the same name was).
type RuleStat struct {
	Name    string `json:"name"`
	Action  string `json:"action"`
	Flows   uint64 `json:"flows"`
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// RuleStats returns the counters of every rule of the current ruleset, in
// order, followed by the default.
func (e *Engine) RuleStats() []RuleStat {
	rs := e.policy.Load().rules
	out := make([]RuleStat, 0, len(rs.rules)+1)
	for i := -1; i < len(rs.rules); i++ {
		j := i + 1
		if j == len(rs.rules) {
			j = -1 // the default last
		}
		c := rs.counters(j)
		act := rs.def
		if j >= 0 {
			act = rs.rules[j].action
		}
		out = append(out, RuleStat{
			Name: rs.RuleName(j), Action: act.String(),
			Flows: c.flows.Load(), Packets: c.packets.Load(), Bytes: c.bytes.Load(),
		})
	}
	return out
}

// FlowInfo is a snapshot of one flow table entry.
type FlowInfo struct {
	Proto   string         `json:"proto"` // tcp, udp, icmp
	Src     netip.AddrPort `json:"src"`   // for icmp, the port is the echo id
	Dst     netip.AddrPort `json:"dst"`
	State   string         `json:"state"` // new, established, closing, closed
	Rule    string         `json:"rule"`
	Verdict string         `json:"verdict"` // allow, deny, reject
	Monitor bool           `json:"monitor,omitempty"`
	// Name is the name the flow was judged by (or known by) and NameFrom
	// where it came from: sni, host, quic or dns; empty when none.
	Name       string        `json:"name,omitempty"`
	NameFrom   string        `json:"name_from,omitempty"`
	Age        time.Duration `json:"age_ns"`
	Idle       time.Duration `json:"idle_ns"`
	PacketsIn  uint64        `json:"packets_in"` // client -> destination
	BytesIn    uint64        `json:"bytes_in"`
	PacketsOut uint64        `json:"packets_out"` // destination -> client
	BytesOut   uint64        `json:"bytes_out"`
}

// verdictName is what a listing shows as a flow's verdict: its rule's
// action, or "peek" while its name is being read.
func verdictName(f *flow) string {
	if f.dec.Peek {
		return "peek"
	}
	return f.act.String()
}

var stateNames = [numStates]string{"new", "established", "closing", "closed"}

func protoName(p uint8) string {
	switch p {
	case ProtoTCP:
		return "tcp"
	case ProtoUDP:
		return "udp"
	}
	return "icmp"
}

// Flows returns a snapshot of the flow table at monotonic time now (see
// EachFlow).
func (e *Engine) Flows(now int64) []FlowInfo {
	e.mu.Lock()
	out := make([]FlowInfo, 0, len(e.flows)+len(e.flows)/8)
	e.mu.Unlock()
	e.EachFlow(now, func(fi *FlowInfo) { out = append(out, *fi) })
	return out
}

// EachFlow calls fn with a snapshot of every flow at monotonic time now. It
// copies walkBatch flows per hold of the table's lock and calls fn for them
// after releasing it, so the packet path waits for one batch at most and
// fn may take its time; flows that come or go meanwhile may or may not be
// seen. fn must not keep fi.
func (e *Engine) EachFlow(now int64, fn func(fi *FlowInfo)) {
	batch := make([]FlowInfo, 0, walkBatch)
	for i := 0; ; {
		batch = batch[:0]
		e.mu.Lock()
		end := min(i+walkBatch, len(e.slots))
		for ; i < end; i++ {
			f := e.slots[i]
			if f == nil {
				continue
			}
			k := &f.key
			batch = append(batch, FlowInfo{
				Proto: protoName(k.Proto), Src: k.Src, Dst: k.Dst,
				State: stateNames[f.state], Rule: f.rs.RuleName(f.dec.Rule), Verdict: verdictName(f),
				Monitor: f.monitored, Name: f.name, NameFrom: f.nameFrom.String(),
				// A paced listing runs for seconds past now: a flow
				// made since is 0 old, not negative.
				Age: time.Duration(max(0, now-f.first)), Idle: time.Duration(max(0, now-f.last)),
				PacketsIn: f.pktsIn, BytesIn: f.bytesIn, PacketsOut: f.pktsOut, BytesOut: f.bytesOut,
			})
		}
		more := i < len(e.slots)
		e.mu.Unlock()
		for j := range batch {
			fn(&batch[j])
		}
		if !more {
			return
		}
		yieldBatch(more)
	}
}

// logLimiter is a token bucket bounding decision log lines per second.
type logLimiter struct {
	mu         sync.Mutex
	rate       float64 // tokens per second, also the burst
	tokens     float64
	last       int64
	started    bool
	suppressed uint64
}

// allow takes a token at monotonic time now. When it allows a line after
// some were refused, it also returns how many were, for a summary line.
func (l *logLimiter) allow(now int64, rate int) (ok bool, suppressed uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.rate = float64(rate)
	if l.started {
		l.tokens += float64(now-l.last) / 1e9 * l.rate
	} else {
		l.tokens, l.started = l.rate, true
	}
	if l.tokens > l.rate {
		l.tokens = l.rate
	}
	l.last = now
	if l.tokens < 1 {
		l.suppressed++
		return false, 0
	}
	l.tokens--
	s := l.suppressed
	l.suppressed = 0
	return true, s
}

// flush returns and clears the count of refused lines, so a summary is
// written even if no further decision is logged.
func (l *logLimiter) flush() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.suppressed
	l.suppressed = 0
	return s
}
