#!/usr/bin/env bash
# load-tests/bench.sh — busbar vs nginx vs HAProxy vs direct, side by side, on loopback.
#
# Needs: nginx, haproxy, wrk, curl, taskset, python3, and a release build of busbar
# (`cargo build --release`, or `make bench` which does both). On a fresh Debian box:
#   apt-get install -y nginx-light haproxy wrk curl util-linux python3
#
# What it does: starts one backend (nginx answering "ok\n"), four proxies in front of it
# (nginx, HAProxy, busbar, busbar with a file access log), then runs
# `wrk -t1 -c64 -d${DURATION}s --latency` against each of them and against the backend
# directly, ROUNDS times in a rotating order, and prints the median per target as a
# markdown table. CPU per request of the proxy comes from /proc/<pid>/stat
# (utime+stime of the proxy's processes, before and after each wrk run).
#
# Pinning (2-core box): proxy under test on CPU 0; backend nginx and wrk on CPU 1.
#
# Environment:
#   DURATION=5      seconds per wrk run
#   ROUNDS=3        rounds (order rotates each round); the median is reported
#   CONNS=64        wrk connections (-c); wrk always runs one thread (-t1)
#   WARMUP=1        seconds of wrk against each target before the measured rounds (0: none)
#   BUSBAR=target/release/busbar   the binary (relative to the repo root)
#   PROXY_CPU=0 LOAD_CPU=1         CPUs for the proxies / for backend + wrk
#   ONLY="nginx busbar"            measure only these targets (names as in the table)
#   KEEP_TMP=1      keep the temp dir (configs, logs) after the run
#
# Every server binds 127.0.0.1 on ports picked at run time, keeps its files in one
# `mktemp -d` dir, and is stopped by pid when the script exits (also on error or Ctrl-C).
set -euo pipefail

DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
WARMUP=${WARMUP:-1}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUSBAR=${BUSBAR:-target/release/busbar}
[[ $BUSBAR = /* ]] || BUSBAR="$ROOT/$BUSBAR"

die() { echo "bench: $*" >&2; exit 1; }
log() { echo "bench: $*" >&2; }

for tool in nginx haproxy wrk curl taskset python3 awk; do
  command -v "$tool" >/dev/null 2>&1 \
    || die "$tool not found (apt-get install -y nginx-light haproxy wrk curl util-linux python3)"
done
[[ -x $BUSBAR ]] || die "$BUSBAR not found: run 'cargo build --release' first (or 'make bench')"
[[ $DURATION =~ ^[0-9]+$ && $DURATION -ge 1 ]] || die "DURATION must be a whole number of seconds"
[[ $ROUNDS =~ ^[0-9]+$ && $ROUNDS -ge 1 ]] || die "ROUNDS must be >= 1"
[[ $WARMUP =~ ^[0-9]+$ ]] || die "WARMUP must be a whole number of seconds"
NCPU=$(nproc)
(( PROXY_CPU < NCPU && LOAD_CPU < NCPU )) || die "PROXY_CPU/LOAD_CPU must be < nproc ($NCPU)"
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------------
# Temp dir, process bookkeeping, cleanup.
DIR=$(mktemp -d "${TMPDIR:-/tmp}/busbar-bench.XXXXXX")
PIDS=()        # every server we started (nginx masters, haproxy, busbar)
cd "$DIR"      # nothing we run leaves files in the caller's directory

cleanup() {
  local rc=$? pid kids=() i
  trap - EXIT INT TERM
  # nginx workers are children of their master: note them first, in case the master
  # has to be killed hard and leaves them behind.
  for pid in "${PIDS[@]}"; do
    for k in $(pgrep -P "$pid" 2>/dev/null); do kids+=("$k"); done
  done
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for ((i = 0; i < 50; i++)); do   # up to 5 s for a clean exit
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${PIDS[@]}" "${kids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid did not stop on SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ ${KEEP_TMP:-0} = 1 || $rc -ne 0 ]]; then
    log "files kept in $DIR"
  else
    rm -rf "$DIR"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Free loopback ports, all held open at once so none repeats.
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}
read -r P_BACKEND P_NGINX P_HAPROXY P_BUSBAR P_BUSBAR_ADMIN P_BUSBAR_REG \
  P_BUSBARLOG P_BUSBARLOG_ADMIN P_BUSBARLOG_REG <<<"$(free_ports 9)"

# Wait until http://127.0.0.1:PORT/ answers 200 with "ok"; fail after 15 s or if PID died.
wait_ready() {
  local name=$1 port=$2 pid=$3 i body
  for ((i = 0; i < 150; i++)); do
    kill -0 "$pid" 2>/dev/null || die "$name (pid $pid) exited during startup; see $DIR/$name/"
    if body=$(curl -fsS --max-time 1 "http://127.0.0.1:$port/" 2>/dev/null) && [[ $body = ok ]]; then
      return 0
    fi
    sleep 0.1
  done
  die "$name did not answer on 127.0.0.1:$port within 15 s; see $DIR/$name/"
}

# ---------------------------------------------------------------------------------
# nginx configs. Temp paths for the modules this nginx has, all inside $DIR.
NGINX_V=$(nginx -V 2>&1)
nginx_temp_paths() {  # $1 = per-instance dir
  local d=$1 m
  echo "client_body_temp_path $d/client_body;"
  for m in proxy fastcgi uwsgi scgi; do
    grep -q -- "--without-http_${m}_module" <<<"$NGINX_V" || echo "${m}_temp_path $d/$m;"
  done
}
# As root, nginx workers would switch to nobody/www-data, who can't enter the 0700
# mktemp dir; keep them as root (only on loopback, only for this run).
NGINX_USER=""
[[ $(id -u) = 0 ]] && NGINX_USER="user root;"

LAST_PID=""
start_nginx() {  # name cpu http-block-content; sets LAST_PID
  local name=$1 cpu=$2 http=$3 d="$DIR/$1"
  mkdir -p "$d"
  cat >"$d/nginx.conf" <<EOF
$NGINX_USER
worker_processes 1;
error_log $d/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    $(nginx_temp_paths "$d")
    keepalive_requests 1000000;
    keepalive_timeout 75s;
$http
}
EOF
  nginx -t -q -p "$d" -c "$d/nginx.conf" -e "$d/error.log" -g "daemon off; pid $d/nginx.pid;" \
    || die "nginx config for $name is invalid: $d/nginx.conf"
  taskset -c "$cpu" nginx -p "$d" -c "$d/nginx.conf" -e "$d/error.log" \
    -g "daemon off; pid $d/nginx.pid;" >"$d/stdout.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

# --- backend: nginx answering "ok\n", on the load CPU.
start_nginx backend "$LOAD_CPU" "
    server {
        listen 127.0.0.1:$P_BACKEND;
        location / { default_type text/plain; return 200 \"ok\n\"; }
    }"
BACKEND_PID=$LAST_PID
wait_ready backend "$P_BACKEND" "$BACKEND_PID"

# --- nginx reverse proxy, one worker, upstream keepalive 64.
start_nginx nginx "$PROXY_CPU" "
    upstream backend {
        server 127.0.0.1:$P_BACKEND;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$P_NGINX;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }"
NGINX_PID=$LAST_PID

# --- HAProxy, one thread, foreground (-db: one process, no master).
mkdir -p "$DIR/haproxy"
cat >"$DIR/haproxy/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096
    pidfile $DIR/haproxy/haproxy.pid

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s

frontend fe
    bind 127.0.0.1:$P_HAPROXY
    default_backend be

backend be
    server b1 127.0.0.1:$P_BACKEND
EOF
haproxy -c -q -f "$DIR/haproxy/haproxy.cfg" || die "haproxy config invalid: $DIR/haproxy/haproxy.cfg"
taskset -c "$PROXY_CPU" haproxy -db -f "$DIR/haproxy/haproxy.cfg" >"$DIR/haproxy/stdout.log" 2>&1 &
HAPROXY_PID=$!
PIDS+=("$HAPROXY_PID")

# --- busbar, twice: access log off, and access log to a file.
start_busbar() {  # name port admin-port registry-port access; sets LAST_PID
  local name=$1 port=$2 admin=$3 reg=$4 access=$5 d="$DIR/$1"
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
access = "$access"

# The registration API listens even when nothing registers (default 127.0.0.1:9902);
# give each instance its own port so two busbars (or a dev instance) don't collide.
[registry]
listen = "127.0.0.1:$reg"

[[service]]
name = "bench"
balance = "round_robin"
endpoints = [{ addr = "127.0.0.1:$P_BACKEND" }]

[[route]]
name = "all"
service = "bench"
EOF
  "$BUSBAR" check "$d/busbar.toml" >"$d/check.log" 2>&1 \
    || { cat "$d/check.log" >&2; die "busbar check failed for $d/busbar.toml"; }
  # A throwaway admin token, so busbar doesn't warn that none is set.
  BUSBAR_ADMIN_TOKEN="bench-$RANDOM$RANDOM" taskset -c "$PROXY_CPU" "$BUSBAR" run -c "$d/busbar.toml" >"$d/stdout.log" 2>"$d/stderr.log" &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}
start_busbar busbar "$P_BUSBAR" "$P_BUSBAR_ADMIN" "$P_BUSBAR_REG" off
BUSBAR_PID=$LAST_PID
start_busbar busbar+log "$P_BUSBARLOG" "$P_BUSBARLOG_ADMIN" "$P_BUSBARLOG_REG" "$DIR/busbar+log/access.log"
BUSBARLOG_PID=$LAST_PID

wait_ready nginx "$P_NGINX" "$NGINX_PID"
wait_ready haproxy "$P_HAPROXY" "$HAPROXY_PID"
wait_ready busbar "$P_BUSBAR" "$BUSBAR_PID"
wait_ready busbar+log "$P_BUSBARLOG" "$BUSBARLOG_PID"

# ---------------------------------------------------------------------------------
# Targets: name, port, pid of the proxy ("" for direct).
TARGETS=(direct nginx haproxy busbar busbar+log)
declare -A PORT=([direct]=$P_BACKEND [nginx]=$P_NGINX [haproxy]=$P_HAPROXY
                 [busbar]=$P_BUSBAR [busbar+log]=$P_BUSBARLOG)
declare -A PID=([direct]="" [nginx]=$NGINX_PID [haproxy]=$HAPROXY_PID
                [busbar]=$BUSBAR_PID [busbar+log]=$BUSBARLOG_PID)
if [[ -n ${ONLY:-} ]]; then
  sel=()
  for t in $ONLY; do [[ -n ${PORT[$t]+x} ]] || die "ONLY: unknown target $t"; sel+=("$t"); done
  TARGETS=("${sel[@]}")
fi

# utime+stime ticks of a process and all its children (nginx master + workers).
cpu_ticks() {
  local pid=$1 total=0 p f a
  [[ -n $pid ]] || { echo 0; return; }
  for p in "$pid" $(pgrep -P "$pid" 2>/dev/null); do
    f=$(cat "/proc/$p/stat" 2>/dev/null) || die "process $p is gone"
    f=${f##*) }                     # drop "pid (comm) ": field 3 (state) comes first
    read -r -a a <<<"$f"
    total=$((total + a[11] + a[12]))  # utime (14) + stime (15)
  done
  echo "$total"
}

# wrk output latency like 1.23ms / 456.78us / 1.02s -> microseconds.
to_us() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    if (u == "us") m = 1; else if (u == "ms") m = 1000; else if (u == "s") m = 1000000
    else if (u == "m") m = 60000000; else { print "NaN"; exit }
    printf "%.0f\n", n * m }'
}

RAW="$DIR/results.tsv"   # target round rps p50_us p99_us requests cpu_us_per_req errors
: >"$RAW"

run_wrk() {  # target seconds -> prints wrk output
  local t=$1 secs=$2
  timeout $((secs + 30)) taskset -c "$LOAD_CPU" \
    wrk -t1 -c"$CONNS" -d"${secs}s" --timeout 5s --latency "http://127.0.0.1:${PORT[$t]}/"
}

measure() {  # target round
  local t=$1 r=$2 pid=${PID[$1]} before after out rps p50 p99 reqs cpu errs
  before=$(cpu_ticks "$pid")
  out=$(run_wrk "$t" "$DURATION") || die "wrk failed against $t: $out"
  after=$(cpu_ticks "$pid")
  echo "$out" >"$DIR/wrk-$t-$r.txt"
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  reqs=$(awk '/ requests in / {print $1}' <<<"$out")
  p50=$(to_us "$(awk '$1 == "50%" {print $2}' <<<"$out")")
  p99=$(to_us "$(awk '$1 == "99%" {print $2}' <<<"$out")")
  [[ -n $rps && -n $reqs && $reqs -gt 0 ]] || die "could not parse wrk output for $t: $out"
  # Errors: non-2xx/3xx answers and socket errors (connect/read/write/timeout).
  errs=$(awk '/Non-2xx or 3xx responses:/ {e += $NF}
              /Socket errors:/ {for (i = 3; i <= NF; i += 2) {g = $(i + 1); gsub(/,/, "", g); e += g}}
              END {print e + 0}' <<<"$out")
  if [[ -n $pid ]]; then
    cpu=$(awk -v d=$((after - before)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN {printf "%.2f", d * 1e6 / hz / n}')
  else
    cpu="-"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$r" "$rps" "$p50" "$p99" "$reqs" "$cpu" "$errs" >>"$RAW"
  printf 'bench: round %d %-11s %10s req/s  p50 %6s us  p99 %6s us  cpu %6s us/req  errors %s\n' \
    "$r" "$t" "$rps" "$p50" "$p99" "$cpu" "$errs" >&2
}

# How busy the machine is without us: % of CPU time not idle over 2 s, before the run
# (our servers are idle then). Anything much above 0 makes the numbers noisy.
busy_pct() {
  local a b
  read -r -a a < <(head -1 /proc/stat); sleep 2; read -r -a b < <(head -1 /proc/stat)
  awk -v u1="${a[1]}" -v n1="${a[2]}" -v s1="${a[3]}" -v i1="${a[4]}" -v w1="${a[5]}" \
      -v q1="${a[6]}" -v sq1="${a[7]}" -v st1="${a[8]}" \
      -v u2="${b[1]}" -v n2="${b[2]}" -v s2="${b[3]}" -v i2="${b[4]}" -v w2="${b[5]}" \
      -v q2="${b[6]}" -v sq2="${b[7]}" -v st2="${b[8]}" 'BEGIN {
    t = (u2 + n2 + s2 + i2 + w2 + q2 + sq2 + st2) - (u1 + n1 + s1 + i1 + w1 + q1 + sq1 + st1)
    idle = (i2 + w2) - (i1 + w1)
    v = 0; if (t > 0) v = 100 * (t - idle) / t
    printf "%.0f\n", v }'
}
BUSY=$(busy_pct)
((BUSY <= 10)) || log "WARNING: the machine is ${BUSY}% busy before the run; numbers will be noisy"

MODEL=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
echo "# busbar bench — $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo
echo "- machine: $NCPU CPUs (nproc), $MODEL; kernel $(uname -r)"
echo "- versions: $(nginx -v 2>&1 | sed 's/^nginx version: //'), HAProxy $(haproxy -v | awk 'NR==1 {print $3}'), $(wrk -v 2>&1 | awk 'NR==1 {print $1, $2}'), $("$BUSBAR" --version 2>/dev/null || echo busbar)"
GIT_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n $(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]] && GIT_REV="$GIT_REV + uncommitted changes"
echo "- busbar: $BUSBAR (git $GIT_REV, binary built $(date -u -r "$BUSBAR" '+%Y-%m-%d %H:%M UTC'))"
echo "- load: wrk -t1 -c$CONNS -d${DURATION}s --latency, GET / → backend nginx \`return 200 \"ok\\n\"\`"
echo "- pinning: proxy under test on CPU $PROXY_CPU (taskset); backend nginx (1 worker) and wrk on CPU $LOAD_CPU"
echo "- proxies: nginx 1 worker, upstream keepalive 64; HAProxy nbthread 1, http-reuse always; busbar threads=1, round_robin, access log off / to a file (busbar+log)"
echo "- rounds: $ROUNDS, order rotated each round; median per target; warm-up ${WARMUP}s per target"
echo "- machine busy before the run (2 s sample, all CPUs): ${BUSY}%; loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

if ((WARMUP > 0)); then
  for t in "${TARGETS[@]}"; do run_wrk "$t" "$WARMUP" >/dev/null || die "warm-up against $t failed"; done
fi

n=${#TARGETS[@]}
for ((r = 1; r <= ROUNDS; r++)); do
  for ((i = 0; i < n; i++)); do
    measure "${TARGETS[$(((i + r - 1) % n))]}" "$r"
  done
done

# Medians per target, then the table. Ratios are to nginx's medians.
median() {  # column of RAW for target
  awk -F'\t' -v t="$1" -v c="$2" '$1 == t && $c != "-" {print $c}' "$RAW" | sort -g \
    | awk '{v[NR] = $1} END {if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}
declare -A M_RPS M_P50 M_P99 M_CPU M_ERR
for t in "${TARGETS[@]}"; do
  M_RPS[$t]=$(median "$t" 3); M_P50[$t]=$(median "$t" 4); M_P99[$t]=$(median "$t" 5)
  M_CPU[$t]=$(median "$t" 7)
  M_ERR[$t]=$(awk -F'\t' -v t="$t" '$1 == t {e += $8} END {print e + 0}' "$RAW")
done
ratio() {  # a b -> a/b with 2 decimals, "-" if either is missing
  awk -v a="$1" -v b="$2" 'BEGIN {if (a == "-" || b == "-" || a == "" || b == "" || b + 0 == 0) print "-"; else printf "%.2f", a / b}'
}
fmt_us() { awk -v v="$1" 'BEGIN {if (v == "-") print "-"; else if (v >= 1000) printf "%.2f ms", v / 1000; else printf "%.0f µs", v}'; }

echo "| proxy | req/s | p50 | p99 | CPU µs/req | req/s ratio to nginx | CPU ratio to nginx |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for t in "${TARGETS[@]}"; do
  ng_rps=${M_RPS[nginx]:--}; ng_cpu=${M_CPU[nginx]:--}
  printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$t" \
    "$(awk -v v="${M_RPS[$t]}" 'BEGIN {printf "%.0f", v}')" \
    "$(fmt_us "${M_P50[$t]}")" "$(fmt_us "${M_P99[$t]}")" \
    "$(awk -v v="${M_CPU[$t]}" 'BEGIN {if (v == "-") print "-"; else printf "%.1f", v}')" \
    "$(ratio "${M_RPS[$t]}" "$ng_rps")" "$(ratio "${M_CPU[$t]}" "$ng_cpu")"
done
echo
BUSY_END=$(busy_pct)
echo "- machine busy after the run (2 s sample): ${BUSY_END}%; loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)"
((BUSY <= 10 && BUSY_END <= 10)) || echo "- WARNING: something else was using the CPUs; rerun on a quiet machine"

total_errs=0
for t in "${TARGETS[@]}"; do
  if [[ ${M_ERR[$t]} != 0 ]]; then
    echo "- WARNING: $t had ${M_ERR[$t]} errors (non-2xx/3xx or socket errors) over $ROUNDS rounds"
    total_errs=$((total_errs + M_ERR[$t]))
  fi
done
if [[ -n ${PORT[busbar+log]+x} && " ${TARGETS[*]} " = *" busbar+log "* ]]; then
  lines=$(wc -l <"$DIR/busbar+log/access.log" 2>/dev/null || echo 0)
  echo "- busbar+log wrote $lines access-log lines"
fi
for name in busbar busbar+log; do
  if [[ -s $DIR/$name/stderr.log ]]; then
    echo "- $name stderr ($(wc -l <"$DIR/$name/stderr.log") lines), first lines:"
    head -5 "$DIR/$name/stderr.log" | sed 's/^/    /'
  fi
done
echo "- per-round numbers: on stderr (and in results.tsv in the temp dir with KEEP_TMP=1)"
