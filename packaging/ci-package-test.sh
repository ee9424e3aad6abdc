#!/usr/bin/env bash
# Installs the .deb that `make package` built on this machine and proves it works the way
# an operator will use it (issue 26):
#
#   dpkg -i; busbar --version; the packaged binary's size; busbar check on the installed
#   config (as the busbar user); systemd-analyze verify on both units; the installed binary
#   started the way busbar.service starts it (its User/Group, capabilities, LimitNOFILE,
#   Environment, ExecStartPre and ExecStart, read from the installed unit file, plus what
#   systemd adds: STATE_DIRECTORY, LOGS_DIRECTORY, NOTIFY_SOCKET), answering a request and
#   /readyz, telling "systemd" READY=1, reloading on SIGHUP (ExecReload), then SIGTERM →
#   exit 0; dpkg -r removes the binary and keeps /etc/busbar and /var/lib/busbar; a purge
#   removes the state.
#
# systemd is not running here (nor in CI): the unit's start is reproduced with setpriv.
# Listeners go on loopback ports chosen at run time, through a copy of the installed
# /etc/busbar/busbar.toml with only its ports rewritten (BUSBAR_CONFIG points at it, as a
# drop-in would). Everything started here is stopped by pid on exit. Runs as root; safe to
# run again on a machine where the package is installed.
#
#   bash packaging/ci-package-test.sh [target/debian/busbar_*.deb]
set -euo pipefail
cd "$(dirname "$0")/.."

deb=${1:-$(ls -t target/debian/busbar_*.deb 2>/dev/null | head -1)}
[ -n "$deb" ] && [ -f "$deb" ] || { echo "no package: run make package first" >&2; exit 1; }
UNIT=/usr/lib/systemd/system/busbar.service
MAX_BINARY=$((25 * 1024 * 1024))

say() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

