package tun

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/google/nftables/expr"
)

func TestDaddrInMask(t *testing.T) {
	for _, tc := range []struct {
		prefix string
		mask   []byte
		data   []byte
	}{
		{"10.0.0.0/8", []byte{0xff, 0, 0, 0}, []byte{10, 0, 0, 0}},
		{"203.0.113.128/25", []byte{0xff, 0xff, 0xff, 0x80}, []byte{203, 0, 113, 128}},
		{"2001:db8::/33", append([]byte{0xff, 0xff, 0xff, 0xff, 0x80}, make([]byte, 11)...), netip.MustParseAddr("2001:db8::").AsSlice()},
	} {
		e := daddrIn(netip.MustParsePrefix(tc.prefix))
		bw, ok1 := e[len(e)-2].(*expr.Bitwise)
		cmp, ok2 := e[len(e)-1].(*expr.Cmp)
		if !ok1 || !ok2 || string(bw.Mask) != string(tc.mask) || string(cmp.Data) != string(tc.data) {
			t.Errorf("%s: mask %x data %x, want %x %x", tc.prefix, bw.Mask, cmp.Data, tc.mask, tc.data)
		}
	}
	if e := daddrIn(netip.MustParsePrefix("::/0")); len(e) != 2 {
		t.Errorf("::/0 should only match the family, got %d expressions", len(e))
	}
}

func TestValidateFailClosedNeedsPolicyRouting(t *testing.T) {
	c := Config{Addresses: []string{"198.18.0.1/30"}}
	_, err := Validate(c, RouteConfig{Fail: "closed", Include: []string{"10.0.0.0/8"}})
	if err == nil || !strings.Contains(err.Error(), "route.fail") {
		t.Errorf("fail = closed without auto/from: %v", err)
	}
	s, err := Validate(c, RouteConfig{Fail: "closed", Auto: true})
	if err != nil || !s.FailClosed || !s.NFTables || !s.VerifySource {
		t.Errorf("fail = closed with auto: %+v, %v", s, err)
	}
	no, yes := false, true
	if _, err := Validate(c, RouteConfig{From: []string{"veth0"}, NFTables: &no, VerifySource: &yes}); err == nil {
		t.Errorf("verify_source = true with nftables = false: no error")
	}
	if s, err := Validate(c, RouteConfig{From: []string{"veth0"}, NFTables: &no}); err != nil || s.VerifySource {
		t.Errorf("nftables = false: verify_source %v, %v", s.VerifySource, err)
	}
}
