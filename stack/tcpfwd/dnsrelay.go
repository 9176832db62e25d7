package tcpfwd

import (
	"encoding/binary"
	"io"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tunfw/tunfw/dns"
	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/stack/dial"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
)

// DNS over TCP (port 53) is relayed message by message when tunfw reads
// DNS (snooping on, or rules by name in force): the answers teach the
// name table, and a query for a name a rule blocks is answered by tunfw
// and never forwarded, as over UDP (filter.Engine.AnswerQuery decides for
// both). DNS connections are few and short: this relay is two goroutines
// and three small buffers (one per direction, one for tunfw's answers),
// without the idle hand-off of the byte relay.

const dnsPort = 53

// Buffers of a DNS relay. A direction starts with room for a classic
// 512-byte message and its length, and grows to the longest message the
// connection carries (at most 2+65535), not to the most a message may be:
// most connections carry a query or two and an answer, and hold little
// while they wait. tunfw's own answers have a question, perhaps one record
// and an OPT: 12 + (255+4) + (255+10+16) + 11 bytes at most.
const (
	dnsFirstBuf  = 2 + 512
	dnsAnswerBuf = 2 + 563
)

// readsDNS reports whether a connection to port 53 is relayed by dnsRelay.
func (fw *Forwarder) readsDNS(key filter.FlowKey) bool {
	return key.Dst.Port() == dnsPort && (fw.h.DNSNames != nil || fw.h.Engine.HasNameRules())
}

// dnsRelay relays a DNS-over-TCP connection until either side ends it,
// or CloseFlows aborts it.
func (fw *Forwarder) dnsRelay(flow filter.FlowRef, client *gonet.TCPConn, ep tcpip.Endpoint, up *dial.Conn) {
	fw.wg.Add(1)
	defer fw.wg.Done()
	var aborted atomic.Bool // set by the one abort that closes both sides
	abort := func() {
		if aborted.CompareAndSwap(false, true) {
			up.Abort()
			ep.Abort()
		}
	}
	fw.tracker.Track(flow, abort)
	var toClient sync.Mutex // both directions write to the client
	write := func(b []byte) error {
		toClient.Lock()
		defer toClient.Unlock()
		_, err := client.Write(b)
		return err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer fw.guard.Recover(&flow)
		// Destination to client: each answer teaches the table.
		err := dnsMessages(up, func(framed []byte) error {
			if t := fw.h.DNSNames; t != nil {
				client, now := flow.Key.Src.Addr(), time.Now()
				dns.Learn(framed[2:], func(name string, addr netip.Addr, ttl time.Duration) {
					t.Add(client, addr, name, ttl, now)
				})
			}
			return write(framed)
		})
		if err == nil {
			client.CloseWrite()
		} else {
			abort()
		}
	}()
	func() {
		defer fw.guard.Recover(&flow)
		var ans [dnsAnswerBuf]byte
		err := dnsMessages(client, func(framed []byte) error {
			if a, answered := fw.h.Engine.AnswerQuery(flow.Key.Src.Addr(), framed[2:], fw.h.DNSBlock, ans[2:2], fw.h.Now()); answered {
				fw.dnsAnswered.Add(1)
				if len(a) == 0 {
					return nil // block = "drop", or a query tunfw cannot answer
				}
				return write(framedAnswer(ans[:], a))
			}
			_, err := up.Write(framed)
			return err
		})
		if err == nil {
			up.CloseWrite()
		} else {
			abort()
		}
	}()
	<-done
	fw.tracker.Untrack(flow)
	if !aborted.Load() {
		fw.closer.add(up)
	}
	client.Close()
	fw.h.Engine.Release(flow, fw.h.Now())
}

// framedAnswer puts its length before the answer a, written into buf[2:]
// or, had it outgrown buf, into a slice of its own.
func framedAnswer(buf, a []byte) []byte {
	if len(a) <= len(buf)-2 && &a[0] == &buf[2] {
		buf = buf[:2+len(a)]
	} else {
		buf = make([]byte, 2+len(a))
		copy(buf[2:], a)
	}
	binary.BigEndian.PutUint16(buf, uint16(len(a)))
	return buf
}

// dnsMessages reads length-prefixed DNS messages from r and hands each,
// with its prefix, to fn, until r ends (nil) or fails, or fn fails. The
// slice fn is given is valid until it returns.
func dnsMessages(r io.Reader, fn func(framed []byte) error) error {
	buf := make([]byte, dnsFirstBuf)
	for {
		if _, err := io.ReadFull(r, buf[:2]); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
		n := 2 + int(binary.BigEndian.Uint16(buf[:2]))
		if n > len(buf) {
			grown := make([]byte, n)
			copy(grown, buf[:2])
			buf = grown
		}
		if _, err := io.ReadFull(r, buf[2:n]); err != nil {
			return err
		}
		if err := fn(buf[:n]); err != nil {
			return err
		}
	}
}

// DNSAnswered returns how many DNS-over-TCP queries tunfw answered itself.
func (fw *Forwarder) DNSAnswered() uint64 { return fw.dnsAnswered.Load() }
