-- Every strategy end to end over real loopback sockets against the mock
-- providers, with each injected fault. Runs inside the runtime.
local aiorch = require "aiorch"
local cjson = require "cjson.safe"
local orchestrate = require "aiorch.orchestrate"
local metrics = require "aiorch.metrics"
local breaker = require "aiorch.breaker"
local call = require "aiorch.call"
local response = require "aiorch.response"
local support = require "tests.support"

local KEYS = { openai = "sk-test-strategies-openai-0001", anthropic = "sk-ant-test-strategies-0002" }
local QUESTION = "What is two plus two?"

local m

local function env_for(o, a, extra)
  return support.mock_env(m, KEYS, o, a, extra)
end

local function run(strategy, providers, o, a, opts, req)
  opts = opts or {}
  opts.env = opts.env or env_for(o, a, opts.env_extra)
  return orchestrate.orchestrate(req or { user_question = QUESTION }, strategy, providers, opts)
end

local function requests_of(api)
  return support.requests_of(m, api)
end

local function no_keys_in(v)
  support.no_keys_in(type(v) == "string" and v or response.encode(v), KEYS)
end

-- Polls (yielding) until pred() or ms pass.
local function wait_for(pred, ms)
  return support.wait_for(pred, ms, 2)
end

local function tmpdir()
  local d = os.tmpname()
  os.remove(d)
  assert(os.execute("mkdir -p '" .. d .. "/strategies' '" .. d .. "/providers' '" .. d .. "/prompts'"))
  return d
end

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

support.use_mock(function(mock) m = mock end)

