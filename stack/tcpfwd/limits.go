package tcpfwd

import (
	"errors"
	"time"

	"github.com/tunfw/tunfw/internal/config"
)

// LimitsConfig is the TCP forwarder's part of the [limits] section: how TCP
// connections are set up. (The flow table's keys belong to filter.Limits.)
type LimitsConfig struct {
	// DialTimeout bounds one attempt to reach a TCP destination.
	DialTimeout string `toml:"dial_timeout"`
	// MaxPendingDials bounds the TCP connections being set up
	// (destination dialled, client handshake not complete).
	MaxPendingDials int `toml:"max_pending_dials"`
	// MaxPendingDialsPerSource bounds those of one client address; past
	// it the source's oldest one gives way.
	MaxPendingDialsPerSource int `toml:"max_pending_dials_per_source"`
}

// DialLimits are validated LimitsConfig, for Options and SetDialLimits.
type DialLimits struct {
	// Timeout bounds one attempt to reach a TCP destination; when it
	// expires the client is told nothing and its next SYN retransmission
	// starts a new attempt.
	Timeout time.Duration
	// MaxPending bounds the TCP connections being set up, in total and
	// per client address (MaxPendingPerSource, at most MaxPending).
	MaxPending, MaxPendingPerSource int
}

// Default dial limits.
const (
	DefaultDialTimeout     = 30 * time.Second
	DefaultMaxPendingDials = 1024
	// DefaultMaxPendingDialsPerSource lets one client hold a quarter of
	// the default pool: far more than a browser opens at once, and a SYN
	// flood from one address leaves the rest to the others.
	DefaultMaxPendingDialsPerSource = 256
	// MaxPendingDialsCap is the largest max_pending_dials: gVisor's
	// forwarder's fixed bound on connection requests in flight.
	MaxPendingDialsCap = 65536
)

// Validate checks the keys and fills in defaults, reporting every problem
// with its key.
func (c LimitsConfig) Validate() (DialLimits, error) {
	var errs []error
	var l DialLimits
	if c.DialTimeout != "" {
		v, err := time.ParseDuration(c.DialTimeout)
		if err != nil || v <= 0 {
			errs = append(errs, config.Errorf("limits.dial_timeout", "%q is not a positive duration (like \"30s\", \"5m\", \"2h\")", c.DialTimeout))
		}
		l.Timeout = v
	}
	if c.MaxPendingDials < 0 || c.MaxPendingDials > MaxPendingDialsCap {
		errs = append(errs, config.Errorf("limits.max_pending_dials", "%d is not in 1-%d", c.MaxPendingDials, MaxPendingDialsCap))
	}
	if c.MaxPendingDialsPerSource < 0 || c.MaxPendingDialsPerSource > MaxPendingDialsCap {
		errs = append(errs, config.Errorf("limits.max_pending_dials_per_source", "%d is not in 1-%d", c.MaxPendingDialsPerSource, MaxPendingDialsCap))
	}
	l.MaxPending, l.MaxPendingPerSource = c.MaxPendingDials, c.MaxPendingDialsPerSource
	return l.withDefaults(), errors.Join(errs...)
}

// withDefaults fills zero (or out of range) fields with their defaults.
func (l DialLimits) withDefaults() DialLimits {
	if l.Timeout <= 0 {
		l.Timeout = DefaultDialTimeout
	}
	if l.MaxPending <= 0 {
		l.MaxPending = DefaultMaxPendingDials
	}
	l.MaxPending = min(l.MaxPending, MaxPendingDialsCap)
	if l.MaxPendingPerSource <= 0 {
		l.MaxPendingPerSource = DefaultMaxPendingDialsPerSource
	}
	l.MaxPendingPerSource = min(l.MaxPendingPerSource, l.MaxPending)
	return l
}

// SetDialLimits changes how TCP connections are set up from now on (a
// reload); dials under way keep their timeout.
func (fw *Forwarder) SetDialLimits(l DialLimits) {
	l = l.withDefaults()
	fw.dialLimits.Store(&l)
}

// DialLimits returns the dial limits in force.
func (fw *Forwarder) DialLimits() DialLimits {
	if l := fw.dialLimits.Load(); l != nil {
		return *l
	}
	return DialLimits{}.withDefaults()
}
