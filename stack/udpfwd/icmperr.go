package udpfwd

import (
	"encoding/binary"
	"net/netip"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/stack/internal/tunio"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// ICMP errors for UDP flows. A flow's socket is connected and asks for
// IP_RECVERR / IPV6_RECVERR, so the kernel queues each ICMP error the
// network sends about its datagrams (port, host or network unreachable,
// administratively prohibited, fragmentation needed / packet too big, time
// exceeded) with its type, code, MTU and the address that sent it. The
// flow's reply goroutine reads that queue (sockReader.errQueue) and writes
// the error to the TUN as the client's own network would have sent it:
// from that address, quoting the client's datagram (rebuilt from the flow
// key and the payload bytes the error quoted). The client's kernel then
// tells its socket (ECONNREFUSED, EHOSTUNREACH, a lower path MTU...), as on
// the direct path.

const (
	// icmpErrorsPerSecond and icmpErrorBurst bound the errors relayed to
	// all clients together, as Linux bounds the ICMP it sends
	// (net.ipv4.icmp_msgs_per_sec 1000, burst 50): a destination or
	// router flooding errors does not become a flood of TUN writes.
	// Errors past the bound are dropped and counted.
	icmpErrorsPerSecond = 1000
	icmpErrorBurst      = 50
	// icmpErrorBatch is how many errors one TUN write carries.
	icmpErrorBatch = 8
	// errQueueMax bounds the errors read in one go. The queue itself is
	// bounded by the socket's receive buffer; this only keeps one call
	// finite whatever the kernel does.
	errQueueMax = 4096
)

// icmpKind is what a relayed error says, for its counter.
type icmpKind uint8

const (
	icmpNetUnreachable icmpKind = iota
	icmpHostUnreachable
	icmpPortUnreachable
	icmpProhibited
	icmpTooBig
	icmpTimeExceeded
	icmpUnreachable // the other destination unreachable codes
	numICMPKinds
)

func (k icmpKind) String() string {
	return [numICMPKinds]string{
		"net-unreachable", "host-unreachable", "port-unreachable", "prohibited", "too-big", "time-exceeded", "unreachable",
	}[k]
}

// relayedICMP reports whether an ICMP (v6: ICMPv6) error of type typ and
// code is relayed to the client, and its kind. Parameter problems are not:
// their pointer is into tunfw's datagram, not the client's.
func relayedICMP(v6 bool, typ, code uint8) (icmpKind, bool) {
	if v6 {
		switch header.ICMPv6Type(typ) {
		case header.ICMPv6DstUnreachable:
			switch header.ICMPv6Code(code) {
			case header.ICMPv6NetworkUnreachable:
				return icmpNetUnreachable, true
			case header.ICMPv6AddressUnreachable:
				return icmpHostUnreachable, true
			case header.ICMPv6PortUnreachable:
				return icmpPortUnreachable, true
			case header.ICMPv6Prohibited, header.ICMPv6Policy, header.ICMPv6RejectRoute:
				return icmpProhibited, true
			}
			return icmpUnreachable, true
		case header.ICMPv6PacketTooBig:
			return icmpTooBig, true
		case header.ICMPv6TimeExceeded:
			return icmpTimeExceeded, true
		}
		return 0, false
	}
	switch header.ICMPv4Type(typ) {
	case header.ICMPv4DstUnreachable:
		switch header.ICMPv4Code(code) {
		case header.ICMPv4NetUnreachable, header.ICMPv4DestinationNetworkUnknown:
			return icmpNetUnreachable, true
		case header.ICMPv4HostUnreachable, header.ICMPv4DestinationHostUnknown:
			return icmpHostUnreachable, true
		case header.ICMPv4PortUnreachable:
			return icmpPortUnreachable, true
		case header.ICMPv4FragmentationNeeded:
			return icmpTooBig, true
		case header.ICMPv4NetProhibited, header.ICMPv4HostProhibited, header.ICMPv4AdminProhibited:
			return icmpProhibited, true
		}
		return icmpUnreachable, true
	case header.ICMPv4TimeExceeded:
		return icmpTimeExceeded, true
	}
	return 0, false
}

// icmpErrors is what the error relay shares across flows: its counters and
// its rate limit.
type icmpErrors struct {
	relayed   [numICMPKinds]atomic.Uint64
	rateDrops atomic.Uint64
	limit     tokenBucket
}

// tokenBucket allows n events a second with bursts of up to burst, on the
// engine's clock. Credit is kept in nanoseconds: an event costs interval.
type tokenBucket struct {
	mu               sync.Mutex
	interval, burst  int64
	credit, lastTime int64
}

// init sets the rate (n a second) and the burst, and fills the bucket. It
// may be called while the bucket is in use.
func (b *tokenBucket) init(n, burst int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.interval = int64(1e9) / int64(n)
	b.burst = b.interval * int64(burst)
	b.credit = b.burst
}

// allow takes a token at time now if there is one.
func (b *tokenBucket) allow(now int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if now > b.lastTime {
		b.credit = min(b.credit+now-b.lastTime, b.burst)
		b.lastTime = now
	}
	if b.credit < b.interval {
		return false
	}
	b.credit -= b.interval
	return true
}

// ICMPErrors returns how many ICMP errors from the network were relayed to
// clients of UDP flows, by kind: "net-unreachable", "host-unreachable",
// "port-unreachable", "prohibited", "too-big" (fragmentation needed / packet
// too big), "time-exceeded" and "unreachable" (the other codes). Those
// dropped by the rate limit count in Drops as "icmp-error-rate".
func (u *Forwarder) ICMPErrors() map[string]uint64 {
	m := make(map[string]uint64, numICMPKinds)
	for k := range numICMPKinds {
		m[k.String()] = u.icmpErr.relayed[k].Load()
	}
	return m
}

// setRecvErr asks the kernel to queue the ICMP errors of a flow's socket.
func setRecvErr(fd int, v6 bool) error {
	if v6 {
		return unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_RECVERR, 1)
	}
	return unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_RECVERR, 1)
}

