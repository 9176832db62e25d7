package bench

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
)

// Some client-side load runs in a helper process: this test binary run
// again inside the client namespace (`ip netns exec`), where all of its
// goroutines are in the namespace. It gets its parameters from the
// environment (TUNFW_BENCH_HELPER_*), prints one report line
// "REPORT key=value ..." (values are %q-quoted when they contain spaces) on
// stdout, then waits until its stdin is closed (5 minutes at most) and
// exits.

type helperProc struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan string
	stderr *strings.Builder
	exited chan error
}

// startHelper runs a helper of kind in ns.
func (b *bench) startHelper(ns *netnstest.NS, kind string, params map[string]string) (*helperProc, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := ns.Cmd(self, "-test.run=^TestBenchHelper$", "-test.count=1", "-test.timeout=10m")
	cmd.Env = append(os.Environ(), "TUNFW_BENCH=", "TUNFW_BENCH_HELPER="+kind)
	for k, v := range params {
		cmd.Env = append(cmd.Env, "TUNFW_BENCH_HELPER_"+k+"="+v)
	}
	h := &helperProc{cmd: cmd, lines: make(chan string, 16), stderr: &strings.Builder{}, exited: make(chan error, 1)}
	if h.stdin, err = cmd.StdinPipe(); err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = h.stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start helper: %w", err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			h.lines <- sc.Text()
		}
		close(h.lines)
		h.exited <- cmd.Wait()
	}()
	return h, nil
}

// report waits up to d for the helper's report line and parses it.
func (h *helperProc) report(d time.Duration) (map[string]string, error) {
	timeout := time.After(d)
	var out []string
	for {
		select {
		case l, ok := <-h.lines:
			if !ok {
				return nil, fmt.Errorf("helper exited without a report; output: %s %s",
					strings.Join(out, "\n"), strings.TrimSpace(h.stderr.String()))
			}
			if rest, found := strings.CutPrefix(l, "REPORT "); found {
				return parseKV(rest)
			}
			if len(out) < 50 {
				out = append(out, l)
			}
		case <-timeout:
			return nil, fmt.Errorf("no report from the helper within %v", d)
		}
	}
}

// close ends the helper: closing stdin tells it to exit; if it does not
// within 30s it is killed (by its pid; it is our child).
func (h *helperProc) close() {
	h.stdin.Close()
	go func() {
		for range h.lines {
		}
	}()
	select {
	case <-h.exited:
	case <-time.After(30 * time.Second):
		h.cmd.Process.Kill()
		<-h.exited
	}
}

func formatKV(kv map[string]string) string {
	keys := make([]string, 0, len(kv))
	for k := range kv {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var sb strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&sb, " %s=%q", k, kv[k])
	}
	return strings.TrimSpace(sb.String())
}

func parseKV(s string) (map[string]string, error) {
	kv := map[string]string{}
	for s = strings.TrimSpace(s); s != ""; s = strings.TrimSpace(s) {
		k, rest, ok := strings.Cut(s, "=")
		if !ok {
			return nil, fmt.Errorf("bad report at %q", s)
		}
		v, err := strconv.QuotedPrefix(rest)
		if err != nil {
			return nil, fmt.Errorf("bad report value for %s: %v", k, err)
		}
		kv[k], _ = strconv.Unquote(v)
		s = rest[len(v):]
	}
	return kv, nil
}

