package e2e

// Abuse by ICMP echo and UDP: one client's echo requests with ever new
// identifiers, or datagrams from ever new ports, must not stall or starve
// anyone else's traffic, nor make tunfw hold more than its limits allow.
//
// Floods are raw packets written in the host namespace to 203.0.113.0/24
// (routed into the TUN) from spoofed sources that no namespace owns, as in
// hostile_test.go.

import (
	"context"
	be "encoding/binary"
	"encoding/json"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
	"golang.org/x/sys/unix"
)

// statsCounts returns one of `tunfw stats --json`'s counts by reason
// (field: "stack_drops", "dial_failures", ...).
func statsCounts(t *testing.T, cfg, field string) map[string]uint64 {
	t.Helper()
	out, errOut, code := ctlTimeout(t, 10*time.Second, cfg, "stats", "--json")
	if code != 0 {
		t.Fatalf("tunfw stats: exit %d: %s", code, errOut)
	}
	var st map[string]json.RawMessage
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("stats --json: %v\n%s", err, out)
	}
	var counts map[string]uint64
	if err := json.Unmarshal(st[field], &counts); err != nil {
		t.Fatalf("stats --json %s: %v\n%s", field, err, out)
	}
	return counts
}

// stackDrops returns the stack's drop counters by reason.
func stackDrops(t *testing.T, cfg string) map[string]uint64 {
	return statsCounts(t, cfg, "stack_drops")
}

// ctlTimeout is ctl bounded by d: a control plane that does not answer in
// time gives exit code -1.
func ctlTimeout(t *testing.T, d time.Duration, cfg string, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, append(args, "-c", cfg)...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		return stdout.String(), "no answer within " + d.String(), -1
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return stdout.String(), stderr.String(), ee.ExitCode()
	}
	if err != nil {
		t.Fatalf("run tunfw %v: %v", args, err)
	}
	return stdout.String(), stderr.String(), 0
}

// echoRequest returns an ICMPv4 echo request with its checksum.
func echoRequest(id, seq uint16, payload []byte) []byte {
	m := make([]byte, 8+len(payload))
	m[0] = 8 // echo request
	be.BigEndian.PutUint16(m[4:], id)
	be.BigEndian.PutUint16(m[6:], seq)
	copy(m[8:], payload)
	be.BigEndian.PutUint16(m[2:], ^csum(m, 0))
	return m
}

// icmpPinger is a client's ping: an ICMP datagram socket ("ping socket")
// in the client's namespace, which sees only the replies to its own
// requests.
type icmpPinger struct {
	fd  int
	seq uint16
}

func newICMPPinger(t *testing.T, ns *netnstest.NS) *icmpPinger {
	// Namespaces start with ping sockets allowed to no group.
	ns.Run(t, "sysctl", "-qw", "net.ipv4.ping_group_range=0 0")
	var fd int
	if err := ns.Do(func() (err error) {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
		return err
	}); err != nil {
		t.Fatalf("ICMP socket: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return &icmpPinger{fd: fd}
}

// ping sends one echo request to dst and waits up to d for its reply.
func (p *icmpPinger) ping(dst netip.Addr, d time.Duration) error {
	p.seq++
	// The kernel sets the identifier and the checksum.
	if err := unix.Sendto(p.fd, echoRequest(0, p.seq, []byte("are you there")), 0, &unix.SockaddrInet4{Addr: dst.As4()}); err != nil {
		return fmt.Errorf("send echo request: %w", err)
	}
	deadline := time.Now().Add(d)
	buf := make([]byte, 1500)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return fmt.Errorf("no echo reply from %s within %v", dst, d)
		}
		tv := unix.NsecToTimeval(left.Nanoseconds())
		unix.SetsockoptTimeval(p.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		n, from, err := unix.Recvfrom(p.fd, buf, 0)
		if err != nil {
			if err == unix.EAGAIN || err == unix.EINTR {
				continue
			}
			return fmt.Errorf("read echo reply: %w", err)
		}
		sa, ok := from.(*unix.SockaddrInet4)
		if ok && n >= 8 && buf[0] == 0 && netip.AddrFrom4(sa.Addr) == dst && be.BigEndian.Uint16(buf[6:]) == p.seq {
			return nil
		}
	}
}

// socketFDs counts the sockets among pid's file descriptors.
func socketFDs(pid int) (int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0, err
	}
	n := 0
	for _, e := range ents {
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name())); err == nil && strings.HasPrefix(l, "socket:") {
			n++
		}
	}
	return n, nil
}

