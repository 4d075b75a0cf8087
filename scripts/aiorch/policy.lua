-- Resilience policies: retries, deadlines, circuit breaking, hedging.
--
-- A policy is a flat table of the fields below. The defaults are overridden
-- by the provider's configuration (config.policy), then by the orchestration
-- (opts.policy), then by the request (request.policy), field by field.
local fmt = string.format
local type = type
local pairs = pairs
local tostring = tostring
local random = math.random
local tointeger = math.tointeger
local tonumber = tonumber
local concat = table.concat
local ipairs = ipairs

local _M = {}

-- name -> {default, what it is, kind, least, most}; nil defaults are "not
-- set". kind: "int" (whole numbers within least..most), "number" (within
-- least..most) or "bool". The ranges are hard limits, whoever sets the
-- value: they keep every figure finite and every loop short.
local HOUR_MS, DAY_MS = 3600 * 1000, 24 * 3600 * 1000
_M.MAX_ATTEMPTS = 10
_M.fields = {
  -- retries of one provider, after its first attempt
  max_attempts = { 1, "attempts per provider, the first included", "int", 1, _M.MAX_ATTEMPTS },
  backoff_ms = { 200, "base of the exponential backoff (full jitter)", "int", 0, 60000 },
  backoff_max_ms = { 5000, "cap of one wait between attempts", "int", 0, 300000 },
  retry_budget_ms = { 15000, "cap of the time from the first attempt to starting another", "int", 0, HOUR_MS },
  -- deadlines of one attempt, each on its own timer
  connect_timeout_ms = { 10000, "to a connected (TLS-ready) socket", "int", 1, HOUR_MS },
  headers_timeout_ms = { nil, "to the response headers", "int", 1, HOUR_MS },
  first_token_timeout_ms = { nil, "to the first content token of a stream", "int", 1, HOUR_MS },
  gap_timeout_ms = { nil, "the longest pause between two stream events", "int", 1, HOUR_MS },
  timeout_ms = { 60000, "the whole attempt", "int", 1, HOUR_MS },
  max_response_bytes = { 8 * 1024 * 1024, "cap of an upstream response body", "int", 1, 1024 * 1024 * 1024 },
  -- circuit breaker, per provider and per runtime
  breaker_failures = { 5, "failures within breaker_window_ms that open the breaker (0: never)", "int", 0, 100000 },
  breaker_window_ms = { 30000, "window in which failures are counted", "int", 1, DAY_MS },
  cooldown_ms = { 30000, "how long an open breaker skips the provider", "int", 0, DAY_MS },
  -- the hedged strategy
  hedge_delay_ms = { nil, "wait before the next provider starts (default: the last one's p95)", "int", 0, HOUR_MS },
  hedge_budget = { 0.1, "extra requests hedging may add, as a share of hedged requests", "number", 0, 1 },
  -- the parallel variants: quorum and first_k (k), arrived_by (its deadline)
  parallel_k = { nil, "quorum: answers that must agree (default a majority); first_k: answers wanted (default 1)",
    "int", 1, 1000 },
  arrived_by_ms = { nil, "arrived_by: what has arrived by then is the answer (default 1000)", "int", 1, HOUR_MS },
  -- streaming
  continue_on_cut = { false, "a stream cut after its first token continues on the next provider", "bool" },
}

-- The deadlines of an attempt: a client that makes one tighter than the
-- provider's own may see timeouts that say nothing of the provider's health.
_M.DEADLINES = { "connect_timeout_ms", "headers_timeout_ms", "first_token_timeout_ms", "gap_timeout_ms",
  "timeout_ms" }

-- Fields a request (a client) may not change: they protect the runtime.
local PROVIDER_ONLY = {
  max_response_bytes = true, breaker_failures = true, breaker_window_ms = true, cooldown_ms = true,
}
_M.PROVIDER_ONLY = PROVIDER_ONLY

local defaults = {}
for k, f in pairs(_M.fields) do
  defaults[k] = f[1]
end
_M.defaults = defaults

