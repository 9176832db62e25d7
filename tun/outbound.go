package tun

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/vishvananda/netlink"
)

// FollowDefaultRoute calls moved with the interfaces of the main table's
// IPv4 and IPv6 default routes each time one of them changes (Wi-Fi to
// Ethernet, a VPN coming up), until ctx ends; v4 and v6 are the interfaces
// in use now, tunName the TUN, which never counts. A family whose default
// route is gone, or cannot be read, keeps its interface: unbound, tunfw's
// own sockets would be routed into the TUN. If the subscription to route
// changes fails later (the kernel drops messages under churn), it is made
// again. It returns once it listens, or with the error that stopped it.
func FollowDefaultRoute(ctx context.Context, tunName, v4, v6 string, moved func(v4, v6 string), log *slog.Logger) error {
	updates, err := subscribeRoutes(ctx, log)
	if err != nil {
		return err
	}
	look := func() {
		n4, err4 := DefaultRouteInterface(true, tunName)
		n6, err6 := DefaultRouteInterface(false, tunName)
		if err4 != nil || err6 != nil {
			log.Warn("following the default route", "err4", err4, "err6", err6)
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
	go func() {
		for {
			// A change between the first lookup and the subscription,
			// or while it was made again, is not missed.
			look()
			for range updates {
				// Drain a burst (a link going down removes many
				// routes) before looking once.
				for len(updates) > 0 {
					<-updates
				}
				look()
			}
			for ctx.Err() == nil {
				log.Warn("following the default route: route changes lost; listening again")
				select {
				case <-ctx.Done():
				case <-time.After(time.Second):
				}
				if updates, err = subscribeRoutes(ctx, log); err == nil {
					break
				}
			}
			if ctx.Err() != nil {
				return
			}
		}
	}()
	return nil
}

// subscribeRoutes listens to route changes until ctx ends, when the
// channel is closed (and also when the subscription fails).
func subscribeRoutes(ctx context.Context, log *slog.Logger) (chan netlink.RouteUpdate, error) {
	updates := make(chan netlink.RouteUpdate, 64)
	done := make(chan struct{})
	err := netlink.RouteSubscribeWithOptions(updates, done, netlink.RouteSubscribeOptions{
		ErrorCallback: func(err error) {
			if ctx.Err() == nil {
				log.Warn("following the default route", "err", err)
			}
		},
	})
	if err != nil {
		close(done)
		return nil, fmt.Errorf("subscribe to route changes: %w", err)
	}
	go func() {
		<-ctx.Done()
		close(done)
	}()
	return updates, nil
}
