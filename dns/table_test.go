package dns

import (
	"fmt"
	"net/netip"
	"runtime"
	"sync"
	"testing"
	"time"
)

var (
	client1 = netip.MustParseAddr("10.0.0.1")
	client2 = netip.MustParseAddr("fd00::2")
	t0      = time.Unix(1_700_000_000, 0)
)

// TestTableTTL: a name is in force until its TTL ends, then returned as
// expired; another client does not see it.
func TestTableTTL(t *testing.T) {
	tab := NewTable(10)
	tab.Add(client1, ip4, "a.test", 30*time.Second, t0)
	if name, ok := tab.Lookup(client1, ip4, t0.Add(29*time.Second)); name != "a.test" || !ok {
		t.Errorf("within TTL: %q %v", name, ok)
	}
	if name, ok := tab.Lookup(client1, ip4, t0.Add(30*time.Second)); name != "a.test" || ok {
		t.Errorf("at TTL end: %q %v", name, ok)
	}
	if name, ok := tab.Lookup(client2, ip4, t0); name != "" || ok {
		t.Errorf("other client: %q %v", name, ok)
	}
	// The IPv4-mapped form of an address is another address.
	if name, ok := tab.Lookup(client1, netip.AddrFrom16(ip4.As16()), t0); name != "" || ok {
		t.Errorf("mapped address: %q %v", name, ok)
	}
	// A later answer for the same address replaces name and TTL.
	tab.Add(client1, ip4, "b.test", time.Hour, t0.Add(time.Minute))
	if name, ok := tab.Lookup(client1, ip4, t0.Add(30*time.Minute)); name != "b.test" || !ok {
		t.Errorf("replaced: %q %v", name, ok)
	}
	// TTL 0: told once, never in force afterwards.
	tab.Add(client2, ip6, "zero.test", 0, t0)
	if name, ok := tab.Lookup(client2, ip6, t0); name != "zero.test" || ok {
		t.Errorf("TTL 0: %q %v", name, ok)
	}
	if tab.Len() != 2 {
		t.Errorf("Len = %d", tab.Len())
	}
	tab.Add(netip.Addr{}, ip4, "x", time.Hour, t0)
	tab.Add(client1, netip.Addr{}, "x", time.Hour, t0)
	if tab.Len() != 2 {
		t.Errorf("invalid addresses added: Len = %d", tab.Len())
	}
}

func addrN(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{198, 51, byte(i >> 8), byte(i)})
}

// TestTableLRU: at max entries, adding forgets the least recently used,
// where a Lookup counts as use.
func TestTableLRU(t *testing.T) {
	const max = 4
	tab := NewTable(max)
	for i := range max {
		tab.Add(client1, addrN(i), fmt.Sprint("n", i), time.Hour, t0)
	}
	tab.Lookup(client1, addrN(0), t0) // 0 is now the most recent; 1 the least
	tab.Add(client1, addrN(4), "n4", time.Hour, t0)
	if _, ok := tab.Lookup(client1, addrN(1), t0); ok {
		t.Error("least recently used entry kept")
	}
	for _, i := range []int{0, 2, 3, 4} {
		if name, ok := tab.Lookup(client1, addrN(i), t0); !ok || name != fmt.Sprint("n", i) {
			t.Errorf("entry %d: %q %v", i, name, ok)
		}
	}
	if tab.Len() != max {
		t.Errorf("Len = %d", tab.Len())
	}
	// Many more: the table stays at max and keeps the last max added.
	for i := 5; i < 1000; i++ {
		tab.Add(client2, addrN(i), fmt.Sprint("n", i), time.Hour, t0)
		if tab.Len() != max {
			t.Fatalf("Len = %d after %d adds", tab.Len(), i)
		}
	}
	for i := 996; i < 1000; i++ {
		if name, ok := tab.Lookup(client2, addrN(i), t0); !ok || name != fmt.Sprint("n", i) {
			t.Errorf("entry %d: %q %v", i, name, ok)
		}
	}
	one := NewTable(1)
	one.Add(client1, ip4, "a", time.Hour, t0)
	one.Add(client1, ip6, "b", time.Hour, t0)
	if _, ok := one.Lookup(client1, ip4, t0); ok || one.Len() != 1 {
		t.Error("table of 1 kept 2")
	}
	if name, ok := one.Lookup(client1, ip6, t0); name != "b" || !ok {
		t.Errorf("table of 1: %q %v", name, ok)
	}
}

