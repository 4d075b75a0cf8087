-- Provider adapters against fixtures shaped like each API's documented
-- requests, replies, streams and errors (tests/fixtures/PROVIDER/*.json).
local cjson = require "cjson.safe"

local ROOT = debug.getinfo(1, "S").source:match("^@(.*)/tests/spec/[^/]+$") or "."
package.path = ROOT .. "/scripts/?.lua;" .. package.path

local PROVIDERS = { "openai", "anthropic" }

local function read_json(path)
  local f = assert(io.open(path, "r"))
  local text = f:read("a")
  f:close()
  return assert(cjson.decode(text))
end

local function fixtures(provider, name)
  return read_json(ROOT .. "/tests/fixtures/" .. provider .. "/" .. name .. ".json")
end

local function load_adapter(name)
  return assert(dofile(ROOT .. "/scripts/providers/" .. name .. ".lua"))
end

local function body_of(case)
  if case.body_raw then
    return case.body_raw
  end
  return assert(cjson.encode(case.body))
end

local function check_result(case, result, kind, message, extra)
  if case.expected then
    assert.is_nil(kind, message)
    assert.same(case.expected, {
      text = result.text, model = result.model, usage = result.usage, finish_reason = result.finish_reason,
    })
  else
    assert.is_nil(result)
    assert.equal(case.error.kind, kind)
    assert.is_string(message)
    assert.truthy(message:find(case.error.message_contains, 1, true),
      ("message %q lacks %q"):format(message, case.error.message_contains))
    assert.falsy(message:find("\n"), "one line")
    if case.error.retry_after then
      assert.equal(case.error.retry_after, extra and extra.retry_after)
    end
    -- The provider's own error type and code, for clients ({type, code}; null: none).
    local want = case.error.provider_error
    assert.is_not_nil(want, "the case says which provider_error to expect")
    assert.same(want ~= cjson.null and want or nil, extra and extra.provider_error)
  end
end

for _, provider in ipairs(PROVIDERS) do
  describe(provider .. " adapter", function()
    local adapter = load_adapter(provider)

    it("declares the shared interface", function()
      assert.equal(provider, adapter.name)
      for _, f in ipairs({ "default_model", "key_env", "base_url_env", "default_base_url" }) do
        assert.is_string(adapter[f], f)
      end
      assert.is_table(adapter.temperature_range)
      assert.is_true(adapter.temperature_range[1] < adapter.temperature_range[2])
      for _, f in ipairs({ "build_request", "parse_response", "stream_parser" }) do
        assert.is_function(adapter[f], f)
      end
    end)

    it("uses its default base url and model when the config has none", function()
      local wire = adapter.build_request({ key = "k" }, { user_question = "q" }, {})
      assert.equal(1, wire.url:find(adapter.default_base_url, 1, true))
      assert.equal(adapter.default_model, cjson.decode(wire.body).model)
    end)

    describe("build_request", function()
      for _, case in ipairs(fixtures(provider, "requests")) do
        it(case.name, function()
          local wire = adapter.build_request(case.config, case.request, case.opts or {})
          assert.equal(case.expected.method, wire.method)
          assert.equal(case.expected.url, wire.url)
          assert.same(case.expected.headers, wire.headers)
          assert.is_string(wire.body)
          assert.same(case.expected.body, cjson.decode(wire.body))
        end)
      end
    end)

    describe("parse_response", function()
      local config = { model = adapter.default_model }
      for _, case in ipairs(fixtures(provider, "responses")) do
        it(case.name, function()
          local result, kind, message, extra = adapter.parse_response(config, case.status, case.headers,
            body_of(case))
          check_result(case, result, kind, message, extra)
        end)
      end

      it("never raises on garbage", function()
        for _, body in ipairs({ "", "null", "[]", "42", '"text"', "{", '{"choices": 5, "content": 5}' }) do
          for _, status in ipairs({ 200, 400, 401, 429, 500, 529, 302 }) do
            local ok, result, kind = pcall(adapter.parse_response, config, status, {}, body)
            assert.is_true(ok, result)
            assert.is_true(result ~= nil or type(kind) == "string")
          end
        end
      end)
    end)

    describe("stream parser", function()
      for _, case in ipairs(fixtures(provider, "streams")) do
        it(case.name, function()
          local p = adapter.stream_parser({ model = adapter.default_model })
          local deltas = {}
          for _, ev in ipairs(case.events) do
            local data = type(ev.data) == "table" and assert(cjson.encode(ev.data)) or ev.data
            local d = p:event({ event = ev.event, data = data })
            if d then
              deltas[#deltas + 1] = d
            end
          end
          assert.same(case.deltas, deltas)
          check_result(case, p:result())
        end)
      end

      it("reports an empty stream as cut", function()
        local p = adapter.stream_parser({})
        local result, kind = p:result()
        assert.is_nil(result)
        assert.equal("stream_cut", kind)
      end)
    end)
  end)
end

-- What the canonical model added: passthrough of a client's own request,
-- canonical events from the stream parsers, refusals that are bugs.
describe("adapters on the canonical model", function()
  local json = require "aiorch.json"
  local openai, anthropic = load_adapter("openai"), load_adapter("anthropic")

  it("declare their API and fields table", function()
    assert.equal("openai", openai.api)
    assert.equal("anthropic", anthropic.api)
    assert.same({ 0, 2 }, openai.fields.temperature.range)
    assert.same({ 0, 1 }, anthropic.fields.temperature.range)
  end)

  it("send a same-API client's own bytes", function()
    local body = '{ "model" : "gpt-4o",  "messages":[{"role":"user","content":"hi"}], "logit_bias":{"5":1},'
      .. '"store":true, "tools":[] }'
    local raw = { api = "openai", body = body, doc = json.decode(body) }
    local wire = openai.build_request({ key = "k", model = "gpt-4o-mini" }, { raw = raw, messages = {} }, {})
    assert.equal(body, wire.body)
    assert.is_nil(wire.headers.accept)
  end)

  it("replace only the model when it must change, keeping [] an array", function()
    local body = '{"model":"claude-x","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"hi"}],'
      .. '"tools":[{"name":"f","input_schema":{"type":"object","required":[]}}],"container":"c1"}'
    local raw = { api = "anthropic", body = body, doc = json.decode(body),
      headers = { ["anthropic-version"] = "2099-01-01", ["anthropic-beta"] = "b1,b2" } }
    local wire = anthropic.build_request({ key = "k" }, { raw = raw }, { model = "claude-y", stream = true })
    local sent = json.decode(wire.body)
    assert.equal("claude-y", sent.model)
    assert.equal("c1", sent.container)
    assert.is_true(json.is_array(sent.tools[1].input_schema.required))
    assert.matches('"required":%[%]', wire.body)
    assert.equal("2099-01-01", wire.headers["anthropic-version"])
    assert.equal("b1,b2", wire.headers["anthropic-beta"])
    assert.equal("text/event-stream", wire.headers.accept)
    -- The same model: the bytes as they came.
    local same = anthropic.build_request({ key = "k" }, { raw = raw }, { model = "claude-x", stream = true })
    assert.equal(body, same.body)
    -- A caller that takes the answer whole (parallel) asks for no stream.
    local whole = anthropic.build_request({ key = "k" }, { raw = raw }, { model = "claude-x" })
    assert.is_nil(json.decode(whole.body).stream)
    assert.is_nil(whole.headers.accept)
  end)

  it("translate a request that came through the other API", function()
    local raw = { api = "openai", body = "{}", doc = {} }
    local req = { raw = raw, messages = { { role = "system", content = "s" }, { role = "user", content = "q" } },
      stop = { "END" }, user = "u1" }
    local wire = anthropic.build_request({ key = "k", model = "claude-z" }, req, {})
    local sent = json.decode(wire.body)
    assert.equal("claude-z", sent.model)
    assert.equal("s", sent.system)
    assert.same({ "END" }, sent.stop_sequences)
    assert.equal("u1", sent.metadata.user_id)
    assert.equal(1024, sent.max_tokens)
  end)

  it("raise on a field their API cannot take (canonical.unsupported refuses it first)", function()
    local ok, err = pcall(openai.build_request, { key = "k" }, { user_question = "q", top_k = 3 }, {})
    assert.is_false(ok)
    assert.matches("top_k", err)
    ok, err = pcall(anthropic.build_request, { key = "k" }, { user_question = "q", seed = 3 }, {})
    assert.is_false(ok)
    assert.matches("seed", err)
  end)

  it("keep the upstream bytes of an answer", function()
    local body = '{"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}'
    local result = assert(openai.parse_response({}, 200, {}, body))
    assert.equal(body, result.raw_body)
    assert.same({ { type = "text", text = "hi" } }, result.content)
  end)

  for _, provider in ipairs(PROVIDERS) do
    it(provider .. "'s stream parser gives canonical events with opts.events", function()
      local adapter = load_adapter(provider)
      local case = fixtures(provider, "streams")[1]
      local p = adapter.stream_parser({}, { events = true })
      local text = {}
      for _, e in ipairs(case.events) do
        local sse = { event = e.event, data = type(e.data) == "table" and assert(cjson.encode(e.data)) or e.data }
        local out = p:event(sse)
        local list = out.type and { out } or out
        assert.is_true(#list > 0, "every event yields one at least")
        for _, ev in ipairs(list) do
          assert.equal(sse, ev.raw)
          if ev.type == "text" then
            text[#text + 1] = ev.text
          else
            assert.equal("meta", ev.type)
          end
        end
      end
      assert.equal(case.expected.text, table.concat(text))
      assert.equal(case.expected.text, table.concat(p.parts))
      assert.equal(case.expected.text, (p:result()).text)
    end)
  end
end)
