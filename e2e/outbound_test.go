package e2e

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
)

// TestOutboundFollowsDefaultRoute: without [route] outbound, tunfw's own
// sockets are bound to the default route's interface; when the default
// route moves to another interface (Wi-Fi to Ethernet, say) and the first
// one goes down, new connections and pings through tunfw leave by the new
// one. They kept the interface found at start until a restart.
func TestOutboundFollowsDefaultRoute(t *testing.T) {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	v4 := netip.AddrPortFrom(topo.ServiceV4, 9400)
	v6 := netip.AddrPortFrom(topo.ServiceV6, 9400)
	startTCPEcho(t, topo.Server, v4)
	startTCPEcho(t, topo.Server, v6)
	cfg := writeConfig(t, hardConfig(""))
	fw := startTunfw(t, topo.Host, cfg)
	for _, at := range []netip.AddrPort{v4, v6} {
		if err := tcpEcho(topo.Host, at.String(), 5*time.Second); err != nil {
			t.Fatalf("echo %s before the move: %v", at, err)
		}
	}
	second := "tfl-" + topo.Host.Name[4:]
	netnstest.Link(t, topo.Host, second, []string{"10.97.0.1/24", "fd97::1/64"}, topo.Server, "tfm-"+topo.Host.Name[4:], []string{"10.97.0.2/24", "fd97::2/64"})
	topo.Host.Run(t, "ip", "route", "replace", "default", "via", "10.97.0.2", "dev", second)
	topo.Host.Run(t, "ip", "-6", "route", "replace", "default", "via", "fd97::2", "dev", second)
	fw.waitLog(t, 5*time.Second, "default route moved", "outbound_v4="+second, "outbound_v6="+second)
	topo.Host.Run(t, "ip", "link", "set", topo.HostIf, "down")
	for _, at := range []netip.AddrPort{v4, v6} {
		if err := tcpEcho(topo.Host, at.String(), 5*time.Second); err != nil {
			t.Errorf("echo %s after the default route moved: %v", at, err)
		}
	}
	for _, a := range []netip.Addr{topo.ServiceV4, topo.ServiceV6} {
		if out, err := topo.Host.Cmd("ping", "-c", "1", "-W", "3", a.String()).CombinedOutput(); err != nil {
			t.Errorf("ping %s after the default route moved: %v\n%s", a, err, out)
		}
	}
}

// TestOutboundNeverTheTUN: with include = ["0.0.0.0/0"] (no auto) the TUN
// holds a default route of its own, of a lower metric than the uplink's;
// a route change must not make tunfw bind its own sockets to the TUN,
// which would loop them into itself.
func TestOutboundNeverTheTUN(t *testing.T) {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	at := netip.AddrPortFrom(topo.ServiceV4, 9401)
	startTCPEcho(t, topo.Server, at)
	// The uplink's default route with a DHCP-like metric.
	topo.Host.Run(t, "ip", "route", "del", "default")
	topo.Host.Run(t, "ip", "route", "add", "default", "via", topo.ServerV4.String(), "dev", topo.HostIf, "metric", "100")
	cfg := writeConfig(t, `
[tun]
name = "tunfw0"
mtu = 1500
addresses = ["198.18.0.1/30"]
[route]
include = ["0.0.0.0/0"]
`)
	fw := startTunfw(t, topo.Host, cfg)
	if err := tcpEcho(topo.Host, at.String(), 5*time.Second); err != nil {
		t.Fatalf("echo through tunfw: %v", err)
	}
	// Any route change makes tunfw look at the default routes again.
	topo.Host.Run(t, "ip", "route", "add", "192.0.2.0/24", "via", topo.ServerV4.String(), "dev", topo.HostIf)
	topo.Host.Run(t, "ip", "route", "del", "192.0.2.0/24")
	if err := tcpEcho(topo.Host, at.String(), 5*time.Second); err != nil {
		t.Errorf("echo through tunfw after a route change: %v", err)
	}
	if strings.Contains(fw.log(), "outbound_v4=tunfw0") {
		t.Errorf("tunfw bound its own sockets to the TUN:\n%s", fw.log())
	}
}
