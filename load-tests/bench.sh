#!/usr/bin/env bash
# load-tests/bench.sh — busbar vs nginx vs HAProxy vs direct, side by side, on loopback.
#
# Needs: nginx, haproxy, wrk, curl, taskset, python3, h2load (scenario d), openssl (the
# TLS scenarios), and a release build of busbar (`cargo build --release`, or `make bench`
# which does both). On a fresh Debian box:
#   apt-get install -y nginx-light haproxy wrk nghttp2-client curl util-linux python3 openssl
#
# Scenarios (SCENARIOS="a b c d f lat mem", the default, runs these, in that order):
#   a    plain HTTP/1.1 proxy: direct, nginx, HAProxy, bare pingora (if built), busbar,
#        busbar with a file access log
#   b    the same route with everything on: identity (trusted x-user-id header), per-user
#        rate limit, per-user fair queue (service max_in_flight), metrics, access log
#   c    the scenario-(b) route with 10,000 distinct users (wrk Lua script)
#   d    h2c downstream, many streams: h2load -c16 -m10 (nginx http2, HAProxy proto h2,
#        busbar's h2c on its HTTP port)
#   f    1,000 routes and 1,000 instances in the tables; the request hits route 999
#   lat  latency under load: paced load at 50% of busbar's max rate (from the shape's own
#        scenario in the same run), against direct, nginx and busbar; busbar's added p99
#        over direct. LAT_SHAPES picks the shapes: get (a), post1k, tls, and issue 21's
#        h2c (d) and h2tls (h2tls), paced by testkit's h2pace with HAProxy measured too
#        (gRPC's paced shape is grpc-bench.sh's LAT=1)
#   mem  busbar's RSS idle, with 10,000 idle keep-alive connections open, and 2 s and
#        10 s after they closed
# Issue 20's shapes (not in the default list: with them a run takes ~20 minutes; `make
# bench-engine` runs just these, with LAT_SHAPES="post1k tls", in ~12 minutes):
#   post1k   POST with a 1 KiB body (Content-Length): direct, nginx, HAProxy, busbar
#   post64k  POST with a 64 KiB chunked body (POST_CHUNK-byte chunks): the same targets
#   tls      GET over TLS, keep-alive (wrk https://): direct (the backend's TLS
#            listener), nginx, HAProxy, busbar
#   tlsnew   GET over TLS with `Connection: close`: a new TLS connection per request
#   upstls   HTTPS upstream: plaintext client, TLS backend with keep-alive (nginx
#            proxy_pass https:// + upstream keepalive, HAProxy `server … ssl verify
#            required`, busbar `protocol = "https"` from bench-lib/busbar-upstls.toml;
#            busbar is skipped with a note if `busbar check` refuses that config)
#   tlsmem   the mem scenario over TLS: busbar, nginx and HAProxy, each started fresh,
#            RSS idle, with MEM_CONNS idle TLS keep-alive connections, 2 s and 10 s after
#            they closed (goal: back within 20% of idle 10 s after the spike)
# Issue 21's shapes (not in the default list either):
#   h2tls    d over TLS: h2load -c16 -m10 https:// with ALPN h2 → direct (the backend's
#            TLS listener, http2), nginx (`listen … ssl http2`), HAProxy (`bind … ssl crt …
#            alpn h2,http/1.1`), busbar's TLS listener; upstream plaintext HTTP/1.1
#   h2mem    the mem scenario over h2c: busbar, nginx and HAProxy (TLSMEM_TARGETS), each
#            fresh, MEM_CONNS idle HTTP/2 connections (idle-conns.py --h2; goal: 10,000
#            under 100 MiB)
# gRPC pass-through against nginx grpc_pass and HAProxy is load-tests/grpc-bench.sh.
# POST bodies go to the backend's /post, which reads the whole body before it answers
# (checked at startup: nginx's `return` alone answers before the body has arrived).
# TLS everywhere uses one ECDSA P-256 certificate for CN/SAN localhost and 127.0.0.1,
# signed by a CA made for the run (openssl, in the temp dir): the proxies serve it, and
# verify the backend's copy against the CA in upstls.
# Scenario (e), JSON→gRPC vs gRPC pass-through, is load-tests/grpc-bench.sh.
#
# Each table scenario runs `wrk -t1 -c${CONNS}` (h2load for d) for DURATION seconds per
# target, ROUNDS times in a rotating order after a warm-up, and prints the median per
# target as a markdown table with ratios to nginx in the same scenario. CPU per request of
# the proxy comes from /proc/<pid>/stat (utime+stime of the proxy's processes, before and
# after each run).
#
# Pinning (2-core box): proxy under test on CPU 0; backend nginx and the load generator
# on CPU 1.
#
# Environment:
#   SCENARIOS="a b c d f lat mem"  which scenarios to run (in this order; all known:
#                   a b c d h2tls f post1k post64k tls tlsnew upstls lat mem tlsmem h2mem). lat takes
#                   busbar's max rate from the shape's scenario when it ran earlier
#   DURATION=5      seconds per run
#   ROUNDS=3        rounds (order rotates each round); the median is reported
#   CONNS=64        wrk connections (-c); wrk always runs one thread (-t1)
#   WARMUP=1        seconds of load against each target before the measured rounds (0: none)
#   USERS=10000     distinct users in scenario c
#   H2_CONNS=16 H2_STREAMS=10      h2load connections and streams per connection (d)
#   ROUTES=1000     routes (and services, one instance each) in scenario f
#   LAT_LOAD=50     scenario lat: percent of busbar's max rate
#   LAT_ROUNDS=7 LAT_DURATION=3    scenario lat: its own rounds and seconds per run (a p99
#                   is one slow moment of the machine away from doubling: more, shorter
#                   alternating rounds make its median steadier)
#   LAT_SHAPES=get  scenario lat: the shapes to pace, each its own table: get (GET /, the
#                   (a) proxies), post1k (POST 1 KiB), tls (GET over TLS, keep-alive), h2c
#                   (GET / over h2c, the (d) proxies), h2tls (GET / over TLS with ALPN h2)
#   H2PACE=target/release/h2pace   lat's h2c and h2tls shapes: the paced HTTP/2 client
#                   (`cargo build --release -p busbar-testkit --bin h2pace --tests`)
#   MEM_CONNS=10000 scenarios mem and tlsmem: idle keep-alive connections
#   TLSMEM_TARGETS="busbar nginx haproxy"   scenario tlsmem: which servers (each fresh)
#   POST_CHUNK=4096 scenario post64k: bytes per chunk of the 64 KiB chunked body
#   BUSBAR_UPSTLS=load-tests/bench-lib/busbar-upstls.toml   scenario upstls: busbar's
#                   services and routes (@BACKEND@ and @CA_FILE@ are filled in)
#   BUSBAR=target/release/busbar   the binary (relative to the repo root)
#   TRACING="0.01 1"  scenario a: one more busbar per sample ratio (`busbar+trace0.01`, …)
#                   exporting its spans over OTLP/HTTP to a local sink (bench-lib/otlp-sink.py,
#                   on the load CPU); empty (the default): none
#   BUSBAR_BASE=path                a second busbar binary (an earlier build) measured in
#                   the same run as `busbar@base` (a, d, post1k, post64k, tls, tlsnew,
#                   upstls, every lat shape) and `busbar+all@base` (b, c), so a
#                   change is compared with what it replaces, rounds interleaved
#   BARE=target/release/examples/bare-pingora   (skipped with a note when missing)
#   LEAN=target/release/examples/lean-proxy     (skipped when missing)
#   PROXY_CPU=0 LOAD_CPU=1         CPUs for the proxies / for backend + load generator
#   FORWARDING=1    nginx and HAProxy add the seven forwarding headers busbar adds by
#                   default (bench-lib/common.sh), checked at startup; 0: they add none
#   ONLY="nginx busbar"            measure only these targets (names as in the tables;
#                   the table scenarios, not lat, mem, tlsmem)
#   KEEP_TMP=1      keep the temp dir (configs, logs) after the run
#   ALLOW_LONG=1    allow a run estimated over 10 minutes
#
# Every server binds 127.0.0.1 on ports picked at run time, keeps its files in one
# `mktemp -d` dir, and is stopped by pid when the script exits (also on error or Ctrl-C).
set -euo pipefail

