package bench

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
)

// figDef describes one reported figure.
type figDef struct {
	key, title, unit string
	higherBetter     bool
	tunfwOnly        bool // no direct-path counterpart
	zeroOK           bool // 0 is a valid measurement (loss)
	latency          bool // also show tunfw - direct
	profiled         bool // only in a profiled run (TUNFW_BENCH_PROFILE)
	// unprofiled: not in a profiled run, where perf's own work would
	// count (the whole machine's CPU).
	unprofiled bool
}

var figDefs = slices.Concat(hostFigDefs, gatewayFigDefs(hostFigDefs))

// hostFigDefs are the host-mode rows.
var hostFigDefs = []figDef{
	{key: "tcp1-c2s", title: "TCP 1 stream client->server", unit: "Gbit/s", higherBetter: true},
	{key: "tcp1-s2c", title: "TCP 1 stream server->client", unit: "Gbit/s", higherBetter: true},
	{key: "tcp4-c2s", title: "TCP 4 streams client->server", unit: "Gbit/s", higherBetter: true},
	{key: "tcp4-s2c", title: "TCP 4 streams server->client", unit: "Gbit/s", higherBetter: true},
	{key: "conn-seq", title: "TCP connect+echo+close, sequential", unit: "conn/s", higherBetter: true},
	{key: "conn-seq-p50", title: "  latency p50", unit: "us", latency: true},
	{key: "conn-seq-p99", title: "  latency p99", unit: "us", latency: true},
	{key: "conn-seq-fail", title: "  failed connections (5s timeout)", unit: "conn", zeroOK: true},
	{key: "conn-seq-machine", title: "  machine CPU per connection (every CPU and process)", unit: "us", unprofiled: true},
	{key: "conn-seq-need", title: "  machine CPUs needed at half of direct's rate", unit: "CPUs", tunfwOnly: true, unprofiled: true},
	{key: "conn-seq-cpu", title: "  tunfw CPU per connection", unit: "us", tunfwOnly: true},
	{key: "conn-seq-cs", title: "  tunfw context switches per connection", unit: "1", tunfwOnly: true},
	{key: "conn-seq-allocs", title: "  tunfw heap allocations per connection", unit: "1", tunfwOnly: true, zeroOK: true},
	{key: "conn-seq-alloc-kib", title: "  tunfw heap allocated per connection", unit: "KiB", tunfwOnly: true, zeroOK: true},
	{key: "conn-seq-sys", title: "  tunfw system calls per connection (profiled run)", unit: "1", tunfwOnly: true, profiled: true},
	{key: "conn-peek", title: "same, sequential, to a port a rule by name peeks", unit: "conn/s", higherBetter: true},
	{key: "conn-peek-p50", title: "  latency p50", unit: "us", latency: true},
	{key: "conn-peek-p99", title: "  latency p99", unit: "us", latency: true},
	{key: "conn-peek-fail", title: "  failed connections (5s timeout)", unit: "conn", zeroOK: true},
	{key: "conn-peek-machine", title: "  machine CPU per connection (every CPU and process)", unit: "us", unprofiled: true},
	{key: "conn-peek-need", title: "  machine CPUs needed at half of direct's rate", unit: "CPUs", tunfwOnly: true, unprofiled: true},
	{key: "conn-peek-cpu", title: "  tunfw CPU per connection", unit: "us", tunfwOnly: true},
	{key: "conn-peek-cs", title: "  tunfw context switches per connection", unit: "1", tunfwOnly: true},
	{key: "conn-peek-allocs", title: "  tunfw heap allocations per connection", unit: "1", tunfwOnly: true, zeroOK: true},
	{key: "conn-peek-alloc-kib", title: "  tunfw heap allocated per connection", unit: "KiB", tunfwOnly: true, zeroOK: true},
	{key: "conn-peek-sys", title: "  tunfw system calls per connection (profiled run)", unit: "1", tunfwOnly: true, profiled: true},
	{key: "conn-32", title: "TCP connect+echo+close, 32 concurrent", unit: "conn/s", higherBetter: true},
	{key: "conn-32-p50", title: "  latency p50", unit: "us", latency: true},
	{key: "conn-32-p99", title: "  latency p99", unit: "us", latency: true},
	{key: "conn-32-fail", title: "  failed connections (5s timeout)", unit: "conn", zeroOK: true},
	{key: "conn-32-machine", title: "  machine CPU per connection (every CPU and process)", unit: "us", unprofiled: true},
	{key: "conn-32-need", title: "  machine CPUs needed at half of direct's rate", unit: "CPUs", tunfwOnly: true, unprofiled: true},
	{key: "conn-32-cpu", title: "  tunfw CPU per connection", unit: "us", tunfwOnly: true},
	{key: "conn-32-cs", title: "  tunfw context switches per connection", unit: "1", tunfwOnly: true},
	{key: "conn-32-allocs", title: "  tunfw heap allocations per connection", unit: "1", tunfwOnly: true, zeroOK: true},
	{key: "conn-32-alloc-kib", title: "  tunfw heap allocated per connection", unit: "KiB", tunfwOnly: true, zeroOK: true},
	{key: "conn-32-sys", title: "  tunfw system calls per connection (profiled run)", unit: "1", tunfwOnly: true, profiled: true},
	{key: "rr-p50", title: "TCP 64-byte request/response p50", unit: "us", latency: true},
	{key: "rr-p99", title: "TCP 64-byte request/response p99", unit: "us", latency: true},
	{key: "rr-rate", title: "  transactions", unit: "1/s", higherBetter: true},
	{key: "rr-machine", title: "  machine CPU per transaction (every CPU and process)", unit: "us", unprofiled: true},
	{key: "rr-cpu", title: "  tunfw CPU per transaction", unit: "us", tunfwOnly: true},
	{key: "rr-cs", title: "  tunfw context switches per transaction", unit: "1", tunfwOnly: true},
	{key: "rr-allocs", title: "  tunfw heap allocations per transaction", unit: "1", tunfwOnly: true, zeroOK: true},
	{key: "rr-alloc-kib", title: "  tunfw heap allocated per transaction", unit: "KiB", tunfwOnly: true, zeroOK: true},
	{key: "rr-sys", title: "  tunfw system calls per transaction (profiled run)", unit: "1", tunfwOnly: true, profiled: true},
	{key: "rr-idle-p50", title: "same, each request after 150 ms idle, p50", unit: "us", latency: true},
	{key: "rr-idle-p90", title: "same, each request after 150 ms idle, p90", unit: "us", latency: true},
	{key: "udp-c2s-loss", title: "UDP 1 Gbit/s offered client->server loss", unit: "%", zeroOK: true},
	{key: "udp-c2s-rcvbuf", title: "  dropped by full socket receive buffers (kernel, every namespace)", unit: "%", zeroOK: true},
	{key: "udp-c2s-rx", title: "  received", unit: "Gbit/s", higherBetter: true},
	{key: "udp-s2c-loss", title: "UDP 1 Gbit/s offered server->client loss", unit: "%", zeroOK: true},
	{key: "udp-s2c-rcvbuf", title: "  dropped by full socket receive buffers (kernel, every namespace)", unit: "%", zeroOK: true},
	{key: "udp-s2c-rx", title: "  received", unit: "Gbit/s", higherBetter: true},
	{key: "cpu-tcp1-c2s", title: "tunfw CPU, TCP 1 stream client->server", unit: "s/GB", tunfwOnly: true},
	{key: "cpu-tcp1-s2c", title: "tunfw CPU, TCP 1 stream server->client", unit: "s/GB", tunfwOnly: true},
	{key: "cpu-tcp4-c2s", title: "tunfw CPU, TCP 4 streams client->server", unit: "s/GB", tunfwOnly: true},
	{key: "cpu-tcp4-s2c", title: "tunfw CPU, TCP 4 streams server->client", unit: "s/GB", tunfwOnly: true},
	{key: "cpu-all", title: "tunfw CPU, all bulk runs", unit: "s/GB", tunfwOnly: true},
	{key: "mcpu-tcp1-c2s", title: "machine CPU, TCP 1 stream client->server", unit: "s/GB", unprofiled: true},
	{key: "mcpu-tcp1-s2c", title: "machine CPU, TCP 1 stream server->client", unit: "s/GB", unprofiled: true},
	{key: "mcpu-tcp4-c2s", title: "machine CPU, TCP 4 streams client->server", unit: "s/GB", unprofiled: true},
	{key: "mcpu-tcp4-s2c", title: "machine CPU, TCP 4 streams server->client", unit: "s/GB", unprofiled: true},
	{key: "tcp1-c2s-need", title: "machine CPUs needed at half of direct's rate, TCP 1 stream client->server", unit: "CPUs", tunfwOnly: true, unprofiled: true},
	{key: "tcp1-s2c-need", title: "machine CPUs needed at half of direct's rate, TCP 1 stream server->client", unit: "CPUs", tunfwOnly: true, unprofiled: true},
	{key: "tcp4-c2s-need", title: "machine CPUs needed at half of direct's rate, TCP 4 streams client->server", unit: "CPUs", tunfwOnly: true, unprofiled: true},
	{key: "tcp4-s2c-need", title: "machine CPUs needed at half of direct's rate, TCP 4 streams server->client", unit: "CPUs", tunfwOnly: true, unprofiled: true},
	{key: "rss-start", title: "tunfw RSS at start", unit: "MiB", tunfwOnly: true},
	{key: "rss-end", title: "tunfw RSS after the workloads", unit: "MiB", tunfwOnly: true},
	{key: "hwm-end", title: "tunfw peak RSS (VmHWM) in the workloads", unit: "MiB", tunfwOnly: true},
	{key: "flows-1000", title: "tunfw RSS per idle TCP flow, 1,000 flows", unit: "KiB", tunfwOnly: true},
	{key: "flows-1000-heap", title: "  Go heap objects per idle flow (live or not yet collected)", unit: "KiB", tunfwOnly: true},
	{key: "flows-1000-warmup", title: "  RSS the 200 warm-up connections left, paid once (before the count)", unit: "MiB", tunfwOnly: true},
	{key: "flows-10000", title: "tunfw RSS per idle TCP flow, 10,000 flows", unit: "KiB", tunfwOnly: true},
	{key: "flows-10000-heap", title: "  Go heap objects per idle flow (live or not yet collected)", unit: "KiB", tunfwOnly: true},
	{key: "flows-10000-warmup", title: "  RSS the 200 warm-up connections left, paid once (before the count)", unit: "MiB", tunfwOnly: true},
}

