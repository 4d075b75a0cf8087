-- arrived_by: call every chosen provider (or deployment) at once and
-- return what has arrived after the policy's arrived_by_ms (default 1000),
-- in provider order; the calls still running then are cancelled (their
-- transfers aborted). Returns sooner when every call has ended. When
-- nothing arrived in time: a list of one timeout answer. Answers are taken
-- whole (not streamed), as with parallel.
local WHOLE = { stream = false }

return function(_, providers, ctx)
  local ms = ctx.policy(providers[1]).arrived_by_ms or 1000
  local t0 = ctx.now()
  local tasks = {}
  for i, p in ipairs(providers) do
    tasks[i] = ctx.spawn(ctx.call, p, WHOLE)
  end
  -- gather cancels the tasks still running at the deadline
  local values, errors, messages = ctx.gather(tasks, ms)
  local out, late = {}, {}
  for i, p in ipairs(providers) do
    local r = values[i]
    if r then
      out[#out + 1] = r
    elseif errors[i] == "timeout" then
      late[#late + 1] = p
    else
      out[#out + 1] = ctx.error_response(p, "internal", messages[i] or "no response")
    end
  end
  if #out == 0 then
    local e = ctx.error_response(providers[1], "timeout",
      string.format("nothing arrived within %d ms (%s cancelled)", ms, table.concat(late, ", ")))
    e.status = "timeout"
    e.latency_ms = math.floor(ctx.now() - t0 + 0.5)
    return { e }
  end
  for _, r in ipairs(out) do
    r.metadata.cancelled = #late > 0 and late or nil
  end
  return out
end
