#!/usr/bin/env bash
# Case 3b: slow body and slow read under load. Baseline: ~50% load for SLOWBODY_SECONDS
# (30) with wrk. Then slow_clients.py opens SLOWBODY_BODY_CONNS (500) slow-body
# connections (a 4096-byte body, 16 bytes every 10 s) and SLOWBODY_READ_CONNS (500)
# slow-read connections (GET of a 1 MiB response, 32 bytes read every 5 s through a 4 KiB
# window), 200 a second, on their own route, while wrk runs the same load again. busbar
# runs on its defaults: client_timeout 30 s, body_min_rate 500 B/s.
# Pass: every slow body gets 408 and is counted as body_timeout, every slow reader is cut
# off by the send timeout, busbar holds none of them at the end and the upstream holds no
# half request, wrk sees no error and its p99 stays within 2x the baseline. Memory: a
# second, identical attack (without wrk) must mostly reuse what the first freed: its RSS
# peak and the RSS after it within SLOWBODY_RSS_REUSE_PCT (25) % over the first's peak (a
# leak of what a slow connection holds, ~0.35 MiB, would double it). The RSS after each
# attack is recorded too: with mimalloc it falls back near where it started; glibc's
# malloc kept ~235 MiB of freed heap.
# The timeline (per second: connections busbar holds, body_timeout and send_timeout counts,
# RSS, the upstream's open half requests) goes to out/slowbody-timeline.csv.
source "$(dirname "$0")/lib.sh"
SECS=${SLOWBODY_SECONDS:-30}
BODY_CONNS=${SLOWBODY_BODY_CONNS:-500}
READ_CONNS=${SLOWBODY_READ_CONNS:-500}
RATE=${SLOWBODY_RATE:-200}
REUSE_PCT=${SLOWBODY_RSS_REUSE_PCT:-25}
CLIENT_TIMEOUT=${SLOWBODY_CLIENT_TIMEOUT:-30} # seconds; only written to the config if not 30

start_backends
UP=$(free_port)
python3 "$REL_DIR/slow_clients.py" backend "$UP" "$WORK/upstream.txt" >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)
wait_port "$UP"
write_config
# The slow clients' routes go first: routes match in file order and "demo" takes every path.
python3 - "$CONFIG" "$UP" "$CLIENT_TIMEOUT" <<'PY'
import sys
p, up, ct = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = open(p).read()
svc = f'[[service]]\nname = "slowup"\nendpoints = [{{ addr = "127.0.0.1:{up}" }}]\n\n'
routes = ('[[route]]\nname = "upload"\npath_prefix = "/upload"\nservice = "slowup"\n\n'
          '[[route]]\nname = "big"\npath_prefix = "/big"\nservice = "slowup"\n\n')
s = s.replace('[[service]]\nname = "demo"', svc + '[[service]]\nname = "demo"', 1)
s = s.replace('[[route]]\nname = "slow"', routes + '[[route]]\nname = "slow"', 1)
if ct != 30:
    s = s.replace("[registry]", f'[limits]\nclient_timeout = "{ct}s"\n\n[registry]', 1)
open(p, "w").write(s)
PY
"$BUSBAR" check "$CONFIG" >/dev/null
start_busbar; wait_ready
metric() { # metric NAME{labels}: its value in /metrics, 0 when absent
	curl -fsS "http://127.0.0.1:$ADMIN/metrics" | awk -v m="$1" '$1 == m {print $2; f=1} END {if (!f) print 0}'
}
up_stat() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" "$WORK/upstream.txt"; }

# sampler FILE: a line a second (seconds since start, connections busbar holds, its
# body_timeout and send_timeout counts, RSS, the upstream's open half requests) until
# killed. One curl a second; it runs during the baseline too, so both wrk runs share it.
sampler() {
	local t0 now
	t0=$(date +%s%N)
	echo "seconds,held,body_timeout,send_timeout,rss_kib,upstream_half_requests" >"$1"
	while :; do
		now=$(date +%s%N)
		curl -fsS "http://127.0.0.1:$ADMIN/metrics" | awk -v t="$(( (now - t0) / 100000000 ))" \
			-v rss="$(rss_kib "$BUS_PID")" -v half="$(up_stat posts_open)" '
			$1 == "busbar_downstream_connections" {h = $2}
			$1 == "busbar_edge_refusals_total{reason=\"body_timeout\"}" {b = $2}
			$1 == "busbar_edge_refusals_total{reason=\"send_timeout\"}" {w = $2}
			END {printf "%.1f,%d,%d,%d,%d,%d\n", t / 10, h, b, w, rss, half}' >>"$1"
		sleep 1
	done
}

measure_max
sampler "$WORK/timeline-0.csv" &
sampler_pid=$!
PIDS+=("$sampler_pid")
base=$(run_wrk "$SECS" "$HALF_CONNS" "$HALF_DELAY")
log "baseline: $base"
kill "$sampler_pid"

ramp=$(( (BODY_CONNS + READ_CONNS + RATE - 1) / RATE ))
attack_len=$((CLIENT_TIMEOUT + ramp + 15))
# attack_round N: starts the slow clients for attack_len seconds and a sampler writing
# $WORK/timeline-N.csv; sets ATTACK_PID and SAMPLER_PID (wait for the first, kill the second).
attack_round() {
	python3 "$REL_DIR/slow_clients.py" attack "$HTTP" "$BODY_CONNS" "$READ_CONNS" "$attack_len" "$RATE" \
		>"$WORK/attack-$1.txt" 2>>"$OUT/slowbody-clients.err" &
	ATTACK_PID=$!
	PIDS+=("$ATTACK_PID")
	sampler "$WORK/timeline-$1.csv" &
	SAMPLER_PID=$!
	PIDS+=("$SAMPLER_PID")
}

