// Package control is tunfw's control socket: a Unix socket on which a
// running `tunfw up` answers `status`, `flows`, `stats` and `reload`.
//
// The protocol is one JSON request line and one JSON response per
// connection. Only root may talk to it: the socket is mode 0600, and the
// server also checks the peer's credentials, so a socket put elsewhere by a
// config still refuses other users.
package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tunfw/tunfw/internal/config"
	"golang.org/x/sys/unix"
)

// DefaultSocket is where the socket is when [control] socket is not set.
const DefaultSocket = "/run/tunfw/tunfw.sock"

// Config is the [control] section.
type Config struct {
	// Socket is the control socket's path; "" means DefaultSocket.
	Socket string `toml:"socket"`
}

// Validate checks the section and returns the socket path to use.
func (c Config) Validate() (string, error) {
	if c.Socket == "" {
		return DefaultSocket, nil
	}
	if !filepath.IsAbs(c.Socket) {
		return "", config.Errorf("control.socket", "%q is not an absolute path", c.Socket)
	}
	if len(c.Socket) > 107 {
		return "", config.Errorf("control.socket", "path is longer than the 107 bytes a Unix socket address holds")
	}
	return c.Socket, nil
}

// Request is one command sent to the server.
type Request struct {
	Cmd  string          `json:"cmd"`
	Args json.RawMessage `json:"args,omitempty"`
}

// Response is the server's answer. Error is set when the command failed;
// Errors lists details (e.g. every config error of a refused reload).
type Response struct {
	OK     bool            `json:"ok"`
	Error  string          `json:"error,omitempty"`
	Errors []string        `json:"errors,omitempty"`
	Data   json.RawMessage `json:"data,omitempty"`

	// Stream, if set on a successful response, writes the data instead
	// of Data: one JSON value, written as it is made. The client reads the
	// same bytes as for Data, but a large answer (a listing of the whole
	// flow table is tens of megabytes) is neither held whole in the
	// server's memory nor written in one burst. An error from Stream
	// leaves the client an incomplete answer, which it cannot decode.
	Stream func(w io.Writer) error `json:"-"`
}

// Handler answers one request from an authorised peer.
type Handler func(ctx context.Context, req Request) Response

// ioTimeout bounds how long the server waits for a client to send its
// request or to take (the next part of) the answer.
const ioTimeout = 30 * time.Second

// maxRequest bounds a request line; anything longer is refused with an
// error saying so.
const maxRequest = 1 << 20

// Server serves a control socket.
type Server struct {
	ln      *net.UnixListener
	path    string
	handler Handler
	log     *slog.Logger

	// Refused counts requests refused before reaching the handler: bad
	// JSON, oversize, or an unauthorised peer.
	refused atomic.Uint64
	// acceptErrs counts failed accepts (EMFILE and the like).
	acceptErrs atomic.Uint64
	wg         sync.WaitGroup
}

// Listen creates the socket at path (and its directory), replacing a stale
// socket left by a crash but refusing to take over one a live tunfw serves,
// to replace anything that is not a socket, or to work in a directory that
// someone other than root (or tunfw's user) could change.
func Listen(path string, h Handler, log *slog.Logger) (*Server, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create control socket directory: %w", err)
	}
	if err := checkDir(dir); err != nil {
		return nil, err
	}
	switch fi, err := os.Lstat(path); {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	case fi.Mode().Type() != os.ModeSocket:
		return nil, fmt.Errorf("control socket %s exists and is not a socket (%s): refusing to replace it; remove it or set [control] socket", path, fi.Mode().Type())
	default:
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("control socket %s is in use: is another tunfw running?", path)
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("remove stale control socket: %w", err)
		}
	}
	// The umask makes the socket 0600 from the start: no window in which
	// another user could connect, and no chmod by path afterwards (which
	// would follow a symlink put in its place).
	old := syscall.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listen on control socket: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	if fi, err := os.Lstat(path); err != nil {
		ln.Close()
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	} else if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		ln.Close()
		return nil, fmt.Errorf("control socket %s is not the 0600 socket just created (%v)", path, fi.Mode())
	}
	return &Server{ln: ln, path: path, handler: h, log: log}, nil
}

