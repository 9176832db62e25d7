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

// TestRelayBufsGrowWithReads: a run's buffers grow only as reads fill
// them (small, then large, then bulk), a new run starts small again, and
// bulk buffers out at once are bounded: past maxBulkBufs a run gets large
// ones, and a bulk buffer put back frees its slot.
func TestRelayBufsGrowWithReads(t *testing.T) {
	var pools bufPools
	r := relayBufs{pools: &pools}
	sizes := []int{smallRelayBuf, smallRelayBuf, largeRelayBuf, largeRelayBuf, bulkRelayBuf}
	fills := []bool{false, true, false, true, true}
	for i, want := range sizes {
		bp := r.get()
		if len(*bp) != want {
			t.Fatalf("get %d: %d bytes, want %d", i, len(*bp), want)
		}
		n := 1
		if fills[i] {
			n = len(*bp)
		}
		r.put(bp, n)
	}
	if n := pools.bulkOut.Load(); n != 0 {
		t.Fatalf("%d bulk buffers out after all were put back", n)
	}
	r.reset()
	if bp := r.get(); len(*bp) != smallRelayBuf {
		t.Fatalf("a new run got %d bytes, want %d", len(*bp), smallRelayBuf)
	}

	// Other runs hold every bulk buffer: this one gets a large one.
	held := make([]*[]byte, maxBulkBufs)
	for i := range held {
		o := relayBufs{pools: &pools, large: true, bulk: true}
		if held[i] = o.get(); len(*held[i]) != bulkRelayBuf {
			t.Fatalf("bulk buffer %d: %d bytes", i, len(*held[i]))
		}
	}
	r.large, r.bulk = true, true
	bp := r.get()
	if len(*bp) != largeRelayBuf {
		t.Fatalf("with %d bulk buffers out, got %d bytes, want %d", maxBulkBufs, len(*bp), largeRelayBuf)
	}
	r.put(bp, 0)
	r.put(held[0], 0)
	if bp = r.get(); len(*bp) != bulkRelayBuf {
		t.Fatalf("after one was put back, got %d bytes, want %d", len(*bp), bulkRelayBuf)
	}
	r.put(bp, 0)
	for _, h := range held[1:] {
		r.put(h, 0)
	}
	if n := pools.bulkOut.Load(); n != 0 {
		t.Fatalf("%d bulk buffers out after all were put back", n)
	}
}
