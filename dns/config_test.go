package dns

import (
	"fmt"
	"slices"
	"testing"

	"github.com/BurntSushi/toml"

	"github.com/tunfw/tunfw/internal/config"
)

// decodeSection decodes doc's [dns] as the loader does and reports its
// errors as "file:line: key: message".
func decodeSection(t *testing.T, doc string) (Options, []string) {
	t.Helper()
	var layout struct {
		DNS Config `toml:"dns"`
	}
	md, err := toml.Decode(doc, &layout)
	if err != nil {
		t.Fatalf("decoding %q: %v", doc, err)
	}
	if u := md.Undecoded(); len(u) > 0 {
		t.Fatalf("undecoded keys %v", u)
	}
	o, err := layout.DNS.Validate()
	lines := config.Locate([]byte(doc))
	var msgs []string
	for _, e := range config.Errors(err) {
		fe, ok := config.AsField(e)
		if !ok {
			t.Fatalf("error without key: %v", e)
		}
		msgs = append(msgs, fmt.Sprintf("c.toml:%d: %v", lines.Line(fe.Key), fe))
	}
	return o, msgs
}

// TestConfig: an empty or missing section gives the defaults; set keys are
// kept, false and explicit values included; bad values are reported with
// file, line and key.
func TestConfig(t *testing.T) {
	for _, doc := range []string{"", "[dns]\n"} {
		if o, errs := decodeSection(t, doc); o != DefaultOptions() || errs != nil {
			t.Errorf("%q: %+v %v", doc, o, errs)
		}
	}
	if d := DefaultOptions(); d != (Options{Snoop: true, Block: BlockNXDomain, MaxNames: 100000}) {
		t.Errorf("defaults %+v", d)
	}
	o, errs := decodeSection(t, "[dns]\nsnoop = false\nblock = \"zero\"\nmax_names = 1\n")
	if o != (Options{Snoop: false, Block: BlockZero, MaxNames: 1}) || errs != nil {
		t.Errorf("set: %+v %v", o, errs)
	}
	for _, m := range []BlockMode{BlockNXDomain, BlockRefused, BlockZero, BlockDrop} {
		o, errs := decodeSection(t, fmt.Sprintf("[dns]\nblock = %q\n", m))
		if o.Block != m || errs != nil {
			t.Errorf("block %v: %+v %v", m, o, errs)
		}
	}
	_, errs = decodeSection(t, "# tunfw\n[dns]\nsnoop = true\nblock = \"NXDOMAIN\"\nmax_names = 0\n")
	want := []string{
		`c.toml:4: dns.block: "NXDOMAIN" is not one of nxdomain, refused, zero, drop`,
		"c.toml:5: dns.max_names: 0 is not in 1-10000000 (snoop = false learns nothing)",
	}
	if !slices.Equal(errs, want) {
		t.Errorf("errors:\n%q\nwant\n%q", errs, want)
	}
	if _, errs := decodeSection(t, "[dns]\nmax_names = 10000001\n"); len(errs) != 1 {
		t.Errorf("max_names too large: %v", errs)
	}
	if s := BlockMode(7).String(); s != "BlockMode(7)" {
		t.Errorf("String = %q", s)
	}
}
