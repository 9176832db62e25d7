package filter

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strconv"
	"strings"

	"github.com/tunfw/tunfw/internal/config"
	"github.com/tunfw/tunfw/names"
)

// Options is the [filter] section.
type Options struct {
	Default string `toml:"default"` // allow | deny | reject; "" = allow
	Log     string `toml:"log"`     // none | deny | all; "" = deny
	Mode    string `toml:"mode"`    // enforce | monitor; "" = enforce
	// OnReload says what a reload does to existing flows: keep ("", the
	// default) leaves them on the verdict they were given, as conntrack
	// does; recheck runs them through the new rules and closes those now
	// denied or rejected.
	OnReload string `toml:"on_reload"`
	// Dir is the directory a [sets] list file named by a relative path
	// is read from: the config file's. Set by the loader, not the file.
	Dir string `toml:"-"`
}

// RuleConfig is one [[rule]] table as decoded from TOML. Fields are `any`
// because each key takes a value or a list; TOML integers decode as int64,
// strings as string, arrays as []any.
type RuleConfig struct {
	Name    string `toml:"name"`
	Action  string `toml:"action"`
	Proto   any    `toml:"proto"`
	Src     any    `toml:"src"`
	Dst     any    `toml:"dst"`
	SrcPort any    `toml:"src_port"`
	DstPort any    `toml:"dst_port"`
	// Domain lists the names (exact, or "*.suffix") the flow's name must
	// match, or "@set"s of names.
	Domain any `toml:"domain"`
}

// setKind is what a [sets] entry holds.
type setKind uint8

const (
	setEmpty setKind = iota // usable as either kind
	setAddrs
	setPorts
	setNames
)

func (k setKind) String() string {
	switch k {
	case setAddrs:
		return "addresses"
	case setPorts:
		return "ports"
	case setNames:
		return "names"
	}
	return "nothing"
}

// compiledSet is a parsed [sets] entry; only the field of its kind is set.
type compiledSet struct {
	kind  setKind
	addrs []netip.Prefix
	ports []portRange
	names *names.Set
}

// compiler collects every error of a Compile run.
type compiler struct {
	errs []error
	sets map[string]*compiledSet
	// Compiled address and port keys by their entries: rules that name the
	// same entries (typically one "@set") share one compiled set, so a
	// large set used by many rules is held, and indexed, once.
	addrMemo map[string]*addrSet
	portMemo map[string]*portSet
	nameMemo map[string]*nameSet
	dir      string // where relative list files are read from
}

// memoKey identifies a key's list of entries: each with its type, strings
// quoted, so that no two different lists (a string holding a separator,
// "int64:80" and 80) share a key, and an invalid list never borrows a
// valid one's compiled set.
func memoKey(entries []any) string {
	var b strings.Builder
	for _, e := range entries {
		if s, ok := e.(string); ok {
			b.WriteString(strconv.Quote(s))
		} else {
			fmt.Fprintf(&b, "%T:%v", e, e)
		}
		b.WriteByte(',')
	}
	return b.String()
}

func (c *compiler) errorf(key, format string, args ...any) {
	c.errs = append(c.errs, config.Errorf(key, format, args...))
}

