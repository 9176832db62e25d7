package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tunfw/tunfw/filter"
)

const explainConfig = `
[tun]
addresses = ["198.18.0.1/30"]

[filter]
default = "deny"

[sets]
ads = { file = "ads.txt" }

[[rule]]
name = "no-ads"
action = "reject"
domain = "@ads"

[[rule]]
name = "github"
action = "allow"
proto = "tcp"
dst_port = 443
domain = ["github.com", "*.github.com"]

[[rule]]
name = "ssh"
action = "allow"
proto = "tcp"
dst_port = 22
`

func TestExplainOffline(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.toml")
	os.WriteFile(cfg, []byte(explainConfig), 0o600)
	os.WriteFile(filepath.Join(dir, "ads.txt"), []byte("# ad servers\nads.example\n"), 0o600)
	explain := func(args ...string) (string, string, int) {
		var out, errOut bytes.Buffer
		code := run(append([]string{"explain", "-c", cfg}, args...), &out, &errOut)
		return out.String(), errOut.String(), code
	}

	// Allowed by name, peeked.
	out, errOut, code := explain("tcp", "198.18.0.1:40000", "www.github.com:443")
	if code != 0 {
		t.Fatalf("explain allowed: exit %d: %s", code, errOut)
	}
	for _, want := range []string{"(name www.github.com, from given)", "rule[1]", "no-ads", "not in its domain", "rule[2]", "MATCH",
		"verdict: allow (rule github)", "peek: yes"} {
		if !strings.Contains(out, want) {
			t.Errorf("explain allowed: output lacks %q:\n%s", want, out)
		}
	}
	// Denied by the list file's name.
	out, _, _ = explain("tcp", "198.18.0.1:40000", "ads.example:443")
	if !strings.Contains(out, "verdict: reject (rule no-ads)") {
		t.Errorf("explain denied by name:\n%s", out)
	}
	// By address, no name: ssh allows without a peek? The ads rule
	// rejects where ssh allows, but port 22 is one where the server
	// speaks first: never peeked, decided by DNS names only.
	out, _, _ = explain("tcp", "198.18.0.1:40000", "192.0.2.7:22")
	if !strings.Contains(out, "verdict: allow (rule ssh)") || !strings.Contains(out, "peek: no") ||
		!strings.Contains(out, "the flow's name is not known") {
		t.Errorf("explain ssh:\n%s", out)
	}
	// JSON, IPv6, default deny.
	out, errOut, code = explain("--json", "udp", "[2001:db8::1]:5000", "[2001:db8::2]:53")
	if code != 0 {
		t.Fatalf("explain --json: exit %d: %s", code, errOut)
	}
	var ex filter.Explanation
	if err := json.Unmarshal([]byte(out), &ex); err != nil || ex.Verdict != "deny" || ex.Rule != "default" || ex.Peek {
		t.Errorf("explain --json: %+v (%v)\n%s", ex, err, out)
	}
	// Bad arguments: exit 2 and say why.
	for _, args := range [][]string{
		{"sctp", "198.18.0.1:1", "192.0.2.1:1"},
		{"tcp", "nope:1", "192.0.2.1:1"},
		{"tcp", "198.18.0.1:1", "192.0.2.1"},
		{"tcp", "198.18.0.1:1", "bad name:80"},
		{"tcp", "198.18.0.1:1"},
	} {
		if _, errOut, code := explain(args...); code != 2 || errOut == "" {
			t.Errorf("explain %v: exit %d, stderr %q; want 2 and a reason", args, code, errOut)
		}
	}
}
