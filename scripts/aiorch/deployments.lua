-- Deployments: the several keys, base URLs or regions of one provider,
-- each with a weight and optional rpm/tpm limits, and the live figures the
-- balancers (strategies/weighted.lua, least_busy, ...) read.
--
-- A deployment is called by its id, "provider/name" (ctx.call("openai/east")).
-- Its config is the provider's with its own key, base URL and model; its
-- name stays the provider's (responses, metrics), its breaker is its own
-- (breaker_key = the id). A provider without deployments is one deployment
-- whose id is the provider's name.
--
-- The figures are this process's (one worker of a server): a record per id,
-- kept for the life of the process:
--   inflight        attempts under way now
--   ewma_ms, ewma_at  peak EWMA of the attempts' latency, and when it was
--                   last updated (ms); read it decayed: latency_now(d, t)
--   error_rate      EWMA of failures (0..1) over the attempts
--   calls, failures attempts so far
--   requests_remaining, requests_limit, requests_reset_at
--   tokens_remaining, tokens_limit, tokens_reset_at
--                   the last rate-limit headers seen (nil: none yet); the
--                   reset times on this runtime's clock (ms)
--   tokens_per_call EWMA of the tokens an answer used (input + output)
--   limited_until   the deployment's own rpm/tpm is spent until then (ms)
--   model           the model a call would use (set by each listing:
--                   ctx.deployments)
--   swrr, picks, hash  the built-in balancers' own: weighted's current
--                   weight, least_busy's, headroom's and cheapest's count of
--                   picks, sticky's hash of the id
local core = require "aiorch"
local state = require "aiorch.state"

local type = type
local ipairs = ipairs
local pairs = pairs
local tonumber = tonumber
local tostring = tostring
local fmt = string.format
local exp = math.exp
local floor = math.floor
local now = core.now
local os_time = os.time

local _M = {}

_M.EWMA_TAU_MS = 10000 -- peak EWMA: how fast a latency is forgotten
_M.ERROR_ALPHA = 0.2 -- weight of the last attempt in error_rate
_M.TOKENS_ALPHA = 0.2
_M.MAX_DEPLOYMENTS = 64 -- per provider
_M.TPM_RECHECK_MS = 1000 -- a deployment over its tpm is looked at again after this

local records = {} -- id -> record

-- The record of id (made the first time). fields: provider, name, weight,
-- rpm, tpm: the configuration's (updated when given).
function _M.record(id, fields)
  local d = records[id]
  if not d then
    d = { id = id, provider = id, name = nil, weight = 1, rpm = nil, tpm = nil, inflight = 0, ewma_ms = nil,
      ewma_at = 0, error_rate = 0, calls = 0, failures = 0, requests_remaining = nil, requests_limit = nil,
      requests_reset_at = nil, tokens_remaining = nil, tokens_limit = nil, tokens_reset_at = nil,
      tokens_per_call = nil, limited_until = 0, limited_why = nil, swrr = 0, picks = 0 }
    records[id] = d
  end
  if fields then
    d.provider, d.name = fields.provider or d.provider, fields.name
    d.weight, d.rpm, d.tpm, d.model = fields.weight or 1, fields.rpm, fields.tpm, fields.model
  end
  return d
end

function _M.get(id)
  return records[id]
end

-- Forgets every record's figures (tests, the benchmark).
function _M.reset()
  records = {}
end

-- The peak EWMA at time t: it decays towards 0 while nothing is observed,
-- so a deployment that was slow is tried again in time.
function _M.latency_now(d, t)
  local e = d.ewma_ms
  if not e then
    return nil
  end
  return e * exp(-(t - d.ewma_at) / _M.EWMA_TAU_MS)
end

------------------------------------------------------------------------------
-- Rate-limit headers

-- OpenAI's reset durations: "1s", "6m0s", "20ms", "1h2m3.5s".
local UNIT_MS = { h = 3600000, m = 60000, s = 1000, ms = 1 }
local function duration_ms(v)
  if type(v) ~= "string" then
    return nil
  end
  local n = tonumber(v)
  if n then
    return n * 1000
  end
  local total, seen = 0, false
  for num, unit in v:gmatch("([%d%.]+)(%a+)") do
    local f, u = tonumber(num), UNIT_MS[unit]
    if not f or not u then
      return nil
    end
    total, seen = total + f * u, true
  end
  return seen and total or nil
end
_M.duration_ms = duration_ms

-- Anthropic's reset times: RFC 3339 ("2026-12-06T23:59:30Z"), as ms from now.
local function rfc3339_in_ms(v)
  if type(v) ~= "string" then
    return nil
  end
  local y, mo, d, h, mi, s = v:match("^(%d%d%d%d)-(%d%d)-(%d%d)T(%d%d):(%d%d):(%d%d)")
  if not y then
    return nil
  end
  -- days from the civil date (UTC, no time zone database needed)
  y, mo = tonumber(y), tonumber(mo)
  if mo <= 2 then
    y = y - 1
  end
  local era = floor(y / 400)
  local yoe = y - era * 400
  local mp = (mo + 9) % 12
  local doy = floor((153 * mp + 2) / 5) + tonumber(d) - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  local days = era * 146097 + doe - 719468
  local epoch = days * 86400 + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(s)
  local left = (epoch - os_time()) * 1000
  return left > 0 and left or 0
