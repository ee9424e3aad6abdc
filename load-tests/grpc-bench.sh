#!/usr/bin/env bash
# load-tests/grpc-bench.sh — JSON→gRPC translation vs gRPC pass-through vs HTTP
# pass-through through one busbar, on loopback (issue 5: JSON→gRPC throughput should be
# at least 70% of plain gRPC pass-through for a small message).
#
# Needs: h2load (nghttp2-client), nginx, curl, taskset, python3, a release build of
# busbar and of the test gRPC backend (testkit's `grpc-backend`). `make bench-grpc`
# builds both and runs this. On a fresh Debian box:
#   apt-get install -y nghttp2-client nginx-light curl util-linux python3
#
# What it does: starts the tonic `bookstore.v1` backend (h2c), an nginx answering the
# same small JSON a Ping reply is, and one busbar (threads = 1, access log off) with three
# routes: gRPC pass-through to the tonic backend, JSON→gRPC (`POST /ping` → `Ping`), and
# HTTP pass-through to nginx. Each target gets the same one-field message ("hello"):
#
#   grpc-direct  h2load h2c → tonic, no proxy (ceiling of the load side)
#   grpc         h2load h2c → busbar → tonic          (gRPC frame, application/grpc)
#   grpc-c1      the same, on H1_CONNS connections with one call in flight on each: the
#                HTTP/1.1 targets' shape, for JSON over HTTP/1.1 against gRPC like for like
#   json-h2c     h2load h2c → busbar /ping → tonic    (JSON in, JSON out)
#   json-h1      h2load HTTP/1.1 → busbar /ping → tonic
#   http-h2c     h2load h2c → busbar → nginx          (JSON body passed through)
#   http-h1      h2load HTTP/1.1 → busbar → nginx
#   grpc-nginx   h2load h2c → nginx `grpc_pass` → tonic (1 worker, upstream keepalive)
#   grpc-haproxy h2load h2c → HAProxy (`bind … proto h2`, `server … proto h2`) → tonic
#   (nginx and HAProxy add the seven forwarding headers busbar adds to every call,
#   `nginx_forwarding grpc` and `haproxy_forwarding` in bench-lib/common.sh; FORWARDING=0:
#   none, as every run recorded before 2026-12-07 05:00 UTC)
#
# The last two run busbar's peers on busbar's CPU, configured as busbar is (one worker or
# thread, connections kept to the backend), for the gRPC pass-through goal of issue 21
# (≥ 1.0× nginx, target HAProxy). PEERS=0 leaves them out (no HAProxy installed, say).
#
# h2c targets run `h2load -t1 -c$H2_CONNS -m$H2_STREAMS`, HTTP/1.1 targets and grpc-c1
# `h2load [--h1] -t1 -c$H1_CONNS -m1`, for DURATION seconds, ROUNDS times in a rotating
# order; the table shows the median per target. CPU per request of busbar comes from
# /proc/<pid>/stat (utime+stime before and after each run). Every target is checked with
# curl first (gRPC: the reply frame byte for byte); h2load's failed/errored requests and
# non-2xx answers are counted and reported.
#
# Pinning (2-core box): busbar on CPU 0; backends and h2load on CPU 1.
#
# Environment:
#   DURATION=5 ROUNDS=3 WARMUP=1   seconds per run, rounds, warm-up seconds per target
#   H2_CONNS=16 H2_STREAMS=10      h2c connections and streams per connection
#   H1_CONNS=64                    HTTP/1.1 connections
#   BUSBAR=target/release/busbar  GRPC_BACKEND=target/release/grpc-backend
#   PROXY_CPU=0 LOAD_CPU=1         CPUs for busbar / for backends + h2load
#   ONLY="grpc json-h2c"           measure only these targets
#   JSON_ROUTE=0                   leave the JSON route out (with ONLY="grpc-direct grpc
#                                  http-h2c …"). HTTP/2 and HTTP/1.1 clients are served by
#                                  busbar's own engines with it or without it (only a
#                                  gRPC-Web route sends HTTP/2 clients to pingora's proxy)
#   KEEP_TMP=1                     keep the temp dir (configs, logs, raw output)
#   LAT=1                          after the table, issue 21's latency under load for gRPC
#                                  pass-through: testkit's h2pace sends unary calls as a
#                                  Poisson stream at LAT_LOAD% of busbar's `grpc` median of
#                                  this run (one h2load run first if `grpc` is not in ONLY)
#                                  to grpc-direct, grpc-nginx, grpc-haproxy and grpc, in
#                                  LAT_ROUNDS rotating rounds of LAT_DURATION seconds; the
#                                  table gives each p99's excess over grpc-direct's
#   LAT_LOAD=50 LAT_ROUNDS=7 LAT_DURATION=3   H2PACE=target/release/h2pace
#   CALLGRIND=1                    instead of timing: busbar runs under valgrind's callgrind
#                                  and each target reports instructions per request, which
#                                  other load on the machine does not change (one round of
#                                  CG_REQUESTS=2000 requests per target after the warm-up;
#                                  the dumps stay in the temp dir for callgrind_annotate)
#
# Every server binds 127.0.0.1 on ports picked at run time, keeps its files in one
# `mktemp -d` dir, and is stopped by pid when the script exits (also on error or Ctrl-C).
set -euo pipefail

DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-1}
CALLGRIND=${CALLGRIND:-0}
CG_REQUESTS=${CG_REQUESTS:-2000}
H2_CONNS=${H2_CONNS:-16}
H2_STREAMS=${H2_STREAMS:-10}
H1_CONNS=${H1_CONNS:-64}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUSBAR=${BUSBAR:-target/release/busbar}
GRPC_BACKEND=${GRPC_BACKEND:-target/release/grpc-backend}
H2PACE=${H2PACE:-target/release/h2pace}
LAT=${LAT:-0}
LAT_LOAD=${LAT_LOAD:-50}
LAT_ROUNDS=${LAT_ROUNDS:-7}
LAT_DURATION=${LAT_DURATION:-3}
[[ $BUSBAR = /* ]] || BUSBAR="$ROOT/$BUSBAR"
[[ $GRPC_BACKEND = /* ]] || GRPC_BACKEND="$ROOT/$GRPC_BACKEND"
[[ $H2PACE = /* ]] || H2PACE="$ROOT/$H2PACE"
PROTO="$ROOT/tests/protos/bookstore.proto"

BENCH_NAME="grpc-bench"   # prefix of messages and of the temp dir
# shellcheck source-path=SCRIPTDIR source=bench-lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib/common.sh"

PEERS=${PEERS:-1}
for tool in h2load nginx curl taskset python3 awk cmp; do
  command -v "$tool" >/dev/null 2>&1 \
    || die "$tool not found (apt-get install -y nghttp2-client nginx-light curl util-linux python3)"
done
[[ -x $BUSBAR ]] || die "$BUSBAR not found: run 'make bench-grpc' (or cargo build --release)"
[[ -x $GRPC_BACKEND ]] \
  || die "$GRPC_BACKEND not found: run 'make bench-grpc' (builds testkit's grpc-backend)"
if [[ $CALLGRIND = 1 ]]; then
  for tool in valgrind callgrind_control; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (apt-get install -y valgrind)"
  done
fi
if [[ $LAT = 1 ]]; then
  [[ -x $H2PACE ]] || die "$H2PACE not found: run 'cargo build --release -p busbar-testkit --bin h2pace --tests' (LAT=1)"
  [[ $CALLGRIND != 1 ]] || die "LAT=1 and CALLGRIND=1 do not go together"
  [[ $LAT_LOAD =~ ^[0-9]+$ && $LAT_LOAD -ge 1 && $LAT_LOAD -le 100 ]] || die "LAT_LOAD must be 1..100"
fi
for v in DURATION ROUNDS H2_CONNS H2_STREAMS H1_CONNS CG_REQUESTS LAT_ROUNDS LAT_DURATION; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -ge 1 ]] || die "$v must be a whole number >= 1"
done
[[ $WARMUP =~ ^[0-9]+$ ]] || die "WARMUP must be a whole number of seconds"
[[ ${FORWARDING:=1} =~ ^[01]$ ]] || die "FORWARDING must be 0 or 1"
NCPU=$(nproc)
(( PROXY_CPU < NCPU && LOAD_CPU < NCPU )) || die "PROXY_CPU/LOAD_CPU must be < nproc ($NCPU)"
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------------
# Temp dir (cleaned up on exit) and ports.
make_temp_dir
read -r P_GRPC P_NGINX P_BUSBAR P_ADMIN P_REG P_NGINX_GRPC P_HAPROXY <<<"$(free_ports 7)"

# `wait_for` (bench-lib/common.sh) waits 15 s, 120 s under valgrind.
WAIT_S=15
[[ $CALLGRIND = 1 ]] && WAIT_S=120
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------------------------
# The message: PingRequest { text: "hello" } as a gRPC frame and as JSON; the replies.
printf '\x00\x00\x00\x00\x07\x0a\x05hello' >ping.grpc                  # flag, len 7, field 1
printf '\x00\x00\x00\x00\x09\x0a\x05hello\x10\x01' >reply.grpc          # + served_by = 1
printf '{"text":"hello"}' >ping.json
REPLY_JSON='{"text":"hello","servedBy":"1"}'

# --- the tonic backend (one worker thread) and nginx, on the load CPU.
mkdir -p grpc-backend
taskset -c "$LOAD_CPU" "$GRPC_BACKEND" "127.0.0.1:$P_GRPC" 1 \
  >grpc-backend/stdout.log 2>grpc-backend/stderr.log &
GRPC_PID=$!
PIDS+=("$GRPC_PID")

NGINX_USER=""
[[ $(id -u) = 0 ]] && NGINX_USER="user root;"   # workers must enter the 0700 temp dir
NGINX_V=$(nginx -V 2>&1)
mkdir -p nginx
{
  echo "$NGINX_USER"
  echo "worker_processes 1;"
  echo "error_log $DIR/nginx/error.log warn;"
  echo "events { worker_connections 4096; }"
  echo "http {"
  echo "  access_log off;"
  nginx_temp_paths "$DIR/nginx"
  echo "  keepalive_requests 1000000;"
  echo "  keepalive_timeout 75s;"
  echo "  server {"
  echo "    listen 127.0.0.1:$P_NGINX;"
  echo "    location / { default_type application/json; return 200 '$REPLY_JSON'; }"
  echo "  }"
  echo "}"
} >nginx/nginx.conf
nginx -t -q -p "$DIR/nginx" -c "$DIR/nginx/nginx.conf" -e "$DIR/nginx/error.log" \
  -g "daemon off; pid $DIR/nginx/nginx.pid;" || die "nginx config invalid: $DIR/nginx/nginx.conf"
taskset -c "$LOAD_CPU" nginx -p "$DIR/nginx" -c "$DIR/nginx/nginx.conf" -e "$DIR/nginx/error.log" \
  -g "daemon off; pid $DIR/nginx/nginx.pid;" >nginx/stdout.log 2>&1 &
NGINX_PID=$!
PIDS+=("$NGINX_PID")

# --- busbar's peers for gRPC pass-through, on the proxy CPU: nginx `grpc_pass` (one
# worker, upstream keepalive) and HAProxy (one thread, h2 on both sides).
NGINX_GRPC_PID=""; HAPROXY_PID=""
if [[ $PEERS = 1 && $CALLGRIND != 1 ]]; then
  command -v haproxy >/dev/null 2>&1 || die "haproxy not found (apt-get install -y haproxy; or PEERS=0)"
  mkdir -p nginx-grpc haproxy
  {
    echo "$NGINX_USER"
    echo "worker_processes 1;"
    echo "error_log $DIR/nginx-grpc/error.log warn;"
    echo "events { worker_connections 4096; }"
    echo "http {"
    echo "  access_log off;"
    nginx_temp_paths "$DIR/nginx-grpc"
    echo "  keepalive_requests 1000000;"
    echo "  keepalive_timeout 75s;"
    echo "  upstream tonic { server 127.0.0.1:$P_GRPC; keepalive 64; keepalive_requests 1000000; }"
    echo "  server {"
    echo "    listen 127.0.0.1:$P_NGINX_GRPC http2;"
    echo "    location / { grpc_pass grpc://tonic; $(nginx_forwarding grpc)}"
    echo "  }"
    echo "}"
  } >nginx-grpc/nginx.conf
  nginx -t -q -p "$DIR/nginx-grpc" -c "$DIR/nginx-grpc/nginx.conf" -e "$DIR/nginx-grpc/error.log" \
    -g "daemon off; pid $DIR/nginx-grpc/nginx.pid;" || die "nginx config invalid: $DIR/nginx-grpc/nginx.conf"
  taskset -c "$PROXY_CPU" nginx -p "$DIR/nginx-grpc" -c "$DIR/nginx-grpc/nginx.conf" \
    -e "$DIR/nginx-grpc/error.log" -g "daemon off; pid $DIR/nginx-grpc/nginx.pid;" \
    >nginx-grpc/stdout.log 2>&1 &
  NGINX_GRPC_PID=$!
  PIDS+=("$NGINX_GRPC_PID")
  printf '%s\n' "global" "    nbthread 1" "    maxconn 4096" "" "defaults" "    mode http" \
    "    option http-keep-alive" "    http-reuse always" "    timeout connect 5s" \
    "    timeout client 60s" "    timeout server 60s" "" "frontend fe" \
    "    bind 127.0.0.1:$P_HAPROXY proto h2" "$(haproxy_forwarding http)" "    default_backend tonic" "" "backend tonic" \
    "    server g1 127.0.0.1:$P_GRPC proto h2" >haproxy/haproxy.cfg
  haproxy -c -q -f haproxy/haproxy.cfg || die "haproxy config invalid: $DIR/haproxy/haproxy.cfg"
  taskset -c "$PROXY_CPU" haproxy -db -f haproxy/haproxy.cfg >haproxy/stdout.log 2>&1 &
  HAPROXY_PID=$!
  PIDS+=("$HAPROXY_PID")
fi

# --- busbar: one thread, access log off, three routes.
mkdir -p busbar
cat >busbar/busbar.toml <<EOF
[server]
threads = 1
grace_period = "2s"
runtime_dir = "$DIR/busbar"

[listen]
http = ["127.0.0.1:$P_BUSBAR"]
admin = "127.0.0.1:$P_ADMIN"

[log]
level = "warn"
access = "off"

[registry]
listen = "127.0.0.1:$P_REG"

[[service]]
name = "books"
protocol = "h2c"
endpoints = [{ addr = "127.0.0.1:$P_GRPC" }]

[[service]]
name = "web"
endpoints = [{ addr = "127.0.0.1:$P_NGINX" }]

# gRPC callers: passed through untouched.
[[route]]
name = "grpc"
path_prefix = "/bookstore.v1.Bookstore/"
service = "books"

# Plain HTTP: passed through to nginx.
[[route]]
name = "http"
path = "/http"
service = "web"
EOF
if [[ ${JSON_ROUTE:-1} != 0 ]]; then
  cat >>busbar/busbar.toml <<EOF

# JSON callers: POST /ping {"text": …} → bookstore.v1.Bookstore/Ping.
[[route]]
name = "json"
path = "/ping"
service = "books"
[route.translate]
from = "json"
protos = ["$PROTO"]
method = "bookstore.v1.Bookstore/Ping"
EOF
fi
"$BUSBAR" check busbar/busbar.toml >busbar/check.log 2>&1 \
  || { cat busbar/check.log >&2; die "busbar check failed for $DIR/busbar/busbar.toml"; }
VALGRIND=()
[[ $CALLGRIND = 1 ]] && VALGRIND=(valgrind --tool=callgrind --callgrind-out-file="$DIR/busbar/callgrind.out")
BUSBAR_ADMIN_TOKEN="bench-$RANDOM$RANDOM" taskset -c "$PROXY_CPU" "${VALGRIND[@]}" "$BUSBAR" \
  run -c busbar/busbar.toml >busbar/stdout.log 2>busbar/stderr.log &
BUSBAR_PID=$!
PIDS+=("$BUSBAR_PID")

wait_for grpc-backend "$GRPC_PID" port_open "$P_GRPC"
wait_for nginx "$NGINX_PID" curl -fsS --max-time 1 "http://127.0.0.1:$P_NGINX/"
wait_for busbar "$BUSBAR_PID" curl -fsS --max-time 1 "http://127.0.0.1:$P_ADMIN/healthz"
[[ -n $NGINX_GRPC_PID ]] && wait_for nginx-grpc "$NGINX_GRPC_PID" port_open "$P_NGINX_GRPC"
[[ -n $HAPROXY_PID ]] && wait_for haproxy "$HAPROXY_PID" port_open "$P_HAPROXY"

# ---------------------------------------------------------------------------------
# Targets: URL, client kind, body file, pid of the proxy ("" for direct).
GRPC_PATH=/bookstore.v1.Bookstore/Ping
TARGETS=(grpc-direct grpc grpc-c1 json-h2c json-h1 http-h2c http-h1)
declare -A URL=([grpc-direct]="http://127.0.0.1:$P_GRPC$GRPC_PATH"
                [grpc]="http://127.0.0.1:$P_BUSBAR$GRPC_PATH"
                [grpc-c1]="http://127.0.0.1:$P_BUSBAR$GRPC_PATH"
                [json-h2c]="http://127.0.0.1:$P_BUSBAR/ping"
                [json-h1]="http://127.0.0.1:$P_BUSBAR/ping"
                [http-h2c]="http://127.0.0.1:$P_BUSBAR/http"
                [http-h1]="http://127.0.0.1:$P_BUSBAR/http")
declare -A KIND=([grpc-direct]=grpc [grpc]=grpc [grpc-c1]=grpc1 [json-h2c]=h2c [json-h1]=h1
                 [http-h2c]=h2c [http-h1]=h1)
declare -A PID=([grpc-direct]="" [grpc]=$BUSBAR_PID [grpc-c1]=$BUSBAR_PID [json-h2c]=$BUSBAR_PID
                [json-h1]=$BUSBAR_PID [http-h2c]=$BUSBAR_PID [http-h1]=$BUSBAR_PID)
URL[grpc-nginx]="http://127.0.0.1:$P_NGINX_GRPC$GRPC_PATH"; KIND[grpc-nginx]=grpc; PID[grpc-nginx]=$NGINX_GRPC_PID
URL[grpc-haproxy]="http://127.0.0.1:$P_HAPROXY$GRPC_PATH"; KIND[grpc-haproxy]=grpc; PID[grpc-haproxy]=$HAPROXY_PID
[[ -n $NGINX_GRPC_PID ]] && TARGETS+=(grpc-nginx grpc-haproxy)
[[ $CALLGRIND = 1 ]] && TARGETS=(grpc grpc-c1 json-h2c json-h1 http-h2c http-h1)   # busbar's only
if [[ -n ${ONLY:-} ]]; then
  sel=()
  for t in $ONLY; do [[ -n ${URL[$t]+x} ]] || die "ONLY: unknown target $t"; sel+=("$t"); done
  if [[ " $ONLY " = *" grpc-nginx "* || " $ONLY " = *" grpc-haproxy "* ]] && [[ -z $NGINX_GRPC_PID ]]; then
    die "ONLY: grpc-nginx and grpc-haproxy need PEERS=1"
  fi
  TARGETS=("${sel[@]}")
fi

# Each target answers what it should before anything is measured.
check_target() {
  local t=$1 url=${URL[$1]} got
  case ${KIND[$t]} in
    grpc | grpc1)
      curl -fsS --max-time 5 --http2-prior-knowledge -H 'content-type: application/grpc' \
        -H 'te: trailers' --data-binary @ping.grpc -o "check-$t.bin" "$url" \
        || die "$t: the gRPC call failed"
      cmp -s "check-$t.bin" reply.grpc \
        || die "$t: reply frame is not PingReply{text:\"hello\", served_by:1}: $(od -An -tx1 "check-$t.bin")"
      ;;
    h2c | h1)
      local proto=--http1.1
      [[ ${KIND[$t]} = h2c ]] && proto=--http2-prior-knowledge
      got=$(curl -fsS --max-time 5 $proto -H 'content-type: application/json' \
        --data-binary @ping.json "$url") || die "$t: the JSON call failed"
      [[ $got = "$REPLY_JSON" ]] || die "$t: answered '$got', expected '$REPLY_JSON'"
      ;;
  esac
}
for t in "${TARGETS[@]}"; do check_target "$t"; done

# h2load's gRPC call: the Ping frame and the headers a gRPC request carries.
GRPC_CALL=(-d ping.grpc -H 'content-type: application/grpc' -H 'te: trailers')
run_h2load() {  # target seconds|-nREQUESTS -> h2load output
  local t=$1 secs=$2 args=() limit=(-D "$2")
  [[ $secs = -n* ]] && { limit=("$secs"); secs=300; }
  case ${KIND[$t]} in
    grpc) args=(-c"$H2_CONNS" -m"$H2_STREAMS" "${GRPC_CALL[@]}") ;;
    grpc1) args=(-c"$H1_CONNS" -m1 "${GRPC_CALL[@]}") ;;
    h2c) args=(-c"$H2_CONNS" -m"$H2_STREAMS" -d ping.json -H 'content-type: application/json') ;;
    h1) args=(--h1 -c"$H1_CONNS" -m1 -d ping.json -H 'content-type: application/json') ;;
  esac
  timeout $((secs + 30)) taskset -c "$LOAD_CPU" h2load -t1 "${limit[@]}" "${args[@]}" "${URL[$t]}"
}

RAW="$DIR/results.tsv"   # target round rps mean_us requests cpu_us_per_req errors proxy_busy load_busy sys_us_per_req
: >"$RAW"

measure() {  # target round
  local t=$1 r=$2 pid=${PID[$1]} before after out rps mean reqs cpu sys errs p0 p1 l0 l1 pbusy lbusy
  local s0 s1
  before=$(cpu_ticks "$pid"); s0=$(sys_ticks "$pid")
  p0=$(cpu_line_ticks "$PROXY_CPU"); l0=$(cpu_line_ticks "$LOAD_CPU")
  out=$(run_h2load "$t" "$DURATION") || die "h2load failed against $t: $out"
  after=$(cpu_ticks "$pid"); s1=$(sys_ticks "$pid")
  p1=$(cpu_line_ticks "$PROXY_CPU"); l1=$(cpu_line_ticks "$LOAD_CPU")
  pbusy=$(cpu_busy_pct "$p0" "$p1"); lbusy=$(cpu_busy_pct "$l0" "$l1")
  echo "$out" >"$DIR/h2load-$t-$r.txt"
  rps=$(awk '/^finished in/ {print $4}' <<<"$out")
  reqs=$(awk '/^requests:/ {print $8}' <<<"$out")
  mean=$(to_us "$(awk '/^time for request:/ {print $6}' <<<"$out")")
  [[ -n $rps && -n $reqs && $reqs -gt 0 ]] || die "could not parse h2load output for $t: $out"
  # Errors: failed + errored + timed-out requests, and answers that are not 2xx.
  errs=$(awk '/^requests:/ {e += $10 + $12 + $14}
              /^status codes:/ {e += $5 + $7 + $9}
              END {print e + 0}' <<<"$out")
  if [[ -n $pid ]]; then
    cpu=$(awk -v d=$((after - before)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN {printf "%.2f", d * 1e6 / hz / n}')
    sys=$(awk -v d=$((s1 - s0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN {printf "%.2f", d * 1e6 / hz / n}')
  else
    cpu="-"; sys="-"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$r" "$rps" "$mean" "$reqs" "$cpu" "$errs" \
    "$pbusy" "$lbusy" "$sys" >>"$RAW"
  printf 'grpc-bench: round %d %-12s %10s req/s  mean %6s us  proxy cpu %6s us/req (system %s)  errors %s  CPU %s%% busy %s%% (proxy, load)\n' \
    "$r" "$t" "$rps" "$mean" "$cpu" "$sys" "$errs" "$pbusy" "$lbusy" >&2
}

# ---------------------------------------------------------------------------------
# CALLGRIND=1: instructions per request, one round per target, then exit.
if [[ $CALLGRIND = 1 ]]; then
  GIT_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
  [[ -n $(git -C "$ROOT" status --porcelain -- src testkit Cargo.toml Cargo.lock 2>/dev/null) ]] \
    && GIT_REV="$GIT_REV + uncommitted changes"
  echo "# busbar gRPC bench, callgrind — $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo
  echo "- busbar: $BUSBAR (git $GIT_REV, binary built $(date -u -r "$BUSBAR" '+%Y-%m-%d %H:%M UTC')) under $(valgrind --version) --tool=callgrind, threads=1"
  echo "- per target: ${WARMUP}s warm-up, zero the counters, $CG_REQUESTS requests (h2c: -c$H2_CONNS -m$H2_STREAMS, HTTP/1.1 and grpc-c1: -c$H1_CONNS -m1), dump"
  echo
  echo "| target | requests | busbar instructions/req | ratio to grpc |"
  echo "|---|---:|---:|---:|"
  declare -A IR
  dumps() { local f=(busbar/callgrind.out.*); [[ -e ${f[0]} ]] && echo ${#f[@]} || echo 0; }
  for t in "${TARGETS[@]}"; do
    ((WARMUP > 0)) && { run_h2load "$t" "$WARMUP" >/dev/null || die "warm-up against $t failed"; }
    callgrind_control -z "$BUSBAR_PID" >/dev/null 2>&1 || die "callgrind_control -z failed"
    out=$(run_h2load "$t" "-n$CG_REQUESTS") || die "h2load failed against $t: $out"
    echo "$out" >"$DIR/h2load-$t-callgrind.txt"
    before=$(dumps)
    callgrind_control --dump="$t" "$BUSBAR_PID" >/dev/null 2>&1 || die "callgrind_control --dump failed"
    for ((i = 0; i < 100; i++)); do   # the dump is written asynchronously
      (($(dumps) > before)) && break
      sleep 0.2
    done
    dump=$(ls -t busbar/callgrind.out.* 2>/dev/null | head -1 || true)
    [[ -n $dump ]] || die "no callgrind dump in $DIR/busbar"
    ok=$(awk '/^requests:/ {print $8}' <<<"$out")
    [[ $ok = "$CG_REQUESTS" ]] || die "$t: $ok of $CG_REQUESTS requests succeeded: $out"
    total=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
    IR[$t]=$(awk -v a="$total" -v n="$CG_REQUESTS" 'BEGIN {printf "%.0f", a / n}')
    cp "$dump" "$DIR/callgrind-$t.out"
    log "$t: ${IR[$t]} instructions/request ($dump)"
    printf '| %s | %s | %s | %s |\n' "$t" "$CG_REQUESTS" "${IR[$t]}" "$(ratio "${IR[$t]}" "${IR[grpc]:--}")"
  done
  echo
  echo "- dumps: callgrind-<target>.out in $DIR (kept with KEEP_TMP=1); e.g. \`callgrind_annotate --inclusive=yes FILE | head -40\`"
  exit 0
fi

BUSY=$(busy_pct)
((BUSY <= 10)) || log "WARNING: the machine is ${BUSY}% busy before the run; numbers will be noisy"

MODEL=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
GIT_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n $(git -C "$ROOT" status --porcelain -- src testkit Cargo.toml Cargo.lock 2>/dev/null) ]] \
  && GIT_REV="$GIT_REV + uncommitted changes"
echo "# busbar gRPC bench — $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo
echo "- machine: $NCPU CPUs (nproc), $MODEL; kernel $(uname -r)"
echo "- versions: $(h2load --version | head -1), $(nginx -v 2>&1 | sed 's/^nginx version: //')"
echo "- busbar: $BUSBAR (git $GIT_REV, binary built $(date -u -r "$BUSBAR" '+%Y-%m-%d %H:%M UTC')); threads=1, access log off"
echo "- message: PingRequest{text:\"hello\"} (7 bytes; JSON \`{\"text\":\"hello\"}\`) → PingReply (9 bytes; JSON \`$REPLY_JSON\`)"
echo "- load: h2c targets \`h2load -t1 -c$H2_CONNS -m$H2_STREAMS -D ${DURATION}\`, HTTP/1.1 targets \`h2load --h1 -t1 -c$H1_CONNS -m1 -D ${DURATION}\` (grpc-c1: the same without \`--h1\`), POST"
[[ -n $NGINX_GRPC_PID ]] && echo "- peers (gRPC pass-through, on CPU $PROXY_CPU): nginx 1 worker \`listen … http2\` + \`grpc_pass\` to an upstream with keepalive 64; HAProxy $(haproxy -v | awk 'NR==1 {print $3}') nbthread 1, \`bind … proto h2\`, \`server … proto h2\`, http-reuse always"
echo "- pinning: busbar on CPU $PROXY_CPU; tonic backend (1 worker thread), nginx (1 worker) and h2load on CPU $LOAD_CPU"
[[ $PEERS = 1 ]] && forwarding_report "grpc-nginx and grpc-haproxy"
echo "- rounds: $ROUNDS, order rotated each round; median per target; warm-up ${WARMUP}s per target"
echo "- machine busy before the run (2 s sample, all CPUs): ${BUSY}%; loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

run_rounds run_h2load

median() {  # target column
  awk -F'\t' -v t="$1" -v c="$2" '$1 == t && $c != "-" {print $c}' "$RAW" | median_of
}
declare -A M_RPS M_MEAN M_CPU M_SYS M_ERR M_PBUSY M_LBUSY
for t in "${TARGETS[@]}"; do
  M_RPS[$t]=$(median "$t" 3); M_MEAN[$t]=$(median "$t" 4); M_CPU[$t]=$(median "$t" 6)
  M_SYS[$t]=$(median "$t" 10)
  M_PBUSY[$t]=$(median "$t" 8); M_LBUSY[$t]=$(median "$t" 9)
  M_ERR[$t]=$(awk -F'\t' -v t="$t" '$1 == t {e += $7} END {print e + 0}' "$RAW")
done

echo "| target | req/s | mean latency | proxy CPU µs/req | of which system | req/s ratio to grpc | CPU ratio to grpc | CPU $PROXY_CPU / CPU $LOAD_CPU busy |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for t in "${TARGETS[@]}"; do
  printf '| %s | %s | %s | %s | %s | %s | %s | %s%% / %s%% |\n' "$t" \
    "$(awk -v v="${M_RPS[$t]}" 'BEGIN {printf "%.0f", v}')" \
    "$(fmt_us "${M_MEAN[$t]}")" \
    "$(awk -v v="${M_CPU[$t]}" 'BEGIN {if (v == "-") print "-"; else printf "%.1f", v}')" \
    "$(awk -v v="${M_SYS[$t]:--}" 'BEGIN {if (v == "-" || v == "") print "-"; else printf "%.1f", v}')" \
    "$(ratio "${M_RPS[$t]}" "${M_RPS[grpc]:--}")" "$(ratio "${M_CPU[$t]}" "${M_CPU[grpc]:--}")" \
    "${M_PBUSY[$t]}" "${M_LBUSY[$t]}"
done
echo
echo "- CPU busy: how busy the proxy's CPU and the load CPU (backends + h2load) were during each run (median); a target whose load CPU is ~100% and proxy CPU is not was bounded by the load side, and its req/s says more about the client and backend than about the proxy: its CPU per request is then the proxy's figure"
if [[ -n ${M_RPS[grpc]:-} && -n ${M_RPS[json-h2c]:-} ]]; then
  echo "- JSON→gRPC (json-h2c) / gRPC pass-through (grpc), same client and concurrency: $(ratio "${M_RPS[json-h2c]}" "${M_RPS[grpc]}") of the req/s (goal ≥ 0.70; issue 21: ≥ 0.9)"
fi
if [[ -n ${M_RPS[json-h1]:-} ]]; then
  against=()
  [[ -n ${M_RPS[grpc-c1]:-} ]] && against+=("$(ratio "${M_RPS[json-h1]}" "${M_RPS[grpc-c1]}")× grpc-c1 (the same $H1_CONNS connections, one call in flight on each)")
  [[ -n ${M_RPS[grpc]:-} ]] && against+=("$(ratio "${M_RPS[json-h1]}" "${M_RPS[grpc]}")× grpc ($H2_CONNS connections × $H2_STREAMS streams: HTTP/2 carries ~$H2_STREAMS calls a read and a write, HTTP/1.1 one)")
  line=""
  for a in "${against[@]}"; do line+="${line:+, }$a"; done
  [[ -n $line ]] && echo "- JSON→gRPC over HTTP/1.1 (json-h1, issue 21: ≥ 0.9× gRPC pass-through): $line"
fi
if [[ -n ${M_RPS[grpc]:-} && -n ${M_RPS[grpc-nginx]:-} ]]; then
  echo "- gRPC pass-through (issue 21: ≥ 1.0× nginx, target HAProxy): busbar $(ratio "${M_RPS[grpc]}" "${M_RPS[grpc-nginx]}")× nginx grpc_pass, $(ratio "${M_RPS[grpc]}" "${M_RPS[grpc-haproxy]:--}")× HAProxy req/s; CPU per call $(ratio "${M_CPU[grpc]}" "${M_CPU[grpc-nginx]}")× nginx's, $(ratio "${M_CPU[grpc]}" "${M_CPU[grpc-haproxy]:--}")× HAProxy's"
fi
# --- LAT=1: gRPC pass-through latency at LAT_LOAD% of busbar's max (issue 21).
run_latency() {
  local max src rate targets=() t r i n out p p50 p99 p999 pmax reqs achieved errs
  local lraw="$DIR/latency.tsv"   # target round achieved p50 p99 p999 max requests errors send_p99
  local late
  : >"$lraw"
  if [[ -n ${M_RPS[grpc]:-} && ${M_RPS[grpc]} != - ]]; then
    max=${M_RPS[grpc]}; src="busbar's \`grpc\` median above"
  else
    out=$(run_h2load grpc "$DURATION") || die "h2load failed measuring busbar's max gRPC rate: $out"
    max=$(awk '/^finished in/ {print $4}' <<<"$out")
    src="one ${DURATION}s h2load -c$H2_CONNS -m$H2_STREAMS run against busbar just before"
  fi
  rate=$(awk -v m="$max" -v p="$LAT_LOAD" 'BEGIN {printf "%.0f", m * p / 100}')
  ((rate >= 1)) || die "busbar's max gRPC rate ($max) is too low to pace"
  targets=(grpc-direct)
  [[ -n $NGINX_GRPC_PID ]] && targets+=(grpc-nginx grpc-haproxy)
  targets+=(grpc)
  n=${#targets[@]}
  echo "## gRPC pass-through latency under load: ${LAT_LOAD}% of busbar's max rate"
  echo
  echo "- busbar max: $(printf '%.0f' "$max") calls/s ($src); paced rate: $rate calls/s"
  echo "- load: h2pace (testkit) --grpc --conns $H2_CONNS --duration $LAT_DURATION, the same PingRequest frame as above, \`te: trailers\`; a call counts only with status 200 and grpc-status 0: a Poisson stream at $rate calls/s over $H2_CONNS h2c connections (each its own Poisson stream; every call its own stream), latency from the *scheduled* send time to the trailers (no coordinated omission), nearest-rank percentiles in µs"
  echo "- rounds: $LAT_ROUNDS × ${LAT_DURATION}s per target, order rotated each round; median per target"
  echo
  for ((r = 1; r <= LAT_ROUNDS; r++)); do
    for ((i = 0; i < n; i++)); do
      t=${targets[$(((i + r - 1) % n))]}
      out=$(timeout $((LAT_DURATION + 30)) taskset -c "$LOAD_CPU" "$H2PACE" --url "${URL[$t]}" --grpc \
        --rate "$rate" --conns "$H2_CONNS" --duration "$LAT_DURATION" 2>&1) \
        || die "h2pace failed against $t: $out"
      echo "$out" >"$DIR/h2pace-$t-$r.txt"
      p=$(awk '/^H2PACE / {for (i = 2; i <= NF; i++) {split($i, kv, "="); v[kv[1]] = kv[2]}
               print v["p50"], v["p99"], v["p99.9"], v["max"], v["requests"], v["achieved"], v["errors"], v["send_p99"]}' <<<"$out")
      [[ -n $p ]] || die "could not parse h2pace output for $t: $out"
      read -r p50 p99 p999 pmax reqs achieved errs late <<<"$p"
      [[ $reqs -gt 0 ]] || die "h2pace: no call answered by $t: $out"
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$r" "$achieved" "$p50" "$p99" "$p999" "$pmax" "$reqs" "$errs" "$late" >>"$lraw"
      printf 'grpc-bench: (lat) round %d %-12s %8s calls/s  p50 %6s us  p99 %6s us  p99.9 %6s us  max %6s us  errors %s  send p99 %s us\n' \
        "$r" "$t" "$achieved" "$p50" "$p99" "$p999" "$pmax" "$errs" "$late" >&2
    done
  done
  lmed() { awk -F'\t' -v t="$1" -v c="$2" '$1 == t {print $c}' "$lraw" | median_of; }
  added() { fmt_us "$(awk -v a="$(lmed "$1" 5)" -v b="$(lmed grpc-direct 5)" 'BEGIN {print a - b}')"; }
  echo "| target | asked calls/s | achieved calls/s | p50 | p99 | p99.9 | max | p99 added over grpc-direct |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  local extra
  for t in "${targets[@]}"; do
    if [[ $t = grpc-direct ]]; then extra=-; else extra=$(added "$t"); fi
    printf '| %s | %s | %.0f | %s | %s | %s | %s | %s |\n' "$t" "$rate" "$(lmed "$t" 3)" \
      "$(fmt_us "$(lmed "$t" 4)")" "$(fmt_us "$(lmed "$t" 5)")" "$(fmt_us "$(lmed "$t" 6)")" \
      "$(fmt_us "$(lmed "$t" 7)")" "$extra"
  done
  echo
  echo "- added p99 = the target's p99 − grpc-direct's (h2pace → tonic, no proxy), medians of $LAT_ROUNDS rounds' p99s"
  echo "- the generator's own lateness (h2pace's send_p99, already inside the figures; median of the rounds): $(for t in "${targets[@]}"; do printf '%s %s; ' "$t" "$(fmt_us "$(lmed "$t" 10)")"; done | sed 's/; $//') — far above ~100 µs means the load CPU was short"
  echo "- issue 21 (report the added p99 at ${LAT_LOAD}% load): busbar (grpc) $(added grpc)$([[ -n $NGINX_GRPC_PID ]] && echo ", nginx grpc_pass $(added grpc-nginx), HAProxy $(added grpc-haproxy)")"
  awk -F'\t' '$9 > 0 {e[$1] += $9} END {for (t in e) printf "- WARNING: %s had %d failed calls\n", t, e[t]}' "$lraw"
  echo
}
if [[ $LAT = 1 ]]; then
  echo
  run_latency
fi

BUSY_END=$(busy_pct)
echo "- machine busy after the run (2 s sample): ${BUSY_END}%; loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)"
((BUSY <= 10 && BUSY_END <= 10)) || echo "- WARNING: something else was using the CPUs; rerun on a quiet machine"
for t in "${TARGETS[@]}"; do
  [[ ${M_ERR[$t]} = 0 ]] || echo "- WARNING: $t had ${M_ERR[$t]} errors (failed, errored, timed out or non-2xx) over $ROUNDS rounds"
done
if [[ -s busbar/stderr.log ]]; then
  echo "- busbar stderr ($(wc -l <busbar/stderr.log) lines), first lines:"
  head -5 busbar/stderr.log | sed 's/^/    /'
fi
echo "- per-round numbers: on stderr (and in results.tsv in the temp dir with KEEP_TMP=1)"
