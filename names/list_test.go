package names

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"testing/iotest"
	"time"
)

const sampleList = "\xef\xbb\xbf# a hosts file\n" +
	"127.0.0.1 localhost\n" +
	"::1 localhost ip6-localhost ip6-loopback\n" +
	"fe80::1%lo0 localhost\n" +
	"255.255.255.255 broadcasthost\n" +
	"0.0.0.0 0.0.0.0\n" +
	"0.0.0.0 ads.example.com\n" +
	"127.0.0.1\tTracker.example.net  Pixel.example.net # two at once\r\n" +
	"\n" +
	"   \t\n" +
	"plain.example.org\n" +
	"*.wild.example.org.\n" +
	"! adblock\n" +
	"[Adblock Plus 2.0]\n" +
	"||Block.example^\n" +
	"||opts.example^$third-party,important\n" +
	"||anchored.example^|\n" +
	"@@||allowed.example^\n" +
	"example.com##.banner\n" +
	"example.com#@#.banner\n" +
	"example.com#?#div:has(> a)\n" +
	"||url.example/ads/*\n" +
	"||star*.example^\n" +
	"||noanchor.example\n" +
	"|https://url.example/\n" +
	"/ads[0-9]+/\n" +
	"basic.example^\n" +
	"||port.example^:8080\n"

func TestReadList(t *testing.T) {
	var s Set
	skipped, err := s.ReadList(strings.NewReader(sampleList), "sample.txt")
	if err != nil {
		t.Fatal(err)
	}
	// [Adblock], @@, ##, #@#, #?#, url, star, noanchor, |https, regex, basic^, port
	if skipped != 12 {
		t.Errorf("skipped = %d, want 12", skipped)
	}
	for _, tc := range []struct {
		name string
		want bool
	}{
		{"ads.example.com", true},
		{"x.ads.example.com", false}, // hosts entries are exact
		{"tracker.example.net", true},
		{"pixel.example.net", true},
		{"plain.example.org", true},
		{"a.wild.example.org", true},
		{"wild.example.org", false},
		{"block.example", true}, // ||name^: the name and all below
		{"a.b.block.example", true},
		{"opts.example", true},
		{"x.opts.example", true},
		{"anchored.example", true},
		{"allowed.example", false},
		{"localhost", false},
		{"ip6-localhost", false},
		{"broadcasthost", false},
		{"0.0.0.0", false},
		{"url.example", false},
		{"noanchor.example", false},
		{"basic.example", false},
		{"port.example", false},
		{"example.com", false},
	} {
		if got := s.MatchString(tc.name); got != tc.want {
			t.Errorf("MatchString(%q) = %v, want %v", tc.name, got, tc.want)
		}
	}
	// ads, tracker, pixel, plain, *.wild, block+*.block, opts+*, anchored+*
	if s.Len() != 11 {
		t.Errorf("Len = %d, want 11", s.Len())
	}
}

func TestReadListErrors(t *testing.T) {
	for _, tc := range []struct{ list, want string }{
		{"a.com\nb..com\n", "l.txt:2: name \"b..com\": empty label"},
		{"# c\n\n0.0.0.0 good.com bad_-.com\n", "l.txt:3: name \"bad_-.com\": label \"bad_-\" ends with a hyphen"},
		{"a.com b.com\n", "l.txt:1: \"a.com\" is neither a name nor a hosts-file address before names"},
		{"||-x.com^\n", "l.txt:1: name \"-x.com\": label starts with a hyphen"},
		{"exa mple.com\n", "l.txt:1: \"exa\" is neither a name nor a hosts-file address before names"},
		{"a.com#x\n", "l.txt:1: name \"a.com#x\": invalid character '#'"},
		{"ok.com\n" + strings.Repeat("x", maxLine+1) + "\n", fmt.Sprintf("l.txt:2: line longer than %d bytes", maxLine)},
	} {
		var s Set
		_, err := s.ReadList(strings.NewReader(tc.list), "l.txt")
		if err == nil || err.Error() != tc.want {
			t.Errorf("ReadList(%.30q) error %v, want %q", tc.list, err, tc.want)
		}
	}
}

