package stack

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tunfw/tunfw/filter"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// maxInFlightDials bounds TCP handshakes waiting for their real destination;
// SYNs past it are dropped (the client retries).
const maxInFlightDials = 1024

// relayBufSize is the size of each relay copy buffer.
const relayBufSize = 32 << 10

// Outbound says how tunfw's own sockets leave the host without being routed
// back into the TUN.
type Outbound struct {
	// IfaceV4 and IfaceV6 are the interfaces IPv4 and IPv6 sockets are bound
	// to (SO_BINDTODEVICE); "" binds none.
	IfaceV4, IfaceV6 string
	// Mark is set as SO_MARK on every socket; 0 sets none.
	Mark uint32
}

type dialer struct {
	out Outbound
	net net.Dialer
}

func newDialer(o Outbound) dialer {
	d := dialer{out: o}
	d.net.Control = d.control
	return d
}

// control marks and binds a socket before it connects, so the kernel routes
// it past the TUN.
func (d *dialer) control(network, _ string, c syscall.RawConn) error {
	iface := d.out.IfaceV4
	if network == "tcp6" || network == "udp6" || network == "ip6" {
		iface = d.out.IfaceV6
	}
	var serr error
	err := c.Control(func(fd uintptr) {
		if d.out.Mark != 0 {
			if err := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(d.out.Mark)); err != nil {
				serr = errors.Join(serr, &net.OpError{Op: "set SO_MARK", Err: err})
			}
		}
		if iface != "" {
			if err := unix.BindToDevice(int(fd), iface); err != nil {
				serr = errors.Join(serr, &net.OpError{Op: "bind to device " + iface, Err: err})
			}
		}
	})
	return errors.Join(err, serr)
}

// handleTCP is called by gVisor's forwarder, in a goroutine of its own, for
// each SYN of a flow the filter allowed. The real destination is dialled
// first; the client's handshake completes only if it answers.
func (s *Stack) handleTCP(r *tcp.ForwarderRequest) {
	id := r.ID()
	dst := netip.AddrPortFrom(addrFromTCPIP(id.LocalAddress), id.LocalPort)
	src := netip.AddrPortFrom(addrFromTCPIP(id.RemoteAddress), id.RemotePort)
	ctx, cancel := context.WithTimeout(s.ctx, s.dialTimeout)
	up, err := s.dialer.net.DialContext(ctx, "tcp", dst.String())
	cancel()
	if err != nil {
		// Refused: the client sees a RST. Anything else (timeout,
		// unreachable): it sees nothing, as it would on a real path, and
		// its next SYN retransmission tries again.
		refused := errors.Is(err, syscall.ECONNREFUSED)
		r.Complete(refused)
		s.log.Debug("dial failed", "proto", "tcp", "src", src, "dst", dst, "refused", refused, "err", err)
		return
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		// The client gave up meanwhile, or its SYN was bad.
		r.Complete(true)
		up.Close()
		s.log.Debug("create endpoint", "src", src, "dst", dst, "err", terr)
		return
	}
	r.Complete(false)
	ep.SocketOptions().SetDelayOption(false)
	client := gonet.NewTCPConn(&wq, ep)
	s.wg.Add(1)
	defer s.wg.Done()
	relayTCP(client, ep, up.(*net.TCPConn))
}

// halfCloser is a stream that can close its write side alone.
type halfCloser interface {
	net.Conn
	CloseWrite() error
}

// relayTCP copies both ways until both directions ended. EOF in one direction
// is passed on as a half close (FIN); an error (a reset) aborts both sides
// with a RST, so each peer sees the outcome the other one caused.
func relayTCP(client *gonet.TCPConn, ep tcpip.Endpoint, up *net.TCPConn) {
	var once sync.Once
	abort := func() {
		once.Do(func() {
			up.SetLinger(0)
			up.Close()
			ep.Abort()
		})
	}
	var wg sync.WaitGroup
	wg.Add(2)
	pipe := func(dst, src halfCloser) {
		defer wg.Done()
		bp := relayBufs.Get().(*[]byte)
		_, err := io.CopyBuffer(dst, src, *bp)
		relayBufs.Put(bp)
		if err != nil {
			abort()
			return
		}
		dst.CloseWrite()
	}
	go pipe(up, client)
	pipe(client, up)
	wg.Wait()
	up.Close()
	client.Close()
}

var relayBufs = sync.Pool{New: func() any {
	b := make([]byte, relayBufSize)
	return &b
}}

// handleUDP is called by gVisor's forwarder for the first datagram of each
// 4-tuple the filter allowed. It must not block.
func (s *Stack) handleUDP(r *udp.ForwarderRequest) bool {
	id := r.ID()
	dst := netip.AddrPortFrom(addrFromTCPIP(id.LocalAddress), id.LocalPort)
	src := netip.AddrPortFrom(addrFromTCPIP(id.RemoteAddress), id.RemotePort)
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		s.log.Debug("create UDP endpoint", "src", src, "dst", dst, "err", terr)
		return true // handled: dropped, no ICMP from gVisor
	}
	client := gonet.NewUDPConn(&wq, ep)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.relayUDP(client, src, dst)
	}()
	return true
}

// relayUDP relays one UDP flow through a connected socket until it has been
// idle for the engine's UDP timeout. The connected socket makes the kernel
// drop datagrams from any other source, so replies reach the client only
// from the address and port it sent to.
func (s *Stack) relayUDP(client *gonet.UDPConn, src, dst netip.AddrPort) {
	defer client.Close()
	key := filter.FlowKey{Proto: uint8(header.UDPProtocolNumber), Src: src, Dst: dst}
	defer s.eng.Forget(key)
	network := "udp4"
	if dst.Addr().Is6() {
		network = "udp6"
	}
	up, err := s.dialer.net.DialContext(s.ctx, network, dst.String())
	if err != nil {
		s.log.Debug("dial failed", "proto", "udp", "src", src, "dst", dst, "err", err)
		return
	}
	defer up.Close()
	idle := s.eng.Timeouts().UDPIdle
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	done := make(chan struct{})
	var once sync.Once
	stop := func() { once.Do(func() { close(done); client.Close(); up.Close() }) }
	pipe := func(dst, src net.Conn) {
		defer stop()
		buf := make([]byte, s.mtu)
		for {
			src.SetReadDeadline(time.Unix(0, last.Load()).Add(idle))
			n, err := src.Read(buf)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() && time.Since(time.Unix(0, last.Load())) < idle {
					continue // the other direction was active
				}
				if isRefused(err) {
					// The destination answered "port unreachable"
					// to an earlier datagram; keep relaying, a
					// server may come up.
					continue
				}
				return
			}
			last.Store(time.Now().UnixNano())
			if _, err := dst.Write(buf[:n]); err != nil && !isRefused(err) {
				return
			}
		}
	}
	go pipe(up, client)
	pipe(client, up)
	<-done
}

func isRefused(err error) bool { return errors.Is(err, syscall.ECONNREFUSED) }

// tcpipAddr converts a netip.Addr for gVisor.
func tcpipAddr(a netip.Addr) tcpip.Address { return tcpip.AddrFromSlice(a.AsSlice()) }
