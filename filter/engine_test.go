package filter

import (
	"bytes"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"
)

const sec = int64(time.Second)

func newTestEngine(t testing.TB, rules string, opts EngineOptions) (*Engine, *bytes.Buffer) {
	t.Helper()
	var buf bytes.Buffer
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{
			ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
				if a.Key == slog.TimeKey {
					return slog.Attr{}
				}
				return a
			},
		}))
	}
	return NewEngine(mustCompile(t, rules), opts), &buf
}

func in(e *Engine, x pk, now int64) Decision {
	p, _ := parsed(x)
	return e.Inbound(p, now)
}

func out(e *Engine, x pk, now int64) bool {
	p, _ := parsed(x)
	return e.Outbound(p, now) == OutboundFlow
}

func TestEngineFlowVerdictKept(t *testing.T) {
	e, logs := newTestEngine(t, `
[[rule]]
name = "no-ssh"
action = "deny"
dst_port = 22
`, EngineOptions{})
	syn := tcp("10.0.0.2", 40000, "1.1.1.1", 443, TCPSyn)
	ack := tcp("10.0.0.2", 40000, "1.1.1.1", 443, TCPAck)
	if d := in(e, syn, 0); d != (Decision{Verdict: VerdictForward, Rule: -1, Reason: ReasonNone}) {
		t.Fatalf("SYN: %+v", d)
	}
	// Swap to rules that deny everything: the flow keeps its verdict.
	e.Swap(mustCompile(t, "[filter]\ndefault = \"deny\"\n"))
	if d := in(e, ack, sec); d.Verdict != VerdictForward {
		t.Errorf("established after swap: %+v", d)
	}
	// A new flow sees the new rules.
	if d := in(e, tcp("10.0.0.2", 40001, "1.1.1.1", 443, TCPSyn), sec); d != (Decision{Verdict: VerdictDrop, Rule: -1, Reason: ReasonDenied}) {
		t.Errorf("new flow after swap: %+v", d)
	}
	if e.rules().Default() != Deny {
		t.Errorf("Rules() not swapped")
	}
	// A denied flow stays denied while its rules are in force: a SYN
	// retransmit follows its verdict, without running the rules.
	if d := in(e, tcp("10.0.0.2", 40001, "1.1.1.1", 443, TCPSyn), sec); d.Verdict != VerdictDrop {
		t.Errorf("SYN retransmit of denied flow: %+v", d)
	}
	// Once a reload replaced those rules, a SYN on it is judged afresh
	// (as nftables judges a dropped connection's retransmit by the new
	// ruleset): swap back to allow.
	e.Swap(mustCompile(t, ""))
	if d := in(e, tcp("10.0.0.2", 40001, "1.1.1.1", 443, TCPSyn), 2*sec); d.Verdict != VerdictForward {
		t.Errorf("SYN retransmit of a flow denied by the old rules: %+v", d)
	}
	// UDP: first datagram judged, later ones follow.
	e.Swap(mustCompile(t, "[[rule]]\naction = \"reject\"\nproto = \"udp\"\n"))
	u := udp("10.0.0.2", 5000, "8.8.8.8", 53)
	for i := range 3 {
		if d := in(e, u, 3*sec); d != (Decision{Verdict: VerdictReject, Rule: 0, Reason: ReasonRejected}) {
			t.Errorf("udp %d: %+v", i, d)
		}
	}
	c := e.Counters()
	if c.Forwarded != 3 || c.Denied != 2 || c.Rejected != 3 || c.FlowsCreated != 4 || c.FlowsActive != 3 {
		t.Errorf("counters: %+v", c)
	}
	// Log: one line per logged new-flow decision (deny level by default).
	lines := strings.Split(strings.TrimSpace(logs.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("log lines:\n%s", logs)
	}
	for i, want := range []string{
		`level=INFO msg=flow verdict=deny rule=default proto=tcp src=10.0.0.2:40001 dst=1.1.1.1:443`,
		`level=INFO msg=flow verdict=reject rule=rule-1 proto=udp src=10.0.0.2:5000 dst=8.8.8.8:53`,
	} {
		if lines[i] != want {
			t.Errorf("log %d:\n got %s\nwant %s", i, lines[i], want)
		}
	}
}

func TestEngineUnsupportedAndNoFlow(t *testing.T) {
	e, _ := newTestEngine(t, "", EngineOptions{})
	tests := []struct {
		name string
		p    pk
		want Decision
	}{
		{"tcp ack without flow", tcp("10.0.0.2", 1, "1.1.1.1", 80, TCPAck), Decision{Verdict: VerdictDrop, Rule: NoRule, Reason: ReasonNoFlow}},
		{"tcp syn-ack without flow", tcp("10.0.0.2", 1, "1.1.1.1", 80, TCPSyn|TCPAck), Decision{Verdict: VerdictDrop, Rule: NoRule, Reason: ReasonNoFlow}},
		{"gre", pk{src: "10.0.0.2", dst: "1.1.1.1", proto: 47}, Decision{Verdict: VerdictDrop, Rule: NoRule, Reason: ReasonUnsupported}},
		{"icmp unreachable", pk{src: "10.0.0.2", dst: "1.1.1.1", proto: ProtoICMP, icmpType: 3}, Decision{Verdict: VerdictDrop, Rule: NoRule, Reason: ReasonUnsupported}},
		{"icmp echo reply", pk{src: "10.0.0.2", dst: "1.1.1.1", proto: ProtoICMP, icmpType: 0}, Decision{Verdict: VerdictDrop, Rule: NoRule, Reason: ReasonUnsupported}},
		{"icmpv6 neighbor solicitation", pk{src: "fd00::2", dst: "fd00::1", proto: ProtoICMPv6, icmpType: 135}, Decision{Verdict: VerdictDrop, Rule: NoRule, Reason: ReasonUnsupported}},
		{"icmp echo", ping("10.0.0.2", "1.1.1.1", 9), Decision{Verdict: VerdictForward, Rule: -1, Reason: ReasonNone}},
		{"icmpv6 echo", ping("fd00::2", "2001:db8::1", 9), Decision{Verdict: VerdictForward, Rule: -1, Reason: ReasonNone}},
	}
	for _, tt := range tests {
		if d := in(e, tt.p, 0); d != tt.want {
			t.Errorf("%s: %+v, want %+v", tt.name, d, tt.want)
		}
	}
	e.Count(ReasonMalformed)
	e.Count(ParseErrorReason(ErrFragment))
	c := e.Counters()
	if c.NoFlow != 2 || c.Unsupported != 4 || c.Forwarded != 2 || c.Malformed != 1 || c.Fragment != 1 {
		t.Errorf("counters: %+v", c)
	}
	// Echo replies from the stack find the flow by the echo id.
	if !out(e, pk{src: "1.1.1.1", dst: "10.0.0.2", proto: ProtoICMP, icmpType: icmpv4EchoReply, sport: 9}, 0) {
		t.Errorf("echo reply matched no flow")
	}
	if out(e, pk{src: "1.1.1.1", dst: "10.0.0.2", proto: ProtoICMP, icmpType: icmpv4EchoReply, sport: 10}, 0) {
		t.Errorf("echo reply with other id matched")
	}
	if !out(e, pk{src: "2001:db8::1", dst: "fd00::2", proto: ProtoICMPv6, icmpType: icmpv6EchoReply, sport: 9}, 0) {
		t.Errorf("v6 echo reply matched no flow")
	}
}

func flowState(e *Engine, k FlowKey) (uint8, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	f := e.flows[k]
	if f == nil {
		return 0, false
	}
	return f.state, true
}

func TestEngineTCPStatesAndExpire(t *testing.T) {
	e, _ := newTestEngine(t, "", EngineOptions{Limits: EngineLimits{Timeouts: Timeouts{TCPHandshake: 10 * time.Second, TCPIdle: 100 * time.Second, TCPClosing: 20 * time.Second}}})
	cl, sv := "fd00::2", "2001:db8::80"
	key := FlowKey{ProtoTCP, netip.MustParseAddrPort("[fd00::2]:1000"), netip.MustParseAddrPort("[2001:db8::80]:80")}
	step := func(name string, got bool, wantState uint8) {
		t.Helper()
		if !got {
			t.Fatalf("%s: no flow", name)
		}
		if s, ok := flowState(e, key); !ok || s != wantState {
			t.Fatalf("%s: state %d (present %v), want %d", name, s, ok, wantState)
		}
	}
	step("syn", in(e, tcp(cl, 1000, sv, 80, TCPSyn), 0).Verdict == VerdictForward, stateNew)
	step("syn-ack", out(e, tcp(sv, 80, cl, 1000, TCPSyn|TCPAck), 1), stateEstablished)
	step("ack", in(e, tcp(cl, 1000, sv, 80, TCPAck), 2).Verdict == VerdictForward, stateEstablished)
	// Established: not expired before TCPIdle.
	if n := e.expire(50 * sec); n != 0 {
		t.Fatalf("expired %d established flows early", n)
	}
	step("data", out(e, tcp(sv, 80, cl, 1000, TCPAck|TCPPsh), 60*sec), stateEstablished)
	step("fin", out(e, tcp(sv, 80, cl, 1000, TCPFin|TCPAck), 61*sec), stateClosing)
	if n := e.expire(61*sec + 19*sec); n != 0 {
		t.Fatalf("closing flow expired early")
	}
	if n := e.expire(61*sec + 21*sec); n != 1 {
		t.Fatalf("closing flow not expired: %d", n)
	}
	if _, ok := flowState(e, key); ok {
		t.Fatal("flow still present")
	}
	// Handshake timeout.
	in(e, tcp(cl, 1000, sv, 80, TCPSyn), 100*sec)
	if e.expire(109*sec) != 0 || e.expire(111*sec) != 1 {
		t.Fatal("handshake timeout")
	}
	// A client's RST or FIN changes nothing: only the stack's segments
	// and the relay's end move a TCP flow on.
	in(e, tcp(cl, 1000, sv, 80, TCPSyn), 200*sec)
	out(e, tcp(sv, 80, cl, 1000, TCPSyn|TCPAck), 200*sec)
	step("client rst", in(e, tcp(cl, 1000, sv, 80, TCPRst), 201*sec).Verdict == VerdictForward, stateEstablished)
	step("client fin", in(e, tcp(cl, 1000, sv, 80, TCPFin|TCPAck), 201*sec).Verdict == VerdictForward, stateEstablished)
	step("stack rst", out(e, tcp(sv, 80, cl, 1000, TCPRst|TCPAck), 201*sec), stateEstablished)
	if n := e.expire(202 * sec); n != 0 {
		t.Fatalf("flow expired after forged flags: %d", n)
	}
	// A SYN on the live flow goes to the stack within the flow, even
	// after the rules changed.
	e.Swap(mustCompile(t, "[filter]\ndefault = \"reject\"\n"))
	if d := in(e, tcp(cl, 1000, sv, 80, TCPSyn), 202*sec); d.Verdict != VerdictForward {
		t.Fatalf("SYN on a live flow: %+v", d)
	}
	step("syn on live flow", true, stateEstablished)
	e.Forget(key)
	// UDP and ICMP idle, Forget.
	e.Swap(mustCompile(t, ""))
	in(e, udp("10.0.0.2", 1, "8.8.8.8", 53), 300*sec)
	in(e, ping("10.0.0.2", "8.8.8.8", 1), 300*sec)
	if n := e.expire(300*sec + 31*sec); n != 1 { // ICMP 30s
		t.Fatalf("icmp expire: %d", n)
	}
	out(e, udp("8.8.8.8", 53, "10.0.0.2", 1), 330*sec) // reply refreshes
	if n := e.expire(300*sec + 61*sec); n != 0 {
		t.Fatalf("udp expired despite reply: %d", n)
	}
	e.Forget(FlowKey{ProtoUDP, netip.MustParseAddrPort("10.0.0.2:1"), netip.MustParseAddrPort("8.8.8.8:53")})
	if c := e.Counters(); c.FlowsActive != 0 {
		t.Fatalf("active after Forget: %d", c.FlowsActive)
	}
	if to := e.Timeouts(); to.UDPIdle != time.Minute || to.TCPIdle != 100*time.Second {
		t.Errorf("Timeouts: %+v", to)
	}
}

func TestEngineMaxFlows(t *testing.T) {
	e, _ := newTestEngine(t, "", EngineOptions{Limits: EngineLimits{MaxFlows: 2}})
	in(e, udp("10.0.0.2", 1, "8.8.8.8", 53), 0)
	in(e, tcp("10.0.0.2", 2, "8.8.8.8", 53, TCPSyn), 0)
	if d := in(e, udp("10.0.0.2", 3, "8.8.8.8", 53), 0); d != (Decision{Verdict: VerdictReject, Rule: NoRule, Reason: ReasonLimit}) {
		t.Errorf("over limit: %+v", d)
	}
	// Existing flows are untouched.
	if d := in(e, udp("10.0.0.2", 1, "8.8.8.8", 53), 0); d.Verdict != VerdictForward {
		t.Errorf("existing flow: %+v", d)
	}
	if d := in(e, tcp("10.0.0.2", 2, "8.8.8.8", 53, TCPAck), 0); d.Verdict != VerdictForward {
		t.Errorf("existing tcp flow: %+v", d)
	}
	if c := e.Counters(); c.Limit != 1 || c.FlowsActive != 2 || c.FlowsCreated != 2 || c.Forwarded != 4 {
		t.Errorf("counters: %+v", c)
	}
}

func TestEngineMonitorAndLogLevels(t *testing.T) {
	rules := `
[filter]
mode = "monitor"
log = "%s"
[[rule]]
name = "no-dns"
action = "deny"
dst_port = 53
[[rule]]
name = "no-ping"
action = "reject"
proto = "icmp"
`
	for _, tc := range []struct {
		level string
		lines int
	}{{"none", 0}, {"deny", 2}, {"all", 3}} {
		e, logs := newTestEngine(t, strings.Replace(rules, "%s", tc.level, 1), EngineOptions{})
		for range 2 {
			if d := in(e, udp("10.0.0.2", 1, "8.8.8.8", 53), 0); d != (Decision{Verdict: VerdictForward, Rule: 0, Reason: ReasonNone}) {
				t.Errorf("monitored deny: %+v", d)
			}
			if d := in(e, ping("fd00::2", "2001:db8::1", 7), 0); d != (Decision{Verdict: VerdictForward, Rule: 1, Reason: ReasonNone}) {
				t.Errorf("monitored reject: %+v", d)
			}
			in(e, udp("10.0.0.2", 1, "8.8.8.8", 54), 0)
		}
		got := strings.Split(strings.TrimSpace(logs.String()), "\n")
		if logs.Len() == 0 {
			got = nil
		}
		if len(got) != tc.lines {
			t.Errorf("log=%s: %d lines:\n%s", tc.level, len(got), logs)
			continue
		}
		if tc.lines > 0 {
			for i, want := range []string{
				`level=INFO msg=flow verdict=deny rule=no-dns proto=udp src=10.0.0.2:1 dst=8.8.8.8:53 monitor=true`,
				`level=INFO msg=flow verdict=reject rule=no-ping proto=icmp src=fd00::2 dst=2001:db8::1 id=7 monitor=true`,
				`level=INFO msg=flow verdict=allow rule=default proto=udp src=10.0.0.2:1 dst=8.8.8.8:54`,
			}[:tc.lines] {
				if got[i] != want {
					t.Errorf("log=%s line %d:\n got %s\nwant %s", tc.level, i, got[i], want)
				}
			}
		}
		if c := e.Counters(); c.Monitored != 2 || c.Forwarded != 6 || c.Denied != 0 {
			t.Errorf("counters: %+v", c)
		}
	}
}

func TestEngineLogV6(t *testing.T) {
	e, logs := newTestEngine(t, "[filter]\ndefault = \"deny\"\n", EngineOptions{})
	in(e, tcp("fd00::2", 1, "2001:db8::1", 443, TCPSyn), 0)
	want := `level=INFO msg=flow verdict=deny rule=default proto=tcp src=[fd00::2]:1 dst=[2001:db8::1]:443` + "\n"
	if logs.String() != want {
		t.Errorf("got %s\nwant %s", logs, want)
	}
}

// Inbound from one goroutine, the rest from others: run with -race.
func TestEngineConcurrent(t *testing.T) {
	e, _ := newTestEngine(t, matchConfig, EngineOptions{Logger: quiet, Limits: EngineLimits{MaxFlows: 64}})
	done := make(chan struct{})
	for g := range 3 {
		go func() {
			defer func() { done <- struct{}{} }()
			for i := range 500 {
				out(e, udp("1.1.1.1", 53, "10.0.0.2", uint16(i%100+1)), int64(i))
				switch g {
				case 1:
					e.expire(int64(i) * sec)
				case 2:
					e.Forget(FlowKey{ProtoUDP, netip.AddrPortFrom(netip.MustParseAddr("10.0.0.2"), uint16(i%100+1)), netip.MustParseAddrPort("1.1.1.1:53")})
					e.Counters()
				}
			}
		}()
	}
	for i := range 2000 {
		in(e, udp("10.0.0.2", uint16(i%100+1), "1.1.1.1", 53), int64(i))
		if i%500 == 0 {
			e.Swap(mustCompile(t, ""))
		}
	}
	for range 3 {
		<-done
	}
	// Whatever the interleaving, the table's bookkeeping agrees with it.
	e.mu.Lock()
	defer e.mu.Unlock()
	states, perSrc := 0, 0
	for _, n := range e.byState {
		states += n
	}
	for _, n := range e.perSrc {
		if n <= 0 {
			t.Errorf("a source holds %d flows", n)
		}
		perSrc += n
	}
	if states != len(e.flows) || perSrc != len(e.flows) {
		t.Errorf("%d flows in the table, %d counted by state, %d by source", len(e.flows), states, perSrc)
	}
	if len(e.flows) > 64 {
		t.Errorf("%d flows, more than max_flows 64", len(e.flows))
	}
}

// TestApplyRulesAndLimitsTogether: a reload's rules and limits take effect
// at once. Policy A allows everything with room for many flows, policy B
// denies everything and is full at one flow, so under B every new flow is
// refused for the limit before the rules run. A packet judged by B's rules
// under A's limits (denied) could only come from a half-applied policy, as
// when the limits were stored before the rules.
func TestApplyRulesAndLimitsTogether(t *testing.T) {
	limA := EngineLimits{MaxFlows: 1 << 20}
	limB := EngineLimits{MaxFlows: 1}
	e := NewEngine(mustCompile(t, ""), EngineOptions{Logger: quiet, Limits: EngineLimits{MaxFlows: limA.MaxFlows}})
	in(e, udp("10.0.0.2", 1, "1.1.1.1", 53), 0) // the table is never empty
	const flips = 2000
	policies := make([]*Ruleset, flips)
	for i := range policies {
		if i%2 == 0 {
			policies[i] = mustCompile(t, "[filter]\ndefault = \"deny\"\n")
		} else {
			policies[i] = mustCompile(t, "")
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i, rs := range policies {
			if i%2 == 0 {
				e.Apply(rs, limB)
			} else {
				e.Apply(rs, limA)
			}
		}
	}()
	mixed := 0
	for i := 0; ; i++ {
		select {
		case <-done:
			if mixed > 0 {
				t.Errorf("%d of %d new flows were judged by one policy's rules under the other's limits", mixed, i)
			}
			return
		default:
		}
		d := in(e, udp("10.0.0.2", uint16(2+i%60000), "1.1.1.1", 53), 0)
		if d.Verdict != VerdictForward && d.Reason != ReasonLimit {
			mixed++
		}
	}
}

// TestFlowKeyOf: a client packet's key, its reverse (how replies carry
// it) and how it prints.
func TestFlowKeyOf(t *testing.T) {
	p, _ := parsed(tcp("10.0.0.2", 40000, "192.0.2.1", 443, TCPSyn))
	k := KeyOf(p)
	if k.String() != "tcp 10.0.0.2:40000 -> 192.0.2.1:443" || k.Reverse().Reverse() != k || k.Reverse().Src != k.Dst {
		t.Errorf("tcp key %v, reversed %v", k, k.Reverse())
	}
	p, _ = parsed(ping("fd00::2", "2001:db8::1", 7))
	if k := KeyOf(p); k.String() != "icmp fd00::2 id 7 -> 2001:db8::1" || k.Dst.Port() != 0 {
		t.Errorf("echo key %v", k)
	}
}

// TestRecheckCutsClaimedFlows: the stack gives a flow a new identity
// whenever it sets up a connection for it (Claim); a recheck running at
// the same time must still cut every flow the new rules deny. It skipped
// the flows claimed while the rules ran.
func TestRecheckCutsClaimedFlows(t *testing.T) {
	const flows = 2000
	e := NewEngine(mustCompile(t, ""), EngineOptions{Logger: quiet, Limits: EngineLimits{MaxFlows: 2 * flows}})
	keys := make([]FlowKey, flows)
	for i := range keys {
		p, _ := parsed(udp("10.0.0.2", uint16(1000+i), "192.0.2.1", 53))
		if d := e.Inbound(p, 0); d.Verdict != VerdictForward {
			t.Fatalf("flow %d: %v", i, d)
		}
		keys[i] = KeyOf(p)
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			e.Claim(keys[i%flows])
		}
	}()
	e.Apply(mustCompile(t, "[filter]\ndefault = \"deny\"\n"), e.Limits())
	cut := e.Recheck()
	close(stop)
	<-done
	if len(cut) != flows {
		t.Errorf("recheck cut %d of %d denied flows", len(cut), flows)
	}
}

// After a reload, a flow the old rules rejected is judged by the new ones
// at a new connection's SYN (a client reusing the tuple at once) or a UDP
// flow's next datagram; a TCP segment that starts nothing keeps the old
// verdict, and without a reload nothing is judged twice.
func TestEngineStaleDenialJudgedAfresh(t *testing.T) {
	e, _ := newTestEngine(t, "[filter]\ndefault = \"reject\"\n", EngineOptions{})
	syn := tcp("10.0.0.2", 40000, "1.1.1.1", 443, TCPSyn)
	ack := tcp("10.0.0.2", 40000, "1.1.1.1", 443, TCPAck)
	u := udp("10.0.0.2", 5000, "8.8.8.8", 53)
	for _, x := range []pk{syn, u} {
		if d := in(e, x, 0); d.Verdict != VerdictReject {
			t.Fatalf("first packet: %+v, want reject", d)
		}
	}
	created := e.Counters().FlowsCreated
	if d := in(e, syn, sec); d.Verdict != VerdictReject || e.Counters().FlowsCreated != created {
		t.Fatalf("SYN again under the same rules: %+v, flows created %d (want reject, %d)", d, e.Counters().FlowsCreated, created)
	}
	e.Swap(mustCompile(t, ""))
	if d := in(e, ack, 2*sec); d.Verdict != VerdictReject {
		t.Errorf("ACK on a flow rejected by the old rules: %+v, want the old verdict", d)
	}
	if d := in(e, syn, 2*sec); d.Verdict != VerdictForward {
		t.Errorf("SYN on a flow rejected by the old rules: %+v, want forward", d)
	}
	if d := in(e, u, 2*sec); d.Verdict != VerdictForward {
		t.Errorf("datagram of a flow rejected by the old rules: %+v, want forward", d)
	}
	if c := e.Counters(); c.FlowsCreated != created+2 || c.FlowsActive != 2 {
		t.Errorf("flows created %d, active %d; want %d and 2 (each replaced)", c.FlowsCreated, c.FlowsActive, created+2)
	}
}
