-- The gateway of one worker process: listen, route, authenticate, answer
-- in the calling API's shape, log one line per request.
--
--   local gateway = require "aiorch.gateway.server"
--   local h = assert(gateway.start { config = cfg })   -- or config_file = "gw.lua"
--   h.server.port; h:drain(5000); h:wait()
local aiorch = require "aiorch"
local loader = require "aiorch.loader"
local orchestrate = require "aiorch.orchestrate"
local response = require "aiorch.response"
local provider_config = require "aiorch.config"
local gconfig = require "aiorch.gateway.config"
local common = require "aiorch.gateway.common"
local openai = require "aiorch.wire.openai"
local anthropic = require "aiorch.wire.anthropic"
local gemini = require "aiorch.wire.gemini"
local native = require "aiorch.gateway.native"
local prometheus = require "aiorch.gateway.prometheus"
local stream = require "aiorch.gateway.stream"
local policy = require "aiorch.policy"
local breaker = require "aiorch.breaker"
local limits = require "aiorch.gateway.limits" -- rate limits, max_inflight: for the whole server
local budgets -- aiorch.gateway.budgets, loaded for a configuration with budgets
local cost = require "aiorch.cost"
local totals = require "aiorch.gateway.totals" -- /metrics and /healthz: for the whole server
local response_cache = require "aiorch.gateway.cache" -- the response cache, when configured
local json = require "aiorch.json"
local log_warn = require("aiorch.log").warn

local fmt = string.format
local type = type
local pairs = pairs
local ipairs = ipairs
local pcall = pcall
local tostring = tostring
local tonumber = tonumber
local setmetatable = setmetatable
local concat = table.concat
local floor = math.floor
local random = math.random
local byte = string.byte
local find = string.find
local sub = string.sub
local unpack = table.unpack
local os_time = os.time
local io_stderr = io.stderr
local now = aiorch.now
local sleep = aiorch.sleep
local spawn = aiorch.spawn

local _M = {}

------------------------------------------------------------------------------
-- Small helpers

-- Equal strings, in a time that does not depend on where they differ.
local function same(a, b)
  if #a ~= #b then
    return false
  end
  local diff = 0
  for i = 1, #a do
    if byte(a, i) ~= byte(b, i) then
      diff = diff + 1
    end
  end
  return diff == 0
end

local function client_key(headers, path)
  local auth = headers["authorization"]
  if type(auth) == "string" then
    local k = auth:match("^[Bb]earer%s+(.-)%s*$")
    if k and k ~= "" then
      return k
    end
  end
  local k = headers["x-api-key"] or headers["x-goog-api-key"]
  if type(k) == "string" and k ~= "" then
    return k
  end
  -- Gemini's clients may put the key in the URL (?key=); the access log
  -- never shows a query.
  k = type(path) == "string" and find(path, "?", 1, true) and gemini.query_param(path:match("%?(.*)$"), "key")
  if k and k ~= "" then
    return k
  end
  return nil
end

-- The error shape of a request: by its route, else by its headers.
local function shape_of(route, headers)
  if route == "/v1/messages" then
    return anthropic
  elseif route == "/v1/orchestrate" then
    return native
  elseif route == "/v1/chat/completions" then
    return openai
  elseif route == gemini.ROUTE or route == gemini.STREAM_ROUTE or find(route, "/v1beta/", 1, true) == 1
      or headers["x-goog-api-key"] then
    return gemini
  elseif headers["anthropic-version"] or (headers["x-api-key"] and not headers["authorization"]) then
    return anthropic
  end
  return openai
end

-- Small caches of derived strings: requests repeat the same few values
-- (paths, strategies, provider lists). Bounded: emptied when full, and
-- long values are not kept.
local CACHE_MAX, CACHE_LEN = 256, 128

local function cache_new()
  return { n = 0, t = {} }
end

local function cache_put(c, k, v)
  if #k <= CACHE_LEN then
    if c.n >= CACHE_MAX then
      c.t, c.n = {}, 0
    end
    c.t[k] = v
    c.n = c.n + 1
  end
  return v
end

-- logfmt value: bare when safe, else quoted with escapes.
local lv_cache = cache_new()
local function lv(v)
  local hit = lv_cache.t[v] -- first: the values are almost always cached strings
  if hit then
    return hit
  end
  if type(v) ~= "string" then
    v = tostring(v)
  end
  if v:match("^[%w%._:/,+%-]+$") then
    return cache_put(lv_cache, v, v)
  end
  return cache_put(lv_cache, v,
    '"' .. v:gsub('[%c"\\]', function(c) return fmt("\\x%02x", byte(c)) end) .. '"')
end

