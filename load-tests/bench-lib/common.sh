# shellcheck shell=bash
# Shared helpers for bench.sh, admission-bench.sh and grpc-bench.sh: sourced, not run.
#
# The script sets BENCH_NAME (the prefix of its messages and of its temp dir) and
# `set -euo pipefail` before sourcing this file. Sourcing only defines functions; the
# script calls make_temp_dir once its settings are checked.
#
# Nothing here is shared with load-tests/reliability/lib.sh, which has its own
# conventions (timestamped log lines, results in reliability/out/, plain SIGTERM cleanup).

die() { echo "$BENCH_NAME: $*" >&2; exit 1; }
log() { echo "$BENCH_NAME: $*" >&2; }

# Creates the run's temp dir DIR, starts the list PIDS of every process the script starts
# (it appends each pid), enters DIR (nothing we run leaves files in the caller's
# directory) and makes cleanup run on exit, error and Ctrl-C.
make_temp_dir() {
  DIR=$(mktemp -d "${TMPDIR:-/tmp}/busbar-$BENCH_NAME.XXXXXX")
  PIDS=()
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  cd "$DIR" || die "cannot enter $DIR"
}

# Stops every pid in PIDS: SIGTERM, up to 5 s for a clean exit, then SIGKILL. Keeps DIR
# when KEEP_TMP=1 or the script failed, removes it otherwise; exits with the script's code.
cleanup() {
  local rc=$? pid kids=() k i alive
  trap - EXIT INT TERM
  # nginx workers are children of their master: note them first, in case the master
  # has to be killed hard and leaves them behind.
  for pid in "${PIDS[@]}"; do
    for k in $(pgrep -P "$pid" 2>/dev/null); do kids+=("$k"); done
  done
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for ((i = 0; i < 50; i++)); do
    alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${PIDS[@]}" "${kids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid ($(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-80)) did not stop on SIGTERM; sending SIGKILL"
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

# N free loopback ports, all held open at once so none repeats.
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

# The sum of /proc/<pid>/stat fields (0-based from field 3, state) over a process and its
# children (nginx master + workers); 0 for "".
stat_sum() {  # pid index...
  local pid=$1 total=0 p f fields i
  shift
  [[ -n $pid ]] || { echo 0; return; }
  for p in "$pid" $(pgrep -P "$pid" 2>/dev/null); do
    f=$(cat "/proc/$p/stat" 2>/dev/null) || die "process $p is gone"
    f=${f##*) }                     # drop "pid (comm) ": field 3 (state) comes first
    read -r -a fields <<<"$f"
    for i in "$@"; do
      total=$((total + fields[i]))
    done
  done
  echo "$total"
}

# utime+stime ticks (fields 14 and 15); stime alone (the kernel's share: system calls and
# the loopback TCP work they do for the peer).
cpu_ticks() { stat_sum "$1" 11 12; }
sys_ticks() { stat_sum "$1" 12; }

# Busy and total ticks of one CPU since boot, "busy total", from its /proc/stat line:
# busy is everything but idle and iowait. Two readings give how busy that CPU was between
# them (`cpu_busy_pct`): whether a run was bounded by the proxy or by the load side.
cpu_line_ticks() {  # cpu -> "busy total"
  awk -v c="cpu$1" '$1 == c {t = 0; for (i = 2; i <= 9; i++) t += $i
                              print t - $5 - $6, t; exit}' /proc/stat
}
cpu_busy_pct() {  # "busy total" "busy total" -> percent
  awk -v a="$1" -v b="$2" 'BEGIN {split(a, x, " "); split(b, y, " ")
    t = y[2] - x[2]; if (t <= 0) {print "-"; exit}; printf "%.0f", 100 * (y[1] - x[1]) / t}'
}

# Minor page faults (field 10): a proxy whose allocator hands memory back to the kernel
# and takes it again pays a fault per page, which shows in its system time but not in an
# instruction count.
minor_faults() { stat_sum "$1" 7; }

# wrk or h2load latency like 1.23ms / 456.78us / 1.02s -> microseconds.
to_us() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    if (u == "us") m = 1; else if (u == "ms") m = 1000; else if (u == "s") m = 1000000
    else if (u == "m") m = 60000000; else { print "NaN"; exit }
    printf "%.0f\n", n * m }'
}

kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }  # pid field -> kB
mib() { awk -v k="$1" 'BEGIN {printf "%.1f MiB", k / 1024}'; }      # kB -> "12.3 MiB"

# Microseconds -> "456 µs" / "1.23 ms"; "-" (or nothing) stays "-".
fmt_us() { awk -v v="$1" 'BEGIN {if (v == "-" || v == "") print "-"; else if (v >= 1000) printf "%.2f ms", v / 1000; else printf "%.0f µs", v}'; }

# The median of the numbers on stdin, one a line; "-" if there are none.
median_of() {
  sort -g | awk '{v[NR] = $1} END {if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

# a / b with 2 decimals, "-" if either is missing or b is 0.
ratio() {
  awk -v a="$1" -v b="$2" 'BEGIN {if (a == "-" || b == "-" || a == "" || b == "" || b + 0 == 0) print "-"; else printf "%.2f", a / b}'
}

# How busy the machine is without us: % of CPU time not idle over 2 s, all CPUs (called
# while our servers are idle). Anything much above 0 makes the numbers noisy.
busy_pct() {
  local t0 t1
  read -r -a t0 < <(head -1 /proc/stat); sleep 2; read -r -a t1 < <(head -1 /proc/stat)
  awk -v a="${t0[*]}" -v b="${t1[*]}" 'BEGIN {
    split(a, x, " "); split(b, y, " "); t = 0
    for (i = 2; i <= 9; i++) t += y[i] - x[i]
    idle = (y[5] + y[6]) - (x[5] + x[6])
    v = 0; if (t > 0) v = 100 * (t - idle) / t
    printf "%.0f\n", v }'
}