// Compile validates opts, sets and rules and compiles them into a Ruleset.
// sets is the [sets] table (values are []any or a scalar). On failure it
// returns an errors.Join of one *config.FieldError per problem found, keyed
// "filter.default", "sets.NAME", "rule[N].KEY" (N 1-based), ...
func Compile(opts Options, sets map[string]any, rules []RuleConfig) (*Ruleset, error) {
	c := &compiler{sets: make(map[string]*compiledSet, len(sets)), addrMemo: map[string]*addrSet{},
		portMemo: map[string]*portSet{}, nameMemo: map[string]*nameSet{}, dir: opts.Dir}
	rs := &Ruleset{}

	if opts.Default == "" {
		rs.def = Allow
	} else if a, ok := parseAction(opts.Default); ok {
		rs.def = a
	} else {
		c.errorf("filter.default", "unknown action %q (want allow, deny or reject)", opts.Default)
	}
	switch strings.ToLower(opts.Log) {
	case "", "deny":
		rs.log = LogDeny
	case "none":
		rs.log = LogNone
	case "all":
		rs.log = LogAll
	default:
		c.errorf("filter.log", "unknown log level %q (want none, deny or all)", opts.Log)
	}
	switch strings.ToLower(opts.Mode) {
	case "", "enforce":
	case "monitor":
		rs.monitor = true
	default:
		c.errorf("filter.mode", "unknown mode %q (want enforce or monitor)", opts.Mode)
	}
	switch strings.ToLower(opts.OnReload) {
	case "", "keep":
	case "recheck":
		rs.recheck = true
	default:
		c.errorf("filter.on_reload", "unknown value %q (want keep or recheck)", opts.OnReload)
	}

	// Sets in name order so errors come out deterministically.
	names := make([]string, 0, len(sets))
	for name := range sets {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		c.compileSet(name, sets[name])
	}

	rs.rules = make([]rule, 0, len(rules))
	// Rule names label counters and metrics: each must name one rule, and
	// "default" names the default action.
	named := make(map[string]int, len(rules))
	for i := range rules {
		r, ok := c.compileRule(i+1, &rules[i])
		if first, dup := named[r.name]; dup {
			c.errorf(fmt.Sprintf("rule[%d].name", i+1), "%q already names rule[%d]; rule names must differ", r.name, first)
			ok = false
		} else if r.name == "default" {
			c.errorf(fmt.Sprintf("rule[%d].name", i+1), `"default" names the default action; choose another name`)
			ok = false
		} else {
			named[r.name] = i + 1
		}
		if ok {
			rs.rules = append(rs.rules, r)
		}
	}
	if len(c.errs) > 0 {
		return nil, errors.Join(c.errs...)
	}
	for i := range rs.rules {
		rs.hasDomains = rs.hasDomains || rs.rules[i].domains != nil
	}
	rs.buildIndex()
	rs.initStats()
	return rs, nil
}

// list turns a value-or-list into a list. TOML arrays decode as []any, but
// callers building configs in Go may use typed slices.
func list(v any) []any {
	switch v := v.(type) {
	case nil:
		return nil
	case []any:
		return v
	}
	rv := reflect.ValueOf(v)
	if rv.Kind() == reflect.Slice || rv.Kind() == reflect.Array {
		out := make([]any, rv.Len())
		for i := range out {
			out[i] = rv.Index(i).Interface()
		}
		return out
	}
	return []any{v}
}

// asInt reports v as an integer if it is one.
func asInt(v any) (int64, bool) {
	rv := reflect.ValueOf(v)
	switch rv.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return rv.Int(), true
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		u := rv.Uint()
		if u > 1<<62 {
			return 1 << 62, true // out of range anyway
		}
		return int64(u), true
	}
	return 0, false
}

// looksLikeAddr decides how a set entry string is read: addresses hold
// ':' or '/', or only digits and dots; ports and port ranges only digits
// and '-'; anything else is a name.
func looksLikeAddr(s string) bool {
	return strings.ContainsAny(s, ":/") || (strings.Contains(s, ".") && strings.Trim(s, "0123456789.") == "")
}

func looksLikePort(s string) bool { return strings.Trim(s, "0123456789- ") == "" }

// entryKind classifies one set entry.
func entryKind(e any) setKind {
	s, ok := e.(string)
	switch {
	case !ok:
		return setPorts // integers; anything else fails as a port
	case looksLikeAddr(s):
		return setAddrs
	case looksLikePort(s):
		return setPorts
	}
	return setNames
}

