#!/usr/bin/env bash
# Case 2b: bodies over a route's limit under load. A route with max_body = 64 KiB gets
# BODY_CLIENTS (50) clients each sending 100 MiB bodies in a loop (declared
# Content-Length and chunked, alternately) for BODY_SECONDS (20), while wrk runs ~50% load
# on another route. Pass: every big body gets 413, wrk sees no error, and busbar's RSS
# stays flat (peak within BODY_RSS_SLACK_MIB, 32, of the RSS before): no body is buffered.
source "$(dirname "$0")/lib.sh"
SECS=${BODY_SECONDS:-20}
CLIENTS=${BODY_CLIENTS:-50}
SLACK_MIB=${BODY_RSS_SLACK_MIB:-32}

start_backends; write_config
# The limited route goes first: routes match in file order and "demo" takes every path.
python3 - "$CONFIG" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
route = '[[route]]\nname = "upload"\npath_prefix = "/upload"\nservice = "demo"\nmax_body = "64KiB"\n\n'
s = s.replace('[[route]]\nname = "slow"', route + '[[route]]\nname = "slow"', 1)
open(p, "w").write(s)
PY
"$BUSBAR" check "$CONFIG" >/dev/null
start_busbar; wait_ready
measure_max
rss_before=$(rss_kib "$BUS_PID")
python3 "$REL_DIR/big_bodies.py" "$HTTP" /upload/x "$SECS" "$CLIENTS" >"$WORK/bodies.txt" 2>"$OUT/body413-clients.err" &
bodies_pid=$!
PIDS+=("$bodies_pid")
rss_peak=$rss_before
( while kill -0 "$bodies_pid" 2>/dev/null; do rss_kib "$BUS_PID"; sleep 0.2; done ) >"$WORK/rss.txt" &
PIDS+=($!)
load=$(run_wrk "$SECS" "$HALF_CONNS" "$HALF_DELAY")
wait "$bodies_pid" || true
sleep 0.5
rss_peak=$(sort -n "$WORK/rss.txt" | tail -1)
rss_after=$(rss_kib "$BUS_PID")
bodies=$(cat "$WORK/bodies.txt")
log "big bodies: $bodies"
log "normal load: $load"
sent=$(field sent "$bodies"); got413=$(field status_413 "$bodies"); other=$(field other "$bodies")
counted=$(curl -fsS "http://127.0.0.1:$ADMIN/metrics" | awk '/^busbar_requests_total\{class="4xx",route="upload"/ {print $2}')
errs=$(( $(field non2xx "$load") + $(field connect "$load") + $(field read "$load") + $(field write "$load") + $(field timeout "$load") ))
growth_mib=$(python3 -c "print(round(($rss_peak - $rss_before) / 1024, 1))")
ok=$(python3 -c "print('pass' if $sent > 0 and $got413 == $sent and $other == 0 and $errs == 0 and $growth_mib <= $SLACK_MIB else 'fail')")
record body413 "max_rps=$MAX_RPS" "$bodies" "normal_load: $load" "wrk_errors=$errs" \
	"busbar_4xx_upload=${counted:-0}" "rss_kib_before=$rss_before" "rss_kib_peak=$rss_peak" \
	"rss_kib_after=$rss_after" "rss_growth_mib=$growth_mib" "verdict=$ok"
