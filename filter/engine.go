package filter

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Verdict is what the caller does with one packet.
type Verdict uint8

// Verdicts. The zero value is VerdictDrop so that a forgotten Decision fails
// closed.
const (
	VerdictDrop    Verdict = iota // discard the packet
	VerdictForward                // hand the packet to the stack
	VerdictReject                 // discard it and write BuildReject's reply into the TUN
)

// String returns "drop", "forward" or "reject".
func (v Verdict) String() string {
	switch v {
	case VerdictForward:
		return "forward"
	case VerdictReject:
		return "reject"
	}
	return "drop"
}

// DropReason says why a packet was not forwarded.
type DropReason uint8

// Drop reasons.
const (
	ReasonNone        DropReason = iota // forwarded
	ReasonDenied                        // the flow's rule (or default) is deny
	ReasonRejected                      // the flow's rule (or default) is reject
	ReasonNoFlow                        // TCP packet that is not a SYN, with no flow
	ReasonMalformed                     // ParsePacket failed
	ReasonFragment                      // IP fragment (see package doc)
	ReasonUnsupported                   // protocol other than TCP/UDP/ICMP echo request
	ReasonLimit                         // flow table full (MaxFlows, MaxFlowsPerSource)
	// ReasonDeferred: a SYN the stack did not dial now, under a SYN flood
	// (deferred, or its dial gave way to a newer one): dropped without an
	// answer, so that the client's retransmission tries again. Counted by
	// the stack (Count).
	ReasonDeferred
	numReasons
)

var reasonNames = [numReasons]string{"none", "denied", "rejected", "no-flow", "malformed", "fragment", "unsupported", "limit", "deferred"}

// String returns the reason as used in counters and logs: "denied",
// "no-flow", ...
func (r DropReason) String() string {
	if r < numReasons {
		return reasonNames[r]
	}
	return "unknown"
}

// Decision is the Engine's judgment of one inbound packet.
type Decision struct {
	Verdict Verdict
	// Rule is the index of the rule that judged the packet's flow in the
	// ruleset current when the flow was created, -1 for the default, or
	// NoRule when no rule was involved.
	Rule   int
	Reason DropReason // ReasonNone when forwarded
	// Peek: the flow is forwarded but not judged yet. Its verdict depends
	// on its name, which the stack reads from the client's first bytes
	// (completing a TCP handshake, holding a UDP datagram) before it
	// dials, then calls Decide. Rule is NoRule until then.
	Peek bool
}

// FlowKey identifies a flow as seen from the client (the TUN side). For
// ICMP echo, Src's port is the echo identifier and Dst's port is 0.
type FlowKey struct {
	Proto    uint8
	Src, Dst netip.AddrPort
}

// KeyOf returns the key of the flow a client's packet p belongs to: for TCP
// and UDP its addresses and ports; for an echo request the identifier
// stands in for the source port and the destination has none.
func KeyOf(p *Packet) FlowKey {
	if p.isICMP() {
		return FlowKey{p.Proto, netip.AddrPortFrom(p.Src, p.SrcPort), netip.AddrPortFrom(p.Dst, 0)}
	}
	return FlowKey{p.Proto, netip.AddrPortFrom(p.Src, p.SrcPort), netip.AddrPortFrom(p.Dst, p.DstPort)}
}

// Reverse returns the key with source and destination swapped: a TCP or
// UDP flow's key as its replies carry it.
func (k FlowKey) Reverse() FlowKey { return FlowKey{k.Proto, k.Dst, k.Src} }

// String formats k as "tcp 10.0.0.2:40000 -> 192.0.2.1:443" (an echo
// flow: "icmp 10.0.0.2 id 7 -> 192.0.2.1").
func (k FlowKey) String() string {
	if k.Proto == ProtoICMP || k.Proto == ProtoICMPv6 {
		return fmt.Sprintf("%s %s id %d -> %s", protoName(k.Proto), k.Src.Addr(), k.Src.Port(), k.Dst.Addr())
	}
	return fmt.Sprintf("%s %s -> %s", protoName(k.Proto), k.Src, k.Dst)
}

// FlowID is the identity of one flow table entry. IDs are never reused, so
// whoever acts on a flow after a delay (a relay ending, a reload closing
// what it cut) names the flow by key and ID and cannot touch a newer flow
// that reuses the key.
type FlowID uint64

// FlowRef names one flow: its key and identity.
type FlowRef struct {
	Key FlowKey
	ID  FlowID
}

// Timeouts are the idle timeouts of flows by protocol and TCP state.
type Timeouts struct {
	TCPHandshake time.Duration // SYN seen, no SYN-ACK yet
	TCPIdle      time.Duration // established
	TCPClosing   time.Duration // one side closed (as the stack saw it), or cut by a recheck
	UDPIdle      time.Duration
	ICMPIdle     time.Duration
}

