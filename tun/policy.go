package tun

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

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
//	P    iif lo to 169.254.0.0/16    from: the host's own link-local traffic
//	     lookup main                 (gateway clients' is captured)
//	P+1  not fwmark M lookup T       auto: everything but tunfw's own sockets
//	                                 (and what nft.go gives the mark)
//	P+1  iif IFACE lookup T          from: traffic forwarded from IFACE
//
// and, unless [route] nftables = false, an nftables table (nft.go).
//
// Table T holds, for each prefix of include minus exclude (include defaults
// to 0.0.0.0/0 and ::/0), a route into the TUN, which vanishes with the
// device; with fail = "closed" and nftables = false also an unreachable
// route of the same prefix with the worst metric, which stays after a
// crash, so that a dead firewall blocks instead of letting traffic bypass
// it (with the nftables table, its refusals do that: nft.go). Loopback, link-local,
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
	s      Settings
	rules  []netlink.Rule
	routes []netlink.Route
	guard  bool // the nftables table is installed
	// preexisting is how many connections open at start were marked to
	// stay on the normal routes (preexisting.go).
	preexisting    int
	preexistingErr error
	// stopAlive ends the goroutine that keeps a fail = "open" output
	// filter alive (nft.go); aliveDone is closed when it has.
	stopAlive, aliveDone chan struct{}
	onAliveErr           func(error) // see Device.OnGuardError
}

// keepAlive refreshes the elements of the nftables table's alive set (the
// running one, and with fail = "open" the alive one) until stopAlive is
// closed. A failed refresh is retried at the next tick; the elements
// outlive several.
func (p *policy) keepAlive(failClosed bool) {
	p.stopAlive, p.aliveDone = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(p.aliveDone)
		t := time.NewTicker(aliveInterval)
		defer t.Stop()
		failing := false
		for {
			select {
			case <-p.stopAlive:
				return
			case <-t.C:
				err := armGuard(p.s, failClosed, true)
				if (err != nil) != failing && p.onAliveErr != nil {
					p.onAliveErr(err)
				}
				failing = err != nil
			}
		}
	}()
}

