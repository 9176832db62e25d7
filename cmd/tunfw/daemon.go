package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tunfw/tunfw"
	"github.com/tunfw/tunfw/control"
	"github.com/tunfw/tunfw/dns"
	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/metrics"
	"github.com/tunfw/tunfw/names"
	"github.com/tunfw/tunfw/stack"
	"github.com/tunfw/tunfw/stack/udpfwd"
	"github.com/tunfw/tunfw/tun"
)

// daemon is a running `tunfw up`: what reloads and control requests act on.
type daemon struct {
	log   *slog.Logger
	eng   *filter.Engine
	st    *stack.Stack
	start time.Time
	tun   string // interface name

	reloadMu sync.Mutex // one reload at a time
	cfgMu    sync.Mutex
	cfg      *Config

	preexisting int // connections open at start, left unjudged (host capture)

	// listing holds the one `tunfw flows` that runs at a time
	// (listing.go), which another waits for up to listWait; both set by
	// newDaemon.
	listing  chan struct{}
	listWait time.Duration

	// dnsName is the name DNS answers tunfw forwarded gave an address for
	// a client (the engine's EngineOptions.Names); nil without snooping.
	dnsName func(client, addr netip.Addr) (string, bool)
	// names is the table behind dnsName; nil without snooping.
	names *dns.Table

	reloadsOK, reloadsFailed atomic.Uint64
	ctrl                     *control.Server
	metricsLn                net.Listener
}

// now is the engine's clock (see stack.Stack.Now).
func (d *daemon) now() int64 { return d.st.Now() }

func (d *daemon) config() *Config {
	d.cfgMu.Lock()
	defer d.cfgMu.Unlock()
	return d.cfg
}

// reloadResult is what a reload did.
type reloadResult struct {
	Rules    int      `json:"rules"`
	Cut      int      `json:"flows_cut"`
	Warnings []string `json:"warnings,omitempty"`
}

// reload reads the config file again. An invalid file changes nothing and
// returns every error; a valid one replaces the rules and limits at once.
// Settings that only apply at start are reported, not ignored.
func (d *daemon) reload() (reloadResult, error) {
	d.reloadMu.Lock()
	defer d.reloadMu.Unlock()
	old := d.config()
	var data []byte
	var err error
	if old.Source == embeddedSource {
		data = tunfw.DefaultConfig
	} else if data, err = readConfigFile(old.Source); err != nil {
		// The same owner, mode and size checks as at start.
		d.reloadsFailed.Add(1)
		d.log.Error("reload failed; still running on the previous rules", "err", err)
		return reloadResult{}, err
	}
	cfg, err := parseConfig(old.Source, data)
	if err != nil {
		d.reloadsFailed.Add(1)
		for _, e := range configErrorList(err) {
			d.log.Error("reload: config error", "err", e)
		}
		d.log.Error("reload failed; still running on the previous rules", "config", old.Source)
		return reloadResult{}, err
	}
	res := reloadResult{Rules: cfg.Rules.Len(), Warnings: restartOnly(old, cfg)}
	d.eng.Apply(cfg.Rules, cfg.Limits)
	d.st.TCP().SetDialLimits(cfg.Dial)
	if cfg.Rules.RecheckOnReload() {
		res.Cut = d.st.CloseFlows(d.eng.Recheck())
	}
	// Keep what only applies at start as it is running.
	cfg.Net, cfg.ControlSocket, cfg.Metrics = old.Net, old.ControlSocket, old.Metrics
	cfg.Stack, cfg.Memory, cfg.CPU = old.Stack, old.Memory, old.CPU
	d.cfgMu.Lock()
	d.cfg = cfg
	d.cfgMu.Unlock()
	d.reloadsOK.Add(1)
	for _, w := range res.Warnings {
		d.log.Warn("reload: " + w)
	}
	d.log.Info("config reloaded", "config", cfg.Source, "rules", res.Rules, "recheck", cfg.Rules.RecheckOnReload(), "flows_cut", res.Cut)
	return res, nil
}

