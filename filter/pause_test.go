package filter

import (
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fillFlows inserts n established TCP flows from 10.128.0.0/10 sources.
func fillFlows(tb testing.TB, e *Engine, n int) {
	tb.Helper()
	for i := range n {
		a := netip.AddrFrom4([4]byte{10, 128 + byte(i>>22), byte(i >> 14), byte(i >> 6)})
		sport := uint16(10000 + i&63)
		p, _ := parsed(tcp(a.String(), sport, "192.0.2.1", 443, TCPSyn))
		if d := e.Inbound(p, 0); d.Verdict != VerdictForward {
			tb.Fatalf("flow %d: %+v", i, d)
		}
		r, _ := parsed(tcp("192.0.2.1", 443, a.String(), sport, TCPSyn|TCPAck))
		e.Outbound(r, 0)
	}
}

// BenchmarkControlPlanePause measures how long the packet path waits while
// the control plane works on a table of 250,000 flows: one goroutine calls
// Inbound for an established flow in a loop and records the longest call
// and the 99th and 99.9th percentiles, while each iteration of the benchmark runs
// one control-plane operation (a `tunfw flows` listing, a status/metrics
// Counters, an expiry pass that removes nothing). The percentiles show what
// the table's lock costs the packet path; the longest call also includes
// the goroutine being descheduled (by Go or by the kernel on a busy
// machine), which shows even for Counters, whose hold is a few nanoseconds.
func BenchmarkControlPlanePause(b *testing.B) {
	const flows = 250000
	e, _ := newTestEngine(b, "", EngineOptions{Logger: quiet, Limits: EngineLimits{MaxFlows: flows + 10}})
	fillFlows(b, e, flows)
	ops := []struct {
		name string
		op   func(now int64)
	}{
		{"none", func(int64) { time.Sleep(time.Millisecond) }},
		{"counters", func(int64) { e.Counters() }},
		{"flows", func(now int64) { e.Flows(now) }},
		{"expire", func(now int64) { e.expire(now) }},
	}
	for _, o := range ops {
		b.Run(o.name, func(b *testing.B) {
			pkt := mk(tcp("10.128.0.0", 10000, "192.0.2.1", 443, TCPAck))
			var stop atomic.Bool
			var wg sync.WaitGroup
			var lat []int64
			wg.Add(1)
			go func() {
				defer wg.Done()
				var p Packet
				lat = make([]int64, 0, 1<<20)
				for i := int64(1); !stop.Load(); i++ {
					t0 := time.Now()
					_ = ParsePacket(pkt, &p)
					e.Inbound(&p, sec)
					d := time.Since(t0)
					if len(lat) < cap(lat) {
						lat = append(lat, int64(d))
					} else if int64(d) > lat[i%int64(len(lat))] {
						lat[i%int64(len(lat))] = int64(d)
					}
					if i%64 == 0 {
						time.Sleep(10 * time.Microsecond) // a packet rate, not a spin
					}
				}
			}()
			for b.Loop() {
				o.op(2 * sec)
			}
			stop.Store(true)
			wg.Wait()
			slices.Sort(lat)
			if len(lat) > 0 {
				b.ReportMetric(float64(lat[len(lat)-1])/1e3, "max-inbound-µs")
				b.ReportMetric(float64(lat[len(lat)*99/100])/1e3, "p99-inbound-µs")
				b.ReportMetric(float64(lat[len(lat)*999/1000])/1e3, "p99.9-inbound-µs")
			}
		})
	}
	if c := e.Counters(); c.FlowsActive != flows {
		b.Fatal(fmt.Sprint("flows lost: ", c.FlowsActive))
	}
}
