package dns

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// maxChain bounds the CNAMEs followed from the question name to its
// addresses. Resolvers give up well before (Unbound: 8 by default).
const maxChain = 8

// ZeroTTL is the TTL of BlockZero's answers: short, so that a name
// unblocked by a reload works again soon.
const ZeroTTL = 60

// ednsUDPSize is the UDP payload size BlockZero/NXDOMAIN answers announce
// when the query used EDNS: the size DNS flag day 2020 settled on.
const ednsUDPSize = 1232

// Question reads a query's ID, the name of its first question and its
// type. The name is written into buf as text, lowercased, without the
// trailing dot ("" for the root), and returned as a slice of buf. ok is
// false for a message that does not parse as far as its first question, a
// response, a message that is not a standard query (opcode QUERY: Answer
// answers no other), or a name that text cannot name plainly: a label
// holding a dot (dnsmessage refuses those) or a byte outside printable
// ASCII. A rule could not match such a name and a log line should not
// print it.
func Question(msg []byte, buf *[255]byte) (id uint16, name []byte, qtype uint16, ok bool) {
	var p dnsmessage.Parser
	h, err := p.Start(msg)
	if err != nil || h.Response || h.OpCode != 0 {
		return 0, nil, 0, false
	}
	q, err := p.Question()
	if err != nil {
		return 0, nil, 0, false
	}
	name, ok = textName(&q.Name, buf)
	if !ok {
		return 0, nil, 0, false
	}
	return h.ID, name, uint16(q.Type), true
}

// textName writes n as lowercase text without the trailing dot into buf.
func textName(n *dnsmessage.Name, buf *[255]byte) ([]byte, bool) {
	l := int(n.Length)
	if l <= 1 { // the root, "."
		return buf[:0], l == 1
	}
	out := buf[:l-1]
	for i, c := range n.Data[:l-1] {
		switch {
		case 'A' <= c && c <= 'Z':
			c += 'a' - 'A'
		case c < 0x21 || c > 0x7e:
			return nil, false
		}
		out[i] = c
	}
	return out, true
}

