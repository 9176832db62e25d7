package tun

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// The guard is tunfw's nftables table, installed with policy routing when
// [route] nftables is true (the default). Routing alone leaves two holes
// in host capture: the replies of connections that reach the host from
// outside follow tunfw's table into the TUN, where no flow expects them,
// and a socket bound to a device (SO_BINDTODEVICE, unprivileged since
// Linux 5.7) skips the table and leaves unjudged. In gateway mode routing
// also believes every source address. With M the fwmark and TUN the
// device, the table is (auto: the ct and output chains; from: the source
// check; both: the forward chain):
//
//	table inet tunfw {
//	  chain prerouting { type filter hook prerouting priority raw
//	    iifname TUN ip daddr TUNADDR notrack        # host's TUN traffic: no conntrack
//	    iifname IFACE fib saddr . iif oif missing counter drop  # per from IFACE
//	  }
//	  chain input { type filter hook input priority mangle
//	    iifname != TUN iifname != lo ct state new ct mark set M
//	  }
//	  chain output-raw { type filter hook output priority raw
//	    oifname TUN ip saddr TUNADDR notrack
//	  }
//	  chain output-route { type route hook output priority mangle
//	    ct mark M meta mark set M                   # replies and pre-existing: main table
//	  }
//	  chain output { type filter hook output priority filter
//	    oifname TUN accept; oifname lo accept; meta mark M accept
//	    icmpv6 type nd-router-solicit-nd-redirect accept
//	    udp sport . udp dport { 68 . 67, 546 . 547 } accept   # DHCP clients
//	    fib daddr type broadcast accept             # a subnet's broadcast
//	    1 @alive jump captured                      # once armed (see below)
//	  }
//	  chain captured {
//	    ip daddr NEVERCAPTURED return               # loopback, link-local, multicast
//	    ip daddr CAPTURED jump refuse               # each captured prefix
//	  }
//	  chain forward { type filter hook forward priority filter   # 2: running
//	    iifname IFACE oifname != TUN 1 @alive 2 != @alive jump captured-from  # per from IFACE
//	    iifname != TUN oifname != TUN 1 @alive 2 != @alive jump captured      # auto
//	  }
//	  chain captured-from { ... }                   # captured, 169.254.0.0/16 too
//	  chain refuse {
//	    meta l4proto tcp counter reject with tcp reset
//	    counter reject with icmpx admin-prohibited
//	  }
//	}
//
// A connection whose first packet arrives from any interface but the TUN
// (or lo) is marked; the mark is restored on its replies, and the
// existing rule "not fwmark M lookup T" then sends them to the main table.
// A packet that leaves outside the TUN, without the mark, to a destination
// that policy routing captures has bypassed capture (a socket bound to a
// device): it is refused at once. The refusal depends on the element of
// the set alive. With fail = "open" it times out unless tunfw refreshes
// it, so the table a crashed tunfw leaves lets everything pass within
// seconds, as its routes do at once. With fail = "closed" it has no
// timeout and holds until a clean stop or `tunfw down`: it is the kill
// switch. (Unreachable routes would not do: the kernel assumes a bound
// device's destination is on link, and the route lookup of a reply to an
// inbound connection fails before this table can restore its mark, which
// would cut the host off.) The forward chain refuses what the host
// forwards outside the TUN to a captured destination (in gateway mode what
// from interfaces send; with auto, what any interface sends), only while
// tunfw is not running: the set's second element, refreshed every second
// by a running tunfw, times out aliveTimeout after a crash, and an error
// exit or `tunfw down --block` leaves none. While tunfw runs, routing
// sends what it captures into the TUN, and the forward hook also sees
// bridged traffic (br_netfilter), which must pass. Packets between the host and the TUN skip conntrack, so host
// capture does not fill the conntrack table.
//
// The table is replaced in one transaction (add, delete, add), so a
// restart never leaves a moment without it. A new table starts unarmed
// (no element) unless it replaces one of a fail = "closed" run: until the
// connections open at start are marked and the ip rules are in, their
// packets leave by the uplink without the mark and must not be refused
// (that reset a running upload); armGuard arms it then.

// guardTable returns tunfw's nftables table for s: "tunfw", or
// "tunfw-TABLE" for a non-default routing table, so that two configs with
// their own tables do not share one.
func guardTable(s Settings) *nftables.Table {
	name := "tunfw"
	if s.Table != DefaultTable {
		name = fmt.Sprintf("tunfw-%d", s.Table)
	}
	return &nftables.Table{Name: name, Family: nftables.TableFamilyINet}
}

