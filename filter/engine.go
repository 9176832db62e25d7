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
	// MaxFlowsPerSource bounds the flows of one client address; 0: none.
	MaxFlowsPerSource int
	// LogRate bounds decision log lines per second; default 100.
	LogRate int
	// DialTimeout and MaxPendingDials are kept for the stack, which reads
	// them with Limits; defaults 30s and 1024.
	DialTimeout     time.Duration
	MaxPendingDials int
	// MaxPendingDialsPerSource is kept for the stack too; default 256.
	MaxPendingDialsPerSource int
	// LocalAddrs are the TUN's own addresses: a packet read from the TUN
	// that is addressed to one of them is dropped as malformed.
	LocalAddrs []netip.Addr
}

// Options returns the engine options that apply l, logging to log.
func (l EngineLimits) Options(log *slog.Logger) EngineOptions {
	return EngineOptions{
		Logger: log, MaxFlows: l.MaxFlows, MaxFlowsPerSource: l.MaxFlowsPerSource, LogRate: l.LogRate,
		TCPHandshake: l.TCPHandshake, TCPIdle: l.TCPIdle, TCPClosing: l.TCPClosing,
		UDPIdle: l.UDPIdle, ICMPIdle: l.ICMPIdle,
		DialTimeout: l.DialTimeout, MaxPendingDials: l.MaxPendingDials,
		MaxPendingDialsPerSource: l.MaxPendingDialsPerSource,
	}
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
	// FlowsByState counts active flows by state name (new, established,
	// closing, closed).
	FlowsByState map[string]int
	// Bytes carried by flows, client to destination and back.
	BytesIn, BytesOut uint64
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
}

// Counter slots: drop reasons count at their own index, ReasonNone's slot
// counts forwarded packets.
const ctrForwarded = int(ReasonNone)

const (
	ctrReplies = int(numReasons) + iota
	ctrMonitored
	ctrFlowsCreated
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
	rules  atomic.Pointer[Ruleset]
	limits atomic.Pointer[EngineLimits]
	log    *slog.Logger
	local  []netip.Addr // read-only after NewEngine
	ctr    [numCtrs]atomic.Uint64
	logLim logLimiter

	mu     sync.Mutex
	flows  map[FlowKey]*flow
	perSrc map[netip.Addr]int // flows per client address, for MaxFlowsPerSource
}

// NewEngine returns an Engine judging new flows with rs.
func NewEngine(rs *Ruleset, opts EngineOptions) *Engine {
	e := &Engine{
		log:    opts.Logger,
		local:  append([]netip.Addr(nil), opts.LocalAddrs...),
		flows:  make(map[FlowKey]*flow),
		perSrc: make(map[netip.Addr]int),
	}
	if e.log == nil {
		e.log = slog.Default()
	}
	e.SetLimits(EngineLimits{
		Timeouts: Timeouts{
			TCPHandshake: opts.TCPHandshake, TCPIdle: opts.TCPIdle, TCPClosing: opts.TCPClosing,
			UDPIdle: opts.UDPIdle, ICMPIdle: opts.ICMPIdle,
		},
		MaxFlows: opts.MaxFlows, MaxFlowsPerSource: opts.MaxFlowsPerSource, LogRate: opts.LogRate,
		DialTimeout: opts.DialTimeout, MaxPendingDials: opts.MaxPendingDials,
		MaxPendingDialsPerSource: opts.MaxPendingDialsPerSource,
	})
	e.rules.Store(rs)
	return e
}

// Swap installs a new ruleset for flows created from now on; existing flows
// keep their verdict (see Recheck). Rules of rs named like rules of the
// ruleset it replaces continue their statistics. rs must not have been
// given to another Engine.
func (e *Engine) Swap(rs *Ruleset) {
	rs.inheritStats(e.rules.Load())
	e.rules.Store(rs)
}

// Rules returns the current ruleset.
func (e *Engine) Rules() *Ruleset { return e.rules.Load() }

// SetLimits changes the flow table's limits and timeouts. Zero fields take
// their defaults. Existing flows are kept even if they exceed a new bound.
func (e *Engine) SetLimits(l EngineLimits) {
	l = l.withDefaults()
	e.limits.Store(&l)
}

// Limits returns the limits in force.
func (e *Engine) Limits() EngineLimits { return *e.limits.Load() }

// Timeouts returns the effective flow timeouts, so the stack can align its
// own (e.g. UDP socket) idle timeouts.
func (e *Engine) Timeouts() Timeouts { return e.limits.Load().Timeouts }

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
		f.st.packets.Add(1)
		f.st.bytes.Add(uint64(p.Len))
		if p.Proto == ProtoTCP {
			f.state = tcpStep(f.state, p.TCPFlags, false)
		}
		d := f.dec
		e.mu.Unlock()
		if d.Verdict == VerdictForward {
			e.ctr[ctrBytesIn].Add(uint64(p.Len))
		}
		return e.count(d)
	}
	lim := e.limits.Load()
	full := f == nil && (len(e.flows) >= lim.MaxFlows ||
		(lim.MaxFlowsPerSource > 0 && e.perSrc[p.Src] >= lim.MaxFlowsPerSource))
	e.mu.Unlock()

	if p.Proto == ProtoTCP && !syn {
		return e.count(Decision{VerdictDrop, NoRule, ReasonNoFlow})
	}
	if r := e.badAddresses(p); r != ReasonNone {
		return e.count(Decision{VerdictDrop, NoRule, r})
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
	st := rs.counters(ri)
	f := &flow{dec: d, act: act, monitored: monitored, rs: rs, st: st,
		first: now, last: now, pktsIn: 1, bytesIn: uint64(p.Len)}

	e.mu.Lock()
	// A new connection reusing a closed tuple replaces its flow.
	e.removeLocked(key)
	e.flows[key] = f
	e.perSrc[key.Src.Addr()]++
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
		e.logFlow(rs, act, ri, key, monitored, now)
	}
	return e.count(d)
}

