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
	// QueueLength is the device's queue (txqueuelen) in packets: what the
	// kernel holds for tunfw to read; past it, packets are dropped.
	QueueLength int `toml:"queue_length"`
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
	// FWMark is set as SO_MARK on tunfw's own sockets; 0 sets none, or
	// DefaultFWMark when policy routing (Auto or From) is used.
	FWMark uint32 `toml:"fwmark"`
	// Auto captures all traffic of the host through policy routing: a
	// routing table and ip rules of tunfw's own (see policy.go).
	Auto bool `toml:"auto"`
	// Table is the number of tunfw's routing table (policy routing only).
	Table int64 `toml:"table"`
	// RulePriority is the priority of tunfw's first ip rule; the second
	// uses RulePriority+1.
	RulePriority int64 `toml:"rule_priority"`
	// Fail is "open" or "closed": what happens to captured traffic while
	// tunfw is not running after a crash.
	Fail string `toml:"fail"`
	// From lists interfaces whose incoming (forwarded) traffic is routed
	// into the TUN: gateway mode for other namespaces and containers.
	From []string `toml:"from"`
	// NFTables installs tunfw's nftables table with policy routing
	// (nft.go): replies of inbound connections leave by the normal
	// routes, nothing leaves outside the TUN unjudged, gateway sources
	// are checked. Unset means true; false runs without it.
	NFTables *bool `toml:"nftables"`
	// VerifySource drops packets from a From interface whose source
	// address does not route back through that interface. Unset means
	// true.
	VerifySource *bool `toml:"verify_source"`
}

// Defaults used for keys the file leaves out.
const (
	DefaultName = "tunfw0"
	// DefaultMTU is large because the TUN is a local link: see config.toml.
	DefaultMTU = 65520
	// DefaultQueueLength absorbs the bursts a paced 1 Gbit/s UDP sender
	// makes (the kernel's 500 lost 2-3% of them in make bench, 4096
	// none): about 46 ms of 1,400-byte datagrams at that rate. Packets
	// wait there only while tunfw is behind.
	DefaultQueueLength = 4096
	MaxQueueLength     = 65535
	// MinMTU is IPv6's minimum link MTU; below it the v6 half cannot work.
	MinMTU = 1280
	MaxMTU = 65535

	// DefaultTable, DefaultRulePriority and DefaultFWMark tag what policy
	// routing installs, so that `tunfw down` and the next `up` find it
	// after a crash. 0x7466 is "tf".
	DefaultTable        = 0x7466 // 29798
	DefaultRulePriority = 7466
	DefaultFWMark       = 0x7466
	// MaxRulePriority leaves room for the second rule before the main
	// table's rule (32766).
	MaxRulePriority = 32764
)

// Settings is a validated [tun] + [route] configuration. Each field's key
// tag names the config key it comes from, for messages about it.
type Settings struct {
	Name        string         `key:"tun.name"`
	MTU         int            `key:"tun.mtu"`
	QueueLength int            `key:"tun.queue_length"`
	Addresses   []netip.Prefix `key:"tun.addresses"`
	Include     []netip.Prefix `key:"route.include"`
	Exclude     []netip.Prefix `key:"route.exclude"`
	Outbound    string         `key:"route.outbound"`
	FWMark      uint32         `key:"route.fwmark"`

	// Policy routing ([route] auto / from); see policy.go.
	Auto         bool     `key:"route.auto"`
	Table        int      `key:"route.table"`
	RulePriority int      `key:"route.rule_priority"`
	FailClosed   bool     `key:"route.fail"`
	From         []string `key:"route.from"`
	// NFTables: install tunfw's nftables table (nft.go).
	NFTables bool `key:"route.nftables"`
	// VerifySource: reverse-path check on the From interfaces.
	VerifySource bool `key:"route.verify_source"`
}

// PolicyRouting reports whether the include list goes into tunfw's own
// table behind ip rules (auto or from) rather than into the main table.
func (s Settings) PolicyRouting() bool { return s.Auto || len(s.From) > 0 }

// Validate checks both sections and returns the settings with defaults
// filled in. It reports every problem found, each naming its key.
func Validate(c Config, r RouteConfig) (Settings, error) {
	var errs []error
	s := Settings{Name: c.Name, MTU: c.MTU, QueueLength: c.QueueLength, Outbound: r.Outbound, FWMark: r.FWMark}
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
	if s.QueueLength == 0 {
		s.QueueLength = DefaultQueueLength
	}
	if s.QueueLength < 1 || s.QueueLength > MaxQueueLength {
		errs = append(errs, config.Errorf("tun.queue_length", "%d is out of range (1-%d)", c.QueueLength, MaxQueueLength))
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
	errs = append(errs, validatePolicy(&s, r))
	return s, errors.Join(errs...)
}

// validatePolicy checks the policy-routing keys of [route] and fills in
// their defaults.
func validatePolicy(s *Settings, r RouteConfig) error {
	var errs []error
	s.Auto = r.Auto
	s.Table, s.RulePriority = DefaultTable, DefaultRulePriority
	switch {
	case r.Table == 0:
	case r.Table < 1 || r.Table > 0xffffffff || r.Table >= 253 && r.Table <= 255:
		errs = append(errs, config.Errorf("route.table", "%d is not usable (1-4294967295, except 253-255: default, main, local)", r.Table))
	default:
		s.Table = int(r.Table)
	}
	switch {
	case r.RulePriority == 0:
	case r.RulePriority < 1 || r.RulePriority > MaxRulePriority:
		errs = append(errs, config.Errorf("route.rule_priority", "%d is out of range (1-%d: tunfw's rules must come before the main table's at 32766)", r.RulePriority, MaxRulePriority))
	default:
		s.RulePriority = int(r.RulePriority)
	}
	switch r.Fail {
	case "", "open":
	case "closed":
		s.FailClosed = true
	default:
		errs = append(errs, config.Errorf("route.fail", "%q: want \"open\" or \"closed\"", r.Fail))
	}
	for i, name := range r.From {
		if name == "" || len(name) > 15 || strings.ContainsAny(name, "/ \t\n") {
			errs = append(errs, config.Errorf(fmt.Sprintf("route.from[%d]", i+1), "%q is not a valid interface name", name))
			continue
		}
		s.From = append(s.From, name)
	}
	if s.PolicyRouting() && s.FWMark == 0 {
		s.FWMark = DefaultFWMark
	}
	if s.FailClosed && !s.PolicyRouting() {
		errs = append(errs, config.Errorf("route.fail", "\"closed\" needs auto = true or from = [...]: without policy routing there is no kill switch to keep"))
	}
	s.NFTables = r.NFTables == nil || *r.NFTables
	s.VerifySource = r.VerifySource == nil || *r.VerifySource
	if !s.NFTables {
		if r.VerifySource != nil && *r.VerifySource && len(s.From) > 0 {
			errs = append(errs, config.Errorf("route.verify_source", "needs nftables = true (the check is an nftables rule)"))
		}
		s.VerifySource = false
	}
	return errors.Join(errs...)
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
