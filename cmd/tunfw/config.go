package main

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"unicode"
	"unicode/utf8"

	"github.com/BurntSushi/toml"
	"github.com/tunfw/tunfw"
	"github.com/tunfw/tunfw/control"
	"github.com/tunfw/tunfw/dns"
	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/inspect"
	"github.com/tunfw/tunfw/internal/config"
	"github.com/tunfw/tunfw/metrics"
	"github.com/tunfw/tunfw/stack/cpulatency"
	"github.com/tunfw/tunfw/stack/tcpfwd"
	"github.com/tunfw/tunfw/tun"
)

// defaultConfigPath is read when -c is not given; if it does not exist the
// embedded example config is used instead.
const defaultConfigPath = "/etc/tunfw/config.toml"

// embeddedSource names the built-in config as a Config's source.
const embeddedSource = "embedded config.toml"

// fileLayout is the top level of the config file. Each section is decoded
// separately into the type of the package that owns it, so a type error in
// one section does not hide the errors of the others.
type fileLayout struct {
	Tun     toml.Primitive   `toml:"tun"`
	Route   toml.Primitive   `toml:"route"`
	Filter  toml.Primitive   `toml:"filter"`
	Sets    toml.Primitive   `toml:"sets"`
	Rule    []toml.Primitive `toml:"rule"`
	Limits  toml.Primitive   `toml:"limits"`
	Control toml.Primitive   `toml:"control"`
	Metrics toml.Primitive   `toml:"metrics"`
	Stack   toml.Primitive   `toml:"stack"`
	Inspect toml.Primitive   `toml:"inspect"`
	DNS     toml.Primitive   `toml:"dns"`
	CPU     toml.Primitive   `toml:"cpu"`
}

// Config is a loaded, validated config file.
type Config struct {
	// Source names where it came from: a path or "embedded config.toml".
	Source string
	Net    tun.Settings
	Rules  *filter.Ruleset
	Limits filter.EngineLimits
	// Dial are [limits]'s keys on setting up TCP connections.
	Dial tcpfwd.DialLimits
	// ControlSocket is the control socket's path.
	ControlSocket string
	// Metrics is the [metrics] section.
	Metrics metrics.Config
	// Stack is the [stack] section.
	Stack tcpfwd.Config
	// Inspect is the [inspect] section: reading flows' names.
	Inspect inspect.Options
	// DNS is the [dns] section: snooping and blocking.
	DNS dns.Options
	// CPU is the [cpu] section: the wake-up latency asked for while
	// packets flow.
	CPU cpulatency.Setting
	// Memory is [limits] memory in bytes; 0 sizes it from the machine
	// at start (memory.go).
	Memory int64
}

// ConfigError is one problem in a config file, located by line.
type ConfigError struct {
	File string
	Line int // 0 when unknown
	Key  string
	Msg  string
}

func (e ConfigError) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		b.WriteString(":" + strconv.Itoa(e.Line))
	}
	b.WriteString(": ")
	if e.Key != "" {
		b.WriteString(truncate(oneLine(e.Key), maxErrorKey) + ": ")
	}
	b.WriteString(truncate(oneLine(e.Msg), maxErrorMsg))
	return b.String()
}

// Bounds on what an error echoes of the config: a mistake on a 400 KB line
// is reported in a line, not with the whole line.
const (
	maxErrorKey    = 120
	maxErrorMsg    = 300
	maxErrorsShown = 100
)

