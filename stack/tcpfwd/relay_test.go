package tcpfwd

import (
	"testing"
	"unsafe"
)

// TestIdleRelaySize: an idle relay holds what its connection needs between
// bursts and no more; what a direction works with while it runs (the
// readers and writers of its buffers, the writable notification entry, the
// wake-up channel and timer) comes from a pool for the run (toUpState,
// toClientState). That took the relay, with the channel and callbacks made
// for it, from 768 bytes to 256, 0.28 KiB of heap a flow at 1,000 idle
// flows (`make bench`'s flows rows). 256 bytes is one of Go's size
// classes: a field more puts every idle flow in the next one (288).
func TestIdleRelaySize(t *testing.T) {
	if n := unsafe.Sizeof(tcpRelay{}); n > 256 {
		t.Errorf("tcpRelay is %d bytes, more than the 256 of its size class: keep what a run needs in its state", n)
	}
}
