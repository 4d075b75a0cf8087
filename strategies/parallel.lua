-- parallel: call every chosen provider at once; one response per provider,
-- in provider order. A failure in one leaves the others intact: so even
-- for a streamed request each answer is taken whole (a stream cut in one
-- provider must not end the others' answers), and sent when all are in.
local WHOLE = { stream = false }

return function(_, providers, ctx)
  local tasks = {}
  for i, p in ipairs(providers) do
    tasks[i] = ctx.spawn(ctx.call, p, WHOLE)
  end
  local values, _, messages = ctx.gather(tasks)
  local out = {}
  for i, p in ipairs(providers) do
    out[i] = values[i] or ctx.error_response(p, "internal", messages[i] or "no response")
  end
  return out
end
