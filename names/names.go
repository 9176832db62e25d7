// Package names holds the domain names and name patterns that tunfw's rules
// match a flow's name against (the name inspect reads from a ClientHello or
// an HTTP request).
//
// A name "example.com" matches exactly that name; a pattern "*.example.com"
// matches every name below example.com, at any depth, but not example.com
// itself. Matching ignores case and one trailing dot.
//
// A Set is built once (Add, ReadList) and then read by any number of
// goroutines at once without locks. It keeps its names in one byte arena
// and finds them through an open-addressing table of arena offsets and
// hashes: a million names of a block list cost about 40 MiB (a
// map[string]struct{} of the names alone, 50 to 70), and Match
// looks a name up in any case, with all its parents, without allocating or
// copying it.
package names

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
)

const (
	// maxName is the longest name in text form, without the trailing dot
	// (RFC 1035's 255 octets on the wire).
	maxName = 253
	// maxLabel is the longest label (RFC 1035).
	maxLabel = 63
	// maxArena bounds the arena so that offset+1 fits the 32 bits a slot
	// keeps for it.
	maxArena = 1<<32 - 2
)

// Normalize checks one name or pattern and returns its canonical form:
// lowercase, without a trailing dot.
//
// A name is labels of 1 to 63 letters, digits, hyphens and underscores,
// joined by dots, with no hyphen at either end of a label and at most 253
// bytes in all. A pattern is "*." followed by a name; '*' is allowed nowhere
// else. Internationalized names must be written in their xn-- form.
func Normalize(s string) (string, error) {
	var buf [maxName]byte
	n, err := canon(s, &buf)
	if err != nil {
		return "", err
	}
	if len(s) >= n && s[:n] == string(buf[:n]) {
		return s[:n], nil // already canonical (perhaps but for the dot): no copy
	}
	return string(buf[:n]), nil
}

// Lower returns name, as a client sent it, in the form rules and logs take:
// ASCII letters lowercased and one trailing dot removed. Unlike Normalize
// it checks nothing and refuses nothing: other bytes, non-ASCII ones
// included, are kept as they are, so that Match judges the name a flow
// carried and a log shows it. Lower makes one string and allocates
// nothing else.
func Lower(name []byte) string {
	if n := len(name); n > 0 && name[n-1] == '.' {
		name = name[:n-1]
	}
	var b strings.Builder
	b.Grow(len(name))
	for _, c := range name {
		b.WriteByte(lower(c))
	}
	return b.String()
}

// canon checks s and writes its canonical form to buf, returning its length.
func canon[T string | []byte](s T, buf *[maxName]byte) (int, error) {
	orig := s
	if len(s) > 0 && s[len(s)-1] == '.' {
		s = s[:len(s)-1]
	}
	switch {
	case len(s) == 0:
		return 0, nameError(orig, "empty name")
	case len(s) > maxName:
		return 0, nameError(orig, fmt.Sprintf("longer than %d bytes", maxName))
	}
	start := 0
	if s[0] == '*' {
		if len(s) < 2 || s[1] != '.' {
			return 0, nameError(orig, "'*' must be the whole first label, followed by a dot")
		}
		if len(s) == 2 {
			return 0, nameError(orig, "nothing after \"*.\"")
		}
		buf[0], buf[1] = '*', '.'
		start = 2
	}
	label := start // first byte of the current label
	for i := start; i <= len(s); i++ {
		if i == len(s) || s[i] == '.' {
			switch {
			case i == label:
				return 0, nameError(orig, "empty label")
			case i-label > maxLabel:
				return 0, nameError(orig, fmt.Sprintf("label %q longer than %d bytes", string(s[label:i]), maxLabel))
			case s[i-1] == '-':
				return 0, nameError(orig, fmt.Sprintf("label %q ends with a hyphen", string(s[label:i])))
			}
			if i < len(s) {
				buf[i] = '.'
			}
			label = i + 1
			continue
		}
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', '0' <= c && c <= '9', c == '_':
		case 'A' <= c && c <= 'Z':
			c += 'a' - 'A'
		case c == '-':
			if i == label {
				return 0, nameError(orig, "label starts with a hyphen")
			}
		case c == '*':
			return 0, nameError(orig, "'*' is allowed only as the whole first label")
		default:
			return 0, nameError(orig, fmt.Sprintf("invalid character %q", rune(c)))
		}
		buf[i] = c
	}
	return len(s), nil
}

