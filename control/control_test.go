package control

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func echoArgs(_ context.Context, req Request) Response { return OK(len(req.Args)) }

// serve starts a server answering with echoArgs on a socket in a fresh
// directory.
func serve(t *testing.T) (*Server, string) {
	s, path, _, _ := serveWith(t, echoArgs)
	return s, path
}

// serveWith starts a server answering with h; stop ends it early, done is
// closed once Serve returned. Cleanup stops it and waits.
func serveWith(t *testing.T, h Handler) (s *Server, path string, stop context.CancelFunc, done <-chan struct{}) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "tunfw.sock")
	s, err := Listen(path, h, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() { s.Serve(ctx); close(served) }()
	t.Cleanup(func() { cancel(); <-served })
	return s, path, cancel, served
}

func TestListenRefusesNonSocket(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "tunfw.sock")
	if err := os.WriteFile(path, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(path, echoArgs, quietLog()); err == nil || !strings.Contains(err.Error(), "is not a socket") {
		t.Errorf("Listen over a regular file: %v, want a refusal", err)
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "precious" {
		t.Errorf("the file at the socket path was changed: %q, %v", b, err)
	}
	// A symlink (to a file another user wants chmod-ed, say) is refused
	// too, and neither it nor its target is touched.
	target := filepath.Join(dir, "target")
	if err := os.WriteFile(target, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link.sock")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(link, echoArgs, quietLog()); err == nil {
		t.Errorf("Listen over a symlink succeeded")
	}
	if fi, err := os.Stat(target); err != nil || fi.Mode().Perm() != 0o644 {
		t.Errorf("symlink target changed: %v %v", fi.Mode(), err)
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode().Type() != os.ModeSymlink {
		t.Errorf("symlink removed: %v", err)
	}
}

func TestListenReplacesStaleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tunfw.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close() // a socket file nobody serves: left by a crash
	s, err := Listen(path, echoArgs, quietLog())
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	defer s.Close()
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v (%v), want 0600", fi.Mode(), err)
	}
	if _, err := Listen(path, echoArgs, quietLog()); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("second Listen on a live socket: %v, want in use", err)
	}
}

func TestListenChecksDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "open")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o777)
	if _, err := Listen(filepath.Join(dir, "s.sock"), echoArgs, quietLog()); err == nil || !strings.Contains(err.Error(), "writable by group or others") {
		t.Errorf("Listen in a 0777 directory: %v, want a refusal", err)
	}
	os.Chmod(dir, 0o1777) // sticky like /tmp: still refused
	if _, err := Listen(filepath.Join(dir, "s.sock"), echoArgs, quietLog()); err == nil {
		t.Errorf("Listen in a 01777 directory succeeded")
	}
	if os.Geteuid() != 0 {
		t.Skip("the owner check needs root to chown")
	}
	os.Chmod(dir, 0o755)
	if err := os.Chown(dir, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(filepath.Join(dir, "s.sock"), echoArgs, quietLog()); err == nil || !strings.Contains(err.Error(), "owned by uid 65534") {
		t.Errorf("Listen in a directory owned by nobody: %v, want a refusal", err)
	}
	if _, err := os.Lstat(filepath.Join(dir, "s.sock")); err == nil {
		t.Errorf("a socket was created in the refused directory")
	}
}

// TestLargeRequest: requests well past 4 KiB are served; past 1 MiB they
// get an error saying so.
func TestLargeRequest(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the server answers root only; run as root")
	}
	_, path := serve(t)
	big := func(n int) Request {
		b, _ := json.Marshal(strings.Repeat("x", n))
		return Request{Cmd: "flows", Args: b}
	}
	resp, err := Call(path, big(200<<10), 5*time.Second)
	if err != nil || !resp.OK {
		t.Fatalf("200 KiB request: %+v, %v", resp, err)
	}
	if string(resp.Data) != "204802" {
		t.Errorf("handler saw %s bytes of arguments, want 204802", resp.Data)
	}
	resp, err = Call(path, big(2<<20), 5*time.Second)
	if err != nil || resp.OK || !strings.Contains(resp.Error, "longer than 1024 KiB") {
		t.Errorf("2 MiB request: %+v, %v; want an error naming the bound", resp, err)
	}
}