# Warm-up (WARMUP seconds against each of TARGETS, with LOAD_CMD target seconds), then
# ROUNDS rounds of `measure target round`, the order rotated each round so no target is
# always first or last. Usage: run_rounds LOAD_CMD
run_rounds() {
  local load=$1 t r i n=${#TARGETS[@]}
  if ((WARMUP > 0)); then
    for t in "${TARGETS[@]}"; do "$load" "$t" "$WARMUP" >/dev/null || die "warm-up against $t failed"; done
  fi
  for ((r = 1; r <= ROUNDS; r++)); do
    for ((i = 0; i < n; i++)); do
      measure "${TARGETS[$(((i + r - 1) % n))]}" "$r"
    done
  done
}

# A CA made for the run and one ECDSA P-256 certificate it signs, for localhost and
# 127.0.0.1, in DIR: ca.pem, cert.pem, key.pem, and cert+key.pem (HAProxy's `crt` takes
# both in one file). A self-signed leaf would not do as its own CA: webpki, which rustls
# uses, refuses a certificate marked CA:TRUE as an end entity.
make_tls_material() {  # dir
  mkdir -p "$1"
  (
    cd "$1"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
      -subj "/CN=busbar bench CA" -keyout ca.key -out ca.pem
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -subj /CN=localhost -keyout key.pem -out cert.csr
    printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=critical,CA:FALSE" \
      "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >cert.ext
    openssl x509 -req -in cert.csr -CA ca.pem -CAkey ca.key -set_serial 2 -days 2 \
      -extfile cert.ext -out cert.pem
    cat cert.pem key.pem >cert+key.pem
  ) >"$1/openssl.log" 2>&1 || die "openssl could not make the run's certificates; see $1/openssl.log"
}

# The seven request headers busbar adds on the way to an instance by default, for nginx
# and HAProxy to add too, so that the backend is sent the same request by every proxy
# (FORWARDING=0 leaves them out, as every run recorded before 2026-12-07 05:00 UTC did): X-Forwarded-For
# (appended), Forwarded (RFC 7239 for= and proto=), X-Forwarded-Proto, X-Forwarded-Host,
# Via, a new W3C traceparent and X-Request-Id. At ~270 bytes they are most of a GET's
# head: behind busbar alone the TLS backend of upstls decrypted and parsed 336 bytes a
# request against nginx's 66, and spent ~12% more CPU on it, on the load's CPU.
# Made as cheaply as each proxy can: nginx has one random value a request ($request_id:
# the trace id and X-Request-Id; the span id is a constant rather than a regex `map`
# over $request_id), HAProxy's come from `rand` (16 hex digits, the first 8 zero; no
# `regsub` over a uuid).
# The scripts check FORWARDING is 0 or 1 with their other settings.
nginx_forwarding() {  # [module: proxy (default) or grpc] -> one line of directives
  ((${FORWARDING:-1})) || return 0
  local d=${1:-proxy}_set_header
  printf '%s ' "$d X-Forwarded-For \$proxy_add_x_forwarded_for;" \
    "$d Forwarded \"for=\$remote_addr;proto=\$scheme\";" "$d X-Forwarded-Proto \$scheme;" \
    "$d X-Forwarded-Host \$http_host;" "$d Via \"1.1 nginx-bench\";" \
    "$d traceparent \"00-\$request_id-b7ad6b7169203331-00\";" "$d X-Request-Id \$request_id;"
}
# HAProxy, in a frontend: the same seven (PROTO: http, https, or a sample expression).
haproxy_forwarding() {  # proto
  ((${FORWARDING:-1})) || return 0
  echo "    option forwardfor"
  echo "    http-request set-header Forwarded \"for=%[src];proto=$1\""
  echo "    http-request set-header X-Forwarded-Proto $1"
  echo "    http-request set-header X-Forwarded-Host %[req.hdr(host)]"
  echo "    http-request set-header Via \"1.1 haproxy-bench\""
  echo "    http-request set-header traceparent \"00-%[rand,hex,lower]%[rand,hex,lower]-%[rand,hex,lower]-00\""
  echo "    http-request set-header X-Request-Id %[rand,hex,lower]%[rand,hex,lower]"
}
# The report's line on them; WHO: the proxies that add them.
forwarding_report() {  # who
  if ((${FORWARDING:-1})); then
    echo "- forwarding headers: $1 add the seven busbar adds (X-Forwarded-For, Forwarded, X-Forwarded-Proto, X-Forwarded-Host, Via, traceparent, X-Request-Id), so the backend gets the same request from each"
  else
    echo "- forwarding headers: FORWARDING=0: $1 add none, busbar its seven (~270 bytes more a request to the backend)"
  fi
}

# nginx's temp paths, all inside DIR, for the modules this nginx was built with (it
# refuses a path for a module it lacks). Reads `nginx -V` once a script (NGINX_V).
nginx_temp_paths() {  # dir
  local m
  [[ -n ${NGINX_V:-} ]] || NGINX_V=$(nginx -V 2>&1 || true)
  echo "client_body_temp_path $1/client_body;"
  for m in proxy fastcgi uwsgi scgi; do
    grep -q -- "--without-http_${m}_module" <<<"$NGINX_V" || echo "${m}_temp_path $1/$m;"
  done
}

# Until CHECK (a command and its arguments) succeeds; fails the run if process PID has
# exited, or after WAIT_S seconds (default 15; a server under valgrind starts slowly).
wait_for() {  # name pid check...
  local name=$1 pid=$2 i tries=$((${WAIT_S:-15} * 10))
  shift 2
  for ((i = 0; i < tries; i++)); do
    kill -0 "$pid" 2>/dev/null || die "$name (pid $pid) exited during startup; see $DIR/"
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "$name not ready within ${WAIT_S:-15} s; see $DIR/"
}
