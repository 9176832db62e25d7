// Command tunfw is a userspace firewall: traffic routed into a TUN device is
// judged by the rules of a TOML file, and the flows they allow are forwarded
// to the real destinations through a gVisor netstack.
//
// Usage:
//
//	tunfw up      [-c FILE] [--log-format text|json] [--log-level LEVEL]
//	tunfw check   [-c FILE]
//	tunfw explain [-c FILE] [--json] PROTO SRC DST
//	tunfw down    [-c FILE] [--block]
//	tunfw version
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/debug"
	"strings"
)

// version is set at build time by the Makefile (-ldflags -X).
var version = ""

const usage = `tunfw: a userspace TUN firewall driven by one TOML file.

Usage:
  tunfw up      [-c FILE] [--log-format text|json] [--log-level debug|info|warn|error]
                  create the TUN device and routes, filter and forward until
                  SIGINT/SIGTERM, then remove everything it installed
  tunfw down    [-c FILE] [--block]
                            after a crash, remove the ip rules, table routes and
                            nftables table (kill switch included) that config's
                            tunfw left; --block installs the kill switch instead
  tunfw check   [-c FILE]   validate a config file; exit 1 listing every error
  tunfw status  [--json]    a running tunfw's state: uptime, mode, flows, verdicts
  tunfw flows   [--json] [--proto P] [--src CIDR] [--dst CIDR] [--state S] [--name N]
                            the flow table
  tunfw stats   [--json]    per-rule counters and drops by reason
  tunfw reload              re-read the config; exit 1 (rules kept) if invalid
  tunfw explain [-c FILE] [--json] PROTO SRC DST
                            how the rules judge a flow, rule by rule, e.g.
                            tunfw explain tcp 198.18.0.1:40000 www.example.com:443
  tunfw version             print the version

-c/--config defaults to /etc/tunfw/config.toml; when that file does not exist
the built-in example config is used (and the log says so). status, flows,
stats and reload talk to the control socket ([control] socket of the config,
or --socket PATH); SIGHUP also reloads.
Run 'tunfw COMMAND --help' for a command's flags.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run executes a command line and returns the process exit code.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "up":
		return cmdUp(args[1:], stdout, stderr)
	case "check":
		return cmdCheck(args[1:], stdout, stderr)
	case "down":
		return cmdDown(args[1:], stdout, stderr)
	case "status", "flows", "stats", "reload":
		return cmdClient(args[0], args[1:], stdout, stderr)
	case "explain":
		return cmdExplain(args[1:], stdout, stderr)
	case "version":
		fmt.Fprintf(stdout, "tunfw %s\n", versionString())
		return 0
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "tunfw: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}

func versionString() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}

// commonFlags are shared by the commands that read a config file.
type commonFlags struct {
	config    string
	logFormat string
	logLevel  string
}

// newFlagSet builds a command's flag set; -c and --config are one flag.
func newFlagSet(name, summary string, stdout io.Writer, f *commonFlags, withLog bool) *flag.FlagSet {
	fs := flag.NewFlagSet("tunfw "+name, flag.ContinueOnError)
	fs.SetOutput(stdout)
	fs.StringVar(&f.config, "c", defaultConfigPath, "config `file`")
	fs.StringVar(&f.config, "config", defaultConfigPath, "config `file` (same as -c)")
	if withLog {
		fs.StringVar(&f.logFormat, "log-format", "text", "log format: text or json")
		fs.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	}
	fs.Usage = func() {
		fmt.Fprintf(stdout, "Usage: tunfw %s [flags]\n\n%s\n\nFlags:\n", name, summary)
		fs.PrintDefaults()
	}
	return fs
}

// parseFlags parses args; it returns (exit code, true) when the command
// should stop here (after --help or a bad flag).
func parseFlags(fs *flag.FlagSet, args []string, stderr io.Writer) (int, bool) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0, true
		}
		fmt.Fprintf(stderr, "%s: %v\n", fs.Name(), err)
		return 2, true
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "%s: unexpected argument %q\n", fs.Name(), fs.Arg(0))
		return 2, true
	}
	return 0, false
}

// configGiven reports whether -c/--config was set on the command line.
func configGiven(fs *flag.FlagSet) bool {
	given := false
	fs.Visit(func(f *flag.Flag) {
		if f.Name == "c" || f.Name == "config" {
			given = true
		}
	})
	return given
}

func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch strings.ToLower(format) {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}

func cmdCheck(args []string, stdout, stderr io.Writer) int {
	var f commonFlags
	fs := newFlagSet("check", "Validate a config file without touching the network. Exit 0 if valid, 1 listing every error.", stdout, &f, false)
	if code, stop := parseFlags(fs, args, stderr); stop {
		return code
	}
	cfg, err := loadConfig(f.config, configGiven(fs), func() {
		fmt.Fprintf(stderr, "tunfw: %s does not exist; checking the embedded config.toml\n", defaultConfigPath)
	})
	if err != nil {
		printConfigError(stderr, "tunfw", err)
		return 1
	}
	fmt.Fprintf(stdout, "%s: ok (%d rules)\n", cfg.Source, cfg.Rules.Len())
	return 0
}
