package inspect

import "testing"

func TestIsServerFirstPort(t *testing.T) {
	for _, p := range []uint16{21, 22, 25, 110, 143, 465, 587, 993, 995, 3306} {
		if !IsServerFirstPort(p) {
			t.Errorf("port %d: the server speaks first there", p)
		}
	}
	// Client-first protocols, where tunfw may wait to read a name.
	for _, p := range []uint16{0, 53, 80, 443, 853, 5432, 6379, 8080, 8443, 65535} {
		if IsServerFirstPort(p) {
			t.Errorf("port %d: the client speaks first there", p)
		}
	}
}
