-- A task that spins forever must fail with a clear error while others go on.
local aiorch = require "aiorch"
local spinner = aiorch.spawn(function()
  while true do pcall(function() while true do end end) end
end)
local sleeper = aiorch.spawn(function() aiorch.sleep(10); return "slept" end)
local ok, err = spinner:await()
assert(ok == nil and err:find("instruction budget exceeded"), tostring(err))
assert(sleeper:await() == "slept")
local bad = aiorch.spawn(function() error("boom") end)
local _, msg, kind = bad:await()
assert(kind == "error" and msg:find("boom"), msg)
return 7