// EngineOptions configures NewEngine. Zero fields take their defaults.
type EngineOptions struct {
	Logger *slog.Logger // default slog.Default()
	// Limits are the flow table's limits and timeouts ([limits]); zero
	// fields take their defaults (Limits.Validate gives them all).
	Limits EngineLimits
	// LocalAddrs are the TUN's own addresses: a packet read from the TUN
	// that is addressed to one of them is dropped as malformed.
	LocalAddrs []netip.Addr
	// Names returns the name DNS answers tunfw forwarded gave addr for
	// client, if one is known and within its TTL; nil: no DNS names.
	Names func(client, addr netip.Addr) (string, bool)
	// Peekable reports whether the stack can read the name of p's flow
	// from its first bytes (a TCP port where the client speaks first,
	// QUIC); nil: no flow is peeked, names come from DNS only.
	Peekable func(p *Packet) bool
}

// Counters is a snapshot of the Engine's counters.
type Counters struct {
	Forwarded uint64 // inbound packets forwarded
	Replies   uint64 // outbound packets that matched a flow
	// Packets not forwarded, by reason.
	Denied, Rejected, NoFlow, Malformed, Fragment, Unsupported, Limit, Deferred uint64
	Monitored                                                                   uint64 // flows forwarded only because of monitor mode
	FlowsCreated                                                                uint64
	// Peeked counts flows whose verdict waited for their name
	// (Decision.Peek).
	Peeked uint64
	// DNSBlocked counts DNS queries tunfw answered itself (BlockQuery).
	DNSBlocked  uint64
	FlowsActive int
	// FlowsByState counts active flows by state name (new, established,
	// closing, closed).
	FlowsByState map[string]int
	// Bytes carried by flows, client to destination and back.
	BytesIn, BytesOut uint64
}

// States of a flow. A UDP or ICMP flow is new until its first reply. A TCP
// flow's state follows only what the stack did, never a client's flags
// (which anyone on the client's side can forge): the stack's SYN-ACK
// establishes it, the stack's FIN (the destination closed its side) makes
// it closing, and the relay's end removes it (Release). A flow a reload's
// recheck cut is closed: it stays until the tcp_closing timeout to answer
// the client with resets. The relay also marks a flow closing when the
// client's FIN was accepted by the stack (Closing).
const (
	stateNew uint8 = iota
	stateEstablished
	stateClosing
	stateClosed
	numStates
)

// flow is one flow table entry, guarded by Engine.mu.
type flow struct {
	key       FlowKey
	id        FlowID
	slot      int32 // index in Engine.slots
	dec       Decision
	act       Action // what the rule said (dec may differ in monitor mode)
	monitored bool
	state     uint8
	rs        *Ruleset      // the ruleset that judged the flow, for its rule's name
	st        *ruleCounters // that rule's counters
	first     int64         // monotonic ns of the first packet
	last      int64         // monotonic ns of the last packet either way
	pktsIn    uint64
	pktsOut   uint64
	bytesIn   uint64
	bytesOut  uint64
	// name is the flow's name and nameFrom where it came from; set when
	// the flow is judged, for listings and logs.
	name     string
	nameFrom NameFrom
	// cliAck is the acknowledgement number of the client's latest TCP
	// segment (hasAck: one was seen): the sequence number a reset must
	// carry for the client to accept it when its window is closed.
	cliAck uint32
	hasAck bool
	// decided: Decide judged the flow by the name one connection's first
	// bytes carried. The verdict is that connection's, not the tuple's: a
	// new connection on the tuple is read and judged again (Inbound,
	// Claim).
	decided bool
}

// Counter slots: drop reasons count at their own index, ReasonNone's slot
// counts forwarded packets.
const ctrForwarded = int(ReasonNone)

const (
	ctrReplies = int(numReasons) + iota
	ctrMonitored
	ctrFlowsCreated
	ctrPeeked
	ctrDNSBlocked
	ctrBytesIn
	ctrBytesOut
	numCtrs
)

// Engine is the stateful filter: it judges each flow on its first packet
// with the current Ruleset and applies that verdict to the flow's later
// packets.
//
// Inbound must be called from one goroutine; the other methods are safe
// for concurrent use.
type Engine struct {
	// policy is the ruleset and limits new flows are judged by: one
	// pointer, so that a reload's rules and limits take effect together.
	policy atomic.Pointer[policy]
	// log receives decision lines, at most log_rate a second (logLim).
	log    *slog.Logger
	logLim logLimiter
	// local are tunfw's own addresses on the TUN: a packet to one of them
	// is malformed (see badAddresses). Read-only after NewEngine.
	local []netip.Addr
	// names and peekable are EngineOptions.Names and Peekable.
	names    func(client, addr netip.Addr) (string, bool)
	peekable func(p *Packet) bool
	// peeking counts the packets of flows not judged yet (Decision.Peek);
	// Decide moves them to the rule that judges the flow.
	peeking ruleCounters
	// ctr counts packets, bytes and drops (indexed by the ctr*
	// constants and by DropReason), read without the table's lock.
	ctr [numCtrs]atomic.Uint64

	// mu guards the flow table. Inbound takes it for every packet, so
	// nothing holds it for work that grows with the table: counts are
	// kept as flows change, and walks (expiry, listings, recheck) go
	// through slots a bounded batch per hold.
	mu      sync.Mutex
	flows   map[FlowKey]*flow
	slots   []*flow            // every flow at a fixed index, nil for free slots
	free    []int32            // free indexes of slots
	perSrc  map[netip.Addr]int // flows per client address, for MaxFlowsPerSource
	byState [numStates]int     // flows by state
	lastID  FlowID
	tombs   tombstones
}

