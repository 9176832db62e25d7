package stack

import (
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/stack/echo"
)

// testEngineStack returns a Stack with an engine and no device or
// sockets, for the parts that only keep state.
func testEngineStack(t *testing.T, lim filter.EngineLimits) *Stack {
	t.Helper()
	rs, err := filter.Compile(filter.Options{}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	eng := filter.NewEngine(rs, filter.EngineOptions{})
	eng.SetLimits(lim)
	return &Stack{eng: eng, epoch: time.Now(), log: slog.New(slog.NewTextHandler(io.Discard, nil))}
}

// TestPerSourceBound: one client's share of UDP or echo flows is a quarter
// of max_flows (64 at least) with no max_flows_per_source, that bound when
// set, and never more than the kind's default.
func TestPerSourceBound(t *testing.T) {
	for _, c := range []struct {
		lim  filter.EngineLimits
		want int
	}{
		{filter.EngineLimits{MaxFlows: 1000}, 250},
		{filter.EngineLimits{MaxFlows: 100}, 64},
		{filter.EngineLimits{MaxFlows: 1000, MaxFlowsPerSource: 10}, 10},
		{filter.EngineLimits{}, echo.DefaultMaxPerSource},
	} {
		s := testEngineStack(t, c.lim)
		if got := s.perSourceBound(0, echo.DefaultMaxPerSource); got != c.want {
			t.Errorf("%+v: echo flows per source %d, want %d", c.lim, got, c.want)
		}
	}
	if got := testEngineStack(t, filter.EngineLimits{}).perSourceBound(7, echo.DefaultMaxPerSource); got != 7 {
		t.Errorf("configured bound: %d, want 7", got)
	}
}
