-- The cohere provider (scripts/providers/cohere.lua on aiorch.wire.cohere)
-- and the mock's Chat v2 (scripts/aiorch/mock/cohere.lua), over loopback:
-- the adapter's wire request and its reading of answers, errors and
-- streams; the mock's 400s and faults in Cohere's shape; orchestrate and
-- `aiorch ask --providers cohere` against the mock; the gateway answering
-- OpenAI and Anthropic clients from cohere, streams with tool calls
-- included. (The faults of every directive: faults_spec; the official SDK:
-- tests/sdk/cohere.test.mjs.)
local cjson = require "cjson.safe"
local json = require "aiorch.json"
local mock_mod = require "aiorch.mock"
local orchestrate = require "aiorch.orchestrate"
local adapter = require "providers.cohere"
local support = require "tests.support"

local KEY = "co-spec-secret-key-4242"
local MODEL = "command-a-03-2025"
local PREAMBLE_TOKENS = 64 -- the mock's usage.tokens input over billed_units
local WEATHER = { type = "object", properties = { city = { type = "string" } }, required = json.array { "city" } }
local TOOLS = { { name = "get_weather", description = "Weather now", parameters = WEATHER } }

local m -- the mock

support.use_mock(function(mock) m = mock end, {})

local function env(dirs, extra)
  local e = { CO_API_KEY = KEY, CO_API_URL = m:base_url("cohere", dirs) }
  return support.merge(e, extra)
end

local function post(dirs, body, headers)
  return support.post(m:base_url("cohere", dirs) .. "/v2/chat", body,
    support.merge({ authorization = "Bearer " .. KEY }, headers))
end

