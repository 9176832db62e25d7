package bench

import (
	"slices"
	"strings"
	"testing"
)

// TestFigDefsCoverWorkloads checks that every figure a workload reports,
// in host and gateway mode, has a row of its own in the report (defOf
// falls back to a bare row without unit or direction), and that the
// gateway rows are what issue 14 asks for.
func TestFigDefsCoverWorkloads(t *testing.T) {
	var keys []string
	for _, w := range slices.Concat(workloads, gwWorkloads) {
		keys = append(keys, w.keys...)
	}
	for _, prefix := range []string{"", "gw-"} {
		keys = append(keys, prefix+"cpu-all", prefix+"rss-start", prefix+"rss-end", prefix+"hwm-end")
		for _, n := range modes["full"].flows {
			keys = append(keys, flowKey(prefix, n), flowKey(prefix, n)+"-heap", flowKey(prefix, n)+"-warmup")
		}
	}
	seen := map[string]bool{}
	for _, d := range figDefs {
		if seen[d.key] {
			t.Errorf("figure %s defined twice", d.key)
		}
		seen[d.key] = true
	}
	for _, k := range keys {
		if !seen[k] {
			t.Errorf("figure %s has no row in figDefs", k)
		}
	}
	for _, k := range []string{"gw-tcp1-c2s", "gw-tcp1-s2c", "cpu-gw-tcp1-c2s", "cpu-gw-tcp1-s2c", "mcpu-gw-tcp1-c2s", "mcpu-gw-tcp1-s2c", "gw-conn-seq", "gw-conn-32",
		"gw-rr-p50", "gw-rr-p99", "gw-udp-c2s-loss", "gw-udp-s2c-loss", "gw-flows-1000", "gw-flows-10000"} {
		if !slices.Contains(keys, k) {
			t.Errorf("no gateway workload reports %s", k)
		}
		if d := defOf(k); !strings.HasPrefix(d.title, "gateway: ") {
			t.Errorf("%s titled %q, want a gateway: row", k, d.title)
		}
	}
}

// TestMissing: the smoke run's check wants every figure measured, takes
// 0 where 0 is the goal (allocations) and leaves out the figures only a
// profiled run has, and in a profiled run the machine's CPU.
func TestMissing(t *testing.T) {
	r := newResults()
	tunfw, direct := path{name: "tunfw"}, path{name: "direct"}
	r.add("rr-p50", tunfw, 140)
	r.add("rr-p50", direct, 4)
	r.add("rr-allocs", tunfw, 0)
	r.add("rr-cpu", tunfw, 0)
	got := r.missing([]string{"rr-p50", "rr-allocs", "rr-sys", "rr-cpu", "rr-cs"})
	want := []string{"rr-cpu via tunfw = 0 us", "rr-cs (1) not measured via tunfw"}
	if !slices.Equal(got, want) {
		t.Errorf("missing = %q, want %q", got, want)
	}
	// The machine's CPU is wanted on both paths, except in a profiled run.
	want = []string{"rr-machine (us) not measured via tunfw", "rr-machine (us) not measured via direct"}
	if got := r.missing([]string{"rr-machine"}); !slices.Equal(got, want) {
		t.Errorf("missing = %q, want %q", got, want)
	}
	r.profiling = true
	if got := r.missing([]string{"rr-machine"}); len(got) != 0 {
		t.Errorf("profiled run: missing = %q, want nothing", got)
	}
}

// TestDeriveNeed: the CPUs needed at half of direct's rate pair each
// round's machine CPU through tunfw with that round's direct rate, and a
// round without both (here the middle one, whose tunfw run failed, and a
// direct run that connected nothing) gives no sample and shifts no other
// round's pair.
func TestDeriveNeed(t *testing.T) {
	r := newResults()
	tunfw, direct := path{name: "tunfw"}, path{name: "direct"}
	conn := connWorkload("conn-32", portCRR, 32).need
	round := func(machine, rate float64) {
		before := r.needInputs(conn, tunfw, direct)
		if machine > 0 {
			r.add("conn-32-machine", tunfw, machine)
		}
		r.add("conn-32", direct, rate)
		r.deriveNeed(conn, tunfw, direct, before)
	}
	round(170, 28000) // 170 us a connection, direct at 28,000/s
	round(0, 26000)   // the tunfw run failed: no machine CPU
	round(160, 27000)
	round(150, 0) // direct connected nothing
	got := r.samples["conn-32-need"]["tunfw"]
	want := []float64{170e-6 * 14000, 160e-6 * 13500}
	if len(got) != len(want) {
		t.Fatalf("conn-32-need = %v, want %v", got, want)
	}
	for i := range want {
		if d := got[i] - want[i]; d > 1e-9 || d < -1e-9 {
			t.Errorf("conn-32-need[%d] = %v, want %v", i, got[i], want[i])
		}
	}
	// Bulk: 1.68 s/GB through tunfw, direct at 21 Gbit/s: half is
	// 1.3125 GB/s, 2.205 CPUs.
	bulk := bulkWorkload("gw-tcp1-c2s", 1, true).need
	if bulk.key != "gw-tcp1-c2s-need" || gwKey("tcp1-c2s-need") != bulk.key {
		t.Errorf("gateway bulk need key %q, want the gateway row of tcp1-c2s-need", bulk.key)
	}
	before := r.needInputs(bulk, tunfw, direct)
	r.add("mcpu-gw-tcp1-c2s", tunfw, 1.68)
	r.add("gw-tcp1-c2s", direct, 21)
	r.deriveNeed(bulk, tunfw, direct, before)
	if got := r.samples[bulk.key]["tunfw"]; len(got) != 1 || got[0] < 2.2049 || got[0] > 2.2051 {
		t.Errorf("%s = %v, want [2.205]", bulk.key, got)
	}
}

// TestParseRcvbufErrors: the receive buffer drops are read by column name
// from /proc/net/snmp's Udp lines (not UdpLite's) and added to
// /proc/net/snmp6's Udp6RcvbufErrors; text without them is an error.
func TestParseRcvbufErrors(t *testing.T) {
	text := `Ip: Forwarding DefaultTTL
Ip: 1 64
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 296105 0 61040 3 61040 0 0 0 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
UdpLite: 0 0 0 0 7 0 0 0 0
Udp6InDatagrams                 	12
Udp6RcvbufErrors                	5
`
	if n, err := parseRcvbufErrors(text); err != nil || n != 61045 {
		t.Errorf("parseRcvbufErrors = %d, %v; want 61045", n, err)
	}
	if _, err := parseRcvbufErrors("Ip: Forwarding\nIp: 1\n"); err == nil {
		t.Error("text without UDP counters parsed")
	}
}
