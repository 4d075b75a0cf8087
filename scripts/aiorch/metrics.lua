-- Per-provider metrics for this runtime (one Lua state = one runtime, so
-- module-level state is per runtime).
local breaker = require "aiorch.breaker"

local type = type
local pairs = pairs
local ipairs = ipairs
local sort = table.sort
local floor = math.floor

local _M = {}

-- Latency histogram bucket upper bounds in ms; the last bucket is +Inf.
_M.buckets = { 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000 }
local WINDOW = 256 -- latencies kept for p50/p95

local providers = {}

local function new_entry()
  local hist = {}
  for i = 1, #_M.buckets + 1 do
    hist[i] = 0
  end
  return {
    requests = 0, successes = 0, errors = 0, timeouts = 0, cancelled = 0,
    errors_by_kind = {},
    latency_hist = hist, latency_sum_ms = 0, latency_count = 0,
    window = {}, window_next = 1,
    tokens_in = 0, tokens_out = 0, cost_usd = 0,
    fallback_activations = 0, races_won = 0, races_lost = 0,
    retries = 0, skipped = 0, hedges = 0, continuations = 0,
    tokens_wasted_in = 0, tokens_wasted_out = 0,
  }
end

local function entry(name)
  local e = providers[name]
  if not e then
    e = new_entry()
    providers[name] = e
  end
  return e
end

local function observe_latency(e, ms)
  local buckets = _M.buckets
  local n = #buckets
  local b = n + 1
  for i = 1, n do
    if ms <= buckets[i] then
      b = i
      break
    end
  end
  e.latency_hist[b] = e.latency_hist[b] + 1
  e.latency_sum_ms = e.latency_sum_ms + ms
  e.latency_count = e.latency_count + 1
  e.window[e.window_next] = ms
  e.window_next = e.window_next % WINDOW + 1
end

-- A call has started.
function _M.started(name)
  local e = entry(name)
  e.requests = e.requests + 1
end

-- A call ended before completing (its task was cancelled).
function _M.cancelled(name)
  local e = entry(name)
  e.cancelled = e.cancelled + 1
end

-- A call has ended with a StandardAIResponse.
local EMPTY = {} -- never written

function _M.finished(name, resp)
  local e = entry(name)
  local meta = resp.metadata or EMPTY
  if resp.status == "success" then
    e.successes = e.successes + 1
    local u = meta.usage or EMPTY
    e.tokens_in = e.tokens_in + (u.input_tokens or 0)
    e.tokens_out = e.tokens_out + (u.output_tokens or 0)
    e.cost_usd = e.cost_usd + (meta.cost_usd or 0)
  else
    if resp.status == "timeout" then
      e.timeouts = e.timeouts + 1
    end
    e.errors = e.errors + 1
    local kind = meta.error_kind or resp.status
    e.errors_by_kind[kind] = (e.errors_by_kind[kind] or 0) + 1
  end
  -- A provider that was never reached says nothing about its latency.
  if meta.error_kind ~= "unavailable" and type(resp.latency_ms) == "number" then
    observe_latency(e, resp.latency_ms)
  end
end

function _M.count(name, counter, n)
  local e = entry(name)
  local v = e[counter]
  if v ~= nil and type(v) ~= "number" then
    return nil, "not a counter: " .. counter
  end
  e[counter] = (v or 0) + (n or 1)
  return e[counter]
end

local function percentile(sorted, p)
  local n = #sorted
  if n == 0 then
    return nil
  end
  local idx = floor(p * (n - 1) + 0.5) + 1
  return sorted[idx]
end

function _M.latency(name)
  local e = providers[name]
  if not e or #e.window == 0 then
    return { count = 0 }
  end
  local s = {}
  for i, v in ipairs(e.window) do
    s[i] = v
  end
  sort(s)
  return { count = e.latency_count, p50 = percentile(s, 0.5), p95 = percentile(s, 0.95) }
end

-- A plain copy of everything, for callers that print or export it.
function _M.snapshot()
  local out = {}
  for name, e in pairs(providers) do
    local kinds = {}
    for k, v in pairs(e.errors_by_kind) do
      kinds[k] = v
    end
    local buckets = {}
    local cumulative = 0
    for i = 1, #_M.buckets + 1 do
      cumulative = cumulative + e.latency_hist[i]
      buckets[i] = { le = _M.buckets[i] or "+Inf", count = cumulative }
    end
    local lat = _M.latency(name)
    local health = breaker.health(name)
    out[name] = {
      requests = e.requests, successes = e.successes, errors = e.errors, timeouts = e.timeouts,
      cancelled = e.cancelled, errors_by_kind = kinds,
      latency = { count = e.latency_count, sum_ms = e.latency_sum_ms, buckets = buckets,
                  p50 = lat.p50, p95 = lat.p95 },
      tokens_in = e.tokens_in, tokens_out = e.tokens_out, cost_usd = e.cost_usd,
      fallback_activations = e.fallback_activations, races_won = e.races_won, races_lost = e.races_lost,
      retries = e.retries, skipped = e.skipped, hedges = e.hedges, continuations = e.continuations,
      tokens_wasted_in = e.tokens_wasted_in, tokens_wasted_out = e.tokens_wasted_out,
      healthy = health.healthy,
      breaker = health.state,
    }
  end
  return out
end

function _M.reset()
  providers = {}
end

return _M