// gwRows are the host-mode rows that gateway mode has too.
var gwRows = []string{
	"tcp1-c2s", "tcp1-s2c",
	"conn-seq", "conn-seq-p50", "conn-seq-p99", "conn-seq-fail", "conn-seq-machine", "conn-seq-need", "conn-seq-cpu", "conn-seq-cs", "conn-seq-allocs", "conn-seq-alloc-kib", "conn-seq-sys",
	"conn-32", "conn-32-p50", "conn-32-p99", "conn-32-fail", "conn-32-machine", "conn-32-need", "conn-32-cpu", "conn-32-cs", "conn-32-allocs", "conn-32-alloc-kib", "conn-32-sys",
	"rr-p50", "rr-p99", "rr-rate", "rr-machine", "rr-cpu", "rr-cs", "rr-allocs", "rr-alloc-kib", "rr-sys",
	"udp-c2s-loss", "udp-c2s-rcvbuf", "udp-c2s-rx", "udp-s2c-loss", "udp-s2c-rcvbuf", "udp-s2c-rx",
	"cpu-tcp1-c2s", "cpu-tcp1-s2c", "cpu-all", "mcpu-tcp1-c2s", "mcpu-tcp1-s2c", "tcp1-c2s-need", "tcp1-s2c-need",
	"rss-start", "rss-end", "hwm-end",
	"flows-1000", "flows-1000-heap", "flows-1000-warmup", "flows-10000", "flows-10000-heap", "flows-10000-warmup",
}

