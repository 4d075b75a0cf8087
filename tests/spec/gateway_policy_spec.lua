-- The gateway's resilience: policies from its configuration and per request
-- (X-Aiorch-Policy, the native body), 503 while every provider cools down,
-- deadlines and the commit point on streams, what a client may not choose,
-- and a real `aiorch serve` whose every output is searched for the keys.
local aiorch = require "aiorch"
local cjson = require "cjson.safe"
local gconfig = require "aiorch.gateway.config"
local policy = require "aiorch.policy"
local support = require "tests.support"

local KEYS = { openai = "sk-gwpol-openai-8181", anthropic = "sk-ant-gwpol-9292" }
local CLIENT_KEY = "gwpol-client-secret-1717"
local QUESTION = "Does the gateway hold up?"
-- AIORCH_TEST_SLOWDOWN (.ci/valgrind): waits, and margins that only guard
-- against a slow runtime, stretch by it.
local SLOWDOWN = tonumber(os.getenv("AIORCH_TEST_SLOWDOWN") or "") or 1
local function stretch(ms)
  return math.ceil(ms * SLOWDOWN) -- whole ms: policies take integers
end

local m

-- Clients may set every field they may ever set, over its whole range.
local ALL_CLIENT_POLICY = {}
for k, f in pairs(policy.fields) do
  if not policy.PROVIDER_ONLY[k] then
    ALL_CLIENT_POLICY[k] = f[3] == "bool" or { f[4], f[5] }
  end
end

local function start_gw(raw, o, a)
  raw = raw or {}
  if raw.client_policy == nil then
    raw.client_policy = ALL_CLIENT_POLICY
  elseif raw.client_policy == false then
    raw.client_policy = nil
  end
  local env = {
    OPENAI_API_KEY = KEYS.openai, ANTHROPIC_API_KEY = KEYS.anthropic,
    OPENAI_BASE_URL = m:base_url("openai", o), ANTHROPIC_BASE_URL = m:base_url("anthropic", a),
  }
  return (support.start_gateway(raw, env))
end

local function post(base, path, body, headers)
  return support.post(base .. path, body, headers)
end

local function chat(extra)
  local body = { model = "gpt-4o-mini", messages = { { role = "user", content = QUESTION } } }
  return support.merge(body, extra)
end

local function count(api)
  local n = 0
  for _, r in ipairs(m.requests) do
    n = n + (r.api == api and 1 or 0)
  end
  return n
end

