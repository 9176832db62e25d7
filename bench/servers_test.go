package bench

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
)

// Ports of the benchmark servers in the server namespace. TCP servers listen
// on 0.0.0.0 (the service address on lo and the veth address alike); the UDP
// server binds each address itself so that replies leave from the address
// the client sent to.
const (
	portBulk = 5201 // 1 command byte: 'U' sink then report count, 'D' source
	portEcho = 5202 // echo (request/response, idle flows)
	portCRR  = 5203 // read 64 bytes, write them back, close
	// portPeek serves as portCRR; tunfw's bench config has a rule by name
	// for it, so each connection is peeked (read before it is dialled).
	portPeek = 5204
	portUDP  = 5204 // see udpServer
)

const (
	bulkBuf      = 256 << 10
	maxConnLife  = 3 * time.Minute // no server connection outlives this
	udpPayload   = 1400            // fits a 1500-byte TUN MTU with IP and UDP headers
	udpSockBuf   = 8 << 20
	crrMsg       = 64
	echoBuf      = 4 << 10
	udpHeaderLen = 1 + 8 + 8
)

// servers are the benchmark's servers in the server namespace.
type servers struct {
	t     *testing.T
	lns   []net.Listener
	udps  []*udpServer
	mu    sync.Mutex
	conns map[net.Conn]struct{}
}

func startServers(t *testing.T, ns *netnstest.NS, udpAddrs []netip.Addr) *servers {
	t.Helper()
	s := &servers{t: t, conns: map[net.Conn]struct{}{}}
	t.Cleanup(s.close)
	for _, sv := range []struct {
		port    int
		handler func(net.Conn)
	}{{portBulk, serveBulk}, {portEcho, serveEcho}, {portCRR, serveCRR}, {portPeek, serveCRR}} {
		ln, err := ns.Listen("tcp4", netip.AddrPortFrom(netip.IPv4Unspecified(), uint16(sv.port)).String())
		if err != nil {
			t.Fatalf("listen tcp %d: %v", sv.port, err)
		}
		s.lns = append(s.lns, ln)
		go s.accept(ln, sv.handler)
	}
	for _, a := range udpAddrs {
		pc, err := ns.ListenPacket("udp", netip.AddrPortFrom(a, portUDP).String())
		if err != nil {
			t.Fatalf("listen udp %s: %v", a, err)
		}
		uc := pc.(*net.UDPConn)
		setSockBufs(uc)
		u := &udpServer{pc: uc, recv: map[uint64]int64{}, sent: map[uint64]*udpSend{}}
		s.udps = append(s.udps, u)
		go u.serve()
	}
	return s
}

func (s *servers) accept(ln net.Listener, h func(net.Conn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		go func() {
			defer func() {
				c.Close()
				s.mu.Lock()
				delete(s.conns, c)
				s.mu.Unlock()
			}()
			c.SetDeadline(time.Now().Add(maxConnLife))
			h(c)
		}()
	}
}

func (s *servers) close() {
	for _, ln := range s.lns {
		ln.Close()
	}
	for _, u := range s.udps {
		u.pc.Close()
	}
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
}

// serveBulk: 'U' reads until EOF and answers the byte count (8 bytes, big
// endian); 'D' writes until the client goes away.
func serveBulk(c net.Conn) {
	var cmd [1]byte
	if _, err := io.ReadFull(c, cmd[:]); err != nil {
		return
	}
	buf := make([]byte, bulkBuf)
	switch cmd[0] {
	case 'U':
		var total int64
		for {
			n, err := c.Read(buf)
			total += int64(n)
			if err != nil {
				if !errors.Is(err, io.EOF) {
					return
				}
				break
			}
		}
		binary.BigEndian.PutUint64(buf[:8], uint64(total))
		c.Write(buf[:8])
	case 'D':
		for {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	}
}

func serveEcho(c net.Conn) {
	buf := make([]byte, echoBuf)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// serveCRR echoes one 64-byte message and closes first, so TIME_WAIT stays
// on the server side and the client's ports do not run out.
func serveCRR(c net.Conn) {
	var buf [crrMsg]byte
	if _, err := io.ReadFull(c, buf[:]); err != nil {
		return
	}
	c.Write(buf[:])
}

// setSockBufs gives a UDP socket large buffers (SO_*BUFFORCE: the test runs
// as root; the socket lives in a test namespace).
func setSockBufs(c *net.UDPConn) {
	rc, err := c.SyscallConn()
	if err != nil {
		return
	}
	rc.Control(func(fd uintptr) {
		syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUFFORCE, udpSockBuf)
		syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUFFORCE, udpSockBuf)
	})
}

