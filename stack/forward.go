package stack

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"runtime/debug"
	"time"

	"github.com/tunfw/tunfw/filter"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// maxInFlightDials is gVisor's own bound on TCP connection requests in
// flight; the configured [limits] max_pending_dials (at most this) is
// enforced in handleTCP, so that a reload can change it.
const maxInFlightDials = MaxPendingDialsCap

// handleTCP is called by gVisor's forwarder, in a goroutine of its own, for
// each SYN of a flow the filter allowed. The real destination is dialled
// first; the client's handshake completes only if it answers. From the SYN
// until the client's handshake completed the connection is pending, in the
// pool of dials (dials.go), which bounds what a SYN flood holds and lets a
// new SYN evict a dial nobody answered.
func (s *Stack) handleTCP(r *tcp.ForwarderRequest) {
	id := r.ID()
	dst := netip.AddrPortFrom(addrOf(id.LocalAddress), id.LocalPort)
	src := netip.AddrPortFrom(addrOf(id.RemoteAddress), id.RemotePort)
	key := filter.FlowKey{Proto: filter.ProtoTCP, Src: src, Dst: dst}
	flow := filter.FlowRef{Key: key}
	defer s.recoverFlow(&flow)
	// This connection's identity in the flow table: the relay releases
	// the flow by it, and so does every way out below that resets the
	// client, so a refused connection leaves the table at once. Where the
	// client is told nothing (dial timeout) the flow stays for its
	// retransmitted SYN until tcp_handshake.
	flow.ID = s.eng.Claim(key)
	if flow.ID == 0 {
		// The flow left the table (expired, released) before gVisor
		// handed its SYN over: no flow, no connection.
		r.Complete(true)
		return
	}
	lim := s.DialLimits()
	// dial_timeout bounds one attempt; when it expires the client is told
	// nothing and its next SYN retransmission starts a new attempt. It is
	// read at each attempt, so that a reload changes it.
	timeout := lim.Timeout
	ctx, cancel := context.WithTimeout(s.ctx, timeout)
	defer cancel()
	d := &pendingDial{key: key, id: flow.ID, cancel: cancel, released: make(chan struct{})}
	v := s.dials.admit(d, lim.MaxPending, lim.MaxPendingPerSource)
	// Also after a panic, neither the slot nor the socket's release is
	// kept; deferred calls run last first.
	defer d.release()
	defer s.dials.done(d)
	if v != nil {
		// The new socket is opened once the evicted one is closed.
		stopDial(v)
		waitReleased(ctx, v)
	}
	up, err := s.dialer.DialContext(ctx, "tcp", dst.String())
	if err != nil {
		if why := s.dials.done(d); why != dialDone {
			s.dialStopped(r, flow, why)
			return
		}
		// Refused: the client sees a RST. Anything else (timeout,
		// unreachable): it sees nothing, as it would on a real path, and
		// its next SYN retransmission tries again.
		reason := classifyDial(err)
		s.dials.fails[reason].Add(1)
		if reason == dialFailRefused {
			s.dials.destinationAnswered(dst.Addr(), s.now())
		}
		r.Complete(reason == dialFailRefused)
		if reason == dialFailRefused {
			s.eng.Release(flow, s.now())
		}
		s.log.Debug("dial failed", "proto", "tcp", "src", src, "dst", dst, "reason", dialFailNames[reason], "err", err)
		return
	}
	s.dials.destinationAnswered(dst.Addr(), s.now())
	var wq waiter.Queue
	if !s.dials.answered(d, &wq) {
		up.Close()
		s.dialStopped(r, flow, s.dials.done(d))
		return
	}
	// gVisor waits for the client's handshake for up to about two minutes
	// of SYN-ACK retransmissions (a spoofed SYN never completes): neither
	// the real connection nor that wait is held that long.
	holdUp := time.AfterFunc(timeout, func() {
		up.Close()
		wq.Notify(waiter.WritableEvents)
	})
	ep, terr := r.CreateEndpoint(&wq)
	why := s.dials.done(d)
	if terr != nil {
		holdUp.Stop()
		up.Close()
		if why != dialDone {
			s.dialStopped(r, flow, why)
			return
		}
		// The client gave up meanwhile, or its SYN was bad.
		r.Complete(true)
		s.eng.Release(flow, s.now())
		s.log.Debug("create endpoint", "src", src, "dst", dst, "err", terr)
		return
	}
	// A dial evicted or cancelled just as the handshake completed goes
	// on: the connection is up.
	if !holdUp.Stop() {
		// The client completed its handshake after the real
		// connection was given up: it gets a RST.
		r.Complete(false)
		ep.Abort()
		s.eng.Release(flow, s.now())
		s.log.Debug("client handshake too slow", "src", src, "dst", dst, "timeout", timeout)
		return
	}
	r.Complete(false)
	d.release() // the relay owns the socket now
	ep.SocketOptions().SetDelayOption(false)
	// The relay has no goroutine of its own while idle: this one pumps the
	// client's first bytes and ends when that direction is quiet.
	s.startRelay(flow, gonet.NewTCPConn(&wq, ep), &wq, ep, up.(*net.TCPConn))
}

