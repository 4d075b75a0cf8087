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
-- aiorch.deployments is loaded when first needed: a process without
-- deployments or balancers never loads it.
local deployments
local function deployments_mod()
  deployments = deployments or require "aiorch.deployments"
  return deployments
end
local cost = require "aiorch.cost"

local type = type
local pairs = pairs
local tostring = tostring
local setmetatable = setmetatable
local fmt = string.format
local ceil = math.ceil
local now = core.now
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
  -- A deployment, "provider/name" (aiorch.deployments).
  local parent, dname = tostring(provider):match("^([^/]+)/(.+)$")
  if parent then
    local pa, pc = resolve(adapters, configs, opts, parent)
    if not pa then
      return nil, pc
    end
    for _, d in ipairs(pc.deployments or EMPTY) do
      if d.deployment == dname then
        adapters[provider], configs[provider] = pa, d
        return pa, d
      end
    end
    return nil, fmt("provider '%s' has no deployment '%s'", parent, dname)
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

local run_strategy, admit -- below (balance)

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
  -- (balance) A provider with deployments: its balancer picks one; a
  -- deployment past its own rpm/tpm answers rate_limited at once.
  local balanced = c.balanced
  if balanced then
    if c.deployments then
      return run_strategy(st, c.balancer, req, c.deployment_ids, copts)
    end
    local dep = c.stats
    if dep and (dep.rpm or dep.tpm or dep.limited_until > 0) then
      local r = admit(c, dep)
      if r then
        return r
      end
    end
  end
  if req == request then
    local variants, fits = st.variants, st.fits
    -- (a deployment: as chosen, or as its provider)
    local v = variants and (variants[provider] or variants[c.name])
    if v then
      req = v
    elseif fits and not (fits[provider] or fits[c.name]) then
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
  local r = call.call(a, c, req, o, st.root or st) -- (what the calls cost: aiorch.call; the root state)
  local dropped = st.dropped
  local d = dropped and dropped[c.name]
  if d then
    r.metadata.dropped = d
  end
  if balanced and c.deployment then
    local m = r.metadata
    m.deployment = c.deployment
    for _, at in ipairs(m.attempts or EMPTY) do
      at.deployment = c.deployment
    end
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
    (st.root or st).on_commit = fn
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
  local default = st.copts -- (a strategy run by another: the options it was given)
  if default then
    return function(provider, copts)
      return do_call(st, provider, copts or default, st.request)
    end
  end
  return function(provider, copts)
    return do_call(st, provider, copts, st.request)
  end
end

-- After a stream owned by `from` was cut with `partial` sent: `provider`
-- takes the stream over and continues the answer where it stopped.
-- copts as for call (a gateway passes its own token sink there).
function BOUND.continue_with(st)
  return function(provider, partial, from, copts)
    (st.root or st).owner = provider
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

------------------------------------------------------------------------------
-- (balance) Deployments, balancers and strategies run from a strategy.

-- The answer of a deployment past its own rpm/tpm, or nil when it may go.
admit = function(c, dep)
  local ok, wait, why = deployments_mod().admit(dep)
  if ok then
    return nil
  end
  local r = response.error(c.name, "rate_limited", why, 0, { model = c.model, retry_after = ceil(wait / 1000) })
  r.metadata.attempts = { response.attempt(r) }
  r.metadata.deployment = c.deployment
  metrics.count(c.name, "skipped")
  return r
end

-- (usable_deployments) Appends to out (from n + 1) those of list that may
-- take a call: not past their own rpm/tpm, not in exclude, not cooling
-- down. Returns the new n.
local function listed(list, models, t, exclude, cooling, breakers, out, n)
  if breakers and not exclude then -- (a breaker of this process cooling down: the checks it needs only)
    for j = 1, #list do
      local d = list[j]
      if d and d.limited_until <= t and not (breakers[d.id] and cooling(d.id)) then
        n = n + 1
        out[n] = d
        d.model = models[j]
      end
    end
    return n
  end
  for j = 1, #list do
    local d = list[j]
    if d and d.limited_until <= t and not (exclude and exclude[d.id]) then
      local cool = false
      if breakers then -- this process's breakers: only one not closed may be cooling
        cool = breakers[d.id] ~= nil and cooling(d.id)
      elseif cooling then
        cool = cooling(d.id)
      end
      if not cool then
        n = n + 1
        out[n] = d
        d.model = models[j] -- the model a call would use in this orchestration
      end
    end
  end
  return n
end

