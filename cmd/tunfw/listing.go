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
// engine copies the table a batch at a time (filter.Engine.Flows); the
// copy is encoded here by hand, without reflection or garbage per flow,
// in chunks between which the listing sleeps as long as the chunk took:
// it uses at most about half of one CPU, however large the table.
//
// Lowering the CPU priority of the thread that encodes was tried and
// rejected: the Go runtime stops every thread for parts of a garbage
// collection, and a thread at nice 19 that the kernel does not run for
// tens of milliseconds holds up that stop, and with it the packet path.

// flowsChunk is how many flows are encoded between pauses (about 100 us
// of work).
const flowsChunk = 512

// flows answers `tunfw flows`: the flows match accepts, oldest first.
func (d *daemon) flows(match func(filter.FlowInfo) bool) control.Response {
	all := d.eng.Flows(d.now())
	out := all[:0]
	for _, f := range all {
		if match(f) {
			out = append(out, f)
		}
	}
	slices.SortFunc(out, func(a, b filter.FlowInfo) int { return cmp.Compare(b.Age, a.Age) })
	return control.Response{OK: true, Data: marshalFlows(out, true)}
}

// marshalFlows encodes flows as encoding/json would; paced, it pauses
// between chunks as described above.
func marshalFlows(flows []filter.FlowInfo, paced bool) []byte {
	buf := make([]byte, 0, 240*len(flows)+2)
	buf = append(buf, '[')
	names := map[string][]byte{} // rule names, encoded once
	for i := 0; i < len(flows); i += flowsChunk {
		start := time.Now()
		for j := i; j < min(i+flowsChunk, len(flows)); j++ {
			if j > 0 {
				buf = append(buf, ',')
			}
			buf = appendFlow(buf, &flows[j], names)
		}
		if paced && i+flowsChunk < len(flows) {
			time.Sleep(time.Since(start))
		}
	}
	return append(buf, ']')
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