// GuardTableName returns the name of tunfw's nftables table (family inet)
// for s.
func GuardTableName(s Settings) string { return guardTable(s).Name }

const refuseChain = "refuse"

// installGuard replaces tunfw's nftables table with the one s needs;
// tunName is the TUN device's name. It reports whether a table of an
// earlier run was there. The output filter is armed at once only if that
// table was there and failClosed (a kill switch is replaced); otherwise
// armGuard arms it.
func installGuard(s Settings, tunName string, noIPv6, failClosed bool) (replaced bool, err error) {
	c, err := nftables.New()
	if err != nil {
		return false, fmt.Errorf("open nftables netlink socket: %w", err)
	}
	t := guardTable(s)
	if old, err := c.ListTableOfFamily(t.Name, t.Family); err == nil && old != nil {
		replaced = true
	}
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	g := guardBuilder{c: c, t: t, mark: s.FWMark, tun: tunName}
	g.build(s, noIPv6, failClosed, failClosed && replaced)
	if err := c.Flush(); err != nil {
		return replaced, fmt.Errorf("install nftables table inet %s: %w", t.Name, err)
	}
	return replaced, nil
}

// removeGuard deletes tunfw's nftables table; it reports whether there was
// one.
func removeGuard(s Settings) (bool, error) {
	c, err := nftables.New()
	if err != nil {
		return false, fmt.Errorf("open nftables netlink socket: %w", err)
	}
	t := guardTable(s)
	if old, err := c.ListTableOfFamily(t.Name, t.Family); err != nil || old == nil {
		return false, nil
	}
	c.DelTable(t)
	if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return false, fmt.Errorf("delete nftables table inet %s: %w", t.Name, err)
	}
	return true, nil
}

// GuardCounters are the packet counters of the guard's rules.
type GuardCounters struct {
	// Spoofed counts packets from a from interface whose source does
	// not route back through it (dropped).
	Spoofed uint64
	// Refused counts packets that tried to leave outside the TUN to a
	// captured destination (refused).
	Refused uint64
}

// ReadGuardCounters reads the counters of tunfw's nftables table.
func ReadGuardCounters(s Settings) (GuardCounters, error) {
	var gc GuardCounters
	c, err := nftables.New()
	if err != nil {
		return gc, fmt.Errorf("open nftables netlink socket: %w", err)
	}
	t := guardTable(s)
	for _, ch := range []struct {
		name string
		n    *uint64
		has  bool
	}{{"prerouting", &gc.Spoofed, true}, {refuseChain, &gc.Refused, true}} {
		if !ch.has {
			continue
		}
		rules, err := c.GetRules(t, &nftables.Chain{Name: ch.name, Table: t})
		if err != nil {
			return gc, fmt.Errorf("read nftables chain %s of inet %s: %w", ch.name, t.Name, err)
		}
		for _, r := range rules {
			for _, e := range r.Exprs {
				if ctr, ok := e.(*expr.Counter); ok {
					*ch.n += ctr.Packets
				}
			}
		}
	}
	return gc, nil
}

// guardBuilder adds the guard's chains and rules to a batch.
type guardBuilder struct {
	c    *nftables.Conn
	t    *nftables.Table
	mark uint32
	tun  string
}

func (g *guardBuilder) chain(name string, hook *nftables.ChainHook, prio *nftables.ChainPriority, typ nftables.ChainType) *nftables.Chain {
	ch := &nftables.Chain{Name: name, Table: g.t}
	if hook != nil {
		accept := nftables.ChainPolicyAccept
		ch.Hooknum, ch.Priority, ch.Type, ch.Policy = hook, prio, typ, &accept
	}
	return g.c.AddChain(ch)
}

func (g *guardBuilder) rule(ch *nftables.Chain, exprs ...[]expr.Any) {
	var all []expr.Any
	for _, e := range exprs {
		all = append(all, e...)
	}
	g.c.AddRule(&nftables.Rule{Table: g.t, Chain: ch, Exprs: all})
}

