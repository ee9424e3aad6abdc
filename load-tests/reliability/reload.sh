#!/usr/bin/env bash
# Case 7a: SIGHUP reload every second for RELOAD_SECONDS (30) under ~50% of max load.
# Pass: wrk sees no non-2xx answer and no socket error; every reload was applied.
source "$(dirname "$0")/lib.sh"
SECS=${RELOAD_SECONDS:-30}

start_backends; write_config; start_busbar; wait_ready
measure_max
log "reload: SIGHUP every 1 s for ${SECS} s under ${HALF_CONNS} paced connections"
run_wrk "$SECS" "$HALF_CONNS" "$HALF_DELAY" >"$WORK/wrk.txt" &
wrk_pid=$!
PIDS+=("$wrk_pid")
sleep 0.5
hups=0
for _ in $(seq 1 "$SECS"); do
	kill -HUP "$BUS_PID"; hups=$((hups + 1))
	sleep 1
done
wait "$wrk_pid" || true
r=$(cat "$WORK/wrk.txt")
reloads=$(curl -fsS "http://127.0.0.1:$ADMIN/metrics" | awk '/^busbar_config_reloads_total/ {s = s $0 " "} END {print s}')
failed=$(( $(field non2xx "$r") + $(field connect "$r") + $(field read "$r") + $(field write "$r") + $(field timeout "$r") ))
record reload "max_rps=$MAX_RPS" "sighups=$hups" "$r" "reload_metrics=$reloads" "failed=$failed" \
	"verdict=$([ "$failed" -eq 0 ] && echo pass || echo fail)"
