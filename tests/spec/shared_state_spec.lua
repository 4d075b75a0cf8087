-- `aiorch serve --workers 4`: one server, whichever worker takes a
-- connection. Rate limits, max_inflight and breakers hold for all the
-- workers together; /metrics and /healthz give the whole server's totals,
-- which never go backwards; a restarted worker and a SIGHUP's generation
-- share the same state. Each request here is sent on a connection of its
-- own, so that the kernel spreads them over the workers (reuseport).
local aiorch = require "aiorch"
local cjson = require "cjson.safe"
local support = require "tests.support"

local process = aiorch.process
local fmt = string.format

local WORKERS = 4
local KEY = "sk-shared-state-spec"

local m -- the mock providers

local function env(extra)
  local e = { OPENAI_API_KEY = KEY, OPENAI_BASE_URL = m:base_url("openai"), ANTHROPIC_API_KEY = KEY,
    ANTHROPIC_BASE_URL = m:base_url("anthropic"), AIORCH_LOG = "error" }
  return support.merge(e, extra)
end

local BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'

-- One chat request on a connection of its own: status, headers, body.
local function chat(base, headers, timeout_ms)
  local h = { ["content-type"] = "application/json", connection = "close", ["x-aiorch-providers"] = "openai",
    ["x-aiorch-strategy"] = "single" }
  for k, v in pairs(headers or {}) do
    h[k] = v
  end
  local status, rh, rb = aiorch.http.request { method = "POST", url = base .. "/v1/chat/completions",
    headers = h, body = BODY, timeout_ms = timeout_ms or support.stretch(15000) }
  assert(status, "request failed: " .. tostring(rh) .. " " .. tostring(rb))
  return status, rh, rb
end

-- n requests, `at_once` at a time. Returns {status = count} and one 429's
-- headers and body.
local function send(base, n, at_once, headers)
  local statuses, refused = {}, nil
  local left = n
  local tasks = {}
  for i = 1, at_once do
    tasks[i] = aiorch.spawn(function()
      while left > 0 do
        left = left - 1
        local st, h, b = chat(base, headers)
        statuses[st] = (statuses[st] or 0) + 1
        if st == 429 and not refused then
          refused = { headers = h, body = b }
        end
      end
    end)
  end
  local _, errs, msgs = aiorch.gather(tasks)
  for i = 1, at_once do
    assert(not errs[i], msgs[i])
  end
  return statuses, refused
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

local children = support.children

-- The bytes each process has written to files (its access lines).
local function writes(pids)
  local out = {}
  for i, pid in ipairs(pids) do
    out[i] = tonumber(support.slurp("/proc/" .. pid .. "/io"):match("wchar: (%d+)")) or 0
  end
  return out
end

local function serve(config, opts)
  opts = opts or {}
  return support.serve(config, env(opts.env), { workers = opts.workers or WORKERS })
end

