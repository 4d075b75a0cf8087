-- The mock providers, driven over loopback with aiorch.http.
local aiorch = require "aiorch"
local cjson = require "cjson.safe"
local json = require "aiorch.json"
local mock = require "aiorch.mock"
local support = require "tests.support"

local fmt = string.format
local null = cjson.null

local QUESTION = "What is the capital of France?"

local function openai_body(extra)
  local b = {
    model = "gpt-4o-mini",
    messages = {
      { role = "system", content = "You are terse." },
      { role = "user", content = QUESTION },
    },
  }
  return support.merge(b, extra)
end

local function anthropic_body(extra)
  local b = {
    model = "claude-3-haiku-20240307",
    max_tokens = 256,
    system = "You are terse.",
    messages = { { role = "user", content = QUESTION } },
  }
  return support.merge(b, extra)
end

local function words(s)
  local _, n = s:gsub("%S+", "")
  return n
end

local API = {
  openai = {
    path = "/chat/completions",
    body = openai_body,
    headers = { authorization = "Bearer sk-test" },
  },
  anthropic = {
    path = "/v1/messages",
    body = anthropic_body,
    headers = { ["x-api-key"] = "sk-ant-test", ["anthropic-version"] = "2023-06-01" },
  },
}

-- POSTs to the api's endpoint under base; returns status, headers, body, events.
local function call(api, base, opts)
  opts = opts or {}
  local a = API[api]
  local headers = { ["content-type"] = "application/json" }
  for k, v in pairs(a.headers) do
    headers[k] = v
  end
  for k, v in pairs(opts.headers or {}) do
    headers[k] = v
  end
  local events = {}
  local on_event
  if opts.stream then
    on_event = function(ev)
      events[#events + 1] = ev
    end
  end
  local status, h, body = aiorch.http.request {
    method = "POST",
    url = base .. a.path,
    headers = headers,
    body = opts.raw or cjson.encode(a.body(opts.body)),
    timeout_ms = opts.timeout_ms or 5000,
    on_event = on_event,
  }
  return status, h, body, events
end

local function stream_body(api, extra)
  extra = extra or {}
  extra.stream = true
  return API[api].body(extra)
end

-- Decodes every event's data; returns the decoded list.
local function decode_events(events)
  local out = {}
  for i, ev in ipairs(events) do
    out[i] = assert(cjson.decode(ev.data), "event " .. i .. " is not JSON: " .. tostring(ev.data))
  end
  return out
end

-- The usage of an answer, in each API's shape (opts: cached, reasoning,
-- read, write_5m, write_1h).
local function openai_usage(prompt, completion, opts)
  opts = opts or {}
  return {
    prompt_tokens = prompt, completion_tokens = completion, total_tokens = prompt + completion,
    prompt_tokens_details = { cached_tokens = opts.cached or 0, audio_tokens = 0 },
    completion_tokens_details = { reasoning_tokens = opts.reasoning or 0, audio_tokens = 0,
      accepted_prediction_tokens = 0, rejected_prediction_tokens = 0 },
  }
end

local function anthropic_usage(input, output, opts)
  opts = opts or {}
  local w5, w1 = opts.write_5m or 0, opts.write_1h or 0
  return {
    input_tokens = input, output_tokens = output, service_tier = "standard",
    cache_creation_input_tokens = w5 + w1, cache_read_input_tokens = opts.read or 0,
    cache_creation = { ephemeral_5m_input_tokens = w5, ephemeral_1h_input_tokens = w1 },
  }
end

-- Longer under valgrind (tests/busted.lua).
local SLOWDOWN = (tonumber(os.getenv("AIORCH_TEST_SLOWDOWN") or "") or 1)

local function wait_for(fn, ms)
  local deadline = aiorch.now() + (ms or 2000) * SLOWDOWN
  while not fn() do
    if aiorch.now() > deadline then
      return false
    end
    aiorch.sleep(5)
  end
  return true
end

