-- Google Gemini: the wire module's own rules (ids, signatures, finish
-- reasons, streams both ways), the adapter against the mock's Gemini API
-- over loopback (answers, streams, tools, thinking, faults, the key's two
-- variables), and the gateway's Gemini endpoints with every provider
-- behind them. Runs inside the runtime.
local aiorch = require "aiorch"
local cjson = require "cjson.safe"
local json = require "aiorch.json"
local support = require "tests.support"
local orchestrate = require "aiorch.orchestrate"
local canonical = require "aiorch.canonical"
local breaker = require "aiorch.breaker"
local wire = require "aiorch.wire.gemini"
local adapter = require "providers.gemini"

local KEYS = { gemini = "gm-spec-key-8181-abcdef", openai = "sk-gm-spec-openai-9191",
  anthropic = "sk-ant-gm-spec-2323" }
local PATH = "/v1beta/models/gemini-2.5-flash:generateContent"
local STREAM_PATH = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
local WEATHER = { type = "object", properties = { city = { type = "string" } }, required = { "city" } }

local m -- the mock providers

support.use_mock(function(mock) m = mock end)

local function decode(doc, path)
  return wire.decode_request(json.decode(cjson.encode(doc)), {}, path or PATH)
end

local function user(text)
  return { role = "user", parts = { { text = text } } }
end

