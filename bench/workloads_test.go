package bench

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
)

// path is one way from a client namespace to the server: through tunfw
// (the service address, routed into the TUN) or direct (the server's veth
// address, which is not). The client is tunfw's own namespace, or in
// gateway mode a namespace routed through it.
type path struct {
	name   string
	dst    netip.Addr
	client *netnstest.NS
}

func (p path) tunfw() bool { return p.name == "tunfw" }

func (p path) addr(port int) string { return netip.AddrPortFrom(p.dst, uint16(port)).String() }

// dial connects to port on p from p's client namespace. A connect that
// times out is retried (3 attempts of 3s, each from a new port) and noted:
// the workloads that use it measure throughput and latency on an open
// connection, not connection setup.
func (b *bench) dial(p path, port int) (net.Conn, error) {
	var err error
	for try := 1; try <= 3; try++ {
		var c net.Conn
		if c, err = p.client.DialTimeout("tcp4", p.addr(port), 3*time.Second); err == nil {
			if try > 1 {
				b.res.note("via %s: connect to port %d needed %d attempts", p.name, port, try)
			}
			return c, nil
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() {
				return nil, err
			}
		}
	}
	return nil, err
}

// ---- TCP bulk ----

type bulkResult struct {
	bytes int64
	secs  float64
}

func (r bulkResult) gbps() float64 { return float64(r.bytes) * 8 / r.secs / 1e9 }