SCENARIOS=${SCENARIOS:-"a b c d f lat mem"}
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
WARMUP=${WARMUP:-1}
USERS=${USERS:-10000}
H2_CONNS=${H2_CONNS:-16}
H2_STREAMS=${H2_STREAMS:-10}
ROUTES=${ROUTES:-1000}
LAT_LOAD=${LAT_LOAD:-50}
LAT_ROUNDS=${LAT_ROUNDS:-7}
LAT_DURATION=${LAT_DURATION:-3}
MEM_CONNS=${MEM_CONNS:-10000}
LAT_SHAPES=${LAT_SHAPES:-get}
TLSMEM_TARGETS=${TLSMEM_TARGETS:-"busbar nginx haproxy"}
POST_CHUNK=${POST_CHUNK:-4096}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LIB="$ROOT/load-tests/bench-lib"
BUSBAR=${BUSBAR:-target/release/busbar}
[[ $BUSBAR = /* ]] || BUSBAR="$ROOT/$BUSBAR"
BUSBAR_BASE=${BUSBAR_BASE:-}
[[ -z $BUSBAR_BASE || $BUSBAR_BASE = /* ]] || BUSBAR_BASE="$ROOT/$BUSBAR_BASE"
BARE=${BARE:-target/release/examples/bare-pingora}
LEAN=${LEAN:-target/release/examples/lean-proxy}
[[ $BARE = /* ]] || BARE="$ROOT/$BARE"
[[ $LEAN = /* ]] || LEAN="$ROOT/$LEAN"
BUSBAR_UPSTLS=${BUSBAR_UPSTLS:-load-tests/bench-lib/busbar-upstls.toml}
[[ $BUSBAR_UPSTLS = /* ]] || BUSBAR_UPSTLS="$ROOT/$BUSBAR_UPSTLS"
H2PACE=${H2PACE:-target/release/h2pace}
[[ $H2PACE = /* ]] || H2PACE="$ROOT/$H2PACE"

BENCH_NAME="bench"   # prefix of messages and of the temp dir
# shellcheck source-path=SCRIPTDIR source=bench-lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib/common.sh"

ALL_SCENARIOS="a b c d h2tls f post1k post64k tls tlsnew upstls lat mem tlsmem h2mem"
for s in $SCENARIOS; do
  [[ " $ALL_SCENARIOS " = *" $s "* ]] || die "SCENARIOS: unknown scenario '$s' (known: $ALL_SCENARIOS)"
done
has() { [[ " $SCENARIOS " = *" $1 "* ]]; }
for s in $LAT_SHAPES; do
  [[ $s = grpc ]] && die "LAT_SHAPES: gRPC's paced shape is load-tests/grpc-bench.sh's (LAT=1)"
  [[ " get post1k tls h2c h2tls " = *" $s "* ]] || die "LAT_SHAPES: unknown shape '$s' (known: get post1k tls h2c h2tls)"
done
for s in $TLSMEM_TARGETS; do
  [[ " busbar nginx haproxy " = *" $s "* ]] || die "TLSMEM_TARGETS: unknown target '$s' (known: busbar nginx haproxy)"
done
lat_has() { has lat && [[ " $LAT_SHAPES " = *" $1 "* ]]; }

for tool in nginx haproxy wrk curl taskset python3 awk; do
  command -v "$tool" >/dev/null 2>&1 \
    || die "$tool not found (apt-get install -y nginx-light haproxy wrk curl util-linux python3)"
done
if has tls || has tlsnew || has upstls || has tlsmem || has h2tls || has h2mem || lat_has tls || lat_has h2tls; then
  NEED_TLS=1
  command -v openssl >/dev/null 2>&1 || die "openssl not found (apt-get install -y openssl)"
else
  NEED_TLS=0
fi
if has upstls; then
  [[ -r $BUSBAR_UPSTLS ]] || die "BUSBAR_UPSTLS: $BUSBAR_UPSTLS is not readable"
fi
if has d || has h2tls || lat_has h2c || lat_has h2tls; then
  command -v h2load >/dev/null 2>&1 || die "h2load not found (apt-get install -y nghttp2-client)"
fi
if lat_has h2c || lat_has h2tls; then
  [[ -x $H2PACE ]] || die "$H2PACE not found: run 'cargo build --release -p busbar-testkit --bin h2pace --tests' (lat's h2c and h2tls shapes)"
fi
[[ -x $BUSBAR ]] || die "$BUSBAR not found: run 'cargo build --release' first (or 'make bench')"
[[ -z $BUSBAR_BASE || -x $BUSBAR_BASE ]] || die "BUSBAR_BASE: $BUSBAR_BASE is not an executable"
for v in DURATION ROUNDS CONNS USERS H2_CONNS H2_STREAMS MEM_CONNS POST_CHUNK; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -ge 1 ]] || die "$v must be a whole number >= 1"
done
[[ $WARMUP =~ ^[0-9]+$ ]] || die "WARMUP must be a whole number of seconds"
[[ ${FORWARDING:=1} =~ ^[01]$ ]] || die "FORWARDING must be 0 or 1"
[[ $ROUTES =~ ^[0-9]+$ && $ROUTES -ge 2 && $ROUTES -le 9999 ]] || die "ROUTES must be 2..9999"
[[ $LAT_LOAD =~ ^[0-9]+$ && $LAT_LOAD -ge 1 && $LAT_LOAD -le 100 ]] || die "LAT_LOAD must be 1..100"
NCPU=$(nproc)
(( PROXY_CPU < NCPU && LOAD_CPU < NCPU )) || die "PROXY_CPU/LOAD_CPU must be < nproc ($NCPU)"
CLK_TCK=$(getconf CLK_TCK)
HAVE_BARE=0
[[ -x $BARE ]] && HAVE_BARE=1
HAVE_LEAN=0
[[ -x $LEAN ]] && HAVE_LEAN=1

# Bounded: estimate the run before starting anything.
estimate() {
  local per=$((ROUNDS * DURATION + WARMUP)) t=20   # 20 s: startup, busy samples
  has a && t=$((t + (5 + HAVE_BARE + HAVE_LEAN) * per))
  has b && t=$((t + 3 * per))
  has c && t=$((t + 2 * per))
  has d && t=$((t + 4 * per))
  has h2tls && t=$((t + 4 * per))
  has f && t=$((t + 3 * per))
  local nb=0 shape
  [[ -n $BUSBAR_BASE ]] && nb=1
  has post1k && t=$((t + (4 + nb) * per))
  has post64k && t=$((t + (4 + nb) * per))
  has tls && t=$((t + (4 + nb) * per))
  has tlsnew && t=$((t + (4 + nb) * per))
  has upstls && t=$((t + (3 + nb) * per))
  if has lat; then
    for shape in $LAT_SHAPES; do
      case $shape in
        get) t=$((t + (3 + nb + HAVE_BARE) * LAT_ROUNDS * LAT_DURATION)); has a || t=$((t + DURATION)) ;;
        h2c) t=$((t + (4 + nb) * LAT_ROUNDS * LAT_DURATION)); has d || t=$((t + DURATION)) ;;
        h2tls) t=$((t + (4 + nb) * LAT_ROUNDS * LAT_DURATION)); has h2tls || t=$((t + DURATION)) ;;
        *) t=$((t + (3 + nb) * LAT_ROUNDS * LAT_DURATION)); has "$shape" || t=$((t + DURATION)) ;;
      esac
    done
  fi
  has mem && t=$((t + 33 * (1 + HAVE_BARE)))
  has tlsmem && t=$((t + 90 * $(wc -w <<<"$TLSMEM_TARGETS")))   # handshakes: ~60 s for 10,000
  has h2mem && t=$((t + 40 * $(wc -w <<<"$TLSMEM_TARGETS")))
  echo "$t"
}
EST=$(estimate)
((EST <= 600 || ${ALLOW_LONG:-0} == 1)) \
  || die "this run would take about $EST s (> 10 min); lower DURATION/ROUNDS or pick SCENARIOS (ALLOW_LONG=1 to run anyway)"

# ---------------------------------------------------------------------------------
# Temp dir (cleaned up on exit), process bookkeeping.
make_temp_dir       # PIDS: every process we start (nginx masters, haproxy, busbar, helpers)
declare -A SERVER   # pid -> name, for the servers that must stay up for the whole run

# Free loopback ports, all picked at once, handed out one by one by take_port.
read -r -a PORT_POOL <<<"$(free_ports 80)"
NEXT_PORT=0
take_port() {  # VAR...: assigns a fresh port to each variable
  local v
  for v in "$@"; do
    ((NEXT_PORT < ${#PORT_POOL[@]})) || die "port pool exhausted"
    printf -v "$v" '%s' "${PORT_POOL[$NEXT_PORT]}"
    NEXT_PORT=$((NEXT_PORT + 1))
  done
}

# Wait until URL answers 200 with "ok"; fail after 15 s or if PID died.
wait_ready() {  # name pid url [curl args...]
  local name=$1 pid=$2 url=$3 i body
  shift 3
  for ((i = 0; i < 150; i++)); do
    kill -0 "$pid" 2>/dev/null || die "$name (pid $pid) exited during startup; see $DIR/$name/"
    if body=$(curl -fsS --max-time 1 "$@" "$url" 2>/dev/null) && [[ $body = ok ]]; then
      return 0
    fi
    sleep 0.1
  done
  die "$name did not answer ok on $url${*:+ (curl $*)} within 15 s; see $DIR/$name/"
}

# ---------------------------------------------------------------------------------
# nginx. Temp paths (`nginx_temp_paths`, bench-lib/common.sh) all inside $DIR.
NGINX_V=$(nginx -V 2>&1)
# As root, nginx workers would switch to nobody/www-data, who can't enter the 0700
# mktemp dir; keep them as root (only on loopback, only for this run).
NGINX_USER=""
[[ $(id -u) = 0 ]] && NGINX_USER="user root;"

LAST_PID=""
start_nginx() {  # name cpu http-block-content [worker_connections]; sets LAST_PID
  local name=$1 cpu=$2 http=$3 wc=${4:-4096} d="$DIR/$1"
  mkdir -p "$d"
  cat >"$d/nginx.conf" <<EOF
$NGINX_USER
worker_processes 1;
worker_rlimit_nofile $((wc + 100));
error_log $d/error.log warn;
events { worker_connections $wc; }
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
  SERVER[$LAST_PID]=$name
}

start_haproxy() {  # name body [maxconn]; sets LAST_PID. One thread, foreground (-db: no master).
  local name=$1 body=$2 maxconn=${3:-4096} d="$DIR/$1"
  mkdir -p "$d"
  cat >"$d/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn $maxconn
    pidfile $d/haproxy.pid

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s

$body
EOF
  haproxy -c -q -f "$d/haproxy.cfg" || die "haproxy config invalid: $d/haproxy.cfg"
  taskset -c "$PROXY_CPU" haproxy -db -f "$d/haproxy.cfg" >"$d/stdout.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  SERVER[$LAST_PID]=$name
}

# busbar: busbar_config writes $DIR/<name>/busbar.toml, the common top (one thread,
# listeners on fresh ports, log) followed by the services and routes read from stdin;
# start_busbar validates it with `busbar check` and starts it.
declare -A ADMIN_PORT
busbar_config() {  # name port access-log [tls-port] < services-and-routes
  local name=$1 port=$2 access=$3 tls=${4:-} admin reg tls_line=""
  take_port admin reg
  [[ -n $tls ]] && tls_line="tls = [{ addr = \"127.0.0.1:$tls\", cert = \"$CERT\", key = \"$KEY\" }]"
  mkdir -p "$DIR/$name"
  {
    cat <<EOF
[server]
threads = 1
grace_period = "2s"
runtime_dir = "$DIR/$name"

[listen]
http = ["127.0.0.1:$port"]
$tls_line
admin = "127.0.0.1:$admin"

[log]
level = "warn"
access = "$access"

# The registration API listens even when nothing registers (default 127.0.0.1:9902);
# give each instance its own port so two busbars (or a dev instance) don't collide.
[registry]
listen = "127.0.0.1:$reg"

EOF
    cat
  } >"$DIR/$name/busbar.toml"
  ADMIN_PORT[$name]=$admin
}
start_busbar() {  # name [binary]; sets LAST_PID. Raises the open-files limit to the hard limit.
  local name=$1 d="$DIR/$1" bin=${2:-$BUSBAR}
  "$bin" check "$d/busbar.toml" >"$d/check.log" 2>&1 \
    || { cat "$d/check.log" >&2; die "busbar check failed for $d/busbar.toml"; }
  # A throwaway admin token, so busbar doesn't warn that none is set.
  BUSBAR_ADMIN_TOKEN="bench-$RANDOM$RANDOM" bash -c 'ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$@"' _ \
    taskset -c "$PROXY_CPU" "$bin" run -c "$d/busbar.toml" >"$d/stdout.log" 2>"$d/stderr.log" &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  SERVER[$LAST_PID]=$name
}

# ---------------------------------------------------------------------------------
# Which servers the chosen scenarios need.
NEED_NGINX=0; NEED_HAPROXY=0; NEED_BUSBAR=0
ENGINE_SCENARIOS=0   # issue 20's table scenarios: nginx, HAProxy and busbar all take part
for s in post1k post64k tls tlsnew upstls h2tls; do has $s && ENGINE_SCENARIOS=1; done
{ has a || has b || has c || has d || has lat || ((ENGINE_SCENARIOS)); } && NEED_NGINX=1
{ has a || has d || ((ENGINE_SCENARIOS)) || lat_has h2c || lat_has h2tls; } && NEED_HAPROXY=1
{ has a || has b || has d || has lat || ((ENGINE_SCENARIOS)); } && NEED_BUSBAR=1

# Targets. Keys are "<scenario>/<name>"; the same name (nginx, busbar) may appear in
# several scenarios. KIND: wrk | h2 (h2load h2c) | paced (scenario lat, wrk) | h2paced
# (scenario lat, h2pace).
declare -A T_PORT T_PID T_KIND T_PATH T_SCHEME T_HDR T_SCRIPT T_SCRIPT_ARGS
declare -A SC_TARGETS SC_TITLE
deftarget() {  # scenario name port pid kind [path] [scheme]
  local k="$1/$2"
  T_PORT[$k]=$3; T_PID[$k]=$4; T_KIND[$k]=$5; T_PATH[$k]=${6:-/}; T_SCHEME[$k]=${7:-http}
  SC_TARGETS[$1]="${SC_TARGETS[$1]:-} $2"
}

# --- TLS material (tls, tlsnew, upstls, tlsmem, lat's tls shape): a CA made for this run
# and one ECDSA P-256 certificate it signs, for localhost and 127.0.0.1. Every TLS
# listener serves that certificate (the leaf alone, no chain); clients and the proxies'
# upstream side verify against the CA. (A self-signed leaf would not do as its own CA:
# webpki, which rustls uses, refuses a certificate marked CA:TRUE as an end entity.)
CERT=""; KEY=""; CA=""; CERT_KEY=""
if ((NEED_TLS)); then
  make_tls_material "$DIR/tls"
  CERT="$DIR/tls/cert.pem"; KEY="$DIR/tls/key.pem"; CA="$DIR/tls/ca.pem"; CERT_KEY="$DIR/tls/cert+key.pem"
fi
# nginx's TLS lines for a server block (the same certificate and key everywhere). nginx
# 1.22 offers TLS 1.0-1.2 by default (1.3 only from 1.23.4); HAProxy 2.6 and rustls
# negotiate 1.3, so nginx is told to offer 1.3 too.
nginx_tls() { echo "ssl_certificate $CERT; ssl_certificate_key $KEY; ssl_protocols TLSv1.2 TLSv1.3;"; }
# h2tls (and lat's h2tls shape): nginx's and HAProxy's TLS listeners offer h2 by ALPN too (busbar's always do);
# only then, so the HTTP/1.1 TLS scenarios keep the configs they were measured with.
H2_ALPN_NGINX=""; H2_ALPN_HAPROXY=""
{ has h2tls || lat_has h2tls; } && { H2_ALPN_NGINX=" http2"; H2_ALPN_HAPROXY=" alpn h2,http/1.1"; }

# --- backend: nginx answering "ok\n", on the load CPU (an h2c listener too, for d; a TLS
# listener for the TLS scenarios). GET / answers at once. POST /post reads the whole body
# before answering: nginx's `return` would answer first and discard the body after, so
# the body is read by `mirror … mirror_request_body on` (which reads it before the content
# phase; the mirror subrequest itself goes to an internal location answering 204), then
# stub_status, which refuses POST with 405 without touching a file, and error_page turns
# that into the same 200 "ok\n". Bodies stay in memory (client_body_buffer_size). Checked
# by bench-lib/reads-body.py below; measured here: POST 1 KiB direct costs what GET does.
take_port P_BACKEND P_BACKEND_H2 P_BACKEND_TLS
# /_forwarded echoes the forwarding headers a request arrived with (check_forwarding).
FORWARDED_ECHO='xff=$http_x_forwarded_for|fwd=$http_forwarded|proto=$http_x_forwarded_proto|host=$http_x_forwarded_host|via=$http_via|tp=$http_traceparent|rid=$http_x_request_id'
BACKEND_TLS_LISTEN=""
((NEED_TLS)) && BACKEND_TLS_LISTEN="listen 127.0.0.1:$P_BACKEND_TLS ssl$H2_ALPN_NGINX; $(nginx_tls)"
start_nginx backend "$LOAD_CPU" "
    server {
        listen 127.0.0.1:$P_BACKEND;
        listen 127.0.0.1:$P_BACKEND_H2 http2;
        $BACKEND_TLS_LISTEN
        client_body_buffer_size 128k;
        client_max_body_size 1m;
        location / { default_type text/plain; return 200 \"ok\n\"; }
        location = /post {
            mirror /_drained;
            mirror_request_body on;
            stub_status;
            error_page 405 =200 @ok;
        }
        location = /_drained { internal; return 204; }
        location = /_forwarded {
            default_type text/plain;
            return 200 \"$FORWARDED_ECHO\";
        }
        location @ok { default_type text/plain; return 200 \"ok\n\"; }
    }"
BACKEND_PID=$LAST_PID
wait_ready backend "$BACKEND_PID" "http://127.0.0.1:$P_BACKEND/"
((NEED_TLS)) && wait_ready backend "$BACKEND_PID" "https://127.0.0.1:$P_BACKEND_TLS/" --cacert "$CA"
if has post1k || has post64k || lat_has post1k; then
  out=$(python3 "$LIB/reads-body.py" "$P_BACKEND" /post 2>&1) \
    || die "the backend's /post does not read the whole body before answering: $out"
fi

# --- nginx reverse proxy, one worker, upstream keepalive 64; HTTP/1.1 and h2c listeners,
# a TLS listener (tls, tlsnew) and a plaintext listener proxying to the backend's TLS
# listener (upstls). Request bodies (post1k, post64k) stream upstream as they arrive
# (proxy_request_buffering off), as HAProxy and busbar do, through a 128 KiB buffer
# rather than the 8 KiB default. (With nginx's default buffering, the whole body read
# first, in memory up to 128 KiB, nginx measured the same within this machine's noise.)
# NGINX_PROXY_* are reused by tlsmem's fresh nginx.
# Every proxying location also adds the request headers busbar adds by default
# (`nginx_forwarding`, bench-lib/common.sh), and HAProxy's frontends the same
# (`haproxy_forwarding`): FORWARDING=0 leaves them out.
NGINX_FWD=$(nginx_forwarding)
NGINX_PROXY_LOCATION="
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            $NGINX_FWD"
NGINX_PROXY_UPSTREAM="
    upstream backend {
        server 127.0.0.1:$P_BACKEND;
        keepalive 64;
        keepalive_requests 1000000;
    }"
if ((NEED_NGINX)); then
  take_port P_NGINX P_NGINX_H2 P_NGINX_TLS P_NGINX_UPS
  NGINX_TLS_LISTEN=""
  ((NEED_TLS)) && NGINX_TLS_LISTEN="listen 127.0.0.1:$P_NGINX_TLS ssl$H2_ALPN_NGINX; $(nginx_tls)"
  NGINX_UPSTLS=""
  # proxy_ssl_name: the name to send (SNI) and verify; by default it would be the
  # upstream block's name.
  has upstls && NGINX_UPSTLS="
    upstream backend_tls {
        server 127.0.0.1:$P_BACKEND_TLS;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$P_NGINX_UPS;
        location / {
            proxy_pass https://backend_tls;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_ssl_session_reuse on;
            proxy_ssl_server_name on;
            proxy_ssl_name localhost;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate $CA;
            $NGINX_FWD
        }
    }"
  start_nginx nginx "$PROXY_CPU" "$NGINX_PROXY_UPSTREAM
    server {
        listen 127.0.0.1:$P_NGINX;
        listen 127.0.0.1:$P_NGINX_H2 http2;
        $NGINX_TLS_LISTEN
        client_body_buffer_size 128k;
        proxy_request_buffering off;
        location / {$NGINX_PROXY_LOCATION
        }
    }$NGINX_UPSTLS"
  NGINX_PID=$LAST_PID
fi

# --- HAProxy, one thread; HTTP/1.1 and h2c (proto h2) frontends, a TLS frontend (tls,
# tlsnew) and one to the backend's TLS listener, verified against the run's CA (upstls).
# HAProxy streams request bodies as they come (no option http-buffer-request).
if ((NEED_HAPROXY)); then
  take_port P_HAPROXY P_HAPROXY_H2 P_HAPROXY_TLS P_HAPROXY_UPS
  HAPROXY_MORE=""
  ((NEED_TLS)) && HAPROXY_MORE="
frontend fe_tls
    bind 127.0.0.1:$P_HAPROXY_TLS ssl crt $CERT_KEY$H2_ALPN_HAPROXY
$(haproxy_forwarding https)
    default_backend be
"
  has upstls && HAPROXY_MORE+="
frontend fe_ups
    bind 127.0.0.1:$P_HAPROXY_UPS
$(haproxy_forwarding http)
    default_backend be_tls

backend be_tls
    server b1 127.0.0.1:$P_BACKEND_TLS ssl verify required ca-file $CA sni str(localhost) verifyhost localhost
"
  start_haproxy haproxy "frontend fe
    bind 127.0.0.1:$P_HAPROXY
$(haproxy_forwarding http)
    default_backend be

frontend fe_h2
    bind 127.0.0.1:$P_HAPROXY_H2 proto h2
$(haproxy_forwarding http)
    default_backend be
$HAPROXY_MORE
backend be
    server b1 127.0.0.1:$P_BACKEND"
  HAPROXY_PID=$LAST_PID
fi

# --- bare pingora (load-tests/bare): the floor busbar is built on.
if { has a || has lat; } && ((HAVE_BARE)); then
  take_port P_BARE
  mkdir -p "$DIR/bare-pingora"
  (cd "$DIR/bare-pingora" && exec taskset -c "$PROXY_CPU" "$BARE" "127.0.0.1:$P_BARE" "127.0.0.1:$P_BACKEND" 1) \
    >"$DIR/bare-pingora/stdout.log" 2>"$DIR/bare-pingora/stderr.log" &
  BARE_PID=$!
  PIDS+=("$BARE_PID")
  SERVER[$BARE_PID]=bare-pingora
fi

# --- lean-proxy (load-tests/lean): a hand-written tokio HTTP/1 proxy, the ceiling of an
# own HTTP/1 engine.
if has a && ((HAVE_LEAN)); then
  take_port P_LEAN
  taskset -c "$PROXY_CPU" "$LEAN" "127.0.0.1:$P_LEAN" "127.0.0.1:$P_BACKEND" 1 \
    >"$DIR/lean-proxy.log" 2>&1 &
  LEAN_PID=$!
  PIDS+=("$LEAN_PID")
  SERVER[$LEAN_PID]=lean-proxy
fi

# --- busbar: one route, round robin, access log off (h2c is served on the same port).
ONE_ROUTE='[[service]]
name = "bench"
balance = "round_robin"
endpoints = [{ addr = "127.0.0.1:'$P_BACKEND'" }]

[[route]]
name = "all"
service = "bench"'
# With a TLS scenario the same process also has a TLS listener (tls, tlsnew, lat's tls).
if ((NEED_BUSBAR)); then
  take_port P_BUSBAR P_BUSBAR_TLS P_BASE P_BASE_TLS
  tls_port=""; ((NEED_TLS)) && tls_port=$P_BUSBAR_TLS
  busbar_config busbar "$P_BUSBAR" off "$tls_port" <<<"$ONE_ROUTE"
  start_busbar busbar
  BUSBAR_PID=$LAST_PID
  if [[ -n $BUSBAR_BASE ]]; then
    tls_port=""; ((NEED_TLS)) && tls_port=$P_BASE_TLS
    busbar_config busbar@base "$P_BASE" off "$tls_port" <<<"$ONE_ROUTE"
    start_busbar busbar@base "$BUSBAR_BASE"
    BASE_PID=$LAST_PID
  fi
fi

# --- busbar-upstls (upstls): the service from BUSBAR_UPSTLS, `protocol = "https"` to the
# backend's TLS listener with the run's CA. A binary without https upstreams refuses the
# config in `busbar check`: that busbar is left out of the scenario with a note.
declare -A UPSTLS_SKIPPED UPSTLS_PID UPSTLS_PORT   # keyed by target name: busbar, busbar@base
upstls_busbar() {  # target binary; its files in $DIR/busbar-upstls (@base)
  local t=$1 bin=$2 d=${1/busbar/busbar-upstls} port
  take_port port
  # Not a pipe: busbar_config takes its ports from the pool, and in a pipe's subshell the
  # pool's position would not advance here (the next server got the same port).
  busbar_config "$d" "$port" off \
    < <(sed -e "s|@BACKEND@|127.0.0.1:$P_BACKEND_TLS|g" -e "s|@CA_FILE@|$CA|g" "$BUSBAR_UPSTLS")
  if ! "$bin" check "$DIR/$d/busbar.toml" >"$DIR/$d/check.log" 2>&1; then
    UPSTLS_SKIPPED[$t]=$(grep -v '^[[:space:]]*$' "$DIR/$d/check.log" | head -3 | tr '\n' ' ')
    log "upstls: $t: skipped (no https upstream support in this binary): ${UPSTLS_SKIPPED[$t]}"
    return 0
  fi
  start_busbar "$d" "$bin"
  UPSTLS_PID[$t]=$LAST_PID
  UPSTLS_PORT[$t]=$port
}
if has upstls; then
  upstls_busbar busbar "$BUSBAR"
  [[ -n $BUSBAR_BASE ]] && upstls_busbar busbar@base "$BUSBAR_BASE"
fi

# --- busbar+trace<ratio> (a): the plain route with `[tracing]` exporting to a local sink
# (a Python stand-in for a collector that answers every export with 200).
declare -A TRACE_PID TRACE_PORT
if has a && [[ -n ${TRACING:-} ]]; then
  take_port P_SINK
  taskset -c "$LOAD_CPU" python3 "$LIB/otlp-sink.py" "$P_SINK" "$DIR/sink.ready" >"$DIR/sink.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  SERVER[$LAST_PID]=otlp-sink
  for r in $TRACING; do
    take_port p
    busbar_config "busbar+trace$r" "$p" off <<EOF
$ONE_ROUTE

[tracing]
endpoint = "http://127.0.0.1:$P_SINK/v1/traces"
sample_ratio = $r
EOF
    start_busbar "busbar+trace$r"
    TRACE_PID[$r]=$LAST_PID
    TRACE_PORT[$r]=$p
  done
fi

# --- busbar+log (a): the same with the access log written to a file.
if has a; then
  take_port P_BUSBARLOG
  busbar_config busbar+log "$P_BUSBARLOG" "$DIR/busbar+log/access.log" <<<"$ONE_ROUTE"
  start_busbar busbar+log
  BUSBARLOG_PID=$LAST_PID
fi

# --- busbar+all (b, c): identity from a trusted header, per-user rate limit far above
# the load, service max_in_flight above wrk's connections (so requests take the
# admission fast path, the everyday case) with per-user queues behind it, metrics
# (always on: /metrics on the admin port) and the access log to a file.
if has b || has c; then
  take_port P_ALL
  ALL_ROUTE=$(cat <<EOF
[[service]]
name = "bench"
balance = "round_robin"
endpoints = [{ addr = "127.0.0.1:$P_BACKEND" }]
max_in_flight = 1024

[[route]]
name = "all"
service = "bench"

[route.admission]
identity = ["header:x-user-id", "client_ip"]
trusted_proxies = ["127.0.0.1"]
rate_limit = { rate = "1000000/s", burst = 1000000 }
queue = { max_depth = 16, max_wait = "5s" }
EOF
)
  busbar_config busbar+all "$P_ALL" "$DIR/busbar+all/access.log" <<<"$ALL_ROUTE"
  start_busbar busbar+all
  ALL_PID=$LAST_PID
  if [[ -n $BUSBAR_BASE ]]; then
    take_port P_ALLBASE
    busbar_config busbar+all@base "$P_ALLBASE" "$DIR/busbar+all@base/access.log" <<<"$ALL_ROUTE"
    start_busbar busbar+all@base "$BUSBAR_BASE"
    ALLBASE_PID=$LAST_PID
  fi
fi

# --- f: ROUTES routes, ROUTES services of one instance each, in nginx, HAProxy and
# busbar. Route i matches the path prefix /rNNNN and goes to service sNNNN. Only the
# measured route's instance is the backend; the others are distinct loopback addresses
# on a port nothing listens on, so a request routed anywhere else fails (no silent
# mis-route) and nothing probes them (no health checks configured).
if has f; then
  take_port P_NGINX1K P_HAPROXY1K P_BUSBAR1K P_DEAD
  MEAS=$((ROUTES - 2))
  MEAS_PATH=$(printf '/r%04d/x' "$MEAS")
  # Built in shell variables without subshells (1,000 forks would take seconds).
  tables=""; ng_up=""; ng_loc=""; ha_fe=""; ha_be=""
  for ((i = 0; i < ROUTES; i++)); do
    printf -v n '%04d' "$i"
    if ((i == MEAS)); then a="127.0.0.1:$P_BACKEND"; else a="127.1.$((i / 250)).$((i % 250 + 1)):$P_DEAD"; fi
    tables+="[[service]]
name = \"s$n\"
endpoints = [{ addr = \"$a\" }]

"
    ng_up+="    upstream u$n { server $a; keepalive 64; keepalive_requests 1000000; }
"
    ng_loc+="        location /r$n/ { proxy_pass http://u$n; proxy_http_version 1.1; proxy_set_header Connection \"\"; $NGINX_FWD}
"
    ha_fe+="    use_backend b$n if { path_beg /r$n/ }
"
    ha_be+="backend b$n
    server i$n $a
"
  done
  for ((i = 0; i < ROUTES; i++)); do
    printf -v n '%04d' "$i"
    tables+="[[route]]
name = \"r$n\"
path_prefix = \"/r$n\"
service = \"s$n\"

"
  done
  busbar_config busbar-1k "$P_BUSBAR1K" off <<<"$tables"
  start_nginx nginx-1k "$PROXY_CPU" "$ng_up
    server {
        listen 127.0.0.1:$P_NGINX1K;
$ng_loc        location / { return 404; }
    }"
  NGINX1K_PID=$LAST_PID
  start_haproxy haproxy-1k "frontend fe
    bind 127.0.0.1:$P_HAPROXY1K
$(haproxy_forwarding http)
$ha_fe
$ha_be"
  HAPROXY1K_PID=$LAST_PID
  start_busbar busbar-1k
  BUSBAR1K_PID=$LAST_PID
fi

# --- wait for everything, checking each listener answers "ok".
if ((NEED_NGINX)); then
  wait_ready nginx "$NGINX_PID" "http://127.0.0.1:$P_NGINX/"
  { has d || lat_has h2c; } && wait_ready nginx "$NGINX_PID" "http://127.0.0.1:$P_NGINX_H2/" --http2-prior-knowledge
fi
if ((NEED_HAPROXY)); then
  wait_ready haproxy "$HAPROXY_PID" "http://127.0.0.1:$P_HAPROXY/"
  { has d || lat_has h2c; } && wait_ready haproxy "$HAPROXY_PID" "http://127.0.0.1:$P_HAPROXY_H2/" --http2-prior-knowledge
fi
[[ -n ${BARE_PID:-} ]] && wait_ready bare-pingora "$BARE_PID" "http://127.0.0.1:$P_BARE/"
[[ -n ${LEAN_PID:-} ]] && wait_ready lean-proxy "$LEAN_PID" "http://127.0.0.1:$P_LEAN/"
if ((NEED_BUSBAR)); then
  wait_ready busbar "$BUSBAR_PID" "http://127.0.0.1:$P_BUSBAR/"
  { has d || lat_has h2c; } && wait_ready busbar "$BUSBAR_PID" "http://127.0.0.1:$P_BUSBAR/" --http2-prior-knowledge
fi
for r in "${!TRACE_PID[@]}"; do
  wait_ready "busbar+trace$r" "${TRACE_PID[$r]}" "http://127.0.0.1:${TRACE_PORT[$r]}/"
done
[[ -n ${BUSBARLOG_PID:-} ]] && wait_ready busbar+log "$BUSBARLOG_PID" "http://127.0.0.1:$P_BUSBARLOG/"
[[ -n ${ALL_PID:-} ]] && wait_ready busbar+all "$ALL_PID" "http://127.0.0.1:$P_ALL/" -H 'x-user-id: ready'
if [[ -n ${BASE_PID:-} ]]; then
  wait_ready busbar@base "$BASE_PID" "http://127.0.0.1:$P_BASE/"
  has d && wait_ready busbar@base "$BASE_PID" "http://127.0.0.1:$P_BASE/" --http2-prior-knowledge
fi
[[ -n ${ALLBASE_PID:-} ]] && wait_ready busbar+all@base "$ALLBASE_PID" "http://127.0.0.1:$P_ALLBASE/" -H 'x-user-id: ready'
{ has d || lat_has h2c; } && wait_ready backend "$BACKEND_PID" "http://127.0.0.1:$P_BACKEND_H2/" --http2-prior-knowledge
if has f; then
  wait_ready nginx-1k "$NGINX1K_PID" "http://127.0.0.1:$P_NGINX1K$MEAS_PATH"
  wait_ready haproxy-1k "$HAPROXY1K_PID" "http://127.0.0.1:$P_HAPROXY1K$MEAS_PATH"
  wait_ready busbar-1k "$BUSBAR1K_PID" "http://127.0.0.1:$P_BUSBAR1K$MEAS_PATH"
fi
if ((NEED_TLS)); then   # TLS listeners, verified against the run's CA
  ((NEED_NGINX)) && wait_ready nginx "$NGINX_PID" "https://127.0.0.1:$P_NGINX_TLS/" --cacert "$CA"
  ((NEED_HAPROXY)) && wait_ready haproxy "$HAPROXY_PID" "https://127.0.0.1:$P_HAPROXY_TLS/" --cacert "$CA"
  ((NEED_BUSBAR)) && wait_ready busbar "$BUSBAR_PID" "https://127.0.0.1:$P_BUSBAR_TLS/" --cacert "$CA"
  [[ -n ${BASE_PID:-} ]] && wait_ready busbar@base "$BASE_PID" "https://127.0.0.1:$P_BASE_TLS/" --cacert "$CA"
fi
if has upstls; then
  wait_ready nginx "$NGINX_PID" "http://127.0.0.1:$P_NGINX_UPS/"
  wait_ready haproxy "$HAPROXY_PID" "http://127.0.0.1:$P_HAPROXY_UPS/"
  for t in "${!UPSTLS_PID[@]}"; do
    wait_ready "${t/busbar/busbar-upstls}" "${UPSTLS_PID[$t]}" "http://127.0.0.1:${UPSTLS_PORT[$t]}/"
  done
fi

# Each proxy sends the backend the same forwarding headers (see `nginx_forwarding` in
# bench-lib/common.sh): every one of them present, or (FORWARDING=0) none from nginx and
# HAProxy.
check_forwarding() {  # name url [curl args...]
  local name=$1 url=$2 got field
  shift 2
  got=$(curl -fsS --max-time 2 "$@" "$url") || die "$name: $url failed"
  for field in ${got//|/ }; do
    if ((${FORWARDING:-1})) || [[ $name = busbar* ]]; then
      [[ $field != *= ]] || die "$name sent the backend no ${field%=} header ($got): see nginx_forwarding in bench-lib/common.sh"
    else
      [[ $field = *= ]] || die "$name sent the backend a ${field%%=*} header with FORWARDING=0 ($got)"
    fi
  done
}
((NEED_NGINX)) && check_forwarding nginx "http://127.0.0.1:$P_NGINX/_forwarded"
((NEED_HAPROXY)) && check_forwarding haproxy "http://127.0.0.1:$P_HAPROXY/_forwarded"
((NEED_BUSBAR)) && check_forwarding busbar "http://127.0.0.1:$P_BUSBAR/_forwarded"
if has upstls; then
  check_forwarding nginx "http://127.0.0.1:$P_NGINX_UPS/_forwarded"
  check_forwarding haproxy "http://127.0.0.1:$P_HAPROXY_UPS/_forwarded"
  for t in "${!UPSTLS_PID[@]}"; do
    check_forwarding "$t" "http://127.0.0.1:${UPSTLS_PORT[$t]}/_forwarded"
  done
fi

# ---------------------------------------------------------------------------------
# The targets of each scenario.
if has a; then
  SC_TITLE[a]="(a) plain HTTP/1.1 proxy"
  deftarget a direct "$P_BACKEND" "" wrk
  deftarget a nginx "$P_NGINX" "$NGINX_PID" wrk
  deftarget a haproxy "$P_HAPROXY" "$HAPROXY_PID" wrk
  ((HAVE_BARE)) && deftarget a bare-pingora "$P_BARE" "$BARE_PID" wrk
  ((HAVE_LEAN)) && deftarget a lean-proxy "$P_LEAN" "$LEAN_PID" wrk
  deftarget a busbar "$P_BUSBAR" "$BUSBAR_PID" wrk
  deftarget a busbar+log "$P_BUSBARLOG" "$BUSBARLOG_PID" wrk
  [[ -n ${BASE_PID:-} ]] && deftarget a busbar@base "$P_BASE" "$BASE_PID" wrk
  for r in ${TRACING:-}; do
    deftarget a "busbar+trace$r" "${TRACE_PORT[$r]}" "${TRACE_PID[$r]}" wrk
  done
fi
if has b; then
  SC_TITLE[b]="(b) identity + rate limit + queue + metrics + access log"
  b_targets="nginx busbar busbar+all"
  [[ -n ${ALLBASE_PID:-} ]] && b_targets+=" busbar+all@base"
  for t in $b_targets; do
    case $t in
      nginx) deftarget b nginx "$P_NGINX" "$NGINX_PID" wrk ;;
      busbar) deftarget b busbar "$P_BUSBAR" "$BUSBAR_PID" wrk ;;
      busbar+all) deftarget b busbar+all "$P_ALL" "$ALL_PID" wrk ;;
      busbar+all@base) deftarget b busbar+all@base "$P_ALLBASE" "$ALLBASE_PID" wrk ;;
    esac
    T_HDR[b/$t]="x-user-id: bench-user"
  done
fi
if has c; then
  SC_TITLE[c]="(c) $USERS distinct users on the scenario-(b) route"
  deftarget c nginx "$P_NGINX" "$NGINX_PID" wrk
  deftarget c busbar+all "$P_ALL" "$ALL_PID" wrk
  [[ -n ${ALLBASE_PID:-} ]] && deftarget c busbar+all@base "$P_ALLBASE" "$ALLBASE_PID" wrk
  for t in nginx busbar+all busbar+all@base; do T_SCRIPT[c/$t]="$LIB/users.lua"; T_SCRIPT_ARGS[c/$t]=$USERS; done
fi
if has d; then
  SC_TITLE[d]="(d) h2c downstream, h2load -c$H2_CONNS -m$H2_STREAMS"
  deftarget d direct "$P_BACKEND_H2" "" h2
  deftarget d nginx "$P_NGINX_H2" "$NGINX_PID" h2
  deftarget d haproxy "$P_HAPROXY_H2" "$HAPROXY_PID" h2
  deftarget d busbar "$P_BUSBAR" "$BUSBAR_PID" h2
  [[ -n ${BASE_PID:-} ]] && deftarget d busbar@base "$P_BASE" "$BASE_PID" h2
fi
if has h2tls; then
  SC_TITLE[h2tls]="(h2tls) h2 over TLS (ALPN h2) downstream, h2load -c$H2_CONNS -m$H2_STREAMS"
  deftarget h2tls direct "$P_BACKEND_TLS" "" h2 / https
  deftarget h2tls nginx "$P_NGINX_TLS" "$NGINX_PID" h2 / https
  deftarget h2tls haproxy "$P_HAPROXY_TLS" "$HAPROXY_PID" h2 / https
  deftarget h2tls busbar "$P_BUSBAR_TLS" "$BUSBAR_PID" h2 / https
  [[ -n ${BASE_PID:-} ]] && deftarget h2tls busbar@base "$P_BASE_TLS" "$BASE_PID" h2 / https
fi
if has f; then
  SC_TITLE[f]="(f) $ROUTES routes and $ROUTES instances, request on route $((MEAS + 1))"
  deftarget f nginx "$P_NGINX1K" "$NGINX1K_PID" wrk "$MEAS_PATH"
  deftarget f haproxy "$P_HAPROXY1K" "$HAPROXY1K_PID" wrk "$MEAS_PATH"
  deftarget f busbar "$P_BUSBAR1K" "$BUSBAR1K_PID" wrk "$MEAS_PATH"
fi
# Issue 20's shapes: the same four targets each (busbar@base too with BUSBAR_BASE).
for s in post1k post64k tls tlsnew; do
  has $s || continue
  case $s in
    post1k|post64k) path=/post scheme=http pd=$P_BACKEND pn=$P_NGINX ph=$P_HAPROXY pb=$P_BUSBAR pbb=${P_BASE:-} ;;
    *) path=/ scheme=https pd=$P_BACKEND_TLS pn=$P_NGINX_TLS ph=$P_HAPROXY_TLS pb=$P_BUSBAR_TLS pbb=${P_BASE_TLS:-} ;;
  esac
  deftarget $s direct "$pd" "" wrk $path $scheme
  deftarget $s nginx "$pn" "$NGINX_PID" wrk $path $scheme
  deftarget $s haproxy "$ph" "$HAPROXY_PID" wrk $path $scheme
  deftarget $s busbar "$pb" "$BUSBAR_PID" wrk $path $scheme
  [[ -n ${BASE_PID:-} ]] && deftarget $s busbar@base "$pbb" "$BASE_PID" wrk $path $scheme
  for t in ${SC_TARGETS[$s]}; do
    case $s in
      post1k) T_SCRIPT[$s/$t]="$LIB/body.lua"; T_SCRIPT_ARGS[$s/$t]="1024 length" ;;
      post64k) T_SCRIPT[$s/$t]="$LIB/body.lua"; T_SCRIPT_ARGS[$s/$t]="65536 chunked $POST_CHUNK" ;;
      tlsnew) T_HDR[$s/$t]="Connection: close" ;;
    esac
  done
done
SC_TITLE[post1k]="(post1k) POST, 1 KiB body with Content-Length"
SC_TITLE[post64k]="(post64k) POST, 64 KiB chunked body"
SC_TITLE[tls]="(tls) GET over TLS, keep-alive"
SC_TITLE[tlsnew]="(tlsnew) GET over TLS, a new TLS connection per request"
if has upstls; then
  SC_TITLE[upstls]="(upstls) HTTPS upstream: plaintext client, TLS backend"
  deftarget upstls nginx "$P_NGINX_UPS" "$NGINX_PID" wrk
  deftarget upstls haproxy "$P_HAPROXY_UPS" "$HAPROXY_PID" wrk
  for t in busbar busbar@base; do
    [[ -n ${UPSTLS_PID[$t]:-} ]] && deftarget upstls $t "${UPSTLS_PORT[$t]}" "${UPSTLS_PID[$t]}" wrk
  done
fi
if [[ -n ${ONLY:-} ]]; then
  for t in $ONLY; do
    found=0
    for k in "${!T_PORT[@]}"; do [[ ${k#*/} = "$t" ]] && found=1; done
    ((found)) || die "ONLY: unknown target $t"
  done
  for s in "${!SC_TARGETS[@]}"; do
    sel=""
    for t in ${SC_TARGETS[$s]}; do [[ " $ONLY " = *" $t "* ]] && sel+=" $t"; done
    SC_TARGETS[$s]=$sel
  done
