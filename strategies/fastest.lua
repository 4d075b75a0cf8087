-- fastest: start every provider at once; the first success wins and the
-- others are cancelled at once (their transfers aborted). Streaming: the
-- first token wins, and the others are cancelled before it is passed on.
return function(_, providers, ctx)
  local t0 = ctx.now()
  local tasks, results = {}, {}
  ctx.on_commit(function(owner)
    for i, t in ipairs(tasks) do
      if providers[i] ~= owner then
        ctx.cancel(t)
      end
    end
  end)
  for i, p in ipairs(providers) do
    tasks[i] = ctx.spawn(function()
      local r = ctx.call(p)
      results[i] = r
      return r
    end)
  end
  -- A stream's owner ends the race even when it fails: its tokens went out.
  -- When none wins: nil, kind, message, values, errors, messages.
  local winner, index, _, _, _, messages = ctx.first(tasks, function(r)
    return type(r) == "table" and (r.status == "success" or r.ia_provider_name == ctx.owner())
  end)

  local attempts = {}
  for i, p in ipairs(providers) do
    local r = results[i]
    if r then
      ctx.add_attempts(attempts, r)
    else -- no result: cancelled when another won, else the task itself failed
      attempts[#attempts + 1] = { provider = p, status = winner and "cancelled" or "error" }
    end
  end

  if winner then
    ctx.count(providers[index], "races_won")
    for i, p in ipairs(providers) do
      if i ~= index then
        ctx.count(p, "races_lost")
      end
    end
    winner.metadata.attempts = attempts
    return winner
  end

  local failures = {}
  for i, p in ipairs(providers) do
    ctx.count(p, "races_lost")
    failures[i] = results[i] or ctx.error_response(p, "internal", messages and messages[i] or "no response")
  end
  local e = ctx.all_failed(failures)
  e.metadata.attempts = attempts
  e.latency_ms = math.floor(ctx.now() - t0 + 0.5) -- the wall time of the whole try
  return e
end
