package inspect

import (
	"strings"
	"testing"
	"time"
)

func TestConfigValidate(t *testing.T) {
	o, err := Config{}.Validate()
	if err != nil || o != DefaultOptions() {
		t.Fatalf("empty [inspect]: %+v, %v", o, err)
	}
	n := 4096
	o, err = Config{Timeout: "150ms", MaxBytes: &n, MaxPending: 10}.Validate()
	if err != nil || o.Timeout != 150*time.Millisecond || o.MaxBytes != 4096 || o.MaxPending != 10 {
		t.Fatalf("valid [inspect]: %+v, %v", o, err)
	}
	small := 10
	_, err = Config{Timeout: "soon", MaxBytes: &small, MaxPending: -1}.Validate()
	for _, want := range []string{"inspect.timeout", "inspect.max_bytes: 10 is not in", "inspect.max_pending"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("bad [inspect]: error %v lacks %q", err, want)
		}
	}
}
