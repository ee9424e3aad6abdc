#!/usr/bin/env bash
# Case 4: HTTP/2 abuse (h2abuse.py: rapid reset, too many streams, CONTINUATION flood)
# while wrk runs normal HTTP/1.1 traffic at ~25% load; busbar's RSS sampled every 0.2 s.
# Pass: each attack ends in GOAWAY/close or refused streams, RSS stays under 2x + 64 MiB
# of its value before, the normal h2 request after each attack gets 200, wrk sees no error.
source "$(dirname "$0")/lib.sh"
python3 -c 'import hpack' 2>/dev/null || { log "python h2 missing: pip install h2"; exit 1; }

start_backends; write_config; start_busbar; wait_ready
measure_max
rss_before=$(rss_kib "$BUS_PID")
( while kill -0 "$BUS_PID" 2>/dev/null; do rss_kib "$BUS_PID"; sleep 0.2; done ) >"$WORK/rss.txt" &
PIDS+=($!)
run_wrk 40 "$(( (HALF_CONNS + 1) / 2 ))" "$HALF_DELAY" >"$WORK/wrk.txt" &
wrk_pid=$!
PIDS+=("$wrk_pid")
sleep 1
timeout 35 python3 "$REL_DIR/h2abuse.py" "$HTTP" >"$WORK/h2abuse.txt" || log "h2abuse.py ended with $?"
wait "$wrk_pid" || true
r=$(cat "$WORK/wrk.txt")
rss_max=$(sort -n "$WORK/rss.txt" | tail -1)
rss_after=$(rss_kib "$BUS_PID")
errs=$(( $(field non2xx "$r") + $(field connect "$r") + $(field read "$r") + $(field write "$r") + $(field timeout "$r") ))
a=$(cat "$WORK/h2abuse.txt")
get() { sed -n "s/^$1=//p" <<<"$a"; }
ok=pass
for k in normal_before normal_after_rapid_reset normal_after_streams normal_after_continuation; do
	[ "$(get $k)" = 200 ] || ok=fail
done
[ "$errs" -eq 0 ] || ok=fail
[ "$rss_max" -le $((rss_before * 2 + 65536)) ] || ok=fail
[ "$(get continuation_closed)" = True ] || ok=fail
[ "$(get streams_refused)" -gt 0 ] || [ "$(get streams_goaway_code)" != None ] || ok=fail
[ "$(get rapid_reset_closed)" = True ] || ok=fail
record h2abuse "$a" "normal_traffic: $r" "wrk_errors=$errs" "rss_kib_before=$rss_before" \
	"rss_kib_max=$rss_max" "rss_kib_after=$rss_after" "verdict=$ok"
