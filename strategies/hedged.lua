-- hedged: start the first provider; if it has not answered after a delay,
-- start the next one as well (a hedge), and so on. A failure starts the
-- next provider at once. The first success wins and the rest are cancelled.
--
-- The delay is the policy's hedge_delay_ms, or else the waiting provider's
-- observed p95 latency. Hedges are extra load, so they are capped: each
-- hedged request earns hedge_budget (say 0.1) of a hedge, a hedge spends
-- one, and the savings never exceed BURST. Starting the next provider after
-- a failure is a fallback, not a hedge: it is always allowed.
local DEFAULT_DELAY_MS = 500 -- until enough latencies were seen
local MIN_SAMPLES = 20
local BURST = 10

local budget = BURST -- hedges this runtime may start now

return function(_, providers, ctx)
  local t0 = ctx.now()
  budget = math.min(BURST, budget + ctx.policy(providers[1]).hedge_budget)

  local tasks, results, started = {}, {}, 0
  local waker -- a sleeping task that a finishing call cancels, to wake us

  local function delay_for(p)
    local d = ctx.policy(p).hedge_delay_ms
    if d then
      return d
    end
    local lat = ctx.latency(p)
    if lat.count >= MIN_SAMPLES and lat.p95 then
      return lat.p95
    end
    return DEFAULT_DELAY_MS
  end

  local next_at
  local function start()
    started = started + 1
    local i, p = started, providers[started]
    tasks[i] = ctx.spawn(function()
      -- However this task ends, the loop below looks again.
      local _ <close> = setmetatable({}, { __close = function()
        if waker then
          ctx.cancel(waker)
        end
      end })
      local r = ctx.call(p)
      results[i] = r
      return r
    end)
    next_at = ctx.now() + delay_for(p)
  end

  -- A stream's first token settles the race: nobody else may start or go on.
  ctx.on_commit(function(owner)
    next_at = math.huge
    for i, t in ipairs(tasks) do
      if providers[i] ~= owner then
        ctx.cancel(t)
      end
    end
  end)

  local function live(t)
    local s = t:status()
    return s ~= "done" and s ~= "failed" and s ~= "cancelled"
  end

  local winner
  start()
  while not winner do
    local running = 0
    for i = 1, started do
      local r = results[i]
      if r and (r.status == "success" or r.ia_provider_name == ctx.owner()) then
        winner = r
        break
      elseif not r and live(tasks[i]) then
        running = running + 1
      end
    end
    if winner then
      break
    end
    local more = started < #providers and ctx.owner() == nil
    if running == 0 then
      if not more then
        break -- every provider failed
      end
      start() -- the last one failed: the next goes at once
    elseif more and ctx.now() >= next_at then
      if budget >= 1 then
        budget = budget - 1
        ctx.count(providers[started + 1], "hedges")
        ctx.log("debug", "hedging %s after %d ms", providers[started + 1], math.floor(ctx.now() - t0))
        start()
      else
        next_at = math.huge -- out of budget: wait for the ones running
      end
    else
      waker = ctx.spawn(ctx.sleep, more and next_at ~= math.huge and math.max(0, next_at - ctx.now()) or 3.6e6)
      waker:await()
      waker = nil
    end
  end

  local attempts, failures = {}, {}
  for i = 1, started do
    local r = results[i]
    if r ~= winner then
      ctx.cancel(tasks[i])
    end
    if r then
      ctx.add_attempts(attempts, r)
      if r ~= winner then
        failures[#failures + 1] = r
      end
    else
      local st = tasks[i]:status()
      attempts[#attempts + 1] = { provider = providers[i], status = st == "failed" and "error" or "cancelled" }
      if st == "failed" then
        failures[#failures + 1] = ctx.error_response(providers[i], "internal", "the call raised an error")
      end
    end
  end
  if winner then
    winner.metadata.attempts = attempts
    winner.metadata.providers_started = started
    return winner
  end
  local e = ctx.all_failed(failures)
  e.metadata.attempts = attempts
  e.latency_ms = math.floor(ctx.now() - t0 + 0.5) -- the wall time of the whole try
  return e
end