describe("aiorch serve --workers 4 with shared state", function()
  support.use_mock(function(mock) m = mock end, {})

  it("a rate limit of 100 a minute lets 100 (± 2) of 400 requests through, over every worker", function()
    -- (each worker writes its access lines: which ones answered)
    local gw = serve('return { rate_limit = { requests = 100, per = "minute" } }')
    local pids = children(gw.pid)
    local before = writes(pids)
    local statuses, refused = send(gw.base, 400, 8)
    aiorch.sleep(support.stretch(200))
    local after, workers = writes(pids), 0
    for i = 1, #pids do
      workers = workers + (after[i] > before[i] and 1 or 0)
    end
    local through = statuses[200] or 0
    assert.is_true(through >= 98 and through <= 102, fmt("%d requests let through", through))
    assert.equal(400 - through, statuses[429])
    assert.is_true(workers >= 3, fmt("the requests were answered by %d workers", workers))
    assert.equal(through, #m.requests)
    -- in the caller's error shape, with when to come back
    local wait = tonumber(refused.headers["retry-after"])
    assert.is_true(wait and wait >= 1 and wait <= 61, tostring(refused.headers["retry-after"]))
    local doc = cjson.decode(refused.body)
    assert.equal("rate_limit_exceeded", doc.error.code)
    assert.matches("rate limit reached: this gateway takes 100 requests per minute", doc.error.message, 1, true)
    local st, h, body = support.post(gw.base .. "/v1/messages",
      { model = "claude-3-haiku-20240307", max_tokens = 10, messages = { { role = "user", content = "hi" } } },
      { ["anthropic-version"] = "2023-06-01", connection = "close" })
    assert.equal(429, st)
    assert.truthy(tonumber(h["retry-after"]))
    assert.equal("rate_limit_error", cjson.decode(body).error.type)
    -- /metrics agrees, whichever worker answers
    aiorch.sleep(support.stretch(300))
    local text = scrape(gw.base)
    assert.equal(through, total(text, "aiorch_gateway_requests_total", 'route="/v1/chat/completions",status="200"'))
    assert.equal(400 - through + 0, total(text, "aiorch_gateway_requests_total",
      'route="/v1/chat/completions",status="429"'))
    assert.equal(0, gw.stop())
  end)

  it("twenty scrapes in a row never go backwards, and the totals are the server's", function()
    local gw = serve("return { access_log = false }")
    local sent, running = 0, true
    local load = {}
    for i = 1, 3 do
      load[i] = aiorch.spawn(function()
        while running do
          assert.equal(200, (chat(gw.base)))
          sent = sent + 1
        end
      end)
    end
    local last_gw, last_prov, last_lat = -1, -1, -1
    for i = 1, 20 do
      local text = scrape(gw.base)
      local g = total(text, "aiorch_gateway_requests_total", 'route="/v1/chat/completions"')
      local p = total(text, "aiorch_provider_requests_total", 'provider="openai"')
      local l = total(text, "aiorch_provider_latency_seconds_count", 'provider="openai"')
      assert.is_true(g >= last_gw and p >= last_prov and l >= last_lat,
        fmt("scrape %d went backwards: %d < %d or %d < %d or %d < %d", i, g, last_gw, p, last_prov, l, last_lat))
      last_gw, last_prov, last_lat = g, p, l
      aiorch.sleep(30)
    end
    running = false
    aiorch.gather(load)
    assert.is_true(last_gw > 0, "no request was counted")
    -- once every worker flushed (every 100 ms), every scrape says the same totals
    aiorch.sleep(support.stretch(300))
    for _ = 1, 8 do
      local text = scrape(gw.base)
      assert.equal(sent, total(text, "aiorch_gateway_requests_total", 'route="/v1/chat/completions",status="200"'))
      assert.equal(sent, total(text, "aiorch_provider_requests_total", 'provider="openai"'))
      assert.equal(sent, total(text, "aiorch_provider_successes_total", 'provider="openai"'))
    end
    local _, _, hb = aiorch.http.request { url = gw.base .. "/healthz", headers = { connection = "close" } }
    assert.equal(0, cjson.decode(hb).in_flight)
    assert.equal(0, gw.stop())
  end)

  it("a breaker opened by failures seen in one worker is open for requests landing on the others", function()
    local gw = serve(fmt([[return { access_log = false, providers = { openai = {
      api_key_env = "OPENAI_API_KEY", base_url = %q,
      policy = { breaker_failures = 3, breaker_window_ms = 60000, cooldown_ms = 60000 } } } }]],
      m:base_url("openai", { fault = 500 })))
    local statuses = send(gw.base, 24, 1)
    assert.equal(3, statuses[502], "502s: " .. tostring(statuses[502]))
    assert.equal(21, statuses[503])
    assert.equal(3, #m.requests) -- one breaker for the server: 3 failures, not 3 per worker
    for _ = 1, 8 do
      local _, _, hb = aiorch.http.request { url = gw.base .. "/healthz", headers = { connection = "close" } }
      local doc = cjson.decode(hb)
      assert.is_false(doc.providers.openai.healthy)
    end
    assert.equal(0, gw.stop())
  end)

  it("max_inflight holds across workers, and a killed worker's requests give their places back", function()
    local gw = serve(fmt([[return { access_log = false, max_inflight = 2, providers = { openai = {
      api_key_env = "OPENAI_API_KEY", base_url = %q } } }]], m:base_url("openai", { latency_ms = 600 })))
    local statuses = send(gw.base, 8, 8)
    assert.equal(2, statuses[200])
    assert.equal(6, statuses[429])
    assert.equal(2, #m.requests)
    -- the places are free again
    statuses = send(gw.base, 2, 2)
    assert.equal(2, statuses[200])
    -- requests held by workers that are killed: the master gives their places back
    aiorch.sleep(support.stretch(300)) -- (what the workers counted is flushed by then)
    m:reset()
    local function hold()
      return aiorch.http.request { method = "POST", url = gw.base .. "/v1/chat/completions", body = BODY,
        headers = { ["content-type"] = "application/json", connection = "close" }, timeout_ms = 10000 }
    end
    local held = { aiorch.spawn(hold), aiorch.spawn(hold) }
    local until_held = aiorch.now() + support.stretch(5000)
    while #m.requests < 2 and aiorch.now() < until_held do
      aiorch.sleep(10)
    end
    assert.equal(2, #m.requests)
    local old = children(gw.pid)
    for _, pid in ipairs(old) do
      process.kill(pid, "SIGKILL")
    end
    for _, t in ipairs(held) do
      t:cancel()
    end
    local deadline = aiorch.now() + support.stretch(10000)
    repeat
      aiorch.sleep(50)
      local now_workers = children(gw.pid)
      local fresh = #now_workers == WORKERS
      for _, pid in ipairs(now_workers) do
        for _, o in ipairs(old) do
          fresh = fresh and pid ~= o
        end
      end
    until (fresh and (aiorch.http.request { url = gw.base .. "/healthz", timeout_ms = 500 })) or aiorch.now() > deadline
    aiorch.sleep(support.stretch(300)) -- every restarted worker listening
    statuses = send(gw.base, 2, 2)
    assert.equal(2, statuses[200], "the killed workers' places were not given back")
    -- the killed workers' counts (flushed before they died) are still there, and the new ones
    aiorch.sleep(support.stretch(300))
    local text = scrape(gw.base)
    assert.equal(6, total(text, "aiorch_gateway_requests_total", 'route="/v1/chat/completions",status="200"'))
    assert.equal(0, gw.stop())
  end)

  it("a SIGHUP's new generation goes on with the same counts and limits", function()
    local gw = serve('return { access_log = false, rate_limit = { requests = 20, per = "minute" } }')
    local statuses = send(gw.base, 15, 3)
    assert.equal(15, statuses[200])
    aiorch.sleep(support.stretch(300))
    local before = total(scrape(gw.base), "aiorch_gateway_requests_total", 'route="/v1/chat/completions"')
    assert.equal(15, before)
    local old = children(gw.pid)
    assert.is_true(process.kill(gw.pid, "SIGHUP"))
    local deadline = aiorch.now() + support.stretch(15000)
    while not support.slurp(gw.err):find("reload: generation 2 listening", 1, true) do
      assert(aiorch.now() < deadline, "no new generation: " .. support.slurp(gw.err))
      aiorch.sleep(20)
    end
    -- the old generation drains (its requests are done) and goes
    deadline = aiorch.now() + support.stretch(15000)
    while not support.none_in(children(gw.pid), old) do
      assert(aiorch.now() < deadline, "the old generation is still there")
      aiorch.sleep(20)
    end
    statuses = send(gw.base, 10, 2)
    assert.equal(5, statuses[200])
    assert.equal(5, statuses[429])
    aiorch.sleep(support.stretch(300))
    local text = scrape(gw.base)
    assert.equal(20, total(text, "aiorch_gateway_requests_total", 'route="/v1/chat/completions",status="200"'))
    assert.equal(5, total(text, "aiorch_gateway_requests_total", 'route="/v1/chat/completions",status="429"'))
    assert.equal(0, gw.stop())
  end)

  it("holds each client's rate limit and the gateway's together", function()
    local gw = serve([[return { access_log = false, rate_limit = { requests = 8, per = "hour" },
      clients = { a = { key_env = "SPEC_KEY_A", rate_limit = { requests = 5, per = "minute" } },
                  b = { key_env = "SPEC_KEY_B" } } }]],
      { env = { SPEC_KEY_A = "client-a-key-1111", SPEC_KEY_B = "client-b-key-2222" } })
    local a, refused = send(gw.base, 10, 2, { authorization = "Bearer client-a-key-1111" })
    assert.equal(5, a[200])
    assert.matches("this client may make 5 requests per minute", cjson.decode(refused.body).error.message, 1, true)
    local b, refused_b = send(gw.base, 10, 2, { authorization = "Bearer client-b-key-2222" })
    assert.equal(3, b[200]) -- what is left of the gateway's 8
    assert.matches("this gateway takes 8 requests per hour", cjson.decode(refused_b.body).error.message, 1, true)
    assert.equal(0, gw.stop())
  end)

  it("keeps no segment anywhere: the workers map an anonymous one, nothing is in /dev/shm", function()
    local gw = serve("return { access_log = false, shared_memory = '1m' }")
    for _, pid in ipairs(children(gw.pid)) do
      local maps = support.slurp("/proc/" .. pid .. "/maps")
      assert.truthy(maps:find("/memfd:aiorch-state (deleted)", 1, true), "worker " .. pid)
      local ls = io.popen("ls -l /proc/" .. pid .. "/fd 2>/dev/null")
      local fds = ls:read("a")
      ls:close()
      assert.is_nil(fds:find("memfd", 1, true), "the worker kept the descriptor") -- only its mapping
    end
    local p = io.popen("ls /dev/shm 2>/dev/null")
    assert.is_nil(p:read("a"):find("aiorch", 1, true))
    p:close()
    assert.equal(0, gw.stop())
  end)
end)

describe("aiorch serve --workers 0", function()
  support.use_mock(function(mock) m = mock end, {})

  it("holds the rate limit with its own state", function()
    local gw = serve('return { access_log = false, rate_limit = { requests = 10, per = "minute" } }',
      { workers = 0 })
    local statuses = send(gw.base, 30, 3)
    assert.equal(10, statuses[200])
    assert.equal(20, statuses[429])
    assert.equal(0, gw.stop())
  end)
end)
