package udpfwd

import (
	"net/netip"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/tunfw/tunfw/dns"
	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/inspect"
	"github.com/tunfw/tunfw/names"
	"github.com/tunfw/tunfw/stack/internal/tunio"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// Names: the UDP forwarder reads the DNS it relays (answers name their
// addresses; queries for blocked names are answered by tunfw) and, for a
// flow whose verdict depends on its name, holds the first datagrams until
// the QUIC Initial's server_name is read.

const dnsPort = 53

// DNS says how the forwarder reads the DNS traffic it relays.
type DNS struct {
	// Names learns, from the answers to each client, which names the
	// addresses in them have; nil: no snooping.
	Names *dns.Table
	// Block is tunfw's answer to a query that a rule by name blocks.
	Block dns.BlockMode
}

// nameStats counts what the forwarder did with names.
type nameStats struct {
	answered, learned                  atomic.Uint64 // DNS queries answered by tunfw; addresses named
	peekTimeouts, peekNoName, peekQUIC atomic.Uint64
	// peeking counts the flows held for their name, within
	// Inspect.MaxPending (with the TCP forwarder's, each its own);
	// peekBusy the flows turned away past it.
	peeking  atomic.Int32
	peekBusy atomic.Uint64
}

// NameStats are the UDP forwarder's counters about names.
type NameStats struct {
	DNSAnswered  uint64 `json:"dns_answered"`  // queries tunfw answered itself (blocked, or the DoH canary)
	NamesLearned uint64 `json:"names_learned"` // addresses named by DNS answers
	QUICNames    uint64 `json:"quic"`          // names read from QUIC Initials
	PeekTimeouts uint64 `json:"udp_peek_timeouts"`
	PeekNoName   uint64 `json:"udp_peek_no_name"` // held datagrams carried none (or max_bytes)
	PeekBusy     uint64 `json:"udp_peek_busy"`    // flows turned away past [inspect] max_pending
}

// NameStats returns the counters about names.
func (u *Forwarder) NameStats() NameStats {
	n := &u.names
	return NameStats{DNSAnswered: n.answered.Load(), NamesLearned: n.learned.Load(), QUICNames: n.peekQUIC.Load(),
		PeekTimeouts: n.peekTimeouts.Load(), PeekNoName: n.peekNoName.Load(), PeekBusy: n.peekBusy.Load()}
}

// answerQuery answers a client's DNS query itself when the engine says
// tunfw does (filter.Engine.AnswerQuery: a name a rule blocks, or the DoH
// canary), in a datagram from the resolver the client asked. It reports
// whether it took the query; the rest are forwarded unchanged.
func (u *Forwarder) answerQuery(p *filter.Packet, pkt []byte, now int64) bool {
	if !u.h.Engine.HasNameRules() {
		return false // AnswerQuery would say so too, but a buffer is taken first
	}
	payload := pkt[p.IPHeaderLen+header.UDPMinimumSize:][:p.PayloadLen]
	// The answer carries no IPv4 options or IPv6 extension headers.
	ipLen := filter.HeaderLen(p.Dst)
	bp := u.h.TUN.Buffer()
	defer u.h.TUN.Release(bp)
	off := tunio.Headroom + ipLen + header.UDPMinimumSize
	ans, answered := u.h.Engine.AnswerQuery(p.Src, payload, u.h.DNS.Block, (*bp)[off:off], now)
	if !answered {
		return false
	}
	u.names.answered.Add(1)
	if len(ans) == 0 || ipLen+header.UDPMinimumSize+len(ans) > u.h.MTU {
		return true // block = "drop", or a query tunfw cannot answer: still not forwarded
	}
	if unsafe.SliceData(ans) != &(*bp)[off] {
		copy((*bp)[off:], ans) // Answer grew its own buffer
	}
	reply, total := filter.BuildUDP((*bp)[tunio.Headroom:], netip.AddrPortFrom(p.Dst, p.DstPort), netip.AddrPortFrom(p.Src, p.SrcPort), len(ans))
	if total == 0 {
		return true
	}
	u.h.Engine.Outbound(&reply, now)
	u.h.TUN.Write([][]byte{(*bp)[:tunio.Headroom+total]})
	return true
}

// learnAnswer reads the DNS answer a flow's server sent its client and
// remembers which names the addresses in it have, for that client.
func (u *Forwarder) learnAnswer(f *udpFlow, msg []byte) {
	t := u.h.DNS.Names
	if t == nil {
		return
	}
	client, now := f.key.Src.Addr(), time.Now()
	dns.Learn(msg, func(name string, addr netip.Addr, ttl time.Duration) {
		t.Add(client, addr, name, ttl, now)
		u.names.learned.Add(1)
	})
}

// udpPeek holds the first datagrams of a flow whose verdict waits for its
// name, read from its QUIC Initial. Guarded by the flow's mu.
type udpPeek struct {
	q       inspect.QUICInitial
	held    [][]byte
	bytes   int
	timer   *time.Timer
	decided bool
}

// udpPeekHeld bounds the datagrams a peek holds (a ClientHello with a
// post-quantum key share takes two or three Initials).
const udpPeekHeld = 8

// peekUDP holds payload, a datagram of flow f whose verdict waits for its
// name, and decides once the name is read, can no longer be, or [inspect]
// timeout passes. It reports false once the flow is judged: the datagram
// then takes the usual way (the engine drops those of a denied flow
// before they get here).
func (u *Forwarder) peekUDP(f *udpFlow, payload []byte, now int64) bool {
	o := u.h.Inspect
	f.mu.Lock()
	ps := f.peek
	if ps.decided {
		f.mu.Unlock()
		return false
	}
	if len(ps.held) == udpPeekHeld || ps.bytes+len(payload) > o.MaxBytes {
		f.mu.Unlock()
		u.names.peekNoName.Add(1)
		u.decidePeek(f, "", filter.NameNone)
		return false
	}
	ps.held = append(ps.held, append([]byte(nil), payload...))
	ps.bytes += len(payload)
	name, st := ps.q.Add(payload)
	var n string
	if st == inspect.Found {
		n = names.Lower(name)
	}
	if st == inspect.NeedMore && ps.timer == nil {
		ps.timer = time.AfterFunc(o.Timeout, func() {
			u.names.peekTimeouts.Add(1)
			u.decidePeek(f, "", filter.NameNone)
		})
	}
	f.mu.Unlock()
	switch st {
	case inspect.Found:
		u.names.peekQUIC.Add(1)
		u.decidePeek(f, n, filter.NameQUIC)
	case inspect.NoName, inspect.Invalid:
		u.names.peekNoName.Add(1)
		u.decidePeek(f, "", filter.NameNone)
	}
	return true
}

// decidePeek asks the engine for the verdict of a peeked flow, once. An
// allowed flow's held datagrams go to the openers as a new flow's do; a
// denied or rejected one's are dropped (a rejected one's first answered
// with the ICMP error a datagram rejected on arrival gets) and the
// forwarder lets the flow go (the engine keeps it, dropping or rejecting
// its datagrams, until it expires).
func (u *Forwarder) decidePeek(f *udpFlow, name string, from filter.NameFrom) {
	f.mu.Lock()
	ps := f.peek
	if ps.decided {
		f.mu.Unlock()
		return
	}
	ps.decided = true
	u.names.peeking.Add(-1)
	if ps.timer != nil {
		ps.timer.Stop()
	}
	held := ps.held
	ps.held, ps.q = nil, inspect.QUICInitial{}
	f.mu.Unlock()
	now := u.h.Now()
	d := u.h.Engine.Decide(f.ref, name, from, now)
	if d.Verdict == filter.VerdictForward {
		f.mu.Lock()
		if !f.closed {
			f.held, f.heldBytes = held, ps.bytes
		}
		f.mu.Unlock()
		if u.queueOpen(f) {
			return
		}
		u.lim.openBusy.Add(1)
	}
	if d.Verdict == filter.VerdictReject && len(held) > 0 {
		u.refuseHeld(f.ref.Key, held[0])
	}
	f.mu.Lock()
	byTable := f.closed
	f.closed, f.held, f.heldBytes = true, nil, 0
	f.mu.Unlock()
	u.mu.Lock()
	u.removeUDPLocked(f)
	u.mu.Unlock()
	u.tracker.Untrack(f.ref)
	if d.Verdict == filter.VerdictForward && !byTable {
		u.h.Engine.Release(f.ref, now) // allowed, but no room to open it
	}
}

// refuseHeld answers the first datagram a flow held for its name, now that
// the name is rejected, as the stack answers a datagram rejected on
// arrival (filter.BuildReject: ICMP port unreachable), so that the client
// is refused at once rather than at its next datagram. The datagram's
// headers are rebuilt from the flow's key: the error quotes only them and
// the first bytes of the payload.
func (u *Forwarder) refuseHeld(key filter.FlowKey, payload []byte) {
	quote := payload[:min(len(payload), maxQuoted)]
	orig := make([]byte, filter.HeaderLen(key.Src.Addr())+header.UDPMinimumSize+len(quote))
	copy(orig[len(orig)-len(quote):], quote)
	p, n := filter.BuildUDP(orig, key.Src, key.Dst, len(quote))
	if n == 0 {
		return
	}
	bp := u.h.TUN.Buffer()
	defer u.h.TUN.Release(bp)
	if m := filter.BuildReject(&p, orig[:n], (*bp)[tunio.Headroom:]); m > 0 {
		u.h.TUN.Write([][]byte{(*bp)[:tunio.Headroom+m]})
	}
}

// maxQuoted is more of a datagram than an ICMPv6 error quotes (1280 bytes
// with its own headers).
const maxQuoted = 1280
