package main

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/tunfw/tunfw/control"
	"github.com/tunfw/tunfw/filter"
	"golang.org/x/sys/unix"
)

// clientFlags are the flags of the commands that talk to a running tunfw.
type clientFlags struct {
	commonFlags
	socket string
	json   bool
	// flows filters
	proto, src, dst, state, name string
}

// cmdClient runs status, flows, stats or reload against the control socket.
func cmdClient(name string, args []string, stdout, stderr io.Writer) int {
	summaries := map[string]string{
		"status": "Show a running tunfw's version, uptime, config, mode, flows by state and verdict totals.",
		"flows":  "List the flow table: proto, src, dst, name (and where it came from), state, rule, verdict, age, bytes each way.",
		"stats":  "Show per-rule flows, packets and bytes, and packets dropped by reason.",
		"reload": "Re-read the config file. If it is invalid, tunfw keeps its rules and this exits 1 listing every error.",
	}
	var f clientFlags
	fs := newFlagSet(name, summaries[name], stdout, &f.commonFlags, false)
	fs.StringVar(&f.socket, "socket", "", "control socket `path` (default: [control] socket of the config, else "+control.DefaultSocket+")")
	if name != "reload" {
		fs.BoolVar(&f.json, "json", false, "print JSON")
	}
	if name == "flows" {
		fs.StringVar(&f.proto, "proto", "", "only flows of this protocol: tcp, udp or icmp")
		fs.StringVar(&f.src, "src", "", "only flows from this address or CIDR")
		fs.StringVar(&f.dst, "dst", "", "only flows to this address or CIDR")
		fs.StringVar(&f.state, "state", "", "only flows in this state: new, established, closing or closed")
		fs.StringVar(&f.name, "name", "", "only flows of this `name` (\"*.example.com\": every name below it)")
	}
	if code, stop := parseFlags(fs, args, stderr); stop {
		return code
	}
	path := f.socket
	if path == "" {
		var err error
		if path, err = socketFromConfig(f.config, configGiven(fs)); err != nil {
			fmt.Fprintf(stderr, "tunfw %s: %v (--socket names the control socket without reading it)\n", name, err)
			return 1
		}
	}
	req := control.Request{Cmd: name}
	if name == "flows" {
		req.Args, _ = json.Marshal(flowsArgs{Proto: f.proto, Src: f.src, Dst: f.dst, State: f.state, Name: f.name})
	}
	if name == "flows" {
		idlePriority()
	}
	resp, err := control.Call(path, req, 30*time.Second)
	if err != nil {
		fmt.Fprintf(stderr, "tunfw %s: %v\n", name, err)
		return 1
	}
	if !resp.OK {
		fmt.Fprintf(stderr, "tunfw %s: %s\n", name, resp.Error)
		for _, e := range resp.Errors {
			fmt.Fprintln(stderr, e)
		}
		return 1
	}
	if f.json {
		// Indent the bytes as they came: decoding a listing of
		// 250,000 flows into generic values first cost seconds of CPU,
		// which a busy host's packet path shares.
		if name == "flows" {
			// The daemon sends the table's order.
			if err := printFlowsJSON(stdout, resp.Data); err != nil {
				fmt.Fprintf(stderr, "tunfw %s: bad response: %v\n", name, err)
				return 1
			}
			return 0
		}
		var buf bytes.Buffer
		if err := json.Indent(&buf, resp.Data, "", "  "); err != nil {
			fmt.Fprintf(stderr, "tunfw %s: bad response: %v\n", name, err)
			return 1
		}
		buf.WriteByte('\n')
		stdout.Write(buf.Bytes())
		return 0
	}
	switch name {
	case "status":
		return printStatus(stdout, resp.Data)
	case "flows":
		return printFlows(stdout, resp.Data)
	case "stats":
		return printStats(stdout, resp.Data)
	default: // reload
		var r reloadResult
		json.Unmarshal(resp.Data, &r)
		fmt.Fprintf(stdout, "reloaded: %d rules", r.Rules)
		if r.Cut > 0 {
			fmt.Fprintf(stdout, ", %d flows closed by the new rules", r.Cut)
		}
		fmt.Fprintln(stdout)
		for _, w := range r.Warnings {
			fmt.Fprintln(stdout, "warning:", w)
		}
	}
	return 0
}

