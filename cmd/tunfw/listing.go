package main

import (
	"cmp"
	"encoding/json"
	"slices"
	"strconv"
	"time"

	"github.com/tunfw/tunfw/control"
	"github.com/tunfw/tunfw/filter"
)

// A listing of the whole flow table (250,000 flows: about 50 MB of JSON)
// must not take the CPU from the packet path on a small machine. The
// engine hands out the table a batch at a time (filter.Engine.EachFlow);
// each flow is encoded at once, by hand (no reflection, no garbage per
// flow, no copy of the table as Go values for the garbage collector to
// scan), in chunks after which the listing sleeps as long as the chunk
// took: it uses at most about half of one CPU, however large the table.
// The oldest flows come first: the encoded flows are put in order by
// their age afterwards.
//
// Lowering the CPU priority of the thread that encodes was tried and
// rejected: the Go runtime stops every thread for parts of a garbage
// collection, and a thread at nice 19 that the kernel does not run for
// tens of milliseconds holds up that stop, and with it the packet path.

// flowsChunk is how many flows are encoded between pauses (about 100 us
// of work).
const flowsChunk = 512

// listIdle is how long a listing's buffers are kept for the next one.
const listIdle = 30 * time.Second

// flows answers `tunfw flows`: the flows match accepts, oldest first.
func (d *daemon) flows(match func(filter.FlowInfo) bool) control.Response {
	// One listing at a time, reusing the last one's buffers: repeated
	// listings of a large table then allocate only their answer, instead
	// of making the garbage collector work (which the packet path feels:
	// tens of milliseconds at 250,000 flows). The buffers go after
	// listIdle without a listing.
	d.listMu.Lock()
	defer d.listMu.Unlock()
	l := &d.list
	l.buf, l.spans, l.paced = l.buf[:0], l.spans[:0], true
	d.listGen++
	gen := d.listGen
	defer time.AfterFunc(listIdle, func() {
		d.listMu.Lock()
		if d.listGen == gen {
			d.list = listing{}
		}
		d.listMu.Unlock()
	})
	d.eng.EachFlow(d.now(), func(fi *filter.FlowInfo) {
		if match(*fi) {
			l.add(fi)
		}
	})
	return control.Response{OK: true, Data: l.json()}
}

// listing encodes flows one at a time and orders them, oldest first.
type listing struct {
	paced bool
	buf   []byte // the encoded flows, in the order they came
	spans []span
	names map[string][]byte // strings encoded once
	start time.Time         // of the current chunk
}

// span is where one encoded flow is in listing.buf.
type span struct {
	age      time.Duration
	off, end int
}

func (l *listing) add(fi *filter.FlowInfo) {
	if l.names == nil {
		l.names = map[string][]byte{}
		l.start = time.Now()
	}
	off := len(l.buf)
	l.buf = appendFlow(l.buf, fi, l.names)
	l.spans = append(l.spans, span{fi.Age, off, len(l.buf)})
	if l.paced && len(l.spans)%flowsChunk == 0 {
		time.Sleep(time.Since(l.start))
		l.start = time.Now()
	}
}

// json returns the flows as a JSON array, the oldest first (a stable
// order: flows of the same age keep the order they came in).
func (l *listing) json() []byte {
	slices.SortStableFunc(l.spans, func(a, b span) int { return cmp.Compare(b.age, a.age) })
	out := make([]byte, 0, len(l.buf)+len(l.spans)+2)
	out = append(out, '[')
	for i, s := range l.spans {
		if i > 0 {
			out = append(out, ',')
		}
		out = append(out, l.buf[s.off:s.end]...)
	}
	return append(out, ']')
}

// marshalFlows encodes flows as encoding/json would, oldest first.
func marshalFlows(flows []filter.FlowInfo) []byte {
	var l listing
	for i := range flows {
		l.add(&flows[i])
	}
	return l.json()
}

// appendFlow appends f as the JSON object encoding/json makes of it.
func appendFlow(b []byte, f *filter.FlowInfo, names map[string][]byte) []byte {
	b = append(b, `{"proto":`...)
	b = appendString(b, f.Proto, names)
	b = append(b, `,"src":"`...)
	b = f.Src.AppendTo(b)
	b = append(b, `","dst":"`...)
	b = f.Dst.AppendTo(b)
	b = append(b, `","state":`...)
	b = appendString(b, f.State, names)
	b = append(b, `,"rule":`...)
	b = appendString(b, f.Rule, names)
	b = append(b, `,"verdict":`...)
	b = appendString(b, f.Verdict, names)
	if f.Monitor {
		b = append(b, `,"monitor":true`...)
	}
	b = append(b, `,"age_ns":`...)
	b = strconv.AppendInt(b, int64(f.Age), 10)
	b = append(b, `,"idle_ns":`...)
	b = strconv.AppendInt(b, int64(f.Idle), 10)
	b = append(b, `,"packets_in":`...)
	b = strconv.AppendUint(b, f.PacketsIn, 10)
	b = append(b, `,"bytes_in":`...)
	b = strconv.AppendUint(b, f.BytesIn, 10)
	b = append(b, `,"packets_out":`...)
	b = strconv.AppendUint(b, f.PacketsOut, 10)
	b = append(b, `,"bytes_out":`...)
	b = strconv.AppendUint(b, f.BytesOut, 10)
	return append(b, '}')
}

// appendString appends s as a JSON string. The few distinct strings of a
// listing (protocols, states, verdicts, rule names) are encoded by
// encoding/json once each.
func appendString(b []byte, s string, cache map[string][]byte) []byte {
	e, ok := cache[s]
	if !ok {
		e, _ = json.Marshal(s) // a string always encodes
		cache[s] = e
	}
	return append(b, e...)
}