-- The canonical events of a stream, from a parser in events mode.
local function feed(events)
  local p = adapter.stream_parser({ model = MODEL }, { events = true })
  local out = {}
  for _, e in ipairs(events) do
    local sse = { event = e[1], data = type(e[2]) == "table" and cjson.encode(e[2]) or e[2] }
    local r = p:event(sse)
    for _, ev in ipairs(r and (r.type and { r } or r) or {}) do
      out[#out + 1] = ev
    end
  end
  return out, p
end

describe("the cohere adapter", function()
  it("posts {base}/v2/chat with a Bearer key, streaming on request", function()
    local w = adapter.build_request({ key = KEY, base_url = "https://co.example/" },
      { messages = { { role = "user", content = "hi" } } }, { stream = true })
    assert.equal("POST", w.method)
    assert.equal("https://co.example/v2/chat", w.url)
    assert.equal("Bearer " .. KEY, w.headers.authorization)
    assert.equal("text/event-stream", w.headers.accept)
    assert.falsy(w.body:find(KEY, 1, true))
    assert.same({ model = MODEL, stream = true, messages = { { role = "user", content = "hi" } } },
      cjson.decode(w.body))
    w = adapter.build_request({ key = KEY, model = "command-r7b-12-2024" }, { user_question = "q" })
    assert.equal("https://api.cohere.com/v2/chat", w.url)
    assert.equal("application/json", w.headers.accept)
    local body = cjson.decode(w.body)
    assert.equal("command-r7b-12-2024", body.model)
    assert.is_nil(body.stream)
  end)

  it("reads Cohere's errors: the kind from the status, the message from the body", function()
    local cases = {
      { 429, "rate_limited", { ["retry-after"] = "3" } }, { 401, "auth" }, { 403, "auth" }, { 400, "bad_request" },
      { 422, "bad_request" }, { 498, "bad_request" }, { 500, "server_error" }, { 503, "server_error" },
    }
    for _, c in ipairs(cases) do
      local r, kind, msg, extra = adapter.parse_response({}, c[1], c[3] or {},
        '{"id":"0f0e0d0c-0000-4000-8000-000000000000","message":"the reason"}')
      assert.is_nil(r)
      assert.equal(c[2], kind, c[1])
      assert.equal(("HTTP %d: the reason"):format(c[1]), msg)
      assert.equal(c[1] == 429 and 3 or nil, extra.retry_after)
    end
    -- a 200 that is an error, a failed generation, no JSON
    local _, kind, msg = adapter.parse_response({}, 200, {}, '{"id":"x","message":"upstream broke"}')
    assert.same({ "server_error", "provider error: upstream broke" }, { kind, msg })
    _, kind, msg = adapter.parse_response({}, 200, {}, '{"id":"x","finish_reason":"ERROR","message":{"role":'
      .. '"assistant","content":[]}}')
    assert.same({ "server_error", "provider error: the generation failed (finish_reason ERROR)" }, { kind, msg })
    _, kind = adapter.parse_response({}, 200, {}, "<html>")
    assert.equal("parse", kind)
  end)

  it("reads a stream: text deltas, tool calls by their own index, usage and the finish reason", function()
    local evs, p = feed {
      { "message-start", { type = "message-start", id = "s1" } },
      { "content-start", { type = "content-start", index = 0, delta = { message = { content = { type = "thinking",
        thinking = "" } } } } },
      { "content-delta", { type = "content-delta", index = 0, delta = { message = { content = {
        thinking = "hm" } } } } },
      { "tool-plan-delta", { type = "tool-plan-delta", delta = { message = { tool_plan = "I will look." } } } },
      { "tool-call-start", { type = "tool-call-start", index = 3, delta = { message = { tool_calls = { id = "c1",
        type = "function", ["function"] = { name = "get_weather", arguments = "" } } } } } },
      -- arguments of a call whose start never came
      { "tool-call-delta", { type = "tool-call-delta", index = 7, delta = { message = { tool_calls = {
        ["function"] = { arguments = "{}" } } } } } },
      { "tool-call-delta", { type = "tool-call-delta", index = 3, delta = { message = { tool_calls = {
        ["function"] = { arguments = '{"city":"Oslo"}' } } } } } },
      { "debug", { type = "debug", prompt = "..." } },
      { "message-end", { type = "message-end", delta = { finish_reason = "TOOL_CALL", usage = {
        billed_units = { input_tokens = 3, output_tokens = 4 }, tokens = { input_tokens = 70, output_tokens = 4 },
        cached_tokens = 2 } } } },
      { nil, "[DONE]" },
    }
    local seen = {}
    for i, ev in ipairs(evs) do
      seen[i] = ev.type .. (ev.index and ":" .. ev.index or "")
    end
    assert.same({ "meta", "meta", "thinking", "text", "tool_call:0", "tool_call:1", "tool_arguments:1",
      "tool_arguments:0", "meta", "meta", "meta" }, seen)
    local r = assert(p:result())
    assert.same({ { type = "thinking", text = "hm" }, { type = "text", text = "I will look." },
      { type = "tool_call", id = "c1", name = "get_weather", arguments = '{"city":"Oslo"}' },
      { type = "tool_call", id = "", name = "", arguments = "{}" } }, r.content)
    assert.equal("I will look.", r.text)
    assert.same({ "tool_calls", "TOOL_CALL" }, { r.finish_reason, r.provider_finish_reason })
    assert.same({ input_tokens = 70, output_tokens = 4, cached_input_tokens = 2 }, r.usage)
    assert.same({ id = "s1", billed_units = { input_tokens = 3, output_tokens = 4 } }, r.upstream)
    assert.equal(MODEL, r.model)
  end)

  it("says a stream was cut, failed or malformed", function()
    local text = { "content-delta", { type = "content-delta", index = 0, delta = { message = { content = {
      text = "Hel" } } } } }
    local _, p = feed { text, { nil, "[DONE]" } }
    local r, kind, msg = p:result()
    assert.is_nil(r)
    assert.equal("stream_cut", kind)
    assert.equal("stream ended after 2 events without message-end", msg)
    _, p = feed { text, { "message-end", { type = "message-end", delta = { finish_reason = "ERROR",
      error = "model crashed" } } } }
    assert.same({ "server_error", "provider error: model crashed" }, { select(2, p:result()) })
    _, p = feed { text, { "content-delta", '{"type":"content-delta","delta":{"mess' } }
    assert.equal("parse", select(2, p:result()))
    -- without opts.events, :event gives the text delta
    p = adapter.stream_parser({})
    assert.equal("Hel", p:event({ data = cjson.encode(text[2]) }))
    assert.is_nil(p:event({ data = '{"type":"content-end","index":0}' }))
  end)
end)

describe("the mock's Chat v2", function()
  it("refuses what Cohere refuses with a 400 {id, message}, and records it", function()
    local user = { role = "user", content = "hi" }
    local cases = {
      { { model = MODEL }, "messages must be a non%-empty list" },
      { { messages = { user } }, "model is required" },
      { { model = MODEL, messages = { { role = "bot", content = "hi" } } }, "messages%[0%]%.role must be one of" },
      { { model = MODEL, messages = { user, { role = "tool", tool_call_id = "x", content = "1" } } },
        "answers no tool call" },
      { { model = MODEL, messages = { user, { role = "assistant", tool_calls = { { id = "c1", type = "function",
        ["function"] = { name = "f", arguments = "{}" } } } }, user } }, "the tool call c1 has no tool message" },
      { { model = MODEL, messages = { user, { role = "assistant", content = "ok" } } }, "last message" },
      { { model = MODEL, messages = { user }, tool_choice = "AUTO", tools = {} },
        "tool_choice must be REQUIRED or NONE" },
      { { model = MODEL, messages = { user }, tool_choice = "NONE" }, "only be used with tools" },
      { { model = MODEL, messages = { user }, tools = { { type = "function", ["function"] = { name = "f" } } } },
        "parameters is required" },
      { { model = MODEL, messages = { user }, response_format = { type = "json_object" }, documents = { "d" } },
        "not supported with tools or documents" },
      { { model = MODEL, messages = { user }, p = 1 }, "p must be a number between 0.01 and 0.99" },
      { { model = MODEL, messages = { user }, k = 501 }, "k must be an integer between 0 and 500" },
      { { model = MODEL, messages = { user }, presence_penalty = -1 }, "presence_penalty must be" },
      { { model = MODEL, messages = { user }, stop_sequences = { "a", "b", "c", "d", "e", "f" } }, "at most 5" },
      { { model = MODEL, messages = { user }, thinking = { type = "maybe" } }, "thinking.type" },
      { { model = MODEL, messages = { { role = "user", content = { { type = "image_url",
        image_url = { url = "data:text/plain;base64,AAAA" } } } } } }, "image_url.url must be" },
      { { model = MODEL, messages = { { role = "system", content = { { type = "image_url" } } } } },
        "must be one of text for a system message" },
    }
    for _, c in ipairs(cases) do
      local status, _, _, doc = post(nil, c[1])
      assert.equal(400, status, c[2])
      assert.matches("^invalid request: .*" .. c[2], doc.message)
      assert.matches("^%x+%-%x+%-4%x+%-8%x+%-%x+$", doc.id)
      assert.equal("cohere", m.requests[#m.requests].api)
      assert.equal(doc.message, m.requests[#m.requests].rejected)
    end
  end)

  it("answers faults in Cohere's shape: echo_key's second half in the id, huge as one long answer", function()
    local status, _, _, doc = post({ fault = "echo_key" }, { model = MODEL, messages = { { role = "user",
      content = "hi" } } })
    assert.equal(401, status)
    local forms = mock_mod.echoed_forms(KEY)
    assert.equal(forms.second_half, doc.id)
    assert.truthy(doc.message:find(forms.first_half, 1, true))
    local s, h, body = post({ fault = "huge", size = 4096 }, { model = MODEL, messages = { { role = "user",
      content = "hi" } } })
    assert.equal(200, s)
    assert.equal(4096, #body)
    local r = assert(adapter.parse_response({ model = MODEL }, s, h, body))
    assert.equal("length", r.finish_reason)
    assert.matches("^All work and no play", r.text)
  end)
end)

describe("orchestrate over cohere", function()
  it("calls tools from their schemas, plain and as canonical stream events", function()
    local req = { messages = { { role = "user", content = "Weather in Oslo? Use get_weather." } }, tools = TOOLS }
    local r = orchestrate.orchestrate(req, "single", { "cohere" }, { env = env() })
    assert.equal("success", r.status, r.error_message)
    assert.equal("cohere", r.metadata.api)
    assert.equal("tool_calls", r.metadata.finish_reason)
    assert.equal("I will use get_weather to answer this.", r.response_text)
    assert.equal("tool_call", r.content[2].type)
    assert.matches("^get_weather_mock%d+$", r.content[2].id)
    assert.equal("string", type(cjson.decode(r.content[2].arguments).city))
    local sent = m.requests[#m.requests].json
    assert.same({ type = "function", ["function"] = { name = "get_weather", description = "Weather now",
      parameters = WEATHER } }, sent.tools[1])

    local events = {}
    local s = orchestrate.orchestrate(req, "single", { "cohere" }, { env = env({ chunks = 3 }), stream = true,
      on_event = function(ev) events[#events + 1] = ev.type ~= "meta" and ev.type or nil end })
    assert.equal("success", s.status, s.error_message)
    assert.same({ r.response_text, r.content[2].arguments }, { s.response_text, s.content[2].arguments })
    assert.same({ "text", "text", "text", "tool_call", "tool_arguments", "tool_arguments", "tool_arguments" }, events)
  end)

  it("sends the results back and gets them quoted; retries a 429 once asked to", function()
    local req = { messages = {
      { role = "user", content = "Weather in Oslo?" },
      { role = "assistant", content = { { type = "text", text = "Looking." },
        { type = "tool_call", id = "call_1", name = "get_weather", arguments = '{"city":"Oslo"}' } } },
      { role = "tool", content = { { type = "tool_result", id = "call_1", content = "-3 C" } } } }, tools = TOOLS }
    local r = orchestrate.orchestrate(req, "single", { "cohere" }, {
      env = env({ fault = "429", retry_after = 0, fail_first = 1 }), policy = { max_attempts = 2 } })
    assert.equal("success", r.status, r.error_message)
    assert.equal(2, m:counter())
    assert.matches("Tool results: %[call_1%] %-3 C$", r.response_text)
    local sent = m.requests[#m.requests].json.messages[2]
    assert.same({ role = "assistant", tool_plan = "Looking.", tool_calls = { { id = "call_1", type = "function",
      ["function"] = { name = "get_weather", arguments = '{"city":"Oslo"}' } } } }, sent)
  end)

  it("gives Cohere's logprobs in the canonical shape, streamed or not", function()
    local req = { messages = { { role = "user", content = "hi there" } }, logprobs = true }
    for _, stream in ipairs { false, true } do
      local r = orchestrate.orchestrate(req, "single", { "cohere" }, { env = env({ chunks = 3 }), stream = stream })
      assert.equal("success", r.status, r.error_message)
      local tokens = {}
      for i, t in ipairs(r.metadata.logprobs.content) do
        assert.is_true(t.logprob < 0)
        tokens[i] = t.token
      end
      assert.equal(stream and 3 or select(2, r.response_text:gsub("%S+", "")), #tokens)
      assert.equal(r.response_text, table.concat(tokens))
    end
    assert.is_true(m.requests[#m.requests].json.logprobs)
  end)

  it("refuses by name what Cohere cannot take, or drops it when allowed", function()
    local req = { messages = { { role = "user", content = "hi" } }, n = 2, user = "u-1" }
    local r, kind, msg = orchestrate.orchestrate(req, "single", { "cohere" }, { env = env() })
    assert.is_nil(r)
    assert.equal("invalid", kind)
    assert.matches("^user is not supported by provider cohere %(Cohere's chat has no end%-user field%)$", msg)
    assert.equal(0, #m.requests)
    r = orchestrate.orchestrate(req, "single", { "cohere" }, { env = env(), allow_drop = { "n", "user" } })
    assert.equal("success", r.status)
    assert.same({ "n", "user" }, (function(d) table.sort(d); return d end)(r.metadata.dropped))
    -- a fallback skips cohere and asks the next provider
    r = orchestrate.orchestrate(req, "fallback", { "cohere", "openai" }, {
      env = env(nil, { OPENAI_API_KEY = "sk-x", OPENAI_BASE_URL = m:base_url("openai") }) })
    assert.equal("openai", r.ia_provider_name)
    assert.same({ provider = "cohere", status = "skipped", kind = "unsupported", note = "unsupported: user" },
      r.metadata.attempts[1])
  end)
end)

-- `aiorch ask` as a subprocess, the mock served by this process meanwhile.
local function ask(e, ...)
  local full = { CO_API_KEY = false, CO_API_URL = false, COHERE_MODEL = false, COHERE_POLICY = false,
    AIORCH_PROVIDERS = false, AIORCH_PATH = false, AIORCH_POLICY = false, AIORCH_LOG = "debug" }
  return support.run_aiorch({ "ask", ... }, support.merge(full, e))
end

describe("aiorch ask --providers cohere", function()
  it("prints the answer, streamed or not, and the StandardAIResponse with --json", function()
    local code, out, err = ask(env(), "--providers", "cohere", "What is Lua?")
    assert.equal(0, code, err)
    assert.equal("Hello from the mock cohere provider. You asked: What is Lua?\n", out)
    code, out, err = ask(env({ chunks = 4 }), "--stream", "--providers", "cohere", "What is Lua?")
    assert.equal(0, code, err)
    assert.equal("Hello from the mock cohere provider. You asked: What is Lua?\n", out)
    assert.is_true(m.requests[#m.requests].json.stream)
    code, out, err = ask(env(nil, { COHERE_MODEL = "command-r7b-12-2024" }), "--json", "--max-tokens", "50",
      "--temperature", "4.5", "--providers", "cohere", "hello")
    assert.equal(0, code, err)
    local r = assert(cjson.decode(out))
    assert.equal("cohere", r.ia_provider_name)
    assert.same({ "cohere", "command-r7b-12-2024", "COMPLETE", "stop" }, { r.metadata.api, r.metadata.model,
      r.metadata.provider_finish_reason, r.metadata.finish_reason })
    local billed = r.metadata.upstream.billed_units
    assert.equal(billed.input_tokens + PREAMBLE_TOKENS, r.metadata.usage.input_tokens)
    assert.equal(billed.output_tokens, r.metadata.usage.output_tokens)
    local sent = m.requests[#m.requests].json
    assert.same({ "command-r7b-12-2024", 50, 4.5 }, { sent.model, sent.max_tokens, sent.temperature })
    for _, text in ipairs { out, err } do
      assert.falsy(text:find(KEY, 1, true), "the key leaked")
    end
  end)

  it("fails in one line: an upstream error, no key, a temperature out of range", function()
    local code, out, err = ask(env({ fault = "500" }), "--providers", "cohere", "hi")
    assert.equal(1, code)
    assert.equal("", out)
    assert.matches("aiorch: all providers failed: cohere: server_error %(HTTP 500: internal server error", err)
    assert.falsy(err:find(KEY, 1, true))
    code, out, err = ask({}, "--providers", "cohere", "hi")
    assert.equal(1, code, out)
    assert.matches("cohere: unavailable %(CO_API_KEY is not set%)", err)
    code, out, err = ask(env(), "--providers", "cohere", "--temperature", "6", "hi")
    assert.equal("", out)
    assert.equal(2, code)
    assert.matches("temperature 6 is outside cohere's range 0..5", err)
  end)
end)

describe("aiorch serve with a cohere provider", function()
  local gw

  setup(function()
    gw = support.serve(('return { providers = { cohere = { base_url = %q } } }\n'):format(m:base_url("cohere",
      { chunks = 3 })), { CO_API_KEY = KEY, OPENAI_API_KEY = false, ANTHROPIC_API_KEY = false })
  end)

  teardown(function()
    gw.stop()
  end)

  local sse_of = support.sse_events

  it("streams cohere's tool calls to an OpenAI client as tool_calls deltas", function()
    local status, h, body = support.post(gw.base .. "/v1/chat/completions", { model = MODEL, stream = true,
      messages = { { role = "user", content = "Weather in Oslo? get_weather" } },
      tools = { { type = "function", ["function"] = { name = "get_weather", parameters = WEATHER } } } })
    assert.equal(200, status, body)
    assert.equal("cohere", h["x-aiorch-provider"])
    local content, args, id, finish = {}, {}, nil, nil
    for _, ev in ipairs(sse_of(body)) do
      local c = type(ev.data) == "table" and ev.data.choices[1]
      if c then
        content[#content + 1] = c.delta.content
        for _, tc in ipairs(c.delta.tool_calls or {}) do
          id = id or tc.id
          args[#args + 1] = tc["function"].arguments ~= "" and tc["function"].arguments or nil
        end
        finish = c.finish_reason ~= cjson.null and c.finish_reason or finish
      end
    end
    assert.equal("I will use get_weather to answer this.", table.concat(content))
    assert.matches("^get_weather_mock%d+$", id)
    assert.equal(3, #args)
    assert.equal("string", type(cjson.decode(table.concat(args)).city))
    assert.equal("tool_calls", finish)
  end)

  it("streams cohere's thinking and text to an Anthropic client as content blocks", function()
    local status, _, body = support.post(gw.base .. "/v1/messages", { model = MODEL, stream = true, max_tokens = 99,
      thinking = { type = "enabled", budget_tokens = 1024 }, messages = { { role = "user", content = "Why?" } } },
      { ["anthropic-version"] = "2023-06-01" })
    assert.equal(200, status, body)
    local blocks, stop = {}, nil
    for _, ev in ipairs(sse_of(body)) do
      if ev.event == "content_block_start" then
        blocks[#blocks + 1] = ev.data.content_block.type
      elseif ev.event == "message_delta" then
        stop = ev.data.delta.stop_reason
      end
    end
    assert.same({ "thinking", "text" }, blocks)
    assert.equal("end_turn", stop)
    local sent = m.requests[#m.requests].json
    assert.same({ type = "enabled", token_budget = 1024 }, sent.thinking)
    assert.equal(99, sent.max_tokens)
  end)
end)