// gatewayFigDefs are the gateway-mode rows: each of gwRows under its
// gateway key, titled "gateway:" (sub-rows keep their indent).
func gatewayFigDefs(host []figDef) []figDef {
	var out []figDef
	for _, d := range host {
		if !slices.Contains(gwRows, d.key) {
			continue
		}
		d.key = gwKey(d.key)
		if !strings.HasPrefix(d.title, "  ") {
			d.title = "gateway: " + d.title
		}
		out = append(out, d)
	}
	return out
}

// gwKey is the gateway-mode key of a host-mode figure: "gw-" in front,
// after "cpu-" or "mcpu-" for a bulk workload's CPU (bulkWorkload names
// them "cpu-"+id and "mcpu-"+id).
func gwKey(key string) string {
	for _, pre := range []string{"cpu-", "mcpu-"} {
		if rest, ok := strings.CutPrefix(key, pre+"tcp"); ok {
			return pre + "gw-tcp" + rest
		}
	}
	return "gw-" + key
}

func defOf(key string) figDef {
	for _, d := range figDefs {
		if d.key == key {
			return d
		}
	}
	return figDef{key: key, title: key}
}

// results collects samples per figure and path.
type results struct {
	mu     sync.Mutex
	mode   string
	rounds int
	// profiling: perf records tunfw (TUNFW_BENCH_PROFILE).
	profiling bool
	config    string
	gwConfig  string                          // gateway mode's, if it ran
	samples   map[string]map[string][]float64 // key -> path -> samples
	problems  []string
	notes     []string
	tunfwLog  []string
	flows     []flowsJSON
	// cpu sums tunfw's CPU time and the bytes moved of the bulk runs, by
	// the key of their overall figure (cpu-all, gw-cpu-all).
	cpu map[string]cpuSum
	// tunfwStats is `tunfw stats` after the workloads.
	tunfwStats string
}

