-- Hedging against a latency tail: build/aiorch run bench/hedge.lua [REQUESTS] [CONCURRENCY]
-- Two mock providers answer in ~20 ms, but 3% of openai's answers take 400 ms.
-- The same requests run through `fallback` (openai first) and `hedged`
-- (openai first, anthropic hedged in after a delay), and the benchmark
-- prints the latency percentiles of each and the extra upstream load hedging
-- cost. Mocks run in this process on 127.0.0.1; no keys, no network.
local aiorch = require "aiorch"
local mock = require "aiorch.mock"
local orchestrate = require "aiorch.orchestrate"
local metrics = require "aiorch.metrics"
local breaker = require "aiorch.breaker"

local fmt = string.format
local args = table.pack(...)
local N = math.tointeger(tonumber(args[1] or "")) or 2000
local CONCURRENCY = math.tointeger(tonumber(args[2] or "")) or 20
local TAIL_PCT, TAIL_MS, FAST_MS = 3, 400, 20

math.randomseed(42)
local m = assert(mock.start { host = "127.0.0.1", port = 0 })
local env = {
  OPENAI_API_KEY = "bench", ANTHROPIC_API_KEY = "bench",
  OPENAI_BASE_URL = m:base_url("openai", { latency_ms = FAST_MS, tail_pct = TAIL_PCT, tail_ms = TAIL_MS }),
  ANTHROPIC_BASE_URL = m:base_url("anthropic", { latency_ms = FAST_MS }),
}

local function percentile(sorted, p)
  return sorted[math.max(1, math.ceil(p * #sorted))]
end

-- Runs N requests, CONCURRENCY at a time; returns sorted latencies, upstream calls, failures.
local function run(strategy, policy)
  m:reset()
  metrics.reset()
  breaker.reset()
  local lat, failures, next_i = {}, 0, 1
  local function worker()
    while next_i <= N do
      next_i = next_i + 1
      local t0 = aiorch.now()
      local r = orchestrate.orchestrate({ user_question = "q", policy = policy }, strategy,
        { "openai", "anthropic" }, { env = env })
      lat[#lat + 1] = aiorch.now() - t0
      if r.status ~= "success" then
        failures = failures + 1
      end
    end
  end
  local tasks = {}
  for i = 1, CONCURRENCY do
    tasks[i] = aiorch.spawn(worker)
  end
  aiorch.gather(tasks)
  table.sort(lat)
  return lat, #m.requests, failures
end

local function report(name, lat, calls, failures)
  print(fmt("%-26s p50 %6.1f  p95 %6.1f  p99 %6.1f  max %6.1f ms   upstream calls %5d (%+5.1f%%)  failures %d",
    name, percentile(lat, 0.50), percentile(lat, 0.95), percentile(lat, 0.99), lat[#lat], calls,
    (calls / N - 1) * 100, failures))
  return percentile(lat, 0.99)
end

print(fmt("hedging bench: %d requests, %d at a time; openai %d ms with %d%% at %d ms, anthropic %d ms",
  N, CONCURRENCY, FAST_MS, TAIL_PCT, TAIL_MS, FAST_MS))
local fb99 = report("fallback", run("fallback"))
-- Warm the latency window so the p95 delay has data, then measure.
run("hedged", { hedge_delay_ms = 1000 })
local hp99 = report("hedged (delay = p95)", run("hedged"))
local hf99 = report("hedged (delay 50 ms)", run("hedged", { hedge_delay_ms = 50 }))
local nb99 = report("hedged (budget 0)", run("hedged", { hedge_delay_ms = 50, hedge_budget = 0 }))
print(fmt("p99: fallback %.1f ms -> hedged %.1f ms (p95 delay), %.1f ms (50 ms delay); with no budget %.1f ms",
  fb99, hp99, hf99, nb99))
m:close()
