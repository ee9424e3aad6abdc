-- wrk script for bench.sh's request-body scenarios (post1k, post64k): every request is
-- a POST with a body of SIZE bytes, framed by Content-Length or chunked.
--
-- Usage: wrk ... -s body.lua URL -- SIZE length
--        wrk ... -s body.lua URL -- SIZE chunked CHUNK
--
-- `length`: wrk's own request builder (it adds Content-Length). `chunked`: the request
-- is built here, raw: `Transfer-Encoding: chunked` and the body framed as SIZE/CHUNK
-- chunks of CHUNK bytes (the last one shorter if CHUNK does not divide SIZE) and the
-- zero-size last chunk. wrk.format always adds a Content-Length, which next to
-- Transfer-Encoding would make the request invalid (RFC 9112 §6.3), so for chunked the
-- script replaces wrk.format, which wrk calls once after init to build the request it
-- then sends unchanged on every connection (the static path, as without a script).
local function body_bytes(n)
  -- Printable, not all one byte, so nothing along the way can compress or shortcut it.
  local pattern = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_"
  return string.rep(pattern, math.floor(n / #pattern)) .. pattern:sub(1, n % #pattern)
end

function init(args)
  local size = tonumber(args[1])
  local framing = args[2] or "length"
  assert(size and size >= 1, "body.lua: SIZE must be a number >= 1")
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/octet-stream"
  if framing == "length" then
    wrk.body = body_bytes(size)
    return
  end
  assert(framing == "chunked", "body.lua: framing must be 'length' or 'chunked'")
  local chunk = tonumber(args[3]) or 4096
  assert(chunk >= 1, "body.lua: CHUNK must be >= 1")
  local data = body_bytes(size)
  local parts = {}
  for i = 1, size, chunk do
    local piece = data:sub(i, i + chunk - 1)
    parts[#parts + 1] = string.format("%x\r\n", #piece) .. piece .. "\r\n"
  end
  parts[#parts + 1] = "0\r\n\r\n"
  local head = { string.format("POST %s HTTP/1.1", wrk.path) }
  for name, value in pairs(wrk.headers) do
    head[#head + 1] = string.format("%s: %s", name, value)
  end
  head[#head + 1] = "Transfer-Encoding: chunked"
  local req = table.concat(head, "\r\n") .. "\r\n\r\n" .. table.concat(parts)
  wrk.format = function() return req end
end
