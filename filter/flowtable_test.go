package filter

import (
	"net/netip"
	"testing"
	"time"
)

func tcpKey(src string, sport uint16, dst string, dport uint16) FlowKey {
	return FlowKey{ProtoTCP, netip.AddrPortFrom(netip.MustParseAddr(src), sport), netip.AddrPortFrom(netip.MustParseAddr(dst), dport)}
}

// checkStateCounts compares the incremental counts with a recount of the table.
func checkStateCounts(t *testing.T, e *Engine) {
	t.Helper()
	e.mu.Lock()
	defer e.mu.Unlock()
	var by [numStates]int
	n := 0
	for _, f := range e.slots {
		if f != nil {
			by[f.state]++
			n++
		}
	}
	if n != len(e.flows) || by != e.byState {
		t.Fatalf("counts %v (%d flows), recount %v (%d slots)", e.byState, len(e.flows), by, n)
	}
}

// A released TCP flow leaves the table at once, so it counts against no
// limit, but the client's last segments still reach the stack for a
// while; a release naming an older identity does nothing.
func TestEngineReleaseTombstone(t *testing.T) {
	e, _ := newTestEngine(t, "", EngineOptions{Limits: EngineLimits{MaxFlowsPerSource: 10}})
	cl, sv := "10.0.0.2", "192.0.2.1"
	for i := range 1000 {
		now := int64(i) * int64(time.Millisecond)
		port := uint16(20000 + i%50) // tuples are reused
		if d := in(e, tcp(cl, port, sv, 80, TCPSyn), now); d.Verdict != VerdictForward {
			t.Fatalf("cycle %d: %+v", i, d)
		}
		k := tcpKey(cl, port, sv, 80)
		old := e.flowID(k)
		id := e.Claim(k)
		if id == 0 || id == old {
			t.Fatalf("claim: %d after %d", id, old)
		}
		e.Release(FlowRef{k, old}, now) // an earlier connection's relay ending
		if e.flowID(k) != id {
			t.Fatalf("release with an old identity removed the flow")
		}
		out(e, tcp(sv, 80, cl, port, TCPSyn|TCPAck), now)
		in(e, tcp(cl, port, sv, 80, TCPFin|TCPAck), now)
		out(e, tcp(sv, 80, cl, port, TCPFin|TCPAck), now)
		e.Release(FlowRef{k, id}, now)
		if d := in(e, tcp(cl, port, sv, 80, TCPAck), now); d.Verdict != VerdictForward {
			t.Fatalf("client's last ACK after release: %+v", d)
		}
	}
	checkStateCounts(t, e)
	if c := e.Counters(); c.FlowsActive != 0 || c.Limit != 0 {
		t.Fatalf("after 1000 closed connections: %d active, %d refused", c.FlowsActive, c.Limit)
	}
	if len(e.perSrc) != 0 {
		t.Fatalf("per-source counts left: %v", e.perSrc)
	}
	// Tombstones go after tombTTL, and are not counted anywhere.
	e.expire(int64(time.Second) + tombTTL + 1)
	if n := len(e.tombs.byKey); n != 0 {
		t.Fatalf("%d tombstones left", n)
	}
	if d := in(e, tcp(cl, 20000, sv, 80, TCPAck), 10*sec); d.Reason != ReasonNoFlow {
		t.Fatalf("ACK after the tombstone expired: %+v", d)
	}
	// A tombstone is never judged: a SYN on its tuple is a new flow.
	in(e, tcp(cl, 1, sv, 80, TCPSyn), 20*sec)
	k := tcpKey(cl, 1, sv, 80)
	id := e.flowID(k)
	e.Release(FlowRef{k, id}, 20*sec)
	e.Swap(mustCompile(t, "[filter]\ndefault = \"reject\"\n"))
	if d := in(e, tcp(cl, 1, sv, 80, TCPSyn), 20*sec); d.Verdict != VerdictReject {
		t.Fatalf("SYN on a tombstone: %+v", d)
	}
	if nid := e.flowID(k); nid == 0 || nid == id {
		t.Fatalf("new flow's identity %d, old %d", nid, id)
	}
}

func TestEngineTombstonesBounded(t *testing.T) {
	e, _ := newTestEngine(t, "", EngineOptions{Logger: quiet, Limits: EngineLimits{MaxFlows: 4 * maxTombs}})
	for i := range maxTombs + 100 {
		src := netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)})
		in(e, tcp(src.String(), 1, "192.0.2.1", 80, TCPSyn), 0)
		k := FlowKey{ProtoTCP, netip.AddrPortFrom(src, 1), netip.MustParseAddrPort("192.0.2.1:80")}
		e.Release(FlowRef{k, e.flowID(k)}, int64(i))
	}
	if n, q := len(e.tombs.byKey), len(e.tombs.q)-e.tombs.head; n != maxTombs || q != maxTombs {
		t.Fatalf("%d tombstones, %d queued; want %d", n, q, maxTombs)
	}
	// The oldest went first.
	if d := in(e, tcp("10.1.0.0", 1, "192.0.2.1", 80, TCPAck), 0); d.Reason != ReasonNoFlow {
		t.Fatalf("oldest tombstone kept: %+v", d)
	}
	checkStateCounts(t, e)
	// One expiry pass drops all that expired, however many.
	e.expire(tombTTL + maxTombs + 100)
	if n, q := len(e.tombs.byKey), len(e.tombs.q)-e.tombs.head; n != 0 || q != 0 {
		t.Fatalf("%d tombstones, %d queued after they all expired", n, q)
	}
}

