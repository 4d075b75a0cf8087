-- The strategy context: the only thing a strategy talks to.
local core = require "aiorch"
local call = require "aiorch.call"
local config = require "aiorch.config"
local loader = require "aiorch.loader"
local metrics = require "aiorch.metrics"
local response = require "aiorch.response"
local log = require "aiorch.log"
local policy = require "aiorch.policy"
local breaker = require "aiorch.breaker"
local canonical = require "aiorch.canonical"
local cost = require "aiorch.cost"

local type = type
local pairs = pairs
local tostring = tostring
local setmetatable = setmetatable
local getmetatable = getmetatable

local _M = {}

-- What every context shares; call and log are bound per orchestration.
local base = {
  spawn = core.spawn,
  gather = core.gather,
  first = core.first,
  sleep = core.sleep,
  now = core.now,
  health = breaker.health,
  latency = metrics.latency,
  all_failed = response.all_failed,
  add_attempts = response.add_attempts,
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

-- price(model) -> {input, output, cached_read, cache_write, reasoning,
-- source, date} in USD per 1M tokens (the configuration's prices over the
-- table), or nil.
function base.price(model)
  return cost.price(model)
end

-- estimate(model, request) -> the USD a request will likely cost on model
-- (aiorch.cost.estimate), or nil when the model has no price.
function base.estimate(model, request)
  return (cost.estimate(model, request))
end

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

-- The commit point of a stream: the first provider to send content owns
-- the caller's stream; events from any other are dropped. Before that,
-- a strategy may still switch providers unseen; after it, it may not.
-- on_event(event, provider, info) gets the owner's canonical events
-- (info, with the first content of each attempt: {prelude = the events
-- before it, model, api}); on_token(text, provider) its text only.
local function sink_of(st)
  local opts = st.opts
  local on_event, on_token = opts.on_event, opts.on_token
  local dropped = st.dropped
  return function(ev, provider, info)
    local owner = st.owner
    if owner == nil then
      if not info then
        return -- not content: a meta event of an attempt that will not win
      end
      owner = provider
      st.owner = owner
      local on_commit = st.on_commit
      if on_commit then
        on_commit(provider)
      end
    end
    if provider ~= owner then
      return
    end
    if info and dropped and dropped[provider] then
      info.dropped = dropped[provider]
    end
    if on_event then
      on_event(ev, provider, info)
    end
    if on_token and ev.type == "text" then
      on_token(ev.text, provider)
    end
  end
end

-- A provider's configuration with another model (ctx.call's opts.model).
local function with_model(c, model)
  local out = {}
  for k, v in pairs(c) do
    out[k] = v
  end
  out.model = model
  return setmetatable(out, getmetatable(c))
end

local function do_call(st, provider, copts, req)
  local adapters, configs, opts = st.adapters, st.configs, st.opts
  local request = st.request
  local a, c = resolve(adapters, configs, opts, provider)
  if not a then
    local r = response.error(tostring(provider), "unknown_provider", c, 0, {})
    metrics.finished(tostring(provider), r)
    return r
  end
  if req == request then
    local variants, fits = st.variants, st.fits
    local v = variants and variants[provider]
    if v then
      req = v
    elseif fits and not fits[provider] then
      -- A provider the orchestration did not check (a strategy may call
      -- any): what it cannot take is refused here, by name.
      local bad = canonical.unsupported(request, a)
      if #bad == 0 and type(a.fields) ~= "table" then
        req = canonical.to_simple(request)
      end
      if #bad > 0 or not req then
        local field = bad[1] and bad[1].field or "messages"
        local why = bad[1] and bad[1].why
        local r = response.error(tostring(provider), "unsupported", canonical.message(field, provider)
          .. (why and " (" .. why .. ")" or ""), 0, { note = "unsupported: " .. field })
        r.metadata.attempts = { response.attempt(r) }
        return r
      end
    end
  end
  local o = { stream = opts.stream, on_event = st.event_sink, timeout_ms = opts.timeout_ms, policy = opts.policy }
  if type(copts) == "table" then
    for k, v in pairs(copts) do
      o[k] = v
    end
    if type(copts.model) == "string" and copts.model ~= c.model then
      c = with_model(c, copts.model)
    end
  end
  local r = call.call(a, c, req, o, st) -- (what the calls cost: aiorch.call)
  local dropped = st.dropped
  local d = dropped and dropped[provider]
  if d then
    r.metadata.dropped = d
  end
  return r
