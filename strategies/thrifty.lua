-- thrifty: providers in priority order until one succeeds (as fallback),
-- each on a cheaper model once the client's budget runs low: when what is
-- left (ctx.budget()) is under a share of the budget, a provider with a
-- cheaper model listed below is called with that model (one ctx.price
-- knows: a model without a price is no saving anyone can show).
--
-- Settings (environment, read when the strategy is loaded):
--   AIORCH_THRIFTY_BELOW   the share of the budget under which to save
--                          (0 to 1; default 0.2)
--   AIORCH_THRIFTY_MODELS  provider=model pairs, comma-separated: the
--                          cheaper model of each provider (default below)
-- An example to copy and change: a user's strategies/thrifty.lua comes first.
local BELOW = tonumber(os.getenv("AIORCH_THRIFTY_BELOW") or "") or 0.2
local CHEAPER = {
  openai = "gpt-4o-mini",
  azure = "gpt-4o-mini",
  anthropic = "claude-3-haiku-20240307",
  gemini = "gemini-2.0-flash-lite",
  cohere = "command-r7b-12-2024",
}
for provider, model in (os.getenv("AIORCH_THRIFTY_MODELS") or ""):gmatch("([%w_%-]+)=([^,%s]+)") do
  CHEAPER[provider] = model
end

-- Whether the budget left is under BELOW of it (USD first, else tokens).
local function low(b)
  if not b then
    return false
  end
  if b.usd and b.limit_usd then
    return b.usd < BELOW * b.limit_usd
  end
  if b.tokens and b.limit_tokens then
    return b.tokens < BELOW * b.limit_tokens
  end
  return false
end

return function(_, providers, ctx)
  local t0 = ctx.now()
  local saving = low(ctx.budget())
  if saving then
    ctx.log("info", "the budget is low: cheaper models where there are some")
  end
  local attempts, failures = {}, {}
  for i, p in ipairs(providers) do
    if i > 1 then
      ctx.count(p, "fallback_activations")
    end
    local opts
    local cheaper = saving and CHEAPER[p]
    if cheaper and ctx.price(cheaper) then
      opts = { model = cheaper }
    end
    local r = ctx.call(p, opts)
    ctx.add_attempts(attempts, r)
    if r.status == "success" or ctx.owner() == p then
      r.metadata.attempts = attempts
      if opts then
        r.metadata.thrifty = cheaper
      end
      return r
    end
    failures[#failures + 1] = r
  end
  local e = ctx.all_failed(failures)
  e.metadata.attempts = attempts
  e.latency_ms = math.floor(ctx.now() - t0 + 0.5)
  return e
end
