package stack

import (
	"net/netip"
	"testing"

	"github.com/tunfw/tunfw/filter"
)

func testDial(src string, port uint16) *pendingDial {
	return &pendingDial{
		key:    filter.FlowKey{Proto: 6, Src: netip.AddrPortFrom(netip.MustParseAddr(src), port), Dst: netip.MustParseAddrPort("192.0.2.1:80")},
		cancel: func() {},
	}
}

// TestDialPoolEviction checks who gives way: the source's own oldest dial
// at its share, else in a full pool the oldest dial of a source over an
// even share; and that every slot is given back.
func TestDialPoolEviction(t *testing.T) {
	p := newDialPool()
	const total, perSrc = 8, 4
	var flood []*pendingDial
	for i := range 4 {
		d := testDial("10.0.0.2", uint16(1000+i))
		if v := p.admit(d, total, perSrc); v != nil {
			t.Fatalf("dial %d evicted %v below the limits", i, v.key)
		}
		flood = append(flood, d)
	}
	// The flooding source is at its share: its own oldest gives way.
	d := testDial("10.0.0.2", 2000)
	if v := p.admit(d, total, perSrc); v != flood[0] || v.end != dialEvicted {
		t.Fatalf("at the source's share, evicted %v, want its oldest", v)
	}
	if p.done(flood[0]) != dialEvicted {
		t.Error("done of an evicted dial does not say so")
	}
	// Others fill the pool: 4 flood + 4 from three sources.
	other := []*pendingDial{testDial("10.0.0.3", 1), testDial("10.0.0.4", 1), testDial("10.0.0.4", 2), testDial("10.0.0.5", 1)}
	for _, o := range other {
		if v := p.admit(o, total, perSrc); v != nil {
			t.Fatalf("admitting %v evicted %v below the limits", o.key, v.key)
		}
	}
	// Full: a new source's SYN evicts the oldest dial of the source over
	// an even share (8/5), not the older-than-it dials of others.
	n := testDial("10.0.0.6", 1)
	if v := p.admit(n, total, perSrc); v != flood[1] {
		t.Fatalf("full pool evicted %v, want the flooding source's oldest", v.key)
	}
	if p.len() != total {
		t.Errorf("%d pending, want %d", p.len(), total)
	}
	// A flow leaving the table cancels its dial.
	cancelled := false
	other[0].cancel = func() { cancelled = true }
	p.cancelKeys([]filter.FlowKey{other[0].key, testDial("10.9.9.9", 9).key})
	if !cancelled || p.done(other[0]) != dialCancelled || p.answered(other[0], nil) {
		t.Error("cancelKeys did not cancel the flow's dial")
	}
	for _, d := range append(append(flood, d, n), other...) {
		p.done(d)
	}
	if p.len() != 0 || len(p.bySrc) != 0 || len(p.byKey) != 0 {
		t.Errorf("pool not empty after all dials are done: %d, %v, %v", p.len(), p.bySrc, p.byKey)
	}
}