// dialStopped ends the request of a dial that left the pool before it
// connected. The client is told nothing: its SYN retransmission starts
// over. An evicted dial's flow leaves the table with it, so a SYN flood
// holds no more flows than dials; a cancelled one's flow has left already.
func (s *Stack) dialStopped(r *tcp.ForwarderRequest, flow filter.FlowRef, why dialEnd) {
	r.Complete(false)
	if why == dialEvicted {
		s.dials.fails[dialFailEvicted].Add(1)
		s.eng.Count(filter.ReasonDeferred)
		s.eng.Release(flow, s.now())
		return
	}
	s.dials.fails[dialFailCancelled].Add(1)
}

// screenSYNs wraps the TCP forwarder's packet handler, which gVisor calls on
// the read loop for each TCP segment no endpoint takes: a SYN the pool
// defers (dials.go) is dropped there, counted as deferred, and its flow
// leaves the table, before the forwarder starts a goroutine and a request
// for it. Under a SYN flood that is most of them. It allocates nothing.
func (s *Stack) screenSYNs(fwd func(stack.TransportEndpointID, *stack.PacketBuffer) bool) func(stack.TransportEndpointID, *stack.PacketBuffer) bool {
	return func(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
		h := header.TCP(pkt.TransportHeader().Slice())
		if len(h) < header.TCPMinimumSize || h.Flags()&(header.TCPFlagSyn|header.TCPFlagAck) != header.TCPFlagSyn {
			return fwd(id, pkt)
		}
		key := filter.FlowKey{
			Proto: filter.ProtoTCP,
			Src:   netip.AddrPortFrom(addrOf(id.RemoteAddress), id.RemotePort),
			Dst:   netip.AddrPortFrom(addrOf(id.LocalAddress), id.LocalPort),
		}
		lim := s.DialLimits()
		if !s.dials.deferSYN(key, lim.MaxPending, lim.MaxPendingPerSource, s.now()) {
			return fwd(id, pkt)
		}
		s.dials.fails[dialFailDeferred].Add(1)
		s.eng.Count(filter.ReasonDeferred)
		s.eng.Forget(key)
		return true
	}
}

// addrOf converts a gVisor address without allocating (AsSlice would).
func addrOf(a tcpip.Address) netip.Addr {
	if a.Len() == 4 {
		return netip.AddrFrom4(a.As4())
	}
	return netip.AddrFrom16(a.As16())
}