fi

# Every target of the body scenarios must answer both framings with "ok" (curl's own
# chunking for the chunked one) before anything is measured. `Expect:` keeps curl from
# asking for 100-continue (wrk never does), which would be another check than framing.
if has post1k || has post64k; then
  head -c 65536 /dev/zero | tr '\0' x >"$DIR/body-64k"
  head -c 1024 "$DIR/body-64k" >"$DIR/body-1k"
  for s in post1k post64k; do
    for t in ${SC_TARGETS[$s]:-}; do
      k="$s/$t"
      if [[ $s = post1k ]]; then
        wait_ready "$t" "${T_PID[$k]:-$BACKEND_PID}" "http://127.0.0.1:${T_PORT[$k]}/post" -H 'Expect:' \
          --data-binary "@$DIR/body-1k"
      else
        wait_ready "$t" "${T_PID[$k]:-$BACKEND_PID}" "http://127.0.0.1:${T_PORT[$k]}/post" \
          -H 'Expect:' -H 'Transfer-Encoding: chunked' --data-binary "@$DIR/body-64k"
      fi
    done
  done
fi

RAW="$DIR/results.tsv"   # scenario target round rps p50_us p99_us requests cpu_us_per_req errors proxy_cpu_busy% load_cpu_busy%

# The /proc/stat lines of the proxy CPU and the load CPU, and how busy each was between
# two samples (percent of its time not idle): tells whether the proxy or the load side
# was the limit of a run.
cpu_sample() { awk -v p="cpu$PROXY_CPU" -v l="cpu$LOAD_CPU" '$1 == p || $1 == l {printf "%s ", $0}' /proc/stat; }
cpu_busy() {  # sample-before sample-after -> "proxy% load%"
  awk -v a="$1" -v b="$2" -v p="cpu$PROXY_CPU" -v l="cpu$LOAD_CPU" 'BEGIN {
    n = split(a, x, " "); split(b, y, " ")
    for (i = 1; i <= n; i++) if (x[i] ~ /^cpu/) {
      c = x[i]; t = 0
      for (j = 1; j <= 8; j++) t += y[i + j] - x[i + j]
      idle = (y[i + 4] + y[i + 5]) - (x[i + 4] + x[i + 5])
      v[c] = t > 0 ? 100 * (t - idle) / t : 0
    }
    printf "%.0f %.0f\n", v[p], v[l] }'
}
: >"$RAW"

