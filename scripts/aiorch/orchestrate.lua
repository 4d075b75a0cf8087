-- orchestrate(request, strategy, providers, opts): validate, build the
-- system prompt, pick providers, run the strategy. Validation errors come
-- back as nil, "invalid", message before any network call (a request no
-- chosen provider can take: nil, "invalid", message, the field refused);
-- everything after that comes back as StandardAIResponse(s).
local config = require "aiorch.config"
local context = require "aiorch.context"
local loader = require "aiorch.loader"
local request_mod = require "aiorch.request"
local canonical = require "aiorch.canonical"
local response = require "aiorch.response"
local log = require "aiorch.log"
local policy = require "aiorch.policy"
local trace = require "aiorch.trace"

local fmt = string.format
local type = type
local ipairs = ipairs
local xpcall = xpcall
local tostring = tostring
local concat = table.concat

local _M = {}
local fit_providers, note_skipped -- below

_M.default_strategy = "fallback"
_M.default_prompt = "default"

local function split_names(v)
  if type(v) == "table" then
    return v
  end
  local out = {}
  if type(v) == "string" then
    for n in v:gmatch("[^,%s]+") do
      out[#out + 1] = n
    end
  end
  return out
end

-- A file that is there but does not load is broken ("load": the operator's
-- to fix); a name that is not found is the caller's mistake ("invalid").
local function load_kind(what, name, path)
  return loader.find(what, name, path) and "load" or "invalid"
end

-- The message of a trace.handler result (or of an error in the handler).
local function message_of(e)
  return type(e) == "table" and e.message or tostring(e)
end

-- (balance) A deployment named by its id, "provider/name": the provider's
-- adapter and the deployment's config, or nil, nil, message.
local function deployment_of(id, opts)
  local parent, dname = id:match("^([^/]+)/(.+)$")
  local a = parent and loader.load("provider", parent, opts.path)
  if not a then
    return nil, nil, fmt("unknown provider '%s'", id)
  end
  for _, d in ipairs(config.cached(parent, a, opts.env).deployments or {}) do
    if d.deployment == dname then
      return a, d
    end
  end
  return nil, nil, fmt("provider '%s' has no deployment '%s'", parent, dname)
end

-- Adapters and configs for the given names, or nil, kind, message.
local function providers_for(names, opts)
  local adapters, configs = {}, {}
  for _, name in ipairs(names) do
    if adapters[name] then
      return nil, "invalid", fmt("provider '%s' is listed twice", tostring(name))
    end
    local a, err = loader.load("provider", name, opts.path)
    local c
    if not a and type(name) == "string" and name:find("/", 1, true) then
      a, c, err = deployment_of(name, opts)
    end
    if not a then
      return nil, load_kind("provider", name, opts.path), err
    end
    adapters[name], configs[name] = a, c or config.cached(name, a, opts.env)
  end
  return adapters, configs
end

local function build_prompt(opts, info)
  local name = opts.prompt or _M.default_prompt
  local builder, err = loader.load("prompt", name, opts.path)
  if not builder then
    return nil, err
  end
  local fn = type(builder) == "function" and builder or builder.build_system_prompt
  local ok, prompt = xpcall(fn, trace.handler, info)
  if not ok then
    trace.report(prompt)
    return nil, fmt("prompt builder '%s' failed: %s", name, message_of(prompt))
  end
  if type(prompt) ~= "string" then
    return nil, fmt("prompt builder '%s' returned %s, not a string", name, type(prompt))
  end
  return prompt
end

-- The chosen providers: as given, or every available one in priority
-- order; when none is available, all of them, so the error says why.
-- Returns names, adapters, configs[, order], or nil, kind, message.
local function choose(names, opts)
  names = names ~= nil and split_names(names) or nil
  if names and #names > 0 then
    local adapters, configs, err = providers_for(names, opts)
    if not adapters then
      return nil, configs, err
    end
    return names, adapters, configs
  end
  local order = config.priority(opts.env)
  local adapters, configs, err = providers_for(order, opts)
  if not adapters then
    return nil, configs, err
  end
  local out = {}
  for _, n in ipairs(order) do
    if configs[n].available then
      out[#out + 1] = n
    end
  end
  if #out == 0 then
    return order, adapters, configs, order
  end
  return out, adapters, configs, order
end

local function valid_result(v)
  if response.is_response(v) then
    return true
  end
  if type(v) ~= "table" or #v == 0 then
    return false
  end
  for _, r in ipairs(v) do
    if not response.is_response(r) then
      return false
    end
  end
  return true
end

-- "top_k is not supported by provider openai: why" (a temperature out of
-- range says so itself).
local function refusal_text(b, name)
  if b.field == "temperature" and b.why then
    return b.why
  end
  local text = canonical.message(b.field, name)
  return b.why and text .. " (" .. b.why .. ")" or text
end

-- The refusal of req by one adapter: nil, or {fields, why (the first),
-- message}. allow: the fields the caller lets be dropped (a set).
local function refusal(req, name, adapter, allow)
  local raw = req.raw
  if raw and raw.api == adapter.api and adapter.api then
    return nil -- the client's own request in the provider's own API: sent as it came, for it to judge
  end
  local bad = canonical.unsupported(req, adapter)
  if #bad == 0 then
    return nil
  end
  local keep = {}
  for _, b in ipairs(bad) do
    if not (allow and allow[b.field]) then
      keep[#keep + 1] = b
    end
  end
  return bad, keep, keep[1] and refusal_text(keep[1], name) or nil
end

-- fit_providers(req, names, adapters, opts) -> the names that fit, their
-- set ({name = true}; adapters itself when every name fits), variants
-- ({name = request} or nil), dropped ({name = fields} or nil), skipped
-- (attempt entries, or nil), the first refusal's message and field.
-- opts.allow_drop: the fields that may be dropped (a list or a set).
fit_providers = function(req, names, adapters, opts)
  local allow = opts.allow_drop
  if allow and allow[1] then
    local set = {}
    for _, f in ipairs(allow) do
      set[f] = true
    end
    allow = set
  end
  local fit_names, variants, dropped_by = {}, nil, nil
  local skipped, first, first_field
  for _, name in ipairs(names) do
    local a = adapters[name]
    local bad, keep, why = refusal(req, name, a, allow)
    local variant = req
    if bad and #keep == 0 then
      local drop = {}
      for i, b in ipairs(bad) do
        drop[i] = b.field
      end
      local dropped
      variant, dropped = canonical.drop(req, drop)
      dropped_by = dropped_by or {}
      dropped_by[name] = dropped
    end
    if variant and not (bad and #keep > 0) and type(a.fields) ~= "table" then
      -- An adapter of the simple form gets the simple form.
      local simple, field, swhy = canonical.to_simple(variant)
      if not simple then
        keep, why = { { field = field } }, refusal_text({ field = field, why = swhy }, name)
      end
      variant = simple
    end
    if bad and #keep > 0 or not variant then
      first_field = first and first_field or keep[1].field
      first = first or why
      skipped = skipped or {}
      skipped[#skipped + 1] = { provider = name, status = "skipped", kind = "unsupported",
        note = "unsupported: " .. keep[1].field }
    else
      fit_names[#fit_names + 1] = name
      if variant ~= req then
        variants = variants or {}
        variants[name] = variant
      end
    end
  end
  -- (adapters is keyed by exactly the names: when all fit, it is their set)
  local set = adapters
  if skipped then
    set = {}
    for _, name in ipairs(fit_names) do
      set[name] = true
    end
  end
  return fit_names, set, variants, dropped_by, skipped, first, first_field
end

-- Providers skipped as unable to take the request come first in the
-- answer's attempts (of each answer, for a list).
note_skipped = function(result, skipped)
  local list = result.status and { result } or result
  for _, r in ipairs(list) do
    local m = r.metadata
    local attempts = {}
    for i, a in ipairs(skipped) do
      attempts[i] = a
    end
    for _, a in ipairs(m.attempts or { response.attempt(r) }) do
      attempts[#attempts + 1] = a
    end
    m.attempts = attempts
  end
end

-- The cost of the whole request on its one answer: every attempt its
-- metadata.attempts lists (retries, failed attempts, cancelled race and
-- hedge losers: st.cancelled, from aiorch.call, says what each of those cost).
local function settle(r, st)
  local m = r.metadata
  local attempts = m.attempts
  if type(attempts) ~= "table" then
    return -- (a strategy's own answer, without attempts)
  end
  local cancelled = st.cancelled
  if cancelled then -- what each loser cost, on its entry
    local used = {}
    for _, a in ipairs(attempts) do
      if a.status == "cancelled" and a.cost_usd == nil then
        for i, c in ipairs(cancelled) do
          if not used[i] and c.provider == a.provider then
            used[i] = true
            a.cost_usd, a.cost_estimated, a.usage = c.cost_usd, c.cost_estimated, c.usage
            a.unpriced = c.cost_usd == nil or nil
            break
          end
        end
      end
    end
  end
  local total, priced, estimated = 0, false, false
  for _, a in ipairs(attempts) do
    if a.cost_usd then
      total, priced = total + a.cost_usd, true
    elseif a.unpriced then
      m.cost_usd = nil
      return
    end
    estimated = estimated or a.cost_estimated == true
  end
  if priced then
    m.cost_usd = total
  end
  if estimated then
    m.cost_estimated = true
  end
end

-- opts: env (table|function, default the process env), path (user dirs),
-- stream, on_token(text, provider), timeout_ms, policy (overrides of the
-- providers' policies, see aiorch.policy), prompt (builder name),
-- context_info (for the prompt builder; default request.context), client
-- (the client's name, for the metrics of cost), spend (a table
-- {usd = 0, tokens = 0} that aiorch.call adds what every call cost to,
-- cancelled ones included; unpriced and estimated set when a part was),
-- budget (a function for ctx.budget).
function _M.orchestrate(request, strategy_name, providers, opts)
  opts = opts or {}
  strategy_name = strategy_name or _M.default_strategy

  local strategy, serr = loader.load("strategy", strategy_name, opts.path)
  if not strategy then
    return nil, load_kind("strategy", strategy_name, opts.path), serr
  end

  local names, adapters, configs, order = choose(providers, opts)
  if not names then
    return nil, adapters, configs -- the kind, the message
  end

  local req, verr = request_mod.validate(request)
  if not req then
    return nil, "invalid", verr
  end
  if opts.policy ~= nil then
    local _, perr = policy.check(opts.policy, "opts.policy")
    if perr then
      return nil, "invalid", perr
    end
  end

  -- Says which adapters came up, once, and only for a request that is valid.
  if order and opts.env == nil then
    config.announce(configs, order)
  end

  if req.system_prompt == nil and req.messages == nil then
    -- The builder gets opts.context_info, or else the request's context.
    local info = opts.context_info
    if info == nil then
      info = req.context
    end
    local prompt, perr = build_prompt(opts, info)
    if not prompt then
      return nil, "prompt", perr
    end
    req.system_prompt = prompt
    -- The context is sent once: when the prompt carries it, not again in the user turn.
    if req.context and prompt:find(req.context, 1, true) then
      req.context_in_system_prompt = true
    end
  end
  local nerr
  req, nerr = canonical.normalize(req)
  if not req then
    return nil, "invalid", nerr
  end

  -- Each provider gets the request as it can take it: refused (a field it
  -- cannot take, unless the caller allows dropping it), or with the
  -- allowed fields dropped, or folded for an adapter of the simple form.
  local fit_names, fits, variants, dropped, skipped, first_refusal, refused_field =
    fit_providers(req, names, adapters, opts)
  if #fit_names == 0 then
    return nil, "invalid", first_refusal, refused_field
  end
  names = fit_names

  local st = {
    request = req, adapters = adapters, configs = configs, opts = opts, strategy = strategy_name,
    variants = variants, dropped = dropped, fits = fits,
  }
  local ctx = context.new(st)
  if log.enabled("debug") then
    log.debug("strategy %s over %s", strategy_name, concat(names, ","))
  end
  -- A strategy's failure is its own: no provider is named (ia_provider_name
  -- is null), and the message names the strategy's file and line.
  local ok, result = xpcall(strategy, trace.handler, req, names, ctx)
  if not ok then
    trace.report(result)
    local msg = fmt("strategy '%s' failed: %s", strategy_name, message_of(result))
    if log.enabled("debug") then
      log.debug("%s", msg)
    end
    return response.error(nil, "strategy", msg, 0, {})
  end
  if not valid_result(result) then
    return response.error(nil, "strategy",
      fmt("strategy '%s' returned %s, not a response or a list of responses", strategy_name, type(result)), 0, {})
  end
  if skipped then
    note_skipped(result, skipped)
  end
  if result.status then
    local attempts = result.metadata.attempts
    if st.cancelled or type(attempts) == "table" and #attempts > 1 then
      settle(result, st)
    end
  end
  return result
end

setmetatable(_M, { __call = function(_, ...) return _M.orchestrate(...) end })

return _M
