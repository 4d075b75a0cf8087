-- Two `aiorch serve` replicas sharing a real redis-server (the
-- configuration's redis = {...}): a rate limit holds over both, a breaker
-- opened by one is open on the other at once, Redis killed in the middle
-- of a load fails no request (each replica goes on with its own state,
-- says so once and counts it), and once Redis is back they share again.
local aiorch = require "aiorch"
local cjson = require "cjson.safe"
local mock_mod = require "aiorch.mock"
local support = require "tests.support"
local redis_server = require "tests.redis_server"

local fmt = string.format

local KEY = "sk-replicas-spec"
local BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'

local m -- the mock providers
local rs -- redis-server
local n_prefix = 0

local function env()
  return { OPENAI_API_KEY = KEY, OPENAI_BASE_URL = m:base_url("openai"), AIORCH_LOG = "warn" }
end

-- Two replicas of one configuration (text with %s for the redis table),
-- under a prefix of their own.
local function replicas(config, redis_extra)
  n_prefix = n_prefix + 1
  local redis = fmt('{ url = %q, prefix = "spec%d:"%s }', rs.url, n_prefix, redis_extra or "")
  local text = fmt(config, redis)
  return support.serve(text, env()), support.serve(text, env()), "spec" .. n_prefix .. ":"
end

local function chat(base, timeout_ms)
  local status, rh, rb = aiorch.http.request { method = "POST", url = base .. "/v1/chat/completions",
    headers = { ["content-type"] = "application/json", ["x-aiorch-providers"] = "openai",
      ["x-aiorch-strategy"] = "single" }, body = BODY, timeout_ms = timeout_ms or support.stretch(15000) }
  assert(status, "request failed: " .. tostring(rh) .. " " .. tostring(rb))
  return status, rh, rb
end

-- n requests spread over the replicas in turn, at_once at a time: {status = count}.
local function send(bases, n, at_once)
  local statuses, i = {}, 0
  local tasks = {}
  for t = 1, at_once do
    tasks[t] = aiorch.spawn(function()
      while i < n do
        i = i + 1
        local st = chat(bases[i % #bases + 1])
        statuses[st] = (statuses[st] or 0) + 1
      end
    end)
  end
  local _, errs, msgs = aiorch.gather(tasks)
  for t = 1, at_once do
    assert(not errs[t], msgs[t])
  end
  return statuses
end

local function scrape(base)
  local status, _, body = aiorch.http.request { url = base .. "/metrics", timeout_ms = support.stretch(5000) }
  assert.equal(200, status)
  return body
end

local function count(text, needle)
  local n, from = 0, 1
  while true do
    local i = text:find(needle, from, true)
    if not i then
      return n
    end
    n, from = n + 1, i + 1
  end
end

describe("replicas sharing redis", function()
  setup(function()
    m = assert(mock_mod.start {})
    rs = redis_server.start()
  end)

  teardown(function()
    support.cleanup()
    rs.stop()
    m:close()
  end)

  before_each(function()
    m:reset()
  end)

  it("a rate limit of 100 a minute over two replicas lets 100 (± 2) of 200 through, not 200", function()
    local a, b = replicas('return { access_log = false, rate_limit = { requests = 100, per = "minute" }, redis = %s }',
      ", timeout_ms = 1000") -- (a loaded machine: Redis late is the third test's business)
    local statuses = send({ a.base, b.base }, 200, 8)
    local through = statuses[200] or 0
    assert.is_true(through >= 98 and through <= 102, fmt("%d requests let through\n%s\n%s", through,
      support.slurp(a.err), support.slurp(b.err)))
    assert.equal(200 - through, statuses[429])
    assert.equal(through, #m.requests)
    a.stop()
    b.stop()
  end)

  it("a budget holds over two replicas: 10 requests spend it, not 10 each", function()
    local config = fmt([[return { access_log = false, redis = %%s,
      providers = { openai = { api_key_env = "OPENAI_API_KEY", base_url = %q } },
      aliases = { cheap = { strategy = "single", providers = { "openai:gpt-4o-mini" } } },
      budgets = { { alias = "cheap", tokens = 60, window = "day" } } }]],
      m:base_url("openai", { text = "one two three four five" })):gsub("%%%x%x", "%%%0") -- (its %20s stay)
    local a, b = replicas(config, ", timeout_ms = 1000") -- (a loaded machine: Redis late is not what this checks)
    -- each request: 1 token in ("hi"), 5 out (max_tokens, and the mock's answer): 6 reserved, 6 spent
    local body = '{"model":"cheap","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
    local statuses, i = {}, 0
    local tasks = {}
    for t = 1, 8 do
      tasks[t] = aiorch.spawn(function()
        while i < 40 do
          i = i + 1
          local base = i % 2 == 0 and a.base or b.base
          local st = aiorch.http.request { method = "POST", url = base .. "/v1/chat/completions",
            headers = { ["content-type"] = "application/json" }, body = body, timeout_ms = support.stretch(15000) }
          statuses[st] = (statuses[st] or 0) + 1
        end
      end)
    end
    aiorch.gather(tasks)
    local through = statuses[200] or 0
    assert.equal(10, through, cjson.encode(statuses))
    assert.equal(30, statuses[429])
    a.stop()
    b.stop()
  end)

  it("a breaker opened by one replica is open on the other within 100 ms #timing", function()
    local config = fmt([[return { access_log = false, redis = %%s, providers = { openai = {
      api_key_env = "OPENAI_API_KEY", base_url = %q,
      policy = { breaker_failures = 3, breaker_window_ms = 60000, cooldown_ms = 60000 } } } }]],
      m:base_url("openai", { fault = 500 }))
    local a, b = replicas(config)
    for _ = 1, 3 do
      assert.equal(502, (chat(a.base)))
    end
    local t0 = aiorch.now()
    local st, _, body = chat(b.base)
    local took = aiorch.now() - t0
    assert.equal(503, st)
    assert.matches("cooling down", body)
    assert.is_true(took < 100, fmt("the other replica saw it after %.1f ms", took))
    assert.equal(3, #m.requests) -- the other replica never called the failing provider
    local _, _, hb = aiorch.http.request { url = b.base .. "/healthz" }
    assert.is_false(cjson.decode(hb).providers.openai.healthy)
    a.stop()
    b.stop()
  end)

  it("redis killed in the middle of a load: no request fails, both go on with their own state, "
    .. "and share again once it is back", function()
    local a, b, prefix = replicas('return { access_log = false, rate_limit = { requests = 1000000, per = "minute" }, '
      .. "redis = %s }", ", backoff_ms = 50, max_backoff_ms = 200")
    local bases = { a.base, b.base }
    local statuses, running, sent = {}, true, 0
    local load = {}
    for t = 1, 8 do
      load[t] = aiorch.spawn(function()
        local i = t
        while running do
          i = i + 1
          local st = chat(bases[i % 2 + 1])
          statuses[st] = (statuses[st] or 0) + 1
          sent = sent + 1
        end
      end)
    end
    aiorch.sleep(support.stretch(400))
    local before_kill = sent
    rs.kill()
    aiorch.sleep(support.stretch(800))
    running = false
    local _, errs, msgs = aiorch.gather(load)
    for t = 1, 8 do
      assert(not errs[t], msgs[t])
    end
    assert.is_true(before_kill > 20 and sent - before_kill > 20,
      fmt("%d requests before the kill, %d after", before_kill, sent - before_kill))
    assert.same({ [200] = sent }, statuses) -- not one failed
    -- each replica says so once, counts it, and shows it in /metrics
    for _, s in ipairs { a, b } do
      local err = support.slurp(s.err)
      assert.equal(1, count(err, "going on with this replica's own state"), err)
      local text = scrape(s.base)
      assert.equal(0, support.metric(text, "aiorch_redis_up"))
      local errors = 0
      for v in text:gmatch('\naiorch_redis_errors_total{kind="[%w_]+"} (%d+)') do
        errors = errors + tonumber(v)
      end
      assert.is_true(errors > 0, text)
    end
    rs.restart()
    local deadline = aiorch.now() + support.stretch(5000)
    local up
    repeat
      send(bases, 4, 2)
      up = support.metric(scrape(a.base), "aiorch_redis_up") == 1
        and support.metric(scrape(b.base), "aiorch_redis_up") == 1
    until up or aiorch.now() > deadline
    assert.is_true(up, "the replicas did not come back to redis")
    for _, s in ipairs { a, b } do
      assert.equal(1, count(support.slurp(s.err), "answers again; state is shared again"))
    end
    -- both count in Redis again: the window's keys there hold what both sent
    local r = assert(aiorch.redis.connect(rs.url, { timeout_ms = 1000 }))
    local function in_redis()
      local total = 0
      local keys = r:call("KEYS", prefix .. "{r*}*")
      for _, k in ipairs(keys) do
        total = total + tonumber(r:call("GET", k))
      end
      return total, #keys
    end
    local base_count = in_redis()
    local st = send(bases, 20, 4)
    assert.same({ [200] = 20 }, st)
    local after = in_redis()
    assert.equal(base_count + 20, after)
    r:close()
    a.stop()
    b.stop()
  end)

  it("while redis is down each replica limits with its own state, and once it is back the limit is shared again",
    function()
      local a, b = replicas('return { access_log = false, rate_limit = { requests = 10, per = "minute" }, redis = %s }',
        ", backoff_ms = 50, max_backoff_ms = 100")
      rs.kill()
      -- each replica on its own: 10 each
      local st = send({ a.base, b.base }, 40, 1)
      assert.equal(20, st[200])
      assert.equal(20, st[429])
      rs.restart()
      aiorch.sleep(support.stretch(300)) -- past the back-off
      m:reset()
      -- one probe each brings them back, then 10 over both
      st = send({ a.base, b.base }, 40, 1)
      assert.is_true(st[200] >= 10 and st[200] <= 12, fmt("%d let through", st[200] or 0))
      a.stop()
      b.stop()
    end)
end)
