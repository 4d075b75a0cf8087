-- The server of the fuzz_http_server target: small limits that fuzzed
-- requests can reach, and a handler that uses what was parsed.
local aiorch = require "aiorch"

local function handler(req, res)
  assert(req.checked, "on_headers ran first")
  -- Yielding keeps the request in flight while more input (or the
  -- client's EOF, which cancels it) arrives.
  if req.path:find("yield", 1, true) then
    aiorch.sleep(0)
  end
  local n = 0
  for name, value in pairs(req.headers) do
    n = n + #name + #value
  end
  if req.path:find("stream", 1, true) then
    res:start(200, { ["content-type"] = "text/plain" })
    res:write(req.method)
    res:write(req.body)
    res:finish(tostring(n))
  else
    res:respond(200, { ["content-type"] = "text/plain", ["x-header-bytes"] = tostring(n) }, req.body)
  end
end

-- Refusals after the headers (a body over max_body, a malformed one) are
-- worded from what was parsed. (A failing hook is reported, which this
-- target counts as a crash: serve_spec covers that case.)
local function on_refuse(status, req)
  local n = 0
  for name, value in pairs(req.headers) do
    n = n + #name + #value
  end
  return '{"status":' .. status .. ',"header_bytes":' .. n .. '}', req.headers["x-type"] or "application/json"
end

-- Before any body is read: a path with "deny" is answered at once, with
-- headers of its own; the rest go on, marked for the handler. (An empty
-- content type is a mistake the server reports, which this target counts
-- as a crash: server_spec covers that case.)
local function on_headers(req)
  if req.path:find("deny", 1, true) then
    local t = req.headers["x-type"]
    return 401, '{"denied":"' .. req.method .. '"}', t ~= "" and t or nil, { ["www-authenticate"] = "Bearer" }
  end
  req.checked = true
end

-- max_buffered below max_body: a chunked body past it gets 503.
package.loaded.fuzz_server = assert(aiorch.server.listen {
  host = "127.0.0.1",
  port = 0,
  max_body = 4096,
  max_header = 2048,
  max_buffered = 3000,
  handler = handler,
  on_refuse = on_refuse,
  on_headers = on_headers,
})