-- The SSE events of a stream's text: {data = text}.
local function sse(text)
  local out = {}
  for block in text:gmatch("(.-)\n\n") do
    out[#out + 1] = { data = block:match("data: ([^\n]*)") }
  end
  return out
end

describe("wire.gemini requests", function()
  it("reads the model and the stream flag from the path (v1beta and v1)", function()
    local _, info = assert(decode({ contents = { user("q") } }, STREAM_PATH))
    assert.same({ model = "gemini-2.5-flash", stream = true, include_usage = true }, info)
    _, info = assert(decode({ contents = { user("q") } }, "/v1/models/gemini-2.0-flash:generateContent"))
    assert.same({ model = "gemini-2.0-flash", stream = false, include_usage = true }, info)
  end)

  it("names the field at fault", function()
    local bad = {
      { {}, "^contents: " },
      { { contents = { { role = "robot", parts = { { text = "q" } } } } }, "^contents%[0%]%.role: " },
      { { contents = { { role = "user", parts = {} } } }, "^contents%[0%]%.parts: " },
      { { contents = { { role = "user", parts = { { functionCall = { name = "f" } } } } } },
        "^contents%[0%]%.parts%[0%]%.functionCall: " },
      { { contents = { user("q"), { role = "user", parts = { { functionResponse = { name = "f",
        response = {} } } } } } },
        "^contents%[1%]%.parts%[0%]%.functionResponse: answers no earlier functionCall named 'f'" },
      { { contents = { user("q") }, tools = { { functionDeclarations = { { description = "x" } } } } },
        "^tools%[0%]%.functionDeclarations%[0%]%.name: " },
    }
    for _, c in ipairs(bad) do
      local req, err = decode(c[1])
      assert.is_nil(req)
      assert.matches(c[2], err)
    end
    local req, err = decode({ contents = { user("q") } }, "/v1beta/models/m:streamGenerateContent")
    assert.is_nil(req)
    assert.matches("^alt: ", err)
    req, err = decode({ contents = { user("q") } }, "/v1beta/models/m:countTokens")
    assert.is_nil(req)
    assert.matches("^path: unknown method 'countTokens'", err)
  end)

  it("makes stable ids for calls without one, pairs responses by name and order, and sends Gemini only its own",
    function()
      local doc = { contents = {
        user("q"),
        { role = "model", parts = {
          { functionCall = { name = "f", args = { n = 1 } } },
          { functionCall = { name = "g", args = {} } },
          { functionCall = { name = "f", args = { n = 2 } } },
          { functionCall = { id = "own-7", name = "h", args = {} } } } },
        { role = "user", parts = {
          { functionResponse = { name = "f", response = { output = "one" } } },
          { functionResponse = { name = "f", response = { output = "two" } } },
          { functionResponse = { id = "own-7", name = "h", response = { x = 1 } } },
          { functionResponse = { name = "g", response = { error = "broken" } } } } } } }
      local req = assert(decode(doc))
      local calls = req.messages[2].content
      assert.same({ "gcall_1_0", "gcall_1_1", "gcall_1_2", "own-7" }, { calls[1].id, calls[2].id, calls[3].id,
        calls[4].id })
      local results = req.messages[3].content
      assert.same({ "gcall_1_0", "gcall_1_2", "own-7", "gcall_1_1" }, { results[1].id, results[2].id, results[3].id,
        results[4].id })
      assert.same({ "one", "two", '{"x":1}', "broken" }, { results[1].content, results[2].content,
        results[3].content, results[4].content })
      assert.is_true(results[4].is_error)
      assert.same(decode(doc), req) -- the same request, the same ids

      local body = wire.encode_request(assert(canonical.normalize(req)))
      local parts = body.contents[2].parts
      assert.is_nil(parts[1].functionCall.id)
      assert.equal("own-7", parts[4].functionCall.id)
      local back = body.contents[3].parts
      assert.same({ "f", "f", "h", "g" }, { back[1].functionResponse.name, back[2].functionResponse.name,
        back[3].functionResponse.name, back[4].functionResponse.name })
      assert.same({ output = "two" }, back[2].functionResponse.response)
      assert.same({ error = "broken" }, back[4].functionResponse.response)
      assert.equal("own-7", back[3].functionResponse.id)
      assert.is_nil(back[1].functionResponse.id)
    end)

  it("keeps every thought signature on its part, a streamed run joined as the part it is", function()
    local req = assert(decode({ contents = { user("q"), { role = "model", parts = {
      { text = "a ", thought = true }, { text = "b", thought = true, thoughtSignature = "S1" },
      { text = "x", thought = true },
      { text = "Hel" }, { text = "lo", thoughtSignature = "S2" },
      { functionCall = { name = "f", args = {} }, thoughtSignature = "S3" } } },
      { role = "user", parts = { { functionResponse = { name = "f", response = {} } } } } } }))
    local parts = req.messages[2].content
    assert.same({ type = "thinking", text = "a b", signature = "S1" }, parts[1])
    assert.same({ type = "thinking", text = "x" }, parts[2])
    assert.same({ type = "text", text = "Hello", signature = "S2" }, parts[3])
    assert.equal("S3", parts[4].signature)
    local out = wire.encode_request(assert(canonical.normalize(req))).contents[2].parts
    assert.same({ text = "a b", thought = true, thoughtSignature = "S1" }, out[1])
    assert.same({ text = "x", thought = true }, out[2])
    assert.same({ text = "Hello", thoughtSignature = "S2" }, out[3])
    assert.equal("S3", out[4].thoughtSignature)
    -- Another API cannot take them: a text or call signature is not sent there.
    local openai = require "aiorch.wire.openai"
    local dropped = canonical.drop(assert(canonical.normalize(req)), { "thinking", "thinking.unsigned" })
    assert.same({}, canonical.unsupported(dropped, openai))
    local o = openai.encode_request(dropped, { model = "m" })
    assert.is_nil(json.encode(o):find("S2", 1, true))
  end)
end)

describe("wire.gemini answers", function()
  it("normalises the finish reasons; a prompt blocked outright is the error kind content_filter", function()
    local function answer(reason, parts)
      return wire.decode_response({ candidates = { { content = { parts = parts or { { text = "t" } } },
        finishReason = reason } } })
    end
    assert.equal("stop", answer("STOP").finish_reason)
    assert.equal("tool_calls", answer("STOP", { { functionCall = { name = "f" } } }).finish_reason)
    assert.equal("length", answer("MAX_TOKENS").finish_reason)
    for _, r in ipairs({ "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY" }) do
      local res = answer(r)
      assert.equal("content_filter", res.finish_reason, r)
      assert.equal(r, res.provider_finish_reason)
    end
    assert.equal("other", answer("MALFORMED_FUNCTION_CALL").finish_reason)
    local r, kind, msg = wire.decode_response({ promptFeedback = { blockReason = "SAFETY" },
      usageMetadata = { promptTokenCount = 3 } })
    assert.is_nil(r)
    assert.equal("content_filter", kind)
    assert.matches("the prompt was blocked %(SAFETY%)", msg)
    r, kind = wire.decode_response({ candidates = {} })
    assert.is_nil(r)
    assert.equal("parse", kind)
  end)

  it("counts every input and output token", function()
    local r = assert(wire.decode_response({ candidates = { { content = { parts = { { text = "t" } } },
      finishReason = "STOP" } }, usageMetadata = { promptTokenCount = 100, toolUsePromptTokenCount = 7,
      candidatesTokenCount = 10, thoughtsTokenCount = 30, cachedContentTokenCount = 64 } }))
    assert.same({ input_tokens = 107, output_tokens = 40, cached_input_tokens = 64, reasoning_tokens = 30 }, r.usage)
    -- written back: candidates without the thoughts
    local out = cjson.decode(wire.encode_response({ { response_text = "t", content = r.content,
      metadata = { usage = r.usage, finish_reason = "stop" } } }, "id1", "m"))
    assert.same({ promptTokenCount = 107, candidatesTokenCount = 10, thoughtsTokenCount = 30,
      cachedContentTokenCount = 64, totalTokenCount = 147 }, out.usageMetadata)
    assert.equal("STOP", out.candidates[1].finishReason)
  end)

  it("leaves out a part that JSON cannot hold again, instead of failing the answer", function()
    local odd = json.object({ "x" }) -- what a lenient decoder may make of malformed JSON
    local out = cjson.decode(wire.encode_response({ { response_text = "t", content = { { type = "text", text = "t" },
      { type = "opaque", api = "gemini", value = odd } }, metadata = {} } }, "id1", "m"))
    assert.same({ { text = "t" } }, out.candidates[1].content.parts)
  end)
end)

describe("wire.gemini streams", function()
  local function chunk(doc)
    return { data = cjson.encode(doc) }
  end

  it("are cut without a finish reason; an error chunk or a blocked prompt ends them with its kind", function()
    local dec = wire.stream_decoder()
    dec:event(chunk({ candidates = { { content = { parts = { { text = "Hi" } } } } } }))
    local r, kind = dec:result()
    assert.is_nil(r)
    assert.equal("stream_cut", kind)

    dec = wire.stream_decoder()
    dec:event(chunk({ candidates = { { content = { parts = { { text = "Hi" } } } } } }))
    assert.is_nil(dec:event(chunk({ error = { code = 500, message = "boom", status = "INTERNAL" } })))
    r, kind = dec:result()
    assert.is_nil(r)
    assert.equal("server_error", kind)

    dec = wire.stream_decoder()
    assert.is_nil(dec:event(chunk({ promptFeedback = { blockReason = "PROHIBITED_CONTENT" } })))
    r, kind = dec:result()
    assert.is_nil(r)
    assert.equal("content_filter", kind)
  end)

  it("give a function call whole, its signature with it, and a signed text piece its signature", function()
    local dec = wire.stream_decoder()
    local evs = {}
    for _, c in ipairs({
      { candidates = { { content = { parts = { { text = "Hel" } } } } }, responseId = "rid" },
      { candidates = { { content = { parts = { { text = "lo", thoughtSignature = "T" } } } } } },
      { candidates = { { content = { parts = { { functionCall = { name = "f", args = { a = {} } },
        thoughtSignature = "F" } } }, finishReason = "STOP" } } } }) do
      local out = dec:event(chunk(c))
      for _, e in ipairs(out.type and { out } or out) do
        evs[#evs + 1] = e
      end
    end
    assert.same({ "text", "text", "tool_call", "tool_arguments" }, { evs[1].type, evs[2].type, evs[3].type,
      evs[4].type })
    assert.equal("T", evs[2].signature)
    assert.same({ 0, "gcall_rid_0_0", "f", "F" }, { evs[3].index, evs[3].id, evs[3].name, evs[3].signature })
    assert.equal('{"a":{}}', evs[4].text)
    local r = assert(dec:result())
    assert.same({ type = "text", text = "Hello", signature = "T" }, r.content[1])
    assert.equal("tool_calls", r.finish_reason)
    assert.equal("Hello", r.text)
  end)

  it("are written with the last part held for the chunk that ends them; a call whole", function()
    local enc = wire.stream_encoder("sid", "m")
    local out = { enc:start("m2", 1) }
    out[#out + 1] = enc:event({ type = "thinking", text = "hm" }, 0)
    out[#out + 1] = enc:event({ type = "thinking_signature", signature = "SIG" }, 0)
    out[#out + 1] = enc:event({ type = "text", text = "Hi" }, 0)
    out[#out + 1] = enc:event({ type = "tool_call", index = 0, id = "c1", name = "f" }, 0)
    out[#out + 1] = enc:event({ type = "tool_arguments", index = 0, text = '{"a":' }, 0)
    out[#out + 1] = enc:event({ type = "tool_arguments", index = 0, text = "1}" }, 0)
    out[#out + 1] = enc:finish({ { response_text = "Hi", metadata = { finish_reason = "tool_calls",
      usage = { input_tokens = 5, output_tokens = 7, reasoning_tokens = 2 } } } })
    local events = sse(table.concat(out))
    assert.equal(3, #events)
    local docs = {}
    for i, e in ipairs(events) do
      docs[i] = cjson.decode(e.data)
      assert.equal("m2", docs[i].modelVersion)
      assert.equal("sid", docs[i].responseId)
    end
    assert.same({ text = "hm", thought = true, thoughtSignature = "SIG" }, docs[1].candidates[1].content.parts[1])
    assert.same({ text = "Hi" }, docs[2].candidates[1].content.parts[1])
    local last = docs[3].candidates[1]
    assert.same({ id = "c1", name = "f", args = { a = 1 } }, last.content.parts[1].functionCall)
    assert.equal("STOP", last.finishReason)
    assert.same({ promptTokenCount = 5, candidatesTokenCount = 5, thoughtsTokenCount = 2, totalTokenCount = 12 },
      docs[3].usageMetadata)
    assert.same({ error = { code = 502, message = "broke", status = "UNAVAILABLE" } },
      cjson.decode(sse(enc:error(502, "broke"))[1].data))
  end)
end)

describe("the gemini adapter against the mock", function()
  local function env(d, extra)
    local e = { GEMINI_API_KEY = KEYS.gemini, GEMINI_BASE_URL = m:base_url("gemini", d) }
    return support.merge(e, extra)
  end

  local function ask(request, d, opts)
    opts = opts or {}
    opts.env = opts.env or env(d)
    return orchestrate.orchestrate(request, "single", { "gemini" }, opts)
  end

  local function last_request()
    return m.requests[#m.requests]
  end

  it("answers, plain and streamed, with the key in x-goog-api-key and the model in the URL", function()
    local r = ask({ user_question = "What is two plus two?" })
    assert.equal("success", r.status, r.error_message)
    assert.equal("Hello from the mock gemini provider. You asked: What is two plus two?", r.response_text)
    assert.equal("stop", r.metadata.finish_reason)
    assert.equal("STOP", r.metadata.provider_finish_reason)
    assert.equal("gemini", r.metadata.api)
    assert.equal("gemini-2.5-flash", r.metadata.model)
    assert.is_true(r.metadata.usage.input_tokens > 0 and r.metadata.usage.output_tokens > 0)
    local req = last_request()
    assert.equal(KEYS.gemini, req.headers["x-goog-api-key"])
    assert.is_nil(req.headers["authorization"])
    assert.equal("/v1beta/models/gemini-2.5-flash:generateContent", req.path)

    local tokens = {}
    local s = ask({ user_question = "What is two plus two?" }, nil,
      { stream = true, on_token = function(t) tokens[#tokens + 1] = t end })
    assert.equal("success", s.status, s.error_message)
    assert.is_true(#tokens >= 3)
    assert.equal(r.response_text, table.concat(tokens))
    assert.equal("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", last_request().path)
  end)

  it("takes its key from GOOGLE_API_KEY when GEMINI_API_KEY is not set, and says which are missing", function()
    local r = ask({ user_question = "q" }, nil, { env = { GOOGLE_API_KEY = KEYS.gemini .. "-google",
      GEMINI_BASE_URL = m:base_url("gemini") } })
    assert.equal("success", r.status, r.error_message)
    assert.equal(KEYS.gemini .. "-google", last_request().headers["x-goog-api-key"])
    r = ask({ user_question = "q" }, nil, { env = { GEMINI_BASE_URL = m:base_url("gemini") } })
    assert.equal("unavailable", r.metadata.error_kind)
    assert.equal("GEMINI_API_KEY is not set (nor GOOGLE_API_KEY)", r.error_message)
  end)

  it("calls tools with ids of its own, and reads the results back by name", function()
    local tools = { { name = "get_weather", description = "Weather", parameters = WEATHER } }
    local msgs = { { role = "user", content = "Weather in Paris? use get_weather" } }
    for _, stream in ipairs({ false, true }) do
      local r = ask({ messages = msgs, tools = tools }, nil, { stream = stream })
      assert.equal("success", r.status, r.error_message)
      assert.equal("tool_calls", r.metadata.finish_reason)
      local call = r.content[1]
      assert.equal("tool_call", call.type)
      assert.matches("^gcall_mock%-gemini%-%d+_0_0$", call.id)
      assert.equal("string", type(cjson.decode(call.arguments).city))
    end
    local r = ask({ messages = msgs, tools = tools })
    local call = r.content[1]
    local back = ask({ messages = { msgs[1], { role = "assistant", content = r.content },
      { role = "tool", content = { { type = "tool_result", id = call.id, content = "22 C" } } } }, tools = tools })
    assert.equal("success", back.status, back.error_message)
    assert.matches("Tool results: %[get_weather%] 22 C$", back.response_text)
    local sent = cjson.decode(last_request().body)
    assert.is_nil(sent.contents[2].parts[1].functionCall.id) -- an id aiorch made
  end)

  it("thinks, and its signatures come back verified (a changed thought is refused)", function()
    local q = { role = "user", content = "Why is the sky blue?" }
    for _, stream in ipairs({ false, true }) do
      local r = ask({ messages = { q }, reasoning = { budget_tokens = 1024, display = "summarized" } }, nil,
        { stream = stream })
      assert.equal("success", r.status, r.error_message)
      local th = r.content[1]
      assert.equal("thinking", th.type)
      assert.matches('^The user asks: "Why is the sky blue%?"', th.text)
      assert.is_string(th.signature)
      assert.is_true(r.metadata.usage.reasoning_tokens > 0)
      local again = ask({ messages = { q, { role = "assistant", content = r.content },
        { role = "user", content = "And at sunset?" } }, reasoning = { budget_tokens = 1024 } })
      assert.equal("success", again.status, again.error_message)
      assert.is_true(last_request().thinking_verified)
      local forged = { type = "thinking", text = th.text .. " Or not.", signature = th.signature }
      local bad = ask({ messages = { q, { role = "assistant", content = { forged, r.content[2] } },
        { role = "user", content = "And?" } } })
      assert.equal("bad_request", bad.metadata.error_kind)
      assert.matches("Corrupted thought signature", bad.error_message)
    end
  end)

  it("reports each fault with its kind, the provider's own status, and never the key", function()
    local cases = {
      { { fault = "429", retry_after = 2 }, "rate_limited", { type = "RESOURCE_EXHAUSTED", code = "429" } },
      { { fault = "500" }, "server_error", { type = "INTERNAL", code = "500" } },
      { { fault = "401" }, "auth", { type = "UNAUTHENTICATED", code = "401" } },
      { { fault = "error200" }, "server_error", { type = "INTERNAL", code = "500" } },
      { { fault = "malformed" }, "parse" },
      { { fault = "echo_key" }, "auth" },
    }
    for _, c in ipairs(cases) do
      breaker.reset()
      local r = ask({ user_question = "q" }, c[1])
      assert.equal("error", r.status)
      assert.equal(c[2], r.metadata.error_kind, c[1].fault)
      if c[3] then
        assert.same(c[3], r.metadata.provider_error)
      end
      if c[1].retry_after then
        assert.equal(2, r.metadata.retry_after)
      end
      assert.falsy(cjson.encode(r):find(KEYS.gemini:sub(1, 8), 1, true), "the key leaked")
    end
    breaker.reset()
    local r = ask({ user_question = "q" }, { fault = "cut", chunks = 6 }, { stream = true, on_token = function() end })
    assert.equal("stream_cut", r.metadata.error_kind)
    assert.truthy(#(r.metadata.partial_text or "") > 0)
    breaker.reset()
    r = ask({ user_question = "q" }, { finish_reason = "SAFETY" })
    assert.equal("success", r.status)
    assert.equal("content_filter", r.metadata.finish_reason)
    assert.equal("SAFETY", r.metadata.provider_finish_reason)
  end)

  it("sends a request that came in through Gemini's API as its bytes", function()
    local body = '{"contents":[{"parts":[{"text":"q"}]}],  "safetySettings":[]}'
    local w = adapter.build_request({ key = "k", base_url = "http://h" },
      { raw = { api = "gemini", body = body, doc = cjson.decode(body) } }, { stream = true, model = "gemini-x" })
    assert.equal(body, w.body)
    assert.equal("http://h/v1beta/models/gemini-x:streamGenerateContent?alt=sse", w.url)
    assert.equal("k", w.headers["x-goog-api-key"])
    assert.equal("text/event-stream", w.headers["accept"])
  end)
end)

describe("the gateway's Gemini API", function()
  local logs = {}

  after_each(function()
    support.close_gateways()
  end)

  local function start_gw(raw)
    local env = {
      AIORCH_PROVIDERS = "openai,anthropic,gemini",
      OPENAI_API_KEY = KEYS.openai, ANTHROPIC_API_KEY = KEYS.anthropic, GEMINI_API_KEY = KEYS.gemini,
      OPENAI_BASE_URL = m:base_url("openai"), ANTHROPIC_BASE_URL = m:base_url("anthropic"),
      GEMINI_BASE_URL = m:base_url("gemini"), GW_CLIENT_KEY = "gm-client-secret-4545",
    }
    return (support.start_gateway(raw, env, function(l) logs[#logs + 1] = l end))
  end

  local function post(url, body, headers)
    local h = { ["content-type"] = "application/json" }
    for k, v in pairs(headers or {}) do
      h[k] = v
    end
    local status, rh, rb = aiorch.http.request { method = "POST", url = url, headers = h,
      body = type(body) == "table" and cjson.encode(body) or body, timeout_ms = 10000 }
    assert(status, tostring(rh))
    return status, rh, rb, cjson.decode(rb or "")
  end

  local ASK = '{"contents": [{"role": "user", "parts": [{"text": "What is two plus two?"}]}],\n "safetySettings": []}'

  it("passes a Gemini client's bytes to the gemini provider, and its answer back", function()
    local base = start_gw()
    for _, path in ipairs({ PATH, "/v1/models/gemini-2.5-flash:generateContent" }) do
      m:reset()
      local status, h, body, doc = post(base .. path, ASK)
      assert.equal(200, status, body)
      assert.equal("gemini", h["x-aiorch-provider"])
      assert.equal(ASK, m.requests[1].body)
      assert.matches("^mock%-gemini%-", doc.responseId) -- the mock's own answer
      assert.equal("Hello from the mock gemini provider. You asked: What is two plus two?",
        doc.candidates[1].content.parts[1].text)
    end
    m:reset()
    local status, h, body = post(base .. STREAM_PATH, ASK)
    assert.equal(200, status)
    assert.equal("text/event-stream", h["content-type"])
    assert.equal(ASK, m.requests[1].body)
    local events = sse(body)
    assert.is_true(#events >= 3)
    assert.equal("STOP", cjson.decode(events[#events].data).candidates[1].finishReason)
    -- Every upstream event once, also one that makes several canonical
    -- events (a thought piece with its signature, a call and its arguments).
    local thinking = cjson.encode({ contents = { { parts = { { text = "Why? use get_weather" } } } },
      tools = { { functionDeclarations = { { name = "get_weather", parametersJsonSchema = WEATHER } } } },
      generationConfig = { thinkingConfig = { includeThoughts = true, thinkingBudget = 1024 } } })
    local _, _, direct = post(m:base_url("gemini") .. STREAM_PATH, thinking, { ["x-goog-api-key"] = "k" })
    local _, _, relayed = post(base .. STREAM_PATH, thinking)
    local function strip(text)
      return (text:gsub('"responseId":"[^"]*"', ""))
    end
    assert.equal(strip(direct), strip(relayed))
  end)

  it("translates for the openai and anthropic providers, plain and streamed", function()
    local base = start_gw()
    local status0, _, body0, doc0 = post(base .. PATH, ASK, { ["x-aiorch-providers"] = "openai" })
    assert.equal(400, status0, body0) -- Gemini's own field, by its name
    assert.equal("safetySettings is not supported by provider openai (a field of the gemini API; provider openai "
      .. "speaks openai)", doc0.error.message)
    local PLAIN = '{"contents": [{"role": "user", "parts": [{"text": "What is two plus two?"}]}]}'
    for _, p in ipairs({ "openai", "anthropic" }) do
      local status, h, body, doc = post(base .. PATH, PLAIN, { ["x-aiorch-providers"] = p })
      assert.equal(200, status, body)
      assert.equal(p, h["x-aiorch-provider"])
      local c = doc.candidates[1]
      assert.equal("Hello from the mock " .. p .. " provider. You asked: What is two plus two?",
        c.content.parts[1].text)
      assert.equal("STOP", c.finishReason)
      assert.is_true(doc.usageMetadata.promptTokenCount > 0)
      local _, _, sbody = post(base .. STREAM_PATH, PLAIN, { ["x-aiorch-providers"] = p })
      local text = {}
      local events = sse(sbody)
      for _, e in ipairs(events) do
        local d = cjson.decode(e.data)
        text[#text + 1] = d.candidates[1].content.parts[1].text
      end
      assert.equal(c.content.parts[1].text, table.concat(text))
      assert.equal("STOP", cjson.decode(events[#events].data).candidates[1].finishReason)
    end
    -- what another API cannot take is refused by name, in Gemini's error shape
    local status, _, body, doc = post(base .. PATH, { contents = { { role = "user", parts = { { text = "q" } } },
      { role = "model", parts = { { text = "The answer is" } } } } }, { ["x-aiorch-providers"] = "openai" })
    assert.equal(400, status, body)
    assert.equal("INVALID_ARGUMENT", doc.error.status)
    assert.matches("prefill is not supported by provider openai", doc.error.message)
  end)

  it("streams a gemini answer's tool calls to OpenAI and Anthropic clients", function()
    local base = start_gw()
    local tools = { { type = "function", ["function"] = { name = "get_weather", parameters = WEATHER } } }
    local _, _, body = post(base .. "/v1/chat/completions", { model = "gemini-2.5-flash", stream = true,
      tools = tools, messages = { { role = "user", content = "Weather in Paris? use get_weather" } } })
    local name, args, finish, id = nil, {}, nil, nil
    for _, e in ipairs(sse(body)) do
      if e.data ~= "[DONE]" then
        local c = cjson.decode(e.data).choices[1]
        local tc = c and c.delta.tool_calls and c.delta.tool_calls[1]
        if tc then
          name = tc["function"].name or name
          id = tc.id or id
          args[#args + 1] = tc["function"].arguments
        end
        finish = c and c.finish_reason ~= cjson.null and c.finish_reason or finish
      end
    end
    assert.equal("get_weather", name)
    assert.matches("^gcall_", id)
    assert.equal("string", type(cjson.decode(table.concat(args)).city))
    assert.equal("tool_calls", finish)

    local _, _, abody = post(base .. "/v1/messages", { model = "gemini-2.5-flash", max_tokens = 100, stream = true,
      tools = { { name = "get_weather", input_schema = WEATHER } },
      messages = { { role = "user", content = "Weather in Paris? use get_weather" } } },
      { ["anthropic-version"] = "2023-06-01" })
    local kinds, input = {}, {}
    for _, e in ipairs(sse(abody)) do
      local d = cjson.decode(e.data)
      if d.type == "content_block_start" then
        kinds[#kinds + 1] = d.content_block.type
      elseif d.type == "content_block_delta" and d.delta.type == "input_json_delta" then
        input[#input + 1] = d.delta.partial_json
      elseif d.type == "message_delta" then
        assert.equal("tool_use", d.delta.stop_reason)
      end
    end
    assert.same({ "tool_use" }, kinds)
    assert.equal("string", type(cjson.decode(table.concat(input)).city))
  end)

  it("takes the client key as x-goog-api-key or ?key=, answers 401 in Gemini's shape, and logs no key", function()
    local base = start_gw({ client_keys_env = { "GW_CLIENT_KEY" } })
    local status, _, _, doc = post(base .. PATH, ASK)
    assert.equal(401, status)
    assert.same({ code = 401, status = "UNAUTHENTICATED" }, { code = doc.error.code, status = doc.error.status })
    status = post(base .. PATH, ASK, { ["x-goog-api-key"] = "gm-client-secret-4545" })
    assert.equal(200, status)
    status = post(base .. PATH .. "?key=gm-client-secret-4545", ASK)
    assert.equal(200, status)
    status = post(base .. STREAM_PATH .. "&key=gm-client-secret-4545", ASK)
    assert.equal(200, status)
    status = post(base .. PATH .. "?key=wrong", ASK)
    assert.equal(401, status)
    assert.is_true(#logs > 0)
    for _, l in ipairs(logs) do
      assert.falsy(l:find("4545", 1, true), "a client key in the log: " .. l)
      assert.falsy(l:find("gemini-2.5-flash:", 1, true), "a model path in the log: " .. l)
    end
  end)
end)

describe("aiorch ask --providers gemini", function()
  local ROOT = debug.getinfo(1, "S").source:match("^@(.*)/tests/spec/[^/]+$") or "."
  local BIN = (os.getenv("AIORCH_BUILD") or (ROOT .. "/build")) .. "/aiorch"

  local function slurp(path)
    local f = io.open(path, "rb")
    local s = f and f:read("a") or ""
    if f then
      f:close()
    end
    os.remove(path)
    return s
  end

  -- Runs the command (the mock serves meanwhile); exit code, stdout, stderr.
  local function ask(d, ...)
    local out, err = os.tmpname(), os.tmpname()
    local pid = assert(aiorch.process.spawn({ BIN, "ask", "--providers", "gemini", ... }, {
      stdout = out, stderr = err,
      env = { GEMINI_API_KEY = KEYS.gemini, GOOGLE_API_KEY = false, GEMINI_BASE_URL = m:base_url("gemini", d),
        GEMINI_MODEL = false, AIORCH_POLICY = false, GEMINI_POLICY = false, AIORCH_PATH = false },
    }))
    local code = aiorch.process.wait(pid, 20000)
    return code, slurp(out), slurp(err)
  end

  it("answers, streams and prints the StandardAIResponse", function()
    local code, out, err = ask(nil, "What is Lua?")
    assert.equal(0, code, err)
    assert.equal("Hello from the mock gemini provider. You asked: What is Lua?\n", out)
    code, out, err = ask({ chunk_delay_ms = 2 }, "--stream", "What is Lua?")
    assert.equal(0, code, err)
    assert.equal("Hello from the mock gemini provider. You asked: What is Lua?\n", out)
    assert.matches("streamGenerateContent%?alt=sse$", m.requests[#m.requests].path)
    code, out = ask(nil, "--json", "What is Lua?")
    assert.equal(0, code)
    local r = cjson.decode(out)
    assert.same({ "gemini", "success", "gemini", "stop", "gemini-2.5-flash" }, { r.ia_provider_name, r.status,
      r.metadata.api, r.metadata.finish_reason, r.metadata.model })
  end)

  it("fails with one line naming the kind, and no key", function()
    local code, out, err = ask({ fault = "429" }, "What is Lua?")
    assert.equal(1, code)
    assert.equal("", out)
    assert.matches("^aiorch: [^\n]*rate_limited[^\n]*\n$", err)
    assert.falsy(err:find(KEYS.gemini, 1, true))
  end)
end)