func (c *compiler) compileSet(name string, v any) {
	key := "sets." + name
	s := &compiledSet{}
	c.sets[name] = s
	ok := true
	if file, isFile := v.(map[string]any); isFile {
		if !c.readListSet(key, s, file) {
			c.sets[name] = nil
		}
		return
	}
	for _, e := range list(v) {
		if x, isStr := e.(string); isStr && strings.HasPrefix(x, "@") {
			c.errorf(key, "%q: sets do not nest (list the entries instead)", x)
			ok = false
			continue
		}
		kind := entryKind(e)
		switch kind {
		case setAddrs:
			p, err := parseAddr(e.(string))
			if err != nil {
				c.errorf(key, "%v", err)
				ok = false
				continue
			}
			s.addrs = append(s.addrs, p)
		case setPorts:
			if _, isInt := asInt(e); !isInt {
				if _, isStr := e.(string); !isStr {
					c.errorf(key, "%v (%T) is not an IP address, CIDR, port, port range or name", e, e)
					ok = false
					continue
				}
			}
			r, err := parsePort(e)
			if err != nil {
				c.errorf(key, "%v", err)
				ok = false
				continue
			}
			s.ports = append(s.ports, r)
		case setNames:
			if s.names == nil {
				s.names = &names.Set{}
			}
			if err := s.names.Add(e.(string)); err != nil {
				c.errorf(key, "%v", err)
				ok = false
				continue
			}
		}
		if s.kind == setEmpty {
			s.kind = kind
		} else if s.kind != kind {
			c.errorf(key, "mixes %s and %s (a set holds one kind)", s.kind, kind)
			ok = false
			break
		}
	}
	if !ok {
		// nil marks "known but invalid": rules using it get no second,
		// misleading error.
		c.sets[name] = nil
	}
}

// readListSet fills s from the list file a set names ({ file = "PATH" }).
func (c *compiler) readListSet(key string, s *compiledSet, t map[string]any) bool {
	path, isStr := t["file"].(string)
	if !isStr || path == "" || len(t) != 1 {
		c.errorf(key, `a set is a list, or { file = "PATH" } naming a list of names`)
		return false
	}
	if !filepath.IsAbs(path) && c.dir != "" {
		path = filepath.Join(c.dir, path)
	}
	f, err := os.Open(path)
	if err != nil {
		c.errorf(key, "%v", err)
		return false
	}
	defer f.Close()
	s.kind, s.names = setNames, &names.Set{}
	if _, err := s.names.ReadList(f, path); err != nil {
		c.errorf(key, "%v", err)
		return false
	}
	return true
}

// parseAddr parses an IP or canonical CIDR; a bare IP is a /32 or /128.
func parseAddr(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("%q is not an IP address or CIDR", s)
		}
		if m := p.Masked(); m != p {
			return netip.Prefix{}, fmt.Errorf("%q is not a canonical CIDR (write %s)", s, m)
		}
		return p, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not an IP address or CIDR", s)
	}
	if a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("%q: IPv6 zones are not allowed", s)
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// parsePort parses an integer port, "80" or "lo-hi".
func parsePort(v any) (portRange, error) {
	if n, ok := asInt(v); ok {
		if n < 0 || n > 65535 {
			return portRange{}, fmt.Errorf("port %d out of range (want 0-65535)", n)
		}
		return portRange{uint16(n), uint16(n)}, nil
	}
	s, ok := v.(string)
	if !ok {
		return portRange{}, fmt.Errorf("%v (%T) is not a port (want a number 0-65535 or a string \"lo-hi\")", v, v)
	}
	lo, hi, isRange := strings.Cut(s, "-")
	if !isRange {
		hi = lo
	}
	l, err1 := strconv.ParseUint(strings.TrimSpace(lo), 10, 16)
	h, err2 := strconv.ParseUint(strings.TrimSpace(hi), 10, 16)
	switch {
	case (err1 != nil || err2 != nil) && isRange:
		return portRange{}, fmt.Errorf("bad port range %q (want \"lo-hi\" with numbers 0-65535)", s)
	case err1 != nil || err2 != nil:
		return portRange{}, fmt.Errorf("bad port %q (want a number 0-65535 or a range \"lo-hi\")", s)
	case l > h:
		return portRange{}, fmt.Errorf("bad port range %q (want lo <= hi)", s)
	}
	return portRange{uint16(l), uint16(h)}, nil
}

