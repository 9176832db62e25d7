package filter

import (
	"context"
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
	ReasonLimit                         // flow table full (MaxFlows)
	numReasons
)

var reasonNames = [numReasons]string{"none", "denied", "rejected", "no-flow", "malformed", "fragment", "unsupported", "limit"}

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
}

// FlowKey identifies a flow as seen from the client (the TUN side). For
// ICMP echo, Src's port is the echo identifier and Dst's port is 0.
type FlowKey struct {
	Proto    uint8
	Src, Dst netip.AddrPort
}

// Timeouts are the idle timeouts of flows by protocol and TCP state.
type Timeouts struct {
	TCPHandshake time.Duration // SYN seen, no SYN-ACK yet
	TCPIdle      time.Duration // established
	TCPClosing   time.Duration // a FIN seen
	UDPIdle      time.Duration
	ICMPIdle     time.Duration
}

// EngineOptions configures NewEngine. Zero fields take their defaults.
type EngineOptions struct {
	Logger       *slog.Logger  // default slog.Default()
	MaxFlows     int           // default 262144
	TCPHandshake time.Duration // default 30s
	TCPIdle      time.Duration // default 2h
	TCPClosing   time.Duration // default 30s
	UDPIdle      time.Duration // default 60s
	ICMPIdle     time.Duration // default 30s
}

// Counters is a snapshot of the Engine's counters.
type Counters struct {
	Forwarded uint64 // inbound packets forwarded
	Replies   uint64 // outbound packets that matched a flow
	// Packets not forwarded, by reason.
	Denied, Rejected, NoFlow, Malformed, Fragment, Unsupported, Limit uint64
	Monitored                                                         uint64 // flows forwarded only because of monitor mode
	FlowsCreated                                                      uint64
	FlowsActive                                                       int
}

// TCP states of a flow. UDP and ICMP flows stay in stateNew.
const (
	stateNew uint8 = iota
	stateEstablished
	stateClosing
	stateClosed
)

// flow is one flow table entry, guarded by Engine.mu.
type flow struct {
	dec      Decision
	state    uint8
	last     int64 // monotonic ns of the last packet either way
	pktsIn   uint64
	pktsOut  uint64
	bytesIn  uint64
	bytesOut uint64
}

// Counter slots: drop reasons count at their own index, ReasonNone's slot
// counts forwarded packets.
const ctrForwarded = int(ReasonNone)

const (
	ctrReplies = int(numReasons) + iota
	ctrMonitored
	ctrFlowsCreated
	numCtrs
)

// Engine is the stateful filter: it judges each flow on its first packet
// with the current Ruleset and applies that verdict to the flow's later
// packets.
//
// Inbound must be called from one goroutine; the other methods are safe
// for concurrent use.
type Engine struct {
	rules    atomic.Pointer[Ruleset]
	log      *slog.Logger
	maxFlows int
	to       Timeouts
	ctr      [numCtrs]atomic.Uint64

	mu    sync.Mutex
	flows map[FlowKey]*flow
}

// NewEngine returns an Engine judging new flows with rs.
func NewEngine(rs *Ruleset, opts EngineOptions) *Engine {
	def := func(d *time.Duration, v time.Duration) time.Duration {
		if *d <= 0 {
			return v
		}
		return *d
	}
	e := &Engine{
		log:      opts.Logger,
		maxFlows: opts.MaxFlows,
		to: Timeouts{
			TCPHandshake: def(&opts.TCPHandshake, 30*time.Second),
			TCPIdle:      def(&opts.TCPIdle, 2*time.Hour),
			TCPClosing:   def(&opts.TCPClosing, 30*time.Second),
			UDPIdle:      def(&opts.UDPIdle, 60*time.Second),
			ICMPIdle:     def(&opts.ICMPIdle, 30*time.Second),
		},
		flows: make(map[FlowKey]*flow),
	}
	if e.log == nil {
		e.log = slog.Default()
	}
	if e.maxFlows <= 0 {
		e.maxFlows = 262144
	}
	e.rules.Store(rs)
	return e
}

// Swap installs a new ruleset for flows created from now on; existing flows
// keep their verdict.
func (e *Engine) Swap(rs *Ruleset) { e.rules.Store(rs) }

