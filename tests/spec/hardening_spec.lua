-- The gateway as a hostile client or a careless operator would try it:
-- every way a request ends is accounted for once, a whole request has a
-- deadline, clients cannot trip the shared breakers or choose any file as
-- a strategy, and every policy value is checked, from a header or a config.
local aiorch = require "aiorch"
local cjson = require "cjson.safe"
local gconfig = require "aiorch.gateway.config"
local policy = require "aiorch.policy"
local support = require "tests.support"

local stretch = support.stretch
local post, get = support.post, support.get
local KEY = "sk-hardening-openai-5150"
local ANT_KEY = "sk-ant-hardening-6160"
local QUESTION = "Is every request accounted for?"

local m

local function chat(extra)
  local body = { model = "gpt-4o-mini", messages = { { role = "user", content = QUESTION } } }
  return support.merge(body, extra)
end

local function env(extra)
  local e = { OPENAI_API_KEY = KEY, OPENAI_BASE_URL = m:base_url("openai"), ANTHROPIC_API_KEY = ANT_KEY,
    ANTHROPIC_BASE_URL = m:base_url("anthropic"), AIORCH_INSTRUCTION_BUDGET = "2000000" }
  return support.merge(e, extra)
end

-- A --path directory with these strategies (name -> source).
local function strategies(list)
  local dir = support.tmpdir()
  assert(os.execute("mkdir -p '" .. dir .. "/strategies'"))
  for name, text in pairs(list) do
    support.write(dir .. "/strategies/" .. name .. ".lua", text)
  end
  return dir
end

local SPIN = "return function() local n = 0 while true do n = n + 1 end end\n"
local SLEEPER = "return function(_, _, ctx) while true do ctx.sleep(50) end end\n"
local WAITER = [[
return function(_, _, ctx)
  local never = ctx.spawn(function() while true do ctx.sleep(1000) end end)
  return ctx.await(never)
end
]]
local RAISES = "return function() error('strategy bug') end\n"

support.use_mock(function(mock) m = mock end)

