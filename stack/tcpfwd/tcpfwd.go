// Package tcpfwd forwards the TCP flows the filter allows through a gVisor
// netstack: the stack terminates each client's connection, a real socket is
// dialled to its destination, and a relay copies between the two. It holds
// the netstack and its link endpoint, the pool of connections being set up,
// the relays and the epoll watcher of their idle sockets, and the [stack]
// config section with the dial limits.
package tcpfwd

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/tunfw/tunfw/dns"
	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/inspect"
	"github.com/tunfw/tunfw/stack/dial"
	"github.com/tunfw/tunfw/stack/internal/flows"
	"github.com/tunfw/tunfw/stack/internal/tunio"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/qdisc/fifo"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

const nicID tcpip.NICID = 1

// qdiscLen is how many outbound packets may wait for the device.
const qdiscLen = 1024

// Host is what a Forwarder needs from the stack that runs it.
type Host struct {
	Engine *filter.Engine
	Log    *slog.Logger
	// Now is the engine's monotonic clock.
	Now func() int64
	// MTU is the TUN's, and the netstack's.
	MTU int
	// Dialer opens the connections to the destinations.
	Dialer *dial.Dialer
	// TUN takes the netstack's packets and the cut RSTs.
	TUN tunio.Writer
	// TSO, when not nil, takes the netstack's TCP packets larger than
	// their segment size, and large ones within it, with their checksum
	// left to the kernel: the netstack then builds segments of up to
	// 64 KiB whatever the client's MSS (see linkEndpoint.SupportedGSO).
	TSO tunio.Segmenter
	// Inspect bounds the reading of connections' first bytes for their
	// name (peek.go); its zero value means inspect.DefaultOptions.
	Inspect inspect.Options
	// DNSNames learns names from the DNS answers relayed over TCP; nil:
	// no snooping. DNSBlock is tunfw's answer to a blocked query.
	DNSNames *dns.Table
	DNSBlock dns.BlockMode
}

// Forwarder terminates the clients' TCP connections in a gVisor netstack
// and relays each to a real connection to its destination.
type Forwarder struct {
	h      Host
	ns     *stack.Stack
	ep     *linkEndpoint
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // the relays

	// running counts the relay directions that hold a goroutine (relay.go,
	// linger).
	running atomic.Int32
	// states are the relays' run states, pooled (relay.go).
	states runStates
	// watcher waits for the sockets of idle relays (relay.go).
	watcher   *sockWatcher
	watcherWG sync.WaitGroup
	// closer closes the sockets of relays that ended well (closer.go).
	closer *sockCloser

	// dials are the connections between SYN and the client's completed
	// handshake (dials.go), within dialLimits (limits.go).
	dials      *dialPool
	dialLimits atomic.Pointer[DialLimits]

	guard   flows.Guard
	tracker flows.Tracker
	peeks   peekStats
	// dnsAnswered counts DNS-over-TCP queries tunfw answered itself.
	dnsAnswered atomic.Uint64

	// writeMu guards the scratch slices of writePackets (endpoint.go).
	writeMu   sync.Mutex
	writeBufs [][]byte
	writeBps  []*[]byte
	tsoSlices [][]byte // a packet's payload for writeTSO
}

// New builds the netstack with c's TCP options (its zero value means
// DefaultConfig) and starts the watcher of idle relays. Close stops them.
func New(h Host, c Config, lim DialLimits) (*Forwarder, error) {
	if h.Inspect == (inspect.Options{}) {
		h.Inspect = inspect.DefaultOptions()
	}
	fw := &Forwarder{
		h:      h,
		dials:  newDialPool(),
		closer: newSockCloser(),
		guard:  flows.Guard{Engine: h.Engine, Log: h.Log, Now: h.Now},
		// Sized once: writing a packet allocates nothing.
		tsoSlices: make([][]byte, 0, tunio.MaxPayloadSlices),
	}
	fw.ctx, fw.cancel = context.WithCancel(context.Background())
	fw.SetDialLimits(lim)
	w, err := newSockWatcher()
	if err != nil {
		fw.cancel()
		return nil, err
	}
	fw.watcher = w
	fw.ep = &linkEndpoint{mtu: uint32(h.MTU), write: fw.writePackets, gso: h.TSO != nil}
	fw.ns = stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
	})
	if c == (Config{}) {
		c = DefaultConfig()
	}
	if err := fw.setup(c); err != nil {
		fw.ns.Close()
		w.close()
		fw.cancel()
		return nil, err
	}
	fw.watcherWG.Add(1)
	go func() {
		defer fw.watcherWG.Done()
		if err := w.run(); err != nil {
			// Idle relays are woken no more; flows that go quiet
			// hang until they expire.
			h.Log.Error("idle TCP relays cannot be watched any more", "err", err)
		}
	}()
	return fw, nil
}

