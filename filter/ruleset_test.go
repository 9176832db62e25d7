package filter

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"

	"github.com/tunfw/tunfw/internal/config"
)

type fileConfig struct {
	Filter Options        `toml:"filter"`
	Sets   map[string]any `toml:"sets"`
	Rule   []RuleConfig   `toml:"rule"`
}

// compileTOML decodes src the way cmd/tunfw does and compiles it.
func compileTOML(t testing.TB, src string) (*Ruleset, error) {
	t.Helper()
	var fc fileConfig
	if _, err := toml.Decode(src, &fc); err != nil {
		t.Fatalf("toml: %v", err)
	}
	return Compile(fc.Filter, fc.Sets, fc.Rule)
}

func mustCompile(t testing.TB, src string) *Ruleset {
	t.Helper()
	rs, err := compileTOML(t, src)
	if err != nil {
		t.Fatalf("Compile: %v", err)
	}
	return rs
}

const matchConfig = `
[filter]
default = "allow"

[sets]
blocked = ["192.168.0.1", "2001:db8::/32", "172.16.0.0/12"]
web = [80, 443, "8000-8999"]

[[rule]]
name = "blocked-source"
action = "deny"
src = ["@blocked"]

[[rule]]
name = "no-plain-http"
action = "reject"
proto = "tcp"
dst_port = 80

[[rule]]
name = "web-to-lan"
action = "deny"
proto = ["tcp", "udp"]
dst = ["10.0.0.0/8", "fd00::/8"]
dst_port = "@web"

[[rule]]
action = "deny"
proto = "udp"
src_port = ["1000-1999", "3000"]

[[rule]]
name = "no-ping-v6"
action = "reject"
proto = "icmp"
dst = "2001:db8:ffff::1"

[[rule]]
name = "dns-anything"
action = "allow"
proto = "any"
dst = "9.9.9.9"

[[rule]]
name = "deny-9"
action = "deny"
dst = ["9.0.0.0/8", "::/0"]
`

func TestMatch(t *testing.T) {
	rs := mustCompile(t, matchConfig)
	tests := []struct {
		name string
		p    pk
		act  Action
		rule string
	}{
		{"set v4 host", tcp("192.168.0.1", 1, "1.1.1.1", 22, TCPSyn), Deny, "blocked-source"},
		{"set v4 cidr", udp("172.31.255.255", 1, "1.1.1.1", 22), Deny, "blocked-source"},
		{"set v4 neighbour", tcp("192.168.0.2", 1, "1.1.1.1", 22, TCPSyn), Allow, "default"},
		{"set v6 cidr", ping("2001:db8:1::5", "2606::1", 1), Deny, "blocked-source"},
		{"first match wins", tcp("192.168.0.1", 1, "1.1.1.1", 80, TCPSyn), Deny, "blocked-source"},
		{"port 80 v4", tcp("10.1.1.1", 1, "1.1.1.1", 80, TCPSyn), Reject, "no-plain-http"},
		{"port 80 v6", tcp("fd00::1", 1, "2606::1", 80, TCPSyn), Reject, "no-plain-http"},
		{"udp 80 not tcp rule", udp("10.1.1.1", 1, "1.1.1.1", 80), Allow, "default"},
		{"port set 443", tcp("10.1.1.1", 1, "10.2.2.2", 443, TCPSyn), Deny, "web-to-lan"},
		{"port set range low", udp("10.1.1.1", 1, "10.2.2.2", 8000), Deny, "web-to-lan"},
		{"port set range high", udp("fd00::1", 1, "fd12::1", 8999), Deny, "web-to-lan"},
		{"port set outside", udp("10.1.1.1", 1, "10.2.2.2", 9000), Allow, "default"},
		{"dst outside", tcp("10.1.1.1", 1, "11.2.2.2", 443, TCPSyn), Allow, "default"},
		{"src port range", udp("10.1.1.1", 1500, "1.1.1.1", 53), Deny, "rule-4"},
		{"src port single", udp("10.1.1.1", 3000, "1.1.1.1", 53), Deny, "rule-4"},
		{"src port not tcp", tcp("10.1.1.1", 1500, "1.1.1.1", 53, TCPSyn), Allow, "default"},
		{"icmp v6", ping("fd00::1", "2001:db8:ffff::1", 3), Reject, "no-ping-v6"},
		{"icmp v6 other dst", ping("fd00::1", "2001:db8:ffff::2", 3), Deny, "deny-9"},
		{"any proto icmp", ping("10.0.0.1", "9.9.9.9", 3), Allow, "dns-anything"},
		{"any proto udp", udp("10.0.0.1", 5, "9.9.9.9", 53), Allow, "dns-anything"},
		{"absent proto", udp("10.0.0.1", 5, "9.1.1.1", 53), Deny, "deny-9"},
		{"v4 cidr never v6", udp("10.0.0.1", 5, "8.1.1.1", 53), Allow, "default"},
		{"v6 ::/0 never v4-mapped-as-v4", ping("10.0.0.1", "8.8.8.8", 1), Allow, "default"},
		{"other proto matches any", pk{src: "10.0.0.1", dst: "9.9.9.9", proto: 47}, Allow, "dns-anything"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, _ := parsed(tt.p)
			act, i := rs.Match(p)
			if act != tt.act || rs.RuleName(i) != tt.rule {
				t.Errorf("Match = %v %q, want %v %q", act, rs.RuleName(i), tt.act, tt.rule)
			}
		})
	}
}