describe("every way a request ends is accounted for once", function()
  it("five runaway strategies under max_inflight = 2 leave nothing in flight", function()
    local dir = strategies { spin = SPIN }
    local gw = support.serve('return { max_inflight = 2, strategies = { "spin", "fallback" } }', env(),
      { path = dir })
    for _ = 1, 5 do
      local s, _, body, doc = post(gw.base .. "/v1/chat/completions", chat(), { ["x-aiorch-strategy"] = "spin" })
      assert.equal(500, s, body)
      assert.matches("instruction budget exceeded", doc.error.message, 1, true) -- the caller's shape
    end
    local s, _, body, doc = post(gw.base .. "/v1/chat/completions", chat())
    assert.equal(200, s, body)
    assert.equal("chat.completion", doc.object)
    local _, _, metrics = get(gw.base .. "/metrics")
    assert.equal(0, support.metric(metrics, "aiorch_gateway_in_flight"))
    local lines = support.access_lines(gw)
    assert.equal(7, #lines, table.concat(lines, "\n")) -- 5 runaways, 1 answer, 1 scrape
    local n500 = 0
    for _, l in ipairs(lines) do
      n500 = n500 + (l:find(" status=500 ", 1, true) and 1 or 0)
    end
    assert.equal(5, n500)
  end)

  it("success, upstream error, a raise, a timeout, a client gone and refusals: one line each, nothing left", function()
    local dir = strategies { raises = RAISES, sleeper = SLEEPER }
    local gw = support.serve([[return { max_inflight = 1, max_body = 1000, request_timeout_ms = 300,
      strategies = { "raises", "sleeper", "fallback", "single" } }]],
      env { ANTHROPIC_BASE_URL = m:base_url("anthropic", { fault = "500" }) }, { path = dir })
    local url = gw.base .. "/v1/chat/completions"
    assert.equal(200, (post(url, chat())))
    local s = post(url, chat(), { ["x-aiorch-providers"] = "anthropic" })
    assert.equal(502, s)
    s = post(gw.base .. "/v1/orchestrate", { user_question = QUESTION, strategy = "raises" })
    assert.equal(502, s)
    s = post(url, chat(), { ["x-aiorch-strategy"] = "sleeper" })
    assert.equal(504, s)
    -- a client that goes away mid-request
    local st = aiorch.http.request { method = "POST", url = url, body = cjson.encode(chat()), timeout_ms = 100,
      headers = { ["content-type"] = "application/json", ["x-aiorch-strategy"] = "sleeper" } }
    assert.is_nil(st)
    aiorch.sleep(stretch(300))
    s = post(url, string.rep("x", 2000)) -- 413, refused before the handler
    assert.equal(413, s)
    s = post(url, chat())
    assert.equal(200, s) -- max_inflight = 1: nothing was left counted
    local _, _, metrics = get(gw.base .. "/metrics")
    assert.equal(0, support.metric(metrics, "aiorch_gateway_in_flight"))
    local lines = support.access_lines(gw)
    assert.equal(8, #lines, table.concat(lines, "\n"))
    local text = table.concat(lines, "\n")
    assert.matches("status=504 .*timed_out=true", text)
    assert.matches("status=499 .*client_gone=true", text)
    assert.matches("status=413", text)
  end)
end)

describe("the access log", function()
  it("keeps flushing after the request whose task started the flush went away", function()
    -- log_bodies: the request's own body line starts the flush task, as a
    -- child of that request's task; its client then goes away.
    local dir = strategies { sleeper = SLEEPER }
    local gw = support.serve('return { log_bodies = true, strategies = { "sleeper", "fallback" } }', env(),
      { path = dir })
    aiorch.sleep(200) -- the start-up's health checks are flushed
    local st = aiorch.http.request { method = "POST", url = gw.base .. "/v1/chat/completions",
      body = cjson.encode(chat()), timeout_ms = 20,
      headers = { ["content-type"] = "application/json", ["x-aiorch-strategy"] = "sleeper" } }
    assert.is_nil(st)
    aiorch.sleep(stretch(100))
    assert.equal(200, (post(gw.base .. "/v1/chat/completions", chat())))
    aiorch.sleep(stretch(150)) -- a flush is at most 50 ms late
    local lines = {}
    for line in support.slurp(gw.err):gmatch("[^\n]+") do
      if line:find("^aiorch: access ") and line:find("status=200", 1, true) and line:find("/v1/chat", 1, true) then
        lines[#lines + 1] = line
      end
    end
    assert.equal(1, #lines, support.slurp(gw.err))
  end)
end)

describe("a whole request has a deadline", function()
  it("a strategy that sleeps forever or awaits a task that never ends gets 504 at request_timeout_ms", function()
    local dir = strategies { sleeper = SLEEPER, waiter = WAITER }
    local gw = support.serve('return { request_timeout_ms = 300, strategies = { "sleeper", "waiter" } }', env(),
      { path = dir })
    for _, name in ipairs { "sleeper", "waiter" } do
      local t0 = aiorch.now()
      local s, _, body, doc = post(gw.base .. "/v1/chat/completions", chat(), { ["x-aiorch-strategy"] = name })
      local took = aiorch.now() - t0
      assert.equal(504, s, body)
      assert.equal("timeout", doc.error.type)
      assert.is_true(took >= 290 and took < stretch(1500), took)
      -- the native endpoint answers a StandardAIResponse with status "timeout"
      s, _, body, doc = post(gw.base .. "/v1/orchestrate", { user_question = QUESTION, strategy = name })
      assert.equal(504, s, body)
      assert.equal("timeout", doc.status)
      assert.equal(cjson.null, doc.ia_provider_name)
      assert.equal("timeout", doc.metadata.error_kind)
    end
  end)

  it("a client may only shorten it", function()
    local dir = strategies { sleeper = SLEEPER }
    local gw = support.serve('return { request_timeout_ms = 600, strategies = { "sleeper" } }', env(),
      { path = dir })
    local url = gw.base .. "/v1/chat/completions"
    local t0 = aiorch.now()
    assert.equal(504, (post(url, chat(), { ["x-aiorch-strategy"] = "sleeper",
      ["x-aiorch-request-timeout-ms"] = "150" })))
    local took = aiorch.now() - t0
    assert.is_true(took >= 140 and took < 550, took)
    t0 = aiorch.now()
    assert.equal(504, (post(url, chat(), { ["x-aiorch-strategy"] = "sleeper",
      ["x-aiorch-request-timeout-ms"] = "100000" })))
    took = aiorch.now() - t0
    assert.is_true(took >= 590 and took < stretch(2000), took)
    -- the official SDKs announce their own timeout, in seconds
    t0 = aiorch.now()
    assert.equal(504, (post(url, chat(), { ["x-aiorch-strategy"] = "sleeper", ["x-stainless-timeout"] = "0.2" })))
    took = aiorch.now() - t0
    assert.is_true(took >= 190 and took < 550, took)
  end)

  it("cancels the strategy's upstream transfers, and ends a started stream with an error event", function()
    local gw = support.serve('return { request_timeout_ms = 500, default_strategy = "fallback" }',
      env { OPENAI_BASE_URL = m:base_url("openai", { chunks = 10, stall_after = 2 }) })
    local t0 = aiorch.now()
    local s, h, body = post(gw.base .. "/v1/chat/completions", chat { stream = true },
      { ["x-aiorch-providers"] = "openai" })
    assert.equal(200, s)
    assert.matches("^text/event%-stream", h["content-type"])
    assert.is_true(aiorch.now() - t0 < stretch(2000))
    assert.matches('"error":{', body, 1, true)
    assert.matches("request_timeout_ms", body, 1, true)
    assert.falsy(body:find("[DONE]", 1, true))
    aiorch.sleep(stretch(100))
    local req = m.requests[#m.requests]
    assert.is_number(req.aborted_at) -- the upstream connection was closed
  end)
end)

describe("clients cannot trip the shared breakers", function()
  it("policy overrides are refused unless the configuration allows them", function()
    local gw = support.serve("return {}", env())
    local s, _, _, doc = post(gw.base .. "/v1/chat/completions", chat(), { ["x-aiorch-policy"] = "timeout_ms=1" })
    assert.equal(400, s)
    assert.matches("clients may not override the policy", doc.error.message, 1, true)
    s, _, _, doc = post(gw.base .. "/v1/orchestrate", { user_question = QUESTION, policy = { max_attempts = 2 } })
    assert.equal(400, s)
    assert.matches("policy: clients may not override the policy", doc.error.message, 1, true)
  end)

  it("50 requests with timeout_ms=1 do not open the breaker for the others", function()
    local gw = support.serve('return { client_policy = { timeout_ms = { 1, 60000 } } }',
      env { OPENAI_BASE_URL = m:base_url("openai", { latency_ms = 30 }), ANTHROPIC_API_KEY = false })
    local url = gw.base .. "/v1/chat/completions"
    for _ = 1, 50 do
      local s = post(url, chat(), { ["x-aiorch-policy"] = "timeout_ms=1" })
      assert.equal(504, s)
    end
    local s, _, body = post(url, chat())
    assert.equal(200, s, body)
    local _, _, hb = get(gw.base .. "/healthz")
    assert.matches('"healthy":true', hb, 1, true)
  end)

  it("each field is clamped to the configured bounds, and fields not listed are refused by name", function()
    local gw = support.serve('return { client_policy = { timeout_ms = { 2000, 5000 }, max_attempts = { 1, 2 } } }',
      env { OPENAI_BASE_URL = m:base_url("openai", { latency_ms = 30 }),
            ANTHROPIC_BASE_URL = m:base_url("anthropic", { fault = "500" }) })
    local url = gw.base .. "/v1/chat/completions"
    local s = post(url, chat(), { ["x-aiorch-policy"] = "timeout_ms=1" }) -- clamped up to 2000
    assert.equal(200, s)
    local s2, _, _, doc = post(url, chat(), { ["x-aiorch-policy"] = "gap_timeout_ms=5" })
    assert.equal(400, s2)
    assert.matches("X-Aiorch-Policy.gap_timeout_ms: clients may not set this field here (allowed: max_attempts, "
      .. "timeout_ms)", doc.error.message, 1, true)
    -- max_attempts = 9 is clamped to 2
    local s3, _, _, doc3 = post(gw.base .. "/v1/orchestrate", { user_question = QUESTION, strategy = "single",
      providers = "anthropic", policy = { max_attempts = 9, backoff_ms = 1 } })
    assert.equal(400, s3) -- backoff_ms is not listed
    assert.matches("policy.backoff_ms: clients may not set this field here", doc3.error.message, 1, true)
    s3, _, _, doc3 = post(gw.base .. "/v1/orchestrate", { user_question = QUESTION, strategy = "single",
      providers = "anthropic", policy = { max_attempts = 9 } })
    assert.equal(502, s3)
    assert.equal(2, #doc3.metadata.attempts)
  end)

  it("per client key bounds", function()
    local gw = support.serve([[return { clients = {
      tight = { key_env = "HARD_TIGHT_KEY" },
      loose = { key_env = "HARD_LOOSE_KEY", client_policy = { timeout_ms = { 1, 60000 } } } } }]],
      env { HARD_TIGHT_KEY = "tight-key-123456", HARD_LOOSE_KEY = "loose-key-654321" })
    local url = gw.base .. "/v1/chat/completions"
    local s = post(url, chat(), { ["x-aiorch-policy"] = "timeout_ms=5000", authorization = "Bearer tight-key-123456" })
    assert.equal(400, s)
    s = post(url, chat(), { ["x-aiorch-policy"] = "timeout_ms=5000", authorization = "Bearer loose-key-654321" })
    assert.equal(200, s)
    s = post(url, chat(), { authorization = "Bearer nobody" })
    assert.equal(401, s)
  end)
end)

describe("every policy value is checked", function()
  local VALUES = { { "0", 0 }, { "-1", -1 }, { "1e309", math.huge }, { "nan", 0 / 0 }, { "abc", "abc" },
    { "1e18", 1e18 } }

  -- Only 0, and only where the field's range starts at 0, is a valid value here.
  local function valid(field, v)
    local f = policy.fields[field]
    return f[3] ~= "bool" and v == 0 and f[4] == 0
  end

  it("through X-Aiorch-Policy: a 400 naming the key, or the request runs", function()
    local all = {}
    for k, f in pairs(policy.fields) do
      if not policy.PROVIDER_ONLY[k] then
        all[#all + 1] = string.format("%s = %s", k, f[3] == "bool" and "true" or string.format("{ %s, %s }",
          f[4], f[5]))
      end
    end
    local gw = support.serve("return { client_policy = { " .. table.concat(all, ", ") .. " } }",
      env { ANTHROPIC_API_KEY = false })
    local url = gw.base .. "/v1/chat/completions"
    local fields = {}
    for k in pairs(policy.fields) do
      fields[#fields + 1] = k
    end
    table.sort(fields)
    for _, k in ipairs(fields) do
      for _, pair in ipairs(VALUES) do
        local s, _, body, doc = post(url, chat(), { ["x-aiorch-policy"] = k .. "=" .. pair[1] })
        if valid(k, pair[2]) and not policy.PROVIDER_ONLY[k] then
          assert.equal(200, s, k .. "=" .. pair[1] .. ": " .. body)
        else
          assert.equal(400, s, k .. "=" .. pair[1] .. ": " .. body)
          assert.matches("X-Aiorch-Policy." .. k .. ":", doc.error.message, 1, true)
        end
      end
    end
    -- the worker is still there, and retries with no backoff are fine
    local s = post(url, chat(), { ["x-aiorch-policy"] = "max_attempts=10,backoff_ms=0" })
    assert.equal(200, s)
  end)

  it("through the configuration: the file and the key are named", function()
    local dir = support.tmpdir()
    for _, k in ipairs { "max_attempts", "backoff_ms", "timeout_ms", "hedge_budget", "cooldown_ms",
      "continue_on_cut" } do
      for _, pair in ipairs(VALUES) do
        local file = dir .. "/gw.lua"
        local lit = type(pair[2]) == "string" and string.format("%q", pair[2])
          or pair[2] ~= pair[2] and "0/0" or pair[2] == math.huge and "math.huge" or tostring(pair[2])
        lit = lit == "math.huge" and "1e309" or lit
        support.write(file, "return { providers = { openai = { policy = { " .. k .. " = " .. lit .. " } } } }")
        local cfg, err = gconfig.load(file, function(n) return n == "OPENAI_API_KEY" and KEY or nil end)
        if k ~= "continue_on_cut" and valid(k, pair[2]) then
          assert.is_table(cfg, err)
        else
          assert.is_nil(cfg)
          assert.matches("config " .. file .. ": providers.openai.policy." .. k .. ":", err, 1, true)
        end
      end
    end
    -- and `aiorch serve` stops at start with that line
    support.write(dir .. "/bad.lua", "return { policy = { max_attempts = 3000 } }")
    local code = os.execute("'" .. aiorch.process.exe() .. "' serve --workers 0 --config '" .. dir
      .. "/bad.lua' --listen 127.0.0.1:0 2>'" .. dir .. "/err'")
    assert.is_not_true(code)
    assert.matches("config " .. dir .. "/bad.lua: policy.max_attempts: must be an integer from 1 to 10 (got 3000)",
      support.slurp(dir .. "/err"), 1, true)
  end)
end)

describe("clients choose only the strategies and providers allowed", function()
  it("a file on the search path is no strategy until the configuration names it", function()
    local dir = strategies { helper = "return function() return nil end\n", mine = RAISES }
    local gw = support.serve('return { aliases = { m = { strategy = "mine" } } }', env(), { path = dir })
    local url = gw.base .. "/v1/chat/completions"
    local s, _, _, doc = post(url, chat(), { ["x-aiorch-strategy"] = "helper" })
    assert.equal(400, s)
    assert.matches("strategy 'helper' is not allowed (allowed: fallback, fastest, hedged, mine, parallel, single)",
      doc.error.message, 1, true)
    -- named by an alias: allowed
    s = post(url, chat { model = "m" })
    assert.equal(502, s) -- it raises, as written
    for _, bad in ipairs { "../../etc/passwd", "..", "a/b", "a.b", "x y", string.rep("z", 300) } do
      local s2, _, _, doc2 = post(url, chat(), { ["x-aiorch-strategy"] = bad })
      assert.equal(400, s2, bad)
      assert.matches("is not allowed (allowed: ", doc2.error.message, 1, true)
      local s3 = post(gw.base .. "/v1/orchestrate", { user_question = QUESTION, strategy = bad })
      assert.equal(400, s3, bad)
    end
  end)

  it("per client key: its strategies and providers", function()
    local gw = support.serve([[return { clients = {
      a = { key_env = "HARD_A_KEY", strategies = { "single" }, providers = { "openai" } },
      b = { key_env = "HARD_B_KEY" } } }]], env { HARD_A_KEY = "a-key-0001-xyz", HARD_B_KEY = "b-key-0002-xyz" })
    local url = gw.base .. "/v1/chat/completions"
    local A = { authorization = "Bearer a-key-0001-xyz" }
    local s, _, _, doc = post(url, chat(), { authorization = A.authorization, ["x-aiorch-strategy"] = "fastest" })
    assert.equal(400, s)
    assert.matches("strategy 'fastest' is not allowed (allowed: single)", doc.error.message, 1, true)
    s, _, _, doc = post(url, chat(), { authorization = A.authorization, ["x-aiorch-strategy"] = "single",
      ["x-aiorch-providers"] = "anthropic" })
    assert.equal(400, s)
    assert.matches("provider 'anthropic' is not allowed (allowed: openai)", doc.error.message, 1, true)
    m:reset()
    local h
    s, h = post(url, chat(), { authorization = A.authorization, ["x-aiorch-strategy"] = "single" })
    assert.equal(200, s)
    assert.equal("openai", h["x-aiorch-provider"])
    s = post(url, chat(), { authorization = "Bearer b-key-0002-xyz", ["x-aiorch-strategy"] = "fastest" })
    assert.equal(200, s)
  end)

  it("a configuration naming a strategy that does not exist, or a bad name, is refused at start", function()
    local getenv = function() return nil end
    local _, err = gconfig.check({ strategies = { "nope" } }, getenv)
    assert.matches("strategies[1]: unknown strategy 'nope'", err, 1, true)
    _, err = gconfig.check({ strategies = { "../x" } }, getenv)
    assert.matches("strategies[1]: '../x' is not a strategy name", err, 1, true)
    _, err = gconfig.check({ clients = { c = { key_env = "NOPE_UNSET" } } }, getenv)
    assert.matches("clients.c.key_env: NOPE_UNSET is not set", err, 1, true)
    _, err = gconfig.check({ client_policy = { cooldown_ms = { 1, 2 } } }, getenv)
    assert.matches("client_policy.cooldown_ms: set per provider only", err, 1, true)
    _, err = gconfig.check({ client_policy = { timeout_ms = { 0, 5 } } }, getenv)
    assert.matches("client_policy.timeout_ms: must be an integer from 1", err, 1, true)
    _, err = gconfig.check({ request_timeout_ms = 0 }, getenv)
    assert.matches("request_timeout_ms: must be an integer from 1", err, 1, true)
  end)
end)