// bulk moves data over streams parallel connections for dur, client->server
// (up) or server->client, and returns what the receiver got and the time
// it took.
func (b *bench) bulk(p path, streams int, up bool, dur time.Duration) (bulkResult, error) {
	conns := make([]*net.TCPConn, 0, streams)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	cmd := []byte{'D'}
	if up {
		cmd[0] = 'U'
	}
	for range streams {
		c, err := b.dial(p, portBulk)
		if err != nil {
			return bulkResult{}, fmt.Errorf("dial: %w", err)
		}
		tc := c.(*net.TCPConn)
		conns = append(conns, tc)
		tc.SetDeadline(time.Now().Add(dur + 30*time.Second))
		if _, err := tc.Write(cmd); err != nil {
			return bulkResult{}, fmt.Errorf("write command: %w", err)
		}
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		total int64
		last  time.Time
		errs  []error
	)
	start := time.Now()
	end := start.Add(dur)
	for _, c := range conns {
		wg.Go(func() {
			n, err := bulkStream(c, up, end)
			mu.Lock()
			defer mu.Unlock()
			total += n
			if now := time.Now(); now.After(last) {
				last = now
			}
			if err != nil {
				errs = append(errs, err)
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return bulkResult{}, err
	}
	secs := dur.Seconds()
	if up {
		// The count comes from the server after it read EOF: the time
		// includes draining what was still buffered on the way.
		secs = last.Sub(start).Seconds()
	}
	if total == 0 {
		return bulkResult{}, errors.New("no bytes arrived")
	}
	return bulkResult{bytes: total, secs: secs}, nil
}

func bulkStream(c *net.TCPConn, up bool, end time.Time) (int64, error) {
	buf := make([]byte, bulkBuf)
	if up {
		c.SetWriteDeadline(end)
		for {
			if _, err := c.Write(buf); err != nil {
				if !errors.Is(err, os.ErrDeadlineExceeded) {
					return 0, fmt.Errorf("write: %w", err)
				}
				break
			}
		}
		if err := c.CloseWrite(); err != nil {
			return 0, fmt.Errorf("close write: %w", err)
		}
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		var cnt [8]byte
		if _, err := io.ReadFull(c, cnt[:]); err != nil {
			return 0, fmt.Errorf("read count from server: %w", err)
		}
		return int64(binary.BigEndian.Uint64(cnt[:])), nil
	}
	c.SetReadDeadline(end)
	var n int64
	for {
		m, err := c.Read(buf)
		n += int64(m)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return n, nil
			}
			return n, fmt.Errorf("read: %w", err)
		}
	}
}

// ---- TCP connection rate ----

type latencyResult struct {
	count    int
	rate     float64 // per second
	p50, p99 time.Duration
	errors   int
	firstErr error
}

// connRate runs conc workers that each connect, send 64 bytes, read them
// back, wait for the server's FIN and close, in a loop for dur. The workers
// run in a helper process inside p's client namespace (see
// TestBenchHelper): dialling from threads locked into the namespace costs a
// thread hand-off at every blocking step and capped the direct path's rate.
func (b *bench) connRate(p path, port, conc int, dur time.Duration) (latencyResult, error) {
	h, err := b.startHelper(p.client, "crr", map[string]string{
		"ADDR": p.addr(port), "CONC": strconv.Itoa(conc), "DUR": strconv.FormatInt(int64(dur), 10),
	})
	if err != nil {
		return latencyResult{}, err
	}
	defer h.close()
	kv, err := h.report(dur + 30*time.Second)
	if err != nil {
		return latencyResult{}, err
	}
	var r latencyResult
	r.count, _ = strconv.Atoi(kv["count"])
	r.errors, _ = strconv.Atoi(kv["errors"])
	if kv["first"] != "" && kv["first"] != "<nil>" {
		r.firstErr = errors.New(kv["first"])
	}
	secs, _ := strconv.ParseFloat(kv["secs"], 64)
	p50, _ := strconv.ParseInt(kv["p50"], 10, 64)
	p99, _ := strconv.ParseInt(kv["p99"], 10, 64)
	r.p50, r.p99 = time.Duration(p50), time.Duration(p99)
	if r.count == 0 || secs <= 0 {
		return latencyResult{}, fmt.Errorf("no connection completed (%d errors, first: %v)", r.errors, r.firstErr)
	}
	r.rate = float64(r.count) / secs
	return r, nil
}

// crrLoop is the helper's side of connRate.
func crrLoop(addr string, conc int, dur time.Duration) map[string]string {
	var (
		mu       sync.Mutex
		lats     []time.Duration
		nerr     int
		firstErr error
		wg       sync.WaitGroup
	)
	start := time.Now()
	end := start.Add(dur)
	for range conc {
		wg.Go(func() {
			local := make([]time.Duration, 0, 4096)
			var lerr int
			var lfirst error
			d := net.Dialer{Timeout: 5 * time.Second, FallbackDelay: -1}
			msg := make([]byte, crrMsg)
			buf := make([]byte, crrMsg+1)
			for time.Now().Before(end) && lerr <= 1000 {
				t0 := time.Now()
				if err := crrOnce(&d, addr, msg, buf); err != nil {
					lerr++
					if lfirst == nil {
						lfirst = err
					}
					continue
				}
				local = append(local, time.Since(t0))
			}
			mu.Lock()
			defer mu.Unlock()
			lats = append(lats, local...)
			nerr += lerr
			if firstErr == nil {
				firstErr = lfirst
			}
		})
	}
	wg.Wait()
	kv := map[string]string{
		"count": strconv.Itoa(len(lats)), "errors": strconv.Itoa(nerr),
		"secs": strconv.FormatFloat(time.Since(start).Seconds(), 'f', 6, 64),
	}
	if len(lats) > 0 {
		p50, p99 := percentiles(lats)
		kv["p50"], kv["p99"] = strconv.FormatInt(int64(p50), 10), strconv.FormatInt(int64(p99), 10)
	}
	if firstErr != nil {
		kv["first"] = firstErr.Error()
	}
	return kv
}

func crrOnce(d *net.Dialer, addr string, msg, buf []byte) error {
	c, err := d.Dial("tcp4", addr)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(msg); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if _, err := io.ReadFull(c, buf[:crrMsg]); err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	// Wait for the server's FIN: it closes first.
	if n, err := c.Read(buf); n != 0 || !errors.Is(err, io.EOF) {
		return fmt.Errorf("want EOF after the echo, got %d bytes, %v", n, err)
	}
	return nil
}

// ---- request/response ----

func (b *bench) requestResponse(p path, dur time.Duration) (latencyResult, error) {
	c, err := b.dial(p, portEcho)
	if err != nil {
		return latencyResult{}, fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(dur + 10*time.Second))
	msg := make([]byte, 64)
	buf := make([]byte, 64)
	lats := make([]time.Duration, 0, 1<<16)
	start := time.Now()
	end := start.Add(dur)
	for time.Now().Before(end) {
		t0 := time.Now()
		if _, err := c.Write(msg); err != nil {
			return latencyResult{}, fmt.Errorf("write: %w", err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			return latencyResult{}, fmt.Errorf("read: %w", err)
		}
		lats = append(lats, time.Since(t0))
	}
	r := latencyResult{count: len(lats), rate: float64(len(lats)) / time.Since(start).Seconds()}
	r.p50, r.p99 = percentiles(lats)
	return r, nil
}

// idleGap is how long rr-idle's connection is quiet before each request:
// longer than tunfw's relays linger (100 ms) before they go idle.
const idleGap = 150 * time.Millisecond

// idleResult is what requestAfterIdle measured.
type idleResult struct{ p50, p90 time.Duration }

// requestAfterIdle exchanges 64 bytes n times on one connection, each
// time gap after the last response, and times each exchange.
func (b *bench) requestAfterIdle(p path, n int, gap time.Duration) (idleResult, error) {
	c, err := b.dial(p, portEcho)
	if err != nil {
		return idleResult{}, fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	msg := make([]byte, 64)
	buf := make([]byte, 64)
	lats := make([]time.Duration, 0, n)
	for range n {
		time.Sleep(gap) // the workload itself: the connection is quiet
		c.SetDeadline(time.Now().Add(10 * time.Second))
		t0 := time.Now()
		if _, err := c.Write(msg); err != nil {
			return idleResult{}, fmt.Errorf("write: %w", err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			return idleResult{}, fmt.Errorf("read: %w", err)
		}
		lats = append(lats, time.Since(t0))
	}
	slices.Sort(lats)
	return idleResult{p50: quantile(lats, 0.5), p90: quantile(lats, 0.9)}, nil
}

// quantile returns the q quantile of d, sorted, by the nearest rank.
func quantile(d []time.Duration, q float64) time.Duration {
	return d[int(q*float64(len(d)-1)+0.5)]
}

func percentiles(d []time.Duration) (p50, p99 time.Duration) {
	slices.Sort(d)
	return quantile(d, 0.50), quantile(d, 0.99)
}

// ---- UDP at a fixed offered rate ----

const udpRate = 1e9 // offered payload bits per second

type udpResult struct {
	sent, recv int64
	secs       float64 // duration of the send
}

func (r udpResult) lossPct() float64 { return 100 * (1 - float64(r.recv)/float64(r.sent)) }
func (r udpResult) rxGbps() float64  { return float64(r.recv) * udpPayload * 8 / r.secs / 1e9 }

// rcvbufErrors sums the UDP datagrams the kernel dropped on a full socket
// receive buffer (RcvbufErrors, IPv4 and IPv6) in the namespaces nss:
// which part of a UDP workload's loss was a socket not read in time
// (tunfw's, the client's or the server's), rather than a queue or
// tunfw's own drops (counted in its stats).
func rcvbufErrors(nss []*netnstest.NS) (int64, error) {
	var sum int64
	for _, ns := range nss {
		out, err := ns.Cmd("cat", "/proc/net/snmp", "/proc/net/snmp6").Output()
		if err != nil {
			return 0, fmt.Errorf("read %s's UDP counters: %w", ns.Name, err)
		}
		n, err := parseRcvbufErrors(string(out))
		if err != nil {
			return 0, fmt.Errorf("%s: %w", ns.Name, err)
		}
		sum += n
	}
	return sum, nil
}

// parseRcvbufErrors reads RcvbufErrors from /proc/net/snmp ("Udp:" header
// and value lines) and /proc/net/snmp6 ("Udp6RcvbufErrors value") text.
func parseRcvbufErrors(text string) (int64, error) {
	var sum int64
	found := false
	var header []string
	for _, line := range strings.Split(text, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) == 2 && f[0] == "Udp6RcvbufErrors":
			n, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("Udp6RcvbufErrors %q: %w", f[1], err)
			}
			sum, found = sum+n, true
		case len(f) > 1 && f[0] == "Udp:":
			if header == nil {
				header = f
				continue
			}
			i := slices.Index(header, "RcvbufErrors")
			if i < 0 || i >= len(f) {
				return 0, errors.New("no RcvbufErrors in the Udp: lines")
			}
			n, err := strconv.ParseInt(f[i], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("RcvbufErrors %q: %w", f[i], err)
			}
			sum, found = sum+n, true
		}
	}
	if !found {
		return 0, errors.New("no UDP receive buffer counters")
	}
	return sum, nil
}

var udpInterval = time.Duration(float64(time.Second) * udpPayload * 8 / udpRate)

// udpExchange sends m on c until a reply of type want for run arrives (5
// tries), ignoring other datagrams, and returns the reply.
func udpExchange(c *net.UDPConn, m []byte, want byte, run uint64) ([]byte, error) {
	buf := make([]byte, 2048)
	for try := 0; try < 5; try++ {
		if _, err := c.Write(m); err != nil {
			return nil, err
		}
		c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		for {
			n, err := c.Read(buf)
			if err != nil {
				break // timeout: try again
			}
			if n >= udpHeaderLen && buf[0] == want && binary.BigEndian.Uint64(buf[1:9]) == run {
				return buf[:n], nil
			}
		}
	}
	return nil, fmt.Errorf("no %q reply after 5 tries", want)
}

func (b *bench) udpDial(p path) (*net.UDPConn, error) {
	c, err := p.client.Dial("udp4", p.addr(portUDP))
	if err != nil {
		return nil, err
	}
	uc := c.(*net.UDPConn)
	setSockBufs(uc)
	return uc, nil
}

// udpUp paces 1 Gbit/s of 1400-byte datagrams from client to server for
// dur and asks the server how many arrived.
func (b *bench) udpUp(p path, dur time.Duration) (udpResult, error) {
	c, err := b.udpDial(p)
	if err != nil {
		return udpResult{}, fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	run := b.runID.Add(1)
	hdr := make([]byte, 64)
	if _, err := udpExchange(c, udpMsg(hdr, 'H', run, 0), 'h', run); err != nil {
		return udpResult{}, fmt.Errorf("hello: %w", err)
	}
	n := int(dur / udpInterval)
	pkt := make([]byte, udpPayload)
	udpMsg(pkt, 'P', run, 0)
	start := time.Now()
	sent := pace(n, udpInterval, start.Add(3*dur+5*time.Second), func(i int) error {
		binary.BigEndian.PutUint64(pkt[9:17], uint64(i))
		_, err := c.Write(pkt)
		return err
	})
	secs := time.Since(start).Seconds()
	// Let the tail arrive, then ask until the count stops growing.
	var recv int64 = -1
	for i := 0; i < 10; i++ {
		time.Sleep(300 * time.Millisecond)
		r, err := udpExchange(c, udpMsg(hdr, 'Q', run, 0), 'q', run)
		if err != nil {
			return udpResult{}, fmt.Errorf("query count: %w", err)
		}
		cnt := int64(binary.BigEndian.Uint64(r[9:17]))
		if cnt == recv {
			break
		}
		recv = cnt
	}
	if sent == 0 {
		return udpResult{}, errors.New("nothing sent")
	}
	return udpResult{sent: int64(sent), recv: recv, secs: secs}, nil
}

// udpDown asks the server to pace 1 Gbit/s of 1400-byte datagrams to the
// client for dur, counts what arrives and asks the server how many it sent.
func (b *bench) udpDown(p path, dur time.Duration) (udpResult, error) {
	c, err := b.udpDial(p)
	if err != nil {
		return udpResult{}, fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	run := b.runID.Add(1)
	n := int(dur / udpInterval)
	m := make([]byte, 64)
	udpMsg(m, 'S', run, uint64(n))
	m = binary.BigEndian.AppendUint64(m[:udpHeaderLen], uint64(udpInterval))
	start := time.Now()
	var (
		recv     atomic.Int64
		sent     = int64(-1)
		doneAt   time.Time
		buf      = make([]byte, 2048)
		hardEnd  = start.Add(3*dur + 10*time.Second)
		queryAt  = start.Add(dur + 200*time.Millisecond)
		acked    bool
		startTry int
	)
	c.Write(m)
	for time.Now().Before(hardEnd) {
		now := time.Now()
		if !acked && recv.Load() == 0 && startTry < 5 && now.Sub(start) > time.Duration(startTry+1)*500*time.Millisecond {
			startTry++
			c.Write(m) // the server ignores a repeated start
		}
		if now.After(queryAt) {
			c.Write(udpMsg(make([]byte, 64), 'R', run, 0))
			queryAt = now.Add(200 * time.Millisecond)
		}
		if !doneAt.IsZero() && now.Sub(doneAt) > 300*time.Millisecond {
			break
		}
		c.SetReadDeadline(now.Add(100 * time.Millisecond))
		k, err := c.Read(buf)
		if err != nil || k < udpHeaderLen || binary.BigEndian.Uint64(buf[1:9]) != run {
			continue
		}
		switch buf[0] {
		case 'P':
			recv.Add(1)
		case 's':
			acked = true
		case 'r':
			if k > udpHeaderLen && buf[udpHeaderLen] == 1 && doneAt.IsZero() {
				sent = int64(binary.BigEndian.Uint64(buf[9:17]))
				doneAt = time.Now()
			}
		}
	}
	if sent < 0 {
		return udpResult{}, fmt.Errorf("server did not report the end of the run (received %d)", recv.Load())
	}
	if sent == 0 {
		return udpResult{}, errors.New("server sent nothing")
	}
	return udpResult{sent: sent, recv: recv.Load(), secs: float64(n) * udpInterval.Seconds()}, nil
}
