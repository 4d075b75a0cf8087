-- A task that spins forever must fail with a clear error while others go on.
local aiorch = require "aiorch"
local spinner = aiorch.spawn(function()
  while true do pcall(function() while true do end end) end
end)
local sleeper = aiorch.spawn(function() aiorch.sleep(10); return "slept" end)
local ok, kind, err = spinner:await()
assert(ok == nil and kind == "error" and err:find("instruction budget exceeded"), tostring(err))
assert(sleeper:await() == "slept")
-- Nor does spinning inside a coroutine of its own hide it.
for _, make in ipairs { coroutine.wrap, coroutine.create } do
  local nested = aiorch.spawn(function()
    local co = make(function() while true do end end)
    if type(co) == "function" then co() else assert(coroutine.resume(co)) end
  end)
  local nok, _, nerr = nested:await()
  assert(nok == nil and tostring(nerr):find("instruction budget exceeded"), tostring(nerr))
end
local bad = aiorch.spawn(function() error("boom") end)
local _, bad_kind, msg = bad:await()
assert(bad_kind == "error" and msg:find("boom"), msg)
return 7