// errQueue reads the error queue of one flow's socket and relays what it
// finds. Only the flow's reply goroutine uses it; it is made at the first
// read that may find an error, and reads with a raw recvmsg into buffers it
// keeps, so reading allocates nothing.
type errQueue struct {
	u     *Forwarder
	f     *udpFlow
	ipLen int
	// room is the payload bytes an error can quote: what is left of 576
	// (IPv4) or 1280 (IPv6) bytes, and of the TUN's MTU, after the outer
	// and quoted headers.
	room int

	msg  unix.Msghdr
	iov  unix.Iovec
	oob  [128]byte
	bp   *[]byte   // the buffer being read into
	pkts [][]byte  // errors built, not yet written
	bps  []*[]byte // their buffers
}

func newErrQueue(u *Forwarder, f *udpFlow) *errQueue {
	ipLen, limit := header.IPv4MinimumSize, header.IPv4MinimumProcessableDatagramSize
	if f.key.Dst.Addr().Is6() {
		ipLen, limit = header.IPv6MinimumSize, header.IPv6MinimumMTU
	}
	if u.h.MTU > 0 {
		limit = min(limit, u.h.MTU)
	}
	return &errQueue{
		u: u, f: f, ipLen: ipLen, room: max(0, limit-icmpQuoteOffset(ipLen)),
		pkts: make([][]byte, 0, icmpErrorBatch), bps: make([]*[]byte, 0, icmpErrorBatch),
	}
}

// icmpQuoteOffset is where the quoted payload starts in an error: after
// the error's IP and ICMP headers and the quoted IP and UDP headers.
func icmpQuoteOffset(ipLen int) int {
	return 2 * (ipLen + header.UDPMinimumSize) // an ICMP header is as long as a UDP one
}

// drain reads the socket's error queue until it is empty and writes the
// errors it relays to the TUN.
func (q *errQueue) drain(fd int) {
	off := tunio.Headroom + icmpQuoteOffset(q.ipLen)
	for range errQueueMax {
		if q.bp == nil {
			q.bp = q.u.h.TUN.Buffer()
		}
		b := *q.bp
		q.iov.Base = &b[off]
		q.iov.SetLen(q.room)
		q.msg = unix.Msghdr{Iov: &q.iov, Iovlen: 1, Control: &q.oob[0]}
		q.msg.SetControllen(len(q.oob))
		n, _, errno := unix.Syscall(unix.SYS_RECVMSG, uintptr(fd), uintptr(unsafe.Pointer(&q.msg)), unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			break // EAGAIN: nothing (more) queued
		}
		if pkt := q.packet(b[tunio.Headroom:], int(n)); pkt != nil {
			q.pkts = append(q.pkts, b[:tunio.Headroom+len(pkt)])
			q.bps = append(q.bps, q.bp)
			q.bp = nil
			if len(q.pkts) == cap(q.pkts) {
				q.flush()
			}
		}
	}
	q.flush()
	if q.bp != nil {
		q.u.h.TUN.Release(q.bp)
		q.bp = nil
	}
}

