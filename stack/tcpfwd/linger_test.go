package tcpfwd

import "testing"

// TestLingerShortensWhenManyRun: a quiet direction keeps its goroutine for
// relayLinger while at most maxLingering directions run, and for
// relayLingerBusy beyond, so that a burst of connections does not hold two
// goroutines each for relayLinger.
func TestLingerShortensWhenManyRun(t *testing.T) {
	fw := stateOnly(testHost(t, nil))
	for _, c := range []struct {
		running int32
		want    string
	}{
		{0, relayLinger.String()},
		{maxLingering, relayLinger.String()},
		{maxLingering + 1, relayLingerBusy.String()},
		{10 * maxLingering, relayLingerBusy.String()},
	} {
		fw.running.Store(c.running)
		if got := fw.linger().String(); got != c.want {
			t.Errorf("linger with %d running = %s, want %s", c.running, got, c.want)
		}
	}
	if relayLingerBusy >= relayLinger {
		t.Errorf("relayLingerBusy %v is not shorter than relayLinger %v", relayLingerBusy, relayLinger)
	}
}
