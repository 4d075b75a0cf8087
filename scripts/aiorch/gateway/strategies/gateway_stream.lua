-- The gateway's streaming strategy: the mode (single, fallback, fastest)
-- and the token sink come from the job aiorch.gateway.stream registered
-- for the task running this orchestration.
local aiorch = require "aiorch"
local stream = require "aiorch.gateway.stream"

return function(_, providers, ctx)
  local job = stream.job_of(aiorch.current())
  if not job then
    return ctx.error_response(providers[1] or "none", "strategy", "gateway_stream runs only inside the gateway")
  end
  return stream.strategies[job.mode](providers, ctx, job)
end
