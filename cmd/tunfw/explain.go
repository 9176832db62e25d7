package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/tunfw/tunfw/control"
	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/inspect"
	"github.com/tunfw/tunfw/names"
)

// explainArgs is an explain request: the flow as the command line gave it.
type explainArgs struct {
	Proto string `json:"proto"`
	Src   string `json:"src"`
	Dst   string `json:"dst"`
}

// query reads the arguments into the flow to explain. A destination given
// by name has no address: the name is the flow's.
func (a explainArgs) query() (filter.ExplainQuery, error) {
	var q filter.ExplainQuery
	hasPorts := true
	switch strings.ToLower(a.Proto) {
	case "tcp":
		q.Proto = filter.ProtoTCP
	case "udp":
		q.Proto = filter.ProtoUDP
	case "icmp":
		q.Proto, hasPorts = filter.ProtoICMP, false
	default:
		return q, fmt.Errorf("PROTO %q: want tcp, udp or icmp", a.Proto)
	}
	src, err := parseEndpoint("SRC", a.Src, hasPorts, false)
	if err != nil {
		return q, err
	}
	if !src.addr.IsValid() {
		return q, fmt.Errorf("SRC %q: want the client's address (and port), not a name", a.Src)
	}
	dst, err := parseEndpoint("DST", a.Dst, hasPorts, true)
	if err != nil {
		return q, err
	}
	if q.Proto == filter.ProtoICMP && src.addr.Is6() {
		q.Proto = filter.ProtoICMPv6
	}
	if dst.addr.IsValid() && src.addr.Is4() != dst.addr.Is4() {
		return q, fmt.Errorf("SRC %s and DST %s are of different address families", src.addr, dst.addr)
	}
	q.Src = netip.AddrPortFrom(src.addr, src.port)
	q.Dst = netip.AddrPortFrom(dst.addr, dst.port)
	if dst.name != "" {
		q.Name, q.NameFrom = dst.name, "given"
	}
	q.Peekable = inspect.CanPeek(q.Proto, dst.port)
	return q, nil
}

type endpoint struct {
	addr netip.Addr
	name string
	port uint16
}

