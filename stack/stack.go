// Package stack owns forwarding: the gVisor netstack, the link endpoint that
// bridges it to the TUN device, the TCP, UDP and ICMP echo forwarders, the
// dialer of real sockets and the relays between the two.
//
// It never decides policy. Every packet read from the TUN is judged by the
// filter.Engine first; the stack only sees what the engine forwards and
// builds nothing the engine did not ask for.
package stack

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/stack/dial"
	"github.com/tunfw/tunfw/stack/echo"
	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/qdisc/fifo"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

const nicID tcpip.NICID = 1

const (
	// maxIPPacket is the largest IP packet (IPv4 total length).
	maxIPPacket = 65535
	// qdiscLen is how many outbound packets may wait for the device.
	qdiscLen = 1024
)

// Options configures a Stack.
type Options struct {
	// Device is the TUN device packets are read from and written to.
	Device wgtun.Device
	// MTU of Device.
	MTU int
	// Engine judges every packet read from Device.
	Engine *filter.Engine
	// Outbound says how tunfw's own sockets leave the host.
	Outbound dial.Outbound
	// Logger receives operational messages; decisions are logged by Engine.
	Logger *slog.Logger
	// TCP is the [stack] section; its zero value means DefaultConfig.
	TCP Config
	// Dial are the [limits] keys on setting up TCP connections; zero
	// fields take their defaults. SetDialLimits changes them.
	Dial DialLimits
	// UDPReceiveBuffer is the largest receive buffer of a UDP flow's
	// socket, in bytes, given to flows whose replies queue (others keep
	// a smaller one); 0 means DefaultUDPReceiveBuffer.
	UDPReceiveBuffer int
	// MaxUDPFlowsPerSource and MaxEchoFlowsPerSource bound the UDP flows
	// (sockets) and ICMP echo flows (identifiers) of one client address;
	// 0 means the defaults (see perSourceBound).
	MaxUDPFlowsPerSource, MaxEchoFlowsPerSource int
}