describe("aiorch.mock", function()
  local m

  setup(function()
    m = assert(mock.start { host = "127.0.0.1", port = 0 })
  end)

  teardown(function()
    m:close()
  end)

  before_each(function()
    m:configure {}
    m:reset()
  end)

  describe("urls", function()
    it("gives the port, the url and base urls", function()
      assert.is_true(math.type(m.port) == "integer" and m.port > 0)
      assert.are.equal("http://127.0.0.1:" .. m.port, m.url)
      assert.are.equal(m.url .. "/v1", m:base_url("openai"))
      assert.are.equal(m.url, m:base_url("anthropic", {}))
      assert.are.equal(m.url .. "/_mock/latency_ms=20,fault=500/v1",
        m:base_url("openai", { latency_ms = 20, fault = "500" }))
      assert.are.equal(m.url .. "/_mock/fault=429,retry_after=3",
        m:base_url("anthropic", { retry_after = 3, fault = 429 }))
      assert.are.equal(m.url .. "/_mock/text=a%20b%2Cc%2Fd%3De",
        m:base_url("anthropic", { text = "a b,c/d=e" }))
    end)

    it("returns nil, err when the port is taken", function()
      local other, kind, message = mock.start { port = m.port }
      assert.is_nil(other)
      assert.are.equal("listen", kind)
      assert.are.equal("string", type(message))
    end)

    it("close ends the requests in flight", function()
      local m2 = assert(mock.start {})
      local t = aiorch.spawn(call, "openai", m2:base_url("openai", { fault = "hang" }))
      assert.is_true(wait_for(function() return #m2.requests == 1 end, 500))
      local t0 = aiorch.now()
      m2:close()
      local status, kind = t:await(2000)
      assert.is_nil(status)
      assert.are_not.equal("timeout", kind)
      assert.is_true(aiorch.now() - t0 < 1000)
      assert.is_nil(m2.requests[1].completed_at)
      assert.is_nil((aiorch.http.request { url = m2.url .. "/v1/models" }))
    end)

    it("raises on misuse", function()
      assert.has_error(function() m:base_url("nonesuch") end)
      assert.has_error(function() m:base_url("openai", { bogus = 1 }) end)
      assert.has_error(function() m:base_url("openai", { fault = "418" }) end)
      assert.has_error(function() m:base_url("openai", { chunks = 0 }) end)
      assert.has_error(function() m:configure { latency_ms = -1 } end)
      assert.has_error(function() m:base_url("openai", { stall_after = -1 }) end)
      assert.has_error(function() m:base_url("openai", { size = 1.5 }) end)
      assert.has_error(function() m:base_url("openai", { fail_first = 2 }) end) -- no fault
      assert.has_error(function() m:base_url("openai", { fault = "500", fail_first = 1, key = "" }) end)
      assert.has_error(function() m:configure { fail_first = 1 } end)
    end)

    it("writes the new directives in a fixed order", function()
      assert.are.equal(m.url .. "/_mock/latency_ms=5,first_token_ms=30,fault=huge,size=1000,fail_first=2,"
        .. "key=k%201,chunks=3,stall_after=1/v1",
        m:base_url("openai", { stall_after = 1, chunks = 3, key = "k 1", fail_first = 2, size = 1000,
          fault = "huge", first_token_ms = 30, latency_ms = 5 }))
    end)
  end)

  describe("openai", function()
    it("answers a chat completion", function()
      local status, headers, body = call("openai", m:base_url("openai"))
      assert.are.equal(200, status)
      assert.are.equal("application/json", headers["content-type"])
      local r = assert(cjson.decode(body))
      assert.matches("^chatcmpl%-", r.id)
      assert.are.equal("chat.completion", r.object)
      assert.are.equal("number", type(r.created))
      assert.are.equal("gpt-4o-mini", r.model)
      assert.are.equal(1, #r.choices)
      local c = r.choices[1]
      assert.are.equal(0, c.index)
      assert.are.equal("assistant", c.message.role)
      assert.are.equal(null, c.logprobs)
      assert.are.equal("stop", c.finish_reason)
      local text = c.message.content
      assert.truthy(text:find("openai", 1, true))
      assert.truthy(text:find(QUESTION, 1, true))
      local input = words("You are terse.") + words(QUESTION)
      assert.are.same(openai_usage(input, words(text)), r.usage)
      assert.are.equal("default", r.service_tier)
      assert.matches("^fp_%x+$", r.system_fingerprint)
      assert.are.equal(null, c.message.refusal)
      assert.are.same({}, c.message.annotations)
      assert.is_nil(c.message.tool_calls)
    end)

    it("echoes the model and the question, so answers differ", function()
      local _, _, body = call("openai", m:base_url("openai"), {
        body = { model = "gpt-4o", messages = { { role = "user", content = "Another question" } } },
      })
      local r = assert(cjson.decode(body))
      assert.are.equal("gpt-4o", r.model)
      assert.truthy(r.choices[1].message.content:find("Another question", 1, true))
      assert.falsy(r.choices[1].message.content:find(QUESTION, 1, true))
    end)

    it("echoes only the head of a long question, collapsing its space", function()
      local function answer(q)
        local _, _, body = call("openai", m:base_url("openai"),
          { body = { messages = { { role = "user", content = q } } } })
        return cjson.decode(body).choices[1].message.content
      end
      local long = ("lorem ipsum dolor sit amet "):rep(400)
      local a = answer(long)
      assert.are.equal(a, answer(long:sub(1, 200)))
      assert.matches("%.%.%.$", a)
      assert.are.equal("Hello from the mock openai provider. You asked: a b c",
        answer("a" .. (" "):rep(5000) .. "b\n c"))
    end)

    it("streams chunks ending in [DONE]", function()
      local _, _, plain = call("openai", m:base_url("openai"))
      local answer = cjson.decode(plain).choices[1].message.content
      local status, headers, body, events = call("openai", m:base_url("openai", { chunks = 3 }),
        { stream = true, body = stream_body("openai") })
      assert.are.equal(200, status)
      assert.are.equal("text/event-stream", headers["content-type"])
      assert.are.equal("", body)
      -- role chunk, 3 content chunks, finish chunk, [DONE]
      assert.are.equal(6, #events)
      for _, ev in ipairs(events) do
        assert.are.equal("message", ev.event)
      end
      assert.are.equal("[DONE]", events[6].data)
      table.remove(events)
      local chunks = decode_events(events)
      local id = chunks[1].id
      local text = {}
      for i, c in ipairs(chunks) do
        assert.are.equal(id, c.id)
        assert.are.equal("chat.completion.chunk", c.object)
        assert.are.equal("gpt-4o-mini", c.model)
        assert.are.equal("number", type(c.created))
        assert.is_nil(c.usage)
        assert.are.equal(1, #c.choices)
        assert.are.equal(0, c.choices[1].index)
        assert.are.equal(null, c.choices[1].logprobs)
        if i < #chunks then
          assert.are.equal(null, c.choices[1].finish_reason)
        end
        if i > 1 and i < #chunks then
          text[#text + 1] = c.choices[1].delta.content
        end
      end
      assert.are.same({ role = "assistant", content = "" }, chunks[1].choices[1].delta)
      assert.are.same({}, chunks[5].choices[1].delta)
      assert.are.equal("stop", chunks[5].choices[1].finish_reason)
      assert.are.equal(answer, table.concat(text))
    end)

    it("adds a usage chunk when stream_options.include_usage", function()
      local _, _, _, events = call("openai", m:base_url("openai"), {
        stream = true, body = stream_body("openai", { stream_options = { include_usage = true } }),
      })
      -- role, 5 content, finish, usage, [DONE]
      assert.are.equal(9, #events)
      assert.are.equal("[DONE]", events[9].data)
      table.remove(events)
      local chunks = decode_events(events)
      for i = 1, 7 do
        assert.are.equal(null, chunks[i].usage)
      end
      assert.are.equal("stop", chunks[7].choices[1].finish_reason)
      local u = chunks[8]
      assert.are.equal("chat.completion.chunk", u.object)
      assert.are.equal(0, #u.choices)
      assert.truthy(events[8].data:find('"choices":[]', 1, true))
      local text = {}
      for i = 2, 6 do
        text[#text + 1] = chunks[i].choices[1].delta.content
      end
      local out = words(table.concat(text))
      local input = words("You are terse.") + words(QUESTION)
      assert.are.same(openai_usage(input, out), u.usage)
    end)

    it("lists models", function()
      local status, _, body = aiorch.http.request { url = m:base_url("openai") .. "/models" }
      assert.are.equal(200, status)
      local r = assert(cjson.decode(body))
      assert.are.equal("list", r.object)
      assert.are.equal("gpt-4o-mini", r.data[1].id)
      assert.are.equal("model", r.data[1].object)
      assert.are.equal("openai", m.requests[1].api)
    end)
  end)

  describe("anthropic", function()
    it("answers a message", function()
      local status, headers, body = call("anthropic", m:base_url("anthropic"))
      assert.are.equal(200, status)
      assert.are.equal("application/json", headers["content-type"])
      local r = assert(cjson.decode(body))
      assert.matches("^msg_", r.id)
      assert.are.equal("message", r.type)
      assert.are.equal("assistant", r.role)
      assert.are.equal("claude-3-haiku-20240307", r.model)
      assert.are.equal(1, #r.content)
      assert.are.equal("text", r.content[1].type)
      local text = r.content[1].text
      assert.truthy(text:find("anthropic", 1, true))
      assert.truthy(text:find(QUESTION, 1, true))
      assert.are.equal("end_turn", r.stop_reason)
      assert.are.equal(null, r.stop_sequence)
      assert.are.same(anthropic_usage(words("You are terse.") + words(QUESTION), words(text)), r.usage)
    end)

    it("streams the Messages events in order", function()
      local _, _, plain = call("anthropic", m:base_url("anthropic"))
      local answer = cjson.decode(plain).content[1].text
      local status, headers, body, events = call("anthropic", m:base_url("anthropic"),
        { stream = true, body = stream_body("anthropic") })
      assert.are.equal(200, status)
      assert.are.equal("text/event-stream", headers["content-type"])
      assert.are.equal("", body)
      local names = {}
      for i, ev in ipairs(events) do
        names[i] = ev.event
      end
      assert.are.same({
        "message_start", "content_block_start", "ping",
        "content_block_delta", "content_block_delta", "content_block_delta",
        "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
      }, names)
      local data = decode_events(events)
      for i, d in ipairs(data) do
        assert.are.equal(names[i], d.type)
      end
      local msg = data[1].message
      assert.matches("^msg_", msg.id)
      assert.are.equal("message", msg.type)
      assert.are.equal("assistant", msg.role)
      assert.are.equal("claude-3-haiku-20240307", msg.model)
      assert.are.same({}, msg.content)
      assert.are.equal(null, msg.stop_reason)
      assert.are.same(anthropic_usage(words("You are terse.") + words(QUESTION), 1), msg.usage)
      assert.are.same({ type = "content_block_start", index = 0, content_block = { type = "text", text = "" } },
        data[2])
      local text = {}
      for i = 4, 8 do
        assert.are.equal(0, data[i].index)
        assert.are.equal("text_delta", data[i].delta.type)
        text[#text + 1] = data[i].delta.text
      end
      assert.are.equal(answer, table.concat(text))
      assert.are.same({ type = "content_block_stop", index = 0 }, data[9])
      assert.are.equal("end_turn", data[10].delta.stop_reason)
      assert.are.equal(null, data[10].delta.stop_sequence)
      assert.are.same({ output_tokens = words(answer) }, data[10].usage)
    end)

    it("takes content blocks and the chunks and text directives", function()
      local _, _, _, events = call("anthropic", m:base_url("anthropic", { chunks = 2, text = "one two three" }), {
        stream = true,
        body = stream_body("anthropic", {
          messages = { { role = "user", content = { { type = "text", text = "Blocks here" } } } },
        }),
      })
      local data = decode_events(events)
      assert.are.equal(8, #data)
      assert.are.equal("one two three", data[4].delta.text .. data[5].delta.text)
      assert.are.equal(words("You are terse.") + 2, data[1].message.usage.input_tokens)
      assert.are.equal(3, data[7].usage.output_tokens)
    end)

    it("lists models when asked Anthropic-style", function()
      local status, _, body = aiorch.http.request {
        url = m.url .. "/v1/models", headers = { ["anthropic-version"] = "2023-06-01" },
      }
      assert.are.equal(200, status)
      local r = assert(cjson.decode(body))
      assert.are.equal("model", r.data[1].type)
      assert.are.equal("claude-3-haiku-20240307", r.data[1].id)
      assert.are.equal(false, r.has_more)
      assert.are.equal("anthropic", m.requests[1].api)
    end)
  end)

  describe("faults", function()
    local EXPECT = {
      openai = {
        ["429"] = { "requests", "rate_limit_exceeded" },
        ["500"] = { "server_error", null },
        ["529"] = { "server_error", null },
        ["401"] = { "invalid_request_error", "invalid_api_key" },
        ["400"] = { "invalid_request_error", "invalid_value" },
        ["403"] = { "request_forbidden", "unsupported_country_region_territory" },
        ["503"] = { "server_error", null },
      },
      anthropic = {
        ["429"] = { "rate_limit_error" },
        ["500"] = { "api_error" },
        ["529"] = { "overloaded_error" },
        ["401"] = { "authentication_error" },
        ["400"] = { "invalid_request_error" },
        ["403"] = { "permission_error" },
        ["503"] = { "api_error" },
      },
    }

    local function check_error(api, body, etype, code)
      local r = assert(cjson.decode(body), body)
      if api == "openai" then
        assert.are.equal("string", type(r.error.message))
        assert.are.equal(etype, r.error.type)
        assert.are.equal(null, r.error.param)
        assert.are.equal(code, r.error.code)
      else
        assert.are.equal("error", r.type)
        assert.are.equal(etype, r.error.type)
        assert.are.equal("string", type(r.error.message))
      end
    end

    for _, api in ipairs { "openai", "anthropic" } do
      describe(api, function()
        for _, fault in ipairs { "429", "500", "529", "401", "400", "403", "503" } do
          it("answers fault=" .. fault .. " with the API's error", function()
            for _, stream in ipairs { false, true } do
              local status, headers, body = call(api, m:base_url(api, { fault = fault }), {
                stream = stream, body = stream and stream_body(api) or nil,
              })
              assert.are.equal(tonumber(fault), status)
              assert.are.equal("application/json", headers["content-type"])
              check_error(api, body, EXPECT[api][fault][1], EXPECT[api][fault][2])
              if fault == "429" then
                assert.are.equal("1", headers["retry-after"])
              else
                assert.is_nil(headers["retry-after"])
              end
            end
          end)
        end

        it("sends retry_after in Retry-After", function()
          local status, headers = call(api, m:base_url(api, { fault = "429", retry_after = 7 }))
          assert.are.equal(429, status)
          assert.are.equal("7", headers["retry-after"])
        end)

        it("hangs until the client gives up", function()
          local t0 = aiorch.now()
          local status, kind = call(api, m:base_url(api, { fault = "hang" }), { timeout_ms = 200 })
          assert.is_nil(status)
          assert.are.equal("timeout", kind)
          assert.is_true(aiorch.now() - t0 >= 190)
          local r = m.requests[1]
          assert.is_true(wait_for(function() return r.aborted_at ~= nil end))
          assert.is_nil(r.completed_at)
        end)

        it("sends a malformed body", function()
          local status, _, body = call(api, m:base_url(api, { fault = "malformed" }))
          assert.are.equal(200, status)
          assert.is_nil(cjson.decode(body))
          assert.is_true(#body > 0)
        end)

        it("sends an invalid data line in a stream", function()
          local status, _, _, events = call(api, m:base_url(api, { fault = "malformed" }),
            { stream = true, body = stream_body(api) })
          assert.are.equal(200, status)
          local bad = 0
          for _, ev in ipairs(events) do
            if ev.data ~= "[DONE]" and not cjson.decode(ev.data) then
              bad = bad + 1
            end
          end
          assert.are.equal(1, bad)
        end)

        it("cuts a body off mid-way", function()
          local status, kind = call(api, m:base_url(api, { fault = "cut" }))
          assert.is_nil(status)
          assert.are.equal("reset", kind)
          assert.is_not_nil(m.requests[1].completed_at)
        end)

        it("cuts a stream off mid-way", function()
          local status, kind, _, events = call(api, m:base_url(api, { fault = "cut" }),
            { stream = true, body = stream_body(api) })
          assert.is_nil(status)
          assert.are.equal("reset", kind)
          assert.is_true(#events > 0)
          local last = events[#events]
          assert.are_not.equal("[DONE]", last.data)
          assert.are_not.equal("message_stop", last.event)
          local deltas = 0
          for _, ev in ipairs(events) do
            local d = cjson.decode(ev.data)
            if d and (d.type == "content_block_delta" or (d.choices and d.choices[1].delta.content ~= nil
                and d.choices[1].delta.content ~= "")) then
              deltas = deltas + 1
            end
          end
          assert.are.equal(3, deltas)
        end)

        it("answers 200 with an error object (error200)", function()
          local status, _, body = call(api, m:base_url(api, { fault = "error200" }))
          assert.are.equal(200, status)
          local r = assert(cjson.decode(body))
          if api == "openai" then
            assert.are.equal("server_error", r.error.type)
          else
            assert.are.equal("error", r.type)
            assert.are.equal("overloaded_error", r.error.type)
          end
        end)

        it("streams an error event (error200)", function()
          local status, _, _, events = call(api, m:base_url(api, { fault = "error200" }),
            { stream = true, body = stream_body(api) })
          assert.are.equal(200, status)
          local last = events[#events]
          local r = assert(cjson.decode(last.data))
          if api == "openai" then
            assert.are.equal("message", last.event)
            assert.are.equal("server_error", r.error.type)
          else
            assert.are.equal("error", last.event)
            assert.are.equal("error", r.type)
            assert.are.equal("overloaded_error", r.error.type)
          end
        end)

        it("waits latency_ms before answering", function()
          local t0 = aiorch.now()
          local status = call(api, m:base_url(api, { latency_ms = 120 }))
          assert.are.equal(200, status)
          assert.is_true(aiorch.now() - t0 >= 115)
        end)

        it("paces a stream by chunk_delay_ms", function()
          local t0 = aiorch.now()
          local seen = {}
          local headers = { ["content-type"] = "application/json" }
          for k, v in pairs(API[api].headers) do
            headers[k] = v
          end
          local status = aiorch.http.request {
            method = "POST",
            url = m:base_url(api, { chunks = 3, chunk_delay_ms = 50 }) .. API[api].path,
            headers = headers,
            body = cjson.encode(stream_body(api)),
            on_event = function(ev)
              local d = cjson.decode(ev.data)
              if d and (d.type == "content_block_delta" or (d.choices and d.choices[1]
                  and d.choices[1].delta.content and d.choices[1].delta.content ~= "")) then
                seen[#seen + 1] = aiorch.now()
              end
            end,
          }
          assert.are.equal(200, status)
          assert.are.equal(3, #seen)
          assert.is_true(seen[1] - t0 >= 45)
          assert.is_true(seen[3] - seen[2] >= 45)
          assert.is_true(aiorch.now() - t0 >= 145)
        end)

        it("rejects an unknown directive with 400", function()
          local status, _, body = call(api, m.url .. "/_mock/bogus=1" .. (api == "openai" and "/v1" or ""))
          assert.are.equal(400, status)
          local r = assert(cjson.decode(body))
          assert.truthy(r.error.message:find("unknown directive 'bogus'", 1, true))
          assert.are.equal("invalid_request_error", r.error.type)
        end)

        it("rejects a bad directive value with 400", function()
          local status, _, body = call(api, m.url .. "/_mock/fault=teapot" .. (api == "openai" and "/v1" or ""))
          assert.are.equal(400, status)
          assert.truthy(assert(cjson.decode(body)).error.message:find("fault", 1, true))
        end)

        it("takes directives from the x-mock-directives header", function()
          local status, headers = call(api, m:base_url(api), {
            headers = { ["x-mock-directives"] = "fault=429,retry_after=4" },
          })
          assert.are.equal(429, status)
          assert.are.equal("4", headers["retry-after"])
          assert.are.same("429", m.requests[1].directives.fault)
        end)

        it("lets the path prefix win over the header", function()
          local status = call(api, m:base_url(api, { fault = "500" }), {
            headers = { ["x-mock-directives"] = "fault=401" },
          })
          assert.are.equal(500, status)
        end)

        it("applies configured defaults to requests that carry no directives", function()
          m:configure { fault = "529" }
          assert.are.equal(529, (call(api, m:base_url(api))))
          assert.are.equal(200, (call(api, m:base_url(api, { latency_ms = 0 }))))
          assert.are.equal(200, (call(api, m:base_url(api, { fault = "none" }))))
          m:configure {}
          assert.are.equal(200, (call(api, m:base_url(api))))
        end)
      end)
    end
  end)

  describe("timing and size faults", function()
    -- True for an event that carries answer text.
    local function is_content(ev)
      local d = cjson.decode(ev.data)
      if type(d) ~= "table" then
        return false
      end
      if d.type == "content_block_delta" then
        return true
      end
      local c = type(d.choices) == "table" and d.choices[1]
      return c and type(c.delta) == "table" and type(c.delta.content) == "string" and c.delta.content ~= "" or false
    end

    -- Streams from base; returns status, kind, events (each with .at, ms
    -- since the request began), the number of content events.
    local function timed_stream(api, base, timeout_ms)
      local headers = { ["content-type"] = "application/json" }
      for k, v in pairs(API[api].headers) do
        headers[k] = v
      end
      local events, contents = {}, 0
      local t0 = aiorch.now()
      local status, kind = aiorch.http.request {
        method = "POST",
        url = base .. API[api].path,
        headers = headers,
        body = cjson.encode(stream_body(api)),
        timeout_ms = timeout_ms or 5000,
        on_event = function(ev)
          ev.at = aiorch.now() - t0
          ev.content = is_content(ev)
          if ev.content then
            contents = contents + 1
          end
          events[#events + 1] = ev
        end,
      }
      return status, kind, events, contents
    end

    for _, api in ipairs { "openai", "anthropic" } do
      describe(api, function()
        it("first_token_ms sends what comes before the content at once, then waits", function()
          local status, _, events, contents = timed_stream(api, m:base_url(api, { first_token_ms = 150, chunks = 3 }))
          assert.are.equal(200, status)
          assert.are.equal(3, contents)
          local before = 0
          for _, ev in ipairs(events) do
            if ev.content then
              break
            end
            before = before + 1
            assert.is_true(ev.at < 100, "event before the content at " .. ev.at)
          end
          -- openai: the role chunk; anthropic: message_start, content_block_start, ping
          assert.are.equal(api == "openai" and 1 or 3, before)
          local first = events[before + 1]
          assert.is_true(first.content)
          assert.is_true(first.at >= 145, "first token at " .. first.at)
          -- the later pieces are not held back (chunk_delay_ms is 0)
          assert.is_true(events[#events].at - first.at < 100)
        end)

        it("first_token_ms replaces chunk_delay_ms for the first piece only", function()
          local status, _, events = timed_stream(api,
            m:base_url(api, { first_token_ms = 20, chunk_delay_ms = 120, chunks = 2 }))
          assert.are.equal(200, status)
          local at = {}
          for _, ev in ipairs(events) do
            if ev.content then
              at[#at + 1] = ev.at
            end
          end
          assert.are.equal(2, #at)
          assert.is_true(at[1] >= 18 and at[1] < 100, "first at " .. at[1])
          assert.is_true(at[2] - at[1] >= 115, "second after " .. (at[2] - at[1]))
        end)

        it("first_token_ms acts like latency_ms when not streaming", function()
          local t0 = aiorch.now()
          local status = call(api, m:base_url(api, { first_token_ms = 60, latency_ms = 40 }))
          assert.are.equal(200, status)
          assert.is_true(aiorch.now() - t0 >= 98)
          t0 = aiorch.now()
          assert.are.equal(500, (call(api, m:base_url(api, { first_token_ms = 60, fault = "500" }), {
            stream = true, body = stream_body(api) })))
          assert.is_true(aiorch.now() - t0 >= 58)
        end)

        it("stall_after sends N pieces, then nothing until the client leaves", function()
          local t0 = aiorch.now()
          local status, kind, events, contents = timed_stream(api,
            m:base_url(api, { stall_after = 2, chunks = 4 }), 250)
          assert.is_nil(status)
          assert.are.equal("timeout", kind)
          assert.is_true(aiorch.now() - t0 >= 245)
          assert.are.equal(2, contents)
          assert.is_true(events[#events].content, "nothing after the second piece")
          assert.is_true(events[#events].at < 100)
          local r = m.requests[1]
          assert.is_true(wait_for(function() return r.aborted_at ~= nil end, 1000))
          assert.is_nil(r.completed_at)
        end)

        it("stall_after=0 stalls before the first piece; >= chunks before the end", function()
          local _, kind, events, contents = timed_stream(api, m:base_url(api, { stall_after = 0 }), 150)
          assert.are.equal("timeout", kind)
          assert.are.equal(0, contents)
          assert.are.equal(api == "openai" and 1 or 3, #events)
          _, kind, events, contents = timed_stream(api, m:base_url(api, { stall_after = 9, chunks = 3 }), 150)
          assert.are.equal("timeout", kind)
          assert.are.equal(3, contents)
          assert.is_true(events[#events].content)
        end)

        it("stall_after stalls a plain answer after half its body", function()
          local t0 = aiorch.now()
          local status, kind = call(api, m:base_url(api, { stall_after = 1 }), { timeout_ms = 150 })
          assert.is_nil(status)
          assert.are.equal("timeout", kind)
          assert.is_true(aiorch.now() - t0 >= 145)
        end)

        it("fault=huge sends 16 MiB of valid JSON by default", function()
          local status, headers, body = aiorch.http.request {
            method = "POST", url = m:base_url(api, { fault = "huge" }) .. API[api].path,
            headers = { ["content-type"] = "application/json" }, body = cjson.encode(API[api].body()),
            max_body = 17 * 1024 * 1024, timeout_ms = 10000,
          }
          assert.are.equal(200, status)
          assert.are.equal("application/json", headers["content-type"])
          assert.are.equal(tostring(16 * 1024 * 1024), headers["content-length"])
          assert.are.equal(16 * 1024 * 1024, #body)
          local r = assert(cjson.decode(body))
          local text = api == "openai" and r.choices[1].message.content or r.content[1].text
          assert.is_true(#text > 16 * 1024 * 1024 - 400)
          assert.are.equal("All work and no play", text:sub(1, 20))
        end)

        it("fault=huge takes size, in the API's shape, streaming asked or not", function()
          for _, stream in ipairs { false, true } do
            local status, headers, body = call(api, m:base_url(api, { fault = "huge", size = 100000 }),
              { stream = stream, body = stream and stream_body(api) or nil })
            assert.are.equal(200, status)
            assert.are.equal("application/json", headers["content-type"])
            assert.are.equal(100000, #body)
            local r = assert(cjson.decode(body))
            if api == "openai" then
              assert.are.equal("chat.completion", r.object)
              assert.are.equal("length", r.choices[1].finish_reason)
              assert.is_true(r.usage.completion_tokens > 20000)
            else
              assert.are.equal("message", r.type)
              assert.are.equal("max_tokens", r.stop_reason)
              assert.is_true(r.usage.output_tokens > 20000)
            end
          end
          -- never less than the JSON around the text
          local status, _, body = call(api, m:base_url(api, { fault = "huge", size = 0 }))
          assert.are.equal(200, status)
          assert.is_table(cjson.decode(body))
        end)

        it("fault=huge stops writing when the client gives up", function()
          local status, kind = aiorch.http.request {
            method = "POST", url = m:base_url(api, { fault = "huge" }) .. API[api].path,
            headers = { ["content-type"] = "application/json" }, body = cjson.encode(API[api].body()),
            max_body = 1024 * 1024,
          }
          assert.is_nil(status)
          assert.are.equal("too_large", kind)
          local r = m.requests[1]
          assert.is_true(wait_for(function() return r.aborted_at ~= nil end, 1000))
          assert.is_nil(r.completed_at)
        end)

        it("fault=html answers 200 with a page, not JSON", function()
          for _, stream in ipairs { false, true } do
            local status, headers, body = call(api, m:base_url(api, { fault = "html" }),
              { stream = stream, body = stream and stream_body(api) or nil })
            assert.are.equal(200, status)
            assert.matches("^text/html", headers["content-type"])
            assert.matches("^<!DOCTYPE html>", body)
            assert.is_nil(cjson.decode(body))
          end
        end)

        it("fault=reset closes the connection with no response", function()
          -- A fresh connection: curl resends once on a reused one that closes
          -- before answering (see the next case).
          local m2 = assert(mock.start {})
          local status, kind = call(api, m2:base_url(api, { fault = "reset" }))
          assert.is_nil(status)
          assert.are.equal("reset", kind)
          assert.are.equal(1, #m2.requests)
          assert.is_not_nil(m2.requests[1].completed_at)
          m2:close()
        end)

        it("fault=reset on a kept-alive connection: curl sends the request twice", function()
          -- a mock of its own: exactly one idle connection to its port
          local m2 = assert(mock.start {})
          assert.are.equal(200, (call(api, m2:base_url(api))))
          local status, kind = call(api, m2:base_url(api, { fault = "reset" }))
          assert.is_nil(status)
          assert.are.equal("reset", kind)
          assert.are.equal(3, #m2.requests)
          m2:close()
        end)
      end)
    end
  end)

  describe("fail_first", function()
    before_each(function()
      m:reset_counters()
    end)

    for _, api in ipairs { "openai", "anthropic" } do
      it(api .. ": fails the first N requests of a key, then answers", function()
        local base = m:base_url(api, { fault = "500", fail_first = 2, key = "ff-" .. api })
        assert.are.equal(500, (call(api, base)))
        assert.are.equal(500, (call(api, base)))
        assert.are.equal(200, (call(api, base)))
        assert.are.equal(200, (call(api, base, { stream = true, body = stream_body(api) })))
        assert.are.same({ 1, 2, 3, 4 }, { m.requests[1].attempt, m.requests[2].attempt,
          m.requests[3].attempt, m.requests[4].attempt })
        assert.are.equal("500", m.requests[2].directives.fault)
        assert.is_nil(m.requests[3].directives.fault)
        assert.are.equal(4, m:counter("ff-" .. api))
        m:reset_counters("ff-" .. api)
        assert.are.equal(0, m:counter("ff-" .. api))
        assert.are.equal(500, (call(api, base)))
      end)
    end

    it("keeps one count per key, and one for requests without a key", function()
      local a = m:base_url("openai", { fault = "429", fail_first = 1, key = "a" })
      local b = m:base_url("openai", { fault = "401", fail_first = 1, key = "b" })
      local none = m:base_url("openai", { fault = "503", fail_first = 1 })
      assert.are.equal(429, (call("openai", a)))
      assert.are.equal(401, (call("openai", b)))
      assert.are.equal(503, (call("openai", none)))
      assert.are.equal(200, (call("openai", a)))
      assert.are.equal(200, (call("openai", b)))
      assert.are.equal(200, (call("openai", none)))
      assert.are.equal(2, m:counter())
    end)

    it("counts requests on arrival, so concurrent ones share the N failures", function()
      local base = m:base_url("anthropic", { fault = "529", fail_first = 3, key = "burst", latency_ms = 30 })
      local tasks = {}
      for i = 1, 5 do
        tasks[i] = aiorch.spawn(call, "anthropic", base)
      end
      local values = aiorch.gather(tasks)
      local by = {}
      for i = 1, 5 do
        by[values[i]] = (by[values[i]] or 0) + 1
      end
      assert.are.same({ [529] = 3, [200] = 2 }, by)
    end)

    it("lifts a stall too, and works from the configured defaults", function()
      m:configure { stall_after = 1, fail_first = 1, key = "cfg" }
      local _, kind = call("openai", m:base_url("openai"), { stream = true, body = stream_body("openai"),
        timeout_ms = 150 })
      assert.are.equal("timeout", kind)
      local status, _, _, events = call("openai", m:base_url("openai"),
        { stream = true, body = stream_body("openai") })
      assert.are.equal(200, status)
      assert.are.equal("[DONE]", events[#events].data)
    end)

    it("answers 400 to fail_first without a fault", function()
      local status, _, body = call("openai", m.url .. "/_mock/fail_first=1/v1")
      assert.are.equal(400, status)
      assert.truthy(assert(cjson.decode(body)).error.message:find("fail_first", 1, true))
    end)
  end)

  describe("errors of the request itself", function()
    it("answers 400 to a body that is not JSON", function()
      local status, _, body = call("openai", m:base_url("openai"), { raw = "{not json" })
      assert.are.equal(400, status)
      assert.are.equal("invalid_request_error", assert(cjson.decode(body)).error.type)
      status, _, body = call("anthropic", m:base_url("anthropic"), { raw = "" })
      assert.are.equal(400, status)
      assert.are.equal("error", assert(cjson.decode(body)).type)
      assert.is_nil(m.requests[1].json)
    end)

    it("answers 404 to an unknown path in the API's shape", function()
      local status, _, body = aiorch.http.request { url = m.url .. "/v1/nothing" }
      assert.are.equal(404, status)
      assert.truthy(assert(cjson.decode(body)).error.message:find("/v1/nothing", 1, true))
      status, _, body = aiorch.http.request {
        url = m.url .. "/chat/completions", method = "POST", body = "{}",
        headers = { ["x-api-key"] = "k", ["content-type"] = "application/json" },
      }
      assert.are.equal(404, status)
      local r = assert(cjson.decode(body))
      assert.are.equal("error", r.type)
      assert.are.equal("not_found_error", r.error.type)
    end)
  end)

  describe("recording", function()
    it("records the wire request", function()
      call("openai", m:base_url("openai", { latency_ms = 1 }), {
        headers = { ["x-trace"] = "abc" },
        body = { model = "gpt-4o", temperature = 0.5, messages = { { role = "user", content = "hi" } } },
      })
      call("anthropic", m:base_url("anthropic"))
      assert.are.equal(2, #m.requests)
      local r = m.requests[1]
      assert.are.equal("openai", r.api)
      assert.are.equal("POST", r.method)
      assert.are.equal("/v1/chat/completions", r.path)
      assert.are.equal("/_mock/latency_ms=1/v1/chat/completions", r.raw_path)
      assert.are.equal("Bearer sk-test", r.headers.authorization)
      assert.are.equal("abc", r.headers["x-trace"])
      assert.are.equal("application/json", r.headers["content-type"])
      assert.are.equal("string", type(r.body))
      assert.are.equal("gpt-4o", r.json.model)
      assert.are.equal(0.5, r.json.temperature)
      assert.are.equal("hi", r.json.messages[1].content)
      assert.are.equal(1, r.directives.latency_ms)
      assert.is_nil(r.directives.fault)
      assert.is_true(r.completed_at >= r.received_at + 1)
      assert.is_nil(r.aborted_at)
      local a = m.requests[2]
      assert.are.equal("anthropic", a.api)
      assert.are.equal("/v1/messages", a.path)
      assert.are.equal("2023-06-01", a.headers["anthropic-version"])
      assert.are.equal("sk-ant-test", a.headers["x-api-key"])
      assert.are.equal(256, a.json.max_tokens)
      assert.are.equal("You are terse.", a.json.system)
    end)

    it("records a request before its latency", function()
      local t = aiorch.spawn(call, "openai", m:base_url("openai", { latency_ms = 500 }))
      assert.is_true(wait_for(function() return #m.requests == 1 end, 400))
      local r = m.requests[1]
      assert.are.equal("gpt-4o-mini", r.json.model)
      assert.is_nil(r.completed_at)
      assert.are.equal(200, (t:await()))
      assert.is_not_nil(r.completed_at)
    end)

    it("sets aborted_at when the client cancels", function()
      local t = aiorch.spawn(call, "anthropic", m:base_url("anthropic", { fault = "hang" }),
        { stream = true, body = stream_body("anthropic") })
      assert.is_true(wait_for(function() return #m.requests == 1 end, 500))
      aiorch.sleep(20)
      local cancelled_at = aiorch.now()
      t:cancel()
      local r = m.requests[1]
      assert.is_true(wait_for(function() return r.aborted_at ~= nil end, 1000))
      assert.is_true(r.aborted_at >= cancelled_at)
      assert.is_true(r.aborted_at - cancelled_at < 500)
      assert.is_nil(r.completed_at)
    end)

    it("sets aborted_at when the client cancels mid-stream", function()
      local got = 0
      local t = aiorch.spawn(function()
        return aiorch.http.request {
          method = "POST",
          url = m:base_url("openai", { chunks = 5, chunk_delay_ms = 100 }) .. "/chat/completions",
          headers = { ["content-type"] = "application/json" },
          body = cjson.encode(stream_body("openai")),
          on_event = function() got = got + 1 end,
        }
      end)
      assert.is_true(wait_for(function() return got >= 2 end, 1000))
      t:cancel()
      local r = m.requests[1]
      assert.is_true(wait_for(function() return r.aborted_at ~= nil end, 1000))
      assert.is_nil(r.completed_at)
    end)

    it("reset keeps the same table", function()
      local reqs = m.requests
      call("openai", m:base_url("openai"))
      assert.are.equal(1, #reqs)
      m:reset()
      assert.are.equal(reqs, m.requests)
      assert.are.equal(0, #reqs)
    end)
  end)
end)

------------------------------------------------------------------------------
-- What a request asks: tools, images, thinking, caching, JSON, stop
-- sequences, n, logprobs, prefill; and what the real APIs refuse.

-- A stream's events as the API's plain answer, assembled as the SDKs do.
local function assemble(api, events)
  if api == "openai" then
    local doc = { choices = {} }
    for _, ev in ipairs(events) do
      if ev.data ~= "[DONE]" then
        local c = assert(cjson.decode(ev.data), ev.data)
        doc.id, doc.model, doc.object = c.id, c.model, "chat.completion"
        doc.service_tier, doc.system_fingerprint = c.service_tier, c.system_fingerprint
        if c.usage and c.usage ~= null then
          doc.usage = c.usage
        end
        for _, ch in ipairs(c.choices) do
          local x = doc.choices[ch.index + 1]
          if not x then
            x = { index = ch.index, message = {}, logprobs = null }
            doc.choices[ch.index + 1] = x
          end
          local msg, dl = x.message, ch.delta
          msg.role = dl.role or msg.role
          if type(dl.content) == "string" then
            msg.content = (msg.content ~= null and msg.content or "") .. dl.content
          elseif dl.content == null and msg.content == nil then
            msg.content = null
          end
          if dl.reasoning_content then
            msg.reasoning_content = (msg.reasoning_content or "") .. dl.reasoning_content
          end
          for _, tc in ipairs(dl.tool_calls or {}) do
            msg.tool_calls = msg.tool_calls or {}
            local t = msg.tool_calls[tc.index + 1]
            if not t then
              t = { id = tc.id, type = tc.type, ["function"] = { name = tc["function"].name, arguments = "" } }
              msg.tool_calls[tc.index + 1] = t
            end
            t["function"].arguments = t["function"].arguments .. (tc["function"].arguments or "")
          end
          if ch.logprobs ~= nil and ch.logprobs ~= null then
            if x.logprobs == null then
              x.logprobs = { content = {}, refusal = null }
            end
            for _, e in ipairs(ch.logprobs.content) do
              table.insert(x.logprobs.content, e)
            end
          end
          if ch.finish_reason ~= null then
            x.finish_reason = ch.finish_reason
          end
        end
      end
    end
    return doc
  end
  local doc
  for _, ev in ipairs(events) do
    local e = assert(cjson.decode(ev.data), ev.data)
    if e.type == "message_start" then
      doc = e.message
    elseif e.type == "content_block_start" then
      doc.content[e.index + 1] = e.content_block
    elseif e.type == "content_block_delta" then
      local b, dl = doc.content[e.index + 1], e.delta
      if dl.type == "text_delta" then
        b.text = b.text .. dl.text
      elseif dl.type == "thinking_delta" then
        b.thinking = b.thinking .. dl.thinking
      elseif dl.type == "signature_delta" then
        b.signature = dl.signature
      elseif dl.type == "input_json_delta" then
        b.partial = (b.partial or "") .. dl.partial_json
      end
    elseif e.type == "content_block_stop" then
      local b = doc.content[e.index + 1]
      if b.partial then
        b.input = assert(cjson.decode(b.partial ~= "" and b.partial or "{}"))
        b.partial = nil
      end
    elseif e.type == "message_delta" then
      doc.stop_reason, doc.stop_sequence = e.delta.stop_reason, e.delta.stop_sequence
      doc.usage.output_tokens = e.usage.output_tokens
    end
  end
  return doc
end

-- The first k of the n pieces a stream splits an ASCII text into.
local function split_like(text, n, k)
  return text:sub(1, k * #text // n)
end

local WEATHER = {
  type = "object",
  properties = {
    city = { type = "string", description = "The city" },
    unit = { type = "string", enum = { "celsius", "fahrenheit" } },
    days = { type = "integer", minimum = 1, maximum = 7 },
  },
  required = { "city", "unit", "days" },
  additionalProperties = false,
}
local TIME = { type = "object", properties = { zone = { type = "string" } }, required = { "zone" },
  additionalProperties = false }
-- What the mock makes of them.
local ARGS = { get_weather = { city = "city", unit = "celsius", days = 7 }, get_time = { zone = "zone" } }

local TOOLS = {
  openai = {
    { type = "function", ["function"] = { name = "get_weather", description = "Weather now", parameters = WEATHER,
      strict = true } },
    { type = "function", ["function"] = { name = "get_time", parameters = TIME } },
  },
  anthropic = {
    { name = "get_weather", description = "Weather now", input_schema = WEATHER },
    { name = "get_time", input_schema = TIME },
  },
}

-- A canonical tool choice in the API's words.
local function tool_choice(api, choice, parallel)
  if api == "openai" then
    if type(choice) == "table" then
      return { type = "function", ["function"] = { name = choice.name } }
    end
    return choice
  end
  local tc
  if choice == nil then
    tc = parallel == false and { type = "auto" } or nil
  elseif type(choice) == "table" then
    tc = { type = "tool", name = choice.name }
  else
    tc = { type = choice == "required" and "any" or choice }
  end
  if tc and parallel == false then
    tc.disable_parallel_tool_use = true
  end
  return tc
end

-- The tool calls of an answer (plain or assembled): {{id, name, args}}.
local function calls_of(api, doc)
  local out = {}
  if api == "openai" then
    for i, tc in ipairs(doc.choices[1].message.tool_calls or {}) do
      assert.are.equal("function", tc.type)
      out[i] = { id = tc.id, name = tc["function"].name, args = assert(cjson.decode(tc["function"].arguments)) }
    end
  else
    for _, b in ipairs(doc.content) do
      if b.type == "tool_use" then
        out[#out + 1] = { id = b.id, name = b.name, args = b.input }
      end
    end
  end
  return out
end

local function text_of(api, doc)
  if api == "openai" then
    return doc.choices[1].message.content
  end
  local t = {}
  for _, b in ipairs(doc.content) do
    if b.type == "text" then
      t[#t + 1] = b.text
    end
  end
  return table.concat(t)
end

local function finish_of(api, doc)
  if api == "openai" then
    return doc.choices[1].finish_reason
  end
  return doc.stop_reason
end

local STREAMS = { false, true }

describe("aiorch.mock conversations", function()
  local m
  support.use_mock(function(mock_server) m = mock_server end, {})

  -- POSTs body (all of it, encoded by its marks) to api's endpoint with the
  -- directives; returns status, the answer (a stream assembled), the raw
  -- body or events, and the request as the mock recorded it.
  local function send(api, body, dirs, headers)
    local status, _, raw, events = call(api, m:base_url(api, dirs), {
      raw = json.encode(body), stream = body.stream, headers = headers })
    local req = m.requests[#m.requests]
    if status ~= 200 then
      return status, assert(cjson.decode(raw), raw), raw, req
    end
    if body.stream then
      return status, assemble(api, events), events, req
    end
    return status, assert(cjson.decode(raw), raw), raw, req
  end

  local function body_of(api, messages, extra)
    local b = { model = api == "openai" and "gpt-4o" or "claude-sonnet-4-5", messages = messages }
    if api == "anthropic" then
      b.max_tokens = 4096
    end
    return support.merge(b, extra)
  end

  local function user(text)
    return { role = "user", content = text }
  end

  describe("tools", function()
    local CASES = {
      { name = "auto calls the tool the question names", q = "Weather in Paris? Use get_weather.",
        want = { "get_weather" } },
      { name = "auto answers text when no tool is named", q = "Hello there", want = nil },
      { name = "none never calls", q = "get_weather now", choice = "none", want = nil },
      { name = "required calls the first tool when none is named", q = "Hello", choice = "required",
        want = { "get_weather" } },
      { name = "required calls the ones named", q = "What does get_time say?", choice = "required",
        want = { "get_time" } },
      { name = "a named tool is called whatever is mentioned", q = "get_weather?", choice = { name = "get_time" },
        want = { "get_time" } },
      { name = "two tools named: two parallel calls, in the tools' order", q = "get_time and get_weather",
        want = { "get_weather", "get_time" } },
      { name = "tool_calls=3 makes three calls, cycling the tools", q = "Hello", dirs = { tool_calls = 3 },
        want = { "get_weather", "get_time", "get_weather" } },
      { name = "parallel tool use off: one call", q = "get_time and get_weather", parallel = false,
        dirs = { tool_calls = 3 }, want = { "get_weather" } },
      { name = "tool_calls=2 with a named tool calls it twice", q = "Hi", choice = { name = "get_time" },
        dirs = { tool_calls = 2 }, want = { "get_time", "get_time" } },
    }
    for _, api in ipairs { "openai", "anthropic" } do
      for _, c in ipairs(CASES) do
        it(api .. ": " .. c.name, function()
          for _, stream in ipairs(STREAMS) do
            local extra = { tools = TOOLS[api], tool_choice = tool_choice(api, c.choice, c.parallel), stream = stream }
            if api == "openai" and c.parallel ~= nil then
              extra.parallel_tool_calls = c.parallel
            end
            local status, doc = send(api, body_of(api, { user(c.q) }, extra), c.dirs)
            assert.are.equal(200, status)
            local calls = calls_of(api, doc)
            if not c.want then
              assert.are.same({}, calls)
              assert.are.equal(api == "openai" and "stop" or "end_turn", finish_of(api, doc))
              assert.are.equal(fmt("Hello from the mock %s provider. You asked: %s", api, c.q), text_of(api, doc))
            else
              assert.are.equal(api == "openai" and "tool_calls" or "tool_use", finish_of(api, doc))
              local names, ids = {}, {}
              for i, tc in ipairs(calls) do
                names[i] = tc.name
                assert.matches(api == "openai" and "^call_%w+$" or "^toolu_%w+$", tc.id)
                assert.is_nil(ids[tc.id], "ids are distinct")
                ids[tc.id] = true
                assert.are.same(ARGS[tc.name], tc.args)
              end
              assert.are.same(c.want, names)
              if api == "openai" then
                assert.are.equal(null, doc.choices[1].message.content)
              else
                assert.are.equal(#c.want, #doc.content)
              end
            end
          end
        end)
      end
    end

    it("openai: allowed_tools limits the tools a required choice calls", function()
      local status, doc = send("openai", body_of("openai", { user("Hello") }, { tools = TOOLS.openai,
        tool_choice = { type = "allowed_tools", allowed_tools = { mode = "required",
          tools = { { type = "function", ["function"] = { name = "get_time" } } } } } }))
      assert.are.equal(200, status)
      assert.are.same({ "get_time" }, { calls_of("openai", doc)[1].name })
    end)

    it("openai: the exact plain shape of a tool call", function()
      local _, doc, raw = send("openai", body_of("openai", { user("get_time") }, { tools = TOOLS.openai }))
      local msg = doc.choices[1].message
      assert.truthy(raw:find('"message":{"role":"assistant","content":null,"refusal":null,"annotations":[],'
        .. '"tool_calls":[{"id":"call_', 1, true), raw)
      assert.are.same({ { id = msg.tool_calls[1].id, type = "function",
        ["function"] = { name = "get_time", arguments = '{"zone":"zone"}' } } }, msg.tool_calls)
      assert.are.equal(words("get_time") + words('{"zone":"zone"}'), doc.usage.completion_tokens)
    end)

    it("openai: streams each call's id and name first, then its arguments in pieces", function()
      local status, _, events = send("openai", body_of("openai", { user("get_weather and get_time") },
        { tools = TOOLS.openai, stream = true }), { chunks = 3 })
      assert.are.equal(200, status)
      assert.are.equal("[DONE]", events[#events].data)
      table.remove(events)
      local chunks = decode_events(events)
      assert.are.same({ role = "assistant", content = null }, chunks[1].choices[1].delta)
      local seq = {}
      for i = 2, #chunks - 1 do
        local tc = chunks[i].choices[1].delta.tool_calls
        assert.are.equal(1, #tc)
        tc = tc[1]
        if tc.id then
          assert.are.equal("function", tc.type)
          assert.are.equal("", tc["function"].arguments)
          seq[#seq + 1] = fmt("start %d %s", tc.index, tc["function"].name)
        else
          assert.is_nil(tc["function"].name)
          assert.is_nil(tc.type)
          seq[#seq + 1] = fmt("args %d", tc.index)
        end
        assert.are.equal(null, chunks[i].choices[1].finish_reason)
      end
      assert.are.same({ "start 0 get_weather", "args 0", "args 0", "args 0", "start 1 get_time", "args 1", "args 1",
        "args 1" }, seq)
      assert.are.same({}, chunks[#chunks].choices[1].delta)
      assert.are.equal("tool_calls", chunks[#chunks].choices[1].finish_reason)
    end)

    it("anthropic: streams tool_use blocks: start with empty input, input_json_delta pieces, stop", function()
      local status, doc, events = send("anthropic", body_of("anthropic", { user("get_weather and get_time") },
        { tools = TOOLS.anthropic, stream = true }), { chunks = 2 })
      assert.are.equal(200, status)
      local data = decode_events(events)
      local seq = {}
      for _, e in ipairs(data) do
        local s = e.type
        if e.type == "content_block_start" then
          assert.are.same({}, e.content_block.input)
          s = fmt("%s %d %s %s", s, e.index, e.content_block.type, e.content_block.name)
          assert.matches("^toolu_", e.content_block.id)
        elseif e.type == "content_block_delta" then
          assert.are.equal("input_json_delta", e.delta.type)
          s = fmt("%s %d %s", s, e.index, e.delta.partial_json == "" and "empty" or "piece")
        elseif e.type == "content_block_stop" then
          s = fmt("%s %d", s, e.index)
        end
        seq[#seq + 1] = s
      end
      assert.are.same({ "message_start", "content_block_start 0 tool_use get_weather", "ping",
        "content_block_delta 0 empty", "content_block_delta 0 piece", "content_block_delta 0 piece",
        "content_block_stop 0", "content_block_start 1 tool_use get_time", "content_block_delta 1 empty",
        "content_block_delta 1 piece", "content_block_delta 1 piece", "content_block_stop 1", "message_delta",
        "message_stop" }, seq)
      assert.are.equal("tool_use", doc.stop_reason)
      assert.are.same({ ARGS.get_weather, ARGS.get_time }, { doc.content[1].input, doc.content[2].input })
    end)

    -- A conversation whose last turn carries two tool results.
    local function with_results(api)
      local q = "Weather and time please (get_weather, get_time)"
      if api == "openai" then
        return {
          user(q),
          { role = "assistant", content = null, tool_calls = {
            { id = "call_a", type = "function", ["function"] = { name = "get_weather", arguments = "{}" } },
            { id = "call_b", type = "function", ["function"] = { name = "get_time", arguments = "{}" } } } },
          { role = "tool", tool_call_id = "call_a", content = "22 C" },
          { role = "tool", tool_call_id = "call_b", content = { { type = "text", text = "12:00" } } },
        }, q
      end
      return {
        user(q),
        { role = "assistant", content = {
          { type = "tool_use", id = "toolu_a", name = "get_weather", input = {} },
          { type = "tool_use", id = "toolu_b", name = "get_time", input = {} } } },
        { role = "user", content = {
          { type = "tool_result", tool_use_id = "toolu_a", content = "22 C" },
          { type = "tool_result", tool_use_id = "toolu_b", is_error = true,
            content = { { type = "text", text = "timeout" } } } } },
      }, q
    end

    for _, api in ipairs { "openai", "anthropic" } do
      it(api .. ": a last turn of tool results gets text quoting them in order", function()
        local messages, q = with_results(api)
        for _, stream in ipairs(STREAMS) do
          local status, doc = send(api, body_of(api, messages, { tools = TOOLS[api], stream = stream }),
            { tool_calls = 2 })
          assert.are.equal(200, status)
          assert.are.same({}, calls_of(api, doc))
          local results = api == "openai" and "[call_a] 22 C; [call_b] 12:00"
            or "[toolu_a] 22 C; [toolu_b error] timeout"
          assert.are.equal(fmt("Hello from the mock %s provider. You asked: %s Tool results: %s", api, q,
            results), text_of(api, doc))
          assert.are.equal(api == "openai" and "stop" or "end_turn", finish_of(api, doc))
        end
      end)
    end
  end)

  describe("JSON Schema instances", function()
    local CASES = {
      { { type = "string" }, '"value"' },
      { { type = "string", minLength = 8 }, '"valuexxx"' },
      { { type = "string", maxLength = 3 }, '"val"' },
      { { type = "string", format = "date-time" }, '"2024-01-01T00:00:00Z"' },
      { { type = "string", format = "email" }, '"mock@example.com"' },
      { { type = "integer" }, "42" },
      { { type = "integer", minimum = 100 }, "100" },
      { { type = "integer", maximum = 10 }, "10" },
      { { type = "integer", exclusiveMinimum = 50 }, "51" },
      { { type = "integer", minimum = 43, multipleOf = 5 }, "45" },
      { { type = "number" }, "42.5" },
      { { type = "number", maximum = 1, exclusiveMaximum = 1 }, "0.5" },
      { { type = "boolean" }, "true" },
      { { type = "null" }, "null" },
      { { enum = { "b", "a" } }, '"b"' },
      { { const = 7 }, "7" },
      { { type = { "null", "integer" } }, "42" },
      { { type = "array", items = { type = "integer" }, minItems = 2 }, "[42,42]" },
      { { type = "array", items = { type = "integer" }, maxItems = 0 }, "[]" },
      { { type = "array", prefixItems = { { type = "string" }, { type = "boolean" } } }, '["value",true]' },
      { { type = "object" }, "{}" },
      { { type = "object", properties = { a = { type = "string" }, b = { type = "integer" } }, required = { "a" } },
        '{"a":"a","b":42}' },
      { { type = "object", required = { "x" } }, '{"x":"x"}' },
      { { type = "object", properties = { o = { type = "object", properties = { n = { type = "number" } },
        required = { "n" }, additionalProperties = false } }, required = { "o" }, additionalProperties = false },
        '{"o":{"n":42.5}}' },
      { { anyOf = { { type = "null" }, { type = "string" } } }, '"value"' },
      { { oneOf = { { type = "integer" }, { type = "string" } } }, "42" },
      { { allOf = { { type = "object", properties = { a = { type = "string" } } },
        { properties = { b = { type = "boolean" } }, required = { "b" } } } }, '{"a":"a","b":true}' },
      { { ["$defs"] = { P = { type = "object", properties = { id = { type = "integer" } }, required = { "id" } } },
        type = "object", properties = { p = { ["$ref"] = "#/$defs/P" } }, required = { "p" } }, '{"p":{"id":42}}' },
      -- recursive: a tree ends where optional parts are left out
      { { type = "object", properties = { name = { type = "string" },
        children = { type = "array", items = { ["$ref"] = "#" } } }, required = { "name" } },
        '{"children":[{"children":[{"children":[],"name":"name"}],"name":"name"}],"name":"name"}' },
    }
    for i, c in ipairs(CASES) do
      it("case " .. i .. ": " .. c[2], function()
        assert.are.equal(c[2], json.encode(assert(mock.schema_instance(c[1]))))
      end)
    end

    it("refuses what it cannot make", function()
      local v, err = mock.schema_instance { ["$ref"] = "#/$defs/missing" }
      assert.is_nil(v)
      assert.matches("cannot resolve", err)
      v, err = mock.schema_instance { type = "object", properties = { a = { ["$ref"] = "#" } }, required = { "a" } }
      assert.is_nil(v)
      assert.matches("deeper than", err)
    end)
  end)

  describe("validation", function()
    local PNG, JPEG, PDF = "iVBORw0KGgo=", "/9j/4AAQSkZJRg==", "JVBERi0xLjQK"
    local function asst_calls(...)
      local tcs = {}
      for i, id in ipairs { ... } do
        tcs[i] = { id = id, type = "function", ["function"] = { name = "get_time", arguments = "{}" } }
      end
      return { role = "assistant", content = null, tool_calls = tcs }
    end
    local function image(url)
      return { role = "user", content = { { type = "text", text = "see" }, { type = "image_url",
        image_url = { url = url } } } }
    end
    -- {name, messages or body, message (plain text it contains), param, code}
    local OPENAI = {
      { "an unknown role", { { role = "robot", content = "hi" } },
        "Invalid value: 'robot'. Supported values are: 'system', 'assistant', 'user', 'function', 'tool', and "
        .. "'developer'.", "messages[0].role", "invalid_value" },
      { "a tool message after no tool calls", { user("hi"), { role = "tool", tool_call_id = "call_a", content = "x" } },
        "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'.",
        "messages.[1].role" },
      { "a tool message answering another id", { user("hi"), asst_calls("call_a"),
        { role = "tool", tool_call_id = "call_x", content = "x" } },
        "Invalid parameter: 'tool_call_id' of 'call_x' not found in 'tool_calls' of previous message.",
        "messages.[2].tool_call_id" },
      { "tool calls left unanswered", { user("hi"), asst_calls("call_a", "call_b"),
        { role = "tool", tool_call_id = "call_a", content = "x" }, user("and?") },
        "The following tool_call_ids did not have response messages: call_b", "messages.[1].role" },
      { "tool calls ending the conversation", { user("hi"), asst_calls("call_a") },
        "did not have response messages: call_a", "messages.[1].role" },
      { "an image in a system message", { { role = "system", content = { { type = "image_url",
        image_url = { url = "https://example.com/a.png" } } } }, user("hi") },
        "Invalid value: 'image_url'. Supported values are: 'text'.", "messages[0].content[0].type", "invalid_value" },
      { "an image in a tool message", { user("hi"), asst_calls("call_a"), { role = "tool", tool_call_id = "call_a",
        content = { { type = "image_url", image_url = { url = "https://example.com/a.png" } } } } },
        "Invalid value: 'image_url'. Supported values are: 'text'.", "messages[2].content[0].type" },
      { "an image of an unsupported type", { image("data:image/bmp;base64," .. PNG) },
        "unsupported MIME type 'image/bmp'.", "messages[0].content[1].image_url.url", "invalid_value" },
      { "an image data URL that is not base64", { image("data:image/png;base64,not base64!") },
        "a value with invalid base64 data.", "messages[0].content[1].image_url.url" },
      { "an image URL that is neither http nor data", { image("file:///etc/passwd") },
        "Expected a valid URL", "messages[0].content[1].image_url.url" },
      { "a file part without data or id", { { role = "user", content = { { type = "file", file = {} } } } },
        "Missing required parameter", "messages[0].content[0].file" },
      { "tool_choice without tools", { body = { tool_choice = "auto" } },
        "'tool_choice' is only allowed when 'tools' are specified.", "tool_choice" },
      { "parallel_tool_calls without tools", { body = { parallel_tool_calls = false } },
        "'parallel_tool_calls' is only allowed when 'tools' are specified.", "parallel_tool_calls" },
      { "a named tool that is not there", { body = { tools = TOOLS.openai,
        tool_choice = { type = "function", ["function"] = { name = "get_moon" } } } }, "get_moon", "tool_choice" },
      { "a strict tool whose objects are open", { body = { tools = { { type = "function", ["function"] = {
        name = "f", strict = true, parameters = { type = "object", properties = { a = { type = "string" } },
          required = { "a" } } } } } } },
        "Invalid schema for function 'f': In context=(), 'additionalProperties' is required to be supplied and to "
        .. "be false.", "tools[0].function.parameters" },
      { "a strict tool not requiring every property", { body = { tools = { { type = "function", ["function"] = {
        name = "f", strict = true, parameters = { type = "object", properties = { a = { type = "object",
          properties = { b = { type = "string" } }, required = json.array(), additionalProperties = false } },
          required = { "a" }, additionalProperties = false } } } } } },
        "In context=('properties', 'a'), 'required' is required to be supplied and to be an array including every "
        .. "key in properties. Missing 'b'.", "tools[0].function.parameters" },
      { "json_object without the word json", { body = { response_format = { type = "json_object" } } },
        "'messages' must contain the word 'json' in some form", "messages" },
      { "json_schema without a name", { body = { response_format = { type = "json_schema",
        json_schema = { schema = { type = "object" } } } } },
        "Missing required parameter: 'response_format.json_schema.name'.", "response_format.json_schema.name" },
      { "n of 0", { body = { n = 0 } }, "Invalid 'n': integer below minimum value.", "n" },
      { "top_logprobs without logprobs", { body = { top_logprobs = 2 } }, "'logprobs' must be set to true",
        "top_logprobs" },
      { "an unknown reasoning_effort", { body = { reasoning_effort = "extreme" } }, "Invalid value: 'extreme'.",
        "reasoning_effort" },
      { "five stop sequences", { body = { stop = { "a", "b", "c", "d", "e" } } }, "array too long", "stop" },
      { "no messages", { body = { messages = json.array() } }, "Invalid 'messages': empty array.", "messages" },
    }

    local function tool_use(id)
      return { type = "tool_use", id = id, name = "get_time", input = {} }
    end
    local function result(id)
      return { type = "tool_result", tool_use_id = id, content = "x" }
    end
    local function source(src)
      return { { role = "user", content = { { type = "image", source = src } } } }
    end
    local ANTHROPIC = {
      { "max_tokens missing", { body = { max_tokens = null } }, "max_tokens: Field required" },
      { "a system role in messages", { { role = "system", content = "Be terse." }, user("hi") },
        'messages.0.role: Unexpected role "system".' },
      { "an unknown role", { { role = "tool", content = "x" } }, "messages.0.role: Input should be 'user' or "
        .. "'assistant'" },
      { "a tool_result without its tool_use", { user("hi"), { role = "assistant", content = "ok" },
        { role = "user", content = { result("toolu_x") } } },
        "messages.2.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_x. Each `tool_result` "
        .. "block must have a corresponding `tool_use` block in the previous message." },
      { "a tool_result answering an older turn", { user("hi"),
        { role = "assistant", content = { tool_use("toolu_a") } },
        { role = "user", content = { result("toolu_a") } }, { role = "assistant", content = "done" },
        { role = "user", content = { result("toolu_a") } } }, "messages.4.content.0: unexpected `tool_use_id`" },
      { "a tool_use without its tool_result", { user("hi"), { role = "assistant", content = { tool_use("toolu_a"),
        tool_use("toolu_b") } }, { role = "user", content = { result("toolu_b"), { type = "text", text = "x" } } } },
        "messages.2: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_a." },
      { "an image source of no known type", source { type = "path", path = "/a.png" },
        "messages.0.content.0.image.source: Input tag 'path' found using 'type' does not match any of the "
        .. "expected tags: 'base64', 'url', 'file'" },
      { "an image without a source", { { role = "user", content = { { type = "image" } } } },
        "messages.0.content.0.image.source: Field required" },
      { "a base64 image still in its data URL", source { type = "base64", media_type = "image/png",
        data = "data:image/png;base64," .. PNG }, "messages.0.content.0.image.source.base64.data: Input should be "
        .. "valid base64 data" },
      { "a PNG sent as a JPEG", source { type = "base64", media_type = "image/jpeg", data = PNG },
        "The image was specified using the image/jpeg media type, but the image appears to be a image/png image" },
      { "a bad media type", source { type = "base64", media_type = "image/bmp", data = JPEG },
        "media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'" },
      { "a PDF document with another media type", { { role = "user", content = { { type = "document",
        source = { type = "base64", media_type = "text/plain", data = PDF } } } } },
        "messages.0.content.0.document.source.base64.media_type: Input should be 'application/pdf'" },
      { "an OpenAI part", { { role = "user", content = { { type = "image_url",
        image_url = { url = "https://example.com/a.png" } } } } },
        "messages.0.content.0: Input tag 'image_url' found using 'type' does not match any of the expected tags" },
      { "a thinking budget under 1024", { body = { thinking = { type = "enabled", budget_tokens = 512 } } },
        "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024" },
      { "max_tokens not above the budget", { body = { max_tokens = 2048,
        thinking = { type = "enabled", budget_tokens = 2048 } } },
        "`max_tokens` must be greater than `thinking.budget_tokens`" },
      { "thinking with a temperature", { body = { temperature = 0.5,
        thinking = { type = "enabled", budget_tokens = 1024 } } }, "`temperature` may only be set to 1" },
      { "thinking with top_k", { body = { top_k = 5, thinking = { type = "adaptive" } } }, "`top_k`" },
      { "thinking with a forced tool", { body = { tools = TOOLS.anthropic, tool_choice = { type = "any" },
        thinking = { type = "enabled", budget_tokens = 1024 } } },
        "Thinking may not be enabled when tool_choice forces tool use." },
      { "a prefill ending in whitespace", { user("hi"), { role = "assistant", content = "The answer is " } },
        "messages: final assistant content cannot end with trailing whitespace" },
      { "a temperature above 1", { body = { temperature = 1.5 } },
        "temperature: Input should be less than or equal to 1" },
      { "metadata it does not know", { body = { metadata = { user_id = "u", session = "s" } } },
        "metadata.session: Extra inputs are not permitted" },
      { "a tool name with spaces", { body = { tools = { { name = "get time", input_schema = TIME } } } },
        "tools.0.custom.name: String should match pattern" },
      { "a tool schema that is not an object", { body = { tools = { { name = "f",
        input_schema = { type = "string" } } } } }, "tools.0.custom.input_schema.type: Input should be 'object'" },
      { "two tools of one name", { body = { tools = { TOOLS.anthropic[2], TOOLS.anthropic[2] } } },
        "tools: Tool names must be unique." },
      { "an unknown tool_choice", { body = { tools = TOOLS.anthropic, tool_choice = { type = "required" } } },
        "tool_choice: Input tag 'required'" },
      { "no messages", { body = { messages = json.array() } }, "messages: at least one message is required" },
      { "a message thread", { body = { thread = { type = "create" } } }, "mock: message threads are not supported" },
    }

    for _, api in ipairs { "openai", "anthropic" } do
      for _, c in ipairs(api == "openai" and OPENAI or ANTHROPIC) do
        it(api .. " refuses " .. c[1], function()
          local spec = c[2]
          local body = body_of(api, spec.body and { user("What is the capital of France?") } or spec)
          for k, v in pairs(spec.body or {}) do
            if v == null then
              v = nil
            end
            body[k] = v
          end
          for _, stream in ipairs(STREAMS) do
            body.stream = stream
            local status, doc, _, req = send(api, body)
            assert.are.equal(400, status)
            if api == "openai" then
              assert.are.equal("invalid_request_error", doc.error.type)
              assert.truthy(doc.error.message:find(c[3], 1, true), doc.error.message)
              assert.are.equal(c[4] or null, doc.error.param)
              if c[5] then
                assert.are.equal(c[5], doc.error.code)
              end
            else
              assert.are.equal("error", doc.type)
              assert.are.equal("invalid_request_error", doc.error.type)
              assert.truthy(doc.error.message:find(c[3], 1, true), doc.error.message)
            end
            assert.are.equal(doc.error.message, req.rejected)
          end
        end)
      end
    end

    it("anthropic: a thread is refused with the details the SDKs recover from", function()
      local status, doc = send("anthropic", body_of("anthropic", { user("hi") }, { thread = { type = "continue",
        previous_message_id = "msg_1" } }))
      assert.are.equal(400, status)
      assert.are.same({ error_code = "thread_unsupported_request", unsupported = {} }, doc.error.details)
    end)

    it("anthropic merges turns of one role instead of refusing them", function()
      local status, doc, _, req = send("anthropic", body_of("anthropic", { user("first"), user("second"),
        { role = "assistant", content = "a" }, { role = "assistant", content = "b" }, user("third") }))
      assert.are.equal(200, status)
      assert.is_nil(req.rejected)
      assert.are.equal("Hello from the mock anthropic provider. You asked: third", text_of("anthropic", doc))
    end)

    it("a fault comes before validation", function()
      local status = send("anthropic", { model = "x", messages = {} }, { fault = "529" })
      assert.are.equal(529, status)
      assert.is_nil(m.requests[1].rejected)
    end)
  end)

  describe("images and documents", function()
    local PNG, PDF = "iVBORw0KGgo=", "JVBERi0xLjQK"
    it("openai: image_url (data and http) and file parts are counted in the answer and the tokens", function()
      local q = "What is in these?"
      for _, stream in ipairs(STREAMS) do
        local status, doc = send("openai", body_of("openai", { { role = "user", content = {
          { type = "text", text = q },
          { type = "image_url", image_url = { url = "data:image/png;base64," .. PNG, detail = "low" } },
          { type = "image_url", image_url = { url = "https://example.com/cat.jpg" } },
          { type = "file", file = { file_data = "data:application/pdf;base64," .. PDF, filename = "a.pdf" } },
        } } }, { stream = stream, stream_options = stream and { include_usage = true } or nil }))
        assert.are.equal(200, status)
        local text = text_of("openai", doc)
        assert.are.equal("Hello from the mock openai provider. You asked: " .. q .. " I see 2 images and 1 document.",
          text)
        assert.are.equal(words(q) + 2 * 85 + 100, doc.usage.prompt_tokens)
      end
    end)

    it("anthropic: image and document blocks (base64, url, text), in tool results too", function()
      local q = "Compare them"
      local messages = {
        { role = "user", content = {
          { type = "image", source = { type = "base64", media_type = "image/png", data = PNG } },
          { type = "image", source = { type = "url", url = "https://example.com/cat.jpg" } },
          { type = "document", source = { type = "base64", media_type = "application/pdf", data = PDF },
            title = "A" },
          { type = "document", source = { type = "text", media_type = "text/plain", data = "three words here" } },
          { type = "text", text = q },
        } },
      }
      for _, stream in ipairs(STREAMS) do
        local status, doc = send("anthropic", body_of("anthropic", messages, { stream = stream }))
        assert.are.equal(200, status)
        assert.are.equal("Hello from the mock anthropic provider. You asked: " .. q
          .. " I see 2 images and 2 documents.", text_of("anthropic", doc))
        assert.are.equal(2 * 85 + 100 + 3 + words(q), doc.usage.input_tokens)
      end
      -- an image a tool returned
      local status, doc = send("anthropic", body_of("anthropic", {
        user("screenshot"), { role = "assistant", content = { { type = "tool_use", id = "toolu_s", name = "shot",
          input = {} } } },
        { role = "user", content = { { type = "tool_result", tool_use_id = "toolu_s", content = {
          { type = "text", text = "here" },
          { type = "image", source = { type = "base64", media_type = "image/png", data = PNG } } } } } },
      }))
      assert.are.equal(200, status)
      assert.are.equal("Hello from the mock anthropic provider. You asked: screenshot Tool results: [toolu_s] here"
        .. " I see 1 image.", text_of("anthropic", doc))
    end)
  end)

  describe("thinking", function()
    local THINK = { type = "enabled", budget_tokens = 1024 }
    local function thought(q)
      return fmt('The user asks: "%s" Let me think it through step by step.', q)
    end

    it("anthropic: a signed thinking block comes first, plain and streamed", function()
      local q = "Why is the sky blue?"
      for _, stream in ipairs(STREAMS) do
        local status, doc = send("anthropic", body_of("anthropic", { user(q) }, { thinking = THINK, stream = stream }))
        assert.are.equal(200, status)
        assert.are.equal(2, #doc.content)
        assert.are.same({ type = "thinking", thinking = thought(q), signature = mock.sign(thought(q)) }, doc.content[1])
        assert.matches("^[%w+/]+=*$", doc.content[1].signature)
        assert.are.same({ type = "text", text = "Hello from the mock anthropic provider. You asked: " .. q },
          doc.content[2])
        assert.are.equal(words(thought(q)) + words(doc.content[2].text), doc.usage.output_tokens)
      end
    end)

    it("anthropic: streams thinking_delta pieces, then the signature_delta just before the block stops", function()
      local _, _, events = send("anthropic", body_of("anthropic", { user("hi") }, { thinking = THINK, stream = true }),
        { chunks = 3 })
      local seq = {}
      for i, e in ipairs(decode_events(events)) do
        seq[i] = e.type .. (e.type == "content_block_delta" and (" " .. e.delta.type) or "")
          .. (e.content_block and (" " .. e.content_block.type) or "")
        if e.content_block and e.content_block.type == "thinking" then
          assert.are.same({ type = "thinking", thinking = "", signature = "" }, e.content_block)
        end
      end
      assert.are.same({ "message_start", "content_block_start thinking", "ping",
        "content_block_delta thinking_delta", "content_block_delta thinking_delta",
        "content_block_delta thinking_delta",
        "content_block_delta signature_delta", "content_block_stop", "content_block_start text",
        "content_block_delta text_delta", "content_block_delta text_delta", "content_block_delta text_delta",
        "content_block_stop", "message_delta", "message_stop" }, seq)
    end)

    it("anthropic: a thinking block sent back is verified; a tampered one gets a 400", function()
      for _, stream in ipairs(STREAMS) do
        local _, first = send("anthropic", body_of("anthropic", { user("first") },
          { thinking = THINK, stream = stream }), { redacted_thinking = 1 })
        assert.are.same({ "thinking", "redacted_thinking", "text" },
          { first.content[1].type, first.content[2].type, first.content[3].type })
        local turn = { user("first"), { role = "assistant", content = first.content }, user("second") }
        local status, _, _, req = send("anthropic", body_of("anthropic", turn, { thinking = THINK }))
        assert.are.equal(200, status)
        assert.is_true(req.thinking_verified)
        local _, headers = call("anthropic", m:base_url("anthropic"), { raw = json.encode(body_of("anthropic", turn,
          { thinking = THINK, stream = stream })), stream = stream })
        assert.are.equal("true", headers["x-mock-thinking-verified"])
        -- the text changed under its signature
        local forged = { type = "thinking", thinking = first.content[1].thinking .. " And more.",
          signature = first.content[1].signature }
        turn[2] = { role = "assistant", content = { forged, first.content[3] } }
        local doc
        status, doc, _, req = send("anthropic", body_of("anthropic", turn, { thinking = THINK }))
        assert.are.equal(400, status)
        assert.are.equal("messages.1.content.0: Invalid `signature` in `thinking` block", doc.error.message)
        assert.is_false(req.thinking_verified)
        -- redacted data changed
        local data = first.content[2].data
        turn[2] = { role = "assistant", content = { first.content[1], { type = "redacted_thinking",
          data = data:sub(1, 10) .. (data:sub(11, 11) == "A" and "B" or "A") .. data:sub(12) }, first.content[3] } }
        status, doc, _, req = send("anthropic", body_of("anthropic", turn, { thinking = THINK }))
        assert.are.equal(400, status)
        assert.are.equal("messages.1.content.1: Invalid `data` in `redacted_thinking` block", doc.error.message)
        assert.is_false(req.thinking_verified)
      end
    end)

    it("anthropic: a request without thinking blocks leaves thinking_verified unset", function()
      local _, _, _, req = send("anthropic", body_of("anthropic", { user("hi") }, { thinking = THINK }))
      assert.is_nil(req.thinking_verified)
      local _, headers = call("anthropic", m:base_url("anthropic"), { raw = json.encode(body_of("anthropic",
        { user("hi") }, { thinking = THINK })) })
      assert.is_nil(headers["x-mock-thinking-verified"])
    end)

    it("anthropic: adaptive thinking, output_config.effort and display omitted", function()
      local _, doc = send("anthropic", body_of("anthropic", { user("q") }, { thinking = { type = "adaptive" } }))
      assert.are.equal("thinking", doc.content[1].type)
      _, doc = send("anthropic", body_of("anthropic", { user("q") }, { output_config = { effort = "high" } }))
      assert.are.equal("thinking", doc.content[1].type)
      _, doc = send("anthropic", body_of("anthropic", { user("q") }, { output_config = { effort = "high" },
        thinking = { type = "disabled" } }))
      assert.are.equal("text", doc.content[1].type)
      _, doc = send("anthropic", body_of("anthropic", { user("q") }, { thinking = { type = "enabled",
        budget_tokens = 1024, display = "omitted" } }))
      assert.are.same({ type = "thinking", thinking = "", signature = mock.sign("") }, doc.content[1])
      assert.are.equal(words(thought("q")) + words(doc.content[2].text), doc.usage.output_tokens)
    end)

    it("anthropic: thinking with tools needs the thinking block back in the tool-use turn", function()
      local _, first = send("anthropic", body_of("anthropic", { user("use get_time") },
        { thinking = THINK, tools = TOOLS.anthropic }))
      assert.are.same({ "thinking", "tool_use" }, { first.content[1].type, first.content[2].type })
      assert.are.equal("tool_use", first.stop_reason)
      local results = { role = "user", content = { { type = "tool_result", tool_use_id = first.content[2].id,
        content = "09:30" } } }
      local status, doc, _, req = send("anthropic", body_of("anthropic", { user("use get_time"),
        { role = "assistant", content = first.content }, results }, { thinking = THINK, tools = TOOLS.anthropic }))
      assert.are.equal(200, status)
      assert.is_true(req.thinking_verified)
      assert.are.equal("I have 1 tool result to go through. Let me read them in order.", doc.content[1].thinking)
      assert.matches("Tool results: %[toolu_%w+%] 09:30$", doc.content[2].text)
      -- the thinking block dropped
      status, doc = send("anthropic", body_of("anthropic", { user("use get_time"),
        { role = "assistant", content = { first.content[2] } }, results },
        { thinking = THINK, tools = TOOLS.anthropic }))
      assert.are.equal(400, status)
      assert.are.equal("messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, but found `tool_use`. "
        .. "When `thinking` is enabled, a final `assistant` message must start with a thinking block.",
        doc.error.message)
    end)

    it("openai: reasoning_effort reports reasoning tokens", function()
      for effort, n in pairs { low = 16, high = 64, none = 0 } do
        local _, doc = send("openai", body_of("openai", { user("q") }, { reasoning_effort = effort }))
        local text = text_of("openai", doc)
        assert.are.same(openai_usage(1, words(text) + n, { reasoning = n }), doc.usage)
      end
    end)

    it("openai: reasoning_content=1 answers with it, streamed before the content", function()
      local q = "Why?"
      local _, doc = send("openai", body_of("openai", { user(q) }), { reasoning_content = 1 })
      assert.are.equal(thought(q), doc.choices[1].message.reasoning_content)
      assert.are.equal(words(thought(q)), doc.usage.completion_tokens_details.reasoning_tokens)
      local status, sdoc, events = send("openai", body_of("openai", { user(q) }, { stream = true }),
        { reasoning_content = 1, chunks = 2 })
      assert.are.equal(200, status)
      assert.are.equal(thought(q), sdoc.choices[1].message.reasoning_content)
      assert.are.equal(doc.choices[1].message.content, sdoc.choices[1].message.content)
      local kinds = {}
      for i = 2, #events - 2 do
        local dl = assert(cjson.decode(events[i].data)).choices[1].delta
        kinds[#kinds + 1] = dl.reasoning_content and "reasoning" or "content"
        assert.is_true((dl.reasoning_content == nil) ~= (dl.content == nil))
      end
      assert.are.same({ "reasoning", "reasoning", "content", "content" }, kinds)
    end)
  end)

  describe("prompt caching", function()
    local LONG = ("lorem ipsum dolor sit amet "):rep(240) -- 1200 words
    local function cached_system(ttl)
      return { { type = "text", text = LONG, cache_control = { type = "ephemeral", ttl = ttl } } }
    end

    it("anthropic: a cache_control prefix is written once, then read; m:reset() forgets it", function()
      local q = "Summarise it"
      for _, stream in ipairs(STREAMS) do
        m:reset()
        local body = body_of("anthropic", { user(q) }, { system = cached_system(), stream = stream })
        local _, doc = send("anthropic", body)
        local out = doc.usage.output_tokens
        assert.are.same(anthropic_usage(words(q), out, { write_5m = 1200 }), doc.usage)
        _, doc = send("anthropic", body)
        assert.are.same(anthropic_usage(words(q), out, { read = 1200 }), doc.usage)
        -- another question after the same prefix
        body.messages = { user("Another one") }
        _, doc = send("anthropic", body)
        assert.are.same(anthropic_usage(2, doc.usage.output_tokens, { read = 1200 }), doc.usage)
      end
      m:reset()
      local _, doc = send("anthropic", body_of("anthropic", { user(q) }, { system = cached_system() }))
      assert.are.equal(1200, doc.usage.cache_creation_input_tokens)
    end)

    it("anthropic: a 1h breakpoint writes ephemeral_1h tokens; the stream's message_start reports it", function()
      local _, _, events = send("anthropic", body_of("anthropic", { user("q") }, { system = cached_system("1h"),
        stream = true }))
      local start = assert(cjson.decode(events[1].data))
      assert.are.same(anthropic_usage(1, 1, { write_1h = 1200 }), start.message.usage)
    end)

    it("anthropic: the top-level cache_control marks the last block", function()
      local body = body_of("anthropic", { user("one two three") }, { system = "four five",
        cache_control = { type = "ephemeral" } })
      local _, doc = send("anthropic", body)
      assert.are.same(anthropic_usage(0, doc.usage.output_tokens, { write_5m = 5 }), doc.usage)
      _, doc = send("anthropic", body)
      assert.are.same(anthropic_usage(0, doc.usage.output_tokens, { read = 5 }), doc.usage)
    end)

    it("anthropic: a growing conversation reads what it wrote and writes the rest", function()
      local cc = { type = "ephemeral" }
      local tools = { { name = "get_time", input_schema = TIME, cache_control = cc } }
      local first = body_of("anthropic", { { role = "user", content = { { type = "text", text = "one two",
        cache_control = cc } } } }, { tools = tools })
      local _, doc = send("anthropic", first)
      local tool = doc.usage.cache_creation_input_tokens - 2 -- the tool's own tokens
      assert.is_true(tool > 0)
      assert.are.same(anthropic_usage(0, doc.usage.output_tokens, { write_5m = tool + 2 }), doc.usage)
      -- the breakpoint moves to the new last turn
      local second = body_of("anthropic", { user("one two"), { role = "assistant", content = "three" },
        { role = "user", content = { { type = "text", text = "four five six", cache_control = cc } } } },
        { tools = tools })
      _, doc = send("anthropic", second)
      assert.are.same(anthropic_usage(0, doc.usage.output_tokens, { read = tool + 2, write_5m = 4 }), doc.usage)
      -- a change before the breakpoint: only the tools are read
      second.messages[1] = user("one three")
      _, doc = send("anthropic", second)
      assert.are.same(anthropic_usage(0, doc.usage.output_tokens, { read = tool, write_5m = 6 }), doc.usage)
    end)

    it("anthropic: no cache_control, no cache fields above zero", function()
      for _ = 1, 2 do
        local _, doc = send("anthropic", body_of("anthropic", { user(LONG) }))
        assert.are.same(anthropic_usage(1200, doc.usage.output_tokens), doc.usage)
      end
    end)

    it("openai: a long prefix seen before is cached, in steps of 128 tokens", function()
      for _, stream in ipairs(STREAMS) do
        m:reset()
        local extra = { stream = stream, stream_options = stream and { include_usage = true } or nil }
        local body = body_of("openai", { { role = "system", content = LONG }, user("first question") }, extra)
        local _, doc = send("openai", body)
        assert.are.equal(0, doc.usage.prompt_tokens_details.cached_tokens)
        _, doc = send("openai", body)
        assert.are.equal(1202, doc.usage.prompt_tokens)
        assert.are.equal(1152, doc.usage.prompt_tokens_details.cached_tokens)
        -- the same system prompt, another question: the system message is the prefix
        body.messages[2] = user("second question here")
        _, doc = send("openai", body)
        assert.are.equal(1152, doc.usage.prompt_tokens_details.cached_tokens)
      end
      -- short prompts are never cached
      local body = body_of("openai", { user("short") })
      send("openai", body)
      local _, doc = send("openai", body)
      assert.are.equal(0, doc.usage.prompt_tokens_details.cached_tokens)
    end)
  end)

  describe("JSON output", function()
    local SCHEMA = { type = "object", properties = { name = { type = "string" }, age = { type = "integer",
      minimum = 0 }, tags = { type = "array", items = { type = "string" } } }, required = { "name", "age", "tags" },
      additionalProperties = false }

    it("openai: json_object answers a JSON object with the answer", function()
      for _, stream in ipairs(STREAMS) do
        local _, doc = send("openai", body_of("openai", { user("Reply in JSON: hi") },
          { response_format = { type = "json_object" }, stream = stream }))
        assert.are.same({ answer = "Hello from the mock openai provider. You asked: Reply in JSON: hi" },
          cjson.decode(text_of("openai", doc)))
      end
    end)

    it("openai: json_schema answers an instance of the schema; text= is sent as is", function()
      for _, stream in ipairs(STREAMS) do
        local _, doc = send("openai", body_of("openai", { user("Who?") }, { stream = stream, response_format = {
          type = "json_schema", json_schema = { name = "person", strict = true, schema = SCHEMA } } }))
        assert.are.equal('{"age":42,"name":"name","tags":["tags"]}', text_of("openai", doc))
        assert.are.equal("stop", doc.choices[1].finish_reason)
      end
      local _, doc = send("openai", body_of("openai", { user("Who?") }, { response_format = {
        type = "json_schema", json_schema = { name = "person", schema = SCHEMA } } }), { text = "{not json" })
      assert.are.equal("{not json", text_of("openai", doc))
    end)

    it("anthropic: output_config.format (and the beta output_format) answer an instance in a text block", function()
      for _, stream in ipairs(STREAMS) do
        for _, extra in ipairs { { output_config = { format = { type = "json_schema", schema = SCHEMA } } },
          { output_format = { type = "json_schema", schema = SCHEMA } } } do
          extra.stream = stream
          local _, doc = send("anthropic", body_of("anthropic", { user("Who?") }, extra))
          assert.are.equal(1, #doc.content)
          assert.are.equal('{"age":42,"name":"name","tags":["tags"]}', doc.content[1].text)
          assert.are.equal("end_turn", doc.stop_reason)
        end
      end
    end)

    it("a schema the mock cannot instantiate is a 400 naming the mock", function()
      local status, doc = send("anthropic", body_of("anthropic", { user("Who?") },
        { output_config = { format = { type = "json_schema", schema = { type = "object",
          properties = { a = { ["$ref"] = "#/$defs/none" } }, required = { "a" } } } } }))
      assert.are.equal(400, status)
      assert.matches("^mock: cannot make an instance of the output schema: cannot resolve", doc.error.message)
    end)
  end)

  describe("stop sequences", function()
    local TEXT = "one two three four"
    for _, api in ipairs { "openai", "anthropic" } do
      it(api .. ": the text stops before the first stop sequence it contains", function()
        for _, stream in ipairs(STREAMS) do
          local key = api == "openai" and "stop" or "stop_sequences"
          local _, doc = send(api, body_of(api, { user("count") }, { [key] = { "four", "two" }, stream = stream }),
            { text = TEXT })
          assert.are.equal("one ", text_of(api, doc))
          if api == "openai" then
            assert.are.equal("stop", doc.choices[1].finish_reason)
          else
            assert.are.equal("stop_sequence", doc.stop_reason)
            assert.are.equal("two", doc.stop_sequence)
            assert.are.equal(1, doc.usage.output_tokens)
          end
          -- none found
          _, doc = send(api, body_of(api, { user("count") }, { [key] = { "five" }, stream = stream }), { text = TEXT })
          assert.are.equal(TEXT, text_of(api, doc))
          assert.are.equal(api == "openai" and "stop" or "end_turn", finish_of(api, doc))
          if api == "anthropic" then
            assert.are.equal(null, doc.stop_sequence)
          end
        end
        if api == "openai" then
          local _, doc = send(api, body_of(api, { user("count") }, { stop = "three" }), { text = TEXT })
          assert.are.equal("one two ", text_of(api, doc))
        end
      end)
    end
  end)

  describe("n and logprobs", function()
    it("openai: n choices, each after the first marked, streamed by index", function()
      local q = "Pick"
      local base = "Hello from the mock openai provider. You asked: " .. q
      local _, plain = send("openai", body_of("openai", { user(q) }, { n = 3 }))
      local texts = {}
      for i, c in ipairs(plain.choices) do
        assert.are.equal(i - 1, c.index)
        assert.are.equal("stop", c.finish_reason)
        texts[i] = c.message.content
      end
      assert.are.same({ base, base .. " (choice 1)", base .. " (choice 2)" }, texts)
      assert.are.equal(words(base) * 3 + 4, plain.usage.completion_tokens)
      local _, doc, events = send("openai", body_of("openai", { user(q) }, { n = 2, stream = true }), { chunks = 2 })
      local order = {}
      for i = 1, #events - 1 do
        local ch = assert(cjson.decode(events[i].data)).choices[1]
        order[i] = fmt("%d%s", ch.index, ch.delta.role and "r" or ch.finish_reason ~= null and "f" or "c")
      end
      assert.are.same({ "0r", "1r", "0c", "1c", "0c", "1c", "0f", "1f" }, order)
      assert.are.same({ base, base .. " (choice 1)" }, { doc.choices[1].message.content,
        doc.choices[2].message.content })
    end)

    it("openai: logprobs per token with top_logprobs, in the answer and in each chunk", function()
      local _, doc = send("openai", body_of("openai", { user("hi") }, { logprobs = true, top_logprobs = 3 }))
      local c = doc.choices[1]
      local joined = {}
      for i, e in ipairs(c.logprobs.content) do
        joined[i] = e.token
        assert.is_true(e.logprob < 0)
        local b = {}
        for k = 1, #e.token do
          b[k] = e.token:byte(k)
        end
        assert.are.same(b, e.bytes)
        assert.are.equal(3, #e.top_logprobs)
        assert.are.same({ token = e.token, logprob = e.logprob, bytes = e.bytes }, e.top_logprobs[1])
        assert.is_true(e.top_logprobs[2].logprob < e.logprob)
      end
      assert.are.equal(c.message.content, table.concat(joined))
      assert.are.equal(words(c.message.content), #joined)
      assert.are.equal(null, c.logprobs.refusal)
      -- streamed: each content chunk carries the logprobs of its own tokens
      local _, sdoc, events = send("openai", body_of("openai", { user("hi") }, { logprobs = true, stream = true }),
        { chunks = 3 })
      local contents = 0
      for i = 2, #events - 2 do
        local ch = assert(cjson.decode(events[i].data)).choices[1]
        local toks = {}
        for k, e in ipairs(ch.logprobs.content) do
          toks[k] = e.token
          assert.are.same({}, e.top_logprobs)
        end
        assert.are.equal(ch.delta.content, table.concat(toks))
        contents = contents + 1
      end
      assert.are.equal(3, contents)
      assert.are.equal(c.message.content, sdoc.choices[1].message.content)
      -- without logprobs: null
      _, doc = send("openai", body_of("openai", { user("hi") }))
      assert.are.equal(null, doc.choices[1].logprobs)
    end)
  end)

  describe("prefill", function()
    it("anthropic: the answer goes on from a last assistant turn, plain and streamed", function()
      for _, stream in ipairs(STREAMS) do
        local messages = { user("Greek name for the Sun? (A) Sol (B) Helios"),
          { role = "assistant", content = "The best answer is (" } }
        local _, doc, _, req = send("anthropic", body_of("anthropic", messages, { stream = stream }),
          { text = "The best answer is (B) Helios" })
        assert.is_nil(req.rejected)
        assert.are.equal("B) Helios", text_of("anthropic", doc))
        -- the default answer, prefilled with its own beginning
        messages[2] = { role = "assistant", content = { { type = "text", text = "Hello from the mock" } } }
        _, doc = send("anthropic", body_of("anthropic", messages, { stream = stream }))
        assert.are.equal(" anthropic provider. You asked: Greek name for the Sun? (A) Sol (B) Helios",
          text_of("anthropic", doc))
        -- a prefill it does not begin with: the whole answer
        messages[2] = { role = "assistant", content = "Well," }
        _, doc = send("anthropic", body_of("anthropic", messages, { stream = stream }))
        assert.matches("^Hello from the mock anthropic provider", text_of("anthropic", doc))
      end
    end)

    it("anthropic: max_tokens 0 answers no content", function()
      for _, stream in ipairs(STREAMS) do
        local status, doc = send("anthropic", body_of("anthropic", { user("warm the cache") }, { max_tokens = 0,
          stream = stream }))
        assert.are.equal(200, status)
        assert.are.same({}, doc.content)
        assert.are.equal("max_tokens", doc.stop_reason)
        assert.are.equal(0, doc.usage.output_tokens)
      end
    end)
  end)

  describe("other parameters and headers", function()
    it("openai: sampling and metadata are recorded; service_tier and the model come back", function()
      local _, doc, _, req = send("openai", body_of("openai", { user("hi") }, { seed = 7, user = "u-1",
        metadata = { k = "v" }, service_tier = "flex", temperature = 0.3, top_p = 0.9, presence_penalty = 0.5,
        frequency_penalty = -0.5, model = "gpt-4.1-nano" }))
      assert.are.equal("flex", doc.service_tier)
      assert.are.equal("gpt-4.1-nano", doc.model)
      assert.matches("^fp_%x+$", doc.system_fingerprint)
      for k, v in pairs { seed = 7, user = "u-1", service_tier = "flex", temperature = 0.3, top_p = 0.9,
        presence_penalty = 0.5, frequency_penalty = -0.5 } do
        assert.are.equal(v, req.json[k])
      end
      assert.are.same({ k = "v" }, req.json.metadata)
      _, doc = send("openai", body_of("openai", { user("hi") }, { service_tier = "auto" }))
      assert.are.equal("default", doc.service_tier)
    end)

    it("anthropic: the request headers are recorded, anthropic-beta among them", function()
      local _, _, _, req = send("anthropic", body_of("anthropic", { user("hi") }, { top_k = 5,
        metadata = { user_id = "u-1" } }), nil, { ["anthropic-beta"] = "prompt-caching-2024-07-31,other-beta" })
      assert.are.equal("2023-06-01", req.headers["anthropic-version"])
      assert.are.equal("prompt-caching-2024-07-31,other-beta", req.headers["anthropic-beta"])
      assert.are.equal(5, req.json.top_k)
      assert.are.same({ user_id = "u-1" }, req.json.metadata)
    end)
  end)

  describe("faults with the new content", function()
    -- The events of a stream that may end in a reset: status, kind, events.
    local function raw_stream(api, body, dirs)
      local status, kind, _, events = call(api, m:base_url(api, dirs), { raw = json.encode(body), stream = true })
      return status, kind, events
    end

    it("openai: fault=cut stops a stream inside a tool call's arguments", function()
      local body = body_of("openai", { user("get_weather") }, { tools = TOOLS.openai, stream = true })
      local status, kind, events = raw_stream("openai", body, { fault = "cut", chunks = 4 })
      assert.is_nil(status)
      assert.are.equal("reset", kind)
      local doc = assemble("openai", events)
      local args = doc.choices[1].message.tool_calls[1]["function"].arguments
      local full = json.encode(ARGS.get_weather)
      -- the call's start and two of its four argument pieces
      assert.are.equal(split_like(full, 4, 2), args)
      assert.is_nil(cjson.decode(args))
      assert.is_nil(doc.choices[1].finish_reason)
    end)

    it("anthropic: fault=cut stops a stream inside a tool_use's input", function()
      local body = body_of("anthropic", { user("get_weather") }, { tools = TOOLS.anthropic, stream = true })
      local status, kind, events = raw_stream("anthropic", body, { fault = "cut", chunks = 4 })
      assert.is_nil(status)
      assert.are.equal("reset", kind)
      local last = assert(cjson.decode(events[#events].data))
      assert.are.equal("input_json_delta", last.delta.type)
      local partial = {}
      for _, ev in ipairs(events) do
        local e = assert(cjson.decode(ev.data))
        if e.type == "content_block_delta" then
          partial[#partial + 1] = e.delta.partial_json
        end
      end
      assert.are.equal(split_like(json.encode(ARGS.get_weather), 4, 2), table.concat(partial))
    end)

    it("anthropic: stall_after counts thinking pieces; error200 takes the first content's place", function()
      local body = body_of("anthropic", { user("hi") }, { thinking = { type = "enabled", budget_tokens = 1024 },
        stream = true })
      local _, kind, _, events = call("anthropic", m:base_url("anthropic", { stall_after = 1, chunks = 2 }),
        { raw = json.encode(body), stream = true, timeout_ms = 200 })
      assert.are.equal("timeout", kind)
      local last = assert(cjson.decode(events[#events].data))
      assert.are.equal("thinking_delta", last.delta.type)
      local status, _, _, evs = call("anthropic", m:base_url("anthropic", { fault = "error200" }),
        { raw = json.encode(body), stream = true })
      assert.are.equal(200, status)
      assert.are.same({ "message_start", "content_block_start", "ping", "error" },
        { evs[1].event, evs[2].event, evs[3].event, evs[4].event })
      assert.are.equal(4, #evs)
    end)

    it("openai: fault=malformed puts one bad line after the first tool-call delta", function()
      local body = body_of("openai", { user("get_time") }, { tools = TOOLS.openai, stream = true })
      local status, _, events = raw_stream("openai", body, { fault = "malformed" })
      assert.are.equal(200, status)
      assert.is_table(cjson.decode(events[2].data).choices[1].delta.tool_calls)
      assert.is_nil(cjson.decode(events[3].data))
    end)

    it("first_token_ms waits before a tool call's first delta", function()
      local body = body_of("openai", { user("get_time") }, { tools = TOOLS.openai, stream = true })
      local at, t0 = {}, aiorch.now()
      local status = aiorch.http.request { method = "POST", url = m:base_url("openai", { first_token_ms = 120 })
        .. "/chat/completions", headers = { ["content-type"] = "application/json" }, body = json.encode(body),
        on_event = function() at[#at + 1] = aiorch.now() - t0 end }
      assert.are.equal(200, status)
      assert.is_true(at[1] < 100, "the role chunk at once")
      assert.is_true(at[2] >= 115, "the tool call after first_token_ms")
    end)
  end)
end)
