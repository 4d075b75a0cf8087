-- Per-provider metrics for this runtime (one Lua state = one runtime, so
-- module-level state is per runtime). When the state is shared (aiorch.state:
-- the workers of one server), what is counted here is pushed as deltas at
-- each flush, and snapshot() gives the server's totals.
local breaker = require "aiorch.breaker"
local state = require "aiorch.state"

local type = type
local pairs = pairs
local ipairs = ipairs
local sort = table.sort
local floor = math.floor
local tonumber = tonumber
local match = string.match
local max = math.max

local _M = {}

-- Latency histogram bucket upper bounds in ms; the last bucket is +Inf.
_M.buckets = { 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000 }
local WINDOW = 256 -- latencies kept for p50/p95

local providers = {}
local changed = false -- since the last flush

-- The fields of a snapshot's entry that are plain counters; what is pushed
-- to the shared state: those, the latency's sum and count, and the other
-- counters count() was given (extra).
local COUNTERS = { "requests", "successes", "errors", "timeouts", "cancelled", "tokens_in", "tokens_out", "cost_usd",
  "fallback_activations", "races_won", "races_lost", "retries", "skipped", "hedges", "continuations",
  "tokens_wasted_in", "tokens_wasted_out" }
local PUSHED = { "latency_sum_ms", "latency_count" }
local KNOWN = { window_next = true, consecutive_failures = true, latency_sum_ms = true, latency_count = true }
for _, k in ipairs(COUNTERS) do
  PUSHED[#PUSHED + 1] = k
  KNOWN[k] = true
end
local extra = {}

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
  changed = true
  e.requests = e.requests + 1
end

-- A call ended before completing (its task was cancelled).
function _M.cancelled(name)
  local e = entry(name)
  changed = true
  e.cancelled = e.cancelled + 1
end

-- A call has ended with a StandardAIResponse.
local EMPTY = {} -- never written

function _M.finished(name, resp)
  local e = entry(name)
  changed = true
  local meta = resp.metadata or EMPTY
  if resp.status == "success" then
    e.successes = e.successes + 1
    local u = meta.usage or EMPTY
    e.tokens_in = e.tokens_in + (u.input_tokens or 0)
    e.tokens_out = e.tokens_out + (u.output_tokens or 0)
  else
    if resp.status == "timeout" then
      e.timeouts = e.timeouts + 1
    end
    e.errors = e.errors + 1
    local kind = meta.error_kind or resp.status
    e.errors_by_kind[kind] = (e.errors_by_kind[kind] or 0) + 1
  end
  local usd = meta.cost_usd
  if usd then -- a failure that reported tokens costs money too
    e.cost_usd = e.cost_usd + usd
  end
  -- A provider that was never reached says nothing about its latency.
  if meta.error_kind ~= "unavailable" and type(resp.latency_ms) == "number" then
    observe_latency(e, resp.latency_ms)
  end
end

------------------------------------------------------------------------------
-- Spending by provider, model and client: USD and tokens by kind. The
-- kinds do not overlap (their sum is every token): input read fresh,
-- cached_read, cache_write, output other than reasoning, reasoning.

_M.SPEND_KINDS = { "input", "output", "cached_read", "cache_write", "reasoning" }
_M.spend_series_max = 1000 -- (provider, model, client) series; later ones count as model "other"
local spent = {} -- provider -> model -> client -> {cost_usd, input, ...}
local n_spent = 0

local function spend_entry(provider, model, client)
  if type(model) ~= "string" then
    model = "-"
  end
  local by_model = spent[provider]
  if not by_model then
    by_model = {}
    spent[provider] = by_model
  end
  local by_client = by_model[model]
  local e = by_client and by_client[client]
  if e then
    return e
  end
  if n_spent >= _M.spend_series_max and model ~= "other" then
    return spend_entry(provider, "other", client)
  end
  if not by_client then
    by_client = {}
    by_model[model] = by_client
  end
  e = { input = 0, output = 0, cached_read = 0, cache_write = 0, reasoning = 0, cost_usd = nil }
  by_client[client] = e
  n_spent = n_spent + 1
  return e
end

-- What one call spent: its canonical usage (numbers or nil) and its cost
-- (nil: no price). client: the gateway's name for the caller's key (never
-- the key), or nil. On every answer: the entry is found inline.
local last_provider, last_model, last_client, last_entry -- the series of the last call: most repeat it

function _M.spend(provider, model, client, usage, usd)
  model, client = model or "-", client or "-"
  local e
  if provider == last_provider and model == last_model and client == last_client then
    e = last_entry
  else
    local by_model = spent[provider]
    local by_client = by_model and by_model[model]
    e = by_client and by_client[client] or spend_entry(provider, model, client)
    last_provider, last_model, last_client, last_entry = provider, model, client, e
  end
  changed = true
  local i, o = usage.input_tokens or 0, usage.output_tokens or 0
  local cr, cw, r = usage.cached_input_tokens, usage.cache_write_tokens, usage.reasoning_tokens
  if cr and cr ~= 0 or cw and cw ~= 0 or r and r ~= 0 then
    cr, cw, r = cr or 0, cw or 0, r or 0
    i, o = max(i - cr - cw, 0), max(o - r, 0)
    e.cached_read = e.cached_read + cr
    e.cache_write = e.cache_write + cw
    e.reasoning = e.reasoning + r
  end
  e.input = e.input + i
  e.output = e.output + o
  if usd then
    e.cost_usd = (e.cost_usd or 0) + usd
  end
end

function _M.count(name, counter, n)
  local e = entry(name)
  changed = true
  local v = e[counter]
  if v ~= nil and type(v) ~= "number" then
    return nil, "not a counter: " .. counter
  end
  if v == nil and not KNOWN[counter] then
    extra[counter] = true
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

------------------------------------------------------------------------------
-- Shared totals. Keys: m<US>provider<US>c<US>counter (a number field of an
-- entry), ...<US>e<US>kind (errors_by_kind), ...<US>h<US>i (latency bucket i,
-- not cumulative). <US> is the byte 31, which names do not hold.

local flushed = {} -- name -> {field = value, kinds = {}, hist = {}}: what was pushed
local key_cache = {} -- name -> kind -> field -> key

-- "m<US>name<US>kind<US>field", made once.
local function key_of(name, kind, field)
  local by_name = key_cache[name]
  if not by_name then
    by_name = { c = {}, e = {}, h = {} }
    key_cache[name] = by_name
  end
  local t = by_name[kind]
  local k = t[field]
  if not k then
    k = "m\31" .. name .. "\31" .. kind .. "\31" .. field
    t[field] = k
  end
  return k
end

-- The spending's deltas since the last flush: s<US>provider<US>model<US>client<US>field.
local spend_flushed = {} -- key -> value pushed
local SPEND_FIELDS = { "cost_usd", "input", "output", "cached_read", "cache_write", "reasoning" }
local function collect_spend(add)
  for provider, by_model in pairs(spent) do
    for model, by_client in pairs(by_model) do
      for client, e in pairs(by_client) do
        local keys = e.keys
        if not keys then
          keys = {}
          local ok = not (provider:find("\31", 1, true) or model:find("\31", 1, true) or client:find("\31", 1, true))
            and #provider + #model + #client < 180
          for _, f in ipairs(SPEND_FIELDS) do
            keys[f] = ok and ("s\31" .. provider .. "\31" .. model .. "\31" .. client .. "\31" .. f) or false
          end
          e.keys = keys
        end
        for _, f in ipairs(SPEND_FIELDS) do
          local k, v = keys[f], e[f]
          if k and v then
            local was = spend_flushed[k] or 0
            if v ~= was then
              add(k, v - was)
              spend_flushed[k] = v
            end
          end
        end
      end
    end
  end
end

-- The state's flush: what changed since the last one, as deltas.
local function collect(add)
  if not changed then
    return
  end
  changed = false
  for name, e in pairs(providers) do
    local f = flushed[name]
    if not f then
      key_of(name, "c", "requests")
      -- a name with the separator in it would make keys that read back wrong
      f = { kinds = {}, hist = {}, keys = key_cache[name], skip = name:find("\31", 1, true) ~= nil }
      flushed[name] = f
    end
    if not f.skip then
      local kc = f.keys.c
      for i = 1, #PUSHED do
        local k = PUSHED[i]
        local v, was = e[k], f[k] or 0
        if v ~= was then
          add(kc[k] or key_of(name, "c", k), v - was)
          f[k] = v
        end
      end
      for k in pairs(extra) do
        local v, was = e[k], f[k] or 0
        if type(v) == "number" and v ~= was and #k <= 128 then
          add(kc[k] or key_of(name, "c", k), v - was)
          f[k] = v
        end
      end
      local kinds = f.kinds
      for kind, v in pairs(e.errors_by_kind) do
        local was = kinds[kind] or 0
        if v ~= was and #kind <= 128 then
          add(key_of(name, "e", kind), v - was)
          kinds[kind] = v
        end
      end
      local hist, hk, lh = f.hist, f.keys.h, e.latency_hist
      for i = 1, #lh do
        local v, was = lh[i], hist[i] or 0
        if v ~= was then
          add(hk[i] or key_of(name, "h", i), v - was)
          hist[i] = v
        end
      end
    end
  end
  collect_spend(add)
end

-- What was counted so far stays out of a new backend.
local function baseline()
  changed = true
  flushed = {}
  spend_flushed = {}
  collect(function() end)
end

state.source(collect, baseline)


-- The totals of every process sharing the state, in snapshot's shape.
-- Latency percentiles are this process's (its last WINDOW calls).
local function shared_snapshot()
  local found = {} -- name -> {c = {}, e = {}, h = {}}
  for key, v in pairs(state.read("m\31")) do
    local name, kind, field = match(key, "^m\31([^\31]*)\31(%a)\31(.*)$")
    if name then
      local f = found[name]
      if not f then
        f = { c = {}, e = {}, h = {} }
        found[name] = f
      end
      if kind == "h" then
        field = tonumber(field)
      end
      if field and f[kind] then
        f[kind][field] = v
      end
    end
  end
  local out = {}
  for name, f in pairs(found) do
    local p = { errors_by_kind = f.e }
    for _, k in ipairs(COUNTERS) do
      p[k] = f.c[k] or 0
    end
    local buckets, cumulative = {}, 0
    for i = 1, #_M.buckets + 1 do
      cumulative = cumulative + (f.h[i] or 0)
      buckets[i] = { le = _M.buckets[i] or "+Inf", count = cumulative }
    end
    local lat = _M.latency(name)
    local health = breaker.health(name)
    p.latency = { count = f.c.latency_count or 0, sum_ms = f.c.latency_sum_ms or 0, buckets = buckets,
                  p50 = lat.p50, p95 = lat.p95 }
    p.healthy, p.breaker = health.healthy, health.state
    out[name] = p
  end
  return out
end

-- A plain copy of everything, for callers that print or export it: the
-- server's totals when the state is shared.
function _M.snapshot()
  if state.shared() then
    return shared_snapshot()
  end
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

-- Spending by provider, model and client: a list of {provider, model,
-- client, cost_usd (nil: never priced), input, output, cached_read,
-- cache_write, reasoning}, sorted; the server's totals when the state is shared.
function _M.spending()
  local out = {}
  if state.shared() then
    local by = {}
    for key, v in pairs(state.read("s\31")) do
      local provider, model, client, field = match(key, "^s\31([^\31]*)\31([^\31]*)\31([^\31]*)\31(.*)$")
      if provider then
        local id = provider .. "\31" .. model .. "\31" .. client
        local e = by[id]
        if not e then
          e = { provider = provider, model = model, client = client, input = 0, output = 0, cached_read = 0,
            cache_write = 0, reasoning = 0 }
          by[id] = e
          out[#out + 1] = e
        end
        e[field] = v
      end
    end
  else
    for provider, by_model in pairs(spent) do
      for model, by_client in pairs(by_model) do
        for client, e in pairs(by_client) do
          out[#out + 1] = { provider = provider, model = model, client = client, cost_usd = e.cost_usd,
            input = e.input, output = e.output, cached_read = e.cached_read, cache_write = e.cache_write,
            reasoning = e.reasoning }
        end
      end
    end
  end
  sort(out, function(a, b)
    if a.provider ~= b.provider then
      return a.provider < b.provider
    elseif a.model ~= b.model then
      return a.model < b.model
    end
    return a.client < b.client
  end)
  return out
end

function _M.reset()
  providers = {}
  flushed = {}
  spent, n_spent, spend_flushed = {}, 0, {}
  last_provider, last_model, last_client, last_entry = nil, nil, nil, nil
end

return _M
