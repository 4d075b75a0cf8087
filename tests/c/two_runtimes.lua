-- Sleeps in steps, so that two runtimes on one loop interleave.
local aiorch = require "aiorch"
local name, steps = ...
local t0 = aiorch.now()
for _ = 1, tonumber(steps) do aiorch.sleep(20) end
local elapsed = aiorch.now() - t0
io.write(string.format("%s %.0f\n", name, elapsed))
return 0