// stopKeepAlive stops keepAlive, if it runs.
func (p *policy) stopKeepAlive() {
	if p.stopAlive != nil {
		close(p.stopAlive)
		<-p.aliveDone
		p.stopAlive = nil
	}
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

// linkLocal4 is where cloud metadata services live. The host's own
// link-local traffic bypasses tunfw (an ip rule for iif lo sends it to the
// main table); what gateway clients send there is captured like the rest.
var linkLocal4 = netip.MustParsePrefix("169.254.0.0/16")

// Install routes traffic into the device as s says: with policy routing
// (auto or from) through tunfw's table, ip rules and nftables table,
// otherwise include minus exclude in the main table. What an earlier run
// left (a crash, the fail = "closed" kill switch, `tunfw down --block`) is
// replaced, never removed first: the new table, routes and rules are in
// place before the leftovers that differ go, so a restart leaves no
// moment unfiltered. Whatever it installed, also on error, is removed by
// Close (or kept by CloseKeepKillSwitch).
func (d *Device) Install(s Settings) (Leftovers, error) {
	if !s.PolicyRouting() {
		return Leftovers{}, d.AddRoutes(s.Include, s.Exclude)
	}
	d.policy = &policy{s: s, onAliveErr: d.OnGuardError}
	return d.policy.install(d.link.Attrs().Index, d.name, d.noIPv6, s.FailClosed)
}

// Preexisting returns how many connections that were open when capture
// started were left on the normal routes, unjudged.
// The error says which of them could not be marked (they are captured,
// and cut).
func (d *Device) Preexisting() (int, error) {
	if d.policy == nil {
		return 0, nil
	}
	return d.policy.preexisting, d.policy.preexistingErr
}

// InstallKillSwitch installs what a crashed tunfw with fail = "closed"
// leaves: its nftables table, refusing everything captured (or, with
// nftables = false, unreachable routes in tunfw's table), and its ip
// rules, but no device. It is for boot
// (`tunfw down --block`), before tunfw runs; `up` replaces it.
func InstallKillSwitch(s Settings) (Leftovers, error) {
	if !s.PolicyRouting() {
		return Leftovers{}, errors.New("the kill switch needs policy routing: set route.auto = true or route.from")
	}
	p := &policy{s: s}
	n, err := p.install(0, s.Name, readSysctl("net/ipv6/conf/default/disable_ipv6") == 1, true)
	return n, errors.Join(err, p.preexistingErr)
}

// install installs the policy for the device with index idx (0: none, the
// kill switch only). Blocking parts go first with fail = "closed": the
// nftables table (or unreachable routes) and the rules; then the routes into
// the TUN; with fail = "open" the rules come last, so that a rule never
// points at a half-built table. The nftables output filter is armed last
// (unless it replaces a kill switch's), after the connections open at
// start are marked.
func (p *policy) install(idx int, tunName string, noIPv6, failClosed bool) (Leftovers, error) {
	s := p.s
	var left Leftovers
	captured := CapturedPrefixes(s)
	captured = slices.DeleteFunc(captured, func(p netip.Prefix) bool { return p.Addr().Is6() && noIPv6 })
	families := map[bool]bool{} // is4 -> has captured prefixes
	for _, p := range captured {
		families[p.Addr().Is4()] = true
	}
	gatewayLinkLocal := len(s.From) > 0 && families[true]
	if gatewayLinkLocal {
		captured = append(captured, linkLocal4)
	}
	if s.NFTables {
		replaced, err := installGuard(s, tunName, noIPv6, failClosed)
		if err != nil {
			return left, fmt.Errorf("%w: host capture needs nftables (nf_tables with conntrack, fib and reject in the kernel); "+
				"set route.nftables = false to run without it (see README: Host capture)", err)
		}
		p.guard = true
		if replaced {
			left.NFTables++
		}
		if s.Auto {
			// Before the rules: from then on, what is not marked is captured.
			// A failure here (no socket diagnostics for UDP, say) costs
			// only those connections: reported, not fatal.
			p.preexisting, p.preexistingErr = markExisting(s)
		}
	}
	for _, n := range neverCaptured {
		if !families[n.Addr().Is4()] || gatewayLinkLocal && n == linkLocal4 {
			continue
		}
		if err := p.addRoute(netlink.Route{Dst: prefixIPNet(n), Type: unix.RTN_THROW}); err != nil {
			return left, err
		}
	}
	if failClosed {
		// Without the nftables table, unreachable routes are the kill
		// switch. With it, its refusals are: an unreachable route would
		// also fail the replies to inbound connections, whose mark the
		// table restores only after the route lookup, and cut the host off.
		if !s.NFTables {
			for _, c := range captured {
				r := netlink.Route{Dst: prefixIPNet(c), Type: unix.RTN_UNREACHABLE, Priority: killSwitchMetric}
				if err := p.addRoute(r); err != nil {
					return left, err
				}
			}
		}
		if err := p.addRules(tunName, families, gatewayLinkLocal); err != nil {
			return left, err
		}
	}
	if idx != 0 {
		for _, c := range captured {
			r := netlink.Route{Dst: prefixIPNet(c), LinkIndex: idx, Scope: netlink.SCOPE_LINK}
			if err := p.addRoute(r); err != nil {
				return left, fmt.Errorf("%w (dev %s)", err, tunName)
			}
		}
	}
	if !failClosed {
		if err := p.addRules(tunName, families, gatewayLinkLocal); err != nil {
			return left, err
		}
	}
	if p.guard {
		// Only now: the connections open at start are marked and the rules
		// capture what is not, so nothing that has to pass is refused.
		// The kill switch alone (no device) says tunfw is not running.
		if err := armGuard(s, failClosed, idx != 0); err != nil {
			return left, err
		}
		if idx != 0 {
			p.keepAlive(failClosed)
		}
	}
	stale, err := p.removeStale(idx)
	left.Rules, left.Routes = stale.Rules, stale.Routes
	return left, err
}

func (p *policy) addRules(tunName string, families map[bool]bool, gatewayLinkLocal bool) error {
	s := p.s
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		if !families[fam == netlink.FAMILY_V4] {
			continue
		}
		rules := []netlink.Rule{ruleOf(fam, s.RulePriority, unix.RT_TABLE_MAIN, func(r *netlink.Rule) { r.IifName = tunName })}
		if gatewayLinkLocal && fam == netlink.FAMILY_V4 {
			rules = append(rules, ruleOf(fam, s.RulePriority, unix.RT_TABLE_MAIN, func(r *netlink.Rule) {
				r.IifName, r.Dst = "lo", prefixIPNet(linkLocal4)
			}))
		}
		if s.Auto {
			rules = append(rules, ruleOf(fam, s.RulePriority+1, s.Table, func(r *netlink.Rule) {
				r.Mark, r.Invert = s.FWMark, true
				mask := uint32(0xffffffff)
				r.Mask = &mask
			}))
		}
		for _, iface := range s.From {
			rules = append(rules, ruleOf(fam, s.RulePriority+1, s.Table, func(r *netlink.Rule) { r.IifName = iface }))
		}
		for _, r := range rules {
			// The same rule of an earlier run is kept as it is: deleting
			// and adding it again would open a gap.
			if err := netlink.RuleAdd(&r); err != nil && !errors.Is(err, unix.EEXIST) {
				return fmt.Errorf("add ip rule %s: %w", describeRule(r), err)
			}
			p.rules = append(p.rules, r)
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
	if r.Dst != nil {
		fmt.Fprintf(&b, " to %s", r.Dst)
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

// ruleKey identifies a rule by what it matches and does.
func ruleKey(r netlink.Rule) string {
	dst := ""
	if r.Dst != nil {
		dst = r.Dst.String()
	}
	return fmt.Sprintf("%d %d %d iif=%s oif=%s mark=%#x not=%v to=%s", r.Family, r.Priority, r.Table, r.IifName, r.OifName, r.Mark, r.Invert, dst)
}

// routeKey identifies a route of tunfw's table the way the kernel does
// (destination, metric), plus its type and device.
func routeKey(r netlink.Route, family int) string {
	dst := "default"
	if r.Dst != nil {
		if ones, _ := r.Dst.Mask.Size(); ones > 0 {
			dst = r.Dst.String()
		}
	}
	typ, prio := r.Type, r.Priority
	if typ == 0 {
		typ = unix.RTN_UNICAST
	}
	if family == netlink.FAMILY_V6 && prio == 0 {
		prio = 1024 // the kernel's default IPv6 metric
	}
	link := 0
	if typ == unix.RTN_UNICAST {
		link = r.LinkIndex
	}
	return fmt.Sprintf("%d %s type=%d metric=%d dev=%d", family, dst, typ, prio, link)
}

func routeFamily(r netlink.Route) int {
	if r.Dst != nil && r.Dst.IP.To4() == nil {
		return netlink.FAMILY_V6
	}
	return netlink.FAMILY_V4
}

func (p *policy) addRoute(r netlink.Route) error {
	r.Table, r.Protocol = p.s.Table, RTProto
	// Replace: the kill switch an earlier run left has the same routes.
	if err := netlink.RouteReplace(&r); err != nil {
		kind := "route"
		switch r.Type {
		case unix.RTN_THROW:
			kind = "throw route"
		case unix.RTN_UNREACHABLE:
			kind = "unreachable route"
		}
		return fmt.Errorf("add %s %s to table %d: %w", kind, r.Dst, p.s.Table, err)
	}
	p.routes = append(p.routes, r)
	return nil
}

// removeStale removes the rules and table routes an earlier run left that
// this one did not install (or adopt); routes into the device idx are
// this run's.
func (p *policy) removeStale(idx int) (Leftovers, error) {
	keep := map[string]bool{}
	for _, r := range p.rules {
		keep[ruleKey(r)] = true
	}
	for _, r := range p.routes {
		keep[routeKey(r, routeFamily(r))] = true
	}
	return cleanup(p.s, func(r netlink.Rule) bool { return keep[ruleKey(r)] },
		func(r netlink.Route, fam int) bool { return (idx != 0 && r.LinkIndex == idx) || keep[routeKey(r, fam)] })
}

// remove deletes the rules, then the routes of the table, then the
// nftables table (last: until the rules are gone, the replies of inbound
// connections need it). Routes that are already gone (those into the TUN
// vanish with it) are not errors.
func (p *policy) remove() error {
	p.stopKeepAlive()
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
			errs = append(errs, fmt.Errorf("delete route %s from table %d: %w", r.Dst, p.s.Table, err))
		}
	}
	p.routes = nil
	if p.guard {
		if _, err := removeGuard(p.s); err != nil {
			errs = append(errs, err)
		}
		p.guard = false
	}
	return errors.Join(errs...)
}

// Leftovers is what Cleanup removed, or what Install replaced.
type Leftovers struct {
	Rules, Routes, NFTables int
}

// Any reports whether anything was left.
func (l Leftovers) Any() bool { return l.Rules+l.Routes+l.NFTables > 0 }

// Cleanup removes what an earlier tunfw with the same table and rule
// priority left behind, in both families: ip rules at RulePriority and
// RulePriority+1 that look up tunfw's table or carry RTProto, every
// route of the table (the kill switch's unreachable routes among them)
// and tunfw's nftables table. It is what `tunfw down` does.
func Cleanup(s Settings) (Leftovers, error) {
	n, err := cleanup(s, nil, nil)
	removed, gerr := removeGuard(s)
	if removed {
		n.NFTables++
	}
	return n, errors.Join(err, gerr)
}

// cleanup deletes tunfw's rules and table routes, except those keepRule
// and keepRoute (when not nil) accept.
func cleanup(s Settings, keepRule func(netlink.Rule) bool, keepRoute func(netlink.Route, int) bool) (Leftovers, error) {
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
			if keepRule != nil && keepRule(r) {
				continue
			}
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
			if keepRoute != nil && keepRoute(r, fam) {
				continue
			}
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
