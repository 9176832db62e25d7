package metrics

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/tunfw/tunfw/filter"
)

func testSource(t *testing.T) Source {
	rs, err := filter.Compile(filter.Options{}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	lim, _ := filter.Limits{}.Validate()
	return Source{Engine: filter.NewEngine(rs, filter.EngineOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Limits: lim})}
}

// syncBuf is a log sink safe for the server's goroutines.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

func TestExposed(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:9477": false, "[::1]:9477": false, "127.0.0.2:1": false,
		"0.0.0.0:9477": true, "[::]:9477": true, "10.0.0.1:9477": true, "[2001:db8::1]:80": true,
	} {
		a, err := net.ResolveTCPAddr("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		if got := exposed(a); got != want {
			t.Errorf("exposed(%s) = %v, want %v", addr, got, want)
		}
	}
}

// wildcard is a loopback listener that reports a wildcard address, to see
// the warning without listening on the machine's interfaces.
type wildcard struct{ net.Listener }

func (wildcard) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4zero, Port: 9477} }

func TestServeWarnsOnNonLoopback(t *testing.T) {
	for _, wild := range []bool{false, true} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		var logs syncBuf
		ctx, cancel := context.WithCancel(context.Background())
		var l net.Listener = ln
		if wild {
			l = wildcard{ln}
		}
		serve(ctx, l, testSource(t), slog.New(slog.NewTextHandler(&logs, nil)), defaultTimeouts())
		resp, err := http.Get("http://" + ln.Addr().String() + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		cancel()
		if !strings.Contains(string(body), "tunfw_flows_created_total") {
			t.Errorf("scrape lacks tunfw metrics:\n%.500s", body)
		}
		if warned := strings.Contains(logs.String(), "non-loopback"); warned != wild {
			t.Errorf("listening on %v: warned %v, want %v; log: %s", l.Addr(), warned, wild, logs.String())
		}
	}
}

// TestServeTimeouts: a client that never finishes its request, and one that
// idles after a scrape, are disconnected.
func TestServeTimeouts(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	to := timeouts{readHeader: 200 * time.Millisecond, read: 300 * time.Millisecond, write: time.Second, idle: 300 * time.Millisecond}
	serve(ctx, ln, testSource(t), slog.New(slog.NewTextHandler(io.Discard, nil)), to)
	closedWithin := func(c net.Conn, d time.Duration) bool {
		c.SetReadDeadline(time.Now().Add(d))
		_, err := io.Copy(io.Discard, c)
		return err == nil // EOF: the server closed it
	}
	slow, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	slow.Write([]byte("GET /metrics HTTP/1.1\r\nHost: x\r\n")) // and never the end
	if !closedWithin(slow, 3*time.Second) {
		t.Errorf("a half-sent request held its connection for 3s")
	}
	idle, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	idle.Write([]byte("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))
	if !closedWithin(idle, 3*time.Second) {
		t.Errorf("an idle keep-alive connection was held for 3s")
	}
}

// TestCollectorExposesStackCounters: what the stack counts (dial failures,
// pending dials, its drops by reason, recovered panics, the UDP large
// buffers) is in the scrape.
func TestCollectorExposesStackCounters(t *testing.T) {
	src := testSource(t)
	src.DialFailures = func() map[string]uint64 { return map[string]uint64{"refused": 4} }
	src.PendingDials = func() int { return 7 }
	src.StackDrops = func() map[string]uint64 { return map[string]uint64{"udp-queue": 2, "echo-no-id": 5} }
	src.FlowPanics = func() uint64 { return 3 }
	src.UDPLargeBuffers = func() (int, int, uint64) { return 2, 384, 9 }
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(newCollector(src)); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			name := mf.GetName()
			for _, l := range m.GetLabel() {
				name += "/" + l.GetValue()
			}
			switch {
			case m.GetCounter() != nil:
				got[name] = m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				got[name] = m.GetGauge().GetValue()
			}
		}
	}
	for name, want := range map[string]float64{
		"tunfw_dial_failures_total/refused": 4, "tunfw_pending_dials": 7,
		"tunfw_stack_drops_total/udp-queue": 2, "tunfw_stack_drops_total/echo-no-id": 5,
		"tunfw_flow_panics_total": 3,
		"tunfw_udp_large_buffers": 2, "tunfw_udp_large_buffers_max": 384, "tunfw_udp_large_buffers_refused_total": 9,
	} {
		if got[name] != want {
			t.Errorf("%s = %v, want %v", name, got[name], want)
		}
	}
}
