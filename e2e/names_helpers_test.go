package e2e

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
)

// The client addresses tunfw's TUN gives the Host namespace's traffic
// (namesBase's [tun] addresses): the source of every flow it sees.
var (
	namesClientV4 = netip.MustParseAddr("198.18.0.1")
	namesClientV6 = netip.MustParseAddr("fd54:756e:6677::1")
)

// namesBase is the [tun] and [route] part of the configs of the name
// tests: the Server's documentation prefixes go through tunfw.
const namesBase = `
[tun]
addresses = ["198.18.0.1/30", "fd54:756e:6677::1/126"]
[route]
include = ["203.0.113.0/24", "2001:db8:99::/48"]
`

// clientAddr is the TUN address the Host's flows to svc come from.
func clientAddr(svc netip.Addr) netip.Addr {
	if svc.Is6() {
		return namesClientV6
	}
	return namesClientV4
}

// famName names svc's address family for subtests.
func famName(svc netip.Addr) string {
	if svc.Is6() {
		return "v6"
	}
	return "v4"
}

// addServerAddr puts a on the Server's lo, for a service of its own.
func addServerAddr(t *testing.T, topo *netnstest.Topology, a netip.Addr) {
	t.Helper()
	args := []string{"ip", "addr", "add", netip.PrefixFrom(a, a.BitLen()).String(), "dev", "lo"}
	if a.Is6() {
		args = append(args, "nodad")
	}
	topo.Server.Run(t, args...)
}

// testCA is one certificate authority that signs a certificate per name,
// so clients can verify every server certificate against it.
type testCA struct {
	cert    *x509.Certificate
	key     *ecdsa.PrivateKey
	pool    *x509.CertPool
	pemPath string // the CA certificate as PEM, for curl --cacert
	leaves  map[string]*tls.Certificate
}

func newTestCA(t *testing.T, names ...string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "tunfw e2e test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	ca := &testCA{cert: cert, key: key, pool: x509.NewCertPool(), leaves: map[string]*tls.Certificate{}}
	ca.pool.AddCert(cert)
	ca.pemPath = filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca.pemPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	for i, n := range names {
		ca.leaves[n] = ca.leaf(t, int64(i+2), n)
	}
	return ca
}

func (ca *testCA) leaf(t *testing.T, serial int64, name string) *tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: name},
		DNSNames:     []string{name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// serverTLS is the servers' TLS config: each name's own certificate, by
// server_name.
func (ca *testCA) serverTLS(protos ...string) *tls.Config {
	return &tls.Config{
		NextProtos: protos,
		GetCertificate: func(hi *tls.ClientHelloInfo) (*tls.Certificate, error) {
			if c, ok := ca.leaves[hi.ServerName]; ok {
				return c, nil
			}
			return nil, fmt.Errorf("no certificate for %q", hi.ServerName)
		},
	}
}

// countingListener counts the connections it accepted: a server's view
// of which connections reached it.
type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// webServer is an HTTPS server on port 443 and an HTTP server on port 80
// of one address, serving every name of its CA there (the certificate
// chosen by server_name), and counting the TCP connections each port
// accepted: the server's view of which connections reached it.
type webServer struct {
	tlsN, plainN atomic.Int64
}

func startWebServer(t *testing.T, ns *netnstest.NS, addr netip.Addr, ca *testCA) *webServer {
	t.Helper()
	w := &webServer{}
	handler := http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		scheme := "http"
		if r.TLS != nil {
			scheme = "https"
		}
		fmt.Fprintf(rw, "hello %s over %s\n", r.Host, scheme)
	})
	for _, port := range []uint16{443, 80} {
		at := netip.AddrPortFrom(addr, port)
		ln, err := ns.Listen("tcp", at.String())
		if err != nil {
			t.Fatalf("listen %s: %v", at, err)
		}
		srv := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second, ErrorLog: discardLog()}
		if port == 443 {
			ln = tls.NewListener(countingListener{ln, &w.tlsN}, ca.serverTLS("http/1.1"))
		} else {
			ln = countingListener{ln, &w.plainN}
		}
		go srv.Serve(ln)
		t.Cleanup(func() { srv.Close() })
	}
	return w
}

// curlResult is one curl run: its stdout+stderr, exit code and duration.
type curlResult struct {
	out  string
	code int
	took time.Duration
}

func (r curlResult) String() string {
	return fmt.Sprintf("exit %d after %v: %s", r.code, r.took.Round(time.Millisecond), strings.TrimSpace(r.out))
}

// runCurl runs curl in ns with args (never through a proxy).
func runCurl(t *testing.T, ns *netnstest.NS, args ...string) curlResult {
	t.Helper()
	cmd := ns.Cmd(append([]string{"curl", "-sS", "--noproxy", "*"}, args...)...)
	start := time.Now()
	out, err := cmd.CombinedOutput()
	r := curlResult{out: string(out), took: time.Since(start)}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	case err != nil:
		t.Fatalf("run curl: %v", err)
	}
	return r
}

