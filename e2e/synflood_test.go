package e2e

// SYN floods and pending dials (issue 10, items 2 and 5): a flood of SYNs
// to addresses that never answer must not keep new allowed connections
// out, nor slow a running download by more than half, and a pending dial
// must not outlive its flow.
//
// The blackhole is the server namespace: it does not forward, so SYNs to
// any address of 203.0.113.0/24 but its own 203.0.113.10 are dropped there
// without an answer.

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
	"golang.org/x/sys/unix"
)

// synFloodConfig is gateway mode with the default limits: the client
// namespace's traffic enters through the interface %s.
const synFloodConfig = `
[tun]
addresses = ["198.18.0.1/30", "fd54:756e:6677::1/126"]
[route]
from = ["%s"]
[filter]
default = "allow"
log = "deny"
`

const (
	// A download long enough to measure: at 1.5-1.8 GB/s, what the
	// relay reaches since the server's bytes go straight into the
	// netstack, 50 MB lasted 30 ms, and one scheduling hiccup halved a
	// sample (the flood ratio ranged 0.46-1.11 over 12 runs).
	synDownloadSize = 200 << 20
	// synConnectBound is how long a new allowed connection may take to
	// connect during the flood (the bound: a client's first SYN
	// retransmission is at 1 s, its second at 3 s).
	synConnectBound = 3 * time.Second
)

// startBulkHTTP serves synDownloadSize bytes at /bulk.
func startBulkHTTP(t *testing.T, ns *netnstest.NS, at netip.AddrPort) {
	ln, err := ns.Listen("tcp", at.String())
	if err != nil {
		t.Fatalf("listen %s: %v", at, err)
	}
	chunk := make([]byte, 64<<10)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(synDownloadSize))
		for n := 0; n < synDownloadSize; n += len(chunk) {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}

// curlDownload downloads url with curl from source address src inside ns
// and returns its throughput in bytes per second and its connect time.
func curlDownload(t *testing.T, ns *netnstest.NS, src netip.Addr, url string) (float64, time.Duration) {
	t.Helper()
	// A transfer below 1 MB/s for 3 s has stalled: curl gives up then.
	out, err := ns.Cmd("curl", "-sS", "--fail", "--noproxy", "*", "--interface", src.String(), "--connect-timeout", "10", "--max-time", "60",
		"--speed-limit", "1000000", "--speed-time", "3", "-o", "/dev/null", "-w", "%{size_download} %{speed_download} %{time_connect} %{time_starttransfer} %{time_total}", url).CombinedOutput()
	if err != nil {
		t.Fatalf("curl %s from %s: %v\n%s", url, src, err, out)
	}
	var size int64
	var speed, connect, first, total float64
	if _, err := fmt.Sscan(string(out), &size, &speed, &connect, &first, &total); err != nil || size != synDownloadSize {
		t.Fatalf("curl %s: downloaded %q, want %d bytes (%v)", url, out, synDownloadSize, err)
	}
	t.Logf("curl from %s: %.0f MB/s, connect %.3fs, first byte %.3fs, total %.3fs", src, speed/1e6, connect, first, total)
	return speed, time.Duration(connect * float64(time.Second))
}

// connectFrom connects from src to dst inside ns, proves the connection with
// an echo and returns how long the connect took.
func connectFrom(ns *netnstest.NS, src netip.Addr, dst string, timeout time.Duration) (time.Duration, error) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}, Timeout: timeout}
	var c net.Conn
	t0 := time.Now()
	err := ns.Do(func() (err error) {
		c, err = d.Dial("tcp", dst)
		return err
	})
	took := time.Since(t0)
	if err != nil {
		return took, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte("syn?\n")); err != nil {
		return took, err
	}
	buf := make([]byte, 5)
	if _, err := c.Read(buf); err != nil {
		return took, fmt.Errorf("echo: %w", err)
	}
	return took, nil
}

// socketsOf counts tunfw's socket descriptors (socketFDs), failing the
// test softly when they cannot be read.
func socketsOf(t *testing.T, pid int) int {
	n, err := socketFDs(pid)
	if err != nil {
		t.Errorf("list tunfw's file descriptors: %v", err)
	}
	return n
}

// peakSockets samples tunfw's socket descriptors every 50 ms until the
// returned function is called (or the test ends), which returns the peak.
func peakSockets(t *testing.T, pid int) func() int {
	stop, done := make(chan struct{}), make(chan int, 1)
	var once sync.Once
	end := func() int {
		once.Do(func() { close(stop) })
		return <-done
	}
	t.Cleanup(func() { once.Do(func() { close(stop); <-done }) })
	go func() {
		peak := 0
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			peak = max(peak, socketsOf(t, pid))
			select {
			case <-stop:
				done <- peak
				return
			case <-tick.C:
			}
		}
	}()
	return end
}

// cpuSeconds returns the CPU time process pid used so far.
func cpuSeconds(t *testing.T, pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Errorf("read tunfw's stat: %v", err)
		return 0
	}
	// Fields after the command (which may hold spaces): state is the
	// first, utime and stime the 12th and 13th.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	return (utime + stime) / 100 // USER_HZ
}

