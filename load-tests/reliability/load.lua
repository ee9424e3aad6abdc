-- wrk script for the reliability cases: optional pacing (WRK_DELAY_MS between requests
-- on each connection), a tally of non-2xx statuses, and one machine-readable summary line.
local d = tonumber(os.getenv("WRK_DELAY_MS") or "0") or 0
if d > 0 then
  function delay()
    return d
  end
end

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

bad = {}
function response(status, headers, body)
  if status < 200 or status > 299 then
    bad[status] = (bad[status] or 0) + 1
    if not badbody then
      badbody = string.sub(body or "", 1, 160):gsub("%s", " ")
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local statuses = ""
  local first = ""
  for _, t in ipairs(threads) do
    first = t:get("badbody") or first
    local b = t:get("bad")
    for k, v in pairs(b or {}) do
      statuses = statuses .. k .. "x" .. v .. ","
    end
  end
  io.write(string.format(
    "RESULT requests=%d non2xx=%d connect=%d read=%d write=%d timeout=%d p50_us=%d p99_us=%d max_us=%d rps=%.0f statuses=%s\n",
    summary.requests, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max,
    summary.requests / (summary.duration / 1e6), statuses))
  if first ~= "" then
    io.write("RESULT_FIRST_BAD_BODY " .. first .. "\n")
  end
end
