#!/usr/bin/env bash
# Case 7b: graceful binary upgrade under ~50% load. A second busbar starts with
# `run --upgrade` on the same config (same runtime_dir, so the same upgrade socket),
# then the old one gets SIGQUIT. A slow request (8 s) is in flight on the old process.
# Pass: no refused connection, no failed request, the slow request answers 200, the old
# process exits, the new one serves.
source "$(dirname "$0")/lib.sh"
SECS=${UPGRADE_SECONDS:-20}

start_backends; write_config; start_busbar; wait_ready
old=$BUS_PID
measure_max
log "upgrade: ${SECS} s of load; slow request at 3 s, upgrade at 4 s"
run_wrk "$SECS" "$HALF_CONNS" "$HALF_DELAY" >"$WORK/wrk.txt" &
wrk_pid=$!
PIDS+=("$wrk_pid")
sleep 3
curl -sS -o "$WORK/slow.body" -w '%{http_code} %{time_total}\n' \
	"http://127.0.0.1:$HTTP/slow?ms=8000" >"$WORK/slow.txt" 2>&1 &
slow_pid=$!
PIDS+=("$slow_pid")
sleep 1
if [ -n "${ACCESS_LOG:-}" ]; then # debugging: the new process logs to its own file
	sed "s|^access = .*|access = \"$ACCESS_LOG.new\"|" "$CONFIG" >"$WORK/new.toml"
	CONFIG="$WORK/new.toml"
fi
start_busbar --upgrade
new=$BUS_PID
sleep 1 # the new process is waiting on the upgrade socket
t0=$(date +%s.%N)
kill -QUIT "$old"
log "SIGQUIT sent to $old"
# The old process hands its sockets over, drains, exits.
for _ in $(seq 1 400); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
wait "$old" 2>/dev/null || true
log "old process gone"
old_exit=$(python3 -c "import time; print(round(time.time() - $t0, 1))")
wait "$slow_pid" || true
wait "$wrk_pid" || true
r=$(cat "$WORK/wrk.txt")
slow=$(cat "$WORK/slow.txt")
new_alive=$(kill -0 "$new" 2>/dev/null && echo yes || echo no)
after=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$HTTP/")
failed=$(( $(field non2xx "$r") + $(field connect "$r") + $(field read "$r") + $(field write "$r") + $(field timeout "$r") ))
ok=$([ "$failed" -eq 0 ] && [ "$(field connect "$r")" -eq 0 ] && [ "${slow%% *}" = 200 ] &&
	[ "$new_alive" = yes ] && [ "$after" = 200 ] && echo pass || echo fail)
record upgrade "max_rps=$MAX_RPS" "$r" "refused=$(field connect "$r")" "failed=$failed" \
	"slow_request=$slow" "old_exit_after_sigquit_s=$old_exit" "new_alive=$new_alive" \
	"after_upgrade_status=$after" "verdict=$ok"
