package e2e

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
	"golang.org/x/sys/unix"
)

// A gateway client on a 1500-byte link moves bulk data through tunfw in
// both directions, byte for byte, and offloads carry it: the client's
// trains of segments reach the netstack whole (the flow's packets in
// average more than the link's MTU), and the netstack's large segments
// are cut by the kernel (TSO), not by the netstack (the same, out).
func TestGatewayOffloads(t *testing.T) {
	topo := newCaptureTopo(t)
	client, lanIf := addGatewayClient(t, topo.Host)
	cfg := writeConfig(t, fmt.Sprintf(gatewayConfig, lanIf))
	startTunfw(t, topo.Host, cfg)
	for _, svc := range []netip.Addr{topo.ServiceV4, topo.ServiceV6} {
		t.Run(map[bool]string{false: "v4", true: "v6"}[svc.Is6()], func(t *testing.T) {
			at := netip.AddrPortFrom(svc, 9300)
			startTCPEcho(t, topo.Server, at)
			c, err := client.DialTimeout("tcp", at.String(), 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			const size = 16 << 20
			data := make([]byte, size)
			rng := rand.New(rand.NewPCG(1, uint64(svc.BitLen())))
			for i := range data {
				data[i] = byte(rng.Uint32())
			}
			c.SetDeadline(time.Now().Add(60 * time.Second))
			sent := make(chan error, 1)
			go func() {
				_, err := c.Write(data)
				sent <- err
			}()
			got := make([]byte, size)
			if _, err := io.ReadFull(c, got); err != nil {
				t.Fatalf("read the echo: %v", err)
			}
			if err := <-sent; err != nil {
				t.Fatalf("send: %v", err)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("the echo of %d bytes differs from what was sent (first at %d)", size, firstDiff(got, data))
			}
			f := findFlow(flowsJSON(t, cfg, "--proto", "tcp"), "tcp", at)
			if f == nil {
				t.Fatal("no flow listed for the transfer")
			}
			in, out := float64(f.BytesIn)/float64(f.PacketsIn), float64(f.BytesOut)/float64(f.PacketsOut)
			t.Logf("client->server %d bytes in %d packets (%.0f each), server->client %d in %d (%.0f)", f.BytesIn, f.PacketsIn, in, f.BytesOut, f.PacketsOut, out)
			if f.BytesIn < size || f.BytesOut < size {
				t.Fatalf("flow counted %d bytes in, %d out; want at least %d each way", f.BytesIn, f.BytesOut, size)
			}
			if in <= 1500 {
				t.Errorf("client->server packets average %.0f bytes: the link's segments reached the netstack one by one", in)
			}
			if out <= 1500 {
				t.Errorf("server->client packets average %.0f bytes: the netstack cut its segments itself", out)
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// A UDP sender using segmentation offload (UDP_SEGMENT: one send, several
// datagrams, which the kernel hands the TUN as one packet) has each of its
// datagrams forwarded on its own, with its own length and bytes.
func TestUDPSegmentationOffload(t *testing.T) {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	cfg := writeConfig(t, coreConfig)
	startTunfw(t, topo.Host, cfg)
	for _, svc := range []netip.Addr{topo.ServiceV4, topo.ServiceV6} {
		t.Run(map[bool]string{false: "v4", true: "v6"}[svc.Is6()], func(t *testing.T) {
			at := netip.AddrPortFrom(svc, 7300)
			srv, err := topo.Server.ListenPacket("udp", at.String())
			if err != nil {
				t.Fatal(err)
			}
			defer srv.Close()
			c, err := topo.Host.Dial("udp", at.String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			const seg = 1000
			payload := make([]byte, 3*seg+500)
			for i := range payload {
				payload[i] = byte(i * 13)
			}
			rc, err := c.(*net.UDPConn).SyscallConn()
			if err != nil {
				t.Fatal(err)
			}
			var serr error
			if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_SEGMENT, seg) }); err != nil || serr != nil {
				t.Fatalf("UDP_SEGMENT: %v %v", err, serr)
			}
			if _, err := c.Write(payload); err != nil {
				t.Fatalf("send %d bytes in segments of %d: %v", len(payload), seg, err)
			}
			srv.SetReadDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 65536)
			for i := range 4 {
				n, _, err := srv.ReadFrom(buf)
				if err != nil {
					t.Fatalf("datagram %d: %v", i, err)
				}
				want := payload[i*seg : min((i+1)*seg, len(payload))]
				if !bytes.Equal(buf[:n], want) {
					t.Fatalf("datagram %d: %d bytes, want %d bytes of the send's segment %d", i, n, len(want), i)
				}
			}
		})
	}
}