// removeLocked deletes flow k; e.mu must be held.
func (e *Engine) removeLocked(k FlowKey) {
	if _, ok := e.flows[k]; !ok {
		return
	}
	delete(e.flows, k)
	a := k.Src.Addr()
	if e.perSrc[a]--; e.perSrc[a] <= 0 {
		delete(e.perSrc, a)
	}
}

// badAddresses checks the addresses of a new flow's first packet: a source
// no host sends from is malformed, and so is a packet to one of the TUN's
// own addresses (it travels the wrong way: the kernel delivers those
// locally); multicast and broadcast cannot be relayed through a connected
// socket and are unsupported.
func (e *Engine) badAddresses(p *Packet) DropReason {
	if p.Src.IsMulticast() || p.Src.IsUnspecified() || p.Src.IsLoopback() || isBroadcast4(p.Src) {
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
func (e *Engine) logFlow(rs *Ruleset, act Action, ri int, key FlowKey, monitored bool, now int64) {
	ctx := context.Background()
	if !e.log.Enabled(ctx, slog.LevelInfo) {
		return
	}
	ok, suppressed := e.logLim.allow(now, e.limits.Load().LogRate)
	if suppressed > 0 {
		e.logSuppressed(suppressed)
	}
	if !ok {
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

// logSuppressed writes the summary of decision lines the rate limit kept
// out of the log.
func (e *Engine) logSuppressed(n uint64) {
	e.log.Warn("flow log lines suppressed by the rate limit", "suppressed", n, "log_rate", e.limits.Load().LogRate)
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
	f.st.packets.Add(1)
	f.st.bytes.Add(uint64(p.Len))
	if p.Proto == ProtoTCP {
		f.state = tcpStep(f.state, p.TCPFlags, true)
	} else if f.state == stateNew {
		f.state = stateEstablished // a reply establishes UDP and ICMP flows
	}
	e.mu.Unlock()
	e.ctr[ctrReplies].Add(1)
	e.ctr[ctrBytesOut].Add(uint64(p.Len))
	return true
}

// Recheck runs every existing flow through the current ruleset as if its
// first packet arrived now. Flows the rules now deny or reject (and that
// monitor mode would not let pass) take the new verdict, so their further
// packets are dropped, and are returned: the caller closes their
// connections. Flows still allowed keep their original verdict and rule.
func (e *Engine) Recheck() []FlowKey {
	rs := e.rules.Load()
	var cut []FlowKey
	e.mu.Lock()
	defer e.mu.Unlock()
	for k, f := range e.flows {
		if f.dec.Verdict != VerdictForward {
			continue
		}
		p := k.firstPacket()
		act, ri := rs.Match(&p)
		if act == Allow || rs.monitor {
			continue
		}
		f.act, f.rs, f.st = act, rs, rs.counters(ri)
		f.dec = Decision{Verdict: VerdictDrop, Rule: ri, Reason: ReasonDenied}
		if act == Reject {
			f.dec.Verdict, f.dec.Reason = VerdictReject, ReasonRejected
		}
		f.st.flows.Add(1)
		cut = append(cut, k)
	}
	return cut
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

// Forget removes the flow k, e.g. when the stack closed it (dial failed,
// relay ended).
func (e *Engine) Forget(k FlowKey) {
	e.mu.Lock()
	e.removeLocked(k)
	e.mu.Unlock()
}

// timeout returns how long f may stay idle; closed TCP flows go on the
// next Expire.
func (e *Engine) timeout(to *Timeouts, proto uint8, state uint8) int64 {
	switch proto {
	case ProtoTCP:
		switch state {
		case stateNew:
			return int64(to.TCPHandshake)
		case stateEstablished:
			return int64(to.TCPIdle)
		case stateClosing:
			return int64(to.TCPClosing)
		}
		return -1
	case ProtoUDP:
		return int64(to.UDPIdle)
	}
	return int64(to.ICMPIdle)
}

// Expire removes the flows idle for longer than their state's timeout at
// monotonic time now (ns) and returns how many it removed.
func (e *Engine) Expire(now int64) int { return len(e.ExpireKeys(now, nil)) }

// ExpireKeys is Expire returning the removed flows' keys appended to keys,
// so the caller can close what it still holds for them (a relay whose
// peer went silent).
func (e *Engine) ExpireKeys(now int64, keys []FlowKey) []FlowKey {
	to := &e.limits.Load().Timeouts
	e.mu.Lock()
	for k, f := range e.flows {
		if now-f.last > e.timeout(to, k.Proto, f.state) {
			e.removeLocked(k)
			keys = append(keys, k)
		}
	}
	e.mu.Unlock()
	if s := e.logLim.flush(); s > 0 {
		e.logSuppressed(s)
	}
	return keys
}

// Counters returns a snapshot of the counters.
func (e *Engine) Counters() Counters {
	byState := make(map[string]int, len(stateNames))
	for _, n := range stateNames {
		byState[n] = 0
	}
	e.mu.Lock()
	active := len(e.flows)
	for _, f := range e.flows {
		byState[stateNames[f.state]]++
	}
	e.mu.Unlock()
	return Counters{
		FlowsByState: byState,
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
		Monitored:    e.ctr[ctrMonitored].Load(),
		FlowsCreated: e.ctr[ctrFlowsCreated].Load(),
		FlowsActive:  active,
	}
}