type cpuSum struct {
	secs  float64
	bytes int64
}

func newResults() *results {
	return &results{samples: map[string]map[string][]float64{}, cpu: map[string]cpuSum{}}
}

// addCPU adds a bulk run's tunfw CPU time and bytes to the sum of key.
func (r *results) addCPU(key string, secs float64, bytes int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := r.cpu[key]
	c.secs += secs
	c.bytes += bytes
	r.cpu[key] = c
}

// finishCPU adds the figure key, CPU seconds per GB over the bulk runs
// summed under key, if there were any.
func (r *results) finishCPU(key string, p path) {
	r.mu.Lock()
	c := r.cpu[key]
	r.mu.Unlock()
	if c.bytes > 0 {
		r.add(key, p, c.secs/(float64(c.bytes)/1e9))
	}
}

// needInputs returns how many samples n's inputs have, the machine's CPU
// through tunfw and the direct path's rate, for deriveNeed after a round.
func (r *results) needInputs(n needSpec, tunfw, direct path) [2]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return [2]int{len(r.samples[n.machine][tunfw.name]), len(r.samples[n.rate][direct.name])}
}

// deriveNeed adds n's figure on the tunfw path for the round that began
// with before (needInputs): the CPUs the machine would need at half of
// direct's rate at that round's cost through tunfw. A round that did not
// measure both inputs (a failed run, no machine CPU in a profiled run, a
// direct rate of 0) adds nothing.
func (r *results) deriveNeed(n needSpec, tunfw, direct path, before [2]int) {
	r.mu.Lock()
	m, rate := r.samples[n.machine][tunfw.name], r.samples[n.rate][direct.name]
	r.mu.Unlock()
	if len(m) != before[0]+1 || len(rate) != before[1]+1 || rate[len(rate)-1] <= 0 {
		return
	}
	r.add(n.key, tunfw, n.cpus(m[len(m)-1], rate[len(rate)-1]/2))
}

func (r *results) add(key string, p path, v float64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.samples[key] == nil {
		r.samples[key] = map[string][]float64{}
	}
	r.samples[key][p.name] = append(r.samples[key][p.name], v)
}

// problem records a workload that failed: a figure is missing a sample.
func (r *results) problem(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	fmt.Println("PROBLEM: " + msg)
	r.mu.Lock()
	r.problems = append(r.problems, msg)
	r.mu.Unlock()
}

// note records something that went wrong without failing a workload (a
// connection that failed in a rate test, a retried connect).
func (r *results) note(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	fmt.Println("NOTE: " + msg)
	r.mu.Lock()
	r.notes = append(r.notes, msg)
	r.mu.Unlock()
}

