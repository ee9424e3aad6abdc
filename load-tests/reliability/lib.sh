# Shared helpers for the reliability scripts: sourced, not run.
#
# Everything binds 127.0.0.1 on ports the OS picked a moment ago; every process started
# here is recorded in PIDS and stopped by pid from the EXIT trap (`rel_cleanup`).
# Results go to $OUT (load-tests/reliability/out/, not checked in) as key=value lines.

set -euo pipefail

REL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$REL_DIR/../.." && pwd)"
BUSBAR="${BUSBAR:-$ROOT/target/release/busbar}"
OUT="${OUT:-$REL_DIR/out}"
mkdir -p "$OUT"
PIDS=()
WORK="$(mktemp -d /tmp/busbar-rel.XXXXXX)"
TOKEN="reliability-token-$$"
ADMIN_TOKEN="reliability-admin-$$"
export BUSBAR_ADMIN_TOKEN="$ADMIN_TOKEN"

rel_cleanup() {
	local p
	for p in "${PIDS[@]:-}"; do
		[ -n "$p" ] && kill "$p" 2>/dev/null || true
	done
	for p in "${PIDS[@]:-}"; do
		[ -n "$p" ] && wait "$p" 2>/dev/null || true
	done
	cp "$WORK/busbar.log" "$OUT/$(basename "$0" .sh)-busbar.log" 2>/dev/null || true
	rm -rf "$WORK"
}
trap rel_cleanup EXIT

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }

free_port() {
	python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Demo backends (fast JSON) and the slow backend (sleeps ?ms=N before answering).
start_backends() {
	B1=$(free_port); B2=$(free_port); SLOW=$(free_port)
	"$BUSBAR" demo -l "127.0.0.1:$B1" -l "127.0.0.1:$B2" >"$WORK/demo.log" 2>&1 &
	PIDS+=($!)
	python3 "$REL_DIR/slow_backend.py" "$SLOW" >"$WORK/slow.log" 2>&1 &
	PIDS+=($!)
	wait_port "$B1"; wait_port "$B2"; wait_port "$SLOW"
}

wait_port() {
	local i
	for i in $(seq 1 150); do
		(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
		sleep 0.1
	done
	log "port $1 never opened"; return 1
}

# Writes $WORK/busbar.toml: demo routes, a slow route, a registration-only service.
write_config() {
	HTTP=$(free_port); ADMIN=$(free_port); REG=$(free_port)
	local sha
	sha=$(printf '%s' "$TOKEN" | sha256sum | cut -d' ' -f1)
	CONFIG="$WORK/busbar.toml"
	cat >"$CONFIG" <<TOML
[server]
threads = 1
runtime_dir = "$WORK"
grace_period = "30s"

[listen]
http = ["127.0.0.1:$HTTP"]
admin = "127.0.0.1:$ADMIN"

[log]
level = "warn"
access = "${ACCESS_LOG:-off}"

[registry]
listen = "127.0.0.1:$REG"
default_ttl = "10s"
[[registry.token]]
token_sha256 = "$sha"
services = ["churn"]

[[service]]
name = "demo"
endpoints = [{ addr = "127.0.0.1:$B1" }, { addr = "127.0.0.1:$B2" }]

[[service]]
name = "slow"
endpoints = [{ addr = "127.0.0.1:$SLOW" }]
read_timeout = "60s"
timeout = "60s"

[[service]]
name = "churn"
registration = true

[[route]]
name = "slow"
path_prefix = "/slow"
service = "slow"

[[route]]
name = "churn"
path_prefix = "/churn"
service = "churn"

[[route]]
name = "demo"
path_prefix = "/"
service = "demo"
TOML
	"$BUSBAR" check "$CONFIG" >/dev/null
}

# Starts busbar on $CONFIG; sets BUS_PID. Extra args (e.g. --upgrade) are passed on.
start_busbar() {
	ulimit -n 65536 2>/dev/null || true
	"$BUSBAR" run -c "$CONFIG" "$@" >>"$WORK/busbar.log" 2>&1 &
	BUS_PID=$!
	PIDS+=("$BUS_PID")
}

wait_ready() {
	local i
	for i in $(seq 1 150); do
		if curl -fsS -o /dev/null "http://127.0.0.1:$ADMIN/healthz" 2>/dev/null &&
			curl -fsS -o /dev/null "http://127.0.0.1:$HTTP/" 2>/dev/null; then
			return 0
		fi
		sleep 0.1
	done
	log "busbar not ready"; tail -20 "$WORK/busbar.log" >&2; return 1
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# wrk with the summary line of load.lua. Args: seconds connections delay_ms [path].
# Prints "RESULT requests=… non2xx=… connect=… read=… write=… timeout=… p50_us=… p99_us=… rps=…".
run_wrk() {
	local secs=$1 conns=$2 delay=$3 path=${4:-/}
	WRK_DELAY_MS=$delay wrk -t1 -c"$conns" -d"${secs}s" --latency --timeout 10s \
		-s "$REL_DIR/load.lua" "http://127.0.0.1:$HTTP$path" | grep "^RESULT" | tee -a "$OUT/wrk-all.txt" | grep "^RESULT "
}

# Field of a RESULT line: field NAME "$line".
field() { sed -n "s/.*\b$1=\([0-9.]*\).*/\1/p" <<<"$2"; }

# Max throughput (wrk -t1 -c32, 5 s), then the connections and delay that give about half:
# each connection waits DELAY ms between requests. Sets MAX_RPS, HALF_CONNS, HALF_DELAY.
measure_max() {
	local r
	r=$(run_wrk 5 32 0)
	MAX_RPS=$(field rps "$r")
	HALF_DELAY=2
	# conns / (delay + latency) ≈ MAX/2; latency at half load is well under a millisecond.
	HALF_CONNS=$(python3 -c "print(max(1, round($MAX_RPS / 2 * ($HALF_DELAY + 1.0) / 1000)))")
	log "max ${MAX_RPS} req/s; half load: ${HALF_CONNS} connections, ${HALF_DELAY} ms apart"
}

# Appends key=value lines to $OUT/<case>.txt and echoes them.
record() {
	local case=$1; shift
	printf '%s\n' "$@" | tee -a "$OUT/$case.txt"
}
