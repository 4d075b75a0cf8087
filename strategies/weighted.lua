-- weighted: smooth weighted round robin over the providers' deployments
-- (a provider without deployments is one, of weight 1). Over weights 3:1
-- every 4 calls go A A B A, never in bursts. Deployments cooling down or
-- past their own rpm/tpm are passed over; a failure tries the next choice.
local function pick(list)
  local total, best, best_cw = 0, nil, -math.huge
  for i = 1, #list do
    local d = list[i]
    local w = d.weight
    local cw = d.swrr + w
    d.swrr = cw
    total = total + w
    if cw > best_cw then
      best, best_cw = d, cw
    end
  end
  best.swrr = best_cw - total
  return best
end

return function(_, providers, ctx)
  return ctx.balance(providers, pick)
end
