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

local _M = {}

-- name -> {default, what it is}; nil defaults are "not set".
_M.fields = {
  -- retries of one provider, after its first attempt
  max_attempts = { 1, "attempts per provider, the first included" },
  backoff_ms = { 200, "base of the exponential backoff (full jitter)" },
  backoff_max_ms = { 5000, "cap of one wait between attempts" },
  retry_budget_ms = { 15000, "cap of the time from the first attempt to starting another" },
  -- deadlines of one attempt, each on its own timer
  connect_timeout_ms = { 10000, "to a connected (TLS-ready) socket" },
  headers_timeout_ms = { nil, "to the response headers" },
  first_token_timeout_ms = { nil, "to the first content token of a stream" },
  gap_timeout_ms = { nil, "the longest pause between two stream events" },
  timeout_ms = { 60000, "the whole attempt" },
  max_response_bytes = { 8 * 1024 * 1024, "cap of an upstream response body" },
  -- circuit breaker, per provider and per runtime
  breaker_failures = { 5, "failures within breaker_window_ms that open the breaker (0: never)" },
  breaker_window_ms = { 30000, "window in which failures are counted" },
  cooldown_ms = { 30000, "how long an open breaker skips the provider" },
  -- the hedged strategy
  hedge_delay_ms = { nil, "wait before the next provider starts (default: the last one's p95)" },
  hedge_budget = { 0.1, "extra requests hedging may add, as a share of hedged requests" },
  -- streaming
  continue_on_cut = { false, "a stream cut after its first token continues on the next provider" },
}

-- Fields a request (a client) may not change: they protect the runtime.
local PROVIDER_ONLY = {
  max_response_bytes = true, breaker_failures = true, breaker_window_ms = true, cooldown_ms = true,
}

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

-- check(t, who[, provider_level]) -> a clean copy of t, or nil, message.
function _M.check(t, who, provider_level)
  if t == nil then
    return {}
  end
  if type(t) ~= "table" then
    return nil, fmt("%s: must be a table", who)
  end
  local out = {}
  for k, v in pairs(t) do
    local f = _M.fields[k]
    if not f then
      return nil, fmt("%s: unknown field '%s' (known: %s)", who, tostring(k), NAMES)
    end
    if PROVIDER_ONLY[k] and not provider_level then
      return nil, fmt("%s.%s: set per provider only", who, k)
    end
    if k == "continue_on_cut" then
      if type(v) ~= "boolean" then
        return nil, fmt("%s.%s: must be true or false", who, k)
      end
    elseif k == "hedge_budget" then
      if type(v) ~= "number" or v < 0 or v > 1 then
        return nil, fmt("%s.%s: must be a number from 0 to 1", who, k)
      end
    else
      local n = type(v) == "number" and tointeger(v) or nil
      local least = (k == "max_attempts" or k:find("_timeout_ms$") or k == "timeout_ms") and 1 or 0
      if not n or n < least then
        return nil, fmt("%s.%s: must be an integer >= %d", who, k, least)
      end
      v = n
    end
    out[k] = v
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
  local ceiling = pol.backoff_ms * 2 ^ (n - 1)
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
