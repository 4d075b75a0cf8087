-- quorum: call every chosen provider (or deployment) at once; the answer
-- is the first one that k of them give (the same text, whitespace and case
-- aside). The others are cancelled as soon as k agree, or as soon as no
-- answer can reach k any more (then: an error naming every answer).
-- k is the policy's parallel_k (default: a majority of those chosen).
-- metadata.quorum = {k, n, agreeing = {providers}}. Answers are taken
-- whole (not streamed).
local WHOLE = { stream = false }

local function norm(text)
  return (tostring(text or ""):lower():gsub("%s+", " "):gsub("^ ", ""):gsub(" $", ""))
end

return function(_, providers, ctx)
  local t0 = ctx.now()
  local n = #providers
  local k = math.min(ctx.policy(providers[1]).parallel_k or (n // 2 + 1), n)
  local tasks, groups, ended, best = {}, {}, 0, 0
  local agreed
  for i, p in ipairs(providers) do
    tasks[i] = ctx.spawn(ctx.call, p, WHOLE)
  end
  local stop = ctx.first(tasks, function(r)
    ended = ended + 1
    if type(r) == "table" and r.status == "success" then
      local key = norm(r.response_text)
      local g = groups[key] or {}
      groups[key] = g
      g[#g + 1] = r
      if #g > best then
        best = #g
      end
      if #g >= k then
        agreed = g
        return true
      end
    end
    return best + (n - ended) < k -- no answer can reach k: stop now
  end)

  local attempts, answers = {}, {}
  local values = ctx.gather(tasks)
  for i, p in ipairs(providers) do
    local r = values[i]
    if r then
      ctx.add_attempts(attempts, r)
      answers[#answers + 1] = r
    else
      attempts[#attempts + 1] = { provider = p, status = "cancelled" }
    end
  end
  if agreed then
    local winner = agreed[1]
    local who = {}
    for i, r in ipairs(agreed) do
      who[i] = r.ia_provider_name .. (r.metadata.deployment and "/" .. r.metadata.deployment or "")
    end
    winner.metadata.quorum = { k = k, n = n, agreeing = who }
    winner.metadata.attempts = attempts
    return winner
  end
  local said = {}
  for i, r in ipairs(answers) do
    local who = r.ia_provider_name .. (r.metadata.deployment and "/" .. r.metadata.deployment or "")
    said[i] = r.status == "success" and string.format("%s said %q", who, norm(r.response_text):sub(1, 40))
      or string.format("%s: %s", who, r.metadata.error_kind or r.status)
  end
  local e = ctx.error_response(providers[1], "no_quorum", string.format("no %d of %d answers agreed (%s): %s", k,
    n, stop and "stopped once none could" or "all ended", table.concat(said, "; ")))
  e.metadata.attempts = attempts
  e.latency_ms = math.floor(ctx.now() - t0 + 0.5)
  return e
end
