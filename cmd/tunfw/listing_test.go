package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tunfw/tunfw/filter"
)

// The hand-written encoding is byte for byte what encoding/json makes.
func TestMarshalFlowsMatchesEncodingJSON(t *testing.T) {
	flows := []filter.FlowInfo{
		{Proto: "tcp", Src: netip.MustParseAddrPort("10.0.0.2:40000"), Dst: netip.MustParseAddrPort("[2001:db8::1]:443"),
			State: "established", Rule: `web "<&>" \ é`, Verdict: "allow", Age: 3 * time.Second, Idle: -1,
			PacketsIn: 1, BytesIn: 2, PacketsOut: 3, BytesOut: 1 << 60},
		{Proto: "icmp", Src: netip.MustParseAddrPort("10.0.0.2:7"), Dst: netip.MustParseAddrPort("192.0.2.1:0"),
			State: "new", Rule: "default", Verdict: "deny", Monitor: true, Age: time.Second},
		{Proto: "tcp", Src: netip.MustParseAddrPort("10.0.0.2:40001"), Dst: netip.MustParseAddrPort("192.0.2.1:443"),
			State: "established", Rule: "github", Verdict: "allow", Name: "api.github.com", NameFrom: "sni"},
		{Proto: "udp", Src: netip.MustParseAddrPort("10.0.0.2:40002"), Dst: netip.MustParseAddrPort("192.0.2.1:443"),
			State: "new", Rule: "x", Verdict: "peek", Name: "we<ird>\"na&me\x01é", NameFrom: "quic"},
	}
	for _, fl := range [][]filter.FlowInfo{nil, flows[:1], flows} {
		want, err := json.Marshal(fl)
		if err != nil {
			t.Fatal(err)
		}
		if fl == nil {
			want = []byte("[]")
		}
		if got := marshalFlows(fl); !bytes.Equal(got, want) {
			t.Errorf("got  %s\nwant %s", got, want)
		}
	}
}

// The client prints a listing as json.Indent would print it ordered
// oldest first (stable), whatever the rule names hold.
func TestPrintFlowsJSONOldestFirst(t *testing.T) {
	var flows []filter.FlowInfo
	rules := []string{`a{"age_ns":99}`, "b}]", `c\"age_ns\":7,`, "d", "e[{"}
	for i, age := range []time.Duration{3, 9, 1, 9, 5} {
		flows = append(flows, filter.FlowInfo{Proto: "udp", Rule: rules[i], Age: age, PacketsIn: uint64(i)})
	}
	sorted := []filter.FlowInfo{flows[1], flows[3], flows[4], flows[0], flows[2]}
	for _, tc := range []struct{ in, want []filter.FlowInfo }{{nil, nil}, {flows[:1], flows[:1]}, {flows, sorted}} {
		want, _ := json.Marshal(tc.want)
		if tc.want == nil {
			want = []byte("[]")
		}
		var ind bytes.Buffer
		json.Indent(&ind, want, "", "  ")
		ind.WriteByte('\n')
		var got bytes.Buffer
		if err := printFlowsJSON(&got, marshalFlows(tc.in)); err != nil || got.String() != ind.String() {
			t.Errorf("got %v\n%s\nwant\n%s", err, got.Bytes(), ind.Bytes())
		}
	}
	// What is not a listing of flows is indented as a whole, or its
	// error reported.
	for _, tc := range []struct{ in, want string }{
		{" [ ] ", "[]\n"}, {`{"a":1}`, "{\n  \"a\": 1\n}\n"}, {`[1,2]`, "[\n  1,\n  2\n]\n"},
		{"", "error"}, {"[", "error"}, {`[{"age_ns":1}`, "error"}, {`[{"age_ns":1},]`, "error"}, {`[{"age_ns":1}]x`, "error"},
		{`[{"age_ns":1,}]`, "error"},
	} {
		var got bytes.Buffer
		err := printFlowsJSON(&got, []byte(tc.in))
		if tc.want == "error" && err == nil || tc.want != "error" && (err != nil || got.String() != tc.want) {
			t.Errorf("printFlowsJSON(%q) = %q, %v; want %q", tc.in, got.Bytes(), err, tc.want)
		}
	}
}

// failWriter fails every write after the first.
type failWriter struct{ writes int }

func (w *failWriter) Write(p []byte) (int, error) {
	if w.writes++; w.writes > 1 {
		return 0, errors.New("gone")
	}
	return len(p), nil
}

// A listing is written a chunk at a time, and a client that went away
// stops the writes (the encoding of the rest is skipped by the caller).
func TestListingWritesChunks(t *testing.T) {
	var w failWriter
	l := listing{w: &w}
	fi := filter.FlowInfo{Proto: "tcp", Rule: "r", Verdict: "allow"}
	for range 3 * flowsChunk {
		if l.err == nil {
			l.add(&fi)
		}
	}
	if err := l.end(); err == nil || w.writes != 2 || l.n != flowsChunk+flowsChunk {
		t.Errorf("after a failed write: err %v, %d writes, %d flows encoded; want an error, 2 writes, %d flows", err, w.writes, l.n, 2*flowsChunk)
	}
}

// TestOneListingAtATime: a listing requested while another streams to a
// client that reads slowly waits a bounded time and is told why, instead
// of waiting for as long as that client takes.
func TestOneListingAtATime(t *testing.T) {
	d, _ := reloadDaemon(t, reloadBase)
	d.listing, d.listWait = make(chan struct{}, 1), 50*time.Millisecond
	first := d.flows(func(filter.FlowInfo) bool { return true })
	if !first.OK || first.Stream == nil {
		t.Fatalf("first listing: %+v", first)
	}
	start := time.Now()
	second := d.flows(func(filter.FlowInfo) bool { return true })
	if second.OK || !strings.Contains(second.Error, "another `tunfw flows` is running") || time.Since(start) > 5*time.Second {
		t.Errorf("second listing while the first runs: %+v after %v", second, time.Since(start))
	}
	if err := first.Stream(io.Discard); err != nil {
		t.Fatal(err)
	}
	if third := d.flows(func(filter.FlowInfo) bool { return true }); !third.OK {
		t.Errorf("a listing after the first ended: %+v", third)
	} else {
		third.Stream(io.Discard)
	}
}