// packet turns the error just read (n payload bytes already in place in
// pkt) into the ICMP error for the client, or returns nil when it is not
// relayed.
func (q *errQueue) packet(pkt []byte, n int) []byte {
	v6 := q.ipLen == header.IPv6MinimumSize
	ee, from, ok := parseRecvErr(q.oob[:q.msg.Controllen], v6)
	if !ok {
		return nil // a local error, or one of another family
	}
	kind, ok := relayedICMP(v6, ee.Type, ee.Code)
	if !ok {
		return nil
	}
	if !q.u.icmpErr.limit.allow(q.u.h.Now()) {
		q.u.icmpErr.rateDrops.Add(1)
		return nil
	}
	if !from.IsValid() || from.IsUnspecified() || from.IsMulticast() {
		from = q.f.key.Dst.Addr()
	}
	l := buildUDPError(pkt, q.f.key, from, ee.Type, ee.Code, ee.Info, min(n, q.room))
	if l == 0 {
		return nil
	}
	q.u.icmpErr.relayed[kind].Add(1)
	return pkt[:l]
}

// flush writes the errors built so far to the TUN.
func (q *errQueue) flush() {
	if len(q.pkts) == 0 {
		return
	}
	q.u.h.TUN.Write(q.pkts)
	for i, bp := range q.bps {
		q.u.h.TUN.Release(bp)
		q.bps[i], q.pkts[i] = nil, nil
	}
	q.pkts, q.bps = q.pkts[:0], q.bps[:0]
}

// parseRecvErr finds the IP_RECVERR (v6: IPV6_RECVERR) control message in
// oob and returns the error it carries and the address that sent it (the
// zero Addr when the kernel gave none); false when there is none, or the
// error did not come from the network in an ICMP message of the flow's
// family.
func parseRecvErr(oob []byte, v6 bool) (unix.SockExtendedErr, netip.Addr, bool) {
	level, typ, origin := int32(unix.SOL_IP), int32(unix.IP_RECVERR), uint8(unix.SO_EE_ORIGIN_ICMP)
	if v6 {
		level, typ, origin = unix.SOL_IPV6, unix.IPV6_RECVERR, unix.SO_EE_ORIGIN_ICMP6
	}
	const eeLen = int(unsafe.Sizeof(unix.SockExtendedErr{}))
	for len(oob) >= unix.SizeofCmsghdr {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		l := int(h.Len)
		if l < unix.SizeofCmsghdr || l > len(oob) {
			break
		}
		data := oob[unix.CmsgLen(0):l]
		if h.Level == level && h.Type == typ && len(data) >= eeLen {
			var ee unix.SockExtendedErr
			ee.Errno = binary.NativeEndian.Uint32(data[0:])
			ee.Origin, ee.Type, ee.Code = data[4], data[5], data[6]
			ee.Info = binary.NativeEndian.Uint32(data[8:])
			ee.Data = binary.NativeEndian.Uint32(data[12:])
			if ee.Origin != origin {
				return ee, netip.Addr{}, false
			}
			var from netip.Addr
			sa := data[eeLen:]
			switch {
			case !v6 && len(sa) >= unix.SizeofSockaddrInet4 && binary.NativeEndian.Uint16(sa) == unix.AF_INET:
				from = netip.AddrFrom4([4]byte(sa[4:8]))
			case v6 && len(sa) >= unix.SizeofSockaddrInet6 && binary.NativeEndian.Uint16(sa) == unix.AF_INET6:
				from = netip.AddrFrom16([16]byte(sa[8:24]))
			}
			return ee, from, true
		}
		oob = oob[min(len(oob), unix.CmsgSpace(l-unix.CmsgLen(0))):]
	}
	return unix.SockExtendedErr{}, netip.Addr{}, false
}

// buildUDPError writes into pkt an ICMP (ICMPv6 for an IPv6 flow) error of
// type typ and code from address from to the client of flow k, quoting the
// client's datagram to k's destination: its IP and UDP headers, rebuilt
// from k, and the first quoted bytes of its payload, which the caller has
// put in pkt at icmpQuoteOffset already. mtu goes into fragmentation
// needed (IPv4) and packet too big (IPv6) errors. It returns the error's
// length, 0 when from is not of k's family. The quoted headers say the
// datagram was quoted bytes long: the kernel does not tell the rest, and
// receivers match an error to their socket by its addresses and ports.
func buildUDPError(pkt []byte, k filter.FlowKey, from netip.Addr, typ, code uint8, mtu uint32, quoted int) int {
	off := filter.HeaderLen(from) + header.ICMPv4MinimumSize // ICMPv6's header is as long
	if from.Is6() != k.Dst.Addr().Is6() || off > len(pkt) {
		return 0
	}
	// The quoted datagram, as the client sent it.
	_, n := filter.BuildUDP(pkt[off:], k.Src, k.Dst, quoted)
	if n == 0 {
		return 0
	}
	_, total := filter.BuildICMPError(pkt, from, k.Src.Addr(), typ, code, mtu, n)
	return total
}
