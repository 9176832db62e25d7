package dns

import (
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

func BenchmarkQuestion(b *testing.B) {
	b.ReportAllocs()
	var buf [255]byte
	for b.Loop() {
		if _, _, _, ok := Question(digQuery, &buf); !ok {
			b.Fatal("not read")
		}
	}
}

// BenchmarkLearn reads a typical CDN answer: a CNAME chain of two and
// four addresses, compressed.
func BenchmarkLearn(b *testing.B) {
	msg := buildResponse(b, "www.example.com.", dnsmessage.TypeA, true,
		rr{name: "www.example.com.", ttl: 300, target: "www.example.com.cdn.test."},
		rr{name: "www.example.com.cdn.test.", ttl: 60, target: "e1.cdn.test."},
		rr{name: "e1.cdn.test.", ttl: 20, addr: netip.MustParseAddr("192.0.2.1")},
		rr{name: "e1.cdn.test.", ttl: 20, addr: netip.MustParseAddr("192.0.2.2")},
		rr{name: "e1.cdn.test.", ttl: 20, addr: netip.MustParseAddr("192.0.2.3")},
		rr{name: "e1.cdn.test.", ttl: 20, addr: netip.MustParseAddr("192.0.2.4")})
	n := 0
	fn := func(string, netip.Addr, time.Duration) { n++ }
	b.ReportAllocs()
	b.SetBytes(int64(len(msg)))
	for b.Loop() {
		if err := Learn(msg, fn); err != nil {
			b.Fatal(err)
		}
	}
	if n == 0 {
		b.Fatal("nothing learned")
	}
}

func BenchmarkAnswer(b *testing.B) {
	buf := make([]byte, 0, 512)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Answer(digQuery, BlockZero, buf); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkTableLookup looks up in a full default-sized table.
func BenchmarkTableLookup(b *testing.B) {
	tab := NewTable(DefaultMaxNames)
	for i := range DefaultMaxNames {
		tab.Add(client1, netip.AddrFrom4([4]byte{192, byte(i >> 16), byte(i >> 8), byte(i)}), "www.example.com", time.Hour, t0)
	}
	addr := netip.AddrFrom4([4]byte{192, 0, 1, 2})
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := tab.Lookup(client1, addr, t0); !ok {
			b.Fatal("not found")
		}
	}
}

func BenchmarkTableAdd(b *testing.B) {
	tab := NewTable(DefaultMaxNames)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		tab.Add(client1, netip.AddrFrom4([4]byte{192, byte(i >> 16), byte(i >> 8), byte(i)}), "www.example.com", time.Hour, t0)
		i++
	}
}
