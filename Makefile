# busbar — build, run, test, bench. Tests run one at a time per binary: several of them
# measure latency or timing, and a 2-core machine has no room for them to share.
#
#   make run     build and start busbar on conf/busbar.toml with two demo backends
#   make test    the whole test suite (unit + integration, real processes on loopback)
#   make bench   release build, then load-tests/bench.sh (busbar vs nginx, HAProxy, direct)
#   make bench-engine   release build, then bench.sh's issue-20 shapes: request bodies, TLS
#                on both sides, TLS memory, and their latency (~12 minutes)
#   make bench-admission   release build, then 100,000 users through admission vs without
#   make bench-grpc  release builds, then load-tests/grpc-bench.sh (JSON→gRPC vs gRPC vs HTTP)
#   make package   release build, then a Debian package in target/debian/ (cargo-deb)

CARGO ?= cargo
CONFIG ?= conf/busbar.toml
DEMO_BACKENDS ?= -l 127.0.0.1:9101 -l 127.0.0.1:9102

.PHONY: run build release package test check-conf bench bench-engine bench-admission bench-grpc fmt clippy lint fuzz fuzz-chunked reliability

build:
	$(CARGO) build --bin busbar

release:
	$(CARGO) build --release --bin busbar

# The .deb (Cargo.toml's [package.metadata.deb]: binary, conffile, units, maintainer
# scripts in packaging/). Reuses target/release; installs cargo-deb when missing.
# packaging/ci-package-test.sh installs it and proves it (CI runs both).
CARGO_DEB_VERSION ?= 3.8.0
package: release
	@command -v cargo-deb >/dev/null || $(CARGO) install cargo-deb --locked --version $(CARGO_DEB_VERSION)
	$(CARGO) deb --no-build --output target/debian/
	@ls -l target/release/busbar target/debian/*.deb

# Starts the demo backends in the background (stopped, by pid, when busbar exits)
# and busbar in the foreground. Try: curl -i http://localhost:8080/api/hello
run: release
	@set -e; \
	target/release/busbar demo $(DEMO_BACKENDS) & demo=$$!; \
	trap 'kill $$demo 2>/dev/null; wait $$demo 2>/dev/null' EXIT INT TERM; \
	target/release/busbar run -c $(CONFIG)

# Every shipped configuration passing `busbar check` is part of the suite
# (tests/lifecycle.rs: every_shipped_config_passes_check); `make check-conf` does it alone.
test:
	$(CARGO) test --all-targets -- --test-threads=1

# Every shipped configuration must pass `busbar check`.
check-conf: build
	@for f in conf/*.toml conf/examples/*.toml; do \
		[ -e "$$f" ] || continue; \
		target/debug/busbar check "$$f" || exit 1; \
	done

# testkit's h2pace paces lat's HTTP/2 shapes (h2c, h2tls) and grpc-bench's LAT=1.
bench: release
	$(CARGO) build --release --example bare-pingora --example lean-proxy
	$(CARGO) build --release -p busbar-testkit --bin h2pace --tests
	bash load-tests/bench.sh

# Issue 20's shapes (load-tests/README.md): POST 1 KiB and 64 KiB chunked, GET over TLS
# (keep-alive and a new connection per request), an HTTPS upstream, 10,000 idle TLS
# connections, and the paced latency of the POST and TLS shapes. SCENARIOS/LAT_SHAPES
# from the environment override the defaults.
bench-engine: release
	SCENARIOS="$${SCENARIOS:-post1k post64k tls tlsnew upstls lat tlsmem}" \
	  LAT_SHAPES="$${LAT_SHAPES:-post1k tls}" ALLOW_LONG=1 bash load-tests/bench.sh

# 100,000 distinct users through a rate-limited, queued route vs the same route without
# admission: throughput and peak RSS (load-tests/admission-bench.sh, ~2 minutes).
bench-admission: release
	bash load-tests/admission-bench.sh

# JSON→gRPC translation vs gRPC pass-through vs HTTP pass-through through one busbar,
# against testkit's tonic backend (its `grpc-backend` bin, built here too; `--tests`
# because testkit is a dev-dependency: without it cargo 1.95 panics resolving features).
bench-grpc: release
	$(CARGO) build --release -p busbar-testkit --bin grpc-backend --bin h2pace --tests
	bash load-tests/grpc-bench.sh

# Each cargo-fuzz target for FUZZ_SECONDS (60). New inputs go to fuzz/.work/ (not checked
# in); the seeds in fuzz/corpus/ are read. `make test` replays the seeds (tests/fuzz_corpus.rs).
FUZZ_TARGETS ?= config route registration translate grpc_web head chunked h2_request
FUZZ_SECONDS ?= 60
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz
	@set -e; cd fuzz; for t in $(FUZZ_TARGETS); do \
		mkdir -p .work/$$t; \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$t .work/$$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS); \
	done

# The chunked-body scanner alone (request and response bodies), for FUZZ_SECONDS.
fuzz-chunked:
	@$(MAKE) --no-print-directory fuzz FUZZ_TARGETS=chunked

# Reload, graceful upgrade, slowloris, HTTP/2 abuse and a bounded soak (SOAK_SECONDS,
# default 120) under load on loopback; results in load-tests/reliability/out/.
reliability: release
	bash load-tests/reliability/run-all.sh

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

lint: clippy
	$(CARGO) fmt --all -- --check