// setRef resolves "@name" for key, reporting unknown sets and sets of the
// wrong kind. ok is false when an error was reported; s is nil (with ok
// true) for a set that is itself invalid, already reported under sets.NAME.
func (c *compiler) setRef(key, ref string, want setKind) (s *compiledSet, ok bool) {
	s, found := c.sets[ref[1:]]
	if !found {
		c.errorf(key, "unknown set %q", ref)
		return nil, false
	}
	if s != nil && s.kind != setEmpty && s.kind != want {
		c.errorf(key, "set %q holds %s, not %s", ref, s.kind, want)
		return nil, false
	}
	return s, true
}

// compileAddrs compiles an address key; absent means any. Keys with the
// same entries share one compiled set.
func (c *compiler) compileAddrs(key string, v any) (*addrSet, bool) {
	mk := "\x01any" // absent: no list has this key
	var entries []any
	if v != nil {
		entries = list(v)
		mk = memoKey(entries)
	}
	if s, ok := c.addrMemo[mk]; ok {
		return s, true
	}
	s, ok := &addrSet{any: true}, true
	if v != nil {
		s, ok = c.compileAddrList(key, entries)
	}
	if ok {
		c.addrMemo[mk] = s
	}
	return s, ok
}

func (c *compiler) compileAddrList(key string, entries []any) (*addrSet, bool) {
	if len(entries) == 0 {
		c.errorf(key, "empty list (omit the key to match any address)")
		return &addrSet{}, false
	}
	var pfx []netip.Prefix
	ok := true
	for _, e := range entries {
		s, isStr := e.(string)
		if !isStr {
			c.errorf(key, "%v (%T) is not an IP address or CIDR (want a string)", e, e)
			ok = false
			continue
		}
		if strings.HasPrefix(s, "@") {
			set, good := c.setRef(key, s, setAddrs)
			if !good {
				ok = false
			} else if set != nil {
				pfx = append(pfx, set.addrs...)
			}
			continue
		}
		p, err := parseAddr(s)
		if err != nil {
			c.errorf(key, "%v", err)
			ok = false
			continue
		}
		pfx = append(pfx, p)
	}
	var v4 []range4
	var v6 []range6
	for _, p := range pfx {
		if p.Addr().Is4() {
			v4 = append(v4, prefixRange4(p))
		} else {
			v6 = append(v6, prefixRange6(p))
		}
	}
	return &addrSet{v4: mergeRanges(v4), v6: mergeRanges(v6)}, ok
}

// compilePorts compiles a port key; absent means any. Keys with the same
// entries share one compiled set.
func (c *compiler) compilePorts(key string, v any) (*portSet, bool) {
	mk := "\x01any"
	var entries []any
	if v != nil {
		entries = list(v)
		mk = memoKey(entries)
	}
	if s, ok := c.portMemo[mk]; ok {
		return s, true
	}
	s, ok := &portSet{any: true}, true
	if v != nil {
		s, ok = c.compilePortList(key, entries)
	}
	if ok {
		c.portMemo[mk] = s
	}
	return s, ok
}

func (c *compiler) compilePortList(key string, entries []any) (*portSet, bool) {
	if len(entries) == 0 {
		c.errorf(key, "empty list (omit the key to match any port)")
		return &portSet{}, false
	}
	var rs []portRange
	ok := true
	for _, e := range entries {
		if s, isStr := e.(string); isStr && strings.HasPrefix(s, "@") {
			set, good := c.setRef(key, s, setPorts)
			if !good {
				ok = false
			} else if set != nil {
				rs = append(rs, set.ports...)
			}
			continue
		}
		r, err := parsePort(e)
		if err != nil {
			c.errorf(key, "%v", err)
			ok = false
			continue
		}
		rs = append(rs, r)
	}
	return &portSet{ranges: mergeRanges(rs)}, ok
}