// TestBenchHelper is the helper process's entry point; it skips unless
// started by TestBench.
func TestBenchHelper(t *testing.T) {
	kind := os.Getenv("TUNFW_BENCH_HELPER")
	if kind == "" {
		t.Skip("helper process of TestBench")
	}
	env := func(k string) string { return os.Getenv("TUNFW_BENCH_HELPER_" + k) }
	addr := env("ADDR")
	var kv map[string]string
	var hold func()
	switch kind {
	case "crr":
		conc, _ := strconv.Atoi(env("CONC"))
		dur, _ := strconv.ParseInt(env("DUR"), 10, 64)
		if conc <= 0 || conc > 1024 || dur <= 0 || time.Duration(dur) > 5*time.Minute {
			t.Fatal("bad helper parameters")
		}
		kv = crrLoop(addr, conc, time.Duration(dur))
	case "flows":
		n, _ := strconv.Atoi(env("N"))
		lim, _ := strconv.ParseInt(env("LIMIT"), 10, 64)
		if n <= 0 || n > 100000 || lim <= 0 || time.Duration(lim) > 5*time.Minute {
			t.Fatal("bad helper parameters")
		}
		var conns []net.Conn
		kv, conns = openFlows(addr, n, time.Duration(lim))
		hold = func() {
			for _, c := range conns {
				c.Close()
			}
		}
	default:
		t.Fatalf("unknown helper %q", kind)
	}
	fmt.Println("REPORT " + formatKV(kv))
	done := make(chan struct{})
	go func() {
		io.Copy(io.Discard, os.Stdin)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Minute):
	}
	if hold != nil {
		hold()
	}
}

// ---- idle flows ----

type flowsResult struct {
	opened int
	// rssStart is tunfw's RSS before the warm-up, rssBefore after it
	// (KiB).
	rssStart, rssBefore, rssAfter int64
	// heapBefore and heapAfter are the bytes of the Go heap's objects.
	heapBefore, heapAfter uint64
	openSecs              float64
	errors                int
	firstErr              string
}

// idleWait is how long idleFlows waits after the last flow opened.
const idleWait = 6 * time.Second

// idleFlows warms tunfw up (warmUp), then opens n TCP connections from
// p's client namespace through tunfw to the echo server, with one 1-byte
// echo on each, waits idleWait, and reads tunfw's RSS and (over cfg's
// control socket) the bytes of its Go heap's objects. The connections are
// closed before it returns. Opening is bounded by limit.
//
// The client ends live in a helper process: the server ends alone nearly
// fill this process's open-file limit, which a container may not let the
// test raise.
func (b *bench) idleFlows(fw *tunfwProc, cfg string, p path, n int, limit time.Duration) (flowsResult, error) {
	var r flowsResult
	var err error
	if r.rssStart, _, err = procRSS(fw.pid); err != nil {
		return r, err
	}
	if err := b.warmUp(cfg, p, limit); err != nil {
		return r, err
	}
	if r.rssBefore, _, err = procRSS(fw.pid); err != nil {
		return r, err
	}
	rt, err := readRuntimeStats(cfg)
	if err != nil {
		return r, err
	}
	r.heapBefore = rt.HeapObjectsBytes
	h, err := b.startHelper(p.client, "flows", map[string]string{
		"ADDR": p.addr(portEcho), "N": strconv.Itoa(n), "LIMIT": strconv.FormatInt(int64(limit), 10),
	})
	if err != nil {
		return r, err
	}
	defer h.close()
	kv, err := h.report(limit + 30*time.Second)
	if err != nil {
		return r, err
	}
	r.opened, _ = strconv.Atoi(kv["opened"])
	r.errors, _ = strconv.Atoi(kv["errors"])
	r.openSecs, _ = strconv.ParseFloat(kv["secs"], 64)
	r.firstErr = kv["first"]
	// Idle: tunfw returns free memory to the kernel once it has been
	// quiet for a second, and no more often than every 5s.
	time.Sleep(idleWait)
	if fw.exited() {
		return r, fmt.Errorf("tunfw exited with %d flows open: %v", r.opened, fw.err)
	}
	if r.rssAfter, _, err = procRSS(fw.pid); err != nil {
		return r, err
	}
	if rt, err = readRuntimeStats(cfg); err != nil {
		return r, err
	}
	r.heapAfter = rt.HeapObjectsBytes
	if r.opened < n {
		return r, fmt.Errorf("opened %d of %d flows in %.1fs (%d errors, first: %s)", r.opened, n, r.openSecs, r.errors, r.firstErr)
	}
	return r, nil
}

// warmFlows is how many connections a round of warmUp opens and closes.
const warmFlows = 200

