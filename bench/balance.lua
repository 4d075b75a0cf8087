-- The cost of one balancer decision:
--   build/aiorch run bench/balance.lua [DECISIONS] [DEPLOYMENTS] [BALANCER] [MODELS]
-- One provider with DEPLOYMENTS deployments (default 16), with live figures
-- (latencies, calls in flight, rate-limit headroom) set as traffic would;
-- each balancer in strategies/ is run as a strategy whose ctx.balance
-- lists the deployments that may take a call (ctx.deployments: breakers,
-- rate limits) and lets it pick one, without calling it. A decision is
-- that whole run: the strategy's own preparation (sticky's key, cheapest's
-- estimate), the listing and the pick. Prints microseconds per decision
-- (CPU time: the median of batches of 100, and the mean), first with no
-- breaker in play, then with breakers in play (all closed), then with one
-- open.
local aiorch = require "aiorch"
local loader = require "aiorch.loader"
local config = require "aiorch.config"
local context = require "aiorch.context"
local deployments = require "aiorch.deployments"
local canonical = require "aiorch.canonical"
local breaker = require "aiorch.breaker"

local fmt = string.format
local args = table.pack(...)
local N = math.tointeger(tonumber(args[1] or "")) or 200000
local D = math.tointeger(tonumber(args[2] or "")) or 16
local BALANCERS = { "weighted", "least_busy", "least_latency", "headroom", "sticky", "cheapest" }
if args[3] then -- one only (say, to count its instructions with callgrind)
  BALANCERS = { args[3] }
end

-- The deployments' models (cheapest compares their prices): MODELS of these.
local MODELS = { "gpt-4o-mini", "gpt-4o", "gpt-4.1-nano" }
local NMODELS = math.tointeger(tonumber(args[4] or "")) or #MODELS

math.randomseed(42)
local list, env = {}, {}
for i = 1, D do
  list[i] = { name = "d" .. i, base_url = "http://127.0.0.1:9/v1", api_key_env = "KEY_" .. i, weight = 1 + i % 3,
    model = MODELS[1 + i % NMODELS] }
  env["KEY_" .. i] = "bench-key-" .. i
end
env.OPENAI_DEPLOYMENTS = list
local adapter = assert(loader.load("provider", "openai"))
local cfg = config.provider("openai", adapter, env)
assert(cfg.deployments and #cfg.deployments == D)

-- Figures as traffic leaves them.
local t = aiorch.now()
for i = 1, D do
  local d = deployments.get("openai/d" .. i)
  d.inflight = i % 4
  d.ewma_ms, d.ewma_at = 200 + 37 * i, t
  d.requests_remaining, d.requests_limit, d.requests_reset_at = 1000 - 13 * i, 1000, t + 60000
  d.tokens_remaining, d.tokens_limit, d.tokens_reset_at = 100000 - 999 * i, 100000, t + 60000
  d.tokens_per_call = 800
end

local request = assert(canonical.normalize(assert(canonical.validate {
  messages = { { role = "system", content = "You are a careful assistant." },
    { role = "user", content = "Summarise the attached report in three sentences." } },
})))

local ctx = context.new { request = request, adapters = { openai = adapter }, configs = { openai = cfg },
  opts = { env = env } }
local deployments_of = ctx.deployments
local providers = { "openai" }

-- The context a balancer sees, but for balance: list, pick, no call.
-- (ctx.balance lists into one table it reuses: so does this)
local picked
local scratch = {}
local proxy = setmetatable({
  balance = function(p, pick)
    picked = pick(deployments_of(p, nil, scratch))
    return picked
  end,
}, { __index = ctx })

local function run(title)
  print(fmt("balancer decisions, %s: %d deployments of %d models, %d decisions each (CPU time)", title, D,
    NMODELS, N))
  local worst = 0
  for _, name in ipairs(BALANCERS) do
    local strategy = assert(loader.load("strategy", name))
    for _ = 1, 10 do -- warm up
      for _ = 1, 100 do
        strategy(request, providers, proxy)
      end
      aiorch.sleep(0)
    end
    -- (in batches of 100, yielding between them: a resume that runs long
    -- gets the runtime's instruction-budget hook, which callgrind counts)
    -- The mean, and the median of the batches: on a machine shared with
    -- other work the mean carries the time others took from this process.
    local spent, batches = 0, {}
    for b = 1, N // 100 do
      local c0 = os.clock()
      for _ = 1, 100 do
        strategy(request, providers, proxy)
      end
      local dt = os.clock() - c0
      spent, batches[b] = spent + dt, dt
      aiorch.sleep(0)
    end
    table.sort(batches)
    local us = spent / (N // 100 * 100) * 1e6
    local median = batches[(#batches + 1) // 2] / 100 * 1e6
    worst = math.max(worst, median)
    print(fmt("  %-14s %6.2f us per decision (median of batches of 100; mean %.2f; last pick %s)", name, median, us,
      picked.id))
  end
  print(fmt("  worst median: %.2f us (budget 5 us)", worst))
end

run("no breaker has seen a failure")
-- A failure of one deployment: its breaker has seen one but stays closed
-- (while all are closed, a decision asks nothing of them).
breaker.record("openai/d1", cfg.policy, false, "server_error")
run("breakers in play")
-- One deployment's breaker open (it is passed over): from now on each
-- deployment's breaker is looked at in every decision.
for _ = 1, 100 do
  if breaker.health("openai/d1").state == "open" then
    break
  end
  breaker.record("openai/d1", cfg.policy, false, "server_error")
end
assert(breaker.health("openai/d1").state == "open")
run("one breaker open")