// Stack forwards the flows the filter allows between the TUN device and
// real sockets.
type Stack struct {
	dev    wgtun.Device
	mtu    int
	eng    *filter.Engine
	log    *slog.Logger
	ns     *stack.Stack
	ep     *linkEndpoint
	dialer *dial.Dialer
	ping   *echo.Forwarder // nil without raw sockets (CAP_NET_RAW)
	epoch  time.Time

	// watcher waits for the sockets of idle TCP relays (relay.go).
	watcher   *sockWatcher
	watcherWG sync.WaitGroup

	// dials are the TCP connections between SYN and the client's
	// completed handshake (dials.go), within dialLimits (limits.go).
	dials      *dialPool
	dialLimits atomic.Pointer[DialLimits]

	// writeErrors and readErrors count failed TUN operations; panics counts
	// flow handlers that panicked (see recoverFlow).
	writeErrors, readErrors, panics atomic.Uint64
	// udpWriteDrops counts relayed datagrams dropped on a full queue.
	udpWriteDrops atomic.Uint64
	// icmpErr counts and bounds the ICMP errors relayed to UDP clients
	// (icmperr.go).
	icmpErr icmpErrors

	// conns holds how to close each relayed flow (CloseFlows).
	connMu sync.Mutex
	conns  map[filter.FlowKey]tracked

	// udpFlows are the UDP flows being relayed (udp.go), their number by
	// client address, and the flows whose socket is being opened, by
	// client address too (udpOpen is their queue).
	udpMu            sync.Mutex
	udpFlows         map[filter.FlowKey]*udpFlow
	udpPerSrc        map[netip.Addr]int32
	udpOpening       map[netip.Addr]int32
	udpOpen          chan *udpFlow
	udp              udpLimits
	maxEchoPerSource int

	// Read loop only: flows with datagrams waiting to be sent, and how to
	// ask the TUN whether more packets wait (udpbatch.go).
	udpPending   []*udpFlow
	tunRaw       syscall.RawConn
	tunPollFds   [1]unix.PollFd
	tunPollReady bool
	pollTUN      func(fd uintptr)

	// writeMu serialises writes to the device so batches are not interleaved
	// and the scratch slices below can be reused.
	writeMu   sync.Mutex
	writeBufs [][]byte
	writeBps  []*[]byte // the pool buffers behind writeBufs
	bufPool   sync.Pool

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// New builds the gVisor stack and its forwarders. Nothing is read from the
// device until Run.
func New(o Options) (*Stack, error) {
	ctx, cancel := context.WithCancel(context.Background())
	s := &Stack{
		dev:      o.Device,
		mtu:      o.MTU,
		eng:      o.Engine,
		log:      o.Logger,
		dialer:   dial.New(o.Outbound),
		epoch:    time.Now(),
		dials:    newDialPool(),
		conns:    make(map[filter.FlowKey]tracked),
		udpFlows: make(map[filter.FlowKey]*udpFlow),
		ctx:      ctx,
		cancel:   cancel,
	}
	s.SetDialLimits(o.Dial)
	s.maxEchoPerSource = o.MaxEchoFlowsPerSource
	s.initUDP(o)
	s.bufPool.New = func() any {
		// Room for a whole 64 KiB packet: the device coalesces TCP
		// segments of one flow into the buffer of the first (GRO), so a
		// batch reaches the kernel in a few writes.
		b := make([]byte, tunOffset+maxIPPacket)
		return &b
	}
	if f, ok := o.Device.(interface{ File() *os.File }); ok && f.File() != nil {
		if rc, err := f.File().SyscallConn(); err == nil {
			s.tunRaw = rc
		}
	}
	s.pollTUN = s.pollTUNFd
	w, err := newSockWatcher()
	if err != nil {
		cancel()
		return nil, err
	}
	s.watcher = w
	s.ep = &linkEndpoint{mtu: uint32(o.MTU), write: s.writeStackPackets}
	s.ns = stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
	})
	tcpCfg := o.TCP
	if tcpCfg == (Config{}) {
		tcpCfg = DefaultConfig()
	}
	if err := s.setup(tcpCfg); err != nil {
		s.ns.Close()
		w.close()
		cancel()
		return nil, err
	}
	s.watcherWG.Add(1)
	go func() {
		defer s.watcherWG.Done()
		w.run()
	}()
	p, err := echo.New(echo.Host{
		Engine: s.eng, Log: s.log, Now: s.now, MTU: s.mtu,
		Write: s.writeRaw, Headroom: tunOffset, Control: s.dialer.Control,
		MaxPerSource: func() int { return s.perSourceBound(s.maxEchoPerSource, echo.DefaultMaxPerSource) },
	})
	if err != nil {
		// ICMP is the one protocol that needs CAP_NET_RAW; without it the
		// rest still works, and allowed pings go unanswered (never faked).
		s.log.Warn("ICMP echo forwarding disabled", "err", err)
	} else {
		s.ping = p
	}
	s.startUDPOpeners()
	return s, nil
}

func (s *Stack) setup(c Config) error {
	// The FIFO queue batches the stack's outbound packets: its dispatcher
	// hands WritePackets up to 47 at a time, which become one Write call to
	// the device, which coalesces TCP segments before writing.
	qd := fifo.New(s.ep, 1, qdiscLen)
	if err := s.ns.CreateNICWithOptions(nicID, s.ep, stack.NICOptions{QDisc: qd}); err != nil {
		return fmt.Errorf("create NIC: %s", err)
	}
	// Promiscuous + spoofing: the stack accepts packets for any destination
	// and answers as that destination, which is what a transparent
	// forwarder is. Only flows the filter allowed ever reach it.
	if err := s.ns.SetPromiscuousMode(nicID, true); err != nil {
		return fmt.Errorf("set promiscuous mode: %s", err)
	}
	if err := s.ns.SetSpoofing(nicID, true); err != nil {
		return fmt.Errorf("set spoofing: %s", err)
	}
	s.ns.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: nicID},
		{Destination: header.IPv6EmptySubnet, NIC: nicID},
	})
	if err := s.applyConfig(c); err != nil {
		return err
	}
	// No TIME_WAIT: when the destination closes first, the stack is the
	// active closer, and gVisor hands a new SYN for a tuple in TIME_WAIT
	// only to a listening endpoint, which a forwarder has none of. A client
	// reusing its port (it closed passively, so its kernel sees the port
	// free) would hang for a minute, and every closed connection would hold
	// an endpoint as long. TIME_WAIT guards against old segments of a
	// connection crossing a network; across the TUN there are none, and a
	// retransmitted FIN after it is answered with a RST, which ends the
	// client's LAST_ACK as well.
	tw := tcpip.TCPTimeWaitTimeoutOption(0)
	if err := s.ns.SetTransportProtocolOption(tcp.ProtocolNumber, &tw); err != nil {
		return fmt.Errorf("set TIME_WAIT timeout: %s", err)
	}
	tcpFwd := tcp.NewForwarder(s.ns, c.ReceiveBuffer, maxInFlightDials, s.handleTCP)
	s.ns.SetTransportProtocolHandler(tcp.ProtocolNumber, s.screenSYNs(tcpFwd.HandlePacket))
	return nil
}

