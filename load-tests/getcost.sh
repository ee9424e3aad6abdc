#!/usr/bin/env bash
# Instructions per request through busbar's HTTP/1.1 engine (issue 20), under callgrind.
#
# busbar (target/release/busbar, threads = 1, one route, access log off) runs under
# `valgrind --tool=callgrind` in front of a `busbar demo` backend (not under valgrind).
# For each shape: a warm-up, `callgrind_control -z`, `h2load --h1 -c$CONNS -n$REQUESTS`,
# `callgrind_control --dump`, and total Ir ÷ requests. An instruction count does not
# change with the load on the machine, so before/after figures compare on a busy box.
#
#   SHAPES="get post1k"   get: GET /; post1k: POST /post with a 1 KiB body (Content-Length);
#                         upstls: GET /upstls to an HTTPS upstream (needs nginx and openssl:
#                         an nginx TLS backend, not under callgrind, answers "ok"; busbar
#                         `protocol = "https"` verifying it against a CA made for the run,
#                         nginx `proxy_pass https://` with keepalive and session reuse)
#   REQUESTS=20000        requests per measured run (all must answer 2xx)
#   WARMUP=2000           requests per shape before the counters are zeroed
#   CONNS=16              h2load connections (-c)
#   NGINX=0               1: nginx (one worker, `master_process off`, upstream keepalive
#                         64, same backend) under callgrind the same way, for comparison;
#                         it adds the forwarding headers busbar adds (`nginx_forwarding`,
#                         bench-lib/common.sh; FORWARDING=0: none)
#   BUSBAR=target/release/busbar   the binary measured (and the demo backend)
#   KEEP_TMP=0            1: keep the temp dir (dumps: callgrind-<server>-<shape>.out;
#                         read them with `callgrind_annotate --inclusive=yes FILE`)
#
# Every server binds 127.0.0.1 on ports picked at run time, keeps its files in one
# `mktemp -d` dir, and is stopped by pid when the script exits (also on error or Ctrl-C).
set -euo pipefail

