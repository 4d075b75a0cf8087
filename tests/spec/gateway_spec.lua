-- The gateway (`aiorch serve`) over real loopback sockets, with the mock
-- providers behind it: in-process gateways for each configuration, and one
-- real `aiorch serve` subprocess. Runs inside the runtime.
local aiorch = require "aiorch"
local cjson = require "cjson.safe"
local support = require "tests.support"
local mock_mod = require "aiorch.mock"
local gateway = require "aiorch.gateway.server"
local gconfig = require "aiorch.gateway.config"
local metrics = require "aiorch.metrics"
local breaker = require "aiorch.breaker"

local ROOT = debug.getinfo(1, "S").source:match("^@(.*)/tests/spec/[^/]+$") or "."
local BUILD = os.getenv("AIORCH_BUILD") or (ROOT .. "/build")
local BIN = BUILD .. "/aiorch"
local FIXTURES = ROOT .. "/tests/fixtures/gateway"

local KEYS = { openai = "sk-gw-spec-openai-5151", anthropic = "sk-ant-gw-spec-6262" }
local CLIENT_KEY = "gw-client-secret-7373"
local QUESTION = "What is two plus two?"
local SECRET_PROMPT = "the-prompt-text-must-not-be-logged"

local m -- the mock providers
local logs = {} -- access log lines

local q = support.sh_quote