// now is the engine's clock: monotonic nanoseconds since the stack started.
func (s *Stack) now() int64 { return int64(time.Since(s.epoch)) }

// Now is the clock the stack gives the engine: monotonic nanoseconds since
// the stack started. Callers asking the engine about flow ages use it too.
func (s *Stack) Now() int64 { return s.now() }

// Run reads packets from the device until ctx is done or the device is
// closed, judging each with the engine. It also expires idle flows.
func (s *Stack) Run(ctx context.Context) error {
	s.wg.Add(1)
	go s.expireLoop(ctx)
	batch := s.dev.BatchSize()
	bufs := make([][]byte, batch)
	for i := range bufs {
		bufs[i] = make([]byte, tunOffset+s.mtu)
	}
	sizes := make([]int, batch)
	reject := make([]byte, tunOffset+s.mtu)
	var p filter.Packet
	failures := 0
	for {
		n, err := s.dev.Read(bufs, sizes, tunOffset)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, os.ErrClosed) {
				return nil
			}
			if errors.Is(err, wgtun.ErrTooManySegments) {
				s.eng.Count(filter.ReasonMalformed)
				continue
			}
			s.readErrors.Add(1)
			if failures++; failures >= maxReadFailures {
				return fmt.Errorf("read from TUN failed %d times in a row: %w", failures, err)
			}
			s.log.Warn("read from TUN", "err", err)
			continue
		}
		failures = 0
		now := s.now()
		for i := 0; i < n; i++ {
			s.inbound(bufs[i][tunOffset:tunOffset+sizes[i]], &p, now, reject)
		}
		// Datagrams collected for batching leave before the next read
		// could block.
		if len(s.udpPending) > 0 && !s.tunHasMore() {
			s.flushUDP()
		}
	}
}

// inbound judges one packet from the TUN and carries out the verdict.
func (s *Stack) inbound(pkt []byte, p *filter.Packet, now int64, reject []byte) {
	if err := filter.ParsePacket(pkt, p); err != nil {
		s.eng.Count(filter.ParseErrorReason(err))
		return
	}
	d := s.eng.Inbound(p, now)
	switch d.Verdict {
	case filter.VerdictForward:
		switch p.Proto {
		case filter.ProtoICMP, filter.ProtoICMPv6:
			// Echo requests never reach gVisor: it would answer them
			// itself for any address. The echo forwarder asks the real host.
			if s.ping != nil {
				s.ping.Send(p, pkt)
			}
		case filter.ProtoUDP:
			s.forwardUDP(p, pkt, now)
		default:
			s.ep.deliver(pkt[:p.Len], p.Version == 6)
		}
	case filter.VerdictReject:
		if n := filter.BuildReject(p, pkt, reject[tunOffset:]); n > 0 {
			s.writeRaw(reject[:tunOffset+n])
		}
	}
}

func (s *Stack) expireLoop(ctx context.Context) {
	defer s.wg.Done()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	var expired []filter.FlowRef
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.ctx.Done():
			return
		case <-t.C:
			now := s.now()
			// A flow that timed out in the table (a peer went
			// silent, e.g. a destination that never answers a
			// FIN) has its relay closed too, so its sockets and
			// goroutines do not outlive it.
			if expired = s.eng.ExpireFlows(now, expired[:0]); len(expired) > 0 {
				s.CloseFlows(expired)
			}
			if s.ping != nil {
				s.ping.Expire(now)
			}
		}
	}
}

