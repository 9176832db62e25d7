package stack

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tunfw/tunfw/filter"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// UDP does not go through gVisor: a datagram needs no connection state the
// engine does not already keep, so the read loop hands its payload straight
// to the flow's connected socket, and one goroutine per flow wraps the
// replies in IP and UDP headers for the client. Datagrams that come in a
// burst travel in batches both ways (udpbatch.go, udpReplies): one GSO
// sendmsg out, one coalesced TUN write back.

// DefaultUDPReceiveBuffer is the largest receive buffer of a flow's socket,
// so a burst of replies waits there rather than being dropped by the
// kernel: at 1 Gbit/s offered, 1 MiB lost about 1% of the datagrams
// (2.5-18% on a loaded machine), 4 MiB none (0-5.6% loaded; make bench,
// udp-s2c). A flow starts with udpRcvBufStart and gets this only once its
// replies queue (udpReplies found a full batch waiting), so the many quiet
// flows a client can open do not each ask for megabytes. It is kernel
// memory, used only while replies queue, and bounded overall by
// net.ipv4.udp_mem.
const DefaultUDPReceiveBuffer = 4 << 20

// udpRcvBufStart is a new flow's receive buffer: the kernel's usual
// default, room for a batch of full-size replies (udpReplyBatch) to queue
// before the buffer grows.
const udpRcvBufStart = 256 << 10

const (
	// defaultMaxUDPPerSource bounds the UDP flows of one client address
	// (see Stack.perSourceBound): a resolver's burst of queries from
	// fresh ports fits.
	defaultMaxUDPPerSource = 16384
	// Sockets are opened off the read loop by udpOpeners goroutines (few:
	// they must leave the cores to the read loop; one opens about 25,000
	// sockets a second). At most udpOpenQueue flows wait for theirs,
	// udpOpenPerSource of one client address; past that a flow's datagram
	// is dropped and counted, and its next datagram asks again.
	udpOpeners       = 2
	udpOpenQueue     = 1024
	udpOpenPerSource = 256
	// udpHeld and udpHeldBytes bound the datagrams a flow keeps while its
	// socket is being opened.
	udpHeld      = 8
	udpHeldBytes = 8 << 10
)

// udpLimits are the UDP bounds and drop counters of a Stack.
type udpLimits struct {
	rcvBuf       int
	maxPerSource int // 0: the default
	// maxSockets keeps UDP sockets to three quarters of the descriptors
	// the process may open, so a flood cannot take those of TCP, the
	// control socket and the TUN.
	maxSockets int

	sourceLimit, socketLimit, openBusy, openFailed atomic.Uint64
}

func (s *Stack) initUDP(o Options) {
	s.udpPerSrc = make(map[netip.Addr]int32)
	s.udpOpening = make(map[netip.Addr]int32)
	s.udpOpen = make(chan *udpFlow, udpOpenQueue)
	s.udp.rcvBuf = o.UDPReceiveBuffer
	if s.udp.rcvBuf <= 0 {
		s.udp.rcvBuf = DefaultUDPReceiveBuffer
	}
	s.udp.maxPerSource = o.MaxUDPFlowsPerSource
	s.icmpErr.limit.init(icmpErrorsPerSecond, icmpErrorBurst)
	s.udp.maxSockets = 1 << 20
	var rl unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &rl) == nil && rl.Cur < 1<<22 {
		s.udp.maxSockets = max(64, int(rl.Cur)-int(rl.Cur)/4)
	}
}

func (s *Stack) udpDrops() map[string]uint64 {
	return map[string]uint64{
		"udp-source-limit": s.udp.sourceLimit.Load(),
		"udp-socket-limit": s.udp.socketLimit.Load(),
		"udp-open-busy":    s.udp.openBusy.Load(),
		"udp-open-failed":  s.udp.openFailed.Load(),
		"udp-queue":        s.udpWriteDrops.Load(),
		"icmp-error-rate":  s.icmpErr.rateDrops.Load(),
	}
}