describe("single", function()
  it("gets an answer from openai, with the documented wire request", function()
    local r = assert(run("single", { "openai" }, { latency_ms = 30 }))
    assert.equal("success", r.status)
    assert.equal("openai", r.ia_provider_name)
    assert.matches("two plus two", r.response_text)
    assert.is_nil(r.error_message)
    assert.is_true(r.latency_ms >= 30)
    local md = r.metadata
    assert.equal("gpt-4o-mini", md.model)
    assert.equal(200, md.http_status)
    assert.equal("stop", md.finish_reason)
    assert.is_true(md.usage.input_tokens > 0 and md.usage.output_tokens > 0)
    assert.is_true(md.cost_usd > 0)

    local reqs = requests_of("openai")
    assert.equal(1, #reqs)
    local w = reqs[1]
    assert.equal("POST", w.method)
    assert.equal("/v1/chat/completions", w.path)
    assert.equal("Bearer " .. KEYS.openai, w.headers["authorization"])
    assert.matches("^application/json", w.headers["content-type"])
    assert.equal("gpt-4o-mini", w.json.model)
    assert.equal("system", w.json.messages[1].role)
    assert.equal("user", w.json.messages[2].role)
    assert.equal(QUESTION, w.json.messages[2].content)
    assert.is_nil(w.json.stream)
    no_keys_in(r)
  end)

  it("gets an answer from anthropic, with the documented wire request", function()
    local r = assert(run("single", { "anthropic" }, nil, nil, nil,
      { user_question = QUESTION, context = "Arithmetic in base ten.", temperature = 0.2, max_tokens = 64 }))
    assert.equal("success", r.status)
    assert.equal("anthropic", r.ia_provider_name)
    assert.equal("claude-3-haiku-20240307", r.metadata.model)
    assert.equal("stop", r.metadata.finish_reason) -- end_turn, normalised (docs/canonical.md)
    local w = requests_of("anthropic")[1]
    assert.equal("/v1/messages", w.path)
    assert.equal(KEYS.anthropic, w.headers["x-api-key"])
    assert.equal("2023-06-01", w.headers["anthropic-version"])
    assert.equal(64, w.json.max_tokens)
    assert.equal(0.2, w.json.temperature)
    -- The default prompt builder made the system prompt from the context, so
    -- the user turn carries only the question: the context is sent once.
    assert.is_string(w.json.system)
    assert.matches("Arithmetic in base ten.", w.json.system, 1, true)
    assert.equal(QUESTION, w.json.messages[1].content)
  end)

  it("sends max_tokens 1024 to anthropic when none is given", function()
    assert.equal("success", run("single", { "anthropic" }).status)
    assert.equal(1024, requests_of("anthropic")[1].json.max_tokens)
  end)

  it("uses the caller's system prompt as is", function()
    run("single", { "openai" }, nil, nil, nil, { user_question = "q", system_prompt = "Talk like a pirate." })
    assert.equal("Talk like a pirate.", requests_of("openai")[1].json.messages[1].content)
  end)

  it("gives an error response, not a crash, for an unavailable provider", function()
    local env = env_for()
    env.ANTHROPIC_API_KEY = nil
    local r = assert(run("single", { "anthropic" }, nil, nil, { env = env }))
    assert.equal("error", r.status)
    assert.equal("unavailable", r.metadata.error_kind)
    assert.matches("ANTHROPIC_API_KEY is not set", r.error_message)
    assert.equal(0, #m.requests)
  end)

  it("maps a refused connection to connect", function()
    local env = env_for()
    env.OPENAI_BASE_URL = "http://127.0.0.1:1/v1"
    local r = assert(run("single", { "openai" }, nil, nil, { env = env }))
    assert.equal("error", r.status)
    assert.equal("connect", r.metadata.error_kind)
  end)

  describe("injected faults", function()
    local FAULTS = {
      { fault = "429", retry_after = 7, kind = "rate_limited", http = 429 },
      { fault = "500", kind = "server_error", http = 500 },
      { fault = "529", kind = "server_error", http = 529 },
      { fault = "401", kind = "auth", http = 401 },
      { fault = "malformed", kind = "parse", http = 200 },
      { fault = "error200", kind = "server_error", http = 200 },
    }
    for _, api in ipairs({ "openai", "anthropic" }) do
      for _, f in ipairs(FAULTS) do
        for _, stream in ipairs({ false, true }) do
          it(("%s %s%s -> %s"):format(api, f.fault, stream and " (stream)" or "", f.kind), function()
            local d = { fault = f.fault, retry_after = f.retry_after }
            local tokens = {}
            local r = assert(run("single", { api }, d, d,
              { stream = stream, on_token = function(t) tokens[#tokens + 1] = t end }))
            assert.equal("error", r.status)
            assert.equal(api, r.ia_provider_name)
            assert.equal(f.kind, r.metadata.error_kind)
            assert.equal("", r.response_text)
            assert.is_string(r.error_message)
            assert.falsy(r.error_message:find("\n"))
            if f.http ~= 200 or not stream then
              assert.equal(f.http, r.metadata.http_status)
            end
            if f.retry_after then
              assert.equal(f.retry_after, r.metadata.retry_after)
            end
            no_keys_in(r)
          end)
        end
      end

      it(api .. " hang -> timeout", function()
        local t0 = aiorch.now()
        local r = assert(run("single", { api }, { fault = "hang" }, { fault = "hang" },
          { env_extra = { AIORCH_TIMEOUT_MS = "250" } }))
        local took = aiorch.now() - t0
        assert.equal("timeout", r.status)
        assert.equal("timeout", r.metadata.error_kind)
        assert.is_true(took >= 240 and took < 1500, "took " .. took)
        -- The mock sees the timed-out client go away.
        assert.is_true(wait_for(function() return requests_of(api)[1].aborted_at ~= nil end, 500))
      end)

      it(api .. " cut mid-body -> error, never a truncated success", function()
        local r = assert(run("single", { api }, { fault = "cut" }, { fault = "cut" }))
        assert.equal("error", r.status)
        assert.is_string(r.metadata.error_kind)
      end)

      it(api .. " stream cut mid-way -> stream_cut", function()
        local tokens = {}
        local r = assert(run("single", { api }, { fault = "cut", chunks = 6 }, { fault = "cut", chunks = 6 },
          { stream = true, on_token = function(t) tokens[#tokens + 1] = t end }))
        assert.equal("error", r.status)
        assert.equal("stream_cut", r.metadata.error_kind)
        assert.is_true(#tokens > 0, "some tokens arrived before the cut")
      end)

      it(api .. " streams tokens as they arrive", function()
        local tokens, first_at = {}, nil
        local t0 = aiorch.now()
        local d = { chunks = 4, chunk_delay_ms = 40 }
        local r = assert(run("single", { api }, d, d, { stream = true, on_token = function(t, p)
            assert.equal(api, p)
            first_at = first_at or aiorch.now()
            tokens[#tokens + 1] = t
          end }))
        local t_end = aiorch.now()
        assert.equal("success", r.status)
        assert.is_true(#tokens >= 2)
        assert.equal(r.response_text, table.concat(tokens))
        assert.is_true(first_at - t0 < t_end - t0 - 60, "the first token came well before the end")
        assert.is_true(r.metadata.usage.input_tokens > 0 and r.metadata.usage.output_tokens > 0)
        assert.is_string(r.metadata.finish_reason)
        assert.is_true(requests_of(api)[1].json.stream)
      end)
    end
  end)
end)

describe("parallel", function()
  it("calls every provider at once; the list keeps provider order; wall time = the slowest #timing", function()
    local t0 = aiorch.now()
    local list = assert(run("parallel", nil, { latency_ms = 200 }, { latency_ms = 120 }))
    local wall = aiorch.now() - t0
    assert.equal(2, #list)
    assert.equal("openai", list[1].ia_provider_name)
    assert.equal("anthropic", list[2].ia_provider_name)
    assert.equal("success", list[1].status)
    assert.equal("success", list[2].status)
    assert.is_true(wall >= 195 and wall < 300, "wall " .. wall)
  end)

  it("follows the given order", function()
    local list = assert(run("parallel", { "anthropic", "openai" }))
    assert.equal("anthropic", list[1].ia_provider_name)
    assert.equal("openai", list[2].ia_provider_name)
  end)

  it("keeps the others intact when one fails", function()
    local list = assert(run("parallel", nil, { fault = "500" }, { latency_ms = 20 }))
    assert.equal("error", list[1].status)
    assert.equal("server_error", list[1].metadata.error_kind)
    assert.equal("success", list[2].status)
  end)

  it("returns every failure when all fail", function()
    local list = assert(run("parallel", nil, { fault = "401" }, { fault = "529" }))
    assert.equal("auth", list[1].metadata.error_kind)
    assert.equal("server_error", list[2].metadata.error_kind)
  end)
end)

describe("fallback", function()
  it("is the default strategy and stops at the first success", function()
    local r = assert(orchestrate.orchestrate({ user_question = QUESTION }, nil, nil, { env = env_for() }))
    assert.equal("success", r.status)
    assert.equal("openai", r.ia_provider_name)
    assert.equal(1, #r.metadata.attempts)
    assert.equal(0, #requests_of("anthropic"))
  end)

  it("moves on after a 429 and records every attempt", function()
    local r = assert(run("fallback", nil, { fault = "429", retry_after = 3 }, { latency_ms = 10 }))
    assert.equal("success", r.status)
    assert.equal("anthropic", r.ia_provider_name)
    local a = r.metadata.attempts
    assert.equal(2, #a)
    assert.same({ provider = "openai", status = "error", kind = "rate_limited", http_status = 429,
      retry_after = 3, latency_ms = a[1].latency_ms,
      provider_error = { type = "requests", code = "rate_limit_exceeded" } }, a[1])
    assert.equal("anthropic", a[2].provider)
    assert.equal("success", a[2].status)
    assert.equal(200, a[2].http_status)
    assert.equal(1, metrics.snapshot().anthropic.fallback_activations)
  end)

  for _, f in ipairs({ "500", "529", "401", "malformed", "cut", "error200" }) do
    it("moves on after " .. f, function()
      local r = assert(run("fallback", nil, { fault = f }))
      assert.equal("success", r.status)
      assert.equal("anthropic", r.ia_provider_name)
      assert.equal("error", r.metadata.attempts[1].status)
    end)
  end

  it("moves on after a timeout", function()
    local r = assert(run("fallback", nil, { fault = "hang" }, nil, { env_extra = { OPENAI_TIMEOUT_MS = "200" } }))
    assert.equal("success", r.status)
    assert.equal("anthropic", r.ia_provider_name)
    assert.equal("timeout", r.metadata.attempts[1].status)
  end)

  it("ends a stream cut after its first token with an error holding the partial text", function()
    local seen = {}
    local r = assert(run("fallback", nil, { fault = "cut", chunks = 6 }, nil,
      { stream = true, on_token = function(t, p) seen[#seen + 1] = p .. ":" .. t end }))
    assert.equal("error", r.status)
    assert.equal("openai", r.ia_provider_name)
    assert.equal("stream_cut", r.metadata.error_kind)
    assert.equal(1, #r.metadata.attempts)
    assert.is_true(#seen > 0)
    local sent = {}
    for i, s in ipairs(seen) do
      assert.matches("^openai:", s) -- nothing from anthropic reached the caller
      sent[i] = s:sub(8)
    end
    assert.equal(table.concat(sent), r.metadata.partial_text)
  end)

  it("moves on after a stream fails before its first token, unseen by the caller", function()
    local seen = {}
    local r = assert(run("fallback", nil, { fault = "500" }, nil,
      { stream = true, on_token = function(t) seen[#seen + 1] = t end }))
    assert.equal("success", r.status)
    assert.equal("anthropic", r.ia_provider_name)
    assert.equal(r.response_text, table.concat(seen))
  end)

  it("continues a cut stream on the next provider with continue_on_cut", function()
    local seen = {}
    local r = assert(run("fallback", nil, { fault = "cut", chunks = 6 }, nil,
      { stream = true, on_token = function(t) seen[#seen + 1] = t end, policy = { continue_on_cut = true } }))
    assert.equal("success", r.status)
    assert.equal("anthropic", r.ia_provider_name)
    assert.equal("openai", r.metadata.continued_from)
    assert.equal(r.response_text, table.concat(seen))
    assert.matches("^Hello from the mock openai", r.response_text)
    assert.same({ "stream_cut", nil }, { r.metadata.attempts[1].kind, r.metadata.attempts[2].kind })
    -- anthropic was sent the partial answer to go on from
    local sent = requests_of("anthropic")
    local body = cjson.decode(sent[#sent].body)
    assert.equal("assistant", body.messages[2].role)
    local partial = body.messages[2].content
    assert.equal(partial, r.response_text:sub(1, #partial))
  end)

  it("names each failure when all fail", function()
    local r = assert(run("fallback", nil, { fault = "500" }, { fault = "529" }))
    assert.equal("error", r.status)
    assert.equal("all_failed", r.metadata.error_kind)
    assert.matches("openai: server_error %(HTTP 500", r.error_message)
    assert.matches("anthropic: server_error %(HTTP 529", r.error_message)
    assert.equal(2, #r.metadata.attempts)
    no_keys_in(r)
  end)

  it("says timeout when every provider timed out", function()
    local r = assert(run("fallback", nil, { fault = "hang" }, { fault = "hang" },
      { env_extra = { AIORCH_TIMEOUT_MS = "150" } }))
    assert.equal("timeout", r.status)
    assert.equal(2, #r.metadata.attempts)
  end)

  it("explains a missing key instead of calling", function()
    local env = env_for()
    env.OPENAI_API_KEY, env.ANTHROPIC_API_KEY = nil, nil
    local r = assert(run("fallback", nil, nil, nil, { env = env }))
    assert.equal("error", r.status)
    assert.matches("OPENAI_API_KEY is not set", r.error_message)
    assert.matches("ANTHROPIC_API_KEY is not set", r.error_message)
    assert.equal(0, #m.requests)
  end)

  it("skips to the available provider by default", function()
    local env = env_for()
    env.OPENAI_API_KEY = nil
    local r = assert(run("fallback", nil, nil, nil, { env = env }))
    assert.equal("anthropic", r.ia_provider_name)
    assert.equal(1, #r.metadata.attempts)
  end)
end)

describe("fastest", function()
  it("returns the first success and closes the loser's connection at once", function()
    local t0 = aiorch.now()
    local r = assert(run("fastest", nil, { latency_ms = 400 }, { latency_ms = 40 }))
    local t_done = aiorch.now()
    assert.equal("success", r.status)
    assert.equal("anthropic", r.ia_provider_name)
    assert.is_true(t_done - t0 < 200, "took " .. (t_done - t0))
    local loser = requests_of("openai")[1]
    assert.is_not_nil(loser)
    assert.is_true(wait_for(function() return loser.aborted_at ~= nil end, 200), "the mock saw no abort")
    assert.is_true(loser.aborted_at - t_done < 25,
      ("aborted %.1f ms after the winner"):format(loser.aborted_at - t_done))
    assert.is_nil(loser.completed_at)
    local s = metrics.snapshot()
    assert.equal(1, s.anthropic.races_won)
    assert.equal(1, s.openai.races_lost)
    assert.equal(1, s.openai.cancelled)
    local a = r.metadata.attempts
    assert.equal("cancelled", a[1].status)
    assert.equal("success", a[2].status)
  end)

  it("waits for a success when the fastest fails", function()
    local r = assert(run("fastest", nil, { latency_ms = 60 }, { fault = "500" }))
    assert.equal("success", r.status)
    assert.equal("openai", r.ia_provider_name)
    assert.equal("server_error", r.metadata.attempts[2].kind)
  end)

  it("names each failure when all fail", function()
    local r = assert(run("fastest", nil, { fault = "429" }, { fault = "401" }))
    assert.equal("error", r.status)
    assert.matches("openai: rate_limited", r.error_message)
    assert.matches("anthropic: auth", r.error_message)
  end)

  it("streams the winner's tokens", function()
    local by = {}
    local r = assert(run("fastest", nil, { latency_ms = 300 }, { chunks = 3, chunk_delay_ms = 10 },
      { stream = true, on_token = function(t, p) by[p] = (by[p] or "") .. t end }))
    assert.equal("anthropic", r.ia_provider_name)
    assert.equal(r.response_text, by.anthropic)
    assert.is_nil(by.openai)
  end)
end)

describe("user extensions", function()
  local dir

  before_each(function()
    dir = tmpdir()
  end)

  after_each(function()
    os.execute("rm -rf '" .. dir .. "'")
  end)

  it("finds a new strategy by name on the path, with no rebuild", function()
    write(dir .. "/strategies/my_race.lua", [[
      -- Tries the providers in reverse priority order, using only ctx.
      return function(request, providers, ctx)
        local t0 = ctx.now()
        ctx.sleep(0)
        for i = #providers, 1, -1 do
          local p = providers[i]
          local h = ctx.health(p)
          local r = ctx.call(p)
          ctx.count(p, "races_won")
          if r.status == "success" then
            r.metadata.strategy_note = ("healthy=%s took=%.1f"):format(tostring(h.healthy), ctx.now() - t0)
            r.metadata.latency_count = ctx.latency(p).count
            ctx.log("debug", "answered by %s", p)
            return r
          end
        end
        return ctx.error_response(providers[1], "all_failed", "nobody")
      end
    ]])
    local r = assert(run("my_race", nil, nil, nil, { path = { dir } }))
    assert.equal("success", r.status)
    assert.equal("anthropic", r.ia_provider_name)
    assert.matches("healthy=true", r.metadata.strategy_note)
    assert.equal(1, r.metadata.latency_count)
    assert.equal(1, metrics.snapshot().anthropic.races_won)
  end)

  it("lets a user prompt builder replace the default", function()
    write(dir .. "/prompts/default.lua", [[
      return { build_system_prompt = function(ctx) return "CUSTOM PROMPT / " .. tostring(ctx) end }
    ]])
    run("single", { "openai" }, nil, nil, { path = { dir } }, { user_question = "q", context = "ctx-text" })
    assert.equal("CUSTOM PROMPT / ctx-text", requests_of("openai")[1].json.messages[1].content)
    assert.equal("q", requests_of("openai")[1].json.messages[2].content)
    m:reset()
    run("single", { "openai" }, nil, nil, { path = { dir }, context_info = "project-x" },
      { user_question = "q", context = "ctx-text" })
    local sent = requests_of("openai")[1].json.messages
    assert.equal("CUSTOM PROMPT / project-x", sent[1].content)
    assert.matches("ctx-text", sent[2].content, 1, true) -- not in the prompt: it goes with the question
  end)

  it("finds a new provider by name on the path", function()
    local root = require("aiorch").root
    write(dir .. "/providers/house.lua", ([[
      local base = dofile(%q)
      local a = {}
      for k, v in pairs(base) do a[k] = v end
      a.name, a.key_env, a.base_url_env, a.model_env = "house", "HOUSE_API_KEY", "HOUSE_BASE_URL", "HOUSE_MODEL"
      a.default_model = "house-model"
      return a
    ]]):format(root .. "/scripts/providers/openai.lua"))
    local env = env_for()
    env.HOUSE_API_KEY = "sk-house-key"
    env.HOUSE_BASE_URL = m:base_url("openai", {})
    local r = assert(run("single", { "house" }, nil, nil, { env = env, path = { dir } }))
    assert.equal("success", r.status)
    assert.equal("house", r.ia_provider_name)
    assert.equal("house-model", requests_of("openai")[1].json.model)
  end)

  it("turns a strategy that raises into an error response", function()
    write(dir .. "/strategies/boom.lua", "return function() error('kaboom') end\n")
    local r = assert(run("boom", nil, nil, nil, { path = { dir } }))
    assert.equal("error", r.status)
    assert.equal("strategy", r.metadata.error_kind)
    assert.is_nil(r.ia_provider_name) -- the strategy failed, not a provider
    assert.matches("kaboom", r.error_message)
    assert.equal(cjson.null, cjson.decode(response.encode(r)).ia_provider_name)
  end)

  it("turns a strategy that returns garbage into an error response", function()
    write(dir .. "/strategies/junk.lua", "return function() return 42 end\n")
    local r = assert(run("junk", nil, nil, nil, { path = { dir } }))
    assert.equal("error", r.status)
    assert.matches("returned number", r.error_message)
  end)

  it("turns an adapter that raises into an error response", function()
    write(dir .. "/providers/broken.lua", [[
      return { name = "broken", key_env = false, default_base_url = "http://127.0.0.1:1",
               build_request = function() error("no luck") end, parse_response = function() end }
    ]])
    local r = assert(run("single", { "broken" }, nil, nil, { path = { dir } }))
    assert.equal("error", r.status)
    assert.equal("adapter", r.metadata.error_kind)
    assert.matches("no luck", r.error_message)
  end)
end)

describe("concurrency", function()
  it("runs many orchestrations at once in one runtime #timing", function()
    local tasks = {}
    local strategies = { "single", "parallel", "fallback", "fastest" }
    for i = 1, 40 do
      local s = strategies[i % 4 + 1]
      tasks[i] = aiorch.spawn(function()
        return run(s, s == "single" and { "anthropic" } or nil, { latency_ms = 30 }, { latency_ms = 20 }, nil,
          { user_question = "question " .. i })
      end)
    end
    local t0 = aiorch.now()
    local values, _, messages = aiorch.gather(tasks)
    assert.is_true(aiorch.now() - t0 < 1000)
    for i = 1, 40 do
      assert.is_nil(messages[i])
      local r = values[i]
      local first = r.status and r or r[1]
      assert.equal("success", first.status)
      assert.matches("question " .. i .. "$", first.response_text)
    end
  end)
end)

describe("metrics", function()
  it("counts requests, successes, errors by kind, timeouts, latency, tokens and cost", function()
    run("single", { "openai" }, { latency_ms = 20 })
    run("single", { "openai" }, { fault = "429" })
    breaker.reset() -- the 429's Retry-After would skip openai for a second
    run("single", { "openai" }, { fault = "hang" }, nil, { env_extra = { AIORCH_TIMEOUT_MS = "100" } })
    run("single", { "anthropic" })
    local s = metrics.snapshot()
    local o = s.openai
    assert.equal(3, o.requests)
    assert.equal(1, o.successes)
    assert.equal(2, o.errors)
    assert.equal(1, o.timeouts)
    assert.equal(1, o.errors_by_kind.rate_limited)
    assert.equal(1, o.errors_by_kind.timeout)
    assert.equal(3, o.latency.count)
    assert.is_number(o.latency.p50)
    assert.is_number(o.latency.p95)
    assert.is_true(o.tokens_in > 0 and o.tokens_out > 0)
    assert.is_true(o.cost_usd > 0)
    assert.equal(3, o.latency.buckets[#o.latency.buckets].count)
    assert.equal("+Inf", o.latency.buckets[#o.latency.buckets].le)
    assert.equal(1, s.anthropic.successes)
    -- The snapshot is plain data.
    assert.is_string(cjson.encode(s))
  end)
end)

describe("call", function()
  it("scrubs a key quoted back by a provider", function()
    assert.equal("bad key [redacted] here", call.scrub("bad key " .. KEYS.openai .. " here", KEYS.openai))
    assert.equal("one line", call.scrub("one\nline", nil))
  end)
end)
