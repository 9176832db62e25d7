package dns

import (
	"net/netip"
	"sync"
	"time"
)

// Table remembers, per client address, which name each address was
// answered for, and until when (the answer's TTL). It holds at most max
// entries; adding one more forgets the least recently used (added or
// looked up). It is safe for concurrent use.
//
// One (client, address) pair has one name: the one added last. Several
// names often share an address (CDNs, virtual hosts); the client most
// likely connects for the one it asked last.
type Table struct {
	mu    sync.Mutex
	max   int
	epoch time.Time // expiries are kept as nanoseconds since epoch
	index map[tableKey]int32
	// entries is a circular doubly linked list through prev/next, most
	// recently used at head. Slots are never freed, only reused by
	// eviction, so indexes stay valid and the GC scans one slice rather
	// than an object per entry.
	entries []tableEntry
	head    int32
}

// tableKey is a client and an address without zones: 16-byte forms and a
// bit each for IPv4, so that the key holds no pointer.
type tableKey struct {
	client, addr [16]byte
	v4           uint8 // 1: client is IPv4, 2: addr is IPv4
}

type tableEntry struct {
	key tableKey
	// name is the caller's string: the addresses of one answer share
	// it. (Interning with unique costs more per distinct name than it
	// saves; see TestTableMemory.)
	name       string
	expires    int64 // nanoseconds since Table.epoch
	prev, next int32
}

// NewTable returns an empty table for at most maxEntries entries
// (DefaultMaxNames if maxEntries < 1).
func NewTable(maxEntries int) *Table {
	if maxEntries < 1 {
		maxEntries = DefaultMaxNames
	}
	return &Table{max: min(maxEntries, MaxMaxNames), epoch: time.Now(), index: make(map[tableKey]int32), head: -1}
}

func makeKey(client, addr netip.Addr) tableKey {
	k := tableKey{client: client.As16(), addr: addr.As16()}
	if client.Is4() {
		k.v4 |= 1
	}
	if addr.Is4() {
		k.v4 |= 2
	}
	return k
}

// Add remembers that client was told addr for name at now, for ttl.
// Invalid addresses are ignored.
func (t *Table) Add(client, addr netip.Addr, name string, ttl time.Duration, now time.Time) {
	if !client.IsValid() || !addr.IsValid() {
		return
	}
	k := makeKey(client, addr)
	expires := now.Sub(t.epoch) + max(ttl, 0)

	t.mu.Lock()
	defer t.mu.Unlock()
	i, ok := t.index[k]
	switch {
	case ok:
		t.unlink(i)
	case len(t.entries) < t.max:
		i = int32(len(t.entries))
		if len(t.entries) == cap(t.entries) {
			// Grow by doubling but never past max: append's rounding
			// would leave up to a quarter of a full table unused.
			grown := make([]tableEntry, len(t.entries), min(max(2*cap(t.entries), 64), t.max))
			copy(grown, t.entries)
			t.entries = grown
		}
		t.entries = t.entries[:i+1]
		t.entries[i] = tableEntry{}
		t.index[k] = i
	default: // full: reuse the least recently used entry's slot
		i = t.entries[t.head].prev
		t.unlink(i)
		delete(t.index, t.entries[i].key)
		t.index[k] = i
	}
	e := &t.entries[i]
	e.key, e.name, e.expires = k, name, int64(expires)
	t.pushFront(i)
}

// Lookup returns the name client was last told addr for, and whether that
// answer's TTL still runs at now. An expired name is still returned (with
// false) until the entry is forgotten: the caller chooses whether a
// client that kept an address past its TTL still gets its name.
func (t *Table) Lookup(client, addr netip.Addr, now time.Time) (name string, ok bool) {
	k := makeKey(client, addr)
	at := int64(now.Sub(t.epoch))
	t.mu.Lock()
	defer t.mu.Unlock()
	i, found := t.index[k]
	if !found {
		return "", false
	}
	if i != t.head {
		t.unlink(i)
		t.pushFront(i)
	}
	e := &t.entries[i]
	return e.name, at < e.expires
}

// Len returns the number of entries, expired ones included.
func (t *Table) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.index)
}

// unlink takes entry i out of the list.
func (t *Table) unlink(i int32) {
	e := &t.entries[i]
	if e.next == i { // the only one
		t.head = -1
		return
	}
	t.entries[e.prev].next = e.next
	t.entries[e.next].prev = e.prev
	if t.head == i {
		t.head = e.next
	}
}

// pushFront makes entry i, not in the list, its head.
func (t *Table) pushFront(i int32) {
	e := &t.entries[i]
	if t.head < 0 {
		e.prev, e.next, t.head = i, i, i
		return
	}
	h := &t.entries[t.head]
	e.next, e.prev = t.head, h.prev
	t.entries[h.prev].next = i
	h.prev = i
	t.head = i
}