-- A fresh list each time: a strategy may change the one it is given.
local list_cache = cache_new()
local function header_list(v)
  if type(v) ~= "string" then
    return nil
  end
  local hit = list_cache.t[v]
  if hit then
    return hit[1] and { unpack(hit) } or nil
  end
  local out = {}
  for n in v:gmatch("[^,%s]+") do
    out[#out + 1] = n
  end
  cache_put(list_cache, v, { unpack(out) })
  return #out > 0 and out or nil
end

local function is_space(b)
  return b == 32 or (b >= 9 and b <= 13)
end

local function header_word(v)
  if type(v) == "string" then
    local first, last = byte(v, 1), byte(v, -1)
    if first and not is_space(first) and not is_space(last) then
      return v
    end
    v = v:match("^%s*(.-)%s*$")
    if v ~= "" then
      return v
    end
  end
  return nil
end

------------------------------------------------------------------------------
-- Per-request state

local Exchange = {}

-- log_bodies: what a client sent and got, for debugging only. Never a
-- header, so never a key; a body is cut at LOG_BODY_MAX bytes.
local LOG_BODY_MAX = 16 * 1024
local body_line -- below

function Exchange:respond(status, headers, body)
  self.status = status
  self.started = true
  if self.state.log_bodies then
    body_line(self, "response", body)
  end
  headers = headers or {}
  headers["content-type"] = headers["content-type"] or "application/json"
  if self.state.draining then
    headers["connection"] = "close"
  end
  self.res:respond(status, headers, body)
end

function Exchange:fail(status, message, code, extra_headers)
  self.status = status
  local shape = self.shape
  self:respond(status, extra_headers or {}, shape.error_body(status, message, code))
end

-- "provider:kind", built once per pair.
local attempt_cache = cache_new()
local function attempt_text(provider, kind)
  provider, kind = tostring(provider), tostring(kind)
  local by = attempt_cache.t[provider]
  local hit = by and by[kind]
  if hit then
    return hit
  end
  if not by then
    by = cache_put(attempt_cache, provider, {})
  end
  hit = provider .. ":" .. kind
  by[kind] = hit
  return hit
end

local EMPTY = {} -- never written

-- The attempts of one response, appended to out (a list) or, when out is
-- nil and there is one, returned as a string.
local function attempts_of(r, out)
  local m = r.metadata or EMPTY
  local list = m.attempts
  if type(list) == "table" and #list > 0 then
    out = out or {}
    for _, at in ipairs(list) do
      out[#out + 1] = attempt_text(at.provider, at.kind or at.status)
    end
    return out
  end
  local one = attempt_text(r.ia_provider_name or "none", m.error_kind or r.status) -- none: a strategy failed
  if not out then
    return one
  end
  out[#out + 1] = one
  return out
end

-- Records a result (one response or a list) for the access log. Returns
-- the providers that answered ("a,b") or nil when none did.
function Exchange:note(result)
  if result.status then -- one response: no lists to build
    local a = attempts_of(result)
    self.attempts = type(a) == "table" and concat(a, ",") or a
    self.tokens_in, self.tokens_out = common.usage(result)
    self.provider = result.status == "success" and result.ia_provider_name or nil
    self.model = self.provider and result.metadata and result.metadata.model or nil
    return self.provider
  end
  local providers, models, attempts = {}, {}, {}
  local ti, to = 0, 0
  for _, r in ipairs(result) do
    if r.status == "success" then
      providers[#providers + 1] = r.ia_provider_name
      models[#models + 1] = tostring(r.metadata and r.metadata.model or "-")
    end
    local a, b = common.usage(r)
    ti, to = ti + a, to + b
    attempts_of(r, attempts)
  end
  self.provider = #providers > 0 and concat(providers, ",") or nil
  self.model = #models > 0 and concat(models, ",") or nil
  self.attempts = concat(attempts, ",")
  self.tokens_in, self.tokens_out = ti, to
  return self.provider
end

------------------------------------------------------------------------------
-- The API endpoints (chat completions and messages share everything but shape)

-- Unique enough across worker processes: time, a per-process random tag, a count.
local function new_id(state)
  local seq = state.seq + 1
  state.seq = seq
  local t = os_time()
  if t ~= state.id_time then
    state.id_time, state.id_prefix = t, fmt("aiorch%x%s", t, state.tag)
  end
  return fmt("%s%06d", state.id_prefix, seq % 1000000)
end

local function base_headers(x, strategy)
  return { ["x-aiorch-strategy"] = strategy, ["x-request-id"] = x.id }
end

-- Runs the orchestration unstreamed. Returns the result or nil after
-- answering the client with the error.
-- The fields a request lets be dropped for a provider that cannot take
-- them (X-Aiorch-Allow-Drop: a,b), beside the configuration's
-- drop_unsupported; nil for none.
local function allow_drop(x)
  local cfg = x.state.config.drop_unsupported
  local v = header_list(x.req.headers["x-aiorch-allow-drop"])
  if not v then
    return cfg
  end
  for _, n in ipairs(cfg or EMPTY) do
    v[#v + 1] = n
  end
  return v
end

-- What X-Aiorch-Dropped says of an answer: the fields dropped for it.
local function dropped_of(r)
  if r.status then -- one answer: no list to make
    local d = r.metadata and r.metadata.dropped
    return d and d[1] and concat(d, ",") or nil
  end
  local list = r
  local out = {}
  for _, one in ipairs(list) do
    for _, f in ipairs(one.metadata and one.metadata.dropped or EMPTY) do
      out[#out + 1] = f
    end
  end
  return #out > 0 and concat(out, ",") or nil
end

-- A request the orchestration would not run: 400 (500 for a broken
-- strategy or adapter file). An Anthropic client's message thread that no
-- provider can keep is refused as the API refuses what it cannot thread,
-- so that its SDK sends the whole conversation instead.
function Exchange:refuse(kind, err, field)
  if kind ~= "invalid" then
    return self:fail(500, err)
  end
  if field == "thread" and self.shape == anthropic then
    self.status = 400
    return self:respond(400, {}, json.encode { type = "error", error = { type = "invalid_request_error",
      message = err, details = { error_code = "thread_unsupported_request", unsupported = json.array() } } })
  end
  return self:fail(400, err)
end

-- What an orchestration needs to know of the client: its name (the
-- metrics of cost) and its budget. Set only when there is one: the plain
-- path keeps its small opts table.
local function client_opts(x, o)
  local name = x.client.name
  if name then
    o.client = name
  end
  local b = x.budget
  if b then
    o.spend, o.budget = b.spend, b.read
  end
  return o
end

local function run_plain(x, request, rt)
  local o = { env = rt.env, path = x.state.path, timeout_ms = x.state.timeout_ms, allow_drop = allow_drop(x) }
  if x.client.name or x.budget then
    client_opts(x, o)
  end
  local sticky = x.req.headers["x-aiorch-sticky-key"] -- (balance) for the sticky balancer
  if sticky then
    o.sticky_key = sticky
  end
  local r, kind, err, field = orchestrate.orchestrate(request, rt.strategy, rt.providers, o)
  if not r then
    x:refuse(kind, err, field)
    return nil
  end
  return r
end

-- Nobody answered: the headers say who was tried instead, and when the
-- providers rate-limited the request, when to come back (Retry-After).
local function failure_headers(h, x, retry_after)
  h["x-aiorch-attempts"] = x.attempts
  h["retry-after"] = retry_after
  return h
end

-- Answers a result in which nobody answered. An upstream's refusal of the
-- request itself reaches a client of its API as the upstream wrote it
-- (its SDK reads the details), any other client in its own error shape.
function Exchange:fail_result(r)
  local status, code, msg, wait, refusal = common.failure(r)
  local headers = failure_headers({}, self, wait)
  if refusal and refusal.api == self.shape.api then
    self.status = status
    return self:respond(status, headers, json.encode(refusal.body))
  end
  return self:fail(status, msg, code, headers)
end

-- The orchestration's answer and who gave it; nil once the client got the error.
local function answered(x, request, rt)
  local r = run_plain(x, request, rt)
  if not r then
    return nil
  end
  local ok = x:note(r)
  if not ok then
    x:fail_result(r)
    return nil
  end
  return r, ok
end

-- The answers of a stream's result, the stream's owner first; nil when
-- the owner's own answer failed (its stream then ends with an error).
local function stream_answers(s, r)
  local succ = common.successes(r)
  local owner = s.committed and s.provider
  if not owner then
    return #succ > 0 and succ or nil
  end
  for i, one in ipairs(succ) do
    if one.ia_provider_name == owner or (one.metadata and one.metadata.continued_from == owner) then
      table.remove(succ, i)
      table.insert(succ, 1, one)
      return succ
    end
  end
  return nil
end

-- A streamed request: every strategy streams through the orchestration's
-- sink, the session (aiorch.gateway.stream).
local function serve_streamed(x, api, request, info, rt)
  local headers = base_headers(x, rt.strategy)
  headers["content-type"] = "text/event-stream"
  headers["cache-control"] = "no-cache"
  local s = stream.session(x.res, api.stream_encoder(x.id, info.model, { include_usage = info.include_usage }),
    headers, api.api)
  x.stream, x.session = true, s
  local r, kind, err, field = orchestrate.orchestrate(request, rt.strategy, rt.providers, client_opts(x, {
    env = rt.env, path = x.state.path, timeout_ms = x.state.timeout_ms, allow_drop = allow_drop(x),
    stream = true, on_event = function(ev, provider, i) return s:event(ev, provider, i) end,
    sticky_key = x.req.headers["x-aiorch-sticky-key"], -- (balance) for the sticky balancer
  }))
  if not r then
    return x:refuse(kind, err, field)
  end
  x:note(r)
  if x.state.log_bodies then -- the answer's text, not each event
    body_line(x, "stream", r.status and r.response_text or "")
  end
  local answers = stream_answers(s, r)
  if answers then
    x.status, x.started = 200, true
    return s:finish(answers)
  end
  if s.committed then
    -- Tokens went out with a 200: the error travels as the stream's last event.
    local status, code, msg = common.failure(r)
    x.status, x.started = 200, true
    x.broken = true
    return s:fail(status, "the upstream stream broke: " .. msg, code)
  end
  return x:fail_result(r)
end

-- What a client may ask of the policy: X-Aiorch-Policy ("name=value,...")
-- and a request's own policy field, merged (the header wins a clash). Only
-- the fields the configuration's client_policy lists, each clamped to its
-- bounds; none at all without one. Answers 400 and returns false on refusal.
local function client_policy(x, request)
  local v = x.req.headers["x-aiorch-policy"]
  local body = request.policy
  if v == nil and body == nil then
    return true
  end
  local who = v ~= nil and "X-Aiorch-Policy" or "policy"
  local bounds = x.client.client_policy or x.state.config.client_policy
  if not bounds then
    x:fail(400, who .. ": clients may not override the policy here (the gateway's configuration has no "
      .. "client_policy)")
    return false
  end
  local t = {}
  if type(body) == "table" then
    for k, pv in pairs(body) do
      t[k] = pv
    end
  elseif body ~= nil then
    x:fail(400, "policy: must be an object of policy fields")
    return false
  end
  if v ~= nil then
    local h, err = policy.parse(v, "X-Aiorch-Policy")
    if not h then
      x:fail(400, err)
      return false
    end
    for k, hv in pairs(h) do
      t[k] = hv
    end
  end
  local checked, err = policy.check(t, who)
  if not checked then
    x:fail(400, err)
    return false
  end
  for k, cv in pairs(checked) do
    local b = bounds[k]
    if not b then
      local allowed = {}
      for name in pairs(bounds) do
        allowed[#allowed + 1] = name
      end
      table.sort(allowed)
      x:fail(400, fmt("%s.%s: clients may not set this field here (allowed: %s)", who, k,
        #allowed > 0 and concat(allowed, ", ") or "none"))
      return false
    end
    if b ~= true then
      checked[k] = cv < b[1] and b[1] or cv > b[2] and b[2] or cv
    end
  end
  request.policy = checked
  return true
end

-- Whether this client may use the chosen strategy and providers; answers
-- 400 naming what is allowed, and returns false, when it may not.
local function allowed(x, rt)
  local cfg = x.state.config
  local client = x.client
  local name = rt.strategy
  local set = client.strategies or cfg.strategies
  if not (gconfig.name_ok(name) and set[name]) then
    x:fail(400, fmt("strategy %s is not allowed (allowed: %s)", type(name) == "string"
      and "'" .. (#name > 64 and sub(name, 1, 64) .. "..." or name) .. "'" or tostring(name),
      concat(client.strategy_names or cfg.strategy_names, ", ")))
    return false
  end
  local pset = client.providers
  if pset and rt.providers then
    for _, p in ipairs(rt.providers) do
      if not pset[p] then
        x:fail(400, fmt("provider '%s' is not allowed (allowed: %s)", tostring(p), concat(client.provider_names, ", ")))
        return false
      end
    end
  end
  return true
end

-- The providers a client with an allow-list gets when it names none: the
-- route's own, else the configured order, kept to those it may use.
local function client_providers(x, rt)
  local pset = x.client.providers
  if not pset or rt.providers then
    return
  end
  local out = {}
  for _, n in ipairs(gconfig.provider_names(x.state.config)) do
    if pset[n] then
      out[#out + 1] = n
    end
  end
  rt.providers = #out > 0 and out or x.client.provider_names
end

-- Reserves the request's likely cost against the budgets of its client
-- and alias (aiorch.gateway.budgets; called when the configuration has budgets). false once the client has its 429
-- (or 503); true when admitted (x.budget then holds the reservations,
-- settled when the request ends, and ctx.budget's reader).
local function within_budget(x, rt, model, request)
  local state = x.state
  budgets = budgets or require "aiorch.gateway.budgets"
  local list = budgets.applying(state.config, x.client, rt)
  if not list then
    return true
  end
  local alias = rt.alias and state.config.aliases[rt.alias]
  local holds = budgets.reserve(x, list, model, request, alias and alias.models)
  if not holds then
    return false
  end
  x.budget = { holds = holds, spend = { usd = 0, tokens = 0 },
    read = function() return budgets.remaining(state, list) end }
  return true
end

local answer_api -- below

-- /v1/chat/completions and /v1/messages: api is the client's wire module.
local function serve_api(x, api)
  local doc, derr = common.decode_object(x.req.body)
  if not doc then
    return x:fail(400, derr)
  end
  local request, info = api.decode_request(doc, x.req.headers, x.req.path)
  if not request then
    return x:fail(400, info)
  end
  -- The client's own request: a provider of its API gets it as it came.
  request.raw = { api = api.api, body = x.req.body, doc = doc, headers = x.req.headers }
  if not client_policy(x, request) then
    return
  end
  local h = x.req.headers
  local state = x.state
  local rt, rerr = gconfig.route(state.config, info.model, header_word(h["x-aiorch-strategy"]),
    header_list(h["x-aiorch-providers"]))
  if not rt then
    return x:fail(404, rerr, "model_not_found")
  end
  x.strategy = rt.strategy
  if not allowed(x, rt) then
    return
  end
  client_providers(x, rt)
  local s, serr = loader.load("strategy", rt.strategy, state.path)
  if not s then
    return x:fail(400, serr)
  end
  if state.cache then
    return response_cache.serve(state.cache, x, api, request, info, rt, answer_api)
  end
  return answer_api(x, api, request, info, rt)
end

-- The answer of a decoded, routed request: streamed or whole. (A cache
-- hit never gets here: it costs nothing, so no budget is reserved.)
function answer_api(x, api, request, info, rt)
  if x.state.config.budgets and not within_budget(x, rt, info.model, request) then
    return
  end
  if info.stream then
    return serve_streamed(x, api, request, info, rt)
  end
  local r, ok = answered(x, request, rt)
  if not r then
    return
  end
  -- One answer from a provider of the client's API goes back as it came.
  local body = r.status and r.raw_body and r.metadata.api == api.api and r.raw_body
    or api.encode_response(common.successes(r), x.id, info.model)
  -- All of the headers in one constructor (respond adds nothing here).
  x:respond(200, {
    ["x-aiorch-strategy"] = rt.strategy, ["x-request-id"] = x.id, ["x-aiorch-provider"] = ok,
    ["x-aiorch-model"] = x.model, ["x-aiorch-dropped"] = dropped_of(r),
    ["x-aiorch-attempts"] = x.attempts, ["content-type"] = "application/json",
  }, body)
end

local answer_native -- below

local function serve_native(x)
  local doc, derr = common.decode_object(x.req.body)
  if not doc then
    return x:fail(400, derr)
  end
  local p, perr = native.parse(doc)
  if not p then
    return x:fail(400, perr)
  end
  if not client_policy(x, p.request) then
    return
  end
  local h = x.req.headers
  local rt, rerr = gconfig.route(x.state.config, p.model, p.strategy or header_word(h["x-aiorch-strategy"]),
    p.providers or header_list(h["x-aiorch-providers"]))
  if not rt then
    return x:fail(404, rerr, "model_not_found")
  end
  x.strategy = rt.strategy
  if not allowed(x, rt) then
    return
  end
  client_providers(x, rt)
  local info = { model = p.model }
  if x.state.cache then
    return response_cache.serve(x.state.cache, x, native, p.request, info, rt, answer_native)
  end
  return answer_native(x, native, p.request, info, rt)
end

-- The native endpoint's answer (api: as answer_api's, unused).
function answer_native(x, _, request, info, rt)
  if x.state.config.budgets and not within_budget(x, rt, info.model, request) then
    return
  end
  local r = run_plain(x, request, rt)
  if not r then
    return
  end
  local ok = x:note(r)
  local headers = base_headers(x, rt.strategy)
  local status = 200
  if not ok then
    local failed, _, _, wait = common.failure(r)
    status = failed
    failure_headers(headers, x, wait)
  else
    headers["x-aiorch-provider"] = ok
    headers["x-aiorch-model"] = x.model
    headers["x-aiorch-attempts"] = x.attempts
  end
  x:respond(status, headers, response.encode(r))
end

------------------------------------------------------------------------------
-- The other endpoints

local function model_entries(state)
  local cfg = state.config
  local env = gconfig.env_for(cfg, nil)
  local out, seen = {}, {}
  local function add(id, owner)
    if type(id) == "string" and not seen[id] then
      seen[id] = true
      out[#out + 1] = { id = id, owner = owner }
    end
  end
  for _, name in ipairs(gconfig.provider_names(cfg)) do
    local a = loader.load("provider", name, state.path)
    if a then
      local pc = provider_config.cached(name, a, env)
      add(pc.model, name)
      local p = cfg.providers[name]
      for _, m in ipairs(p and p.models or {}) do
        add(m, name)
      end
    end
  end
  local aliases = {}
  for name in pairs(cfg.aliases) do
    aliases[#aliases + 1] = name
  end
  table.sort(aliases)
  for _, name in ipairs(aliases) do
    add(name, "aiorch")
  end
  return out
end

local function serve_models(x)
  local shape = (x.shape == anthropic or x.shape == gemini) and x.shape or openai
  x:respond(200, {}, shape.models(model_entries(x.state)))
end

local function serve_health(x)
  local state = x.state
  local env = gconfig.env_for(state.config, nil)
  local parts, any = {}, false
  for _, name in ipairs(gconfig.provider_names(state.config)) do
    local a = loader.load("provider", name, state.path)
    if a then
      local pc = provider_config.cached(name, a, env)
      local hl = breaker.health(name) -- as /metrics and strategies see it
      any = any or (pc.available and hl.healthy)
      parts[#parts + 1] = fmt('%s:{"available":%s,"healthy":%s,"failures":%d}', common.json_string(name),
        tostring(pc.available), tostring(hl.healthy), hl.failures)
    end
  end
  local status = state.draining and "draining" or (any and "ok" or "degraded")
  x:respond(state.draining and 503 or 200, { ["cache-control"] = "no-cache" },
    fmt('{"status":"%s","in_flight":%d,"providers":{%s}}', status, totals.in_flight(state), concat(parts, ",")))
end

local function serve_metrics(x)
  local state = x.state
  x:respond(200, { ["content-type"] = prometheus.content_type },
    prometheus.render({ requests = totals.requests(state), in_flight = totals.in_flight(state), -- not this scrape
      cache = state.cache }))
end

local ROUTES = {
  ["/v1/chat/completions"] = { POST = function(x) return serve_api(x, openai) end },
  ["/v1/messages"] = { POST = function(x) return serve_api(x, anthropic) end },
  -- Gemini: route_of names these routes whatever the version and model in the path.
  [gemini.ROUTE] = { POST = function(x) return serve_api(x, gemini) end },
  [gemini.STREAM_ROUTE] = { POST = function(x) return serve_api(x, gemini) end },
  ["/v1beta/models"] = { GET = serve_models },
  ["/v1/orchestrate"] = { POST = serve_native },
  ["/v1/models"] = { GET = serve_models },
  ["/healthz"] = { GET = serve_health },
  ["/metrics"] = { GET = serve_metrics },
}
local OPEN = { ["/healthz"] = true, ["/metrics"] = true } -- no client key needed
-- The routes that call providers: max_inflight counts their requests.
local ORCHESTRATING = { ["/v1/chat/completions"] = true, ["/v1/messages"] = true, ["/v1/orchestrate"] = true,
  [gemini.ROUTE] = true, [gemini.STREAM_ROUTE] = true }

local function allow_of(methods)
  local out = {}
  for m in pairs(methods) do
    out[#out + 1] = m
  end
  table.sort(out)
  return concat(out, ", ")
end

-- The client a request's key names: its entry of the configuration, or
-- ANYONE when the gateway has no keys. nil, message for a wrong key.
local ANYONE = {}
local function authenticate(state, headers, path)
  local clients = state.config.clients
  if not clients then
    return ANYONE
  end
  local k = client_key(headers, path)
  if not k then
    return nil, "Missing API key (Authorization: Bearer, x-api-key or x-goog-api-key)."
  end
  local found
  for _, c in ipairs(clients) do -- every key compared: the time does not say which came close
    if same(k, c.key) and not found then
      found = c
    end
  end
  if not found then
    return nil, "Incorrect API key provided."
  end
  return found
end

-- The whole request's deadline: the configuration's (or the client's),
-- made shorter by X-Aiorch-Request-Timeout-Ms or the timeout an official
-- SDK announces (X-Stainless-Timeout, seconds), never longer.
local function request_deadline(x)
  local h = x.req.headers
  local ms = x.client.request_timeout_ms or x.state.config.request_timeout_ms
  local asked = tonumber(h["x-aiorch-request-timeout-ms"] or "")
  if asked and asked >= 1 and asked < ms then
    ms = floor(asked)
  end
  local sdk = tonumber(h["x-stainless-timeout"] or "")
  if sdk and sdk > 0 and sdk * 1000 < ms then
    ms = floor(sdk * 1000)
  end
  return ms
end

-- Routing, authentication and the limits, before anything is read from the
-- body. Returns the endpoint's function, or nil once the client has its answer.
local function admit(x)
  local req, state = x.req, x.state
  local route = x.route
  local methods = ROUTES[route]
  if not methods then
    return x:fail(404, fmt("Unknown request URL: %s %s", req.method, route))
  end
  if OPEN[route] then
    x.client = ANYONE
  else
    local client, why = req.client, nil -- (on_headers found it)
    if not client then
      client, why = authenticate(state, req.headers, req.path)
    end
    if not client then
      return x:fail(401, why, nil, { ["www-authenticate"] = "Bearer" })
    end
    x.client = client
  end
  local fn = methods[req.method] or (req.method == "HEAD" and methods.GET)
  if not fn then
    return x:fail(405, fmt("Method %s is not allowed on %s", req.method, route), nil,
      { allow = allow_of(methods) })
  end
  if state.draining then
    return x:fail(503, "the gateway is shutting down")
  end
  if ORCHESTRATING[route] then
    if not limits.admit(x) then -- answered 429
      return nil
    end
    state.orchestrating = state.orchestrating + 1
    x.counted = true
  end
  return fn
end

-- One logfmt line. The status, the numbers and the id (new_id's) are
-- always bare.
local function access_line(x)
  return "aiorch: access method=" .. lv(x.req.method) .. " path=" .. lv(x.route)
    .. " status=" .. (x.status or 499) .. " strategy=" .. lv(x.strategy or "-")
    .. " provider=" .. lv(x.provider or "-") .. " attempts=" .. lv(x.attempts or "-")
    .. " latency_ms=" .. floor(now() - x.t0 + 0.5) .. " tokens_in=" .. (x.tokens_in or 0)
    .. " tokens_out=" .. (x.tokens_out or 0) .. (x.stream and " stream=true id=" or " stream=false id=") .. x.id
    .. (x.broken and " stream_error=true" or "") .. (x.aborted and " client_gone=true" or "")
    .. (x.timed_out and " timed_out=true" or "")
end

-- Access lines for stderr go out together, one write per LOG_FLUSH_MS
-- instead of one per request; close flushes. A write stays within PIPE_BUF
-- (4 KiB), so that workers sharing a pipe never split each other's lines.
local LOG_FLUSH_MS, LOG_FLUSH_BYTES = 50, 4096

local function log_flush(state)
  local n = state.log_n
  if n > 0 then
    state.log_n, state.log_bytes = 0, 0
    io_stderr:write(concat(state.log_buf, "", 1, n))
  end
end

-- The flush task is a child of whichever request's task logged first: if
-- that task is cancelled (its client went away), the flush happens at once
-- and the next line starts another, instead of waiting for a full buffer.
local flush_guard = {
  __close = function(g)
    local state = g[1]
    state.log_timer = false
    log_flush(state)
  end,
}

local function log_later(state)
  local _ <close> = setmetatable({ state }, flush_guard)
  sleep(LOG_FLUSH_MS)
end

-- line has no "\n": the buffer holds it next, joined at the flush.
local function log_line(state, line)
  local len = #line + 1
  if state.log_bytes + len > LOG_FLUSH_BYTES then
    log_flush(state)
  end
  local n = state.log_n
  local buf = state.log_buf
  buf[n + 1], buf[n + 2] = line, "\n"
  state.log_n = n + 2
  state.log_bytes = state.log_bytes + len
  if not state.log_timer then
    state.log_timer = pcall(spawn, log_later, state)
    if not state.log_timer then
      log_flush(state)
    end
  end
end

-- The key of state.counts: "route status", built once per pair.
local count_keys = {}
local function count_key(route, status)
  local by = count_keys[route]
  if not by then
    by = {}
    count_keys[route] = by
  end
  local k = by[status]
  if not k then
    k = route .. " " .. tostring(status)
    by[status] = k
  end
  return k
end

-- Hands a line to the access log: its function, or stderr in batches.
local function emit(state, line)
  local sink = state.access_log
  if type(sink) == "function" then
    pcall(sink, line)
  elseif sink then
    log_line(state, line)
  end
end

function body_line(x, dir, body)
  body = tostring(body or "")
  local more = #body - LOG_BODY_MAX
  local line = "aiorch: body id=" .. x.id .. " dir=" .. dir .. " bytes=" .. #body
    .. (more > 0 and " cut=" .. more or "") .. " body=" .. lv(more > 0 and sub(body, 1, LOG_BODY_MAX) or body)
  if x.state.access_log then
    emit(x.state, line)
  else
    io_stderr:write(line, "\n")
  end
end

-- Counts an answered request by route and status, and logs its line.
local function account(state, x)
  local key = count_key(ROUTES[x.route] and x.route or "other", x.status or 499)
  state.counts[key] = (state.counts[key] or 0) + 1
  if state.access_log then
    emit(state, access_line(x))
  end
end

-- Ends the bookkeeping of a request, also when its task is cancelled
-- (the client went away).
local function done(x)
  local state = x.state
  state.in_flight = state.in_flight - 1
  if x.counted then
    state.orchestrating = state.orchestrating - 1
    limits.release(x)
  end
  local b = x.budget
  if b then -- (in a task of its own: this may run as the request's task is cancelled)
    x.budget = nil
    if not pcall(spawn, budgets.settle, b.holds, b.spend) then
      log_warn("budget: a request's spending was not counted (no task could be started)")
    end
  end
  if not x.status then
    x.aborted = true
  end
  account(state, x)
end

local exchange_mt = { __index = Exchange, __close = done }

local runaway_bodies = {}
local function runaway_body(shape)
  local b = runaway_bodies[shape]
  if not b then
    b = shape.error_body(500, "internal error: a script ran too long (instruction budget exceeded)")
    runaway_bodies[shape] = b
  end
  return b
end

local function route_of(path)
  local q = find(path, "?", 1, true)
  local route = q and sub(path, 1, q - 1) or path
  if find(route, "/models/", 3, true) then -- Gemini's /v1beta/models/{model}:method (or /v1/)
    return gemini.route_of(route) or route
  end
  return route
end

-- The HTTP server refused a request whose headers it had read, before any
-- handler ran (a body over max_body, a body that stalled or was malformed):
-- the answer in the caller's error shape, and its access line.
local REFUSED = { [408] = "the request body stopped arriving", [400] = "the request body is malformed",
  [503] = "the gateway holds too many request bodies at once (server.max_buffered); retry shortly" }
local function refusal(state, status, req)
  local route = route_of(req.path)
  account(state, { req = req, route = route, status = status, t0 = req.received_at or now(), id = new_id(state) })
  local msg = status == 413 and fmt("request body too large (at most %d bytes)", state.max_body)
    or REFUSED[status] or "the request was refused"
  return shape_of(route, req.headers).error_body(status, msg), "application/json"
end

-- Ends a request whose work did not answer it: with an error in the
-- caller's shape, as the stream's last event when a stream has begun, or
-- by cutting the connection when something else was sent.
function Exchange:abandon(status, code, message)
  local s = self.session
  if s and s.closed then
    return -- the stream was complete
  elseif s and s.sent and not s.gone then
    self.status, self.broken = 200, true
    s:fail(status, message, code)
  elseif not self.started and self.shape == native and status == 504 then
    -- The native endpoint's answer is a StandardAIResponse, a timed-out one here.
    self:respond(status, {}, response.encode(response.error(nil, "timeout", message,
      now() - self.t0, {})))
  elseif not self.started then
    self:fail(status, message, code)
  else
    self.status = self.status or status
    self.res:abort()
  end
end

-- The work of one request, in a task of its own: the handler stays free to
-- enforce its deadline, and to end its bookkeeping even when the work is
-- stopped for running too long (the budget then stops every Lua step of
-- the task that ran away, its to-be-closed handlers included).
local function work(fn, x)
  return fn(x)
end
-- Its stack, at once: a request's code runs about 300 slots deep.
local WORK_TASK = { stack = 320 }

-- The work raised (or ran away): one log line, and the caller's 500.
local function failed(x, err)
  local msg = tostring(err)
  io_stderr:write("aiorch: error: request ", x.id, " failed: ", (msg:gsub("[\r\n]+", " ")), "\n")
  local runaway = msg:find("instruction budget exceeded", 1, true)
  return x:abandon(500, "internal_error", runaway and "internal error: a script ran too long "
    .. "(instruction budget exceeded)" or "internal error in the gateway")
end

-- The server's on_headers: the client key is checked as soon as a
-- request's headers are in, before any of its body is read, so that
-- clients without a key cannot make the gateway hold bodies. A refusal
-- is answered (401, in the caller's shape) and logged as refusal's are;
-- the matched client is left on req (req.client), where admit finds it. Every
-- route but the open ones needs the key, unknown ones too.
local function authorize(state, req)
  local route = route_of(req.path)
  if not state.config.clients or OPEN[route] then
    return nil
  end
  local client, msg = authenticate(state, req.headers, req.path)
  if client then
    req.client = client
    return nil
  end
  account(state, { req = req, route = route, status = 401, t0 = req.received_at or now(), id = new_id(state) })
  return 401, shape_of(route, req.headers).error_body(401, msg), "application/json",
    { ["www-authenticate"] = "Bearer" }
end

local function handle(state, req, res)
  state.in_flight = state.in_flight + 1
  local route = route_of(req.path)
  -- The fields set later are named too, so that the table is sized once.
  local x <close> = setmetatable({
    state = state, req = req, res = res, route = route, t0 = req.received_at or now(),
    shape = shape_of(route, req.headers), id = new_id(state),
    status = nil, started = nil, strategy = nil, provider = nil, attempts = nil, tokens_in = nil, tokens_out = nil,
    counted = nil, client = nil, session = nil, model = nil, holds = nil, bytes_key = nil,
  }, exchange_mt)
  -- If this handler itself fails, the server answers with this, in the
  -- caller's error shape.
  res:on_error(runaway_body(x.shape))
  if state.log_bodies then
    body_line(x, "request", req.body)
  end
  local fn = admit(x)
  if not fn then
    return
  end
  if not x.counted then -- no provider is called: answered here
    local ok, err = pcall(fn, x)
    if not ok then
      return failed(x, err)
    end
    return
  end
  if state.cache and response_cache.quick(state.cache, x) then -- these bytes were answered before
    return
  end
  local deadline = request_deadline(x)
  local task = spawn(WORK_TASK, work, fn, x)
  local _, e1, e2 = task:await(deadline)
  local st = task:status()
  if st == "done" then
    return
  end
  if st == "failed" then
    return failed(x, e1 == "error" and e2 or e1)
  end
  -- Still running at the deadline: stop it, its tasks and their transfers.
  task:cancel()
  x.timed_out = true
  return x:abandon(504, "timeout", fmt("the request did not complete within %d ms (request_timeout_ms)", deadline))
end

------------------------------------------------------------------------------
-- Starting and stopping

local Handle = {}
Handle.__index = Handle

-- Stops taking new requests and waits up to timeout_ms for those in flight
-- (server:shutdown stops accepting and lets them finish with connection:
-- close; new requests on a kept-alive connection get 503 meanwhile).
-- Returns true when none was cut, else false, n.
function Handle:drain(timeout_ms)
  local state = self.state
  state.draining = true
  timeout_ms = timeout_ms or state.config.drain_timeout_ms
  local t0 = now()
  local srv = self.server
  if not self.closed and srv.shutdown then
    pcall(srv.shutdown, srv, timeout_ms)
  end
  -- Handlers end their bookkeeping (the access log) right after the last byte.
  while state.in_flight > 0 and now() - t0 < timeout_ms do
    sleep(5)
  end
  local left = state.in_flight
  self:close()
  if left > 0 then
    return false, left
  end
  return true
end

function Handle:close()
  if self.closed then
    return
  end
  self.closed = true
  self.server:close()
  self.park:cancel()
  totals.stop(self.totals)
  if self.state.cache then
    self.state.cache:close() -- its counters and gauges leave the state
  end
  log_flush(self.state)
end

-- Waits until the gateway is closed (drain or close).
function Handle:wait()
  self.park:await()
end

function Handle:stats()
  return { in_flight = self.state.in_flight, draining = self.state.draining }
end

local function park()
  while true do
    sleep(3600 * 1000)
  end
end

------------------------------------------------------------------------------
-- The host-neutral interface: a handler and its hooks, for whichever server
-- hosts the gateway. `aiorch serve` gives them to aiorch.server.listen
-- (start, below); the nginx module loads them through
-- aiorch/gateway/hosted.lua. Both hand each request over as a request
-- table and a response writer (src/server.c).

-- opts: config (from aiorch.gateway.config) or config_file; getenv
-- (function(name), default os.getenv); path (user dirs); access_log (true:
-- stderr, false, or a function(line)); timeout_ms (per provider call).
-- Returns {handler = function(req, res), on_headers = function(req),
-- on_refuse = function(status, req), max_body, config, state} or nil, message.
function _M.handler(opts)
  opts = opts or {}
  local cfg = opts.config
  local getenv = opts.getenv
  if type(getenv) == "table" then
    local t = getenv
    getenv = function(k) return t[k] end
  end
  if not cfg then
    local err
    if opts.config_file then
      cfg, err = gconfig.load(opts.config_file, getenv, opts.path)
    else
      cfg, err = gconfig.default(getenv, opts.path)
    end
    if not cfg then
      return nil, err
    end
  end
  local access = opts.access_log
  if access == nil then
    access = cfg.access_log
  end
  cost.configure(cfg.prices) -- the configuration's prices, for every response's cost and ctx.price
  local state = {
    config = cfg, path = opts.path, in_flight = 0, draining = false, seq = 0, counts = {},
    tag = fmt("%04x", random(0, 0xffff)),
    max_body = cfg.max_body, access_log = access, timeout_ms = opts.timeout_ms,
    max_inflight = cfg.max_inflight or 0, orchestrating = 0, log_bodies = cfg.log_bodies == true,
    log_buf = {}, log_n = 0, log_bytes = 0, log_timer = false,
    ns = "", -- the limits' keys' prefix (start: the port, the same in every worker)
    cache = cfg.cache and response_cache.new(cfg.cache) or nil,
  }
  return {
    handler = function(req, res) return handle(state, req, res) end,
    on_refuse = function(status, req) return refusal(state, status, req) end,
    on_headers = function(req) return authorize(state, req) end,
    max_body = cfg.max_body, config = cfg, state = state, totals = totals.start(state),
  }
end

-- opts: those of handler, and host, port (override the config's listen).
-- Returns a handle {server, config, drain, close, wait} or nil, message.
function _M.start(opts)
  opts = opts or {}
  local h, err = _M.handler(opts)
  if not h then
    return nil, err
  end
  local cfg = h.config
  local listen = { host = opts.host or cfg.host, port = opts.port or cfg.port, max_body = cfg.max_body,
    handler = h.handler, on_refuse = h.on_refuse, on_headers = h.on_headers }
  for k, v in pairs(cfg.server) do
    listen[k] = v
  end
  local ok, srv, kind, msg = pcall(aiorch.server.listen, listen)
  if not ok then
    return nil, "listen: " .. tostring(srv)
  end
  if not srv then
    return nil, fmt("cannot listen on %s:%s: %s", tostring(listen.host), tostring(listen.port),
      tostring(msg or kind))
  end
  h.state.ns = srv.port .. "\31" -- the limits' keys: the same in every worker
  return setmetatable({ server = srv, config = cfg, state = h.state, closed = false, park = spawn(park),
    host = listen.host, port = srv.port, totals = h.totals }, Handle)
end

return _M
