package names

import (
	"fmt"
	"strings"
	"testing"
)

func TestNormalize(t *testing.T) {
	long63 := strings.Repeat("a", 63)
	name253 := strings.Repeat(long63+".", 3) + strings.Repeat("b", 61) // 3*64+61 = 253
	for _, tc := range []struct{ in, want string }{
		{"example.com", "example.com"},
		{"Example.COM.", "example.com"},
		{"*.Example.com", "*.example.com"},
		{"*.com.", "*.com"},
		{"localhost", "localhost"},
		{"_dmarc.x-y.example", "_dmarc.x-y.example"},
		{"xn--bcher-kva.example", "xn--bcher-kva.example"},
		{"1.2.3.4", "1.2.3.4"},
		{long63 + ".com", long63 + ".com"},
		{name253, name253},
		{name253 + ".", name253},
	} {
		got, err := Normalize(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("Normalize(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
	for _, tc := range []struct{ in, why string }{
		{"", "empty name"},
		{".", "empty name"},
		{"..", "empty label"},
		{"example..com", "empty label"},
		{".example.com", "empty label"},
		{"example.com..", "empty label"},
		{"-a.com", "starts with a hyphen"},
		{"a-.com", "ends with a hyphen"},
		{"a.com-", "ends with a hyphen"},
		{long63 + "a.com", "longer than 63"},
		{name253 + "b", "longer than 253"},
		{"*", "whole first label"},
		{"*.", "whole first label"},
		{"*..", "nothing after"},
		{"*example.com", "whole first label"},
		{"*.*.example.com", "only as the whole first label"},
		{"a.*.com", "only as the whole first label"},
		{"ex ample.com", "invalid character"},
		{"exämple.com", "invalid character"},
		{"example.com/path", "invalid character"},
		{"a\x00b", "invalid character"},
	} {
		got, err := Normalize(tc.in)
		if err == nil {
			t.Errorf("Normalize(%q) = %q, want an error with %q", tc.in, got, tc.why)
		} else if !strings.Contains(err.Error(), tc.why) {
			t.Errorf("Normalize(%q) error %q, want it to say %q", tc.in, err, tc.why)
		}
	}
}

func TestNormalizeErrorTruncatesName(t *testing.T) {
	_, err := Normalize(strings.Repeat("x", 10000))
	if err == nil || len(err.Error()) > 200 {
		t.Fatalf("error for a 10000-byte name: %v", err)
	}
}

func TestNormalizeDoesNotCopyCanonical(t *testing.T) {
	if n := testing.AllocsPerRun(100, func() { Normalize("example.com.") }); n != 0 {
		t.Errorf("Normalize of a canonical name allocates %v times", n)
	}
}

func TestLower(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"", ""},
		{".", ""},
		{"example.com", "example.com"},
		{"WWW.Example.COM.", "www.example.com"},
		{"a..", "a."},                // only one dot goes
		{"AZ@[`{-_09", "az@[`{-_09"}, // only A-Z change
		{"\xc3\x89T\xc3\xa9.\xffX", "\xc3\x89t\xc3\xa9.\xffx"}, // other bytes kept
		{"x y.Example.com", "x y.example.com"},                 // nothing is refused
	} {
		if got := Lower([]byte(c.in)); got != c.want {
			t.Errorf("Lower(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

// TestLowerMatches: a name Lower returns matches as the bytes it came
// from do. (Not so for "name..": Lower leaves "name.", whose dot
// MatchString then drops too.)
func TestLowerMatches(t *testing.T) {
	var s Set
	for _, n := range []string{"example.com", "*.ads.example"} {
		if err := s.Add(n); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range []string{"EXAMPLE.com.", "x.example.com", "A.B.Ads.Example.", "ads.example", "\xffx.ads.example", "example.com.x"} {
		if got, want := s.MatchString(Lower([]byte(n))), s.Match([]byte(n)); got != want {
			t.Errorf("Lower(%q) matches %v, the name itself %v", n, got, want)
		}
	}
}

func TestLowerAllocatesOnlyItsString(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts mean nothing under -race")
	}
	long := []byte(strings.Repeat("Label.", 40) + "COM.")
	if n := testing.AllocsPerRun(1000, func() {
		if Lower(long) == "" {
			panic("empty")
		}
	}); n != 1 {
		t.Errorf("Lower allocates %v times a run, want 1", n)
	}
	if n := testing.AllocsPerRun(1000, func() { _ = Lower([]byte(".")) }); n != 0 {
		t.Errorf("Lower of an empty name allocates %v times a run", n)
	}
}

func TestMatch(t *testing.T) {
	var s Set
	for _, p := range []string{"example.com", "*.Wild.ORG", "deep.example.net", "*.deep.example.net", "*.io"} {
		if err := s.Add(p); err != nil {
			t.Fatal(err)
		}
	}
	if s.Len() != 5 {
		t.Errorf("Len = %d, want 5", s.Len())
	}
	for _, tc := range []struct {
		name string
		want bool
	}{
		{"example.com", true},
		{"EXAMPLE.Com", true},      // case
		{"example.com.", true},     // trailing dot
		{"ExAmple.COM.", true},     // both
		{"www.example.com", false}, // exact name only
		{"example.co", false},
		{"xample.com", false},
		{"example.com..", false},
		{"a.wild.org", true},
		{"A.B.C.D.WILD.ORG.", true}, // at depth
		{"wild.org", false},         // not the apex
		{"wild.org.", false},
		{"awild.org", false}, // a label boundary, not a suffix
		{".wild.org", false}, // an empty label is nothing below
		{"deep.example.net", true},
		{"x.deep.example.net", true},
		{"example.net", false},
		{"anything.io", true},
		{"io", false},
		{"", false},
		{".", false},
		{"com", false},
		{strings.Repeat("a.", 130) + "wild.org", false}, // 268 bytes
		{strings.Repeat("a", 300) + ".example.com", false},
		{strings.Repeat("a.", 122) + "wild.org", true}, // 252 bytes
	} {
		if got := s.MatchString(tc.name); got != tc.want {
			t.Errorf("MatchString(%.40q) = %v, want %v", tc.name, got, tc.want)
		}
		if got := s.Match([]byte(tc.name)); got != tc.want {
			t.Errorf("Match(%.40q) = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestZeroSet(t *testing.T) {
	var s Set
	if s.MatchString("example.com") || s.Match(nil) || s.Len() != 0 {
		t.Error("the zero Set is not empty")
	}
}

func TestAddTwice(t *testing.T) {
	var s Set
	for _, p := range []string{"a.com", "A.com.", "*.a.com", "*.A.COM"} {
		if err := s.Add(p); err != nil {
			t.Fatal(err)
		}
	}
	if s.Len() != 2 || s.entries != 1 {
		t.Errorf("Len = %d, entries = %d; want 2 and 1", s.Len(), s.entries)
	}
	if err := s.Add("a..com"); err == nil || s.Len() != 2 {
		t.Errorf("Add of a bad name: %v, Len %d", err, s.Len())
	}
}

// TestGrow adds enough names to grow the table many times and checks each
// is still found, and no other.
func TestGrow(t *testing.T) {
	var s Set
	names := make([]string, 50000)
	for i := range names {
		names[i] = fmt.Sprintf("n%d.example%d.com", i, i%97)
	}
	for i, n := range names {
		p := n
		if i%2 == 1 {
			p = "*." + n
		}
		if err := s.Add(p); err != nil {
			t.Fatal(err)
		}
	}
	for i, n := range names {
		if got := s.MatchString(n); got != (i%2 == 0) {
			t.Fatalf("MatchString(%q) = %v, want %v", n, got, i%2 == 0)
		}
		if got := s.MatchString("x." + n); got != (i%2 == 1) {
			t.Fatalf("MatchString(x.%q) = %v, want %v", n, got, i%2 == 1)
		}
		if s.MatchString(n + "x") {
			t.Fatalf("MatchString(%qx) = true", n)
		}
	}
	if 2*s.entries > len(s.slots) {
		t.Errorf("table more than half full: %d entries in %d slots", s.entries, len(s.slots))
	}
}

func TestMatchAllocatesNothing(t *testing.T) {
	var s Set
	for _, n := range genNames(1000, 2) {
		s.Add("*." + n)
		s.Add(n)
	}
	b := []byte("Some.Deep.Name.Below.Example.COM.")
	hit := []byte("X.Y." + strings.ToUpper(genNames(1, 2)[0]) + ".")
	if n := testing.AllocsPerRun(1000, func() {
		if s.Match(b) || !s.Match(hit) || s.MatchString("a.b") {
			panic("wrong answer")
		}
	}); n != 0 {
		t.Errorf("Match allocates %v times a run", n)
	}
}

// TestConcurrentMatch is for -race: readers share a built set.
func TestConcurrentMatch(t *testing.T) {
	var s Set
	names := genNames(1000, 3)
	for _, n := range names {
		s.Add("*." + n)
	}
	done := make(chan bool)
	for g := 0; g < 4; g++ {
		go func() {
			ok := true
			for _, n := range names {
				ok = ok && s.MatchString("w."+n)
			}
			done <- ok
		}()
	}
	for g := 0; g < 4; g++ {
		if !<-done {
			t.Error("a concurrent reader got a wrong answer")
		}
	}
}

func BenchmarkLower(b *testing.B) {
	name := []byte("Www.Example-CDN.Example.COM.")
	b.ReportAllocs()
	for b.Loop() {
		_ = Lower(name)
	}
}
