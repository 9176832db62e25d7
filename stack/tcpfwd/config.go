package tcpfwd

import (
	"errors"
	"fmt"

	"github.com/tunfw/tunfw/internal/config"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// Config is the [stack] section: the TCP options of the gVisor netstack that
// terminates the clients' connections. It applies at start. The defaults
// are the ones `make bench` measured best on our 2-core machines (README,
// Performance); the others are there to experiment with.
type Config struct {
	// SACK enables selective acknowledgements.
	SACK bool `toml:"sack"`
	// RACK enables RACK-TLP loss detection; off (the default), losses are
	// found by three duplicate ACKs (classic fast retransmit). With RACK,
	// about one download in 30 through a gateway stalled for good
	// (gVisor's RACK recovery stopped retransmitting); without, none of
	// 320 did.
	RACK bool `toml:"rack"`
	// CongestionControl is "reno" or "cubic".
	CongestionControl string `toml:"congestion_control"`
	// ModerateReceiveBuffer lets a connection's receive buffer grow from
	// ReceiveBuffer up to ReceiveBufferMax as its rate asks for
	// (receive-buffer auto-tuning); off, it stays at ReceiveBuffer.
	ModerateReceiveBuffer bool `toml:"moderate_receive_buffer"`
	// ReceiveBuffer and ReceiveBufferMax are the initial and the largest
	// receive buffer of a connection, in bytes.
	ReceiveBuffer    int `toml:"receive_buffer"`
	ReceiveBufferMax int `toml:"receive_buffer_max"`
	// SendBuffer and SendBufferMax are the initial and the largest send
	// buffer of a connection, in bytes.
	SendBuffer    int `toml:"send_buffer"`
	SendBufferMax int `toml:"send_buffer_max"`
}

// Buffer bounds accepted in [stack].
const (
	minBuffer = tcp.MinBufferSize
	maxBuffer = 64 << 20
)

// DefaultConfig returns the [stack] settings used for keys the config file
// does not set.
func DefaultConfig() Config {
	return Config{
		SACK:                  true,
		RACK:                  false,
		CongestionControl:     "reno",
		ModerateReceiveBuffer: true,
		ReceiveBuffer:         1 << 20,
		ReceiveBufferMax:      4 << 20,
		SendBuffer:            1 << 20,
		SendBufferMax:         4 << 20,
	}
}

// Validate checks the section.
func (c Config) Validate() error {
	var errs []error
	if c.CongestionControl != "reno" && c.CongestionControl != "cubic" {
		errs = append(errs, config.Errorf("stack.congestion_control", "%q is not reno or cubic", c.CongestionControl))
	}
	buf := func(key string, v int) bool {
		if v < minBuffer || v > maxBuffer {
			errs = append(errs, config.Errorf(key, "%d bytes is out of range %d-%d", v, minBuffer, maxBuffer))
			return false
		}
		return true
	}
	pair := func(key string, v, max int, maxKey string) {
		okV, okMax := buf("stack."+key, v), buf("stack."+maxKey, max)
		if okV && okMax && v > max {
			errs = append(errs, config.Errorf("stack."+key, "%d bytes is more than %s (%d)", v, maxKey, max))
		}
	}
	pair("receive_buffer", c.ReceiveBuffer, c.ReceiveBufferMax, "receive_buffer_max")
	pair("send_buffer", c.SendBuffer, c.SendBufferMax, "send_buffer_max")
	return errors.Join(errs...)
}

// applyConfig sets c on the stack's TCP protocol.
func (fw *Forwarder) applyConfig(c Config) error {
	set := func(what string, opt tcpip.SettableTransportProtocolOption) error {
		if err := fw.ns.SetTransportProtocolOption(tcp.ProtocolNumber, opt); err != nil {
			return fmt.Errorf("set %s: %s", what, err)
		}
		return nil
	}
	sack := tcpip.TCPSACKEnabled(c.SACK)
	rec := tcpip.TCPRecovery(0)
	if c.RACK {
		rec = tcpip.TCPRACKLossDetection
	}
	cc := tcpip.CongestionControlOption(c.CongestionControl)
	mod := tcpip.TCPModerateReceiveBufferOption(c.ModerateReceiveBuffer)
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: minBuffer, Default: c.ReceiveBuffer, Max: c.ReceiveBufferMax}
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: minBuffer, Default: c.SendBuffer, Max: c.SendBufferMax}
	return errors.Join(
		set("SACK", &sack),
		set("RACK", &rec),
		set("congestion control", &cc),
		set("receive buffer moderation", &mod),
		set("receive buffer sizes", &rcv),
		set("send buffer sizes", &snd),
	)
}

// FlowBufferFloor is the smallest receive or send buffer Bounded leaves a
// connection on a TUN of this MTU: 16 segments, between 64 KiB and 1 MiB.
// gVisor's buffers only span the TUN side of a flow (local, or a LAN in
// gateway mode; the kernel socket covers the path to the destination), but
// a window of one or two 64 KiB segments stops and waits: `make bench`
// measured 2.1 instead of 6.5 Gbit/s client->server with 64 KiB buffers at
// MTU 65520.
func FlowBufferFloor(mtu int) int {
	return min(max(16*mtu, 64<<10), 1<<20)
}

// Bounded returns c with every connection's buffers limited to perFlow
// bytes in all (half each way, but at least floor each): what a memory
// budget shared by a number of flows allows each. The initial sizes are
// lowered with the maxima; nothing is raised.
func (c Config) Bounded(perFlow int64, floor int) Config {
	half := int(min(max(perFlow/2, int64(floor)), maxBuffer))
	c.ReceiveBufferMax = min(c.ReceiveBufferMax, half)
	c.ReceiveBuffer = min(c.ReceiveBuffer, c.ReceiveBufferMax)
	c.SendBufferMax = min(c.SendBufferMax, half)
	c.SendBuffer = min(c.SendBuffer, c.SendBufferMax)
	return c
}

// SetBufferSizes changes the receive and send buffer ranges of the running
// stack to c's. New connections start with the new sizes, and every
// connection's auto-tuning grows its buffers only up to the new maxima
// (gVisor reads them when it grows a buffer); buffers already grown keep
// their size.
func (fw *Forwarder) SetBufferSizes(c Config) error {
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: minBuffer, Default: c.ReceiveBuffer, Max: c.ReceiveBufferMax}
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: minBuffer, Default: c.SendBuffer, Max: c.SendBufferMax}
	if err := fw.ns.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv); err != nil {
		return fmt.Errorf("set receive buffer sizes: %s", err)
	}
	if err := fw.ns.SetTransportProtocolOption(tcp.ProtocolNumber, &snd); err != nil {
		return fmt.Errorf("set send buffer sizes: %s", err)
	}
	return nil
}
