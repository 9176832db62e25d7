package main

import (
	"fmt"
	"io"

	"github.com/tunfw/tunfw/tun"
	"github.com/vishvananda/netlink"
)

// cmdDown removes what a tunfw that died without cleaning up (kill -9, a
// crash, power loss of a persistent setup) left in the host's routing: the
// ip rules at its rule priority, the routes of its table and its nftables
// table, the fail = "closed" kill switch included. It reads the same
// config file as `up` to know the table and priority. With --block it
// does the opposite: it installs the kill switch, for boot, before tunfw
// starts (`up` replaces it).
func cmdDown(args []string, stdout, stderr io.Writer) int {
	var f commonFlags
	fs := newFlagSet("down", "Remove the ip rules, table routes and nftables table a crashed 'tunfw up' left behind\n"+
		"(this lifts the fail = \"closed\" kill switch). Table and rule priority come from the config file.\n"+
		"With --block, install the kill switch instead (at boot, before 'tunfw up'; 'up' replaces it).", stdout, &f, false)
	block := fs.Bool("block", false, "install the fail = \"closed\" kill switch: block everything tunfw would capture until 'tunfw up' runs")
	if code, stop := parseFlags(fs, args, stderr); stop {
		return code
	}
	cfg, err := loadConfig(f.config, configGiven(fs), func() {
		fmt.Fprintf(stderr, "tunfw down: %s does not exist; using the embedded config.toml\n", defaultConfigPath)
	})
	if err != nil {
		printConfigError(stderr, "tunfw down", err)
		return 1
	}
	// A non-persistent TUN lives exactly as long as its tunfw: if it is
	// there, tunfw is running and removing its rules would break it.
	if _, err := netlink.LinkByName(cfg.Net.Name); err == nil {
		fmt.Fprintf(stderr, "tunfw down: %s exists, so tunfw is still running; stop it (SIGTERM) instead\n", cfg.Net.Name)
		return 1
	}
	if *block {
		n, err := tun.InstallKillSwitch(cfg.Net)
		if err != nil {
			fmt.Fprintf(stderr, "tunfw down --block: %v\n", err)
			return 1
		}
		fmt.Fprintf(stdout, "tunfw down --block: kill switch installed (table %d, rule priority %d-%d, nftables table inet %s; replaced %d ip rules, %d routes)\n",
			cfg.Net.Table, cfg.Net.RulePriority, cfg.Net.RulePriority+1, tun.GuardTableName(cfg.Net), n.Rules, n.Routes)
		return 0
	}
	n, err := tun.Cleanup(cfg.Net)
	fmt.Fprintf(stdout, "tunfw down: removed %d ip rules, %d routes and %d nftables tables (table %d, rule priority %d-%d, nftables table inet %s)\n",
		n.Rules, n.Routes, n.NFTables, cfg.Net.Table, cfg.Net.RulePriority, cfg.Net.RulePriority+1, tun.GuardTableName(cfg.Net))
	if err != nil {
		fmt.Fprintf(stderr, "tunfw down: %v\n", err)
		return 1
	}
	return 0
}