// policy is what an Engine judges new flows by. It is never changed once
// stored: a change stores a new one.
type policy struct {
	rules  *Ruleset
	limits EngineLimits // with defaults applied
}

// walkBatch is how many slots a walk of the table looks at per hold of
// Engine.mu; at about 20-50 ns each, a hold stays well under 100 us.
const walkBatch = 1024

// NewEngine returns an Engine judging new flows with rs.
func NewEngine(rs *Ruleset, opts EngineOptions) *Engine {
	e := &Engine{
		log:      opts.Logger,
		local:    append([]netip.Addr(nil), opts.LocalAddrs...),
		names:    opts.Names,
		peekable: opts.Peekable,
		flows:    make(map[FlowKey]*flow),
		perSrc:   make(map[netip.Addr]int),
		tombs:    tombstones{byKey: make(map[FlowKey]tomb)},
	}
	if e.log == nil {
		e.log = slog.Default()
	}
	e.policy.Store(&policy{rules: rs, limits: opts.Limits.withDefaults()})
	return e
}

// Apply installs a new ruleset and new limits at once, for flows created
// from now on: no packet is judged by the new rules under the old limits
// or the other way round. Existing flows keep their verdict (see Recheck)
// and stay even if they exceed a new bound. Rules of rs named like rules
// of the ruleset it replaces continue their statistics; rs must not have
// been given to another Engine. Zero limits take their defaults. Callers
// serialise Apply, Swap and SetLimits.
func (e *Engine) Apply(rs *Ruleset, l EngineLimits) {
	rs.inheritStats(e.policy.Load().rules)
	e.policy.Store(&policy{rules: rs, limits: l.withDefaults()})
}

// Swap installs a new ruleset, keeping the limits (see Apply).
func (e *Engine) Swap(rs *Ruleset) { e.Apply(rs, e.Limits()) }

// SetLimits changes the flow table's limits and timeouts, keeping the
// ruleset (see Apply).
func (e *Engine) SetLimits(l EngineLimits) {
	e.policy.Store(&policy{rules: e.policy.Load().rules, limits: l.withDefaults()})
}

// Limits returns the limits in force.
func (e *Engine) Limits() EngineLimits { return e.policy.Load().limits }

// Timeouts returns the effective flow timeouts, so the stack can align its
// own (e.g. UDP socket) idle timeouts.
func (e *Engine) Timeouts() Timeouts { return e.policy.Load().limits.Timeouts }

// Count counts a packet the caller dropped itself, e.g. with the reason
// ParseErrorReason gives for a ParsePacket error.
func (e *Engine) Count(reason DropReason) {
	if reason > ReasonNone && reason < numReasons {
		e.ctr[reason].Add(1)
	}
}

// count accounts d and returns it.
func (e *Engine) count(d Decision) Decision {
	if d.Verdict == VerdictForward {
		e.ctr[ctrForwarded].Add(1)
	} else {
		e.Count(d.Reason)
	}
	return d
}

