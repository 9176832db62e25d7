package stack

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"testing"

	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/stack/internal/gaddr"
	"github.com/tunfw/tunfw/stack/internal/tunio"
	"github.com/tunfw/tunfw/tun"
	wgtun "golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// scriptDevice is a TUN device that returns one batch of packets, then
// reports itself closed, and keeps what is written to it.
type scriptDevice struct {
	wgtun.Device
	batch [][]byte

	mu      sync.Mutex
	written [][]byte
}

func (d *scriptDevice) File() *os.File { return nil }
func (d *scriptDevice) BatchSize() int { return 8 }

func (d *scriptDevice) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	if d.batch == nil {
		return 0, os.ErrClosed
	}
	n := 0
	for ; n < len(d.batch) && n < len(bufs); n++ {
		sizes[n] = copy(bufs[n][offset:], d.batch[n])
	}
	d.batch = nil
	return n, nil
}

func (d *scriptDevice) Write(bufs [][]byte, offset int) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, b := range bufs {
		d.written = append(d.written, append([]byte(nil), b[offset:]...))
	}
	return len(bufs), nil
}

// synPacket is a client's IPv4 SYN from src to dst.
func synPacket(src, dst netip.AddrPort) []byte {
	b := make([]byte, header.IPv4MinimumSize+header.TCPMinimumSize)
	header.IPv4(b).Encode(&header.IPv4Fields{
		TotalLength: uint16(len(b)), TTL: 64, Protocol: uint8(header.TCPProtocolNumber),
		SrcAddr: gaddr.To(src.Addr()), DstAddr: gaddr.To(dst.Addr()),
	})
	header.IPv4(b).SetChecksum(^header.IPv4(b).CalculateChecksum())
	header.TCP(b[header.IPv4MinimumSize:]).Encode(&header.TCPFields{
		SrcPort: src.Port(), DstPort: dst.Port(), SeqNum: 1, DataOffset: header.TCPMinimumSize,
		Flags: header.TCPFlagSyn, WindowSize: 65535,
	})
	return b
}

// TestRunJudgesEachPacket runs the packet loop over one batch: a packet
// that does not parse is counted as malformed, a SYN the rules reject is
// answered with a RST through the TUN writer, and Run returns when the
// device is closed.
func TestRunJudgesEachPacket(t *testing.T) {
	rs, err := filter.Compile(filter.Options{Default: "reject"}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	eng := filter.NewEngine(rs, filter.EngineOptions{Logger: log})
	client, dst := netip.MustParseAddrPort("198.18.0.1:40000"), netip.MustParseAddrPort("203.0.113.10:443")
	dev := &scriptDevice{batch: [][]byte{{0x45}, synPacket(client, dst)}}
	s, err := New(Options{Device: dev, MTU: 1500, Engine: eng, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Run(context.Background()); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if c := eng.Counters(); c.Malformed != 1 || c.Rejected != 1 {
		t.Errorf("malformed %d, rejected %d; want 1 each", c.Malformed, c.Rejected)
	}
	dev.mu.Lock()
	defer dev.mu.Unlock()
	if len(dev.written) != 1 {
		t.Fatalf("%d packets written, want the RST", len(dev.written))
	}
	var p filter.Packet
	if err := filter.ParsePacket(dev.written[0], &p); err != nil {
		t.Fatal(err)
	}
	if p.Proto != filter.ProtoTCP || p.TCPFlags&filter.TCPRst == 0 || p.Src != dst.Addr() || p.SrcPort != dst.Port() || p.Dst != client.Addr() || p.DstPort != client.Port() {
		t.Errorf("written %+v, want a RST from %v to %v", p, dst, client)
	}
}

// The forwarder hands WriteTSO at most tunio.MaxPayloadSlices slices; a
// device taking fewer would refuse every large segment.
func TestPayloadSlicesFitDevice(t *testing.T) {
	if tunio.MaxPayloadSlices > tun.MaxTSOSlices {
		t.Errorf("forwarder writes up to %d payload slices, the device takes %d", tunio.MaxPayloadSlices, tun.MaxTSOSlices)
	}
}