func TestReadListReadError(t *testing.T) {
	var s Set
	boom := errors.New("boom")
	_, err := s.ReadList(iotest.ErrReader(boom), "l.txt")
	if !errors.Is(err, boom) || !strings.Contains(err.Error(), "l.txt") {
		t.Errorf("error %v, want boom wrapped with the path", err)
	}
}

// genNames returns n names of 10 to 30 bytes that look like those of block
// lists: two to four labels from syllables, digits and hyphens, under
// common TLDs. They are distinct, but one may lie below another; seed
// makes them reproducible.
func genNames(n int, seed uint64) []string {
	r := rand.New(rand.NewPCG(seed, 0x6e616d6573))
	syl := []string{"ad", "ads", "track", "er", "pix", "el", "cdn", "stat", "metr", "ic", "go", "tag", "serv", "img", "cl", "ick", "lo", "g", "data", "web", "an", "aly", "tics"}
	tlds := []string{"com", "net", "org", "io", "de", "ru", "co.uk", "info", "xyz", "cn"}
	out := make([]string, 0, n)
	seen := make(map[string]bool, n)
	var b strings.Builder
	for len(out) < n {
		b.Reset()
		labels := 1 + r.IntN(3)
		for l := 0; l < labels; l++ {
			for k := 1 + r.IntN(3); k > 0; k-- {
				b.WriteString(syl[r.IntN(len(syl))])
			}
			if r.IntN(3) == 0 {
				fmt.Fprintf(&b, "%d", r.IntN(100))
			}
			if r.IntN(5) == 0 {
				b.WriteString("-" + syl[r.IntN(len(syl))])
			}
			b.WriteByte('.')
		}
		b.WriteString(tlds[r.IntN(len(tlds))])
		if b.Len() < 10 || b.Len() > 30 || seen[b.String()] {
			continue
		}
		seen[b.String()] = true
		out = append(out, b.String())
	}
	return out
}

// writeList writes the names as a list file mixing plain, hosts and
// adblock lines and comments, and returns its path.
func writeList(tb testing.TB, names []string) string {
	p := filepath.Join(tb.TempDir(), "list.txt")
	f, err := os.Create(p)
	if err != nil {
		tb.Fatal(err)
	}
	w := bufio.NewWriter(f)
	w.WriteString("# generated\n127.0.0.1 localhost\n")
	for i := 0; i < len(names); i++ {
		switch i % 4 {
		case 0:
			fmt.Fprintf(w, "%s\n", names[i])
		case 1:
			fmt.Fprintf(w, "0.0.0.0 %s\n", names[i])
		case 2:
			if i+1 < len(names) {
				fmt.Fprintf(w, "127.0.0.1 %s %s # pair\n", names[i], names[i+1])
				i++ // case 3 done
			}
		}
		if i%4 == 3 || i == len(names)-1 {
			fmt.Fprintf(w, "||%s^$third-party\n", names[i])
		}
		if i%1000 == 0 {
			w.WriteString("! comment\n\n")
		}
	}
	if err := w.Flush(); err != nil {
		tb.Fatal(err)
	}
	if err := f.Close(); err != nil {
		tb.Fatal(err)
	}
	return p
}