// Inbound judges a packet read from the TUN (sent by a client). p must have
// been filled by ParsePacket; now is a monotonic time in nanoseconds. For a
// packet of a known flow it does not allocate.
//
// A client's packets never change a flow's TCP state: a forged RST or FIN
// is handed to the stack, which ignores it unless it is in window, and
// only what the stack then does moves the flow on (Outbound, Release).
func (e *Engine) Inbound(p *Packet, now int64) Decision {
	var key FlowKey
	syn := false
	switch {
	case p.Proto == ProtoTCP:
		key = KeyOf(p)
		syn = p.TCPFlags&(TCPSyn|TCPAck|TCPRst) == TCPSyn
	case p.Proto == ProtoUDP:
		key = KeyOf(p)
	case p.isICMP():
		if req, _ := p.icmpEcho(); !req {
			return e.count(Decision{Verdict: VerdictDrop, Rule: NoRule, Reason: ReasonUnsupported})
		}
		key = KeyOf(p)
	default:
		return e.count(Decision{Verdict: VerdictDrop, Rule: NoRule, Reason: ReasonUnsupported})
	}

	e.mu.Lock()
	f := e.flows[key]
	// A SYN on a flow a recheck cut, or denied by the name its
	// connection carried, is a new connection reusing the tuple: judge
	// it afresh. On a live flow it goes to the stack, which
	// answers it within that connection. A flow that rules older than the
	// current ones denied or rejected (a recheck looks only at allowed
	// flows) is judged afresh too, at a new connection's SYN or a UDP or
	// ICMP flow's next packet: after a reload that allows it, a client
	// reusing the tuple at once is not refused by the old rules.
	if f != nil && !(syn && (f.state == stateClosed || (f.decided && f.dec.Verdict != VerdictForward))) && !e.staleDenial(f, p, syn) {
		f.last = now
		f.pktsIn++
		f.bytesIn += uint64(p.Len)
		f.st.packets.Add(1)
		f.st.bytes.Add(uint64(p.Len))
		if p.TCPFlags&(TCPAck|TCPRst) == TCPAck && p.Proto == ProtoTCP {
			f.cliAck, f.hasAck = p.TCPAck, true
		}
		d := f.dec
		e.mu.Unlock()
		if d.Verdict == VerdictForward {
			e.ctr[ctrBytesIn].Add(uint64(p.Len))
		}
		return e.count(d)
	}
	if f == nil && p.Proto == ProtoTCP && !syn {
		// The last segments of a connection whose relay ended (the
		// client's ACK of the stack's FIN) still reach the stack, so
		// its endpoint closes rather than retransmitting its FIN.
		if t, ok := e.tombs.byKey[key]; ok {
			e.mu.Unlock()
			e.ctr[ctrBytesIn].Add(uint64(p.Len))
			return e.count(Decision{Verdict: VerdictForward, Rule: t.rule, Reason: ReasonNone})
		}
	}
	pol := e.policy.Load()
	lim := &pol.limits
	full := f == nil && (len(e.flows) >= lim.MaxFlows ||
		(lim.MaxFlowsPerSource > 0 && e.perSrc[p.Src] >= lim.MaxFlowsPerSource))
	e.mu.Unlock()

	if p.Proto == ProtoTCP && !syn {
		return e.count(Decision{Verdict: VerdictDrop, Rule: NoRule, Reason: ReasonNoFlow})
	}
	if r := e.badAddresses(p); r != ReasonNone {
		return e.count(Decision{Verdict: VerdictDrop, Rule: NoRule, Reason: r})
	}
	if full { // fail fast, before running the rules
		return e.count(Decision{Verdict: VerdictReject, Rule: NoRule, Reason: ReasonLimit})
	}
	return e.newFlow(pol.rules, key, p, now)
}

// staleDenial reports whether f, which p belongs to, was denied or
// rejected by rules a reload has replaced, and p may start a new
// connection (a SYN; any packet of UDP or ICMP). e.mu is held.
func (e *Engine) staleDenial(f *flow, p *Packet, syn bool) bool {
	return f.dec.Verdict != VerdictForward && (syn || p.Proto != ProtoTCP) && f.rs != e.policy.Load().rules
}

// newFlow runs the rules for the first packet of a flow and records the
// verdict. Only Inbound inserts flows, so the table cannot have grown since
// Inbound's check.
func (e *Engine) newFlow(rs *Ruleset, key FlowKey, p *Packet, now int64) Decision {
	var name string
	var from NameFrom
	if rs.hasDomains {
		if e.peekable != nil && e.peekable(p) && rs.NeedsName(p) {
			return e.peekFlow(rs, key, p, now)
		}
		name, from = e.dnsName(p.Src, p.Dst)
	}
	act, ri := rs.MatchName(p, name)
	d, monitored := decision(rs, act, ri)
	st := rs.counters(ri)
	f := &flow{key: key, dec: d, act: act, monitored: monitored, rs: rs, st: st,
		first: now, last: now, pktsIn: 1, bytesIn: uint64(p.Len)}
	f.name, f.nameFrom = name, from

	e.mu.Lock()
	if e.policy.Load().rules != rs {
		// A reload came in while the rules ran: its recheck may have
		// walked past this flow's slot already, so the packet is judged
		// again, by the new rules and limits together. Nothing has been
		// counted yet; reloads are rare, so this ends.
		e.mu.Unlock()
		return e.Inbound(p, now)
	}
	// A new connection reusing a cut flow's tuple replaces it.
	if old := e.flows[key]; old != nil {
		e.removeLocked(old)
	}
	e.insertLocked(f)
	e.mu.Unlock()

	st.flows.Add(1)
	st.packets.Add(1)
	st.bytes.Add(uint64(p.Len))
	e.ctr[ctrFlowsCreated].Add(1)
	if monitored {
		e.ctr[ctrMonitored].Add(1)
	}
	if d.Verdict == VerdictForward {
		e.ctr[ctrBytesIn].Add(uint64(p.Len))
	}
	if rs.log == LogAll || (rs.log == LogDeny && act != Allow) {
		e.logFlow(rs, act, ri, key, monitored, f.name, f.nameFrom, now)
	}
	return e.count(d)
}

// decision is the verdict of act by rule ri of rs, and whether monitor
// mode changed it.
func decision(rs *Ruleset, act Action, ri int) (d Decision, monitored bool) {
	d = Decision{Verdict: VerdictForward, Rule: ri}
	switch act {
	case Deny:
		d.Verdict, d.Reason = VerdictDrop, ReasonDenied
	case Reject:
		d.Verdict, d.Reason = VerdictReject, ReasonRejected
	}
	monitored = rs.monitor && d.Verdict != VerdictForward
	if monitored {
		d.Verdict, d.Reason = VerdictForward, ReasonNone
	}
	return d, monitored
}

