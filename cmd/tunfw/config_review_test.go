package main

import (
	"strings"
	"testing"
)

// TestTypeErrorNoSpuriousUnknownKeys: decoding a table stops at its first
// type error, in map order; the keys it had not reached yet are valid and
// must not be reported as unknown (they were, at random), while a really
// unknown key of the same table still is.
func TestTypeErrorNoSpuriousUnknownKeys(t *testing.T) {
	body := `[tun]
addresses = ["198.18.0.1/30"]
[route]
auto = true
include = ["10.0.0.0/8"]
exclude = ["10.1.0.0/16"]
fail = "closed"
nftables = "yes"
verify_source = true
bogus = 1
[[rule]]
name = "r"
action = 3
proto = "tcp"
dst_port = 80
`
	for i := 0; i < 50; i++ {
		_, err := parseConfig("f.toml", []byte(body))
		if err == nil {
			t.Fatal("no error")
		}
		msg := err.Error()
		for _, want := range []string{"f.toml:8: route.nftables:", "f.toml:10: route.bogus: unknown key", "f.toml:13: rule.action:"} {
			if !strings.Contains(msg, want) {
				t.Fatalf("run %d: no %q in:\n%s", i, want, msg)
			}
		}
		if n := strings.Count(msg, "unknown key"); n != 1 {
			t.Fatalf("run %d: %d unknown keys reported, want 1 (route.bogus):\n%s", i, n, msg)
		}
	}
}