run_load() {  # key seconds [h2load log file] -> prints the generator's output
  local k=$1 secs=$2 logf=${3:-} url="${T_SCHEME[$1]}://127.0.0.1:${T_PORT[$1]}${T_PATH[$1]}" args=()
  # wrk sends the URL's host as SNI: an IP there is illegal (RFC 6066 §3), and rustls
  # logs a warning for every handshake; localhost is the certificate's name. (wrk tries
  # each address localhost resolves to and keeps those that connect: 127.0.0.1.)
  [[ ${T_SCHEME[$1]} = https ]] && url="https://localhost:${T_PORT[$1]}${T_PATH[$1]}"
  case ${T_KIND[$k]} in
    wrk)
      args=(-t1 -c"$CONNS" -d"${secs}s" --timeout 5s --latency)
      [[ -n ${T_HDR[$k]:-} ]] && args+=(-H "${T_HDR[$k]}")
      [[ -n ${T_SCRIPT[$k]:-} ]] && args+=(-s "${T_SCRIPT[$k]}")
      args+=("$url")
      [[ -n ${T_SCRIPT_ARGS[$k]:-} ]] && args+=(-- ${T_SCRIPT_ARGS[$k]})
      timeout $((secs + 30)) taskset -c "$LOAD_CPU" wrk "${args[@]}"
      ;;
    h2)
      args=(-t1 -c"$H2_CONNS" -m"$H2_STREAMS" -D "$secs")
      [[ -n $logf ]] && args+=(--log-file="$logf")
      timeout $((secs + 30)) taskset -c "$LOAD_CPU" h2load "${args[@]}" "$url"
      ;;
    paced)  # T_SCRIPT_ARGS = "RATE CONNS [BODY-BYTES]"
      timeout $((secs + 30)) taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${secs}s" --timeout 5s \
        -s "$LIB/paced.lua" "$url" -- ${T_SCRIPT_ARGS[$k]}
      ;;
    h2paced)  # T_SCRIPT_ARGS = "RATE CONNS"
      local rate conns
      read -r rate conns <<<"${T_SCRIPT_ARGS[$k]}"
      args=(--url "$url" --rate "$rate" --conns "$conns" --duration "$secs")
      [[ ${T_SCHEME[$k]} = https ]] && args+=(--ca "$CA")
      timeout $((secs + 30)) taskset -c "$LOAD_CPU" "$H2PACE" "${args[@]}"
      ;;
  esac
}

