// Package metrics serves tunfw's Prometheus metrics ([metrics] section).
//
// Nothing is counted here: at each scrape the collector reads the counters
// the filter engine, the stack and the reloader already keep, so the packet
// path pays nothing for metrics.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/internal/config"
)

// Config is the [metrics] section.
type Config struct {
	// Listen is the address of the /metrics HTTP endpoint, e.g.
	// "127.0.0.1:9477"; "" serves no metrics.
	Listen string `toml:"listen"`
}

// Validate checks the section.
func (c Config) Validate() error {
	if c.Listen == "" {
		return nil
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		return config.Errorf("metrics.listen", "%q is not host:port (like \"127.0.0.1:9477\")", c.Listen)
	}
	return nil
}

// Source is what the collector reads at each scrape.
type Source struct {
	Engine *filter.Engine
	// Reloads returns successful and failed reloads so far.
	Reloads func() (ok, failed uint64)
	// TUNErrors returns failed TUN reads and writes so far.
	TUNErrors func() (read, write uint64)
	// ControlRefused returns control requests refused so far.
	ControlRefused func() uint64
	// DialFailures returns TCP dials that did not connect, by reason;
	// PendingDials the TCP connections being set up.
	DialFailures func() map[string]uint64
	PendingDials func() int
	// StackDrops returns the packets the stack dropped after the engine
	// let them through, by reason.
	StackDrops func() map[string]uint64
	// FlowPanics returns how many flow handlers panicked and were
	// recovered (each closed its flow only).
	FlowPanics func() uint64
	// ICMPErrors returns the ICMP errors from the network relayed to
	// clients of UDP flows, by kind.
	ICMPErrors func() map[string]uint64
	// NameEvents returns what rules by name did, by event (flows peeked,
	// names read by source, peek timeouts, names learned from DNS, DNS
	// queries answered by tunfw...); NamesKnown the names DNS answers
	// gave that are remembered now.
	NameEvents func() map[string]uint64
	NamesKnown func() int
	// UDPLargeBuffers returns how many UDP flows hold the largest
	// receive buffer, how many may, and how often a busy flow was
	// refused one.
	UDPLargeBuffers func() (held, max int, refused uint64)
}

type collector struct {
	src Source

	flows, flowsCreated, packets, drops, bytes         *prometheus.Desc
	ruleFlows, rulePackets, ruleBytes, reloads, tunErr *prometheus.Desc
	controlRefused                                     *prometheus.Desc
	dialFailures, pendingDials                         *prometheus.Desc
	stackDrops, flowPanics, icmpErrors                 *prometheus.Desc
	nameEvents, namesKnown                             *prometheus.Desc
	udpLargeBufs, udpLargeBufsMax, udpLargeRefused     *prometheus.Desc
}

