-- cheapest: the healthy deployment (or provider: one without deployments
-- is one) where the request costs least: the request's likely tokens
-- (ctx.estimate_tokens, counted once) at each model's prices (ctx.price:
-- the price table with the configuration's prices over it), as
-- ctx.estimate reckons. Those cooling down or past their rate limits are
-- left out by ctx.deployments; a model without a price sorts last. Among
-- equal prices, the one chosen least so far, by weight. A failure goes to
-- the next cheapest.
local huge = math.huge

return function(request, providers, ctx)
  local price = ctx.price
  local input, output -- counted when a price is first needed
  local by_model = {} -- this request's USD per model (huge: no price)
  return ctx.balance(providers, function(list)
    local best, best_usd, best_picks
    for i = 1, #list do
      local d = list[i]
      local model = d.model
      local usd = model and by_model[model]
      if not usd then
        local p = model and price(model)
        if p and not input then
          input, output = ctx.estimate_tokens(request)
        end
        usd = p and (input * p.input + output * p.output) / 1e6 or huge
        if model then
          by_model[model] = usd
        end
      end
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