// checkDir refuses a socket directory that is not a directory, is owned by
// someone other than root or us, or is writable by group or others: who
// can write it can replace the socket with one of their own.
func checkDir(dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("control socket directory: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("control socket directory %s is not a directory", dir)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Uid != 0 && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("control socket directory %s is owned by uid %d, not root: refusing it", dir, st.Uid)
	}
	if fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("control socket directory %s is writable by group or others (mode %#o): refusing it; use a directory only root can write, like /run/tunfw", dir, fi.Mode().Perm())
	}
	return nil
}

// Refused returns how many requests were refused before the handler.
func (s *Server) Refused() uint64 { return s.refused.Load() }

// Close stops accepting requests and removes the socket.
func (s *Server) Close() error { return s.ln.Close() }

// Serve answers requests until ctx ends or Close, then removes the socket.
func (s *Server) Serve(ctx context.Context) {
	go func() {
		<-ctx.Done()
		s.ln.Close()
	}()
	var backoff time.Duration
	for {
		c, err := s.ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				break
			}
			// Out of descriptors (EMFILE, ENFILE) or memory: the pending
			// connection stays queued and accept fails again at once, so
			// wait, longer each time, instead of spinning.
			s.acceptErrs.Add(1)
			if backoff == 0 {
				backoff = 5 * time.Millisecond
				s.log.Warn("control socket accept failed; retrying with backoff", "err", err)
			} else {
				backoff = min(2*backoff, time.Second)
			}
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
			}
			continue
		}
		backoff = 0
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.serveConn(ctx, c)
		}()
	}
	s.wg.Wait()
}

func (s *Server) serveConn(ctx context.Context, c *net.UnixConn) {
	defer c.Close()
	// A streamed answer to a client that reads slowly ends with the
	// server, not when the client is done.
	defer context.AfterFunc(ctx, func() { c.Close() })()
	c.SetDeadline(time.Now().Add(ioTimeout))
	reply := func(r Response) { json.NewEncoder(c).Encode(r) }
	uid, err := peerUID(c)
	if err != nil || uid != 0 {
		s.refused.Add(1)
		s.log.Warn("control request refused: peer is not root", "uid", uid, "err", err)
		reply(Response{Error: "permission denied: only root may use the tunfw control socket"})
		return
	}
	line, err := bufio.NewReader(io.LimitReader(c, maxRequest+1)).ReadBytes('\n')
	if len(line) > maxRequest {
		s.refused.Add(1)
		reply(Response{Error: fmt.Sprintf("bad request: longer than %d KiB", maxRequest>>10)})
		return
	}
	if err != nil && !(errors.Is(err, io.EOF) && len(line) > 0) {
		s.refused.Add(1)
		reply(Response{Error: "bad request: want one JSON object on one line"})
		return
	}
	var req Request
	if err := json.Unmarshal(line, &req); err != nil || req.Cmd == "" {
		s.refused.Add(1)
		reply(Response{Error: fmt.Sprintf("bad request: %s", strings.TrimSpace(errString(err, "no cmd")))})
		return
	}
	resp := s.handler(ctx, req)
	// The reply has its own time, however long the handler took (a
	// reload of a large config).
	c.SetDeadline(time.Now().Add(ioTimeout))
	if resp.OK && resp.Stream != nil {
		if err := stream(progressWriter{c}, resp.Stream); err != nil {
			s.log.Warn("control answer cut short", "cmd", req.Cmd, "err", err)
		}
		return
	}
	reply(resp)
}

// progressWriter gives each write its own deadline: a streamed answer
// may take longer in all than one, as long as the client keeps reading.
type progressWriter struct{ c *net.UnixConn }