// nameError quotes at most 80 bytes of a bad name: a list may hold anything.
func nameError[T string | []byte](s T, why string) error {
	q := string(s)
	if len(q) > 80 {
		return fmt.Errorf("name %s...: %s", strconv.Quote(q[:80]), why)
	}
	return fmt.Errorf("name %s: %s", strconv.Quote(q), why)
}

// Flags of an arena entry: one entry holds a name for both "name" and
// "*.name", as adblock's "||name^" asks for both.
const (
	exact = 1 << iota
	below
)

// Set is a set of names and patterns. The zero value is an empty set.
//
// A Set is built once and then read by many goroutines without locks: Match
// and Len may run concurrently with each other, but not with Add or
// ReadList.
type Set struct {
	// arena holds the entries back to back: a flags byte, a length byte,
	// then the canonical name (for a pattern, the part after "*.").
	arena []byte
	// slots is an open-addressing table (linear probing, at most half
	// full, a power of two long). A used slot holds the entry's 32-bit
	// hash above its arena offset+1; 0 is an empty slot. Keeping the hash
	// lets lookups skip the arena on most collisions and lets the table
	// grow without reading the arena.
	slots   []uint64
	entries int // used slots
	count   int // names plus patterns: an entry holding both counts twice
	seed    uint64
}

// Len returns the number of distinct names and patterns in the set;
// "example.com" and "*.example.com" count as two.
func (s *Set) Len() int { return s.count }

// Add adds a name or pattern (see Normalize). Adding one twice is not an
// error.
func (s *Set) Add(pattern string) error {
	var buf [maxName]byte
	n, err := canon(pattern, &buf)
	if err != nil {
		return err
	}
	return s.addCanon(buf[:n])
}

// addCanon adds a canonical name or pattern.
func (s *Set) addCanon(c []byte) error {
	if len(c) > 2 && c[0] == '*' {
		return s.insert(c[2:], below)
	}
	return s.insert(c, exact)
}

var errFull = errors.New("too many names: the set holds at most 4 GiB of them")

// insert adds the flag to key's entry, making the entry if needed.
func (s *Set) insert(key []byte, flag byte) error {
	if s.slots == nil {
		s.seed = rand.Uint64()
		s.slots = make([]uint64, 16)
	}
	if 2*(s.entries+1) > len(s.slots) {
		s.grow()
	}
	h := s.hash(key)
	mask := uint32(len(s.slots) - 1)
	i := h & mask
	for ; s.slots[i] != 0; i = (i + 1) & mask {
		v := s.slots[i]
		if uint32(v>>32) != h {
			continue
		}
		off := uint32(v) - 1
		if e := s.entry(off); string(e) == string(key) {
			if s.arena[off]&flag == 0 {
				s.arena[off] |= flag
				s.count++
			}
			return nil
		}
	}
	if uint64(len(s.arena))+2+uint64(len(key)) > maxArena {
		return errFull
	}
	off := len(s.arena)
	s.arena = append(s.arena, flag, byte(len(key)))
	s.arena = append(s.arena, key...)
	s.slots[i] = uint64(h)<<32 | uint64(off+1)
	s.entries++
	s.count++
	return nil
}

// grow doubles the table, placing entries by the hash their slots keep.
func (s *Set) grow() {
	slots := make([]uint64, 2*len(s.slots))
	mask := uint32(len(slots) - 1)
	for _, v := range s.slots {
		if v == 0 {
			continue
		}
		i := uint32(v>>32) & mask
		for slots[i] != 0 {
			i = (i + 1) & mask
		}
		slots[i] = v
	}
	s.slots = slots
}