// warmUp opens warmFlows connections through the tunfw running config
// cfg, closes them, and returns once its flow table is empty and it has
// handed the memory they left back to the kernel. What only the first
// connections of a process cost (code paged in, the collector's work
// buffers, a span per size class, pools filled) then stays out of what
// idleFlows divides by its count, and no garbage or free heap of the
// warm-up is there for the counted flows to reuse.
//
// tunfw returns memory once quiet for a second (at most every 5s), with
// two collections, when enough is there to return (cmd/tunfw/memory.go,
// shouldReturn): so the warm-up is over when, with the table empty, two
// collections ran since the connections closed and the free heap is
// gone. A round that left too little for tunfw to act on is followed by
// another (at most 3). Polled for, not slept on.
func (b *bench) warmUp(cfg string, p path, limit time.Duration) error {
	for round := 1; ; round++ {
		h, err := b.startHelper(p.client, "flows", map[string]string{
			"ADDR": p.addr(portEcho), "N": strconv.Itoa(warmFlows), "LIMIT": strconv.FormatInt(int64(limit), 10),
		})
		if err != nil {
			return err
		}
		kv, err := h.report(limit + 30*time.Second)
		var rt0 runtimeStats
		if err == nil {
			rt0, err = readRuntimeStats(cfg) // before the connections close
		}
		h.close()
		if err != nil {
			return fmt.Errorf("warm-up: %w", err)
		}
		if kv["opened"] != strconv.Itoa(warmFlows) {
			return fmt.Errorf("warm-up: opened %s of %d flows (first error: %s)", kv["opened"], warmFlows, kv["first"])
		}
		// Closed both ways, a flow leaves the table at once; a
		// straggler has tcp_closing (30s) at most.
		emptyBy := time.Now().Add(40 * time.Second)
		var emptied time.Time
		for {
			flows, err := readFlowCount(cfg)
			if err != nil {
				return err
			}
			rt, err := readRuntimeStats(cfg)
			if err != nil {
				return err
			}
			if flows == 0 && rt.GCCycles >= rt0.GCCycles+2 && rt.HeapFreeBytes < 1<<20 {
				return nil
			}
			now := time.Now()
			if flows > 0 && now.After(emptyBy) {
				return fmt.Errorf("warm-up: %d flows still in tunfw's table 40s after they closed", flows)
			}
			if flows == 0 && emptied.IsZero() {
				emptied = now
			}
			// Quiet and past two of tunfw's 5s rounds: it found too
			// little to return.
			if !emptied.IsZero() && now.Sub(emptied) > 12*time.Second {
				if round == 3 {
					return fmt.Errorf("warm-up: tunfw returned no memory after %d rounds (%d collections, %d KiB of free heap)",
						round, rt.GCCycles-rt0.GCCycles, rt.HeapFreeBytes>>10)
				}
				fmt.Printf("warm-up round %d left too little for tunfw to return; another round\n", round)
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
}

// openFlows is the helper's side of idleFlows.
func openFlows(addr string, n int, limit time.Duration) (map[string]string, []net.Conn) {
	const workers = 16
	var (
		mu       sync.Mutex
		conns    = make([]net.Conn, 0, n)
		nerr     int
		firstErr error
		next     atomic.Int64
		wg       sync.WaitGroup
	)
	start := time.Now()
	end := start.Add(limit)
	for range workers {
		wg.Go(func() {
			d := net.Dialer{Timeout: 5 * time.Second, FallbackDelay: -1}
			one := make([]byte, 1)
			for next.Add(1) <= int64(n) && time.Now().Before(end) {
				c, err := d.Dial("tcp4", addr)
				if err == nil {
					c.SetDeadline(time.Now().Add(5 * time.Second))
					if _, err = c.Write([]byte{'x'}); err == nil {
						_, err = io.ReadFull(c, one)
					}
					c.SetDeadline(time.Time{})
					if err != nil {
						c.Close()
					}
				}
				mu.Lock()
				if err != nil {
					nerr++
					if firstErr == nil {
						firstErr = err
					}
				} else {
					conns = append(conns, c)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	kv := map[string]string{
		"opened": strconv.Itoa(len(conns)), "errors": strconv.Itoa(nerr),
		"secs": strconv.FormatFloat(time.Since(start).Seconds(), 'f', 3, 64),
	}
	if firstErr != nil {
		kv["first"] = firstErr.Error()
	}
	return kv, conns
}
