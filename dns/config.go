package dns

import (
	"errors"
	"fmt"

	"github.com/tunfw/tunfw/internal/config"
)

// Config is the [dns] section. Pointers tell a key left out from one set
// to its zero value.
type Config struct {
	// Snoop: learn names from the answers tunfw forwards (default true).
	Snoop *bool `toml:"snoop"`
	// Block is the answer to a query for a blocked name: "nxdomain"
	// (default), "refused", "zero" or "drop".
	Block string `toml:"block"`
	// MaxNames bounds the (client, address) -> name entries remembered;
	// the least recently used goes first (default DefaultMaxNames).
	MaxNames *int `toml:"max_names"`
}

// Options are a validated Config.
type Options struct {
	Snoop    bool
	Block    BlockMode
	MaxNames int
}

// Defaults and bounds of the [dns] section.
const (
	DefaultMaxNames = 100000
	// MaxMaxNames keeps a typo from asking for gigabytes: an entry costs
	// about 150 bytes (see TestTableMemory), so this is some 1.5 GB.
	MaxMaxNames = 10_000_000
)

// DefaultOptions returns the options of an empty [dns] section.
func DefaultOptions() Options {
	return Options{Snoop: true, Block: BlockNXDomain, MaxNames: DefaultMaxNames}
}

// Validate checks the section and fills in defaults. It reports every
// problem, each naming its key.
func (c Config) Validate() (Options, error) {
	var errs []error
	o := DefaultOptions()
	if c.Snoop != nil {
		o.Snoop = *c.Snoop
	}
	if c.Block != "" {
		m, err := ParseBlockMode(c.Block)
		if err != nil {
			errs = append(errs, config.Errorf("dns.block", "%v", err))
		}
		o.Block = m
	}
	if c.MaxNames != nil {
		if n := *c.MaxNames; n < 1 || n > MaxMaxNames {
			errs = append(errs, config.Errorf("dns.max_names", "%d is not in 1-%d (snoop = false learns nothing)", n, MaxMaxNames))
		} else {
			o.MaxNames = n
		}
	}
	return o, errors.Join(errs...)
}

// BlockMode is how tunfw answers a query for a blocked name.
type BlockMode uint8

// Block modes. The zero value is the default.
const (
	// BlockNXDomain answers that the name does not exist.
	BlockNXDomain BlockMode = iota
	// BlockRefused answers that the resolver refuses the query.
	BlockRefused
	// BlockZero answers A 0.0.0.0 or AAAA ::, and no data for other
	// types: clients that treat NXDOMAIN as "try another resolver" stop.
	BlockZero
	// BlockDrop sends nothing: the client times out.
	BlockDrop
)

var blockModeNames = [...]string{BlockNXDomain: "nxdomain", BlockRefused: "refused", BlockZero: "zero", BlockDrop: "drop"}

// String returns the mode as the config writes it.
func (m BlockMode) String() string {
	if int(m) < len(blockModeNames) {
		return blockModeNames[m]
	}
	return fmt.Sprintf("BlockMode(%d)", m)
}

// ParseBlockMode reads a mode as the config writes it.
func ParseBlockMode(s string) (BlockMode, error) {
	for m, n := range blockModeNames {
		if s == n {
			return BlockMode(m), nil
		}
	}
	return BlockNXDomain, fmt.Errorf("%q is not one of nxdomain, refused, zero, drop", s)
}
