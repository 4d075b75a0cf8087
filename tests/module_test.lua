-- The C module in a plain lua5.4: `require "aiorch"` and aiorch.run drive the loop.
local aiorch = require "aiorch"
local passed, failed = 0, 0
local function check(cond, what)
  if cond then passed = passed + 1 else failed = failed + 1; print("FAIL " .. what) end
end

check(type(aiorch.run) == "function" and type(aiorch.http.request) == "function", "module loads")
local t0 = aiorch.now()
local a, b = aiorch.run(function(x)
  local t = aiorch.spawn(function() aiorch.sleep(30); return "child" end)
  aiorch.sleep(10)
  return x, t:await()
end, "parent")
check(a == "parent" and b == "child", "run returns the task's values")
check(aiorch.now() - t0 >= 29, "the loop really slept")
check(not pcall(aiorch.sleep, 1), "sleep outside a task raises")
local v, why, msg = aiorch.run(function() error("it broke") end)
check(v == nil and why == "error" and tostring(msg):find("it broke", 1, true),
  "a task that raised: nil, 'error', message")

-- A request to a closed port fails with a kind, not a raise.
local status, kind = aiorch.run(function()
  return aiorch.http.request{ url = "http://127.0.0.1:1/", connect_timeout_ms = 2000 }
end)
check(status == nil and kind == "connect", "connection refused is 'connect' (" .. tostring(kind) .. ")")
check(require("aiorch") == aiorch, "one module per state")
print(string.format("%d passed, %d failed", passed, failed))
os.exit(failed == 0 and 0 or 1)
