// Package stack is tunfw's packet loop: it reads batches of packets from
// the TUN device, has the filter.Engine judge each one, hands what the
// engine forwards to the forwarder of its protocol and writes the rejects
// the engine builds. It also expires idle flows, and is the one writer of
// the TUN, which the forwarders share.
//
// The forwarders do the rest, each behind a narrow Host: tcpfwd (TCP
// through a gVisor netstack), udpfwd (UDP through connected sockets) and
// echo (ICMP echo through raw sockets); dial opens their real sockets. The
// stack never decides policy and builds nothing the engine did not ask for.
package stack

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/inspect"
	"github.com/tunfw/tunfw/stack/cpulatency"
	"github.com/tunfw/tunfw/stack/dial"
	"github.com/tunfw/tunfw/stack/echo"
	"github.com/tunfw/tunfw/stack/internal/tunio"
	"github.com/tunfw/tunfw/stack/tcpfwd"
	"github.com/tunfw/tunfw/stack/udpfwd"
	wgtun "golang.zx2c4.com/wireguard/tun"
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
	// TCP is the [stack] section; its zero value means tcpfwd.DefaultConfig.
	TCP tcpfwd.Config
	// Dial are the [limits] keys on setting up TCP connections; zero
	// fields take their defaults. TCP().SetDialLimits changes them.
	Dial tcpfwd.DialLimits
	// UDPReceiveBuffer is the largest receive buffer of a UDP flow's
	// socket, in bytes (see udpfwd.Host.ReceiveBuffer); 0 means
	// udpfwd.DefaultReceiveBuffer.
	UDPReceiveBuffer int
	// UDPLargeBuffers bounds how many UDP flows may hold that buffer at
	// once (see udpfwd.Host.LargeBuffers); 0 means no bound.
	UDPLargeBuffers int
	// MaxUDPFlowsPerSource and MaxEchoFlowsPerSource bound the UDP flows
	// (sockets) and ICMP echo flows (identifiers) of one client address;
	// 0 means the defaults (see perSourceBound).
	MaxUDPFlowsPerSource, MaxEchoFlowsPerSource int
	// Inspect is the [inspect] section: how flows are read for their
	// name; its zero value means inspect.DefaultOptions.
	Inspect inspect.Options
	// DNS says how the DNS traffic relayed is read: the table of names
	// learned, and the answer to blocked queries.
	DNS udpfwd.DNS
	// CPU is the [cpu] section: the CPU wake-up latency requested while
	// packets flow.
	CPU cpulatency.Setting
}

// Stack runs the packet loop between the TUN device and the forwarders.
type Stack struct {
	dev    wgtun.Device
	mtu    int
	eng    *filter.Engine
	log    *slog.Logger
	epoch  time.Time
	out    tunWriter
	dialer *dial.Dialer
	tcp    *tcpfwd.Forwarder
	udp    *udpfwd.Forwarder
	ping   *echo.Forwarder     // nil without raw sockets (CAP_NET_RAW)
	cpu    *cpulatency.Request // nil unless [cpu] asks for one

	readErrors atomic.Uint64

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // the expire loop and the CPU latency request
}

// New builds the forwarders. Nothing is read from the device until Run.
func New(o Options) (*Stack, error) {
	s := &Stack{dev: o.Device, mtu: o.MTU, eng: o.Engine, log: o.Logger, epoch: time.Now(), dialer: dial.New(o.Outbound)}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.out.init(o.Device, o.Logger, s.ctx)
	var err error
	s.tcp, err = tcpfwd.New(tcpfwd.Host{
		Engine: s.eng, Log: s.log, Now: s.now, MTU: s.mtu, Dialer: s.dialer, TUN: &s.out, TSO: s.out.segmenter(), Inspect: o.Inspect,
		DNSNames: o.DNS.Names, DNSBlock: o.DNS.Block,
	}, o.TCP, o.Dial)
	if err != nil {
		s.cancel()
		return nil, err
	}
	s.udp = udpfwd.New(udpfwd.Host{
		Engine: s.eng, Log: s.log, Now: s.now, MTU: s.mtu, Dialer: s.dialer, TUN: &s.out,
		TUNConn: s.out.rawConn(), ReceiveBuffer: o.UDPReceiveBuffer, LargeBuffers: o.UDPLargeBuffers, DNS: o.DNS, Inspect: o.Inspect,
		MaxPerSource: func() int { return s.perSourceBound(o.MaxUDPFlowsPerSource, udpfwd.DefaultMaxPerSource) },
	})
	p, err := echo.New(echo.Host{
		Engine: s.eng, Log: s.log, Now: s.now, MTU: s.mtu,
		Write: s.out.writeOne, Headroom: tunio.Headroom, Control: s.dialer.Control,
		MaxPerSource: func() int { return s.perSourceBound(o.MaxEchoFlowsPerSource, echo.DefaultMaxPerSource) },
	})
	if err != nil {
		// ICMP is the one protocol that needs CAP_NET_RAW; without it the
		// rest still works, and allowed pings go unanswered (never faked).
		s.log.Warn("ICMP echo forwarding disabled", "err", err)
	} else {
		s.ping = p
	}
	if o.CPU.On {
		// Like ICMP: the rest works without it, slower to answer.
		if s.cpu, err = cpulatency.Open(o.CPU, s.now, s.log); err != nil {
			s.log.Warn("cpu.wakeup_latency not applied", "err", err)
		}
	}
	return s, nil
}

