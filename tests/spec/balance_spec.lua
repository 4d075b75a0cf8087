-- Deployments and balancers end to end over real loopback sockets: each
-- deployment is a mock provider of its own (its own base URL and key), and
-- the distributions are counted where the requests arrive, at the mocks,
-- and printed.
local aiorch = require "aiorch"
local mock_mod = require "aiorch.mock"
local orchestrate = require "aiorch.orchestrate"
local breaker = require "aiorch.breaker"
local deployments = require "aiorch.deployments"
local support = require "tests.support"

local fmt = string.format
local QUESTION = "Which deployment answers?"

local mocks = {}
local NAMES = { "a", "b", "c", "d" }

local function key_of(name)
  return "sk-balance-test-key-" .. name .. "-0001"
end

-- The env of an openai provider whose deployments are the given mocks:
-- spec = {{name, weight, rpm, tpm, directives}, ...}.
local function env_of(spec, extra)
  local list, env = {}, {}
  for i, s in ipairs(spec) do
    local m = mocks[s.mock or i]
    list[i] = { name = s.name, base_url = m:base_url("openai", s.directives), api_key_env = "KEY_" .. s.name:upper(),
      weight = s.weight, rpm = s.rpm, tpm = s.tpm }
    env["KEY_" .. s.name:upper()] = key_of(s.name)
  end
  env.OPENAI_DEPLOYMENTS = list
  for k, v in pairs(extra or {}) do
    env[k] = v
  end
  return env
end

local function ask(strategy, env, opts, req)
  opts = opts or {}
  opts.env = env
  return orchestrate.orchestrate(req or { user_question = QUESTION }, strategy, opts.providers or "openai", opts)
end

local function reset_all()
  for _, m in ipairs(mocks) do
    m:reset()
    m:configure(nil)
    m:rate_limit(nil)
  end
  breaker.reset()
  deployments.reset()
end

-- Requests each mock received (index -> n) and their total.
local function counts()
  local out, total = {}, 0
  for i, m in ipairs(mocks) do
    out[i] = #m.requests
    total = total + out[i]
  end
  return out, total
end