// restartOnly lists the settings that differ between old and cfg but take
// effect only when tunfw starts, by their config keys.
func restartOnly(old, cfg *Config) []string {
	var keys []string
	keys = append(keys, changedKeys(old.Net, cfg.Net, func(f reflect.StructField) string { return f.Tag.Get("key") })...)
	keys = append(keys, changedKeys(old.Stack, cfg.Stack, func(f reflect.StructField) string {
		name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		return "stack." + name
	})...)
	if old.ControlSocket != cfg.ControlSocket {
		keys = append(keys, "control.socket")
	}
	if old.Metrics != cfg.Metrics {
		keys = append(keys, "metrics.listen")
	}
	if old.Memory != cfg.Memory {
		keys = append(keys, "limits.memory")
	}
	// The name table and the blocked-query answer are built with the
	// stack.
	if old.DNS.Snoop != cfg.DNS.Snoop {
		keys = append(keys, "dns.snoop")
	}
	if old.DNS.Block != cfg.DNS.Block {
		keys = append(keys, "dns.block")
	}
	if old.DNS.MaxNames != cfg.DNS.MaxNames {
		keys = append(keys, "dns.max_names")
	}
	if old.CPU != cfg.CPU {
		keys = append(keys, "cpu.wakeup_latency")
	}
	w := make([]string, len(keys))
	for i, k := range keys {
		w[i] = k + " changed; it applies only at start: restart tunfw to apply it"
	}
	return w
}

// changedKeys returns the keys (named by key) of the fields that differ
// between the structs a and b, of one type.
func changedKeys(a, b any, key func(reflect.StructField) string) []string {
	va, vb := reflect.ValueOf(a), reflect.ValueOf(b)
	var out []string
	for i := 0; i < va.NumField(); i++ {
		if !reflect.DeepEqual(va.Field(i).Interface(), vb.Field(i).Interface()) {
			out = append(out, key(va.Type().Field(i)))
		}
	}
	return out
}

func configErrorList(err error) []string {
	if ce, ok := err.(ConfigErrors); ok {
		out := make([]string, len(ce))
		for i, e := range ce {
			out[i] = e.Error()
		}
		return out
	}
	return []string{err.Error()}
}

// statusInfo is the answer to `tunfw status`.
type statusInfo struct {
	Version      string            `json:"version"`
	Uptime       float64           `json:"uptime_seconds"`
	Config       string            `json:"config"`
	TUN          string            `json:"tun"`
	Mode         string            `json:"mode"`
	Default      string            `json:"default"`
	Rules        int               `json:"rules"`
	Flows        int               `json:"flows"`
	FlowsByState map[string]int    `json:"flows_by_state"`
	Verdicts     map[string]uint64 `json:"verdicts"`
	Reloads      map[string]uint64 `json:"reloads"`
	Capture      *captureStatus    `json:"capture,omitempty"`
}

// captureStatus is what host capture's nftables table did.
type captureStatus struct {
	// Preexisting connections were open at start and left unjudged.
	Preexisting int `json:"preexisting_connections"`
	// Refused packets tried to leave outside the TUN (a socket bound to
	// a device) to a captured destination.
	Refused uint64 `json:"refused_outside_tun"`
	// Spoofed packets came from a from interface with a source that
	// does not route back through it.
	Spoofed uint64 `json:"spoofed_dropped"`
	Error   string `json:"error,omitempty"`
}

// statsInfo is the answer to `tunfw stats`.
type statsInfo struct {
	Rules         []filter.RuleStat `json:"rules"`
	Drops         map[string]uint64 `json:"drops"`
	Forwarded     uint64            `json:"forwarded"`
	Replies       uint64            `json:"replies"`
	BytesIn       uint64            `json:"bytes_in"`
	BytesOut      uint64            `json:"bytes_out"`
	FlowsCreated  uint64            `json:"flows_created"`
	TUNReadErrs   uint64            `json:"tun_read_errors"`
	TUNWriteErrs  uint64            `json:"tun_write_errors"`
	ControlRefuse uint64            `json:"control_refused"`
	UDPQueueDrops uint64            `json:"udp_queue_drops"`
	FlowPanics    uint64            `json:"flow_panics"`
	// PendingDials are the TCP connections being set up; DialFailures
	// counts the dials that did not connect, by reason.
	PendingDials int               `json:"pending_dials"`
	DialFailures map[string]uint64 `json:"dial_failures"`
	// StackDrops counts packets the stack dropped after the engine let
	// them through, by reason (stack.Stack.Drops).
	StackDrops map[string]uint64 `json:"stack_drops"`
	// ICMPErrors counts the ICMP errors from the network relayed to
	// clients of UDP flows, by kind (udpfwd.Forwarder.ICMPErrors).
	ICMPErrors map[string]uint64 `json:"icmp_errors_relayed"`
	// UDPLargeBuffers is the pool of the largest UDP receive buffers:
	// held, the bound, and busy flows refused one
	// (udpfwd.Forwarder.LargeBuffers).
	UDPLargeBuffers udpfwd.LargeBuffers `json:"udp_large_buffers"`
	// Names counts what rules by name did (nameEvents); NamesKnown is
	// the number of addresses DNS answers named that are remembered.
	Names      map[string]uint64 `json:"names"`
	NamesKnown int               `json:"dns_names"`
	// Runtime is the Go runtime's memory and allocation counters.
	Runtime runtimeInfo `json:"runtime"`
}