func newCollector(src Source) *collector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("tunfw_"+name, help, labels, nil)
	}
	return &collector{
		src:             src,
		flows:           d("flows", "Flows in the flow table by state.", "state"),
		flowsCreated:    d("flows_created_total", "Flows created since start."),
		packets:         d("packets_total", "Packets from clients by verdict (forward, drop, reject) and replies to clients.", "verdict"),
		drops:           d("drops_total", "Packets from clients not forwarded, by reason.", "reason"),
		bytes:           d("bytes_total", "Bytes carried by forwarded flows, by direction (in: client to destination).", "direction"),
		ruleFlows:       d("rule_flows_total", "Flows judged by each rule of the current ruleset.", "rule", "action"),
		rulePackets:     d("rule_packets_total", "Packets of flows judged by each rule.", "rule", "action"),
		ruleBytes:       d("rule_bytes_total", "Bytes of flows judged by each rule.", "rule", "action"),
		reloads:         d("reloads_total", "Config reloads by result.", "result"),
		tunErr:          d("tun_errors_total", "Failed TUN device operations.", "op"),
		controlRefused:  d("control_refused_total", "Control socket requests refused (bad request or not root)."),
		dialFailures:    d("dial_failures_total", "TCP dials that did not connect, by reason (refused, timeout, unreachable, descriptors, ports, evicted, deferred, cancelled, other).", "reason"),
		pendingDials:    d("pending_dials", "TCP connections being set up (destination dialled, client handshake not complete)."),
		flowPanics:      d("flow_panics_total", "Flow handlers that panicked and were recovered; each closed its own flow only."),
		stackDrops:      d("stack_drops_total", "Packets the stack dropped after the filter let them through, by reason (no echo identifier, a client's share of flows used up, full socket buffer...).", "reason"),
		nameEvents:      d("name_events_total", "What rules by name did, by event: flows peeked, peek_busy, peek_timeouts, peek_no_name, peek_invalid, names read (sni, host, quic), names_learned (addresses named by DNS answers), dns_answered (queries tunfw answered itself).", "event"),
		namesKnown:      d("dns_names", "Addresses named by DNS answers that tunfw remembers (at most [dns] max_names)."),
		udpLargeBufs:    d("udp_large_buffers", "UDP flows holding the largest socket receive buffer (busy flows grow to it)."),
		udpLargeBufsMax: d("udp_large_buffers_max", "UDP flows that may hold the largest receive buffer at once (a quarter of the memory budget's worth)."),
		udpLargeRefused: d("udp_large_buffers_refused_total", "Times a busy UDP flow was refused the largest receive buffer (the pool or its client's quarter full); its replies may overflow the smaller one."),
		icmpErrors:      d("icmp_errors_relayed_total", "ICMP errors from the network relayed to clients of UDP flows, by kind (port-unreachable, host-unreachable, net-unreachable, prohibited, too-big, time-exceeded, unreachable).", "kind"),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) { prometheus.DescribeByCollect(c, ch) }

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, l...)
	}
	counter := func(d *prometheus.Desc, v uint64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), l...)
	}
	ctr := c.src.Engine.Counters()
	for state, n := range ctr.FlowsByState {
		gauge(c.flows, float64(n), state)
	}
	counter(c.flowsCreated, ctr.FlowsCreated)
	counter(c.packets, ctr.Forwarded, "forward")
	// Deferred SYNs were counted as forwarded by the filter before the
	// stack dropped them: only their drop reason says so.
	counter(c.packets, ctr.Denied+ctr.NoFlow+ctr.Malformed+ctr.Fragment+ctr.Unsupported, "drop")
	counter(c.packets, ctr.Rejected+ctr.Limit, "reject")
	counter(c.packets, ctr.Replies, "reply")
	for _, r := range []struct {
		name string
		v    uint64
	}{
		{"denied", ctr.Denied}, {"rejected", ctr.Rejected}, {"no-flow", ctr.NoFlow}, {"malformed", ctr.Malformed},
		{"fragment", ctr.Fragment}, {"unsupported", ctr.Unsupported}, {"limit", ctr.Limit},
		{"deferred", ctr.Deferred},
	} {
		counter(c.drops, r.v, r.name)
	}
	counter(c.bytes, ctr.BytesIn, "in")
	counter(c.bytes, ctr.BytesOut, "out")
	for _, r := range c.src.Engine.RuleStats() {
		counter(c.ruleFlows, r.Flows, r.Name, r.Action)
		counter(c.rulePackets, r.Packets, r.Name, r.Action)
		counter(c.ruleBytes, r.Bytes, r.Name, r.Action)
	}
	if c.src.Reloads != nil {
		ok, failed := c.src.Reloads()
		counter(c.reloads, ok, "success")
		counter(c.reloads, failed, "failure")
	}
	if c.src.TUNErrors != nil {
		r, w := c.src.TUNErrors()
		counter(c.tunErr, r, "read")
		counter(c.tunErr, w, "write")
	}
	if c.src.ControlRefused != nil {
		counter(c.controlRefused, c.src.ControlRefused())
	}
	if c.src.DialFailures != nil {
		for r, n := range c.src.DialFailures() {
			counter(c.dialFailures, n, r)
		}
	}
	if c.src.PendingDials != nil {
		gauge(c.pendingDials, float64(c.src.PendingDials()))
	}
	if c.src.StackDrops != nil {
		for r, v := range c.src.StackDrops() {
			counter(c.stackDrops, v, r)
		}
	}
	if c.src.FlowPanics != nil {
		counter(c.flowPanics, c.src.FlowPanics())
	}
	if c.src.NameEvents != nil {
		for k, v := range c.src.NameEvents() {
			counter(c.nameEvents, v, k)
		}
	}
	if c.src.NamesKnown != nil {
		gauge(c.namesKnown, float64(c.src.NamesKnown()))
	}
	if c.src.ICMPErrors != nil {
		for k, v := range c.src.ICMPErrors() {
			counter(c.icmpErrors, v, k)
		}
	}
	if c.src.UDPLargeBuffers != nil {
		held, bound, refused := c.src.UDPLargeBuffers()
		gauge(c.udpLargeBufs, float64(held))
		gauge(c.udpLargeBufsMax, float64(bound))
		counter(c.udpLargeRefused, refused)
	}
}

// Listen opens the metrics endpoint's socket, so that a port in use is
// reported before tunfw touches the network.
func Listen(addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics listen on %s: %w", addr, err)
	}
	return ln, nil
}

// timeouts bound what one scraper can hold: a connection that sends its
// request slowly, reads the answer slowly or idles between scrapes.
type timeouts struct {
	readHeader, read, write, idle time.Duration
}

func defaultTimeouts() timeouts {
	return timeouts{readHeader: 5 * time.Second, read: 10 * time.Second, write: 30 * time.Second, idle: 60 * time.Second}
}

// Serve serves /metrics on ln until ctx ends. It warns when ln is reachable
// from other hosts: the metrics name rules and count flows.
func Serve(ctx context.Context, ln net.Listener, src Source, log *slog.Logger) {
	serve(ctx, ln, src, log, defaultTimeouts())
}

func serve(ctx context.Context, ln net.Listener, src Source, log *slog.Logger, to timeouts) {
	if exposed(ln.Addr()) {
		log.Warn("metrics endpoint listens on a non-loopback address: anyone who can reach it reads tunfw's rules and counters; prefer 127.0.0.1 or firewall it", "listen", ln.Addr().String())
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(newCollector(src), collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}))
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: to.readHeader,
		ReadTimeout:       to.read,
		WriteTimeout:      to.write,
		IdleTimeout:       to.idle,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server", "err", err)
		}
	}()
}

// exposed reports whether a listener's address is reachable from other
// hosts: anything but a loopback address (the unspecified address
// included).
func exposed(a net.Addr) bool {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return false
	}
	return !ta.IP.IsLoopback()
}