// lastOf formats the latest samples of keys on p for the progress lines.
func (r *results) lastOf(keys []string, p path, err error, took time.Duration) string {
	if err != nil {
		return fmt.Sprintf("ERROR (%v)", took.Round(time.Millisecond))
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	var parts []string
	for _, k := range keys {
		s := r.samples[k][p.name]
		if len(s) == 0 {
			continue
		}
		d := defOf(k)
		parts = append(parts, fmt.Sprintf("%s=%s %s", k, num(s[len(s)-1], d.unit), d.unit))
	}
	return strings.Join(parts, "  ") + fmt.Sprintf("  (%v)", took.Round(time.Millisecond))
}

// stat is median, min and max of a figure's samples on one path.
type stat struct {
	Median  float64   `json:"median"`
	Min     float64   `json:"min"`
	Max     float64   `json:"max"`
	Samples []float64 `json:"samples"`
}

func statOf(s []float64) *stat {
	if len(s) == 0 {
		return nil
	}
	c := slices.Clone(s)
	slices.Sort(c)
	med := c[len(c)/2]
	if len(c)%2 == 0 {
		med = (c[len(c)/2-1] + c[len(c)/2]) / 2
	}
	return &stat{Median: med, Min: c[0], Max: c[len(c)-1], Samples: s}
}

type figureJSON struct {
	Key          string   `json:"key"`
	Title        string   `json:"title"`
	Unit         string   `json:"unit"`
	HigherBetter bool     `json:"higher_is_better"`
	Tunfw        *stat    `json:"tunfw,omitempty"`
	Direct       *stat    `json:"direct,omitempty"`
	Ratio        *float64 `json:"ratio_tunfw_direct,omitempty"`
	// RoundRatios are tunfw/direct of each round's pair of samples, which
	// ran back to back: steadier than the ratio of medians when the
	// machine's load varies.
	RoundRatios []float64 `json:"ratio_per_round,omitempty"`
	DeltaUs     *float64  `json:"delta_us_tunfw_minus_direct,omitempty"`
}

type flowsJSON struct {
	Mode         string  `json:"mode"` // host or gateway
	Flows        int     `json:"flows"`
	Opened       int     `json:"opened"`
	RSSStartKiB  int64   `json:"rss_start_kib"`
	RSSBeforeKiB int64   `json:"rss_before_kib"`
	RSSAfterKiB  int64   `json:"rss_after_kib"`
	OpenSeconds  float64 `json:"open_seconds"`
	Errors       int     `json:"errors"`
	FirstError   string  `json:"first_error,omitempty"`
}

func (r *results) figures() []figureJSON {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []figureJSON
	for _, d := range figDefs {
		s := r.samples[d.key]
		if s == nil {
			continue
		}
		f := figureJSON{Key: d.key, Title: strings.TrimSpace(d.title), Unit: d.unit, HigherBetter: d.higherBetter,
			Tunfw: statOf(s["tunfw"]), Direct: statOf(s["direct"])}
		if f.Tunfw != nil && f.Direct != nil {
			if f.Direct.Median != 0 && !d.zeroOK {
				ratio := f.Tunfw.Median / f.Direct.Median
				f.Ratio = &ratio
				for i := range min(len(f.Tunfw.Samples), len(f.Direct.Samples)) {
					if f.Direct.Samples[i] != 0 {
						f.RoundRatios = append(f.RoundRatios, f.Tunfw.Samples[i]/f.Direct.Samples[i])
					}
				}
			}
			if d.latency {
				delta := f.Tunfw.Median - f.Direct.Median
				f.DeltaUs = &delta
			}
		}
		out = append(out, f)
	}
	return out
}

// missing lists the expected figures without a sample on a path they need,
// or with a zero value where zero means "not measured".
func (r *results) missing(keys []string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, k := range keys {
		d := defOf(k)
		paths := []string{"tunfw", "direct"}
		if d.tunfwOnly {
			paths = paths[:1]
		}
		for _, p := range paths {
			s := r.samples[k][p]
			if len(s) == 0 && (d.profiled || d.unprofiled && r.profiling) {
				continue
			}
			if len(s) == 0 {
				out = append(out, fmt.Sprintf("%s (%s) not measured via %s", k, d.unit, p))
				continue
			}
			for _, v := range s {
				if v < 0 || (v == 0 && !d.zeroOK && !strings.Contains(k, "flows-")) || v != v {
					out = append(out, fmt.Sprintf("%s via %s = %v %s", k, p, v, d.unit))
				}
			}
		}
	}
	return out
}

func num(v float64, unit string) string {
	switch {
	case unit == "%":
		return fmt.Sprintf("%.2f", v)
	case v != v:
		return "NaN"
	case v >= 1000 || v <= -1000:
		return fmt.Sprintf("%.0f", v)
	case v >= 100 || v <= -100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10 || v <= -10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

func statText(s *stat, unit string) string {
	if s == nil {
		return "-"
	}
	if len(s.Samples) == 1 {
		return num(s.Median, unit)
	}
	return fmt.Sprintf("%s [%s..%s]", num(s.Median, unit), num(s.Min, unit), num(s.Max, unit))
}

func machine() map[string]any {
	m := map[string]any{"nproc": runtime.NumCPU(), "go": runtime.Version(), "goarch": runtime.GOARCH}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m["kernel"] = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m["cpu"] = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		// Other work on the machine (also in other containers on the same
		// kernel) makes the figures noisy: the load shows it.
		m["loadavg"] = strings.Join(strings.Fields(string(b))[:3], " ")
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		if l, _, ok := strings.Cut(string(b), "\n"); ok {
			m["memory"] = strings.Join(strings.Fields(strings.TrimPrefix(l, "MemTotal:")), " ")
		}
	}
	if s := cpuIdle(); s != "" {
		m["cpuidle"] = s
	}
	return m
}

// cpuIdle says how the machine's idle CPUs sleep: request/response
// latency through tunfw depends on it more than on anything tunfw does
// (cpu.wakeup_latency in config.toml).
func cpuIdle() string {
	read := func(p string) string {
		b, err := os.ReadFile(p)
		if err != nil {
			return ""
		}
		return strings.TrimSpace(string(b))
	}
	drv := read("/sys/devices/system/cpu/cpuidle/current_driver")
	if drv == "" {
		return ""
	}
	s := "driver " + drv + ", governor " + read("/sys/devices/system/cpu/cpuidle/current_governor_ro")
	if ns := read("/sys/module/haltpoll/parameters/guest_halt_poll_ns"); ns != "" {
		s += ", guest_halt_poll_ns " + ns
	}
	return s
}

// revision is the source tree's commit, read-only (git describe).
func revision() string {
	out, err := exec.Command("git", "-C", "..", "describe", "--always", "--dirty").Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(out))
}

func (r *results) table() string {
	var sb strings.Builder
	mach := machine()
	fmt.Fprintf(&sb, "tunfw benchmark, %s, mode %s, %d round(s), %v cores, kernel %v, %v, load average at the end %v\n",
		time.Now().Format("2006-01-02 15:04 MST"), r.mode, r.rounds, mach["nproc"], mach["kernel"], mach["cpu"], mach["loadavg"])
	fmt.Fprintf(&sb, "median [min..max] over rounds; direct = same client and server over the veth without tunfw\n")
	if ci, ok := mach["cpuidle"]; ok {
		fmt.Fprintf(&sb, "idle CPUs: %v\n", ci)
	}
	figs := r.figures()
	if slices.ContainsFunc(figs, func(f figureJSON) bool { return strings.Contains(f.Key, "gw-") }) {
		fmt.Fprintf(&sb, "gateway: the client in a namespace routed through tunfw's (route.from, link MTU 1500);\n"+
			"  direct = the same route, forwarded by the kernel, while that tunfw runs\n")
	}
	fmt.Fprintln(&sb)
	tw := tabwriter.NewWriter(&sb, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "figure\tunit\ttunfw\tdirect\ttunfw/direct\t")
	for _, f := range figs {
		d := defOf(f.Key)
		ratio := "-"
		if f.Ratio != nil {
			ratio = fmt.Sprintf("%.2f", *f.Ratio)
		}
		if f.DeltaUs != nil {
			ratio += fmt.Sprintf(" (%+.0f us)", *f.DeltaUs)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t\n", d.title, f.Unit, statText(f.Tunfw, f.Unit), statText(f.Direct, f.Unit), ratio)
	}
	tw.Flush()
	if len(r.problems) > 0 {
		fmt.Fprintf(&sb, "\nproblems:\n")
		for _, p := range r.problems {
			fmt.Fprintf(&sb, "  %s\n", p)
		}
	}
	if len(r.notes) > 0 {
		fmt.Fprintf(&sb, "\nnotes:\n")
		for _, p := range r.notes {
			fmt.Fprintf(&sb, "  %s\n", p)
		}
	}
	if len(r.tunfwLog) > 0 {
		fmt.Fprintf(&sb, "\ntunfw warnings and errors (%d lines, first 20):\n", len(r.tunfwLog))
		for _, l := range r.tunfwLog[:min(20, len(r.tunfwLog))] {
			fmt.Fprintf(&sb, "  %s\n", l)
		}
	}
	return sb.String()
}

// write saves the results as JSON at path and the table next to it (.txt).
func (r *results) write(path, table string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	doc := map[string]any{
		"date":               time.Now().Format(time.RFC3339),
		"mode":               r.mode,
		"rounds":             r.rounds,
		"machine":            machine(),
		"revision":           revision(),
		"config":             r.config,
		"gateway_config":     r.gwConfig,
		"figures":            r.figures(),
		"flows":              r.flows,
		"udp":                map[string]any{"offered_payload_bps": udpRate, "payload_bytes": udpPayload},
		"problems":           r.problems,
		"tunfw_log_warnings": r.tunfwLog,
		"tunfw_stats":        r.tunfwStats,
	}
	b, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return err
	}
	txt := strings.TrimSuffix(path, filepath.Ext(path)) + ".txt"
	if path == os.DevNull {
		return nil
	}
	return os.WriteFile(txt, []byte(table), 0o644)
}
