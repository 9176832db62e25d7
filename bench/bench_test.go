package bench

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
	"github.com/tunfw/tunfw/tun"
)

// modeCfg is how long and how often each workload runs.
type modeCfg struct {
	name                       string
	rounds                     int
	bulk, conn, rr, udp, pause time.Duration
	flows                      []int
	flowLimit                  time.Duration // bound on opening one set of idle flows
}

var modes = map[string]modeCfg{
	"full": {
		name: "full", rounds: 3,
		bulk: 5 * time.Second, conn: 4 * time.Second, rr: 3 * time.Second, udp: 4 * time.Second,
		pause: 300 * time.Millisecond,
		flows: []int{1000, 10000}, flowLimit: 90 * time.Second,
	},
	"smoke": {
		name: "smoke", rounds: 1,
		bulk: 1500 * time.Millisecond, conn: time.Second, rr: time.Second, udp: time.Second,
		pause: 100 * time.Millisecond,
		flows: []int{1000, 10000}, flowLimit: 30 * time.Second,
	},
}

// bench is one benchmark run.
type bench struct {
	t     *testing.T
	m     modeCfg
	topo  *netnstest.Topology
	bin   string
	cfg   string
	fw    *tunfwProc
	res   *results
	runID atomic.Uint64
}

// workload is one measured thing, run on both paths unless flows.
type workload struct {
	id   string
	keys []string // figures it produces
	run  func(b *bench, p path) error
}

func bulkWorkload(id string, streams int, up bool) workload {
	return workload{id: id, keys: []string{id, "cpu-" + id}, run: func(b *bench, p path) error {
		var cpu0 float64
		if p.tunfw() {
			cpu0, _ = procCPU(b.fw.pid)
		}
		r, err := b.bulk(p, streams, up, b.m.bulk)
		if err != nil {
			return err
		}
		b.res.add(id, p, r.gbps())
		if p.tunfw() {
			cpu1, err := procCPU(b.fw.pid)
			if err != nil {
				return err
			}
			b.res.add("cpu-"+id, p, (cpu1-cpu0)/(float64(r.bytes)/1e9))
			b.res.cpuSecs += cpu1 - cpu0
			b.res.cpuBytes += r.bytes
		}
		return nil
	}}
}

func connWorkload(id string, port, conc int) workload {
	return workload{id: id, keys: []string{id, id + "-p50", id + "-p99", id + "-fail"}, run: func(b *bench, p path) error {
		r, err := b.connRate(p, port, conc, b.m.conn)
		if err != nil {
			return err
		}
		b.res.add(id, p, r.rate)
		b.res.add(id+"-p50", p, us(r.p50))
		b.res.add(id+"-p99", p, us(r.p99))
		b.res.add(id+"-fail", p, float64(r.errors))
		if r.errors > 0 {
			b.res.note("%s via %s: %d of %d connections failed, first: %v", id, p.name, r.errors, r.errors+r.count, r.firstErr)
		}
		return nil
	}}
}

func udpWorkload(id string, up bool) workload {
	return workload{id: id, keys: []string{id + "-loss", id + "-rx"}, run: func(b *bench, p path) error {
		var r udpResult
		var err error
		if up {
			r, err = b.udpUp(p, b.m.udp)
		} else {
			r, err = b.udpDown(p, b.m.udp)
		}
		if err != nil {
			return err
		}
		b.res.add(id+"-loss", p, r.lossPct())
		b.res.add(id+"-rx", p, r.rxGbps())
		return nil
	}}
}

