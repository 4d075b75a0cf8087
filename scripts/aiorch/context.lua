-- The strategy context: the only thing a strategy talks to.
local core = require "aiorch"
local call = require "aiorch.call"
local config = require "aiorch.config"
local loader = require "aiorch.loader"
local metrics = require "aiorch.metrics"
local response = require "aiorch.response"
local log = require "aiorch.log"

local type = type
local pairs = pairs
local tostring = tostring

local _M = {}

-- state: {request, adapters = {name = adapter}, configs = {name = config},
--         opts = {stream, on_token, timeout_ms, env, path}, strategy = name}
function _M.new(state)
  local ctx = {}
  local opts = state.opts or {}
  local adapters, configs = state.adapters, state.configs

  -- A strategy may call a provider it was not given; load it on demand.
  local function resolve(provider)
    local a, c = adapters[provider], configs[provider]
    if a and c then
      return a, c
    end
    local err
    a, err = loader.load("provider", provider, opts.path)
    if not a then
      return nil, err
    end
    c = config.provider(provider, a, opts.env)
    adapters[provider], configs[provider] = a, c
    return a, c
  end

  function ctx.call(provider, copts)
    local a, c = resolve(provider)
    if not a then
      local r = response.error(tostring(provider), "unknown_provider", c, 0, {})
      metrics.finished(tostring(provider), r)
      return r
    end
    local o = { stream = opts.stream, on_token = opts.on_token, timeout_ms = opts.timeout_ms }
    if type(copts) == "table" then
      for k, v in pairs(copts) do
        o[k] = v
      end
    end
    return call.call(a, c, state.request, o)
  end

  ctx.spawn = core.spawn
  ctx.gather = core.gather
  ctx.first = core.first
  ctx.sleep = core.sleep
  ctx.now = core.now

  function ctx.await(task, ms)
    return task:await(ms)
  end

  function ctx.cancel(task)
    return task:cancel()
  end

  ctx.health = metrics.health
  ctx.latency = metrics.latency

  function ctx.count(provider, name, n)
    return metrics.count(provider, name, n)
  end

  function ctx.error_response(provider, kind, message)
    return response.error(provider, kind or "error", message, 0, {})
  end

  ctx.all_failed = response.all_failed

  local tag = "[" .. tostring(state.strategy or "strategy") .. "] "
  function ctx.log(level, msg, ...)
    log.log(level, tag .. tostring(msg), ...)
  end

  -- Read-only facts a strategy may want; not needed by the built-ins.
  ctx.request = state.request
  ctx.stream = opts.stream and true or false
  return ctx
end

return _M
