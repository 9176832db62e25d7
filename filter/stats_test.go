package filter

import (
	"fmt"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestEngineMaxFlowsPerSource(t *testing.T) {
	e, _ := newTestEngine(t, "", EngineOptions{Limits: EngineLimits{MaxFlowsPerSource: 2}})
	in(e, udp("10.0.0.2", 1, "8.8.8.8", 53), 0)
	in(e, udp("10.0.0.2", 2, "8.8.8.8", 53), 0)
	if d := in(e, udp("10.0.0.2", 3, "8.8.8.8", 53), 0); d.Reason != ReasonLimit || d.Verdict != VerdictReject {
		t.Fatalf("third flow of one source: %+v, want reject/limit", d)
	}
	// Another source is not affected.
	if d := in(e, udp("10.0.0.3", 3, "8.8.8.8", 53), 0); d.Verdict != VerdictForward {
		t.Fatalf("other source: %+v", d)
	}
	// When a flow of the first source ends, it may open another.
	e.expire(int64(2 * time.Minute))
	if d := in(e, udp("10.0.0.2", 3, "8.8.8.8", 53), int64(2*time.Minute)); d.Verdict != VerdictForward {
		t.Fatalf("after expiry: %+v", d)
	}
	if c := e.Counters(); c.Limit != 1 {
		t.Errorf("limit counter %d, want 1", c.Limit)
	}
}

func TestEngineRecheck(t *testing.T) {
	e, _ := newTestEngine(t, "", EngineOptions{})
	ssh := udp("10.0.0.2", 1000, "192.0.2.1", 22)
	web := tcp("10.0.0.2", 1001, "192.0.2.1", 443, TCPSyn)
	in(e, ssh, 0)
	in(e, web, 0)
	rs := mustCompile(t, `
[filter]
on_reload = "recheck"
[[rule]]
name = "no-ssh"
action = "reject"
dst_port = 22
`)
	if !rs.RecheckOnReload() {
		t.Fatal("on_reload = recheck not seen")
	}
	e.Swap(rs)
	cut := e.Recheck()
	if len(cut) != 1 || cut[0].Key.Dst.Port() != 22 {
		t.Fatalf("Recheck cut %v, want only the port 22 flow", cut)
	}
	if d := in(e, ssh, 1); d.Verdict != VerdictReject || d.Reason != ReasonRejected {
		t.Errorf("packet of a cut flow: %+v", d)
	}
	if d := in(e, tcp("10.0.0.2", 1001, "192.0.2.1", 443, TCPAck), 1); d.Verdict != VerdictForward {
		t.Errorf("still-allowed flow: %+v", d)
	}
	flows := e.Flows(2)
	i := slices.IndexFunc(flows, func(f FlowInfo) bool { return f.Dst.Port() == 22 })
	if i < 0 || flows[i].Rule != "no-ssh" || flows[i].Verdict != "reject" {
		t.Errorf("cut flow shows as %+v", flows)
	}
}

func TestEngineFlowsAndRuleStats(t *testing.T) {
	e, _ := newTestEngine(t, `
[[rule]]
name = "dns"
action = "allow"
proto = "udp"
dst_port = 53
`, EngineOptions{})
	q := udp("10.0.0.2", 5000, "192.0.2.53", 53)
	in(e, q, 0)
	in(e, q, 1)
	out(e, udp("192.0.2.53", 53, "10.0.0.2", 5000), int64(time.Second))
	flows := e.Flows(int64(3 * time.Second))
	if len(flows) != 1 {
		t.Fatalf("flows: %+v", flows)
	}
	f := flows[0]
	_, raw := parsed(q)
	if f.Proto != "udp" || f.Rule != "dns" || f.Verdict != "allow" || f.State != "established" ||
		f.PacketsIn != 2 || f.PacketsOut != 1 || f.BytesIn != 2*uint64(len(raw)) ||
		f.Age != 3*time.Second || f.Idle != 2*time.Second {
		t.Errorf("flow %+v", f)
	}
	stats := e.RuleStats()
	if len(stats) != 2 || stats[0].Name != "dns" || stats[0].Flows != 1 || stats[0].Packets != 3 || stats[1].Name != "default" {
		t.Errorf("rule stats %+v", stats)
	}
	// A reload keeping the rule's name keeps its counters.
	e.Swap(mustCompile(t, "[[rule]]\nname = \"dns\"\naction = \"deny\"\n[[rule]]\nname = \"new\"\naction = \"allow\"\n"))
	stats = e.RuleStats()
	if stats[0].Name != "dns" || stats[0].Packets != 3 || stats[1].Name != "new" || stats[1].Packets != 0 {
		t.Errorf("after reload: %+v", stats)
	}
	c := e.Counters()
	if c.FlowsByState["established"] != 1 || c.FlowsByState["new"] != 0 || c.BytesIn != 2*uint64(len(raw)) {
		t.Errorf("counters %+v", c)
	}
}

func TestEngineLogRateLimit(t *testing.T) {
	e, logs := newTestEngine(t, "[filter]\nlog = \"all\"\n", EngineOptions{Limits: EngineLimits{LogRate: 5}})
	for i := 0; i < 50; i++ {
		in(e, udp("10.0.0.2", uint16(1000+i), "192.0.2.1", 53), int64(i)) // all within 50 ns
	}
	if n := strings.Count(logs.String(), "msg=flow"); n != 5 {
		t.Errorf("%d decision lines logged, want the burst of 5", n)
	}
	e.expire(int64(time.Second))
	if !strings.Contains(logs.String(), "suppressed=45") {
		t.Errorf("no summary of the 45 suppressed lines:\n%s", logs.String())
	}
	// After a second the bucket has refilled.
	in(e, udp("10.0.0.2", 9, "192.0.2.1", 53), int64(2*time.Second))
	if n := strings.Count(logs.String(), "msg=flow"); n != 6 {
		t.Errorf("%d decision lines after refill, want 6", n)
	}
}

func TestLimitsValidate(t *testing.T) {
	l, err := Limits{UDPIdle: "2s", MaxFlows: 10}.Validate()
	if err != nil || l.UDPIdle != 2*time.Second || l.TCPIdle != 2*time.Hour || l.MaxFlows != 10 || l.LogRate != DefaultLogRate {
		t.Errorf("Validate: %+v, %v", l, err)
	}
	_, err = Limits{TCPIdle: "forever", ICMPIdle: "-1s", MaxFlows: -1, MaxFlowsPerSource: ptr(-2)}.Validate()
	for _, key := range []string{"limits.tcp_idle", "limits.icmp_idle", "limits.max_flows", "limits.max_flows_per_source"} {
		if err == nil || !strings.Contains(err.Error(), key+":") {
			t.Errorf("missing error for %s in %v", key, err)
		}
	}
}

// TestFlowTableMemory measures the flow table's cost per flow, the figure
// the README gives for max_flows, and keeps it from growing unnoticed.
func TestFlowTableMemory(t *testing.T) {
	const n = 100000
	e, _ := newTestEngine(t, "", EngineOptions{Logger: quiet, Limits: EngineLimits{MaxFlows: 2 * n}})
	pkts := make([]*Packet, n)
	for i := range pkts {
		p, _ := parsed(udp("10.0.0.2", uint16(i%60000+1), fmt.Sprintf("192.0.%d.%d", i/60000, 1), 53))
		pkts[i] = p
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i, p := range pkts {
		e.Inbound(p, int64(i))
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(pkts) // measured: the flows, not freed packets
	if c := e.Counters(); c.FlowsActive != n {
		t.Fatalf("%d flows, want %d", c.FlowsActive, n)
	}
	per := float64(after.HeapAlloc-before.HeapAlloc) / n
	t.Logf("flow table: %.0f bytes per flow", per)
	if per > 400 {
		t.Errorf("flow table uses %.0f bytes per flow, want <= 400", per)
	}
	runtime.KeepAlive(e)
}

func ptr[T any](v T) *T { return &v }

func TestLimitsDefaultPerSource(t *testing.T) {
	for _, c := range []struct {
		l    Limits
		want int
	}{
		{Limits{}, 16384},
		{Limits{MaxFlows: 4096}, 256},
		{Limits{MaxFlows: 100}, 100},
		{Limits{MaxFlows: 1 << 20}, 65536},
		{Limits{MaxFlowsPerSource: ptr(0)}, 0},
		{Limits{MaxFlowsPerSource: ptr(10)}, 10},
	} {
		got, err := c.l.Validate()
		if err != nil || got.MaxFlowsPerSource != c.want {
			t.Errorf("max_flows %d: max_flows_per_source %d (%v), want %d", c.l.MaxFlows, got.MaxFlowsPerSource, err, c.want)
		}
	}
}
