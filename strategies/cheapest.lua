-- cheapest: the healthy deployment (or provider: one without deployments
-- is one) where the request costs least: the request's likely tokens
-- (ctx.estimate_tokens) at each model's prices (ctx.price: the price table
-- with the configuration's prices over it), as ctx.estimate reckons. Those
-- cooling down or past their rate limits are left out by ctx.deployments;
-- a model without a price sorts last. Among equal prices (the same model),
-- the one chosen least so far, by weight. A failure goes to the next
-- cheapest.
local huge = math.huge

-- The USD of the request on model (price p), kept in memo (memo.input and
-- memo.output: the request's tokens, counted the first time).
local function usd_of(memo, model, p, request, ctx)
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

-- How a model at price pa compares with one at price pb, whatever the
-- request: -1 cheaper, 0 the same, 1 dearer; nil when the request decides.
-- A model no dearer per input token and per output token than another is
-- cheaper for every request (a request has at least one token of each):
-- most models are ordered so, and the request's tokens are counted only
-- for two models where one is cheaper per input token and the other per
-- output token.
local function order_of(pa, pb)
  if not pa or not pb then
    return (pa and -1) or (pb and 1) or 0 -- unpriced: last
  end
  local ai, ao, bi, bo = pa.input, pa.output, pb.input, pb.output
  if ai == bi and ao == bo then
    return 0
  elseif ai <= bi and ao <= bo then
    return -1
  elseif ai >= bi and ao >= bo then
    return 1
  end
  return nil
end

-- (The loop runs for every deployment: it compares each one's model with
-- the best one's once, the two other models seen last keep their order,
-- and a dearer deployment costs a few comparisons.)
return function(request, providers, ctx)
  local memo -- this request's USD per model: made when prices alone do not order two models
  local price = ctx.price
  return ctx.balance(providers, function(list)
    local best = list[1]
    local best_model, best_picks = best.model or "", best.picks / best.weight
    local best_price = price(best_model)
    local m1, o1, p1, m2, o2, p2 -- two other models: their order against best's, their price
    for i = 2, #list do
      local d = list[i]
      local model = d.model or ""
      local order, p
      if model == best_model then
        order = 0
      elseif model == m1 then
        order, p = o1, p1
      elseif model == m2 then
        order, p = o2, p2
      else
        p = price(model)
        order = order_of(p, best_price)
        if not order then
          memo = memo or {}
          local usd = memo[model] or usd_of(memo, model, p, request, ctx)
          local best_usd = memo[best_model] or usd_of(memo, best_model, best_price, request, ctx)
          order = usd < best_usd and -1 or (usd > best_usd and 1 or 0)
        end
        m1, o1, p1, m2, o2, p2 = model, order, p, m1, o1, p1
      end
      if order <= 0 then
        local picks = d.picks / d.weight
        if order < 0 then
          best, best_model, best_price, best_picks = d, model, p, picks
          m1, m2 = nil, nil -- (their order was against the former best)
        elseif picks < best_picks then
          best, best_picks = d, picks
        end
      end
    end
    best.picks = best.picks + 1
    return best
  end)
end
