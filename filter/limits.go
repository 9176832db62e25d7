package filter

import (
	"errors"
	"time"

	"github.com/tunfw/tunfw/internal/config"
)

// Limits is the [limits] section: flow table bounds and idle timeouts.
// Durations are Go duration strings ("30s", "2h").
type Limits struct {
	TCPHandshake string `toml:"tcp_handshake"`
	TCPIdle      string `toml:"tcp_idle"`
	TCPClosing   string `toml:"tcp_closing"`
	UDPIdle      string `toml:"udp_idle"`
	ICMPIdle     string `toml:"icmp_idle"`
	MaxFlows     int    `toml:"max_flows"`
	// MaxFlowsPerSource bounds the flows of one client address; nil
	// (the key left out) means DefaultMaxFlowsPerSource, 0 no bound.
	MaxFlowsPerSource *int `toml:"max_flows_per_source"`
	// LogRate bounds decision log lines per second; past it lines are
	// counted and summarised instead of written.
	LogRate int `toml:"log_rate"`
	// The section's dial_timeout, max_pending_dials and
	// max_pending_dials_per_source belong to tcpfwd.LimitsConfig.
}

// Default limits.
const (
	DefaultMaxFlows = 262144
	DefaultLogRate  = 100
)

// DefaultMaxFlowsPerSource is max_flows_per_source when the key is left
// out: a sixteenth of max_flows (16,384 of the default 262,144), but at
// least min(max_flows, 256) so that small tables stay usable. In host mode
// all of the host's own connections share one source address per family,
// so the bound must leave it far more than any ordinary host opens; in
// gateway mode it keeps one client from taking more than a sixteenth of
// the table from the others.
func DefaultMaxFlowsPerSource(maxFlows int) int {
	return max(maxFlows/16, min(maxFlows, 256))
}

// DefaultTimeouts returns the idle timeouts used for keys [limits] leaves
// out.
func DefaultTimeouts() Timeouts {
	return Timeouts{
		TCPHandshake: 30 * time.Second,
		TCPIdle:      2 * time.Hour,
		TCPClosing:   30 * time.Second,
		UDPIdle:      60 * time.Second,
		ICMPIdle:     30 * time.Second,
	}
}

// EngineLimits are validated limits, ready for NewEngine or SetLimits.
type EngineLimits struct {
	Timeouts
	MaxFlows          int
	MaxFlowsPerSource int // 0: no per-source bound
	LogRate           int
}

// Validate checks the section and fills in defaults. It reports every
// problem, each naming its key.
func (l Limits) Validate() (EngineLimits, error) {
	var errs []error
	out := EngineLimits{Timeouts: DefaultTimeouts(), MaxFlows: l.MaxFlows, LogRate: l.LogRate}
	dur := func(key, s string, d *time.Duration) {
		if s == "" {
			return
		}
		v, err := time.ParseDuration(s)
		if err != nil || v <= 0 {
			errs = append(errs, config.Errorf("limits."+key, "%q is not a positive duration (like \"30s\", \"5m\", \"2h\")", s))
			return
		}
		*d = v
	}
	dur("tcp_handshake", l.TCPHandshake, &out.TCPHandshake)
	dur("tcp_idle", l.TCPIdle, &out.TCPIdle)
	dur("tcp_closing", l.TCPClosing, &out.TCPClosing)
	dur("udp_idle", l.UDPIdle, &out.UDPIdle)
	dur("icmp_idle", l.ICMPIdle, &out.ICMPIdle)
	if out.MaxFlows == 0 {
		out.MaxFlows = DefaultMaxFlows
	}
	if out.MaxFlows < 0 {
		errs = append(errs, config.Errorf("limits.max_flows", "%d is negative", l.MaxFlows))
	}
	switch {
	case l.MaxFlowsPerSource == nil:
		out.MaxFlowsPerSource = DefaultMaxFlowsPerSource(out.MaxFlows)
	case *l.MaxFlowsPerSource < 0:
		errs = append(errs, config.Errorf("limits.max_flows_per_source", "%d is negative (0 means no bound)", *l.MaxFlowsPerSource))
	default:
		out.MaxFlowsPerSource = *l.MaxFlowsPerSource
	}
	if out.LogRate == 0 {
		out.LogRate = DefaultLogRate
	}
	if out.LogRate < 0 {
		errs = append(errs, config.Errorf("limits.log_rate", "%d is negative", l.LogRate))
	}
	return out, errors.Join(errs...)
}

// withDefaults fills zero fields with their defaults.
func (l EngineLimits) withDefaults() EngineLimits {
	d := DefaultTimeouts()
	set := func(v *time.Duration, def time.Duration) {
		if *v <= 0 {
			*v = def
		}
	}
	set(&l.TCPHandshake, d.TCPHandshake)
	set(&l.TCPIdle, d.TCPIdle)
	set(&l.TCPClosing, d.TCPClosing)
	set(&l.UDPIdle, d.UDPIdle)
	set(&l.ICMPIdle, d.ICMPIdle)
	if l.MaxFlows <= 0 {
		l.MaxFlows = DefaultMaxFlows
	}
	if l.MaxFlowsPerSource < 0 {
		l.MaxFlowsPerSource = 0
	}
	if l.LogRate <= 0 {
		l.LogRate = DefaultLogRate
	}
	return l
}
