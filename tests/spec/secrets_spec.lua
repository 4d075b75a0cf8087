-- aiorch.secrets: what scrub removes (a table of cases), the registry that
-- aiorch.config feeds, and a real `aiorch serve` in front of providers that
-- echo the key they received in six forms: no form reaches a client, the
-- logs or /metrics.
local aiorch = require "aiorch"
local cjson = require "cjson.safe"
local secrets = require "aiorch.secrets"
local config = require "aiorch.config"
local mock_mod = require "aiorch.mock"
local support = require "tests.support"

local R = secrets.REDACTED
local KEY = "sk-proj-AbCdEf0123456789/xyzW" -- 28 bytes, a / for the escapes
local KEY2 = "sk-ant-api03-ZZZZ-9876543210"
local SHORT = "abc123" -- under 8 bytes: removed whole only

local function pct(s, upper)
  return (s:gsub(".", function(c) return (upper and "%%%02X" or "%%%02x"):format(c:byte()) end))
end

-- name, text, expected (the secrets: KEY, KEY2, SHORT)
local CASES = {
  { "nothing to remove", "Rate limit reached. Try again in 2.5s...", "Rate limit reached. Try again in 2.5s..." },
  { "whole", "Incorrect API key provided: " .. KEY .. ".", "Incorrect API key provided: " .. R .. "." },
  { "twice, and two secrets", KEY .. " and " .. KEY2 .. " and " .. KEY, R .. " and " .. R .. " and " .. R },
  { "inside a longer word", "x" .. KEY .. "y", "x" .. R .. "y" },
  { "percent-encoded, lower-case hex", "key=" .. pct(KEY) .. "&x=1", "key=" .. R .. "&x=1" },
  { "percent-encoded, upper-case hex", "key=" .. pct(KEY, true), "key=" .. R },
  { "percent-encoded only where needed", "key=" .. KEY:gsub("/", "%%2F"), "key=" .. R },
  { "JSON-escaped \\/", '{"key":"' .. KEY:gsub("/", "\\/") .. '"}', '{"key":"' .. R .. '"}' },
  { "JSON-escaped \\u", '{"key":"' .. KEY:gsub("[^%w]", function(c) return ("\\u%04x"):format(c:byte()) end) .. '"}',
    '{"key":"' .. R .. '"}' },
  { "masked with dots", "key sk-...xyzW is wrong", "key " .. R .. " is wrong" },
  { "masked like OpenAI", "provided: sk-pro*******************xyzW.", "provided: " .. R .. "." },
  { "masked with an ellipsis", "key sk-proj-…xyzW", "key " .. R },
  { "masked: only the suffix", "ends in ****xyzW", "ends in " .. R },
  { "masked: the well-known prefix only stays", "keys look like sk-...", "keys look like sk-..." },
  { "cut in the middle", "key: " .. KEY:sub(1, 15) .. " (truncated)", "key: " .. R .. " (truncated)" },
  { "a middle piece", "got " .. KEY:sub(6, 20) .. "!", "got " .. R .. "!" },
  { "an 8-byte piece", "x " .. KEY:sub(10, 17) .. " y", "x " .. R .. " y" },
  { "a 7-byte piece stays", "x " .. KEY:sub(10, 16) .. " y", "x " .. KEY:sub(10, 16) .. " y" },
  { "split: each half", "first " .. KEY:sub(1, 14), "first " .. R },
  { "split: the other half", KEY:sub(15), R },
  { "a short secret whole", "token abc123 here", "token " .. R .. " here" },
  { "a short secret in pieces stays", "abc12 and 23", "abc12 and 23" },
  { "adjacent forms merge", KEY .. pct(KEY), R },
  { "sentences with dots stay", "Hello. This... is fine. Really.", "Hello. This... is fine. Really." },
  { "other percent signs stay", "100% sure, 50%off", "100% sure, 50%off" },
}