func (g *guardBuilder) build(s Settings, noIPv6, failClosed, armed bool) {
	pre := g.chain("prerouting", nftables.ChainHookPrerouting, nftables.ChainPriorityRaw, nftables.ChainTypeFilter)
	if s.Auto {
		// The host's own flows through the TUN, from the TUN's address
		// (as routing picks it): conntrack has nothing to do with them.
		// Only those: the reply to an inbound connection is routed into
		// the TUN first and must keep its conntrack entry to be
		// rerouted.
		for _, a := range s.Addresses {
			g.rule(pre, ifname(expr.MetaKeyIIFNAME, expr.CmpOpEq, g.tun), addrIs(a.Addr(), false), notrack())
		}
	}
	if s.VerifySource {
		for _, iface := range s.From {
			g.verifySource(pre, iface, s.Auto)
		}
	}
	refuse := g.chain(refuseChain, nil, nil, "")
	g.rule(refuse, l4proto(unix.IPPROTO_TCP), counter(), []expr.Any{&expr.Reject{Type: unix.NFT_REJECT_TCP_RST}})
	g.rule(refuse, counter(), []expr.Any{&expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_ADMIN_PROHIBITED}})
	// The refusals hold only while the alive set has its element (see
	// the top of this file): with fail = "open" only while tunfw lives,
	// since the element times out unless tunfw refreshes it, so the table
	// a crashed tunfw leaves stops refusing within aliveTimeout, as its
	// routes stop capturing at once.
	alive := aliveSetOf(g.t)
	var elems []nftables.SetElement
	if armed {
		elems = append(elems, aliveElement(failClosed))
	}
	g.c.AddSet(alive, elems)
	whenArmed := func(chain string) []expr.Any {
		return append(immediate(aliveKey), &expr.Lookup{SourceRegister: 1, SetName: alive.Name, SetID: alive.ID},
			&expr.Verdict{Kind: expr.VerdictJump, Chain: chain})
	}
	// What the host forwards is refused only while tunfw is not running
	// (armed, without the running element): while it runs, routing sends
	// what it captures into the TUN, and the forward hook also sees
	// bridged traffic (br_netfilter, which Docker loads), such as one
	// container's to another on docker0, which must pass.
	whenDown := func(chain string) []expr.Any {
		e := append(immediate(aliveKey), &expr.Lookup{SourceRegister: 1, SetName: alive.Name, SetID: alive.ID})
		e = append(e, immediate(runningKey)...)
		return append(e, &expr.Lookup{SourceRegister: 1, SetName: alive.Name, SetID: alive.ID, Invert: true},
			&expr.Verdict{Kind: expr.VerdictJump, Chain: chain})
	}
	// What routing captures: without IPv6 in the namespace, no v6 prefix.
	captured := slices.DeleteFunc(CapturedPrefixes(s), func(p netip.Prefix) bool { return p.Addr().Is6() && noIPv6 })
	// What the host forwards for others (gateway clients; with auto, any
	// host routed through it) leaves outside the TUN to a captured
	// destination only where tunfw's table has no route into it for them:
	// while tunfw is down, which is when the kill switch must block it.
	// Gateway clients' link-local destinations are captured too.
	if len(s.From) > 0 {
		fromCaptured := captured
		linkLocal := slices.ContainsFunc(captured, func(p netip.Prefix) bool { return p.Addr().Is4() })
		if linkLocal {
			fromCaptured = append(slices.Clone(captured), linkLocal4)
		}
		g.capturedChain(capturedFromChain, fromCaptured, linkLocal)
	}
	fwd := g.chain("forward", nftables.ChainHookForward, nftables.ChainPriorityFilter, nftables.ChainTypeFilter)
	for _, iface := range s.From {
		g.rule(fwd, ifname(expr.MetaKeyIIFNAME, expr.CmpOpEq, iface), ifname(expr.MetaKeyOIFNAME, expr.CmpOpNeq, g.tun),
			whenDown(capturedFromChain))
	}
	if !s.Auto {
		return
	}
	in := g.chain("input", nftables.ChainHookInput, nftables.ChainPriorityMangle, nftables.ChainTypeFilter)
	g.rule(in, ifname(expr.MetaKeyIIFNAME, expr.CmpOpNeq, g.tun), ifname(expr.MetaKeyIIFNAME, expr.CmpOpNeq, "lo"),
		ctStateNew(), setCtMark(g.mark))

	outRaw := g.chain("output-raw", nftables.ChainHookOutput, nftables.ChainPriorityRaw, nftables.ChainTypeFilter)
	for _, a := range s.Addresses {
		g.rule(outRaw, ifname(expr.MetaKeyOIFNAME, expr.CmpOpEq, g.tun), addrIs(a.Addr(), true), notrack())
	}

	route := g.chain("output-route", nftables.ChainHookOutput, nftables.ChainPriorityMangle, nftables.ChainTypeRoute)
	g.rule(route, ctMarkIs(g.mark), setMetaMarkFromReg())

	// What leaves outside the TUN to a captured destination without the
	// mark bypassed capture (a socket bound to a device or to another
	// interface's route), or finds no route into the TUN because tunfw
	// is down. nftables cannot ask routing from the output hook, so the
	// captured prefixes are listed.
	g.capturedChain(capturedChain, captured, false)
	out := g.chain("output", nftables.ChainHookOutput, nftables.ChainPriorityFilter, nftables.ChainTypeFilter)
	g.rule(out, ifname(expr.MetaKeyOIFNAME, expr.CmpOpEq, g.tun), accept())
	g.rule(out, ifname(expr.MetaKeyOIFNAME, expr.CmpOpEq, "lo"), accept())
	g.rule(out, metaMarkIs(g.mark), accept())
	// Neighbour discovery answers the kernel sends straight to a
	// neighbour's (possibly global) address.
	g.rule(out, l4proto(unix.IPPROTO_ICMPV6), []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
		&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: []byte{133}, ToData: []byte{137}},
	}, accept())
	// DHCP clients renew their lease with a socket bound to the device;
	// their ports are privileged, so no ordinary user can borrow them.
	for _, ports := range [][2]uint16{{68, 67}, {546, 547}} {
		g.rule(out, l4proto(unix.IPPROTO_UDP), []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 4},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{byte(ports[0] >> 8), byte(ports[0]), byte(ports[1] >> 8), byte(ports[1])}},
		}, accept())
	}
	// A subnet's directed broadcast, which the local table routes straight
	// to its link: broadcast is never captured.
	g.rule(out, nfproto(unix.NFPROTO_IPV4), []expr.Any{
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_BROADCAST)},
	}, accept())
	g.rule(out, whenArmed(capturedChain))
	// Forwarded the same way as the host's own traffic: link-local
	// destinations are not captured for it.
	g.rule(fwd, ifname(expr.MetaKeyIIFNAME, expr.CmpOpNeq, g.tun), ifname(expr.MetaKeyOIFNAME, expr.CmpOpNeq, g.tun),
		whenDown(capturedChain))
}