end
_M.rfc3339_in_ms = rfc3339_in_ms

-- Takes the rate-limit headers of a response into d: OpenAI's
-- x-ratelimit-{limit,remaining,reset}-{requests,tokens} and Anthropic's
-- anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset} (or, without
-- the tokens ones, its input-tokens ones). headers: lower-case names.
function _M.observe_headers(d, headers, t)
  local rr = headers["x-ratelimit-remaining-requests"]
  if rr then
    d.requests_remaining = tonumber(rr)
    d.requests_limit = tonumber(headers["x-ratelimit-limit-requests"]) or d.requests_limit
    local ms = duration_ms(headers["x-ratelimit-reset-requests"])
    d.requests_reset_at = ms and t + ms or nil
  end
  local tr = headers["x-ratelimit-remaining-tokens"]
  if tr then
    d.tokens_remaining = tonumber(tr)
    d.tokens_limit = tonumber(headers["x-ratelimit-limit-tokens"]) or d.tokens_limit
    local ms = duration_ms(headers["x-ratelimit-reset-tokens"])
    d.tokens_reset_at = ms and t + ms or nil
  end
  if rr or tr then
    return -- OpenAI's
  end
  local ar = headers["anthropic-ratelimit-requests-remaining"]
  if ar then
    d.requests_remaining = tonumber(ar)
    d.requests_limit = tonumber(headers["anthropic-ratelimit-requests-limit"]) or d.requests_limit
    local ms = rfc3339_in_ms(headers["anthropic-ratelimit-requests-reset"])
    d.requests_reset_at = ms and t + ms or nil
  end
  local kind = headers["anthropic-ratelimit-tokens-remaining"] and "tokens" or "input-tokens"
  local at = headers["anthropic-ratelimit-" .. kind .. "-remaining"]
  if at then
    d.tokens_remaining = tonumber(at)
    d.tokens_limit = tonumber(headers["anthropic-ratelimit-" .. kind .. "-limit"]) or d.tokens_limit
    local ms = rfc3339_in_ms(headers["anthropic-ratelimit-" .. kind .. "-reset"])
    d.tokens_reset_at = ms and t + ms or nil
  end
end

-- The requests d can still take by the last headers (its in-flight ones
-- taken off), and the tokens; nil for what no header told (or whose
-- window has reset since: then the limit, when known).
function _M.headroom(d, t)
  local req, tok = d.requests_remaining, d.tokens_remaining
  if req and d.requests_reset_at and t >= d.requests_reset_at then
    req = d.requests_limit
  end
  if tok and d.tokens_reset_at and t >= d.tokens_reset_at then
    tok = d.tokens_limit
  end
  return req, tok
end

------------------------------------------------------------------------------
-- What an attempt tells (call.lua, for a config with `stats`)

-- One attempt ended: its latency (ms), whether it failed, and the
-- response headers (nil when none came).
function _M.observe(d, ms, failed, headers)
  local t = now()
  d.calls = d.calls + 1
  local e = d.ewma_ms
  if not e or ms > e then
    d.ewma_ms = ms -- peak: a slower answer counts at once
  else
    local w = exp(-(t - d.ewma_at) / _M.EWMA_TAU_MS)
    d.ewma_ms = e * w + ms * (1 - w)
  end
  d.ewma_at = t
  local a = _M.ERROR_ALPHA
  if failed then
    d.failures = d.failures + 1
    d.error_rate = d.error_rate * (1 - a) + a
  else
    d.error_rate = d.error_rate * (1 - a)
  end
  if headers then
    _M.observe_headers(d, headers, t)
  end
end

------------------------------------------------------------------------------
-- The deployment's own rpm/tpm (a routing limit: over it, balancers pass it
-- over and a call to it answers rate_limited at once). Counted in the
-- server-wide state (aiorch.state windows: every worker, and every replica
-- with Redis).

local WINDOW_MS = 60000

-- true, or false, ms to wait, message.
function _M.admit(d)
  local t = now()
  if d.limited_until > t then
    return false, d.limited_until - t, d.limited_why
  end
  if d.tpm then
    local used = state.window_count("dt\31" .. d.id, WINDOW_MS)
    if used and used >= d.tpm then
      d.limited_until = t + _M.TPM_RECHECK_MS
      d.limited_why = fmt("deployment %s is at its tpm (%d)", d.id, d.tpm)
      return false, _M.TPM_RECHECK_MS, d.limited_why
    end
  end
  if d.rpm then
    local ok, wait = state.window("dr\31" .. d.id, 1, WINDOW_MS, d.rpm)
    if ok == false then
      d.limited_until = t + wait
      d.limited_why = fmt("deployment %s is at its rpm (%d)", d.id, d.rpm)
      return false, wait, d.limited_why
    end
  end
  return true
end

