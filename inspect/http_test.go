package inspect

import (
	"bytes"
	"crypto/tls"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
)

// writeRequest returns r as net/http writes it to the wire, through a
// proxy (absolute-form) when proxy is set.
func writeRequest(t testing.TB, r *http.Request, proxy bool) []byte {
	t.Helper()
	var buf bytes.Buffer
	write := r.Write
	if proxy {
		write = r.WriteProxy
	}
	if err := write(&buf); err != nil {
		t.Fatalf("writing %s request: %v", r.Method, err)
	}
	return buf.Bytes()
}

func newRequest(t testing.TB, method, target string, body io.Reader) *http.Request {
	t.Helper()
	r, err := http.NewRequest(method, target, body)
	if err != nil {
		t.Fatalf("making request for %s: %v", target, err)
	}
	return r
}

type httpCase struct {
	name    string
	request []byte
	want    Status
	host    string
}

// realRequests are requests as net/http writes them.
func realRequests(t testing.TB) []httpCase {
	t.Helper()
	post := newRequest(t, "POST", "http://api.example.com/v1/items", strings.NewReader("a=1&b=2"))
	post.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	proxied := writeRequest(t, newRequest(t, "GET", "http://proxied.example/x?y=z", nil), true)
	// RFC 9112 3.2.2: the absolute-form's authority wins over Host.
	mismatched := bytes.Replace(proxied, []byte("\r\nHost: proxied.example\r\n"), []byte("\r\nHost: header.example\r\n"), 1)
	userinfo := newRequest(t, "GET", "http://user:secret@auth.example:8081/", nil)
	connect := &http.Request{
		Method: "CONNECT",
		URL:    &url.URL{Host: "tunnel.example:443"},
		Host:   "tunnel.example:443",
		Header: http.Header{"User-Agent": {"tunfw-test"}},
	}
	connectIP := &http.Request{
		Method: "CONNECT",
		URL:    &url.URL{Host: "[2001:db8::1]:443"},
		Host:   "[2001:db8::1]:443",
		Header: http.Header{},
	}
	lower := bytes.Replace(writeRequest(t, newRequest(t, "GET", "http://lower.example/", nil), false), []byte("\r\nHost: "), []byte("\r\nhost: "), 1)
	return []httpCase{
		{"get", writeRequest(t, newRequest(t, "GET", "http://example.com/path?q=1", nil), false), Found, "example.com"},
		{"get with port", writeRequest(t, newRequest(t, "GET", "http://example.com:8080/", nil), false), Found, "example.com"},
		{"head", writeRequest(t, newRequest(t, "HEAD", "https://www.example.org/", nil), false), Found, "www.example.org"},
		{"post with body", writeRequest(t, post, false), Found, "api.example.com"},
		{"options", writeRequest(t, newRequest(t, "OPTIONS", "http://opt.example/", nil), false), Found, "opt.example"},
		{"absolute-form", proxied, Found, "proxied.example"},
		{"absolute-form, other host header", mismatched, Found, "proxied.example"},
		{"absolute-form with userinfo", writeRequest(t, userinfo, true), Found, "auth.example"},
		{"connect", writeRequest(t, connect, false), Found, "tunnel.example"},
		{"lowercase host", lower, Found, "lower.example"},
		{"trailing dot", writeRequest(t, newRequest(t, "GET", "http://dot.example./", nil), false), Found, "dot.example."},
		{"ipv4", writeRequest(t, newRequest(t, "GET", "http://192.0.2.1:8080/", nil), false), NoName, ""},
		{"ipv6", writeRequest(t, newRequest(t, "GET", "http://[2001:db8::1]:8080/", nil), false), NoName, ""},
		{"ipv4 absolute-form", writeRequest(t, newRequest(t, "GET", "http://192.0.2.1/", nil), true), NoName, ""},
		{"connect ipv6", writeRequest(t, connectIP, false), NoName, ""},
	}
}

func TestHTTPHostReal(t *testing.T) {
	for _, tc := range realRequests(t) {
		t.Run(tc.name, func(t *testing.T) {
			name, st := HTTPHost(tc.request)
			if st != tc.want || string(name) != tc.host {
				t.Fatalf("got %q %v, want %q %v\n%s", name, st, tc.host, tc.want, tc.request)
			}
			if st == Found && !within(name, tc.request) {
				t.Fatal("name is not a slice of the stream")
			}
			// Every prefix short of the blank line needs more.
			end := bytes.Index(tc.request, []byte("\r\n\r\n")) + 4
			for i := range end {
				if name, st := HTTPHost(tc.request[:i]); st != NeedMore {
					t.Fatalf("prefix of %d/%d bytes: got %q %v, want need-more", i, end, name, st)
				}
			}
			// The same request with bare LF line ends.
			lf := bytes.ReplaceAll(tc.request[:end], []byte("\r\n"), []byte("\n"))
			if name, st := HTTPHost(lf); st != tc.want || string(name) != tc.host {
				t.Fatalf("LF line ends: got %q %v, want %q %v", name, st, tc.host, tc.want)
			}
		})
	}
}