WORK=$(mktemp -d /tmp/busbar-pkg.XXXXXX)
chmod 0755 "$WORK"
pids=()
busbar_pid=""
cleanup() {
    local p
    for p in $busbar_pid "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

if ! command -v systemd-analyze >/dev/null || ! command -v setpriv >/dev/null; then
    apt-get install -y -qq systemd util-linux >/dev/null
fi

say "dpkg -i $deb"
# The package may be installed already (a second run): keep a locally changed conffile.
dpkg -i --force-confdef --force-confold "$deb"
dpkg-query -W -f='installed: ${Package} ${Version} (${Status})\n' busbar
dpkg -L busbar | grep -v '/$' | sed 's/^/  /'

say "busbar --version"
[ "$(command -v busbar)" = /usr/bin/busbar ] || fail "busbar is not /usr/bin/busbar"
busbar --version
busbar --version | grep -Eq '^busbar [0-9][^ ]* \(commit ([0-9a-f]{12}|unknown), built [0-9]{4}-[0-9]{2}-[0-9]{2}\)$' \
    || fail "--version names no commit and build date"

say "packaged binary size"
size=$(stat -c %s /usr/bin/busbar)
echo "/usr/bin/busbar: $size bytes ($((size / 1024 / 1024)) MiB; limit $((MAX_BINARY / 1024 / 1024)) MiB)"
[ "$size" -lt "$MAX_BINARY" ] || fail "the packaged binary is $size bytes"
debug=$(dpkg -L busbar | grep '^/usr/lib/debug/.*\.debug$' || true)
[ -n "$debug" ] || fail "no separate debug info in the package"
echo "debug info (for backtraces and gdb): $debug ($(stat -c %s "$debug") bytes)"

say "the busbar user, folders and config"
id busbar
stat -c '%n %U:%G %a' /var/lib/busbar /var/log/busbar /etc/busbar/busbar.toml
[ "$(stat -c %U /var/lib/busbar)" = busbar ] || fail "/var/lib/busbar is not busbar's"

say "busbar check /etc/busbar/busbar.toml (as the busbar user)"
setpriv --reuid busbar --regid busbar --init-groups -- /usr/bin/busbar check /etc/busbar/busbar.toml

say "systemd-analyze verify"
systemd-analyze verify "$UNIT"
systemd-analyze verify busbar@ci.service
echo "busbar.service and busbar@.service: ok"

# --- The unit's start, as systemd would do it -------------------------------------------
unit_value() { sed -n "s/^$1=//p" "$UNIT" | tail -1; }
user=$(unit_value User)
group=$(unit_value Group)
exec_start=$(unit_value ExecStart)
exec_start_pre=$(unit_value ExecStartPre)
nofile=$(unit_value LimitNOFILE)
caps=$(unit_value AmbientCapabilities | tr 'A-Z' 'a-z' | sed 's/cap_//g')
state_dir=/var/lib/$(unit_value StateDirectory)
logs_dir=/var/log/$(unit_value LogsDirectory)
mapfile -t unit_env < <(sed -n 's/^Environment=//p' "$UNIT")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HTTP=$(free_port); ADMIN=$(free_port); REG=$(free_port); B1=$(free_port); B2=$(free_port)
TOKEN="ci-$(date +%s%N)"

# The installed config with its ports moved; nothing else changes.
sed -e "s/127\.0\.0\.1:8080/127.0.0.1:$HTTP/g" -e "s/127\.0\.0\.1:9901/127.0.0.1:$ADMIN/g" \
    -e "s/127\.0\.0\.1:9902/127.0.0.1:$REG/g" -e "s/127\.0\.0\.1:9101/127.0.0.1:$B1/g" \
    -e "s/127\.0\.0\.1:9102/127.0.0.1:$B2/g" /etc/busbar/busbar.toml > "$WORK/busbar.toml"
chmod 0644 "$WORK/busbar.toml"
diff /etc/busbar/busbar.toml "$WORK/busbar.toml" | sed 's/^/  /' || true

# systemd's notify socket, played by a small listener that records what busbar says.
python3 - "$WORK/notify.sock" "$WORK/notify.log" <<'PY' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
import os; os.chmod(sys.argv[1], 0o777)
with open(sys.argv[2], "a", buffering=1) as log:
    while True:
        log.write(s.recv(4096).decode(errors="replace").replace("\n", " ") + "\n")
PY
pids+=($!)
for _ in $(seq 1 100); do [ -S "$WORK/notify.sock" ] && break; sleep 0.05; done
[ -S "$WORK/notify.sock" ] || fail "the notify socket did not appear"

# The demo backends the default config routes to.
/usr/bin/busbar demo -l "127.0.0.1:$B1" -l "127.0.0.1:$B2" >"$WORK/demo.log" 2>&1 &
pids+=($!)

# What systemd would run: the unit's User/Group, NoNewPrivileges, bounding set and
# ambient capabilities, LimitNOFILE, its Environment= lines, and the variables systemd
# sets itself. BUSBAR_CONFIG (the unit's own) is overridden to the copy, as a drop-in would;
# the admin token stands for /etc/default/busbar.
env_args=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
          HOME="$state_dir" USER="$user" LOGNAME="$user" "${unit_env[@]}"
          STATE_DIRECTORY="$state_dir" LOGS_DIRECTORY="$logs_dir"
          NOTIFY_SOCKET="$WORK/notify.sock" BUSBAR_ADMIN_TOKEN="$TOKEN"
          BUSBAR_CONFIG="$WORK/busbar.toml")
as_unit=(setpriv --reuid "$user" --regid "$group" --init-groups --no-new-privs
         --bounding-set "-all,+$caps" --inh-caps "+$caps" --ambient-caps "+$caps" --)

say "ExecStartPre: $exec_start_pre (User=$user)"
env -i "${env_args[@]}" "${as_unit[@]}" $exec_start_pre

