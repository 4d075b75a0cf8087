-- cheapest: the healthy deployment (or provider: one without deployments
-- is one) where the request costs least: the request's likely tokens
-- (ctx.estimate_tokens) at each model's prices (ctx.price: the price table
-- with the configuration's prices over it), as ctx.estimate reckons. Those
-- cooling down or past their rate limits are left out by ctx.deployments;
-- a model without a price sorts last. Among equal prices (the same model),
-- the one chosen least so far, by weight. A failure goes to the next
-- cheapest.
local huge = math.huge

-- The USD of the request on model, kept in memo (memo.input and
-- memo.output: the request's tokens, counted the first time).
local function usd_of(memo, model, request, ctx)
  local p = ctx.price(model)
  local usd = huge
  if p then
    if not memo.input then
      memo.input, memo.output = ctx.estimate_tokens(request)
    end
    usd = (memo.input * p.input + memo.output * p.output) / 1e6
  end
  memo[model] = usd
  return usd
end

return function(request, providers, ctx)
  local memo -- this request's USD per model: made when two models are compared
  return ctx.balance(providers, function(list)
    local best = list[1]
    local best_model, best_picks, best_usd = best.model or "", best.picks / best.weight, nil
    for i = 2, #list do
      local d = list[i]
      local model = d.model or ""
      if model == best_model then
        local picks = d.picks / d.weight
        if picks < best_picks then
          best, best_picks = d, picks
        end
      else
        memo = memo or {}
        best_usd = best_usd or memo[best_model] or usd_of(memo, best_model, request, ctx)
        local usd = memo[model] or usd_of(memo, model, request, ctx)
        if usd <= best_usd then
          local picks = d.picks / d.weight
          if usd < best_usd or picks < best_picks then
            best, best_model, best_usd, best_picks = d, model, usd, picks
          end
        end
      end
    end
    best.picks = best.picks + 1
    return best
  end)
end
