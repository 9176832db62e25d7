package cpulatency

import (
	"context"
	"encoding/binary"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestValidate(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want Setting
		err  string
	}{
		{in: "off"},
		{in: ""},
		{in: "0us", want: Setting{On: true}},
		{in: "50us", want: Setting{On: true, Latency: 50 * time.Microsecond}},
		{in: "10ms", want: Setting{On: true, Latency: 10 * time.Millisecond}},
		{in: "on", err: `"on" is neither off nor a duration`},
		{in: "-1us", err: "out of range"},
		{in: "11ms", err: "out of range"},
		{in: "1500ns", err: "not whole microseconds"},
	} {
		got, err := Config{WakeupLatency: tt.in}.Validate()
		switch {
		case tt.err != "":
			if err == nil || !strings.Contains(err.Error(), tt.err) || !strings.Contains(err.Error(), "cpu.wakeup_latency") {
				t.Errorf("%q: error %v, want one naming cpu.wakeup_latency with %q", tt.in, err, tt.err)
			}
		case err != nil:
			t.Errorf("%q: %v", tt.in, err)
		case got != tt.want:
			t.Errorf("%q: %+v, want %+v", tt.in, got, tt.want)
		}
	}
	if s, err := DefaultConfig().Validate(); err != nil || s.On {
		t.Errorf("default: %+v %v, want off", s, err)
	}
}

// TestRequestHeldWhilePacketsFlow: opening bounds nothing, the first
// packet sets the bound, packets keep it past the hold time, quiet
// releases it, a new burst sets it again and the end of Run releases it.
// The request is written to a file in place of the kernel's device, which
// every process shares (e2e's TestCPULatencyWhileForwarding uses it).
func TestRequestHeldWhilePacketsFlow(t *testing.T) {
	epoch := time.Now()
	now := func() int64 { return int64(time.Since(epoch)) }
	path := filepath.Join(t.TempDir(), "cpu_dma_latency")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// requested is the value written last, as the kernel keeps it.
	requested := func() int32 {
		t.Helper()
		b, err := os.ReadFile(path)
		if err != nil || len(b) < 4 || len(b)%4 != 0 {
			t.Fatalf("request file holds %d bytes (%v), want 32-bit values", len(b), err)
		}
		return int32(binary.NativeEndian.Uint32(b[len(b)-4:]))
	}
	r, err := openAt(path, Setting{On: true, Latency: 20 * time.Microsecond}, now, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	// A hold long enough that the pacing below cannot miss it on a
	// loaded machine.
	r.hold = 300 * time.Millisecond
	changes := make(chan bool, 8)
	r.changed = func(held bool) { changes <- held }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	if got := requested(); got != noConstraint {
		t.Fatalf("an open request with no packets yet is %d us, want no bound", got)
	}
	expect := func(want bool) {
		t.Helper()
		select {
		case held := <-changes:
			if held != want {
				t.Fatalf("request held=%v, want %v", held, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("request did not change to held=%v", want)
		}
	}
	r.Active(now())
	expect(true)
	if got := requested(); got != 20 {
		t.Fatalf("request while packets flow is %d us, want 20", got)
	}
	// Packets every 10 ms for three hold times: the request stays.
	for end := time.Now().Add(3 * r.hold); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		r.Active(now())
	}
	select {
	case held := <-changes:
		t.Fatalf("request changed to held=%v while packets flowed", held)
	default:
	}
	expect(false)
	if got := requested(); got != noConstraint {
		t.Fatalf("request after the traffic stopped is %d us, want no bound", got)
	}
	r.Active(now())
	expect(true)
	cancel()
	expect(false)
	if got := requested(); got != noConstraint {
		t.Fatalf("request after Run ended is %d us, want no bound", got)
	}
}

// TestOpenNeedsTheDevice: without the device (or the right to it) Open
// says what it could not do.
func TestOpenNeedsTheDevice(t *testing.T) {
	_, err := openAt(filepath.Join(t.TempDir(), "none"), Setting{On: true}, nil, nil)
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), "open the CPU latency request") {
		t.Errorf("error %v, want a wrapped not-exist", err)
	}
}

// TestActiveIsCheap: the packet path's call allocates nothing and does not
// block when nobody takes its signal, nor on a nil Request.
func TestActiveIsCheap(t *testing.T) {
	r := &Request{wake: make(chan struct{}, 1)}
	var nilReq *Request
	if n := testing.AllocsPerRun(1000, func() { r.Active(1); nilReq.Active(1) }); n != 0 {
		t.Errorf("Active allocates %v times", n)
	}
	if r.last.Load() != 1 || len(r.wake) != 1 {
		t.Errorf("Active left last=%d and %d signals, want 1 and 1", r.last.Load(), len(r.wake))
	}
}

// TestStaleSignalHoldsNothing: a signal left in the channel from a packet
// an earlier hold covered does not set the request again once the traffic
// is over.
func TestStaleSignalHoldsNothing(t *testing.T) {
	var clock atomic.Int64
	now := func() int64 { return clock.Load() }
	path := filepath.Join(t.TempDir(), "cpu_dma_latency")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := openAt(path, Setting{On: true}, now, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	changes := make(chan bool, 8)
	r.changed = func(held bool) { changes <- held }
	// A packet long ago, its signal still pending.
	r.Active(0)
	clock.Store(int64(10 * r.hold))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Run(ctx); close(done) }()
	// Run takes the signal; a fresh packet then holds the request, so
	// the first change seen says whether the stale one did.
	r.wake <- struct{}{}
	r.last.Store(clock.Load())
	r.Active(clock.Load())
	select {
	case held := <-changes:
		if !held {
			t.Fatalf("first change let go of a request never held")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a fresh packet did not hold the request")
	}
	cancel()
	<-done
	close(changes)
	n := 0
	for held := range changes {
		if held {
			n++
		}
	}
	if n != 0 {
		t.Errorf("request held %d more times after the fresh packet's", n)
	}
}