describe("secrets.scrub", function()
  local list = { KEY, KEY2, SHORT, "abc" } -- "abc": too short to be a secret
  for _, c in ipairs(CASES) do
    it(c[1], function()
      assert.equal(c[3], secrets.scrub(c[2], list))
    end)
  end

  it("takes any value", function()
    assert.equal("42", secrets.scrub(42, list))
  end)

  it("removes what is registered, each once; aiorch.config registers the keys it reads", function()
    local unique = "sk-registry-test-" .. tostring(aiorch.now()):gsub("%D", "")
    assert.equal("x " .. unique, secrets.scrub("x " .. unique))
    local n = secrets.count()
    config.provider("openai", require "providers.openai", { OPENAI_API_KEY = unique })
    config.provider("openai", require "providers.openai", { OPENAI_API_KEY = unique })
    assert.equal(n + 1, secrets.count())
    assert.equal("x " .. R, secrets.scrub("x " .. unique))
    secrets.add("sk-registry-other-" .. unique)
    assert.equal(R .. " " .. R, secrets.scrub(unique .. " sk-registry-other-" .. unique))
  end)

  it("keeps at most secrets.max, the newest", function()
    local max = secrets.max
    secrets.max = 2
    local added = {}
    for i = 1, 4 do
      added[i] = ("Q%dZ"):format(i):rep(5)
      secrets.add(added[i])
    end
    assert.equal(2, secrets.count())
    assert.equal(added[2], secrets.scrub(added[2])) -- the oldest went
    assert.equal(R, secrets.scrub(added[3]))
    assert.equal(R, secrets.scrub(added[4]))
    secrets.max = max
  end)
end)

describe("aiorch serve in front of providers that echo their key", function()
  local KEYS = { openai = "sk-echo-openai-secret-6161", anthropic = "sk-ant-echo-secret-7272" }
  local SLOWDOWN = tonumber(os.getenv("AIORCH_TEST_SLOWDOWN") or "") or 1
  local m

  setup(function()
    m = assert(mock_mod.start { host = "127.0.0.1", port = 0 })
  end)

  teardown(function()
    m:close()
    support.cleanup()
  end)

  it("no form of a key reaches a client, the logs (with bodies) or /metrics", function()
    local gw = support.serve(([[
return {
  log_bodies = true,
  providers = {
    openai = { base_url = %q, api_key_env = "ECHO_OPENAI_KEY" },
    anthropic = { base_url = %q, api_key_env = "ECHO_ANTHROPIC_KEY" },
  },
}
]]):format(m:base_url("openai", { fault = "echo_key" }), m:base_url("anthropic", { fault = "echo_key" })),
      { AIORCH_LOG = "debug", ECHO_OPENAI_KEY = KEYS.openai, ECHO_ANTHROPIC_KEY = KEYS.anthropic,
        OPENAI_API_KEY = false, ANTHROPIC_API_KEY = false })
    local base = gw.base

    local seen = {}
    local function post(path, body, headers)
      headers["content-type"] = "application/json"
      local status, h, rb = aiorch.http.request { method = "POST", url = base .. path, headers = headers,
        body = assert(cjson.encode(body)), timeout_ms = 10000 * SLOWDOWN }
      assert(status, tostring(h) .. " " .. tostring(rb))
      seen[#seen + 1] = rb
      for k, v in pairs(h) do
        seen[#seen + 1] = k .. ": " .. v
      end
      return status, rb
    end
    local messages = { { role = "user", content = "Which key did I send?" } }
    for _, stream in ipairs { false, true } do
      local s1 = post("/v1/chat/completions", { model = "gpt-4o-mini", messages = messages, stream = stream }, {})
      local s2 = post("/v1/messages", { model = "claude-3-haiku-20240307", max_tokens = 50, messages = messages,
        stream = stream }, { ["anthropic-version"] = "2023-06-01" })
      local s3 = post("/v1/orchestrate", { user_question = "Which key?", stream = stream or nil,
        strategy = "parallel" }, {})
      if not stream then
        assert.is_true(s1 >= 400 and s2 >= 400 and s3 >= 400, "the echoes failed the requests")
      end
    end
    local _, _, metrics_text = aiorch.http.request { url = base .. "/metrics" }
    seen[#seen + 1] = metrics_text
    assert.equal(0, gw.stop())
    seen[#seen + 1] = support.slurp(gw.dir .. "/stdout")
    seen[#seen + 1] = support.slurp(gw.err)
    local all = table.concat(seen, "\n")
    -- the echoes really came back, scrubbed, to the client and into the logs
    assert.matches("Incorrect API key provided: " .. R:gsub("%p", "%%%0"), all)
    assert.matches("aiorch: debug: openai: error", all, 1, true)
    assert.matches("dir=response", all, 1, true) -- the bodies were logged
    assert.matches("aiorch_provider_errors_total", all, 1, true)
    for name, key in pairs(KEYS) do
      for form, text in pairs(mock_mod.echoed_forms(key)) do
        assert.falsy(all:find(text, 1, true), name .. "'s key leaked, " .. form .. ": " .. text)
      end
      for i = 1, #key - 7 do
        assert.falsy(all:find(key:sub(i, i + 7), 1, true), name .. "'s key leaked in part: " .. key:sub(i, i + 7))
      end
    end
  end)
end)