-- The text of an OpenAI stream, and whether it ended with [DONE] or an error event.
local function stream_text(body)
  local text, done, err = {}, false, nil
  for data in body:gmatch("data: ([^\n]*)\n\n") do
    if data == "[DONE]" then
      done = true
    else
      local doc = cjson.decode(data)
      if doc and doc.error then
        err = doc.error
      elseif doc and doc.choices and doc.choices[1] then
        local c = doc.choices[1].delta.content
        text[#text + 1] = type(c) == "string" and c or nil
      end
    end
  end
  return table.concat(text), done, err
end

support.use_mock(function(mock) m = mock end)
teardown(support.close_gateways)

describe("policies in the gateway", function()
  it("a provider's policy from the config retries it", function()
    local base = start_gw({ providers = { openai = { policy = { max_attempts = 3, backoff_ms = 5 } } },
      default_strategy = "single" }, { fault = "500", fail_first = 2, key = "cfg-retry" })
    local s, h, _, doc = post(base, "/v1/orchestrate", { user_question = QUESTION, providers = { "openai" } })
    assert.equal(200, s)
    assert.equal("openai", h["x-aiorch-provider"])
    assert.equal(3, #doc.metadata.attempts)
    assert.same({ "error", "error", "success" },
      { doc.metadata.attempts[1].status, doc.metadata.attempts[2].status, doc.metadata.attempts[3].status })
    assert.equal(3, count("openai"))
  end)

  it("a config with a bad policy is refused with the field named", function()
    local cfg, err = gconfig.check({ providers = { openai = { policy = { max_attempts = "many" } } } },
      function() return nil end)
    assert.is_nil(cfg)
    assert.matches("providers.openai.policy.max_attempts: must be an integer", err, 1, true)
    cfg, err = gconfig.check({ policy = { retries = 2 } }, function() return nil end)
    assert.is_nil(cfg)
    assert.matches("policy: unknown field 'retries'", err, 1, true)
  end)

  it("X-Aiorch-Policy sets this request's retries", function()
    local base = start_gw({ default_strategy = "single" }, { fault = "500" })
    local s, h, _, doc = post(base, "/v1/chat/completions", chat(), {
      ["x-aiorch-providers"] = "openai", ["x-aiorch-policy"] = "max_attempts=2,backoff_ms=5" })
    assert.equal(502, s)
    assert.equal("upstream_error", doc.error.type)
    assert.equal(2, count("openai"))
    assert.is_string(h["x-aiorch-attempts"])
  end)

  it("the native body's policy works the same", function()
    local base = start_gw({}, { fault = "500" })
    local s, _, _, doc = post(base, "/v1/orchestrate", { user_question = QUESTION, strategy = "single",
      providers = "openai", policy = { max_attempts = 2, backoff_ms = 5 } })
    assert.equal(502, s)
    assert.equal(2, #doc.metadata.attempts)
  end)

  it("refuses a bad or forbidden X-Aiorch-Policy with 400 in the API's shape", function()
    local base = start_gw()
    local s, _, _, doc = post(base, "/v1/chat/completions", chat(), { ["x-aiorch-policy"] = "max_attempts" })
    assert.equal(400, s)
    assert.equal("invalid_request_error", doc.error.type)
    assert.matches("X-Aiorch-Policy: 'max_attempts' is not name=value", doc.error.message, 1, true)
    s, _, _, doc = post(base, "/v1/messages", { model = "claude-3-haiku-20240307", max_tokens = 10,
      messages = { { role = "user", content = QUESTION } } }, { ["x-aiorch-policy"] = "max_response_bytes=99" })
    assert.equal(400, s)
    assert.equal("error", doc.type)
    assert.matches("set per provider only", doc.error.message, 1, true)
    assert.equal(0, count("openai") + count("anthropic"))
  end)

  it("answers 503 while every chosen provider cools down, without calling them", function()
    local base = start_gw({ providers = { openai = { policy = { breaker_failures = 1, cooldown_ms = 10000 } } } },
      { fault = "500" })
    local s = post(base, "/v1/chat/completions", chat(), { ["x-aiorch-providers"] = "openai",
      ["x-aiorch-strategy"] = "single" })
    assert.equal(502, s)
    local s2, _, _, doc = post(base, "/v1/chat/completions", chat(), { ["x-aiorch-providers"] = "openai",
      ["x-aiorch-strategy"] = "single" })
    assert.equal(503, s2)
    assert.matches("cooling down", doc.error.message, 1, true)
    assert.equal(1, count("openai"))
    -- /metrics says so
    local ms, _, text = aiorch.http.request { url = base .. "/metrics" }
    assert.equal(200, ms)
    assert.matches('aiorch_provider_healthy{provider="openai"} 0', text, 1, true)
    assert.matches('aiorch_provider_skipped_total{provider="openai"} 1', text, 1, true)
  end)
end)

describe("streams through the gateway", function()
  it("a first-token deadline moves a stream to the next provider before anything is sent", function()
    local base = start_gw({}, { first_token_ms = stretch(400) }, nil)
    local t0 = aiorch.now()
    local s, h, body = post(base, "/v1/chat/completions", chat { stream = true }, {
      ["x-aiorch-strategy"] = "fallback", ["x-aiorch-providers"] = "openai,anthropic",
      ["x-aiorch-policy"] = "first_token_timeout_ms=" .. stretch(100) })
    assert.equal(200, s)
    assert.equal("anthropic", h["x-aiorch-provider"])
    local text, done = stream_text(body)
    assert.matches("^Hello from the mock anthropic provider", text)
    assert.is_true(done)
    assert.is_true(aiorch.now() - t0 < stretch(350))
  end)

  it("a stall after tokens ends the stream with an error event (gap deadline), never [DONE]", function()
    local base = start_gw({}, { stall_after = 2, chunks = 6 })
    local s, _, body = post(base, "/v1/chat/completions", chat { stream = true }, {
      ["x-aiorch-strategy"] = "fallback", ["x-aiorch-providers"] = "openai,anthropic",
      ["x-aiorch-policy"] = "gap_timeout_ms=" .. stretch(100) })
    assert.equal(200, s)
    local text, done, err = stream_text(body)
    assert.is_false(done)
    assert.is_table(err)
    assert.matches("gap deadline", err.message, 1, true)
    assert.is_true(#text > 0)
    assert.equal(0, count("anthropic")) -- past the commit point: nobody else may continue silently
  end)

  it("continue_on_cut lets the next provider finish a cut stream", function()
    local base = start_gw({}, { fault = "cut", chunks = 6 })
    local s, h, body = post(base, "/v1/chat/completions", chat { stream = true }, {
      ["x-aiorch-strategy"] = "fallback", ["x-aiorch-providers"] = "openai,anthropic",
      ["x-aiorch-policy"] = "continue_on_cut=true" })
    assert.equal(200, s)
    assert.equal("openai", h["x-aiorch-provider"]) -- the headers went out with the first token
    local text, done, err = stream_text(body)
    assert.is_nil(err)
    assert.is_true(done)
    assert.matches("^Hello from the mock openai.*Hello from the mock anthropic provider", text)
    assert.equal(1, count("anthropic"))
  end)
end)

describe("what a client may not choose", function()
  it("an upstream base URL: the native body's base_url is not a field, a provider name is not a path", function()
    local base = start_gw()
    local s, _, _, doc = post(base, "/v1/orchestrate", { user_question = QUESTION, providers = { "openai" },
      base_url = "http://127.0.0.1:1/", strategy = "single" })
    assert.equal(400, s) -- refused by name, not quietly ignored
    assert.matches("^base_url: not a field of an AIRequest", doc.error.message)
    s, _, _, doc = post(base, "/v1/orchestrate", { user_question = QUESTION, providers = { "openai" },
      strategy = "single" })
    assert.equal(200, s)
    assert.equal("success", doc.status)
    assert.equal(1, count("openai")) -- it went where the configuration says
    s, _, _, doc = post(base, "/v1/chat/completions", chat(), { ["x-aiorch-providers"] = "../../tmp/evil" })
    assert.equal(400, s)
    assert.is_string(doc.error.message)
  end)
end)

describe("client headers", function()
  it("never reach an upstream: only the adapter's own headers are sent", function()
    local base = start_gw()
    local s = post(base, "/v1/chat/completions", chat(), { ["x-forward-me"] = "client-value",
      ["openai-organization"] = "org-client", cookie = "session=abc", ["x-aiorch-strategy"] = "single",
      ["x-aiorch-providers"] = "openai" })
    assert.equal(200, s)
    local up = m.requests[#m.requests]
    assert.equal("openai", up.api)
    for name, value in pairs(up.headers) do
      assert.is_nil(tostring(value):find("client", 1, true), "client value in upstream header " .. name)
      assert.is_nil(tostring(value):find("session=abc", 1, true), "cookie in upstream header " .. name)
    end
    assert.is_nil(up.headers["x-forward-me"])
    assert.is_nil(up.headers["cookie"])
    assert.equal("Bearer " .. KEYS.openai, up.headers["authorization"]) -- the configured key, not the client's
  end)
end)

describe("aiorch serve, every output searched for the keys", function()
  teardown(support.cleanup)

  it("no provider key, client key or Authorization header in logs, errors, attempts or metrics", function()
    local gw = support.serve(([[
return {
  client_keys_env = "GWPOL_CLIENT_KEYS",
  providers = {
    openai = { base_url = %q, api_key_env = "GWPOL_OPENAI_KEY",
               policy = { max_attempts = 2, backoff_ms = 5, breaker_failures = 3, cooldown_ms = 200 } },
    anthropic = { base_url = %q, api_key_env = "GWPOL_ANTHROPIC_KEY" },
  },
}
]]):format(m:base_url("openai", { fault = "500" }), m:base_url("anthropic", { fault = "401" })),
      { AIORCH_LOG = "debug", GWPOL_CLIENT_KEYS = CLIENT_KEY, GWPOL_OPENAI_KEY = KEYS.openai,
        GWPOL_ANTHROPIC_KEY = KEYS.anthropic })
    local base = gw.base
    local seen = {}
    local auth = { authorization = "Bearer " .. CLIENT_KEY }
    for _, path in ipairs { "/v1/chat/completions", "/v1/orchestrate" } do
      for _, stream in ipairs { false, true } do
        local body = path == "/v1/orchestrate" and { user_question = QUESTION, stream = stream or nil }
          or chat { stream = stream }
        local _, h, rb = post(base, path, body, auth)
        seen[#seen + 1] = rb
        for k, v in pairs(h) do
          seen[#seen + 1] = k .. ": " .. v
        end
      end
    end
    -- a wrong client key, and one that is almost right
    seen[#seen + 1] = select(3, post(base, "/v1/chat/completions", chat(), { authorization = "Bearer nope" }))
    seen[#seen + 1] = select(3, post(base, "/v1/chat/completions", chat(),
      { ["x-api-key"] = CLIENT_KEY .. "x" }))
    local _, _, metrics_text = aiorch.http.request { url = base .. "/metrics", headers = auth }
    seen[#seen + 1] = metrics_text
    assert.equal(0, gw.stop())
    seen[#seen + 1] = support.slurp(gw.dir .. "/stdout")
    seen[#seen + 1] = support.slurp(gw.err)
    local all = table.concat(seen, "\n")
    assert.matches("aiorch_provider_retries_total", all, 1, true) -- the outputs are really there
    assert.matches("debug", all, 1, true)
    for _, secret in ipairs { KEYS.openai, KEYS.anthropic, CLIENT_KEY } do
      assert.falsy(all:find(secret, 1, true), "a key leaked: " .. secret)
    end
    assert.falsy(all:lower():find("bearer", 1, true), "an Authorization header leaked")
  end)

  it("a user strategy that raises or runs away fails that request only; the server goes on", function()
    local dir = support.tmpdir()
    assert(os.execute("mkdir -p '" .. dir .. "/strategies'"))
    support.write(dir .. "/strategies/raises.lua", "return function() error('strategy bug') end\n")
    support.write(dir .. "/strategies/spins.lua", "return function() local n = 0 while true do n = n + 1 end end\n")
    local gw = support.serve('return { strategies = { "raises", "spins", "single" } }\n',
      { AIORCH_INSTRUCTION_BUDGET = "2000000", OPENAI_API_KEY = KEYS.openai,
        OPENAI_BASE_URL = m:base_url("openai"), ANTHROPIC_API_KEY = false }, { path = dir })
    local base, err = gw.base, gw.err
    local function ask(strategy, question)
      return post(base, "/v1/orchestrate", { user_question = question or QUESTION, strategy = strategy,
        providers = { "openai" } })
    end
    local s, _, body, doc = ask("raises")
    assert.equal(502, s, body)
    assert.equal("strategy", doc.metadata.error_kind)
    assert.matches("strategy bug", doc.error_message, 1, true)
    -- a runaway is stopped by the instruction budget; pcall cannot keep it
    -- going, so the request's own task ends, and the server answers 500
    s, _, body, doc = ask("spins")
    assert.equal(500, s, body)
    assert.matches("instruction budget exceeded", doc.error.message, 1, true) -- the API's error shape
    assert.matches("instruction budget exceeded", support.slurp(err), 1, true)
    s, _, _, doc = ask("single")
    assert.equal(200, s)
    assert.equal("success", doc.status)
    assert.equal(0, gw.stop())
  end)
end)