// cpuTime returns the user and system time the process has used.
func cpuTime(t *testing.T) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func heapInuse() uint64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// TestLoadMillion loads a list of a million names and holds the load to
// 3 s and 150 MiB of heap.
func TestLoadMillion(t *testing.T) {
	if testing.Short() || raceEnabled {
		t.Skip("a million names: not in -short or -race runs")
	}
	const n = 1_000_000
	names := genNames(n, 42)
	p := writeList(t, names)
	fi, _ := os.Stat(p)

	// The machine may be shared with other work: the wall time is logged,
	// and the CPU time the process spent (the load and its garbage
	// collection, which bounds the wall time on an idle machine) is what
	// the test holds to 3 s.
	before := heapInuse()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cpu0 := cpuTime(t)
	start := time.Now()
	s := new(Set)
	skipped, err := s.ReadList(f, p)
	wall := time.Since(start)
	cpu := cpuTime(t) - cpu0
	if err != nil {
		t.Fatal(err)
	}
	grew := heapInuse() - before
	runtime.KeepAlive(names)

	t.Logf("%d names (%d bytes of list, %d distinct names and patterns): loaded in %v wall, %v CPU; heap grew %.1f MiB (arena %.1f MiB, table %.1f MiB)",
		n, fi.Size(), s.Len(), wall.Round(time.Millisecond), cpu.Round(time.Millisecond), float64(grew)/(1<<20),
		float64(cap(s.arena))/(1<<20), float64(8*len(s.slots))/(1<<20))
	if skipped != 0 {
		t.Errorf("skipped %d lines", skipped)
	}
	if cpu > 3*time.Second {
		t.Errorf("load took %v of CPU, want under 3s", cpu)
	}
	if grew > 150<<20 {
		t.Errorf("heap grew %d MiB, want under 150", grew>>20)
	}
	for i, name := range names {
		if !s.MatchString(name) {
			t.Fatalf("name %d %q not found", i, name)
		}
	}
	runtime.KeepAlive(s)
}

// BenchmarkHeap reports the heap a million names take in a Set, and in the
// map[string]struct{} the Set is meant to beat (names only, no patterns).
func BenchmarkHeap(b *testing.B) {
	names := genNames(1_000_000, 42)
	b.Run("Set", func(b *testing.B) {
		for b.Loop() {
			before := heapInuse()
			var s Set
			for i, n := range names {
				if i%4 == 3 {
					s.Add("*." + n)
				}
				s.Add(n)
			}
			b.ReportMetric(float64(heapInuse()-before)/(1<<20), "MiB")
			runtime.KeepAlive(&s)
		}
	})
	b.Run("map", func(b *testing.B) {
		for b.Loop() {
			before := heapInuse()
			m := make(map[string]struct{})
			for _, n := range names {
				// A copy, as a list reader would make from its line buffer.
				m[strings.Clone(n)] = struct{}{}
			}
			b.ReportMetric(float64(heapInuse()-before)/(1<<20), "MiB")
			runtime.KeepAlive(m)
		}
	})
}

func BenchmarkLoad(b *testing.B) {
	names := genNames(1_000_000, 42)
	p := writeList(b, names)
	b.ReportAllocs()
	for b.Loop() {
		f, err := os.Open(p)
		if err != nil {
			b.Fatal(err)
		}
		var s Set
		if _, err := s.ReadList(f, p); err != nil {
			b.Fatal(err)
		}
		f.Close()
	}
}

// BenchmarkMatch looks up the same few names (hits at depth, misses) in
// sets of 10 and 1M: the cost must not depend on the set's size.
func BenchmarkMatch(b *testing.B) {
	for _, n := range []int{10, 1_000_000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			names := genNames(n, 7)
			var s Set
			for i, name := range names {
				if i%2 == 0 {
					name = "*." + name
				}
				if err := s.Add(name); err != nil {
					b.Fatal(err)
				}
			}
			queries := [][]byte{
				[]byte("WWW.Static." + strings.ToUpper(names[0]) + "."), // wildcard hit, 2 below
				[]byte(names[1]), // exact hit
				[]byte("www.not-in-the-set.example.com"),
				[]byte("cdn.tracker.example.org."),
			}
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				s.Match(queries[i&3])
				i++
			}
		})
	}
}

// BenchmarkMatchSpread looks up a different name each time, so that a
// large set's table and arena are not in the CPU caches: what a busy
// firewall sees, and memory-bound at 1M.
func BenchmarkMatchSpread(b *testing.B) {
	for _, n := range []int{10, 1_000_000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			names := genNames(n, 7)
			var s Set
			for _, name := range names {
				s.Add(name)
			}
			queries := make([][]byte, 1<<16)
			for i, q := range genNames(len(queries), 8) {
				queries[i] = []byte("www." + q)
			}
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				s.Match(queries[i&(len(queries)-1)])
				i++
			}
		})
	}
}

