// Package config holds what the config sections of tunfw share: the error a
// section's validation reports for one key, and the mapping of such keys to
// the line of the TOML file they were written on.
//
// Each section (tun.Config, filter.Options, ...) is owned and validated by its
// own package; those packages only name the key that is wrong. The loader in
// cmd/tunfw turns the key into file:line.
package config

import (
	"errors"
	"fmt"
)

// FieldError reports a bad value for one key of the config file.
//
// Key is a dotted path as a user would write it, with 1-based indexes for
// arrays of tables and for list entries: "tun.mtu", "rule[2].dst",
// "sets.web_ports".
type FieldError struct {
	Key string
	Err error
}

// Error implements error.
func (e *FieldError) Error() string { return e.Key + ": " + e.Err.Error() }

// Unwrap returns the underlying error.
func (e *FieldError) Unwrap() error { return e.Err }

// Errorf returns a *FieldError for key with a formatted message.
func Errorf(key, format string, args ...any) error {
	return &FieldError{Key: key, Err: fmt.Errorf(format, args...)}
}

// Errors flattens err (which may be an errors.Join tree) into its leaves.
func Errors(err error) []error {
	if err == nil {
		return nil
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		var out []error
		for _, e := range j.Unwrap() {
			out = append(out, Errors(e)...)
		}
		return out
	}
	return []error{err}
}

// AsField reports the *FieldError in err's chain, if any.
func AsField(err error) (*FieldError, bool) {
	var fe *FieldError
	ok := errors.As(err, &fe)
	return fe, ok
}
