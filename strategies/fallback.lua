-- fallback: providers in priority order until one succeeds. Every attempt
-- (retries included) is kept in metadata.attempts; when all fail, the error
-- names each failure. A provider that is cooling down answers at once with
-- an error (kind "cooldown"), so it is passed over without a request.
-- Streaming: once a provider's first token has reached the caller, its
-- failure ends the answer (or, with the policy's continue_on_cut, the next
-- provider continues it), never a silent switch.
return function(_, providers, ctx)
  local t0 = ctx.now()
  local attempts, failures = {}, {}
  for i, p in ipairs(providers) do
    if i > 1 then
      ctx.count(p, "fallback_activations")
      ctx.log("info", "falling back to %s", p)
    end
    local r = ctx.call(p)
    ctx.add_attempts(attempts, r)
    if r.status == "success" then
      r.metadata.attempts = attempts
      return r
    end
    if ctx.owner() == p then
      local partial, nextp = r.metadata.partial_text, providers[i + 1]
      if partial and nextp and ctx.policy(p).continue_on_cut then
        ctx.count(nextp, "continuations")
        ctx.log("info", "%s was cut; %s continues the answer", p, nextp)
        r = ctx.continue_with(nextp, partial, p)
        ctx.add_attempts(attempts, r)
      end
      r.metadata.attempts = attempts
      return r
    end
    failures[#failures + 1] = r
  end
  local e = ctx.all_failed(failures)
  e.metadata.attempts = attempts
  e.latency_ms = math.floor(ctx.now() - t0 + 0.5) -- the wall time of the whole try
  return e
end
