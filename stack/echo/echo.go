// Package echo forwards the ICMP echo requests the filter allows to the
// real hosts through raw sockets, and relays their real replies.
package echo

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/tunfw/tunfw/filter"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// icmpFilter is Linux's ICMP_FILTER option of SOL_RAW (not in x/sys).
const icmpFilter = 1

// Forwarder forwards allowed ICMP echo requests to the real hosts through raw
// sockets and relays their real replies. Each flow's echo identifier is
// replaced by one unique to tunfw, so that clients using the same identifier
// towards the same host, and pings from other programs, are told apart.
//
// Raw sockets need CAP_NET_RAW but no ping_group_range, which network
// namespaces start with closed.
//
// The identifiers tunfw sends are one space for all destinations, as the
// kernel's own ping sockets have it: an identifier is an index into ents
// (XOR a random salt), taken from a free list and given back when its flow
// has been idle for icmp_idle. When none is free, the flow idle longest
// gives its identifier up if it has been idle for echoEvictAge: a flood of
// new identifiers, from however many sources, cycles through the space
// while a ping that sends every second keeps its own. Taking, finding and
// giving back are O(1), so the read loop never searches: an echo request
// that finds no identifier, or whose client already holds its share, is
// dropped and counted.
type Forwarder struct {
	h          Host
	wg         sync.WaitGroup // the reply readers
	c4, c6     *net.IPConn
	raw4, raw6 syscall.RawConn

	// The read loop's send and its arguments, set up once so that a send
	// allocates nothing.
	sendFn  func(fd uintptr) bool
	sendMsg []byte
	sendTo  unix.Sockaddr
	sa4     unix.SockaddrInet4
	sa6     unix.SockaddrInet6
	sendErr error

	salt uint16

	mu     sync.Mutex
	byFlow map[pingFlow]uint16 // client flow -> index into ents
	ents   []pingEntry         // grows up to maxEchoIDs
	free   []uint16            // indexes of unused ents
	// head and tail of the entries in use, least recently used first,
	// so expiry looks only at what expires; -1 when empty.
	head, tail int32
	perSrc     map[netip.Addr]int32

	// Drops: no identifier left, the client's share used up, the raw
	// socket's buffer full (or another send error).
	noID, srcLimit, sendDrops atomic.Uint64
}

// maxEchoIDs is the number of echo identifiers.
const maxEchoIDs = 1 << 16

// echoEvictAge is how long a flow must have been idle before a new flow
// may take its identifier when none is free: longer than ping's usual
// interval.
const echoEvictAge = int64(2 * time.Second)

// DefaultMaxPerSource bounds the echo flows of one client address: a ping
// sweep of a /22 fits; one client cannot take every identifier.
const DefaultMaxPerSource = 1024

// pingFlow names an echo flow as the client sees it.
type pingFlow struct {
	src, dst netip.Addr
	id       uint16
}

type pingEntry struct {
	flow       pingFlow
	last       int64 // engine clock of the last request
	prev, next int32 // LRU links, -1 at the ends
	used       bool
}

// Host is what a Forwarder needs from the stack that runs it.
type Host struct {
	Engine *filter.Engine
	Log    *slog.Logger
	// Now is the engine's monotonic clock.
	Now func() int64
	// MTU is the TUN's; replies larger than it are not relayed.
	MTU int
	// Write writes a reply to the TUN: the packet starts Headroom bytes
	// into the buffer, which Write may use.
	Write    func(buf []byte)
	Headroom int
	// Control sets up each raw socket before use (fwmark, bound device).
	Control func(network, address string, c syscall.RawConn) error
	// MaxPerSource returns how many echo flows one client address may
	// hold now.
	MaxPerSource func() int
}