// dnsName is the name DNS gave dst for client src, if any.
func (e *Engine) dnsName(src, dst netip.Addr) (string, NameFrom) {
	if e.names != nil {
		if n, ok := e.names(src, dst); ok {
			return n, NameDNS
		}
	}
	return "", NameNone
}

// peekFlow records a flow whose verdict waits for its name (Decision.Peek).
func (e *Engine) peekFlow(rs *Ruleset, key FlowKey, p *Packet, now int64) Decision {
	d := Decision{Verdict: VerdictForward, Rule: NoRule, Peek: true}
	f := &flow{key: key, dec: d, rs: rs, st: &e.peeking, first: now, last: now, pktsIn: 1, bytesIn: uint64(p.Len)}
	e.mu.Lock()
	if e.policy.Load().rules != rs {
		e.mu.Unlock()
		return e.Inbound(p, now) // as in newFlow
	}
	if old := e.flows[key]; old != nil {
		e.removeLocked(old)
	}
	e.insertLocked(f)
	e.mu.Unlock()
	e.peeking.packets.Add(1)
	e.peeking.bytes.Add(uint64(p.Len))
	e.ctr[ctrFlowsCreated].Add(1)
	e.ctr[ctrPeeked].Add(1)
	e.ctr[ctrBytesIn].Add(uint64(p.Len))
	return e.count(d)
}

// Decide judges a flow that Inbound left to its name (Decision.Peek),
// once the stack has read name from its first bytes (from says how; ""
// with NameNone when none was found, at the timeout or the byte limit).
// A name read from the flow wins over one DNS gave; without one, the DNS
// name decides. The flow is judged by the rules in force now. Its later
// packets follow the verdict: for a denied flow the stack closes its side
// without a word (Outbound then reports its packets as not to be
// written), for a rejected one with a RST. A flow that is gone, or was
// not waiting, gets VerdictDrop with ReasonNoFlow.
func (e *Engine) Decide(r FlowRef, name string, from NameFrom, now int64) Decision {
	gone := Decision{Verdict: VerdictDrop, Rule: NoRule, Reason: ReasonNoFlow}
	e.mu.Lock()
	f := e.flows[r.Key]
	ok := f != nil && f.id == r.ID && f.dec.Peek
	e.mu.Unlock()
	if !ok {
		return gone
	}
	if name == "" {
		name, from = e.dnsName(r.Key.Src.Addr(), r.Key.Dst.Addr())
	}
	rs := e.policy.Load().rules
	p := r.Key.firstPacket()
	act, ri := rs.MatchName(&p, name)
	d, monitored := decision(rs, act, ri)
	st := rs.counters(ri)
	e.mu.Lock()
	if e.flows[r.Key] != f || f.id != r.ID || !f.dec.Peek {
		e.mu.Unlock()
		return gone
	}
	f.dec, f.act, f.monitored, f.rs, f.st = d, act, monitored, rs, st
	f.name, f.nameFrom, f.decided = name, from, true
	if d.Verdict == VerdictDrop && r.Key.Proto == ProtoTCP {
		// Its handshake completed before it was judged: what is left
		// of it goes after tcp_closing, not tcp_idle.
		e.setStateLocked(f, stateClosing)
	}
	pkts, bytes := f.pktsIn+f.pktsOut, f.bytesIn+f.bytesOut
	e.mu.Unlock()
	st.flows.Add(1)
	st.packets.Add(pkts)
	st.bytes.Add(bytes)
	if monitored {
		e.ctr[ctrMonitored].Add(1)
	}
	if rs.log == LogAll || (rs.log == LogDeny && act != Allow) {
		e.logFlow(rs, act, ri, r.Key, monitored, name, from, now)
	}
	return d
}

// badAddresses checks the addresses of a new flow's first packet: a source
// no host sends from is malformed, and so is a packet to one of the TUN's
// own addresses (it travels the wrong way: the kernel delivers those
// locally) or to its own source (a "land" packet, which would make tunfw
// connect a host to itself on the sender's behalf); multicast and
// broadcast cannot be relayed through a connected socket and are
// unsupported.
func (e *Engine) badAddresses(p *Packet) DropReason {
	if p.Src.IsMulticast() || p.Src.IsUnspecified() || p.Src.IsLoopback() || isBroadcast4(p.Src) || p.Src == p.Dst {
		return ReasonMalformed
	}
	for _, a := range e.local {
		if p.Dst == a {
			return ReasonMalformed
		}
	}
	if p.Dst.IsMulticast() || p.Dst.IsUnspecified() || isBroadcast4(p.Dst) || p.Dst.IsLoopback() {
		return ReasonUnsupported
	}
	return ReasonNone
}

func isBroadcast4(a netip.Addr) bool { return a.Is4() && a.As4() == [4]byte{255, 255, 255, 255} }