rm -f "$OUT/slowbody-clients.err"
rss_before=$(rss_kib "$BUS_PID")
attack_round 1
sleep $((ramp + 2)) # the slow connections are open
attack=$(run_wrk "$SECS" "$HALF_CONNS" "$HALF_DELAY")
log "under attack: $attack"
wait "$ATTACK_PID" || true
kill "$SAMPLER_PID"
sleep 2
rss_after=$(rss_kib "$BUS_PID")
clients=$(cat "$WORK/attack-1.txt")
log "$clients"
upstream=$(cat "$WORK/upstream.txt")
log "$upstream"
timeline="$WORK/timeline-1.csv"
cp "$timeline" "$OUT/slowbody-timeline.csv"
body_to=$(metric 'busbar_edge_refusals_total{reason="body_timeout"}')
send_to=$(metric 'busbar_edge_refusals_total{reason="send_timeout"}')
# The same attack again, without wrk: busbar must reuse the memory the first one freed
# (the allocator keeps freed heap, so RSS need not fall back; it must not grow either).
log "second round, for memory reuse"
attack_round 2
wait "$ATTACK_PID" || true
kill "$SAMPLER_PID"
sleep 2
rss_after2=$(rss_kib "$BUS_PID")
rss_peak2=$(awk -F, 'NR > 1 && $5 + 0 > m {m = $5 + 0} END {print m + 0}' "$WORK/timeline-2.csv")
clients2=$(cat "$WORK/attack-2.txt")
log "second round: $clients2"
got408_2=$(field status_408 "$(grep '^SLOWBODY' <<<"$clients2")")
send_to2=$(( $(metric 'busbar_edge_refusals_total{reason="send_timeout"}') - send_to ))

body_line=$(grep '^SLOWBODY' <<<"$clients"); read_line=$(grep '^SLOWREAD' <<<"$clients")
got408=$(field status_408 "$body_line"); opened_body=$(field opened "$body_line")
opened_read=$(field opened "$read_line")
# From the timeline: the peak, what busbar held in the last sample taken 3 s or more
# before the clients disconnect, and when (seconds after the attack started) each count
# reached all.
read -r held_peak held_end rss_peak half_open_end body_first body_all send_first send_all < <(
	python3 - "$timeline" "$BODY_CONNS" "$READ_CONNS" "$attack_len" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
nb, nr, end = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
f = lambda r, k: float(r[k] or 0)
def when(k, n):
    first = next((r["seconds"] for r in rows if f(r, k) >= 1), "-")
    full = next((r["seconds"] for r in rows if f(r, k) >= n), "-")
    return first, full
last = ([r for r in rows if float(r["seconds"]) <= end - 3] or rows or [{}])[-1]
print(int(max((f(r, "held") for r in rows), default=0)), int(f(last, "held")) if last else 0,
      int(max((f(r, "rss_kib") for r in rows), default=0)),
      int(f(last, "upstream_half_requests")) if last else 0,
      *when("body_timeout", nb), *when("send_timeout", nr))
PY
)
p99b=$(field p99_us "$base"); p99a=$(field p99_us "$attack")
errs=$(( $(field non2xx "$attack") + $(field connect "$attack") + $(field read "$attack") + $(field write "$attack") + $(field timeout "$attack") ))
ratio=$(python3 -c "print(round($p99a / max(1, $p99b), 2))")
growth_mib=$(python3 -c "print(round(($rss_after - $rss_before) / 1024, 1))")
ok=$(python3 -c "print('pass' if $opened_body == $BODY_CONNS and $got408 == $BODY_CONNS and $body_to == $BODY_CONNS \
and $opened_read == $READ_CONNS and $send_to == $READ_CONNS and $held_end == 0 and $half_open_end == 0 \
and $(up_stat posts_open) == 0 and $errs == 0 and $p99a <= 2 * $p99b \
and $got408_2 == $BODY_CONNS and $send_to2 == $READ_CONNS \
and max($rss_peak2, $rss_after2) <= $rss_peak * (100 + $REUSE_PCT) / 100 else 'fail')")
record slowbody "max_rps=$MAX_RPS" "client_timeout_s=$CLIENT_TIMEOUT" "baseline: $base" "attack: $attack" \
	"$body_line" "$read_line" "$upstream" \
	"busbar_body_timeout=$body_to" "busbar_send_timeout=$send_to" \
	"body_timeouts_first_s=$body_first" "body_timeouts_all_s=$body_all" \
	"send_timeouts_first_s=$send_first" "send_timeouts_all_s=$send_all" \
	"held_peak=$held_peak" "held_at_end=$held_end" "upstream_half_requests_at_end=$half_open_end" \
	"rss_kib_before=$rss_before" "rss_kib_peak=$rss_peak" "rss_kib_after=$rss_after" \
	"rss_growth_mib=$growth_mib" "second_round: $(tr '\n' ' ' <<<"$clients2")" \
	"busbar_send_timeout2=$send_to2" "rss_kib_peak2=$rss_peak2" "rss_kib_after2=$rss_after2" \
	"p99_ratio=$ratio" "wrk_errors=$errs" "verdict=$ok"
