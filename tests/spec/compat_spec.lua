-- OpenAI-compatible providers (aiorch.compat) and the mock's servers of
-- them (scripts/aiorch/mock/compat.lua), over loopback: each quirk, on a
-- translated request and on a client's own OpenAI request, against the
-- mock server that needs it (which refuses the request without it); each
-- preset's documented request, answer and stream (tests/fixtures/presets)
-- through the generic adapter; Azure's URL, key header, api-version and
-- errors; providers added from a temporary directory without touching
-- aiorch's files (by configuration alone, and by an adapter file on
-- --path); `aiorch ask` and `aiorch serve` against the mocks.
local aiorch = require "aiorch"
local cjson = require "cjson.safe"
local json = require "aiorch.json"
local orchestrate = require "aiorch.orchestrate"
local breaker = require "aiorch.breaker"
local compat = require "aiorch.compat"
local loader = require "aiorch.loader"
local config = require "aiorch.config"
local gconfig = require "aiorch.gateway.config"
local wire = require "aiorch.wire.openai"
local support = require "tests.support"

local process = aiorch.process

local KEY = "compat-spec-secret-key-777"
local WEATHER = { type = "object", properties = { city = { type = "string" } }, required = json.array { "city" } }
local TOOLS = { { name = "get_weather", description = "Weather now", parameters = WEATHER } }
local OPENAI_TOOLS = { { type = "function", ["function"] = { name = "get_weather", parameters = WEATHER } } }
local PRESETS = compat.PRESET_ORDER

local m -- the mock

support.use_mock(function(mock) m = mock end, {})