// udpFlow is one relayed UDP flow. Its socket is opened by an opener
// goroutine; until then (ready false) its datagrams wait in held.
type udpFlow struct {
	key  filter.FlowKey
	ref  filter.FlowRef // the engine's flow: released by its identity, never a newer one's
	conn *net.UDPConn   // set before ready
	raw  syscall.RawConn
	last atomic.Int64 // engine clock of the last datagram either way
	// errTaken: a send returned the socket's pending ICMP error, whose
	// queued copy the reply loop must look for.
	errTaken atomic.Bool
	ready    atomic.Bool // the socket is open and held was sent

	// mu guards the hand-over from the opener to the read loop.
	mu        sync.Mutex
	held      [][]byte
	heldBytes int
	closed    bool // the flow left the table: its socket goes at once

	// send, sendGSO and their arguments are set up once, so forwarding
	// a datagram from the read loop allocates nothing.
	send, sendGSO func(fd uintptr) bool
	sendBuf       []byte
	oob           []byte // UDP_SEGMENT control message
	sendErr       error

	// Read loop only: datagrams waiting to be sent (udpbatch.go), and
	// whether the socket takes GSO sends.
	out udpBatch
	gso bool

	// bigRcvBuf: the reply goroutine gave the socket its largest receive
	// buffer.
	bigRcvBuf bool
	// queued: the flow is in the openers' queue (read loop only).
	queued bool
}

func newUDPFlow(key filter.FlowKey, conn *net.UDPConn, raw syscall.RawConn) *udpFlow {
	f := &udpFlow{key: key, conn: conn, raw: raw, oob: newGSOControl(), gso: true}
	// A send that returns the socket's pending error (an ICMP error for
	// an earlier datagram, relayed to the client by udpReplies) did not
	// send this one: it is tried once more.
	f.send = func(fd uintptr) bool {
		_, f.sendErr = unix.Write(int(fd), f.sendBuf)
		if pendingICMPError(f.sendErr) {
			f.errTaken.Store(true)
			_, f.sendErr = unix.Write(int(fd), f.sendBuf)
		}
		return true // never wait: a full buffer drops the datagram
	}
	f.sendGSO = func(fd uintptr) bool {
		_, f.sendErr = unix.SendmsgN(int(fd), f.sendBuf, f.oob, nil, 0)
		if pendingICMPError(f.sendErr) {
			f.errTaken.Store(true)
			_, f.sendErr = unix.SendmsgN(int(fd), f.sendBuf, f.oob, nil, 0)
		}
		return true
	}
	return f
}

// forwardUDP sends the payload of an allowed datagram read from the TUN to
// its destination. It runs on the read loop and never blocks: a new flow's
// datagrams wait (bounded) while an opener makes its socket; a datagram
// that finds the socket's buffer full is dropped and counted, as a router
// would. The send may wait in the flow's batch until the read loop has read
// what the TUN holds (udpbatch.go).
func (s *Stack) forwardUDP(p *filter.Packet, pkt []byte, now int64) {
	key := filter.KeyOf(p)
	s.udpMu.Lock()
	f := s.udpFlows[key]
	s.udpMu.Unlock()
	if f == nil {
		if f = s.startUDP(key, now); f == nil {
			return
		}
	}
	f.last.Store(now)
	payload := pkt[p.IPHeaderLen+header.UDPMinimumSize:][:p.PayloadLen] // the UDP length's, not the IP packet's
	if f.ready.Load() {
		s.queueUDP(f, payload)
		return
	}
	if !f.queued && !s.queueOpen(f) {
		// Never queued, it holds nothing: it leaves at once, as one
		// refused by startUDP does, so a burst past the openers' queue
		// does not fill the client's share with empty flows.
		s.udp.openBusy.Add(1)
		s.udpMu.Lock()
		s.removeUDPLocked(f)
		s.udpMu.Unlock()
		s.untrackFlow(f.ref)
		s.eng.Release(f.ref, now)
		return
	}
	s.holdUDP(f, payload)
}

// startUDP makes the flow of key's first datagram, unless its client holds
// its share of UDP flows or tunfw as many sockets as it may: then the
// datagram is dropped and counted, and the flow leaves the engine's table
// (it holds nothing and counts against no limit; its next datagram tries
// again).
func (s *Stack) startUDP(key filter.FlowKey, now int64) *udpFlow {
	src := key.Src.Addr()
	ref := filter.FlowRef{Key: key, ID: s.eng.Claim(key)}
	var f *udpFlow
	var drop *atomic.Uint64
	s.udpMu.Lock()
	switch {
	case s.ctx.Err() != nil:
		drop = &s.udp.openFailed
	case int(s.udpPerSrc[src]) >= s.perSourceBound(s.udp.maxPerSource, defaultMaxUDPPerSource):
		drop = &s.udp.sourceLimit
	case len(s.udpFlows) >= s.udp.maxSockets:
		drop = &s.udp.socketLimit
	default:
		f = newUDPFlow(key, nil, nil)
		f.ref = ref
		f.last.Store(now)
		s.udpFlows[key] = f
		s.udpPerSrc[src]++
	}
	s.udpMu.Unlock()
	if drop != nil {
		// Refused before anything is made for it: a flood of new
		// flows past the bounds costs little.
		drop.Add(1)
		s.eng.Release(ref, now)
		return nil
	}
	s.trackFlow(ref, func() { s.endUDP(f) })
	return f
}

