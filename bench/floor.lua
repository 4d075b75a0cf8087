-- The runtime's floor: build/aiorch run bench/floor.lua PORT [UPSTREAM_URL]
-- An HTTP server on 127.0.0.1:PORT made of aiorch.server alone. A POST gets
-- a fixed answer; with UPSTREAM_URL, one aiorch.http.request to it instead,
-- whose status and body are relayed. A GET (readiness) gets 200 either way.
-- No orchestration, no JSON: bench/gateway.lua runs it under the gateway's
-- load to show what any gateway on this runtime costs at least per request.
local aiorch = require "aiorch"

local port, upstream = ...
port = math.tointeger(tonumber(port or ""))
assert(port, "usage: aiorch run bench/floor.lua PORT [UPSTREAM_URL]")

local ANSWER = '{"id":"chatcmpl-floor","object":"chat.completion","model":"gpt-4o-mini",'
  .. '"choices":[{"index":0,"message":{"role":"assistant","content":"Fast enough."},'
  .. '"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}'
local JSON = { ["content-type"] = "application/json" }
local UPSTREAM_HEADERS = { ["content-type"] = "application/json", authorization = "Bearer sk-floor" }

local function handler(req, res)
  if req.method ~= "POST" or not upstream then
    res:respond(200, JSON, ANSWER)
    return
  end
  local status, kind, body = aiorch.http.request {
    method = "POST", url = upstream, body = req.body, headers = UPSTREAM_HEADERS,
  }
  if status then
    res:respond(status, JSON, body)
  else
    res:respond(502, JSON, '{"error":"' .. kind .. '"}')
  end
end

aiorch.server.listen { host = "127.0.0.1", port = port, handler = handler }
print("PORT " .. port)
io.stdout:flush()
aiorch.sleep(math.huge)