// socketFromConfig finds the control socket named by the config file a
// daemon would read. Only [control] is read, so a config that is being
// fixed (say, before `tunfw reload`) still leads to the socket; a missing
// file falls back to the default. A file the daemon would refuse (writable
// by others, not root's, too large) is an error: the socket it names is not
// to be trusted, and the daemon would refuse the reload anyway.
func socketFromConfig(path string, explicit bool) (string, error) {
	data, _, _, err := readConfig(path, explicit)
	if errors.Is(err, fs.ErrNotExist) {
		return control.DefaultSocket, nil
	}
	if err != nil {
		return "", err
	}
	var only struct {
		Control control.Config `toml:"control"`
	}
	toml.Decode(string(data), &only)
	sock, err := only.Control.Validate()
	if err != nil {
		return control.DefaultSocket, nil
	}
	return sock, nil
}

func printStatus(w io.Writer, data []byte) int {
	var s statusInfo
	if err := json.Unmarshal(data, &s); err != nil {
		fmt.Fprintln(w, "bad response:", err)
		return 1
	}
	fmt.Fprintf(w, "tunfw %s, up %s\n", s.Version, (time.Duration(s.Uptime) * time.Second).Round(time.Second))
	fmt.Fprintf(w, "config   %s\n", s.Config)
	fmt.Fprintf(w, "tun      %s\n", s.TUN)
	fmt.Fprintf(w, "mode     %s (default %s, %d rules)\n", s.Mode, s.Default, s.Rules)
	states := []string{"new", "established", "closing", "closed"}
	parts := make([]string, 0, len(states))
	for _, st := range states {
		parts = append(parts, fmt.Sprintf("%s %d", st, s.FlowsByState[st]))
	}
	fmt.Fprintf(w, "flows    %d (%s)\n", s.Flows, strings.Join(parts, ", "))
	fmt.Fprintf(w, "verdicts forwarded %d, denied %d, rejected %d, monitored %d, flows created %d\n",
		s.Verdicts["forwarded"], s.Verdicts["denied"], s.Verdicts["rejected"], s.Verdicts["monitored"], s.Verdicts["flows_created"])
	fmt.Fprintf(w, "reloads  %d ok, %d failed\n", s.Reloads["ok"], s.Reloads["failed"])
	if c := s.Capture; c != nil {
		fmt.Fprintf(w, "capture  %d connections open at start left unjudged, %d packets refused outside the TUN, %d spoofed packets dropped\n",
			c.Preexisting, c.Refused, c.Spoofed)
		if c.Error != "" {
			fmt.Fprintf(w, "capture  counters: %s\n", c.Error)
		}
	}
	return 0
}

func printFlows(w io.Writer, data []byte) int {
	var flows []filter.FlowInfo
	if err := json.Unmarshal(data, &flows); err != nil {
		fmt.Fprintln(w, "bad response:", err)
		return 1
	}
	// Oldest first; the daemon sends the table's order.
	slices.SortStableFunc(flows, func(a, b filter.FlowInfo) int { return cmp.Compare(b.Age, a.Age) })
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	// IN and OUT as in --json (bytes_in, bytes_out) and the metrics
	// (tunfw_bytes_total{direction}): in is what the client sent.
	fmt.Fprintln(tw, "PROTO\tSRC\tDST\tNAME\tSTATE\tRULE\tVERDICT\tAGE\tBYTES IN\tBYTES OUT")
	for _, f := range flows {
		src, dst := f.Src.String(), f.Dst.String()
		if f.Proto == "icmp" {
			src = fmt.Sprintf("%s id %d", f.Src.Addr(), f.Src.Port())
			dst = f.Dst.Addr().String()
		}
		v := f.Verdict
		if f.Monitor {
			v += " (monitor)"
		}
		name := "-"
		if f.Name != "" {
			name = f.Name + " (" + f.NameFrom + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\n", f.Proto, src, dst, name, f.State, f.Rule, v,
			f.Age.Round(time.Second), f.BytesIn, f.BytesOut)
	}
	tw.Flush()
	fmt.Fprintf(w, "%d flows (BYTES IN: client to destination; BYTES OUT: back)\n", len(flows))
	return 0
}