func FuzzNormalize(f *testing.F) {
	for _, s := range []string{"example.com", "Example.COM.", "*.example.com", "*", "*.", "a..b", "-a.b", "a-.b", "_x.y", "xn--p1ai", strings.Repeat("a", 64), strings.Repeat("a.", 127) + "b", "\x00", "é.com"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		out, err := Normalize(in)
		var s Set
		addErr := s.Add(in)
		if (err == nil) != (addErr == nil) {
			t.Fatalf("Normalize error %v, Add error %v", err, addErr)
		}
		if err != nil {
			return
		}
		if again, err := Normalize(out); err != nil || again != out {
			t.Fatalf("Normalize(%q) = %q, its own Normalize = %q, %v", in, out, again, err)
		}
		if out != strings.ToLower(out) || strings.HasSuffix(out, ".") || len(out) > maxName {
			t.Fatalf("Normalize(%q) = %q, not canonical", in, out)
		}
		if s.Len() != 1 {
			t.Fatalf("Len = %d after adding %q", s.Len(), in)
		}
		if apex, ok := strings.CutPrefix(out, "*."); ok {
			if s.MatchString(apex) || s.MatchString(apex+".") {
				t.Fatalf("pattern %q matches its apex", in)
			}
			if len(apex)+2 <= maxName && !s.MatchString("a."+strings.ToUpper(apex)) {
				t.Fatalf("pattern %q does not match a name below", in)
			}
			return
		}
		if !s.MatchString(in) || !s.Match([]byte(strings.ToUpper(in))) || !s.MatchString(out+".") {
			t.Fatalf("name %q (%q) does not match itself", in, out)
		}
		if s.MatchString("a." + out) {
			t.Fatalf("name %q matches a name below it", in)
		}
	})
}

func FuzzReadList(f *testing.F) {
	f.Add([]byte(sampleList))
	f.Add([]byte("a.com\n0.0.0.0 b.com c.com\n||d.com^\n*.e.com\n"))
	f.Add([]byte("||x^$y\n@@||z^\n#c\n!c\nq.com##x\n"))
	f.Add([]byte("127.0.0.1 localhost bad..name\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		var s Set
		_, err := s.ReadList(bytes.NewReader(data), "fuzz")
		if err != nil {
			if !strings.HasPrefix(err.Error(), "fuzz:") {
				t.Fatalf("error %q does not start with the path", err)
			}
			return
		}
		// What the reader takes in, Match finds: one-name lines, the
		// names of hosts lines, and "||name^".
		for line := range bytes.Lines(bytes.TrimPrefix(data, []byte("\xef\xbb\xbf"))) {
			line = bytes.TrimSpace(line)
			if len(line) == 0 || bytes.ContainsAny(line, "#!^$|@[/") {
				if host, ok := bytes.CutPrefix(line, []byte("||")); ok && bytes.HasSuffix(host, []byte("^")) {
					host = host[:len(host)-1]
					if _, err := Normalize(string(host)); err == nil && !bytes.ContainsAny(host, "*") {
						if !s.Match(host) || !s.Match(append([]byte("x."), host...)) {
							t.Fatalf("%q read, but not matched", line)
						}
					}
				}
				continue
			}
			fields := strings.Fields(string(line))
			if len(fields) > 1 {
				if !isAddr([]byte(fields[0])) {
					t.Fatalf("%q read without error", line)
				}
				fields = fields[1:]
			}
			for _, n := range fields {
				c, err := Normalize(n)
				if err != nil {
					t.Fatalf("%q read without error, but Normalize(%q): %v", line, n, err)
				}
				if len(fields) > 1 || strings.Contains(string(line), " ") || strings.Contains(string(line), "\t") {
					if localName([]byte(c)) {
						continue
					}
				}
				if apex, ok := strings.CutPrefix(c, "*."); ok {
					n = "a." + apex
					if len(n) > maxName {
						continue
					}
				}
				if !s.MatchString(n) {
					t.Fatalf("%q read, but %q not matched", line, n)
				}
			}
		}
	})
}