// curlResolve is curl's --resolve for name:port at a (IPv6 in brackets).
func curlResolve(name string, port uint16, a netip.Addr) string {
	h := a.String()
	if a.Is6() {
		h = "[" + h + "]"
	}
	return fmt.Sprintf("%s:%d:%s", name, port, h)
}

// curl exit codes: what a client sees when a peeked flow is refused.
const (
	curlCouldntConnect = 7
	curlTimeout        = 28
	curlSSLConnect     = 35
	curlEmptyReply     = 52
	curlRecvError      = 56
)

// isResetCode reports whether a curl exit code is what a reset gives: a
// refused connect, a TLS handshake or a read cut short.
func isResetCode(code int) bool {
	switch code {
	case curlCouldntConnect, curlSSLConnect, curlEmptyReply, curlRecvError:
		return true
	}
	return false
}

// sshPort is a server-first port: tunfw cannot wait for the client's
// first bytes there (the client waits for the server's), so such flows
// are judged on their first packet, by the name DNS gave.
const sshPort = 22

// sshBanner is what the server on sshPort says first.
const sshBanner = "SSH-2.0-tunfw-e2e\r\n"

// tcpServer is a TCP server that counts the connections it accepted: an
// echo server, or on sshPort one that speaks first, as SSH does, then
// echoes.
type tcpServer struct {
	n atomic.Int64
}

func startTCPServer(t *testing.T, ns *netnstest.NS, at netip.AddrPort) *tcpServer {
	t.Helper()
	s := &tcpServer{}
	ln, err := ns.Listen("tcp", at.String())
	if err != nil {
		t.Fatalf("listen %s: %v", at, err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.n.Add(1)
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(20 * time.Second))
				if at.Port() == sshPort {
					io.WriteString(c, sshBanner)
				}
				io.Copy(c, c)
			}()
		}
	}()
	return s
}