// queueOpen asks the openers for f's socket; false when too many flows, or
// too many of f's client, wait for one already.
func (s *Stack) queueOpen(f *udpFlow) bool {
	src := f.key.Src.Addr()
	s.udpMu.Lock()
	if s.udpOpening[src] < udpOpenPerSource {
		select {
		case s.udpOpen <- f:
			s.udpOpening[src]++
			f.queued = true
		default:
		}
	}
	s.udpMu.Unlock()
	return f.queued
}

// holdUDP keeps a datagram of a flow whose socket is being opened, or
// sends it if the socket opened meanwhile.
func (s *Stack) holdUDP(f *udpFlow, payload []byte) {
	f.mu.Lock()
	if f.ready.Load() {
		f.mu.Unlock()
		s.queueUDP(f, payload)
		return
	}
	if f.closed || len(f.held) == udpHeld || f.heldBytes+len(payload) > udpHeldBytes {
		f.mu.Unlock()
		s.udpWriteDrops.Add(1)
		return
	}
	f.held = append(f.held, append([]byte(nil), payload...))
	f.heldBytes += len(payload)
	f.mu.Unlock()
}

func (s *Stack) startUDPOpeners() {
	for range udpOpeners {
		s.wg.Add(1)
		go s.udpOpener()
	}
}

// udpOpener opens the sockets of new flows, so that the read loop never
// waits for socket, setsockopt and connect calls or a goroutine start.
func (s *Stack) udpOpener() {
	defer s.wg.Done()
	for {
		select {
		case <-s.ctx.Done():
			return
		case f := <-s.udpOpen:
			s.openUDP(f)
			// A flood keeps the openers busy: let a read loop that
			// is ready run first, whatever the number of cores.
			runtime.Gosched()
		}
	}
}

// openUDP connects a socket for flow f, sends what it held and starts
// relaying its replies.
func (s *Stack) openUDP(f *udpFlow) {
	defer s.recoverFlow(&f.ref)
	conn, raw, err := s.dialUDP(f.key)
	src := f.key.Src.Addr()
	s.udpMu.Lock()
	if s.udpOpening[src]--; s.udpOpening[src] <= 0 {
		delete(s.udpOpening, src)
	}
	s.udpMu.Unlock()
	f.mu.Lock()
	if err != nil || f.closed {
		held := len(f.held)
		f.held, f.heldBytes = nil, 0
		byTable := f.closed
		f.closed = true
		f.mu.Unlock()
		if conn != nil {
			conn.Close()
		}
		if !byTable {
			s.udp.openFailed.Add(uint64(held))
			s.log.Debug("dial failed", "proto", "udp", "src", f.key.Src, "dst", f.key.Dst, "err", err)
			s.udpMu.Lock()
			s.removeUDPLocked(f)
			s.udpMu.Unlock()
			s.untrackFlow(f.ref)
			s.eng.Release(f.ref, s.now())
		}
		return
	}
	f.conn, f.raw = conn, raw
	for _, d := range f.held {
		s.sendUDP(f, d)
	}
	f.held, f.heldBytes = nil, 0
	f.ready.Store(true)
	f.mu.Unlock()
	s.wg.Add(1) // this opener is counted in wg: it cannot be zero here
	go s.udpReplies(f)
}

// dialUDP opens and connects the socket of flow key.
func (s *Stack) dialUDP(key filter.FlowKey) (*net.UDPConn, syscall.RawConn, error) {
	network := "udp4"
	if key.Dst.Addr().Is6() {
		network = "udp6"
	}
	c, err := s.dialer.DialContext(s.ctx, network, key.Dst.String())
	if err != nil {
		return nil, nil, err
	}
	uc := c.(*net.UDPConn)
	raw, err := uc.SyscallConn()
	if err != nil {
		uc.Close()
		return nil, nil, err
	}
	s.setUDPRcvBuf(raw, min(udpRcvBufStart, s.udp.rcvBuf))
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = setRecvErr(int(fd), key.Dst.Addr().Is6()) }); err != nil || serr != nil {
		uc.Close()
		return nil, nil, fmt.Errorf("ask for ICMP errors of the socket to %s: %w", key.Dst, errors.Join(err, serr))
	}
	return uc, raw, nil
}