// A cut TCP flow answers every segment with a RST the client accepts
// (sequence from the segment's ACK), whether the new rule denies or
// rejects, and its proactive reset carries the client's last ACK.
func TestEngineRecheckCutTCP(t *testing.T) {
	for _, action := range []string{"deny", "reject"} {
		t.Run(action, func(t *testing.T) {
			e, _ := newTestEngine(t, "", EngineOptions{Limits: EngineLimits{Timeouts: Timeouts{TCPClosing: 20 * time.Second}}})
			cl, sv := "10.0.0.2", "192.0.2.1"
			in(e, tcp(cl, 1000, sv, 80, TCPSyn), 0)
			k := tcpKey(cl, 1000, sv, 80)
			id := e.Claim(k)
			out(e, tcp(sv, 80, cl, 1000, TCPSyn|TCPAck), 0)
			a := tcp(cl, 1000, sv, 80, TCPAck)
			a.ack = 0x12345678
			in(e, a, 1)
			e.Swap(mustCompile(t, "[filter]\non_reload = \"recheck\"\ndefault = \""+action+"\"\n"))
			cut := e.Recheck()
			if len(cut) != 1 || cut[0] != (FlowRef{k, id}) {
				t.Fatalf("cut %v", cut)
			}
			buf := make([]byte, 100)
			n := e.BuildCutReset(cut[0], buf)
			var r Packet
			if n == 0 || ParsePacket(buf[:n], &r) != nil {
				t.Fatalf("cut reset: %d bytes", n)
			}
			if r.TCPFlags != TCPRst || r.TCPSeq != 0x12345678 || r.Src != k.Dst.Addr() || r.DstPort != 1000 {
				t.Fatalf("cut reset %+v", r)
			}
			// The relay's end does not remove it: it answers until
			// tcp_closing.
			e.Release(cut[0], 2)
			a.ack = 0x22222222
			p, pkt := parsed(a)
			d := e.Inbound(p, 3)
			if d.Verdict != VerdictReject {
				t.Fatalf("challenge ACK of a cut flow: %+v", d)
			}
			if n := BuildReject(p, pkt, buf); n == 0 || ParsePacket(buf[:n], &r) != nil || r.TCPSeq != 0x22222222 || r.TCPFlags&TCPRst == 0 {
				t.Fatalf("answer to a cut flow's segment: %+v", r)
			}
			if e.expire(19*sec) != 0 || e.expire(21*sec) != 1 {
				t.Fatal("cut flow not kept for tcp_closing")
			}
			checkStateCounts(t, e)
		})
	}
}

// A packet whose source is its destination ("land") is malformed.
func TestEngineLand(t *testing.T) {
	e, _ := newTestEngine(t, "", EngineOptions{})
	for _, x := range []pk{
		tcp("192.0.2.7", 80, "192.0.2.7", 80, TCPSyn),
		udp("2001:db8::7", 53, "2001:db8::7", 53),
		ping("192.0.2.7", "192.0.2.7", 1),
	} {
		if d := in(e, x, 0); d.Verdict != VerdictDrop || d.Reason != ReasonMalformed {
			t.Errorf("%s -> %s: %+v, want drop/malformed", x.src, x.dst, d)
		}
	}
	if c := e.Counters(); c.Malformed != 3 || c.FlowsActive != 0 {
		t.Errorf("counters %+v", c)
	}
}

// Walks in batches see every flow that stays in the table while others
// come and go between batches.
func TestEngineWalkUnderChurn(t *testing.T) {
	e, _ := newTestEngine(t, "", EngineOptions{Logger: quiet, Limits: EngineLimits{MaxFlows: 1 << 20}})
	const stable = 5 * walkBatch
	fillFlows(t, e, stable)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 20000 {
			src := netip.AddrFrom4([4]byte{10, 2, byte(i >> 8), byte(i)})
			in(e, tcp(src.String(), 1, "192.0.2.1", 80, TCPSyn), sec)
			if i >= 100 {
				o := netip.AddrFrom4([4]byte{10, 2, byte((i - 100) >> 8), byte(i - 100)})
				e.Forget(FlowKey{ProtoTCP, netip.AddrPortFrom(o, 1), netip.MustParseAddrPort("192.0.2.1:80")})
			}
		}
	}()
	for range 20 {
		n := 0
		for _, f := range e.Flows(sec) {
			if f.Src.Addr().As4()[1] >= 128 {
				n++
			}
		}
		if n != stable {
			t.Fatalf("listing saw %d of %d stable flows", n, stable)
		}
		if got := e.ExpireFlows(sec, nil); len(got) != 0 {
			t.Fatalf("expired %d", len(got))
		}
	}
	<-done
	checkStateCounts(t, e)
}

func TestEngineClosingByIdentity(t *testing.T) {
	e, _ := newTestEngine(t, "", EngineOptions{Limits: EngineLimits{Timeouts: Timeouts{TCPClosing: 2 * time.Second}}})
	in(e, tcp("10.0.0.2", 1, "192.0.2.1", 80, TCPSyn), 0)
	k := tcpKey("10.0.0.2", 1, "192.0.2.1", 80)
	id := e.Claim(k)
	out(e, tcp("192.0.2.1", 80, "10.0.0.2", 1, TCPSyn|TCPAck), 0)
	e.Closing(FlowRef{k, id - 1}) // an older connection's relay
	if s, _ := flowState(e, k); s != stateEstablished {
		t.Fatalf("state %d after Closing with an old identity", s)
	}
	e.Closing(FlowRef{k, id})
	if s, _ := flowState(e, k); s != stateClosing {
		t.Fatalf("state %d after Closing", s)
	}
	if e.expire(3*sec) != 1 {
		t.Fatal("half-closed flow not expired after tcp_closing")
	}
	checkStateCounts(t, e)
}