func (w progressWriter) Write(p []byte) (int, error) {
	w.c.SetWriteDeadline(time.Now().Add(ioTimeout))
	return w.c.Write(p)
}

// stream writes a successful response whose data fn writes: the bytes
// json.Encoder makes of Response{OK: true, Data: data}.
func stream(w io.Writer, fn func(io.Writer) error) error {
	if _, err := io.WriteString(w, `{"ok":true,"data":`); err != nil {
		return fmt.Errorf("write answer: %w", err)
	}
	if err := fn(w); err != nil {
		return err
	}
	if _, err := io.WriteString(w, "}\n"); err != nil {
		return fmt.Errorf("write answer: %w", err)
	}
	return nil
}

func errString(err error, def string) string {
	if err == nil {
		return def
	}
	return err.Error()
}

func peerUID(c *net.UnixConn) (uint32, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if cerr != nil {
		return 0, cerr
	}
	return cred.Uid, nil
}

// Call sends req to the server at path and returns its response. A failed
// command is a Response with OK false, not an error; the error is for
// failing to talk to the server at all. timeout bounds the connect, the
// request and each wait for more of the answer: a long answer (a listing)
// takes as long as it takes while it keeps coming.
func Call(path string, req Request, timeout time.Duration) (Response, error) {
	c, err := net.DialTimeout("unix", path, timeout)
	if err != nil {
		if errors.Is(err, os.ErrPermission) {
			return Response{}, fmt.Errorf("connect to %s: %w (the control socket is for root)", path, err)
		}
		return Response{}, fmt.Errorf("connect to %s: %w (is tunfw up running?)", path, err)
	}
	defer c.Close()
	b, err := json.Marshal(req)
	if err != nil {
		return Response{}, err
	}
	c.SetWriteDeadline(time.Now().Add(timeout))
	_, werr := c.Write(append(b, '\n'))
	// Even if the write failed, read: a server refusing the peer answers
	// and closes before reading the request, and its answer says why.
	b, rerr := readAll(c, timeout)
	resp, err := parseResponse(b)
	if err != nil {
		if werr != nil {
			return Response{}, fmt.Errorf("send request: %w", werr)
		}
		if rerr != nil {
			err = rerr
		}
		return Response{}, fmt.Errorf("read response: %w", err)
	}
	return resp, nil
}

// readAll reads c to its end, waiting at most timeout for each part.
func readAll(c net.Conn, timeout time.Duration) ([]byte, error) {
	b := make([]byte, 0, 64<<10)
	for {
		if len(b) == cap(b) {
			b = slices.Grow(b, cap(b))
		}
		c.SetReadDeadline(time.Now().Add(timeout))
		n, err := c.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
		if errors.Is(err, io.EOF) {
			return b, nil
		}
		if err != nil {
			return b, err
		}
	}
}

// streamed begins a successful answer as the server writes it.
const streamed = `{"ok":true,"data":`

// parseResponse decodes the server's answer. A successful one is taken
// apart without decoding its data, which the caller decodes anyway:
// scanning a listing of the whole flow table, tens of megabytes, took a
// client hundreds of milliseconds of CPU that the host's packet path
// shares.
func parseResponse(b []byte) (Response, error) {
	if rest, ok := bytes.CutPrefix(b, []byte(streamed)); ok {
		if data, ok := bytes.CutSuffix(rest, []byte("}\n")); ok && len(data) > 0 {
			return Response{OK: true, Data: data}, nil
		}
	}
	var resp Response
	if err := json.Unmarshal(b, &resp); err != nil {
		if len(b) == 0 {
			return Response{}, io.ErrUnexpectedEOF
		}
		return Response{}, err
	}
	return resp, nil
}

// OK returns a successful response carrying v as data.
func OK(v any) Response {
	b, err := json.Marshal(v)
	if err != nil {
		return Response{Error: "encode response: " + err.Error()}
	}
	return Response{OK: true, Data: b}
}