end

-- The functions bound to one context, each made the first time a
-- strategy reads it (most use one or two): name -> function(st), which
-- returns ctx's function. st: the state new was given.
local BOUND = {}

-- The provider that owns the stream (nil before the first token).
function BOUND.owner(st)
  return function()
    return st.owner
  end
end

-- fn(provider) runs when the first token commits the stream (say, to
-- cancel the other racers before anything is written).
function BOUND.on_commit(st)
  return function(fn)
    st.on_commit = fn
  end
end

-- The policy a call to provider would run with (retries, deadlines, hedging).
function BOUND.policy(st)
  return function(provider)
    local opts = st.opts
    local _, c = resolve(st.adapters, st.configs, opts, provider)
    return policy.resolve(c and c.policy, opts.policy, st.request.policy)
  end
end

-- call(provider[, opts]) -> StandardAIResponse. opts: policy (overrides),
-- timeout_ms, model (another model than the provider's configured one).
function BOUND.call(st)
  return function(provider, copts)
    return do_call(st, provider, copts, st.request)
  end
end

-- After a stream owned by `from` was cut with `partial` sent: `provider`
-- takes the stream over and continues the answer where it stopped.
-- copts as for call (a gateway passes its own token sink there).
function BOUND.continue_with(st)
  return function(provider, partial, from, copts)
    st.owner = provider
    local req = {}
    for k, v in pairs(st.request) do
      req[k] = v
    end
    req.continue_from = partial
    local r = do_call(st, provider, copts, req)
    if r.status == "success" then
      r.response_text = partial .. r.response_text
      r.metadata.continued_from = from
    end
    return r
  end
end

-- budget() -> what is left of the budget of the request's client key or
-- alias {usd, tokens, window, resets_at}, or nil when none is configured.
-- opts.budget (the gateway's) reads it; elsewhere there is none.
function BOUND.budget(st)
  local read = st.opts.budget
  return function()
    if read then
      return read()
    end
    return nil
  end
end

function BOUND.log(st)
  local strategy = st.strategy
  local levels = log.levels
  return function(level, msg, ...)
    if levels[level] and not log.enabled(level) then
      return -- filtered out: no need to build the text
    end
    log.log(level, "[" .. tostring(strategy or "strategy") .. "] " .. tostring(msg), ...)
  end
end

local STATE = {} -- the key of a context's state

local ctx_mt = {
  __index = function(ctx, k)
    local make = BOUND[k]
    if not make then
      return base[k]
    end
    local f = make(ctx[STATE])
    ctx[k] = f
    return f
  end,
}

-- state: {request, adapters = {name = adapter}, configs = {name = config},
--         opts = {stream, on_event, on_token, timeout_ms, policy, env, path}, strategy = name,
--         variants = {name = the request as that provider takes it}, dropped = {name = {fields}},
--         fits = {name = true}: the providers the orchestration checked}
-- (aiorch.call lists the calls cancelled in state.cancelled, with their cost)
-- The context keeps state (and writes in it: the stream's owner).
function _M.new(state)
  local opts = state.opts or EMPTY
  state.opts = opts
  if opts.on_event or opts.on_token then
    state.event_sink = sink_of(state)
  end
  -- Read-only facts a strategy may want; the built-ins do not need them.
  -- (The functions a strategy reads are named too: the table is sized once.)
  return setmetatable({ request = state.request, stream = opts.stream and true or false, [STATE] = state,
    call = nil, log = nil, owner = nil }, ctx_mt)
end

return _M