// entry returns the name of the entry at off.
func (s *Set) entry(off uint32) []byte {
	n := uint32(s.arena[off+1])
	return s.arena[off+2 : off+2+n]
}

// The hash is FNV-1a run from the last byte to the first, over lowercased
// bytes, so that one pass over a name gives the hash of each of its
// suffixes: Match looks up every parent of a name for the cost of hashing
// the name once. The seed (random per Set) keeps a client who picks names
// from aiming at a list's collisions; mix spreads FNV's weak low bits.
const (
	fnvBasis = 14695981039346656037
	fnvPrime = 1099511628211
)

func lower(c byte) byte {
	if c-'A' < 26 {
		c += 'a' - 'A'
	}
	return c
}

func mix(h uint64) uint32 {
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	return uint32(h)
}

func (s *Set) hash(key []byte) uint32 {
	h := fnvBasis ^ s.seed
	for i := len(key) - 1; i >= 0; i-- {
		h = (h ^ uint64(lower(key[i]))) * fnvPrime
	}
	return mix(h)
}

// Match reports whether name is in the set: it equals one of its names, or
// lies below one of its patterns. name is taken as a client sent it: in any
// case, perhaps with a trailing dot, not validated. A name longer than 253
// bytes (without the dot) matches nothing; otherwise Match judges only by
// labels, so "a b.example.com" is below "*.example.com" (a bad byte low in
// a name does not slip it past a pattern), while no name with bytes
// Normalize refuses equals a name of the set.
//
// Match allocates nothing and costs one table lookup per label of name,
// however large the set.
//
// Match and MatchString are kept from being inlined: inlined into another
// package, the call to the generic match loses its escape analysis
// (golang/go#79592) and a caller's name on the stack, as dns.Question
// writes it, would be moved to the heap on every call.
//
//go:noinline
func (s *Set) Match(name []byte) bool { return match(s, name) }

// MatchString is Match for a string.
//
//go:noinline
func (s *Set) MatchString(name string) bool { return match(s, name) }

func match[T string | []byte](s *Set, name T) bool {
	if s.entries == 0 {
		return false
	}
	if n := len(name); n > 0 && name[n-1] == '.' {
		name = name[:n-1]
	}
	if len(name) == 0 || len(name) > maxName {
		return false
	}
	h := fnvBasis ^ s.seed
	// Walk back from the end: at each dot, h is the hash of what follows
	// it, a parent that a pattern may name. A dot at either end leaves an
	// empty label on one side, which no pattern covers.
	for i := len(name) - 1; i >= 0; i-- {
		c := name[i]
		if c == '.' && i > 0 && i < len(name)-1 && lookup(s, mix(h), name[i+1:], below) {
			return true
		}
		h = (h ^ uint64(lower(c))) * fnvPrime
	}
	return lookup(s, mix(h), name, exact)
}

// lookup reports whether key (in any case) has an entry with flag.
func lookup[T string | []byte](s *Set, h uint32, key T, flag byte) bool {
	mask := uint32(len(s.slots) - 1)
	for i := h & mask; ; i = (i + 1) & mask {
		v := s.slots[i]
		if v == 0 {
			return false
		}
		if uint32(v>>32) != h {
			continue
		}
		off := uint32(v) - 1
		if int(s.arena[off+1]) != len(key) || !equalFold(s.arena[off+2:], key) {
			continue
		}
		return s.arena[off]&flag != 0
	}
}

// equalFold reports whether key, lowercased, is a prefix of lc.
func equalFold[T string | []byte](lc []byte, key T) bool {
	lc = lc[:len(key)]
	for i := range lc {
		if lc[i] != lower(key[i]) {
			return false
		}
	}
	return true
}
