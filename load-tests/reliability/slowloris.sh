#!/usr/bin/env bash
# Case 3: slowloris. Baseline: ~50% load for SLOW_SECONDS (20) with wrk. Then slowhttptest
# holds SLOW_CONNS (1000) connections trickling header lines every 10 s while wrk runs the
# same load again. Pass: p99 under attack <= 2x the baseline p99, no wrk error, and the
# slow connections are closed by busbar's total header deadline (10 s by default).
source "$(dirname "$0")/lib.sh"
SECS=${SLOW_SECONDS:-20}
CONNS=${SLOW_CONNS:-1000}
command -v slowhttptest >/dev/null || { log "slowhttptest missing: apt-get install -y slowhttptest"; exit 1; }

start_backends; write_config; start_busbar; wait_ready
measure_max
base=$(run_wrk "$SECS" "$HALF_CONNS" "$HALF_DELAY")
log "baseline: $base"
attack_len=$((SECS + 25))
slowhttptest -c "$CONNS" -H -g -o "$WORK/slowloris" -i 10 -r 500 -t GET \
	-u "http://127.0.0.1:$HTTP/" -x 24 -p 3 -l "$attack_len" >"$WORK/slowhttptest.log" 2>&1 &
PIDS+=($!)
slow_pid=$!
sleep 5 # the attack's connections are open
open_during=$(ss -Htn state established "( sport = :$HTTP )" | wc -l)
rss_during=$(rss_kib "$BUS_PID")
attack=$(run_wrk "$SECS" "$HALF_CONNS" "$HALF_DELAY")
log "under attack: $attack"
wait "$slow_pid" || true
csv="$WORK/slowloris.csv"
# seconds,closed,pending,connected,service available
max_connected=$(awk -F, 'NR>1 && $4+0 > m {m = $4+0} END {print m+0}' "$csv")
closed=$(awk -F, 'END {print $2+0}' "$csv")
p99b=$(field p99_us "$base"); p99a=$(field p99_us "$attack")
errs=$(( $(field non2xx "$attack") + $(field connect "$attack") + $(field read "$attack") + $(field write "$attack") + $(field timeout "$attack") ))
ratio=$(python3 -c "print(round($p99a / max(1, $p99b), 2))")
ok=$(python3 -c "print('pass' if $p99a <= 2 * $p99b and $errs == 0 else 'fail')")
record slowloris "max_rps=$MAX_RPS" "baseline: $base" "attack: $attack" \
	"slow_conns_requested=$CONNS" "slow_conns_max_connected=$max_connected" \
	"slow_conns_closed_by_server=$closed" "established_at_5s=$open_during" \
	"busbar_rss_kib_during=$rss_during" "p99_ratio=$ratio" "wrk_errors=$errs" "verdict=$ok"
cp "$csv" "$OUT/slowloris.csv" 2>/dev/null || true
