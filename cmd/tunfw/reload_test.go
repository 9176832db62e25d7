package main

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/stack"
)

// reloadDaemon returns a daemon running on the config in a temp file, with
// a real engine and stack (no device), and the file's path.
func reloadDaemon(t *testing.T, text string) (*daemon, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := parseConfig(path, []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	eng := filter.NewEngine(cfg.Rules, filter.EngineOptions{Logger: log, Limits: cfg.Limits})
	st, err := stack.New(stack.Options{MTU: 1500, Engine: eng, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	return &daemon{log: log, eng: eng, st: st, cfg: cfg, start: time.Now()}, path
}

// engineRules lists the engine's rules as "name:action ...", the default
// last.
func engineRules(d *daemon) string {
	var out []string
	for _, r := range d.eng.RuleStats() {
		out = append(out, r.Name+":"+r.Action)
	}
	return strings.Join(out, " ")
}

const reloadBase = `[tun]
addresses = ["198.18.0.1/30"]
[filter]
default = "deny"
[limits]
max_flows = 100
[[rule]]
name = "web"
action = "allow"
proto = "tcp"
dst_port = 80
`

// TestReload: a good config replaces rules and limits together and is
// counted; a broken one, or one writable by others, changes nothing and is
// counted as failed; a setting that applies only at start is reported, and
// keeps its running value.
func TestReload(t *testing.T) {
	d, path := reloadDaemon(t, reloadBase)
	write := func(text string, mode os.FileMode) {
		t.Helper()
		if err := os.WriteFile(path, []byte(text), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
	}

	next := strings.Replace(reloadBase, "max_flows = 100", "max_flows = 200", 1) +
		"[[rule]]\nname = \"dns\"\naction = \"allow\"\nproto = \"udp\"\ndst_port = 53\n"
	write(next, 0o600)
	res, err := d.reload()
	if err != nil || res.Rules != 2 || len(res.Warnings) != 0 {
		t.Fatalf("reload: %+v, %v", res, err)
	}
	if got := engineRules(d); got != "web:allow dns:allow default:deny" || d.eng.Limits().MaxFlows != 200 {
		t.Errorf("after reload: rules %q, max_flows %d; want web, dns and default, 200", got, d.eng.Limits().MaxFlows)
	}

	write(next+"[[rule]\n", 0o600)
	if _, err := d.reload(); err == nil || !strings.Contains(err.Error(), path+":") {
		t.Errorf("broken config: %v, want an error naming the file and line", err)
	}
	write(strings.Replace(next, "default = \"deny\"", "default = \"allow\"", 1), 0o666)
	if _, err := d.reload(); err == nil || !strings.Contains(err.Error(), "writable by group or others") {
		t.Errorf("0666 config: %v", err)
	}
	if got := engineRules(d); got != "web:allow dns:allow default:deny" || d.reloadsFailed.Load() != 2 || d.reloadsOK.Load() != 1 {
		t.Errorf("failed reloads changed the rules (%q) or were not counted (%d ok, %d failed)",
			got, d.reloadsOK.Load(), d.reloadsFailed.Load())
	}

	write(strings.Replace(next, "[tun]\n", "[tun]\nmtu = 1400\n", 1), 0o600)
	res, err = d.reload()
	if err != nil || len(res.Warnings) != 1 || !strings.HasPrefix(res.Warnings[0], "tun.mtu changed") {
		t.Fatalf("restart-only change: %+v, %v", res, err)
	}
	if d.config().Net.MTU == 1400 {
		t.Error("the running config took the new MTU, which applies only at start")
	}
}