// flowsArgs filters `tunfw flows`.
type flowsArgs struct {
	Proto string `json:"proto,omitempty"`
	Src   string `json:"src,omitempty"` // address or prefix
	Dst   string `json:"dst,omitempty"`
	State string `json:"state,omitempty"`
	Name  string `json:"name,omitempty"` // a name or "*.suffix"
}

// handle answers a control request.
func (d *daemon) handle(_ context.Context, req control.Request) control.Response {
	switch req.Cmd {
	case "status":
		cfg := d.config()
		c := d.eng.Counters()
		mode := "enforce"
		if cfg.Rules.Monitor() {
			mode = "monitor"
		}
		return control.OK(statusInfo{
			Version: versionString(), Uptime: time.Since(d.start).Seconds(), Config: cfg.Source, TUN: d.tun,
			Mode: mode, Default: cfg.Rules.Default().String(), Rules: cfg.Rules.Len(),
			Flows: c.FlowsActive, FlowsByState: c.FlowsByState,
			Verdicts: map[string]uint64{
				"forwarded": c.Forwarded, "denied": c.Denied, "rejected": c.Rejected, "monitored": c.Monitored,
				"flows_created": c.FlowsCreated,
			},
			Reloads: map[string]uint64{"ok": d.reloadsOK.Load(), "failed": d.reloadsFailed.Load()},
			Capture: d.captureStatus(cfg),
		})
	case "stats":
		return control.OK(d.stats())
	case "flows":
		var a flowsArgs
		if len(req.Args) > 0 {
			if err := json.Unmarshal(req.Args, &a); err != nil {
				return control.Response{Error: "bad flows arguments: " + err.Error()}
			}
		}
		match, err := a.matcher()
		if err != nil {
			return control.Response{Error: err.Error()}
		}
		return d.flows(match)
	case "explain":
		var a explainArgs
		if err := json.Unmarshal(req.Args, &a); err != nil {
			return control.Response{Error: "bad explain arguments: " + err.Error()}
		}
		q, err := a.query()
		if err != nil {
			return control.Response{Error: err.Error()}
		}
		if q.Name == "" && d.dnsName != nil {
			if n, ok := d.dnsName(q.Src.Addr(), q.Dst.Addr()); ok {
				q.Name, q.NameFrom = n, filter.NameDNS.String()
			}
		}
		return control.OK(d.config().Rules.Explain(q))
	case "reload":
		res, err := d.reload()
		if err != nil {
			return control.Response{Error: "reload failed; still running on the previous rules", Errors: configErrorList(err)}
		}
		return control.OK(res)
	}
	return control.Response{Error: fmt.Sprintf("unknown command %q (want status, flows, stats, explain or reload)", req.Cmd)}
}

func (d *daemon) captureStatus(cfg *Config) *captureStatus {
	if !cfg.Net.PolicyRouting() || !cfg.Net.NFTables {
		return nil
	}
	cs := &captureStatus{Preexisting: d.preexisting}
	gc, err := tun.ReadGuardCounters(cfg.Net)
	if err != nil {
		cs.Error = err.Error()
	}
	cs.Refused, cs.Spoofed = gc.Refused, gc.Spoofed
	return cs
}

func (d *daemon) stats() statsInfo {
	c := d.eng.Counters()
	r, w := d.st.TUNErrors()
	return statsInfo{
		Rules: d.eng.RuleStats(),
		Drops: map[string]uint64{
			"denied": c.Denied, "rejected": c.Rejected, "limit": c.Limit, "deferred": c.Deferred, "malformed": c.Malformed,
			"fragment": c.Fragment, "no-flow": c.NoFlow, "unsupported": c.Unsupported,
		},
		Forwarded: c.Forwarded, Replies: c.Replies, BytesIn: c.BytesIn, BytesOut: c.BytesOut,
		FlowsCreated: c.FlowsCreated, TUNReadErrs: r, TUNWriteErrs: w, ControlRefuse: d.ctrl.Refused(),
		UDPQueueDrops: d.st.UDP().WriteDrops(), FlowPanics: d.st.Panics(),
		PendingDials: d.st.TCP().PendingDials(), DialFailures: d.st.TCP().DialFailures(),
		StackDrops: d.st.Drops(), ICMPErrors: d.st.UDP().ICMPErrors(), UDPLargeBuffers: d.st.UDP().LargeBuffers(),
		Names: d.nameEvents(), NamesKnown: d.namesKnown(), Runtime: readRuntime(),
	}
}

