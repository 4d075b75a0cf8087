-- The mock providers (aiorch.mock) as an upstream that tells what it got:
--   build/aiorch run tests/sdk/recording_upstream.lua
-- Prints "PORT <mock> <control>" as its first line, then serves on
-- 127.0.0.1 until killed. The mock keeps every request it receives; the
-- control port answers
--   GET  /requests  those received since the last take, oldest first:
--                   [{method, path (without the /_mock/ prefix), headers,
--                   body (the bytes as received), rejected (the message of
--                   the mock's 400), thinking_verified}]
--   POST /take      the same, and forgets them
-- so that a test can assert exactly what went upstream.
local aiorch = require "aiorch"
local json = require "aiorch.json"
local mock = require "aiorch.mock"

local function record_of(req)
  return {
    method = req.method, path = req.path, headers = req.headers, body = req.body or "",
    rejected = req.rejected, thinking_verified = req.thinking_verified,
  }
end

local function main()
  local m = assert(mock.start { host = "127.0.0.1", port = 0 })
  local control = assert(aiorch.server.listen {
    host = "127.0.0.1", port = 0,
    handler = function(req, res)
      local list = m.requests
      local out = json.array()
      for i, r in ipairs(list) do
        out[i] = record_of(r)
      end
      local route = req.method .. " " .. req.path
      if route == "POST /take" then
        for i = #list, 1, -1 do
          list[i] = nil
        end
      elseif route ~= "GET /requests" then
        return res:respond(404, { ["content-type"] = "text/plain" }, "unknown route\n")
      end
      res:respond(200, { ["content-type"] = "application/json" }, json.encode(out))
    end,
  })
  io.stdout:write("PORT ", m.port, " ", control.port, "\n")
  io.stdout:flush()
  while true do
    aiorch.sleep(3600 * 1000)
  end
end

return main()
