-- GET /metrics: aiorch.metrics.snapshot() (per provider) plus the
-- gateway's own counters, in the Prometheus text format (version 0.0.4).
-- Latency is a histogram in seconds, as Prometheus names want.
local metrics = require "aiorch.metrics"
local state = require "aiorch.state"

local fmt = string.format
local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local sort = table.sort
local concat = table.concat

local _M = {}

_M.content_type = "text/plain; version=0.0.4; charset=utf-8"

local function esc(v)
  return (tostring(v):gsub("[\\\"\n]", { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" }))
end

local function num(v)
  if type(v) ~= "number" or v ~= v then
    return "0"
  end
  if math.type(v) == "integer" then
    return tostring(v)
  end
  return fmt("%.15g", v)
end

local function keys(t)
  local out = {}
  for k in pairs(t) do
    out[#out + 1] = k
  end
  sort(out, function(a, b) return tostring(a) < tostring(b) end)
  return out
end

local COUNTERS = {
  { "requests", "aiorch_provider_requests_total", "Provider calls started." },
  { "successes", "aiorch_provider_successes_total", "Provider calls that succeeded." },
  { "timeouts", "aiorch_provider_timeouts_total", "Provider calls that timed out." },
  { "cancelled", "aiorch_provider_cancelled_total", "Provider calls cancelled before they ended." },
  { "cost_usd", "aiorch_provider_cost_usd_total", "Estimated cost in US dollars." },
  { "fallback_activations", "aiorch_provider_fallback_activations_total",
    "Times a fallback moved on to this provider." },
  { "races_won", "aiorch_provider_races_won_total", "Races (fastest) this provider won." },
  { "races_lost", "aiorch_provider_races_lost_total", "Races (fastest) this provider lost." },
  { "retries", "aiorch_provider_retries_total", "Attempts that retried a failed one." },
  { "skipped", "aiorch_provider_skipped_total", "Calls refused while the provider cooled down." },
  { "hedges", "aiorch_provider_hedges_total", "Hedged (extra) requests started on this provider." },
  { "continuations", "aiorch_provider_continuations_total", "Cut streams this provider continued." },
}

-- gw: the gateway's counters {requests = {["route status"] = n}, in_flight = n}.
function _M.render(gw)
  local snap = metrics.snapshot()
  local names = keys(snap)
  local out = {}
  local function add(s)
    out[#out + 1] = s
  end
  local function header(name, help, typ)
    add(fmt("# HELP %s %s", name, help))
    add(fmt("# TYPE %s %s", name, typ))
  end

  for _, c in ipairs(COUNTERS) do
    header(c[2], c[3], "counter")
    for _, p in ipairs(names) do
      add(fmt('%s{provider="%s"} %s', c[2], esc(p), num(snap[p][c[1]])))
    end
  end

  header("aiorch_provider_errors_total", "Provider calls that failed, by error kind.", "counter")
  for _, p in ipairs(names) do
    local kinds = snap[p].errors_by_kind
    for _, k in ipairs(keys(kinds)) do
      add(fmt('aiorch_provider_errors_total{provider="%s",kind="%s"} %s', esc(p), esc(k), num(kinds[k])))
    end
  end

  header("aiorch_provider_tokens_total", "Tokens sent (in) and received (out).", "counter")
  for _, p in ipairs(names) do
    add(fmt('aiorch_provider_tokens_total{provider="%s",direction="in"} %s', esc(p), num(snap[p].tokens_in)))
    add(fmt('aiorch_provider_tokens_total{provider="%s",direction="out"} %s', esc(p), num(snap[p].tokens_out)))
  end
  header("aiorch_provider_tokens_wasted_total",
    "Tokens reported by attempts that gave no answer (failed, cancelled race losers).", "counter")
  for _, p in ipairs(names) do
    add(fmt('aiorch_provider_tokens_wasted_total{provider="%s",direction="in"} %s', esc(p),
      num(snap[p].tokens_wasted_in)))
    add(fmt('aiorch_provider_tokens_wasted_total{provider="%s",direction="out"} %s', esc(p),
      num(snap[p].tokens_wasted_out)))
  end

  -- Spending by provider, model and client key (its name in the
  -- configuration, never the key; "-" when the gateway has no keys).
  local spending = metrics.spending()
  header("aiorch_cost_usd_total", "What calls cost in US dollars (failed attempts and cancelled race losers "
    .. "included), by provider, model and client key; models without a price are left out.", "counter")
  for _, e in ipairs(spending) do
    if e.cost_usd then
      add(fmt('aiorch_cost_usd_total{provider="%s",model="%s",key="%s"} %s', esc(e.provider), esc(e.model),
        esc(e.client), num(e.cost_usd)))
    end
  end
  header("aiorch_tokens_total", "Tokens by kind (input: read fresh; cached_read; cache_write; output: other than "
    .. "reasoning; reasoning), by provider, model and client key.", "counter")
  for _, e in ipairs(spending) do
    for _, kind in ipairs(metrics.SPEND_KINDS) do
      add(fmt('aiorch_tokens_total{provider="%s",model="%s",key="%s",kind="%s"} %s', esc(e.provider),
        esc(e.model), esc(e.client), kind, num(e[kind])))
    end
  end

  header("aiorch_provider_healthy", "1 unless the provider's circuit breaker is open (it is cooling down).", "gauge")
  for _, p in ipairs(names) do
    add(fmt('aiorch_provider_healthy{provider="%s"} %d', esc(p), snap[p].healthy and 1 or 0))
  end

  header("aiorch_provider_latency_seconds", "Provider call latency.", "histogram")
  for _, p in ipairs(names) do
    local lat = snap[p].latency
    for _, b in ipairs(lat.buckets) do
      local le = b.le == "+Inf" and "+Inf" or num(b.le / 1000)
      add(fmt('aiorch_provider_latency_seconds_bucket{provider="%s",le="%s"} %s', esc(p), le, num(b.count)))
    end
    add(fmt('aiorch_provider_latency_seconds_sum{provider="%s"} %s', esc(p), num((lat.sum_ms or 0) / 1000)))
    add(fmt('aiorch_provider_latency_seconds_count{provider="%s"} %s', esc(p), num(lat.count)))
  end

  if gw then
    header("aiorch_gateway_requests_total", "Gateway requests answered, by route and status.", "counter")
    for _, k in ipairs(keys(gw.requests or {})) do
      local route, status = k:match("^(.*) (%d+)$")
      add(fmt('aiorch_gateway_requests_total{route="%s",status="%s"} %s', esc(route), status,
        num(gw.requests[k])))
    end
    header("aiorch_gateway_in_flight", "Gateway requests being answered.", "gauge")
    add("aiorch_gateway_in_flight " .. num(gw.in_flight or 0))
    if gw.cache then -- the response cache (aiorch.gateway.cache)
      gw.cache:render(add, header)
    end
  end
  -- The shared state's tier (docs/replicas.md), when configured.
  local tier = state.redis()
  if tier then
    local rd = tier:metrics()
    header("aiorch_redis_up", "1 while every process reaches Redis; 0 while one uses its own state instead.", "gauge")
    add("aiorch_redis_up " .. (rd.up and 1 or 0))
    header("aiorch_redis_errors_total", "Redis operations that failed (and fell back to local state), by kind.",
      "counter")
    for _, k in ipairs(keys(rd.errors)) do
      add(fmt('aiorch_redis_errors_total{kind="%s"} %s', esc(k), num(rd.errors[k])))
    end
  end
  return concat(out, "\n") .. "\n"
end

return _M