func (fw *Forwarder) setup(c Config) error {
	// The FIFO queue batches the stack's outbound packets: its dispatcher
	// hands WritePackets up to 47 at a time, which become one Write call to
	// the device, which coalesces TCP segments before writing.
	qd := fifo.New(fw.ep, 1, qdiscLen)
	if err := fw.ns.CreateNICWithOptions(nicID, fw.ep, stack.NICOptions{QDisc: qd}); err != nil {
		return fmt.Errorf("create NIC: %s", err)
	}
	// Promiscuous + spoofing: the stack accepts packets for any destination
	// and answers as that destination, which is what a transparent
	// forwarder is. Only flows the filter allowed ever reach it.
	if err := fw.ns.SetPromiscuousMode(nicID, true); err != nil {
		return fmt.Errorf("set promiscuous mode: %s", err)
	}
	if err := fw.ns.SetSpoofing(nicID, true); err != nil {
		return fmt.Errorf("set spoofing: %s", err)
	}
	fw.ns.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: nicID},
		{Destination: header.IPv6EmptySubnet, NIC: nicID},
	})
	if err := fw.applyConfig(c); err != nil {
		return err
	}
	// No TIME_WAIT: when the destination closes first, the stack is the
	// active closer, and gVisor hands a new SYN for a tuple in TIME_WAIT
	// only to a listening endpoint, which a forwarder has none of. A client
	// reusing its port (it closed passively, so its kernel sees the port
	// free) would hang for a minute, and every closed connection would hold
	// an endpoint as long. TIME_WAIT guards against old segments of a
	// connection crossing a network; across the TUN there are none, and a
	// retransmitted FIN after it is answered with a RST, which ends the
	// client's LAST_ACK as well.
	tw := tcpip.TCPTimeWaitTimeoutOption(0)
	if err := fw.ns.SetTransportProtocolOption(tcp.ProtocolNumber, &tw); err != nil {
		return fmt.Errorf("set TIME_WAIT timeout: %s", err)
	}
	tcpFwd := tcp.NewForwarder(fw.ns, c.ReceiveBuffer, maxInFlightDials, fw.handleTCP)
	fw.ns.SetTransportProtocolHandler(tcp.ProtocolNumber, fw.screenSYNs(tcpFwd.HandlePacket))
	return nil
}

// Deliver hands a TCP packet the engine forwarded (p, parsed from pkt) to
// the netstack. The bytes are copied, so pkt may be reused when Deliver
// returns. checked: the kernel vouches for its checksums (see
// tun.Device.ReadPackets). The netstack is told not to verify checksums,
// so that the bytes the kernel built are not summed twice (by the TUN
// reader and by the netstack, as before); the packets the kernel does not
// vouch for are verified here instead, and dropped as malformed when bad.
func (fw *Forwarder) Deliver(p *filter.Packet, pkt []byte, checked bool) {
	pkt = pkt[:p.Len]
	if !checked && !checksumsValid(pkt, p.IPHeaderLen, p.Version == 6) {
		fw.h.Engine.Count(filter.ReasonMalformed)
		return
	}
	fw.ep.deliver(pkt, p.Len-p.PayloadLen, p.Version == 6)
}

// checksumsValid reports whether the IPv4 header checksum (when v4) and
// the TCP checksum of pkt are right; l4 is where its TCP header starts.
func checksumsValid(pkt []byte, l4 int, v6 bool) bool {
	var addrs []byte
	if v6 {
		addrs = pkt[8:40]
	} else {
		if checksum.Checksum(pkt[:l4], 0) != 0xffff {
			return false
		}
		addrs = pkt[12:20]
	}
	seg := pkt[l4:]
	pseudo := checksum.Combine(checksum.Checksum(addrs, 0), uint16(header.TCPProtocolNumber))
	pseudo = checksum.Combine(pseudo, uint16(len(seg)))
	return checksum.Checksum(seg, pseudo) == 0xffff
}

// CloseFlows ends the relays of the TCP flows refs names (the other
// protocols' are skipped), as when a reload's recheck cut them or they
// expired: the client gets a RST, a connection still being set up is
// abandoned silently. A flow whose key now names a newer flow is left
// alone. For a flow the recheck cut, the client first gets a RST with the
// sequence number it acknowledged last (the engine's BuildCutReset), which
// it accepts even when its receive window is closed; the stack's own RST,
// sent when the relay aborts, carries the stack's send sequence and would
// be ignored then. It returns how many relays it ended.
func (fw *Forwarder) CloseFlows(refs []filter.FlowRef) int {
	fw.dials.cancelFlows(refs)
	var bp *[]byte
	for _, r := range refs {
		if r.Key.Proto != filter.ProtoTCP {
			continue
		}
		if bp == nil {
			bp = fw.h.TUN.Buffer()
			defer fw.h.TUN.Release(bp)
		}
		rst := *bp
		if n := fw.h.Engine.BuildCutReset(r, rst[tunio.Headroom:]); n > 0 {
			fw.h.TUN.Write([][]byte{rst[:tunio.Headroom+n]})
		}
	}
	return fw.tracker.Close(refs)
}

// Panics returns how many flow handlers panicked and were recovered.
func (fw *Forwarder) Panics() uint64 { return fw.guard.Panics() }

// Close closes the netstack, which aborts every relayed connection, and
// waits for the relays and the watcher to end.
func (fw *Forwarder) Close() {
	fw.cancel()
	fw.ns.Close()
	fw.ns.Wait()
	fw.wg.Wait()
	fw.closer.close()
	fw.watcher.close()
	fw.watcherWG.Wait()
}
