package stack

import (
	"github.com/tunfw/tunfw/stack/tcpfwd"
	"github.com/tunfw/tunfw/stack/udpfwd"
)

// What the stack reports of its forwarders, and the settings that reach
// them through it.

// TCP returns the TCP forwarder: its dial limits and buffer sizes change on
// a reload, and it reports its dials.
func (s *Stack) TCP() *tcpfwd.Forwarder { return s.tcp }

// UDP returns the UDP forwarder, for its counters.
func (s *Stack) UDP() *udpfwd.Forwarder { return s.udp }

// TUNErrors returns how many reads and writes of the TUN failed.
func (s *Stack) TUNErrors() (read, write uint64) { return s.readErrors.Load(), s.out.errors.Load() }

// Drops returns, by reason, the packets the forwarders dropped after the
// engine let them through (see udpfwd.Forwarder.Drops and
// echo.Forwarder.Drops).
func (s *Stack) Drops() map[string]uint64 {
	m := make(map[string]uint64)
	s.udp.Drops(m)
	if s.ping != nil {
		s.ping.Drops(m)
	}
	return m
}

// Panics returns how many flow handlers panicked and were recovered.
func (s *Stack) Panics() uint64 { return s.tcp.Panics() + s.udp.Panics() }

// perSourceBound is how many flows of one kind (UDP, echo) one client
// address may hold: as configured; else the default of that kind (dflt),
// lowered to max_flows_per_source when that is set and otherwise to a
// quarter of max_flows (at least 64), so that one client cannot take the
// whole table from the others even when no per-source bound is set.
func (s *Stack) perSourceBound(configured, dflt int) int {
	if configured > 0 {
		return configured
	}
	l := s.eng.Limits()
	if l.MaxFlowsPerSource > 0 {
		return min(dflt, l.MaxFlowsPerSource)
	}
	return min(dflt, max(64, l.MaxFlows/4))
}

// SetOutboundInterfaces binds tunfw's new sockets to v4 and v6 from now
// on, when the default route moved (tun.FollowDefaultRoute); connections
// open keep theirs. The raw sockets that carry pings are bound anew.
func (s *Stack) SetOutboundInterfaces(v4, v6 string) {
	old4, old6 := s.dialer.Interfaces()
	s.dialer.SetInterfaces(v4, v6)
	if s.ping != nil && (v4 != old4 || v6 != old6) {
		if err := s.ping.Bind(v4, v6); err != nil {
			s.log.Warn("ping sockets keep their interface", "err", err)
		}
	}
}