// Rules returns the current ruleset.
func (e *Engine) Rules() *Ruleset { return e.rules.Load() }

// Timeouts returns the effective flow timeouts, so the stack can align its
// own (e.g. UDP socket) idle timeouts.
func (e *Engine) Timeouts() Timeouts { return e.to }

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
func (e *Engine) Inbound(p *Packet, now int64) Decision {
	var key FlowKey
	syn := false
	switch {
	case p.Proto == ProtoTCP:
		key = FlowKey{p.Proto, netip.AddrPortFrom(p.Src, p.SrcPort), netip.AddrPortFrom(p.Dst, p.DstPort)}
		syn = p.TCPFlags&(TCPSyn|TCPAck|TCPRst) == TCPSyn
	case p.Proto == ProtoUDP:
		key = FlowKey{p.Proto, netip.AddrPortFrom(p.Src, p.SrcPort), netip.AddrPortFrom(p.Dst, p.DstPort)}
	case p.isICMP():
		if req, _ := p.icmpEcho(); !req {
			return e.count(Decision{VerdictDrop, NoRule, ReasonUnsupported})
		}
		key = FlowKey{p.Proto, netip.AddrPortFrom(p.Src, p.SrcPort), netip.AddrPortFrom(p.Dst, 0)}
	default:
		return e.count(Decision{VerdictDrop, NoRule, ReasonUnsupported})
	}

	e.mu.Lock()
	f := e.flows[key]
	// A SYN on a closing/closed flow is a new connection reusing the tuple:
	// judge it afresh.
	if f != nil && !(syn && f.state >= stateClosing) {
		f.last = now
		f.pktsIn++
		f.bytesIn += uint64(p.Len)
		if p.Proto == ProtoTCP {
			f.state = tcpStep(f.state, p.TCPFlags, false)
		}
		d := f.dec
		e.mu.Unlock()
		return e.count(d)
	}
	full := f == nil && len(e.flows) >= e.maxFlows
	e.mu.Unlock()

	if p.Proto == ProtoTCP && !syn {
		return e.count(Decision{VerdictDrop, NoRule, ReasonNoFlow})
	}
	if full { // fail fast, before running the rules
		return e.count(Decision{VerdictReject, NoRule, ReasonLimit})
	}
	return e.newFlow(key, p, now)
}

// newFlow runs the rules for the first packet of a flow and records the
// verdict. Only Inbound inserts flows, so the table cannot have grown since
// Inbound's check.
func (e *Engine) newFlow(key FlowKey, p *Packet, now int64) Decision {
	rs := e.rules.Load()
	act, ri := rs.Match(p)
	d := Decision{Verdict: VerdictForward, Rule: ri}
	switch act {
	case Deny:
		d.Verdict, d.Reason = VerdictDrop, ReasonDenied
	case Reject:
		d.Verdict, d.Reason = VerdictReject, ReasonRejected
	}
	monitored := rs.monitor && d.Verdict != VerdictForward
	if monitored {
		d.Verdict, d.Reason = VerdictForward, ReasonNone
	}
	f := &flow{dec: d, last: now, pktsIn: 1, bytesIn: uint64(p.Len)}

	e.mu.Lock()
	if _, ok := e.flows[key]; !ok && len(e.flows) >= e.maxFlows {
		e.mu.Unlock()
		return e.count(Decision{VerdictReject, NoRule, ReasonLimit})
	}
	e.flows[key] = f
	e.mu.Unlock()

	e.ctr[ctrFlowsCreated].Add(1)
	if monitored {
		e.ctr[ctrMonitored].Add(1)
	}
	if rs.log == LogAll || (rs.log == LogDeny && act != Allow) {
		e.logFlow(rs, act, ri, key, monitored)
	}
	return e.count(d)
}

// logFlow writes the one log line of a new-flow decision.
func (e *Engine) logFlow(rs *Ruleset, act Action, ri int, key FlowKey, monitored bool) {
	ctx := context.Background()
	if !e.log.Enabled(ctx, slog.LevelInfo) {
		return
	}
	attrs := make([]slog.Attr, 0, 7)
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
	if monitored {
		attrs = append(attrs, slog.Bool("monitor", true))
	}
	e.log.LogAttrs(ctx, slog.LevelInfo, "flow", attrs...)
}

