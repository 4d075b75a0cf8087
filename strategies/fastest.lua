-- fastest: start every provider at once; the first success wins and the
-- others are cancelled at once (their transfers aborted).
return function(_, providers, ctx)
  local t0 = ctx.now()
  local tasks, results = {}, {}
  for i, p in ipairs(providers) do
    tasks[i] = ctx.spawn(function()
      local r = ctx.call(p)
      results[i] = r
      return r
    end)
  end
  local winner, index, errors = ctx.first(tasks, function(r)
    return type(r) == "table" and r.status == "success"
  end)

  -- No result: cancelled when another won, else the task itself failed.
  local missing = winner and "cancelled" or "error"
  local attempts = {}
  for i, p in ipairs(providers) do
    local r = results[i]
    local m = r and r.metadata or {}
    attempts[i] = { provider = p, status = r and r.status or missing, kind = m.error_kind,
                    latency_ms = r and r.latency_ms, http_status = m.http_status }
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
    failures[i] = results[i] or ctx.error_response(p, "internal", errors and errors[i] or "no response")
  end
  local e = ctx.all_failed(failures)
  e.metadata.attempts = attempts
  e.latency_ms = math.floor(ctx.now() - t0 + 0.5) -- the wall time of the whole try
  return e
end
