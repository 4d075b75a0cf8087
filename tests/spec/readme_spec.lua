-- The Lua examples of README.md, taken from the file and run as a user
-- would, against the mock providers: they cannot rot. Every ```lua block
-- (and the shell block that runs a plain lua5.4) must be claimed by a
-- runner below, or this spec fails.
local aiorch = require "aiorch"
local cjson = require "cjson.safe"
local mock_mod = require "aiorch.mock"
local support = require "tests.support"

local process = aiorch.process
local concat = table.concat

-- Absolute: the commands run in a directory of their own.
local function absolute(path)
  if path:sub(1, 1) == "/" then
    return path
  end
  local p = assert(io.popen("pwd"))
  local cwd = p:read("l")
  p:close()
  return cwd .. "/" .. path
end

local ROOT = absolute(debug.getinfo(1, "S").source:match("^@(.*)/tests/spec/[^/]+$") or ".")
local BUILD = absolute(os.getenv("AIORCH_BUILD") or (ROOT .. "/build"))
local BIN = BUILD .. "/aiorch"
local SLOWDOWN = tonumber(os.getenv("AIORCH_TEST_SLOWDOWN") or "") or 1

local KEYS = { openai = "sk-readme-openai-3131", anthropic = "sk-ant-readme-4141" }
local CLIENT_KEY = "readme-client-key-5151"

local slurp = support.slurp

local function put(path, text)
  assert(os.execute("mkdir -p '" .. path:match("^(.*)/[^/]*$") .. "'"))
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

-- The fenced blocks of a Markdown text: {lang, text, line}.
local function blocks(md)
  local out, lang, buf, start = {}, nil, nil, nil
  local n = 0
  for line in md:gmatch("([^\n]*)\n") do
    n = n + 1
    if lang then
      if line:match("^```%s*$") then
        out[#out + 1] = { lang = lang, text = concat(buf, "\n") .. "\n", line = start }
        lang = nil
      else
        buf[#buf + 1] = line
      end
    else
      local l = line:match("^```(%w*)%s*$")
      if l then
        lang, buf, start = l, {}, n
      end
    end
  end
  return out
end

local m, dir

-- The environment of every command: the mock providers, nothing else.
local function env(extra)
  local e = {
    OPENAI_API_KEY = KEYS.openai, ANTHROPIC_API_KEY = KEYS.anthropic,
    OPENAI_BASE_URL = m:base_url("openai"), ANTHROPIC_BASE_URL = m:base_url("anthropic"),
  }
  for _, k in ipairs { "AIORCH_PATH", "AIORCH_PROVIDERS", "AIORCH_LOG", "AIORCH_DEBUG", "AIORCH_POLICY",
    "OPENAI_POLICY", "ANTHROPIC_POLICY", "OPENAI_MODEL", "ANTHROPIC_MODEL", "AIORCH_TIMEOUT_MS" } do
    e[k] = false
  end
  return support.merge(e, extra)
end

-- Runs a shell command in dir (build/ meaning this build); yields until it
-- ends. Returns its exit code, stdout, stderr.
local function sh(cmd, extra_env, cwd)
  cmd = cmd:gsub("build/", BUILD .. "/")
  local out, err = dir .. "/.out", dir .. "/.err"
  local pid = assert(process.spawn({ "sh", "-c", "cd '" .. (cwd or dir) .. "' && " .. cmd },
    { env = env(extra_env), stdout = out, stderr = err, death_signal = "KILL" }))
  local code, kind = process.wait(pid, 60000 * SLOWDOWN)
  if code == nil and kind == "timeout" then
    process.kill(pid, "KILL")
    process.wait(pid)
  end
  return code, slurp(out), slurp(err)
end

-- The commands that run a file: build/aiorch lines of the next shell block.
local function commands_after(list, i)
  for k = i + 1, #list do
    if list[k].lang == "sh" then
      local cmds = {}
      for l in list[k].text:gmatch("[^\n]+") do
        if l:match("^build/aiorch ") then
          cmds[#cmds + 1] = l
        end
      end
      return cmds
    end
  end
  return {}
end

-- Runners, by the file an example says it is; each returns a description.
local RUNNERS = {}

-- A user strategy, run by the command that follows it.
RUNNERS["mystrategies/strategies/patient.lua"] = function(_, cmds)
  assert.is_true(#cmds > 0, "no command runs the strategy")
  for _, c in ipairs(cmds) do
    local code, out, err = sh(c)
    assert.equal(0, code, c .. ": " .. err)
    assert.matches("^Hello from the mock openai provider", out, nil, c)
  end
  -- slow: the others are raced after 800 ms, and the first success wins
  local code, out, err = sh(cmds[1], { OPENAI_BASE_URL = m:base_url("openai", { latency_ms = 2000 }) })
  assert.equal(0, code, err)
  assert.matches("^Hello from the mock anthropic provider", out)
end

-- A script: it says its result, and checks it as a user's script should.
RUNNERS["ask.lua"] = function(cmd)
  local code, out, err = sh(cmd)
  assert.equal(0, code, err)
  assert.matches("^%a+\t%d+\tHello from the mock %a+ provider%. You asked: why is the sky blue%?\n$", out)
  code, out, err = sh(cmd, { OPENAI_BASE_URL = m:base_url("openai", { fault = "500" }),
    ANTHROPIC_BASE_URL = m:base_url("anthropic", { fault = "529" }) })
  assert.equal(1, code, err)
  assert.equal("", out)
  assert.matches("^ask%.lua: error: all providers failed: openai: server_error.*anthropic: server_error", err)
  code, out, err = sh((cmd:gsub('"why is the sky blue%?"', '""')))
  assert.equal(2, code, err)
  assert.equal("", out)
  assert.matches("^ask%.lua: invalid: user_question", err)
end

-- Providers declared by configuration: the file loads, and its local
-- provider answers `aiorch ask --config` from the mock's Ollama.
RUNNERS["providers.lua"] = function(_, _, path)
  local text = slurp(path):gsub('"http://127%.0%.0%.1:11434/v1"', ('%q'):format(m:base_url("ollama")))
  put(path, text)
  local code, out, err = sh(("build/aiorch ask --config '%s' --providers mylocal Hi"):format(path),
    { GROQ_API_KEY = "gsk-readme-key", AZURE_OPENAI_API_KEY = "az-readme-key" })
  assert.equal(0, code, err)
  assert.matches("^Hello from the mock openai provider%. You asked: Hi\n$", out)
end

-- Balanced deployments: the file loads, and `aiorch ask --config` is
-- answered by one of openai's deployments (the mock, with its own key).
RUNNERS["balanced.lua"] = function(_, _, path)
  local text = slurp(path):gsub('"https://east%.example/v1"', ('%q'):format(m:base_url("openai")))
    :gsub('"https://west%.example/v1"', ('%q'):format(m:base_url("openai")))
  put(path, text)
  m:reset()
  local keys = { OPENAI_KEY_EAST = "sk-readme-east-6161", OPENAI_KEY_WEST = "sk-readme-west-7171" }
  for _ = 1, 2 do
    local code, out, err = sh(("build/aiorch ask --config '%s' Hi"):format(path), keys)
    assert.equal(0, code, err)
    assert.matches("^Hello from the mock openai provider%. You asked: Hi\n$", out)
  end
  assert.equal(2, #m.requests)
  for _, q in ipairs(m.requests) do
    local auth = q.headers.authorization
    assert.truthy(auth == "Bearer " .. keys.OPENAI_KEY_EAST or auth == "Bearer " .. keys.OPENAI_KEY_WEST, auth)
  end
end

-- The gateway's configuration: a real `aiorch serve` runs with it.
RUNNERS["gateway.lua"] = function(_, _, path)
  local probe = assert(aiorch.server.listen { host = "127.0.0.1", port = 0, handler = function() end })
  local port = probe.port
  probe:close()
  local errf = dir .. "/.serve.err"
  local pid = assert(process.spawn({ BIN, "serve", "--workers", "0", "--config", path,
    "--listen", "127.0.0.1:" .. port }, { env = env { AIORCH_GATEWAY_KEY = CLIENT_KEY }, stderr = errf,
    death_signal = "TERM" }))
  local base = "http://127.0.0.1:" .. port
  local deadline = aiorch.now() + 5000 * SLOWDOWN
  repeat
    aiorch.sleep(10)
  until aiorch.http.request { url = base .. "/healthz", timeout_ms = 500 } or aiorch.now() > deadline
  local function chat(headers)
    headers["content-type"] = "application/json"
    -- Only the mock answers: the example's anthropic is the real one.
    headers["x-aiorch-providers"] = "openai"
    local status, _, body = aiorch.http.request { method = "POST", url = base .. "/v1/chat/completions",
      headers = headers, timeout_ms = 5000 * SLOWDOWN,
      body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hi"}]}' }
    return status, cjson.decode(body or "")
  end
  local s1 = chat {}
  local s2, doc = chat { authorization = "Bearer " .. CLIENT_KEY }
  assert(process.kill(pid, "TERM"))
  assert.equal(0, process.wait(pid, 15000 * SLOWDOWN))
  assert.equal(401, s1, slurp(errf))
  assert.equal(200, s2, slurp(errf))
  assert.matches("^Hello from the mock openai provider", doc.choices[1].message.content)
end

-- The response cache's configuration (without its Redis: redis_spec and
-- cache_spec have one): a real `aiorch serve` runs with it; the app's
-- question misses then hits, the batch key's bypasses, and a temperature
-- that is not 0 is not cached.
RUNNERS["cache.lua"] = function(_, _, path)
  local text, n = slurp(path):gsub('\n%s*redis = { url = "redis://[^\n]*', "")
  assert.equal(1, n)
  put(path, text)
  local probe = assert(aiorch.server.listen { host = "127.0.0.1", port = 0, handler = function() end })
  local port = probe.port
  probe:close()
  local errf = dir .. "/.serve.err"
  local pid = assert(process.spawn({ BIN, "serve", "--workers", "0", "--config", path,
    "--listen", "127.0.0.1:" .. port }, { env = env { APP_KEY = "readme-app-key", BATCH_KEY = "readme-batch-key" },
    stderr = errf, death_signal = "TERM" }))
  local base = "http://127.0.0.1:" .. port
  local deadline = aiorch.now() + 5000 * SLOWDOWN
  repeat
    aiorch.sleep(10)
  until aiorch.http.request { url = base .. "/healthz", timeout_ms = 500 } or aiorch.now() > deadline
  local function chat(key, temperature)
    local status, h = aiorch.http.request { method = "POST", url = base .. "/v1/chat/completions",
      headers = { ["content-type"] = "application/json", authorization = "Bearer " .. key,
        ["x-aiorch-providers"] = "openai" }, timeout_ms = 5000 * SLOWDOWN,
      body = '{"model":"gpt-4o-mini","temperature":' .. temperature
        .. ',"messages":[{"role":"user","content":"What is a monad?"}]}' }
    return status, h and h["x-aiorch-cache"]
  end
  local results = { { chat("readme-app-key", 0) }, { chat("readme-app-key", 0) }, { chat("readme-batch-key", 0) },
    { chat("readme-app-key", 0.5) } }
  assert(process.kill(pid, "TERM"))
  assert.equal(0, process.wait(pid, 15000 * SLOWDOWN))
  assert.same({ { 200, "miss" }, { 200, "hit" }, { 200, "bypass" }, { 200, "bypass" } }, results, slurp(errf))
end

-- The runtime as a C module of a plain lua5.4 (an ASan build needs its
-- runtime loaded first).
local function run_plain_lua(text)
  local p = io.popen("ldd '" .. BUILD .. "/lua/aiorch.so' 2>/dev/null")
  local asan = p and p:read("a"):match("=> (%S*libasan[^%s]*)")
  if p then
    p:close()
  end
  if text:find("LUA_CPATH", 1, true) then -- the build's module
    local code, out, err = sh(text, { LD_PRELOAD = asan or false }, ROOT)
    assert.equal(0, code, err)
    assert.equal("done\n", out)
    return
  end
  -- The installed module ("Use it from Lua"): this build's stands for it.
  local code, out, err = sh(text, { LD_PRELOAD = asan or false, LUA_CPATH = BUILD .. "/lua/?.so;;" }, dir)
  assert.equal(0, code, err)
  assert.equal("success\tHello from the mock openai provider. You asked: What is a monad?\n", out)
end

describe("README.md's Lua examples", function()
  setup(function()
    m = assert(mock_mod.start { host = "127.0.0.1", port = 0 })
  end)

  teardown(function()
    m:close()
  end)

  before_each(function()
    dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p '" .. dir .. "'"))
  end)

  after_each(function()
    os.execute("rm -rf '" .. dir .. "'")
  end)

  local list = blocks(slurp(ROOT .. "/README.md"))
  local seen = 0
  for i, b in ipairs(list) do
    local first = b.text:match("^([^\n]*)")
    if b.lang == "lua" then
      seen = seen + 1
      -- "-- FILE" or "-- FILE: COMMAND"
      local file, cmd = first:match("^%-%- ([%w_/%.%-]+%.lua):? ?(.*)$")
      it(("line %d: %s"):format(b.line, file or first), function()
        local runner = file and RUNNERS[file]
        assert(runner, "no runner for the Lua example at README.md line " .. b.line)
        local path = dir .. "/" .. file
        put(path, b.text)
        runner(cmd ~= "" and cmd or nil, commands_after(list, i), path)
      end)
    elseif b.lang == "sh" and b.text:find("lua5.4 -e", 1, true) then
      seen = seen + 1
      it(("line %d: the module in a plain lua5.4"):format(b.line), function()
        run_plain_lua(b.text)
      end)
    end
  end

  it("found the examples", function()
    assert.is_true(seen >= 4, "only " .. seen .. " examples found")
  end)
end)
