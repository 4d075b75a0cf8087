-- least_busy: the deployment with the fewest calls in flight (in this
-- process), relative to its weight; among equals, the one chosen least so
-- far, so that idle deployments share the traffic. A deployment that hangs
-- keeps its calls in flight and so stops being chosen.
local function pick(list)
  local best, best_load, best_calls = nil, math.huge, math.huge
  for i = 1, #list do
    local d = list[i]
    local w = d.weight
    local load = (d.inflight + 1) / w
    local calls = d.picks / w
    if load < best_load or (load == best_load and calls < best_calls) then
      best, best_load, best_calls = d, load, calls
    end
  end
  best.picks = best.picks + 1
  return best
end

return function(_, providers, ctx)
  return ctx.balance(providers, pick)
end
