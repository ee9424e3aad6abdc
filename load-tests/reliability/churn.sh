#!/usr/bin/env bash
# Registration churn for the soak: every 0.5 s registers a new instance of `churn` and
# deregisters the one from 10 rounds before. Args: registry_port token backend_addr.
# Prints "CHURN ok=N failed=M" when stopped (SIGTERM).
reg=$1 token=$2 addr=$3
ok=0 failed=0 i=0
trap 'echo "CHURN ok=$ok failed=$failed"; exit 0' TERM INT
while :; do
	i=$((i + 1))
	code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT -H "authorization: Bearer $token" \
		-H 'content-type: application/json' -d "{\"address\":\"$addr\",\"ttl\":10}" \
		"http://127.0.0.1:$reg/v1/services/churn/instances/soak-$i")
	case $code in 2*) ok=$((ok + 1)) ;; *) failed=$((failed + 1)) ;; esac
	if [ $i -gt 10 ]; then
		code=$(curl -s -o /dev/null -w '%{http_code}' -X DELETE -H "authorization: Bearer $token" \
			"http://127.0.0.1:$reg/v1/services/churn/instances/soak-$((i - 10))")
		case $code in 2*) ok=$((ok + 1)) ;; *) failed=$((failed + 1)) ;; esac
	fi
	sleep 0.5 &
	wait $!
done
