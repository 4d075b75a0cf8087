-- fallback: providers in priority order until one succeeds. Every attempt
-- is kept in metadata.attempts; when all fail, the error names each failure.
return function(_, providers, ctx)
  local t0 = ctx.now()
  local attempts, failures = {}, {}
  for i, p in ipairs(providers) do
    if i > 1 then
      ctx.count(p, "fallback_activations")
      ctx.log("info", "falling back to %s", p)
    end
    local r = ctx.call(p)
    local m = r.metadata or {}
    attempts[i] = { provider = p, status = r.status, kind = m.error_kind, latency_ms = r.latency_ms,
                    http_status = m.http_status }
    if r.status == "success" then
      m.attempts = attempts
      r.metadata = m
      return r
    end
    failures[#failures + 1] = r
  end
  local e = ctx.all_failed(failures)
  e.metadata.attempts = attempts
  e.latency_ms = math.floor(ctx.now() - t0 + 0.5) -- the wall time of the whole try
  return e
end