// tcpStep advances a flow's TCP state for a segment with flags; outbound is
// true for segments from the stack to the client.
func tcpStep(state, flags uint8, outbound bool) uint8 {
	switch {
	case flags&TCPRst != 0:
		return stateClosed
	case state == stateClosed:
		return state
	case flags&TCPFin != 0:
		return stateClosing
	case outbound && state == stateNew && flags&(TCPSyn|TCPAck) == TCPSyn|TCPAck:
		return stateEstablished
	}
	return state
}

// Outbound accounts a packet the stack writes to the TUN (a reply to a
// client): it finds the flow by the reversed tuple and updates its TCP
// state, counters and last-seen time. It returns false if the packet
// matches no flow; the caller writes it anyway (e.g. the stack's RST for a
// refused connection). It does not allocate.
func (e *Engine) Outbound(p *Packet, now int64) bool {
	var key FlowKey
	switch {
	case p.Proto == ProtoTCP || p.Proto == ProtoUDP:
		key = FlowKey{p.Proto, netip.AddrPortFrom(p.Dst, p.DstPort), netip.AddrPortFrom(p.Src, p.SrcPort)}
	case p.isICMP():
		if _, rep := p.icmpEcho(); !rep {
			return false
		}
		key = FlowKey{p.Proto, netip.AddrPortFrom(p.Dst, p.SrcPort), netip.AddrPortFrom(p.Src, 0)}
	default:
		return false
	}
	e.mu.Lock()
	f := e.flows[key]
	if f == nil {
		e.mu.Unlock()
		return false
	}
	f.last = now
	f.pktsOut++
	f.bytesOut += uint64(p.Len)
	if p.Proto == ProtoTCP {
		f.state = tcpStep(f.state, p.TCPFlags, true)
	}
	e.mu.Unlock()
	e.ctr[ctrReplies].Add(1)
	return true
}

// Forget removes the flow k, e.g. when the stack closed it (dial failed,
// relay ended).
func (e *Engine) Forget(k FlowKey) {
	e.mu.Lock()
	delete(e.flows, k)
	e.mu.Unlock()
}

// timeout returns how long f may stay idle; closed TCP flows go on the
// next Expire.
func (e *Engine) timeout(proto uint8, state uint8) int64 {
	switch proto {
	case ProtoTCP:
		switch state {
		case stateNew:
			return int64(e.to.TCPHandshake)
		case stateEstablished:
			return int64(e.to.TCPIdle)
		case stateClosing:
			return int64(e.to.TCPClosing)
		}
		return -1
	case ProtoUDP:
		return int64(e.to.UDPIdle)
	}
	return int64(e.to.ICMPIdle)
}

// Expire removes the flows idle for longer than their state's timeout at
// monotonic time now (ns) and returns how many it removed.
func (e *Engine) Expire(now int64) int {
	n := 0
	e.mu.Lock()
	for k, f := range e.flows {
		if now-f.last > e.timeout(k.Proto, f.state) {
			delete(e.flows, k)
			n++
		}
	}
	e.mu.Unlock()
	return n
}

// Counters returns a snapshot of the counters.
func (e *Engine) Counters() Counters {
	e.mu.Lock()
	active := len(e.flows)
	e.mu.Unlock()
	return Counters{
		Forwarded:    e.ctr[ctrForwarded].Load(),
		Replies:      e.ctr[ctrReplies].Load(),
		Denied:       e.ctr[ReasonDenied].Load(),
		Rejected:     e.ctr[ReasonRejected].Load(),
		NoFlow:       e.ctr[ReasonNoFlow].Load(),
		Malformed:    e.ctr[ReasonMalformed].Load(),
		Fragment:     e.ctr[ReasonFragment].Load(),
		Unsupported:  e.ctr[ReasonUnsupported].Load(),
		Limit:        e.ctr[ReasonLimit].Load(),
		Monitored:    e.ctr[ctrMonitored].Load(),
		FlowsCreated: e.ctr[ctrFlowsCreated].Load(),
		FlowsActive:  active,
	}
}
