package tun

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/tunfw/tunfw/internal/config"
)

// Config is the [tun] section: the device tunfw creates.
type Config struct {
	// Name of the TUN interface (at most 15 bytes).
	Name string `toml:"name"`
	// MTU of the device; also the largest packet the stack sends back.
	MTU int `toml:"mtu"`
	// Addresses given to the device, as CIDR (address and prefix length).
	Addresses []string `toml:"addresses"`
}

// RouteConfig is the [route] section: what is routed into the device and how
// tunfw's own sockets leave without coming back into it.
type RouteConfig struct {
	// Include lists destinations routed into the TUN.
	Include []string `toml:"include"`
	// Exclude lists destinations never routed into the TUN; they are cut
	// out of Include.
	Exclude []string `toml:"exclude"`
	// Outbound is the interface tunfw's own sockets are bound to
	// (SO_BINDTODEVICE). Empty means the interface of the main table's
	// default route for each family, found at start.
	Outbound string `toml:"outbound"`
	// FWMark is set as SO_MARK on tunfw's own sockets; 0 sets none.
	FWMark uint32 `toml:"fwmark"`
}

// Defaults used for keys the file leaves out.
const (
	DefaultName = "tunfw0"
	DefaultMTU  = 1500
	// MinMTU is IPv6's minimum link MTU; below it the v6 half cannot work.
	MinMTU = 1280
	MaxMTU = 65535
)

// Settings is a validated [tun] + [route] configuration.
type Settings struct {
	Name      string
	MTU       int
	Addresses []netip.Prefix
	Include   []netip.Prefix
	Exclude   []netip.Prefix
	Outbound  string
	FWMark    uint32
}

// Validate checks both sections and returns the settings with defaults
// filled in. It reports every problem found, each naming its key.
func Validate(c Config, r RouteConfig) (Settings, error) {
	var errs []error
	s := Settings{Name: c.Name, MTU: c.MTU, Outbound: r.Outbound, FWMark: r.FWMark}
	if s.Name == "" {
		s.Name = DefaultName
	}
	if len(s.Name) > 15 || strings.ContainsAny(s.Name, "/ \t\n") {
		errs = append(errs, config.Errorf("tun.name", "%q is not a valid interface name (at most 15 characters, no '/' or spaces)", c.Name))
	}
	if s.MTU == 0 {
		s.MTU = DefaultMTU
	}
	if s.MTU < MinMTU || s.MTU > MaxMTU {
		errs = append(errs, config.Errorf("tun.mtu", "%d is out of range (%d-%d)", c.MTU, MinMTU, MaxMTU))
	}
	for i, a := range c.Addresses {
		p, err := netip.ParsePrefix(a)
		if err != nil {
			errs = append(errs, config.Errorf(fmt.Sprintf("tun.addresses[%d]", i+1), "%q is not an address with prefix length (like 198.18.0.1/30)", a))
			continue
		}
		s.Addresses = append(s.Addresses, p)
	}
	if len(c.Addresses) == 0 {
		errs = append(errs, config.Errorf("tun.addresses", "at least one address is needed (like \"198.18.0.1/30\")"))
	}
	var err error
	s.Include, err = parsePrefixes("route.include", r.Include)
	errs = append(errs, err)
	s.Exclude, err = parsePrefixes("route.exclude", r.Exclude)
	errs = append(errs, err)
	if len(r.Outbound) > 15 || strings.ContainsAny(r.Outbound, "/ \t\n") {
		errs = append(errs, config.Errorf("route.outbound", "%q is not a valid interface name", r.Outbound))
	}
	return s, errors.Join(errs...)
}

// parsePrefixes parses network prefixes; a bare address is a host route. A
// prefix with host bits set is refused rather than silently masked, since the
// user most likely meant something else.
func parsePrefixes(key string, in []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	var errs []error
	for i, s := range in {
		k := fmt.Sprintf("%s[%d]", key, i+1)
		if a, err := netip.ParseAddr(s); err == nil {
			out = append(out, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
			continue
		}
		p, err := netip.ParsePrefix(s)
		if err != nil {
			errs = append(errs, config.Errorf(k, "%q is not an IP address or CIDR", s))
			continue
		}
		if p != p.Masked() {
			errs = append(errs, config.Errorf(k, "%q has host bits set (did you mean %s?)", s, p.Masked()))
			continue
		}
		out = append(out, p)
	}
	return out, errors.Join(errs...)
}
