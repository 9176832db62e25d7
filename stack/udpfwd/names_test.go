package udpfwd

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/tunfw/tunfw/dns"
	"github.com/tunfw/tunfw/filter"
	"github.com/tunfw/tunfw/stack/internal/gaddr"
	"golang.org/x/net/dns/dnsmessage"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// TestAnswerQuery: tunfw's own answer to a DNS query (here for the DoH
// canary, NXDOMAIN) goes from the resolver the client asked to the
// client, is a valid datagram whose payload is the answer alone, and is
// built at its own header length: a query's IPv4 options or IPv6
// extension headers are not counted in it.
func TestAnswerQuery(t *testing.T) {
	rs, err := filter.Compile(filter.Options{}, nil, []filter.RuleConfig{
		{Name: "web", Action: "allow", Proto: "tcp", DstPort: int64(443), Domain: []any{"example.com"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 0x1234, RecursionDesired: true})
	b.StartQuestions()
	b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(dns.CanaryName + "."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET})
	query, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name             string
		client, resolver netip.AddrPort
		ext              int // bytes of IPv4 options or IPv6 destination options
	}{
		{"v4", netip.MustParseAddrPort("10.0.0.2:5353"), netip.MustParseAddrPort("192.0.2.53:53"), 0},
		{"v4 with options", netip.MustParseAddrPort("10.0.0.2:5353"), netip.MustParseAddrPort("192.0.2.53:53"), 4},
		{"v6", netip.MustParseAddrPort("[fd00::2]:5353"), netip.MustParseAddrPort("[2001:db8::53]:53"), 0},
		{"v6 with destination options", netip.MustParseAddrPort("[fd00::2]:5353"), netip.MustParseAddrPort("[2001:db8::53]:53"), 8},
	} {
		t.Run(c.name, func(t *testing.T) {
			tun := newTestTUN()
			h := testHost(t, filter.EngineLimits{MaxFlows: 10}, tun, 10)
			h.Engine.Swap(rs)
			h.DNS.Block = dns.BlockNXDomain
			u := newForwarder(h)
			pkt := queryPacket(c.client, c.resolver, c.ext, query)
			var p filter.Packet
			if err := filter.ParsePacket(pkt, &p); err != nil {
				t.Fatal(err)
			}
			if !u.answerQuery(&p, pkt, h.Now()) {
				t.Fatal("the canary query was not answered")
			}
			got := tun.take()
			if len(got) != 1 {
				t.Fatalf("%d packets written", len(got))
			}
			var r filter.Packet
			if err := filter.ParsePacket(got[0], &r); err != nil {
				t.Fatalf("answer does not parse: %v", err)
			}
			if r.Src != c.resolver.Addr() || r.SrcPort != c.resolver.Port() || r.Dst != c.client.Addr() || r.DstPort != c.client.Port() {
				t.Errorf("answer %+v", r)
			}
			if r.IPHeaderLen != filter.HeaderLen(r.Src) || r.Len != len(got[0]) {
				t.Errorf("answer's header %d bytes, length %d of %d", r.IPHeaderLen, r.Len, len(got[0]))
			}
			udp := header.UDP(got[0][r.IPHeaderLen:])
			xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, gaddr.To(r.Src), gaddr.To(r.Dst), uint16(len(udp)))
			if checksum.Checksum(udp, xsum) != 0xffff {
				t.Error("UDP checksum does not verify")
			}
			var m dnsmessage.Message
			if err := m.Unpack(udp.Payload()); err != nil {
				t.Fatalf("payload is not a DNS message: %v", err)
			}
			if !m.Response || m.ID != 0x1234 || m.RCode != dnsmessage.RCodeNameError {
				t.Errorf("answer header %+v", m.Header)
			}
		})
	}
}

// queryPacket builds the client's datagram carrying query, with ext bytes
// of IPv4 options (no-ops) or an IPv6 destination options header (padding).
func queryPacket(client, resolver netip.AddrPort, ext int, query []byte) []byte {
	pkt := make([]byte, 1500)
	hl := filter.HeaderLen(client.Addr())
	copy(pkt[hl+8:], query)
	_, n := filter.BuildUDP(pkt, client, resolver, len(query))
	if ext == 0 {
		return pkt[:n]
	}
	copy(pkt[hl+ext:], pkt[hl:n]) // make room for the options
	if client.Addr().Is4() {
		for i := range ext {
			pkt[20+i] = 1 // no operation
		}
		pkt[0] = 0x40 | byte((20+ext)/4)
		binary.BigEndian.PutUint16(pkt[2:4], uint16(n+ext))
		pkt[10], pkt[11] = 0, 0
		binary.BigEndian.PutUint16(pkt[10:12], ^checksum.Checksum(pkt[:20+ext], 0))
	} else {
		o := pkt[40 : 40+ext]
		o[0], o[1] = 17, byte(ext/8-1) // next header UDP
		o[2], o[3] = 1, byte(ext-4)    // PadN
		clear(o[4:])
		binary.BigEndian.PutUint16(pkt[4:6], uint16(n-40+ext))
		pkt[6] = 60 // destination options
	}
	return pkt[:n+ext]
}
