package main

import (
	"bytes"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/tunfw/tunfw"
	"github.com/tunfw/tunfw/stack/tcpfwd"
	"github.com/tunfw/tunfw/tun"
)

func TestEmbeddedConfigIsValid(t *testing.T) {
	cfg, err := parseConfig("config.toml", tunfw.DefaultConfig)
	if err != nil {
		t.Fatalf("embedded config.toml: %v", err)
	}
	if cfg.Rules.Len() == 0 || len(cfg.Net.Include) == 0 {
		t.Errorf("embedded config has %d rules and %d routes; the example should show both", cfg.Rules.Len(), len(cfg.Net.Include))
	}
}

// TestConfigErrorsNameFileLineKey checks that each kind of mistake is
// reported with the line it is on and the key, and that all of them are
// reported at once.
func TestConfigErrorsNameFileLineKey(t *testing.T) {
	const bad = `[tun]
name = "tunfw0"
mtu = 100
addresses = ["198.18.0.1/30", "nope"]
colour = "red"

[route]
include = ["203.0.113.0/24", "10.0.0.5/8", "300.1.1.1"]

[filter]
default = "maybe"
mode = "loud"

[sets]
web = [80, "90-70"]
ports = [22]

[[rule]]
action = "permit"
proto = "tcpp"
dst = ["1.2.3.4/33", "@nosuch"]

[[rule]]
action = "deny"
dst_port = ["@web", 70000]
src = "@ports"
bogus = 1

[stack]
congestion_control = "bbr"
send_buffer = 2048

[unknown_section]
x = 1
`
	want := []string{
		"f.toml:3: tun.mtu: 100 is out of range",
		`f.toml:4: tun.addresses[2]: "nope"`,
		"f.toml:5: tun.colour: unknown key",
		`f.toml:8: route.include[2]: "10.0.0.5/8" has host bits set`,
		`f.toml:8: route.include[3]: "300.1.1.1"`,
		`f.toml:11: filter.default: unknown action "maybe"`,
		`f.toml:12: filter.mode:`,
		`f.toml:15: sets.web: bad port range "90-70"`,
		`f.toml:19: rule[1].action: unknown action "permit"`,
		`f.toml:20: rule[1].proto: unknown proto "tcpp"`,
		`f.toml:21: rule[1].dst: "1.2.3.4/33"`,
		`f.toml:21: rule[1].dst: unknown set "@nosuch"`,
		`f.toml:25: rule[2].dst_port:`,
		`f.toml:26: rule[2].src:`,
		"f.toml:27: rule[2].bogus: unknown key",
		`f.toml:30: stack.congestion_control: "bbr" is not reno or cubic`,
		"f.toml:31: stack.send_buffer: 2048 bytes is out of range",
		"f.toml:33: unknown_section: unknown key",
	}
	_, err := parseConfig("f.toml", []byte(bad))
	if err == nil {
		t.Fatal("bad config accepted")
	}
	got := err.Error()
	for _, w := range want {
		if !strings.Contains(got, w) {
			t.Errorf("missing error %q", w)
		}
	}
	if t.Failed() {
		t.Logf("got:\n%s", got)
	}
}

