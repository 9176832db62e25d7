package tun

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/vishvananda/netlink"
)

// FollowDefaultRoute calls moved with the interfaces of the main table's
// IPv4 and IPv6 default routes each time one of them changes (Wi-Fi to
// Ethernet, a VPN coming up), until ctx ends; v4 and v6 are the interfaces
// in use now. A family whose default route is gone keeps its interface:
// unbound, tunfw's own sockets would be routed into the TUN. It returns
// once it listens to route changes, or with the error that stopped it.
func FollowDefaultRoute(ctx context.Context, v4, v6 string, moved func(v4, v6 string), log *slog.Logger) error {
	updates := make(chan netlink.RouteUpdate, 64)
	done := make(chan struct{})
	err := netlink.RouteSubscribeWithOptions(updates, done, netlink.RouteSubscribeOptions{
		ErrorCallback: func(err error) { log.Warn("following the default route", "err", err) },
	})
	if err != nil {
		close(done)
		return fmt.Errorf("subscribe to route changes: %w", err)
	}
	go func() {
		<-ctx.Done()
		close(done)
	}()
	go func() {
		for range updates {
			// Drain a burst (a link going down removes many routes)
			// before looking once.
			for len(updates) > 0 {
				<-updates
			}
			n4, err4 := DefaultRouteInterface(true)
			n6, err6 := DefaultRouteInterface(false)
			if err4 != nil || err6 != nil {
				log.Warn("following the default route", "err4", err4, "err6", err6)
				continue
			}
			if n4 == "" {
				n4 = v4
			}
			if n6 == "" {
				n6 = v6
			}
			if n4 != v4 || n6 != v6 {
				log.Info("default route moved: tunfw's own connections leave by its interface from now on",
					"outbound_v4", n4, "outbound_v6", n6, "was_v4", v4, "was_v6", v6)
				v4, v6 = n4, n6
				moved(v4, v6)
			}
		}
	}()
	return nil
}
