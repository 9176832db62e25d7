package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/netip"
	"slices"
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

// The client orders a listing oldest first (stable), whatever the rule
// names hold, and keeps each flow's bytes as the daemon sent them.
func TestSortFlowsJSONOldestFirst(t *testing.T) {
	var flows []filter.FlowInfo
	rules := []string{`a{"age_ns":99}`, "b}]", `c\"age_ns\":7,`, "d", "e[{"}
	for i, age := range []time.Duration{3, 9, 1, 9, 5} {
		flows = append(flows, filter.FlowInfo{Proto: "udp", Rule: rules[i], Age: age, PacketsIn: uint64(i)})
	}
	sorted := sortFlowsJSON(marshalFlows(flows))
	var got []filter.FlowInfo
	if err := json.Unmarshal(sorted, &got); err != nil {
		t.Fatalf("%v: %s", err, sorted)
	}
	var order []uint64
	for _, f := range got {
		order = append(order, f.PacketsIn)
	}
	if want := []uint64{1, 3, 4, 0, 2}; !slices.Equal(order, want) {
		t.Errorf("order %v, want %v", order, want)
	}
	for i, f := range got {
		if f != flows[order[i]] {
			t.Errorf("flow %d came back as %+v, want %+v", i, f, flows[order[i]])
		}
	}
	// What is not a listing is left for the caller to report.
	for _, bad := range []string{"", "[", `[{"age_ns":1}`, `{"a":1}`, `[{"age_ns":1},]x`, `[1,2]`} {
		if got := sortFlowsJSON([]byte(bad)); string(got) != bad {
			t.Errorf("sortFlowsJSON(%q) = %q, want it unchanged", bad, got)
		}
	}
	if got := string(sortFlowsJSON([]byte(" [ ] "))); got != "[]" {
		t.Errorf("empty listing became %q", got)
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
