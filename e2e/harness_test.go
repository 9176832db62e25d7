// Package e2e runs the tunfw binary in network namespaces the tests create,
// and drives real clients and servers through it. The tests need root and
// /dev/net/tun; without them they skip and say why.
package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
)

// binary is the tunfw binary built once for all tests.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "tunfw-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	// Others than root run the binary in some tests.
	os.Chmod(dir, 0o755)
	binary = filepath.Join(dir, "tunfw")
	// CGO_ENABLED=0 as `make build` and the image: only such a binary
	// drops its capabilities once up (cmd/tunfw/caps.go), so every test
	// runs tunfw as it ships. A run under GOFLAGS=-race builds it with
	// cgo, which the race detector needs; that tunfw keeps its
	// capabilities (a warning in its log). The capability and image tests
	// build their own binary as shipped (shippedBuildEnv).
	cgo := "CGO_ENABLED=0"
	if raceRequested() {
		cgo = "CGO_ENABLED=1"
	}
	bc := exec.Command("go", "build", "-o", binary, "../cmd/tunfw")
	bc.Env = append(os.Environ(), cgo)
	out, err := bc.CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build tunfw: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(2)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// tunfwProc is a running `tunfw up`.
type tunfwProc struct {
	t    testing.TB
	cmd  *exec.Cmd
	done chan struct{}
	err  error // Wait's result, valid after done

	mu    sync.Mutex
	lines []string
	subs  []chan string
}

// writeConfig writes a config file for a test and returns its path.
func writeConfig(t testing.TB, body string) string {
	t.Helper()
	dir := t.TempDir()
	p := filepath.Join(dir, "config.toml")
	if !strings.Contains(body, "[control]") {
		// Each test's tunfw gets its own control socket, never the
		// machine's default one.
		body += fmt.Sprintf("\n[control]\nsocket = %q\n", filepath.Join(dir, "tunfw.sock"))
	}
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// startTunfw runs `tunfw up -c cfg` inside ns and waits until it says it is
// up. The process gets SIGTERM at cleanup if still running.
func startTunfw(t testing.TB, ns *netnstest.NS, cfg string, extra ...string) *tunfwProc {
	t.Helper()
	args := append([]string{binary, "up", "-c", cfg, "--log-level", "debug"}, extra...)
	return startUp(t, ns.Cmd(args...))
}

// startUp starts cmd, a `tunfw up` (perhaps wrapped in something that
// execs it), and waits until tunfw says it is up.
func startUp(t testing.TB, cmd *exec.Cmd) *tunfwProc {
	t.Helper()
	p := &tunfwProc{t: t, cmd: cmd, done: make(chan struct{})}
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	p.cmd.Stdout = p.cmd.Stderr
	up := p.subscribe()
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start tunfw: %v", err)
	}
	go p.readLog(stderr)
	t.Cleanup(func() {
		p.stop()
		// Under GOFLAGS=-race the binary reports races on stderr.
		if strings.Contains(p.log(), "DATA RACE") {
			t.Errorf("tunfw reported a data race")
		}
		if t.Failed() {
			t.Logf("tunfw log:\n%s", p.log())
		}
	})
	timeout := time.After(30 * time.Second)
	for {
		select {
		case l, ok := <-up:
			if !ok {
				<-p.done
				t.Fatalf("tunfw exited before it was up (%v):\n%s", p.err, p.log())
			}
			if strings.Contains(l, `msg="tunfw is up"`) || strings.Contains(l, `"msg":"tunfw is up"`) {
				return p
			}
		case <-timeout:
			t.Fatalf("tunfw not up after 30s:\n%s", p.log())
		}
	}
}

func (p *tunfwProc) readLog(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		p.mu.Lock()
		p.lines = append(p.lines, l)
		for _, c := range p.subs {
			select {
			case c <- l:
			default:
			}
		}
		p.mu.Unlock()
	}
	p.err = p.cmd.Wait()
	p.mu.Lock()
	for _, c := range p.subs {
		close(c)
	}
	p.subs = nil
	p.mu.Unlock()
	close(p.done)
}

// subscribe returns a channel of the log lines written from now on; it is
// closed when the process exits.
func (p *tunfwProc) subscribe() chan string {
	c := make(chan string, 1024)
	p.mu.Lock()
	p.subs = append(p.subs, c)
	p.mu.Unlock()
	return c
}

func (p *tunfwProc) log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.lines, "\n")
}

// stop sends SIGTERM and waits for the exit; it returns the exit code.
func (p *tunfwProc) stop() int {
	select {
	case <-p.done:
	default:
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(20 * time.Second):
			p.cmd.Process.Kill()
			<-p.done
			p.t.Errorf("tunfw did not exit within 20s of SIGTERM")
		}
	}
	return p.cmd.ProcessState.ExitCode()
}

// waitLog waits until a log line containing all of parts appears (also
// among lines already written).
func (p *tunfwProc) waitLog(t testing.TB, d time.Duration, parts ...string) string {
	t.Helper()
	c := p.subscribe()
	match := func(l string) bool {
		for _, s := range parts {
			if !strings.Contains(l, s) {
				return false
			}
		}
		return true
	}
	p.mu.Lock()
	for _, l := range p.lines {
		if match(l) {
			p.mu.Unlock()
			return l
		}
	}
	p.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	for {
		select {
		case l, ok := <-c:
			if !ok {
				t.Fatalf("tunfw exited while waiting for a log line with %q", parts)
			}
			if match(l) {
				return l
			}
		case <-ctx.Done():
			t.Fatalf("no log line with %q within %v", parts, d)
		}
	}
}

// raceRequested reports whether GOFLAGS asks for the race detector.
func raceRequested() bool {
	for _, f := range strings.Fields(os.Getenv("GOFLAGS")) {
		if t := strings.TrimLeft(f, "-"); t == "race" || t == "race=true" {
			return true
		}
	}
	return false
}

// shippedBuildEnv is the environment of a build of tunfw as `make build`
// and the image make it: CGO_ENABLED=0 and no race detector, whatever
// GOFLAGS the tests run with.
func shippedBuildEnv() []string {
	env := append(os.Environ(), "CGO_ENABLED=0")
	if !raceRequested() {
		return env
	}
	var kept []string
	for _, f := range strings.Fields(os.Getenv("GOFLAGS")) {
		if t := strings.TrimLeft(f, "-"); t != "race" && !strings.HasPrefix(t, "race=") {
			kept = append(kept, f)
		}
	}
	return append(env, "GOFLAGS="+strings.Join(kept, " "))
}
