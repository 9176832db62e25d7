package stack

import (
	"context"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/tunfw/tunfw/stack/internal/tunio"
	wgtun "golang.zx2c4.com/wireguard/tun"
)

// tunWriter is the one writer of the TUN device: the packet loop's rejects
// and every forwarder's packets go through it (it is their tunio.Writer).
// Its lock serialises writes so that batches are not interleaved; its pool
// lends the buffers the forwarders build packets in.
type tunWriter struct {
	dev    wgtun.Device
	log    *slog.Logger
	ctx    context.Context // done: write errors are the device closing
	mu     sync.Mutex
	pool   sync.Pool
	errors atomic.Uint64 // failed writes

	tsoWarned atomic.Bool // a WriteTSO failure was logged at warn level
}

var _ tunio.Writer = (*tunWriter)(nil)

func (w *tunWriter) init(dev wgtun.Device, log *slog.Logger, ctx context.Context) {
	w.dev, w.log, w.ctx = dev, log, ctx
	w.pool.New = func() any {
		// Room for a whole 64 KiB packet: the device coalesces TCP
		// segments of one flow into the buffer of the first (GRO), so a
		// batch reaches the kernel in a few writes.
		b := make([]byte, tunio.Headroom+tunio.MaxPacket)
		return &b
	}
}

// Write implements tunio.Writer.
func (w *tunWriter) Write(bufs [][]byte) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, err := w.dev.Write(bufs, tunio.Headroom); err != nil && w.ctx.Err() == nil {
		w.errors.Add(1)
		w.log.Debug("write to TUN", "packets", len(bufs), "err", err)
	}
}

// tsoDevice is a device that segments TCP packets itself (tun.Device).
type tsoDevice interface {
	WriteTSO(buf []byte, offset int, payload [][]byte, mss int) error
	TSO() bool
}

// segmenter returns the writer as the tunio.Segmenter of a device that
// segments, or nil.
func (w *tunWriter) segmenter() tunio.Segmenter {
	if d, ok := w.dev.(tsoDevice); ok && d.TSO() {
		return w
	}
	return nil
}

// WriteTSO implements tunio.Segmenter; only with a tsoDevice.
func (w *tunWriter) WriteTSO(head []byte, payload [][]byte, mss int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.dev.(tsoDevice).WriteTSO(head, tunio.Headroom, payload, mss); err != nil && w.ctx.Err() == nil {
		w.errors.Add(1)
		// Not seen in any test: a kernel refusing the segmentation
		// offload would stall the connections that use it, so the
		// first refusal is said loudly (counted as tun errors).
		lvl := slog.LevelDebug
		if !w.tsoWarned.Swap(true) {
			lvl = slog.LevelWarn
		}
		n := len(head) - tunio.Headroom
		for _, p := range payload {
			n += len(p)
		}
		w.log.Log(w.ctx, lvl, "write to TUN with segmentation offload", "bytes", n, "segment", mss, "err", err)
	}
}

// writeOne writes one packet built outside the forwarders' buffers (a
// reject, an echo reply); pkt starts with tunio.Headroom bytes of room.
func (w *tunWriter) writeOne(pkt []byte) { w.Write([][]byte{pkt}) }

// Buffer implements tunio.Writer.
func (w *tunWriter) Buffer() *[]byte { return w.pool.Get().(*[]byte) }

// Release implements tunio.Writer.
func (w *tunWriter) Release(bp *[]byte) { w.pool.Put(bp) }

// rawConn returns the device's file, to ask whether more packets wait to
// be read; nil when the device has none.
func (w *tunWriter) rawConn() syscall.RawConn {
	f, ok := w.dev.(interface{ File() *os.File })
	if !ok || f.File() == nil {
		return nil
	}
	rc, err := f.File().SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}
