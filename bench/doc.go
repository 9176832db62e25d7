// Package bench holds tunfw's end-to-end benchmark, TestBench.
//
// It builds its own topology of network namespaces (a client namespace
// running `tunfw up` and a server namespace behind a veth pair, see
// internal/netnstest), and measures every workload both through tunfw (to
// the server's service address 203.0.113.10, routed into the TUN) and
// straight over the veth (to the server's veth address 10.99.0.2, which is
// not routed into the TUN), alternating, several rounds. The load
// generator and the servers are pure Go, in the test process.
//
// It runs only when asked to:
//
//	TUNFW_BENCH=full  go test -v -count=1 -timeout 30m -run '^TestBench$' ./bench/   (make bench)
//	TUNFW_BENCH=smoke go test -v -count=1 -timeout 5m  -run '^TestBench$' ./bench/   (CI)
//
// Other knobs, all optional:
//
//	TUNFW_BENCH_OUT     JSON result file (default bench/results/latest.json,
//	                    bench/results/smoke.json in smoke mode; a relative
//	                    path is taken from the module root). A table
//	                    is written next to it with the extension .txt.
//	TUNFW_BENCH_ROUNDS  number of rounds (default 3 full, 1 smoke)
//	TUNFW_BENCH_ONLY    comma-separated workload ids to run (tcp1-c2s,
//	                    tcp1-s2c, tcp4-c2s, tcp4-s2c, conn-seq, conn-peek, conn-32, rr,
//	                    udp-c2s, udp-s2c, flows)
//	TUNFW_BENCH_MTU     TUN MTU of the generated config (default: tunfw's, 65520)
//	TUNFW_BENCH_LOG_LEVEL  --log-level for tunfw (default: tunfw's, info)
//	TUNFW_BENCH_TUNFW_ENV  extra environment for tunfw, space-separated
//	                    NAME=value pairs (e.g. GOMAXPROCS=1 GODEBUG=...)
//	TUNFW_BENCH_CONFIG  use this tunfw config file instead of the generated
//	                    one; it must route 203.0.113.0/24 into the TUN and
//	                    allow TCP and UDP to 203.0.113.10.
//
// Results go to stdout as a table (run go test with -v to see it) and to
// the JSON file, with the date, the machine (cores, kernel, load average)
// and every sample, so runs can be compared; the table is also written
// next to it (.txt), and tunfw's log and `tunfw stats` to .tunfw.log.
//
// Connection-rate and idle-flow clients run in a helper process (this test
// binary again, TestBenchHelper) inside the client namespace: dialling from
// threads switched into a namespace costs a thread hand-off at every
// blocking step, and 10,000 flows need more descriptors than one process
// may have. Memory per idle flow is measured on a fresh tunfw for each
// count: VmRSS after opening the flows (each with one 1-byte echo, then 2s
// idle) minus VmRSS before, over the number of flows.
//
// The figures are only as steady as the machine: other work on it (also
// in other containers on the same kernel) shows in the load average
// recorded with the results.
package bench
