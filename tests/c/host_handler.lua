-- The handler of tests/c/test_host.c, as a host loads it (aiorch_handler_load).
local aiorch = require "aiorch"

local prefix = ...

local function handler(req, res)
  local path = req.path
  if path == "/hello" then
    res:respond(200, { ["x-prefix"] = prefix, ["x-count"] = 3 }, "hello " .. req.body)
  elseif path == "/stream" then
    res:start(200, { ["content-type"] = "text/plain" })
    for i = 1, 200 do
      assert(res:write(string.format("%04d", i) .. string.rep("x", 1020)))
    end
    res:finish("end")
  elseif path == "/wait" then
    local guard <close> = setmetatable({}, { __close = function() _G.closed = (_G.closed or 0) + 1 end })
    aiorch.sleep(60000)
    res:respond(200, {}, "late " .. type(guard))
  elseif path == "/raise" then
    res:on_error('{"error":"handler failed"}')
    error("boom")
  else
    res:respond(404, {}, "no " .. path)
  end
end

return {
  handler = handler,
  max_body = 100,
  on_headers = function(req)
    if req.headers["x-key"] ~= "k" then
      return 401, '{"error":"no key"}', "application/json", { ["www-authenticate"] = "Bearer" }
    end
  end,
  on_refuse = function(status, req)
    return '{"refused":' .. status .. ',"path":"' .. req.path .. '"}', "application/json"
  end,
}