# Percentiles (µs) of column 3 of an h2load log: prints "p50 p99".
log_pcts() {
  awk -F'\t' '{print $3}' "$1" | sort -n | awk '{v[NR] = $1}
    function q(p,  i) {i = int(NR * p + 0.999999); if (i < 1) i = 1; return v[i]}
    END {if (NR == 0) print "NaN NaN"; else print q(0.50), q(0.99)}'
}

# Every server must outlive the run: a dead backend would show up as a slow or failing
# proxy, so say which one died instead.
check_servers() {
  local pid
  for pid in "${!SERVER[@]}"; do
    kill -0 "$pid" 2>/dev/null || die "${SERVER[$pid]} (pid $pid) exited during the run; see $DIR/${SERVER[$pid]}/"
  done
}

measure() {  # scenario target round
  local s=$1 t=$2 r=$3 k="$1/$2" pid=${T_PID[$1/$2]} before after f0 f1 flt out rps p50 p99 reqs cpu errs logf=""
  local c0 c1 pbusy lbusy
  [[ ${T_KIND[$k]} = h2 ]] && logf="$DIR/h2load-$s-$t-$r.log"
  before=$(cpu_ticks "$pid"); f0=$(minor_faults "$pid"); c0=$(cpu_sample)
  out=$(run_load "$k" "$DURATION" "$logf") || die "load generator failed against $k: $out"
  after=$(cpu_ticks "$pid"); f1=$(minor_faults "$pid"); c1=$(cpu_sample)
  read -r pbusy lbusy < <(cpu_busy "$c0" "$c1")
  echo "$out" >"$DIR/out-$s-$t-$r.txt"
  check_servers
  if [[ ${T_KIND[$k]} = h2 ]]; then
    rps=$(awk '/^finished in/ {gsub(/,/, "", $4); print $4}' <<<"$out")
    reqs=$(awk '/^requests:/ {print $8}' <<<"$out")   # "N succeeded"
    errs=$(awk '/^requests:/ {e += $10 + $12 + $14} /^status codes:/ {e += $7 + $9} END {print e + 0}' <<<"$out")
    read -r p50 p99 < <(log_pcts "$logf")
    rm -f "$logf"
  else
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    reqs=$(awk '/ requests in / {print $1}' <<<"$out")
    p50=$(to_us "$(awk '$1 == "50%" {print $2}' <<<"$out")")
    p99=$(to_us "$(awk '$1 == "99%" {print $2}' <<<"$out")")
    # Errors: non-2xx/3xx answers and socket errors (connect/read/write/timeout).
    errs=$(awk '/Non-2xx or 3xx responses:/ {e += $NF}
                /Socket errors:/ {for (i = 3; i <= NF; i += 2) {g = $(i + 1); gsub(/,/, "", g); e += g}}
                END {print e + 0}' <<<"$out")
  fi
  [[ -n $rps && -n $reqs && $reqs -gt 0 ]] \
    || die "no requests completed against $k (or unparsable output; see $DIR/out-$s-$t-$r.txt and the server's stderr): $out"
  if [[ -n $pid ]]; then
    cpu=$(awk -v d=$((after - before)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN {printf "%.2f", d * 1e6 / hz / n}')
    flt=$(awk -v d=$((f1 - f0)) -v n="$reqs" 'BEGIN {printf "%.3f", d / n}')
  else
    cpu="-" flt="-"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$s" "$t" "$r" "$rps" "$p50" "$p99" "$reqs" "$cpu" "$errs" "$pbusy" "$lbusy" >>"$RAW"
  printf 'bench: (%s) round %d %-12s %10s req/s  p50 %6s us  p99 %6s us  cpu %6s us/req  faults %5s/req  errors %s  CPU%s/CPU%s busy %s%%/%s%%\n' \
    "$s" "$r" "$t" "$rps" "$p50" "$p99" "$cpu" "$flt" "$errs" "$PROXY_CPU" "$LOAD_CPU" "$pbusy" "$lbusy" >&2
}

median() {  # scenario target column-of-RAW
  awk -F'\t' -v s="$1" -v t="$2" -v c="$3" '$1 == s && $2 == t && $c != "-" {print $c}' "$RAW" | median_of
}

# The target's req/s over nginx's in the same round, median over the rounds: the machine's
# slow drifts (a neighbour's load) move both halves of a pair alike, so this ratio is
# steadier than the ratio of the two medians when runs vary from round to round.
paired() {  # scenario target
  awk -F'\t' -v s="$1" -v t="$2" '$1 == s && $2 == "nginx" {n[$3] = $4}
    $1 == s && $2 == t {v[$3] = $4}
    END {for (r in v) if ((r in n) && n[r] > 0) printf "%.4f\n", v[r] / n[r]}' "$RAW" | median_of
}

# What a TLS target negotiates with OpenSSL's client defaults (wrk's): "name protocol
# cipher group" for each target of the scenario.
tls_params() {  # scenario
  local s=$1 t out acc=""
  for t in ${SC_TARGETS[$s]:-}; do
    out=$(timeout 5 openssl s_client -connect "127.0.0.1:${T_PORT[$s/$t]}" -servername localhost \
      -CAfile "$CA" -brief </dev/null 2>&1 || true)
    acc+="$t $(awk -F': ' '/^Protocol version/ {p = $2} /^Ciphersuite/ {c = $2}
      /Temp Key/ {split($2, k, ","); g = k[1]} END {printf "%s %s %s", p, c, g}' <<<"$out"); "
  done
  echo "${acc%; }"
}

declare -A M_RPS M_CPU M_ERR
run_scenario() {  # scenario: warm-up, rounds, table
  local s=$1 targets=() n t r i ng_rps ng_cpu
  read -r -a targets <<<"${SC_TARGETS[$s]:-}"
  n=${#targets[@]}
  echo "## ${SC_TITLE[$s]}"
  echo
  case $s in
    a) echo "- load: wrk -t1 -c$CONNS -d${DURATION}s --latency, GET / → backend nginx \`return 200 \"ok\\n\"\`"
       echo "- proxies: nginx 1 worker, upstream keepalive 64; HAProxy nbthread 1, http-reuse always; bare-pingora ($( ((HAVE_BARE)) && echo "load-tests/bare, 1 thread" || echo "SKIPPED: $BARE not built; cargo build --release --example bare-pingora")); lean-proxy ($( ((HAVE_LEAN)) && echo "load-tests/lean: hand-written tokio HTTP/1, no policy, 1 thread" || echo "SKIPPED: $LEAN not built; cargo build --release --example lean-proxy")); busbar threads=1, round_robin, access log off / to a file (busbar+log)" ;;
    b) echo "- load: as (a), every request with \`x-user-id: bench-user\` (one user)"
       echo "- busbar+all: identity [\"header:x-user-id\", \"client_ip\"] trusted from 127.0.0.1; per-user rate_limit 1000000/s burst 1000000 (never refuses); service max_in_flight 1024 (> $CONNS connections: no queueing) with queue max_depth 16 / max_wait 5s; metrics (always on); access log to a file"
       echo "- nginx and busbar: the plain proxies of (a); the ratios are to nginx's plain figure" ;;
    c) echo "- load: wrk -t1 -c$CONNS -d${DURATION}s --latency -s users.lua: request i as \`x-user-id: u<i mod $USERS>\`, for nginx and busbar+all alike" ;;
    d) echo "- load: h2load -t1 -c$H2_CONNS -m$H2_STREAMS -D $DURATION (h2c, prior knowledge), GET /; p50/p99 from h2load's --log-file"
       echo "- nginx: \`listen … http2\` (h2c), upstream HTTP/1.1 keepalive; HAProxy: \`bind … proto h2\`; busbar: h2c on its HTTP port; direct: the backend's own h2c listener" ;;
    h2tls) echo "- load: h2load -t1 -c$H2_CONNS -m$H2_STREAMS -D $DURATION https://localhost:PORT/ (TLS, ALPN h2, SNI localhost), GET /; p50/p99 from h2load's --log-file"
       echo "- certificate: as in (tls); nginx \`listen … ssl http2\`, HAProxy \`bind … ssl crt … alpn h2,http/1.1\`, busbar \`[listen] tls\` (offers h2 and http/1.1); upstream plaintext HTTP/1.1 keep-alive as in (a); direct: the backend's own TLS listener with http2"
       echo "- negotiated (openssl s_client): $(tls_params "$s")" ;;
    f) echo "- tables: $ROUTES routes (path_prefix /r0000 … /r$(printf %04d $((ROUTES - 1)))), $ROUTES services of one instance each; the request GET $MEAS_PATH matches route $((MEAS + 1)) of $ROUTES"
       echo "- nginx: $ROUTES upstream blocks + $ROUTES prefix locations; HAProxy: $ROUTES backends + $ROUTES \`use_backend … if { path_beg … }\` rules (evaluated in order); busbar: the same in its TOML (routes in file order)"
       echo "- compare busbar here with busbar in (a) for the cost of the tables" ;;
    post1k|post64k)
       if [[ $s = post1k ]]; then
         echo "- load: wrk -t1 -c$CONNS -d${DURATION}s --latency -s body.lua -- 1024 length: POST /post, 1 KiB body, Content-Length"
       else
         echo "- load: wrk -t1 -c$CONNS -d${DURATION}s --latency -s body.lua -- 65536 chunked $POST_CHUNK: POST /post, \`Transfer-Encoding: chunked\`, 64 KiB in $((65535 / POST_CHUNK + 1)) chunks of $POST_CHUNK bytes"
       fi
       echo "- backend: nginx reads the whole body before it answers 200 \"ok\\n\" (mirror_request_body; checked at startup by reads-body.py); direct: wrk → backend"
       echo "- nginx: proxy_request_buffering off (the body streams upstream), client_body_buffer_size 128k; HAProxy streams the body; busbar: the (a) config" ;;
    tls|tlsnew)
       echo "- load: wrk -t1 -c$CONNS -d${DURATION}s --latency https://localhost:PORT/ (SNI localhost)$([[ $s = tlsnew ]] && echo " -H 'Connection: close': every request on a new connection, a full handshake each (wrk resumes no sessions)")"
       echo "- certificate: ECDSA P-256 for localhost/127.0.0.1, signed by a CA made for the run, the same file everywhere; nginx \`listen … ssl\`, HAProxy \`bind … ssl crt\`, busbar \`[listen] tls\`; upstream plaintext HTTP/1.1 keep-alive as in (a); direct: the backend's own TLS listener"
       echo "- negotiated (openssl s_client, the same OpenSSL defaults as wrk): $(tls_params "$s")" ;;
    upstls)
       echo "- load: wrk -t1 -c$CONNS -d${DURATION}s --latency, plaintext GET / to the proxy; the proxy → the backend's TLS listener, verified against the run's CA, SNI localhost, keep-alive"
       echo "- nginx: proxy_pass https://, upstream keepalive 64, proxy_ssl_session_reuse on, proxy_ssl_verify on; HAProxy: \`server … ssl verify required ca-file … sni str(localhost) verifyhost localhost\`, http-reuse always; busbar: $(basename "$BUSBAR_UPSTLS") (\`protocol = \"https\"\`)"
       for t in busbar busbar@base; do
         [[ -n ${UPSTLS_SKIPPED[$t]:-} ]] && echo "- $t: skipped (no https upstream support in this binary): \`busbar check\` said: ${UPSTLS_SKIPPED[$t]}"
       done ;;
  esac
  echo
  if ((n == 0)); then echo "(no targets selected)"; echo; return; fi
  if ((WARMUP > 0)); then
    for t in "${targets[@]}"; do run_load "$s/$t" "$WARMUP" >/dev/null || die "warm-up against $s/$t failed"; done
  fi
  for ((r = 1; r <= ROUNDS; r++)); do
    for ((i = 0; i < n; i++)); do
      measure "$s" "${targets[$(((i + r - 1) % n))]}" "$r"
    done
  done
  for t in "${targets[@]}"; do
    M_RPS[$s/$t]=$(median "$s" "$t" 4)
    M_CPU[$s/$t]=$(median "$s" "$t" 8)
    M_ERR[$s/$t]=$(awk -F'\t' -v s="$s" -v t="$t" '$1 == s && $2 == t {e += $9} END {print e + 0}' "$RAW")
  done
  ng_rps=${M_RPS[$s/nginx]:--}; ng_cpu=${M_CPU[$s/nginx]:--}
  echo "| proxy | req/s | p50 | p99 | CPU µs/req | req/s ratio to nginx | paired ratio | CPU ratio to nginx |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  for t in "${targets[@]}"; do
    printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$t" \
      "$(awk -v v="${M_RPS[$s/$t]}" 'BEGIN {printf "%.0f", v}')" \
      "$(fmt_us "$(median "$s" "$t" 5)")" "$(fmt_us "$(median "$s" "$t" 6)")" \
      "$(awk -v v="${M_CPU[$s/$t]}" 'BEGIN {if (v == "-") print "-"; else printf "%.1f", v}')" \
      "$(ratio "${M_RPS[$s/$t]}" "$ng_rps")" "$(ratio "$(paired "$s" "$t")" 1)" \
      "$(ratio "${M_CPU[$s/$t]}" "$ng_cpu")"
  done
  echo
  echo "- paired ratio: each round's req/s over nginx's in the same round, median over the $ROUNDS rounds"
  echo
  for t in "${targets[@]}"; do
    [[ ${M_ERR[$s/$t]} = 0 ]] || echo "- WARNING: $t had ${M_ERR[$s/$t]} errors (non-2xx/3xx, socket or stream errors) over $ROUNDS rounds"
  done
  case $s in
    a) [[ -n ${M_RPS[a/busbar]:-} ]] && echo "- goal (issue 7): busbar ≥ 0.90× nginx req/s; this run: $(ratio "${M_RPS[a/busbar]}" "$ng_rps") (paired: $(ratio "$(paired a busbar)" 1))" ;;
    b) [[ -n ${M_RPS[b/busbar+all]:-} ]] && echo "- goal (issue 7): busbar+all ≥ 0.85× nginx's plain req/s; this run: $(ratio "${M_RPS[b/busbar+all]}" "$ng_rps") (paired: $(ratio "$(paired b busbar+all)" 1))" ;;
    post1k|post64k|tls|upstls)
       [[ -n ${M_RPS[$s/busbar]:-} ]] && echo "- goal (issue 20): busbar ≥ 1.0× nginx req/s; this run: $(ratio "${M_RPS[$s/busbar]}" "$ng_rps") (paired: $(ratio "$(paired "$s" busbar)" 1)); CPU per request $(ratio "${M_CPU[$s/busbar]}" "$ng_cpu")× nginx's" ;;
    d|h2tls)
       [[ -n ${M_RPS[$s/busbar]:-} ]] && echo "- goal (issue 21): busbar ≥ 1.0× nginx req/s, target ≥ 1.0× HAProxy; this run: $(ratio "${M_RPS[$s/busbar]}" "$ng_rps")× nginx (paired: $(ratio "$(paired "$s" busbar)" 1)), $(ratio "${M_RPS[$s/busbar]}" "${M_RPS[$s/haproxy]:--}")× HAProxy; CPU per request $(ratio "${M_CPU[$s/busbar]}" "$ng_cpu")× nginx's, $(ratio "${M_CPU[$s/busbar]}" "${M_CPU[$s/haproxy]:--}")× HAProxy's" ;;
    tlsnew)
       [[ -n ${M_RPS[$s/busbar]:-} ]] && echo "- issue 20 (report the ratio): busbar $(ratio "${M_RPS[$s/busbar]}" "$ng_rps")× nginx req/s (paired: $(ratio "$(paired "$s" busbar)" 1)); CPU per request $(ratio "${M_CPU[$s/busbar]}" "$ng_cpu")× nginx's"
       ;;
  esac
  # The proxy is the limit of a run when its CPU is busy; when the load CPU is busy and
  # the proxy's is not (wrk doing the client half of every TLS handshake in tlsnew, say),
  # req/s says more about the load side, and CPU µs/req is the figure to compare.
  for t in "${targets[@]}"; do
    [[ -n ${T_PID[$s/$t]} ]] || continue
    local pb lb
    pb=$(median "$s" "$t" 10); lb=$(median "$s" "$t" 11)
    if awk -v p="$pb" -v l="$lb" 'BEGIN {exit !(p != "-" && l != "-" && l >= 95 && p < 90)}'; then
      echo "- NOTE: $t: the load CPU ($LOAD_CPU) was ${lb}% busy and the proxy's ($PROXY_CPU) ${pb}% (medians): the load side limited its req/s; compare CPU µs/req"
    fi
  done
  echo
}