// nameEvents is what rules by name did, by event, for stats and metrics.
func (d *daemon) nameEvents() map[string]uint64 {
	c := d.eng.Counters()
	t, u := d.st.TCP().PeekStats(), d.st.UDP().NameStats()
	return map[string]uint64{
		"peeked": c.Peeked, "peek_busy": t.Busy + u.PeekBusy, "peek_timeouts": t.Timeouts + u.PeekTimeouts,
		"peek_no_name": t.NoName + u.PeekNoName, "peek_invalid": t.Invalid,
		"sni": t.SNI, "host": t.Host, "quic": u.QUICNames,
		"names_learned": u.NamesLearned, "dns_answered": u.DNSAnswered + d.st.TCP().DNSAnswered(), "dns_blocked_by_rule": c.DNSBlocked,
	}
}

// namesKnown is how many addresses DNS answers named are remembered.
func (d *daemon) namesKnown() int {
	if d.names == nil {
		return 0
	}
	return d.names.Len()
}

// matcher compiles the filters of a flows request.
func (a flowsArgs) matcher() (func(filter.FlowInfo) bool, error) {
	prefix := func(name, s string) (netip.Prefix, error) {
		if s == "" {
			return netip.Prefix{}, nil
		}
		if ad, err := netip.ParseAddr(s); err == nil {
			return netip.PrefixFrom(ad, ad.BitLen()), nil
		}
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return p, fmt.Errorf("--%s %q is not an address or CIDR", name, s)
		}
		return p.Masked(), nil
	}
	src, err := prefix("src", a.Src)
	if err != nil {
		return nil, err
	}
	dst, err := prefix("dst", a.Dst)
	if err != nil {
		return nil, err
	}
	switch a.Proto {
	case "", "tcp", "udp", "icmp":
	default:
		return nil, fmt.Errorf("--proto %q: want tcp, udp or icmp", a.Proto)
	}
	switch a.State {
	case "", "new", "established", "closing", "closed":
	default:
		return nil, fmt.Errorf("--state %q: want new, established, closing or closed", a.State)
	}
	var name *names.Set
	if a.Name != "" {
		name = &names.Set{}
		if err := name.Add(a.Name); err != nil {
			return nil, fmt.Errorf("--name: %v", err)
		}
	}
	return func(f filter.FlowInfo) bool {
		return (name == nil || name.MatchString(f.Name)) &&
			(a.Proto == "" || f.Proto == a.Proto) &&
			(a.State == "" || f.State == a.State) &&
			(!src.IsValid() || src.Contains(f.Src.Addr())) &&
			(!dst.IsValid() || dst.Contains(f.Dst.Addr()))
	}, nil
}

// newDaemon opens the control socket and the metrics port, before anything
// touches the network, so a socket or port in use fails the start cleanly.
func newDaemon(cfg *Config, log *slog.Logger) (*daemon, error) {
	d := &daemon{log: log, start: time.Now(), cfg: cfg,
		listing: make(chan struct{}, 1), listWait: 10 * time.Second}
	var err error
	if d.ctrl, err = control.Listen(cfg.ControlSocket, d.handle, log); err != nil {
		return nil, err
	}
	if cfg.Metrics.Listen != "" {
		if d.metricsLn, err = metrics.Listen(cfg.Metrics.Listen); err != nil {
			d.ctrl.Close()
			return nil, err
		}
	}
	return d, nil
}

// serve starts answering control requests, metrics scrapes and SIGHUP,
// now that the engine and stack exist.
func (d *daemon) serve(ctx context.Context, eng *filter.Engine, st *stack.Stack, tunName string) {
	d.eng, d.st, d.tun = eng, st, tunName
	go d.ctrl.Serve(ctx)
	if d.metricsLn != nil {
		metrics.Serve(ctx, d.metricsLn, metrics.Source{
			Engine:         eng,
			Reloads:        func() (uint64, uint64) { return d.reloadsOK.Load(), d.reloadsFailed.Load() },
			TUNErrors:      st.TUNErrors,
			ControlRefused: d.ctrl.Refused,
			DialFailures:   st.TCP().DialFailures,
			PendingDials:   st.TCP().PendingDials,
			StackDrops:     st.Drops,
			FlowPanics:     st.Panics,
			ICMPErrors:     st.UDP().ICMPErrors,
			UDPLargeBuffers: func() (held, max int, refused uint64) {
				b := st.UDP().LargeBuffers()
				return b.Held, b.Max, b.Refused
			},
			NameEvents: d.nameEvents,
			NamesKnown: d.namesKnown,
		}, d.log)
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	go func() {
		defer signal.Stop(hup)
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				d.log.Info("SIGHUP: reloading config")
				d.reload()
			}
		}
	}()
}

// close removes the control socket and closes the metrics port.
func (d *daemon) close() {
	d.ctrl.Close()
	if d.metricsLn != nil {
		d.metricsLn.Close()
	}
}