-- Starts an in-process gateway. o, a: mock directives for openai and
-- anthropic; raw: the config table; extra: more env variables.
local function start_gw(raw, o, a, extra)
  local env = {
    OPENAI_API_KEY = KEYS.openai, ANTHROPIC_API_KEY = KEYS.anthropic,
    OPENAI_BASE_URL = m:base_url("openai", o), ANTHROPIC_BASE_URL = m:base_url("anthropic", a),
  }
  for k, v in pairs(extra or {}) do
    env[k] = v
  end
  -- The model "any" is a fallback over both providers, each with its own
  -- model: most tests here are about what happens across providers.
  raw = raw or {}
  raw.aliases = raw.aliases or {}
  raw.aliases.any = raw.aliases.any or { providers = { "openai", "anthropic" } }
  return support.start_gateway(raw, env, function(l) logs[#logs + 1] = l end)
end

-- request(base, method, path, body, headers) -> status, headers, body, json
local function request(base, method, path, body, headers)
  local h = { ["content-type"] = "application/json" }
  for k, v in pairs(headers or {}) do
    h[k] = v
  end
  if type(body) == "table" then
    body = assert(cjson.encode(body))
  end
  local status, rh, rb = aiorch.http.request { method = method, url = base .. path, headers = h, body = body,
    timeout_ms = 10000 }
  assert(status, "request failed: " .. tostring(rh) .. " " .. tostring(rb))
  return status, rh, rb, cjson.decode(rb or "")
end

local function post(base, path, body, headers)
  return request(base, "POST", path, body, headers)
end

-- Parses a whole SSE body into {event = name|nil, data = text} records.
local sse = support.sse

local function requests_of(api)
  return support.requests_of(m, api)
end

local wait_for = support.wait_for

local function no_keys_in(text)
  support.no_keys_in(text, KEYS, "a provider key")
  support.no_keys_in(text, { CLIENT_KEY }, "a client key")
end

local function chat(model, extra)
  local body = { model = model or "any", messages = { { role = "user", content = QUESTION } } }
  return support.merge(body, extra)
end

local function msgs(model, extra)
  local body = { model = model or "any", max_tokens = 64,
                 messages = { { role = "user", content = QUESTION } } }
  return support.merge(body, extra)
end

local OPENAI_TEXT = "Hello from the mock openai provider. You asked: " .. QUESTION
local ANTHROPIC_TEXT = "Hello from the mock anthropic provider. You asked: " .. QUESTION

-- The text of an OpenAI stream, and its events; checks the framing.
local function openai_stream(body)
  local evs = sse(body)
  assert.is_true(#evs >= 3, body)
  local text, finish, usage = {}, nil, nil
  assert.equal("assistant", evs[1].json.choices[1].delta.role)
  for i, ev in ipairs(evs) do
    if ev.data == "[DONE]" then
      assert.equal(#evs, i, "[DONE] is last")
    else
      assert.is_table(ev.json, ev.data)
      assert.equal("chat.completion.chunk", ev.json.object)
      local c = ev.json.choices[1]
      if c then
        text[#text + 1] = type(c.delta.content) == "string" and c.delta.content or nil
        if c.finish_reason ~= cjson.null then
          finish = c.finish_reason
        end
      end
      if type(ev.json.usage) == "table" then
        usage = ev.json.usage
      end
    end
  end
  return table.concat(text), finish, evs, usage
end

-- The text of an Anthropic stream; checks the event sequence.
local function anthropic_stream(body)
  local evs = sse(body)
  local names = {}
  local text = {}
  for i, ev in ipairs(evs) do
    names[i] = ev.event
    assert.is_table(ev.json, ev.data)
    assert.equal(ev.event, ev.json.type)
    if ev.event == "content_block_delta" then
      text[#text + 1] = ev.json.delta.text
    end
  end
  return table.concat(text), names, evs
end

local function assert_anthropic_sequence(names)
  local kept = {} -- Anthropic streams pings anywhere (the mock too, as the API does)
  for _, n in ipairs(names) do
    if n ~= "ping" then
      kept[#kept + 1] = n
    end
  end
  names = kept
  assert.equal("message_start", names[1])
  assert.equal("content_block_start", names[2])
  local i = 3
  while names[i] == "content_block_delta" do
    i = i + 1
  end
  assert.is_true(i > 3, "at least one delta")
  assert.same({ "content_block_stop", "message_delta", "message_stop" }, { names[i], names[i + 1], names[i + 2] })
  assert.equal(i + 2, #names)
end

setup(function()
  m = assert(mock_mod.start { host = "127.0.0.1", port = 0 })
end)

teardown(function()
  support.close_gateways()
  m:close()
end)

before_each(function()
  m:reset()
  metrics.reset()
  breaker.reset() -- each case starts with every provider healthy
  for i = #logs, 1, -1 do
    logs[i] = nil
  end
end)

describe("POST /v1/chat/completions", function()
  it("answers in OpenAI's shape, with the X-Aiorch headers", function()
    local base = start_gw()
    local body = chat("gpt-4o-mini", { temperature = 0.5, max_tokens = 50,
      messages = {
        { role = "system", content = "Be brief." },
        { role = "user", content = "Hi" },
        { role = "assistant", content = "Hello!" },
        { role = "user", content = QUESTION },
      } })
    local status, h, raw, doc = post(base, "/v1/chat/completions", body)
    assert.equal(200, status, raw)
    assert.matches("^application/json", h["content-type"])
    assert.equal("openai", h["x-aiorch-provider"])
    assert.equal("fallback", h["x-aiorch-strategy"])
    assert.equal("chat.completion", doc.object)
    assert.matches("^chatcmpl%-", doc.id)
    assert.equal("gpt-4o-mini", doc.model)
    assert.equal("assistant", doc.choices[1].message.role)
    assert.matches("^Hello from the mock openai provider", doc.choices[1].message.content)
    assert.equal("stop", doc.choices[1].finish_reason)
    assert.is_true(doc.usage.prompt_tokens > 0 and doc.usage.completion_tokens > 0)
    assert.equal(doc.usage.prompt_tokens + doc.usage.completion_tokens, doc.usage.total_tokens)

    -- The wire request: what the client sent, turn by turn (the same API:
    -- its very bytes).
    local w = requests_of("openai")[1]
    assert.same(body, w.json)
    assert.equal(assert(cjson.encode(body)), w.body)
    no_keys_in(raw)
  end)

  it("streams chunks, finish_reason, usage and data: [DONE]", function()
    local base = start_gw()
    local status, h, raw = post(base, "/v1/chat/completions",
      chat(nil, { stream = true, stream_options = { include_usage = true } }))
    assert.equal(200, status, raw)
    assert.matches("^text/event%-stream", h["content-type"])
    assert.equal("openai", h["x-aiorch-provider"])
    local text, finish, evs, usage = openai_stream(raw)
    assert.equal(OPENAI_TEXT, text)
    assert.equal("stop", finish)
    assert.equal("[DONE]", evs[#evs].data)
    assert.is_table(usage)
    assert.is_true(usage.completion_tokens > 0)
    assert.is_true(requests_of("openai")[1].json.stream)
  end)

  it("is answered by Anthropic in OpenAI's shape (translation)", function()
    local base = start_gw()
    local hdr = { ["x-aiorch-providers"] = "anthropic" }
    local status, h, raw, doc = post(base, "/v1/chat/completions",
      chat(nil, { messages = { { role = "system", content = "Sys text." }, { role = "user", content = QUESTION } } }),
      hdr)
    assert.equal(200, status, raw)
    assert.equal("anthropic", h["x-aiorch-provider"])
    assert.equal("chat.completion", doc.object)
    assert.equal(ANTHROPIC_TEXT, doc.choices[1].message.content)
    assert.equal("stop", doc.choices[1].finish_reason) -- end_turn in OpenAI's words
    assert.equal("claude-3-haiku-20240307", doc.model)
    local w = requests_of("anthropic")[1]
    assert.equal("/v1/messages", w.path)
    assert.equal("Sys text.", w.json.system)

    local s2, h2, raw2 = post(base, "/v1/chat/completions", chat(nil, { stream = true }), hdr)
    assert.equal(200, s2)
    assert.equal("anthropic", h2["x-aiorch-provider"])
    local text, finish, evs = openai_stream(raw2)
    assert.equal(ANTHROPIC_TEXT, text)
    assert.equal("stop", finish)
    assert.equal("[DONE]", evs[#evs].data)
  end)
end)

describe("POST /v1/messages", function()
  it("answers in Anthropic's shape", function()
    local base = start_gw()
    local status, h, raw, doc = post(base, "/v1/messages",
      msgs(nil, { system = "Be brief.", temperature = 0.3 }), { ["x-aiorch-providers"] = "anthropic" })
    assert.equal(200, status, raw)
    assert.equal("anthropic", h["x-aiorch-provider"])
    assert.equal("message", doc.type)
    assert.equal("assistant", doc.role)
    assert.matches("^msg_", doc.id)
    assert.equal("text", doc.content[1].type)
    assert.equal(ANTHROPIC_TEXT, doc.content[1].text)
    assert.equal("end_turn", doc.stop_reason)
    assert.is_true(doc.usage.input_tokens > 0 and doc.usage.output_tokens > 0)
    local w = requests_of("anthropic")[1].json
    assert.equal("Be brief.", w.system)
    assert.equal(64, w.max_tokens)
    assert.equal(0.3, w.temperature)
  end)

  it("streams Anthropic's event sequence", function()
    local base = start_gw()
    local status, h, raw = post(base, "/v1/messages", msgs(nil, { stream = true }),
      { ["x-aiorch-providers"] = "anthropic" })
    assert.equal(200, status, raw)
    assert.matches("^text/event%-stream", h["content-type"])
    local text, names, evs = anthropic_stream(raw)
    assert_anthropic_sequence(names)
    assert.equal(ANTHROPIC_TEXT, text)
    assert.equal("end_turn", evs[#evs - 1].json.delta.stop_reason)
    assert.is_true(evs[#evs - 1].json.usage.output_tokens > 0)
  end)

  it("is answered by OpenAI in Anthropic's shape (translation)", function()
    local base = start_gw()
    local hdr = { ["x-aiorch-providers"] = "openai" }
    local status, h, raw, doc = post(base, "/v1/messages", msgs(nil, { system = "Sys." }), hdr)
    assert.equal(200, status, raw)
    assert.equal("openai", h["x-aiorch-provider"])
    assert.equal("message", doc.type)
    assert.equal(OPENAI_TEXT, doc.content[1].text)
    assert.equal("end_turn", doc.stop_reason) -- stop in Anthropic's words
    local w = requests_of("openai")[1]
    assert.equal("/v1/chat/completions", w.path)
    assert.equal("system", w.json.messages[1].role)

    local s2, _, raw2 = post(base, "/v1/messages", msgs(nil, { stream = true }), hdr)
    assert.equal(200, s2)
    local text, names = anthropic_stream(raw2)
    assert_anthropic_sequence(names)
    assert.equal(OPENAI_TEXT, text)
  end)
end)

describe("strategies through the gateway", function()
  it("single calls only the first provider named", function()
    local base = start_gw()
    local status, h = post(base, "/v1/chat/completions", chat(),
      { ["x-aiorch-strategy"] = "single", ["x-aiorch-providers"] = "anthropic,openai" })
    assert.equal(200, status)
    assert.equal("anthropic", h["x-aiorch-provider"])
    assert.equal("single", h["x-aiorch-strategy"])
    assert.equal(0, #requests_of("openai"))

    local s2, h2, raw2 = post(base, "/v1/chat/completions", chat(nil, { stream = true }),
      { ["x-aiorch-strategy"] = "single", ["x-aiorch-providers"] = "anthropic,openai" })
    assert.equal(200, s2)
    assert.equal("anthropic", h2["x-aiorch-provider"])
    assert.equal(ANTHROPIC_TEXT, (openai_stream(raw2)))
    assert.equal(0, #requests_of("openai"))
  end)

  it("single streaming does not fall back", function()
    local base = start_gw(nil, nil, { fault = "500" })
    local s, _, _, doc = post(base, "/v1/messages", msgs(nil, { stream = true }),
      { ["x-aiorch-strategy"] = "single", ["x-aiorch-providers"] = "anthropic,openai" })
    assert.equal(502, s)
    assert.equal("api_error", doc.error.type)
    assert.equal(0, #requests_of("openai"))
  end)

  it("fallback moves on from a failing provider, plain and streaming", function()
    local base = start_gw(nil, { fault = "429" })
    local status, h, raw, doc = post(base, "/v1/chat/completions", chat())
    assert.equal(200, status, raw)
    assert.equal("anthropic", h["x-aiorch-provider"])
    assert.equal(ANTHROPIC_TEXT, doc.choices[1].message.content)
    assert.equal("openai:rate_limited,anthropic:success", h["x-aiorch-attempts"])
    assert.matches("attempts=openai:rate_limited,anthropic:success", logs[#logs], 1, true)

    local s2, h2, raw2 = post(base, "/v1/messages", msgs(nil, { stream = true }))
    assert.equal(200, s2, raw2)
    assert.equal("anthropic", h2["x-aiorch-provider"])
    local text, names = anthropic_stream(raw2)
    assert_anthropic_sequence(names)
    assert.equal(ANTHROPIC_TEXT, text)
  end)

  it("a stream cut after tokens ends with an error event, not a silent 200", function()
    local base = start_gw(nil, { fault = "cut", chunks = 4, chunk_delay_ms = 5 })
    local status, _, raw = post(base, "/v1/chat/completions", chat(nil, { stream = true }))
    assert.equal(200, status)
    local evs = sse(raw)
    local last = evs[#evs]
    assert.is_table(last.json and last.json.error, raw)
    assert.matches("stream", last.json.error.message)
    for _, ev in ipairs(evs) do
      assert.not_equal("[DONE]", ev.data)
    end
    -- Tokens were sent: nobody else may continue the answer.
    assert.equal(0, #requests_of("anthropic"))
    assert.matches("stream_error=true", logs[#logs], 1, true)

    local s2, _, raw2 = post(base, "/v1/messages", msgs(nil, { stream = true }))
    assert.equal(200, s2)
    local evs2 = sse(raw2)
    assert.equal("message_start", evs2[1].event)
    assert.equal("error", evs2[#evs2].event)
    assert.equal("error", evs2[#evs2].json.type)
    assert.equal("api_error", evs2[#evs2].json.error.type)
    for _, ev in ipairs(evs2) do
      assert.not_equal("message_stop", ev.event)
    end
  end)

  it("fastest returns the first answer and aborts the loser", function()
    local base = start_gw(nil, { latency_ms = 400 }, { latency_ms = 20 })
    local t0 = aiorch.now()
    local status, h = post(base, "/v1/chat/completions", chat(), { ["x-aiorch-strategy"] = "fastest" })
    assert.equal(200, status)
    assert.equal("anthropic", h["x-aiorch-provider"])
    assert.is_true(aiorch.now() - t0 < 300)
    local o = requests_of("openai")[1]
    assert.is_true(wait_for(function() return o.aborted_at ~= nil end, 200), "the loser was not aborted")
  end)

  it("fastest streaming cancels the losers when the winner starts streaming", function()
    -- openai streams its first token at ~30 ms and ends at ~150 ms; anthropic would answer at 600 ms.
    local base = start_gw(nil, { chunks = 5, chunk_delay_ms = 30 }, { latency_ms = 600 })
    local status, h, raw = post(base, "/v1/chat/completions", chat(nil, { stream = true }),
      { ["x-aiorch-strategy"] = "fastest" })
    assert.equal(200, status)
    assert.equal("openai", h["x-aiorch-provider"])
    assert.equal(OPENAI_TEXT, (openai_stream(raw)))
    local o, a = requests_of("openai")[1], requests_of("anthropic")[1]
    assert.is_number(a.aborted_at, "the loser was not aborted")
    assert.is_number(o.completed_at)
    -- Cancelled at the first token, well before the winner finished.
    assert.is_true(a.aborted_at < o.completed_at - 60, "loser aborted too late")
    assert.matches("anthropic:cancelled", logs[#logs], 1, true)
  end)

  it("a client that goes away mid-stream aborts the upstream transfer", function()
    local base = start_gw(nil, { chunks = 10, chunk_delay_ms = 50 })
    local events = 0
    local st, kind = aiorch.http.request { method = "POST", url = base .. "/v1/chat/completions",
      headers = { ["content-type"] = "application/json" }, body = cjson.encode(chat(nil, { stream = true })),
      on_event = function()
        events = events + 1
        return events < 2 and nil or false
      end }
    assert.is_nil(st)
    assert.equal("aborted", kind)
    local o = requests_of("openai")[1]
    assert.is_true(wait_for(function() return o.aborted_at ~= nil end, 300), "the upstream went on")
    assert.is_nil(o.completed_at)
    assert.is_true(wait_for(function() return #logs == 1 end, 300))
    assert.matches("client_gone=true", logs[1], 1, true)
  end)

  it("fastest streaming falls to the other provider when one fails before its first token", function()
    local base = start_gw(nil, { fault = "500" }, { latency_ms = 30 })
    local status, h, raw = post(base, "/v1/messages", msgs(nil, { stream = true }),
      { ["x-aiorch-strategy"] = "fastest" })
    assert.equal(200, status)
    assert.equal("anthropic", h["x-aiorch-provider"])
    local text, names = anthropic_stream(raw)
    assert_anthropic_sequence(names)
    assert.equal(ANTHROPIC_TEXT, text)
  end)

  it("parallel answers with one choice / content block per provider", function()
    local base = start_gw()
    local hdr = { ["x-aiorch-strategy"] = "parallel", ["x-aiorch-providers"] = "openai,anthropic" }
    local status, h, _, doc = post(base, "/v1/chat/completions", chat(), hdr)
    assert.equal(200, status)
    assert.equal("openai,anthropic", h["x-aiorch-provider"])
    assert.equal(2, #doc.choices)
    assert.equal(OPENAI_TEXT, doc.choices[1].message.content)
    assert.equal(ANTHROPIC_TEXT, doc.choices[2].message.content)
    assert.equal(1, doc.choices[2].index)

    local s2, _, _, doc2 = post(base, "/v1/messages", msgs(), hdr)
    assert.equal(200, s2)
    assert.equal(2, #doc2.content)
    assert.equal(ANTHROPIC_TEXT, doc2.content[2].text)

    local s3, _, raw3 = post(base, "/v1/messages", msgs(nil, { stream = true }), hdr)
    assert.equal(200, s3)
    local evs = sse(raw3)
    local by_index = {}
    for _, ev in ipairs(evs) do
      if ev.event == "content_block_delta" then
        by_index[ev.json.index] = (by_index[ev.json.index] or "") .. ev.json.delta.text
      end
    end
    assert.equal(OPENAI_TEXT, by_index[0])
    assert.equal(ANTHROPIC_TEXT, by_index[1])
  end)

  it("model aliases choose the strategy and the provider models", function()
    local base = start_gw({
      aliases = { smart = { strategy = "fastest",
        providers = { "anthropic:claude-3-5-sonnet-20241022", "openai:gpt-4o" } } },
      providers = { openai = { models = { "gpt-4o", "o1-mini" } } },
    })
    local status, h = post(base, "/v1/chat/completions", chat("smart"))
    assert.equal(200, status)
    assert.equal("fastest", h["x-aiorch-strategy"])
    local seen = {}
    for _, r in ipairs(m.requests) do
      seen[r.api] = r.json.model
    end
    assert.equal("claude-3-5-sonnet-20241022", seen.anthropic)
    assert.equal("gpt-4o", seen.openai)

    -- A model a provider lists goes to that provider with that name.
    m:reset()
    local s2 = post(base, "/v1/chat/completions", chat("o1-mini"), { ["x-aiorch-providers"] = "openai" })
    assert.equal(200, s2)
    assert.equal("o1-mini", requests_of("openai")[1].json.model)
  end)

  it("an unknown strategy or provider is a 400 in the API's shape", function()
    local base = start_gw()
    local s, _, _, doc = post(base, "/v1/chat/completions", chat(), { ["x-aiorch-strategy"] = "nope" })
    assert.equal(400, s)
    assert.matches("strategy 'nope' is not allowed (allowed: fallback, fastest, hedged, parallel, single)",
      doc.error.message, 1, true)
    local s2, _, _, doc2 = post(base, "/v1/messages", msgs(), { ["x-aiorch-providers"] = "bogus" })
    assert.equal(400, s2)
    assert.equal("invalid_request_error", doc2.error.type)
    assert.matches("unknown provider 'bogus'", doc2.error.message)
  end)
end)

describe("POST /v1/orchestrate", function()
  it("takes an AIRequest with strategy and providers and answers a StandardAIResponse", function()
    local base = start_gw()
    local status, h, raw, doc = post(base, "/v1/orchestrate",
      { user_question = QUESTION, context = "Base ten.", strategy = "single", providers = { "anthropic" } })
    assert.equal(200, status, raw)
    assert.equal("anthropic", h["x-aiorch-provider"])
    assert.equal("anthropic", doc.ia_provider_name)
    assert.equal("success", doc.status)
    assert.equal(cjson.null, doc.error_message)
    assert.equal("stop", doc.metadata.finish_reason) -- end_turn, normalised (docs/canonical.md)
    -- The native endpoint keeps the prompt builder: the context is in the system prompt.
    assert.matches("Base ten.", requests_of("anthropic")[1].json.system, 1, true)
  end)

  it("answers a list for parallel, and takes the strategy from the header", function()
    local base = start_gw(nil, nil, { fault = "500" })
    local status, h, _, doc = post(base, "/v1/orchestrate",
      { user_question = QUESTION, providers = "openai,anthropic" },
      { ["x-aiorch-strategy"] = "parallel" })
    assert.equal(200, status)
    assert.equal("openai", h["x-aiorch-provider"])
    assert.equal(2, #doc)
    assert.equal("success", doc[1].status)
    assert.equal("error", doc[2].status)
    assert.equal("server_error", doc[2].metadata.error_kind)
  end)

  it("refuses a bad AIRequest with 400 before any upstream call", function()
    local base = start_gw()
    for _, body in ipairs({ {}, { user_question = "  " }, { user_question = "q", max_tokens = 0 },
                            { user_question = "q", temperature = 5 } }) do
      local s, _, raw, doc = post(base, "/v1/orchestrate", body)
      assert.equal(400, s, raw)
      assert.equal("invalid_request", doc.error.type)
    end
    assert.equal(0, #m.requests)
  end)
end)

describe("upstream failures", function()
  it("are 502 in each API's error shape", function()
    local base = start_gw(nil, { fault = "500" }, { fault = "529" })
    local s, h, _, doc = post(base, "/v1/chat/completions", chat())
    assert.equal(502, s)
    assert.matches("^application/json", h["content-type"])
    assert.is_nil(h["x-aiorch-provider"])
    assert.equal("openai:server_error,anthropic:server_error", h["x-aiorch-attempts"])
    assert.is_string(doc.error.message)
    assert.matches("all providers failed", doc.error.message)
    assert.equal("upstream_error", doc.error.type)

    local s2, _, _, doc2 = post(base, "/v1/messages", msgs())
    assert.equal(502, s2)
    assert.equal("error", doc2.type)
    assert.equal("api_error", doc2.error.type)

    local s3, _, _, doc3 = post(base, "/v1/orchestrate", { user_question = QUESTION })
    assert.equal(502, s3)
    assert.equal("error", doc3.status)
    assert.equal("all_failed", doc3.metadata.error_kind)

    -- Streaming requests that fail before any token get the same JSON error.
    local s4, h4, _, doc4 = post(base, "/v1/chat/completions", chat(nil, { stream = true }))
    assert.equal(502, s4)
    assert.matches("^application/json", h4["content-type"])
    assert.is_table(doc4.error)
  end)

  it("are 429 with Retry-After when every provider rate-limits", function()
    local base = start_gw(nil, { fault = "429", retry_after = 7 }, { fault = "429", retry_after = 3 })
    local s, h, _, doc = post(base, "/v1/chat/completions", chat())
    assert.equal(429, s)
    assert.equal("3", h["retry-after"]) -- the shortest wait asked
    assert.equal("openai:rate_limited,anthropic:rate_limited", h["x-aiorch-attempts"])
    assert.equal("rate_limit_exceeded", doc.error.type)
    assert.matches("all providers failed", doc.error.message)
    assert.equal(2, #m.requests)
    -- Both now wait out what they asked: not called, still 429, with the time left.
    local s2, h2, _, doc2 = post(base, "/v1/messages", msgs())
    assert.equal(429, s2)
    assert.equal("openai:cooldown,anthropic:cooldown", h2["x-aiorch-attempts"])
    assert.equal("error", doc2.type)
    assert.equal("rate_limit_error", doc2.error.type)
    local left = tonumber(h2["retry-after"])
    assert.is_true(left >= 1 and left <= 3, h2["retry-after"])
    local s3, h3, _, doc3 = post(base, "/v1/orchestrate", { user_question = QUESTION })
    assert.equal(429, s3)
    assert.is_string(h3["retry-after"])
    assert.equal("all_failed", doc3.metadata.error_kind)
    local s4, h4 = post(base, "/v1/chat/completions", chat(nil, { stream = true }))
    assert.equal(429, s4)
    assert.matches("^application/json", h4["content-type"])
    assert.equal(2, #m.requests)
  end)

  it("are 502 when a rate limit meets another failure", function()
    local base = start_gw(nil, { fault = "429", retry_after = 2 }, { fault = "500" })
    local s, h = post(base, "/v1/chat/completions", chat())
    assert.equal(502, s)
    assert.is_nil(h["retry-after"])
  end)

  it("are 504 when every provider times out", function()
    local raw = { providers = { openai = { timeout_ms = 150 }, anthropic = { timeout_ms = 150 } } }
    local base = start_gw(raw, { fault = "hang" }, { fault = "hang" })
    local s, _, _, doc = post(base, "/v1/chat/completions", chat())
    assert.equal(504, s)
    assert.equal("timeout", doc.error.type)
    local s2, _, _, doc2 = post(base, "/v1/messages", msgs(nil, { stream = true }))
    assert.equal(504, s2)
    assert.equal("timeout_error", doc2.error.type)
    local s3, _, _, doc3 = post(base, "/v1/orchestrate", { user_question = QUESTION })
    assert.equal(504, s3)
    assert.equal("timeout", doc3.status)
  end)
end)

describe("client errors", function()
  it("404 and 405 in the API's shape", function()
    local base = start_gw()
    local s, _, _, doc = request(base, "GET", "/v2/nothing")
    assert.equal(404, s)
    assert.equal("invalid_request_error", doc.error.type)
    local s2, _, _, doc2 = request(base, "GET", "/v1/nothing", nil, { ["anthropic-version"] = "2023-06-01" })
    assert.equal(404, s2)
    assert.equal("not_found_error", doc2.error.type)
    local s3, h3, _, doc3 = request(base, "GET", "/v1/chat/completions")
    assert.equal(405, s3)
    assert.equal("POST", h3["allow"])
    assert.is_table(doc3.error)
    local s4, _, _, doc4 = request(base, "DELETE", "/v1/messages")
    assert.equal(405, s4)
    assert.equal("error", doc4.type)
    local s5 = post(base, "/healthz", "{}")
    assert.equal(405, s5)
  end)

  it("400 on malformed JSON and missing fields", function()
    local base = start_gw()
    local cases = {
      { "/v1/chat/completions", "{not json", "malformed JSON" },
      { "/v1/chat/completions", "[1,2]", "JSON object" },
      { "/v1/chat/completions", "", "empty" },
      { "/v1/chat/completions", { model = "gpt-4o-mini" }, "messages" },
      { "/v1/chat/completions", { messages = { { role = "user", content = "q" } } }, "model" },
      -- a prefill, from an Anthropic client, cannot go to OpenAI's API (its
      -- own clients' requests go there as they came: for OpenAI to judge)
      { "/v1/messages", msgs("gpt-4o-mini", { messages = { { role = "user", content = "q" },
        { role = "assistant", content = "x" } } }), "prefill is not supported by provider openai" },
      { "/v1/chat/completions", chat(nil, { temperature = "hot" }), "temperature" },
      { "/v1/chat/completions", chat(nil, { messages = { { role = "user",
        content = { { type = "image_url", image_url = {} } } } } }), "image_url" },
      { "/v1/messages", "{not json", "malformed JSON" },
      { "/v1/messages", { model = "claude-3-haiku-20240307", messages = { { role = "user", content = "q" } } },
        "max_tokens" },
      { "/v1/messages", msgs(nil, { messages = {} }), "messages" },
      { "/v1/orchestrate", "{not json", "malformed JSON" },
    }
    for _, c in ipairs(cases) do
      local s, _, raw, doc = post(base, c[1], c[2])
      assert.equal(400, s, c[1] .. " " .. tostring(raw))
      local msg = c[1] == "/v1/messages" and doc.error.message or doc.error.message
      assert.matches(c[3], msg, 1, true)
      if c[1] == "/v1/messages" then
        assert.equal("error", doc.type)
        assert.equal("invalid_request_error", doc.error.type)
      elseif c[1] == "/v1/chat/completions" then
        assert.equal("invalid_request_error", doc.error.type)
      end
    end
    -- A temperature outside the chosen provider's range names it.
    local s, _, _, doc = post(base, "/v1/chat/completions", chat(nil, { temperature = 1.5 }),
      { ["x-aiorch-providers"] = "anthropic" })
    assert.equal(400, s)
    assert.matches("temperature 1.5 is outside anthropic's range 0..1", doc.error.message, 1, true)
    assert.equal(0, #m.requests)
    -- Under fallback, a provider that cannot take it is skipped, with the reason.
    local s2, h2 = post(base, "/v1/chat/completions", chat(nil, { temperature = 1.5 }),
      { ["x-aiorch-providers"] = "anthropic,openai" })
    assert.equal(200, s2)
    assert.equal("openai", h2["x-aiorch-provider"])
    assert.equal("anthropic:unsupported,openai:success", h2["x-aiorch-attempts"])
  end)

  it("413 beyond the body limit", function()
    local base = start_gw({ max_body = 4096 })
    local big = chat(nil, { messages = { { role = "user", content = string.rep("x", 5000) } } })
    local s, _, _, doc = post(base, "/v1/chat/completions", big)
    assert.equal(413, s)
    assert.equal("invalid_request_error", doc.error.type)
    local s2, _, _, doc2 = post(base, "/v1/messages", big)
    assert.equal(413, s2)
    assert.equal("request_too_large", doc2.error.type)
    -- Far beyond the limit the server refuses before reading the body,
    -- still in the caller's shape, with an access line.
    local s3, h3, _, doc3 = post(base, "/v1/chat/completions", string.rep("y", 64 * 1024))
    assert.equal(413, s3)
    assert.matches("^application/json", h3["content-type"])
    assert.equal("invalid_request_error", doc3.error.type)
    assert.matches("at most 4096 bytes", doc3.error.message, 1, true)
    assert.matches("path=/v1/chat/completions status=413", logs[#logs], 1, true)
    local s4, _, _, doc4 = post(base, "/v1/messages", string.rep("y", 64 * 1024))
    assert.equal(413, s4)
    assert.equal("error", doc4.type)
    assert.equal("request_too_large", doc4.error.type)
    -- Just under the limit is fine.
    local ok = post(base, "/v1/chat/completions",
      chat(nil, { messages = { { role = "user", content = string.rep("z", 3000) } } }))
    assert.equal(200, ok)
    assert.equal(1, #m.requests)
  end)
end)

describe("requests in flight", function()
  it("beyond max_inflight are 429 in the API's shape; others are not counted", function()
    local base = start_gw({ max_inflight = 1 }, { latency_ms = 300 })
    local first = aiorch.spawn(post, base, "/v1/chat/completions", chat(), { ["x-aiorch-providers"] = "openai" })
    assert.is_true(wait_for(function() return #m.requests == 1 end, 1000))
    local s, h, _, doc = post(base, "/v1/chat/completions", chat())
    assert.equal(429, s)
    assert.equal("1", h["retry-after"])
    assert.equal("rate_limit_exceeded", doc.error.type)
    assert.matches("at most 1 at once", doc.error.message, 1, true)
    local s2, _, _, doc2 = post(base, "/v1/messages", msgs())
    assert.equal(429, s2)
    assert.equal("rate_limit_error", doc2.error.type)
    assert.equal(429, (post(base, "/v1/orchestrate", { user_question = QUESTION })))
    assert.equal(200, (request(base, "GET", "/healthz")))
    assert.equal(200, (request(base, "GET", "/v1/models")))
    assert.equal(1, #m.requests)
    assert.equal(200, (first:await()))
    -- The slot is free again, also after a client that went away.
    local st, kind = aiorch.http.request { method = "POST", url = base .. "/v1/chat/completions",
      headers = { ["content-type"] = "application/json" }, body = cjson.encode(chat()), timeout_ms = 50 }
    assert.is_nil(st)
    assert.equal("timeout", kind)
    assert.is_true(wait_for(function()
      return logs[#logs]:find("client_gone=true", 1, true) ~= nil
    end, 1000))
    assert.equal(200, (post(base, "/v1/chat/completions", chat())))
    assert.matches("status=200", logs[#logs], 1, true)
  end)

  it("a stream holds its slot until it ends", function()
    local base = start_gw({ max_inflight = 1 }, { chunks = 4, chunk_delay_ms = 100 })
    local stream = aiorch.spawn(post, base, "/v1/chat/completions", chat(nil, { stream = true }),
      { ["x-aiorch-providers"] = "openai" })
    assert.is_true(wait_for(function() return #m.requests == 1 end, 1000))
    assert.equal(429, (post(base, "/v1/chat/completions", chat(nil, { stream = true }))))
    assert.equal(200, (stream:await()))
    assert.equal(200, (post(base, "/v1/chat/completions", chat(nil, { stream = true }))))
  end)
end)

describe("client auth", function()
  it("refuses requests without a valid key, in the API's shape", function()
    local base = start_gw({ client_keys_env = { "GW_SPEC_CLIENT_KEY" } }, nil, nil,
      { GW_SPEC_CLIENT_KEY = CLIENT_KEY })
    local s, h1, raw, doc = post(base, "/v1/chat/completions", chat())
    assert.equal(401, s)
    assert.equal("invalid_api_key", doc.error.code)
    -- answered once the headers were in, before the body: the connection closes
    assert.equal("Bearer", h1["www-authenticate"])
    assert.equal("close", h1["connection"])
    assert.matches("path=/v1/chat/completions status=401", logs[#logs], 1, true)
    local s2, _, _, doc2 = post(base, "/v1/messages", msgs(), { ["x-api-key"] = "wrong-key" })
    assert.equal(401, s2)
    assert.equal("authentication_error", doc2.error.type)
    local s3 = post(base, "/v1/orchestrate", { user_question = "q" },
      { authorization = "Bearer " .. CLIENT_KEY .. "x" })
    assert.equal(401, s3)
    local s4 = request(base, "GET", "/v1/models")
    assert.equal(401, s4)
    assert.equal(0, #m.requests)
    no_keys_in(raw)

    assert.equal(200, (post(base, "/v1/chat/completions", chat(), { authorization = "Bearer " .. CLIENT_KEY })))
    assert.equal(200, (post(base, "/v1/messages", msgs(), { ["x-api-key"] = CLIENT_KEY })))
    assert.equal(200, (request(base, "GET", "/v1/models", nil, { authorization = "Bearer " .. CLIENT_KEY })))
    -- Health and metrics stay open for probes and scrapers.
    assert.equal(200, (request(base, "GET", "/healthz")))
    assert.equal(200, (request(base, "GET", "/metrics")))
    for _, l in ipairs(logs) do
      no_keys_in(l)
    end
  end)
end)

describe("GET endpoints", function()
  it("/v1/models lists providers' models and aliases in either shape", function()
    local base = start_gw({ providers = { openai = { models = { "gpt-4o" } }, anthropic = {} },
      aliases = { smart = { strategy = "fastest" } } })
    local s, _, _, doc = request(base, "GET", "/v1/models")
    assert.equal(200, s)
    assert.equal("list", doc.object)
    local ids = {}
    for _, e in ipairs(doc.data) do
      ids[e.id] = e.owned_by
    end
    assert.equal("openai", ids["gpt-4o-mini"])
    assert.equal("openai", ids["gpt-4o"])
    assert.equal("anthropic", ids["claude-3-haiku-20240307"])
    assert.equal("aiorch", ids["smart"])
    local s2, _, _, doc2 = request(base, "GET", "/v1/models", nil, { ["anthropic-version"] = "2023-06-01" })
    assert.equal(200, s2)
    assert.equal("model", doc2.data[1].type)
    assert.equal(false, doc2.has_more)
  end)

  it("/healthz reports the providers", function()
    local base = start_gw()
    local s, _, _, doc = request(base, "GET", "/healthz")
    assert.equal(200, s)
    assert.equal("ok", doc.status)
    assert.is_true(doc.providers.openai.available)
    assert.is_true(doc.providers.anthropic.healthy)
  end)

  it("/metrics is the Prometheus text format with a latency histogram", function()
    local base = start_gw(nil, { fault = "429" })
    post(base, "/v1/chat/completions", chat())
    post(base, "/v1/chat/completions", chat())
    local s, h, text = request(base, "GET", "/metrics")
    assert.equal(200, s)
    assert.matches("^text/plain; version=0.0.4", h["content-type"])
    local types = {}
    for line in text:gmatch("[^\n]+") do
      local name, typ = line:match("^# TYPE (%S+) (%S+)$")
      if name then
        types[name] = typ
      elseif not line:match("^# HELP %S+ .+$") then
        -- name{labels} value
        assert.matches('^[%a_:][%w_:]*{?[^}]*}? %-?[%d.eE+%-]+$', line)
        if line:find("{", 1, true) then
          assert.matches('^[%a_:][%w_:]*{[%a_]+="[^"]*"', line)
        end
      end
    end
    assert.equal("histogram", types["aiorch_provider_latency_seconds"])
    assert.equal("counter", types["aiorch_provider_requests_total"])
    assert.equal("counter", types["aiorch_provider_errors_total"])
    -- The first 429's Retry-After cools openai: the second request skips it.
    assert.matches('aiorch_provider_errors_total{provider="openai",kind="rate_limited"} 1', text, 1, true)
    assert.matches('aiorch_provider_successes_total{provider="anthropic"} 2', text, 1, true)
    assert.matches('aiorch_provider_fallback_activations_total{provider="anthropic"} 2', text, 1, true)
    assert.matches('aiorch_gateway_requests_total{route="/v1/chat/completions",status="200"} 2', text, 1, true)
    -- Buckets never decrease, and +Inf equals _count.
    local prev, inf = -1, nil
    for le, n in text:gmatch('aiorch_provider_latency_seconds_bucket{provider="openai",le="([^"]+)"} (%d+)') do
      n = tonumber(n)
      assert.is_true(n >= prev)
      prev = n
      if le == "+Inf" then
        inf = n
      end
    end
    local count = tonumber(text:match('aiorch_provider_latency_seconds_count{provider="openai"} (%d+)'))
    assert.equal(1, count)
    assert.equal(count, inf)
    assert.matches('aiorch_provider_latency_seconds_bucket{provider="openai",le="0.05"}', text, 1, true)
    assert.matches('aiorch_provider_latency_seconds_sum{provider="openai"} ', text, 1, true)
  end)
end)

describe("access log", function()
  it("writes one line per request with the facts, never keys or prompt text", function()
    local base = start_gw(nil, { fault = "500" })
    post(base, "/v1/chat/completions", chat(nil, { messages = { { role = "user", content = SECRET_PROMPT } } }),
      { authorization = "Bearer " .. CLIENT_KEY })
    request(base, "GET", "/nowhere?key=" .. CLIENT_KEY)
    assert.equal(2, #logs)
    local l = logs[1]
    for _, f in ipairs({ "method=POST", "path=/v1/chat/completions", "status=200", "strategy=fallback",
                         "provider=anthropic", "attempts=openai:server_error,anthropic:success",
                         "latency_ms=%d+", "tokens_in=%d+", "tokens_out=%d+" }) do
      assert.matches(f, l)
    end
    assert.matches("path=/nowhere status=404", logs[2], 1, true)
    for _, line in ipairs(logs) do
      assert.falsy(line:find(SECRET_PROMPT, 1, true))
      assert.falsy(line:find("\n", 1, true))
      no_keys_in(line)
    end
  end)

  it("logs the bodies only when log_bodies is set, and never a key", function()
    local base = start_gw({ log_bodies = true, client_keys_env = { "GW_SPEC_CLIENT_KEY" } }, nil, nil,
      { GW_SPEC_CLIENT_KEY = CLIENT_KEY })
    local auth = { authorization = "Bearer " .. CLIENT_KEY }
    local body = chat(nil, { messages = { { role = "user", content = SECRET_PROMPT } } })
    local s, _, raw = post(base, "/v1/chat/completions", body, auth)
    assert.equal(200, s)
    local s2 = post(base, "/v1/messages", msgs(nil, { stream = true }), auth)
    assert.equal(200, s2)
    local lines = {}
    for _, l in ipairs(logs) do
      local dir = l:match("^aiorch: body id=%S+ dir=(%a+) ")
      if dir then
        lines[#lines + 1] = dir
      end
      no_keys_in(l)
    end
    assert.same({ "request", "response", "request", "stream" }, lines)
    local req_line = logs[1]
    assert.matches(SECRET_PROMPT, req_line, 1, true)
    assert.matches("bytes=" .. #cjson.encode(body), req_line, 1, true)
    -- The response line holds the JSON answer, escaped on one line.
    local answer = cjson.decode(raw).choices[1].message.content
    assert.matches(answer, logs[2], 1, true)
    assert.matches("status=200", logs[3], 1, true) -- then the access line
    assert.matches("You asked: " .. QUESTION, logs[5], 1, true)
    -- A body over 16 KiB is cut.
    local big = chat(nil, { messages = { { role = "user", content = string.rep("b", 20000) } } })
    post(base, "/v1/chat/completions", big, auth)
    local cut
    for _, l in ipairs(logs) do
      cut = cut or l:match(" dir=request bytes=%d+ cut=(%d+) ")
    end
    assert.equal(#cjson.encode(big) - 16384, tonumber(cut))
  end)
end)

describe("configuration", function()
  local env = { K1 = "client-key-value", OPENAI_KEY_VAR = "sk-from-env" }
  local function getenv(k) return env[k] end

  it("refuses literal keys and malformed settings", function()
    local cases = {
      { { providers = { openai = { api_key = "sk-abc" } } }, "literal keys are refused" },
      { { providers = { openai = { api_key_env = "sk-abc-123" } } }, "environment variable name" },
      { { client_keys_env = { "sk-live-123" } }, "literal key is refused" },
      { { client_keys_env = { "UNSET_VAR_GW" } }, "UNSET_VAR_GW is not set" },
      { { listen = "nowhere" }, "HOST:PORT" },
      { { bogus = 1 }, "unknown field 'bogus'" },
      { { providers = { nope = {} } }, "unknown provider 'nope'" },
      { { aliases = { x = { strategy = "nope" } } }, "unknown strategy 'nope'" },
      { { default_strategy = "nope" }, "unknown strategy" },
      { { max_body = -1 }, "max_body" },
      { { max_inflight = -1 }, "max_inflight" },
      { { max_inflight = 2.5 }, "max_inflight" },
      { { log_bodies = "yes" }, "log_bodies" },
      { { providers = { openai = { base_url = "ftp://x" } } }, "base_url" },
      { { server = { port = 1 } }, "server.port: set by the gateway" },
    }
    for _, c in ipairs(cases) do
      local cfg, err = gconfig.check(c[1], getenv)
      assert.is_nil(cfg)
      assert.matches(c[2], err, 1, true)
      assert.falsy(err:find("sk-abc", 1, true) and not c[2]:find("sk"), "the message quotes a key")
    end
    local cfg, err = gconfig.load(FIXTURES .. "/literal_key.lua", getenv)
    assert.is_nil(cfg)
    assert.matches("literal keys are refused", err, 1, true)
    assert.falsy(err:find("sk-literal", 1, true))
  end)

  it("passes server options to aiorch.server.listen", function()
    local cfg = assert(gconfig.check({ server = { no_such_option = 1 } }, getenv))
    local h, err = gateway.start { config = cfg, port = 0, access_log = false }
    assert.is_nil(h)
    assert.matches("no_such_option", err, 1, true)
    local cfg2 = assert(gconfig.check({ server = { max_connections = 64, idle_timeout_ms = 5000 } }, getenv))
    local h2 = assert(gateway.start { config = cfg2, port = 0, access_log = false })
    local s = request("http://127.0.0.1:" .. h2.port, "GET", "/healthz")
    assert.equal(200, s)
    h2:close()
  end)

  it("loads a file: listen, providers by priority, keys from the named variables, aliases", function()
    local e = { GW_TEST_OPENAI_KEY = "sk-o", GW_TEST_ANTHROPIC_KEY = "sk-a", GW_TEST_CLIENT_KEY = "ck" }
    local cfg = assert(gconfig.load(FIXTURES .. "/gateway.lua", function(k) return e[k] end))
    assert.equal("127.0.0.1", cfg.host)
    assert.equal(0, cfg.port)
    assert.equal(65536, cfg.max_body)
    assert.same({ "openai", "anthropic" }, cfg.order)
    assert.same({ "ck" }, cfg.client_keys)
    local rt = gconfig.route(cfg, "fast")
    assert.equal("fastest", rt.strategy)
    assert.same({ "openai", "anthropic" }, rt.providers)
    assert.equal("sk-o", rt.env.OPENAI_API_KEY)
    assert.equal("5000", rt.env.OPENAI_TIMEOUT_MS)
    local rt2 = gconfig.route(cfg, "gpt-4o", "single", { "openai" })
    assert.equal("single", rt2.strategy)
    assert.equal("gpt-4o", rt2.env.OPENAI_MODEL)
  end)
end)

describe("drain", function()
  it("finishes the requests in flight, refuses new ones, then closes", function()
    local base, h = start_gw(nil, { latency_ms = 200 })
    local slow = aiorch.spawn(post, base, "/v1/chat/completions", chat())
    assert.is_true(wait_for(function() return #m.requests == 1 end, 1000))
    local drained = aiorch.spawn(function() return h:drain(3000) end)
    aiorch.sleep(20)
    -- A new client is refused: the listening socket is closed (a server
    -- without shutdown answers 503 "draining" instead).
    local st, hk, body = aiorch.http.request { url = base .. "/healthz", timeout_ms = 1000 }
    if st then
      assert.equal(503, st)
      assert.equal("draining", cjson.decode(body).status)
    else
      assert.equal("connect", hk)
    end
    local status = slow:await()
    assert.equal(200, status)
    assert.is_true(drained:await())
    local ok, kind = aiorch.http.request { url = base .. "/healthz", timeout_ms = 1000 }
    assert.is_nil(ok)
    assert.equal("connect", kind)
  end)
end)

describe("aiorch serve as a subprocess", function()
  local proc, pid, errfile, base

  local read_file = support.slurp

  setup(function()
    errfile = os.tmpname()
    local env = {
      "env -u AIORCH_PATH -u AIORCH_PROVIDERS -u AIORCH_LOG -u OPENAI_API_KEY -u ANTHROPIC_API_KEY",
      "GW_TEST_OPENAI_KEY=" .. q(KEYS.openai), "GW_TEST_ANTHROPIC_KEY=" .. q(KEYS.anthropic),
      "GW_TEST_CLIENT_KEY=" .. q(CLIENT_KEY),
      "OPENAI_BASE_URL=" .. q(m:base_url("openai", { fault = "500" })),
      "ANTHROPIC_BASE_URL=" .. q(m:base_url("anthropic")),
    }
    local cmd = table.concat(env, " ") .. " " .. q(BIN) .. " serve --workers 0 --listen 127.0.0.1:0 --config "
      .. q(FIXTURES .. "/gateway.lua")
    proc = assert(io.popen("echo $$; exec " .. cmd .. " 2>" .. q(errfile) .. " </dev/null"))
    pid = assert(tonumber(proc:read("l")))
    local port
    wait_for(function()
      port = read_file(errfile):match("aiorch: listening on http://127%.0%.0%.1:(%d+)\n")
      return port ~= nil
    end, 5000)
    assert(port, "the gateway printed no listening line: " .. read_file(errfile))
    base = "http://127.0.0.1:" .. port
  end)

  teardown(function()
    if pid then
      os.execute("kill " .. pid)
    end
    if proc then
      proc:close()
    end
    if errfile then
      os.remove(errfile)
    end
  end)

  it("serves both APIs over HTTP with fallback, auth and an access log", function()
    local auth = { authorization = "Bearer " .. CLIENT_KEY }
    assert.equal(401, (post(base, "/v1/chat/completions", chat())))
    local s, h, raw, doc = post(base, "/v1/chat/completions", chat(), auth)
    assert.equal(200, s, raw)
    assert.equal("anthropic", h["x-aiorch-provider"])
    assert.equal(ANTHROPIC_TEXT, doc.choices[1].message.content)

    local s2, _, raw2 = post(base, "/v1/messages", msgs(nil, { stream = true }), { ["x-api-key"] = CLIENT_KEY })
    assert.equal(200, s2)
    local text, names = anthropic_stream(raw2)
    assert_anthropic_sequence(names)
    assert.equal(ANTHROPIC_TEXT, text)

    local s3, _, _, doc3 = post(base, "/v1/chat/completions", chat("fast"), auth)
    assert.equal(200, s3)
    assert.equal(ANTHROPIC_TEXT, doc3.choices[1].message.content)

    local s4, _, text4 = request(base, "GET", "/metrics")
    assert.equal(200, s4)
    assert.matches('aiorch_provider_races_won_total{provider="anthropic"} 1', text4, 1, true)

    -- One access line per request so far, and no key anywhere.
    assert.is_true(wait_for(function()
      local _, n = read_file(errfile):gsub("aiorch: access ", "")
      return n == 5
    end, 2000))
    local err = read_file(errfile)
    assert.matches("method=POST path=/v1/messages status=200 strategy=fallback provider=anthropic", err, 1, true)
    assert.matches("path=/v1/chat/completions status=401", err, 1, true)
    no_keys_in(err)
    assert.falsy(err:find(QUESTION, 1, true))

    -- Stopped by its PID, it stops listening.
    assert(os.execute("kill " .. pid))
    local gone = wait_for(function()
      local ok = aiorch.http.request { url = base .. "/healthz", timeout_ms = 500 }
      return ok == nil
    end, 3000)
    assert.is_true(gone)
    pid = nil
  end)
end)