// compileNames compiles a domain key; absent (nil) means any name. Keys
// with the same entries share one compiled set.
func (c *compiler) compileNames(key string, v any) (*nameSet, bool) {
	if v == nil {
		return nil, true
	}
	entries := list(v)
	mk := memoKey(entries)
	if s, ok := c.nameMemo[mk]; ok {
		return s, true
	}
	if len(entries) == 0 {
		c.errorf(key, "empty list (omit the key to match any name)")
		return nil, false
	}
	ns, ok := &nameSet{}, true
	var inline *names.Set
	for _, e := range entries {
		s, isStr := e.(string)
		if !isStr {
			c.errorf(key, "%v (%T) is not a name (want a string)", e, e)
			ok = false
			continue
		}
		if strings.HasPrefix(s, "@") {
			set, good := c.setRef(key, s, setNames)
			if !good {
				ok = false
			} else if set != nil && set.names != nil {
				ns.sets = append(ns.sets, set.names)
			}
			continue
		}
		if inline == nil {
			inline = &names.Set{}
			ns.sets = append(ns.sets, inline)
		}
		if err := inline.Add(s); err != nil {
			c.errorf(key, "%v", err)
			ok = false
		}
	}
	if ok {
		c.nameMemo[mk] = ns
	}
	return ns, ok
}

func (c *compiler) compileProto(key string, v any) (uint8, bool) {
	if v == nil {
		return protoAny, true
	}
	entries := list(v)
	if len(entries) == 0 {
		c.errorf(key, "empty list (omit the key to match any protocol)")
		return 0, false
	}
	var mask uint8
	ok := true
	for _, e := range entries {
		s, _ := e.(string)
		switch strings.ToLower(s) {
		case "tcp":
			mask |= protoTCP
		case "udp":
			mask |= protoUDP
		case "icmp":
			mask |= protoICMP
		case "any":
			mask |= protoAny
		default:
			if _, isStr := e.(string); isStr {
				c.errorf(key, "unknown proto %q (want tcp, udp, icmp or any)", s)
			} else {
				c.errorf(key, "unknown proto %v (want tcp, udp, icmp or any)", e)
			}
			ok = false
		}
	}
	return mask, ok
}

func (c *compiler) compileRule(n int, rc *RuleConfig) (rule, bool) {
	key := func(k string) string { return fmt.Sprintf("rule[%d].%s", n, k) }
	r := rule{name: rc.Name}
	if r.name == "" {
		r.name = fmt.Sprintf("rule-%d", n)
	}
	ok := true
	if a, known := parseAction(rc.Action); known {
		r.action = a
	} else if rc.Action == "" {
		c.errorf(key("action"), "missing action (want allow, deny or reject)")
		ok = false
	} else {
		c.errorf(key("action"), "unknown action %q (want allow, deny or reject)", rc.Action)
		ok = false
	}
	var good bool
	if r.protos, good = c.compileProto(key("proto"), rc.Proto); !good {
		ok = false
	}
	if r.src, good = c.compileAddrs(key("src"), rc.Src); !good {
		ok = false
	}
	if r.dst, good = c.compileAddrs(key("dst"), rc.Dst); !good {
		ok = false
	}
	if r.srcPort, good = c.compilePorts(key("src_port"), rc.SrcPort); !good {
		ok = false
	}
	if r.dstPort, good = c.compilePorts(key("dst_port"), rc.DstPort); !good {
		ok = false
	}
	if r.domains, good = c.compileNames(key("domain"), rc.Domain); !good {
		ok = false
	}
	// DNS blocking answers queries for a rule's names only when nothing
	// but the client's address narrows the rule (ruleset.go, BlockedName).
	r.nameOnly = rc.Domain != nil && rc.Proto == nil && rc.Dst == nil && rc.SrcPort == nil && rc.DstPort == nil
	// A port condition can only hold for protocols with ports: it narrows
	// "any" (or tcp+icmp) to the port-carrying ones, and a rule left with
	// none is a mistake.
	if rc.SrcPort != nil || rc.DstPort != nil {
		k := "dst_port"
		if rc.DstPort == nil {
			k = "src_port"
		}
		if r.protos != 0 && r.protos&protoPorts == 0 {
			c.errorf(key(k), "%s needs proto tcp or udp (icmp has no ports)", k)
			ok = false
		}
		r.protos &= protoPorts
	}
	return r, ok
}
