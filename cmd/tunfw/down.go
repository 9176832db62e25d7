package main

import (
	"fmt"
	"io"

	"github.com/tunfw/tunfw/tun"
	"github.com/vishvananda/netlink"
)

// cmdDown removes what a tunfw that died without cleaning up (kill -9, a
// crash, power loss of a persistent setup) left in the host's routing: the
// ip rules at its rule priority and the routes of its table, the fail =
// "closed" kill switch included. It reads the same config file as `up` to
// know the table and priority.
func cmdDown(args []string, stdout, stderr io.Writer) int {
	var f commonFlags
	fs := newFlagSet("down", "Remove the ip rules and table routes a crashed 'tunfw up' left behind (this lifts the\nfail = \"closed\" kill switch). Table and rule priority come from the config file.", stdout, &f, false)
	if code, stop := parseFlags(fs, args, stderr); stop {
		return code
	}
	data, source, fellBack, err := readConfig(f.config, configGiven(fs))
	if err != nil {
		fmt.Fprintf(stderr, "tunfw down: %v\n", err)
		return 1
	}
	if fellBack {
		fmt.Fprintf(stderr, "tunfw down: %s does not exist; using the embedded config.toml\n", defaultConfigPath)
	}
	cfg, err := parseConfig(source, data)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	// A non-persistent TUN lives exactly as long as its tunfw: if it is
	// there, tunfw is running and removing its rules would break it.
	if _, err := netlink.LinkByName(cfg.Net.Name); err == nil {
		fmt.Fprintf(stderr, "tunfw down: %s exists, so tunfw is still running; stop it (SIGTERM) instead\n", cfg.Net.Name)
		return 1
	}
	n, err := tun.Cleanup(cfg.Net)
	fmt.Fprintf(stdout, "tunfw down: removed %d ip rules and %d routes (table %d, rule priority %d-%d)\n",
		n.Rules, n.Routes, cfg.Net.Table, cfg.Net.RulePriority, cfg.Net.RulePriority+1)
	if err != nil {
		fmt.Fprintf(stderr, "tunfw down: %v\n", err)
		return 1
	}
	return 0
}
