package bench

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tunfw/tunfw/control"
	"github.com/tunfw/tunfw/internal/netnstest"
	"github.com/tunfw/tunfw/tun"
)

// modeCfg is how long and how often each workload runs.
type modeCfg struct {
	name                       string
	rounds                     int
	bulk, conn, rr, udp, pause time.Duration
	rrIdle                     int // transactions of rr-idle, each after idleGap
	flows                      []int
	gwFlows                    []int         // idle flows from the gateway client
	flowLimit                  time.Duration // bound on opening one set of idle flows
}

var modes = map[string]modeCfg{
	"full": {
		name: "full", rounds: 3,
		bulk: 5 * time.Second, conn: 4 * time.Second, rr: 3 * time.Second, udp: 4 * time.Second,
		pause: 300 * time.Millisecond, rrIdle: 40,
		flows: []int{1000, 10000}, gwFlows: []int{1000, 10000}, flowLimit: 90 * time.Second,
	},
	"smoke": {
		name: "smoke", rounds: 1,
		bulk: 1500 * time.Millisecond, conn: time.Second, rr: time.Second, udp: time.Second,
		pause: 100 * time.Millisecond, rrIdle: 4,
		// 1,000 gateway flows prove the path; 10,000 more would cost
		// a fresh tunfw and ~10s for a figure the host row already has.
		flows: []int{1000, 10000}, gwFlows: []int{1000}, flowLimit: 30 * time.Second,
	},
}

// bench is one benchmark run.
type bench struct {
	t     *testing.T
	m     modeCfg
	topo  *netnstest.Topology
	bin   string
	fw    *tunfwProc // the tunfw of the workloads running now
	ph    *phase     // the phase running now
	prof  profiler   // TUNFW_BENCH_PROFILE
	res   *results
	runID atomic.Uint64
	// cpuBound is the machine's CPU latency bound before tunfw ran, when
	// tunfw holds a request of its own (TUNFW_BENCH_WAKEUP_LATENCY); -1
	// otherwise. Direct samples wait for it, so they measure the machine
	// as it is without tunfw, not with the request tunfw still holds for
	// a second after its own traffic.
	cpuBound int32
}

// phase is one way of running tunfw and its workloads: host mode (the
// clients in tunfw's own namespace, the service prefix routed into the
// TUN) or gateway mode (the clients in a namespace routed through
// tunfw's, captured with [route] from).
type phase struct {
	name      string // for messages
	prefix    string // of its figure keys and ids: "" or "gw-"
	cfg       string // tunfw config file
	paths     [2]path
	workloads []workload
	flows     []int
	// check verifies the routes of paths once tunfw is up.
	check func(t *testing.T)
}

// flowsID is the TUNFW_BENCH_ONLY id of the phase's idle-flow counts.
func (ph *phase) flowsID() string { return ph.prefix + "flows" }

// workload is one measured thing, run on both paths unless flows.
type workload struct {
	id   string
	keys []string // figures it produces
	run  func(b *bench, p path) error
	need needSpec // the machine CPUs half of direct's rate needs, if any
}

// needSpec derives, after each round of its workload, the figure key: how
// many of the machine's CPUs (busy time, every process) the tunfw path would need to
// run at half of the direct path's rate, from each round's machine CPU per
// operation through tunfw (figure machine) and the direct path's rate
// (figure rate). cpus converts one operation's machine CPU figure and a
// rate into CPUs. More than the machine has: the 0.5 of direct is
// out of reach for the whole machine, whatever tunfw's own share.
type needSpec struct {
	key, rate, machine string
	cpus               func(machine, rate float64) float64
}

// needKey is the figure a needSpec of workload id reports.
func needKey(id string) string { return id + "-need" }

func bulkWorkload(id string, streams int, up bool) workload {
	// s/GB times GB/s.
	need := needSpec{key: needKey(id), rate: id, machine: "mcpu-" + id, cpus: func(m, gbps float64) float64 { return m * gbps / 8 }}
	return workload{id: id, keys: []string{id, "cpu-" + id, "mcpu-" + id, need.key}, need: need, run: func(b *bench, p path) error {
		var cpu0 float64
		if p.tunfw() {
			cpu0, _ = procCPU(b.fw.pid)
		}
		m0, merr := machineBusy()
		b.profileStart(id, p)
		r, err := b.bulk(p, streams, up, b.m.bulk)
		m1, merr1 := machineBusy()
		b.profileStop()
		if err != nil {
			return err
		}
		b.res.add(id, p, r.gbps())
		if merr == nil && merr1 == nil && r.bytes > 0 && !b.res.profiling {
			b.res.add("mcpu-"+id, p, (m1-m0)/(float64(r.bytes)/1e9))
		}
		if p.tunfw() {
			cpu1, err := procCPU(b.fw.pid)
			if err != nil {
				return err
			}
			b.res.add("cpu-"+id, p, (cpu1-cpu0)/(float64(r.bytes)/1e9))
			b.res.addCPU(b.ph.prefix+"cpu-all", cpu1-cpu0, r.bytes)
		}
		return nil
	}}
}