// New opens the raw sockets (one per family; one is enough) and starts
// reading replies. Close ends it.
func New(h Host) (*Forwarder, error) {
	p := &Forwarder{
		h:      h,
		byFlow: make(map[pingFlow]uint16),
		perSrc: make(map[netip.Addr]int32),
		head:   -1,
		tail:   -1,
		salt:   uint16(rand.Uint32()),
	}
	p.sendFn = func(fd uintptr) bool {
		p.sendErr = unix.Sendto(int(fd), p.sendMsg, unix.MSG_DONTWAIT, p.sendTo)
		return true // never wait: a full buffer drops the request
	}
	lc := net.ListenConfig{Control: h.Control}
	c4, err4 := lc.ListenPacket(context.Background(), "ip4:icmp", "0.0.0.0")
	if err4 == nil {
		p.c4 = c4.(*net.IPConn)
		err4 = setICMPFilter(p.c4, false)
		if err4 == nil {
			p.raw4, err4 = p.c4.SyscallConn()
		}
	}
	c6, err6 := lc.ListenPacket(context.Background(), "ip6:ipv6-icmp", "::")
	if err6 == nil {
		p.c6 = c6.(*net.IPConn)
		err6 = setICMPFilter(p.c6, true)
		if err6 == nil {
			p.raw6, err6 = p.c6.SyscallConn()
		}
	}
	if p.raw4 == nil && p.raw6 == nil {
		p.Close()
		return nil, fmt.Errorf("open raw ICMP sockets: %w", errors.Join(err4, err6))
	}
	if err4 != nil || err6 != nil {
		h.Log.Warn("ICMP echo forwarding limited to one family", "err", errors.Join(err4, err6))
	}
	for _, c := range []*net.IPConn{p.c4, p.c6} {
		if c != nil {
			p.wg.Add(1)
			go p.readLoop(c)
		}
	}
	return p, nil
}

// setICMPFilter makes the kernel pass only echo replies to the socket, so the
// read loop is not woken by every other ICMP message the host receives.
func setICMPFilter(c *net.IPConn, v6 bool) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		if v6 {
			var f unix.ICMPv6Filter
			for i := range f.Data {
				f.Data[i] = 0xffffffff
			}
			t := header.ICMPv6EchoReply
			f.Data[t>>5] &^= 1 << (uint32(t) & 31)
			serr = unix.SetsockoptICMPv6Filter(int(fd), unix.SOL_ICMPV6, unix.ICMPV6_FILTER, &f)
			return
		}
		serr = unix.SetsockoptInt(int(fd), unix.SOL_RAW, icmpFilter, ^(1 << int(header.ICMPv4EchoReply)))
	})
	return errors.Join(err, serr)
}

// Send forwards the echo request pkt (parsed as p) to its real destination.
// It runs on the read loop and never waits: not for an identifier, not for
// the socket.
func (pg *Forwarder) Send(p *filter.Packet, pkt []byte) {
	raw := pg.raw4
	if p.Version == 6 {
		raw = pg.raw6
	}
	if raw == nil {
		return
	}
	msg := pkt[p.IPHeaderLen:p.Len]
	if len(msg) < 8 {
		return
	}
	flow := pingFlow{src: p.Src, dst: p.Dst, id: p.SrcPort}
	now := pg.h.Now()
	pg.mu.Lock()
	i, ok := pg.byFlow[flow]
	if ok {
		pg.touchLocked(int32(i), now)
	} else if i, ok = pg.openLocked(flow, now); !ok {
		pg.mu.Unlock()
		// A flow the stack cannot carry leaves the table: it holds
		// nothing and counts against no limit; its next request
		// tries again.
		pg.h.Engine.Forget(filter.KeyOf(p))
		return
	}
	pg.mu.Unlock()

	// Rewrite the identifier in place: pkt is the read loop's buffer and is
	// not used again after this packet.
	binary.BigEndian.PutUint16(msg[4:6], i^pg.salt)
	msg[2], msg[3] = 0, 0
	if p.Version == 4 {
		binary.BigEndian.PutUint16(msg[2:4], ^checksum.Checksum(msg, 0))
		pg.sa4.Addr = p.Dst.As4()
		pg.sendTo = &pg.sa4
	} else { // the kernel computes the checksum of raw ICMPv6 sockets
		pg.sa6.Addr = p.Dst.As16()
		pg.sendTo = &pg.sa6
	}
	pg.sendMsg = msg
	if err := raw.Write(pg.sendFn); err != nil || pg.sendErr != nil {
		pg.sendDrops.Add(1)
	}
	pg.sendMsg = nil
}