// setUDPRcvBuf sets the receive buffer of a flow's socket. Best effort:
// without CAP_NET_ADMIN the default stays.
func (s *Stack) setUDPRcvBuf(raw syscall.RawConn, size int) {
	raw.Control(func(fd uintptr) {
		unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, size)
	})
}

// endUDP releases flow f the moment it leaves the engine's table (expired,
// cut by a reload) or the stack closes: its socket, its entry, its
// tracking. Its reply goroutine sees the closed socket and ends.
func (s *Stack) endUDP(f *udpFlow) {
	f.mu.Lock()
	f.closed = true
	c := f.conn
	f.mu.Unlock()
	if c != nil {
		c.Close()
	}
	s.udpMu.Lock()
	s.removeUDPLocked(f)
	s.udpMu.Unlock()
	s.untrackFlow(f.ref)
}

// removeUDPLocked deletes f from the flows, if it is still there; udpMu
// must be held.
func (s *Stack) removeUDPLocked(f *udpFlow) {
	if s.udpFlows[f.key] != f {
		return
	}
	delete(s.udpFlows, f.key)
	src := f.key.Src.Addr()
	if s.udpPerSrc[src]--; s.udpPerSrc[src] <= 0 {
		delete(s.udpPerSrc, src)
	}
}

// closeUDPFlows releases every UDP flow, when the stack closes.
func (s *Stack) closeUDPFlows() {
	s.udpMu.Lock()
	fs := make([]*udpFlow, 0, len(s.udpFlows))
	for _, f := range s.udpFlows {
		fs = append(fs, f)
	}
	s.udpMu.Unlock()
	for _, f := range fs {
		s.endUDP(f)
	}
}

// udpReplyBatch is how many datagrams udpReplies reads before writing
// them to the TUN in one call, which coalesces those of one size into a
// single UDP GSO packet (wireguard's GRO on write).
const udpReplyBatch = 32

// udpReplies turns the datagrams the destination sends into packets for the
// client until the flow has been idle for the engine's UDP timeout or is
// closed. The socket is connected, so the kernel drops datagrams from any
// other source: replies reach the client only from the address and port it
// sent to. Buffers are taken only while datagrams are there: after the
// first one, what else the socket already holds (up to udpReplyBatch) is
// read without waiting and written with it.
func (s *Stack) udpReplies(f *udpFlow) {
	defer s.wg.Done()
	defer s.closeUDP(f)
	defer s.recoverFlow(&f.ref)
	ipLen := header.IPv4MinimumSize
	if f.key.Dst.Addr().Is6() {
		ipLen = header.IPv6MinimumSize
	}
	var r sockReader
	r.init(func() *[]byte { return s.bufPool.Get().(*[]byte) }, func(bp *[]byte) { s.bufPool.Put(bp) },
		tunOffset+ipLen+header.UDPMinimumSize)
	var errs *errQueue
	r.errQueue = func(fd int) {
		if errs == nil {
			errs = newErrQueue(s, f)
		}
		errs.drain(fd)
	}
	held := make([]*[]byte, 0, udpReplyBatch)
	pkts := make([][]byte, 0, udpReplyBatch)
	for {
		idle := int64(s.eng.Timeouts().UDPIdle)
		left := idle - (s.now() - f.last.Load())
		if left <= 0 {
			return
		}
		f.conn.SetReadDeadline(time.Now().Add(time.Duration(left)))
		// The first datagram: wait in the netpoller for it. When a send
		// took the socket's pending error, its queued ICMP error may have
		// woken nobody (the netpoller's edge went before this Read): it
		// is looked for once first, as if woken.
		r.wait, r.woken = true, f.errTaken.Swap(false)
		err := f.raw.Read(r.read)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				continue // idle so far; the loop checks the timeout
			}
			return
		}
		if r.err != nil {
			// The socket's pending error: an ICMP error for an
			// earlier datagram (port unreachable...), relayed to the
			// client by r.errQueue. Keep the flow: a server may come
			// up, a route come back.
			continue
		}
		now := s.now()
		f.last.Store(now)
		for {
			if pkt := s.udpReplyPacket(f, r.bp, r.n, ipLen, now); pkt != nil {
				held = append(held, r.bp)
				pkts = append(pkts, pkt)
			} else {
				s.bufPool.Put(r.bp)
			}
			r.bp = nil
			if len(held) == udpReplyBatch {
				// Replies queue: this flow is busy enough for the
				// largest buffer.
				if !f.bigRcvBuf {
					f.bigRcvBuf = true
					s.setUDPRcvBuf(f.raw, s.udp.rcvBuf)
				}
				break
			}
			// More already there? Read without waiting.
			r.wait = false
			if f.raw.Control(r.readNow) != nil || r.bp == nil {
				break
			}
		}
		if len(pkts) > 0 {
			s.writeMu.Lock()
			s.writeLocked(pkts)
			s.writeMu.Unlock()
		}
		for i, bp := range held {
			s.bufPool.Put(bp)
			held[i], pkts[i] = nil, nil
		}
		held, pkts = held[:0], pkts[:0]
	}
}