// sameName compares two names as DNS does: ASCII case-insensitively.
func sameName(a, b *dnsmessage.Name) bool {
	if a.Length != b.Length {
		return false
	}
	for i := range int(a.Length) {
		x, y := a.Data[i], b.Data[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

// Errors Learn reports for answers it will not learn from.
var (
	ErrNotResponse = errors.New("dns: message is not a response")
	ErrCNAMELoop   = errors.New("dns: CNAME chain loops")
	ErrCNAMEChain  = fmt.Errorf("dns: CNAME chain longer than %d", maxChain)
	ErrName        = errors.New("dns: question name has a dot or unprintable byte in a label")
	ErrCNAMEs      = fmt.Errorf("dns: more than %d CNAME records", maxCNAMEs)
)

// Learn reads a response and calls fn for each address of the A and AAAA
// records that answer its first question: records for the question name
// itself or, through the CNAME records of the answer section, for the
// name it is an alias of. fn gets the question name (as Question writes
// it), the address, and the smallest TTL of the records from the question
// name to the address.
//
// Records for other names are ignored: a resolver may not vouch for an
// address under a name the question did not lead to. A chain longer than
// 8 CNAMEs, one that loops, or more than 16 CNAME records in all are
// errors. So is a malformed message, and fn is not called then: every
// record is read before the first call. Responses with an error code
// teach nothing and are not errors.
func Learn(msg []byte, fn func(name string, addr netip.Addr, ttl time.Duration)) error {
	var p dnsmessage.Parser
	h, err := p.Start(msg)
	if err != nil {
		return fmt.Errorf("dns: reading response header: %w", err)
	}
	if !h.Response {
		return ErrNotResponse
	}
	if h.RCode != dnsmessage.RCodeSuccess {
		return nil
	}
	q, err := p.Question()
	if errors.Is(err, dnsmessage.ErrSectionDone) {
		return nil // no question: nothing to tie an address to
	}
	if err != nil {
		return fmt.Errorf("dns: reading response question: %w", err)
	}
	if q.Class != dnsmessage.ClassINET {
		return nil
	}
	var buf [255]byte
	qname, ok := textName(&q.Name, &buf)
	if !ok {
		return ErrName
	}

	// The first walk reads every record, so that a malformed one fails
	// before fn is called, and keeps the CNAMEs; the second reports the
	// addresses of the name the chain ends at.
	var links [maxCNAMEs]cnameLink
	n := 0
	var w answerWalk
	if err := w.start(msg); err != nil {
		return err
	}
	for {
		h, ok, err := w.next()
		if err != nil {
			return err
		}
		if !ok {
			break
		}
		var target dnsmessage.Name
		if _, err := w.body(&h, &target); err != nil {
			return err
		}
		if h.Type != dnsmessage.TypeCNAME || h.Class != dnsmessage.ClassINET {
			continue
		}
		if n == len(links) {
			return ErrCNAMEs
		}
		links[n] = cnameLink{owner: h.Name, target: target, ttl: h.TTL}
		n++
	}

	var chain [maxChain + 1]*dnsmessage.Name
	chain[0] = &q.Name
	ttl := uint32(math.MaxUint32)
	depth := 0
Follow:
	for {
		for i := range links[:n] {
			l := &links[i]
			if !sameName(&l.owner, chain[depth]) {
				continue
			}
			if depth == maxChain {
				return ErrCNAMEChain
			}
			for _, c := range chain[:depth+1] {
				if sameName(c, &l.target) {
					return ErrCNAMELoop
				}
			}
			ttl = min(ttl, l.ttl)
			depth++
			chain[depth] = &l.target
			continue Follow
		}
		break
	}

	target := chain[depth]
	var name string // allocated once, at the first address
	if err := w.start(msg); err != nil {
		return err
	}
	for {
		h, ok, err := w.next()
		if err != nil || !ok {
			return err
		}
		var scratch dnsmessage.Name
		addr, err := w.body(&h, &scratch)
		if err != nil {
			return err
		}
		if !addr.IsValid() || h.Class != dnsmessage.ClassINET || !sameName(&h.Name, target) {
			continue
		}
		if name == "" {
			name = string(qname)
		}
		fn(name, addr, seconds(min(ttl, h.TTL)))
	}
}

// maxCNAMEs bounds the CNAME records of one answer: a chain of maxChain
// with room for a few more than real resolvers send.
const maxCNAMEs = 2 * maxChain

// cnameLink is a CNAME record: owner is an alias of target.
type cnameLink struct {
	owner, target dnsmessage.Name
	ttl           uint32
}

// answerWalk walks the answer section of a response. (A loop over a
// Parser rather than a callback: a callback taking the Parser would move
// it to the heap.)
type answerWalk struct {
	p dnsmessage.Parser
}

func (w *answerWalk) start(msg []byte) error {
	if _, err := w.p.Start(msg); err != nil {
		return fmt.Errorf("dns: reading response header: %w", err)
	}
	if err := w.p.SkipAllQuestions(); err != nil {
		return fmt.Errorf("dns: reading response questions: %w", err)
	}
	return nil
}

// next returns the header of the next answer record; the caller reads or
// skips its body. ok is false after the last.
func (w *answerWalk) next() (h dnsmessage.ResourceHeader, ok bool, err error) {
	h, err = w.p.AnswerHeader()
	if errors.Is(err, dnsmessage.ErrSectionDone) {
		return h, false, nil
	}
	if err != nil {
		return h, false, fmt.Errorf("dns: reading answer record: %w", err)
	}
	return h, true, nil
}

// body reads the data of the record whose header next returned: the
// address of an A or AAAA record, the target of a CNAME (into target).
// Both walks read every record the same way so that the first, which
// checks them all, fails wherever the second would: dnsmessage reads an A
// record's 4 bytes but does not check its length field, while skipping a
// record checks the length field only.
func (w *answerWalk) body(h *dnsmessage.ResourceHeader, target *dnsmessage.Name) (netip.Addr, error) {
	var addr netip.Addr
	var err error
	switch h.Type {
	case dnsmessage.TypeA:
		var r dnsmessage.AResource
		if h.Length != 4 {
			return addr, w.fail(h, fmt.Errorf("record data of %d bytes", h.Length))
		}
		r, err = w.p.AResource()
		addr = netip.AddrFrom4(r.A)
	case dnsmessage.TypeAAAA:
		var r dnsmessage.AAAAResource
		if h.Length != 16 {
			return addr, w.fail(h, fmt.Errorf("record data of %d bytes", h.Length))
		}
		r, err = w.p.AAAAResource()
		addr = netip.AddrFrom16(r.AAAA)
	case dnsmessage.TypeCNAME:
		var r dnsmessage.CNAMEResource
		r, err = w.p.CNAMEResource()
		*target = r.CNAME
	default:
		err = w.p.SkipAnswer()
	}
	if err != nil {
		return netip.Addr{}, w.fail(h, err)
	}
	return addr, nil
}

func (w *answerWalk) fail(h *dnsmessage.ResourceHeader, err error) error {
	return fmt.Errorf("dns: reading %v answer for %v: %w", h.Type, h.Name.String(), err)
}

// seconds turns a record TTL into a duration. RFC 2181 8: a TTL with the
// top bit set is read as 0.
func seconds(ttl uint32) time.Duration {
	if ttl > math.MaxInt32 {
		return 0
	}
	return time.Duration(ttl) * time.Second
}

// Answer writes into buf (reused from its start; grown if too small)
// tunfw's own answer to the query msg: for BlockNXDomain and BlockRefused
// that return code and no records; for BlockZero an A 0.0.0.0 or AAAA ::
// record with TTL ZeroTTL, or no records and NOERROR for other types and
// classes. The answer has the query's ID, first question (as written,
// case and all: resolvers check it), RD and CD flags; RA is set. If the
// query carried EDNS (an OPT record), so does the answer, without
// options. BlockDrop returns nil and no error: nothing is sent.
func Answer(msg []byte, mode BlockMode, buf []byte) ([]byte, error) {
	if mode == BlockDrop {
		return nil, nil
	}
	var p dnsmessage.Parser
	qh, err := p.Start(msg)
	if err != nil {
		return nil, fmt.Errorf("dns: reading query header: %w", err)
	}
	if qh.Response {
		return nil, errors.New("dns: message to answer is a response")
	}
	if qh.OpCode != 0 {
		return nil, fmt.Errorf("dns: query has opcode %d, not QUERY", qh.OpCode)
	}
	q, err := p.Question()
	if err != nil {
		return nil, fmt.Errorf("dns: reading query question: %w", err)
	}
	edns := hasOPT(&p)

	h := dnsmessage.Header{
		ID:                 qh.ID,
		Response:           true,
		RecursionDesired:   qh.RecursionDesired,
		RecursionAvailable: true,
		CheckingDisabled:   qh.CheckingDisabled,
	}
	switch mode {
	case BlockNXDomain:
		h.RCode = dnsmessage.RCodeNameError
	case BlockRefused:
		h.RCode = dnsmessage.RCodeRefused
	case BlockZero:
		h.RCode = dnsmessage.RCodeSuccess
	default:
		return nil, fmt.Errorf("dns: unknown block mode %v", mode)
	}
	b := dnsmessage.NewBuilder(buf[:0], h)
	if err := b.StartQuestions(); err != nil {
		return nil, fmt.Errorf("dns: writing answer: %w", err)
	}
	if err := b.Question(q); err != nil {
		return nil, fmt.Errorf("dns: writing answer question: %w", err)
	}
	if err := b.StartAnswers(); err != nil {
		return nil, fmt.Errorf("dns: writing answer: %w", err)
	}
	if mode == BlockZero && q.Class == dnsmessage.ClassINET {
		rh := dnsmessage.ResourceHeader{Name: q.Name, Type: q.Type, Class: q.Class, TTL: ZeroTTL}
		switch q.Type {
		case dnsmessage.TypeA:
			err = b.AResource(rh, dnsmessage.AResource{})
		case dnsmessage.TypeAAAA:
			err = b.AAAAResource(rh, dnsmessage.AAAAResource{})
		}
		if err != nil {
			return nil, fmt.Errorf("dns: writing answer record: %w", err)
		}
	}
	if edns {
		if err := b.StartAdditionals(); err != nil {
			return nil, fmt.Errorf("dns: writing answer: %w", err)
		}
		var rh dnsmessage.ResourceHeader
		if err := rh.SetEDNS0(ednsUDPSize, dnsmessage.RCodeSuccess, false); err != nil {
			return nil, fmt.Errorf("dns: writing answer OPT: %w", err)
		}
		if err := b.OPTResource(rh, dnsmessage.OPTResource{}); err != nil {
			return nil, fmt.Errorf("dns: writing answer OPT: %w", err)
		}
	}
	out, err := b.Finish()
	if err != nil {
		return nil, fmt.Errorf("dns: writing answer: %w", err)
	}
	return out, nil
}

// hasOPT reports whether the rest of a query, after its first question,
// holds an OPT record. A query malformed past its question is answered
// anyway, without EDNS: its name is blocked whatever follows.
func hasOPT(p *dnsmessage.Parser) bool {
	if p.SkipAllQuestions() != nil || p.SkipAllAnswers() != nil || p.SkipAllAuthorities() != nil {
		return false
	}
	for {
		h, err := p.AdditionalHeader()
		if err != nil {
			return false
		}
		if h.Type == dnsmessage.TypeOPT {
			return true
		}
		if p.SkipAdditional() != nil {
			return false
		}
	}
}

// NextTCPMessage splits the first DNS message off the bytes of a DNS over
// TCP stream, where each message follows its length as 2 bytes, big
// endian. ok is false (and rest is stream) until the whole message is
// there; msg is a slice of stream.
func NextTCPMessage(stream []byte) (msg, rest []byte, ok bool) {
	if len(stream) < 2 {
		return nil, stream, false
	}
	n := int(binary.BigEndian.Uint16(stream))
	if len(stream)-2 < n {
		return nil, stream, false
	}
	return stream[2 : 2+n], stream[2+n:], true
}