// capturedChain adds a chain that refuses packets to the prefixes of
// captured and lets the never-captured ranges return first (as throw
// routes let them through whatever include says), 169.254.0.0/16 except
// when linkLocal.
func (g *guardBuilder) capturedChain(name string, captured []netip.Prefix, linkLocal bool) {
	ch := g.chain(name, nil, nil, "")
	for _, n := range neverCaptured {
		if linkLocal && n == linkLocal4 {
			continue
		}
		g.rule(ch, daddrIn(n), []expr.Any{&expr.Verdict{Kind: expr.VerdictReturn}})
	}
	for _, p := range captured {
		g.rule(ch, daddrIn(p), jump(refuseChain))
	}
}

const (
	capturedChain     = "captured"
	capturedFromChain = "captured-from"
	aliveSet          = "alive"
	// aliveTimeout is how long the output filter of a fail = "open"
	// tunfw outlives it; AliveInterval is how often it is refreshed.
	aliveTimeout  = 5 * time.Second
	aliveInterval = time.Second
)

// The alive set's elements: aliveKey arms the refusals; runningKey, which
// a running tunfw refreshes and which times out after aliveTimeout, says
// that tunfw runs (the forward chain refuses only without it).
const (
	aliveKey   = 1
	runningKey = 2
)

func aliveSetOf(t *nftables.Table) *nftables.Set {
	return &nftables.Set{Table: t, Name: aliveSet, KeyType: nftables.TypeMark, HasTimeout: true}
}

// aliveElement is the element that arms the output filter: with fail =
// "closed" for good, otherwise for aliveTimeout.
func aliveElement(failClosed bool) nftables.SetElement {
	e := nftables.SetElement{Key: binaryutil.NativeEndian.PutUint32(aliveKey)}
	if !failClosed {
		e.Timeout = aliveTimeout
	}
	return e
}