// logFlow writes the one log line of a new-flow decision.
func (e *Engine) logFlow(rs *Ruleset, act Action, ri int, key FlowKey, monitored bool, name string, from NameFrom, now int64) {
	ctx := context.Background()
	if !e.log.Enabled(ctx, slog.LevelInfo) {
		return
	}
	ok, suppressed := e.logLim.allow(now, e.policy.Load().limits.LogRate)
	if suppressed > 0 {
		e.logSuppressed(suppressed)
	}
	if !ok {
		return
	}
	attrs := make([]slog.Attr, 0, 9)
	attrs = append(attrs,
		slog.String("verdict", act.String()),
		slog.String("rule", rs.RuleName(ri)),
	)
	switch key.Proto {
	case ProtoTCP, ProtoUDP:
		proto := "tcp"
		if key.Proto == ProtoUDP {
			proto = "udp"
		}
		attrs = append(attrs,
			slog.String("proto", proto),
			slog.String("src", key.Src.String()),
			slog.String("dst", key.Dst.String()))
	default:
		attrs = append(attrs,
			slog.String("proto", "icmp"),
			slog.String("src", key.Src.Addr().String()),
			slog.String("dst", key.Dst.Addr().String()),
			slog.Int("id", int(key.Src.Port())))
	}
	if from != NameNone {
		attrs = append(attrs, slog.String("name", name), slog.String("name_from", from.String()))
	}
	if monitored {
		attrs = append(attrs, slog.Bool("monitor", true))
	}
	e.log.LogAttrs(ctx, slog.LevelInfo, "flow", attrs...)
}

// logSuppressed writes the summary of decision lines the rate limit kept
// out of the log.
func (e *Engine) logSuppressed(n uint64) {
	e.log.Warn("flow log lines suppressed by the rate limit", "suppressed", n, "log_rate", e.policy.Load().limits.LogRate)
}

// OutboundResult says what Outbound found for a packet the stack writes.
type OutboundResult uint8

// Outbound results.
const (
	// OutboundNoFlow: the packet matches no flow; the caller writes it
	// anyway (e.g. the stack's RST for a refused connection).
	OutboundNoFlow OutboundResult = iota
	// OutboundFlow: accounted to its flow; the caller writes it.
	OutboundFlow
	// OutboundSilenced: its flow was denied after its name was read
	// (Decide): deny is silence, so the caller drops the packet (the
	// stack's RST as it closes its side).
	OutboundSilenced
)

// Outbound accounts a packet the stack writes to the TUN (a reply to a
// client): it finds the flow by the reversed tuple and updates its TCP
// state, counters and last-seen time, and says whether to write it. It
// does not allocate.
func (e *Engine) Outbound(p *Packet, now int64) OutboundResult {
	var key FlowKey
	switch {
	case p.Proto == ProtoTCP || p.Proto == ProtoUDP:
		key = KeyOf(p).Reverse()
	case p.isICMP():
		if _, rep := p.icmpEcho(); !rep {
			return OutboundNoFlow
		}
		key = FlowKey{p.Proto, netip.AddrPortFrom(p.Dst, p.SrcPort), netip.AddrPortFrom(p.Src, 0)}
	default:
		return OutboundNoFlow
	}
	e.mu.Lock()
	f := e.flows[key]
	if f == nil {
		e.mu.Unlock()
		return OutboundNoFlow
	}
	if f.dec.Verdict == VerdictDrop {
		e.mu.Unlock()
		return OutboundSilenced
	}
	f.last = now
	f.pktsOut++
	f.bytesOut += uint64(p.Len)
	f.st.packets.Add(1)
	f.st.bytes.Add(uint64(p.Len))
	switch {
	case p.Proto != ProtoTCP:
		if f.state == stateNew {
			e.setStateLocked(f, stateEstablished) // a reply establishes UDP and ICMP flows
		}
	case f.state == stateNew && p.TCPFlags&(TCPSyn|TCPAck) == TCPSyn|TCPAck:
		// The destination answered and the stack completes the
		// client's handshake.
		e.setStateLocked(f, stateEstablished)
	case f.state == stateEstablished && p.TCPFlags&TCPFin != 0:
		// The destination closed its side. A RST from the stack
		// changes nothing here: the stack also sends one to answer
		// stray segments, and when it aborts a connection the relay
		// ends and releases the flow.
		e.setStateLocked(f, stateClosing)
	}
	e.mu.Unlock()
	e.ctr[ctrReplies].Add(1)
	e.ctr[ctrBytesOut].Add(uint64(p.Len))
	return OutboundFlow
}

