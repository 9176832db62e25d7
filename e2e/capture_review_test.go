package e2e

import (
	"fmt"
	"net/netip"
	"syscall"
	"testing"
	"time"
)

// Review of host capture (issue 11).

// TestCaptureGuardRefresh: with fail = "open" the output filter depends on
// an element tunfw refreshes every second. A tunfw that was stalled for
// longer than the element lives (SIGSTOP for 7 s) refuses bound sockets
// again once it runs; and when the refresh fails (the table was deleted
// by hand) the log says so.
func TestCaptureGuardRefresh(t *testing.T) {
	requireNft(t)
	topo := newCaptureTopo(t)
	host := topo.Host
	startHTTP(t, topo.Server, netip.AddrPortFrom(topo.ServiceV4, 8080))
	url := urlOf(topo.ServiceV4, 8080)
	bound := func() (int, string) {
		rc, out, _ := curlAs(host, "--interface", topo.HostIf, url)
		return rc, out
	}
	cfg := captureCfg(t, "open")
	fw := startTunfw(t, host, cfg)
	if rc, out := bound(); rc != 7 {
		t.Fatalf("bound curl while tunfw runs: rc %d, want 7\n%s", rc, out)
	}
	fw.cmd.Process.Signal(syscall.SIGSTOP)
	stopped := true
	t.Cleanup(func() {
		if stopped {
			fw.cmd.Process.Signal(syscall.SIGCONT)
		}
	})
	// The element times out 5 s after the last refresh.
	if err := eventually(8*time.Second, func() error {
		if rc, out := bound(); rc != 0 {
			return fmt.Errorf("rc %d: %s", rc, out)
		}
		return nil
	}); err != nil {
		t.Fatalf("tunfw stopped: the element did not time out: bound curl %v", err)
	}
	fw.cmd.Process.Signal(syscall.SIGCONT)
	stopped = false
	if err := eventually(3*time.Second, func() error {
		if rc, out := bound(); rc != 7 {
			return fmt.Errorf("rc %d: %s", rc, out)
		}
		return nil
	}); err != nil {
		t.Errorf("tunfw running again after a stall: bound sockets are not refused again: %v", err)
	}
	host.Run(t, "nft", "delete", "table", "inet", "tunfw")
	fw.waitLog(t, 5*time.Second, "cannot refresh the nftables table")
}