func TestDefaultsAndOptions(t *testing.T) {
	for _, def := range []string{"", "allow", "deny", "reject"} {
		rs := mustCompile(t, fmt.Sprintf("[filter]\ndefault = %q\n", def))
		want := map[string]Action{"": Allow, "allow": Allow, "deny": Deny, "reject": Reject}[def]
		p, _ := parsed(udp("10.0.0.1", 1, "1.1.1.1", 2))
		if act, i := rs.Match(p); act != want || i != -1 || rs.RuleName(i) != "default" {
			t.Errorf("default %q: Match = %v %d", def, act, i)
		}
	}
	rs := mustCompile(t, "[filter]\nlog = \"all\"\nmode = \"monitor\"\n")
	if rs.log != LogAll || !rs.Monitor() || rs.Default() != Allow || rs.Len() != 0 {
		t.Errorf("options: log %v monitor %v default %v", rs.log, rs.Monitor(), rs.Default())
	}
	rs = mustCompile(t, "")
	if rs.log != LogDeny || rs.Monitor() {
		t.Errorf("empty options: log %v monitor %v", rs.log, rs.Monitor())
	}
}

// Go callers (and tests) may build RuleConfig with typed values.
func TestCompileGoValues(t *testing.T) {
	rs, err := Compile(Options{Default: "deny"}, map[string]any{"p": []int{22, 23}, "h": "10.0.0.1"},
		[]RuleConfig{{Action: "allow", Src: []string{"@h"}, DstPort: []any{"@p", int64(80)}}})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		port uint16
		want Action
	}{{22, Allow}, {23, Allow}, {80, Allow}, {24, Deny}} {
		p, _ := parsed(tcp("10.0.0.1", 1, "1.1.1.1", c.port, TCPSyn))
		if act, _ := rs.Match(p); act != c.want {
			t.Errorf("port %d: %v, want %v", c.port, act, c.want)
		}
	}
}