// TestEchoIDFlood: echo requests with 74,000 different (source,
// identifier) pairs to one destination, more than there are identifiers.
// tunfw must drop and count what it cannot carry, and keep every other
// client's traffic moving: a TCP connection that echoes all along, a ping
// to the same destination, and a new ping after the flood.
func TestEchoIDFlood(t *testing.T) {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	svc := topo.ServiceV4
	startTCPEcho(t, topo.Server, netip.AddrPortFrom(svc, 9200))
	// No flow limit would stop the flood before the echo identifiers run
	// out: it is the stack's own bounds that must hold.
	cfg := writeConfig(t, fmt.Sprintf(hostileConfig, 200000, 0, 64, "5s", "5s")+"\n[metrics]\nlisten = \"127.0.0.1:9477\"\n")
	fw := startTunfw(t, topo.Host, cfg, "--log-level", "info")
	pinger := newICMPPinger(t, topo.Host)
	if err := pinger.ping(svc, 3*time.Second); err != nil {
		t.Fatalf("ping before the flood: %v", err)
	}
	conn, err := topo.Host.DialTimeout("tcp", hostPort(svc, 9200), 5*time.Second)
	if err != nil {
		t.Fatalf("connect before the flood: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	before := stackDrops(t, cfg)

	// The flood, about 22,000 requests a second: 72 spoofed sources x
	// 1,000 identifiers (each within its share) take more identifiers
	// than there are, and one more source sends 2,000 identifiers, more
	// than its share.
	raw := newRawSender(t, topo.Host)
	var srcs []netip.Addr
	for i := range 72 {
		srcs = append(srcs, netip.AddrFrom4([4]byte{198, 18, 1, byte(1 + i)}))
	}
	greedy := netip.MustParseAddr("198.18.2.1")
	const perSource = 1000
	floodDone := make(chan int, 1)
	go func() {
		sent := 0
		send := func(src netip.Addr, id int) {
			if raw.send(src, svc, unix.IPPROTO_ICMP, echoRequest(uint16(id), 1, []byte("flood"))) == nil {
				sent++
			}
		}
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for i := 0; i < perSource; {
			for j := 0; j < 3 && i < perSource; j, i = j+1, i+1 {
				for _, src := range srcs {
					send(src, i)
				}
				send(greedy, 2*i)
				send(greedy, 2*i+1)
			}
			<-tick.C
		}
		floodDone <- sent
	}()

	// While it runs, and for a second after: the TCP connection echoes
	// within a second each time, the ping is answered, the control
	// socket answers.
	buf := make([]byte, 64)
	var worstEcho, worstPing time.Duration
	rounds, sent := 0, -1
	var afterFlood time.Time
	for sent < 0 || time.Since(afterFlood) < time.Second {
		select {
		case sent = <-floodDone:
			afterFlood = time.Now()
		default:
		}
		rounds++
		msg := []byte(fmt.Sprintf("round %d", rounds))
		t0 := time.Now()
		conn.SetDeadline(t0.Add(time.Second))
		if _, err := conn.Write(msg); err != nil {
			t.Fatalf("round %d: TCP write: %v", rounds, err)
		}
		if _, err := conn.Read(buf[:len(msg)]); err != nil || string(buf[:len(msg)]) != string(msg) {
			t.Fatalf("round %d: the TCP echo did not come back within 1s: %v", rounds, err)
		}
		worstEcho = max(worstEcho, time.Since(t0))
		// As ping does: a request lost on the way (the TUN's queue is
		// the kernel's, shared with the flood) is followed by another.
		t0 = time.Now()
		err := pinger.ping(svc, 700*time.Millisecond)
		for try := 1; err != nil && try < 3; try++ {
			err = pinger.ping(svc, 700*time.Millisecond)
		}
		if err != nil {
			t.Fatalf("round %d: 3 pings during the flood: %v", rounds, err)
		}
		worstPing = max(worstPing, time.Since(t0))
		if rounds%5 == 0 {
			if _, errOut, code := ctlTimeout(t, 3*time.Second, cfg, "status"); code != 0 {
				t.Fatalf("round %d: tunfw status: exit %d: %s", rounds, code, errOut)
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	// A new ping, a new flow, finds an identifier: flood flows idle for
	// long enough give theirs up.
	if err := newICMPPinger(t, topo.Host).ping(svc, 2*time.Second); err != nil {
		t.Errorf("a new ping after the flood: %v", err)
	}
	after := stackDrops(t, cfg)
	t.Logf("%d echo requests sent from %d sources; %d rounds of TCP echo + ping, worst %v / %v; echo drops %v -> %v",
		sent, len(srcs)+1, rounds, worstEcho.Round(time.Millisecond), worstPing.Round(time.Millisecond), before, after)
	if after["echo-source-limit"] <= before["echo-source-limit"] {
		t.Errorf("no echo request past its client's share was dropped: %v -> %v", before, after)
	}
	m := scrapeMetrics(t, topo.Host, "127.0.0.1:9477")
	if got := m["tunfw_stack_drops_total,reason=echo-source-limit"]; got < float64(after["echo-source-limit"]) {
		t.Errorf("metric tunfw_stack_drops_total{reason=echo-source-limit} is %v, stats say %d", got, after["echo-source-limit"])
	}
	if fw.cmd.ProcessState != nil {
		t.Fatalf("tunfw exited")
	}
}

// start50MServer serves 50 MB at http://at/50m.
func start50MServer(t *testing.T, ns *netnstest.NS, at netip.AddrPort) {
	ln, err := ns.Listen("tcp", at.String())
	if err != nil {
		t.Fatalf("listen %s: %v", at, err)
	}
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(i * 7)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(50*len(chunk)))
		for i := 0; i < 50; i++ {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}

// curlRate downloads url with curl in ns and returns bytes per second.
func curlRate(t *testing.T, ns *netnstest.NS, url string) float64 {
	t.Helper()
	out, err := ns.Cmd("curl", "-sS", "-o", "/dev/null", "--max-time", "60", "-w", "%{size_download} %{time_total}", url).CombinedOutput()
	if err != nil {
		t.Fatalf("curl %s: %v\n%s", url, err, out)
	}
	var size, secs float64
	if _, err := fmt.Sscan(string(out), &size, &secs); err != nil || size != 50<<20 || secs <= 0 {
		t.Fatalf("curl %s: %q, want 50 MiB downloaded", url, out)
	}
	return size / secs
}

// fdSampler records the peak number of tunfw's socket descriptors.
type fdSampler struct {
	peak atomic.Int64
	stop chan struct{}
	wg   sync.WaitGroup
}

func sampleFDs(t *testing.T, pid int) *fdSampler {
	s := &fdSampler{stop: make(chan struct{})}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			if n, err := socketFDs(pid); err == nil && int64(n) > s.peak.Load() {
				s.peak.Store(int64(n))
			}
			select {
			case <-s.stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	return s
}

func (s *fdSampler) end() int { close(s.stop); s.wg.Wait(); return int(s.peak.Load()) }

// curlLoop downloads url with curl in ns again and again until at least d
// has passed; it returns the bytes per second over all downloads.
func curlLoop(t *testing.T, ns *netnstest.NS, url string, d time.Duration) (float64, int) {
	t.Helper()
	var bytes, secs float64
	n := 0
	for t0 := time.Now(); time.Since(t0) < d; n++ {
		r := curlRate(t, ns, url)
		bytes += 50 << 20
		secs += (50 << 20) / r
	}
	return bytes / secs, n
}

// TestUDPFloodKeepsTransfer: 20,000 datagrams from 20,000 source ports to
// one unreachable address, 5,000 a second, while curl downloads 50 MB
// through tunfw again and again (its unloaded throughput is measured before
// and after the flood). With max_flows 512 and no
// max_flows_per_source, the flooding client may still take only its share
// of UDP flows (a quarter of max_flows): the downloads connect and keep at
// least half their unloaded throughput, and tunfw's sockets stay within
// max_flows plus a few. udp_idle is 2s, so flows come and go and sockets
// are opened all through the flood.
func TestUDPFloodKeepsTransfer(t *testing.T) {
	netnstest.RequireRoot(t)
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl not installed")
	}
	topo := netnstest.NewTopology(t)
	svc := topo.ServiceV4
	start50MServer(t, topo.Server, netip.AddrPortFrom(svc, 8080))
	// The server namespace answers datagrams to 203.0.113.12 with "host
	// unreachable".
	dst := sibling(svc, 12)
	topo.Server.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	topo.Server.Run(t, "ip", "route", "add", "unreachable", dst.String()+"/32")
	const maxFlows = 512
	cfg := writeConfig(t, strings.Replace(fmt.Sprintf(hostileConfig, maxFlows, 0, 64, "5s", "5s"),
		`udp_idle = "4s"`, `udp_idle = "2s"`, 1))
	fw := startTunfw(t, topo.Host, cfg, "--log-level", "info")
	pid := fw.cmd.Process.Pid
	url := fmt.Sprintf("http://%s/50m", hostPort(svc, 8080))
	raw := newRawSender(t, topo.Host)
	base, err := socketFDs(pid)
	if err != nil {
		t.Fatal(err)
	}
	before := statsOf(t, cfg)

	unloaded, runs := curlLoop(t, topo.Host, url, time.Second)
	t.Logf("unloaded: %.0f MB/s over %d downloads; tunfw holds %d sockets", unloaded/1e6, runs, base)

	src := netip.MustParseAddr("198.18.2.1")
	fds := sampleFDs(t, pid)
	floodDone := make(chan int, 1)
	t0 := time.Now()
	go func() {
		// 20,000 datagrams, 50 every 10 ms.
		sent := 0
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for i := 0; i < 20000; {
			for j := 0; j < 50 && i < 20000; j, i = j+1, i+1 {
				if raw.send(src, dst, unix.IPPROTO_UDP, udpDatagram(uint16(10000+i), 53, []byte("flood"))) == nil {
					sent++
				}
			}
			<-tick.C
		}
		floodDone <- sent
	}()
	time.Sleep(200 * time.Millisecond) // into the flood
	loaded, runs := curlLoop(t, topo.Host, url, 3*time.Second)
	during := time.Since(t0)
	// The flood's flows are quiet (nothing answers): their sockets keep
	// a small receive buffer (the kernel shows twice what was asked).
	rb := maxRcvBuf(t, topo.Host, dst)
	if rb > 512<<10 {
		t.Errorf("the flood's UDP sockets have receive buffers of up to %d bytes, want at most 512 KiB", rb)
	}
	sent := <-floodDone
	flood := time.Since(t0)
	peak := fds.end()
	// Unloaded again, and the mean of both is the reference: other work
	// on the machine changes what a download gets over the test.
	unloaded2, runs2 := curlLoop(t, topo.Host, url, time.Second)
	t.Logf("unloaded after the flood: %.0f MB/s over %d downloads", unloaded2/1e6, runs2)
	unloaded = (unloaded + unloaded2) / 2
	after := statsOf(t, cfg)
	drops := stackDrops(t, cfg)
	t.Logf("%d datagrams in %v, %d flows created; %d downloads at %.0f MB/s under the flood (%.0f%% of unloaded), ended %v into it; "+
		"tunfw sockets peaked at %d (idle %d, max_flows %d), receive buffers of the flood's sockets %d; stack drops %v",
		sent, flood.Round(time.Millisecond), after.FlowsCreated-before.FlowsCreated, runs, loaded/1e6, 100*loaded/unloaded,
		during.Round(time.Millisecond), peak, base, maxFlows, rb, drops)
	if drops["udp-source-limit"] == 0 {
		t.Errorf("no datagram of the flood was dropped by the per-source bound of UDP flows")
	}
	if during > flood {
		t.Errorf("the downloads ended %v into a %v flood: not all measured under it", during, flood)
	}
	if loaded < unloaded/2 {
		t.Errorf("downloads at %.0f MB/s under the flood, less than half of %.0f MB/s unloaded", loaded/1e6, unloaded/1e6)
	}
	if peak > maxFlows+base+16 {
		t.Errorf("tunfw held %d sockets during the flood; max_flows %d allows %d", peak, maxFlows, maxFlows+base+16)
	}
	// When the flows leave the table (udp_idle 2s, tcp_closing 2s), their
	// sockets go with them.
	deadline := time.Now().Add(10 * time.Second)
	for statusFlows(t, cfg) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("flows still in the table 10s after the flood")
		}
		time.Sleep(100 * time.Millisecond)
	}
	n := 0
	for end := time.Now().Add(300 * time.Millisecond); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if n, _ = socketFDs(pid); n <= base {
			break
		}
	}
	if n > base {
		t.Errorf("tunfw holds %d sockets with no flow left, %d when idle", n, base)
	}
	if _, errOut, code := ctlTimeout(t, 3*time.Second, cfg, "status"); code != 0 {
		t.Fatalf("tunfw status after the flood: exit %d: %s", code, errOut)
	}
}

// maxRcvBuf returns the largest receive buffer (ss's skmem rb) of the UDP
// sockets in ns connected to dst; 0 if there is none.
func maxRcvBuf(t *testing.T, ns *netnstest.NS, dst netip.Addr) int {
	t.Helper()
	out := ns.Run(t, "ss", "-uanmH", "dst", dst.String())
	most := 0
	for _, f := range strings.Fields(out) {
		if i := strings.Index(f, ",rb"); strings.HasPrefix(f, "skmem:(") && i >= 0 {
			v := f[i+3:]
			if j := strings.IndexByte(v, ','); j >= 0 {
				v = v[:j]
			}
			if n, err := strconv.Atoi(v); err == nil {
				most = max(most, n)
			}
		}
	}
	return most
}

// TestUDPBurstsShareLargeBuffers: a UDP flow whose replies queue gets the
// 4 MiB receive buffer, a client's second busy flow past its quarter of
// the pool is refused one (counted, in `tunfw stats` and the metrics), and
// a flow no reply came to for 10 s (largeBufIdle) gives its buffer back,
// while it stays in the table, for the client's next busy flow. With a
// 64 MiB budget the pool is 4 buffers, 1 per client.
func TestUDPBurstsShareLargeBuffers(t *testing.T) {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	svc := topo.ServiceV4
	// The server answers each datagram with a burst of 3,000 datagrams
	// of 1,400 bytes (4.2 MB): far more than a 256 KiB buffer holds.
	pc, err := topo.Server.ListenPacket("udp", netip.AddrPortFrom(svc, 7100).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf, reply := make([]byte, 100), make([]byte, 1400)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			for range 3000 {
				pc.WriteTo(reply, from)
			}
		}
	}()
	// Everything allowed, metrics on (as icmpErrorsConfig), with a
	// 64 MiB budget, flows that outlive the test, and a reload that
	// rechecks them.
	allowAll := strings.Replace(icmpErrorsConfig, `default = "allow"`, "default = \"allow\"\non_reload = \"recheck\"", 1)
	cfg := writeConfig(t, allowAll+`[limits]
memory = "64MiB"
udp_idle = "60s"
`)
	startTunfw(t, topo.Host, cfg)
	burst := func() int {
		t.Helper()
		c, err := topo.Host.Dial("udp", netip.AddrPortFrom(svc, 7100).String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write([]byte("burst")); err != nil {
			t.Fatal(err)
		}
		n, buf := 0, make([]byte, 2000)
		for {
			// The burst arrives within milliseconds; a quiet 300 ms
			// is its end.
			c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			if _, err := c.Read(buf); err != nil {
				return n
			}
			n++
		}
	}
	large := func() map[string]uint64 { return statsCounts(t, cfg, "udp_large_buffers") }
	first := burst()
	t0 := time.Now()
	if b := large(); b["held"] != 1 || b["max"] != 4 || b["refused"] != 0 {
		t.Fatalf("after one burst (%d datagrams received): udp_large_buffers %v, want held 1, max 4, refused 0", first, b)
	}
	// The same client's second busy flow, while the first holds its
	// buffer: past the client's quarter.
	second := burst()
	b := large()
	if b["held"] != 1 || b["refused"] == 0 {
		t.Fatalf("after a second burst from the same client (%d datagrams received): udp_large_buffers %v, want held 1 and refused counted", second, b)
	}
	t.Logf("bursts of 3,000: %d and %d received; udp_large_buffers %v", first, second, b)
	m := scrapeMetrics(t, topo.Host, "127.0.0.1:9477")
	if m["tunfw_udp_large_buffers"] != 1 || m["tunfw_udp_large_buffers_max"] != 4 || m["tunfw_udp_large_buffers_refused_total"] != float64(b["refused"]) {
		t.Errorf("metrics: held %v, max %v, refused %v; stats say %v", m["tunfw_udp_large_buffers"], m["tunfw_udp_large_buffers_max"],
			m["tunfw_udp_large_buffers_refused_total"], b)
	}
	// Quiet since: the first flow gives its buffer back about 10 s
	// after its burst, long before udp_idle ends the flows.
	for large()["held"] != 0 {
		if time.Since(t0) > 20*time.Second {
			t.Fatalf("udp_large_buffers %v 20 s after the only busy flow went quiet: its buffer was not given back", large())
		}
		time.Sleep(200 * time.Millisecond)
	}
	back := time.Since(t0)
	if n := statusFlows(t, cfg); n != 2 {
		t.Fatalf("%d flows in the table when the buffer went back, want the 2 quiet ones", n)
	}
	if back < 9*time.Second {
		t.Errorf("the buffer went back %v after the flow's last burst, want about 10 s", back)
	}
	third := burst()
	if b := large(); b["held"] != 1 {
		t.Errorf("the client's next busy flow (%d datagrams received) did not get the buffer given back: udp_large_buffers %v", third, b)
	}
	t.Logf("given back %v after the first burst; a third flow got it", back.Round(100*time.Millisecond))

	// A flow that ends gives its buffer back at once: a reload that
	// denies everything cuts the three flows, the third holding one.
	denyAll := strings.Replace(readFile(t, cfg), `default = "allow"`, `default = "deny"`, 1)
	if err := os.WriteFile(cfg, []byte(denyAll), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, errOut, code := ctl(t, cfg, "reload"); code != 0 || !strings.Contains(out, "3 flows closed by the new rules") {
		t.Fatalf("reload: exit %d\n%s%s", code, out, errOut)
	}
	cut := time.Now()
	for large()["held"] != 0 {
		if time.Since(cut) > 3*time.Second {
			t.Fatalf("udp_large_buffers %v 3 s after the flows were cut: the ended flow kept its buffer", large())
		}
		time.Sleep(50 * time.Millisecond)
	}
}