// writeStackPackets sends the stack's outbound packets to the TUN, letting
// the engine account them to their flows first. The pool's pointers are
// kept beside the packets, so putting the buffers back allocates nothing.
func (s *Stack) writeStackPackets(pkts []*stack.PacketBuffer) {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	now := s.now()
	var p filter.Packet
	for _, pb := range pkts {
		bp := s.bufPool.Get().(*[]byte)
		b := appendPacket((*bp)[:tunOffset], pb)
		if filter.ParsePacket(b[tunOffset:], &p) == nil {
			s.eng.Outbound(&p, now)
		}
		s.writeBufs = append(s.writeBufs, b)
		s.writeBps = append(s.writeBps, bp)
	}
	s.writeLocked(s.writeBufs)
	for i, bp := range s.writeBps {
		s.bufPool.Put(bp)
		s.writeBps[i], s.writeBufs[i] = nil, nil
	}
	s.writeBufs, s.writeBps = s.writeBufs[:0], s.writeBps[:0]
}

// writeRaw sends one packet built outside the stack (reject, echo reply);
// pkt includes tunOffset bytes of headroom.
func (s *Stack) writeRaw(pkt []byte) {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	s.writeLocked([][]byte{pkt})
}

func (s *Stack) writeLocked(bufs [][]byte) {
	if _, err := s.dev.Write(bufs, tunOffset); err != nil && s.ctx.Err() == nil {
		s.writeErrors.Add(1)
		s.log.Debug("write to TUN", "packets", len(bufs), "err", err)
	}
}

// Close stops the forwarders and closes every relayed connection. The
// device itself is closed by its owner.
func (s *Stack) Close() {
	s.cancel()
	if s.ping != nil {
		s.ping.Close()
	}
	s.ns.Close()
	s.ns.Wait()
	s.closeUDPFlows()
	s.wg.Wait()
	s.watcher.wake()
	s.watcherWG.Wait()
	s.watcher.close()
}

// TUNErrors returns how many reads and writes of the TUN failed.
func (s *Stack) TUNErrors() (read, write uint64) { return s.readErrors.Load(), s.writeErrors.Load() }

// UDPWriteDrops returns how many relayed UDP datagrams were dropped because
// a queue on the way was full.
func (s *Stack) UDPWriteDrops() uint64 { return s.udpWriteDrops.Load() }

// Drops returns, by reason, the packets the stack dropped itself after the
// engine let them through: "echo-no-id" (no echo identifier left),
// "echo-source-limit" and "udp-source-limit" (the client holds its share of
// echo or UDP flows), "echo-send" (the raw socket's buffer was full),
// "udp-socket-limit" (as many UDP sockets as tunfw may hold),
// "udp-open-busy" (too many sockets being opened), "udp-open-failed" (the
// socket could not be opened), "udp-queue" (the flow's queue was full) and
// "icmp-error-rate" (an ICMP error for a UDP flow past the rate limit, not
// relayed to its client).
func (s *Stack) Drops() map[string]uint64 {
	m := s.udpDrops()
	if s.ping != nil {
		s.ping.Drops(m)
	}
	return m
}

// perSourceBound is how many flows of one kind (UDP, echo) one client
// address may hold: as configured; else the default of that kind (dflt),
// lowered to max_flows_per_source when that is set and otherwise to a
// quarter of max_flows (at least 64), so that one client cannot take the
// whole table from the others even when no per-source bound is set.
func (s *Stack) perSourceBound(configured, dflt int) int {
	if configured > 0 {
		return configured
	}
	l := s.eng.Limits()
	if l.MaxFlowsPerSource > 0 {
		return min(dflt, l.MaxFlowsPerSource)
	}
	return min(dflt, max(64, l.MaxFlows/4))
}

// Panics returns how many flow handlers panicked and were recovered.
func (s *Stack) Panics() uint64 { return s.panics.Load() }

// maxReadFailures is how many TUN reads may fail in a row before Run gives
// up: a device that keeps failing is gone.
const maxReadFailures = 100

// appendPacket appends the bytes of pb, from its network header on, to dst.
// It walks the views in place: PacketBuffer.AsSlices would allocate per
// packet.
func appendPacket(dst []byte, pb *stack.PacketBuffer) []byte {
	vl, off := pb.AsViewList()
	for v := vl.Front(); v != nil; v = v.Next() {
		b := v.AsSlice()
		if off >= len(b) {
			off -= len(b)
			continue
		}
		dst = append(dst, b[off:]...)
		off = 0
	}
	return dst
}

func bufferFrom(b []byte) buffer.Buffer { return buffer.MakeWithData(b) }
