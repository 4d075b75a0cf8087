-- What the gateway answers when a request cannot be served as it came: an
-- upstream's refusal of the request itself (its 4xx, passed on with every
-- key it quotes removed), the native endpoint's whole AIRequest and its
-- fields it does not know. The official SDKs' view of the same is
-- tests/sdk/fidelity.test.mjs.
local aiorch = require "aiorch"
local cjson = require "cjson.safe"
local support = require "tests.support"

local KEYS = { openai = "sk-refusal-spec-openai-4545", anthropic = "sk-ant-refusal-spec-5656" }

local m -- the mock providers
local quoting -- an upstream that refuses every request, quoting its key
local answer -- what the quoting upstream answers: {status, body = function(key) -> text}

-- A gateway whose providers are at these base URLs.
local function start_gw(openai_url, anthropic_url)
  local env = { OPENAI_API_KEY = KEYS.openai, ANTHROPIC_API_KEY = KEYS.anthropic,
    OPENAI_BASE_URL = openai_url, ANTHROPIC_BASE_URL = anthropic_url }
  return (support.start_gateway({}, env))
end

local function post(base, path, body, headers)
  return support.post(base .. path, body, headers)
end

local chat = { model = "gpt-4o-mini", messages = { { role = "user", content = "hi" } } }
local messages = { model = "claude-3-haiku-20240307", max_tokens = 64,
  messages = { { role = "user", content = "hi" } } }

support.use_mock(function(mock) m = mock end)

setup(function()
  quoting = assert(aiorch.server.listen { host = "127.0.0.1", port = 0, handler = function(req, res)
    local key = req.headers["x-api-key"] or (req.headers.authorization or ""):gsub("^Bearer ", "")
    res:respond(answer.status, { ["content-type"] = "application/json" }, answer.body(key))
  end })
end)

teardown(function()
  support.close_gateways()
  quoting:close()
end)

describe("an upstream's refusal of the request", function()
  it("reaches a client of its API as the upstream wrote it, every key it quotes removed", function()
    local url = "http://127.0.0.1:" .. quoting.port
    local base = start_gw(url .. "/v1", url)
    answer = { status = 400, body = function(key)
      return cjson.encode { error = { message = "bad request from " .. key, type = "invalid_request_error",
        param = "messages.[0].content", code = "key:" .. key } }
    end }
    for _, stream in ipairs { false, true } do
      local body = { model = chat.model, messages = chat.messages, stream = stream }
      local s, _, raw, doc = post(base, "/v1/chat/completions", body, { ["x-aiorch-providers"] = "openai" })
      assert.equal(400, s)
      assert.falsy(raw:find(KEYS.openai, 1, true), raw)
      assert.same({ message = "bad request from [redacted]", type = "invalid_request_error",
        param = "messages.[0].content", code = "key:[redacted]" }, doc.error)
    end
    answer = { status = 400, body = function(key)
      return cjson.encode { type = "error", error = { type = "invalid_request_error", message = "no " .. key,
        details = { error_code = "thread_unsupported_request", unsupported = { key } } } }
    end }
    local s, _, raw, doc = post(base, "/v1/messages", messages, { ["x-aiorch-providers"] = "anthropic" })
    assert.equal(400, s)
    assert.falsy(raw:find(KEYS.anthropic, 1, true), raw)
    assert.same({ type = "error", error = { type = "invalid_request_error", message = "no [redacted]",
      details = { error_code = "thread_unsupported_request", unsupported = { "[redacted]" } } } }, doc)
    -- another API's client: a 400 in its own shape, naming the provider
    s, _, raw, doc = post(base, "/v1/chat/completions", chat, { ["x-aiorch-providers"] = "anthropic" })
    assert.equal(400, s)
    assert.falsy(raw:find(KEYS.anthropic, 1, true), raw)
    assert.equal("provider anthropic refused the request (HTTP 400): no [redacted]", doc.error.message)
    assert.equal("invalid_request_error", doc.error.type)
  end)

  it("keeps the upstream's status: a 404 is a 404, a 422 a 422", function()
    local url = "http://127.0.0.1:" .. quoting.port
    local base = start_gw(url .. "/v1", url)
    for _, status in ipairs { 404, 422 } do
      answer = { status = status, body = function()
        return cjson.encode { error = { message = "The model `gpt-x` does not exist", type = "invalid_request_error",
          code = "model_not_found" } }
      end }
      local s, _, _, doc = post(base, "/v1/chat/completions", chat, { ["x-aiorch-providers"] = "openai" })
      assert.equal(status, s)
      assert.equal("model_not_found", doc.error.code)
    end
  end)

  it("is not what an upstream says of the gateway's own key, or a failure mixed with another", function()
    -- 401 and 403: the gateway's key, not the client's request
    for _, fault in ipairs { "401", "403" } do
      local base = start_gw(m:base_url("openai", { fault = fault }), m:base_url("anthropic", { fault = fault }))
      local s, _, _, doc = post(base, "/v1/chat/completions", chat, { ["x-aiorch-providers"] = "openai" })
      assert.equal(502, s)
      assert.equal("upstream_error", doc.error.type)
    end
    -- one provider refuses the request, the other fails on its own: no refusal stands for both
    local base = start_gw(m:base_url("openai", { fault = "400" }), m:base_url("anthropic", { fault = "500" }))
    local s = post(base, "/v1/chat/completions", chat, { ["x-aiorch-providers"] = "openai,anthropic" })
    assert.equal(502, s)
    -- both refuse it: the first refusal
    base = start_gw(m:base_url("openai", { fault = "400" }), m:base_url("anthropic", { fault = "400" }))
    m:reset()
    local s2, _, _, doc = post(base, "/v1/chat/completions", chat, { ["x-aiorch-providers"] = "openai,anthropic" })
    assert.equal(400, s2)
    assert.is_string(doc.error.message)
    assert.equal(2, #m.requests)
  end)
end)

describe("POST /v1/orchestrate", function()
  it("takes the whole AIRequest: a conversation with tools", function()
    local base = start_gw(m:base_url("openai"), m:base_url("anthropic"))
    local s, h, _, doc = post(base, "/v1/orchestrate", {
      messages = { { role = "system", content = "Be terse." }, { role = "user", content = "Time? Use get_time." } },
      tools = { { name = "get_time", parameters = { type = "object", properties = { zone = { type = "string" } },
        required = { "zone" } } } },
      tool_choice = "required", providers = { "anthropic" }, strategy = "single",
    })
    assert.equal(200, s)
    assert.equal("anthropic", h["x-aiorch-provider"])
    assert.equal("tool_call", doc.content[1].type)
    assert.equal("get_time", doc.content[1].name)
    local sent = m.requests[1].json
    assert.equal("Be terse.", sent.system)
    assert.same({ type = "any" }, sent.tool_choice)
  end)

  it("refuses a field it does not know, and a stream, by name", function()
    local base = start_gw(m:base_url("openai"), m:base_url("anthropic"))
    local s, _, _, doc = post(base, "/v1/orchestrate", { user_question = "hi", temprature = 0.5 })
    assert.equal(400, s)
    assert.matches("^temprature: not a field of an AIRequest", doc.error.message)
    s, _, _, doc = post(base, "/v1/orchestrate", { user_question = "hi", stream = true })
    assert.equal(400, s)
    assert.matches("^stream: ", doc.error.message)
    assert.equal(0, #m.requests)
  end)
end)
