package e2e

import (
	endian "encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/tunfw/tunfw/internal/netnstest"
	"golang.org/x/sys/unix"
)

// TestUDPLengthTrims: bytes past the UDP header's length, inside the IP
// packet, are not part of the datagram; the destination gets the datagram
// the UDP length says, as the kernel would deliver it (they were forwarded
// too).
func TestUDPLengthTrims(t *testing.T) {
	netnstest.RequireRoot(t)
	topo := netnstest.NewTopology(t)
	svc := topo.ServiceV4
	got := make(chan []byte, 1)
	serveUDP(t, topo.Server, netip.AddrPortFrom(svc, 7000), func(q []byte) []byte {
		select {
		case got <- append([]byte(nil), q...):
		default:
		}
		return nil
	})
	cfg := writeConfig(t, flowTableConfig)
	startTunfw(t, topo.Host, cfg)
	raw := newRawSender(t, topo.Host)
	// A UDP length of 8+5 in a packet carrying 8+12 bytes.
	l4 := make([]byte, 8+12)
	endian.BigEndian.PutUint16(l4[0:], 40000)
	endian.BigEndian.PutUint16(l4[2:], 7000)
	endian.BigEndian.PutUint16(l4[4:], 8+5)
	copy(l4[8:], "hello-TRAILER")
	if err := raw.send(spoofedSrc, svc, unix.IPPROTO_UDP, l4); err != nil {
		t.Fatalf("send: %v", err)
	}
	select {
	case q := <-got:
		if string(q) != "hello" {
			t.Errorf("destination got %q, want %q (the UDP length's 5 bytes)", q, "hello")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the datagram did not arrive")
	}
}
