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
local setmetatable = setmetatable

local _M = {}

-- What every context shares; call and log are bound per orchestration.
local base = {
  spawn = core.spawn,
  gather = core.gather,
  first = core.first,
  sleep = core.sleep,
  now = core.now,
  health = metrics.health,
  latency = metrics.latency,
  all_failed = response.all_failed,
}

function base.await(task, ms)
  return task:await(ms)
end

function base.cancel(task)
  return task:cancel()
end

function base.count(provider, name, n)
  return metrics.count(provider, name, n)
end

function base.error_response(provider, kind, message)
  return response.error(provider, kind or "error", message, 0, {})
end

local base_mt = { __index = base }

local EMPTY = {} -- never written

-- A strategy may call a provider it was not given; load it on demand.
local function resolve(adapters, configs, opts, provider)
  local a, c = adapters[provider], configs[provider]
  if a and c then
    return a, c
  end
  local err
  a, err = loader.load("provider", provider, opts.path)
  if not a then
    return nil, err
  end
  c = config.cached(provider, a, opts.env)
  adapters[provider], configs[provider] = a, c
  return a, c
end

-- state: {request, adapters = {name = adapter}, configs = {name = config},
--         opts = {stream, on_token, timeout_ms, env, path}, strategy = name}
function _M.new(state)
  local opts = state.opts or EMPTY
  local adapters, configs = state.adapters, state.configs
  local request = state.request
  -- Read-only facts a strategy may want; the built-ins do not need them.
  local ctx = setmetatable({ request = request, stream = opts.stream and true or false }, base_mt)

  function ctx.call(provider, copts)
    local a, c = resolve(adapters, configs, opts, provider)
    if not a then
      local r = response.error(tostring(provider), "unknown_provider", c, 0, {})
      metrics.finished(tostring(provider), r)
      return r
    end
    -- Without per-call options the orchestration's own are passed as they
    -- are (call reads only stream, on_token and timeout_ms of them).
    local o = opts
    if type(copts) == "table" then
      o = { stream = opts.stream, on_token = opts.on_token, timeout_ms = opts.timeout_ms }
      for k, v in pairs(copts) do
        o[k] = v
      end
    end
    return call.call(a, c, request, o)
  end

  local strategy = state.strategy
  local levels = log.levels
  function ctx.log(level, msg, ...)
    if levels[level] and not log.enabled(level) then
      return -- filtered out: no need to build the text
    end
    log.log(level, "[" .. tostring(strategy or "strategy") .. "] " .. tostring(msg), ...)
  end

  return ctx
end

return _M
