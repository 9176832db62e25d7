package config

import (
	"bufio"
	"bytes"
	"fmt"
	"strconv"
	"strings"
)

// Lines maps the keys of a TOML document to the line each was written on.
//
// BurntSushi/toml keeps key positions private, so this reads the document's
// layout itself: table headers ("[tun]", "[[rule]]", counting arrays of
// tables) and "key =" at the start of a line. That covers how config files
// are written; a key it cannot place falls back to its table's line.
type Lines struct {
	at map[string]int
	// byBare lists, for "rule.foo" (no index), every place where that key
	// is set in any [[rule]]: undecoded-key reports name no index.
	byBare map[string][]Place
}

// Locate scans a TOML document.
func Locate(data []byte) *Lines {
	l := &Lines{at: make(map[string]int), byBare: make(map[string][]Place)}
	count := make(map[string]int)
	table, bare := "", ""
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || line[0] == '#':
		case strings.HasPrefix(line, "[["):
			name := unquote(strings.TrimSpace(strings.Trim(cutComment(line), "[] \t")))
			count[name]++
			bare = name
			table = fmt.Sprintf("%s[%d]", name, count[name])
			l.set(table, n)
		case line[0] == '[':
			table = unquote(strings.TrimSpace(strings.Trim(cutComment(line), "[] \t")))
			bare = table
			l.set(table, n)
		default:
			k, _, ok := strings.Cut(line, "=")
			if !ok {
				continue // continuation of a multi-line value
			}
			k = unquote(strings.TrimSpace(k))
			if strings.ContainsAny(k, " \t\"'[]{},") {
				continue
			}
			full := k
			if table != "" {
				full = table + "." + k
				l.byBare[bare+"."+k] = append(l.byBare[bare+"."+k], Place{Key: table + "." + k, Line: n})
			}
			l.set(full, n)
		}
	}
	return l
}

func (l *Lines) set(key string, n int) {
	if _, dup := l.at[key]; !dup {
		l.at[key] = n
	}
}

// Line returns the line of key ("rule[2].dst[3]" falls back to "rule[2].dst",
// then "rule[2]"), or 0 if nothing of it is known.
func (l *Lines) Line(key string) int {
	for key != "" {
		if n, ok := l.at[key]; ok {
			return n
		}
		i := strings.LastIndexAny(key, ".[")
		if i < 0 {
			break
		}
		key = key[:i]
	}
	return 0
}

// Place is where a key is set.
type Place struct {
	Key  string // with indexes: "rule[2].foo"
	Line int
}

// Places returns every place where a key named by an index-free path such as
// "rule.foo" is set.
func (l *Lines) Places(key string) []Place { return l.byBare[key] }

func cutComment(s string) string {
	if i := strings.IndexByte(s, '#'); i >= 0 {
		return s[:i]
	}
	return s
}

func unquote(s string) string {
	if u, err := strconv.Unquote(s); err == nil {
		return u
	}
	return strings.Trim(s, "'")
}
