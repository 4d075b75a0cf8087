-- Deployments and balancers end to end over real loopback sockets: each
-- deployment is a mock provider of its own (its own base URL and key), and
-- the distributions are counted where the requests arrive, at the mocks,
-- and printed.
local aiorch = require "aiorch"
local mock_mod = require "aiorch.mock"
local orchestrate = require "aiorch.orchestrate"
local breaker = require "aiorch.breaker"
local deployments = require "aiorch.deployments"
local cost = require "aiorch.cost"
local loader = require "aiorch.loader"
local config = require "aiorch.config"
local context = require "aiorch.context"
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

-- Runs n requests, `width` at a time, until fn returns false; returns
-- the responses.
local function load(n, width, fn)
  local out, next_i = {}, 1
  local tasks = {}
  for w = 1, width do
    tasks[w] = aiorch.spawn(function()
      while next_i <= n do
        local i = next_i
        next_i = next_i + 1
        out[i] = fn(i)
        if out[i] == false then
          break
        end
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
  it("lists those whose breaker is not cooling down, in their order", function()
    local env = env_of({ { name = "a" }, { name = "b" }, { name = "c" }, { name = "d" } },
      { OPENAI_POLICY = "breaker_failures=1,cooldown_ms=100" })
    local adapter = assert(loader.load("provider", "openai"))
    local cfg = config.provider("openai", adapter, env)
    local ctx = context.new { request = { user_question = QUESTION }, adapters = { openai = adapter },
      configs = { openai = cfg }, opts = { env = env } }
    local function ids(providers, exclude)
      local out = {}
      for i, d in ipairs(ctx.deployments(providers, exclude)) do
        out[i] = d.id:match("/(.*)")
      end
      return table.concat(out, " ")
    end
    assert.equal("a b c d", ids("openai"))
    breaker.record("openai/b", cfg.policy, false, "server_error")
    breaker.record("openai/d", cfg.policy, false, "server_error")
    assert.equal("a c", ids("openai"))
    assert.equal("a c a c", ids({ "openai", "openai" }))
    assert.equal("c", ids("openai", { ["openai/a"] = true }))
    aiorch.sleep(150) -- half open: the next call is the trial
    assert.equal("a b c d", ids("openai"))
    assert.is_true((breaker.allow("openai/d")))
    assert.equal("a b c", ids("openai")) -- d's trial is under way
    assert.equal("b c", ids("openai", { ["openai/a"] = true }))
    breaker.record("openai/d", cfg.policy, true, nil, nil, true)
    assert.equal("a b c d", ids("openai"))
  end)

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

  it("a script (aiorch run) takes them from a configuration file", function()
    local dir = support.tmpdir()
    support.write(dir .. "/gateway.lua", fmt([[return { providers = { openai = { balancer = "least_busy",
      deployments = { { name = "a", base_url = %q, api_key_env = "KEY_A" },
                      { name = "b", base_url = %q, api_key_env = "KEY_B" } } } } }
]], mocks[1]:base_url("openai"), mocks[2]:base_url("openai")))
    local gconfig = require "aiorch.gateway.config"
    local vars = { KEY_A = key_of("a"), KEY_B = key_of("b") }
    local cfg = assert(gconfig.load(dir .. "/gateway.lua", function(k) return vars[k] end))
    for _ = 1, 4 do
      local r = orchestrate.orchestrate({ user_question = QUESTION }, "fallback", { "openai" },
        { env = gconfig.env_for(cfg) })
      assert.equal("success", r.status)
    end
    assert.same({ 2, 2, 0, 0 }, (counts()))
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
      assert.is_true(r.metadata.cost_usd > 0) -- what anthropic's answer cost, through the nested balancer
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

describe("a deployment's tpm", function()
  it("counts the tokens its answers used; past it, it is passed over for a while", function()
    local env = env_of { { name = "a", tpm = 60 }, { name = "b" } }
    local used = 0
    while used < 60 do
      local r = ask("single", env, { providers = "openai/a" })
      assert.equal("success", r.status)
      used = used + r.metadata.usage.input_tokens + r.metadata.usage.output_tokens
    end
    local sent = #mocks[1].requests
    for _ = 1, 6 do
      assert.equal("b", ask("least_busy", env).metadata.deployment)
    end
    local r = ask("single", env, { providers = "openai/a" })
    assert.equal("rate_limited", r.metadata.error_kind)
    assert.matches("tpm", r.error_message)
    assert.equal(sent, #mocks[1].requests)
    print(fmt("  tpm 60: a took %d requests (%d tokens), then b took the next 6", sent, used))
  end)
end)

describe("the mock's rate-limit headers", function()
  it("are the real APIs' own: OpenAI's durations, Anthropic's RFC 3339 times; past the limit, a 429", function()
    local m = mocks[1]
    m:rate_limit { requests = 2, tokens = 5000, window_ms = 60000 }
    local body = '{"model":"gpt-4o-mini","max_tokens":100,"messages":[{"role":"user","content":"Hi"}]}'
    local s, h = aiorch.http.request { method = "POST", url = m:base_url("openai") .. "/chat/completions", body = body,
      headers = { ["content-type"] = "application/json", authorization = "Bearer k1" } }
    assert.equal(200, s)
    assert.equal("2", h["x-ratelimit-limit-requests"])
    assert.equal("1", h["x-ratelimit-remaining-requests"])
    assert.matches("^%d+m%d+s$", h["x-ratelimit-reset-requests"]) -- "1m0s", as OpenAI writes a minute
    assert.equal("5000", h["x-ratelimit-limit-tokens"])
    local left = tonumber(h["x-ratelimit-remaining-tokens"])
    assert.is_true(left < 5000 - 100)
    assert.is_true(deployments.duration_ms(h["x-ratelimit-reset-tokens"]) > 59000)
    assert.equal(60000, deployments.duration_ms("1m0s"))
    assert.equal(20, deployments.duration_ms("20ms"))
    local ab = '{"model":"claude-3-haiku-20240307","max_tokens":100,"messages":[{"role":"user","content":"Hi"}]}'
    s, h = aiorch.http.request { method = "POST", url = m:base_url("anthropic") .. "/v1/messages", body = ab,
      headers = { ["content-type"] = "application/json", ["x-api-key"] = "k2", ["anthropic-version"] = "2023-06-01" } }
    assert.equal(200, s)
    assert.equal("1", h["anthropic-ratelimit-requests-remaining"])
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ$", h["anthropic-ratelimit-requests-reset"])
    local in_ms = deployments.rfc3339_in_ms(h["anthropic-ratelimit-tokens-reset"])
    assert.is_true(in_ms > 55000 and in_ms <= 61000, tostring(in_ms))
    assert.truthy(h["anthropic-ratelimit-input-tokens-remaining"])
    -- k1's third request: a 429 with the headers and retry-after
    aiorch.http.request { method = "POST", url = m:base_url("openai") .. "/chat/completions", body = body,
      headers = { ["content-type"] = "application/json", authorization = "Bearer k1" } }
    local status, h3, b3 = aiorch.http.request { method = "POST", url = m:base_url("openai") .. "/chat/completions",
      body = body, headers = { ["content-type"] = "application/json", authorization = "Bearer k1" } }
    assert.equal(429, status)
    assert.equal("0", h3["x-ratelimit-remaining-requests"])
    assert.truthy(tonumber(h3["retry-after"]))
    assert.matches("rate_limit_exceeded", b3)
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

describe("least_latency", function()
  it("moves >= 90% of the traffic away from a deployment that becomes 10x slower, within 2 s", function()
    local env = env_of { { name = "a" }, { name = "b" }, { name = "c" }, { name = "d" } }
    for _, m in ipairs(mocks) do
      m:configure { latency_ms = 50 }
    end
    local sent = {} -- {at, deployment}
    local switch_at, stop_at
    local function run_until(t_end)
      load(1e9, 2, function() -- (2 at a time: on a loaded machine more make the fast ones' peaks high)
        if aiorch.now() >= t_end then
          return false
        end
        local t = aiorch.now()
        local r = ask("least_latency", env)
        if r.status == "success" then
          sent[#sent + 1] = { t, r.metadata.deployment }
        end
      end)
    end
    local function share(from, to)
      local n, d = 0, 0
      for _, e in ipairs(sent) do
        if e[1] >= from and e[1] < to then
          n = n + 1
          d = d + (e[2] == "d" and 1 or 0)
        end
      end
      return d, n
    end
    local t0 = aiorch.now()
    switch_at = t0 + support.stretch(1000)
    run_until(switch_at)
    mocks[4]:configure { latency_ms = 500 }
    switch_at = aiorch.now()
    stop_at = switch_at + 2000
    run_until(stop_at)
    for _, n in ipairs(NAMES) do
      local rec = deployments.get("openai/" .. n)
      print(fmt("  %s: ewma %.0f ms, error rate %.2f, %d calls", n, rec.ewma_ms, rec.error_rate, rec.calls))
    end
    local before_d, before_n = share(t0, switch_at)
    local after_d, after_n = share(switch_at, stop_at)
    local before, after = before_d / before_n, after_d / after_n
    print(fmt("  least_latency: d had %d of %d (%.1f%%) at 50 ms; at 500 ms, %d of %d (%.1f%%) in the next 2 s",
      before_d, before_n, 100 * before, after_d, after_n, 100 * after))
    for k = 0, 3 do
      local dd, nn = share(switch_at + k * 500, switch_at + (k + 1) * 500)
      print(fmt("    %4d..%4d ms after: d %d of %d", k * 500, (k + 1) * 500, dd, nn))
    end
    -- Within 2 s: past the calls sent before d's first slow answer came
    -- back (500 ms), d keeps at most a tenth of its share.
    local late_d, late_n = share(switch_at + 500, stop_at)
    print(fmt("  least_latency: from 500 ms to 2 s after, d had %d of %d (%.1f%%)", late_d, late_n,
      100 * late_d / late_n))
    assert.is_true(before > 0.15, "d's share before: " .. before)
    assert.is_true(late_d / late_n <= 0.1 * before, fmt("d kept %.1f%% of its share", 100 * late_d / late_n / before))
  end)
end)

describe("headroom", function()
  local function run(api, n)
    local list, env = {}, {}
    for i, s in ipairs { { "a", 100 }, { "b", 300 } } do
      mocks[i]:rate_limit { requests = s[2], tokens = 1000000 }
      list[i] = { name = s[1], base_url = mocks[i]:base_url(api), api_key_env = "KEY_" .. s[1]:upper() }
      env["KEY_" .. s[1]:upper()] = key_of(s[1])
    end
    env[api:upper() .. "_DEPLOYMENTS"] = list
    local limited = 0
    for _ = 1, n do
      local r = ask("headroom", env, { providers = api })
      assert.equal("success", r.status)
    end
    for i = 1, 2 do
      for _, q in ipairs(mocks[i].requests) do
        limited = limited + (q.rate_limited and 1 or 0)
      end
    end
    return limited
  end

  it("follows the mock's rate-limit headers (OpenAI's x-ratelimit-*)", function()
    local limited = run("openai", 300)
    local c, total = counts()
    show("headroom, a 100 rpm, b 300 rpm (OpenAI headers)", c, total)
    assert.equal(0, limited) -- no 429: a is left alone once its quota is lower than b's
    assert.is_true(c[1] >= 45 and c[1] <= 55, "a got " .. c[1]) -- both end with ~50 left
    local d = deployments.get("openai/b")
    assert.equal(300, d.requests_limit)
    assert.is_true(d.requests_remaining >= 45 and d.requests_remaining <= 55)
    assert.is_true(d.requests_reset_at > aiorch.now())
  end)

  it("follows the mock's rate-limit headers (Anthropic's anthropic-ratelimit-*)", function()
    local limited = run("anthropic", 300)
    local c, total = counts()
    show("headroom, a 100 rpm, b 300 rpm (Anthropic headers)", c, total)
    assert.equal(0, limited)
    assert.is_true(c[1] >= 45 and c[1] <= 55, "a got " .. c[1])
    local d = deployments.get("anthropic/a")
    assert.equal(100, d.requests_limit)
    assert.equal(1000000, d.tokens_limit)
    assert.is_true(d.tokens_remaining < 1000000)
  end)

  it("weighted, for contrast, runs a into its limit", function()
    for i, s in ipairs { { "a", 100 }, { "b", 300 } } do
      mocks[i]:rate_limit { requests = s[2] }
    end
    local env = env_of({ { name = "a" }, { name = "b" } }, { OPENAI_POLICY = "breaker_failures=0" })
    for _ = 1, 300 do
      ask("weighted", env)
    end
    local limited = 0
    for _, q in ipairs(mocks[1].requests) do
      limited = limited + (q.rate_limited and 1 or 0)
    end
    print(fmt("  weighted over the same: a answered 429 to %d requests", limited))
    assert.is_true(limited > 0)
  end)
end)

describe("sticky", function()
  local function conversation(k, turns)
    local msgs = { { role = "system", content = "You are helper number " .. k % 7 .. "." },
      { role = "user", content = fmt("Conversation %d: tell me about topic %d.", k, k * 7919 % 1000) } }
    for t = 2, turns do
      msgs[#msgs + 1] = { role = "assistant", content = "Answer " .. t }
      msgs[#msgs + 1] = { role = "user", content = "And then, turn " .. t .. "?" }
    end
    return { messages = msgs }
  end

  local function where(env, convs, turns)
    local home, moved_turns, total = {}, 0, 0
    for k = 1, convs do
      local count = {}
      for t = 1, turns do
        local r = ask("sticky", env, nil, conversation(k, t))
        assert.equal("success", r.status)
        local d = r.metadata.deployment
        count[d] = (count[d] or 0) + 1
        total = total + 1
      end
      local best, bn = nil, 0
      for d, n in pairs(count) do
        if n > bn then
          best, bn = d, n
        end
      end
      home[k] = best
      moved_turns = moved_turns + (turns - bn)
    end
    return home, 1 - moved_turns / total
  end

  it("keeps >= 99% of a conversation on one deployment; when one of 4 leaves, only its share moves", function()
    local four = { { name = "a" }, { name = "b" }, { name = "c" }, { name = "d" } }
    local home, kept = where(env_of(four), 100, 10)
    local per = {}
    for _, d in pairs(home) do
      per[d] = (per[d] or 0) + 1
    end
    print(fmt("  sticky: 100 conversations of 10 turns, %.2f%% of turns at home; a %d, b %d, c %d, d %d",
      100 * kept, per.a or 0, per.b or 0, per.c or 0, per.d or 0))
    assert.is_true(kept >= 0.99)
    for _, n in ipairs(NAMES) do
      assert.is_true((per[n] or 0) >= 10, "deployment " .. n .. " has " .. tostring(per[n]) .. " conversations")
    end

    -- b leaves the configuration
    local three = { { name = "a" }, { name = "c", mock = 3 }, { name = "d", mock = 4 } }
    local home3 = where(env_of(three), 100, 1)
    local moved, moved_b = 0, 0
    for k = 1, 100 do
      if home3[k] ~= home[k] then
        moved = moved + 1
        assert.equal("b", home[k], "conversation " .. k .. " moved from " .. home[k])
        moved_b = moved_b + 1
      end
    end
    print(fmt("  sticky: b removed: %d conversations moved, all %d of them b's (b had %d)", moved, moved_b,
      per.b or 0))
    assert.equal(per.b, moved)

    -- b cools down instead (its breaker opens at its first failure): the same
    deployments.reset()
    local env = env_of(four, { OPENAI_POLICY = "breaker_failures=1,cooldown_ms=60000" })
    mocks[2]:configure { fault = "500" }
    local home_cool = where(env, 100, 1)
    for k = 1, 100 do
      if home[k] ~= "b" then
        assert.equal(home[k], home_cool[k])
      else
        assert.equal(home3[k], home_cool[k]) -- its second choice, as when b was removed
      end
    end
  end)

  it("a sticky key (X-Aiorch-Sticky-Key, or the request's user) decides alone", function()
    local env = env_of { { name = "a" }, { name = "b" }, { name = "c" }, { name = "d" } }
    local seen = {}
    for k = 1, 20 do
      local r = ask("sticky", env, { sticky_key = "session-42" }, conversation(k, 1))
      seen[r.metadata.deployment] = true
    end
    local n = 0
    for _ in pairs(seen) do
      n = n + 1
    end
    assert.equal(1, n)
  end)
end)

describe("through aiorch serve", function()
  local gw

  after_each(function()
    if gw then
      gw.stop()
      gw = nil
    end
  end)

  local function start(config_body)
    gw = support.serve(config_body, { KEY_A = key_of("a"), KEY_B = key_of("b"), KEY_C = key_of("c"),
      OPENAI_API_KEY = false, ANTHROPIC_API_KEY = false })
    return gw
  end

  local function chat(headers, content)
    local status, _, body = support.post(gw.base .. "/v1/chat/completions", { model = "gpt-4o-mini",
      messages = { { role = "user", content = content or QUESTION } } }, headers)
    assert.equal(200, status, body)
  end

  it("a gateway configuration selects a balancer: weights 3:1 over two mock deployments", function()
    start(fmt([[return {
  providers = { openai = { balancer = "weighted", deployments = {
    { name = "a", base_url = %q, api_key_env = "KEY_A", weight = 3 },
    { name = "b", base_url = %q, api_key_env = "KEY_B", weight = 1 },
  } } },
}
]], mocks[1]:base_url("openai"), mocks[2]:base_url("openai")))
    for _, m in ipairs(mocks) do
      m:reset() -- the start-up's checks
    end
    for _ = 1, 400 do
      chat()
    end
    local c, total = counts()
    show("aiorch serve, weighted 3:1", c, total)
    assert.equal(300, c[1])
    assert.equal(100, c[2])
    assert.equal("Bearer " .. key_of("a"), mocks[1].requests[1].headers.authorization)
    assert.equal("Bearer " .. key_of("b"), mocks[2].requests[1].headers.authorization)
    -- a stream through the balancer, and a deployment that fails before its
    -- first token is passed over unseen
    mocks[1]:configure { fault = "500" }
    local before = #mocks[2].requests
    for _ = 1, 4 do
      local status, _, body = support.post(gw.base .. "/v1/chat/completions", { model = "gpt-4o-mini", stream = true,
        messages = { { role = "user", content = QUESTION } } })
      assert.equal(200, status, body)
      assert.matches('"finish_reason":"stop"', body)
      assert.matches("data: %[DONE%]\n\n$", body)
    end
    assert.equal(before + 4, #mocks[2].requests) -- b answered every stream
    local text = support.slurp(gw.err)
    assert.falsy(text:find(key_of("a"), 1, true), "a key in the log")
    assert.falsy(text:find(key_of("b"), 1, true), "a key in the log")
  end)

  it("2 workers share a deployment's rpm and breaker", function()
    gw = support.serve(fmt([[return {
  providers = { openai = { policy = { breaker_failures = 2, cooldown_ms = 60000 }, deployments = {
    { name = "a", base_url = %q, api_key_env = "KEY_A", rpm = 10 },
    { name = "b", base_url = %q, api_key_env = "KEY_B" },
    { name = "c", base_url = %q, api_key_env = "KEY_C" },
  } } },
}
]], mocks[1]:base_url("openai"), mocks[2]:base_url("openai", { fault = "500" }), mocks[3]:base_url("openai")),
      { KEY_A = key_of("a"), KEY_B = key_of("b"), KEY_C = key_of("c"), OPENAI_API_KEY = false,
        ANTHROPIC_API_KEY = false }, { workers = 2 })
    for _, m in ipairs(mocks) do
      m:reset()
    end
    load(60, 4, function()
      chat()
    end)
    local c, total = counts()
    show("aiorch serve --workers 2: a at 10 rpm, b failing (breaker after 2), c", c, total)
    assert.equal(10, c[1]) -- a's rpm holds for the server, not per worker
    assert.is_true(c[2] >= 2 and c[2] <= 4, "b got " .. c[2]) -- its breaker opened for both workers
    assert.equal(60 - 10, c[3])
  end)

  it("default_strategy sticky: X-Aiorch-Sticky-Key keeps a session on one deployment", function()
    start(fmt([[return {
  default_strategy = "sticky",
  providers = { openai = { deployments = {
    { name = "a", base_url = %q, api_key_env = "KEY_A" },
    { name = "b", base_url = %q, api_key_env = "KEY_B" },
    { name = "c", base_url = %q, api_key_env = "KEY_C" },
  } } },
}
]], mocks[1]:base_url("openai"), mocks[2]:base_url("openai"), mocks[3]:base_url("openai")))
    local homes = {}
    for s = 1, 30 do
      for _, m in ipairs(mocks) do
        m:reset()
      end
      for turn = 1, 5 do
        chat({ ["x-aiorch-sticky-key"] = "session-" .. s }, "turn " .. turn)
      end
      local c = counts()
      local home
      for i = 1, 3 do
        if c[i] == 5 then
          home = i
        end
      end
      assert.truthy(home, "session " .. s .. " was split")
      homes[home] = (homes[home] or 0) + 1
    end
    print(fmt("  aiorch serve, sticky: 30 sessions of 5 turns, each whole on one deployment: a %d, b %d, c %d",
      homes[1] or 0, homes[2] or 0, homes[3] or 0))
    assert.is_true((homes[1] or 0) > 0 and (homes[2] or 0) > 0 and (homes[3] or 0) > 0)
  end)
end)

describe("parallel variants", function()
  -- a, b and c say "Paris" (c after 3 s), d says "Lyon" after 100 ms
  local function env4()
    return env_of { { name = "a", directives = { text = "Paris", latency_ms = 30 } },
      { name = "b", directives = { text = "paris ", latency_ms = 60 } },
      { name = "c", directives = { text = "Paris", latency_ms = 3000 } },
      { name = "d", directives = { text = "Lyon", latency_ms = 100 } } }
  end
  local IDS = { "openai/a", "openai/b", "openai/c", "openai/d" }

  local function aborted(i)
    local q = mocks[i].requests[1]
    return q and q.aborted_at ~= nil
  end

  it("quorum: the answer 2 of 4 give, the rest cancelled at once", function()
    local t0 = aiorch.now()
    local r = ask("quorum", env4(), { providers = IDS, policy = { parallel_k = 2 } })
    local ms = aiorch.now() - t0
    print(fmt("  quorum k=2: %q from %s in %.0f ms", r.response_text, table.concat(r.metadata.quorum.agreeing, ", "),
      ms))
    assert.equal("success", r.status)
    assert.same({ "openai/a", "openai/b" }, r.metadata.quorum.agreeing)
    assert.is_true(ms < support.stretch(1000))
    aiorch.sleep(50)
    assert.is_true(aborted(3)) -- the slow one's transfer was aborted
  end)

  it("quorum: stops as soon as no answer can reach k", function()
    local env = env_of { { name = "a", directives = { text = "Paris", latency_ms = 30 } },
      { name = "b", directives = { text = "Lyon", latency_ms = 30 } },
      { name = "c", directives = { text = "Rome", latency_ms = 3000 } } }
    local t0 = aiorch.now()
    local r = ask("quorum", env, { providers = { "openai/a", "openai/b", "openai/c" }, policy = { parallel_k = 3 } })
    assert.equal("error", r.status)
    assert.equal("no_quorum", r.metadata.error_kind)
    assert.matches("no 3 of 3 answers agreed", r.error_message)
    assert.is_true(aiorch.now() - t0 < support.stretch(1000))
  end)

  it("first_k: the first 2 successes, the rest cancelled", function()
    local t0 = aiorch.now()
    local rs = ask("first_k", env4(), { providers = IDS, policy = { parallel_k = 2 } })
    local ms = aiorch.now() - t0
    assert.equal(2, #rs)
    assert.equal("a", rs[1].metadata.deployment)
    assert.equal("b", rs[2].metadata.deployment)
    print(fmt("  first_k k=2: %s, %s in %.0f ms", rs[1].metadata.deployment, rs[2].metadata.deployment, ms))
    assert.is_true(ms < support.stretch(1000))
    aiorch.sleep(50)
    assert.is_true(aborted(3) and aborted(4))
  end)

  it("arrived_by: what has arrived by 500 ms, the rest cancelled", function()
    local t0 = aiorch.now()
    local rs = ask("arrived_by", env4(), { providers = IDS, policy = { arrived_by_ms = 500 } })
    local ms = aiorch.now() - t0
    local got = {}
    for i, r in ipairs(rs) do
      assert.equal("success", r.status)
      got[i] = r.metadata.deployment
    end
    print(fmt("  arrived_by 500 ms: %s in %.0f ms (cancelled: %s)", table.concat(got, ", "), ms,
      table.concat(rs[1].metadata.cancelled, ", ")))
    assert.same({ "a", "b", "d" }, got)
    assert.same({ "openai/c" }, rs[1].metadata.cancelled)
    assert.is_true(ms >= 490 and ms < support.stretch(1500))
    aiorch.sleep(50)
    assert.is_true(aborted(3))
  end)

  it("compose over balanced groups: quorum over two providers, each balancing its deployments", function()
    local env = env_of { { name = "a" }, { name = "b" } }
    env.ANTHROPIC_DEPLOYMENTS = { { name = "c", base_url = mocks[3]:base_url("anthropic", { text = "Paris" }),
      api_key_env = "KEY_C" }, { name = "d", base_url = mocks[4]:base_url("anthropic", { text = "Paris" }),
      api_key_env = "KEY_D" } }
    env.KEY_C, env.KEY_D = key_of("c"), key_of("d")
    mocks[1]:configure { text = "Paris" }
    mocks[2]:configure { text = "Paris" }
    for _ = 1, 4 do
      local r = ask("quorum", env, { providers = { "openai", "anthropic" } })
      assert.equal("success", r.status)
      assert.equal(2, #r.metadata.quorum.agreeing)
    end
    assert.same({ 2, 2, 2, 2 }, (counts()))
  end)
end)

describe("cheapest", function()
  it("picks the cheapest healthy deployment by the price table; unknown prices last", function()
    local env = env_of({ { name = "a" }, { name = "b" }, { name = "c" } }, { OPENAI_POLICY = "breaker_failures=1" })
    env.OPENAI_DEPLOYMENTS[1].model = "gpt-4o" -- 2.50 / 10.00
    env.OPENAI_DEPLOYMENTS[2].model = "gpt-4o-mini" -- 0.15 / 0.60
    env.OPENAI_DEPLOYMENTS[3].model = "no-such-model-has-a-price"
    for _ = 1, 5 do
      local r = ask("cheapest", env)
      assert.equal("success", r.status)
      assert.equal("b", r.metadata.deployment)
      assert.equal("gpt-4o-mini", mocks[2].requests[#mocks[2].requests].json.model)
    end
    mocks[2]:configure { fault = "500" } -- b fails once and cools down: a is next
    local r = ask("cheapest", env)
    assert.equal("a", r.metadata.deployment)
    assert.equal(2, #r.metadata.attempts)
    mocks[1]:configure { fault = "500" }
    r = ask("cheapest", env)
    assert.equal("c", r.metadata.deployment) -- no price: last
    local c = counts()
    show("cheapest: a gpt-4o, b gpt-4o-mini, c unpriced", c, c[1] + c[2] + c[3])
  end)

  it("models whose prices do not order them: the request's tokens decide", function()
    -- cheap_in is cheaper per input token, cheap_out per output token; dear is dearer than both
    cost.configure(assert(cost.check { cheap_in = { input = 1, output = 100 }, cheap_out = { input = 100, output = 1 },
      dear = { input = 200, output = 200 } }))
    local ok, err = pcall(function()
      local env = env_of { { name = "a" }, { name = "b" }, { name = "c" } }
      env.OPENAI_DEPLOYMENTS[1].model = "dear"
      env.OPENAI_DEPLOYMENTS[2].model = "cheap_in"
      env.OPENAI_DEPLOYMENTS[3].model = "cheap_out"
      -- a long question, one token out: cheap_in; a short one, many tokens out: cheap_out
      local long = { messages = { { role = "user", content = string.rep("word ", 800) } }, max_tokens = 1 }
      local short = { messages = { { role = "user", content = "Hi" } }, max_tokens = 1000 }
      for _, case in ipairs({ { long, "b" }, { long, "b" }, { long, "b" }, { short, "c" }, { short, "c" },
        { short, "c" }, { long, "b" } }) do -- (each time: the count of picks does not decide)
        local r = ask("cheapest", env, nil, case[1])
        assert.equal("success", r.status)
        assert.equal(case[2], r.metadata.deployment)
      end
    end)
    cost.configure(nil)
    assert(ok, err)
  end)

  it("over plain providers: the cheapest able to serve the request", function()
    local function env(openai_model)
      return { OPENAI_API_KEY = "sk-balance-plain-1", ANTHROPIC_API_KEY = "sk-ant-balance-plain-2",
        OPENAI_BASE_URL = mocks[1]:base_url("openai"), ANTHROPIC_BASE_URL = mocks[2]:base_url("anthropic"),
        OPENAI_MODEL = openai_model, ANTHROPIC_MODEL = "claude-3-haiku-20240307" }
    end
    local both = { providers = { "anthropic", "openai" } }
    local r = ask("cheapest", env("gpt-4o-mini"), both)
    assert.equal("openai", r.ia_provider_name) -- 0.15/0.60 under haiku's 0.25/1.25
    r = ask("cheapest", env("gpt-4o"), { providers = { "openai", "anthropic" } })
    assert.equal("anthropic", r.ia_provider_name) -- under gpt-4o's 2.50/10.00
    -- top_k: openai cannot take it, so the cheaper one is not able to serve it
    r = ask("cheapest", env("gpt-4o-mini"), both, { messages = { { role = "user", content = "Hi" } }, top_k = 5 })
    assert.equal("anthropic", r.ia_provider_name)
    assert.equal("skipped", r.metadata.attempts[1].status)
    assert.equal("openai", r.metadata.attempts[1].provider)
  end)
end)

describe("ctx.strategy", function()
  it("composes strategies in plain Lua: a user strategy balances openai, then anthropic's deployments", function()
    local dir = support.tmpdir()
    os.execute("mkdir -p '" .. dir .. "/strategies'")
    support.write(dir .. "/strategies/two_groups.lua", [[
return function(request, providers, ctx)
  local r = ctx.strategy("least_busy", request, { "openai" })
  if r.status == "success" then
    return r
  end
  -- the same conversation, asked shorter, of the other group
  local shorter = {}
  for k, v in pairs(request) do shorter[k] = v end
  shorter.max_tokens = 50
  local r2 = ctx.strategy("weighted", shorter, { "anthropic" })
  r2.metadata.first_group = r.error_message
  return r2
end
]])
    local env = env_of { { name = "a" }, { name = "b" } }
    env.ANTHROPIC_DEPLOYMENTS = { { name = "c", base_url = mocks[3]:base_url("anthropic"), api_key_env = "KEY_C" } }
    env.KEY_C = key_of("c")
    for _ = 1, 4 do
      assert.equal("openai", ask("two_groups", env, { path = { dir } }).ia_provider_name)
    end
    assert.same({ 2, 2, 0, 0 }, (counts()))
    mocks[1]:configure { fault = "500" }
    mocks[2]:configure { fault = "500" }
    local r = ask("two_groups", env, { path = { dir } })
    assert.equal("success", r.status)
    assert.equal("anthropic", r.ia_provider_name)
    assert.equal("c", r.metadata.deployment)
    assert.matches("server_error", r.metadata.first_group)
    assert.equal(50, mocks[3].requests[1].json.max_tokens)
    -- a strategy that is not there raises: the strategy's own failure
    support.write(dir .. "/strategies/bad.lua", [[
return function(request, _, ctx) return ctx.strategy("no_such_strategy", request, { "openai" }) end
]])
    r = ask("bad", env, { path = { dir } })
    assert.equal("strategy", r.metadata.error_kind)
    assert.matches("no_such_strategy", r.error_message)
  end)
end)
