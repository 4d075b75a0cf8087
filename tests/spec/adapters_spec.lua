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