// openLocked gives flow an identifier, or counts why it gets none.
func (pg *Forwarder) openLocked(flow pingFlow, now int64) (uint16, bool) {
	if int(pg.perSrc[flow.src]) >= pg.h.MaxPerSource() {
		pg.srcLimit.Add(1)
		return 0, false
	}
	var i uint16
	switch n := len(pg.free); {
	case n > 0:
		i = pg.free[n-1]
		pg.free = pg.free[:n-1]
	case len(pg.ents) < maxEchoIDs:
		i = uint16(len(pg.ents))
		pg.ents = append(pg.ents, pingEntry{})
	case now-pg.ents[pg.head].last >= echoEvictAge: // all in use: the list is not empty
		i = uint16(pg.head)
		pg.releaseLocked(pg.head)
		pg.free = pg.free[:len(pg.free)-1] // taken back at once
	default:
		pg.noID.Add(1)
		return 0, false
	}
	pg.ents[i] = pingEntry{flow: flow, last: now, prev: pg.tail, next: -1, used: true}
	if pg.tail >= 0 {
		pg.ents[pg.tail].next = int32(i)
	} else {
		pg.head = int32(i)
	}
	pg.tail = int32(i)
	pg.byFlow[flow] = i
	pg.perSrc[flow.src]++
	return i, true
}

// touchLocked marks entry i used now: it moves to the tail.
func (pg *Forwarder) touchLocked(i int32, now int64) {
	e := &pg.ents[i]
	e.last = now
	if pg.tail == i {
		return
	}
	pg.unlinkLocked(i)
	e.prev, e.next = pg.tail, -1
	pg.ents[pg.tail].next = i // the list holds another entry: tail >= 0
	pg.tail = i
	if pg.head < 0 {
		pg.head = i
	}
}

func (pg *Forwarder) unlinkLocked(i int32) {
	e := &pg.ents[i]
	if e.prev >= 0 {
		pg.ents[e.prev].next = e.next
	} else {
		pg.head = e.next
	}
	if e.next >= 0 {
		pg.ents[e.next].prev = e.prev
	} else {
		pg.tail = e.prev
	}
	e.prev, e.next = -1, -1
}

// releaseLocked gives entry i's identifier back.
func (pg *Forwarder) releaseLocked(i int32) {
	e := &pg.ents[i]
	pg.unlinkLocked(i)
	delete(pg.byFlow, e.flow)
	if pg.perSrc[e.flow.src]--; pg.perSrc[e.flow.src] <= 0 {
		delete(pg.perSrc, e.flow.src)
	}
	*e = pingEntry{prev: -1, next: -1}
	pg.free = append(pg.free, uint16(i))
}

func (pg *Forwarder) readLoop(c *net.IPConn) {
	defer pg.wg.Done()
	rc, err := c.SyscallConn()
	if err != nil {
		pg.h.Log.Warn("echo replies: raw socket", "err", err)
		return
	}
	r := replyReader{buf: make([]byte, 65535), v4: c == pg.c4}
	r.read = r.readFd
	out := make([]byte, pg.h.Headroom+pg.h.MTU)
	for {
		if err := rc.Read(r.read); err != nil {
			return // closed
		}
		if r.err != nil {
			pg.h.Log.Debug("read echo reply", "err", r.err)
			continue
		}
		if len(r.msg) < 8 || !r.from.IsValid() {
			continue
		}
		pg.reply(r.from, r.msg, out)
	}
}

// replyReader reads one ICMP message and its sender from a raw socket
// without allocating (net.IPConn.ReadFrom allocates the sender's address
// at every read): read is made once, for RawConn.Read, which waits in the
// netpoller while it returns false.
type replyReader struct {
	buf  []byte
	v4   bool // an IPv4 raw socket: the message comes after its IP header
	read func(fd uintptr) bool
	rsa  unix.RawSockaddrAny

	msg  []byte     // the message read, in buf
	from netip.Addr // its sender
	err  error
}