// now is the engine's clock: monotonic nanoseconds since the stack started.
func (s *Stack) now() int64 { return int64(time.Since(s.epoch)) }

// Now is the clock the stack gives the engine: monotonic nanoseconds since
// the stack started. Callers asking the engine about flow ages use it too.
func (s *Stack) Now() int64 { return s.now() }

// maxReadFailures is how many TUN reads may fail in a row before Run gives
// up: a device that keeps failing is gone.
const maxReadFailures = 100

// checkedReader is a device that hands TCP GSO packets over whole and
// says when the kernel vouches for their checksums (tun.Device).
type checkedReader interface {
	ReadPackets(bufs [][]byte, sizes []int, offset int) (n int, checked bool, err error)
}

// maxRead is the room a TUN read needs past the headroom: a GSO packet is
// up to 64 KiB whatever the MTU (tun.MaxReadSize).
const maxRead = 1 << 16

// Run reads packets from the device until ctx is done or the device is
// closed, judging each with the engine. It also expires idle flows.
func (s *Stack) Run(ctx context.Context) error {
	s.wg.Add(2)
	go s.expireLoop(ctx)
	// The CPU latency request ends with the loop or with Close.
	cpuCtx, stopCPU := context.WithCancel(ctx)
	defer stopCPU()
	context.AfterFunc(s.ctx, stopCPU)
	go func() {
		defer s.wg.Done()
		s.cpu.Run(cpuCtx)
	}()
	batch := s.dev.BatchSize()
	// The first buffer takes what one read returns: with offloads, a
	// TCP GSO packet stays whole (larger than a small MTU), a UDP one is
	// cut into datagrams that a checkedReader keeps in its own buffer
	// (128 MTU-sized buffers would be 8 MiB at the default MTU).
	bufs := make([][]byte, batch)
	bufs[0] = make([]byte, tunio.Headroom+max(s.mtu, maxRead))
	sizes := make([]int, batch)
	var read func() (int, bool, error)
	if r, ok := s.dev.(checkedReader); ok {
		read = func() (int, bool, error) { return r.ReadPackets(bufs, sizes, tunio.Headroom) }
	} else {
		for i := 1; i < batch; i++ {
			bufs[i] = make([]byte, tunio.Headroom+s.mtu)
		}
		read = func() (int, bool, error) {
			n, err := s.dev.Read(bufs, sizes, tunio.Headroom)
			return n, false, err
		}
	}
	reject := make([]byte, tunio.Headroom+s.mtu)
	var p filter.Packet
	failures := 0
	for {
		n, checked, err := read()
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
		s.cpu.Active(now)
		for i := 0; i < n; i++ {
			s.inbound(bufs[i][tunio.Headroom:tunio.Headroom+sizes[i]], checked, &p, now, reject)
		}
		s.udp.ReadDone()
	}
}

// inbound judges one packet from the TUN and carries out the verdict;
// checked: the kernel vouches for its checksum (see checkedReader).
func (s *Stack) inbound(pkt []byte, checked bool, p *filter.Packet, now int64, reject []byte) {
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
			s.udp.Forward(p, pkt, now)
		default:
			s.tcp.Deliver(p, pkt, checked)
		}
	case filter.VerdictReject:
		if n := filter.BuildReject(p, pkt, reject[tunio.Headroom:]); n > 0 {
			s.out.writeOne(reject[:tunio.Headroom+n])
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

// CloseFlows ends the relays of the given flows, as when a reload's recheck
// cut them or they expired: each forwarder closes those of its protocol
// (see tcpfwd.Forwarder.CloseFlows and udpfwd.Forwarder.CloseFlows); a
// flow whose key now names a newer flow is left alone. It returns how many
// relays it ended.
func (s *Stack) CloseFlows(refs []filter.FlowRef) int {
	return s.tcp.CloseFlows(refs) + s.udp.CloseFlows(refs)
}

// Close stops the forwarders and closes every relayed connection. The
// device itself is closed by its owner.
func (s *Stack) Close() {
	s.cancel()
	s.wg.Wait()
	if s.ping != nil {
		s.ping.Close()
	}
	s.tcp.Close()
	s.udp.Close()
	s.cpu.Close()
}
