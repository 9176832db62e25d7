package tun

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
)

func TestValidatePolicyDefaults(t *testing.T) {
	s, err := Validate(Config{Addresses: []string{"198.18.0.1/30"}}, RouteConfig{Auto: true})
	if err != nil {
		t.Fatal(err)
	}
	if !s.PolicyRouting() || s.Table != DefaultTable || s.RulePriority != DefaultRulePriority || s.FWMark != DefaultFWMark || s.FailClosed {
		t.Errorf("auto defaults: %+v", s)
	}
	s, err = Validate(Config{Addresses: []string{"198.18.0.1/30"}}, RouteConfig{From: []string{"veth0"}, FWMark: 7, Table: 100, RulePriority: 200, Fail: "closed"})
	if err != nil {
		t.Fatal(err)
	}
	if !s.PolicyRouting() || s.Auto || s.Table != 100 || s.RulePriority != 200 || s.FWMark != 7 || !s.FailClosed {
		t.Errorf("explicit values: %+v", s)
	}
	s, _ = Validate(Config{Addresses: []string{"198.18.0.1/30"}}, RouteConfig{})
	if s.PolicyRouting() || s.FWMark != 0 {
		t.Errorf("without auto or from, no policy routing and no mark: %+v", s)
	}
}

func TestValidatePolicyErrors(t *testing.T) {
	_, err := Validate(Config{Addresses: []string{"198.18.0.1/30"}}, RouteConfig{
		Auto: true, Table: 254, RulePriority: 32765, Fail: "half", From: []string{"ok0", "bad name"},
	})
	for _, want := range []string{"route.table: 254", "route.rule_priority: 32765", `route.fail: "half"`, `route.from[2]: "bad name"`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not mention %q", err, want)
		}
	}
}

func TestCapturedPrefixes(t *testing.T) {
	for _, c := range []struct {
		include, exclude []string
		want             string
	}{
		{nil, nil, "[0.0.0.0/0 ::/0]"},
		{nil, []string{"10.0.0.0/8"}, "[0.0.0.0/5 8.0.0.0/7 11.0.0.0/8 12.0.0.0/6 16.0.0.0/4 32.0.0.0/3 64.0.0.0/2 128.0.0.0/1 ::/0]"},
		{[]string{"203.0.113.0/24", "169.254.1.0/24", "ff02::/16"}, nil, "[203.0.113.0/24]"},
	} {
		s := Settings{Auto: true}
		for _, p := range c.include {
			s.Include = append(s.Include, netip.MustParsePrefix(p))
		}
		for _, p := range c.exclude {
			s.Exclude = append(s.Exclude, netip.MustParsePrefix(p))
		}
		if got := fmt.Sprint(CapturedPrefixes(s)); got != c.want {
			t.Errorf("include %v exclude %v: got %s, want %s", c.include, c.exclude, got, c.want)
		}
	}
}
