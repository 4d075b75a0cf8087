-- first_k: call every chosen provider (or deployment) at once and return
-- the first k answers that succeed, in the order they arrived; the others
-- are cancelled as soon as the k-th arrives (their transfers aborted).
-- k is the policy's parallel_k (default 1). When fewer than k succeed, the
-- list holds those that did, then the failures. Answers are taken whole
-- (not streamed), as with parallel.
local WHOLE = { stream = false }

return function(_, providers, ctx)
  local n = #providers
  local k = math.min(ctx.policy(providers[1]).parallel_k or 1, n)
  local tasks, out = {}, {}
  for i, p in ipairs(providers) do
    tasks[i] = ctx.spawn(ctx.call, p, WHOLE)
  end
  local winner = ctx.first(tasks, function(r)
    if type(r) == "table" and r.status == "success" then
      out[#out + 1] = r
      return #out >= k
    end
    return false
  end)
  if winner then
    for i, p in ipairs(providers) do
      if tasks[i]:status() == "cancelled" then
        ctx.count(p, "races_lost")
      end
    end
    return out
  end
  -- fewer than k succeeded: every task has ended
  local values, _, messages = ctx.gather(tasks)
  for i, p in ipairs(providers) do
    local r = values[i]
    if not (r and r.status == "success") then
      out[#out + 1] = r or ctx.error_response(p, "internal", messages[i] or "no response")
    end
  end
  return out
end
