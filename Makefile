# tunfw build and test entry points. `make build` then
# `sudo ./bin/tunfw up -c config.toml`; `make test` runs every test.

GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION)

.PHONY: build test vet fuzz bench bench-smoke clean install image

# `make install` (as root): the binary, the systemd units (tunfw.service;
# tunfw-block.service, the boot-time kill switch, left disabled) and, unless one
# exists, the example config. DESTDIR stages it elsewhere.
PREFIX  ?= /usr/local
DESTDIR ?=

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/tunfw ./cmd/tunfw

# Unit tests everywhere; the end-to-end tests need root and /dev/net/tun and
# skip (saying why) without them. The unit tests of the packages whose state
# several goroutines share run again under the race detector (it needs cgo:
# gcc). The micro-benchmarks run once so they cannot rot.
RACE_PKGS := ./filter ./stack/... ./control ./metrics ./cmd/tunfw ./dns ./names
test: vet
	$(GO) test -count=1 -timeout 15m ./...
	$(GO) test -race -count=1 -timeout 10m $(RACE_PKGS)
	$(GO) test -count=1 -run=NONE -bench=. -benchtime=1x ./...
	$(MAKE) fuzz
	$(MAKE) bench-smoke

# Each fuzzer runs briefly on top of its corpus in testdata/fuzz (the corpus
# itself already ran as ordinary tests above).
# One fuzzer per parser of untrusted input: packets, configs, ClientHellos,
# HTTP requests, QUIC Initials, DNS messages, name lists, TUN reads.
# Minimising a new large input can hold a worker for a minute: it is capped.
# The budget is a count of inputs (about 5-40 s each on 2 cores), not a
# duration: when a duration ends, Go 1.26's fuzzing coordinator can fail the
# run with a spurious "context deadline exceeded" (go.dev/issue/75804,
# fixed in Go 1.27), which a count never reaches.
FUZZTIME ?= 200000x
FUZZ = $(GO) test -run=NONE -fuzztime=$(FUZZTIME) -fuzzminimizetime=5s
fuzz:
	$(FUZZ) -fuzz=FuzzParsePacket ./filter
	$(FUZZ) -fuzz=FuzzParseConfig ./cmd/tunfw
	$(FUZZ) -fuzz=FuzzTLSServerName ./inspect
	$(FUZZ) -fuzz=FuzzHTTPHost ./inspect
	$(FUZZ) -fuzz='^FuzzQUICInitial$$' ./inspect
	$(FUZZ) -fuzz=FuzzQUICInitialPayload ./inspect
	$(FUZZ) -fuzz=FuzzQuestion ./dns
	$(FUZZ) -fuzz=FuzzLearn ./dns
	$(FUZZ) -fuzz=FuzzAnswer ./dns
	$(FUZZ) -fuzz=FuzzNormalize ./names
	$(FUZZ) -fuzz=FuzzReadList ./names
	$(FUZZ) -fuzz=FuzzSplitVirtio ./tun
	$(FUZZ) -fuzz=FuzzAnswerQuery ./filter
	$(FUZZ) -fuzz=FuzzDNSMessages ./stack/tcpfwd

vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))" || { echo "gofmt needed:"; gofmt -l .; exit 1; }
	$(GO) vet ./...

# End-to-end benchmark (root, /dev/net/tun): tunfw against the kernel's
# direct veth path, in namespaces it creates; table on stdout, JSON in
# bench/results/latest.json. About 9 minutes (host mode, then gateway mode).
bench:
	TUNFW_BENCH=full $(GO) test -v -count=1 -timeout 30m -run '^TestBench$$' ./bench/

# Every workload for a second or two, one round: proves the harness works.
bench-smoke:
	TUNFW_BENCH=smoke $(GO) test -v -count=1 -timeout 5m -run '^TestBench$$' ./bench/

install: build
	install -D -m 0755 bin/tunfw $(DESTDIR)$(PREFIX)/bin/tunfw
	sed 's|/usr/local/bin/tunfw|$(PREFIX)/bin/tunfw|g' deploy/tunfw.service > bin/tunfw.service
	install -D -m 0644 bin/tunfw.service $(DESTDIR)/etc/systemd/system/tunfw.service
	sed 's|/usr/local/bin/tunfw|$(PREFIX)/bin/tunfw|g' deploy/tunfw-block.service > bin/tunfw-block.service
	install -D -m 0644 bin/tunfw-block.service $(DESTDIR)/etc/systemd/system/tunfw-block.service
	test -e $(DESTDIR)/etc/tunfw/config.toml || install -D -m 0600 config.toml $(DESTDIR)/etc/tunfw/config.toml
	@echo "installed; now: systemctl daemon-reload && systemctl enable --now tunfw"

# The container image (FROM scratch): the static binary and config.toml.
image: build
	docker build -t tunfw .

clean:
	rm -rf bin
