-- CTest's nginx_sdk: the official OpenAI and Anthropic npm clients
-- (tests/sdk/gateway.test.mjs) against nginx with the aiorch module, the
-- mock providers behind it, served by this process meanwhile.
--   build/aiorch run tests/nginx_sdk.lua
-- Exits 77 (skipped) when node, tests/sdk/node_modules, nginx or the module
-- is missing.
local aiorch = require "aiorch"
local mock_mod = require "aiorch.mock"
local support = require "tests.support"
local nginx = require "tests.nginx_host"

local fmt = string.format

local function skip(why)
  print("SKIP nginx_sdk: " .. why)
  return 77
end

if not os.execute("command -v node >/dev/null 2>&1") then
  return skip("node is not installed (run .ci/setup)")
end
if not os.execute("test -d " .. nginx.ROOT .. "/tests/sdk/node_modules") then
  return skip("tests/sdk/node_modules is missing (run: npm ci --prefix tests/sdk)")
end
if nginx.missing() then
  return skip(nginx.missing())
end

local m = assert(mock_mod.start { host = "127.0.0.1", port = 0 })
local CLIENT_KEY = "sk-aiorch-sdk-test-client-key" -- gateway.test.mjs's

-- Both providers behind the same mock directives, as startGateway does.
local function config(directives, extra)
  return fmt([[return {
  providers = {
    openai = { api_key_env = "OPENAI_API_KEY", base_url = %q },
    anthropic = { api_key_env = "ANTHROPIC_API_KEY", base_url = %q },
  },
  %s
}
]], m:base_url("openai", directives), m:base_url("anthropic", directives), extra or "")
end

-- One nginx per gateway, as gateway.test.mjs starts one `aiorch serve`
-- each: a worker's runtime keeps each provider's breaker and cooldown, which
-- the rate-limited gateway must not share with the others.
local env = { OPENAI_API_KEY = "sk-test-openai", ANTHROPIC_API_KEY = "sk-ant-test-anthropic",
              AIORCH_SDK_CLIENT_KEY = CLIENT_KEY }
local gateways = {
  gw = config(), faulty = config { fault = "500" }, limited = config { fault = "429", retry_after = 1 },
  cut = config { fault = "cut", chunks = 6 }, locked = config(nil, 'client_keys_env = { "AIORCH_SDK_CLIENT_KEY" },'),
}
local started, urls = {}, {}
for name, text in pairs(gateways) do
  local n = nginx.start { env = env, servers = { { name = name, config = text } } }
  started[#started + 1] = n
  urls[#urls + 1] = fmt('"%s": "%s"', name, n.base(name))
end
local pid = assert(aiorch.process.spawn({ "node", "--test", nginx.ROOT .. "/tests/sdk/gateway.test.mjs" },
  { env = { AIORCH_SDK_GATEWAYS = "{" .. table.concat(urls, ", ") .. "}" } }))
local code = aiorch.process.wait(pid)
local stopped = 0
for _, n in ipairs(started) do
  stopped = math.max(stopped, n.stop() or 1)
end
m:close()
support.cleanup()
if code == 0 and stopped ~= 0 then
  print("an nginx did not stop cleanly: " .. tostring(stopped))
  return 1
end
return code or 1