func TestAddrRangesMerge(t *testing.T) {
	var rc RuleConfig
	rc.Action = "deny"
	rc.Dst = []any{"10.0.0.0/24", "10.0.1.0/24", "10.0.0.128/25", "10.0.3.7", "0.0.0.0/0",
		"fd00::/64", "fd00:0:0:1::/64", "::/0", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"}
	rs, err := Compile(Options{}, nil, []RuleConfig{rc})
	if err != nil {
		t.Fatal(err)
	}
	r := rs.rules[0].dst
	if len(r.v4) != 1 || r.v4[0] != (range4{0, ^uint32(0)}) || len(r.v6) != 1 {
		t.Errorf("merged: %+v", r)
	}
	rc.Dst = []any{"10.0.0.0/24", "10.0.1.0/24", "10.0.3.7", "10.0.0.9", "fd00::/64", "fd00:0:0:1::/64", "fd00:0:0:3::/64"}
	rs, _ = Compile(Options{}, nil, []RuleConfig{rc})
	r = rs.rules[0].dst
	if len(r.v4) != 2 || len(r.v6) != 2 {
		t.Errorf("merged: %+v", r)
	}
	for a, want := range map[string]bool{"10.0.0.0": true, "10.0.1.255": true, "10.0.2.0": false, "10.0.3.7": true,
		"10.0.3.8": false, "9.255.255.255": false, "fd00::": true, "fd00:0:0:1:ffff:ffff:ffff:ffff": true,
		"fd00:0:0:2::": false, "fd00:0:0:3::1": true, "fd00:0:0:4::": false, "::": false} {
		if got := r.contains(netip.MustParseAddr(a)); got != want {
			t.Errorf("contains(%s) = %v", a, got)
		}
	}
}

func TestCompileErrors(t *testing.T) {
	tests := []struct {
		name, src string
		want      []string // each must appear in exactly one error, in order
	}{
		{"options", `[filter]
default = "permit"
log = "some"
mode = "audit"`, []string{
			`filter.default: unknown action "permit" (want allow, deny or reject)`,
			`filter.log: unknown log level "some" (want none, deny or all)`,
			`filter.mode: unknown mode "audit" (want enforce or monitor)`}},
		{"action", `[[rule]]
action = "permit"
[[rule]]
dst = "1.2.3.4"`, []string{
			`rule[1].action: unknown action "permit" (want allow, deny or reject)`,
			`rule[2].action: missing action`}},
		{"addresses", `[[rule]]
action = "deny"
src = "1.2.3"
[[rule]]
action = "deny"
dst = ["10.0.0.1", "10.0.0.300/8"]
[[rule]]
action = "deny"
dst = "10.0.0.5/8"
[[rule]]
action = "deny"
dst = [80]
[[rule]]
action = "deny"
src = []`, []string{
			`rule[1].src: "1.2.3" is not an IP address or CIDR`,
			`rule[2].dst: "10.0.0.300/8" is not an IP address or CIDR`,
			`rule[3].dst: "10.0.0.5/8" is not a canonical CIDR (write 10.0.0.0/8)`,
			`rule[4].dst: 80 (int64) is not an IP address or CIDR`,
			`rule[5].src: empty list`}},
		{"ports", `[[rule]]
action = "deny"
dst_port = "90-80"
[[rule]]
action = "deny"
src_port = [70000, "http", "1-x"]
[[rule]]
action = "deny"
proto = "icmp"
dst_port = 7`, []string{
			`rule[1].dst_port: bad port range "90-80" (want lo <= hi)`,
			`rule[2].src_port: port 70000 out of range (want 0-65535)`,
			`rule[2].src_port: bad port "http"`,
			`rule[2].src_port: bad port range "1-x"`,
			`rule[3].dst_port: dst_port needs proto tcp or udp (icmp has no ports)`}},
		{"names", `[[rule]]
name = "web"
action = "allow"
[[rule]]
name = "web"
action = "deny"
[[rule]]
name = "default"
action = "deny"
[[rule]]
name = "rule-5"
action = "deny"
[[rule]]
action = "deny"`, []string{
			`rule[2].name: "web" already names rule[1]; rule names must differ`,
			`rule[3].name: "default" names the default action; choose another name`,
			`rule[5].name: "rule-5" already names rule[4]; rule names must differ`}},
		{"proto", `[[rule]]
action = "deny"
proto = "tcpp"
[[rule]]
action = "deny"
proto = ["udp", 6]`, []string{
			`rule[1].proto: unknown proto "tcpp" (want tcp, udp, icmp or any)`,
			`rule[2].proto: unknown proto 6 (want tcp, udp, icmp or any)`}},
		{"sets", `[sets]
hosts = ["10.0.0.1"]
ports = [22]
mixed = ["10.0.0.1", 22]
nested = ["@hosts"]
bad = ["10.0.0.999", "65536"]
[[rule]]
action = "deny"
src = "@foo"
[[rule]]
action = "deny"
dst = "@ports"
dst_port = "@hosts"
[[rule]]
action = "deny"
dst = "@bad"`, []string{
			`sets.bad: "10.0.0.999" is not an IP address or CIDR`,
			`sets.bad: bad port "65536"`,
			`sets.mixed: mixes addresses and ports`,
			`sets.nested: "@hosts": sets do not nest`,
			`rule[1].src: unknown set "@foo"`,
			`rule[2].dst: set "@ports" holds ports, not addresses`,
			`rule[2].dst_port: set "@hosts" holds addresses, not ports`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rs, err := compileTOML(t, tt.src)
			if err == nil || rs != nil {
				t.Fatalf("Compile succeeded")
			}
			errs := config.Errors(err)
			if len(errs) != len(tt.want) {
				t.Errorf("got %d errors, want %d:\n%v", len(errs), len(tt.want), err)
			}
			for i, e := range errs {
				if _, ok := config.AsField(e); !ok {
					t.Errorf("error %v is not a *config.FieldError", e)
				}
				if i < len(tt.want) && !strings.HasPrefix(e.Error(), tt.want[i]) {
					t.Errorf("error %d = %q\n           want %q...", i, e, tt.want[i])
				}
			}
		})
	}
}

// TestMergeRanges: overlapping, adjacent and contained ranges merge, gaps
// stay, and a range ending at the top of its space does not wrap.
func TestMergeRanges(t *testing.T) {
	p := mergeRanges([]portRange{{10, 20}, {21, 30}, {5, 8}, {12, 15}, {40, 50}, {65000, 65535}, {65535, 65535}})
	if want := []portRange{{5, 8}, {10, 30}, {40, 50}, {65000, 65535}}; !slices.Equal(p, want) {
		t.Errorf("ports: %v, want %v", p, want)
	}
	r4 := mergeRanges([]range4{{0xffffff00, 0xffffffff}, {1, 1}, {2, 3}, {0xfffffff0, 0xffffffff}})
	if want := []range4{{1, 3}, {0xffffff00, 0xffffffff}}; !slices.Equal(r4, want) {
		t.Errorf("v4: %v, want %v", r4, want)
	}
	top := u128{^uint64(0), ^uint64(0)}
	r6 := mergeRanges([]range6{{u128{0, 5}, u128{0, 9}}, {u128{0, 1}, u128{0, 4}}, {u128{1, 0}, top}, {top, top}, {u128{0, 11}, u128{0, 12}}})
	if want := []range6{{u128{0, 1}, u128{0, 9}}, {u128{0, 11}, u128{0, 12}}, {u128{1, 0}, top}}; !slices.Equal(r6, want) {
		t.Errorf("v6: %v, want %v", r6, want)
	}
}

// TestSharedSetsDoNotHideErrors: a list that is invalid is reported even
// when it looks like a valid list compiled before (they shared a compiled
// set, and the second's errors went unreported).
func TestSharedSetsDoNotHideErrors(t *testing.T) {
	for _, c := range []struct{ name, valid, invalid, key string }{
		{"port", `dst_port = [80]`, `dst_port = ["int64:80"]`, "rule[2].dst_port"},
		{"address", `dst = ["10.0.0.1", "10.0.0.2"]`, "dst = [\"10.0.0.1\\u000010.0.0.2\"]", "rule[2].dst"},
	} {
		src := "[[rule]]\naction = \"allow\"\nproto = \"tcp\"\n" + c.valid + "\n[[rule]]\naction = \"deny\"\nproto = \"tcp\"\n" + c.invalid + "\n"
		if _, err := compileTOML(t, src); err == nil || !strings.Contains(err.Error(), c.key+":") {
			t.Errorf("%s: %v, want an error for %s", c.name, err, c.key)
		}
	}
}
