package tcpfwd

import (
	"context"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/tunfw/tunfw/filter"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

func testDial(src string, port uint16) *pendingDial {
	return &pendingDial{
		key:    filter.FlowKey{Proto: 6, Src: netip.AddrPortFrom(netip.MustParseAddr(src), port), Dst: netip.MustParseAddrPort("192.0.2.1:80")},
		cancel: func() {},
	}
}

// TestDialPoolEviction checks which SYNs are deferred and which dial gives
// way: under its source's pressure a new connection is deferred and its
// retransmission admitted, evicting the source's own oldest dial; in a full
// pool the oldest dial of a source over an even share gives way to a light
// source; and every slot is given back.
func TestDialPoolEviction(t *testing.T) {
	p := newDialPool()
	const total, perSrc = 8, 4
	now := int64(time.Hour)
	// As the read loop and handleTCP do: a SYN not deferred is admitted.
	admit := func(d *pendingDial) (*pendingDial, bool) {
		if p.deferSYN(d.key, total, perSrc, now) {
			return nil, false
		}
		return p.admit(d, total, perSrc), true
	}
	var flood []*pendingDial
	for i := range 4 {
		d := testDial("10.0.0.2", uint16(1000+i))
		if v, ok := admit(d); v != nil || !ok {
			t.Fatalf("dial %d: evicted %v, admitted %v below the limits", i, v, ok)
		}
		flood = append(flood, d)
	}
	// The flooding source is at its share: a new connection is deferred,
	// its retransmission evicts the source's own oldest dial.
	d := testDial("10.0.0.2", 2000)
	if v, ok := admit(d); v != nil || ok {
		t.Fatalf("under pressure, a first SYN was admitted (%v) or evicted %v", ok, v)
	}
	now += int64(time.Second)
	if v, ok := admit(d); !ok || v != flood[0] || v.end != dialEvicted {
		t.Fatalf("a retransmission under pressure: admitted %v, evicted %v, want its source's oldest", ok, v)
	}
	if p.done(flood[0]) != dialEvicted {
		t.Error("done of an evicted dial does not say so")
	}
	// A deferred SYN is remembered for deferMemory only.
	late := testDial("10.0.0.2", 2001)
	if _, ok := admit(late); ok {
		t.Fatal("a first SYN under pressure was admitted")
	}
	now += deferMemory
	if _, ok := admit(late); ok {
		t.Fatal("a SYN deferred longer than deferMemory ago was admitted as its retransmission")
	}
	// Others fill the pool: 4 flood + 4 from three sources.
	other := []*pendingDial{testDial("10.0.0.3", 1), testDial("10.0.0.4", 1), testDial("10.0.0.4", 2), testDial("10.0.0.5", 1)}
	for _, o := range other {
		if v, ok := admit(o); v != nil || !ok {
			t.Fatalf("admitting %v: evicted %v, admitted %v below the limits", o.key, v, ok)
		}
	}
	// Full: a source over an even share (8/4) is under pressure...
	if _, ok := admit(testDial("10.0.0.4", 3)); ok {
		t.Error("in a full pool, a source over its even share was admitted at once")
	}
	// ... a new source is not, and the oldest dial of a source over an
	// even share (8/5) gives way, not the older-than-it dials of others.
	n := testDial("10.0.0.6", 1)
	if v, ok := admit(n); !ok || v != flood[1] {
		t.Fatalf("full pool: admitted %v, evicted %v, want the flooding source's oldest", ok, v)
	}
	if p.len() != total {
		t.Errorf("%d pending, want %d", p.len(), total)
	}
	// A flow leaving the table cancels its dial, but not the dial of a
	// newer flow with the same key.
	cancelled := false
	other[0].cancel = func() { cancelled = true }
	other[0].id = 7
	p.cancelFlows([]filter.FlowRef{{Key: other[0].key, ID: 6}})
	if cancelled || !p.answered(other[0], nil) {
		t.Error("closing an older flow cancelled the dial of a newer one with its key")
	}
	p.cancelFlows([]filter.FlowRef{{Key: other[0].key, ID: 7}, {Key: testDial("10.9.9.9", 9).key}})
	if !cancelled || p.done(other[0]) != dialCancelled || p.answered(other[0], nil) {
		t.Error("cancelFlows did not cancel the flow's dial")
	}
	for _, d := range append(append(flood, d, n), other...) {
		p.done(d)
	}
	if p.len() != 0 || len(p.bySrc) != 0 || len(p.byKey) != 0 {
		t.Errorf("pool not empty after all dials are done: %d, %v, %v", p.len(), p.bySrc, p.byKey)
	}
}

// TestDeferredSYNsSurviveFlood checks the figure the deferredSYNs comment
// gives: after a SYN is deferred, 10,000 other deferred SYNs (a second of
// flood) push it out in well under 1% of cases.
func TestDeferredSYNsSurviveFlood(t *testing.T) {
	p := newDialPool()
	lost := 0
	const tries = 200
	now := int64(0)
	for i := range tries {
		k := testDial("10.0.0.9", uint16(i)).key
		p.deferred.remember(k, now)
		for j := range 10000 {
			f := testDial("10.0.0.2", uint16(j)).key
			f.Dst = netip.AddrPortFrom(f.Dst.Addr(), uint16(i))
			now += int64(100 * time.Microsecond)
			p.deferred.remember(f, now)
		}
		if !p.deferred.recall(k, now, deferMemory, true) {
			lost++
		}
	}
	t.Logf("%d of %d deferred SYNs forgotten after 10,000 others", lost, tries)
	if lost > tries/50 {
		t.Errorf("%d of %d deferred SYNs forgotten after 10,000 others", lost, tries)
	}
}

// TestDeferSYNAllocs: deciding on a SYN allocates nothing once the tables
// exist, as the read loop requires.
func TestDeferSYNAllocs(t *testing.T) {
	p := newDialPool()
	for i := range 4 {
		p.admit(testDial("10.0.0.2", uint16(i)), 8, 4)
	}
	key := testDial("10.0.0.2", 100).key
	p.deferSYN(key, 8, 4, 0)
	port := uint16(1000)
	allocs := testing.AllocsPerRun(1000, func() {
		port++
		key.Src = netip.AddrPortFrom(key.Src.Addr(), port)
		if !p.deferSYN(key, 8, 4, int64(port)) {
			t.Fatal("SYN under pressure not deferred")
		}
	})
	if allocs != 0 {
		t.Errorf("deferSYN allocates %.1f times per SYN", allocs)
	}
}

// TestScreenSYNsAllocs: the read loop's screening of a SYN nobody takes
// allocates nothing, whether it defers the SYN (a flood) or passes it on.
func TestScreenSYNsAllocs(t *testing.T) {
	s := stateOnly(testHost(t, nil))
	s.SetDialLimits(DialLimits{MaxPending: 8, MaxPendingPerSource: 4})
	passed := 0
	screen := s.screenSYNs(func(stack.TransportEndpointID, *stack.PacketBuffer) bool { passed++; return true })
	pb := stack.NewPacketBuffer(stack.PacketBufferOptions{ReserveHeaderBytes: header.TCPMinimumSize})
	defer pb.DecRef()
	header.TCP(pb.TransportHeader().Push(header.TCPMinimumSize)).Encode(&header.TCPFields{
		SrcPort: 40000, DstPort: 80, DataOffset: header.TCPMinimumSize, Flags: header.TCPFlagSyn, WindowSize: 1000,
	})
	id := stack.TransportEndpointID{
		LocalAddress: tcpip.AddrFrom4([4]byte{203, 0, 113, 99}), LocalPort: 80,
		RemoteAddress: tcpip.AddrFrom4([4]byte{10, 0, 0, 2}), RemotePort: 40000,
	}
	screen(id, pb) // below the share: passed on
	if passed != 1 {
		t.Fatalf("a SYN without pressure was not passed on")
	}
	for i := range 4 {
		s.dials.admit(testDial("10.0.0.2", uint16(i)), 8, 4)
	}
	screen(id, pb) // allocates the table of deferred SYNs, once
	allocs := testing.AllocsPerRun(1000, func() {
		id.RemotePort++
		screen(id, pb)
	})
	if passed != 1 {
		t.Errorf("%d SYNs under pressure were passed on, want none", passed-1)
	}
	if allocs != 0 {
		t.Errorf("screening a SYN allocates %.1f times", allocs)
	}
}

// TestClassifyDial: a failed dial's error, as dial.DialTCP wraps it, is
// counted under the reason `tunfw stats` and the metrics name.
func TestClassifyDial(t *testing.T) {
	wrap := os.NewSyscallError
	for _, c := range []struct {
		err  error
		want string
	}{
		{wrap("connect", syscall.ECONNREFUSED), "refused"},
		{wrap("connect", syscall.ETIMEDOUT), "timeout"},
		{context.DeadlineExceeded, "timeout"},
		{wrap("connect", syscall.EHOSTUNREACH), "unreachable"},
		{wrap("socket", syscall.EMFILE), "descriptors"},
		{wrap("connect", syscall.EADDRNOTAVAIL), "ports"},
		{wrap("bind", syscall.EADDRINUSE), "ports"},
		{wrap("connect", syscall.EPERM), "other"},
	} {
		if got := dialFailNames[classifyDial(c.err)]; got != c.want {
			t.Errorf("%v: reason %s, want %s", c.err, got, c.want)
		}
	}
}
