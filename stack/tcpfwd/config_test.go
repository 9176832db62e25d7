package tcpfwd

import (
	"strings"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

func TestConfigValidate(t *testing.T) {
	if err := DefaultConfig().Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	tests := []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"congestion control", func(c *Config) { c.CongestionControl = "vegas" }, `stack.congestion_control: "vegas" is not reno or cubic`},
		{"buffer too small", func(c *Config) { c.ReceiveBuffer = 100 }, "stack.receive_buffer: 100 bytes is out of range"},
		{"buffer too large", func(c *Config) { c.SendBufferMax = 1 << 30 }, "stack.send_buffer_max: 1073741824 bytes is out of range"},
		{"initial above max", func(c *Config) { c.SendBuffer, c.SendBufferMax = 2<<20, 1<<20 }, "stack.send_buffer: 2097152 bytes is more than send_buffer_max"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := DefaultConfig()
			tt.mod(&c)
			err := c.Validate()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

// TestConfigApplies checks that every [stack] value is accepted by gVisor
// and set on the stack's TCP protocol.
func TestConfigApplies(t *testing.T) {
	for i, cc := range []string{"reno", "cubic"} {
		on := i == 1 // the switches off with reno, on with cubic
		c := DefaultConfig()
		c.CongestionControl, c.RACK, c.SACK, c.ModerateReceiveBuffer = cc, on, on, on
		c.ReceiveBufferMax = 16 << 20
		c.SendBuffer, c.SendBufferMax = 256<<10, 2<<20
		s := newTestStack(t, c)
		var got tcpip.CongestionControlOption
		if err := s.ns.TransportProtocolOption(tcp.ProtocolNumber, &got); err != nil {
			t.Fatalf("%s: read congestion control: %s", cc, err)
		}
		if string(got) != cc {
			t.Errorf("congestion control = %q, want %q", got, cc)
		}
		var rcv tcpip.TCPReceiveBufferSizeRangeOption
		if err := s.ns.TransportProtocolOption(tcp.ProtocolNumber, &rcv); err != nil {
			t.Fatal(err)
		}
		if rcv.Max != 16<<20 || rcv.Default != c.ReceiveBuffer {
			t.Errorf("receive buffer range = %+v", rcv)
		}
		var snd tcpip.TCPSendBufferSizeRangeOption
		if err := s.ns.TransportProtocolOption(tcp.ProtocolNumber, &snd); err != nil || snd.Max != 2<<20 || snd.Default != 256<<10 {
			t.Errorf("send buffer range = %+v (%v)", snd, err)
		}
		var sack tcpip.TCPSACKEnabled
		if err := s.ns.TransportProtocolOption(tcp.ProtocolNumber, &sack); err != nil || bool(sack) != on {
			t.Errorf("SACK = %v (%v), want %v", sack, err, on)
		}
		var rec tcpip.TCPRecovery
		if err := s.ns.TransportProtocolOption(tcp.ProtocolNumber, &rec); err != nil || (rec&tcpip.TCPRACKLossDetection != 0) != on {
			t.Errorf("RACK = %v (%v), want %v", rec, err, on)
		}
		var mod tcpip.TCPModerateReceiveBufferOption
		if err := s.ns.TransportProtocolOption(tcp.ProtocolNumber, &mod); err != nil || bool(mod) != on {
			t.Errorf("receive buffer moderation = %v (%v), want %v", mod, err, on)
		}
	}
}

// newTestStack builds a Forwarder, enough to inspect its gVisor settings;
// nothing is read or written.
func newTestStack(t *testing.T, c Config) *Forwarder {
	t.Helper()
	s, err := New(testHost(t, nil), c, DialLimits{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

func TestBounded(t *testing.T) {
	def := DefaultConfig()
	floor := FlowBufferFloor(1500)
	if floor != 64<<10 || FlowBufferFloor(65520) != 16*65520 || FlowBufferFloor(9000) != 144000 {
		t.Errorf("floors: %d %d %d", floor, FlowBufferFloor(65520), FlowBufferFloor(9000))
	}
	if got := def.Bounded(1<<40, floor); got != def {
		t.Errorf("a large budget changed the config: %+v", got)
	}
	got := def.Bounded(512<<10, floor)
	if got.ReceiveBufferMax != 256<<10 || got.SendBufferMax != 256<<10 || got.ReceiveBuffer != 256<<10 || got.SendBuffer != 256<<10 {
		t.Errorf("512 KiB per flow: %+v, want 256 KiB each way", got)
	}
	got = def.Bounded(1000, floor)
	if got.ReceiveBufferMax != floor || got.SendBufferMax != floor {
		t.Errorf("1000 bytes per flow: %+v, want the %d-byte floor", got, floor)
	}
	if err := got.Validate(); err != nil {
		t.Errorf("bounded config invalid: %v", err)
	}
	small := def
	small.ReceiveBuffer, small.ReceiveBufferMax = 8192, 16384
	if got := small.Bounded(1000, floor); got.ReceiveBufferMax != 16384 || got.ReceiveBuffer != 8192 {
		t.Errorf("Bounded raised configured buffers: %+v", got)
	}
}
