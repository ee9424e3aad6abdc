#!/usr/bin/env bash
# load-tests/admission-bench.sh — 100,000 distinct users through busbar's admission
# (per-user rate limit + per-service fair queue) vs the same route without admission.
#
# Needs: nginx, wrk, curl, taskset, python3, and a release build of busbar
# (`cargo build --release`, or `make bench-admission` which does both).
#
# Three busbar instances in front of one backend (nginx answering "ok\n"), identical but
# for admission:
#   plain     one route, no admission, no max_in_flight
#   admission the route with identity = header x-user-id (trusted from 127.0.0.1), a
#             per-user GCRA limit (rate 1/s, burst 10: a user of this load never hits it,
#             and its cell lives ~10 s, so ~all 100,000 users hold a cell at once) and a
#             queue; the service's max_in_flight (128) is above wrk's connections, so
#             requests take the fast path (one atomic) — the everyday case
#   queued    the same with max_in_flight = 16 < 64 connections: ~48 requests wait in
#             per-user queues at any moment, every request goes through the fair queue
# wrk (-t1 -c64) runs a Lua script that sends request i as user "u<i mod USERS>", so
# every user appears about DURATION*ROUNDS*rps/USERS times per target.
# Each target runs ROUNDS times for DURATION seconds, in a rotating order, after a warm-up;
# the report gives the median req/s, p50/p99, CPU per request, non-2xx answers, each
# instance's RSS at start and its peak RSS (VmHWM from /proc/<pid>/status) at the end,
# and busbar's own admission counters.
#
# Pinning (2-core box): busbar instances on CPU 0; backend nginx and wrk on CPU 1.
#
# Environment:
#   USERS=100000    distinct user ids
#   DURATION=10     seconds per wrk run
#   ROUNDS=3        rounds (order rotates each round); the median is reported
#   CONNS=64        wrk connections; wrk runs one thread
#   WARMUP=2        seconds of wrk per target before the rounds (0: none)
#   QUEUED_CAP=16   max_in_flight of the "queued" instance
#   BUSBAR=target/release/busbar   the binary (relative to the repo root)
#   PROXY_CPU=0 LOAD_CPU=1
#   ONLY="plain admission"         measure only these targets
#   KEEP_TMP=1      keep the temp dir (configs, logs, raw wrk output)
#
# Every server binds 127.0.0.1 on ports picked at run time, keeps its files in one
# `mktemp -d` dir, and is stopped by pid when the script exits (also on error or Ctrl-C).
set -euo pipefail

