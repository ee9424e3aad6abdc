-- wrk script for bench.sh scenario (c): request i is sent as user u<i mod USERS>
-- (header x-user-id), so USERS distinct users take turns. All requests are built once
-- in init(), so the per-request cost in wrk is a table lookup, the same for every
-- target. Usage: wrk ... -s users.lua URL -- USERS
local reqs = {}
local users = 10000
local i = 0

function init(args)
  users = tonumber(args[1] or "10000")
  local path = wrk.path
  for u = 0, users - 1 do
    reqs[u] = wrk.format("GET", path, { ["Host"] = wrk.host, ["x-user-id"] = "u" .. u })
  end
end

function request()
  local r = reqs[i]
  i = (i + 1) % users
  return r
end