local function last()
  return m.requests[#m.requests]
end

-- The env of one preset pointed at the mock's server of it.
local function env_for(name, dirs, extra)
  local p = compat.PRESETS[name]
  local e = {}
  if p.key_env then
    e[p.key_env] = KEY
  end
  e[p.base_url_env or name:upper() .. "_BASE_URL"] = m:base_url(name, dirs)
  return support.merge(e, extra)
end

local function cfg_of(name, env)
  return config.provider(name, assert(loader.load("provider", name)), env)
end

-- A client's own OpenAI request, as the gateway hands it over.
local function raw_request(doc)
  local req = assert(wire.decode_request(doc))
  req.raw = { api = "openai", body = cjson.encode(doc), doc = doc }
  return req
end

local function ask_one(name, req, opts, env)
  opts = opts or {}
  opts.env = env or env_for(name)
  local r, kind, err = orchestrate(req, "single", { name }, opts)
  assert(r, tostring(kind) .. ": " .. tostring(err))
  return r
end

describe("compat quirks", function()
  it("no_stream_options: Groq gets no stream_options, and reads its usage from x_groq", function()
    local events = {}
    local r = ask_one("groq", { messages = { { role = "user", content = "hi there" } } },
      { stream = true, on_event = function(ev) events[#events + 1] = ev end })
    assert.equal("success", r.status, r.error_message)
    assert.is_nil(last().json.stream_options)
    assert.is_true(last().json.stream)
    assert.is_true(r.metadata.usage.input_tokens > 0)
    assert.is_true(r.metadata.usage.output_tokens > 0)
    -- the client's own request asking for usage: translated, not sent
    r = ask_one("groq", raw_request { model = "llama-3.3-70b-versatile", stream = true,
      stream_options = { include_usage = true }, messages = { { role = "user", content = "hi" } } }, { stream = true })
    assert.equal("success", r.status, r.error_message)
    assert.is_nil(last().json.stream_options)
    -- without the quirk, the server refuses it
    local status, _, body = support.post(m:base_url("groq") .. "/chat/completions", { model = "x", stream = true,
      stream_options = { include_usage = true }, messages = { { role = "user", content = "hi" } } },
      { authorization = "Bearer " .. KEY })
    assert.equal(400, status)
    assert.matches("stream_options", body)
  end)

  it("groq refuses by name what Groq refuses: logprobs, a message name, n", function()
    for _, req in ipairs {
      { logprobs = true, messages = { { role = "user", content = "hi" } } },
      { n = 2, messages = { { role = "user", content = "hi" } } },
      { messages = { { role = "user", content = "hi", name = "bob" } } },
    } do
      local r, kind, err = orchestrate(req, "single", { "groq" }, { env = env_for("groq") })
      assert.is_nil(r)
      assert.equal("invalid", kind)
      assert.matches("is not supported by provider groq %(Groq", err)
    end
    assert.equal(0, #m.requests)
  end)

  it("tool_call_id_9: other APIs' ids sent to Mistral as 9 letters and digits, the same each turn", function()
    local turn1 = {
      { role = "user", content = "Weather in Oslo and Rome? get_weather" },
      { role = "assistant", content = { { type = "tool_call", id = "toolu_01A09q90qw90lq917835lq9",
        name = "get_weather",
        arguments = '{"city":"Oslo"}' }, { type = "tool_call", id = "call_abc_123", name = "get_weather",
        arguments = '{"city":"Rome"}' } } },
      { role = "tool", content = { { type = "tool_result", id = "toolu_01A09q90qw90lq917835lq9", content = "5 C" },
        { type = "tool_result", id = "call_abc_123", content = "20 C" } } },
    }
    local r = ask_one("mistral", { messages = turn1, tools = TOOLS, seed = 7 })
    assert.equal("success", r.status, r.error_message)
    local sent = last().json
    local a, b = sent.messages[2].tool_calls[1].id, sent.messages[2].tool_calls[2].id
    assert.matches("^[%w]+$", a)
    assert.equal(9, #a)
    assert.equal(9, #b)
    assert.are_not.equal(a, b)
    assert.same({ a, b }, { sent.messages[3].tool_call_id, sent.messages[4].tool_call_id })
    assert.equal(7, sent.random_seed)
    assert.is_nil(sent.seed)
    -- the next turn: the same ids map the same way; Mistral's own id goes as it is
    local turn2 = {}
    for i, msg in ipairs(turn1) do
      turn2[i] = msg
    end
    turn2[#turn2 + 1] = { role = "assistant", content = { { type = "tool_call", id = "Ab3dE6gH9", name = "get_weather",
      arguments = '{"city":"Oslo"}' } } }
    turn2[#turn2 + 1] = { role = "tool", content = { { type = "tool_result", id = "Ab3dE6gH9", content = "6 C" } } }
    r = ask_one("mistral", { messages = turn2, tools = TOOLS })
    assert.equal("success", r.status, r.error_message)
    sent = last().json
    assert.same({ a, b, "Ab3dE6gH9" }, { sent.messages[2].tool_calls[1].id, sent.messages[2].tool_calls[2].id,
      sent.messages[6].tool_call_id })
    -- an OpenAI client's own conversation is mapped too
    r = ask_one("mistral", raw_request { model = "mistral-small-latest", tools = OPENAI_TOOLS, messages = {
      { role = "user", content = "Oslo?" },
      { role = "assistant", content = json.null, tool_calls = { { id = "call_abc_123", type = "function",
        ["function"] = { name = "get_weather", arguments = '{"city":"Oslo"}' } } } },
      { role = "tool", tool_call_id = "call_abc_123", content = "5 C" } } })
    assert.equal("success", r.status, r.error_message)
    assert.equal(b, last().json.messages[2].tool_calls[1].id)
    assert.equal(b, last().json.messages[3].tool_call_id)
    -- Mistral's answers carry its own ids; without the quirk it refuses others
    r = ask_one("mistral", { messages = { { role = "user", content = "Oslo? get_weather" } }, tools = TOOLS })
    assert.equal(9, #r.content[1].id)
    local status, _, body = support.post(m:base_url("mistral") .. "/chat/completions", { model = "x",
      tools = OPENAI_TOOLS, messages = { { role = "user", content = "Oslo?" }, { role = "assistant",
        tool_calls = { { id = "call_abc_123", type = "function", ["function"] = { name = "get_weather",
          arguments = "{}" } } } }, { role = "tool", tool_call_id = "call_abc_123", content = "5 C" } } },
      { authorization = "Bearer " .. KEY })
    assert.equal(400, status)
    assert.matches("must be a%-z, A%-Z, 0%-9, with a length of 9", body)
  end)

  it("tool_call_id_9 keeps distinct ids distinct when one's hash is another's id", function()
    local map = assert(compat.map_ids { { role = "tool", tool_call_id = "call_x" } })
    local h = map.call_x
    local both = assert(compat.map_ids { { role = "assistant", tool_calls = { { id = h }, { id = "call_x" } } } })
    assert.is_nil(both[h]) -- a valid id keeps itself
    assert.are_not.equal(h, both.call_x)
    assert.equal(9, #both.call_x)
    assert.is_nil(compat.map_ids { { role = "tool", tool_call_id = "Ab3dE6gH9" } })
  end)

  it("reasoning_content: thinking sent back to DeepSeek in the assistant's reasoning_content", function()
    local msgs = {
      { role = "user", content = "Weather in Oslo? get_weather" },
      { role = "assistant", content = { { type = "thinking", text = "I should call the tool.", signature = "sig" },
        { type = "tool_call", id = "toolu_1", name = "get_weather", arguments = '{"city":"Oslo"}' } } },
      { role = "tool", content = { { type = "tool_result", id = "toolu_1", content = "5 C" } } },
      { role = "user", content = "And tomorrow?" },
    }
    local r = ask_one("deepseek", { messages = msgs, tools = TOOLS })
    assert.equal("success", r.status, r.error_message)
    local sent = last().json.messages
    assert.equal("I should call the tool.", sent[2].reasoning_content)
    assert.is_nil(sent[4].reasoning_content)
    assert.equal("thinking", r.content[1].type) -- DeepSeek's own reasoning comes back as thinking
    -- openai (no such quirk) refuses thinking by name; DeepSeek refuses a tool turn without it
    local _, kind, err = orchestrate({ messages = msgs, tools = TOOLS }, "single", { "openai" },
      { env = { OPENAI_API_KEY = KEY, OPENAI_BASE_URL = m:base_url("openai") } })
    assert.equal("invalid", kind)
    assert.matches("^thinking is not supported by provider openai", err)
    local status, _, body = support.post(m:base_url("deepseek") .. "/chat/completions", { model = "deepseek-chat",
      tools = OPENAI_TOOLS, messages = { { role = "user", content = "Oslo?" }, { role = "assistant",
        tool_calls = { { id = "c1", type = "function", ["function"] = { name = "get_weather", arguments = "{}" } } } },
        { role = "tool", tool_call_id = "c1", content = "5 C" } } }, { authorization = "Bearer " .. KEY })
    assert.equal(400, status)
    assert.matches("Missing `reasoning_content`", body)
  end)

  it("no_tool_choice_without_tools: vLLM gets no auto/none without tools, and required is refused by name", function()
    local r = ask_one("vllm", raw_request { model = "m", tools = {}, tool_choice = "auto",
      messages = { { role = "user", content = "hi" } } })
    assert.equal("success", r.status, r.error_message)
    assert.is_nil(last().json.tool_choice)
    assert.is_nil(last().json.tools)
    r = ask_one("vllm", { tool_choice = "none", messages = { { role = "user", content = "hi" } } })
    assert.equal("success", r.status, r.error_message)
    assert.is_nil(last().json.tool_choice)
    local n = #m.requests
    r = ask_one("vllm", { tool_choice = "required", messages = { { role = "user", content = "hi" } } })
    assert.equal("error", r.status)
    assert.matches("tool_choice required without tools is not supported by provider vllm", r.error_message)
    assert.equal(n, #m.requests)
    -- without the quirk, the server refuses it
    local status, _, body = support.post(m:base_url("vllm") .. "/chat/completions", { model = "m",
      tool_choice = "auto", messages = { { role = "user", content = "hi" } } })
    assert.equal(400, status)
    assert.matches("tool_choice", body)
  end)

  it("max_tokens and max_completion_tokens: the limit under the name the server reads", function()
    ask_one("ollama", raw_request { model = "llama3.1:8b", max_completion_tokens = 5,
      messages = { { role = "user", content = "hi" } } })
    assert.equal(5, last().json.max_tokens)
    assert.is_nil(last().json.max_completion_tokens)
    local a = compat.new("newer", { base_url = "http://127.0.0.1:1/v1", key_env = false,
      quirks = { "max_completion_tokens" } })
    local w = a.build_request({}, { max_tokens = 9, messages = { { role = "user", content = "hi" } } }, {})
    local body = cjson.decode(w.body)
    assert.same({ 9 }, { body.max_completion_tokens, body.max_tokens })
    assert.is_nil(w.headers.authorization) -- keyless
    assert.error_matches(function() compat.new("x", { quirks = { "nope" } }) end, "unknown quirk 'nope'")
  end)

  it("a client's own request without a quirk to apply is sent byte for byte", function()
    local doc = { model = "grok-3-mini", messages = { { role = "user", content = "hi" } }, temperature = 0.5 }
    local req = raw_request(doc)
    local w = compat.preset("xai").build_request({ key = KEY }, req, {})
    assert.equal(req.raw.body, w.body)
    assert.equal("Bearer " .. KEY, w.headers.authorization)
  end)
end)

describe("the presets' documented samples through the generic adapter", function()
  local function feed(a, lines)
    local p = a.stream_parser({}, { events = true })
    local events = {}
    for _, line in ipairs(lines) do
      local data = line:match("^data: (.*)$")
      if data then
        local r = p:event({ data = data })
        for _, ev in ipairs(r and (r.type and { r } or r) or {}) do
          events[#events + 1] = ev
        end
      end
    end
    return events, assert(p:result())
  end

  local function check_answer(expect, r, what)
    local text, thinking, calls = {}, {}, {}
    for _, p in ipairs(r.content) do
      if p.type == "text" then
        text[#text + 1] = p.text
      elseif p.type == "thinking" then
        thinking[#thinking + 1] = p.text
      elseif p.type == "tool_call" then
        calls[#calls + 1] = { p.id, p.name }
      end
    end
    if expect.text then
      assert.equal(expect.text, table.concat(text), what)
    end
    if expect.thinking then
      assert.equal(expect.thinking, table.concat(thinking), what)
    end
    if expect.tool_calls then
      assert.same(expect.tool_calls, calls, what)
    end
    assert.equal(expect.finish_reason, r.finish_reason, what)
    for _, k in ipairs { "input_tokens", "output_tokens", "reasoning_tokens", "cached_input_tokens" } do
      if expect[k] then
        assert.equal(expect[k], r.usage[k], what .. " " .. k)
      end
    end
    if expect.provider_finish_reason then
      assert.equal(expect.provider_finish_reason, r.provider_finish_reason, what)
    end
  end

  for _, name in ipairs(PRESETS) do
    it(name, function()
      local f = assert(cjson.decode(support.slurp("tests/fixtures/presets/" .. name .. ".json")))
      local a = assert(loader.load("provider", name))
      local cfg = { key = KEY, base_url = "http://127.0.0.1:9/x", model = f.request.model }
      -- the client's own request: what the quirks change, and nothing else
      local w = a.build_request(cfg, raw_request(f.request), { stream = f.request.stream == true })
      local sent = assert(cjson.decode(w.body))
      for k, v in pairs(f.sent) do
        assert.same(v, sent[k], name .. ": " .. k)
      end
      for _, k in ipairs(f.absent) do
        assert.is_nil(sent[k], name .. ": " .. k .. " sent")
      end
      if f.ids then
        for _, msg in ipairs(sent.messages) do
          for _, tc in ipairs(msg.tool_calls or {}) do
            assert.matches("^%w+$", tc.id)
            assert.equal(9, #tc.id)
          end
        end
      end
      -- the same request translated: the quirks hold there too
      local req = assert(wire.decode_request(f.request))
      w = a.build_request(cfg, req, { stream = f.request.stream == true })
      sent = assert(cjson.decode(w.body))
      for _, k in ipairs(f.absent) do
        assert.is_nil(sent[k], name .. ": " .. k .. " sent (translated)")
      end
      -- the documented answer and stream
      local r = assert(a.parse_response(cfg, 200, {}, cjson.encode(f.response)))
      check_answer(f.answer, r, name)
      local events, result = feed(a, f.stream)
      check_answer(f.streamed, result, name .. " (stream)")
      if f.streamed.arguments then
        local args = {}
        for _, ev in ipairs(events) do
          if ev.type == "tool_arguments" then
            args[#args + 1] = ev.text
          end
        end
        assert.equal(f.streamed.arguments, table.concat(args))
      end
    end)
  end
end)

describe("azure", function()
  local function azure_env(extra)
    return env_for("azure", nil, extra)
  end

  it("posts to the deployment with api-key and api-version; the model field as the client sent it", function()
    local cfg = cfg_of("azure", { AZURE_OPENAI_API_KEY = KEY, AZURE_OPENAI_ENDPOINT = "https://res.example.com/" })
    local w = compat.preset("azure").build_request(cfg, { messages = { { role = "user", content = "hi" } } }, {})
    assert.equal("https://res.example.com/openai/deployments/gpt-4o-mini/chat/completions?api-version="
      .. compat.default_azure_api_version, w.url)
    assert.equal(KEY, w.headers["api-key"])
    assert.is_nil(w.headers.authorization)
    cfg = cfg_of("azure", { AZURE_OPENAI_API_KEY = KEY, AZURE_OPENAI_ENDPOINT = "https://res.example.com",
      OPENAI_API_VERSION = "2025-01-01-preview", AZURE_OPENAI_DEPLOYMENT = "my dep" })
    w = compat.preset("azure").build_request(cfg, { messages = { { role = "user", content = "hi" } } }, {})
    assert.equal("https://res.example.com/openai/deployments/my%20dep/chat/completions?api-version=2025-01-01-preview",
      w.url)
    -- the configuration's deployments and api_version win
    local a = assert(compat.entry_adapter("az", { preset = "azure", deployments = { ["gpt-4o"] = "prod-4o" },
      api_version = "2024-06-01" }, "providers.az"))
    local raw = raw_request { model = "gpt-4o", messages = { { role = "user", content = "hi" } } }
    w = a.build_request({ key = KEY, base_url = "https://r.example", api_version = "2025-01-01-preview" }, raw, {})
    assert.equal("https://r.example/openai/deployments/prod-4o/chat/completions?api-version=2024-06-01", w.url)
    assert.equal(raw.raw.body, w.body)
    assert.same({ "gpt-4o" }, a.models)
  end)

  it("answers from the mock's deployment, plain and streamed", function()
    local r = ask_one("azure", { messages = { { role = "user", content = "hello azure" } } }, {},
      azure_env { AZURE_OPENAI_DEPLOYMENT = "dep-1", OPENAI_API_VERSION = "2024-10-21" })
    assert.equal("success", r.status, r.error_message)
    assert.matches("hello azure", r.response_text)
    assert.equal("dep-1", last().deployment)
    assert.equal("2024-10-21", last().api_version)
    local text = {}
    r = ask_one("azure", { messages = { { role = "user", content = "stream please" } } },
      { stream = true, on_token = function(t) text[#text + 1] = t end }, azure_env())
    assert.equal("success", r.status, r.error_message)
    assert.equal(r.response_text, table.concat(text))
    assert.is_true(r.metadata.usage.output_tokens > 0)
  end)

  it("reads Azure's errors: key, api-version, deployment, throttling, content filter", function()
    local cases = {
      { azure_env { AZURE_OPENAI_API_KEY = "" }, "auth", "AZURE_OPENAI_API_KEY is not set" },
      { azure_env { OPENAI_API_VERSION = "1999-01-01" }, "bad_request", "HTTP 400: API version not supported" },
      { azure_env { AZURE_OPENAI_DEPLOYMENT = "missing-4o" }, "bad_request",
        "HTTP 404: The API deployment for this resource does not exist" },
      { azure_env { AZURE_OPENAI_DEPLOYMENT = "throttled-4o" }, "rate_limited", "HTTP 429: Requests to the" },
    }
    for i, c in ipairs(cases) do
      breaker.reset()
      local r = orchestrate({ messages = { { role = "user", content = "hi" } }, policy = { max_attempts = 1 } },
        "single", { "azure" }, { env = c[1] })
      assert.equal("error", r.status, i)
      if i > 1 then
        assert.equal(c[2], r.metadata.error_kind, i .. " " .. tostring(r.error_message))
      end
      assert.truthy(r.error_message:find(c[3], 1, true), r.error_message)
    end
    local w = compat.preset("azure")
    local _, kind, msg, extra = w.parse_response({}, 429, { ["retry-after-ms"] = "1500" }, '{"error":{"code":"429",'
      .. '"message":"slow down"}}')
    assert.same({ "rate_limited", "HTTP 429: slow down", 1.5 }, { kind, msg, extra.retry_after })
    _, kind, msg = w.parse_response({}, 401, {}, '{"statusCode":401,"message":"Access denied"}')
    assert.same({ "auth", "HTTP 401: Access denied" }, { kind, msg })
    breaker.reset() -- the 429 asked for a pause
    local r = ask_one("azure", { messages = { { role = "user", content = "say [filtered] now" } } }, {}, azure_env())
    assert.equal("bad_request", r.metadata.error_kind)
    assert.matches("content management policy", r.error_message)
    -- the mock: no key header, a Bearer, no api-version
    local base = m:base_url("azure") .. "/openai/deployments/d/chat/completions"
    local body = { messages = { { role = "user", content = "hi" } } }
    assert.equal(401, (support.post(base .. "?api-version=2024-10-21", body, { authorization = "Bearer " .. KEY })))
    assert.equal(404, (support.post(base, body, { ["api-key"] = KEY })))
    assert.equal(200, (support.post(base .. "?api-version=2024-10-21", body, { ["api-key"] = KEY })))
  end)
end)

describe("providers added without touching aiorch's files", function()
  it("an OpenAI-compatible provider by configuration alone", function()
    local c = assert(gconfig.check({ providers = { mylocal_cfg = { api = "openai",
      base_url = m:base_url("ollama"), api_key_env = false, models = { "llama3.1:8b" },
      quirks = { "no_stream_options" } } } }, function() return nil end))
    local a = assert(loader.load("provider", "mylocal_cfg"))
    assert.is_true(a.quirks.no_stream_options)
    local rt = assert(gconfig.route(c, "llama3.1:8b"))
    assert.same({ "mylocal_cfg" }, rt.providers)
    local r = assert(orchestrate({ messages = { { role = "user", content = "hi local" } } }, "single", rt.providers,
      { env = rt.env, stream = true, on_token = function() end }))
    assert.equal("success", r.status, r.error_message)
    assert.is_nil(last().json.stream_options)
    assert.equal("llama3.1:8b", last().json.model)
    assert.is_nil(last().headers.authorization)
  end)

  it("refuses a bad entry by the field's name", function()
    local function err(p)
      local _, e = gconfig.check({ providers = { bad_cfg = p } }, function() return nil end)
      return e
    end
    assert.matches("providers.bad_cfg.quirks%[1%]: unknown quirk 'nope'", err { api = "openai",
      base_url = "http://127.0.0.1:1", quirks = { "nope" } })
    assert.matches("providers.bad_cfg.preset: unknown preset 'nope'", err { preset = "nope" })
    assert.matches("providers.bad_cfg.api: must be \"openai\"", err { api = "cohere", base_url = "http://x" })
    assert.matches("providers.bad_cfg.base_url: required", err { api = "openai" })
    assert.matches("providers.bad_cfg.deployments: only for preset azure", err { api = "openai",
      base_url = "http://x", deployments = {} })
    assert.matches("providers.bad_cfg.api_key_env: must be an environment variable name", err { api = "openai",
      base_url = "http://x", api_key_env = "sk-literal key" })
  end)

  it("a provider's adapter file from DIR/providers on --path", function()
    local dir = support.tmpdir()
    os.execute("mkdir -p '" .. dir .. "/providers'")
    support.write(dir .. "/providers/myshim.lua", [[
-- A provider of its own: an OpenAI-compatible server under another header.
local compat = require "aiorch.compat"
local a = compat.new("myshim", { base_url = "http://127.0.0.1:1/v1", key_env = "MYSHIM_TOKEN",
  default_model = "shim-1", quirks = { "max_tokens" } })
return a
]])
    local out = dir .. "/out"
    local pid = assert(process.spawn({ process.exe(), "ask", "--path", dir, "--providers", "myshim", "--max-tokens",
      "7", "hello shim" }, { env = { MYSHIM_TOKEN = KEY, MYSHIM_BASE_URL = m:base_url("openai"), AIORCH_PATH = false },
      stdout = out, stderr = dir .. "/err" }))
    assert.equal(0, process.wait(pid, support.stretch(20000)), support.slurp(dir .. "/err"))
    assert.matches("hello shim", support.slurp(out))
    assert.equal("shim-1", last().json.model)
    assert.equal(7, last().json.max_tokens)
    assert.equal("Bearer " .. KEY, last().headers.authorization)
  end)
end)

-- `aiorch ask` as a subprocess, the mock served by this process meanwhile.
local function ask(e, ...)
  local full = { AZURE_OPENAI_API_KEY = false, AZURE_OPENAI_ENDPOINT = false, OPENAI_API_VERSION = false,
    AZURE_OPENAI_DEPLOYMENT = false, AIORCH_PROVIDERS = false, AIORCH_PATH = false, AIORCH_POLICY = false }
  return support.run_aiorch({ "ask", ... }, support.merge(full, e))
end

describe("aiorch ask", function()
  it("--providers azure, plain and streamed", function()
    local code, out, err = ask(env_for("azure", { chunks = 3 }), "--providers", "azure", "What is Lua?")
    assert.equal(0, code, err)
    assert.matches("You asked: What is Lua%?\n$", out)
    code, out, err = ask(env_for("azure", { chunks = 3 }), "--stream", "--providers", "azure", "What is Lua?")
    assert.equal(0, code, err)
    assert.matches("You asked: What is Lua%?\n$", out)
    assert.is_true(last().json.stream)
    assert.equal(KEY, last().headers["api-key"])
    code, out, err = ask({}, "--providers", "azure", "hi")
    assert.equal(1, code)
    assert.matches("azure: unavailable %(AZURE_OPENAI_API_KEY is not set%)", err)
    assert.falsy((out .. err):find(KEY, 1, true))
  end)

  it("--config: a provider declared there, streamed", function()
    local dir = support.tmpdir()
    support.write(dir .. "/gw.lua", ([[return { providers = { mylocal = { api = "openai", base_url = %q,
      api_key_env = false, models = { "llama3.1:8b" }, quirks = { "no_stream_options" } } } }]]):format(
      m:base_url("ollama", { chunks = 4 })))
    local code, out, err = ask({}, "--config", dir .. "/gw.lua", "--stream", "hello local")
    assert.equal(0, code, err)
    assert.matches("You asked: hello local\n$", out)
    assert.equal("ollama", last().flavour)
    assert.equal("llama3.1:8b", last().json.model)
    assert.is_nil(last().json.stream_options)
  end)
end)

describe("aiorch serve with OpenAI-compatible providers", function()
  local gw

  setup(function()
    gw = support.serve(([[return { providers = {
      azure = { deployments = { ["gpt-4o"] = "prod-4o" }, api_version = "2024-10-21", base_url = %q },
      groq = { base_url = %q },
      mistral = { base_url = %q },
    } }
]]):format(m:base_url("azure", { chunks = 3 }), m:base_url("groq", { chunks = 3 }),
      m:base_url("mistral", { chunks = 3 })), { AZURE_OPENAI_API_KEY = KEY, GROQ_API_KEY = KEY,
      MISTRAL_API_KEY = KEY, OPENAI_API_KEY = false, ANTHROPIC_API_KEY = false, OPENAI_API_VERSION = false })
  end)

  teardown(function()
    gw.stop()
  end)

  local sse_of = support.sse_events

  local function openai_stream(model)
    local status, h, body = support.post(gw.base .. "/v1/chat/completions", { model = model, stream = true,
      stream_options = { include_usage = true },
      messages = { { role = "user", content = "Weather in Oslo? get_weather" } }, tools = OPENAI_TOOLS })
    assert.equal(200, status, body)
    local args, id, finish = {}, nil, nil
    for _, ev in ipairs(sse_of(body)) do
      local c = type(ev.data) == "table" and ev.data.choices[1]
      if c then
        for _, tc in ipairs(c.delta.tool_calls or {}) do
          id = id or tc.id
          args[#args + 1] = tc["function"].arguments
        end
        finish = c.finish_reason ~= cjson.null and c.finish_reason or finish
      end
    end
    return h, id, table.concat(args), finish
  end

  it("serves an OpenAI client from each, tool-call deltas included", function()
    for _, c in ipairs { { "gpt-4o", "azure" }, { "llama-3.3-70b-versatile", "groq" },
      { "mistral-small-latest", "mistral" } } do
      local h, id, args, finish = openai_stream(c[1])
      assert.equal(c[2], h["x-aiorch-provider"])
      assert.equal("string", type(cjson.decode(args).city), c[2])
      assert.equal("tool_calls", finish)
      assert.truthy(id)
      local sent = last()
      assert.equal(c[1], sent.json.model)
      if c[2] == "azure" then
        assert.equal("prod-4o", sent.deployment)
        assert.equal(KEY, sent.headers["api-key"])
      else
        assert.is_nil(sent.json.stream_options) -- asked by the client, refused by the server: not sent
      end
      if c[2] == "mistral" then
        assert.equal(9, #id)
      end
    end
  end)

  it("serves an Anthropic client from each, tool_use deltas included", function()
    for _, c in ipairs { { "gpt-4o", "azure" }, { "llama-3.3-70b-versatile", "groq" },
      { "mistral-small-latest", "mistral" } } do
      local status, h, body = support.post(gw.base .. "/v1/messages", { model = c[1], stream = true, max_tokens = 99,
        tools = { { name = "get_weather", input_schema = WEATHER } },
        messages = { { role = "user", content = "Weather in Oslo? get_weather" } } },
        { ["anthropic-version"] = "2023-06-01" })
      assert.equal(200, status, body)
      assert.equal(c[2], h["x-aiorch-provider"])
      local blocks, json_parts, stop = {}, {}, nil
      for _, ev in ipairs(sse_of(body)) do
        if ev.event == "content_block_start" then
          blocks[#blocks + 1] = ev.data.content_block.type
        elseif ev.event == "content_block_delta" and ev.data.delta.type == "input_json_delta" then
          json_parts[#json_parts + 1] = ev.data.delta.partial_json
        elseif ev.event == "message_delta" then
          stop = ev.data.delta.stop_reason
        end
      end
      assert.same({ "tool_use" }, blocks, c[2])
      assert.equal("string", type(cjson.decode(table.concat(json_parts)).city))
      assert.equal("tool_use", stop)
      assert.equal(99, last().json.max_tokens)
    end
  end)
end)
