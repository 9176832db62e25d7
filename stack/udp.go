package stack

import (
	"errors"
	"net"
	"net/netip"
	"os"
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
// replies in IP and UDP headers for the client. That is one syscall each
// way per datagram and no copy through a stack endpoint.

// udpRcvBuf is the receive buffer asked for on each flow's socket, so a
// burst of replies waits there rather than being dropped by the kernel.
const udpRcvBuf = 1 << 20

// udpFlow is one relayed UDP flow.
type udpFlow struct {
	key  filter.FlowKey
	conn *net.UDPConn
	raw  syscall.RawConn
	last atomic.Int64 // engine clock of the last datagram either way

	// send and its arguments are set up once, so forwarding a datagram
	// from the read loop allocates nothing.
	send    func(fd uintptr) bool
	sendBuf []byte
	sendErr error
}

func newUDPFlow(key filter.FlowKey, conn *net.UDPConn, raw syscall.RawConn) *udpFlow {
	f := &udpFlow{key: key, conn: conn, raw: raw}
	f.send = func(fd uintptr) bool {
		_, f.sendErr = unix.Write(int(fd), f.sendBuf)
		return true // never wait: a full buffer drops the datagram
	}
	return f
}

// forwardUDP sends the payload of an allowed datagram read from the TUN to
// its destination, opening the flow's socket with its first datagram. It
// runs on the read loop and never blocks: a datagram that finds the
// socket's buffer full is dropped and counted, as a router would.
func (s *Stack) forwardUDP(p *filter.Packet, pkt []byte, now int64) {
	key := filter.FlowKey{Proto: filter.ProtoUDP, Src: netip.AddrPortFrom(p.Src, p.SrcPort), Dst: netip.AddrPortFrom(p.Dst, p.DstPort)}
	s.udpMu.Lock()
	f := s.udpFlows[key]
	s.udpMu.Unlock()
	if f == nil {
		var err error
		if f, err = s.openUDP(key, now); err != nil {
			s.udpWriteDrops.Add(1)
			s.log.Debug("dial failed", "proto", "udp", "src", key.Src, "dst", key.Dst, "err", err)
			return
		}
	}
	f.last.Store(now)
	f.sendBuf = pkt[p.IPHeaderLen+header.UDPMinimumSize : p.Len]
	if err := f.raw.Write(f.send); err != nil || (f.sendErr != nil && !errors.Is(f.sendErr, unix.ECONNREFUSED)) {
		s.udpWriteDrops.Add(1)
	}
	f.sendBuf = nil
}

// openUDP connects a socket for flow key and starts relaying its replies.
func (s *Stack) openUDP(key filter.FlowKey, now int64) (*udpFlow, error) {
	network := "udp4"
	if key.Dst.Addr().Is6() {
		network = "udp6"
	}
	c, err := s.dialer.net.DialContext(s.ctx, network, key.Dst.String())
	if err != nil {
		return nil, err
	}
	uc := c.(*net.UDPConn)
	raw, err := uc.SyscallConn()
	if err != nil {
		uc.Close()
		return nil, err
	}
	raw.Control(func(fd uintptr) {
		// Best effort: without CAP_NET_ADMIN the default stays.
		unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, udpRcvBuf)
	})
	f := newUDPFlow(key, uc, raw)
	f.last.Store(now)
	// Under udpMu, so Close either sees this flow or this sees Close.
	s.udpMu.Lock()
	if err := s.ctx.Err(); err != nil {
		s.udpMu.Unlock()
		uc.Close()
		return nil, err
	}
	s.udpFlows[key] = f
	s.wg.Add(1)
	s.udpMu.Unlock()
	s.track(key, func() { uc.Close() })
	go s.udpReplies(f)
	return f, nil
}

// udpReplies turns the datagrams the destination sends into packets for the
// client until the flow has been idle for the engine's UDP timeout or is
// closed. The socket is connected, so the kernel drops datagrams from any
// other source: replies reach the client only from the address and port it
// sent to. A buffer is taken only once a datagram is there.
func (s *Stack) udpReplies(f *udpFlow) {
	defer s.wg.Done()
	defer s.closeUDP(f)
	defer s.recoverFlow(f.key)
	ipLen := header.IPv4MinimumSize
	if f.key.Dst.Addr().Is6() {
		ipLen = header.IPv6MinimumSize
	}
	off := tunOffset + ipLen + header.UDPMinimumSize
	for {
		idle := int64(s.eng.Timeouts().UDPIdle)
		left := idle - (s.now() - f.last.Load())
		if left <= 0 {
			return
		}
		f.conn.SetReadDeadline(time.Now().Add(time.Duration(left)))
		// One recv per datagram, inside RawConn.Read: the buffer is
		// taken only once a datagram is there.
		var bp *[]byte
		var n int
		var rerr error
		err := f.raw.Read(func(fd uintptr) bool {
			bp = s.bufPool.Get().(*[]byte)
			for {
				n, rerr = unix.Read(int(fd), (*bp)[off:])
				if rerr != unix.EINTR {
					break
				}
			}
			if rerr == unix.EAGAIN {
				s.bufPool.Put(bp)
				bp = nil
				return false // wait in the netpoller
			}
			return true
		})
		if err == nil && rerr != nil {
			s.bufPool.Put(bp)
			if errors.Is(rerr, unix.ECONNREFUSED) {
				// "Port unreachable" for an earlier datagram: keep
				// the flow, a server may come up.
				continue
			}
			return
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				continue // idle so far; the loop checks the timeout
			}
			return
		}
		b := *bp
		now := s.now()
		f.last.Store(now)
		total := ipLen + header.UDPMinimumSize + n
		if total > s.mtu {
			s.udpWriteDrops.Add(1) // larger than the TUN takes
			s.bufPool.Put(bp)
			continue
		}
		p := buildUDPReply(b[tunOffset:tunOffset+total], f.key)
		s.eng.Outbound(&p, now)
		s.writeRaw(b[:tunOffset+total])
		s.bufPool.Put(bp)
	}
}

// closeUDP ends a flow: its socket, its table entries and its flow.
func (s *Stack) closeUDP(f *udpFlow) {
	f.conn.Close()
	s.udpMu.Lock()
	if s.udpFlows[f.key] == f {
		delete(s.udpFlows, f.key)
	}
	s.udpMu.Unlock()
	s.untrack(f.key)
	s.eng.Forget(f.key)
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
