#!/usr/bin/env bash
# `make reliability`: every load-time reliability case, one after another, each bounded
# in time (about 30+40+75+165+50+30+40+SOAK_SECONDS+10 s). Results: load-tests/reliability/out/*.txt.
set -uo pipefail
dir="$(cd "$(dirname "$0")" && pwd)"
rm -f "$dir"/out/*.txt
status=0
for case in reload upgrade slowloris slowbody h2abuse body413 redis-loss soak; do
	echo "== $case"
	bash "$dir/$case.sh" || status=1
	grep -q '^verdict=pass' "$dir/out/$case.txt" 2>/dev/null || status=1
done
echo "== verdicts"
grep -H '^verdict=' "$dir"/out/*.txt
exit $status