func TestConfigSyntaxAndTypeErrors(t *testing.T) {
	tests := []struct{ name, body, want string }{
		{"syntax", "[tun]\nname = \"x\"\nmtu = = 3\n", "f.toml:3:"},
		{"type", "[tun]\nname = \"x\"\nmtu = \"big\"\naddresses = [\"198.18.0.1/30\"]\n", "f.toml:3: tun.mtu:"},
		{"rule type", "[tun]\naddresses = [\"198.18.0.1/30\"]\n[[rule]]\naction = 3\n", "f.toml:4: rule.action:"},
		{"queue length", "[tun]\naddresses = [\"198.18.0.1/30\"]\nqueue_length = 0x10000\n", "f.toml:3: tun.queue_length: 65536 is out of range"},
		{"cpu latency", "[tun]\naddresses = [\"198.18.0.1/30\"]\n[cpu]\nwakeup_latency = \"fast\"\n", `f.toml:4: cpu.wakeup_latency: "fast" is neither off nor a duration`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseConfig("f.toml", []byte(tt.body))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

func TestCheckCommand(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.toml")
	bad := filepath.Join(dir, "bad.toml")
	os.WriteFile(good, tunfw.DefaultConfig, 0o600)
	os.WriteFile(bad, []byte("[tun]\nmtu = 1\n"), 0o600)
	tests := []struct {
		args     []string
		code     int
		out, err string
	}{
		{[]string{"check", "-c", good}, 0, "good.toml: ok", ""},
		{[]string{"check", "--config", bad}, 1, "", "bad.toml:2: tun.mtu: 1 is out of range"},
		{[]string{"check", "-c", filepath.Join(dir, "missing.toml")}, 1, "", "no such file"},
		{[]string{"check", "--help"}, 0, "Usage: tunfw check", ""},
		{[]string{"up", "--help"}, 0, "Usage: tunfw up", ""},
		{[]string{"up", "-c", bad}, 1, "", "bad.toml:2: tun.mtu"},
		{[]string{"version"}, 0, "tunfw ", ""},
		{[]string{"--help"}, 0, "Usage:", ""},
		{[]string{"frobnicate"}, 2, "", `unknown command "frobnicate"`},
		{[]string{"check", "--nope"}, 2, "", "flag provided but not defined"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(tt.args, &stdout, &stderr)
			if code != tt.code {
				t.Errorf("exit %d, want %d (stdout %q, stderr %q)", code, tt.code, stdout.String(), stderr.String())
			}
			if !strings.Contains(stdout.String(), tt.out) {
				t.Errorf("stdout %q does not contain %q", stdout.String(), tt.out)
			}
			if !strings.Contains(stderr.String(), tt.err) {
				t.Errorf("stderr %q does not contain %q", stderr.String(), tt.err)
			}
		})
	}
}

func TestConfigWritableByOthersRefused(t *testing.T) {
	p := filepath.Join(t.TempDir(), "c.toml")
	os.WriteFile(p, tunfw.DefaultConfig, 0o600)
	os.Chmod(p, 0o666)
	var stdout, stderr bytes.Buffer
	if code := run([]string{"check", "-c", p}, &stdout, &stderr); code != 1 ||
		!strings.Contains(stderr.String(), "writable by group or others (mode 0666)") || !strings.Contains(stderr.String(), "chmod go-w") {
		t.Errorf("world-writable config: exit %d, %q", code, stderr.String())
	}
	os.Chmod(p, 0o644)
	if code := run([]string{"check", "-c", p}, &stdout, &stderr); code != 0 {
		t.Errorf("0644 config refused: %q", stderr.String())
	}
}

// FuzzParseConfig feeds arbitrary text to the config loader: it must return
// a config or errors, never panic, and every error must carry the file name.
func FuzzParseConfig(f *testing.F) {
	f.Add(string(tunfw.DefaultConfig))
	f.Add("[tun]\naddresses = [\"198.18.0.1/30\"]\n[[rule]]\naction = \"deny\"\ndst = [\"@x\", 3]\n")
	f.Add("[sets]\na = [\"1-2\", \"::/0\", 70000]\n[[rule]]\naction=\"allow\"\nsrc_port=\"@a\"\n")
	f.Add("[limits]\nudp_idle = \"-1s\"\n[metrics]\nlisten = \"x\"\n[control]\nsocket = \"rel\"\n")
	f.Add("[[rule]]\n[[rule]]\nproto = [[]]\n")
	f.Add("[limits]\n\"a\\n'\" = 1\n\"\\r\" = 2\n")
	f.Fuzz(func(t *testing.T, text string) {
		cfg, err := parseConfig("f.toml", []byte(text))
		if err == nil {
			if cfg == nil || cfg.Rules == nil {
				t.Fatal("no error and no config")
			}
			return
		}
		for _, line := range strings.Split(err.Error(), "\n") {
			if !strings.HasPrefix(line, "f.toml") {
				t.Fatalf("error without file name: %q", line)
			}
		}
	})
}

// TestStackSectionDefaults checks that keys left out of [stack] keep their
// defaults and that the ones given are taken.
func TestStackSectionDefaults(t *testing.T) {
	cfg, err := parseConfig("f.toml", []byte("[tun]\naddresses = [\"198.18.0.1/30\"]\n[stack]\ncongestion_control = \"cubic\"\nreceive_buffer_max = 16777216\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := tcpfwd.DefaultConfig()
	want.CongestionControl = "cubic"
	want.ReceiveBufferMax = 16 << 20
	if cfg.Stack != want {
		t.Errorf("[stack] = %+v, want %+v", cfg.Stack, want)
	}
	cfg, err = parseConfig("f.toml", []byte("[tun]\naddresses = [\"198.18.0.1/30\"]\n"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Stack != tcpfwd.DefaultConfig() {
		t.Errorf("no [stack]: got %+v, want the defaults", cfg.Stack)
	}
}

// TestRestartOnlyNamesKeys: a reload that changes settings applied only at
// start warns with their config keys (it named Go fields: "FailClosed
// changed"), and every such field has a key to name.
func TestRestartOnlyNamesKeys(t *testing.T) {
	for _, typ := range []reflect.Type{reflect.TypeOf(tun.Settings{}), reflect.TypeOf(tcpfwd.Config{})} {
		for i := 0; i < typ.NumField(); i++ {
			if f := typ.Field(i); f.Tag.Get("key") == "" && f.Tag.Get("toml") == "" {
				t.Errorf("%s.%s has no config key to name in a reload warning", typ, f.Name)
			}
		}
	}
	base := "[tun]\naddresses = [\"198.18.0.1/30\"]\n[route]\nauto = true\n"
	old, err := parseConfig("f.toml", []byte(base))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := parseConfig("f.toml", []byte(base+"fail = \"closed\"\n[stack]\nrack = true\n[dns]\nblock = \"refused\"\nmax_names = 10\n[cpu]\nwakeup_latency = \"0us\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(restartOnly(old, cfg), "\n")
	for _, want := range []string{"route.fail changed", "stack.rack changed", "dns.block changed", "dns.max_names changed", "cpu.wakeup_latency changed"} {
		if !strings.Contains(got, want) {
			t.Errorf("warnings lack %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, "FailClosed") || strings.Contains(got, "RACK ") {
		t.Errorf("warnings name Go fields:\n%s", got)
	}
}