-- The records (aiorch.deployments) of the providers' deployments that may
-- take a call now: not cooling down, not past their own rpm/tpm, not in
-- exclude (a set of ids), with a key. A provider without deployments is
-- one, whose id is its name; a deployment's id may be given too.
-- (The hot path of every balancer: cheap checks first, no call per
-- deployment unless a breaker is cooling down.)
local function usable_deployments(st, providers, exclude, out)
  local adapters, configs, opts = st.adapters, st.configs, st.opts
  if type(providers) ~= "table" then
    providers = { providers }
  end
  local n, t = 0, now()
  local cooling, breakers = breaker.cooling_check()
  local fast = not (exclude or cooling)
  for i = 1, #providers do
    local p = providers[i]
    local a, c = resolve(adapters, configs, opts, p)
    if a and c.available then
      local list, models = c.deployment_stats, c.deployment_models
      if not list then
        list, models = {}, {}
        if c.deployments then
          for j, dc in ipairs(c.deployments) do
            list[j], models[j] = dc.available and dc.stats or false, dc.model
          end
        else
          -- One deployment; from now on call.lua keeps this provider's figures.
          c.stats = c.stats or deployments_mod().record(p, { provider = c.name })
          c.balanced = true
          list[1], models[1] = c.stats, c.model
        end
        c.deployment_stats, c.deployment_models = list, models
      end
      if fast then -- the common case: no breaker cooling down, nothing tried yet
        for j = 1, #list do
          local d = list[j]
          if d and d.limited_until <= t then
            n = n + 1
            out[n] = d
            d.model = models[j] -- (as in listed)
          end
        end
      else
        n = listed(list, models, t, exclude, cooling, breakers, out, n)
      end
    end
  end
  for j = #out, n + 1, -1 do
    out[j] = nil
  end
  return out
end

local new_ctx -- below

-- Runs strategy `name` over providers with a context of its own: the
-- request given (the checks of the original's variants are redone for
-- another one) and copts for every call it makes. Raises when the
-- strategy does not load (a programmer's error).
run_strategy = function(st, name, request, providers, copts)
  local strategy, err = loader.load("strategy", name, st.opts.path)
  if not strategy then
    error(err, 0)
  end
  -- The stream's owner and on_commit stay the root's (its sink reads them).
  local child = setmetatable({ request = request, copts = copts, strategy = name, root = st.root or st },
    { __index = st })
  if request ~= st.request then
    child.variants, child.fits = false, EMPTY
  end
  return strategy(request, providers, new_ctx(child))
end

-- sticky_key() -> the request's sticky key (orchestrate's opts.sticky_key:
-- the gateway's X-Aiorch-Sticky-Key header), or nil.
function BOUND.sticky_key(st)
  return function()
    return st.opts.sticky_key
  end
end

-- estimate_tokens(request) -> the input and output tokens ctx.estimate
-- prices (aiorch.cost.estimate_tokens): a strategy that compares models
-- counts them once, and prices them with ctx.price.
function BOUND.estimate_tokens()
  return cost.estimate_tokens
end

-- latency_now(record, t), headroom(record, t): a deployment's figures as of t.
function BOUND.latency_now()
  return deployments_mod().latency_now
end

function BOUND.headroom()
  return deployments_mod().headroom
end

-- deployments(providers[, exclude[, into]]) -> the records of those that
-- may take a call (in `into`, emptied first, when given).
function BOUND.deployments(st)
  return function(providers, exclude, into)
    return usable_deployments(st, providers, exclude, into or {})
  end
end

-- strategy(name, request, providers) -> what strategy `name` returns.
function BOUND.strategy(st)
  return function(name, request, providers)
    return run_strategy(st, name, request or st.request, providers)
  end
end

-- balance(providers, pick) -> a StandardAIResponse. pick(records) returns
-- one of the records (aiorch.deployments) given: it is called, and on a
-- failure pick chooses again among those not yet tried, until one
-- succeeds, a stream was committed, or none is left.
function BOUND.balance(st)
  return function(providers, pick)
    local t0 = now()
    local tried, attempts, failures
    local list = rawget(st, "scratch") -- reused: a pick does not keep it (a nested run has its own)
    if not list then
      list = {}
      st.scratch = list
    end
    while true do
      usable_deployments(st, providers, tried, list)
      local d = #list > 0 and pick(list)
      if not d then
        break
      end
      if tried then
        metrics.count(d.provider, "fallback_activations")
      end
      local r = do_call(st, d.id, st.copts, st.request)
      if attempts then
        response.add_attempts(attempts, r)
        r.metadata.attempts = attempts
      end
      if r.status == "success" or (st.owner ~= nil and st.owner == r.ia_provider_name) then
        return r
      end
      if not attempts then
        attempts = response.add_attempts({}, r)
      end
      failures = failures or {}
      failures[#failures + 1] = r
      tried = tried or {}
      tried[d.id] = true
    end
    if not failures then
      local p = tostring(type(providers) == "table" and providers[1] or providers):match("^[^/]*")
      return response.error(p, "cooldown",
        fmt("no deployment of %s may take a call now (cooling down or at its rate limit)", p), 0, {})
    end
    local e = response.all_failed(failures)
    e.metadata.attempts = attempts
    e.latency_ms = math.floor(now() - t0 + 0.5)
    return e
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
--         fits = {name = a true value}: the providers the orchestration checked}
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

-- (balance) The context of a strategy run by another (run_strategy).
new_ctx = function(state)
  return setmetatable({ request = state.request, stream = state.opts.stream and true or false, [STATE] = state },
    ctx_mt)
end

return _M
