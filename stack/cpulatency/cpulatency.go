// Package cpulatency keeps idle CPUs quick to wake while packets flow: it
// holds a CPU latency request of the kernel's PM QoS (/dev/cpu_dma_latency)
// from the first packet of a burst until the traffic has been quiet for
// Hold, and no request at all otherwise. Traffic is what clients send into
// the TUN (every TCP flow's client at least acknowledges); a flow that
// only receives (a one-way UDP stream to a client) does not hold it.
//
// Why: a request through tunfw wakes four tasks in turn (tunfw, the
// destination, tunfw again, the client), each often on an idle CPU. A CPU
// in a deep idle state, or a virtual CPU that halts without polling first
// (cpuidle-haltpoll with guest_halt_poll_ns 0, as on our 2-core VMs),
// takes tens of microseconds to wake: there, about 115 of the 140 us a
// 64-byte request/response through tunfw took. The price is power: CPUs
// that would sleep poll instead, for as long as packets flow.
package cpulatency

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"os"
	"sync/atomic"
	"time"

	"github.com/tunfw/tunfw/internal/config"
)

// Config is the [cpu] section.
type Config struct {
	// WakeupLatency is "off" (the default: no request) or the longest
	// time an idle CPU may take to wake while packets flow, a duration
	// in whole microseconds: "0us" keeps idle CPUs polling.
	WakeupLatency string `toml:"wakeup_latency"`
}

// DefaultConfig returns the [cpu] settings used for keys the config file
// does not set.
func DefaultConfig() Config { return Config{WakeupLatency: "off"} }

// maxLatency bounds wakeup_latency: past it no idle state of any machine
// we know is excluded, and the request would only cost a device.
const maxLatency = 10 * time.Millisecond

// Setting is a validated [cpu] section.
type Setting struct {
	// On: a request is held while packets flow.
	On bool
	// Latency is the wake-up latency requested, whole microseconds.
	Latency time.Duration
}

// Validate checks the section.
func (c Config) Validate() (Setting, error) {
	if c.WakeupLatency == "off" || c.WakeupLatency == "" {
		return Setting{}, nil
	}
	d, err := time.ParseDuration(c.WakeupLatency)
	switch {
	case err != nil:
		return Setting{}, config.Errorf("cpu.wakeup_latency", "%q is neither off nor a duration such as \"0us\"", c.WakeupLatency)
	case d < 0 || d > maxLatency:
		return Setting{}, config.Errorf("cpu.wakeup_latency", "%s is out of range 0us-%s", d, maxLatency)
	case d%time.Microsecond != 0:
		return Setting{}, config.Errorf("cpu.wakeup_latency", "%s is not whole microseconds (the kernel's unit)", d)
	}
	return Setting{On: true, Latency: d}, nil
}

// devicePath is the kernel's CPU latency QoS device: a request lives as
// long as its file is open, and writing a 32-bit value in microseconds
// changes it. Reading returns the bound all requests make together.
const devicePath = "/dev/cpu_dma_latency"

// noConstraint is the kernel's value for a request that bounds nothing
// (PM_QOS_CPU_LATENCY_DEFAULT_VALUE, 2000 s in microseconds).
const noConstraint = 2000 * 1000 * 1000

// Hold is how long the request stays after the last packet.
const Hold = time.Second

// Request is a CPU latency request held while packets flow. Active is
// called on the packet path; Run changes the request. Its methods do
// nothing on a nil Request, which is what a stack without one has.
type Request struct {
	f     *os.File
	value int32 // microseconds, while held
	hold  time.Duration
	now   func() int64 // monotonic nanoseconds, the packet loop's clock
	log   *slog.Logger

	last atomic.Int64 // now() of the latest Active
	held atomic.Bool  // the request bounds the latency
	wake chan struct{}

	changed func(held bool) // tests: after each change of the request
}

// Open registers a request that bounds nothing yet. now is the clock the
// caller passes to Active.
func Open(s Setting, now func() int64, log *slog.Logger) (*Request, error) {
	return openAt(devicePath, s, now, log)
}

// openAt is Open on another file than the kernel's device (tests: the
// machine's bound is shared by every process, the tests of other packages
// included).
func openAt(path string, s Setting, now func() int64, log *slog.Logger) (*Request, error) {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return nil, fmt.Errorf("open the CPU latency request: %w", err)
	}
	r := &Request{f: f, value: int32(s.Latency / time.Microsecond), hold: Hold, now: now, log: log, wake: make(chan struct{}, 1)}
	if err := r.set(noConstraint); err != nil {
		f.Close()
		return nil, err
	}
	return r, nil
}

// Active says that packets flow at now. It never blocks and allocates
// nothing: one atomic store, and a signal to Run when no request is held.
func (r *Request) Active(now int64) {
	if r == nil {
		return
	}
	r.last.Store(now)
	if !r.held.Load() {
		select {
		case r.wake <- struct{}{}:
		default:
		}
	}
}

// Run holds the request while Active is called, until ctx is done; then
// it bounds nothing any more.
func (r *Request) Run(ctx context.Context) {
	if r == nil {
		return
	}
	defer func() {
		if r.held.Swap(false) {
			r.change(noConstraint, false)
		}
	}()
	var t *time.Timer
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.wake:
		}
		if time.Duration(r.now()-r.last.Load()) >= r.hold {
			// A signal left from a packet that the last hold
			// covered: nothing flows now.
			continue
		}
		// held first: Active stops signalling before the request is
		// set, so a burst costs one signal.
		r.held.Store(true)
		r.change(r.value, true)
		for {
			if !r.waitQuiet(ctx, &t) {
				return
			}
			r.held.Store(false)
			if time.Duration(r.now()-r.last.Load()) >= r.hold {
				break
			}
			// A packet came after the last look but still saw held,
			// so it did not signal: it keeps the request.
			r.held.Store(true)
		}
		r.change(noConstraint, false)
	}
}

// waitQuiet returns once Active was not called for hold; false when ctx
// was done first. *t is the timer it reuses.
func (r *Request) waitQuiet(ctx context.Context, t **time.Timer) bool {
	for {
		idle := time.Duration(r.now() - r.last.Load())
		if idle >= r.hold {
			return true
		}
		if *t == nil {
			*t = time.NewTimer(r.hold - idle)
		} else {
			(*t).Reset(r.hold - idle)
		}
		select {
		case <-ctx.Done():
			(*t).Stop()
			return false
		case <-(*t).C:
		}
	}
}

// change sets the request to us and tells a test.
func (r *Request) change(us int32, held bool) {
	if err := r.set(us); err != nil {
		r.log.Warn("change the CPU latency request", "microseconds", us, "err", err)
	} else {
		r.log.Debug("CPU latency request", "held", held, "microseconds", us)
	}
	if r.changed != nil {
		r.changed(held)
	}
}

func (r *Request) set(us int32) error {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], uint32(us))
	if _, err := r.f.Write(b[:]); err != nil {
		return fmt.Errorf("write the CPU latency request: %w", err)
	}
	return nil
}

// Close removes the request; Run must have returned.
func (r *Request) Close() error {
	if r == nil {
		return nil
	}
	return r.f.Close()
}
