package e2e

import (
	"encoding/json"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
)

// netState is what tunfw may change in a namespace: links, addresses,
// routes and policy rules of both families.
func netState(t *testing.T, ns *netnstest.NS) string {
	t.Helper()
	var b strings.Builder
	for _, args := range [][]string{
		{"ip", "-o", "link", "show"},
		{"ip", "-o", "addr", "show"},
		{"ip", "-4", "route", "show", "table", "all"},
		{"ip", "-6", "route", "show", "table", "all"},
		{"ip", "-4", "rule", "show"},
		{"ip", "-6", "rule", "show"},
	} {
		out := ns.Run(t, args...)
		b.WriteString(strings.Join(args, " ") + "\n" + out + "\n")
	}
	return b.String()
}

const minimalConfig = `
[tun]
name = "tunfw0"
addresses = ["198.18.0.1/30", "fd54:756e:6677::1/126"]
[route]
include = ["203.0.113.0/24", "2001:db8:99::/48"]
exclude = ["203.0.113.128/25"]
[filter]
log = "all"
`

func TestTeardownRestoresNamespace(t *testing.T) {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	before := netState(t, topo.Host)
	fw := startTunfw(t, topo.Host, writeConfig(t, minimalConfig))
	during := netState(t, topo.Host)
	for _, want := range []string{"tunfw0", "203.0.113.0/25 dev tunfw0", "2001:db8:99::/48 dev tunfw0", "198.18.0.1/30"} {
		if !strings.Contains(during, want) {
			t.Errorf("while up, %q is missing from the namespace:\n%s", want, during)
		}
	}
	if strings.Contains(during, "203.0.113.128/25 dev tunfw0") || strings.Contains(during, "203.0.113.0/24 dev tunfw0") {
		t.Errorf("excluded 203.0.113.128/25 is routed into the TUN:\n%s", during)
	}
	if code := fw.stop(); code != 0 {
		t.Errorf("exit code after SIGTERM = %d, want 0", code)
	}
	if after := netState(t, topo.Host); after != before {
		t.Errorf("namespace not restored after SIGTERM.\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if !strings.Contains(fw.log(), "shutting down") {
		t.Errorf("no shutdown line in the log:\n%s", fw.log())
	}
}

func TestInvalidConfigTouchesNothing(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.New(t, "tfc-")
	before := netState(t, ns)
	cfg := writeConfig(t, minimalConfig+"\n[[rule]]\naction = \"deny\"\ndst = \"10.1.2.3/8\"\n")
	out, err := ns.Cmd(binary, "up", "-c", cfg).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Fatalf("tunfw up with a bad config: %v, want exit 1\n%s", err, out)
	}
	if !strings.Contains(string(out), cfg+":13: rule[1].dst:") {
		t.Errorf("error does not name file:line and key:\n%s", out)
	}
	if after := netState(t, ns); after != before {
		t.Errorf("a rejected config changed the namespace:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	out, err = exec.Command(binary, "check", "-c", cfg).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(string(out), ":13: rule[1].dst:") {
		t.Errorf("tunfw check: %v\n%s", err, out)
	}
}

func TestEmbeddedDefaultConfig(t *testing.T) {
	netnstest.RequireRoot(t)
	if _, err := os.Stat("/etc/tunfw/config.toml"); err == nil {
		t.Skip("/etc/tunfw/config.toml exists on this machine; the fallback cannot be exercised")
	}
	topo := netnstest.NewTopology(t)
	// The embedded config's control socket is /run/tunfw/tunfw.sock: tunfw
	// runs in a mount namespace of its own with a fresh /run, so the test
	// writes nothing to the machine's. unshare and sh exec, so the PID is
	// tunfw's.
	p := &tunfwProc{t: t, cmd: topo.Host.Cmd("unshare", "--mount", "--propagation", "private",
		"sh", "-c", `mount -t tmpfs -o mode=0755 tmpfs /run && exec "$0" up`, binary), done: make(chan struct{})}
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go p.readLog(stderr)
	t.Cleanup(func() { p.stop() })
	p.waitLog(t, 30*time.Second, "using the embedded config.toml")
	p.waitLog(t, 30*time.Second, `msg="tunfw is up"`, "config=\"embedded config.toml\"")
	if code := p.stop(); code != 0 {
		t.Errorf("exit code %d, want 0", code)
	}
}

func TestJSONLogsAndMonitorMode(t *testing.T) {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	startTCPEcho(t, topo.Server, netip.AddrPortFrom(topo.ServiceV4, 9001))
	cfg := writeConfig(t, minimalConfig+`
mode = "monitor"
[[rule]]
name = "would-deny"
action = "deny"
dst_port = 9001
`)
	fw := startTunfw(t, topo.Host, cfg, "--log-format", "json")
	c, err := topo.Host.DialTimeout("tcp", hostPort(topo.ServiceV4, 9001), 5*time.Second)
	if err != nil {
		t.Fatalf("monitor mode blocked a connection: %v", err)
	}
	c.Close()
	line := fw.waitLog(t, 5*time.Second, `"msg":"flow"`, `"rule":"would-deny"`)
	var rec map[string]any
	if err := json.Unmarshal([]byte(line), &rec); err != nil {
		t.Fatalf("log line is not JSON: %v: %s", err, line)
	}
	if rec["verdict"] != "deny" || rec["monitor"] != true || rec["proto"] != "tcp" || rec["dst"] != hostPort(topo.ServiceV4, 9001) {
		t.Errorf("monitor decision logged as %v", rec)
	}
}

// TestTUNLinkEvents: tunfw reads the device's link events, so an admin
// taking the TUN down and up again, more often than wireguard-go's queue of
// five events holds, and changing its MTU is logged, and tunfw still
// answers and stops cleanly. Unread, the events blocked wireguard-go's
// listener for good after the fifth.
func TestTUNLinkEvents(t *testing.T) {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	cfg := writeConfig(t, hardConfig(""))
	fw := startTunfw(t, topo.Host, cfg)
	for i := range 8 {
		topo.Host.Run(t, "ip", "link", "set", "tunfw0", "down")
		// Each down is seen before the next up: the events are read.
		if n := countLog(t, fw, 5*time.Second, "TUN device is down", i+1); n != i+1 {
			t.Fatalf("%d link-down lines after %d downs", n, i+1)
		}
		topo.Host.Run(t, "ip", "link", "set", "tunfw0", "up")
		if n := countLog(t, fw, 5*time.Second, "TUN device is up again", i+1); n != i+1 {
			t.Fatalf("%d link-up lines after %d ups", n, i+1)
		}
	}
	topo.Host.Run(t, "ip", "link", "set", "tunfw0", "mtu", "1400")
	fw.waitLog(t, 5*time.Second, "TUN device MTU changed", "mtu=1400", "was=1500")
	if _, errOut, code := ctl(t, cfg, "status"); code != 0 {
		t.Errorf("tunfw status after the link events: exit %d: %s", code, errOut)
	}
	if code := fw.stop(); code != 0 {
		t.Errorf("exit code %d after the link events, want 0", code)
	}
}

// countLog waits up to d until at least n of tunfw's log lines contain
// part, and returns how many do.
func countLog(t *testing.T, p *tunfwProc, d time.Duration, part string, n int) int {
	t.Helper()
	count := func() int {
		p.mu.Lock()
		defer p.mu.Unlock()
		c := 0
		for _, l := range p.lines {
			if strings.Contains(l, part) {
				c++
			}
		}
		return c
	}
	for deadline := time.Now().Add(d); ; {
		if c := count(); c >= n || time.Now().After(deadline) {
			return c
		}
		time.Sleep(10 * time.Millisecond)
	}
}
