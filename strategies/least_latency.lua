-- least_latency: peak-EWMA with the power of two choices. Two deployments
-- are drawn at random and the cheaper goes, its cost being its latency
-- (a peak EWMA: a slower answer counts at once, a faster one slowly; it
-- decays while the deployment is not used, so a slow one is tried again
-- in time) times its calls in flight plus one, over its weight. A
-- deployment with no latency yet costs nothing: it is tried first.
local random = math.random

return function(_, providers, ctx)
  local t = ctx.now()
  local latency_now = ctx.latency_now
  local function cost(d)
    local e = latency_now(d, t)
    return e and e * (d.inflight + 1) / d.weight or 0
  end
  return ctx.balance(providers, function(list)
    local n = #list
    if n == 1 then
      return list[1]
    end
    local i = random(n)
    local j = random(n - 1)
    if j >= i then
      j = j + 1
    end
    local a, b = list[i], list[j]
    return cost(b) < cost(a) and b or a
  end)
end
