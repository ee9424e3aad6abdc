-- wrk script for bench.sh's latency-under-load scenario: paced (open-loop-like) load
-- at a chosen rate, with exact percentiles.
--
-- Each connection waits a random, exponentially distributed time before each request
-- (mean = CONNS / RATE), so the CONNS connections together send a Poisson stream of
-- about RATE requests per second, out of phase with each other. (h2load --rps, the
-- other fixed-rate tool at hand, starts every client's timer at the same moment, so its
-- connections fire in bursts; and it prints no percentiles.) wrk starts a request's
-- clock when it writes the request, as h2load does; at 50% load a connection is idle
-- when its next request is due, so the wait the pacing adds is not hidden latency.
-- The achieved rate is a little under RATE (each connection's cycle is delay + the
-- response time); bench.sh reports it.
--
-- Usage: wrk -t1 -cCONNS ... -s paced.lua URL -- RATE CONNS [BODY_BYTES]
-- With BODY_BYTES every request is a POST with a body of that many bytes (Content-Length).
-- Prints one line "PACED p50 p99 p99.9 max requests" (microseconds) at the end.
local mean_ms = 10

function init(args)
  local rate = tonumber(args[1])
  local conns = tonumber(args[2])
  mean_ms = conns * 1000 / rate
  local body = tonumber(args[3])
  if body then
    wrk.method = "POST"
    wrk.headers["Content-Type"] = "application/octet-stream"
    wrk.body = string.rep("x", body)
  end
  math.randomseed(os.time())
end

function delay()
  -- wrk takes whole milliseconds: round up with probability equal to the fraction, so
  -- the mean stays mean_ms.
  local d = -mean_ms * math.log(1 - math.random())
  local whole = math.floor(d)
  if math.random() < d - whole then whole = whole + 1 end
  return whole
end

function done(summary, latency, requests)
  io.write(string.format("PACED %d %d %d %d %d\n", latency:percentile(50),
    latency:percentile(99), latency:percentile(99.9), latency.max, summary.requests))
end