say "ExecStart: $exec_start (User=$user Group=$group LimitNOFILE=$nofile AmbientCapabilities=+$caps)"
echo "command: ulimit -n $nofile; env -i ${env_args[*]} ${as_unit[*]} $exec_start"
# A container's hard limit may be below the unit's: then as high as it goes.
( ulimit -n "$nofile" 2>/dev/null || ulimit -n "$(ulimit -Hn)"; exec env -i "${env_args[@]}" "${as_unit[@]}" $exec_start ) \
    >"$WORK/busbar.log" 2>&1 &
busbar_pid=$!

ready=""
for _ in $(seq 1 300); do
    if ! kill -0 "$busbar_pid" 2>/dev/null; then
        cat "$WORK/busbar.log" >&2
        fail "busbar exited at start"
    fi
    if curl -fsS "http://127.0.0.1:$ADMIN/readyz" >"$WORK/readyz.json" 2>/dev/null; then
        ready=yes
        break
    fi
    sleep 0.1
done
[ -n "$ready" ] || { cat "$WORK/busbar.log" >&2; fail "/readyz did not answer 200 within 30 s"; }
echo "pid $busbar_pid runs as $(ps -o user= -p "$busbar_pid"), open files limit $(awk '/Max open files/ {print $4}' /proc/"$busbar_pid"/limits), $(grep CapAmb /proc/"$busbar_pid"/status)"
[ "$(ps -o user= -p "$busbar_pid" | tr -d ' ')" = "$user" ] || fail "busbar does not run as $user"

say "GET /readyz"
cat "$WORK/readyz.json"
grep -q '"status": "ready"' "$WORK/readyz.json" || fail "/readyz does not say ready"

say "systemd notification"
for _ in $(seq 1 50); do grep -q READY=1 "$WORK/notify.log" 2>/dev/null && break; sleep 0.1; done
cat "$WORK/notify.log"
grep -q "READY=1 MAINPID=$busbar_pid" "$WORK/notify.log" || fail "no READY=1 with MAINPID=$busbar_pid"

say "a request through the installed binary"
code=$(curl -sS -o "$WORK/answer.txt" -w '%{http_code}' -H 'Host: localhost' "http://127.0.0.1:$HTTP/api/hello")
echo "GET /api/hello → $code"; head -c 400 "$WORK/answer.txt"; echo
[ "$code" = 200 ] || fail "the request got $code"

say "busbar status (the installed CLI against the running node)"
BUSBAR_CONFIG="$WORK/busbar.toml" /usr/bin/busbar status

say "ExecReload: kill -HUP \$MAINPID"
kill -HUP "$busbar_pid"
reloaded=""
for _ in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$ADMIN/metrics" | grep -q '^busbar_config_reloads_total{result="ok"} [1-9]'; then
        reloaded=yes
        break
    fi
    sleep 0.1
done
[ -n "$reloaded" ] || fail "no reload after SIGHUP"
echo "reloaded (busbar_config_reloads_total{result=\"ok\"} went up)"

say "KillSignal=SIGTERM → exit 0"
kill -TERM "$busbar_pid"
set +e
wait "$busbar_pid"
status=$?
set -e
busbar_pid=""
echo "busbar exited with status $status"
tail -3 "$WORK/busbar.log"
[ "$status" = 0 ] || fail "exit status $status after SIGTERM"
ls -la "$state_dir"

say "dpkg -r busbar (keeps /etc/busbar and /var/lib/busbar)"
dpkg -r busbar
[ ! -e /usr/bin/busbar ] || fail "/usr/bin/busbar is still there"
[ -f /etc/busbar/busbar.toml ] || fail "/etc/busbar/busbar.toml was removed"
[ -d /var/lib/busbar ] || fail "/var/lib/busbar was removed"
echo "removed: /usr/bin/busbar; kept: /etc/busbar/busbar.toml, /var/lib/busbar ($(ls /var/lib/busbar | tr '\n' ' '))"

say "dpkg --purge busbar"
dpkg --purge busbar
[ ! -e /var/lib/busbar ] || fail "/var/lib/busbar survived a purge"
echo "purged"

say "package test passed"
