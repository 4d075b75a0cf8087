-- Leaves work in flight for aiorch_runtime_free to clean up.
local aiorch = require "aiorch"
local port = ...
aiorch.spawn(function() aiorch.sleep(1e9) end)
aiorch.spawn(function()
  aiorch.http.request{ url = "http://127.0.0.1:" .. port .. "/", timeout_ms = 100000 }
end)
aiorch.sleep(1e9)
