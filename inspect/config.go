package inspect

import (
	"errors"
	"time"

	"github.com/tunfw/tunfw/internal/config"
)

// Config is the [inspect] section: how long and how far tunfw reads a
// flow's first bytes for its name, when a rule by name needs it.
type Config struct {
	Timeout  string `toml:"timeout"`   // "300ms" when left out
	MaxBytes *int   `toml:"max_bytes"` // 16384 when left out
	// MaxPending bounds the flows being peeked at once; 0: the default.
	MaxPending int `toml:"max_pending"`
}

// Options are a validated Config.
type Options struct {
	// Timeout is the longest wait for a client's first bytes; a flow
	// still without a name then is judged as if none were known.
	Timeout time.Duration
	// MaxBytes is the most bytes read while looking for the name, and so
	// the memory a peeked flow holds.
	MaxBytes int
	// MaxPending bounds the flows being peeked at once (as pending dials
	// bound connections being set up); past it a new flow's SYN is
	// dropped, to be retransmitted.
	MaxPending int
}

// Defaults and bounds of [inspect].
const (
	DefaultTimeout    = 300 * time.Millisecond
	DefaultMaxBytes   = 16384
	DefaultMaxPending = 1024
	// MinMaxBytes is the smallest max_bytes: a ClientHello with the
	// smallest key share takes about 250.
	MinMaxBytes = 512
	// MaxMaxBytes: a ClientHello is at most 16 KiB of handshake plus
	// its records' headers.
	MaxMaxBytes = 65536
	maxTimeout  = 10 * time.Second
)

// DefaultOptions is [inspect] left out.
func DefaultOptions() Options {
	return Options{Timeout: DefaultTimeout, MaxBytes: DefaultMaxBytes, MaxPending: DefaultMaxPending}
}

// Validate checks the keys and fills in defaults, reporting every problem
// with its key.
func (c Config) Validate() (Options, error) {
	o := DefaultOptions()
	var errs []error
	if c.Timeout != "" {
		d, err := time.ParseDuration(c.Timeout)
		if err != nil || d <= 0 || d > maxTimeout {
			errs = append(errs, config.Errorf("inspect.timeout", "%q is not a duration above 0 and at most %s (like \"300ms\")", c.Timeout, maxTimeout))
		} else {
			o.Timeout = d
		}
	}
	if c.MaxBytes != nil {
		if n := *c.MaxBytes; n < MinMaxBytes || n > MaxMaxBytes {
			errs = append(errs, config.Errorf("inspect.max_bytes", "%d is not in %d-%d", n, MinMaxBytes, MaxMaxBytes))
		} else {
			o.MaxBytes = n
		}
	}
	switch {
	case c.MaxPending < 0:
		errs = append(errs, config.Errorf("inspect.max_pending", "%d is negative (0 means the default, %d)", c.MaxPending, DefaultMaxPending))
	case c.MaxPending > 0:
		o.MaxPending = c.MaxPending
	}
	return o, errors.Join(errs...)
}