// UDP messages: type byte, run id (8 bytes), then an 8-byte argument.
//
//	'H' hello          -> 'h' (establishes the flow through tunfw)
//	'P' payload        counted per run id (client->server runs)
//	'Q' query          -> 'q' with the count of 'P' received for the run id
//	'S' start, arg = number of datagrams; the next 8 bytes = interval in ns
//	                   -> 's', then the server paces that many 'P' to the sender
//	'R' result         -> 'r' with the number sent, then 1 byte done flag
type udpServer struct {
	pc   *net.UDPConn
	mu   sync.Mutex
	recv map[uint64]int64
	sent map[uint64]*udpSend
}

type udpSend struct {
	sent int64
	done bool
}

func udpMsg(buf []byte, typ byte, run, arg uint64) []byte {
	buf[0] = typ
	binary.BigEndian.PutUint64(buf[1:9], run)
	binary.BigEndian.PutUint64(buf[9:17], arg)
	return buf[:udpHeaderLen]
}

func (u *udpServer) serve() {
	buf := make([]byte, 65536)
	out := make([]byte, 64)
	for {
		n, from, err := u.pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		if n < udpHeaderLen {
			continue
		}
		run := binary.BigEndian.Uint64(buf[1:9])
		arg := binary.BigEndian.Uint64(buf[9:17])
		switch buf[0] {
		case 'P':
			u.mu.Lock()
			u.recv[run]++
			u.mu.Unlock()
		case 'H':
			u.pc.WriteToUDPAddrPort(udpMsg(out, 'h', run, 0), from)
		case 'Q':
			u.mu.Lock()
			cnt := u.recv[run]
			u.mu.Unlock()
			u.pc.WriteToUDPAddrPort(udpMsg(out, 'q', run, uint64(cnt)), from)
		case 'S':
			if n < udpHeaderLen+8 {
				continue
			}
			interval := time.Duration(binary.BigEndian.Uint64(buf[17:25]))
			u.mu.Lock()
			_, dup := u.sent[run]
			if !dup {
				u.sent[run] = &udpSend{}
			}
			u.mu.Unlock()
			u.pc.WriteToUDPAddrPort(udpMsg(out, 's', run, 0), from)
			if !dup && arg > 0 && arg <= 10_000_000 && interval > 0 {
				go u.send(run, int(arg), interval, from)
			}
		case 'R':
			u.mu.Lock()
			st := u.sent[run]
			var cnt int64
			var done bool
			if st != nil {
				cnt, done = st.sent, st.done
			}
			u.mu.Unlock()
			m := udpMsg(out, 'r', run, uint64(cnt))
			m = append(m, 0)
			if done {
				m[len(m)-1] = 1
			}
			u.pc.WriteToUDPAddrPort(m, from)
		}
	}
}

// send paces n payload datagrams of run to dst.
func (u *udpServer) send(run uint64, n int, interval time.Duration, dst netip.AddrPort) {
	pkt := make([]byte, udpPayload)
	udpMsg(pkt, 'P', run, 0)
	sent := pace(n, interval, time.Now().Add(time.Duration(n)*interval*3+5*time.Second), func(i int) error {
		binary.BigEndian.PutUint64(pkt[9:17], uint64(i))
		_, err := u.pc.WriteToUDPAddrPort(pkt, dst)
		return err
	})
	u.mu.Lock()
	u.sent[run].sent = int64(sent)
	u.sent[run].done = true
	u.mu.Unlock()
}

// pace calls send n times, the i-th call not before start+i*interval, and
// returns the number of calls without error. If it falls behind it catches
// up in a burst, so the average offered rate holds. It gives up at
// deadline.
func pace(n int, interval time.Duration, deadline time.Time, send func(i int) error) int {
	start := time.Now()
	sent := 0
	for i := 0; i < n; {
		elapsed := time.Since(start)
		due := min(int(elapsed/interval)+1, n)
		if due <= i {
			time.Sleep(time.Duration(i)*interval - elapsed)
			continue
		}
		if time.Now().After(deadline) {
			break
		}
		for ; i < due; i++ {
			if send(i) == nil {
				sent++
			}
		}
	}
	return sent
}