// procCost is tunfw's CPU time and context switches (all threads) and
// its Go heap allocations, and the whole machine's busy CPU time, taken
// before and after a workload to give its cost per operation.
type procCost struct {
	cpu     float64 // seconds
	cs      int64
	rt      runtimeStats
	machine float64 // seconds, < 0: unknown
}

func costOf(b *bench, p path) procCost {
	m, err := machineBusy()
	if err != nil {
		m = -1
	}
	if !p.tunfw() {
		return procCost{machine: m}
	}
	cpu, _ := procCPU(b.fw.pid)
	cs, _ := procSwitches(b.fw.pid)
	rt, err := readRuntimeStats(b.ph.cfg)
	if err != nil {
		b.res.problem("%v", err)
	}
	return procCost{cpu, cs, rt, m}
}

// addCost reports the machine's busy CPU per operation since c0 on both
// paths (id-machine, us), and on the tunfw path tunfw's CPU (us), context
// switches and heap allocations (count and KiB) per operation, as id-cpu,
// id-cs, id-allocs and id-alloc-kib; when profiling (profileStart), its
// system calls as id-sys.
func (b *bench) addCost(id string, p path, c0 procCost, ops int) {
	if ops == 0 {
		b.profileStop()
		return
	}
	c1 := costOf(b, p)
	if c0.machine >= 0 && c1.machine >= 0 && !b.res.profiling {
		b.res.add(id+"-machine", p, (c1.machine-c0.machine)*1e6/float64(ops))
	}
	if !p.tunfw() {
		b.profileStop()
		return
	}
	if sys, ok := b.profileStop(); ok {
		b.res.add(id+"-sys", p, sys/float64(ops))
	}
	b.res.add(id+"-cpu", p, (c1.cpu-c0.cpu)*1e6/float64(ops))
	b.res.add(id+"-cs", p, float64(c1.cs-c0.cs)/float64(ops))
	if c0.rt.Allocs > 0 && c1.rt.Allocs > 0 {
		b.res.add(id+"-allocs", p, float64(c1.rt.Allocs-c0.rt.Allocs)/float64(ops))
		b.res.add(id+"-alloc-kib", p, float64(c1.rt.AllocBytes-c0.rt.AllocBytes)/1024/float64(ops))
	}
}

// perOpNeed: us of machine CPU per operation times operations per second.
func perOpNeed(us, rate float64) float64 { return us * 1e-6 * rate }

