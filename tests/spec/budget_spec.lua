-- Budgets per client key and per alias, over `aiorch serve` with 2 workers
-- (`workers = 2` in the configuration) sharing one budget: 200 concurrent
-- requests against a budget that 50 exhaust overspend by less than one
-- request; the 429s carry Retry-After (the window's end) in the client's
-- API format (OpenAI, Anthropic); a stream is checked before it starts and
-- never cut; a budget that fails closed answers 503 without its shared
-- tier; ctx.budget and ctx.price reach strategies (thrifty).
local aiorch = require "aiorch"
local cjson = require "cjson.safe"
local mock_mod = require "aiorch.mock"
local support = require "tests.support"

local fmt = string.format

local KEY = "sk-budget-spec-upstream"
local CLIENTS = { ALICE_KEY = "sk-alice-budget-0001", BOB_KEY = "sk-bob-budget-0002", CAROL_KEY = "sk-carol-0003",
  DAVE_KEY = "sk-dave-budget-0004" }

local m

local function env(extra)
  local e = { OPENAI_API_KEY = KEY, OPENAI_BASE_URL = m:base_url("openai", { text = "one two three four five" }),
    ANTHROPIC_API_KEY = KEY, ANTHROPIC_BASE_URL = m:base_url("anthropic", { text = "one two three four five" }),
    AIORCH_LOG = "error" }
  for k, v in pairs(CLIENTS) do
    e[k] = v
  end
  for k, v in pairs(extra or {}) do
    e[k] = v
  end
  return e
end

-- 40 words of 3 letters: 160 characters, which the estimate takes for 40 tokens.
local CONTENT = ("abc "):rep(40)
local MAX_TOKENS = 5 -- the mock's answer: five words

local function chat_body(stream)
  return cjson.encode { model = "gpt-4o-mini", max_tokens = MAX_TOKENS, stream = stream or nil,
    messages = { { role = "user", content = CONTENT } } }
end

-- One chat request on a connection of its own: status, headers, body.
local function chat(base, key, stream)
  local status, rh, rb = aiorch.http.request { method = "POST", url = base .. "/v1/chat/completions",
    headers = { ["content-type"] = "application/json", connection = "close", authorization = "Bearer " .. key,
      ["x-aiorch-providers"] = "openai", ["x-aiorch-strategy"] = "single" },
    body = chat_body(stream), timeout_ms = support.stretch(20000) }
  assert(status, "request failed: " .. tostring(rh) .. " " .. tostring(rb))
  return status, rh, rb
end

local function messages(base, key)
  local status, rh, rb = aiorch.http.request { method = "POST", url = base .. "/v1/messages",
    headers = { ["content-type"] = "application/json", connection = "close", ["x-api-key"] = key,
      ["anthropic-version"] = "2023-06-01", ["x-aiorch-providers"] = "anthropic", ["x-aiorch-strategy"] = "single" },
    body = cjson.encode { model = "claude-3-haiku-20240307", max_tokens = MAX_TOKENS,
      messages = { { role = "user", content = CONTENT } } }, timeout_ms = support.stretch(20000) }
  assert(status, "request failed: " .. tostring(rh) .. " " .. tostring(rb))
  return status, rh, rb
end

local function scrape(base)
  local status, _, body = aiorch.http.request { url = base .. "/metrics", headers = { connection = "close" },
    timeout_ms = support.stretch(5000) }
  assert.equal(200, status)
  return body
end

-- The sum of a metric's samples whose labels contain `labels`.
local function total(text, name, labels)
  local sum = 0
  for lbl, v in text:gmatch("\n" .. name .. "{([^}]*)} ([%d%.e%+%-]+)") do
    if not labels or lbl:find(labels, 1, true) then
      sum = sum + tonumber(v)
    end
  end
  return sum
end

-- Seconds until the next UTC calendar window of the kind begins.
local function until_next(window)
  local t = os.time()
  local d = os.date("!*t", t)
  if window == "month" then
    local y, mo = d.year, d.month + 1
    if mo > 12 then
      y, mo = y + 1, 1
    end
    -- os.time reads a local time; the difference of two UTC dates does not care
    local start = os.time { year = y, month = mo, day = 1, hour = 0 } - os.time { year = d.year, month = d.month,
      day = d.day, hour = d.hour, min = d.min, sec = d.sec }
    return start
  end
  return 86400 - (d.hour * 3600 + d.min * 60 + d.sec)
end

-- What one request costs (gpt-4o-mini, the mock's counts), by asking once.
local function one_cost(base)
  local before = total(scrape(base), "aiorch_cost_usd_total", 'key="DAVE_KEY"')
  local status, _, body = chat(base, CLIENTS.DAVE_KEY)
  assert.equal(200, status, body)
  local doc = cjson.decode(body)
  local u = doc.usage
  local c = (u.prompt_tokens * 0.15 + u.completion_tokens * 0.60) / 1e6
  -- the metrics lag by at most 100 ms per worker
  local deadline = aiorch.now() + support.stretch(3000)
  repeat
    aiorch.sleep(50)
  until total(scrape(base), "aiorch_cost_usd_total", 'key="DAVE_KEY"') - before > c / 2 or aiorch.now() > deadline
  return c, u
end

describe("budgets", function()
  setup(function()
    m = assert(mock_mod.start {})
  end)

  teardown(function()
    support.cleanup()
    m:close()
  end)

  it("200 concurrent requests, 2 workers, a budget 50 exhaust: less than one request's overspend, "
    .. "429s with Retry-After in each API's format", function()
    -- the cost of one request, measured on a client without a budget (the same for every request)
    local probe = support.serve('return { workers = 2, client_keys_env = { "DAVE_KEY" } }', env(),
      { config_workers = 2 })
    local c, u = one_cost(probe.base)
    probe.stop()
    assert.is_true(c > 0)
    assert.equal(40, u.prompt_tokens)
    assert.equal(5, u.completion_tokens)

    local limit = 50 * c - c / 2 -- 50 requests spend it
    local config = fmt([[return {
      workers = 2, access_log = false,
      clients = { alice = { key_env = "ALICE_KEY" }, bob = { key_env = "BOB_KEY" } },
      budgets = {
        { client = "alice", usd = %.17g, window = "month" },
        { client = "bob", tokens = %d, window = "day" },
      },
    }]], limit, 3 * 45)
    local gw = support.serve(config, env(), { config_workers = 2 })

    local statuses, refused = {}, {}
    local tasks = {}
    for i = 1, 200 do
      tasks[i] = aiorch.spawn(function()
        local st, h, b = chat(gw.base, CLIENTS.ALICE_KEY)
        statuses[st] = (statuses[st] or 0) + 1
        if st == 429 then
          refused[#refused + 1] = { h = h, b = b }
        end
      end)
    end
    local _, errs, msgs = aiorch.gather(tasks)
    for i = 1, 200 do
      assert(not errs[i], msgs[i])
    end
    local ok, no = statuses[200] or 0, statuses[429] or 0
    assert.equal(200, ok + no, cjson.encode(statuses))
    -- the reservation is the estimate (40 tokens in, max_tokens out): what was spent
    assert.is_true(ok >= 45 and ok <= 50, fmt("%d admitted", ok))

    -- every 429: Retry-After at the month's end, in OpenAI's error format
    local wait = until_next("month")
    for _, r in ipairs(refused) do
      local ra = tonumber(r.h["retry-after"])
      assert.is_true(ra ~= nil and math.abs(ra - wait) <= 5, fmt("Retry-After %s, expected about %d", tostring(ra),
        wait))
      local doc = cjson.decode(r.b)
      assert.equal("budget_exceeded", doc.error.code)
      assert.is_string(doc.error.type)
      assert.truthy(doc.error.message:find("budget spent: client alice", 1, true), doc.error.message)
    end

    -- what was spent, from the whole server's metrics (the workers push every 100 ms)
    local spent
    local deadline = aiorch.now() + support.stretch(3000)
    repeat
      aiorch.sleep(100)
      spent = total(scrape(gw.base), "aiorch_cost_usd_total", 'key="alice"')
    until spent >= ok * c - c / 100 or aiorch.now() > deadline
    assert.is_true(math.abs(spent - ok * c) < c / 100, fmt("spent %.10g for %d requests of %.10g", spent, ok, c))
    -- the bound: what was in flight when the budget ran out; here less than one request
    assert.is_true(spent < limit + c, fmt("overspent: %.10g of %.10g", spent, limit))
    assert.is_true(spent > limit - 6 * c, "the budget was not spent")

    -- tokens, per day, in Anthropic's format: 3 requests of 45 tokens, then 429
    for _ = 1, 3 do
      local st, _, b = messages(gw.base, CLIENTS.BOB_KEY)
      assert.equal(200, st, b)
    end
    local st, h, b = messages(gw.base, CLIENTS.BOB_KEY)
    assert.equal(429, st)
    local doc = cjson.decode(b)
    assert.equal("error", doc.type)
    assert.equal("rate_limit_error", doc.error.type)
    assert.truthy(doc.error.message:find("45 tokens per day", 1, true) or doc.error.message:find("135 tokens per day",
      1, true), doc.error.message)
    local ra = tonumber(h["retry-after"])
    assert.is_true(math.abs(ra - until_next("day")) <= 5, h["retry-after"])
    -- bob's tokens are counted under his name (the workers push their counts every 100 ms)
    deadline = aiorch.now() + support.stretch(3000)
    while total(scrape(gw.base), "aiorch_tokens_total", 'key="bob"') == 0 and aiorch.now() < deadline do
      aiorch.sleep(50)
    end
    assert.is_true(total(scrape(gw.base), "aiorch_tokens_total", 'key="bob"') > 0)
  end)

  it("a stream is checked before it starts and never cut", function()
    local config = [[return {
      access_log = false,
      clients = { carol = { key_env = "CAROL_KEY" } },
      budgets = { { client = "carol", tokens = 45, window = "hour" } },
    }]]
    local gw = support.serve(config, env())
    -- 45 tokens reserved of 45: admitted; the stream runs to its end
    local st, h, b = chat(gw.base, CLIENTS.CAROL_KEY, true)
    assert.equal(200, st, b)
    assert.truthy(h["content-type"]:find("text/event-stream", 1, true))
    assert.truthy(b:find("data: [DONE]", 1, true), b)
    assert.truthy(b:find("one two three four five", 1, true) or b:find("five", 1, true))
    -- now spent: the next stream is refused before it starts, as JSON
    st, h, b = chat(gw.base, CLIENTS.CAROL_KEY, true)
    assert.equal(429, st)
    assert.truthy(h["content-type"]:find("application/json", 1, true))
    assert.is_truthy(tonumber(h["retry-after"]))
    assert.equal("budget_exceeded", cjson.decode(b).error.code)
  end)

  it("an alias's budget holds for every client of it", function()
    local config = [[return {
      access_log = false,
      aliases = { cheap = { strategy = "single", providers = { "openai:gpt-4o-mini" } } },
      budgets = { { alias = "cheap", usd = 1e-9, window = "minute" } },
    }]]
    local gw = support.serve(config, env())
    local function ask_alias()
      return support.post(gw.base .. "/v1/chat/completions", { model = "cheap", max_tokens = 5,
        messages = { { role = "user", content = "hi" } } })
    end
    local st, _, b = ask_alias()
    assert.equal(200, st, b) -- under the budget when it started: answered, and it overspends
    local st2, h2, b2 = ask_alias()
    assert.equal(429, st2, b2)
    assert.truthy(cjson.decode(b2).error.message:find("alias cheap", 1, true))
    assert.is_true(tonumber(h2["retry-after"]) <= 60)
    -- a Gemini client of the alias: its API's error shape
    local st3, h3, b3, doc3 = support.post(gw.base .. "/v1beta/models/cheap:generateContent",
      { contents = { { role = "user", parts = { { text = "hi" } } } } })
    assert.equal(429, st3, b3)
    assert.equal(429, doc3.error.code)
    assert.equal("RESOURCE_EXHAUSTED", doc3.error.status)
    assert.is_truthy(tonumber(h3["retry-after"]))
    -- another model is not the alias
    st = support.post(gw.base .. "/v1/chat/completions", { model = "gpt-4o-mini", max_tokens = 5,
      messages = { { role = "user", content = "hi" } } })
    assert.equal(200, st)
  end)

  it("fail_closed: 503 while the shared tier (redis) does not answer; otherwise the replica's own count",
    function()
      local port = support.free_port() -- nothing listens there
      local config = fmt([[return {
        access_log = false,
        clients = { alice = { key_env = "ALICE_KEY" }, bob = { key_env = "BOB_KEY" } },
        redis = { url = "redis://127.0.0.1:%d", timeout_ms = 50, connect_timeout_ms = 100 },
        budgets = {
          { client = "alice", usd = 1, window = "day", fail_closed = true },
          { client = "bob", usd = 1, window = "day" },
        },
      }]], port)
      local gw = support.serve(config, env())
      local st, h, b = chat(gw.base, CLIENTS.ALICE_KEY)
      assert.equal(503, st, b)
      assert.equal("1", h["retry-after"])
      assert.truthy(cjson.decode(b).error.message:find("cannot be checked", 1, true))
      local st2, _, b2 = chat(gw.base, CLIENTS.BOB_KEY)
      assert.equal(200, st2, b2)
    end)

  it("thrifty: a cheaper model once the client's budget is under the threshold (ctx.budget, ctx.price)", function()
    local config = [[return {
      access_log = false, default_strategy = "thrifty",
      clients = { erin = { key_env = "ERIN_KEY" } },
      budgets = { { client = "erin", usd = 0.0005, window = "day" } },
    }]]
    local gw = support.serve(config, env { ERIN_KEY = "sk-erin-thrifty-0005", AIORCH_THRIFTY_BELOW = "0.5" })
    local function ask()
      local st, _, b, doc = support.post(gw.base .. "/v1/chat/completions", { model = "gpt-4o", max_tokens = 5,
        messages = { { role = "user", content = CONTENT } } }, { authorization = "Bearer sk-erin-thrifty-0005" })
      assert.equal(200, st, b)
      return doc.model, m.requests[#m.requests].json.model
    end
    -- gpt-4o: 40 tokens in at 2.50, 5 out at 10.00 per 1M = 0.00015 USD a request
    -- 1st: 0.00035 of 0.0005 left once reserved: above half, gpt-4o
    local answered, sent = ask()
    assert.equal("gpt-4o", sent)
    assert.equal("gpt-4o", answered)
    -- 2nd: 0.0002 left: under half, the cheaper model
    answered, sent = ask()
    assert.equal("gpt-4o-mini", sent)
    assert.equal("gpt-4o-mini", answered)
  end)

  it("refuses a budget that names no client or alias, or a bad window", function()
    local dir = support.tmpdir()
    for _, case in ipairs({
      { 'budgets = { { client = "nobody", usd = 1, window = "day" } }', 'budgets[1].client: "nobody"' },
      { 'aliases = {}, budgets = { { alias = "x", usd = 1, window = "day" } }', 'budgets[1].alias: "x"' },
      { 'budgets = { { client = "alice", usd = 1, window = "week" } }', "budgets[1].window" },
      { 'budgets = { { client = "alice", usd = -1, window = "day" } }', "budgets[1].usd" },
      { 'budgets = { { client = "alice", window = "day" } }', "sets usd, tokens or both" },
      { 'prices = { m = { input = 1 } }', 'prices["m"].output' },
    }) do
      local text = 'return { clients = { alice = { key_env = "ALICE_KEY" } }, ' .. case[1] .. " }"
      local gconfig = require "aiorch.gateway.config"
      support.write(dir .. "/g.lua", text)
      local cfg, err = gconfig.load(dir .. "/g.lua", function(k) return CLIENTS[k] end)
      assert.is_nil(cfg)
      assert.truthy(err:find(case[2], 1, true), err)
    end
  end)
end)