// TestTableConcurrent: adds and lookups from several goroutines (run
// with -race) leave a consistent table: the list holds every entry once.
func TestTableConcurrent(t *testing.T) {
	const max = 500
	tab := NewTable(max)
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			c := netip.AddrFrom4([4]byte{10, 0, 0, byte(g)})
			for i := range 2000 {
				tab.Add(c, addrN(i%700), "n.test", time.Minute, t0)
				if name, ok := tab.Lookup(c, addrN((i*7)%700), t0); ok && name != "n.test" {
					t.Errorf("name %q", name)
				}
				tab.Len()
			}
		})
	}
	wg.Wait()
	if tab.Len() != max {
		t.Errorf("Len = %d", tab.Len())
	}
	tab.mu.Lock()
	defer tab.mu.Unlock()
	seen := make(map[int32]bool)
	for i, n := tab.head, 0; n == 0 || i != tab.head; i, n = tab.entries[i].next, n+1 {
		if seen[i] || n > max {
			t.Fatalf("list revisits entry %d", i)
		}
		seen[i] = true
		if tab.entries[tab.entries[i].next].prev != i {
			t.Fatalf("entry %d: next's prev is not it", i)
		}
		if tab.index[tab.entries[i].key] != i {
			t.Fatalf("entry %d not indexed", i)
		}
	}
	if len(seen) != max {
		t.Errorf("list holds %d entries", len(seen))
	}
}

// TestTableLookupAllocs: Lookup allocates nothing, found or not.
func TestTableLookupAllocs(t *testing.T) {
	tab := NewTable(100)
	tab.Add(client1, ip4, "a.test", time.Hour, t0)
	tab.Add(client1, ip6, "b.test", time.Hour, t0)
	if n := testing.AllocsPerRun(1000, func() {
		tab.Lookup(client1, ip4, t0)
		tab.Lookup(client1, ip6, t0)
		tab.Lookup(client2, ip4, t0)
	}); n != 0 {
		t.Errorf("Lookup allocates %v times", n)
	}
}

// TestTableMemory measures the heap a full default-sized table holds, the
// names' bytes included: once with 1,000 distinct names (clients asking
// for the same sites, Learn's string shared) and once with every name
// distinct (the worst case), names 20 bytes long.
func TestTableMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("fills a 100,000-entry table")
	}
	for _, distinct := range []int{1000, DefaultMaxNames} {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		names := make([]string, distinct)
		for i := range names {
			names[i] = fmt.Sprintf("host%06d.example.com", i)
		}
		tab := NewTable(DefaultMaxNames)
		for i := range DefaultMaxNames {
			c := netip.AddrFrom4([4]byte{10, 0, byte(i >> 16), byte(i % 50)})
			a := netip.AddrFrom4([4]byte{192, byte(i >> 16), byte(i >> 8), byte(i)})
			tab.Add(c, a, names[i%distinct], time.Hour, t0)
		}
		if tab.Len() != DefaultMaxNames {
			t.Fatalf("Len = %d", tab.Len())
		}
		names = nil // the strings the table holds are what is left
		runtime.GC()
		runtime.ReadMemStats(&after)
		per := float64(after.HeapAlloc-before.HeapAlloc) / DefaultMaxNames
		t.Logf("%d entries, %d distinct names: %.0f bytes/entry", DefaultMaxNames, distinct, per)
		if per > 400 {
			t.Errorf("%.0f bytes/entry", per)
		}
		runtime.KeepAlive(tab)
	}
}