// talkThrough connects from ns to at and, within d, has one line echoed
// or, on sshPort, reads the banner the server sends first. It says what
// failed: the connect, or the exchange (a peeked flow that is then denied
// connects, since tunfw completed the handshake, and hears nothing back).
func talkThrough(ns *netnstest.NS, at netip.AddrPort, d time.Duration) error {
	c, err := ns.DialTimeout("tcp", at.String(), d)
	if err != nil {
		return fmt.Errorf("connect %s: %w", at, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(d))
	r := bufio.NewReader(c)
	if at.Port() == sshPort {
		got, err := r.ReadString('\n')
		if err != nil || got != sshBanner {
			return fmt.Errorf("banner from %s: %q, %v; want %q", at, got, err, sshBanner)
		}
		return nil
	}
	msg := "ping " + at.String() + "\n"
	if _, err := io.WriteString(c, msg); err != nil {
		return fmt.Errorf("write to %s: %w", at, err)
	}
	got, err := r.ReadString('\n')
	if err != nil {
		return fmt.Errorf("echo from %s: %w", at, err)
	}
	if got != msg {
		return fmt.Errorf("echo from %s: %q, want %q", at, got, msg)
	}
	return nil
}

// nameFlow is a `tunfw flows --json` entry with the fields of flows by
// name.
type nameFlow struct {
	Proto    string         `json:"proto"`
	Src      netip.AddrPort `json:"src"`
	Dst      netip.AddrPort `json:"dst"`
	State    string         `json:"state"`
	Rule     string         `json:"rule"`
	Verdict  string         `json:"verdict"`
	Name     string         `json:"name"`
	NameFrom string         `json:"name_from"`
}

func nameFlows(t *testing.T, cfg string, filters ...string) []nameFlow {
	t.Helper()
	out, errOut, code := ctl(t, cfg, append([]string{"flows", "--json"}, filters...)...)
	if code != 0 {
		t.Fatalf("tunfw flows %v: exit %d: %s", filters, code, errOut)
	}
	var flows []nameFlow
	if err := json.Unmarshal([]byte(out), &flows); err != nil {
		t.Fatalf("flows --json: %v\n%s", err, out)
	}
	return flows
}

// findNameFlow returns the first flow of proto to dst, if any.
func findNameFlow(flows []nameFlow, proto string, dst netip.AddrPort) *nameFlow {
	for i := range flows {
		if flows[i].Proto == proto && flows[i].Dst == dst {
			return &flows[i]
		}
	}
	return nil
}

// explanation is `tunfw explain --json`'s output.
type explanation struct {
	Rules []struct {
		Rule    string `json:"rule"`
		Index   int    `json:"index"`
		Action  string `json:"action"`
		Matched bool   `json:"matched"`
		Why     string `json:"why"`
	} `json:"rules"`
	Verdict  string `json:"verdict"`
	Rule     string `json:"rule"`
	Peek     bool   `json:"peek"`
	Name     string `json:"name"`
	NameFrom string `json:"name_from"`
}

// runExplain runs `tunfw explain` with args (which say -c FILE or
// --socket PATH) and returns stdout; a failure fails the test.
func runExplain(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command(binary, append([]string{"explain"}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("tunfw explain %v: %v\n%s%s", args, err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

func explainJSON(t *testing.T, args ...string) explanation {
	t.Helper()
	out := runExplain(t, append([]string{"--json"}, args...)...)
	var ex explanation
	if err := json.Unmarshal([]byte(out), &ex); err != nil {
		t.Fatalf("explain --json %v: %v\n%s", args, err, out)
	}
	return ex
}

// socketOf is the control socket writeConfig gives cfg.
func socketOf(cfg string) string { return filepath.Join(filepath.Dir(cfg), "tunfw.sock") }

// dnsServer is a dnsmasq in the Server namespace: a real DNS server whose
// log shows every query that reached it.
type dnsServer struct {
	cmd  *exec.Cmd
	done chan struct{}
	mu   sync.Mutex
	log  []string
}

// startDnsmasq runs dnsmasq in ns on port 53 of addrs, answering only
// from records (args: --host-record, --cname, ...), with no upstream. It
// waits until dnsmasq answers there.
func startDnsmasq(t *testing.T, ns *netnstest.NS, addrs []netip.Addr, records ...string) *dnsServer {
	t.Helper()
	if _, err := exec.LookPath("dnsmasq"); err != nil {
		t.Skip("dnsmasq not installed (apt-get install dnsmasq-base)")
	}
	args := []string{"dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
		"--no-poll", "--pid-file=", "--bind-interfaces", "--port=53", "--log-queries=extra", "--log-facility=-",
		"--local-ttl=2", "--auth-ttl=2", "--neg-ttl=2", "--cache-size=0"}
	for _, a := range addrs {
		args = append(args, "--listen-address="+a.String())
	}
	args = append(args, records...)
	d := &dnsServer{cmd: ns.Cmd(args...), done: make(chan struct{})}
	stderr, err := d.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	d.cmd.Stdout = d.cmd.Stderr
	if err := d.cmd.Start(); err != nil {
		t.Fatalf("start dnsmasq: %v", err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			d.mu.Lock()
			d.log = append(d.log, sc.Text())
			d.mu.Unlock()
		}
		d.cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(func() {
		d.cmd.Process.Kill()
		<-d.done
		if t.Failed() {
			t.Logf("dnsmasq log:\n%s", d.logText())
		}
	})
	// Up when it answers, on each address, straight from the Server.
	for _, a := range addrs {
		deadline := time.Now().Add(10 * time.Second)
		for {
			r := dig(t, ns, a, "ready.invalid", "A")
			if r.status != "" {
				break
			}
			select {
			case <-d.done:
				t.Fatalf("dnsmasq exited:\n%s", d.logText())
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("dnsmasq not answering on %s after 10s:\n%s\n%s", a, r.out, d.logText())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return d
}

func (d *dnsServer) logText() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return strings.Join(d.log, "\n")
}

// queries counts the queries for name (any type) that reached dnsmasq.
func (d *dnsServer) queries(name string) int {
	re := regexp.MustCompile(`query\[[A-Z0-9]+\] ` + regexp.QuoteMeta(name) + ` from `)
	return len(re.FindAllString(d.logText(), -1))
}

// waitQueries waits until at least n queries for name reached dnsmasq.
func (d *dnsServer) waitQueries(t *testing.T, name string, n int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for d.queries(name) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d queries for %s reached dnsmasq within %v, want %d:\n%s", d.queries(name), name, within, n, d.logText())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// digResult is what dig printed: the response code and the answer
// section's records.
type digResult struct {
	status  string   // NOERROR, NXDOMAIN, ...; "" when no response came
	answers []string // "name TTL IN TYPE data", fields single-spaced
	out     string
}

// addrs returns the addresses of the A and AAAA records of the answer.
func (r digResult) addrs() []netip.Addr {
	var as []netip.Addr
	for _, a := range r.answers {
		f := strings.Fields(a)
		if len(f) == 5 && (f[3] == "A" || f[3] == "AAAA") {
			if ip, err := netip.ParseAddr(f[4]); err == nil {
				as = append(as, ip)
			}
		}
	}
	return as
}

var digStatus = regexp.MustCompile(`status: ([A-Z]+)`)

// dig asks server (over its address family) for name's records of type
// qtype, from ns, once, waiting at most 2 s.
func dig(t *testing.T, ns *netnstest.NS, server netip.Addr, name, qtype string, opts ...string) digResult {
	t.Helper()
	args := append([]string{"@" + server.String(), "-p", "53", "+tries=1", "+time=2"}, opts...)
	out, _ := ns.Cmd(append([]string{"dig"}, append(args, name, qtype)...)...).CombinedOutput()
	r := digResult{out: string(out)}
	if m := digStatus.FindStringSubmatch(r.out); m != nil {
		r.status = m[1]
	}
	inAnswer := false
	for _, l := range strings.Split(r.out, "\n") {
		switch {
		case strings.HasPrefix(l, ";; ANSWER SECTION:"):
			inAnswer = true
		case inAnswer && (l == "" || strings.HasPrefix(l, ";")):
			inAnswer = false
		case inAnswer:
			r.answers = append(r.answers, strings.Join(strings.Fields(l), " "))
		}
	}
	return r
}

// discardLog is a server's error log that says nothing: clients that
// tunfw cuts off make servers complain, as they should.
func discardLog() *log.Logger { return log.New(io.Discard, "", 0) }
