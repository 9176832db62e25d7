package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

// TestPrintStatusIntegers: counters print as integers, however large (they
// were decoded as floats and printed as 1.2345678e+07).
func TestPrintStatusIntegers(t *testing.T) {
	data, err := json.Marshal(statusInfo{
		Verdicts: map[string]uint64{"forwarded": 12345678, "denied": 1 << 40, "flows_created": 9007199254740993},
		Reloads:  map[string]uint64{"ok": 10000000},
	})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if code := printStatus(&out, data); code != 0 {
		t.Fatalf("printStatus: %d\n%s", code, out.String())
	}
	for _, want := range []string{"forwarded 12345678,", "denied 1099511627776,", "flows created 9007199254740993", "reloads  10000000 ok"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status lacks %q:\n%s", want, out.String())
		}
	}
}
