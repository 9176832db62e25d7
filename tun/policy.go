package tun

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Policy routing ([route] auto = true, or from = [...]).
//
// Everything is installed in a table of tunfw's own (Settings.Table) and
// behind ip rules at two priorities of its own (P = Settings.RulePriority),
// in both families:
//
//	P    iif TUN lookup main         packets coming out of the TUN (replies
//	                                 to gateway clients) never go back in
//	P+1  not fwmark M lookup T       auto: everything but tunfw's own sockets
//	P+1  iif IFACE lookup T          from: traffic forwarded from IFACE
//
// Table T holds, for each prefix of include minus exclude (include defaults
// to 0.0.0.0/0 and ::/0), a route into the TUN, which vanishes with the
// device; with fail = "closed" also an unreachable route of the same prefix
// with the worst metric, which stays after a crash, so that a dead firewall
// blocks instead of letting traffic bypass it. Loopback, link-local,
// multicast and broadcast get throw routes: a lookup that ends in a throw
// route, or finds no route at all, continues with the next rule (main), so
// they are never captured, and with fail = "open" a crashed tunfw leaves
// rules that point into an empty table and change nothing.
//
// Rules and routes carry the protocol RTProto. Cleanup recognises leftovers
// by table and rule priority.

// RTProto is the routing protocol number tunfw's routes and rules carry
// (shown as "proto 116" by ip).
const RTProto = 116

// killSwitchMetric is the metric of the fail = "closed" unreachable routes:
// the worst, so that the route into the TUN wins while it exists.
const killSwitchMetric = 0xffffffff

// neverCaptured are the destinations policy routing leaves alone: loopback
// (also in the local table, which comes first), link-local, multicast and
// the IPv4 limited broadcast.
var neverCaptured = []netip.Prefix{
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("224.0.0.0/4"),
	netip.MustParsePrefix("255.255.255.255/32"),
	netip.MustParsePrefix("::1/128"),
	netip.MustParsePrefix("fe80::/10"),
	netip.MustParsePrefix("ff00::/8"),
}

// everything is what include means under policy routing when it is empty.
var everything = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}

// policy is what policy routing installed, for removal.
type policy struct {
	table  int
	rules  []netlink.Rule
	routes []netlink.Route
}

// CapturedPrefixes returns the destinations policy routing sends into the
// TUN: include (everything when empty) minus exclude, without prefixes that
// lie inside a never-captured range.
func CapturedPrefixes(s Settings) []netip.Prefix {
	include := s.Include
	if len(include) == 0 {
		include = everything
	}
	var out []netip.Prefix
	for _, p := range Subtract(include, s.Exclude) {
		inside := false
		for _, n := range neverCaptured {
			if n.Addr().Is4() == p.Addr().Is4() && n.Bits() <= p.Bits() && n.Contains(p.Addr()) {
				inside = true
				break
			}
		}
		if !inside {
			out = append(out, p)
		}
	}
	return out
}

// Install routes traffic into the device as s says: with policy routing
// (auto or from) through tunfw's table and ip rules, otherwise include
// minus exclude in the main table. Whatever it installed, also on error,
// is removed by Close. Call Cleanup first to remove leftovers of a crashed
// run.
func (d *Device) Install(s Settings) error {
	if !s.PolicyRouting() {
		return d.AddRoutes(s.Include, s.Exclude)
	}
	d.policy = &policy{table: s.Table}
	captured := CapturedPrefixes(s)
	families := map[bool]bool{} // is4 -> has captured prefixes
	captured = slices.DeleteFunc(captured, func(p netip.Prefix) bool { return p.Addr().Is6() && d.noIPv6 })
	for _, p := range captured {
		families[p.Addr().Is4()] = true
	}
	idx := d.link.Attrs().Index
	// Table first, rules last: a rule never points at a half-built table.
	for _, n := range neverCaptured {
		if !families[n.Addr().Is4()] {
			continue
		}
		if err := d.policy.addRoute(netlink.Route{Dst: prefixIPNet(n), Type: unix.RTN_THROW}, s.Table); err != nil {
			return err
		}
	}
	for _, p := range captured {
		if s.FailClosed {
			r := netlink.Route{Dst: prefixIPNet(p), Type: unix.RTN_UNREACHABLE, Priority: killSwitchMetric}
			if err := d.policy.addRoute(r, s.Table); err != nil {
				return err
			}
		}
		r := netlink.Route{Dst: prefixIPNet(p), LinkIndex: idx, Scope: netlink.SCOPE_LINK}
		if err := d.policy.addRoute(r, s.Table); err != nil {
			return fmt.Errorf("%w (dev %s)", err, d.name)
		}
	}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		if !families[fam == netlink.FAMILY_V4] {
			continue
		}
		rules := []netlink.Rule{ruleOf(fam, s.RulePriority, unix.RT_TABLE_MAIN, func(r *netlink.Rule) { r.IifName = d.name })}
		if s.Auto {
			rules = append(rules, ruleOf(fam, s.RulePriority+1, s.Table, func(r *netlink.Rule) {
				r.Mark, r.Invert = s.FWMark, true
				mask := uint32(0xffffffff)
				r.Mask = &mask
			}))
		} else {
			for _, iface := range s.From {
				rules = append(rules, ruleOf(fam, s.RulePriority+1, s.Table, func(r *netlink.Rule) { r.IifName = iface }))
			}
		}
		for _, r := range rules {
			if err := netlink.RuleAdd(&r); err != nil {
				return fmt.Errorf("add ip rule %s: %w", describeRule(r), err)
			}
			d.policy.rules = append(d.policy.rules, r)
		}
	}
	return nil
}