USERS=${USERS:-100000}
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
WARMUP=${WARMUP:-2}
QUEUED_CAP=${QUEUED_CAP:-16}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUSBAR=${BUSBAR:-target/release/busbar}
[[ $BUSBAR = /* ]] || BUSBAR="$ROOT/$BUSBAR"

BENCH_NAME="admission-bench"   # prefix of messages and of the temp dir
# shellcheck source-path=SCRIPTDIR source=bench-lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib/common.sh"

for tool in nginx wrk curl taskset python3 awk; do
  command -v "$tool" >/dev/null 2>&1 \
    || die "$tool not found (apt-get install -y nginx-light wrk curl util-linux python3)"
done
[[ -x $BUSBAR ]] || die "$BUSBAR not found: run 'cargo build --release' first (or 'make bench-admission')"
for v in USERS DURATION ROUNDS CONNS QUEUED_CAP; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -ge 1 ]] || die "$v must be a whole number >= 1"
done
[[ $WARMUP =~ ^[0-9]+$ ]] || die "WARMUP must be a whole number of seconds"
((DURATION * ROUNDS * 3 <= 540)) || die "DURATION × ROUNDS × 3 targets must stay under 9 minutes"
NCPU=$(nproc)
(( PROXY_CPU < NCPU && LOAD_CPU < NCPU )) || die "PROXY_CPU/LOAD_CPU must be < nproc ($NCPU)"
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------------
make_temp_dir

read -r P_BACKEND P_PLAIN P_PLAIN_ADMIN P_PLAIN_REG P_ADM P_ADM_ADMIN P_ADM_REG \
  P_Q P_Q_ADMIN P_Q_REG <<<"$(free_ports 10)"

wait_ready() {  # name port pid
  local name=$1 port=$2 pid=$3 i body
  for ((i = 0; i < 150; i++)); do
    kill -0 "$pid" 2>/dev/null || die "$name (pid $pid) exited during startup; see $DIR/$name/"
    if body=$(curl -fsS --max-time 1 -H 'x-user-id: ready' "http://127.0.0.1:$port/" 2>/dev/null) \
      && [[ $body = ok ]]; then
      return 0
    fi
    sleep 0.1
  done
  die "$name did not answer on 127.0.0.1:$port within 15 s; see $DIR/$name/"
}

# --- backend: nginx answering "ok\n", one worker, on the load CPU.
NGINX_V=$(nginx -V 2>&1)
mkdir -p "$DIR/backend"
{
  [[ $(id -u) = 0 ]] && echo "user root;"
  echo "worker_processes 1;"
  echo "error_log $DIR/backend/error.log warn;"
  echo "events { worker_connections 4096; }"
  echo "http {"
  echo "    access_log off;"
  nginx_temp_paths "$DIR/backend"
  echo "    keepalive_requests 1000000;"
  echo "    keepalive_timeout 75s;"
  echo "    server { listen 127.0.0.1:$P_BACKEND; location / { default_type text/plain; return 200 \"ok\n\"; } }"
  echo "}"
} >"$DIR/backend/nginx.conf"
NGINX_ARGS=(-p "$DIR/backend" -c "$DIR/backend/nginx.conf" -e "$DIR/backend/error.log"
  -g "daemon off; pid $DIR/backend/nginx.pid;")
nginx -t -q "${NGINX_ARGS[@]}" || die "backend nginx config invalid: $DIR/backend/nginx.conf"
taskset -c "$LOAD_CPU" nginx "${NGINX_ARGS[@]}" >"$DIR/backend/stdout.log" 2>&1 &
BACKEND_PID=$!
PIDS+=("$BACKEND_PID")
wait_ready backend "$P_BACKEND" "$BACKEND_PID"

# --- busbar instances.
start_busbar() {  # name port admin registry service-extra admission-block; sets LAST_PID
  local name=$1 port=$2 admin=$3 reg=$4 svc_extra=$5 admission=$6 d="$DIR/$1"
  mkdir -p "$d"
  cat >"$d/busbar.toml" <<EOF
[server]
threads = 1
grace_period = "2s"
runtime_dir = "$d"

[listen]
http = ["127.0.0.1:$port"]
admin = "127.0.0.1:$admin"

[log]
level = "warn"
access = "off"

[registry]
listen = "127.0.0.1:$reg"

[[service]]
name = "bench"
balance = "round_robin"
endpoints = [{ addr = "127.0.0.1:$P_BACKEND" }]
$svc_extra

[[route]]
name = "all"
service = "bench"
$admission
EOF
  "$BUSBAR" check "$d/busbar.toml" >"$d/check.log" 2>&1 \
    || { cat "$d/check.log" >&2; die "busbar check failed for $d/busbar.toml"; }
  BUSBAR_ADMIN_TOKEN="bench-$RANDOM$RANDOM" taskset -c "$PROXY_CPU" "$BUSBAR" run -c "$d/busbar.toml" \
    >"$d/stdout.log" 2>"$d/stderr.log" &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}
ADMISSION='[route.admission]
identity = ["header:x-user-id"]
trusted_proxies = ["127.0.0.1"]
rate_limit = { rate = "1/s", burst = 10 }
queue = { max_depth = 16, max_wait = "5s" }'
start_busbar plain "$P_PLAIN" "$P_PLAIN_ADMIN" "$P_PLAIN_REG" "" ""
PLAIN_PID=$LAST_PID
start_busbar admission "$P_ADM" "$P_ADM_ADMIN" "$P_ADM_REG" "max_in_flight = 128" "$ADMISSION"
ADM_PID=$LAST_PID
start_busbar queued "$P_Q" "$P_Q_ADMIN" "$P_Q_REG" "max_in_flight = $QUEUED_CAP" "$ADMISSION"
Q_PID=$LAST_PID
wait_ready plain "$P_PLAIN" "$PLAIN_PID"
wait_ready admission "$P_ADM" "$ADM_PID"
wait_ready queued "$P_Q" "$Q_PID"

TARGETS=(plain admission queued)
declare -A PORT=([plain]=$P_PLAIN [admission]=$P_ADM [queued]=$P_Q)
declare -A ADMIN=([plain]=$P_PLAIN_ADMIN [admission]=$P_ADM_ADMIN [queued]=$P_Q_ADMIN)
declare -A PID=([plain]=$PLAIN_PID [admission]=$ADM_PID [queued]=$Q_PID)
if [[ -n ${ONLY:-} ]]; then
  sel=()
  for t in $ONLY; do [[ -n ${PORT[$t]+x} ]] || die "ONLY: unknown target $t"; sel+=("$t"); done
  TARGETS=("${sel[@]}")
fi

declare -A RSS0
for t in "${TARGETS[@]}"; do RSS0[$t]=$(kib "${PID[$t]}" VmRSS); done

# --- wrk script: request i is sent as user u<i mod USERS>; requests prebuilt in init.
cat >"$DIR/users.lua" <<EOF
local users = $USERS
local reqs = {}
local i = 0
function init(args)
  for u = 0, users - 1 do
    reqs[u] = wrk.format("GET", "/", { ["Host"] = wrk.host, ["x-user-id"] = "u" .. u })
  end
end
function request()
  local r = reqs[i]
  i = (i + 1) % users
  return r
end
EOF

run_wrk() {  # target seconds
  timeout $(($2 + 60)) taskset -c "$LOAD_CPU" \
    wrk -t1 -c"$CONNS" -d"${2}s" --timeout 10s --latency -s "$DIR/users.lua" "http://127.0.0.1:${PORT[$1]}/"
}
RAW="$DIR/results.tsv"   # target round rps p50_us p99_us requests cpu_us_per_req non2xx sockerr
: >"$RAW"
measure() {
  local t=$1 r=$2 pid=${PID[$1]} before after out rps p50 p99 reqs cpu non2xx sockerr
  before=$(cpu_ticks "$pid")
  out=$(run_wrk "$t" "$DURATION") || die "wrk failed against $t: $out"
  after=$(cpu_ticks "$pid")
  echo "$out" >"$DIR/wrk-$t-$r.txt"
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  reqs=$(awk '/ requests in / {print $1}' <<<"$out")
  p50=$(to_us "$(awk '$1 == "50%" {print $2}' <<<"$out")")
  p99=$(to_us "$(awk '$1 == "99%" {print $2}' <<<"$out")")
  [[ -n $rps && -n $reqs && $reqs -gt 0 ]] || die "could not parse wrk output for $t: $out"
  non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' <<<"$out"); non2xx=${non2xx:-0}
  sockerr=$(awk '/Socket errors:/ {for (i = 3; i <= NF; i += 2) {g = $(i + 1); gsub(/,/, "", g); e += g}}
                 END {print e + 0}' <<<"$out")
  cpu=$(awk -v d=$((after - before)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN {printf "%.2f", d * 1e6 / hz / n}')
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$r" "$rps" "$p50" "$p99" "$reqs" "$cpu" "$non2xx" "$sockerr" >>"$RAW"
  printf 'admission-bench: round %d %-9s %9s req/s  p50 %6s us  p99 %6s us  cpu %6s us/req  non-2xx %s  socket errors %s  VmHWM %s kB\n' \
    "$r" "$t" "$rps" "$p50" "$p99" "$cpu" "$non2xx" "$sockerr" "$(kib "$pid" VmHWM)" >&2
}

BUSY=$(busy_pct)
((BUSY <= 10)) || log "WARNING: the machine is ${BUSY}% busy before the run; numbers will be noisy"

MODEL=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
GIT_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n $(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]] && GIT_REV="$GIT_REV + uncommitted changes"
echo "# busbar admission bench, $USERS users — $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo
echo "- machine: $NCPU CPUs (nproc), $MODEL; kernel $(uname -r)"
echo "- busbar: $BUSBAR (git $GIT_REV, binary built $(date -u -r "$BUSBAR" '+%Y-%m-%d %H:%M UTC')), threads=1, access log off"
echo "- load: wrk -t1 -c$CONNS -d${DURATION}s --latency -s users.lua (request i as x-user-id: u<i mod $USERS>), GET / → backend nginx \`return 200 \"ok\\n\"\`"
echo "- admission: identity header x-user-id; rate_limit 1/s burst 10 per user (max_users default 100,000); queue max_depth 16, max_wait 5s; max_in_flight 128 (admission) / $QUEUED_CAP (queued)"
echo "- pinning: busbar on CPU $PROXY_CPU; backend nginx (1 worker) and wrk on CPU $LOAD_CPU"
echo "- rounds: $ROUNDS, order rotated each round; median per target; warm-up ${WARMUP}s per target"
echo "- machine busy before the run (2 s sample, all CPUs): ${BUSY}%; loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

run_rounds run_wrk

median() {  # target column
  awk -F'\t' -v t="$1" -v c="$2" '$1 == t {print $c}' "$RAW" | median_of
}
PLAIN_RPS=$(median plain 3)
echo "| target | req/s | vs plain | p50 | p99 | CPU µs/req | non-2xx | socket errors | RSS at start | peak RSS (VmHWM) |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for t in "${TARGETS[@]}"; do
  rps=$(median "$t" 3)
  printf '| %s | %.0f | %s | %s | %s | %.1f | %s | %s | %s | %s |\n' "$t" "$rps" \
    "$(ratio "$rps" "${PLAIN_RPS:--}")" \
    "$(fmt_us "$(median "$t" 4)")" "$(fmt_us "$(median "$t" 5)")" "$(median "$t" 7)" \
    "$(awk -F'\t' -v t="$t" '$1 == t {e += $8} END {print e + 0}' "$RAW")" \
    "$(awk -F'\t' -v t="$t" '$1 == t {e += $9} END {print e + 0}' "$RAW")" \
    "$(mib "${RSS0[$t]}")" "$(mib "$(kib "${PID[$t]}" VmHWM)")"
done
echo
for t in "${TARGETS[@]}"; do
  [[ $t = plain ]] && continue
  m=$(curl -fsS --max-time 5 "http://127.0.0.1:${ADMIN[$t]}/metrics" || true)
  echo "- $t: busbar's counters over the whole run (warm-up included):"
  grep -E '^busbar_admission_decisions_total\{.*route="all"' <<<"$m" | awk '$2 != 0' \
    | sed 's/^/    /' || echo "    (none)"
done
BUSY_END=$(busy_pct)
echo "- machine busy after the run (2 s sample): ${BUSY_END}%; loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)"
((BUSY <= 10 && BUSY_END <= 10)) || echo "- WARNING: something else was using the CPUs; rerun on a quiet machine"
for t in "${TARGETS[@]}"; do
  if [[ -s $DIR/$t/stderr.log ]]; then
    echo "- $t stderr ($(wc -l <"$DIR/$t/stderr.log") lines), first lines:"
    head -5 "$DIR/$t/stderr.log" | sed 's/^/    /'
  fi
done
echo "- per-round numbers: on stderr (and in results.tsv in the temp dir with KEEP_TMP=1)"
