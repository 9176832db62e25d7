package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/internal/netnstest"
)

// ctl runs a client command (status, flows, stats, reload) against the
// tunfw whose config is cfg and returns stdout, stderr and the exit code.
func ctl(t *testing.T, cfg string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(binary, append(args, "-c", cfg)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run tunfw %v: %v", args, err)
	}
	return stdout.String(), stderr.String(), code
}

func flowsJSON(t *testing.T, cfg string, filters ...string) []filter.FlowInfo {
	t.Helper()
	out, errOut, code := ctl(t, cfg, append([]string{"flows", "--json"}, filters...)...)
	if code != 0 {
		t.Fatalf("tunfw flows: exit %d: %s", code, errOut)
	}
	var flows []filter.FlowInfo
	if err := json.Unmarshal([]byte(out), &flows); err != nil {
		t.Fatalf("flows --json: %v\n%s", err, out)
	}
	return flows
}

func findFlow(flows []filter.FlowInfo, proto string, dst netip.AddrPort) *filter.FlowInfo {
	for i := range flows {
		if flows[i].Proto == proto && flows[i].Dst == dst {
			return &flows[i]
		}
	}
	return nil
}

const observeConfig = `
[tun]
addresses = ["198.18.0.1/30", "fd54:756e:6677::1/126"]
[route]
include = ["203.0.113.0/24", "2001:db8:99::/48"]
[filter]
default = "deny"
log = "all"
[[rule]]
name = "echo"
action = "allow"
proto = "tcp"
dst_port = [9100, 9101]
[[rule]]
name = "udp-echo"
action = "allow"
proto = "udp"
dst_port = 7000
[[rule]]
name = "ping"
action = "allow"
proto = "icmp"
`

