package inspect

// IsServerFirstPort reports whether port is the well-known port of a
// protocol whose server speaks first: its client sends nothing, or nothing
// that names a host, until it has read the server's greeting, so a flow
// there must be dialled at once rather than held for the client's first
// bytes.
//
// The ports are:
//
//	13   daytime           the server sends the time unasked
//	17   qotd              the server sends a quote unasked
//	19   chargen           the server streams characters unasked
//	21   FTP control       "220" greeting
//	22   SSH               the server's version banner; many clients wait for it
//	23   telnet            option negotiation and login prompt
//	25   SMTP              "220" greeting
//	37   time              the server sends the time unasked
//	110  POP3              "+OK" greeting
//	119  NNTP              "200"/"201" greeting
//	143  IMAP              "* OK" greeting
//	465  SMTPS             implicit TLS
//	587  SMTP submission   "220" greeting
//	993  IMAPS             implicit TLS
//	995  POP3S             implicit TLS
//	2525 SMTP submission, common alternative port
//	3306 MySQL             the server's handshake packet comes first
//	4190 ManageSieve       greeting capabilities
//	5900 VNC (RFB)         the server's protocol version comes first
//
// 465, 993 and 995 wrap a server-first protocol in TLS, whose client
// speaks first with its ClientHello; they are listed so that no mail flow
// is ever held, at the cost of not judging those flows by server_name.
func IsServerFirstPort(port uint16) bool {
	switch port {
	case 13, 17, 19, 21, 22, 23, 25, 37, 110, 119, 143, 465, 587, 993, 995, 2525, 3306, 4190, 5900:
		return true
	}
	return false
}
