package main

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/tunfw/tunfw/filter"
)

// The text of `tunfw flows` and `tunfw stats` names the directions as
// --json and the metrics do: "in" is what the client sent. They used to
// print bytes_in under "BYTES OUT" (and as "bytes out"), so the same word
// meant opposite counters in the text and in --json or a scrape.
func TestTextDirectionsMatchJSON(t *testing.T) {
	flows := []filter.FlowInfo{{
		Proto: "tcp", Src: netip.MustParseAddrPort("10.0.0.2:40000"), Dst: netip.MustParseAddrPort("192.0.2.1:443"),
		State: "established", Rule: "default", Verdict: "allow", Age: time.Second,
		PacketsIn: 3, BytesIn: 111, PacketsOut: 4, BytesOut: 222222,
	}}
	data, err := json.Marshal(flows)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if rc := printFlows(&out, data); rc != 0 {
		t.Fatalf("printFlows: %d\n%s", rc, out.String())
	}
	lines := strings.Split(out.String(), "\n")
	// Columns are separated by at least two spaces ("BYTES IN" holds one).
	cols := regexp.MustCompile(`\s{2,}`)
	head, row := cols.Split(strings.TrimSpace(lines[0]), -1), cols.Split(strings.TrimSpace(lines[1]), -1)
	if len(head) != len(row) {
		t.Fatalf("header %q and row %q differ in columns", head, row)
	}
	got := map[string]string{}
	for i, h := range head {
		got[h] = row[i]
	}
	if got["BYTES IN"] != "111" || got["BYTES OUT"] != "222222" {
		t.Errorf("flows text: BYTES IN %q, BYTES OUT %q; want 111 (bytes_in, client to destination) and 222222 (bytes_out)\n%s",
			got["BYTES IN"], got["BYTES OUT"], out.String())
	}
	if !strings.Contains(out.String(), "BYTES IN: client to destination") {
		t.Errorf("flows text does not say that IN is client to destination:\n%s", out.String())
	}

	st, err := json.Marshal(statsInfo{Forwarded: 7, BytesIn: 333, BytesOut: 444444})
	if err != nil {
		t.Fatal(err)
	}
	out.Reset()
	if rc := printStats(&out, st); rc != 0 {
		t.Fatalf("printStats: %d\n%s", rc, out.String())
	}
	if !strings.Contains(out.String(), "333 bytes in from clients, 444444 bytes out to them") {
		t.Errorf("stats text does not name bytes_in 333 as in and bytes_out 444444 as out:\n%s", out.String())
	}
}
