package tcpfwd

import (
	"strings"
	"testing"
	"time"
)

// TestDialLimitsValidate: defaults for keys left out, the per-source share
// at most the pool, and every bad key named.
func TestDialLimitsValidate(t *testing.T) {
	l, err := LimitsConfig{}.Validate()
	if err != nil || l != (DialLimits{DefaultDialTimeout, DefaultMaxPendingDials, DefaultMaxPendingDialsPerSource}) {
		t.Errorf("defaults: %+v, %v", l, err)
	}
	if l, err := (LimitsConfig{DialTimeout: "5s", MaxPendingDials: 64}).Validate(); err != nil || l != (DialLimits{5 * time.Second, 64, 64}) {
		t.Errorf("dial limits: %+v, %v", l, err)
	}
	_, err = LimitsConfig{DialTimeout: "0s", MaxPendingDials: MaxPendingDialsCap + 1, MaxPendingDialsPerSource: -1}.Validate()
	for _, key := range []string{"limits.dial_timeout", "limits.max_pending_dials", "limits.max_pending_dials_per_source"} {
		if err == nil || !strings.Contains(err.Error(), key+":") {
			t.Errorf("missing error for %s in %v", key, err)
		}
	}
}
