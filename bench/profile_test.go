package bench

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// profiler records what tunfw does during the tunfw-path samples of the
// workloads when TUNFW_BENCH_PROFILE names a directory: a perf profile of
// all of tunfw's threads (kernel included: on the request paths most of
// tunfw's time is the kernel's) written as DIR/<workload>.txt, and its
// system calls, reported per operation as <workload>-sys. perf perturbs
// what it measures: a profiled run is for finding out why, not for the
// figures.
type profiler struct {
	dir   string
	id    string
	data  string
	rec   *exec.Cmd
	stat  *exec.Cmd
	statF string
}

// profileStart starts recording for workload id on path p, if profiling.
func (b *bench) profileStart(id string, p path) {
	if b.prof.dir == "" || !p.tunfw() {
		return
	}
	pr := &b.prof
	pr.id = id
	pid := strconv.Itoa(b.fw.pid)
	pr.data = filepath.Join(pr.dir, id+".perf.data")
	pr.statF = filepath.Join(pr.dir, id+".stat")
	pr.rec = exec.Command("perf", "record", "-q", "-F", "1999", "-g", "-p", pid, "-o", pr.data)
	pr.stat = exec.Command("perf", "stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-p", pid, "-o", pr.statF)
	// Not waited for: perf may miss the workload's first milliseconds,
	// which moves neither a profile nor a per-operation average over
	// seconds.
	for _, c := range []*exec.Cmd{pr.rec, pr.stat} {
		if err := c.Start(); err != nil {
			b.res.problem("profile %s: %v", id, err)
		}
	}
}

// profileStop ends the recording of profileStart, writes the profile's
// report and returns the system calls counted; ok false when nothing was
// recorded.
func (b *bench) profileStop() (syscalls float64, ok bool) {
	pr := &b.prof
	if pr.rec == nil {
		return 0, false
	}
	for _, c := range []*exec.Cmd{pr.rec, pr.stat} {
		if c.Process != nil {
			c.Process.Signal(syscall.SIGINT)
			c.Wait()
		}
	}
	pr.rec, pr.stat = nil, nil
	// Where the time goes, then who called the largest entries (the
	// scheduler's lock releases and context switches say little alone).
	flat, err := exec.Command("perf", "report", "-i", pr.data, "--stdio", "--no-children", "-g", "none",
		"--sort", "dso,sym", "--percent-limit", "0.7").CombinedOutput()
	if err != nil {
		b.res.problem("profile %s: perf report: %v: %s", pr.id, err, flat)
	}
	chains, err := exec.Command("perf", "report", "-i", pr.data, "--stdio", "--no-children", "--sort", "sym",
		"-g", "caller,2,callee,function,percent", "--max-stack", "12", "--percent-limit", "5").CombinedOutput()
	if err != nil {
		b.res.problem("profile %s: perf report: %v: %s", pr.id, err, chains)
	}
	text := append(trimReport(flat), "\ncall chains of the entries above 5% (caller first, branches above 2%):\n"...)
	text = append(text, trimReport(chains)...)
	if err := os.WriteFile(filepath.Join(pr.dir, pr.id+".txt"), text, 0o644); err != nil {
		b.res.problem("profile %s: %v", pr.id, err)
	}
	os.Remove(pr.data)
	stat, err := os.ReadFile(pr.statF)
	os.Remove(pr.statF)
	if err != nil {
		return 0, false
	}
	for _, l := range strings.Split(string(stat), "\n") {
		f := strings.Split(l, ",")
		if len(f) >= 3 && strings.Contains(l, "raw_syscalls:sys_enter") {
			n, err := strconv.ParseFloat(f[0], 64)
			return n, err == nil
		}
	}
	return 0, false
}

// trimReport drops perf report's comment lines but the totals.
func trimReport(out []byte) []byte {
	var b bytes.Buffer
	for _, l := range bytes.Split(out, []byte("\n")) {
		if bytes.HasPrefix(l, []byte("#")) && !bytes.Contains(l, []byte("Samples")) && !bytes.Contains(l, []byte("Event count")) {
			continue
		}
		if len(bytes.TrimSpace(l)) == 0 {
			continue
		}
		b.Write(l)
		b.WriteByte('\n')
	}
	return b.Bytes()
}

// profileDir returns the directory TUNFW_BENCH_PROFILE names, created,
// or "" when not profiling; perf must be installed.
func profileDir() (string, error) {
	dir := os.Getenv("TUNFW_BENCH_PROFILE")
	if dir == "" {
		return "", nil
	}
	if _, err := exec.LookPath("perf"); err != nil {
		return "", fmt.Errorf("TUNFW_BENCH_PROFILE needs perf: %w", err)
	}
	if !filepath.IsAbs(dir) {
		dir = filepath.Join("..", dir) // from the module root: go test runs in bench/
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	return abs, os.MkdirAll(abs, 0o755)
}
