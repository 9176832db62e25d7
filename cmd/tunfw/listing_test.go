package main

import (
	"bytes"
	"encoding/json"
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
	// flows is oldest first, as marshalFlows orders it.
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

func TestMarshalFlowsOldestFirst(t *testing.T) {
	var flows []filter.FlowInfo
	for _, age := range []time.Duration{3, 9, 1, 9, 5} {
		flows = append(flows, filter.FlowInfo{Proto: "udp", Age: age, PacketsIn: uint64(len(flows))})
	}
	var got []filter.FlowInfo
	if err := json.Unmarshal(marshalFlows(flows), &got); err != nil {
		t.Fatal(err)
	}
	var order []uint64
	for _, f := range got {
		order = append(order, f.PacketsIn)
	}
	if want := []uint64{1, 3, 4, 0, 2}; !slices.Equal(order, want) {
		t.Errorf("order %v, want %v", order, want)
	}
}
