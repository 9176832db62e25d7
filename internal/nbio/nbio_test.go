package nbio

import (
	"bytes"
	"testing"

	"golang.org/x/sys/unix"
)

// TestWriteFull: WriteFull writes until the descriptor is full and says
// EAGAIN with what it wrote, then writes the rest once there is room;
// Read reads it all back in order, and EAGAIN once it is empty.
func TestWriteFull(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[0])
	defer unix.Close(fds[1])
	w, r := uintptr(fds[0]), uintptr(fds[1])
	msg := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB, more than a socket buffer
	done, e := WriteFull(w, msg)
	if e != unix.EAGAIN || done == 0 || done >= len(msg) {
		t.Fatalf("WriteFull into a full socket: %d bytes, %v; want some, then EAGAIN", done, e)
	}
	var got []byte
	buf := make([]byte, 64<<10)
	for len(got) < len(msg) {
		n, e := Read(r, buf)
		switch {
		case e == unix.EAGAIN:
			if done == len(msg) {
				t.Fatalf("read %d of %d bytes, then nothing", len(got), len(msg))
			}
			n, e := WriteFull(w, msg[done:])
			if e != 0 && e != unix.EAGAIN {
				t.Fatalf("WriteFull: %v", e)
			}
			done += n
		case e != 0:
			t.Fatalf("Read: %v", e)
		default:
			got = append(got, buf[:n]...)
		}
	}
	if !bytes.Equal(got, msg) {
		t.Fatal("the bytes read back differ from those written")
	}
	if n, e := Read(r, buf); n != 0 || e != unix.EAGAIN {
		t.Errorf("read from an empty socket: %d, %v; want EAGAIN", n, e)
	}
	if n, e := WriteFull(w, nil); n != 0 || e != 0 {
		t.Errorf("WriteFull of nothing: %d, %v", n, e)
	}
}
