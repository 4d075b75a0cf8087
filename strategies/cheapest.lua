-- cheapest: the healthy deployment (or provider: one without deployments
-- is one) where the request costs least, by the price table and the
-- configuration's prices (ctx.estimate: the request's likely tokens at the
-- model's prices). Those cooling down or past their rate limits are left
-- out by ctx.deployments; a model without a price sorts last. Among equal
-- prices, the one chosen least so far, by weight. A failure goes to the
-- next cheapest.
return function(request, providers, ctx)
  local estimate = ctx.estimate
  local by_model = {} -- this request's estimate per model (false: no price)
  return ctx.balance(providers, function(list)
    local best, best_usd, best_picks
    for i = 1, #list do
      local d = list[i]
      local model = d.model
      local usd = model and by_model[model]
      if usd == nil then
        usd = model and estimate(model, request) or false
        if model then
          by_model[model] = usd
        end
      end
      usd = usd or math.huge
      if not best or usd <= best_usd then
        local picks = d.picks / d.weight
        if not best or usd < best_usd or picks < best_picks then
          best, best_usd, best_picks = d, usd, picks
        end
      end
    end
    best.picks = best.picks + 1
    return best
  end)
end