// recoverFlow, deferred by a flow's handler before its relay exists, turns
// a panic into the end of that flow alone: it is logged with its stack and
// counted, and every other flow and the firewall go on. Once the relay
// runs, its pumps recover the same way and also close the flow.
// The flow is named by its identity (as far as the handler got), so that
// a newer flow on the tuple is left alone.
func (s *Stack) recoverFlow(flow *filter.FlowRef) {
	if r := recover(); r != nil {
		s.flowPanicked(*flow, r)
	}
}

func (s *Stack) flowPanicked(flow filter.FlowRef, r any) {
	s.panics.Add(1)
	s.log.Error("flow handler panicked; closing that flow", "flow", flow.Key.String(),
		"panic", fmt.Sprint(r), "stack", string(debug.Stack()))
	s.eng.Release(flow, s.now())
}

// tracked is how to close the relay of one flow.
type tracked struct {
	id    filter.FlowID // 0: whichever flow has the key
	close func()
}

// trackFlow records how to close the relay of flow r, for CloseFlows. A
// relay for the same key, ending, is replaced: it untracks only itself.
func (s *Stack) trackFlow(r filter.FlowRef, closeFn func()) {
	s.connMu.Lock()
	s.conns[r.Key] = tracked{r.ID, closeFn}
	s.connMu.Unlock()
}

// untrackFlow forgets the relay of flow r, unless a relay of a newer flow
// with the same key replaced it.
func (s *Stack) untrackFlow(r filter.FlowRef) {
	s.connMu.Lock()
	if t, ok := s.conns[r.Key]; ok && (r.ID == 0 || t.id == 0 || t.id == r.ID) {
		delete(s.conns, r.Key)
	}
	s.connMu.Unlock()
}

// CloseFlows ends the relays of the given flows, as when a reload's recheck
// cut them or they expired: a TCP client gets a RST, a UDP flow's socket is
// closed, a TCP connection still being set up is abandoned silently. A
// flow whose key now names a newer flow is left alone. For a TCP flow the
// recheck cut, the client first gets a RST with the sequence
// number it acknowledged last (the engine's BuildCutReset), which it
// accepts even when its receive window is closed; the stack's own RST, sent
// when the relay aborts, carries the stack's send sequence and would be
// ignored then. It returns how many relays it ended.
func (s *Stack) CloseFlows(refs []filter.FlowRef) int {
	s.dials.cancelFlows(refs)
	var fns []func()
	var rst []byte
	for _, r := range refs {
		if r.Key.Proto != filter.ProtoTCP {
			continue
		}
		if rst == nil {
			rst = make([]byte, tunOffset+header.IPv6MinimumSize+header.TCPMinimumSize)
		}
		if n := s.eng.BuildCutReset(r, rst[tunOffset:]); n > 0 {
			s.writeRaw(rst[:tunOffset+n])
		}
	}
	s.connMu.Lock()
	for _, r := range refs {
		if t, ok := s.conns[r.Key]; ok && (t.id == 0 || r.ID == 0 || t.id == r.ID) {
			fns = append(fns, t.close)
		}
	}
	s.connMu.Unlock()
	for _, fn := range fns {
		fn()
	}
	return len(fns)
}

// tcpipAddr converts a netip.Addr for gVisor.
// It does not allocate: the UDP relay calls it per packet.
func tcpipAddr(a netip.Addr) tcpip.Address {
	if a.Is4() {
		return tcpip.AddrFrom4(a.As4())
	}
	return tcpip.AddrFrom16(a.As16())
}

// SetOutboundInterfaces binds tunfw's new sockets to v4 and v6 from now
// on, when the default route moved (tun.FollowDefaultRoute); connections
// open keep theirs. The raw sockets that carry pings are bound anew.
func (s *Stack) SetOutboundInterfaces(v4, v6 string) {
	old4, old6 := s.dialer.Interfaces()
	s.dialer.SetInterfaces(v4, v6)
	if s.ping != nil && (v4 != old4 || v6 != old6) {
		if err := s.ping.Bind(v4, v6); err != nil {
			s.log.Warn("ping sockets keep their interface", "err", err)
		}
	}
}
