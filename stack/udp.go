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
// replies in IP and UDP headers for the client. Datagrams that come in a
// burst travel in batches both ways (udpbatch.go, udpReplies): one GSO
// sendmsg out, one coalesced TUN write back.

// udpRcvBuf is the receive buffer asked for on each flow's socket, so a
// burst of replies waits there rather than being dropped by the kernel:
// at 1 Gbit/s offered, 1 MiB lost about 1% of the datagrams, 4 MiB none
// (make bench, udp-s2c). It is kernel memory, used only while replies
// queue, and bounded overall by net.ipv4.udp_mem.
const udpRcvBuf = 4 << 20

// udpFlow is one relayed UDP flow.
type udpFlow struct {
	key  filter.FlowKey
	conn *net.UDPConn
	raw  syscall.RawConn
	last atomic.Int64 // engine clock of the last datagram either way

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
}

func newUDPFlow(key filter.FlowKey, conn *net.UDPConn, raw syscall.RawConn) *udpFlow {
	f := &udpFlow{key: key, conn: conn, raw: raw, oob: newGSOControl(), gso: true}
	f.send = func(fd uintptr) bool {
		_, f.sendErr = unix.Write(int(fd), f.sendBuf)
		return true // never wait: a full buffer drops the datagram
	}
	f.sendGSO = func(fd uintptr) bool {
		_, f.sendErr = unix.SendmsgN(int(fd), f.sendBuf, f.oob, nil, 0)
		return true
	}
	return f
}

// forwardUDP sends the payload of an allowed datagram read from the TUN to
// its destination, opening the flow's socket with its first datagram. It
// runs on the read loop and never blocks: a datagram that finds the
// socket's buffer full is dropped and counted, as a router would. The
// send may wait in the flow's batch until the read loop has read what the
// TUN holds (udpbatch.go).
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
	s.queueUDP(f, pkt[p.IPHeaderLen+header.UDPMinimumSize:p.Len])
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
	defer s.recoverFlow(f.key)
	ipLen := header.IPv4MinimumSize
	if f.key.Dst.Addr().Is6() {
		ipLen = header.IPv6MinimumSize
	}
	var r sockReader
	r.init(func() *[]byte { return s.bufPool.Get().(*[]byte) }, func(bp *[]byte) { s.bufPool.Put(bp) },
		tunOffset+ipLen+header.UDPMinimumSize)
	held := make([]*[]byte, 0, udpReplyBatch)
	pkts := make([][]byte, 0, udpReplyBatch)
	for {
		idle := int64(s.eng.Timeouts().UDPIdle)
		left := idle - (s.now() - f.last.Load())
		if left <= 0 {
			return
		}
		f.conn.SetReadDeadline(time.Now().Add(time.Duration(left)))
		// The first datagram: wait in the netpoller for it.
		r.wait = true
		err := f.raw.Read(r.read)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				continue // idle so far; the loop checks the timeout
			}
			return
		}
		if r.err != nil {
			if errors.Is(r.err, unix.ECONNREFUSED) {
				// "Port unreachable" for an earlier datagram: keep
				// the flow, a server may come up.
				continue
			}
			return
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