var workloads = []workload{
	bulkWorkload("tcp1-c2s", 1, true),
	bulkWorkload("tcp1-s2c", 1, false),
	bulkWorkload("tcp4-c2s", 4, true),
	bulkWorkload("tcp4-s2c", 4, false),
	connWorkload("conn-seq", portCRR, 1),
	connWorkload("conn-32", portCRR, 32),
	// The same through a rule by name: tunfw completes the handshake,
	// reads the first 64 bytes (no name in them), decides, then dials.
	connWorkload("conn-peek", portPeek, 1),
	{id: "rr", keys: []string{"rr-p50", "rr-p99", "rr-rate"}, run: func(b *bench, p path) error {
		r, err := b.requestResponse(p, b.m.rr)
		if err != nil {
			return err
		}
		b.res.add("rr-p50", p, us(r.p50))
		b.res.add("rr-p99", p, us(r.p99))
		b.res.add("rr-rate", p, r.rate)
		return nil
	}},
	udpWorkload("udp-c2s", true),
	udpWorkload("udp-s2c", false),
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

func TestBench(t *testing.T) {
	modeName := os.Getenv("TUNFW_BENCH")
	if modeName == "" {
		t.Skip("set TUNFW_BENCH=full (make bench) to run")
	}
	m, ok := modes[modeName]
	if !ok {
		t.Fatalf("TUNFW_BENCH=%q: want full or smoke", modeName)
	}
	if s := os.Getenv("TUNFW_BENCH_ROUNDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 20 {
			t.Fatalf("TUNFW_BENCH_ROUNDS=%q: want 1..20", s)
		}
		m.rounds = n
	}
	only := map[string]bool{}
	for _, id := range strings.Split(os.Getenv("TUNFW_BENCH_ONLY"), ",") {
		if id = strings.TrimSpace(id); id != "" {
			only[id] = true
		}
	}
	selected := func(id string) bool { return len(only) == 0 || only[id] }
	outPath := os.Getenv("TUNFW_BENCH_OUT")
	if outPath == "" {
		outPath = filepath.Join("bench", "results", "latest.json")
		if m.name == "smoke" {
			outPath = filepath.Join("bench", "results", "smoke.json")
		}
	}
	if !filepath.IsAbs(outPath) {
		outPath = filepath.Join("..", outPath) // go test runs in bench/
	}
	if abs, err := filepath.Abs(outPath); err == nil {
		outPath = abs
	}
	netnstest.RequireRoot(t)
	raiseNoFile(t, 65536)
	if mach := machine(); mach["loadavg"] != nil {
		fmt.Printf("load average before the run: %v (%v cores); other work on the machine makes the figures noisy\n", mach["loadavg"], mach["nproc"])
	}

	b := &bench{t: t, m: m, res: newResults()}
	b.res.mode, b.res.rounds = m.name, m.rounds
	b.bin = buildTunfw(t)
	mtu := tun.DefaultMTU // what a user gets without setting it
	if s := os.Getenv("TUNFW_BENCH_MTU"); s != "" {
		var err error
		if mtu, err = strconv.Atoi(s); err != nil {
			t.Fatalf("TUNFW_BENCH_MTU=%q: %v", s, err)
		}
	}
	cfgText := benchConfig(mtu)
	if p := os.Getenv("TUNFW_BENCH_CONFIG"); p != "" {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		cfgText = string(data)
	}
	cfgDir := t.TempDir()
	if !strings.Contains(cfgText, "[control]") {
		// Our own control socket, never the machine's default one.
		cfgText += fmt.Sprintf("\n[control]\nsocket = %q\n", filepath.Join(cfgDir, "tunfw.sock"))
	}
	b.cfg = filepath.Join(cfgDir, "config.toml")
	if err := os.WriteFile(b.cfg, []byte(cfgText), 0o600); err != nil {
		t.Fatal(err)
	}
	b.res.config = cfgText

	b.topo = netnstest.NewTopology(t)
	startServers(t, b.topo.Server, []netip.Addr{b.topo.ServiceV4, b.topo.ServerV4})
	paths := [2]path{{"tunfw", b.topo.ServiceV4}, {"direct", b.topo.ServerV4}}

	// Throughput, rates and latency: one tunfw for all rounds.
	b.fw = startTunfw(t, b.topo.Host, b.bin, b.cfg)
	checkRoutes(t, b.topo, paths)
	time.Sleep(time.Second)
	if rss, _, err := procRSS(b.fw.pid); err == nil {
		b.res.add("rss-start", paths[0], float64(rss)/1024)
	}
	var expected []string
	for _, w := range workloads {
		if selected(w.id) {
			expected = append(expected, w.keys...)
		}
	}
	if selected("flows") {
		expected = append(expected, "rss-start")
		for _, n := range m.flows {
			expected = append(expected, flowKey(n))
		}
	}
	runStart := time.Now()
	for round := 0; round < m.rounds; round++ {
		for _, w := range workloads {
			if !selected(w.id) {
				continue
			}
			order := paths
			if round%2 == 1 {
				order = [2]path{paths[1], paths[0]}
			}
			for _, p := range order {
				if b.outOfTime() {
					b.res.problem("%s round %d via %s: skipped, test deadline near", w.id, round+1, p.name)
					continue
				}
				if b.fw.exited() {
					t.Fatalf("tunfw exited during the run (%v):\n%s", b.fw.err, b.fw.log())
				}
				t0 := time.Now()
				err := w.run(b, p)
				if err != nil {
					b.res.problem("%s round %d via %s: %v", w.id, round+1, p.name, err)
				}
				fmt.Printf("[%6.1fs] round %d/%d %-9s %-6s %s\n", time.Since(runStart).Seconds(), round+1, m.rounds,
					w.id, p.name, b.res.lastOf(w.keys, p, err, time.Since(t0)))
				time.Sleep(m.pause)
			}
		}
	}
	if rss, hwm, err := procRSS(b.fw.pid); err == nil {
		b.res.add("rss-end", paths[0], float64(rss)/1024)
		b.res.add("hwm-end", paths[0], float64(hwm)/1024)
	}
	if b.res.cpuBytes > 0 {
		b.res.add("cpu-all", paths[0], b.res.cpuSecs/(float64(b.res.cpuBytes)/1e9))
	}
	b.res.tunfwLog = append(b.res.tunfwLog, b.fw.notable()...)
	stats := b.tunfwStats()
	b.res.tunfwStats = stats
	logs := []string{"### tunfw for the workloads\n" + b.fw.log(), "### tunfw stats after the workloads\n" + stats}
	t0 := time.Now()
	if err := b.fw.stop(20 * time.Second); err != nil {
		b.res.problem("tunfw stop after the workloads: %v", err)
	}
	fmt.Printf("tunfw stopped in %v\n", time.Since(t0).Round(time.Millisecond))

	// Memory per idle flow: a fresh tunfw for each count, so one does not
	// inherit the other's (or the throughput runs') heap.
	if selected("flows") {
		for _, n := range m.flows {
			if b.outOfTime() {
				b.res.problem("flows %d: skipped, test deadline near", n)
				continue
			}
			fw := startTunfw(t, b.topo.Host, b.bin, b.cfg)
			r, err := b.idleFlows(fw, paths[0], n, m.flowLimit)
			if err != nil {
				b.res.problem("flows %d: %v", n, err)
			}
			if r.opened > 0 && r.rssAfter > 0 {
				b.res.add(flowKey(n), paths[0], float64(r.rssAfter-r.rssBefore)/float64(r.opened))
				b.res.flows = append(b.res.flows, flowsJSON{Flows: n, Opened: r.opened, RSSBeforeKiB: r.rssBefore,
					RSSAfterKiB: r.rssAfter, OpenSeconds: r.openSecs, Errors: r.errors, FirstError: r.firstErr})
			}
			fmt.Printf("flows %5d: opened %d in %.1fs, tunfw RSS %d -> %d KiB\n", n, r.opened, r.openSecs, r.rssBefore, r.rssAfter)
			b.res.tunfwLog = append(b.res.tunfwLog, fw.notable()...)
			if err := fw.stop(30 * time.Second); err != nil {
				b.res.problem("tunfw stop after %d idle flows: %v", n, err)
			}
			logs = append(logs, fmt.Sprintf("### tunfw for %d idle flows\n%s", n, fw.log()))
		}
	}

	table := b.res.table()
	fmt.Print("\n" + table)
	if err := b.res.write(outPath, table); err != nil {
		t.Errorf("write results: %v", err)
	} else {
		fmt.Printf("results written to %s (table: .txt)\n", outPath)
	}
	if outPath != os.DevNull {
		logPath := strings.TrimSuffix(outPath, filepath.Ext(outPath)) + ".tunfw.log"
		if err := os.WriteFile(logPath, []byte(strings.Join(logs, "\n")+"\n"), 0o644); err != nil {
			t.Errorf("write tunfw log: %v", err)
		} else {
			fmt.Printf("tunfw's log written to %s\n", logPath)
		}
	}
	for _, p := range b.res.problems {
		t.Errorf("problem: %s", p)
	}
	if m.name == "smoke" {
		for _, msg := range b.res.missing(expected) {
			t.Errorf("smoke: %s", msg)
		}
	}
}