// TestAcceptBackoff: while accept fails with EMFILE (a connection waits in
// the backlog, and no descriptor is free to accept it), the server retries
// a few times a second, not thousands; once descriptors are free it serves
// the waiting client.
func TestAcceptBackoff(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the server answers root only; run as root")
	}
	s, path := serve(t)
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	// One descriptor free: the client's socket takes it, and the server
	// has none left to accept the connection with.
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	low := lim
	low.Cur = uint64(len(fds)) // ReadDir's own descriptor is closed again
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
		t.Fatal(err)
	}
	defer c.Close()
	time.Sleep(time.Second) // the window in which accept fails
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	n := s.acceptErrs.Load()
	t.Logf("%d failed accepts in 1s without descriptors", n)
	if n == 0 {
		t.Skip("accept never failed: the descriptor limit did not bite")
	}
	if n > 20 {
		t.Errorf("%d failed accepts in 1s: the accept loop spins", n)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	c.Write([]byte(`{"cmd":"status"}` + "\n"))
	var resp Response
	if err := json.NewDecoder(c).Decode(&resp); err != nil || !resp.OK {
		t.Errorf("the waiting client was not served after descriptors were freed: %+v %v", resp, err)
	}
}

// A streamed answer reaches the client as the Response it would be with
// its data in Data, however long it takes in all, as long as each part
// comes within the client's timeout; and parseResponse reads both forms.
func TestStreamedAnswer(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the server answers root only; run as root")
	}
	const parts = 6
	part := strings.Repeat(`"x",`, 40000) // 160 KB: more than a socket buffer
	_, path, _, _ := serveWith(t, func(context.Context, Request) Response {
		return Response{OK: true, Stream: func(w io.Writer) error {
			io.WriteString(w, "[")
			for range parts {
				time.Sleep(100 * time.Millisecond)
				if _, err := io.WriteString(w, part); err != nil {
					return err
				}
			}
			_, err := io.WriteString(w, "1]")
			return err
		}}
	})

	start := time.Now()
	resp, err := Call(path, Request{Cmd: "flows"}, 300*time.Millisecond)
	if err != nil || !resp.OK {
		t.Fatalf("streamed answer: %+v, %v", resp.Error, err)
	}
	var got []any
	if err := json.Unmarshal(resp.Data, &got); err != nil || len(got) != parts*40000+1 {
		t.Errorf("data of %d bytes: %d values, %v", len(resp.Data), len(got), err)
	}
	if took := time.Since(start); took < 300*time.Millisecond {
		t.Errorf("answer took %v, not longer than the timeout: the test proves nothing", took)
	}

	for _, tc := range []struct {
		in   string
		want Response
	}{
		{`{"ok":true,"data":[1,2]}` + "\n", Response{OK: true, Data: json.RawMessage(`[1,2]`)}},
		{`{"ok":false,"error":"no","errors":["a"]}` + "\n", Response{Error: "no", Errors: []string{"a"}}},
		{`{"ok":true}` + "\n", Response{OK: true}},
	} {
		got, err := parseResponse([]byte(tc.in))
		if err != nil || got.OK != tc.want.OK || got.Error != tc.want.Error || string(got.Data) != string(tc.want.Data) || len(got.Errors) != len(tc.want.Errors) {
			t.Errorf("parseResponse(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
		}
	}
	for _, bad := range []string{"", `{"ok":true,"data":[1,2`, `{"ok":true,"data":}` + "\n"} {
		if _, err := parseResponse([]byte(bad)); err == nil {
			t.Errorf("parseResponse(%q) succeeded", bad)
		}
	}
}

// A streamed answer to a client that does not read ends when the server
// does.
func TestStreamEndsWithServer(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the server answers root only; run as root")
	}
	path := filepath.Join(t.TempDir(), "tunfw.sock")
	streaming := make(chan struct{})
	var once sync.Once
	s, err := Listen(path, func(context.Context, Request) Response {
		return Response{OK: true, Stream: func(w io.Writer) error {
			once.Do(func() { close(streaming) })
			for {
				if _, err := io.WriteString(w, strings.Repeat(" ", 64<<10)); err != nil {
					return err
				}
			}
		}}
	}, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Serve(ctx); close(done) }()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte(`{"cmd":"flows"}` + "\n"))
	<-streaming
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Serve still waits for a stream to a client that does not read, 5s after its context ended")
	}
}