func TestHTTPHostBuilt(t *testing.T) {
	for _, tc := range []struct {
		name    string
		request string
		want    Status
		host    string
	}{
		{"http/1.0 without host", "GET / HTTP/1.0\r\nUser-Agent: x\r\n\r\n", NoName, ""},
		{"empty host", "GET / HTTP/1.1\r\nHost:\r\n\r\n", NoName, ""},
		{"host with spaces and tabs around", "GET / HTTP/1.1\r\nHost: \t ows.example \t\r\n\r\n", Found, "ows.example"},
		{"host after other headers", "GET / HTTP/1.1\r\nAccept: */*\r\nX-A: b\r\nHOST: late.example:80\r\n\r\n", Found, "late.example"},
		{"empty port", "GET / HTTP/1.1\r\nHost: e.example:\r\n\r\n", Found, "e.example"},
		{"asterisk", "OPTIONS * HTTP/1.1\r\nHost: star.example\r\n\r\n", Found, "star.example"},
		{"short ipv4", "GET / HTTP/1.1\r\nHost: 127.1\r\n\r\n", NoName, ""},
		{"hex ipv4", "GET / HTTP/1.1\r\nHost: 0x7f.0.0.1\r\n\r\n", NoName, ""},
		{"numeric last label", "GET / HTTP/1.1\r\nHost: example.123\r\n\r\n", NoName, ""},
		{"numeric first label", "GET / HTTP/1.1\r\nHost: 123.example\r\n\r\n", Found, "123.example"},
		{"name of 255", "GET / HTTP/1.1\r\nHost: " + strings.Repeat("n", 255) + "\r\n\r\n", Found, strings.Repeat("n", 255)},
		{"name of 256", "GET / HTTP/1.1\r\nHost: " + strings.Repeat("n", 256) + "\r\n\r\n", Invalid, ""},
		{"two hosts", "GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n", Invalid, ""},
		{"two hosts, cases differ", "GET / HTTP/1.1\r\nHost: a.example\r\nhOsT: a.example\r\n\r\n", Invalid, ""},
		{"obs-fold", "GET / HTTP/1.1\r\nX-Folded: a\r\n b\r\nHost: f.example\r\n\r\n", Invalid, ""},
		{"obs-fold continuing host", "GET / HTTP/1.1\r\nHost: f.example\r\n\tevil.example\r\n\r\n", Invalid, ""},
		{"space before colon", "GET / HTTP/1.1\r\nHost : s.example\r\n\r\n", Invalid, ""},
		{"line without colon", "GET / HTTP/1.1\r\nHost s.example\r\n\r\n", Invalid, ""},
		{"bare cr in header", "GET / HTTP/1.1\r\nX: a\rHost: cr.example\r\n\r\n", Invalid, ""},
		{"port not numeric", "GET / HTTP/1.1\r\nHost: p.example:http\r\n\r\n", Invalid, ""},
		{"only a port", "GET / HTTP/1.1\r\nHost: :80\r\n\r\n", Invalid, ""},
		{"unbracketed ipv6", "GET / HTTP/1.1\r\nHost: 2001:db8::1\r\n\r\n", Invalid, ""},
		{"unclosed bracket", "GET / HTTP/1.1\r\nHost: [2001:db8::1\r\n\r\n", Invalid, ""},
		{"relative target without slash", "GET example.com HTTP/1.1\r\nHost: x.example\r\n\r\n", Invalid, ""},
		{"connect origin-form", "CONNECT / HTTP/1.1\r\nHost: x.example\r\n\r\n", Invalid, ""},
		{"empty target", "GET  HTTP/1.1\r\nHost: x.example\r\n\r\n", Invalid, ""},
		{"version with junk", "GET / HTTP/1.1x\r\nHost: x.example\r\n\r\n", Invalid, ""},
		{"control byte in target", "GET /\x01 HTTP/1.1\r\nHost: x.example\r\n\r\n", Invalid, ""},
		{"http/2 version", "GET / HTTP/2.0\r\nHost: x.example\r\n\r\n", NoName, ""},
		{"http/0.9", "GET /\r\n", NoName, ""},
		{"file scheme, no authority", "GET file:///etc/passwd HTTP/1.1\r\nHost: x.example\r\n\r\n", NoName, ""},
	} {
		name, st := HTTPHost([]byte(tc.request))
		if st != tc.want || string(name) != tc.host {
			t.Errorf("%s: got %q %v, want %q %v", tc.name, name, st, tc.host, tc.want)
		}
	}
}