// tunfwStats returns `tunfw stats` of the running tunfw (drops by reason),
// or the error.
func (b *bench) tunfwStats() string {
	out, err := b.topo.Host.Cmd(b.bin, "stats", "-c", b.cfg).CombinedOutput()
	if err != nil {
		return fmt.Sprintf("tunfw stats: %v: %s", err, out)
	}
	return string(out)
}

func flowKey(n int) string { return fmt.Sprintf("flows-%d", n) }

// outOfTime reports whether the go test deadline is less than 2 minutes
// away: a test killed by -timeout skips its cleanups and leaves namespaces.
func (b *bench) outOfTime() bool {
	d, ok := b.t.Deadline()
	return ok && time.Until(d) < 2*time.Minute
}

// raiseNoFile raises this test process's soft open-file limit up to the hard
// limit (the server ends of 10,000 idle flows need 10,000 descriptors);
// tunfw inherits it. The old limit is restored at cleanup.
func raiseNoFile(t *testing.T, n uint64) {
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	if old.Cur >= n || old.Cur >= old.Max {
		return
	}
	lim := syscall.Rlimit{Cur: min(n, old.Max), Max: old.Max}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatalf("raise RLIMIT_NOFILE to %d: %v", n, err)
	}
	t.Cleanup(func() { syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })
}

// checkRoutes makes sure each path goes where it should: the service
// address into the TUN, the veth address not.
func checkRoutes(t *testing.T, topo *netnstest.Topology, paths [2]path) {
	for _, p := range paths {
		out := topo.Host.Run(t, "ip", "route", "get", p.dst.String())
		viaVeth := strings.Contains(out, "dev "+topo.HostIf+" ")
		if p.tunfw() == viaVeth {
			t.Fatalf("path %s: route to %s is not what the benchmark needs: %s", p.name, p.dst, strings.TrimSpace(out))
		}
	}
}