// armGuard arms the output filter of tunfw's table, or renews the timeout
// of a fail = "open" one, and says whether tunfw runs (the running element,
// renewed too). The set is flushed and the elements added in one
// transaction: a live element is never missing, and one that has already
// timed out (tunfw stalled for longer than aliveTimeout) comes back;
// deleting it would fail the whole transaction.
func armGuard(s Settings, failClosed, running bool) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("open nftables netlink socket: %w", err)
	}
	set := aliveSetOf(guardTable(s))
	c.FlushSet(set)
	elems := []nftables.SetElement{aliveElement(failClosed)}
	if running {
		elems = append(elems, nftables.SetElement{Key: binaryutil.NativeEndian.PutUint32(runningKey), Timeout: aliveTimeout})
	}
	if err := c.SetAddElements(set, elems); err != nil {
		return fmt.Errorf("arm nftables set %s: %w", aliveSet, err)
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("arm nftables set %s of inet %s: %w", aliveSet, set.Table.Name, err)
	}
	return nil
}

// verifySource drops packets from iface whose source address does not
// route back through iface. With auto, the lookup carries the fwmark so
// that it sees the main table rather than tunfw's (where every source
// routes into the TUN); the mark is set only for the check.
func (g *guardBuilder) verifySource(ch *nftables.Chain, iface string, auto bool) {
	in := ifname(expr.MetaKeyIIFNAME, expr.CmpOpEq, iface)
	fib := &expr.Fib{Register: 1, ResultOIF: true, FlagSADDR: true, FlagIIF: true, FlagMARK: auto}
	if auto {
		g.rule(ch, in, metaMarkIs(0), immediate(g.mark), setMetaMarkFromReg())
	}
	// DHCP and IPv6 duplicate address detection send from the
	// unspecified address, which routes nowhere.
	for _, fam := range []struct {
		proto  byte
		off    uint32
		anyLen int
	}{{unix.NFPROTO_IPV4, 12, 4}, {unix.NFPROTO_IPV6, 8, 16}} {
		g.rule(ch, in, nfproto(fam.proto), []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: fam.off, Len: uint32(fam.anyLen)},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, fam.anyLen)},
			fib,
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: make([]byte, 4)},
		}, counter(), []expr.Any{&expr.Verdict{Kind: expr.VerdictDrop}})
	}
	if auto {
		g.rule(ch, in, metaMarkIs(g.mark), immediate(0), setMetaMarkFromReg())
	}
}

func ifnameData(name string) []byte { return []byte(name + "\x00") }

func ifname(key expr.MetaKey, op expr.CmpOp, name string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: ifnameData(name)},
	}
}

func nfproto(p byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}},
	}
}

func l4proto(p byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}},
	}
}

// addrIs matches packets whose source (src) or destination is a.
func addrIs(a netip.Addr, src bool) []expr.Any {
	proto, off := byte(unix.NFPROTO_IPV4), uint32(16)
	if a.Is6() {
		proto, off = unix.NFPROTO_IPV6, 24
	}
	if src {
		off -= uint32(a.BitLen() / 8)
	}
	return append(nfproto(proto),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: uint32(a.BitLen() / 8)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: a.AsSlice()},
	)
}

func ctStateNew() []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitNEW), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

func ctMarkIs(m uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeyMARK},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(m)},
	}
}

func metaMarkIs(m uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(m)},
	}
}

func immediate(v uint32) []expr.Any {
	return []expr.Any{&expr.Immediate{Register: 1, Data: binaryutil.NativeEndian.PutUint32(v)}}
}

func setCtMark(m uint32) []expr.Any {
	return append(immediate(m), &expr.Ct{Register: 1, SourceRegister: true, Key: expr.CtKeyMARK})
}

// setMetaMarkFromReg sets the packet mark from register 1.
func setMetaMarkFromReg() []expr.Any {
	return []expr.Any{&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1}}
}

func notrack() []expr.Any { return []expr.Any{&expr.Notrack{}} }
func counter() []expr.Any { return []expr.Any{&expr.Counter{}} }
func accept() []expr.Any  { return []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}} }

func jump(chain string) []expr.Any {
	return []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: chain}}
}

// daddrIn matches packets whose destination lies in p.
func daddrIn(p netip.Prefix) []expr.Any {
	proto, off := byte(unix.NFPROTO_IPV4), uint32(16)
	if p.Addr().Is6() {
		proto, off = unix.NFPROTO_IPV6, 24
	}
	e := nfproto(proto)
	if p.Bits() == 0 {
		return e
	}
	n := uint32(p.Addr().BitLen() / 8)
	mask := make([]byte, n)
	for i := 0; i < p.Bits(); i++ {
		mask[i/8] |= 0x80 >> (i % 8)
	}
	return append(e,
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: n, Mask: mask, Xor: make([]byte, n)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: p.Masked().Addr().AsSlice()},
	)
}
