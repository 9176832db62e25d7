package main

import (
	"bytes"
	"encoding/json"
	"net/netip"
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
			State: "new", Rule: "default", Verdict: "deny", Monitor: true},
	}
	for _, fl := range [][]filter.FlowInfo{nil, flows[:1], flows} {
		want, err := json.Marshal(fl)
		if err != nil {
			t.Fatal(err)
		}
		if fl == nil {
			want = []byte("[]")
		}
		if got := marshalFlows(fl, false); !bytes.Equal(got, want) {
			t.Errorf("got  %s\nwant %s", got, want)
		}
	}
}
