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
// Gateway mode (the gw- workloads) measures the way containers use tunfw:
// a third namespace, the gateway client, sits behind a veth link of MTU
// 1500 to the client namespace, which forwards for it (ip_forward there
// only) and runs a tunfw of its own with [route] from = [that link]. Its
// tunfw path is the service address, captured into the TUN; its direct
// path is the server's veth address, forwarded by the kernel (the server
// has a route back to the gateway client's subnet), measured against the
// same running tunfw. The gateway tunfw runs after the host-mode one has
// stopped, with the generated config plus from (also when
// TUNFW_BENCH_CONFIG is set), so the gw- rows compare with their own
// direct column, not with the host-mode rows' samples.
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
//	TUNFW_BENCH_ONLY    comma-separated workload ids to run: host mode
//	                    tcp1-c2s, tcp1-s2c, tcp4-c2s, tcp4-s2c, conn-seq,
//	                    conn-peek, conn-32, rr, rr-idle, udp-c2s, udp-s2c,
//	                    flows;
//	                    gateway mode gw-tcp1-c2s, gw-tcp1-s2c, gw-conn-seq,
//	                    gw-conn-32, gw-rr, gw-udp-c2s, gw-udp-s2c, gw-flows
//	                    (the gateway client is only built when one of
//	                    these runs)
//	TUNFW_BENCH_MTU     TUN MTU of the generated config (default: tunfw's, 65520)
//	TUNFW_BENCH_WAKEUP_LATENCY  [cpu] wakeup_latency of the generated
//	                    configs (default: tunfw's, off), e.g. 0us
//	TUNFW_BENCH_LOG_LEVEL  --log-level for tunfw (default: tunfw's, info)
//	TUNFW_BENCH_TUNFW_ENV  extra environment for tunfw, space-separated
//	                    NAME=value pairs (e.g. GOMAXPROCS=1 GODEBUG=...)
//	TUNFW_BENCH_CONFIG  use this tunfw config file instead of the generated
//	                    one in host mode; it must route 203.0.113.0/24 into
//	                    the TUN and allow TCP and UDP to 203.0.113.10.
//	TUNFW_BENCH_PROFILE a directory (relative: from the module root) to
//	                    write a perf profile of tunfw per workload into
//	                    (<id>.txt, the last round's), with tunfw's system
//	                    calls per connection or transaction as extra rows;
//	                    needs perf, and perturbs the figures it profiles
//
// Results go to stdout as a table (run go test with -v to see it) and to
// the JSON file, with the date, the machine (cores, kernel, load average)
// and every sample, so runs can be compared; the table is also written
// next to it (.txt), and tunfw's log and `tunfw stats` to .tunfw.log.
//
// Connection and bulk workloads also report the machine CPUs the tunfw
// path would need at half of the direct path's rate: each round's machine
// CPU per connection or GB through tunfw times half that round's direct
// rate. Above the machine's CPU count, 0.5 of direct is out of reach for
// the machine as a whole, however tunfw's share were spread over it.
//
// Connection-rate and idle-flow clients run in a helper process (this test
// binary again, TestBenchHelper) inside the client namespace: dialling from
// threads switched into a namespace costs a thread hand-off at every
// blocking step, and 10,000 flows need more descriptors than one process
// may have. Memory per idle flow is measured on a fresh tunfw for each
// count, warmed up first: 200 connections opened and closed, then a wait
// until its flow table is empty and it has handed their memory back (two
// collections since they closed, no free heap kept; another round of 200
// when they left too little for tunfw to act on, at most 3).
// The figure is VmRSS after opening the flows (each with one 1-byte echo,
// then 6s idle) minus VmRSS after the warm-up, over the number of flows;
// what the warm-up left (what only a process's first connections cost:
// code paged in, the collector's buffers, pools) is a row of its own.
// Gateway mode measures 1,000 and 10,000 flows too, in smoke mode 1,000
// only.
//
// The figures are only as steady as the machine: other work on it (also
// in other containers on the same kernel) shows in the load average
// recorded with the results.
package bench