// Recheck runs every existing flow through the current ruleset as if its
// first packet arrived now. Flows the rules now deny or reject (and that
// monitor mode would not let pass) take the new verdict, so their further
// packets are dropped, and are returned: the caller closes their
// connections. Flows still allowed keep their original verdict and rule.
//
// A cut TCP flow is closed and answers every later segment of its client
// with a RST taking its sequence number from the segment's acknowledgement
// (RFC 9293 3.10.7.3), so a client whose window is closed still accepts
// it; it leaves the table after tcp_closing.
//
// The rules run outside the table's lock, a batch of flows at a time.
func (e *Engine) Recheck() []FlowRef {
	rs := e.policy.Load().rules
	if rs.monitor {
		return nil // monitor mode lets every flow pass
	}
	var cut []FlowRef
	// The flows of a batch are named by their entry, not their identity:
	// the stack gives a flow a new identity whenever it sets up a
	// connection for it (Claim), which may happen while the rules run, and
	// that flow must be judged all the same.
	batch := make([]*flow, 0, walkBatch)
	type verdict struct {
		act Action
		ri  int
	}
	acts := make([]verdict, 0, walkBatch)
	names := make([]string, 0, walkBatch)
	for i := 0; ; {
		batch, acts, names = batch[:0], acts[:0], names[:0]
		e.mu.Lock()
		for ; i < len(e.slots) && len(batch) < walkBatch; i++ {
			// A flow waiting for its name is judged by the new rules
			// when Decide comes.
			if f := e.slots[i]; f != nil && f.dec.Verdict == VerdictForward && !f.dec.Peek {
				batch = append(batch, f)
				names = append(names, f.name)
			}
		}
		more := i < len(e.slots)
		e.mu.Unlock()
		yieldBatch(more)
		for j, f := range batch {
			p := f.key.firstPacket() // a flow's key never changes
			act, ri := rs.MatchName(&p, names[j])
			acts = append(acts, verdict{act, ri})
		}
		e.mu.Lock()
		for j, f := range batch {
			v := acts[j]
			if v.act == Allow || e.flows[f.key] != f || f.dec.Verdict != VerdictForward {
				continue
			}
			f.act, f.rs, f.st = v.act, rs, rs.counters(v.ri)
			f.dec = Decision{Verdict: VerdictDrop, Rule: v.ri, Reason: ReasonDenied}
			if v.act == Reject {
				f.dec.Verdict, f.dec.Reason = VerdictReject, ReasonRejected
			}
			if f.key.Proto == ProtoTCP {
				// Answer with resets whatever the rule says, so the
				// client learns its connection is gone.
				f.dec.Verdict = VerdictReject
				e.setStateLocked(f, stateClosed)
			}
			f.st.flows.Add(1)
			cut = append(cut, FlowRef{f.key, f.id}) // its identity now
		}
		e.mu.Unlock()
		if !more {
			break
		}
	}
	return cut
}

// BuildCutReset writes into out a RST for the client of a TCP flow that
// Recheck cut, with the sequence number the client acknowledged last, and
// returns its length; 0 if r is no such flow or no acknowledgement was
// seen. The stack's own reset carries its send sequence, which a client
// whose receive window is closed does not accept.
func (e *Engine) BuildCutReset(r FlowRef, out []byte) int {
	e.mu.Lock()
	f := e.flows[r.Key]
	ok := f != nil && f.id == r.ID && f.state == stateClosed && f.hasAck && r.Key.Proto == ProtoTCP
	var seq uint32
	if ok {
		seq = f.cliAck
	}
	e.mu.Unlock()
	if !ok {
		return 0
	}
	return buildReset(r.Key.Dst, r.Key.Src, seq, out)
}

// firstPacket rebuilds the header fields rules look at from a flow key.
func (k FlowKey) firstPacket() Packet {
	p := Packet{Proto: k.Proto, Src: k.Src.Addr(), Dst: k.Dst.Addr(), SrcPort: k.Src.Port(), DstPort: k.Dst.Port(), Version: 4}
	if p.Src.Is6() {
		p.Version = 6
	}
	switch k.Proto {
	case ProtoTCP:
		p.TCPFlags = TCPSyn
	case ProtoICMP:
		p.ICMPType = icmpv4EchoRequest
	case ProtoICMPv6:
		p.ICMPType = icmpv6EchoRequest
	}
	return p
}

// Claim gives the flow of key a new identity for the connection the stack
// sets up for it now, and returns it; 0 if there is no such flow. A
// connection is set up only when the stack holds none for the tuple, so
// whatever held the old identity (the relay of an earlier connection on
// the tuple, still ending) can no longer release the flow. The flow is
// in its handshake again until the stack answers. A flow allowed by the
// name an earlier connection carried waits for this connection's name
// again (Decision.Peek): the new one may name another host.
func (e *Engine) Claim(key FlowKey) FlowID {
	e.mu.Lock()
	defer e.mu.Unlock()
	f := e.flows[key]
	if f == nil || f.dec.Verdict != VerdictForward {
		return 0
	}
	e.lastID++
	f.id = e.lastID
	if f.decided {
		f.dec = Decision{Verdict: VerdictForward, Rule: NoRule, Peek: true}
		f.act, f.monitored, f.st = Allow, false, &e.peeking
		f.name, f.nameFrom, f.decided = "", NameNone, false
		e.ctr[ctrPeeked].Add(1)
	}
	e.setStateLocked(f, stateNew)
	return f.id
}

// flowID returns the identity of the flow of key, 0 if there is none.
func (e *Engine) flowID(key FlowKey) FlowID {
	e.mu.Lock()
	defer e.mu.Unlock()
	if f := e.flows[key]; f != nil {
		return f.id
	}
	return 0
}