// dialFailures returns tunfw's count of failed TCP dials by reason.
func dialFailures(t *testing.T, cfg string) map[string]uint64 {
	return statsCounts(t, cfg, "dial_failures")
}

// TestSYNFloodFairness floods SYNs at 10,000 a second from a client
// namespace (gateway mode) to random addresses of a /24 that never answer,
// and checks that meanwhile new allowed connections, from the flooding
// address and from another one, connect within 3 s, and that a 200 MB
// download keeps at least half its unloaded throughput.
func TestSYNFloodFairness(t *testing.T) {
	netnstest.RequireRoot(t)
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl not installed")
	}
	topo := netnstest.NewTopology(t)
	host, svc := topo.Host, topo.ServiceV4
	startBulkHTTP(t, topo.Server, netip.AddrPortFrom(svc, 8080))
	startTCPEcho(t, topo.Server, netip.AddrPortFrom(svc, 9300))
	fresh := sibling(svc, 20)
	topo.Server.Run(t, "ip", "addr", "add", fresh.String()+"/32", "dev", "lo")
	startTCPEcho(t, topo.Server, netip.AddrPortFrom(fresh, 9300))
	client := netnstest.New(t, "tfc-")
	lanIf, cliIf := "tfl-"+client.Name[4:], "tfm-"+client.Name[4:]
	flooder, other := netip.MustParseAddr("10.98.0.2"), netip.MustParseAddr("10.98.0.3")
	netnstest.Link(t, host, lanIf, []string{"10.98.0.1/24"}, client, cliIf, []string{flooder.String() + "/24", other.String() + "/24"})
	client.Run(t, "ip", "route", "add", "default", "via", "10.98.0.1")
	host.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	cfg := writeConfig(t, fmt.Sprintf(synFloodConfig, lanIf))
	fw := startTunfw(t, host, cfg, "--log-level", "info")
	pid := fw.cmd.Process.Pid
	url := "http://" + hostPort(svc, 8080) + "/bulk"
	echo, freshEcho := hostPort(svc, 9300), hostPort(fresh, 9300)

	// Unloaded: the best of three downloads. Other tests may share the
	// machine: the best of each phase is what tunfw can do in it.
	var unloaded float64
	for range 3 {
		s, _ := curlDownload(t, client, flooder, url)
		unloaded = max(unloaded, s)
	}
	baseSockets := socketsOf(t, pid)

	// The flood: SYNs from the flooding address to port 80 of random
	// addresses of 203.0.113.0/24, 10,000 a second (bursts of 100 every
	// 10 ms) from a raw socket in the client namespace: the sender costs
	// little CPU, so what the download loses is what tunfw spends.
	raw := newRawSender(t, client)
	stop, sentc := make(chan struct{}), make(chan int, 1)
	go func() {
		sentc <- paced(stop, 1<<30, func(i int) error {
			dst := netip.AddrFrom4([4]byte{203, 0, 113, byte(rand.IntN(256))})
			return raw.send(flooder, dst, unix.IPPROTO_TCP, tcpSYN(uint16(1024+i%60000), 80, rand.Uint32()))
		})
	}()
	sent := -1
	stopFlood := func() {
		if sent < 0 {
			close(stop)
			sent = <-sentc
		}
	}
	t.Cleanup(stopFlood)
	floodStart := time.Now()
	peak := peakSockets(t, pid)
	// The flood has filled the flooding source's share of pending dials
	// (or tunfw's pool, before the fix) once tunfw holds that many
	// sockets.
	for deadline := time.Now().Add(5 * time.Second); socketsOf(t, pid) < baseSockets+200; {
		if time.Now().After(deadline) {
			t.Fatalf("tunfw holds %d sockets 5s into the flood (%d before): is the flood running?", socketsOf(t, pid), baseSockets)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// The flood runs a while before anything is measured.
	c0 := cpuSeconds(t, pid)
	time.Sleep(2 * time.Second)
	floodCPU := (cpuSeconds(t, pid) - c0) / 2
	cpu0, cpuAt := cpuSeconds(t, pid), time.Now()
	// New connections from both addresses, one after another, while the
	// downloads below run: to the server in use, and to one that nobody
	// connected to before the flood.
	var wg sync.WaitGroup
	var worst, worstFresh time.Duration
	var connectErrs []string
	wg.Add(1)
	defer wg.Wait() // also when a download fails the test
	go func() {
		defer wg.Done()
		for i := 0; i < 8; i++ {
			src, dst := []netip.Addr{flooder, other}[i%2], echo
			if i >= 6 {
				dst = freshEcho
			}
			took, err := connectFrom(client, src, dst, synConnectBound)
			t.Logf("connect from %s to %s: %v after %v", src, dst, err, took.Round(time.Millisecond))
			if dst == freshEcho {
				worstFresh = max(worstFresh, took)
			} else {
				worst = max(worst, took)
			}
			if err != nil || took > synConnectBound {
				connectErrs = append(connectErrs, fmt.Sprintf("from %s to %s: %v after %v", src, dst, err, took.Round(time.Millisecond)))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}()
	// As unloaded: the best of three downloads; each must connect in
	// time.
	var loaded float64
	var dlConnect time.Duration
	for range 3 {
		s, c := curlDownload(t, client, flooder, url)
		loaded, dlConnect = max(loaded, s), max(dlConnect, c)
	}
	wg.Wait()
	cpu := (cpuSeconds(t, pid) - cpu0) / time.Since(cpuAt).Seconds()
	peakFlood := peak()
	stopFlood()
	floodFor := time.Since(floodStart)
	rate := float64(sent) / floodFor.Seconds()
	ratio := loaded / unloaded
	t.Logf("SYN flood: %d SYNs in %v (%.0f/s); download %.0f MB/s unloaded, %.0f MB/s during the flood (ratio %.2f, its connect %v); "+
		"slowest new connection %v to the server in use, %v to a new one; tunfw sockets %d before, peak %d during the flood; tunfw CPU (cores) for the flood alone %.2f, during the downloads %.2f",
		sent, floodFor.Round(time.Millisecond), rate, unloaded/1e6, loaded/1e6, ratio, dlConnect.Round(time.Millisecond),
		worst.Round(time.Millisecond), worstFresh.Round(time.Millisecond), baseSockets, peakFlood, floodCPU, cpu)
	fails := dialFailures(t, cfg)
	t.Logf("dial failures: %v", fails)
	if fails["deferred"] == 0 {
		t.Errorf("no SYN of the flood was deferred: %v", fails)
	}
	// The sender paces itself; on a busy machine it may fall behind.
	if rate < 8000 {
		t.Errorf("the flood ran at only %.0f SYN/s, the test wants 10,000", rate)
	}
	for _, e := range connectErrs {
		t.Errorf("new connection during the flood: %s", e)
	}
	if dlConnect > synConnectBound {
		t.Errorf("the download took %v to connect during the flood, want at most %v", dlConnect, synConnectBound)
	}
	if ratio < 0.5 {
		t.Errorf("the download ran at %.0f%% of its unloaded throughput during the flood, want at least 50%%", 100*ratio)
	}
}

// TestPendingDialsReleasedOnExpiry makes 2,000 connects to an address that
// never answers, with tcp_handshake = "5s" and dial_timeout = "30s", and
// checks that once their flows left the table tunfw holds no socket for
// them: the pending dials end with their flows, not at dial_timeout.
func TestPendingDialsReleasedOnExpiry(t *testing.T) {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	cfg := writeConfig(t, `
[tun]
addresses = ["198.18.0.1/30", "fd54:756e:6677::1/126"]
[route]
include = ["203.0.113.0/24"]
[filter]
default = "allow"
log = "deny"
[limits]
tcp_handshake = "5s"
dial_timeout = "30s"
`)
	fw := startTunfw(t, topo.Host, cfg, "--log-level", "info")
	pid := fw.cmd.Process.Pid
	base := socketsOf(t, pid)
	blackhole := sibling(topo.ServiceV4, 77)

	var fds []int
	t.Cleanup(func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	})
	peak := peakSockets(t, pid)
	// 2,000 non-blocking connects, 100 every 20 ms.
	for b := 0; b < 20; b++ {
		err := topo.Host.Do(func() error {
			for j := 0; j < 100; j++ {
				fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
				if err != nil {
					return err
				}
				fds = append(fds, fd)
				if err := unix.Connect(fd, &unix.SockaddrInet4{Addr: blackhole.As4(), Port: 80}); err != unix.EINPROGRESS {
					return fmt.Errorf("connect: %v", err)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Past the first SYN retransmission, the clients give up: no SYN
	// refreshes the flows any more.
	time.Sleep(1500 * time.Millisecond)
	for _, fd := range fds {
		unix.Close(fd)
	}
	fds = nil
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	for statusFlows(t, cfg) > 0 {
		if ctx.Err() != nil {
			t.Fatalf("%d flows still in the table 15s after the connects gave up (tcp_handshake 5s)", statusFlows(t, cfg))
		}
		time.Sleep(100 * time.Millisecond)
	}
	gone := time.Now()
	const slack = 4
	n := socketsOf(t, pid)
	for n > base+slack && time.Since(gone) < 2*time.Second {
		time.Sleep(50 * time.Millisecond)
		n = socketsOf(t, pid)
	}
	t.Logf("2000 connects to a blackhole: tunfw sockets %d before, peak %d, %d within %v of the flows leaving the table",
		base, peak(), n, time.Since(gone).Round(time.Millisecond))
	if n > base+slack {
		t.Errorf("tunfw holds %d sockets 2s after the flows left the table, %d before them", n, base)
	}
	if fails := dialFailures(t, cfg); fails["cancelled"] == 0 {
		t.Errorf("no pending dial was cancelled with its flow: %v", fails)
	}
}