-- The tokens an answer used: counted against tpm, and in tokens_per_call.
function _M.spent(d, usage)
  if type(usage) ~= "table" then
    return
  end
  local n = (tonumber(usage.input_tokens) or 0) + (tonumber(usage.output_tokens) or 0)
  if n <= 0 then
    return
  end
  local a = _M.TOKENS_ALPHA
  d.tokens_per_call = d.tokens_per_call and d.tokens_per_call * (1 - a) + n * a or n
  if d.tpm then
    state.window_add("dt\31" .. d.id, n, WINDOW_MS)
  end
end

------------------------------------------------------------------------------
-- Configuration: NAME_DEPLOYMENTS in a config's env (a list of tables, from
-- a gateway configuration or opts.env).

local FIELDS = { name = true, base_url = true, api_key_env = true, model = true, weight = true, rpm = true,
  tpm = true, region = true }

local function env_name_ok(v)
  return type(v) == "string" and v:match("^[%a_][%w_]*$") ~= nil
end

local function positive_int(v)
  return math.type(v) == "integer" and v > 0
end

-- check(list, where) -> a clean copy of the list, or nil, message.
function _M.check(list, where)
  if type(list) ~= "table" or #list == 0 then
    return nil, where .. ": must be a non-empty list of {name = ..., ...}"
  end
  if #list > _M.MAX_DEPLOYMENTS then
    return nil, fmt("%s: at most %d deployments", where, _M.MAX_DEPLOYMENTS)
  end
  local out, seen = {}, {}
  for i, e in ipairs(list) do
    local w = fmt("%s[%d]", where, i)
    if type(e) ~= "table" then
      return nil, w .. ": must be a table"
    end
    for k in pairs(e) do
      if not FIELDS[k] then
        if k == "api_key" or k == "key" then
          return nil, w .. ": literal keys are refused; name the environment variable with api_key_env"
        end
        return nil, fmt("%s: unknown field '%s' (known: api_key_env, base_url, model, name, region, rpm, tpm, "
          .. "weight)", w, tostring(k))
      end
    end
    local name = e.name or e.region
    if type(name) ~= "string" or not name:match("^[%w_.%-]+$") then
      return nil, w .. ".name: must be letters, digits, '_', '.' or '-'"
    end
    if seen[name] then
      return nil, fmt("%s.name: '%s' is listed twice", w, name)
    end
    seen[name] = true
    if e.base_url ~= nil and (type(e.base_url) ~= "string" or not e.base_url:match("^https?://")) then
      return nil, w .. ".base_url: must be an http(s) URL"
    end
    if e.api_key_env ~= nil and e.api_key_env ~= false and not env_name_ok(e.api_key_env) then
      return nil, w .. ".api_key_env: must be an environment variable name (a literal key is refused)"
    end
    if e.model ~= nil and type(e.model) ~= "string" then
      return nil, w .. ".model: must be a string"
    end
    if e.region ~= nil and type(e.region) ~= "string" then
      return nil, w .. ".region: must be a string"
    end
    if e.weight ~= nil and not (type(e.weight) == "number" and e.weight > 0 and e.weight <= 1e6) then
      return nil, w .. ".weight: must be a number > 0 (at most 1e6)"
    end
    for _, k in ipairs { "rpm", "tpm" } do
      if e[k] ~= nil and not positive_int(e[k]) then
        return nil, fmt("%s.%s: must be a positive integer", w, k)
      end
    end
    out[i] = { name = name, base_url = e.base_url, api_key_env = e.api_key_env, model = e.model,
      weight = e.weight or 1, rpm = e.rpm, tpm = e.tpm, region = e.region }
  end
  return out
end

-- The deployments' configs of a provider's cfg (from aiorch.config), each
-- a copy of cfg with its own key, base URL, model and figures. get reads
-- the env; secrets_add registers a key. Returns the list, or nil, message.
function _M.configure(cfg, list, get, secrets_add, where)
  local clean, err = _M.check(list, where)
  if not clean then
    return nil, err
  end
  local out = {}
  for i, e in ipairs(clean) do
    local c = {}
    for k, v in pairs(cfg) do
      c[k] = v
    end
    local id = cfg.name .. "/" .. e.name
    if e.api_key_env ~= nil then
      local key = e.api_key_env and get(e.api_key_env) or nil
      if type(key) == "string" then
        key = key:match("^%s*(.-)%s*$")
        key = key ~= "" and key or nil
      end
      secrets_add(key)
      c.key, c.key_env, c.key_env_fallback = key, e.api_key_env or nil, nil
      c.available = e.api_key_env == false or key ~= nil
      c.unavailable = not c.available and fmt("%s is not set (deployment %s)", e.api_key_env, id) or nil
    end
    c.base_url = e.base_url or cfg.base_url
    c.model = e.model or cfg.model
    c.deployment, c.breaker_key, c.balanced = e.name, id, true
    c.deployments, c.deployment_list = nil, nil
    c.stats = _M.record(id, { provider = cfg.name, name = e.name, weight = e.weight, rpm = e.rpm, tpm = e.tpm,
      model = c.model })
    out[i] = c
  end
  return out
end

return _M
