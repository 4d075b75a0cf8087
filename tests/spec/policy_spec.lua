-- Resilience policies over real loopback sockets: each deadline on its own
-- timer, retries with backoff and Retry-After, circuit breakers, hedging,
-- the cost of cancelled work, and policy overrides. Runs inside the runtime.
local aiorch = require "aiorch"
local orchestrate = require "aiorch.orchestrate"
local metrics = require "aiorch.metrics"
local breaker = require "aiorch.breaker"
local policy = require "aiorch.policy"
local response = require "aiorch.response"
local support = require "tests.support"

local KEYS = { openai = "sk-test-policy-openai-0001", anthropic = "sk-ant-test-policy-0002" }
local QUESTION = "Is it resilient?"
local SLACK_MS = 10 -- a deadline fires this close to its time
-- AIORCH_TEST_SLOWDOWN (.ci/valgrind): a bound or a margin that only guards
-- against a slow runtime stretches by it; the tests of precision are #timing.
local SLOWDOWN = tonumber(os.getenv("AIORCH_TEST_SLOWDOWN") or "") or 1
local function stretch(ms)
  return math.ceil(ms * SLOWDOWN) -- whole ms: policies take integers
end

local m

local function env_for(o, a, extra)
  return support.mock_env(m, KEYS, o, a, extra)
end

local function run(strategy, providers, o, a, pol, opts)
  opts = opts or {}
  opts.env = opts.env or env_for(o, a, opts.env_extra)
  local t0 = aiorch.now()
  local r, _, err = orchestrate.orchestrate({ user_question = QUESTION, policy = pol }, strategy, providers, opts)
  return r, aiorch.now() - t0, err
end

local function count(api)
  local n = 0
  for _, r in ipairs(m.requests) do
    if r.api == api then
      n = n + 1
    end
  end
  return n
end

local function no_keys_in(v)
  support.no_keys_in(type(v) == "string" and v or response.encode(v), KEYS)
end

local function within(ms, at, slack)
  assert.is_true(at >= ms - 1 and at <= ms + (slack or SLACK_MS),
    string.format("expected %d ms (+%d), took %.1f ms", ms, slack or SLACK_MS, at))
end

support.use_mock(function(mock) m = mock end)