func printStats(w io.Writer, data []byte) int {
	var s statsInfo
	if err := json.Unmarshal(data, &s); err != nil {
		fmt.Fprintln(w, "bad response:", err)
		return 1
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "RULE\tACTION\tFLOWS\tPACKETS\tBYTES")
	for _, r := range s.Rules {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\n", r.Name, r.Action, r.Flows, r.Packets, r.Bytes)
	}
	tw.Flush()
	fmt.Fprintf(w, "\nforwarded %d packets (%d bytes in from clients, %d bytes out to them), %d replies, %d flows created\n",
		s.Forwarded, s.BytesIn, s.BytesOut, s.Replies, s.FlowsCreated)
	printCounts(w, "dropped", s.Drops)
	fmt.Fprintf(w, "\ntun errors: read %d, write %d; control requests refused %d\n", s.TUNReadErrs, s.TUNWriteErrs, s.ControlRefuse)
	fmt.Fprintf(w, "relayed UDP datagrams dropped on a full queue %d; flow handlers recovered from a panic %d\n", s.UDPQueueDrops, s.FlowPanics)
	printCounts(w, "dropped by the stack", s.StackDrops)
	fmt.Fprintln(w)
	printCounts(w, "ICMP errors relayed to UDP clients", s.ICMPErrors)
	fmt.Fprintln(w)
	b, bound := s.UDPLargeBuffers, "no bound"
	if b.Max > 0 {
		bound = fmt.Sprintf("at most %d", b.Max)
	}
	fmt.Fprintf(w, "UDP large receive buffers: %d held (%s); refused to busy flows %d times\n", b.Held, bound, b.Refused)
	printCounts(w, "rules by name", s.Names)
	fmt.Fprintf(w, "; names remembered from DNS answers %d", s.NamesKnown)
	fmt.Fprintln(w)
	printCounts(w, fmt.Sprintf("TCP dials pending %d; failed", s.PendingDials), s.DialFailures)
	fmt.Fprintln(w)
	r, mib := s.Runtime, func(b uint64) float64 { return float64(b) / (1 << 20) }
	fmt.Fprintf(w, "memory: %.1f MiB mapped; heap %.1f MiB in %d objects, %.1f MiB free kept, %.1f MiB returned to the kernel; "+
		"%d goroutines on %.1f MiB of stacks\n", mib(r.TotalBytes), mib(r.HeapObjectsBytes), r.HeapObjects, mib(r.HeapFreeBytes),
		mib(r.HeapReleasedBytes), r.Goroutines, mib(r.StacksBytes))
	fmt.Fprintf(w, "allocated since start: %d objects, %.1f MiB; %d collections\n", r.Allocs, mib(r.AllocBytes), r.GCCycles)
	return 0
}

// printCounts prints label and the counts by reason, sorted, on one line
// (without its newline).
func printCounts(w io.Writer, label string, counts map[string]uint64) {
	reasons := make([]string, 0, len(counts))
	for r := range counts {
		reasons = append(reasons, r)
	}
	sort.Strings(reasons)
	fmt.Fprint(w, label)
	for i, r := range reasons {
		sep := ","
		if i == 0 {
			sep = ""
		}
		fmt.Fprintf(w, "%s %s %d", sep, r, counts[r])
	}
}

// idlePriority puts this process in the SCHED_IDLE class: it runs only
// on CPU time nothing else wants. Reading, ordering, checking and printing
// a listing of a full flow table (tens of megabytes) takes 0.5-2 s of
// CPU, which on a small machine would otherwise be taken from the
// firewall's packet path it is inspecting. At nice 10 it still raised the
// packet path's 99th percentile by 1-2 ms: the kernel lets a running task
// of any priority have some of its time slice before a task that wakes
// gets the CPU, except an idle one, which yields at once. Linux keeps the
// policy per thread and a new thread inherits its creator's, so every
// thread of the process is changed. Best effort: it changes only how fast
// the listing prints (on a machine whose CPUs are kept busy, much more
// slowly; the daemon waits for a reader that makes progress).
func idlePriority() {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return
	}
	for _, t := range tasks {
		if tid, err := strconv.Atoi(t.Name()); err == nil {
			unix.SchedSetAttr(tid, &unix.SchedAttr{Policy: unix.SCHED_IDLE}, 0)
		}
	}
}
