package tcpfwd

import (
	"sync"
	"time"

	"github.com/tunfw/tunfw/stack/dial"
)

// closeBatchDelay is how long the socket of a relay that ended well may
// stay open before sockCloser closes it; closeBatchMax how many may wait.
const (
	closeBatchDelay = 2 * time.Millisecond
	closeBatchMax   = 256
)

// sockCloser closes the destinations' sockets of relays that ended well
// (FIN both ways, nothing left to send) in batches. Closing a socket is
// the one system call of a connection that takes Go's blocking path
// (dial.Conn), and each such call woke the runtime's monitor thread when
// tunfw had been idle, which then polled every 20 us until tunfw was idle
// again: a batch pays that once. A socket waits at most closeBatchDelay,
// and at most closeBatchMax of them; past that, add closes at once.
// Aborted relays close theirs at once, since the close sends the RST.
type sockCloser struct {
	mu      sync.Mutex
	pending []*dial.Conn
	spare   []*dial.Conn // the previous batch's slice, for reuse
	armed   bool         // timer runs flush
	closed  bool         // Forwarder closed: no more waiting
	timer   *time.Timer
	// flushing is held while a batch is being closed, so that close
	// returns only once the timer's batch is closed too.
	flushing sync.Mutex
}

func newSockCloser() *sockCloser {
	c := &sockCloser{}
	c.timer = time.AfterFunc(time.Hour, c.flush)
	c.timer.Stop()
	return c
}

// add closes s within closeBatchDelay.
func (c *sockCloser) add(s *dial.Conn) {
	c.mu.Lock()
	if c.closed || len(c.pending) >= closeBatchMax {
		c.mu.Unlock()
		s.Close()
		return
	}
	c.pending = append(c.pending, s)
	if !c.armed {
		c.armed = true
		c.timer.Reset(closeBatchDelay)
	}
	c.mu.Unlock()
}

// flush closes the sockets waiting.
func (c *sockCloser) flush() {
	c.flushing.Lock()
	defer c.flushing.Unlock()
	c.mu.Lock()
	batch := c.pending
	c.pending, c.spare = c.spare[:0], nil
	c.armed = false
	c.mu.Unlock()
	for i, s := range batch {
		s.Close()
		batch[i] = nil
	}
	c.mu.Lock()
	if c.spare == nil {
		c.spare = batch[:0]
	}
	c.mu.Unlock()
}

// close closes the sockets waiting, waits for a batch being closed, and
// closes every later one at once.
func (c *sockCloser) close() {
	c.mu.Lock()
	c.closed = true
	c.timer.Stop()
	c.mu.Unlock()
	c.flush()
}
