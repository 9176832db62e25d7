package main

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"io"
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
// scan), and written to the client in chunks after each of which the
// listing sleeps as long as the chunk took: it uses at most about half of
// one CPU, however large the table. Nothing but a chunk is held: an
// answer built whole (50 MB of buffers per listing) set off garbage
// collections that stalled the packet path for tens of milliseconds, and
// writing it in one go kept both processes busy for most of a second.
// The flows come in the table's order; the client puts them in order by
// age (printFlowsJSON), on CPU time nothing else wants (idlePriority).
//
// Lowering the CPU priority of the thread that encodes was tried and
// rejected: the Go runtime stops every thread for parts of a garbage
// collection, and a thread at nice 19 that the kernel does not run for
// tens of milliseconds holds up that stop, and with it the packet path.

// flowsChunk is how many flows are encoded and written between pauses
// (about 100 KB, 100 us of work).
const flowsChunk = 512

// flows answers `tunfw flows`: the flows match accepts, in the table's
// order, streamed to the client.
func (d *daemon) flows(match func(filter.FlowInfo) bool) control.Response {
	// One listing at a time: each takes up to half a CPU. A request that
	// finds one running waits a bounded time (the running one's client may
	// read slowly for long), then is told so.
	select {
	case d.listing <- struct{}{}:
	case <-time.After(d.listWait):
		return control.Response{Error: "another `tunfw flows` is running; try again when it is done"}
	}
	return control.Response{OK: true, Stream: func(w io.Writer) error {
		defer func() { <-d.listing }()
		l := listing{w: w, paced: true}
		d.eng.EachFlow(d.now(), func(fi *filter.FlowInfo) {
			if l.err == nil && match(*fi) {
				l.add(fi)
			}
		})
		return l.end()
	}}
}

// listing encodes flows one at a time as a JSON array, writing it to w a
// chunk at a time.
type listing struct {
	w     io.Writer
	paced bool
	buf   []byte
	n     int               // flows encoded
	names map[string][]byte // strings encoded once
	start time.Time         // of the current chunk
	err   error             // of the first failed write
}

func (l *listing) add(fi *filter.FlowInfo) {
	if l.n == 0 {
		l.names = map[string][]byte{}
		l.buf = make([]byte, 0, 128<<10)
		l.buf = append(l.buf, '[')
		l.start = time.Now()
	} else {
		l.buf = append(l.buf, ',')
	}
	l.buf = appendFlow(l.buf, fi, l.names)
	l.n++
	if l.n%flowsChunk == 0 {
		l.flush()
		if l.paced {
			time.Sleep(time.Since(l.start))
			l.start = time.Now()
		}
	}
}

func (l *listing) flush() {
	if l.err == nil && len(l.buf) > 0 {
		if _, err := l.w.Write(l.buf); err != nil {
			l.err = fmt.Errorf("write flows: %w", err)
		}
	}
	l.buf = l.buf[:0]
}

// end closes the array and writes what is left.
func (l *listing) end() error {
	if l.n == 0 {
		l.buf = append(l.buf, '[')
	}
	l.buf = append(l.buf, ']')
	l.flush()
	return l.err
}

// marshalFlows encodes flows as encoding/json would, in their order.
func marshalFlows(flows []filter.FlowInfo) []byte {
	var b bytes.Buffer
	l := listing{w: &b}
	for i := range flows {
		l.add(&flows[i])
	}
	l.end()
	return b.Bytes()
}