// parseEndpoint reads "ADDR:PORT", "[V6]:PORT", "NAME:PORT", or without
// ports (icmp) "ADDR" / "NAME". A port is optional on a source.
func parseEndpoint(what, s string, hasPorts, nameOK bool) (endpoint, error) {
	var e endpoint
	host, port := s, ""
	if hasPorts {
		if h, p, err := net.SplitHostPort(s); err == nil {
			host, port = h, p
		} else if what == "DST" {
			return e, fmt.Errorf("%s %q: want HOST:PORT (an address or name, and a port; [V6]:PORT for IPv6)", what, s)
		}
	}
	if port != "" {
		n, err := strconv.ParseUint(port, 10, 16)
		if err != nil {
			return e, fmt.Errorf("%s %q: port %q is not a number 0-65535", what, s, port)
		}
		e.port = uint16(n)
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	if a, err := netip.ParseAddr(host); err == nil {
		if a.Zone() != "" {
			return e, fmt.Errorf("%s %q: IPv6 zones are not allowed", what, s)
		}
		e.addr = a.Unmap()
		return e, nil
	}
	if !nameOK {
		return e, fmt.Errorf("%s %q is not an address", what, s)
	}
	n, err := names.Normalize(host)
	if err != nil {
		return e, fmt.Errorf("%s %q is neither an address nor a name: %v", what, s, err)
	}
	e.name = n
	return e, nil
}

// cmdExplain prints how the rules judge one flow: offline with -c, else
// asking the running tunfw, which also knows the names DNS gave.
func cmdExplain(args []string, stdout, stderr io.Writer) int {
	var f clientFlags
	fs := newFlagSet("explain", "Show how the rules judge a flow: each rule consulted in order, matched or why not,\n"+
		"the verdict, and whether tunfw would read the flow's name before deciding.\n"+
		"Usage: tunfw explain [-c FILE] [--json] PROTO SRC DST   e.g. tunfw explain tcp 198.18.0.1:40000 www.example.com:443\n"+
		"With -c FILE it reads that config offline; without, it asks the running tunfw (which also uses\n"+
		"the names it learned from DNS answers).", stdout, &f.commonFlags, false)
	fs.StringVar(&f.socket, "socket", "", "control socket `path` of the running tunfw (default: [control] socket of the config, else "+control.DefaultSocket+")")
	fs.BoolVar(&f.json, "json", false, "print JSON")
	// Flags may come before, between or after the three arguments.
	var pos []string
	for rest := args; ; {
		if err := fs.Parse(rest); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return 0
			}
			fmt.Fprintf(stderr, "explain: %v\n", err)
			return 2
		}
		if fs.NArg() == 0 {
			break
		}
		pos, rest = append(pos, fs.Arg(0)), fs.Args()[1:]
	}
	if len(pos) != 3 {
		fmt.Fprintln(stderr, "tunfw explain: want PROTO SRC DST, e.g. tunfw explain tcp 198.18.0.1:40000 www.example.com:443")
		return 2
	}
	a := explainArgs{Proto: pos[0], Src: pos[1], Dst: pos[2]}
	q, err := a.query()
	if err != nil {
		fmt.Fprintf(stderr, "tunfw explain: %v\n", err)
		return 2
	}
	var ex filter.Explanation
	if configGiven(fs) && f.socket == "" {
		cfg, err := loadConfig(f.config, true, func() {})
		if err != nil {
			printConfigError(stderr, "tunfw explain", err)
			return 1
		}
		ex = cfg.Rules.Explain(q)
	} else {
		path := f.socket
		if path == "" {
			if path, err = socketFromConfig(f.config, configGiven(fs)); err != nil {
				fmt.Fprintf(stderr, "tunfw explain: %v\n", err)
				return 1
			}
		}
		req := control.Request{Cmd: "explain"}
		req.Args, _ = json.Marshal(a)
		resp, err := control.Call(path, req, 10*time.Second)
		if err != nil {
			fmt.Fprintf(stderr, "tunfw explain: %v (is tunfw running? -c FILE explains offline)\n", err)
			return 1
		}
		if !resp.OK {
			fmt.Fprintf(stderr, "tunfw explain: %s\n", resp.Error)
			return 1
		}
		if err := json.Unmarshal(resp.Data, &ex); err != nil {
			fmt.Fprintf(stderr, "tunfw explain: bad response: %v\n", err)
			return 1
		}
	}
	if f.json {
		out, _ := json.MarshalIndent(ex, "", "  ")
		fmt.Fprintf(stdout, "%s\n", out)
		return 0
	}
	printExplanation(stdout, a, ex)
	return 0
}

func printExplanation(w io.Writer, a explainArgs, ex filter.Explanation) {
	fmt.Fprintf(w, "%s %s -> %s", strings.ToLower(a.Proto), a.Src, a.Dst)
	if ex.Name != "" {
		fmt.Fprintf(w, " (name %s, from %s)", ex.Name, ex.NameFrom)
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, r := range ex.Rules {
		res := "no: " + r.Why
		if r.Matched {
			res = "MATCH"
		}
		fmt.Fprintf(tw, "  rule[%d]\t%s\t%s\t%s\n", r.Index, r.Rule, r.Action, res)
	}
	tw.Flush()
	if len(ex.Rules) == 0 || !ex.Rules[len(ex.Rules)-1].Matched {
		fmt.Fprintln(w, "  no rule matched: the default action applies")
	}
	fmt.Fprintf(w, "verdict: %s (rule %s)\n", ex.Verdict, ex.Rule)
	if ex.Peek {
		fmt.Fprintln(w, "peek: yes: a rule by name could change this verdict, so tunfw reads the flow's name\n"+
			"      (TLS server_name, HTTP Host, QUIC) before it decides and dials")
	} else {
		fmt.Fprintln(w, "peek: no: decided on the first packet, dialled at once")
	}
}
