#!/usr/bin/env bash
# Case 11: soak for SOAK_SECONDS (120; the issue's full run is 600) at ~50% load, with
# registrations churning (churn.sh) and a SIGHUP reload every 30 s; RSS sampled every 5 s.
# Pass: no wrk error, no failed registration call, RSS growth (mean of the last quarter
# of samples vs the first quarter after a 20 s warm-up) within 10%.
source "$(dirname "$0")/lib.sh"
SECS=${SOAK_SECONDS:-120}

start_backends; write_config; start_busbar; wait_ready
measure_max
log "soak: ${SECS} s"
run_wrk "$SECS" "$HALF_CONNS" "$HALF_DELAY" >"$WORK/wrk.txt" &
wrk_pid=$!
PIDS+=("$wrk_pid")
bash "$REL_DIR/churn.sh" "$REG" "$TOKEN" "127.0.0.1:$B1" >"$WORK/churn.txt" 2>&1 &
churn_pid=$!
PIDS+=("$churn_pid")
: >"$OUT/soak-rss.txt"
start=$(date +%s)
hups=0
while kill -0 "$wrk_pid" 2>/dev/null; do
	t=$(( $(date +%s) - start ))
	echo "$t $(rss_kib "$BUS_PID")" >>"$OUT/soak-rss.txt"
	if [ "$t" -gt 0 ] && [ $((t % 30)) -lt 5 ] && [ "$t" -ge 30 ] && [ "$t" -lt "$SECS" ]; then
		kill -HUP "$BUS_PID"; hups=$((hups + 1))
	fi
	sleep 5
done
wait "$wrk_pid" || true
kill -TERM "$churn_pid"; wait "$churn_pid" 2>/dev/null || true
r=$(cat "$WORK/wrk.txt")
churn=$(grep CHURN "$WORK/churn.txt" || echo "CHURN ok=0 failed=-1")
routed=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$HTTP/churn/x")
errs=$(( $(field non2xx "$r") + $(field connect "$r") + $(field read "$r") + $(field write "$r") + $(field timeout "$r") ))
trend=$(python3 - "$OUT/soak-rss.txt" <<'PY'
import sys
rows = [tuple(map(int, l.split())) for l in open(sys.argv[1]) if l.strip()]
warm = [r for r in rows if r[0] >= 20] or rows
q = max(1, len(warm) // 4)
first = sum(r[1] for r in warm[:q]) / q
last = sum(r[1] for r in warm[-q:]) / q
n = len(warm)
mt = sum(r[0] for r in warm) / n
mr = sum(r[1] for r in warm) / n
den = sum((r[0] - mt) ** 2 for r in warm) or 1
slope = sum((r[0] - mt) * (r[1] - mr) for r in warm) / den * 60
print(f"rss_samples={len(rows)} rss_kib_first={rows[0][1]} rss_kib_last={rows[-1][1]} "
      f"rss_kib_max={max(r[1] for r in rows)} rss_growth_pct={100 * (last - first) / first:.1f} "
      f"rss_slope_kib_per_min={slope:.0f}")
PY
)
growth=$(sed -n 's/.*rss_growth_pct=\([-0-9.]*\).*/\1/p' <<<"$trend")
ok=$(python3 -c "print('pass' if $errs == 0 and $growth <= 10 and '$churn'.endswith('failed=0') else 'fail')")
record soak "seconds=$SECS" "max_rps=$MAX_RPS" "$r" "wrk_errors=$errs" "$churn" "sighups=$hups" \
	"churn_route_status_after=$routed" "$trend" "verdict=$ok"
