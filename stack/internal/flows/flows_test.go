package flows

import (
	"net/netip"
	"testing"

	"github.com/tunfw/tunfw/filter"
)

// A relay that ends after a new connection reused its tuple untracks only
// itself, and closing an old flow does not close the new one.
func TestTrackByIdentity(t *testing.T) {
	var tr Tracker
	k := filter.FlowKey{Proto: 6, Src: netip.MustParseAddrPort("10.0.0.2:1000"), Dst: netip.MustParseAddrPort("192.0.2.1:80")}
	oldRef, newRef := filter.FlowRef{Key: k, ID: 1}, filter.FlowRef{Key: k, ID: 2}
	var oldClosed, newClosed int
	tr.Track(oldRef, func() { oldClosed++ })
	tr.Track(newRef, func() { newClosed++ }) // the tuple reused
	tr.Untrack(oldRef)                       // the old relay ends
	if n := tr.Close([]filter.FlowRef{oldRef}); n != 0 || oldClosed+newClosed != 0 {
		t.Fatalf("closing the old flow closed %d relays", n)
	}
	if n := tr.Close([]filter.FlowRef{newRef}); n != 1 || newClosed != 1 {
		t.Fatalf("closing the new flow: %d relays, new closed %d times", n, newClosed)
	}
	tr.Untrack(newRef)
	if tr.Len() != 0 {
		t.Fatalf("left tracked: %d", tr.Len())
	}
}