// Release removes flow r when the stack has ended its connection (the
// relay ended both ways, or was reset, or the connection could not be set
// up), at monotonic time now, so a closed connection stops counting
// against max_flows and max_flows_per_source at once. It does nothing if
// the key now names another flow. A flow a recheck cut stays until
// tcp_closing, to answer its client with resets.
//
// A released TCP flow leaves a tombstone for tombTTL: the client's
// segments for it still reach the stack, which may be waiting for the ACK
// of its FIN. Tombstones count against no limit, are bounded in number
// (maxTombs, oldest dropped first) and are never judged again; a SYN on
// the tuple is a new flow.
func (e *Engine) Release(r FlowRef, now int64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	f := e.flows[r.Key]
	if f == nil || f.id != r.ID || f.dec.Verdict != VerdictForward {
		return
	}
	e.removeLocked(f)
	if r.Key.Proto == ProtoTCP {
		e.tombs.add(r.Key, f.id, f.dec.Rule, now+tombTTL)
	}
}

// Closing marks flow r closing when the stack has seen one direction of
// its connection end: the client's FIN was accepted (in window) or the
// destination closed. The flow then has the tcp_closing timeout, so a
// half-closed connection whose other side never closes does not stay for
// tcp_idle.
func (e *Engine) Closing(r FlowRef) {
	e.mu.Lock()
	if f := e.flows[r.Key]; f != nil && f.id == r.ID && f.state < stateClosing {
		e.setStateLocked(f, stateClosing)
	}
	e.mu.Unlock()
}

// Forget removes the flow k whatever its identity: for the read loop,
// which made the flow with the packet it handles (a SYN deferred, an echo
// request with no identifier left). Anything acting later uses Release,
// which cannot remove a newer flow reusing the key.
func (e *Engine) Forget(k FlowKey) {
	e.mu.Lock()
	if f := e.flows[k]; f != nil {
		e.removeLocked(f)
	}
	e.mu.Unlock()
}

// timeout returns how long a flow in state may stay idle.
func (e *Engine) timeout(to *Timeouts, proto uint8, state uint8) int64 {
	switch proto {
	case ProtoTCP:
		switch state {
		case stateNew:
			return int64(to.TCPHandshake)
		case stateEstablished:
			return int64(to.TCPIdle)
		}
		return int64(to.TCPClosing) // closing, or cut by a recheck
	case ProtoUDP:
		return int64(to.UDPIdle)
	}
	return int64(to.ICMPIdle)
}

// ExpireFlows removes the flows idle for longer than their state's timeout
// at monotonic time now (ns) and appends them to refs, so the caller can
// close what it still holds for them (a relay whose peer
// went silent). It walks the table walkBatch flows per hold of the lock,
// so the packet path never waits for a whole pass.
func (e *Engine) ExpireFlows(now int64, refs []FlowRef) []FlowRef {
	to := &e.policy.Load().limits.Timeouts
	for i := 0; ; {
		e.mu.Lock()
		end := min(i+walkBatch, len(e.slots))
		for ; i < end; i++ {
			f := e.slots[i]
			if f != nil && now-f.last > e.timeout(to, f.key.Proto, f.state) {
				refs = append(refs, FlowRef{f.key, f.id})
				e.removeLocked(f)
			}
		}
		more := i < len(e.slots)
		e.mu.Unlock()
		yieldBatch(more)
		if !more {
			break
		}
	}
	for more := true; more; yieldBatch(more) {
		e.mu.Lock()
		more = e.tombs.expire(now, walkBatch)
		e.mu.Unlock()
	}
	if s := e.logLim.flush(); s > 0 {
		e.logSuppressed(s)
	}
	return refs
}

// Counters returns a snapshot of the counters. The flow counts are kept as
// flows change, so it holds the table's lock only for a copy.
func (e *Engine) Counters() Counters {
	e.mu.Lock()
	active := len(e.flows)
	byState := e.byState
	e.mu.Unlock()
	m := make(map[string]int, len(stateNames))
	for i, n := range stateNames {
		m[n] = byState[i]
	}
	return Counters{
		FlowsByState: m,
		BytesIn:      e.ctr[ctrBytesIn].Load(),
		BytesOut:     e.ctr[ctrBytesOut].Load(),
		Forwarded:    e.ctr[ctrForwarded].Load(),
		Replies:      e.ctr[ctrReplies].Load(),
		Denied:       e.ctr[ReasonDenied].Load(),
		Rejected:     e.ctr[ReasonRejected].Load(),
		NoFlow:       e.ctr[ReasonNoFlow].Load(),
		Malformed:    e.ctr[ReasonMalformed].Load(),
		Fragment:     e.ctr[ReasonFragment].Load(),
		Unsupported:  e.ctr[ReasonUnsupported].Load(),
		Limit:        e.ctr[ReasonLimit].Load(),
		Deferred:     e.ctr[ReasonDeferred].Load(),
		Monitored:    e.ctr[ctrMonitored].Load(),
		FlowsCreated: e.ctr[ctrFlowsCreated].Load(),
		Peeked:       e.ctr[ctrPeeked].Load(),
		DNSBlocked:   e.ctr[ctrDNSBlocked].Load(),
		FlowsActive:  active,
	}
}
