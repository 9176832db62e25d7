package tun

import (
	"net/netip"
	"slices"
	"testing"
)

func TestSubtract(t *testing.T) {
	pp := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	tests := []struct {
		name             string
		include, exclude []netip.Prefix
		want             []netip.Prefix
	}{
		{"no exclude", pp("10.0.0.0/8"), nil, pp("10.0.0.0/8")},
		{"disjoint", pp("10.0.0.0/8"), pp("192.168.0.0/16"), pp("10.0.0.0/8")},
		{"covered", pp("10.1.0.0/16"), pp("10.0.0.0/8"), nil},
		{"equal", pp("10.0.0.0/8"), pp("10.0.0.0/8"), nil},
		{"hole", pp("10.0.0.0/30"), pp("10.0.0.1/32"), pp("10.0.0.0/32", "10.0.0.2/31")},
		{"family ignored", pp("::/0"), pp("0.0.0.0/0"), pp("::/0")},
		{"v6 hole", pp("2001:db8::/126"), pp("2001:db8::3/128"), pp("2001:db8::/127", "2001:db8::2/128")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Subtract(tt.include, tt.exclude)
			if !slices.Equal(got, tt.want) {
				t.Errorf("Subtract(%v, %v) = %v, want %v", tt.include, tt.exclude, got, tt.want)
			}
		})
	}
}

func TestSubtractDefaultRouteKeepsRest(t *testing.T) {
	got := Subtract(pp1("0.0.0.0/0"), pp1("10.0.0.0/8"))
	if len(got) != 8 {
		t.Fatalf("0/0 minus 10/8 gave %d prefixes (%v), want 8", len(got), got)
	}
	for _, p := range got {
		if p.Contains(netip.MustParseAddr("10.1.2.3")) {
			t.Errorf("%v still covers an excluded address", p)
		}
	}
	for _, a := range []string{"0.0.0.1", "11.0.0.0", "9.255.255.255", "255.255.255.255"} {
		if !slices.ContainsFunc(got, func(p netip.Prefix) bool { return p.Contains(netip.MustParseAddr(a)) }) {
			t.Errorf("%s is no longer covered", a)
		}
	}
}

func pp1(s string) []netip.Prefix { return []netip.Prefix{netip.MustParsePrefix(s)} }