func ruleOf(family, prio, table int, set func(*netlink.Rule)) netlink.Rule {
	r := *netlink.NewRule()
	r.Family, r.Priority, r.Table, r.Protocol = family, prio, table, RTProto
	set(&r)
	return r
}

func describeRule(r netlink.Rule) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d:", r.Priority)
	if r.IifName != "" {
		fmt.Fprintf(&b, " iif %s", r.IifName)
	}
	if r.Mark != 0 {
		if r.Invert {
			b.WriteString(" not")
		}
		fmt.Fprintf(&b, " fwmark %#x", r.Mark)
	}
	fmt.Fprintf(&b, " lookup %d", r.Table)
	if r.Family == netlink.FAMILY_V6 {
		b.WriteString(" (IPv6)")
	}
	return b.String()
}

func (p *policy) addRoute(r netlink.Route, table int) error {
	r.Table, r.Protocol = table, RTProto
	if err := netlink.RouteAdd(&r); err != nil {
		kind := "route"
		switch r.Type {
		case unix.RTN_THROW:
			kind = "throw route"
		case unix.RTN_UNREACHABLE:
			kind = "unreachable route"
		}
		return fmt.Errorf("add %s %s to table %d: %w", kind, r.Dst, table, err)
	}
	p.routes = append(p.routes, r)
	return nil
}

// remove deletes the rules, then the routes of the table. Routes that are
// already gone (those into the TUN vanish with it) are not errors.
func (p *policy) remove() error {
	var errs []error
	for i := len(p.rules) - 1; i >= 0; i-- {
		r := p.rules[i]
		if err := netlink.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete ip rule %s: %w", describeRule(r), err))
		}
	}
	p.rules = nil
	for i := len(p.routes) - 1; i >= 0; i-- {
		r := p.routes[i]
		if err := netlink.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete route %s from table %d: %w", r.Dst, p.table, err))
		}
	}
	p.routes = nil
	return errors.Join(errs...)
}

// Leftovers is what Cleanup removed.
type Leftovers struct {
	Rules, Routes int
}

// Cleanup removes what an earlier tunfw with the same table and rule
// priority left behind, in both families: ip rules at RulePriority and
// RulePriority+1 that look up tunfw's table or carry RTProto, and every
// route of the table (the kill switch's unreachable routes among them).
// It is what `tunfw down` does, and `up` does it before installing.
func Cleanup(s Settings) (Leftovers, error) {
	var n Leftovers
	var errs []error
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rules, err := netlink.RuleList(fam)
		if err != nil {
			errs = append(errs, fmt.Errorf("list ip rules: %w", err))
		}
		for _, r := range rules {
			if r.Priority != s.RulePriority && r.Priority != s.RulePriority+1 {
				continue
			}
			if r.Table != s.Table && r.Protocol != RTProto {
				continue
			}
			r.Family = fam
			if err := netlink.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("delete ip rule %s: %w", describeRule(r), err))
				continue
			}
			n.Rules++
		}
		routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: s.Table}, netlink.RT_FILTER_TABLE)
		if err != nil {
			errs = append(errs, fmt.Errorf("list routes of table %d: %w", s.Table, err))
		}
		for _, r := range routes {
			if err := netlink.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("delete route %s from table %d: %w", r.Dst, s.Table, err))
				continue
			}
			n.Routes++
		}
	}
	return n, errors.Join(errs...)
}

// Warnings returns what in the host's settings keeps the installed routing
// from working as intended: IPv6 disabled in the namespace (its half of the
// config is skipped), strict reverse-path filtering, which drops the
// replies to tunfw's own sockets (their source's best route is the TUN,
// while they arrive on the uplink), and, in gateway mode, forwarding
// switched off. outbound are the interfaces tunfw's sockets use.
func (d *Device) Warnings(s Settings, outbound ...string) []string {
	var w []string
	if d.noIPv6 {
		w = append(w, "IPv6 is disabled in this network namespace (disable_ipv6 = 1): IPv6 addresses and routes of the config are skipped")
	}
	if !s.PolicyRouting() {
		return w
	}
	all := readSysctl("net/ipv4/conf/all/rp_filter")
	seen := map[string]bool{}
	ifaces := append([]string{}, outbound...)
	if s.Auto {
		ifaces = append(ifaces, s.From...)
	}
	for _, iface := range ifaces {
		if iface == "" || seen[iface] {
			continue
		}
		seen[iface] = true
		if max(all, readSysctl("net/ipv4/conf/"+iface+"/rp_filter")) == 1 {
			w = append(w, fmt.Sprintf("strict reverse-path filtering (rp_filter = 1) on %s drops replies to captured traffic; "+
				"set net.ipv4.conf.all.rp_filter and net.ipv4.conf.%s.rp_filter to 2 (loose)", iface, iface))
		}
	}
	if len(s.From) > 0 {
		if readSysctl("net/ipv4/ip_forward") != 1 {
			w = append(w, "route.from is set but net.ipv4.ip_forward is 0: IPv4 traffic of those interfaces is not forwarded into the TUN")
		}
		if readSysctl("net/ipv6/conf/all/forwarding") != 1 {
			w = append(w, "route.from is set but net.ipv6.conf.all.forwarding is 0: IPv6 traffic of those interfaces is not forwarded into the TUN")
		}
	}
	return w
}

// readSysctl reads an integer under /proc/sys (of the caller's network
// namespace); -1 when it cannot.
func readSysctl(key string) int {
	b, err := os.ReadFile("/proc/sys/" + key)
	if err != nil {
		return -1
	}
	var v int
	if _, err := fmt.Sscan(string(b), &v); err != nil {
		return -1
	}
	return v
}