func TestHTTPHostHeadersNeverEnd(t *testing.T) {
	r := writeRequest(t, newRequest(t, "GET", "http://slow.example/", nil), false)
	open := r[:len(r)-2] // the last header's CRLF, not the blank line
	for i := 0; i < 200; i++ {
		open = append(open, "X-Pad-"+itoa(i)+": "+strings.Repeat("v", 40)+"\r\n"...)
	}
	for i := range len(open) + 1 {
		if name, st := HTTPHost(open[:i]); st != NeedMore {
			t.Fatalf("%d bytes of an unfinished header block: got %q %v", i, name, st)
		}
	}
	name, st := HTTPHost(append(open, "\r\n"...))
	if st != Found || string(name) != "slow.example" {
		t.Fatalf("once the block ends: got %q %v", name, st)
	}
}

func TestHTTPHostNotHTTP(t *testing.T) {
	tlsHello := captureClientHello(t, &tls.Config{ServerName: "example.com"})
	for _, tc := range []struct {
		name   string
		stream []byte
		decide int // bytes after which the answer is NoName
	}{
		{"ssh banner", []byte("SSH-2.0-OpenSSH_9.6\r\n"), 1},
		{"tls hello", tlsHello, 1},
		{"h2 preface", []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 2},
		{"lowercase method", []byte("get / HTTP/1.1\r\n"), 1},
		{"smtp command", []byte("EHLO mail.example\r\n"), 1},
		{"unknown method", []byte("GETX / HTTP/1.1\r\n"), 4},
		{"method without space", []byte("CONNECTED"), 8},
		{"http/2 version", []byte("GET / HTTP/2.0\r\n"), 12},
	} {
		for i := 1; i <= len(tc.stream); i++ {
			_, st := HTTPHost(tc.stream[:i])
			want := NoName
			if i < tc.decide {
				want = NeedMore
			}
			if st != want {
				t.Errorf("%s, %d bytes: got %v, want %v", tc.name, i, st, want)
			}
		}
	}
	seed := uint32(7)
	for range 1000 {
		b := make([]byte, 64)
		for i := range b {
			seed = seed*1664525 + 1013904223
			b[i] = byte(seed >> 24)
		}
		if _, st := HTTPHost(b[:8]); st != NoName {
			t.Fatalf("random stream % x: got %v on its first 8 bytes", b[:8], st)
		}
	}
}

func TestHTTPHostAllocatesNothing(t *testing.T) {
	for _, tc := range realRequests(t) {
		if a := testing.AllocsPerRun(100, func() { HTTPHost(tc.request) }); a != 0 {
			t.Errorf("%s: %v allocations per run, want 0", tc.name, a)
		}
	}
}

func FuzzHTTPHost(f *testing.F) {
	for _, tc := range realRequests(f) {
		f.Add(tc.request, uint16(len(tc.request)/2))
	}
	f.Add([]byte("GET / HTTP/1.1\r\nHost: a\r\n b\r\n\r\n"), uint16(20))
	f.Add([]byte("CONNECT [::1]:443 HTTP/1.1\n\n"), uint16(9))
	f.Fuzz(func(t *testing.T, data []byte, cut uint16) {
		name, st := HTTPHost(data)
		if st == Found && (len(name) == 0 || len(name) > maxNameLen || !within(name, data) || bytes.IndexByte(name, ':') >= 0) {
			t.Fatalf("found bad name %q", name)
		}
		if st != Found && name != nil {
			t.Fatalf("%v with a name", st)
		}
		p := data[:int(cut)%(len(data)+1)]
		pname, pst := HTTPHost(p)
		if pst != NeedMore && (pst != st || !bytes.Equal(pname, name)) {
			t.Fatalf("prefix of %d/%d bytes: %q %v, whole: %q %v", len(p), len(data), pname, pst, name, st)
		}
	})
}

func BenchmarkHTTPHost(b *testing.B) {
	r := newRequest(b, "GET", "http://www.example.com/index.html", nil)
	r.Header.Set("User-Agent", "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0")
	r.Header.Set("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8")
	r.Header.Set("Accept-Language", "en-US,en;q=0.5")
	r.Header.Set("Accept-Encoding", "gzip, deflate")
	r.Header.Set("Connection", "keep-alive")
	stream := writeRequest(b, r, false)
	b.Run(itoa(len(stream))+"B", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(stream)))
		for b.Loop() {
			if _, st := HTTPHost(stream); st != Found {
				b.Fatal(st)
			}
		}
	})
}