# --- lat: paced load at LAT_LOAD% of busbar's max rate against direct, nginx, busbar, one
# table per shape in LAT_SHAPES: get (GET /), post1k (POST 1 KiB, Content-Length), tls
# (GET over TLS, keep-alive), paced by wrk + paced.lua; h2c (GET / over h2c) and h2tls
# (GET / over TLS, ALPN h2), paced by h2pace, HAProxy measured too. busbar's max rate is
# its median in the shape's own scenario when that ran earlier in this run, else one wrk
# (h2load for the HTTP/2 shapes) run just before.
LRAW="$DIR/latency.tsv"   # shape target round achieved p50 p99 p999 max requests errors send_p99 (h2pace; "-" for wrk) backend_accepts listen_overflows
# The backend's accepted connections so far (stub_status: GET /post), and the machine's
# listen-queue overflows so far (0 when nstat is missing).
backend_accepts() {
  curl -s --max-time 2 "http://127.0.0.1:$P_BACKEND/post" | awk 'NR == 3 {print $1; f = 1} END {if (!f) print 0}'
}
listen_overflows() {
  { nstat -az TcpExtListenOverflows 2>/dev/null || true; } | awk '$1 == "TcpExtListenOverflows" {print $2; f = 1} END {if (!f) print 0}'
}
run_latency() {
  local shape
  : >"$LRAW"
  for shape in $LAT_SHAPES; do latency_shape "$shape"; done
}
latency_shape() {  # shape
  local shape=$1 sc title body="" path=/ scheme=http pd pn ph="" pb key max src rate t r i out p n
  local targets=(direct nginx busbar) kind=paced maxkind=wrk conns=$CONNS
  case $shape in
    get) sc=a; title="GET /"; pd=$P_BACKEND pn=$P_NGINX pb=$P_BUSBAR
         # bare pingora, when built: how much of busbar's latency is pingora's own.
         [[ -n ${BARE_PID:-} ]] && targets+=(bare-pingora) ;;
    post1k) sc=post1k; title="POST /post, 1 KiB body (Content-Length)"; body=1024; path=/post
            pd=$P_BACKEND pn=$P_NGINX pb=$P_BUSBAR ;;
    tls) sc=tls; title="GET / over TLS, keep-alive"; scheme=https
         pd=$P_BACKEND_TLS pn=$P_NGINX_TLS pb=$P_BUSBAR_TLS ;;
    h2c|h2tls)
         kind=h2paced maxkind=h2 conns=$H2_CONNS targets=(direct nginx haproxy busbar)
         if [[ $shape = h2c ]]; then
           sc=d; title="GET / over h2c (HTTP/2, prior knowledge)"
           pd=$P_BACKEND_H2 pn=$P_NGINX_H2 ph=$P_HAPROXY_H2 pb=$P_BUSBAR
         else
           sc=h2tls; title="GET / over HTTP/2 with TLS (ALPN h2)"; scheme=https
           pd=$P_BACKEND_TLS pn=$P_NGINX_TLS ph=$P_HAPROXY_TLS pb=$P_BUSBAR_TLS
         fi ;;
  esac
  key="lat-$shape"
  n=${#targets[@]}
  echo "## latency under load: ${LAT_LOAD}% of busbar's max rate, $title"
  echo
  if [[ -n ${M_RPS[$sc/busbar]:-} && ${M_RPS[$sc/busbar]} != - ]]; then
    max=${M_RPS[$sc/busbar]}; src="busbar's median in ($sc) of this run"
  else
    deftarget "$key" max "$pb" "$BUSBAR_PID" "$maxkind" "$path" "$scheme"
    [[ -n $body ]] && T_SCRIPT[$key/max]="$LIB/body.lua" T_SCRIPT_ARGS[$key/max]="$body length"
    out=$(run_load "$key/max" "$DURATION") || die "$maxkind failed measuring busbar's max rate ($shape): $out"
    if [[ $maxkind = h2 ]]; then
      max=$(awk '/^finished in/ {gsub(/,/, "", $4); print $4}' <<<"$out")
      src="one ${DURATION}s h2load -c$H2_CONNS -m$H2_STREAMS run against busbar just before"
    else
      max=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
      src="one ${DURATION}s wrk -c$CONNS run against busbar just before"
    fi
  fi
  rate=$(awk -v m="$max" -v p="$LAT_LOAD" 'BEGIN {printf "%.0f", m * p / 100}')
  ((rate >= 1)) || die "busbar's max rate ($max, $shape) is too low to pace"
  echo "- busbar max: $(printf '%.0f' "$max") req/s ($src); paced rate: $rate req/s"
  echo "- rounds: $LAT_ROUNDS × ${LAT_DURATION}s per target, order rotated each round; median per target"
  if [[ $kind = h2paced ]]; then
    echo "- load: h2pace (testkit) --conns $conns --duration $LAT_DURATION$([[ $scheme = https ]] && echo " https://localhost:PORT/ (TLS, ALPN h2, SNI localhost; direct: the backend's TLS listener with http2)" || echo " (h2c prior knowledge; direct: the backend's own h2c listener)"): a Poisson stream at $rate req/s over $conns HTTP/2 connections (each connection its own Poisson stream, mean gap $conns/$rate s; every request its own stream, many in flight on a connection), sent by a pacer thread on the kernel's high-resolution timer; latency from the *scheduled* send time to the end of the answer, so a late send counts its lateness (no coordinated omission); nearest-rank percentiles over every answered request (µs)"
    echo "- proxies: those of ($sc): nginx \`listen … $([[ $scheme = https ]] && echo "ssl http2" || echo http2)\`, HAProxy \`bind … $([[ $scheme = https ]] && echo "ssl crt … alpn h2,http/1.1" || echo "proto h2")\`, busbar $([[ $scheme = https ]] && echo "\`[listen] tls\`" || echo "h2c on its HTTP port"); upstream HTTP/1.1 keep-alive to the backend"
  else
    echo "- load: wrk -t1 -c$CONNS -d${LAT_DURATION}s -s paced.lua${body:+ (with a $body-byte POST body)}$([[ $scheme = https ]] && echo ", https:// (TLS keep-alive; direct: the backend's TLS listener)"): each connection waits an exponential random time (mean $CONNS/$rate s) before each request, so the connections send a Poisson stream at ~$rate req/s out of phase (h2load --rps fires all clients in step and prints no percentiles); latency from wrk's histogram (exact µs, from the moment wrk writes the request)"
  fi
  echo
  deftarget "$key" direct "$pd" "" "$kind" "$path" "$scheme"
  deftarget "$key" nginx "$pn" "$NGINX_PID" "$kind" "$path" "$scheme"
  [[ -n $ph ]] && deftarget "$key" haproxy "$ph" "$HAPROXY_PID" "$kind" "$path" "$scheme"
  deftarget "$key" busbar "$pb" "$BUSBAR_PID" "$kind" "$path" "$scheme"
  # BUSBAR_BASE: the earlier build paced the same way, rounds interleaved.
  if [[ -n ${BASE_PID:-} ]]; then
    targets+=(busbar@base); n=${#targets[@]}
    deftarget "$key" busbar@base "$([[ $scheme = https ]] && echo "$P_BASE_TLS" || echo "$P_BASE")" "$BASE_PID" "$kind" "$path" "$scheme"
  fi
  [[ " ${targets[*]} " = *" bare-pingora "* ]] && deftarget "$key" bare-pingora "$P_BARE" "$BARE_PID" paced
  for t in "${targets[@]}"; do T_SCRIPT_ARGS[$key/$t]="$rate $conns $body"; done
  for ((r = 1; r <= LAT_ROUNDS; r++)); do
    for ((i = 0; i < n; i++)); do
      t=${targets[$(((i + r - 1) % n))]}
      # What the round cost the backend: connections it accepted (nginx's stub_status,
      # which the backend serves for GET /post) and SYNs or handshakes dropped past a
      # full listen queue anywhere on the machine (TcpExtListenOverflows; the backend's
      # queue is nginx's default 511).
      local acc0 ovf0
      acc0=$(backend_accepts); ovf0=$(listen_overflows)
      out=$(run_load "$key/$t" "$LAT_DURATION" 2>&1) || die "paced $kind failed against $t ($shape): $out"
      local accepted=$(($(backend_accepts) - acc0)) overflows=$(($(listen_overflows) - ovf0))
      echo "$out" >"$DIR/out-$key-$t-$r.txt"
      check_servers
      local achieved errs late=""
      if [[ $kind = h2paced ]]; then
        # H2PACE asked=… achieved=… requests=… errors=… p50=… p90=… p99=… p99.9=… max=… send_p99=…
        p=$(awk '/^H2PACE / {for (i = 2; i <= NF; i++) {split($i, kv, "="); v[kv[1]] = kv[2]}
                 print v["p50"], v["p99"], v["p99.9"], v["max"], v["requests"], v["achieved"], v["errors"], v["send_p99"]}' <<<"$out")
        [[ -n $p ]] || die "could not parse h2pace output for $t ($shape): $out"
        read -r p50 p99 p999 pmax reqs achieved errs late <<<"$p"
        [[ $reqs -gt 0 ]] || die "h2pace: no request answered by $t ($shape): $out"
      else
        p=$(awk '/^PACED / {print $2, $3, $4, $5, $6}' <<<"$out")
        [[ -n $p ]] || die "could not parse paced wrk output for $t ($shape): $out"
        achieved=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
        errs=$(awk '/Non-2xx or 3xx responses:/ {e += $NF}
                    /Socket errors:/ {for (i = 3; i <= NF; i += 2) {g = $(i + 1); gsub(/,/, "", g); e += g}}
                    END {print e + 0}' <<<"$out")
        read -r p50 p99 p999 pmax reqs <<<"$p"
      fi
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$shape" "$t" "$r" "$achieved" "$p50" "$p99" "$p999" "$pmax" "$reqs" "$errs" "${late:--}" "$accepted" "$overflows" >>"$LRAW"
      printf 'bench: (lat %s) round %d %-8s %8s req/s  p50 %6s us  p99 %6s us  p99.9 %6s us  max %6s us  errors %s%s  backend accepted %s  listen overflows %s\n' \
        "$shape" "$r" "$t" "$achieved" "$p50" "$p99" "$p999" "$pmax" "$errs" "${late:+  send p99 $late us}" "$accepted" "$overflows" >&2
    done
  done
  lmed() { awk -F'\t' -v s="$shape" -v t="$1" -v c="$2" '$1 == s && $2 == t {print $c}' "$LRAW" | median_of; }
  local d99 b99
  d99=$(lmed direct 6)
  echo "| target | asked req/s | achieved req/s | p50 | p99 | p99.9 | max | p99 added over direct |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  for t in "${targets[@]}"; do
    printf '| %s | %s | %.0f | %s | %s | %s | %s | %s |\n' "$t" "$rate" "$(lmed "$t" 4)" \
      "$(fmt_us "$(lmed "$t" 5)")" "$(fmt_us "$(lmed "$t" 6)")" "$(fmt_us "$(lmed "$t" 7)")" \
      "$(fmt_us "$(lmed "$t" 8)")" \
      "$([[ $t = direct ]] && echo - || fmt_us "$(awk -v a="$(lmed "$t" 6)" -v b="$d99" 'BEGIN {print a - b}')")"
  done
  echo
  b99=$(lmed busbar 6)
  if [[ $kind = h2paced ]]; then
    echo "- added p99 = the target's p99 − direct's p99 (medians of $LAT_ROUNDS rounds' p99s); direct: the backend nginx's own HTTP/2 listener, so a proxy's figure is what it adds over the backend reached without it"
    echo "- the generator's own lateness (h2pace's send_p99: how late requests were handed to h2, already inside the figures above; median of the rounds): $(for t in "${targets[@]}"; do printf '%s %s; ' "$t" "$(fmt_us "$(lmed "$t" 11)")"; done | sed 's/; $//') — far above ~100 µs means the load CPU was short"
    echo "- issue 21 (report the added p99 at ${LAT_LOAD}% load): busbar $(fmt_us "$(awk -v a="$b99" -v b="$d99" 'BEGIN {print a - b}')"), nginx $(fmt_us "$(awk -v a="$(lmed nginx 6)" -v b="$d99" 'BEGIN {print a - b}')"), HAProxy $(fmt_us "$(awk -v a="$(lmed haproxy 6)" -v b="$d99" 'BEGIN {print a - b}')")"
  else
    echo "- goal (issue $([[ $shape = get ]] && echo 7 || echo 20)): busbar's added p99 under 1 ms; this run: $(fmt_us "$(awk -v a="$b99" -v b="$d99" 'BEGIN {print a - b}')") (median of $LAT_ROUNDS rounds' p99s)"
  fi
  echo "- connections the backend accepted per round (median; the proxy's new upstream connections, h2pace's own 16 for direct) and listen-queue overflows over all rounds (TcpExtListenOverflows, machine-wide): $(for t in "${targets[@]}"; do printf '%s %s, %s; ' "$t" "$(lmed "$t" 12)" "$(awk -F'\t' -v s="$shape" -v t="$t" '$1 == s && $2 == t {o += $13} END {print o + 0}' "$LRAW")"; done | sed 's/; $//')"
  awk -F'\t' -v s="$shape" '$1 == s && $10 > 0 {e[$2] += $10} END {for (t in e) printf "- WARNING: %s had %d errors\n", t, e[t]}' "$LRAW"
  echo
}

# --- mem and tlsmem: fresh processes, RSS idle, with MEM_CONNS idle keep-alive
# connections, and 2 s and 10 s after they closed. mem: busbar with the (a) config (bare
# pingora too when built, to tell pingora's share from busbar's), plaintext. tlsmem: the
# TLS_MEM targets (busbar, nginx, HAProxy) with a TLS listener, connections over TLS.
# The servers stay up (idle) until the end of the run.
rss_sum() {  # pid field -> kB over the process and its children (nginx master + worker)
  local p total=0 v
  for p in "$1" $(pgrep -P "$1" 2>/dev/null); do
    v=$(kib "$p" "$2" 2>/dev/null) || v=0
    total=$((total + ${v:-0}))
  done
  echo "$total"
}
fd_count() {  # pid -> open fds over the process and its children
  local p n=0
  for p in "$1" $(pgrep -P "$1" 2>/dev/null); do
    n=$((n + $(find "/proc/$p/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)))
  done
  echo "$n"
}
mem_one() {  # name plain|tls|h2 -> prints a table row; starts the server, loads it, leaves it running
  local name=$1 mode=$2 d="$DIR/mem-$1-$2" port tport pid ready opened ok failed secs i rss0 rss1 rss2 rss10 hwm fds fds10 cpid
  local url tlsargs=() wait_s=60 conns=$MEM_CONNS cap=""
  ready="$d/ready"
  take_port port tport
  mkdir -p "$d"
  case $name in
    busbar)
      busbar_config "busbar-mem-$mode" "$port" off "$([[ $mode = tls ]] && echo "$tport")" <<<"$ONE_ROUTE"
      start_busbar "busbar-mem-$mode" ;;
    bare-pingora)
      (cd "$d" && exec taskset -c "$PROXY_CPU" "$BARE" "127.0.0.1:$port" "127.0.0.1:$P_BACKEND" 1) \
        >"$d/stdout.log" 2>"$d/stderr.log" &
      LAST_PID=$!
      PIDS+=("$LAST_PID")
      SERVER[$LAST_PID]=mem-$name-$mode ;;
    nginx)   # the proxy of (a) with a TLS listener, room for the connections
      start_nginx "nginx-mem-$mode" "$PROXY_CPU" "$NGINX_PROXY_UPSTREAM
    server {
        listen 127.0.0.1:$port$([[ $mode = h2 ]] && echo " http2");
        listen 127.0.0.1:$tport ssl; $(nginx_tls)
        location / {$NGINX_PROXY_LOCATION
        }
    }" $((conns + 1000)) ;;
    haproxy)
      # HAProxy reserves two fds per connection (maxconn) and refuses to start when the
      # open-files limit is lower; without CAP_SYS_RESOURCE it cannot raise the hard
      # limit, so it holds fewer connections then (per connection stays comparable).
      local hard
      hard=$(ulimit -Hn)
      if [[ $hard != unlimited ]] && ((2 * (conns + 1000) + 100 > hard)); then
        cap=$(((hard - 100) / 2))
        conns=$((cap - 100))
        MEM_NOTE+=("$name: $conns connections, not $MEM_CONNS: its maxconn $cap needs 2 fds each and the open-files hard limit here is $hard")
      fi
      start_haproxy "haproxy-mem-$mode" "frontend fe
    bind 127.0.0.1:$port$([[ $mode = h2 ]] && echo " proto h2")
    bind 127.0.0.1:$tport ssl crt $CERT_KEY
$(haproxy_forwarding '%[ssl_fc,iif(https,http)]')
    default_backend be

backend be
    server b1 127.0.0.1:$P_BACKEND" "${cap:-$((conns + 1000))}" ;;
  esac
  pid=$LAST_PID
  if [[ $mode = tls ]]; then
    url="https://127.0.0.1:$tport/"; tlsargs=(--tls "$CA"); wait_s=180; port=$tport
    wait_ready "$name-mem-tls" "$pid" "$url" --cacert "$CA"
  elif [[ $mode = h2 ]]; then
    tlsargs=(--h2)
    wait_ready "$name-mem-h2" "$pid" "http://127.0.0.1:$port/" --http2-prior-knowledge
  else
    wait_ready "$name-mem" "$pid" "http://127.0.0.1:$port/"
  fi
  sleep 1
  rss0=$(rss_sum "$pid" VmRSS)
  taskset -c "$LOAD_CPU" python3 "$LIB/idle-conns.py" "$port" "$conns" "$ready" 300 "${tlsargs[@]}" \
    >"$d/conns.log" 2>&1 &
  cpid=$!
  PIDS+=("$cpid")
  for ((i = 0; i < wait_s * 10; i++)); do
    [[ -e $ready ]] && break
    kill -0 "$cpid" 2>/dev/null || die "idle-conns.py exited early: $(cat "$d/conns.log")"
    sleep 0.1
  done
  [[ -e $ready ]] || die "idle-conns.py did not open $conns connections to $name within $wait_s s"
  read -r opened ok failed secs <"$ready"
  sleep 2   # let the server settle with the connections idle
  rss1=$(rss_sum "$pid" VmRSS)
  fds=$(fd_count "$pid")
  kill -TERM "$cpid" 2>/dev/null || true
  wait "$cpid" 2>/dev/null || true
  sleep 2
  rss2=$(rss_sum "$pid" VmRSS)
  sleep 8
  rss10=$(rss_sum "$pid" VmRSS); hwm=$(rss_sum "$pid" VmHWM); fds10=$(fd_count "$pid")
  printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s (%s failed; %s fds, %s after; opened in %ss) |\n' "$name" "$(mib "$rss0")" "$(mib "$rss1")" \
    "$(awk -v a="$rss1" -v b="$rss0" -v n="$opened" 'BEGIN {if (n > 0) printf "%.1f KiB", (a - b) / n; else print "-"}')" \
    "$(mib "$rss2")" "$(mib "$rss10")" "$(ratio "$rss10" "$rss0")" "$(mib "$hwm")" "$opened" "$failed" "$fds" "$fds10" "$secs"
  MEM_RSS0[$mode/$name]=$rss0; MEM_RSS1[$mode/$name]=$rss1; MEM_RSS10[$mode/$name]=$rss10
  MEM_OPENED[$mode/$name]=$opened; MEM_WANT[$mode/$name]=$conns
}
declare -A MEM_RSS0 MEM_RSS1 MEM_RSS10 MEM_OPENED MEM_WANT
MEM_NOTE=()
mem_table_head() {
  echo "| target | idle VmRSS | VmRSS with the connections | per connection | 2 s after they closed | 10 s after they closed | 10 s after ÷ idle | VmHWM | connections held |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
}
mem_goals() {  # mode issue
  local mode=$1 k
  [[ -n ${MEM_RSS1[$mode/busbar]:-} ]] && echo "- goal (issue $2): $MEM_CONNS idle$([[ $mode = tls ]] && echo " TLS")$([[ $mode = h2 ]] && echo " h2c") keep-alive connections under 100 MiB RSS (goal stated for 10,000); busbar this run: $(mib "${MEM_RSS1[$mode/busbar]}")"
  [[ -n ${MEM_RSS1[$mode/busbar]:-} ]] && echo "- goal (issue 20): 10 s after the connections closed, RSS within 20% of idle; busbar this run: $(ratio "${MEM_RSS10[$mode/busbar]}" "${MEM_RSS0[$mode/busbar]}")× idle"
  for k in "${!MEM_OPENED[@]}"; do
    [[ $k = "$mode/"* && ${MEM_OPENED[$k]} != "${MEM_WANT[$k]}" ]] && echo "- WARNING: ${k#*/}: only ${MEM_OPENED[$k]} of ${MEM_WANT[$k]} connections were held"
  done
  for k in "${MEM_NOTE[@]}"; do echo "- NOTE: $k"; done
  MEM_NOTE=()
  return 0
}
run_memory() {
  echo "## memory: RSS idle and with $MEM_CONNS idle keep-alive connections"
  echo
  echo "- each target started fresh: busbar with the (a) config (threads=1, one route, access log off)$( ((HAVE_BARE)) && echo "; bare-pingora (1 thread) for pingora's own share")"
  echo "- connections from load-tests/bench-lib/idle-conns.py (asyncio, on CPU $LOAD_CPU): each sends one GET / and stays open, idle; RSS read 2 s after the last one answered, then 2 s and 10 s after the script closed them; VmRSS/VmHWM from /proc/<pid>/status"
  echo
  mem_table_head
  mem_one busbar plain
  ((HAVE_BARE)) && mem_one bare-pingora plain
  echo
  mem_goals plain 7
  echo "- 100,000 users tracked by admission: load-tests/admission-bench.sh (peak RSS per target)"
  echo
}
run_tls_memory() {
  local t
  echo "## memory over TLS: RSS idle and with $MEM_CONNS idle TLS keep-alive connections"
  echo
  echo "- each target started fresh with a TLS listener (the run's ECDSA P-256 certificate): busbar with the (a) config and \`[listen] tls\`; nginx 1 worker, the (a) proxy; HAProxy nbthread 1, \`bind … ssl crt\`; each allows $((MEM_CONNS + 1000)) connections"
  echo "- connections from idle-conns.py --tls (asyncio + Python's ssl, OpenSSL defaults, verifying against the run's CA; on CPU $LOAD_CPU): each completes a handshake, sends one GET / and stays open, idle; RSS read 2 s after the last one answered, then 2 s and 10 s after they closed; nginx: master + worker summed (VmHWM too: the sum of each one's peak)"
  echo
  mem_table_head
  for t in $TLSMEM_TARGETS; do mem_one "$t" tls; done
  echo
  mem_goals tls 20
  echo
}

run_h2_memory() {
  local t
  echo "## memory over HTTP/2: RSS idle and with $MEM_CONNS idle h2c connections"
  echo
  echo "- each target started fresh: busbar with the (a) config (h2c with prior knowledge on its HTTP port); nginx 1 worker, the (a) proxy with \`listen … http2\`; HAProxy nbthread 1, \`bind … proto h2\`; each allows $((MEM_CONNS + 1000)) connections"
  echo "- connections from idle-conns.py --h2 (asyncio, on CPU $LOAD_CPU): each sends the client preface and SETTINGS, acknowledges the server's, sends one GET / on stream 1 and reads it to its end, then stays open, idle (answering PINGs); RSS read 2 s after the last one answered, then 2 s and 10 s after they closed; nginx: master + worker summed"
  echo
  mem_table_head
  for t in $TLSMEM_TARGETS; do mem_one "$t" h2; done
  echo
  mem_goals h2 21
  echo
}

BUSY=$(busy_pct)
((BUSY <= 10)) || log "WARNING: the machine is ${BUSY}% busy before the run; numbers will be noisy"

MODEL=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
START=$(date +%s)
echo "# busbar bench — $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo
echo "- machine: $NCPU CPUs (nproc), $MODEL; kernel $(uname -r)"
echo "- versions: $(nginx -v 2>&1 | sed 's/^nginx version: //'), HAProxy $(haproxy -v | awk 'NR==1 {print $3}'), $(wrk -v 2>&1 | awk 'NR==1 {print $1, $2}'), $(h2load --version 2>/dev/null | head -1 || echo 'h2load: none'), $("$BUSBAR" --version 2>/dev/null || echo busbar)"
GIT_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n $(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]] && GIT_REV="$GIT_REV + uncommitted changes"
echo "- busbar: $BUSBAR (git $GIT_REV, binary built $(date -u -r "$BUSBAR" '+%Y-%m-%d %H:%M UTC'))"
((HAVE_BARE)) && echo "- bare-pingora: $BARE (built $(date -u -r "$BARE" '+%Y-%m-%d %H:%M UTC'))"
((HAVE_LEAN)) && echo "- lean-proxy: $LEAN (built $(date -u -r "$LEAN" '+%Y-%m-%d %H:%M UTC'))"
echo "- scenarios: $SCENARIOS (estimated ${EST}s)"
echo "- pinning: proxy under test on CPU $PROXY_CPU (taskset); backend nginx (1 worker) and the load generator on CPU $LOAD_CPU"
forwarding_report "nginx and HAProxy"
echo "- rounds: $ROUNDS × ${DURATION}s per target, order rotated each round; median per target; warm-up ${WARMUP}s per target"
echo "- machine busy before the run (2 s sample, all CPUs): ${BUSY}%; loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

for s in $SCENARIOS; do
  case $s in
    lat) run_latency ;;
    mem) run_memory ;;
    tlsmem) run_tls_memory ;;
    h2mem) run_h2_memory ;;
    *) run_scenario "$s" ;;
  esac
done

BUSY_END=$(busy_pct)
echo "## run"
echo
echo "- took $(($(date +%s) - START)) s; machine busy after the run (2 s sample): ${BUSY_END}%; loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)"
((BUSY <= 10 && BUSY_END <= 10)) || echo "- WARNING: something else was using the CPUs; rerun on a quiet machine"
if [[ -n ${BUSBARLOG_PID:-} && " ${SC_TARGETS[a]:-} " = *" busbar+log "* ]]; then
  echo "- busbar+log wrote $(wc -l <"$DIR/busbar+log/access.log" 2>/dev/null || echo 0) access-log lines"
fi
if [[ -n ${ALL_PID:-} ]]; then
  echo "- busbar+all wrote $(wc -l <"$DIR/busbar+all/access.log" 2>/dev/null || echo 0) access-log lines; its non-zero counters over the run (warm-up included):"
  m=$(curl -fsS --max-time 5 "http://127.0.0.1:${ADMIN_PORT[busbar+all]}/metrics" || true)
  { grep -E '^busbar_(admission_decisions_total|requests_total)' <<<"$m" | grep -v ' 0$' || echo "(no non-zero admission/request counters in /metrics)"; } \
    | head -12 | sed 's/^/    /'
fi
for r in "${!TRACE_PID[@]}"; do
  m=$(curl -fsS --max-time 5 "http://127.0.0.1:${ADMIN_PORT[busbar+trace$r]}/metrics" || true)
  echo "- busbar+trace$r spans over the run (warm-up included): $(grep -E '^busbar_trace_spans_[a-z_]+_total ' <<<"$m" | sed 's/^busbar_trace_spans_//; s/_total / /' | tr '\n' ' ')"
done
for name in bare-pingora busbar busbar+log busbar+all busbar-1k busbar@base busbar+all@base busbar-upstls busbar-upstls@base busbar-mem-plain busbar-mem-tls mem-bare-pingora-plain; do
  if [[ -s $DIR/$name/stderr.log ]]; then
    echo "- $name stderr ($(wc -l <"$DIR/$name/stderr.log") lines), first lines:"
    head -5 "$DIR/$name/stderr.log" | sed 's/^/    /'
  fi
done
echo "- per-round numbers: on stderr (and in results.tsv / latency.tsv in the temp dir with KEEP_TMP=1)"