func TestFlowsStatsStatus(t *testing.T) {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	svc := topo.ServiceV4
	startTCPEcho(t, topo.Server, netip.AddrPortFrom(svc, 9100))
	startUDPEcho(t, topo.Server, netip.AddrPortFrom(svc, 7000))
	cfg := writeConfig(t, observeConfig)
	startTunfw(t, topo.Host, cfg)

	// A live TCP connection that moved 200 KB each way.
	c, err := topo.Host.DialTimeout("tcp", hostPort(svc, 9100), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const tcpBytes = 200 << 10
	go c.Write(make([]byte, tcpBytes))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, tcpBytes)); err != nil {
		t.Fatalf("echo: %v", err)
	}
	// A UDP flow of 5 datagrams of 1000 bytes, echoed.
	u, err := topo.Host.DialTimeout("udp", hostPort(svc, 7000), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	for i := 0; i < 5; i++ {
		u.Write(make([]byte, 1000))
		u.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := u.Read(make([]byte, 2000)); err != nil {
			t.Fatalf("udp echo %d: %v", i, err)
		}
	}
	// Three pings.
	if out, err := topo.Host.Cmd("ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", svc.String()).CombinedOutput(); err != nil {
		t.Fatalf("ping: %v\n%s", err, out)
	}

	flows := flowsJSON(t, cfg)
	tf := findFlow(flows, "tcp", netip.AddrPortFrom(svc, 9100))
	if tf == nil || tf.Rule != "echo" || tf.Verdict != "allow" || tf.State != "established" {
		t.Fatalf("TCP flow: %+v in %+v", tf, flows)
	}
	// IP lengths: payload plus 40-60 bytes of headers per segment.
	if tf.BytesIn < tcpBytes || tf.BytesIn > tcpBytes*12/10 || tf.BytesOut < tcpBytes || tf.BytesOut > tcpBytes*12/10 {
		t.Errorf("TCP flow bytes in/out %d/%d, want close to %d each", tf.BytesIn, tf.BytesOut, tcpBytes)
	}
	uf := findFlow(flows, "udp", netip.AddrPortFrom(svc, 7000))
	if uf == nil || uf.Rule != "udp-echo" || uf.State != "established" || uf.PacketsIn != 5 || uf.PacketsOut != 5 ||
		uf.BytesIn != 5*1028 || uf.BytesOut != 5*1028 {
		t.Errorf("UDP flow: %+v", uf)
	}
	pf := findFlow(flows, "icmp", netip.AddrPortFrom(svc, 0))
	if pf == nil || pf.Rule != "ping" || pf.PacketsIn != 3 || pf.PacketsOut != 3 || pf.BytesIn != 3*84 {
		t.Errorf("ping flow: %+v", pf)
	}

	// Filters.
	for _, f := range flowsJSON(t, cfg, "--proto", "udp") {
		if f.Proto != "udp" {
			t.Errorf("--proto udp listed %+v", f)
		}
	}
	if got := flowsJSON(t, cfg, "--dst", "2001:db8::/32"); len(got) != 0 {
		t.Errorf("--dst 2001:db8::/32 listed v4 flows: %+v", got)
	}
	out, _, code := ctl(t, cfg, "flows")
	if code != 0 || !strings.Contains(out, "PROTO") || !strings.Contains(out, "udp-echo") {
		t.Errorf("flows table:\n%s", out)
	}

	// stats agree with the flows: one rule, its bytes are its flows' bytes.
	out, errOut, code := ctl(t, cfg, "stats", "--json")
	if code != 0 {
		t.Fatalf("stats: %s", errOut)
	}
	var st struct {
		Rules []filter.RuleStat `json:"rules"`
		Drops map[string]uint64 `json:"drops"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatal(err)
	}
	flows = flowsJSON(t, cfg)
	for _, r := range st.Rules {
		var want *filter.FlowInfo
		switch r.Name {
		case "echo":
			want = findFlow(flows, "tcp", netip.AddrPortFrom(svc, 9100))
		case "udp-echo":
			want = findFlow(flows, "udp", netip.AddrPortFrom(svc, 7000))
		case "ping":
			want = findFlow(flows, "icmp", netip.AddrPortFrom(svc, 0))
		default:
			continue
		}
		if r.Flows != 1 || r.Packets != want.PacketsIn+want.PacketsOut || r.Bytes != want.BytesIn+want.BytesOut {
			t.Errorf("stats for %s: %+v; its flow: %+v", r.Name, r, want)
		}
	}
	// A denied connection shows in the drops.
	topo.Host.DialTimeout("tcp", hostPort(svc, 9200), 300*time.Millisecond)
	out, _, _ = ctl(t, cfg, "stats", "--json")
	json.Unmarshal([]byte(out), &st)
	if st.Drops["denied"] == 0 {
		t.Errorf("denied drop not counted: %+v", st.Drops)
	}
	out, _, code = ctl(t, cfg, "stats")
	if code != 0 || !strings.Contains(out, "RULE") || !strings.Contains(out, "default") {
		t.Errorf("stats table:\n%s", out)
	}
	out, _, code = ctl(t, cfg, "status")
	if code != 0 || !strings.Contains(out, "mode     enforce (default deny, 3 rules)") || !strings.Contains(out, "established") {
		t.Errorf("status:\n%s", out)
	}
}

func TestReloadUnderTraffic(t *testing.T) {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	svc := topo.ServiceV4
	startTCPEcho(t, topo.Server, netip.AddrPortFrom(svc, 9100))
	startTCPEcho(t, topo.Server, netip.AddrPortFrom(svc, 9101))
	cfg := writeConfig(t, observeConfig)
	fw := startTunfw(t, topo.Host, cfg)
	orig := readFile(t, cfg)

	// A long transfer through the reloads: 64 MB echoed in 64 KB chunks.
	long, err := topo.Host.DialTimeout("tcp", hostPort(svc, 9100), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer long.Close()
	const total = 64 << 20
	transfer := make(chan error, 1)
	go func() {
		go func() {
			chunk := make([]byte, 64<<10)
			for sent := 0; sent < total; sent += len(chunk) {
				if _, err := long.Write(chunk); err != nil {
					return
				}
			}
		}()
		long.SetReadDeadline(time.Now().Add(60 * time.Second))
		n, err := io.CopyN(io.Discard, long, total)
		if err == nil && n != total {
			err = fmt.Errorf("got %d bytes", n)
		}
		transfer <- err
	}()
	connect := func() error {
		c, err := topo.Host.DialTimeout("tcp", hostPort(svc, 9101), 2*time.Second)
		if err == nil {
			c.Close()
		}
		return err
	}
	// New connections succeed before the reload.
	for i := 0; i < 5; i++ {
		if err := connect(); err != nil {
			t.Fatalf("connect before reload: %v", err)
		}
	}
	// A stream of new connections runs through the reload. Each one is
	// judged by the old rules (connects) or the new ones (refused): none
	// may hang, and once one was refused, none started later connects.
	type attempt struct {
		start, end time.Time
		err        error
	}
	stop := make(chan struct{})
	attempts := make(chan []attempt, 1)
	go func() {
		var as []attempt
		for {
			select {
			case <-stop:
				attempts <- as
				return
			default:
			}
			a := attempt{start: time.Now()}
			a.err = connect()
			a.end = time.Now()
			as = append(as, a)
		}
	}()
	time.Sleep(300 * time.Millisecond) // let the stream run before the reload
	// Reload: 9101 is now rejected.
	os.WriteFile(cfg, []byte(strings.Replace(readFile(t, cfg), "dst_port = [9100, 9101]", "dst_port = 9100", 1)+`
[[rule]]
name = "no-9101"
action = "reject"
proto = "tcp"
dst_port = 9101
`), 0o600)
	out, errOut, code := ctl(t, cfg, "reload")
	if code != 0 || !strings.Contains(out, "reloaded: 4 rules") {
		t.Fatalf("reload: exit %d\n%s%s", code, out, errOut)
	}
	time.Sleep(300 * time.Millisecond) // and after it
	close(stop)
	as := <-attempts
	var ok, refused int
	var firstRefusedEnd time.Time
	for _, a := range as {
		switch {
		case a.err == nil:
			ok++
			if !firstRefusedEnd.IsZero() && a.start.After(firstRefusedEnd) {
				t.Errorf("a connection started after one was refused by the new rules still connected")
			}
		case errors.Is(a.err, syscall.ECONNREFUSED):
			refused++
			if firstRefusedEnd.IsZero() {
				firstRefusedEnd = a.end
			}
		default:
			t.Errorf("connection during reload: %v (want connected or refused)", a.err)
		}
	}
	t.Logf("connections during the reload: %d connected (old rules), %d refused (new rules)", ok, refused)
	if ok == 0 || refused == 0 {
		t.Errorf("the stream saw %d connects and %d refusals; want both", ok, refused)
	}
	if err := connect(); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("new connection after reload: %v, want refused by the new rule", err)
	}

	// An invalid config is refused, the old rules stay.
	good := readFile(t, cfg)
	os.WriteFile(cfg, []byte(good+"\n[[rule]]\naction = \"allow\"\ndst = \"not-an-address\"\n"), 0o600)
	out, errOut, code = ctl(t, cfg, "reload")
	if code != 1 || !strings.Contains(errOut, "still running on the previous rules") || !strings.Contains(errOut, `rule[5].dst: "not-an-address"`) ||
		!strings.Contains(errOut, cfg+":") {
		t.Errorf("invalid reload: exit %d, stdout %q, stderr:\n%s", code, out, errOut)
	}
	if err := connect(); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("after a refused reload: %v, want the previous rules (refused)", err)
	}
	fw.waitLog(t, 5*time.Second, "reload: config error", "not-an-address")

	// SIGHUP reloads too: back to allowing 9101.
	os.WriteFile(cfg, []byte(orig), 0o600)
	fw.cmd.Process.Signal(syscall.SIGHUP)
	fw.waitLog(t, 10*time.Second, "config reloaded", "rules=3")
	if err := connect(); err != nil {
		t.Errorf("after SIGHUP reload: %v", err)
	}
	if err := <-transfer; err != nil {
		t.Fatalf("long transfer across reloads: %v", err)
	}
	out, _, _ = ctl(t, cfg, "status", "--json")
	if !strings.Contains(out, `"ok": 2`) || !strings.Contains(out, `"failed": 1`) {
		t.Errorf("status reload counts:\n%s", out)
	}
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestReloadRecheckCutsDeniedFlow(t *testing.T) {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	svc := topo.ServiceV6
	startTCPEcho(t, topo.Server, netip.AddrPortFrom(svc, 9100))
	startTCPEcho(t, topo.Server, netip.AddrPortFrom(svc, 9101))
	body := strings.Replace(observeConfig, "log = \"all\"", "log = \"all\"\non_reload = \"recheck\"", 1)
	cfg := writeConfig(t, body)
	startTunfw(t, topo.Host, cfg)
	echo := func(c net.Conn) error {
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.Write([]byte("x")); err != nil {
			return err
		}
		_, err := io.ReadFull(c, make([]byte, 1))
		return err
	}
	cut, err := topo.Host.DialTimeout("tcp", hostPort(svc, 9101), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer cut.Close()
	kept, err := topo.Host.DialTimeout("tcp", hostPort(svc, 9100), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer kept.Close()
	if echo(cut) != nil || echo(kept) != nil {
		t.Fatal("echo before reload failed")
	}
	// The reload also changes the TUN's MTU, which needs a restart: it is
	// reported, not silently ignored.
	next := strings.Replace(readFile(t, cfg), "dst_port = [9100, 9101]", "dst_port = 9100", 1)
	next = strings.Replace(next, "[tun]\n", "[tun]\nmtu = 1400\n", 1)
	os.WriteFile(cfg, []byte(next), 0o600)
	out, errOut, code := ctl(t, cfg, "reload")
	if code != 0 || !strings.Contains(out, "1 flows closed by the new rules") {
		t.Fatalf("reload: exit %d\n%s%s", code, out, errOut)
	}
	if !strings.Contains(out, "warning: tun.mtu changed; it applies only at start: restart tunfw to apply it") {
		t.Errorf("MTU change not reported:\n%s", out)
	}
	if err := echo(cut); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("flow denied by the new rules: %v, want connection reset", err)
	}
	if err := echo(kept); err != nil {
		t.Errorf("flow still allowed: %v", err)
	}
	// Still running on the old MTU, the next reload says so again.
	if out, errOut, code := ctl(t, cfg, "reload"); code != 0 || !strings.Contains(out, "warning: tun.mtu changed") {
		t.Errorf("second reload: exit %d, the MTU change not reported again:\n%s%s", code, out, errOut)
	}
}

func TestFlowLimits(t *testing.T) {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	for _, svc := range []netip.Addr{topo.ServiceV4, topo.ServiceV6} {
		startTCPEcho(t, topo.Server, netip.AddrPortFrom(svc, 9100))
	}
	cfg := writeConfig(t, observeConfig+"\n[limits]\nmax_flows = 4\nmax_flows_per_source = 3\n")
	startTunfw(t, topo.Host, cfg)
	dial := func(svc netip.Addr) error {
		c, err := topo.Host.DialTimeout("tcp", hostPort(svc, 9100), 3*time.Second)
		if err == nil {
			t.Cleanup(func() { c.Close() })
		}
		return err
	}
	// The v4 and v6 TUN addresses are two sources.
	for i := 0; i < 3; i++ {
		if err := dial(topo.ServiceV4); err != nil {
			t.Fatalf("v4 connection %d: %v", i+1, err)
		}
	}
	if err := dial(topo.ServiceV4); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("4th flow of one source: %v, want refused (max_flows_per_source)", err)
	}
	if err := dial(topo.ServiceV6); err != nil {
		t.Fatalf("first v6 connection: %v", err)
	}
	if err := dial(topo.ServiceV6); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("5th flow: %v, want refused (max_flows)", err)
	}
	out, _, _ := ctl(t, cfg, "stats", "--json")
	var st struct{ Drops map[string]uint64 }
	json.Unmarshal([]byte(out), &st)
	if st.Drops["limit"] != 2 {
		t.Errorf("limit drops %d, want 2:\n%s", st.Drops["limit"], out)
	}
	if n := len(flowsJSON(t, cfg, "--proto", "tcp", "--state", "established")); n != 4 {
		t.Errorf("%d established flows, want the 4 admitted", n)
	}
}

func TestIdleUDPFlowExpires(t *testing.T) {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	at := netip.AddrPortFrom(topo.ServiceV4, 7000)
	startUDPEcho(t, topo.Server, at)
	cfg := writeConfig(t, observeConfig+"\n[limits]\nudp_idle = \"1s\"\n")
	startTunfw(t, topo.Host, cfg)
	u, err := topo.Host.DialTimeout("udp", at.String(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	u.Write([]byte("hi"))
	u.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := u.Read(make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	sent := time.Now()
	if findFlow(flowsJSON(t, cfg), "udp", at) == nil {
		t.Fatal("UDP flow not listed")
	}
	// Expiry runs once a second: the flow must be gone within 1s + 1s.
	deadline := time.Now().Add(5 * time.Second)
	for findFlow(flowsJSON(t, cfg), "udp", at) != nil {
		if time.Now().After(deadline) {
			t.Fatal("idle UDP flow still listed after 5s with udp_idle = 1s")
		}
		time.Sleep(100 * time.Millisecond) // polling the flow table
	}
	if d := time.Since(sent); d < time.Second {
		t.Errorf("UDP flow expired after %v, before udp_idle", d)
	}
}

func TestMetrics(t *testing.T) {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	at := netip.AddrPortFrom(topo.ServiceV4, 7000)
	startUDPEcho(t, topo.Server, at)
	cfg := writeConfig(t, observeConfig+"\n[metrics]\nlisten = \"127.0.0.1:9477\"\n")
	startTunfw(t, topo.Host, cfg)
	scrape := func() map[string]float64 { return scrapeMetrics(t, topo.Host, "127.0.0.1:9477") }
	before := scrape()
	u, err := topo.Host.DialTimeout("udp", at.String(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	for i := 0; i < 3; i++ {
		u.Write([]byte("hello"))
		u.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := u.Read(make([]byte, 10)); err != nil {
			t.Fatal(err)
		}
	}
	topo.Host.DialTimeout("tcp", hostPort(topo.ServiceV4, 9300), 300*time.Millisecond) // denied
	after := scrape()
	for key, want := range map[string]float64{
		"tunfw_packets_total,verdict=forward":                 3,
		"tunfw_packets_total,verdict=reply":                   3,
		"tunfw_rule_flows_total,action=allow,rule=udp-echo":   1,
		"tunfw_rule_packets_total,action=allow,rule=udp-echo": 6,
		"tunfw_drops_total,reason=denied":                     1,
		"tunfw_bytes_total,direction=in":                      3 * 33,
	} {
		if got := after[key] - before[key]; got < want {
			t.Errorf("%s moved by %v, want at least %v", key, got, want)
		}
	}
	for _, key := range []string{"tunfw_flows,state=established", "tunfw_reloads_total,result=success", "tunfw_tun_errors_total,op=write", "tunfw_control_refused_total"} {
		if _, ok := after[key]; !ok {
			t.Errorf("metric %s missing", key)
		}
	}
	if after["tunfw_flows,state=established"] < 1 {
		t.Errorf("established flows gauge %v, want >= 1", after["tunfw_flows,state=established"])
	}
}

func TestControlSocketRefusesNonRoot(t *testing.T) {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	cfg := writeConfig(t, observeConfig)
	startTunfw(t, topo.Host, cfg)
	sock := filepath.Join(filepath.Dir(cfg), "tunfw.sock")
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode().Perm() != 0o600 || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("control socket %s: %v, mode %v; want a socket with mode 0600", sock, err, fi.Mode())
	}
	asNobody := func() (string, int) {
		cmd := exec.Command(binary, "status", "--socket", sock)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return string(out), code
	}
	// Let nobody reach the socket file: only its mode protects it now.
	os.Chmod(filepath.Dir(sock), 0o755)
	os.Chmod(filepath.Dir(filepath.Dir(sock)), 0o755)
	out, code := asNobody()
	if code != 1 || !strings.Contains(out, "permission denied") {
		t.Errorf("nobody with a 0600 socket: exit %d: %s", code, out)
	}
	// Even if the file mode is opened up, the server checks the peer.
	os.Chmod(sock, 0o666)
	out, code = asNobody()
	if code != 1 || !strings.Contains(out, "only root may use the tunfw control socket") {
		t.Errorf("nobody with a 0666 socket: exit %d: %s", code, out)
	}
	stOut, _, _ := ctl(t, cfg, "stats", "--json")
	if !strings.Contains(stOut, `"control_refused": 1`) {
		t.Errorf("refused request not counted:\n%s", stOut)
	}
}

// scrapeMetrics reads tunfw's /metrics at addr from inside ns, one value
// per series, keyed by name and labels ("name,label=value").
func scrapeMetrics(t *testing.T, ns *netnstest.NS, addr string) map[string]float64 {
	t.Helper()
	resp, err := ns.HTTPClient().Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("metrics are not Prometheus text: %v", err)
	}
	out := make(map[string]float64)
	for name, f := range fams {
		for _, m := range f.GetMetric() {
			key := name
			for _, l := range m.GetLabel() {
				key += fmt.Sprintf(",%s=%s", l.GetName(), l.GetValue())
			}
			switch {
			case m.Counter != nil:
				out[key] = m.Counter.GetValue()
			case m.Gauge != nil:
				out[key] = m.Gauge.GetValue()
			}
		}
	}
	return out
}

// relayGoroutines starts a TCP echo server on the service address's port
// 9100 and a tunfw relaying to it with its metrics on listen, and returns
// the topology and a reader of tunfw's goroutine count (go_goroutines).
func relayGoroutines(t *testing.T, listen string) (*netnstest.Topology, func() float64) {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	startTCPEcho(t, topo.Server, netip.AddrPortFrom(topo.ServiceV4, 9100))
	cfg := writeConfig(t, observeConfig+"\n[metrics]\nlisten = \""+listen+"\"\n")
	startTunfw(t, topo.Host, cfg)
	return topo, func() float64 { return scrapeMetrics(t, topo.Host, listen)["go_goroutines"] }
}

// TestIdleRelaysHoldNoGoroutines checks what keeps idle TCP flows cheap: a
// relay quiet for a while gives up both its goroutines (go_goroutines
// falls back to where it was before the flows), and data in either
// direction afterwards still wakes it and crosses.
func TestIdleRelaysHoldNoGoroutines(t *testing.T) {
	topo, goroutines := relayGoroutines(t, "127.0.0.1:9478")
	svc := topo.ServiceV4
	base := goroutines()

	const n = 100
	conns := make([]net.Conn, n)
	buf := make([]byte, 1)
	for i := range conns {
		c, err := topo.Host.DialTimeout("tcp", hostPort(svc, 9100), 5*time.Second)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		defer c.Close()
		conns[i] = c
		if _, err := c.Write([]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, buf); err != nil || buf[0] != byte(i) {
			t.Fatalf("connection %d: echo %v %v", i, buf, err)
		}
	}
	// 100 flows relayed by goroutines would be 200 more; idle ones hold
	// none. Wait for that (it takes the relays' linger), polling.
	deadline := time.Now().Add(10 * time.Second)
	var g float64
	for g = goroutines(); g > base+10; g = goroutines() {
		if time.Now().After(deadline) {
			t.Fatalf("%v goroutines with %d idle flows, %v before them: idle relays keep goroutines", g, n, base)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("goroutines: %v before, %v with %d idle flows", base, g, n)
	for i, c := range conns {
		msg := []byte{byte(i), 'x'}
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 2)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("connection %d after idling: echo %q, %v", i, got, err)
		}
	}
}

// TestBurstLingersBounded checks the bound on relays that keep their
// goroutine after a burst: connections opened at once, each with one
// exchange, would each hold two goroutines for the relays' full linger
// (100 ms); while more than 128 directions run, a quiet one lingers 10 ms.
// So 50 ms after the burst at most about 128 are left, where unbounded
// every connection of the burst's last 50 ms would still hold two.
func TestBurstLingersBounded(t *testing.T) {
	topo, goroutines := relayGoroutines(t, "127.0.0.1:9479")
	svc := topo.ServiceV4
	base := goroutines()

	const n, workers = 800, 32
	var (
		mu    sync.Mutex
		conns []net.Conn
		errs  []error
		next  atomic.Int32
		wg    sync.WaitGroup
	)
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	start := time.Now()
	for range workers {
		wg.Go(func() {
			buf := make([]byte, 1)
			for next.Add(1) <= n {
				c, err := topo.Host.DialTimeout("tcp", hostPort(svc, 9100), 5*time.Second)
				if err == nil {
					c.SetDeadline(time.Now().Add(5 * time.Second))
					if _, err = c.Write([]byte{'x'}); err == nil {
						_, err = io.ReadFull(c, buf)
					}
				}
				mu.Lock()
				if c != nil {
					conns = append(conns, c)
				}
				if err != nil {
					errs = append(errs, err)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	took := time.Since(start)
	if len(errs) > 0 {
		t.Fatalf("%d of %d connections failed, first: %v", len(errs), n, errs[0])
	}
	// What is measured is how long relays keep their goroutine: this
	// sleep is the interval under test, not a stand-in for an event.
	time.Sleep(50 * time.Millisecond)
	g := goroutines()
	rate := float64(n) / took.Seconds()
	t.Logf("%d connections in %v (%.0f/s); goroutines %v before, %v 50 ms after", n, took.Round(time.Millisecond), rate, base, g)
	// 128 lingering directions, plus the scrape's own and slack for
	// directions that decided on the long linger just as others ended.
	const above = 128 + 32
	if g > base+above {
		t.Fatalf("%v goroutines 50 ms after a burst of %d connections, %v before: more than %v above, so quiet relays kept their goroutines beyond the bound", g, n, base, above)
	}
	// Without the bound, the connections of the burst's last 50 ms
	// would still hold two goroutines each: a burst slower than that
	// cannot tell the two apart, and the test says so.
	if unbounded := 2 * rate * 0.05; unbounded < 1.2*above {
		t.Skipf("the burst ran at %.0f connections/s: an unbounded linger would leave about %.0f goroutines, too few to tell from the bound's %d", rate, unbounded, above)
	}
}

// TestDeviceSettings checks that [tun] mtu and queue_length reach the
// device the kernel shows.
func TestDeviceSettings(t *testing.T) {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	cfg := writeConfig(t, strings.Replace(observeConfig, "[tun]\n", "[tun]\nmtu = 9000\nqueue_length = 1234\n", 1))
	startTunfw(t, topo.Host, cfg)
	out := topo.Host.Run(t, "ip", "-o", "link", "show", "tunfw0")
	for _, want := range []string{" mtu 9000 ", " qlen 1234"} {
		if !strings.Contains(out, want) {
			t.Errorf("tunfw0 shows %q, want %q in it", strings.TrimSpace(out), want)
		}
	}
}