local function show(title, c, total)
  local parts = {}
  for i, n in ipairs(c) do
    if n > 0 or i <= 2 then
      parts[#parts + 1] = fmt("%s=%d (%.1f%%)", NAMES[i], n, total > 0 and 100 * n / total or 0)
    end
  end
  print(fmt("  %s: %s of %d", title, table.concat(parts, ", "), total))
end

-- Runs n requests, `width` at a time; returns the responses.
local function load(n, width, fn)
  local out, next_i = {}, 1
  local tasks = {}
  for w = 1, width do
    tasks[w] = aiorch.spawn(function()
      while next_i <= n do
        local i = next_i
        next_i = next_i + 1
        out[i] = fn(i)
      end
    end)
  end
  aiorch.gather(tasks)
  return out
end

setup(function()
  for i = 1, 4 do
    mocks[i] = assert(mock_mod.start { host = "127.0.0.1", port = 0 })
  end
end)

teardown(function()
  for _, m in ipairs(mocks) do
    m:close()
  end
end)

before_each(reset_all)

describe("deployments", function()
  it("each has its own base URL and key; the answer says which one served it", function()
    local env = env_of { { name = "a" }, { name = "b" } }
    for _ = 1, 4 do
      local r = ask("weighted", env)
      assert.equal("success", r.status)
      assert.equal("openai", r.ia_provider_name)
    end
    assert.equal(2, #mocks[1].requests)
    assert.equal(2, #mocks[2].requests)
    assert.equal("Bearer " .. key_of("a"), mocks[1].requests[1].headers.authorization)
    assert.equal("Bearer " .. key_of("b"), mocks[2].requests[1].headers.authorization)
    local r = ask("weighted", env)
    assert.equal("a", r.metadata.deployment)
  end)

  it("a deployment is called by its id, provider/name; an unknown one is refused by name", function()
    local env = env_of { { name = "a" }, { name = "b" } }
    local r = ask("single", env, { providers = "openai/b" })
    assert.equal("success", r.status)
    assert.equal("b", r.metadata.deployment)
    assert.equal(1, #mocks[2].requests)
    assert.equal(0, #mocks[1].requests)
  end)

  it("a provider with deployments called by name is balanced by its balancer (fallback over balanced groups)",
    function()
      local env = env_of { { name = "a", weight = 1 }, { name = "b", weight = 1 } }
      env.ANTHROPIC_API_KEY = "sk-ant-balance-0002"
      env.ANTHROPIC_BASE_URL = mocks[3]:base_url("anthropic")
      for _ = 1, 10 do
        assert.equal("success", ask("fallback", env, { providers = { "openai", "anthropic" } }).status)
      end
      local c = counts()
      show("fallback over openai (a, b: weighted) and anthropic (c)", c, 10)
      assert.same({ 5, 5, 0, 0 }, c)
      -- both of openai's deployments fail: anthropic answers
      mocks[1]:configure { fault = "500" }
      mocks[2]:configure { fault = "500" }
      local r = ask("fallback", env, { providers = { "openai", "anthropic" } })
      assert.equal("success", r.status)
      assert.equal("anthropic", r.ia_provider_name)
      assert.equal(3, #r.metadata.attempts) -- a, b, then anthropic
    end)

  it("the gateway configuration is checked: literal keys, bad weights, unknown balancers are refused", function()
    local gconfig = require "aiorch.gateway.config"
    local function check(p)
      return gconfig.check({ providers = { openai = p } }, function() return nil end)
    end
    local _, err = check { deployments = { { name = "a", api_key = "sk-literal" } } }
    assert.matches("literal keys are refused", err)
    _, err = check { deployments = { { name = "a", weight = -1 } } }
    assert.matches("weight", err)
    _, err = check { deployments = { { name = "a" } }, balancer = "nope" }
    assert.matches("balancer", err)
    _, err = check { deployments = { { name = "a" }, { name = "a" } } }
    assert.matches("listed twice", err)
    assert.truthy(check { deployments = { { name = "a", weight = 3, rpm = 100, tpm = 10000 } },
      balancer = "least_busy" })
  end)

  it("a deployment past its own rpm is passed over, and answers rate_limited when called", function()
    local env = env_of { { name = "a", rpm = 3 }, { name = "b" } }
    for _ = 1, 8 do
      assert.equal("success", ask("least_busy", env).status)
    end
    local c = counts()
    show("least_busy, a with rpm 3", c, 8)
    assert.equal(3, c[1])
    assert.equal(5, c[2])
    local r = ask("single", env, { providers = "openai/a" })
    assert.equal("rate_limited", r.metadata.error_kind)
    assert.equal(3, #mocks[1].requests)
  end)
end)

describe("weighted", function()
  it("weights 3:1 give 75 +- 3% over 4,000 requests", function()
    local env = env_of { { name = "a", weight = 3 }, { name = "b", weight = 1 } }
    for _, m in ipairs(mocks) do
      m.record = false
    end
    local seen = { 0, 0 }
    local ok = 0
    load(4000, 8, function()
      local r = ask("weighted", env)
      if r.status == "success" then
        ok = ok + 1
        local i = r.metadata.deployment == "a" and 1 or 2
        seen[i] = seen[i] + 1
      end
    end)
    for _, m in ipairs(mocks) do
      m.record = true
    end
    show("weighted 3:1", seen, 4000)
    assert.equal(4000, ok)
    local share = seen[1] / 4000
    assert.is_true(share >= 0.72 and share <= 0.78, fmt("share of a: %.3f", share))
  end)

  it("skips a deployment that is cooling down, and goes back to it after", function()
    local env = env_of({ { name = "a" }, { name = "b" } }, { OPENAI_POLICY = "breaker_failures=2,cooldown_ms=300" })
    mocks[1]:configure { fault = "500" }
    for _ = 1, 20 do
      assert.equal("success", ask("weighted", env).status)
    end
    local c = counts()
    show("weighted, a failing (breaker after 2)", c, c[1] + c[2])
    assert.equal(2, c[1]) -- two failures opened a's breaker; b answered all 20
    assert.equal(20, c[2])
    assert.is_false(breaker.health("openai/a").healthy)
    assert.is_true(breaker.health("openai").healthy)
    mocks[1]:configure(nil)
    aiorch.sleep(350)
    for _ = 1, 4 do
      assert.equal("success", ask("weighted", env).status)
    end
    assert.is_true(#mocks[1].requests >= 3) -- its trial, then its share again
  end)
end)

describe("least_busy", function()
  it("routes around a stuck deployment", function()
    local env = env_of { { name = "a", directives = { fault = "hang" } },
      { name = "b", directives = { latency_ms = 5 } }, { name = "c", directives = { latency_ms = 5 } } }
    local t0 = aiorch.now()
    local rs = load(200, 4, function()
      return ask("least_busy", env, { timeout_ms = support.stretch(3000) })
    end)
    local ok = 0
    for _, r in ipairs(rs) do
      ok = ok + (r.status == "success" and 1 or 0)
    end
    local c, total = counts()
    show(fmt("least_busy, a stuck (%.0f ms)", aiorch.now() - t0), c, total)
    assert.equal(200, ok) -- the stuck calls timed out and went on to another deployment
    assert.is_true(c[1] <= 4, "the stuck deployment got " .. c[1])
    assert.is_true(c[2] >= 90 and c[3] >= 90)
  end)
end)
