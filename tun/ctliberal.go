package tun

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Conntrack checks TCP sequence numbers against the windows it has seen;
// a packet outside them is "invalid" and loses its conntrack entry, and
// with it the mark that keeps a connection open at start on the normal
// routes. An entry tunfw creates from the socket table knows neither the
// window nor its scaling, and one a stopped tunfw left behind stopped
// following the connection when the table that made conntrack track was
// removed: bulk data afterwards would be invalid, its replies captured,
// and the connection stall. So the entries of connections open at start
// are made liberal (IP_CT_TCP_FLAG_BE_LIBERAL, what the kernel also does
// for a connection it picks up midstream): their windows are not checked.
// The netlink library sets only a TCP entry's state, hence this message.

// ctTCPBeLiberal is IP_CT_TCP_FLAG_BE_LIBERAL of linux/netfilter/nf_conntrack_tcp.h.
const ctTCPBeLiberal = 0x08

// markTCPLiberal creates a marked, liberal conntrack entry for the TCP
// connection k, established; if one exists (its next packet was
// faster), that one is marked and made liberal.
func markTCPLiberal(k connKey, mark uint32) error {
	err := ctNewTCP(k, mark, true)
	if errors.Is(err, unix.EEXIST) {
		err = ctNewTCP(k, mark, false)
	}
	if err != nil {
		return fmt.Errorf("mark conntrack entry %s: %w", k, err)
	}
	return nil
}

// ctNewTCP sends IPCTNL_MSG_CT_NEW for k: create (failing with EEXIST if
// there is an entry) or update an existing entry.
func ctNewTCP(k connKey, mark uint32, create bool) error {
	fam, srcAttr, dstAttr := uint8(unix.AF_INET), nl.CTA_IP_V4_SRC, nl.CTA_IP_V4_DST
	if k.src.Addr().Is6() {
		fam, srcAttr, dstAttr = unix.AF_INET6, nl.CTA_IP_V6_SRC, nl.CTA_IP_V6_DST
	}
	flags := unix.NLM_F_ACK
	if create {
		flags |= unix.NLM_F_CREATE | unix.NLM_F_EXCL
	}
	req := nl.NewNetlinkRequest(unix.NFNL_SUBSYS_CTNETLINK<<8|nl.IPCTNL_MSG_CT_NEW, flags)
	req.AddData(&nl.Nfgenmsg{NfgenFamily: fam, Version: nl.NFNETLINK_V0})
	tuple := func(typ int, src, dst netip.AddrPort) *nl.RtAttr {
		t := nl.NewRtAttr(unix.NLA_F_NESTED|typ, nil)
		ip := t.AddRtAttr(unix.NLA_F_NESTED|nl.CTA_TUPLE_IP, nil)
		ip.AddRtAttr(srcAttr, src.Addr().AsSlice())
		ip.AddRtAttr(dstAttr, dst.Addr().AsSlice())
		proto := t.AddRtAttr(unix.NLA_F_NESTED|nl.CTA_TUPLE_PROTO, nil)
		proto.AddRtAttr(nl.CTA_PROTO_NUM, []byte{unix.IPPROTO_TCP})
		proto.AddRtAttr(nl.CTA_PROTO_SRC_PORT, nl.BEUint16Attr(src.Port()))
		proto.AddRtAttr(nl.CTA_PROTO_DST_PORT, nl.BEUint16Attr(dst.Port()))
		return t
	}
	req.AddData(tuple(nl.CTA_TUPLE_ORIG, k.src, k.dst))
	req.AddData(tuple(nl.CTA_TUPLE_REPLY, k.dst, k.src))
	req.AddData(nl.NewRtAttr(nl.CTA_MARK, nl.BEUint32Attr(mark)))
	if create {
		// The kernel's own timeout for an established connection.
		req.AddData(nl.NewRtAttr(nl.CTA_TIMEOUT, nl.BEUint32Attr(5*24*3600)))
	}
	info := nl.NewRtAttr(unix.NLA_F_NESTED|nl.CTA_PROTOINFO, nil)
	tcp := info.AddRtAttr(unix.NLA_F_NESTED|nl.CTA_PROTOINFO_TCP, nil)
	if create {
		tcp.AddRtAttr(nl.CTA_PROTOINFO_TCP_STATE, []byte{3}) // TCP_CONNTRACK_ESTABLISHED
	}
	// struct nf_ct_tcp_flags: flags, mask.
	tcp.AddRtAttr(nl.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, []byte{ctTCPBeLiberal, ctTCPBeLiberal})
	tcp.AddRtAttr(nl.CTA_PROTOINFO_TCP_FLAGS_REPLY, []byte{ctTCPBeLiberal, ctTCPBeLiberal})
	req.AddData(info)
	_, err := req.Execute(unix.NETLINK_NETFILTER, 0)
	return err
}