// oneLine escapes control characters in s (a quoted key may hold a
// newline), so that each error stays one line that starts with the file.
func oneLine(s string) string {
	if strings.IndexFunc(s, unicode.IsControl) < 0 {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		if unicode.IsControl(r) {
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

// truncate shortens s to about max bytes (on a rune boundary), saying how
// much was left out.
func truncate(s string, max int) string {
	if len(s) <= max {
		return s
	}
	cut := max
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return fmt.Sprintf("%s... (%d more bytes)", s[:cut], len(s)-cut)
}

// ConfigErrors is every problem found in one config file.
type ConfigErrors []ConfigError

func (es ConfigErrors) Error() string {
	s := make([]string, len(es))
	for i, e := range es {
		s[i] = e.Error()
	}
	return strings.Join(s, "\n")
}

// maxConfigSize bounds a config file: it is read whole, and decoding costs
// several times its size.
const maxConfigSize = 16 << 20

// loadConfig reads and parses the config a command runs on: path or, when
// path is the default and absent, the embedded config, which fellBack
// announces. Errors are a ConfigErrors (one file:line each) when the file
// was read but is invalid.
func loadConfig(path string, explicit bool, fellBack func()) (*Config, error) {
	data, source, fb, err := readConfig(path, explicit)
	if err != nil {
		return nil, err
	}
	if fb {
		fellBack()
	}
	return parseConfig(source, data)
}

// printConfigError prints an error of loadConfig: the config's own errors
// as they are, one file:line each; anything else after cmd.
func printConfigError(w io.Writer, cmd string, err error) {
	if _, ok := err.(ConfigErrors); ok {
		fmt.Fprintln(w, err)
		return
	}
	fmt.Fprintf(w, "%s: %v\n", cmd, err)
}

// readConfig reads path; when path is the default and absent, it falls back to
// the embedded config and says so through fellBack.
func readConfig(path string, explicit bool) (data []byte, source string, fellBack bool, err error) {
	data, err = readConfigFile(path)
	if err != nil {
		if !explicit && errors.Is(err, fs.ErrNotExist) {
			return tunfw.DefaultConfig, embeddedSource, true, nil
		}
		return nil, path, false, err
	}
	return data, path, false, nil
}

// readConfigFile reads a config file for start and for every reload alike:
// it must pass checkConfigOwner and be at most maxConfigSize bytes.
func readConfigFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	defer f.Close()
	if err := checkConfigOwner(f); err != nil {
		return nil, err
	}
	data, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	if len(data) > maxConfigSize {
		return nil, fmt.Errorf("config %s is larger than %d MiB: refusing it (put large address lists in fewer, larger sets)", path, maxConfigSize>>20)
	}
	return data, nil
}

// checkConfigOwner refuses, as sshd does, a config file that someone other
// than its reader or root could have written: whoever can write the rules
// owns the firewall.
func checkConfigOwner(f *os.File) error {
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("stat config: %w", err)
	}
	if fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("config %s is writable by group or others (mode %#o): refusing it; run: chmod go-w %s",
			f.Name(), fi.Mode().Perm(), f.Name())
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Uid != 0 && int(st.Uid) != os.Getuid() {
		return fmt.Errorf("config %s is owned by uid %d, neither root nor you: refusing it", f.Name(), st.Uid)
	}
	return nil
}

// parseConfig decodes and validates a config file and reports every error
// it finds with its line.
func parseConfig(source string, data []byte) (*Config, error) {
	var errs ConfigErrors
	lines := config.Locate(data)
	add := func(err error) {
		for _, e := range config.Errors(err) {
			errs = append(errs, locate(source, lines, e))
		}
	}
	var layout fileLayout
	md, err := toml.Decode(string(data), &layout)
	if err != nil {
		add(err)
		return nil, errs
	}
	var (
		tc    tun.Config
		rc    tun.RouteConfig
		fo    filter.Options
		sets  map[string]any
		rules = make([]filter.RuleConfig, len(layout.Rule))
		lim   filter.Limits
		dial  tcpfwd.LimitsConfig
		mem   memoryConfig
		cc    control.Config
		mc    metrics.Config
		ic    inspect.Config
		dc    dns.Config
		sc    = tcpfwd.DefaultConfig() // keys left out keep their default
		cpc   = cpulatency.DefaultConfig()
	)
	// Decoding a table stops at its first error (in map order), so keys
	// it had not reached stay undecoded: failed tells unknownKeys which
	// structs they belong to.
	failed := map[string][]any{}
	decode := func(key string, p toml.Primitive, v any) {
		if md.IsDefined(key) {
			if err := md.PrimitiveDecode(p, v); err != nil {
				add(err)
				failed[key] = append(failed[key], v)
			}
		}
	}
	decode("tun", layout.Tun, &tc)
	decode("route", layout.Route, &rc)
	decode("filter", layout.Filter, &fo)
	if source != embeddedSource {
		fo.Dir = filepath.Dir(source) // list files are read beside the config
	}
	decode("sets", layout.Sets, &sets)
	// [limits] is shared: the flow table's keys are filter's, the dial
	// keys tcpfwd's, limits.memory this command's.
	decode("limits", layout.Limits, &lim)
	decode("limits", layout.Limits, &dial)
	decode("limits", layout.Limits, &mem)
	decode("control", layout.Control, &cc)
	decode("metrics", layout.Metrics, &mc)
	decode("stack", layout.Stack, &sc)
	decode("inspect", layout.Inspect, &ic)
	decode("dns", layout.DNS, &dc)
	decode("cpu", layout.CPU, &cpc)
	for i, p := range layout.Rule {
		if err := md.PrimitiveDecode(p, &rules[i]); err != nil {
			add(err)
			failed["rule"] = append(failed["rule"], &rules[i])
		}
	}
	for _, k := range unknownKeys(md) {
		if len(k) > 2 && k[0] == "sets" {
			continue // a list file set's keys: filter checks them (sets.NAME)
		}
		if len(k) == 2 && slices.ContainsFunc(failed[k[0]], func(v any) bool { return hasTOMLKey(v, k[1]) }) {
			continue
		}
		ks := k.String()
		places := lines.Places(ks)
		if len(places) == 0 {
			places = []config.Place{{Key: ks, Line: lines.Line(ks)}}
		}
		for _, p := range places {
			errs = append(errs, ConfigError{File: source, Line: p.Line, Key: p.Key, Msg: "unknown key"})
		}
	}
	cfg := &Config{Source: source, Metrics: mc, Stack: sc}
	cfg.Net, err = tun.Validate(tc, rc)
	add(err)
	cfg.Rules, err = filter.Compile(fo, sets, rules)
	add(err)
	cfg.Limits, err = lim.Validate()
	add(err)
	cfg.Dial, err = dial.Validate()
	add(err)
	cfg.Memory, err = mem.validate()
	add(err)
	cfg.ControlSocket, err = cc.Validate()
	add(err)
	cfg.Inspect, err = ic.Validate()
	add(err)
	cfg.DNS, err = dc.Validate()
	add(err)
	cfg.CPU, err = cpc.Validate()
	add(err)
	add(mc.Validate())
	add(sc.Validate())
	if len(errs) > 0 {
		sort.SliceStable(errs, func(i, j int) bool { return errs[i].Line < errs[j].Line })
		if n := len(errs); n > maxErrorsShown {
			errs = append(errs[:maxErrorsShown:maxErrorsShown], ConfigError{File: source, Msg: fmt.Sprintf("%d more errors not shown", n-maxErrorsShown)})
		}
		return nil, errs
	}
	return cfg, nil
}

// unknownKeys returns the undecoded keys, leaving out those whose parent is
// itself unknown (an unknown table is reported once).
func unknownKeys(md toml.MetaData) []toml.Key {
	var out []toml.Key
	seen := make(map[string]bool)
	for _, k := range md.Undecoded() {
		parentUnknown := false
		for i := 1; i < len(k); i++ {
			if seen[k[:i].String()] {
				parentUnknown = true
				break
			}
		}
		seen[k.String()] = true
		if !parentUnknown {
			out = append(out, k)
		}
	}
	return out
}

// hasTOMLKey reports whether the struct v points to has a field for the
// TOML key key; anything else (a map) takes any key.
func hasTOMLKey(v any, key string) bool {
	t := reflect.TypeOf(v)
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct {
		return true
	}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		if name == "" {
			name = f.Name
		}
		if strings.EqualFold(name, key) {
			return true
		}
	}
	return false
}

// tomlErrRe matches BurntSushi/toml's decode errors, which carry the line and
// key in their text only.
var tomlErrRe = regexp.MustCompile(`^toml: (?:line (\d+) )?\(last key "([^"]*)"\): (.*)$`)

// locate turns an error from decoding or validation into a ConfigError.
func locate(source string, lines *config.Lines, err error) ConfigError {
	var pe toml.ParseError
	if errors.As(err, &pe) {
		return ConfigError{File: source, Line: pe.Position.Line, Key: pe.LastKey, Msg: pe.Message}
	}
	if fe, ok := config.AsField(err); ok {
		return ConfigError{File: source, Line: lines.Line(fe.Key), Key: fe.Key, Msg: fe.Err.Error()}
	}
	if m := tomlErrRe.FindStringSubmatch(err.Error()); m != nil {
		line, _ := strconv.Atoi(m[1])
		if line == 0 {
			line = lines.Line(m[2])
		}
		return ConfigError{File: source, Line: line, Key: m[2], Msg: m[3]}
	}
	return ConfigError{File: source, Msg: err.Error()}
}