SHAPES=${SHAPES:-"get post1k"}
REQUESTS=${REQUESTS:-20000}
WARMUP=${WARMUP:-2000}
CONNS=${CONNS:-16}
NGINX=${NGINX:-0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUSBAR=${BUSBAR:-target/release/busbar}
[[ $BUSBAR = /* ]] || BUSBAR="$ROOT/$BUSBAR"

BENCH_NAME="getcost"
# shellcheck source-path=SCRIPTDIR source=bench-lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib/common.sh"

for tool in h2load valgrind callgrind_control curl python3 awk; do
  command -v "$tool" >/dev/null 2>&1 \
    || die "$tool not found (apt-get install -y nghttp2-client valgrind curl python3)"
done
[[ $NGINX = 1 ]] && { command -v nginx >/dev/null 2>&1 || die "nginx not found (NGINX=1)"; }
[[ -x $BUSBAR ]] || die "$BUSBAR not found: cargo build --release"
for v in REQUESTS WARMUP CONNS; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -ge 1 ]] || die "$v must be a whole number >= 1"
done
[[ ${FORWARDING:=1} =~ ^[01]$ ]] || die "FORWARDING must be 0 or 1"
UPSTLS=0
for s in $SHAPES; do
  case $s in
    get | post1k) ;;
    upstls) UPSTLS=1 ;;
    *) die "SHAPES: unknown shape '$s' (known: get post1k upstls)" ;;
  esac
done
if ((UPSTLS)); then
  for tool in nginx openssl; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (SHAPES=upstls: apt-get install -y nginx-light openssl)"
  done
fi

make_temp_dir
read -r P_DEMO P_BUSBAR P_ADMIN P_REG P_NGINX P_TLSB <<<"$(free_ports 6)"

# `wait_for` (bench-lib/common.sh): busbar starts slowly under valgrind.
WAIT_S=120

head -c 1024 /dev/zero | tr '\0' x >body1k

# --- the backend: `busbar demo` (answers every request with a small JSON document).
"$BUSBAR" demo -l "127.0.0.1:$P_DEMO" >demo.log 2>&1 &
DEMO_PID=$!
PIDS+=("$DEMO_PID")
wait_for demo "$DEMO_PID" curl -fsS --max-time 1 "http://127.0.0.1:$P_DEMO/"

# As root, nginx workers stay root (the 0700 temp dir): only on loopback, this run.
NGINX_USER=""
[[ $(id -u) = 0 ]] && NGINX_USER="user root;"

# --- upstls: an nginx TLS backend (not measured), one worker, answering "ok".
TLS_ROUTE=""
NGINX_UPSTLS=""
if ((UPSTLS)); then
  make_tls_material "$DIR/tls"
  mkdir -p tlsb
  {
    echo "$NGINX_USER"
    echo "worker_processes 1;"
    echo "error_log $DIR/tlsb/error.log warn;"
    echo "events { worker_connections 4096; }"
    echo "http {"
    echo "  access_log off;"
    nginx_temp_paths "$DIR/tlsb"
    echo "  keepalive_requests 1000000;"
    echo "  server {"
    echo "    listen 127.0.0.1:$P_TLSB ssl;"
    echo "    ssl_certificate $DIR/tls/cert.pem; ssl_certificate_key $DIR/tls/key.pem;"
    echo "    ssl_protocols TLSv1.2 TLSv1.3;"
    echo "    location / { return 200 \"ok\\n\"; }"
    echo "  }"
    echo "}"
  } >tlsb/nginx.conf
  env -u NGINX nginx -t -q -p "$DIR/tlsb" -c "$DIR/tlsb/nginx.conf" -e "$DIR/tlsb/error.log" \
    -g "daemon off; pid $DIR/tlsb/nginx.pid;" || die "nginx config invalid: $DIR/tlsb/nginx.conf"
  env -u NGINX nginx -p "$DIR/tlsb" -c "$DIR/tlsb/nginx.conf" -e "$DIR/tlsb/error.log" \
    -g "daemon off; pid $DIR/tlsb/nginx.pid;" >tlsb/stdout.log 2>&1 &
  TLSB_PID=$!
  PIDS+=("$TLSB_PID")
  wait_for tls-backend "$TLSB_PID" curl -fsS --max-time 1 --cacert "$DIR/tls/ca.pem" \
    "https://localhost:$P_TLSB/" --resolve "localhost:$P_TLSB:127.0.0.1"
  TLS_ROUTE="
[[service]]
name = \"tls\"
balance = \"round_robin\"
protocol = \"https\"
endpoints = [{ addr = \"127.0.0.1:$P_TLSB\" }]

[service.tls]
ca_file = \"$DIR/tls/ca.pem\"
server_name = \"localhost\"

[[route]]
name = \"tls\"
path_prefix = \"/upstls\"
service = \"tls\"
"
  NGINX_UPSTLS="
    upstream backend_tls { server 127.0.0.1:$P_TLSB; keepalive 64; keepalive_requests 1000000; }"
  NGINX_UPSTLS_LOCATION="
    location /upstls { proxy_pass https://backend_tls; proxy_http_version 1.1;
                       proxy_set_header Connection \"\"; proxy_ssl_session_reuse on;
                       proxy_ssl_server_name on; proxy_ssl_name localhost; proxy_ssl_verify on;
                       proxy_ssl_trusted_certificate $DIR/tls/ca.pem;
                       $(nginx_forwarding)}"
fi

# --- busbar: one thread, one route (and upstls's), access log off, under callgrind.
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
name = "bench"
balance = "round_robin"
endpoints = [{ addr = "127.0.0.1:$P_DEMO" }]

$TLS_ROUTE
[[route]]
name = "all"
service = "bench"
EOF
"$BUSBAR" check busbar/busbar.toml >busbar/check.log 2>&1 \
  || { cat busbar/check.log >&2; die "busbar check failed for $DIR/busbar/busbar.toml"; }
BUSBAR_ADMIN_TOKEN="bench-$RANDOM$RANDOM" valgrind --tool=callgrind \
  --callgrind-out-file="$DIR/busbar/callgrind.out" "$BUSBAR" run -c busbar/busbar.toml \
  >busbar/stdout.log 2>busbar/stderr.log &
BUSBAR_PID=$!
PIDS+=("$BUSBAR_PID")
wait_for busbar "$BUSBAR_PID" curl -fsS --max-time 1 "http://127.0.0.1:$P_BUSBAR/"

# --- nginx (NGINX=1): one process (`master_process off`), under callgrind.
NGINX_PID=""
if [[ $NGINX = 1 ]]; then
  mkdir -p nginx
  {
    echo "$NGINX_USER"
    echo "master_process off;"
    echo "worker_processes 1;"
    echo "error_log $DIR/nginx/error.log warn;"
    echo "events { worker_connections 4096; }"
    echo "http {"
    echo "  access_log off;"
    nginx_temp_paths "$DIR/nginx"
    echo "  keepalive_requests 1000000;"
    echo "  keepalive_timeout 75s;"
    echo "  upstream backend { server 127.0.0.1:$P_DEMO; keepalive 64; keepalive_requests 1000000; }"
    echo "$NGINX_UPSTLS"
    echo "  server {"
    echo "    listen 127.0.0.1:$P_NGINX;"
    echo "    client_body_buffer_size 128k;"
    echo "    location / { proxy_pass http://backend; proxy_http_version 1.1;"
    echo "                 proxy_set_header Connection \"\"; proxy_request_buffering off;"
    echo "                 $(nginx_forwarding)}"
    echo "${NGINX_UPSTLS_LOCATION:-}"
    echo "  }"
    echo "}"
  } >nginx/nginx.conf
  # nginx reads an environment variable NGINX (inherited sockets): not ours.
  env -u NGINX nginx -t -q -p "$DIR/nginx" -c "$DIR/nginx/nginx.conf" -e "$DIR/nginx/error.log" \
    -g "daemon off; pid $DIR/nginx/nginx.pid;" || die "nginx config invalid: $DIR/nginx/nginx.conf"
  env -u NGINX valgrind --tool=callgrind --callgrind-out-file="$DIR/nginx/callgrind.out" \
    nginx -p "$DIR/nginx" -c "$DIR/nginx/nginx.conf" -e "$DIR/nginx/error.log" \
    -g "daemon off; pid $DIR/nginx/nginx.pid;" >nginx/stdout.log 2>&1 &
  NGINX_PID=$!
  PIDS+=("$NGINX_PID")
  wait_for nginx "$NGINX_PID" curl -fsS --max-time 1 "http://127.0.0.1:$P_NGINX/"
fi

# h2load against PORT for SHAPE with N requests; prints its output.
load() {  # port shape n
  local args=(--h1 "-c$CONNS" "-n$3")
  [[ $2 = post1k ]] && args+=(-d body1k)
  local path=/
  [[ $2 = post1k ]] && path=/post1k
  [[ $2 = upstls ]] && path=/upstls
  h2load "${args[@]}" "http://127.0.0.1:$1$path" 2>&1
}

# Instructions per request of server NAME (pid PID, port PORT, dumps in DIR/NAME) for SHAPE.
measure() {  # name pid port shape
  local name=$1 pid=$2 port=$3 shape=$4 out before dump ok total i
  dumps() { local f=("$name"/callgrind.out.*); [[ -e ${f[0]} ]] && echo ${#f[@]} || echo 0; }
  load "$port" "$shape" "$WARMUP" >/dev/null || die "warm-up of $name/$shape failed"
  callgrind_control -z "$pid" >/dev/null 2>&1 || die "callgrind_control -z $name failed"
  out=$(load "$port" "$shape" "$REQUESTS") || die "h2load failed against $name/$shape: $out"
  echo "$out" >"h2load-$name-$shape.txt"
  before=$(dumps)
  callgrind_control --dump="$shape" "$pid" >/dev/null 2>&1 || die "callgrind_control --dump $name failed"
  for ((i = 0; i < 100; i++)); do   # the dump is written asynchronously
    (($(dumps) > before)) && break
    sleep 0.2
  done
  dump=$(ls -t "$name"/callgrind.out.* 2>/dev/null | head -1 || true)
  [[ -n $dump ]] || die "no callgrind dump in $DIR/$name"
  ok=$(awk '/^status codes:/ {print $3}' <<<"$out")
  [[ $ok = "$REQUESTS" ]] || die "$name/$shape: $ok of $REQUESTS requests answered 2xx: $out"
  total=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
  cp "$dump" "callgrind-$name-$shape.out"
  awk -v a="$total" -v n="$REQUESTS" 'BEGIN {printf "%.0f", a / n}'
}

GIT_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n $(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]] \
  && GIT_REV="$GIT_REV + uncommitted changes"
echo "# busbar instructions per request, callgrind — $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo
echo "- busbar: $BUSBAR (git $GIT_REV, built $(date -u -r "$BUSBAR" '+%Y-%m-%d %H:%M UTC')), threads = 1, backend \`busbar demo\`"
echo "- per shape: $WARMUP warm-up requests, zero, \`h2load --h1 -c$CONNS -n$REQUESTS\`, dump"
echo
echo "| shape | busbar Ir/req | nginx Ir/req | busbar ÷ nginx |"
echo "|---|---:|---:|---:|"
for s in $SHAPES; do
  b=$(measure busbar "$BUSBAR_PID" "$P_BUSBAR" "$s")
  n="-"
  [[ -n $NGINX_PID ]] && n=$(measure nginx "$NGINX_PID" "$P_NGINX" "$s")
  log "$s: busbar $b, nginx $n instructions/request"
  printf '| %s | %s | %s | %s |\n' "$s" "$b" "$n" "$(ratio "$b" "$n")"
done
echo
echo "- dumps: callgrind-<server>-<shape>.out in $DIR (kept with KEEP_TMP=1)"
