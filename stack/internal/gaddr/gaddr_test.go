package gaddr

import (
	"net/netip"
	"testing"

	"github.com/tunfw/tunfw/stack/internal/race"
)

// TestRoundTrip: both families survive the trip to gVisor and back,
// without allocating.
func TestRoundTrip(t *testing.T) {
	for _, s := range []string{"192.0.2.1", "2001:db8::1", "0.0.0.0", "::"} {
		a := netip.MustParseAddr(s)
		if got := From(To(a)); got != a {
			t.Errorf("%s came back as %s", a, got)
		}
	}
	if race.Enabled {
		t.Skip("allocation counts are meaningless under -race; make test checks them without it")
	}
	a := netip.MustParseAddr("2001:db8::1")
	if n := testing.AllocsPerRun(100, func() { From(To(a)) }); n != 0 {
		t.Errorf("a round trip allocates %v times", n)
	}
}
