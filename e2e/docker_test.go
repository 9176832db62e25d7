package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
)

// TestDockerImage builds the repository's Dockerfile and runs the image
// as a container with NET_ADMIN and /dev/net/tun (not --privileged) that
// polices its own egress.
//
// dockerd runs inside the test's host namespace (nsenter --net) and a
// private mount namespace (unshare -m), with its own data root, exec root,
// pidfile and socket under a temp dir, and --iptables=false
// --ip6tables=false --bridge=none --ip-forward=false: it never touches the
// root namespace's network, and its mounts vanish with it. The container
// gets its own namespace on a bridge network inside the host namespace,
// which forwards to the server namespace.
func TestDockerImage(t *testing.T) {
	netnstest.RequireRoot(t)
	const dockerd, docker = "/usr/sbin/dockerd", "/usr/bin/docker"
	for _, p := range []string{dockerd, docker} {
		if _, err := os.Stat(p); err != nil {
			t.Skipf("Debian's docker.io is not installed (%s: %v); .ci/run installs it", p, err)
		}
	}
	for _, p := range []string{"unshare", "nsenter"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s (util-linux) not found: %v", p, err)
		}
	}
	topo := newCaptureTopo(t)
	host := topo.Host
	suffix := host.Name[4:]
	const subnet = "172.30.0.0/24"
	host.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	topo.Server.Run(t, "ip", "route", "add", subnet, "via", topo.HostV4.String())

	dir := t.TempDir()
	ctx := filepath.Join(dir, "ctx")
	if err := os.MkdirAll(filepath.Join(ctx, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	build := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(ctx, "bin", "tunfw"), "../cmd/tunfw")
	build.Env = shippedBuildEnv()
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("static build: %v\n%s", err, out)
	}
	for _, f := range []string{"Dockerfile", ".dockerignore", "config.toml"} {
		b, err := os.ReadFile(filepath.Join("..", f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(ctx, f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	sock := filepath.Join(dir, "docker.sock")
	logf, err := os.Create(filepath.Join(dir, "dockerd.log"))
	if err != nil {
		t.Fatal(err)
	}
	// dockerd and the containerd it starts keep their state under /run:
	// in their own mount namespace they get a fresh /run (mounted once
	// nsenter has opened the network namespace's file under the old one),
	// so the machine's /run is left as it was.
	d := exec.Command("unshare", "-m", "--propagation", "private",
		"nsenter", "--net=/run/netns/"+host.Name,
		"sh", "-c", `mount -t tmpfs -o mode=0755 tmpfs /run && exec "$@"`, "sh",
		dockerd, "--data-root", filepath.Join(dir, "data"), "--exec-root", filepath.Join(dir, "exec"),
		"--pidfile", filepath.Join(dir, "dockerd.pid"), "-H", "unix://"+sock,
		"--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none",
		"--storage-driver=vfs")
	d.Stdout, d.Stderr = logf, logf
	if err := d.Start(); err != nil {
		t.Fatalf("start dockerd: %v", err)
	}
	dockerdDone := make(chan struct{})
	go func() { d.Wait(); close(dockerdDone) }()
	t.Cleanup(func() {
		// unshare, nsenter and sh exec, so this PID is dockerd itself.
		d.Process.Signal(syscall.SIGTERM)
		select {
		case <-dockerdDone:
		case <-time.After(20 * time.Second):
			d.Process.Kill()
			<-dockerdDone
			t.Errorf("dockerd did not stop within 20s of SIGTERM")
		}
		logf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("dockerd log:\n%s", b)
		}
		// Its mounts lived in its private mount namespace; make sure.
		if m, err := os.ReadFile("/proc/self/mounts"); err == nil && bytes.Contains(m, []byte(dir)) {
			for _, l := range strings.Split(string(m), "\n") {
				if f := strings.Fields(l); len(f) > 1 && strings.HasPrefix(f[1], dir) {
					syscall.Unmount(f[1], syscall.MNT_DETACH)
				}
			}
			t.Errorf("dockerd left mounts under %s", dir)
		}
	})
	dk := func(args ...string) (string, error) {
		c := exec.Command(docker, append([]string{"-H", "unix://" + sock}, args...)...)
		c.Env = append(os.Environ(), "DOCKER_BUILDKIT=0")
		out, err := c.CombinedOutput()
		if err != nil {
			return string(out), fmt.Errorf("docker %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return strings.TrimSpace(string(out)), nil
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := dk("version"); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("dockerd not ready after 30s: %v", err)
		}
		select {
		case <-dockerdDone:
			b, _ := os.ReadFile(logf.Name())
			t.Skipf("dockerd cannot run here: it exited at start:\n%s", b)
		case <-time.After(200 * time.Millisecond):
		}
	}

	if out, err := dk("build", "-q", "-t", "tunfw-e2e:test", ctx); err != nil {
		t.Fatalf("image build: %v", err)
	} else {
		t.Logf("image %s", out)
	}
	if out, err := dk("image", "inspect", "-f", "{{.Size}}", "tunfw-e2e:test"); err == nil {
		t.Logf("image size %s bytes", out)
	}
	if _, err := dk("network", "create", "--subnet", subnet, "-o", "com.docker.network.bridge.name=tfr-"+suffix, "tfnet"); err != nil {
		t.Fatal(err)
	}
	cfg := captureCfg(t, "open")
	if err := os.Chmod(cfg, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		dk("rm", "-f", "tfw")
		dk("network", "rm", "tfnet")
	})
	if _, err := dk("run", "-d", "--name", "tfw", "--network", "tfnet",
		"--cap-drop", "ALL", "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW", "--device", "/dev/net/tun",
		"-v", cfg+":/etc/tunfw/config.toml:ro",
		"tunfw-e2e:test", "up", "--log-level", "debug"); err != nil {
		t.Fatal(err)
	}
	logs := func() string { out, _ := dk("logs", "tfw"); return out }
	deadline = time.Now().Add(30 * time.Second)
	for !strings.Contains(logs(), `msg="tunfw is up"`) {
		if time.Now().After(deadline) {
			t.Fatalf("containerized tunfw not up after 30s:\n%s", logs())
		}
		time.Sleep(100 * time.Millisecond)
	}
	pid, err := dk("inspect", "-f", "{{.State.Pid}}", "tfw")
	if err != nil {
		t.Fatal(err)
	}
	// Name the container's namespace so the test can open sockets in it.
	cnt := &netnstest.NS{Name: "tfk-" + suffix}
	if out, err := exec.Command("ip", "netns", "attach", cnt.Name, pid).CombinedOutput(); err != nil {
		t.Fatalf("ip netns attach: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", cnt.Name).Run() })
	if n, err := strconv.Atoi(pid); err == nil {
		checkCaps(t, n) // hardening_test.go: NET_ADMIN and NET_RAW only
	}

	svc := topo.ServiceV4
	if err := tcpEcho(cnt, hostPort(svc, 9100), 5*time.Second); err != nil {
		t.Errorf("allowed TCP from the container: %v\n%s", err, logs())
	}
	if err := tcpEcho(cnt, hostPort(svc, 9001), 1200*time.Millisecond); !isTimeout(err) {
		t.Errorf("denied TCP from the container: %v, want a timeout", err)
	}
	if err := tcpEcho(cnt, hostPort(svc, 9002), 5*time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("rejected TCP from the container: %v, want connection refused", err)
	}
	if got, err := udpEcho(cnt, hostPort(svc, 7000)); err != nil || string(got) != "ping" {
		t.Errorf("allowed UDP from the container: %q, %v", got, err)
	}
	l := logs()
	for _, want := range []string{"verdict=allow", "verdict=deny rule=deny-tcp", "verdict=reject rule=reject-tcp", "dst=" + netip.AddrPortFrom(svc, 9001).String()} {
		if !strings.Contains(l, want) {
			t.Errorf("container log lacks %q:\n%s", want, l)
		}
	}
	// docker stop sends SIGTERM: a clean exit.
	if _, err := dk("stop", "-t", "10", "tfw"); err != nil {
		t.Fatal(err)
	}
	if code, _ := dk("inspect", "-f", "{{.State.ExitCode}}", "tfw"); code != "0" {
		t.Errorf("exit code after docker stop = %s, want 0\n%s", code, logs())
	}
}
