package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os/signal"
	"syscall"
	"time"

	"github.com/tunfw/tunfw/dns"
	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/inspect"
	"github.com/tunfw/tunfw/stack"
	"github.com/tunfw/tunfw/stack/dial"
	"github.com/tunfw/tunfw/stack/udpfwd"
	"github.com/tunfw/tunfw/tun"
	"github.com/vishvananda/netlink"
)

func cmdUp(args []string, stdout, stderr io.Writer) int {
	var f commonFlags
	fs := newFlagSet("up", "Create the TUN device and routes, then filter and forward until SIGINT or SIGTERM,\nand remove everything installed before exiting.", stdout, &f, true)
	if code, stop := parseFlags(fs, args, stderr); stop {
		return code
	}
	log, err := newLogger(stderr, f.logFormat, f.logLevel)
	if err != nil {
		fmt.Fprintf(stderr, "tunfw up: %v\n", err)
		return 2
	}
	cfg, err := loadConfig(f.config, configGiven(fs), func() {
		log.Warn("config file does not exist; using the embedded config.toml", "path", defaultConfigPath)
	})
	if _, invalid := err.(ConfigErrors); invalid {
		// Plain lines, one per error, so file:line stays readable.
		fmt.Fprintln(stderr, err)
		log.Error("invalid config; nothing was changed")
		return 1
	}
	if err != nil {
		log.Error("cannot start", "err", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := up(ctx, cfg, log); err != nil {
		log.Error("tunfw failed", "err", err)
		return 1
	}
	return 0
}

// up runs the firewall until ctx ends. Everything it installs is removed
// before it returns, whatever the outcome.
func up(ctx context.Context, cfg *Config, log *slog.Logger) error {
	out, err := resolveOutbound(cfg.Net)
	if err != nil {
		return err
	}
	d, err := newDaemon(cfg, log)
	if err != nil {
		return err
	}
	defer d.close()
	dev, err := tun.Open(cfg.Net)
	if err != nil {
		return err
	}
	go dev.WatchEvents(log)
	cleanStop := false
	defer func() {
		closeDev := dev.Close
		if cfg.Net.FailClosed && !cleanStop {
			// Only a clean stop lifts the kill switch.
			closeDev = dev.CloseKeepKillSwitch
			log.Warn("fail = closed: captured traffic stays blocked until tunfw runs again or `tunfw down` lifts the kill switch",
				"table", cfg.Net.Table, "nftables", tun.GuardTableName(cfg.Net))
		}
		if err := closeDev(); err != nil {
			log.Error("teardown", "err", err)
		}
	}()
	dev.OnGuardError = func(err error) {
		if err != nil {
			log.Error("cannot refresh the nftables table: sockets bound to a device will no longer be refused", "err", err)
		} else {
			log.Info("nftables table refreshed again")
		}
	}
	// The device is ours now, so no other tunfw runs with it: what its
	// table, rule priority and nftables table hold was left by a crashed
	// run (or `tunfw down --block`). Install replaces it.
	left, err := dev.Install(cfg.Net)
	if left.Any() {
		log.Warn("removed leftovers of an earlier run", "rules", left.Rules, "routes", left.Routes, "nftables", left.NFTables, "table", cfg.Net.Table)
	}
	if err != nil {
		return err
	}
	if cfg.Net.Auto && cfg.Net.NFTables {
		var err error
		if d.preexisting, err = dev.Preexisting(); err != nil {
			log.Warn("some connections open at start could not be kept on the normal routes; they are captured", "err", err)
		}
		log.Info("connections open at start stay on the normal routes, unjudged", "count", d.preexisting)
	}
	for _, w := range dev.Warnings(cfg.Net, out.IfaceV4, out.IfaceV6) {
		log.Warn(w)
	}
	engOpts := filter.EngineOptions{Logger: log, Limits: cfg.Limits}
	for _, a := range cfg.Net.Addresses {
		engOpts.LocalAddrs = append(engOpts.LocalAddrs, a.Addr())
	}
	// Names: DNS answers tunfw forwards name their addresses (per
	// client), and TLS, HTTP and QUIC flows are read for theirs when a
	// rule by name needs it.
	var nameTable *dns.Table
	if cfg.DNS.Snoop {
		nameTable = dns.NewTable(cfg.DNS.MaxNames)
		d.names = nameTable
		d.dnsName = func(client, addr netip.Addr) (string, bool) { return nameTable.Lookup(client, addr, time.Now()) }
		engOpts.Names = d.dnsName
	}
	engOpts.Peekable = func(p *filter.Packet) bool { return inspect.CanPeek(p.Proto, p.DstPort) }
	eng := filter.NewEngine(cfg.Rules, engOpts)
	dial := out
	if cfg.Net.PolicyRouting() && cfg.Net.Outbound == "" {
		// The fwmark takes tunfw's sockets past its table to the main
		// table, which picks the interface for each destination: bound
		// to the default route's, they could not reach any other (a
		// gateway client's namespace, a second network, a VPN).
		dial.IfaceV4, dial.IfaceV6 = "", ""
	}
	mem := applyMemoryBudget(cfg, log) // memory.go: GOMEMLIMIT, buffer bounds
	applyProcs(log)                    // procs.go: GOMAXPROCS
	st, err := stack.New(stack.Options{
		Device:   dev,
		MTU:      cfg.Net.MTU,
		Engine:   eng,
		Outbound: dial,
		Logger:   log,
		TCP:      mem.Stack,
		Dial:     cfg.Dial,
		// A busy UDP flow's receive buffer grows, for as many flows as
		// the memory budget's share for them allows.
		UDPReceiveBuffer: mem.UDPReceiveBuffer,
		UDPLargeBuffers:  mem.UDPLargeBuffers,
		Inspect:          cfg.Inspect,
		DNS:              udpfwd.DNS{Names: nameTable, Block: cfg.DNS.Block},
		CPU:              cfg.CPU,
	})
	if err != nil {
		return fmt.Errorf("build stack: %w", err)
	}
	defer st.Close()
	go watchMemory(ctx, st.TCP(), mem, cfg.Net.MTU, log)
	go returnIdleMemory(ctx, log)
	if cfg.Net.Outbound == "" && (dial.IfaceV4 != "" || dial.IfaceV6 != "") {
		// Bound to the default route's interfaces: follow them.
		if err := tun.FollowDefaultRoute(ctx, dev.InterfaceName(), dial.IfaceV4, dial.IfaceV6, st.SetOutboundInterfaces, log); err != nil {
			log.Warn("tunfw's own connections stay on the default route's interface of now if it moves", "err", err)
		}
	}
	d.serve(ctx, eng, st, dev.InterfaceName())
	// Setup is done: keep only CAP_NET_ADMIN and CAP_NET_RAW (caps.go).
	dropPrivileges(log)

	runErr := make(chan error, 1)
	go func() { runErr <- st.Run(ctx) }()
	log.Info("tunfw is up",
		"config", cfg.Source, "tun", dev.InterfaceName(), "mtu", cfg.Net.MTU,
		"routes", fmt.Sprint(dev.Routes()), "outbound_v4", dial.IfaceV4, "outbound_v6", dial.IfaceV6,
		"fwmark", out.Mark, "rules", cfg.Rules.Len(), "default", cfg.Rules.Default().String(), "monitor", cfg.Rules.Monitor(),
		"auto", cfg.Net.Auto, "from", fmt.Sprint(cfg.Net.From), "table", cfg.Net.Table, "fail_closed", cfg.Net.FailClosed)
	select {
	case <-ctx.Done():
		cleanStop = true
		log.Info("shutting down: removing routes and device")
		return nil
	case err := <-runErr:
		if err == nil && ctx.Err() == nil {
			// The device was closed under us (deleted): not a clean stop.
			err = fmt.Errorf("TUN device %s went away", dev.InterfaceName())
		}
		if ctx.Err() != nil && err == nil {
			cleanStop = true
		}
		return err
	}
}

// resolveOutbound decides how tunfw's own sockets avoid the TUN. Without an
// explicit interface they are bound to the default route's interface of
// their family (up binds none under policy routing, where the mark does
// it); with neither that nor a mark, routing the include list into the
// TUN would send tunfw's own connections back into itself, so it refuses
// to start.
func resolveOutbound(s tun.Settings) (dial.Outbound, error) {
	o := dial.Outbound{Mark: s.FWMark}
	if s.Outbound != "" {
		if _, err := netlink.LinkByName(s.Outbound); err != nil {
			return o, fmt.Errorf("route.outbound %q: %w", s.Outbound, err)
		}
		o.IfaceV4, o.IfaceV6 = s.Outbound, s.Outbound
		return o, nil
	}
	var err4, err6 error
	o.IfaceV4, err4 = tun.DefaultRouteInterface(true, s.Name)
	o.IfaceV6, err6 = tun.DefaultRouteInterface(false, s.Name)
	if err := errors.Join(err4, err6); err != nil {
		return o, fmt.Errorf("find default route interface: %w", err)
	}
	if o.IfaceV4 == "" && o.IfaceV6 == "" && o.Mark == 0 && len(s.Include) > 0 {
		return o, errors.New("route.outbound is empty and there is no default route to take its interface from; " +
			"set route.outbound (or route.fwmark with a policy rule) so tunfw's own connections do not loop into the TUN")
	}
	return o, nil
}
