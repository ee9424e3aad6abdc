-- wrk script for the reliability cases: optional pacing (WRK_DELAY_MS between requests
-- on each connection) and one machine-readable summary line.
local d = tonumber(os.getenv("WRK_DELAY_MS") or "0") or 0
if d > 0 then
  function delay()
    return d
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d non2xx=%d connect=%d read=%d write=%d timeout=%d p50_us=%d p99_us=%d max_us=%d rps=%.0f\n",
    summary.requests, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max,
    summary.requests / (summary.duration / 1e6)))
end
