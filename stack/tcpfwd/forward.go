package tcpfwd

import (
	"context"
	"net/netip"
	"time"

	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/stack/internal/gaddr"
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
func (fw *Forwarder) handleTCP(r *tcp.ForwarderRequest) {
	growStack(0)
	id := r.ID()
	dst := netip.AddrPortFrom(gaddr.From(id.LocalAddress), id.LocalPort)
	src := netip.AddrPortFrom(gaddr.From(id.RemoteAddress), id.RemotePort)
	key := filter.FlowKey{Proto: filter.ProtoTCP, Src: src, Dst: dst}
	flow := filter.FlowRef{Key: key}
	defer fw.guard.Recover(&flow)
	// This connection's identity in the flow table: the relay releases
	// the flow by it, and so does every way out below that resets the
	// client, so a refused connection leaves the table at once. Where the
	// client is told nothing (dial timeout) the flow stays for its
	// retransmitted SYN until tcp_handshake.
	flow.ID = fw.h.Engine.Claim(key)
	if flow.ID == 0 {
		// The flow left the table (expired, released) before gVisor
		// handed its SYN over: no flow, no connection.
		r.Complete(true)
		return
	}
	if fw.h.Engine.HasNameRules() && fw.h.Engine.Peeking(flow) {
		fw.peekThenDial(r, flow) // peek.go
		return
	}
	lim := fw.DialLimits()
	// dial_timeout bounds one attempt; when it expires the client is told
	// nothing and its next SYN retransmission starts a new attempt. It is
	// read at each attempt, so that a reload changes it.
	timeout := lim.Timeout
	ctx, cancel := context.WithTimeout(fw.ctx, timeout)
	defer cancel()
	d := &pendingDial{key: key, id: flow.ID, cancel: cancel, released: make(chan struct{})}
	v := fw.dials.admit(d, lim.MaxPending, lim.MaxPendingPerSource)
	// Also after a panic, neither the slot nor the socket's release is
	// kept; deferred calls run last first.
	defer d.release()
	defer fw.dials.done(d)
	if v != nil {
		// The new socket is opened once the evicted one is closed.
		stopDial(v)
		waitReleased(ctx, v)
	}
	up, err := fw.h.Dialer.DialTCP(ctx, dst)
	if err != nil {
		if why := fw.dials.done(d); why != dialDone {
			fw.dialStopped(r, flow, why)
			return
		}
		// Refused: the client sees a RST. Anything else (timeout,
		// unreachable): it sees nothing, as it would on a real path, and
		// its next SYN retransmission tries again.
		reason := classifyDial(err)
		fw.dials.fails[reason].Add(1)
		if reason == dialFailRefused {
			fw.dials.destinationAnswered(dst.Addr(), fw.h.Now())
		}
		r.Complete(reason == dialFailRefused)
		if reason == dialFailRefused {
			fw.h.Engine.Release(flow, fw.h.Now())
		}
		fw.h.Log.Debug("dial failed", "proto", "tcp", "src", src, "dst", dst, "reason", dialFailNames[reason], "err", err)
		return
	}
	fw.dials.destinationAnswered(dst.Addr(), fw.h.Now())
	var wq waiter.Queue
	if !fw.dials.answered(d, &wq) {
		up.Close()
		fw.dialStopped(r, flow, fw.dials.done(d))
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
	why := fw.dials.done(d)
	if terr != nil {
		holdUp.Stop()
		up.Close()
		if why != dialDone {
			fw.dialStopped(r, flow, why)
			return
		}
		// The client gave up meanwhile, or its SYN was bad.
		r.Complete(true)
		fw.h.Engine.Release(flow, fw.h.Now())
		fw.h.Log.Debug("create endpoint", "src", src, "dst", dst, "err", terr)
		return
	}
	// A dial evicted or cancelled just as the handshake completed goes
	// on: the connection is up.
	if !holdUp.Stop() {
		// The client completed its handshake after the real
		// connection was given up: it gets a RST.
		r.Complete(false)
		ep.Abort()
		fw.h.Engine.Release(flow, fw.h.Now())
		fw.h.Log.Debug("client handshake too slow", "src", src, "dst", dst, "timeout", timeout)
		return
	}
	r.Complete(false)
	d.release() // the relay owns the socket now
	ep.SocketOptions().SetDelayOption(false)
	// The relay has no goroutine of its own while idle: this one pumps the
	// client's first bytes and ends when that direction is quiet.
	if fw.readsDNS(key) {
		fw.dnsRelay(flow, gonet.NewTCPConn(&wq, ep), ep, up)
		return
	}
	fw.startRelay(flow, &wq, ep, up)
}

// dialStopped ends the request of a dial that left the pool before it
// connected. The client is told nothing: its SYN retransmission starts
// over. An evicted dial's flow leaves the table with it, so a SYN flood
// holds no more flows than dials; a cancelled one's flow has left already.
func (fw *Forwarder) dialStopped(r *tcp.ForwarderRequest, flow filter.FlowRef, why dialEnd) {
	r.Complete(false)
	if why == dialEvicted {
		fw.dials.fails[dialFailEvicted].Add(1)
		fw.h.Engine.Count(filter.ReasonDeferred)
		fw.h.Engine.Release(flow, fw.h.Now())
		return
	}
	fw.dials.fails[dialFailCancelled].Add(1)
}

// screenSYNs wraps the TCP forwarder's packet handler, which gVisor calls on
// the read loop for each TCP segment no endpoint takes: a SYN the pool
// defers (dials.go) is dropped there, counted as deferred, and its flow
// leaves the table, before the forwarder starts a goroutine and a request
// for it. Under a SYN flood that is most of them. It allocates nothing.
func (fw *Forwarder) screenSYNs(fwd func(stack.TransportEndpointID, *stack.PacketBuffer) bool) func(stack.TransportEndpointID, *stack.PacketBuffer) bool {
	return func(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
		h := header.TCP(pkt.TransportHeader().Slice())
		if len(h) < header.TCPMinimumSize || h.Flags()&(header.TCPFlagSyn|header.TCPFlagAck) != header.TCPFlagSyn {
			return fwd(id, pkt)
		}
		key := filter.FlowKey{
			Proto: filter.ProtoTCP,
			Src:   netip.AddrPortFrom(gaddr.From(id.RemoteAddress), id.RemotePort),
			Dst:   netip.AddrPortFrom(gaddr.From(id.LocalAddress), id.LocalPort),
		}
		lim := fw.DialLimits()
		if !fw.dials.deferSYN(key, lim.MaxPending, lim.MaxPendingPerSource, fw.h.Now()) {
			return fwd(id, pkt)
		}
		fw.dials.fails[dialFailDeferred].Add(1)
		fw.h.Engine.Count(filter.ReasonDeferred)
		fw.h.Engine.Forget(key)
		return true
	}
}