func (r *replyReader) readFd(fd uintptr) bool {
	for {
		l := uint32(unix.SizeofSockaddrAny)
		n, _, errno := unix.Syscall6(unix.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&r.buf[0])), uintptr(len(r.buf)),
			unix.MSG_DONTWAIT, uintptr(unsafe.Pointer(&r.rsa)), uintptr(unsafe.Pointer(&l)))
		switch errno {
		case 0:
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		default:
			r.msg, r.err = nil, errno
			return true
		}
		r.msg, r.err, r.from = r.buf[:n], nil, netip.Addr{}
		switch r.rsa.Addr.Family {
		case unix.AF_INET:
			r.from = netip.AddrFrom4((*unix.RawSockaddrInet4)(unsafe.Pointer(&r.rsa)).Addr)
		case unix.AF_INET6:
			r.from = netip.AddrFrom16((*unix.RawSockaddrInet6)(unsafe.Pointer(&r.rsa)).Addr).Unmap()
		}
		if r.v4 {
			// As net.IPConn does: drop the IPv4 header the kernel
			// hands raw IPv4 sockets.
			hl := 0
			if len(r.msg) > 0 {
				hl = int(r.msg[0]&0xf) * 4
			}
			if hl < 20 || hl > len(r.msg) {
				r.msg = nil
				return true
			}
			r.msg = r.msg[hl:]
		}
		return true
	}
}

// reply relays the echo reply msg (ICMP header and data) from src to the
// client whose request it answers.
func (pg *Forwarder) reply(src netip.Addr, msg, out []byte) {
	wantType := uint8(header.ICMPv4EchoReply)
	if src.Is6() {
		wantType = uint8(header.ICMPv6EchoReply)
	}
	if msg[0] != wantType {
		return
	}
	i := int(binary.BigEndian.Uint16(msg[4:6]) ^ pg.salt)
	pg.mu.Lock()
	var e pingEntry
	if i < len(pg.ents) {
		e = pg.ents[i]
	}
	pg.mu.Unlock()
	if !e.used || e.flow.dst != src {
		return // another program's ping, or an expired flow
	}
	// The data after the echo header goes in place; the header is
	// rewritten with the client's identifier.
	off := pg.h.Headroom + filter.HeaderLen(src) + 8
	if off+len(msg)-8 > len(out) {
		return // larger than the TUN MTU; the request could not have been
	}
	copy(out[off:], msg[8:])
	seq := binary.BigEndian.Uint16(msg[6:8])
	p, total := filter.BuildICMP(out[pg.h.Headroom:], src, e.flow.src, msg[0], msg[1], uint32(e.flow.id)<<16|uint32(seq), len(msg)-8)
	if total == 0 {
		return
	}
	pg.h.Engine.Outbound(&p, pg.h.Now())
	pg.h.Write(out[:pg.h.Headroom+total])
}

// Expire forgets echo flows idle for longer than the engine's ICMP timeout.
// It looks only at the flows that expire, oldest first.
func (pg *Forwarder) Expire(now int64) {
	idle := int64(pg.h.Engine.Timeouts().ICMPIdle)
	pg.mu.Lock()
	defer pg.mu.Unlock()
	for pg.head >= 0 && now-pg.ents[pg.head].last > idle {
		pg.releaseLocked(pg.head)
	}
}

// Close closes the raw sockets and waits for the reply readers to end.
func (pg *Forwarder) Close() {
	if pg.c4 != nil {
		pg.c4.Close()
	}
	if pg.c6 != nil {
		pg.c6.Close()
	}
	pg.wg.Wait()
}

// Bind binds the raw sockets to the interfaces v4 and v6 ("" for none),
// when tunfw's outbound interface changed.
func (pg *Forwarder) Bind(v4, v6 string) error {
	var errs []error
	for i, raw := range []syscall.RawConn{pg.raw4, pg.raw6} {
		if raw == nil {
			continue
		}
		iface := []string{v4, v6}[i]
		var err error
		if cerr := raw.Control(func(fd uintptr) { err = unix.BindToDevice(int(fd), iface) }); cerr != nil {
			err = cerr
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("bind the ping socket to %q: %w", iface, err))
		}
	}
	return errors.Join(errs...)
}

// Drops adds what was dropped, by reason, to m: echo-no-id (no identifier
// left), echo-source-limit (the client's share used up), echo-send (the
// raw socket's buffer full, or another send error).
func (pg *Forwarder) Drops(m map[string]uint64) {
	m["echo-no-id"] = pg.noID.Load()
	m["echo-source-limit"] = pg.srcLimit.Load()
	m["echo-send"] = pg.sendDrops.Load()
}
