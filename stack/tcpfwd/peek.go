package tcpfwd

import (
	"context"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"time"

	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/inspect"
	"github.com/tunfw/tunfw/names"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// Peeks: a connection whose verdict depends on its name (filter's
// Decision.Peek) is not dialled first. Its handshake completes at once,
// its first bytes are read until the TLS server_name or HTTP Host is
// found (or [inspect] timeout or max_bytes), the engine decides, and only
// then is the destination dialled and sent the bytes read: a denied name
// is never dialled.

// peekStats counts the peeks of a Forwarder.
type peekStats struct {
	active                          atomic.Int32 // peeks in progress, within Inspect.MaxPending
	busy, timeouts, noName, invalid atomic.Uint64
	found                           [2]atomic.Uint64 // by source: sni, host
}

// PeekStats are the counters of connections read for their name.
type PeekStats struct {
	Active   int    `json:"active"`
	Busy     uint64 `json:"busy"`     // SYNs dropped (retransmitted) past max_pending
	Timeouts uint64 `json:"timeouts"` // no name within [inspect] timeout
	NoName   uint64 `json:"no_name"`  // the first bytes carried none (or max_bytes)
	Invalid  uint64 `json:"invalid"`  // a malformed ClientHello or request
	SNI      uint64 `json:"sni"`      // names read from a ClientHello
	Host     uint64 `json:"host"`     // names read from an HTTP Host header
}

// PeekStats returns the peek counters.
func (fw *Forwarder) PeekStats() PeekStats {
	p := &fw.peeks
	return PeekStats{Active: int(p.active.Load()), Busy: p.busy.Load(), Timeouts: p.timeouts.Load(),
		NoName: p.noName.Load(), Invalid: p.invalid.Load(), SNI: p.found[0].Load(), Host: p.found[1].Load()}
}

// peekThenDial serves a connection whose verdict waits for its name.
func (fw *Forwarder) peekThenDial(r *tcp.ForwarderRequest, flow filter.FlowRef) {
	o := fw.h.Inspect
	if int(fw.peeks.active.Add(1)) > o.MaxPending {
		// As a deferred SYN: nothing held, the retransmission tries again.
		fw.peeks.active.Add(-1)
		fw.peeks.busy.Add(1)
		r.Complete(false)
		fw.h.Engine.Count(filter.ReasonDeferred)
		fw.h.Engine.Release(flow, fw.h.Now())
		return
	}
	defer fw.peeks.active.Add(-1)
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		r.Complete(true)
		fw.h.Engine.Release(flow, fw.h.Now())
		return
	}
	r.Complete(false)
	ep.SocketOptions().SetDelayOption(false)
	client := gonet.NewTCPConn(&wq, ep)

	buf := make([]byte, o.MaxBytes)
	n, name, from, gone := fw.readName(client, buf, o.Timeout)
	if gone {
		// Reset (or broken) before it named anything: there is no
		// connection left to judge or to dial for.
		ep.Abort()
		fw.h.Engine.Release(flow, fw.h.Now())
		return
	}
	d := fw.h.Engine.Decide(flow, name, from, fw.h.Now())
	switch d.Verdict {
	case filter.VerdictDrop:
		// Deny is silence: the engine keeps what the stack sends as it
		// closes from the client (filter.OutboundSilenced), and drops
		// the client's packets until the flow expires.
		ep.Abort()
		return
	case filter.VerdictReject:
		ep.Abort() // a RST
		fw.h.Engine.Release(flow, fw.h.Now())
		return
	}
	lim := fw.DialLimits()
	ctx, cancel := context.WithTimeout(fw.ctx, lim.Timeout)
	up, err := fw.h.Dialer.DialTCP(ctx, flow.Key.Dst)
	cancel()
	if err != nil {
		// The client's handshake is complete: a destination that
		// refuses or never answers is a RST now.
		reason := classifyDial(err)
		fw.dials.fails[reason].Add(1)
		ep.Abort()
		fw.h.Engine.Release(flow, fw.h.Now())
		fw.h.Log.Debug("dial failed after peek", "src", flow.Key.Src, "dst", flow.Key.Dst, "reason", dialFailNames[reason], "err", err)
		return
	}
	if n > 0 {
		up.SetWriteDeadline(time.Now().Add(lim.Timeout))
		_, err := up.Write(buf[:n])
		up.SetWriteDeadline(time.Time{})
		if err != nil {
			up.Close()
			ep.Abort()
			fw.h.Engine.Release(flow, fw.h.Now())
			return
		}
	}
	fw.startRelay(flow, &wq, ep, up)
}

// readName reads the client's first bytes into buf until its name is
// found, the bytes can carry none, buf is full or timeout passes. It
// returns how many bytes it read and the name found, lowercased without a
// trailing dot (names.Lower). gone: the connection failed (a reset)
// before a name was found.
func (fw *Forwarder) readName(c *gonet.TCPConn, buf []byte, timeout time.Duration) (n int, name string, from filter.NameFrom, gone bool) {
	c.SetReadDeadline(time.Now().Add(timeout))
	defer c.SetReadDeadline(time.Time{})
	var scratch *[inspect.MaxHello]byte
	for n < len(buf) {
		m, err := c.Read(buf[n:])
		n += m
		if n > 0 {
			var name []byte
			var st inspect.Status
			from := filter.NameSNI
			if buf[0] == 0x16 {
				if scratch == nil {
					scratch = new([inspect.MaxHello]byte)
				}
				name, st = inspect.TLSServerName(buf[:n], scratch)
			} else {
				name, st = inspect.HTTPHost(buf[:n])
				from = filter.NameHost
			}
			switch st {
			case inspect.Found:
				fw.peeks.found[from-filter.NameSNI].Add(1)
				return n, names.Lower(name), from, false
			case inspect.NoName:
				fw.peeks.noName.Add(1)
				return n, "", filter.NameNone, false
			case inspect.Invalid:
				fw.peeks.invalid.Add(1)
				return n, "", filter.NameNone, false
			}
		}
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				fw.peeks.timeouts.Add(1)
				return n, "", filter.NameNone, false
			}
			// EOF: the client said all it had (judged on that);
			// anything else: it is gone.
			return n, "", filter.NameNone, !errors.Is(err, io.EOF)
		}
	}
	fw.peeks.noName.Add(1) // max_bytes without a name
	return n, "", filter.NameNone, false
}