local names = {}
for k in pairs(_M.fields) do
  names[#names + 1] = k
end
table.sort(names)
local NAMES = concat(names, ", ")

-- The text of a value in a message: short, and never a whole string.
local function show(v)
  if type(v) == "string" then
    return fmt("%q", #v > 24 and v:sub(1, 24) .. "..." or v)
  end
  return tostring(v)
end

-- The one check of a field's value: nil, message when it is not of the
-- field's kind or not within its range (NaN and infinities never are).
-- Returns the value (an integer for "int" fields).
function _M.check_value(k, v, who)
  local f = _M.fields[k]
  local kind, least, most = f[3], f[4], f[5]
  if kind == "bool" then
    if type(v) ~= "boolean" then
      return nil, fmt("%s.%s: must be true or false (got %s)", who, k, show(v))
    end
    return v
  end
  local n = type(v) == "number" and v == v and v >= least and v <= most and v or nil
  if n and kind == "int" then
    n = tointeger(n)
  end
  if n == nil then
    return nil, fmt("%s.%s: must be %s from %s to %s (got %s)", who, k, kind == "int" and "an integer" or "a number",
      tostring(least), tostring(most), show(v))
  end
  return n
end

-- check(t, who[, provider_level]) -> a clean copy of t, or nil, message.
function _M.check(t, who, provider_level)
  if t == nil then
    return {}
  end
  if type(t) ~= "table" then
    return nil, fmt("%s: must be a table", who)
  end
  local keys = {}
  for k in pairs(t) do
    keys[#keys + 1] = k
  end
  -- the first bad key is the same every time
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  local out = {}
  for _, k in ipairs(keys) do
    local v = t[k]
    if type(k) ~= "string" or not _M.fields[k] then
      return nil, fmt("%s: unknown field '%s' (known: %s)", who, tostring(k), NAMES)
    end
    if PROVIDER_ONLY[k] and not provider_level then
      return nil, fmt("%s.%s: set per provider only", who, k)
    end
    local value, err = _M.check_value(k, v, who)
    if value == nil then
      return nil, err
    end
    out[k] = value
  end
  return out
end

-- parse("max_attempts=3,continue_on_cut=true") -> a table, or nil, message.
-- The form an environment variable or a header carries.
function _M.parse(s, who)
  if type(s) ~= "string" then
    return nil, fmt("%s: must be a string of name=value pairs", who)
  end
  local t = {}
  for item in s:gmatch("[^,]+") do
    local k, v = item:match("^%s*([%w_]+)%s*=%s*(.-)%s*$")
    if not k then
      return nil, fmt("%s: '%s' is not name=value", who, item)
    end
    if v == "true" or v == "false" then
      t[k] = v == "true"
    else
      t[k] = tonumber(v) or v
    end
  end
  return t
end

-- Copies the fields of t (when given) over those of out.
local function merge(out, t)
  if t then
    for k, v in pairs(t) do
      out[k] = v
    end
  end
  return out
end

-- The policy of one call: defaults < provider < orchestration < request.
-- Tables are merged only when an override is there (the usual case is none).
function _M.resolve(provider_policy, opts_policy, request_policy)
  local p = provider_policy or defaults
  if opts_policy == nil and request_policy == nil then
    return p
  end
  return merge(merge(merge({}, p), opts_policy), request_policy)
end

-- Whether pol sets a deadline tighter than base does: its timeouts then
-- say more about the caller's hurry than about the provider's health.
function _M.tightens(base, pol)
  for _, k in ipairs(_M.DEADLINES) do
    local v = pol[k]
    if v and v ~= base[k] and (base[k] == nil or v < base[k]) then
      return true
    end
  end
  return false
end

-- A provider's policy: the defaults overridden by its configuration.
function _M.for_provider(t)
  return merge(merge({}, defaults), t)
end

-- Failures worth another attempt: the provider or the path to it was at
-- fault, and may not be next time. 400, 401, 403 and bad bodies never are.
local RETRY_KINDS = {
  connect = true, reset = true, timeout = true, rate_limited = true, server_error = true,
  stream_cut = true,
}

function _M.retryable(kind, http_status)
  if http_status == 400 or http_status == 401 or http_status == 403 then
    return false
  end
  return RETRY_KINDS[kind] == true
end

-- Failures that count against a provider's breaker: it (or the way to it)
-- is unwell. A refused key or a bad request says nothing about its health.
local BREAKER_KINDS = {
  connect = true, reset = true, timeout = true, rate_limited = true, server_error = true,
  stream_cut = true, dns = true, tls = true, parse = true, too_large = true,
}

function _M.counts_as_failure(kind)
  return BREAKER_KINDS[kind] == true
end

local MONTHS = { Jan = 1, Feb = 2, Mar = 3, Apr = 4, May = 5, Jun = 6, Jul = 7, Aug = 8, Sep = 9, Oct = 10,
                 Nov = 11, Dec = 12 }

-- Retry-After in ms: seconds, or an HTTP date (then, from now).
function _M.retry_after_ms(v)
  if type(v) == "number" then
    return v >= 0 and v * 1000 or nil
  end
  if type(v) ~= "string" then
    return nil
  end
  local d, mon, y, h, mi, s = v:match("^%a+, (%d+) (%a+) (%d+) (%d+):(%d+):(%d+) GMT$")
  if not d or not MONTHS[mon] then
    return nil
  end
  local t = os.time { year = tonumber(y), month = MONTHS[mon], day = tonumber(d), hour = tonumber(h),
                      min = tonumber(mi), sec = tonumber(s), isdst = false }
  -- os.time reads the fields as local time; correct by the zone's offset.
  local utc_now = os.time(os.date("!*t"))
  local delta = t - utc_now
  return delta > 0 and delta * 1000 or 0
end

-- The wait before attempt n + 1 (n >= 1): full jitter over an exponential
-- ceiling, and never less than what the provider asked for.
function _M.backoff_ms(pol, n, retry_after)
  -- n is at most MAX_ATTEMPTS, and the exponent is capped anyway: the
  -- ceiling stays finite (0 * inf would be NaN).
  local ceiling = pol.backoff_ms * 2 ^ (n <= 31 and n - 1 or 30)
  if ceiling > pol.backoff_max_ms then
    ceiling = pol.backoff_max_ms
  end
  local wait = random() * ceiling
  local asked = _M.retry_after_ms(retry_after)
  if asked and asked > wait then
    wait = asked
  end
  return wait
end

return _M