func connWorkload(id string, port, conc int) workload {
	need := needSpec{key: needKey(id), rate: id, machine: id + "-machine", cpus: perOpNeed}
	return workload{id: id, keys: []string{id, id + "-p50", id + "-p99", id + "-fail", id + "-machine", need.key, id + "-cpu", id + "-cs", id + "-allocs", id + "-alloc-kib", id + "-sys"}, need: need, run: func(b *bench, p path) error {
		b.profileStart(id, p)
		c0 := costOf(b, p)
		r, err := b.connRate(p, port, conc, b.m.conn)
		if err != nil {
			return err
		}
		b.addCost(id, p, c0, r.count)
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

func rrWorkload(id string) workload {
	return workload{id: id, keys: []string{id + "-p50", id + "-p99", id + "-rate", id + "-machine", id + "-cpu", id + "-cs", id + "-allocs", id + "-alloc-kib", id + "-sys"}, run: func(b *bench, p path) error {
		b.profileStart(id, p)
		c0 := costOf(b, p)
		r, err := b.requestResponse(p, b.m.rr)
		if err != nil {
			return err
		}
		b.addCost(id, p, c0, r.count)
		b.res.add(id+"-p50", p, us(r.p50))
		b.res.add(id+"-p99", p, us(r.p99))
		b.res.add(id+"-rate", p, r.rate)
		return nil
	}}
}

// rrIdleWorkload is request/response on a connection that goes quiet
// between transactions, the way interactive sessions do (a shell, a
// keep-alive connection between page loads): each request comes idleGap
// after the last response, long enough for tunfw's relay to have handed
// the connection to its idle watcher.
func rrIdleWorkload(id string) workload {
	return workload{id: id, keys: []string{id + "-p50", id + "-p90"}, run: func(b *bench, p path) error {
		r, err := b.requestAfterIdle(p, b.m.rrIdle, idleGap)
		if err != nil {
			return err
		}
		b.res.add(id+"-p50", p, us(r.p50))
		b.res.add(id+"-p90", p, us(r.p90))
		return nil
	}}
}

func udpWorkload(id string, up bool) workload {
	return workload{id: id, keys: []string{id + "-loss", id + "-rcvbuf", id + "-rx"}, run: func(b *bench, p path) error {
		var r udpResult
		var err error
		nss := []*netnstest.NS{b.topo.Host, b.topo.Server}
		if p.client != b.topo.Host {
			nss = append(nss, p.client)
		}
		drops0, derr := rcvbufErrors(nss)
		if up {
			r, err = b.udpUp(p, b.m.udp)
		} else {
			r, err = b.udpDown(p, b.m.udp)
		}
		if err != nil {
			return err
		}
		b.res.add(id+"-loss", p, r.lossPct())
		if drops1, err := rcvbufErrors(nss); err == nil && derr == nil && r.sent > 0 {
			b.res.add(id+"-rcvbuf", p, 100*float64(drops1-drops0)/float64(r.sent))
		}
		b.res.add(id+"-rx", p, r.rxGbps())
		return nil
	}}
}

// workloads run in host mode.
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
	rrWorkload("rr"),
	rrIdleWorkload("rr-idle"),
	udpWorkload("udp-c2s", true),
	udpWorkload("udp-s2c", false),
}

// gwWorkloads run in gateway mode: the same workloads from the gateway
// client, one of each row issue 14 asks for.
var gwWorkloads = []workload{
	bulkWorkload("gw-tcp1-c2s", 1, true),
	bulkWorkload("gw-tcp1-s2c", 1, false),
	connWorkload("gw-conn-seq", portCRR, 1),
	connWorkload("gw-conn-32", portCRR, 32),
	rrWorkload("gw-rr"),
	udpWorkload("gw-udp-c2s", true),
	udpWorkload("gw-udp-s2c", false),
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

	b := &bench{t: t, m: m, res: newResults(), cpuBound: -1}
	if os.Getenv("TUNFW_BENCH_WAKEUP_LATENCY") != "" {
		bound, err := readCPUBound()
		if err != nil {
			t.Fatalf("TUNFW_BENCH_WAKEUP_LATENCY: %v", err)
		}
		b.cpuBound = bound
	}
	profDir, err := profileDir()
	if err != nil {
		t.Fatal(err)
	}
	b.prof.dir = profDir
	b.res.profiling = profDir != ""
	b.res.mode, b.res.rounds = m.name, m.rounds
	b.bin = buildTunfw(t)
	mtu := tun.DefaultMTU // what a user gets without setting it
	if s := os.Getenv("TUNFW_BENCH_MTU"); s != "" {
		var err error
		if mtu, err = strconv.Atoi(s); err != nil {
			t.Fatalf("TUNFW_BENCH_MTU=%q: %v", s, err)
		}
	}
	cfgText := benchConfig(mtu, "", os.Getenv("TUNFW_BENCH_WAKEUP_LATENCY"))
	if p := os.Getenv("TUNFW_BENCH_CONFIG"); p != "" {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		cfgText = string(data)
	}
	cfgDir := t.TempDir()

	b.topo = netnstest.NewTopology(t)
	host := &phase{name: "host", cfg: writeConfig(t, cfgDir, "config.toml", cfgText), workloads: workloads, flows: m.flows,
		paths: [2]path{{"tunfw", b.topo.ServiceV4, b.topo.Host}, {"direct", b.topo.ServerV4, b.topo.Host}}}
	host.check = func(t *testing.T) { checkRoutes(t, b.topo.Host, host.paths, b.topo.HostIf) }
	b.res.config = readFile(t, host.cfg)
	phases := []*phase{host}
	gwWanted := slices.ContainsFunc(gwWorkloads, func(w workload) bool { return selected(w.id) }) || selected("gw-flows")
	if gwWanted {
		phases = append(phases, b.gatewayPhase(cfgDir, mtu))
	}
	startServers(t, b.topo.Server, []netip.Addr{b.topo.ServiceV4, b.topo.ServerV4})

	var expected []string
	for _, ph := range phases {
		for _, w := range ph.workloads {
			if selected(w.id) {
				expected = append(expected, w.keys...)
			}
		}
		if selected(ph.flowsID()) {
			expected = append(expected, ph.prefix+"rss-start")
			for _, n := range ph.flows {
				expected = append(expected, flowKey(ph.prefix, n))
			}
		}
	}
	var logs []string
	runStart := time.Now()
	for _, ph := range phases {
		if slices.ContainsFunc(ph.workloads, func(w workload) bool { return selected(w.id) }) || selected(ph.flowsID()) {
			logs = append(logs, b.runWorkloads(ph, selected, runStart)...)
		}
	}
	// Memory per idle flow: a fresh tunfw for each count, so one does not
	// inherit the other's (or the throughput runs') heap.
	for _, ph := range phases {
		if selected(ph.flowsID()) {
			logs = append(logs, b.runFlows(ph)...)
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

// gatewayPhase adds the gateway client to the topology and returns the
// gateway-mode phase: tunfw with [route] from = [the client's link],
// capturing what the client sends to the service prefix.
//
// Its direct path is the same three namespaces with the kernel forwarding
// the client's packets to the server's veth address (the server gets a
// route back to the client's subnet; tunfw's own connections come from
// the host's address and need none). It runs against the same tunfw
// process, alternating with the tunfw path sample by sample as the host
// rows do: stopping tunfw for each direct sample would cost seconds each
// time and measure a fresh tunfw on the tunfw path. What a running tunfw
// adds to the direct path is its nftables source check and forward chain
// on the client's packets, a few rule evaluations a packet: the direct
// path is the kernel's route as it is while tunfw runs, which is the
// choice a user has.
func (b *bench) gatewayPhase(cfgDir string, mtu int) *phase {
	t, topo := b.t, b.topo
	gw := topo.AddGatewayClient(t)
	topo.Server.Run(t, "ip", "route", "add", gw.Prefix4.String(), "via", topo.HostV4.String(), "dev", topo.ServerIf)
	ph := &phase{name: "gateway", prefix: "gw-", workloads: gwWorkloads, flows: b.m.gwFlows,
		cfg:   writeConfig(t, cfgDir, "gateway.toml", benchConfig(mtu, gw.HostIf, os.Getenv("TUNFW_BENCH_WAKEUP_LATENCY"))),
		paths: [2]path{{"tunfw", topo.ServiceV4, gw.NS}, {"direct", topo.ServerV4, gw.NS}}}
	b.res.gwConfig = readFile(t, ph.cfg)
	ph.check = func(t *testing.T) {
		checkRoutes(t, topo.Host, ph.paths, topo.HostIf, "from", gw.ClientV4.String(), "iif", gw.HostIf)
	}
	return ph
}

// writeConfig writes text to dir/name, with a control socket of its own
// next to it (controlSocket) unless text has a [control] section, and
// returns the path.
func writeConfig(t *testing.T, dir, name, text string) string {
	if !strings.Contains(text, "[control]") {
		// Our own control socket, never the machine's default one.
		text += fmt.Sprintf("\n[control]\nsocket = %q\n", controlSocket(filepath.Join(dir, name)))
	}
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// controlSocket is the control socket writeConfig gives config file cfg.
func controlSocket(cfg string) string {
	return strings.TrimSuffix(cfg, filepath.Ext(cfg)) + ".sock"
}

// runtimeStats is the part of `tunfw stats` the benchmark reads: the Go
// runtime's counters.
type runtimeStats struct {
	Allocs           uint64 `json:"allocs_total"`
	AllocBytes       uint64 `json:"alloc_bytes_total"`
	HeapObjectsBytes uint64 `json:"heap_objects_bytes"`
	HeapFreeBytes    uint64 `json:"heap_free_bytes"`
	GCCycles         uint64 `json:"gc_cycles"`
}

// askTunfw sends cmd to the control socket of the tunfw running config cfg
// and decodes its answer's data into v.
func askTunfw(cfg, cmd string, v any) error {
	resp, err := control.Call(controlSocket(cfg), control.Request{Cmd: cmd}, 10*time.Second)
	if err == nil && !resp.OK {
		err = errors.New(resp.Error)
	}
	if err == nil {
		err = json.Unmarshal(resp.Data, v)
	}
	if err != nil {
		return fmt.Errorf("tunfw %s: %w", cmd, err)
	}
	return nil
}

// readFlowCount asks the tunfw running config cfg how many flows its
// table holds.
func readFlowCount(cfg string) (int, error) {
	var st struct {
		Flows int `json:"flows"`
	}
	err := askTunfw(cfg, "status", &st)
	return st.Flows, err
}

// readRuntimeStats asks the tunfw running config cfg for its runtime
// counters over its control socket.
func readRuntimeStats(cfg string) (runtimeStats, error) {
	var st struct {
		Runtime runtimeStats `json:"runtime"`
	}
	err := askTunfw(cfg, "stats", &st)
	return st.Runtime, err
}

func readFile(t *testing.T, p string) string {
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// runWorkloads runs ph's selected workloads on one tunfw for all rounds,
// alternating its two paths, and returns tunfw's log and stats.
func (b *bench) runWorkloads(ph *phase, selected func(string) bool, runStart time.Time) []string {
	t, m := b.t, b.m
	b.ph = ph
	b.fw = startTunfw(t, b.topo.Host, b.bin, ph.cfg)
	ph.check(t)
	time.Sleep(time.Second)
	if rss, _, err := procRSS(b.fw.pid); err == nil {
		b.res.add(ph.prefix+"rss-start", ph.paths[0], float64(rss)/1024)
	}
	for round := 0; round < m.rounds; round++ {
		for _, w := range ph.workloads {
			if !selected(w.id) {
				continue
			}
			order := ph.paths
			if round%2 == 1 {
				order = [2]path{ph.paths[1], ph.paths[0]}
			}
			var before [2]int
			if w.need.key != "" {
				before = b.res.needInputs(w.need, ph.paths[0], ph.paths[1])
			}
			for _, p := range order {
				if b.outOfTime() {
					b.res.problem("%s round %d via %s: skipped, test deadline near", w.id, round+1, p.name)
					continue
				}
				if b.fw.exited() {
					t.Fatalf("tunfw exited during the run (%v):\n%s", b.fw.err, b.fw.log())
				}
				if p.name == "direct" {
					b.waitCPUBound()
				}
				t0 := time.Now()
				err := w.run(b, p)
				b.profileStop() // a workload that failed left it running
				if err != nil {
					b.res.problem("%s round %d via %s: %v", w.id, round+1, p.name, err)
				}
				fmt.Printf("[%6.1fs] round %d/%d %-11s %-6s %s\n", time.Since(runStart).Seconds(), round+1, m.rounds,
					w.id, p.name, b.res.lastOf(w.keys, p, err, time.Since(t0)))
				time.Sleep(m.pause)
			}
			if w.need.key != "" {
				b.res.deriveNeed(w.need, ph.paths[0], ph.paths[1], before)
			}
		}
	}
	if rss, hwm, err := procRSS(b.fw.pid); err == nil {
		b.res.add(ph.prefix+"rss-end", ph.paths[0], float64(rss)/1024)
		b.res.add(ph.prefix+"hwm-end", ph.paths[0], float64(hwm)/1024)
	}
	b.res.finishCPU(ph.prefix+"cpu-all", ph.paths[0])
	b.res.tunfwLog = append(b.res.tunfwLog, b.fw.notable()...)
	stats := b.tunfwStats(ph.cfg)
	if ph.prefix == "" {
		b.res.tunfwStats = stats
	} else {
		b.res.tunfwStats += fmt.Sprintf("\n### %s mode\n%s", ph.name, stats)
	}
	logs := []string{fmt.Sprintf("### tunfw for the %s-mode workloads\n%s", ph.name, b.fw.log()),
		fmt.Sprintf("### tunfw stats after the %s-mode workloads\n%s", ph.name, stats)}
	t0 := time.Now()
	if err := b.fw.stop(20 * time.Second); err != nil {
		b.res.problem("tunfw stop after the %s-mode workloads: %v", ph.name, err)
	}
	fmt.Printf("tunfw (%s mode) stopped in %v\n", ph.name, time.Since(t0).Round(time.Millisecond))
	return logs
}

// runFlows measures tunfw's memory per idle flow for each of ph's counts,
// each on a fresh tunfw, and returns tunfw's logs.
func (b *bench) runFlows(ph *phase) []string {
	t := b.t
	var logs []string
	for _, n := range ph.flows {
		if b.outOfTime() {
			b.res.problem("%s %d: skipped, test deadline near", ph.flowsID(), n)
			continue
		}
		fw := startTunfw(t, b.topo.Host, b.bin, ph.cfg)
		r, err := b.idleFlows(fw, ph.cfg, ph.paths[0], n, b.m.flowLimit)
		if err != nil {
			b.res.problem("%s %d: %v", ph.flowsID(), n, err)
		}
		if r.opened > 0 && r.rssAfter > 0 {
			b.res.add(flowKey(ph.prefix, n), ph.paths[0], float64(r.rssAfter-r.rssBefore)/float64(r.opened))
			if r.heapAfter > 0 {
				b.res.add(flowKey(ph.prefix, n)+"-heap", ph.paths[0], float64(int64(r.heapAfter)-int64(r.heapBefore))/1024/float64(r.opened))
			}
			b.res.add(flowKey(ph.prefix, n)+"-warmup", ph.paths[0], float64(r.rssBefore-r.rssStart)/1024)
			b.res.flows = append(b.res.flows, flowsJSON{Mode: ph.name, Flows: n, Opened: r.opened, RSSStartKiB: r.rssStart, RSSBeforeKiB: r.rssBefore,
				RSSAfterKiB: r.rssAfter, OpenSeconds: r.openSecs, Errors: r.errors, FirstError: r.firstErr})
		}
		fmt.Printf("%-8s %5d: opened %d in %.1fs, tunfw RSS %d (start) -> %d (warm) -> %d KiB, Go heap objects %d -> %d KiB\n",
			ph.flowsID(), n, r.opened, r.openSecs, r.rssStart, r.rssBefore, r.rssAfter, r.heapBefore>>10, r.heapAfter>>10)
		b.res.tunfwLog = append(b.res.tunfwLog, fw.notable()...)
		if err := fw.stop(30 * time.Second); err != nil {
			b.res.problem("tunfw stop after %d idle flows (%s mode): %v", n, ph.name, err)
		}
		logs = append(logs, fmt.Sprintf("### tunfw for %d idle flows, %s mode\n%s", n, ph.name, fw.log()))
	}
	return logs
}

// tunfwStats returns `tunfw stats` of the running tunfw of config cfg
// (drops by reason), or the error.
func (b *bench) tunfwStats(cfg string) string {
	out, err := b.topo.Host.Cmd(b.bin, "stats", "-c", cfg).CombinedOutput()
	if err != nil {
		return fmt.Sprintf("tunfw stats: %v: %s", err, out)
	}
	return string(out)
}

func flowKey(prefix string, n int) string { return fmt.Sprintf("%sflows-%d", prefix, n) }

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

// checkRoutes makes sure each path goes where it should, asking the
// routing of ns (`ip route get DST how...`): the service address into the
// TUN, the veth address out of uplink.
func checkRoutes(t *testing.T, ns *netnstest.NS, paths [2]path, uplink string, how ...string) {
	for _, p := range paths {
		out := ns.Run(t, append([]string{"ip", "route", "get", p.dst.String()}, how...)...)
		viaVeth := strings.Contains(out, "dev "+uplink+" ")
		if p.tunfw() == viaVeth {
			t.Fatalf("path %s: route to %s is not what the benchmark needs: %s", p.name, p.dst, strings.TrimSpace(out))
		}
	}
}

// readCPUBound reads the machine's CPU latency bound (PM QoS), in
// microseconds.
func readCPUBound() (int32, error) {
	f, err := os.Open("/dev/cpu_dma_latency")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var v [4]byte
	if _, err := io.ReadFull(f, v[:]); err != nil {
		return 0, err
	}
	return int32(binary.NativeEndian.Uint32(v[:])), nil
}

// waitCPUBound waits until tunfw let its CPU latency request go (see
// bench.cpuBound), at most a few seconds.
func (b *bench) waitCPUBound() {
	if b.cpuBound < 0 {
		return
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		v, err := readCPUBound()
		if err == nil && v == b.cpuBound {
			return
		}
		if time.Now().After(deadline) {
			b.res.problem("tunfw's CPU latency request still held 3 s after its traffic (bound %d us, %v)", v, err)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}