// printFlowsJSON prints a listing (a JSON array of flows as appendFlow
// encodes them) indented as json.Indent would, with the flows ordered
// oldest first (a stable order: flows of the same age keep theirs). The
// client does this for a listing of the whole table, tens of megabytes, so
// it neither decodes the flows nor copies the whole listing: it finds
// where each flow is and its age, orders those, and indents and writes one
// flow at a time. An answer that is not such an array is indented as a
// whole, which reports what is wrong with it. The error is about the
// answer; output is written as far as w takes it, as for other commands.
func printFlowsJSON(w io.Writer, data []byte) error {
	items, ok := splitFlows(data)
	if !ok {
		var buf bytes.Buffer
		if err := json.Indent(&buf, data, "", "  "); err != nil {
			return err
		}
		buf.WriteByte('\n')
		w.Write(buf.Bytes())
		return nil
	}
	slices.SortStableFunc(items, func(a, b flowSpan) int { return cmp.Compare(b.age, a.age) })
	bw := bufio.NewWriterSize(w, 64<<10)
	defer bw.Flush()
	if len(items) == 0 {
		bw.WriteString("[]\n")
		return nil
	}
	bw.WriteString("[\n  ")
	var buf bytes.Buffer
	for i, it := range items {
		if i > 0 {
			bw.WriteString(",\n  ")
		}
		buf.Reset()
		if err := json.Indent(&buf, data[it.off:it.end], "  ", "  "); err != nil {
			return err
		}
		bw.Write(buf.Bytes())
	}
	bw.WriteString("\n]\n")
	return nil
}

// flowSpan is where one flow is in a listing, and its age.
type flowSpan struct {
	age      int64
	off, end int
}

// splitFlows finds the objects of a JSON array of flat objects (flows)
// and their ages; false if data is not such an array.
func splitFlows(data []byte) ([]flowSpan, bool) {
	// A flow takes about 200 bytes, rarely less than 160: room for all.
	items := make([]flowSpan, 0, len(data)/160+1)
	i := skipSpace(data, 0)
	if i == len(data) || data[i] != '[' {
		return nil, false
	}
	for i = skipSpace(data, i+1); i < len(data) && data[i] == '{'; {
		end := objectEnd(data, i)
		if end < 0 {
			return nil, false
		}
		items = append(items, flowSpan{flowAge(data[i:end]), i, end})
		i = skipSpace(data, end)
		if i < len(data) && data[i] == ',' {
			if i = skipSpace(data, i+1); i == len(data) || data[i] != '{' {
				return nil, false
			}
		}
	}
	if i >= len(data) || data[i] != ']' || skipSpace(data, i+1) != len(data) {
		return nil, false
	}
	return items, true
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// objectEnd returns the index just past the JSON object that starts at
// b[i], or -1. A flow's object holds no nested objects or arrays, but its
// strings (rule names) may hold any character.
func objectEnd(b []byte, i int) int {
	depth, inString := 0, false
	for ; i < len(b); i++ {
		c := b[i]
		switch {
		case inString && c == '\\':
			i++
		case c == '"':
			inString = !inString
		case inString:
		case c == '{' || c == '[':
			depth++
		case c == '}' || c == ']':
			if depth--; depth == 0 {
				return i + 1
			}
		}
	}
	return -1
}

// flowAge returns the age_ns of one encoded flow, 0 if it has none. The
// key is found outside strings: inside one, its quotes would be escaped.
func flowAge(obj []byte) int64 {
	const key = `"age_ns":`
	i := bytes.Index(obj, []byte(key))
	if i < 0 {
		return 0
	}
	i += len(key)
	j := i
	for j < len(obj) && (obj[j] == '-' || obj[j] >= '0' && obj[j] <= '9') {
		j++
	}
	age, _ := strconv.ParseInt(string(obj[i:j]), 10, 64)
	return age
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
	if f.Name != "" {
		b = append(b, `,"name":`...)
		b = appendPlainString(b, f.Name)
		b = append(b, `,"name_from":`...)
		b = appendString(b, f.NameFrom, names)
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

// appendPlainString appends s, which may differ for every flow (a name),
// as a JSON string: directly when nothing in it needs escaping, as is the
// case for host names, else as encoding/json writes it.
func appendPlainString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			q, _ := json.Marshal(s)
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
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
