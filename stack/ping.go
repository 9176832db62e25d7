package stack

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"

	"github.com/tunfw/tunfw/filter"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// icmpFilter is Linux's ICMP_FILTER option of SOL_RAW (not in x/sys).
const icmpFilter = 1

// pinger forwards allowed ICMP echo requests to the real hosts through raw
// sockets and relays their real replies. Each flow's echo identifier is
// replaced by one unique to tunfw, so that clients using the same identifier
// towards the same host, and pings from other programs, are told apart.
//
// Raw sockets need CAP_NET_RAW but no ping_group_range, which network
// namespaces start with closed.
type pinger struct {
	s      *Stack
	c4, c6 *net.IPConn

	mu     sync.Mutex
	nextID uint16
	byFlow map[pingFlow]uint16
	byWire map[pingWire]pingEntry
}

// pingFlow names an echo flow as the client sees it.
type pingFlow struct {
	src, dst netip.Addr
	id       uint16
}

// pingWire names it as the real network sees it.
type pingWire struct {
	dst netip.Addr
	id  uint16
}

type pingEntry struct {
	flow pingFlow
	last int64
}

func newPinger(s *Stack) (*pinger, error) {
	p := &pinger{
		s:      s,
		byFlow: make(map[pingFlow]uint16),
		byWire: make(map[pingWire]pingEntry),
	}
	lc := net.ListenConfig{Control: s.dialer.control}
	c4, err4 := lc.ListenPacket(context.Background(), "ip4:icmp", "0.0.0.0")
	if err4 == nil {
		p.c4 = c4.(*net.IPConn)
		err4 = setICMPFilter(p.c4, false)
	}
	c6, err6 := lc.ListenPacket(context.Background(), "ip6:ipv6-icmp", "::")
	if err6 == nil {
		p.c6 = c6.(*net.IPConn)
		err6 = setICMPFilter(p.c6, true)
	}
	if p.c4 == nil && p.c6 == nil {
		return nil, fmt.Errorf("open raw ICMP sockets: %w", errors.Join(err4, err6))
	}
	if err4 != nil || err6 != nil {
		s.log.Warn("ICMP echo forwarding limited to one family", "err", errors.Join(err4, err6))
	}
	for _, c := range []*net.IPConn{p.c4, p.c6} {
		if c != nil {
			s.wg.Add(1)
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

// send forwards the echo request pkt (parsed as p) to its real destination.
func (pg *pinger) send(p *filter.Packet, pkt []byte) {
	c := pg.c4
	if p.Version == 6 {
		c = pg.c6
	}
	if c == nil {
		return
	}
	msg := pkt[p.IPHeaderLen:p.Len]
	if len(msg) < 8 {
		return
	}
	flow := pingFlow{src: p.Src, dst: p.Dst, id: p.SrcPort}
	now := pg.s.now()
	pg.mu.Lock()
	wire, ok := pg.byFlow[flow]
	if !ok {
		wire = pg.allocLocked(p.Dst)
		pg.byFlow[flow] = wire
	}
	pg.byWire[pingWire{p.Dst, wire}] = pingEntry{flow: flow, last: now}
	pg.mu.Unlock()

	// Rewrite the identifier in place: pkt is the read loop's buffer and is
	// not used again after this packet.
	binary.BigEndian.PutUint16(msg[4:6], wire)
	msg[2], msg[3] = 0, 0
	if p.Version == 4 {
		binary.BigEndian.PutUint16(msg[2:4], ^checksum.Checksum(msg, 0))
	} // ICMPv6: the kernel computes the checksum of raw ICMPv6 sockets.
	if _, err := c.WriteTo(msg, &net.IPAddr{IP: p.Dst.AsSlice()}); err != nil {
		pg.s.log.Debug("send echo request", "dst", p.Dst, "err", err)
	}
}

// allocLocked picks an identifier not in use towards dst.
func (pg *pinger) allocLocked(dst netip.Addr) uint16 {
	for {
		pg.nextID++
		if _, busy := pg.byWire[pingWire{dst, pg.nextID}]; !busy {
			return pg.nextID
		}
	}
}

func (pg *pinger) readLoop(c *net.IPConn) {
	defer pg.s.wg.Done()
	buf := make([]byte, 65535)
	out := make([]byte, tunOffset+pg.s.mtu)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if errors.Is(err, syscall.EINTR) {
				continue
			}
			pg.s.log.Debug("read echo reply", "err", err)
			continue
		}
		ip, ok := netip.AddrFromSlice(from.(*net.IPAddr).IP)
		if !ok || n < 8 {
			continue
		}
		pg.reply(ip.Unmap(), buf[:n], out)
	}
}

// reply relays the echo reply msg (ICMP header and data) from src to the
// client whose request it answers.
func (pg *pinger) reply(src netip.Addr, msg, out []byte) {
	wantType := uint8(header.ICMPv4EchoReply)
	if src.Is6() {
		wantType = uint8(header.ICMPv6EchoReply)
	}
	if msg[0] != wantType {
		return
	}
	wire := binary.BigEndian.Uint16(msg[4:6])
	pg.mu.Lock()
	e, ok := pg.byWire[pingWire{src, wire}]
	pg.mu.Unlock()
	if !ok {
		return // another program's ping, or an expired flow
	}
	ipLen := header.IPv4MinimumSize
	if src.Is6() {
		ipLen = header.IPv6MinimumSize
	}
	total := ipLen + len(msg)
	if tunOffset+total > len(out) {
		return // larger than the TUN MTU; the request could not have been
	}
	pkt := out[tunOffset : tunOffset+total]
	icmp := pkt[ipLen:]
	copy(icmp, msg)
	binary.BigEndian.PutUint16(icmp[4:6], e.flow.id)
	icmp[2], icmp[3] = 0, 0
	if src.Is4() {
		ip := header.IPv4(pkt)
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(total),
			TTL:         64,
			Protocol:    uint8(header.ICMPv4ProtocolNumber),
			SrcAddr:     tcpipAddr(src),
			DstAddr:     tcpipAddr(e.flow.src),
		})
		ip.SetChecksum(^ip.CalculateChecksum())
		binary.BigEndian.PutUint16(icmp[2:4], ^checksum.Checksum(icmp, 0))
	} else {
		ip := header.IPv6(pkt)
		ip.Encode(&header.IPv6Fields{
			PayloadLength:     uint16(len(icmp)),
			TransportProtocol: header.ICMPv6ProtocolNumber,
			HopLimit:          64,
			SrcAddr:           tcpipAddr(src),
			DstAddr:           tcpipAddr(e.flow.src),
		})
		h := header.ICMPv6(icmp)
		h.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
			Header: h,
			Src:    tcpipAddr(src),
			Dst:    tcpipAddr(e.flow.src),
		}))
	}
	var p filter.Packet
	if filter.ParsePacket(pkt, &p) == nil {
		pg.s.eng.Outbound(&p, pg.s.now())
	}
	pg.s.writeRaw(out[:tunOffset+total])
}

// expire forgets echo flows idle for longer than the engine's ICMP timeout.
func (pg *pinger) expire(now int64) {
	idle := int64(pg.s.eng.Timeouts().ICMPIdle)
	pg.mu.Lock()
	defer pg.mu.Unlock()
	for w, e := range pg.byWire {
		if now-e.last > idle {
			delete(pg.byWire, w)
			if pg.byFlow[e.flow] == w.id {
				delete(pg.byFlow, e.flow)
			}
		}
	}
}

func (pg *pinger) close() {
	if pg.c4 != nil {
		pg.c4.Close()
	}
	if pg.c6 != nil {
		pg.c6.Close()
	}
}
