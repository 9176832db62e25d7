// Package tunfw holds what belongs to the repository as a whole: the example
// config, embedded into the binary as its default.
package tunfw

import _ "embed"

// DefaultConfig is config.toml from the repository root, used when no config
// file is given and /etc/tunfw/config.toml does not exist.
//
//go:embed config.toml
var DefaultConfig []byte