describe("deadlines", function()
  -- Each row: directives, stream?, policy, the deadline that must fire, at ms.
  local CASES = {
    { "headers", { latency_ms = 400 }, false, { headers_timeout_ms = 100 }, 100 },
    { "total", { latency_ms = 400 }, false, { timeout_ms = 150 }, 150 },
    { "total (stream)", { fault = "hang" }, true, { timeout_ms = 120 }, 120 },
    -- headers and the first (role) chunk come at once; content after 300 ms
    { "first_token", { chunk_delay_ms = 300 }, true, { first_token_timeout_ms = 100 }, 100 },
    { "gap", { chunk_delay_ms = 300 }, true, { gap_timeout_ms = 100 }, 100 },
  }
  for _, c in ipairs(CASES) do
    local name, dirs, stream, pol, at = c[1], c[2], c[3], c[4], c[5]
    for _, api in ipairs { "openai", "anthropic" } do
      it(name .. " fires on time and says which (" .. api .. ") #timing", function()
        local which = name:match("^(%S+)")
        local slack = which == "gap" and 30 or SLACK_MS
        -- A loop descheduled by a busy machine may wake late; a deadline
        -- must be on time in one of three runs.
        local r, took
        for _ = 1, 3 do
          r, took = run("single", { api }, dirs, dirs, pol, { stream = stream, on_token = stream and function() end })
          local lat = r.metadata.attempts and r.metadata.attempts[1] and r.metadata.attempts[1].latency_ms
          if not lat or lat <= at + slack then
            break
          end
        end
        assert.equal("timeout", r.status)
        assert.equal("timeout", r.metadata.error_kind)
        assert.equal(which, r.metadata.deadline)
        assert.matches(which .. " deadline of %d+ ms passed", r.error_message)
        assert.is_true(took >= at)
        -- the attempt's own clock: from the request's start, not the orchestration's
        -- (a gap counts from the last event, which came a little after the start)
        within(at, r.metadata.attempts[1].latency_ms, slack)
        assert.equal(1, #r.metadata.attempts)
        assert.equal(which, r.metadata.attempts[1].deadline)
      end)
    end
  end

  it("first_token is measured to the first content token, not to the headers", function()
    -- Headers at once, content after 60 ms: a 100 ms first-token deadline holds,
    -- though a 30 ms headers deadline would also have held. A call first: the
    -- first one of a process (modules loaded, a connection made) is not timed.
    run("single", { "anthropic" })
    local r = run("single", { "anthropic" }, nil, { chunk_delay_ms = stretch(60), chunks = 2 },
      { first_token_timeout_ms = stretch(100), headers_timeout_ms = stretch(30) },
      { stream = true, on_token = function() end })
    assert.equal("success", r.status, r.error_message)
  end)

  it("gap fires its time after the last event #timing", function()
    local last, n = nil, 0
    local t_end
    local status, kind, _, which = aiorch.http.request {
      url = m:base_url("anthropic", { chunk_delay_ms = 300 }) .. "/v1/messages",
      headers = { ["content-type"] = "application/json", ["x-api-key"] = KEYS.anthropic },
      body = '{"model":"claude-3-haiku-20240307","max_tokens":10,"stream":true,'
        .. '"messages":[{"role":"user","content":"hi"}]}',
      gap_timeout_ms = 100,
      on_event = function()
        n = n + 1
        last = aiorch.now()
      end,
    }
    t_end = aiorch.now()
    assert.is_nil(status)
    assert.equal("timeout", kind)
    assert.equal("gap", which)
    assert.is_true(n > 0)
    within(100, t_end - last)
  end)

  it("gap restarts with every event", function()
    -- Five pieces 50 ms apart: 250 ms in all, but never a 200 ms gap.
    local r, took = run("single", { "openai" }, { chunk_delay_ms = 50, chunks = 5 }, nil,
      { gap_timeout_ms = stretch(200) }, { stream = true, on_token = function() end })
    assert.equal("success", r.status)
    assert.is_true(took >= 240)
  end)

  it("connect covers TCP and TLS: a server that accepts and never answers the handshake", function()
    local portfile = os.tmpname()
    local pid = assert(aiorch.process.spawn({ "python3", "-c", [[
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(16)
open(sys.argv[1], "w").write(str(s.getsockname()[1]))
held = []
while True:
    c, _ = s.accept(); held.append(c)
]], portfile }, { death_signal = "TERM" }))
    local port
    for _ = 1, 1000 do -- python may take a while to start
      local f = io.open(portfile)
      port = f and tonumber(f:read("a"))
      if f then
        f:close()
      end
      if port then
        break
      end
      aiorch.sleep(10)
    end
    os.remove(portfile)
    assert.is_number(port)
    local opts = { env_extra = { OPENAI_BASE_URL = "https://127.0.0.1:" .. port } }
    -- The first TLS connection of a process loads the CA store (once): not timed.
    run("single", { "openai" }, nil, nil, { connect_timeout_ms = 150 }, opts)
    local r, took = run("single", { "openai" }, nil, nil, { connect_timeout_ms = 150 }, opts)
    aiorch.process.kill(pid, "TERM")
    aiorch.process.wait(pid, 2000)
    assert.equal("timeout", r.status)
    assert.equal("connect", r.metadata.deadline)
    assert.is_true(took >= 150)
    within(150, r.metadata.attempts[1].latency_ms, stretch(SLACK_MS))
  end)

  it("verifies TLS: a self-signed upstream is refused (kind tls), whatever the policy", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p '" .. dir .. "'"))
    assert(os.execute(("openssl req -x509 -newkey rsa:2048 -nodes -keyout '%s/k.pem' -out '%s/c.pem' -days 1"
      .. " -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 >/dev/null 2>&1"):format(dir, dir)))
    local pid = assert(aiorch.process.spawn({ "python3", "-c", [[
import socket, ssl, sys
d = sys.argv[1]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(d + "/c.pem", d + "/k.pem")
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(16)
open(d + "/port", "w").write(str(s.getsockname()[1]))
while True:
    c, _ = s.accept()
    try:
        t = ctx.wrap_socket(c, server_side=True); t.recv(65536)
        t.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
        t.close()
    except Exception:
        c.close()
]], dir }, { death_signal = "TERM" }))
    local port
    for _ = 1, 1000 do
      local f = io.open(dir .. "/port")
      port = f and tonumber(f:read("a"))
      if f then
        f:close()
      end
      if port then
        break
      end
      aiorch.sleep(10)
    end
    assert.is_number(port)
    local r = run("single", { "openai" }, nil, nil, { max_attempts = 2, backoff_ms = 5 },
      { env_extra = { OPENAI_BASE_URL = "https://127.0.0.1:" .. port } })
    aiorch.process.kill(pid, "TERM")
    aiorch.process.wait(pid, 2000)
    os.execute("rm -rf '" .. dir .. "'")
    assert.equal("error", r.status)
    assert.equal("tls", r.metadata.error_kind)
    assert.matches("certificate", r.error_message)
    assert.equal(1, #r.metadata.attempts) -- a bad certificate is not worth another try
  end)

  it("an upstream body over max_response_bytes is refused as too_large", function()
    local r = run("single", { "openai" }, { text = string.rep("x", 4000) }, nil, nil,
      { env_extra = { OPENAI_POLICY = "max_response_bytes=1024" } })
    assert.equal("error", r.status)
    assert.equal("too_large", r.metadata.error_kind)
  end)
end)

describe("retries", function()
  it("retry a 500 up to max_attempts, with every attempt recorded", function()
    local r = run("single", { "openai" }, { fault = "500" }, nil, { max_attempts = 3, backoff_ms = 10 })
    assert.equal("error", r.status)
    assert.equal("server_error", r.metadata.error_kind)
    assert.equal(3, count("openai"))
    assert.equal(3, #r.metadata.attempts)
    for _, a in ipairs(r.metadata.attempts) do
      assert.same({ "openai", "error", "server_error", 500 }, { a.provider, a.status, a.kind, a.http_status })
      assert.is_number(a.latency_ms)
    end
    assert.equal(2, metrics.snapshot().openai.retries)
    no_keys_in(r)
  end)

  for _, f in ipairs { "401", "malformed" } do
    it("never retry " .. f, function()
      local r = run("single", { "openai" }, { fault = f }, nil, { max_attempts = 3, backoff_ms = 10 })
      assert.equal("error", r.status)
      assert.equal(1, count("openai"))
      assert.equal(1, #r.metadata.attempts)
    end)
  end

  it("retry timeouts and cut streams", function()
    local r = run("single", { "openai" }, { fault = "hang" }, nil,
      { max_attempts = 2, backoff_ms = 10, timeout_ms = 50 })
    assert.equal("timeout", r.status)
    assert.equal(2, #r.metadata.attempts)
    r = run("single", { "openai" }, { fault = "cut" }, nil, { max_attempts = 2, backoff_ms = 10 })
    assert.equal(2, #r.metadata.attempts)
  end)

  it("honour Retry-After (seconds) before the next attempt", function()
    local r, took = run("single", { "openai" }, { fault = "429", retry_after = 1 }, nil,
      { max_attempts = 2, backoff_ms = 10 })
    -- the breaker opened for that second too, so the second attempt is not made early:
    -- the call stops instead of waiting past what the provider asked
    assert.equal("rate_limited", r.metadata.error_kind)
    assert.is_true(took < 1000 or #r.metadata.attempts == 2)
  end)

  it("wait the Retry-After when the breaker is told to ignore it", function()
    -- With no breaker (failures 0 only stops counting; a 429 still cools), a
    -- retry after Retry-After must wait at least that long.
    local ms = policy.backoff_ms(policy.defaults, 1, 2)
    assert.is_true(ms >= 2000)
    ms = policy.backoff_ms(policy.defaults, 1, "Wed, 21 Oct 2015 07:28:00 GMT") -- a date past
    assert.is_true(ms >= 0 and ms <= policy.defaults.backoff_ms)
  end)

  it("backoff is full jitter under an exponential ceiling, capped", function()
    local pol = policy.for_provider { backoff_ms = 100, backoff_max_ms = 1000 }
    for n = 1, 8 do
      local ceiling = math.min(1000, 100 * 2 ^ (n - 1))
      local lo, hi = math.huge, 0
      for _ = 1, 200 do
        local w = policy.backoff_ms(pol, n)
        lo, hi = math.min(lo, w), math.max(hi, w)
      end
      assert.is_true(lo >= 0 and hi <= ceiling)
      assert.is_true(hi > ceiling / 2 and lo < ceiling / 2) -- spread over [0, ceiling]
    end
  end)

  it("stop when the retry budget would be spent", function()
    local r, took = run("single", { "openai" }, { fault = "500" }, nil,
      { max_attempts = 10, backoff_ms = 100, backoff_max_ms = 100, retry_budget_ms = 150 },
      { env_extra = { OPENAI_POLICY = "breaker_failures=0" } })
    assert.is_true(#r.metadata.attempts < 10)
    assert.is_true(took < 150 + stretch(50), took)
    assert.equal("retry budget spent", r.metadata.attempts[#r.metadata.attempts].note)
  end)

  it("never retry once a token reached the caller", function()
    local seen = 0
    local r = run("single", { "openai" }, { fault = "cut", chunks = 6 }, nil, { max_attempts = 3, backoff_ms = 10 },
      { stream = true, on_token = function() seen = seen + 1 end })
    assert.equal("stream_cut", r.metadata.error_kind)
    assert.equal(1, #r.metadata.attempts)
    assert.is_true(seen > 0)
  end)

  it("a fallback lists the retries of each provider in order", function()
    local r = run("fallback", { "openai", "anthropic" }, { fault = "500" }, nil, { max_attempts = 2, backoff_ms = 5 })
    assert.equal("success", r.status)
    local seq = {}
    for i, a in ipairs(r.metadata.attempts) do
      seq[i] = a.provider .. ":" .. a.status
    end
    assert.same({ "openai:error", "openai:error", "anthropic:success" }, seq)
  end)

  it("a request may not change the breaker or the response cap", function()
    local r, _, err = run("single", { "openai" }, nil, nil, { max_response_bytes = 1 })
    assert.is_nil(r)
    assert.matches("policy.max_response_bytes: set per provider only", err)
    r, _, err = run("single", { "openai" }, nil, nil, { max_attempts = 0 })
    assert.is_nil(r)
    assert.matches("policy.max_attempts: must be an integer from 1 to 10 (got 0)", err, 1, true)
    r, _, err = run("single", { "openai" }, nil, nil, { retries = 3 })
    assert.is_nil(r)
    assert.matches("unknown field 'retries'", err)
  end)

  it("a provider's policy comes from <NAME>_POLICY; a bad one makes it unavailable, with the reason", function()
    local r = run("single", { "openai" }, { fault = "500" }, nil, nil,
      { env_extra = { OPENAI_POLICY = "max_attempts=2,backoff_ms=5" } })
    assert.equal(2, #r.metadata.attempts)
    r = run("single", { "openai" }, nil, nil, nil, { env_extra = { OPENAI_POLICY = "max_attempts=none" } })
    assert.equal("unavailable", r.metadata.error_kind)
    assert.matches("OPENAI_POLICY.max_attempts: must be an integer", r.error_message)
  end)
end)

describe("circuit breaker", function()
  local COOLDOWN = stretch(200)
  local POL = "breaker_failures=3,breaker_window_ms=10000,cooldown_ms=" .. COOLDOWN

  it("opens after N failures in the window, skips the provider, then one trial closes it", function()
    local extra = { OPENAI_POLICY = POL }
    for _ = 1, 3 do
      local r = run("single", { "openai" }, { fault = "500" }, nil, nil, { env_extra = extra })
      assert.equal("server_error", r.metadata.error_kind)
    end
    assert.equal(3, count("openai"))
    assert.is_false(breaker.health("openai").healthy)
    -- open: refused at once, without a request
    local r, took = run("single", { "openai" }, nil, nil, nil, { env_extra = extra })
    assert.equal("cooldown", r.metadata.error_kind)
    assert.matches("openai is cooling down for %d+ ms more", r.error_message)
    assert.is_true(took < stretch(5), took)
    assert.equal(3, count("openai"))
    -- a fallback passes it over without a request
    r = run("fallback", { "openai", "anthropic" }, nil, nil, nil, { env_extra = extra })
    assert.equal("anthropic", r.ia_provider_name)
    assert.equal("cooldown", r.metadata.attempts[1].kind)
    assert.equal(3, count("openai"))
    -- after the cooldown: half-open; one trial; success closes it
    aiorch.sleep(COOLDOWN + 10)
    assert.equal("half_open", breaker.health("openai").state)
    r = run("single", { "openai" }, nil, nil, nil, { env_extra = extra })
    assert.equal("success", r.status)
    assert.equal("closed", breaker.health("openai").state)
    assert.equal(4, count("openai"))
  end)

  it("half-open lets one trial through; its failure opens the breaker again", function()
    local extra = { OPENAI_POLICY = POL }
    for _ = 1, 3 do
      run("single", { "openai" }, { fault = "500" }, nil, nil, { env_extra = extra })
    end
    aiorch.sleep(COOLDOWN + 10)
    -- two at once: the trial (slow, then fails) and one refused meanwhile
    local env = env_for({ fault = "500", latency_ms = 50 }, nil, extra)
    local t1 = aiorch.spawn(run, "single", { "openai" }, nil, nil, nil, { env = env })
    local t2 = aiorch.spawn(run, "single", { "openai" }, nil, nil, nil, { env = env })
    local r1, r2 = t1:await(), t2:await()
    assert.equal("server_error", r1.metadata.error_kind)
    assert.equal("cooldown", r2.metadata.error_kind)
    assert.matches("a trial request is deciding", r2.error_message)
    assert.equal("open", breaker.health("openai").state)
    assert.equal(4, count("openai"))
  end)

  it("an open breaker ignores the outcome of a call let through before it opened", function()
    local extra = { OPENAI_POLICY = POL }
    -- a slow success in flight while three quick failures open the breaker
    local slow = aiorch.spawn(run, "single", { "openai" }, { latency_ms = stretch(150) }, nil, nil,
      { env_extra = extra })
    aiorch.sleep(10)
    for _ = 1, 3 do
      run("single", { "openai" }, { fault = "500" }, nil, nil, { env_extra = extra })
    end
    assert.equal("open", breaker.health("openai").state)
    assert.equal("success", slow:await().status)
    assert.equal("open", breaker.health("openai").state) -- stale: it was let through before
    local r = run("single", { "openai" }, nil, nil, nil, { env_extra = extra })
    assert.equal("cooldown", r.metadata.error_kind)
  end)

  it("a 429 with Retry-After cools the provider for that long", function()
    local r = run("single", { "openai" }, { fault = "429", retry_after = 1 })
    assert.equal("rate_limited", r.metadata.error_kind)
    local h = breaker.health("openai")
    assert.is_false(h.healthy)
    assert.is_true(h.cooldown_ms > 1000 - stretch(100) and h.cooldown_ms <= 1000, h.cooldown_ms)
    r = run("single", { "openai" })
    assert.equal("cooldown", r.metadata.error_kind)
    assert.matches("it asked to wait 1 s", r.error_message)
  end)

  it("does not count a refused key or a bad request against the provider", function()
    for _ = 1, 6 do
      run("single", { "openai" }, { fault = "401" })
    end
    assert.is_true(breaker.health("openai").healthy)
  end)

  it("strategies see a cooling provider as unhealthy", function()
    -- the strategy's file first: the shell it takes must not use up the cooldown
    local d = os.tmpname()
    os.remove(d)
    assert(os.execute("mkdir -p '" .. d .. "/strategies'"))
    local f = assert(io.open(d .. "/strategies/healthy_first.lua", "w"))
    f:write([[
return function(_, providers, ctx)
  for _, p in ipairs(providers) do
    if ctx.health(p).healthy then
      return ctx.call(p)
    end
  end
  return ctx.error_response(providers[1], "unavailable", "none healthy")
end
]])
    f:close()
    for _ = 1, 3 do
      run("single", { "openai" }, { fault = "500" }, nil, nil, { env_extra = { OPENAI_POLICY = POL } })
    end
    local r = run("healthy_first", { "openai", "anthropic" }, nil, nil, nil, { path = { d } })
    os.execute("rm -rf '" .. d .. "'")
    assert.equal("anthropic", r.ia_provider_name)
    assert.equal(3, count("openai"))
  end)
end)

describe("hedged", function()
  it("hedges the next provider after the delay; the first success wins, the other is cancelled #timing", function()
    local r, took = run("hedged", { "openai", "anthropic" }, { latency_ms = 400 }, { latency_ms = 20 },
      { hedge_delay_ms = 50 })
    assert.equal("success", r.status)
    assert.equal("anthropic", r.ia_provider_name)
    assert.is_true(took >= 65 and took < 150, took)
    assert.same({ "openai", "cancelled" }, { r.metadata.attempts[1].provider, r.metadata.attempts[1].status })
    assert.equal(1, metrics.snapshot().anthropic.hedges)
    -- openai's transfer was aborted: the mock saw its client go
    local ok = false
    for _ = 1, 50 do
      for _, q in ipairs(m.requests) do
        ok = ok or (q.api == "openai" and q.aborted_at ~= nil)
      end
      if ok then
        break
      end
      aiorch.sleep(2)
    end
    assert.is_true(ok)
  end)

  it("does not hedge a provider that answers within the delay", function()
    local r = run("hedged", { "openai", "anthropic" }, { latency_ms = 10 }, nil, { hedge_delay_ms = stretch(100) })
    assert.equal("openai", r.ia_provider_name)
    assert.equal(0, count("anthropic"))
  end)

  it("starts the next provider at once when the first fails", function()
    local r, took = run("hedged", { "openai", "anthropic" }, { fault = "500" }, { latency_ms = 10 },
      { hedge_delay_ms = stretch(1000) })
    assert.equal("anthropic", r.ia_provider_name)
    assert.is_true(took < stretch(100), took)
    assert.equal(0, metrics.snapshot().anthropic.hedges) -- a fallback, not a hedge
  end)

  it("delays by the provider's observed p95 when no delay is set #timing", function()
    for _ = 1, 20 do
      run("single", { "openai" }, { latency_ms = 30 })
    end
    local p95 = metrics.latency("openai").p95
    assert.is_true(p95 >= 30 and p95 < 60)
    local r, took = run("hedged", { "openai", "anthropic" }, { latency_ms = 300 }, { latency_ms = 10 })
    assert.equal("anthropic", r.ia_provider_name)
    assert.is_true(took >= p95 + 10 and took < p95 + 80, took)
  end)

  it("keeps the extra requests within the hedge budget", function()
    local n = 40
    local tasks = {}
    for i = 1, n do
      tasks[i] = aiorch.spawn(run, "hedged", { "openai", "anthropic" }, { latency_ms = 100 }, { latency_ms = 10 },
        { hedge_delay_ms = 20, hedge_budget = 0.1 })
    end
    local values = aiorch.gather(tasks)
    for i = 1, n do
      assert.equal("success", values[i].status)
    end
    local hedges = metrics.snapshot().anthropic.hedges
    -- a saved burst (at most 10, maybe spent by earlier cases) plus 10% of 40
    assert.is_true(hedges <= 10 + 4, hedges)
    assert.equal(hedges, count("anthropic"))
  end)

  it("all failing gives one error naming each", function()
    local r = run("hedged", { "openai", "anthropic" }, { fault = "500" }, { fault = "529" }, { hedge_delay_ms = 20 })
    assert.equal("all_failed", r.metadata.error_kind)
    assert.equal(2, #r.metadata.attempts)
  end)
end)

describe("the cost of cancelled work", function()
  it("counts the tokens a cancelled race loser had reported", function()
    -- anthropic's message_start reports input tokens; it then streams slowly and loses
    local r = run("fastest", { "openai", "anthropic" }, { latency_ms = stretch(30) },
      { chunk_delay_ms = stretch(300) }, nil, { stream = true, on_token = function() end })
    assert.equal("openai", r.ia_provider_name)
    local s = metrics.snapshot().anthropic
    assert.is_true(s.tokens_wasted_in > 0, "wasted input tokens")
    assert.equal(1, s.cancelled)
  end)

  it("counts the tokens of a stream cut after its first token", function()
    local r = run("single", { "anthropic" }, nil, { fault = "cut", chunks = 6 }, nil,
      { stream = true, on_token = function() end })
    assert.equal("stream_cut", r.metadata.error_kind)
    assert.is_true(metrics.snapshot().anthropic.tokens_wasted_in > 0)
    assert.is_string(r.metadata.partial_text)
  end)
end)