// pendingICMPError reports whether err from a send on a flow's socket may
// be the socket's pending error, left by an ICMP error for an earlier
// datagram (see icmp_err_convert and icmpv6_err_convert in Linux).
func pendingICMPError(err error) bool {
	switch err {
	case unix.ECONNREFUSED, unix.EHOSTUNREACH, unix.ENETUNREACH, unix.EACCES, unix.EPROTO,
		unix.EHOSTDOWN, unix.ENONET, unix.EMSGSIZE:
		return true
	}
	return false
}

// udpReplyPacket wraps the n-byte datagram in bp in IP and UDP headers for
// the client and accounts it to the flow; nil when it is larger than the
// TUN takes (dropped and counted).
func (s *Stack) udpReplyPacket(f *udpFlow, bp *[]byte, n, ipLen int, now int64) []byte {
	total := ipLen + header.UDPMinimumSize + n
	if total > s.mtu {
		s.udpWriteDrops.Add(1)
		return nil
	}
	b := *bp
	p := buildUDPReply(b[tunOffset:tunOffset+total], f.key)
	s.eng.Outbound(&p, now)
	return b[:tunOffset+total]
}

// closeUDP ends a flow whose reply loop ended: its socket, its table
// entries and its flow in the engine, unless the flow already left the
// engine's table (endUDP did the rest then).
func (s *Stack) closeUDP(f *udpFlow) {
	f.conn.Close()
	f.mu.Lock()
	byTable := f.closed
	f.closed = true
	f.mu.Unlock()
	if byTable {
		return
	}
	s.udpMu.Lock()
	s.removeUDPLocked(f)
	s.udpMu.Unlock()
	s.untrackFlow(f.ref)
	s.eng.Release(f.ref, s.now())
}

// buildUDPReply writes the IP and UDP headers in front of the payload that
// fills the rest of pkt, for a datagram from the flow's destination to its
// client, and returns the packet's description for the engine.
func buildUDPReply(pkt []byte, k filter.FlowKey) filter.Packet {
	src, dst := tcpipAddr(k.Dst.Addr()), tcpipAddr(k.Src.Addr())
	ipLen := header.IPv4MinimumSize
	version := uint8(4)
	if k.Dst.Addr().Is6() {
		ipLen, version = header.IPv6MinimumSize, 6
	}
	udp := header.UDP(pkt[ipLen:])
	udp.Encode(&header.UDPFields{SrcPort: k.Dst.Port(), DstPort: k.Src.Port(), Length: uint16(len(udp))})
	if version == 4 {
		ip := header.IPv4(pkt)
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(len(pkt)),
			TTL:         64,
			Protocol:    uint8(header.UDPProtocolNumber),
			SrcAddr:     src,
			DstAddr:     dst,
		})
		ip.SetChecksum(^ip.CalculateChecksum())
	} else {
		header.IPv6(pkt).Encode(&header.IPv6Fields{
			PayloadLength:     uint16(len(udp)),
			TransportProtocol: header.UDPProtocolNumber,
			HopLimit:          64,
			SrcAddr:           src,
			DstAddr:           dst,
		})
	}
	xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, src, dst, uint16(len(udp)))
	xsum = checksum.Checksum(udp.Payload(), xsum)
	c := ^udp.CalculateChecksum(xsum)
	if c == 0 {
		c = 0xffff // zero means "no checksum"
	}
	udp.SetChecksum(c)
	return filter.Packet{
		Version: version, Proto: filter.ProtoUDP,
		Src: k.Dst.Addr(), Dst: k.Src.Addr(), SrcPort: k.Dst.Port(), DstPort: k.Src.Port(),
		IPHeaderLen: ipLen, PayloadLen: len(udp) - header.UDPMinimumSize, Len: len(pkt),
	}
}
