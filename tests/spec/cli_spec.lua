-- The `aiorch` command as a subprocess: exit codes, one-line errors on
-- stderr, and keys that never show up in any output.
local cjson = require "cjson.safe"
local support = require "tests.support"

local ROOT = debug.getinfo(1, "S").source:match("^@(.*)/tests/spec/[^/]+$") or "."
local BUILD = os.getenv("AIORCH_BUILD") or (ROOT .. "/build")
local BIN = BUILD .. "/aiorch"

local KEYS = { openai = "sk-cli-secret-openai-7777", anthropic = "sk-ant-cli-secret-8888" }
-- Variables of the caller's environment that would change what aiorch does.
local CLEAN = "env -u OPENAI_API_KEY -u ANTHROPIC_API_KEY -u OPENAI_BASE_URL -u ANTHROPIC_BASE_URL"
  .. " -u OPENAI_MODEL -u ANTHROPIC_MODEL -u AIORCH_PATH -u AIORCH_PROVIDERS -u AIORCH_LOG -u AIORCH_TIMEOUT_MS"
  .. " -u AIORCH_DEBUG -u AIORCH_INSTRUCTION_BUDGET -u AIORCH_POLICY"

local q = support.sh_quote

local read_file = support.slurp

-- sh(env, args...) -> exit code, stdout, stderr
local function sh(env, ...)
  local parts = { CLEAN }
  for k, v in pairs(env or {}) do
    parts[#parts + 1] = k .. "=" .. q(v)
  end
  parts[#parts + 1] = q(BIN)
  for _, a in ipairs({ ... }) do
    parts[#parts + 1] = q(a)
  end
  local errf = os.tmpname()
  local p = assert(io.popen(table.concat(parts, " ") .. " 2>" .. errf .. " </dev/null; echo \"__EXIT:$?\""))
  local out = p:read("a")
  p:close()
  local code = tonumber(out:match("__EXIT:(%d+)%s*$"))
  out = out:gsub("__EXIT:%d+%s*$", "")
  local err = read_file(errf)
  os.remove(errf)
  return code, out, err
end

local function lines(s)
  local out = {}
  for l in s:gmatch("[^\n]+") do
    out[#out + 1] = l
  end
  return out
end

local function no_keys(...)
  for _, text in ipairs({ ... }) do
    for _, key in pairs(KEYS) do
      assert.falsy(text:find(key, 1, true), "a key leaked into the output")
    end
  end
end

-- One clear line on stderr, starting with "aiorch: ".
local function one_error_line(err, pattern)
  local ls = lines(err)
  assert.equal(1, #ls, "stderr: " .. err)
  assert.matches("^aiorch: ", ls[1])
  if pattern then
    assert.matches(pattern, ls[1])
  end
end

describe("aiorch command without network", function()
  it("prints help and exits 0", function()
    for _, a in ipairs({ "--help", "help", "-h" }) do
      local code, out = sh(nil, a)
      assert.equal(0, code)
      assert.matches("usage: aiorch", out)
      for _, word in ipairs({ "ask", "run", "demo", "%-%-strategy", "%-%-providers", "%-%-json", "%-%-stream" }) do
        assert.matches(word, out)
      end
    end
    for _, cmd in ipairs { "ask", "run", "demo", "serve" } do
      for _, flag in ipairs { "--help", "-h" } do
        local code, out, err = sh(nil, cmd, flag)
        assert.equal(0, code, cmd .. " " .. flag .. ": " .. err)
        assert.matches("^usage: aiorch", out)
        assert.equal("", err)
      end
    end
  end)

  it("help names every command's options, every built-in strategy and every variable of the README", function()
    local _, help = sh(nil, "help")
    local cli = require "aiorch.cli"
    for cmd, options in pairs(cli.options) do
      for name in pairs(options) do
        assert.truthy(help:find(name, 1, true), cmd .. " option " .. name .. " is not in the help")
      end
    end
    local p = assert(io.popen("ls " .. q(ROOT .. "/strategies")))
    local n = 0
    for f in p:lines() do
      local name = f:match("^(.+)%.lua$")
      if name then
        n = n + 1
        assert.truthy(help:find("%f[%w]" .. name .. "%f[^%w]"), "strategy " .. name .. " is not in the help")
      end
    end
    p:close()
    assert.is_true(n >= 5)
    local readme = read_file(ROOT .. "/README.md")
    local vars = readme:match("\n| variable | meaning |\n(.-)\n\n")
    assert.truthy(vars, "the README's table of variables")
    for var in vars:gmatch("`([A-Z][A-Z_]+)`") do
      assert.truthy(help:find(var, 1, true), var .. " is not in the help")
    end
  end)

  it("prints its version", function()
    local code, out = sh(nil, "--version")
    assert.equal(0, code)
    assert.matches("^aiorch %d+%.%d+%.%d+\n$", out)
  end)

  it("exits 2 with usage errors", function()
    local cases = {
      { { "bogus" }, "unknown command 'bogus'" },
      { { "ask" }, "missing QUESTION" },
      { { "ask", "--bogus", "q" }, "unknown option '%-%-bogus'" },
      { { "ask", "--strategy" }, "needs a value" },
      { { "ask", "--temperature", "hot", "q" }, "temperature" },
      { { "ask", "--temperature", "1.5", "--providers", "anthropic", "q" },
        "temperature 1.5 is outside anthropic's range 0..1" },
      { { "ask", "--temperature=3", "--providers", "openai", "q" }, "temperature 3.* openai" },
      { { "ask", "--max-tokens", "0", "q" }, "max_tokens" },
      { { "ask", "--max-tokens", "2.5", "q" }, "max_tokens" },
      { { "ask", "--strategy", "nope", "q" }, "unknown strategy 'nope' %(valid: .*fallback" },
      { { "ask", "--providers", "gemini-x", "q" }, "unknown provider 'gemini%-x' %(valid: .*openai" },
      { { "ask", "   " }, "user_question" },
      { { "run" }, "missing SCRIPT" },
      { { "run", "--bogus", "x.lua" }, "run: unknown option '%-%-bogus'" },
      { { "demo", "bogus" }, "demo: unknown argument 'bogus'" },
      { { "serve", "bogus" }, "serve: unknown argument 'bogus'" },
      -- an empty list is no list: never silently the default one
      { { "ask", "--providers", "", "q" }, "%-%-providers needs at least one provider name" },
      { { "ask", "--providers=, ,", "q" }, "%-%-providers needs at least one provider name" },
      -- a --path that is not there is named
      { { "ask", "--path", "/nonexistent/aiorch-dir", "q" }, "%-%-path '/nonexistent/aiorch%-dir': no such directory" },
      { { "ask", "--path", ROOT .. "/README.md", "q" }, "%-%-path '.*/README%.md': not a directory" },
      { { "serve", "--path", "/nonexistent/aiorch-dir" }, "serve: %-%-path '/nonexistent/aiorch%-dir'" },
    }
    -- Keys set, but pointing at a closed port: a usage error must come first.
    local env = { OPENAI_API_KEY = KEYS.openai, ANTHROPIC_API_KEY = KEYS.anthropic,
      OPENAI_BASE_URL = "http://127.0.0.1:1/v1", ANTHROPIC_BASE_URL = "http://127.0.0.1:1" }
    for _, c in ipairs(cases) do
      local code, out, err = sh(env, table.unpack(c[1]))
      assert.equal(2, code, table.concat(c[1], " ") .. " -> " .. err)
      assert.equal("", out)
      one_error_line(err, c[2])
      no_keys(out, err)
    end
    local code, _, err = sh(nil)
    assert.equal(2, code)
    assert.matches("usage: aiorch", err)
  end)

  it("exits 1 with one line when no provider has a key", function()
    local code, out, err = sh(nil, "ask", "--providers", "openai", "hello")
    assert.equal(1, code)
    assert.equal("", out)
    one_error_line(err, "OPENAI_API_KEY is not set")
  end)

  it("exits 1 naming each failure when nothing answers", function()
    local env = { OPENAI_API_KEY = KEYS.openai, ANTHROPIC_API_KEY = KEYS.anthropic,
      OPENAI_BASE_URL = "http://127.0.0.1:1/v1", ANTHROPIC_BASE_URL = "http://127.0.0.1:1", AIORCH_LOG = "debug" }
    local code, out, err = sh(env, "ask", "hello")
    assert.equal(1, code)
    assert.equal("", out)
    assert.matches("aiorch: all providers failed: openai: connect .*; anthropic: connect", err)
    no_keys(out, err)
  end)

  describe("run", function()
    local dir

    before_each(function()
      dir = os.tmpname()
      os.remove(dir)
      assert(os.execute("mkdir -p " .. q(dir)))
    end)

    after_each(function()
      os.execute("rm -rf " .. q(dir))
    end)

    it("runs a script in the runtime with its arguments; its integer return is the exit code", function()
      local path = dir .. "/s.lua"
      local f = assert(io.open(path, "w"))
      f:write([[
        local aiorch = require "aiorch"
        local a, b = ...
        aiorch.sleep(5)
        print(arg[0]:match("s%.lua$"), a, b, #arg)
        return tonumber(a)
      ]])
      f:close()
      local code, out = sh(nil, "run", path, "7", "x y")
      assert.equal(7, code)
      assert.equal("s.lua\t7\tx y\t2\n", out)
      code = sh(nil, "run", path, "0")
      assert.equal(0, code)
    end)

    it("exits 1 with one line when the script fails or cannot be loaded", function()
      local path = dir .. "/bad.lua"
      local f = assert(io.open(path, "w"))
      f:write("error('broken script')\n")
      f:close()
      local code, out, err = sh(nil, "run", path)
      assert.equal(1, code)
      assert.equal("", out)
      one_error_line(err, "broken script")
      code, out, err = sh(nil, "run", dir .. "/missing.lua")
      assert.equal(1, code)
      assert.equal("", out)
      one_error_line(err, "missing%.lua")
    end)
  end)

  describe("errors in user code", function()
    local dir
    -- Keys set, but pointing at a closed port: nothing here reaches a provider.
    local env = { OPENAI_API_KEY = KEYS.openai, ANTHROPIC_API_KEY = KEYS.anthropic,
      OPENAI_BASE_URL = "http://127.0.0.1:1/v1", ANTHROPIC_BASE_URL = "http://127.0.0.1:1" }

    local function put(name, text)
      local f = assert(io.open(dir .. "/" .. name, "w"))
      f:write(text)
      f:close()
      return dir .. "/" .. name
    end

    local function with(extra)
      return support.merge(env, extra)
    end

    -- The one line, and no traceback; then with --debug (and AIORCH_DEBUG=1)
    -- the same line, with the traceback.
    local function check(pattern, code, debug_args, extra, ...)
      local c, out, err = sh(with(extra), ...)
      assert.equal(code, c, err)
      one_error_line(err, pattern)
      assert.falsy(err:find("traceback", 1, true))
      no_keys(out, err)
      local args = { ... }
      table.insert(args, debug_args, "--debug")
      for _, run in ipairs { { with(extra), args }, { with(extra), { ... } } } do
        if run[2] ~= args then
          run[1].AIORCH_DEBUG = "1"
        end
        c, _, err = sh(run[1], table.unpack(run[2]))
        assert.equal(code, c, err)
        assert.matches("stack traceback:", err)
        local found = false
        for _, l in ipairs(lines(err)) do
          found = found or l:find(pattern) ~= nil
        end
        assert.is_true(found, err)
        no_keys(err)
      end
      return out
    end

    before_each(function()
      dir = os.tmpname()
      os.remove(dir)
      assert(os.execute("mkdir -p " .. q(dir .. "/strategies")))
    end)

    after_each(function()
      os.execute("rm -rf " .. q(dir))
    end)

    it("a strategy that raises: one line naming its file and line, null provider in the JSON", function()
      put("strategies/raiser.lua", "return function(request, providers, ctx)\n  local x\n  return x.field\nend\n")
      local line = "^aiorch: strategy 'raiser' failed: " .. dir:gsub("%p", "%%%0")
        .. "/strategies/raiser%.lua:3: attempt to index a nil value"
      local out = check(line, 1, 2, nil, "ask", "--path", dir, "--strategy", "raiser", "q")
      assert.equal("", out)
      out = check(line, 1, 2, nil, "ask", "--json", "--path", dir, "--strategy", "raiser", "q")
      local r = assert(cjson.decode(out))
      assert.equal(cjson.null, r.ia_provider_name)
      assert.equal("strategy", r.metadata.error_kind)
      assert.matches("raiser%.lua:3:", r.error_message)
    end)

    it("a strategy that spins is stopped by the instruction budget, and named", function()
      put("strategies/spinner.lua", "return function()\n  local n = 0\n  while true do n = n + 1 end\nend\n")
      local budget = { AIORCH_INSTRUCTION_BUDGET = "1000000" }
      local line = "^aiorch: strategy 'spinner' failed: " .. dir:gsub("%p", "%%%0")
        .. "/strategies/spinner%.lua:3: instruction budget exceeded"
      local c, out, err = sh(with(budget), "ask", "--json", "--path", dir, "--strategy", "spinner", "q")
      assert.equal(1, c, err)
      one_error_line(err, line)
      local r = assert(cjson.decode(out))
      assert.equal(cjson.null, r.ia_provider_name)
      assert.equal("strategy", r.metadata.error_kind)
      c, out, err = sh(with(budget), "ask", "--path", dir, "--strategy", "spinner", "q")
      assert.equal(1, c, err)
      assert.equal("", out)
      one_error_line(err, line)
    end)

    it("a script that spins is stopped and named", function()
      local path = put("spin.lua", "local n = 0\nwhile true do n = n + 1 end\n")
      local c, _, err = sh({ AIORCH_INSTRUCTION_BUDGET = "1000000" }, "run", path)
      assert.equal(1, c)
      one_error_line(err, "spin%.lua:2: instruction budget exceeded")
    end)

    it("a spawned task that fails and nobody awaits: one line naming its file and line", function()
      local path = put("spawned.lua", [[
local aiorch = require "aiorch"
aiorch.spawn(function()
  error("inner failure")
end)
aiorch.sleep(5)
]])
      check("^aiorch: task failed and nobody awaited it: .*spawned%.lua:3: inner failure$", 0, 2, nil, "run", path)
    end)

    it("a script that raises, also from inside a library function: one line naming the script's line", function()
      local path = put("raises.lua", "local function f() error('boom here') end\nf()\n")
      check("^aiorch: .*raises%.lua:1: boom here$", 1, 2, nil, "run", path)
      -- raised inside the library, with the library's position: the script's line comes first
      path = put("misuse.lua", "local response = require 'aiorch.response'\n"
        .. "response.attempt(42)\n")
      check("^aiorch: .*misuse%.lua:2: .*/scripts/aiorch/response%.lua:%d+: attempt to", 1, 2, nil,
        "run", path)
    end)

    it("a syntax error in a script or a strategy: one line naming the file and line", function()
      local path = put("syntax.lua", "local x = = 1\n")
      local c, out, err = sh(nil, "run", path)
      assert.equal(1, c)
      assert.equal("", out)
      one_error_line(err, "syntax%.lua:1: unexpected symbol")
      put("strategies/broken.lua", "return function(\n")
      c, out, err = sh(env, "ask", "--path", dir, "--strategy", "broken", "q")
      assert.equal(1, c, err) -- a broken file is no usage error
      assert.equal("", out)
      one_error_line(err, "strategies/broken%.lua:2: ")
      assert.falsy(err:find("try 'aiorch --help'", 1, true))
    end)
  end)

  it("runs the demo with no keys and no network #timing", function()
    local code, out, err = sh(nil, "demo")
    assert.equal(0, code, out .. err)
    for _, s in ipairs({ "single", "parallel", "fallback", "fastest" }) do
      assert.matches("\n" .. s .. " ", out)
    end
    assert.matches("openai:rate_limited%(429", out)
    -- the cost column: each row's, priced from the table
    assert.matches("WALL +COST +ATTEMPTS", out)
    assert.matches("\nsingle +openai +success +%d+ ms +%$0%.%d%d%d%d%d%d%d ", out)
    assert.matches("every strategy behaved as expected", out)
    assert.falsy(out:find("demo-openai-key", 1, true))
    assert.falsy(out:find("demo-anthropic-key", 1, true))
  end)
end)

describe("aiorch ask against the mock providers", function()
  local mock_proc, mock_pid, base

  setup(function()
    mock_proc = assert(io.popen("echo $$; exec " .. q(BIN) .. " run " .. q(ROOT .. "/tests/mock_server.lua")))
    mock_pid = assert(tonumber(mock_proc:read("l")))
    local port = assert(mock_proc:read("l")):match("^PORT (%d+)$")
    assert(port, "the mock printed no port")
    base = "http://127.0.0.1:" .. port
  end)

  teardown(function()
    if mock_pid then
      os.execute("kill " .. mock_pid)
    end
    if mock_proc then
      mock_proc:close()
    end
  end)

  local function env(o, a, extra)
    local e = {
      OPENAI_API_KEY = KEYS.openai, ANTHROPIC_API_KEY = KEYS.anthropic,
      OPENAI_BASE_URL = base .. (o and "/_mock/" .. o or "") .. "/v1",
      ANTHROPIC_BASE_URL = base .. (a and "/_mock/" .. a or ""),
      AIORCH_LOG = "debug", -- so that a key in any log line would be caught
    }
    return support.merge(e, extra)
  end

  it("prints the answer text and exits 0", function()
    local code, out, err = sh(env(), "ask", "--strategy", "single", "--providers", "openai", "What", "is", "Lua?")
    assert.equal(0, code, err)
    assert.equal("Hello from the mock openai provider. You asked: What is Lua?\n", out)
    no_keys(out, err)
  end)

  it("prints one StandardAIResponse with --json", function()
    local code, out, err = sh(env("fault=429,retry_after=4"), "ask", "--json", "--context", "ctx", "--system", "sys",
      "--temperature", "0.3", "--max-tokens", "50", "hello")
    assert.equal(0, code, err)
    local r = assert(cjson.decode(out))
    assert.equal("anthropic", r.ia_provider_name)
    assert.equal("success", r.status)
    assert.equal(cjson.null, r.error_message)
    assert.is_number(r.latency_ms)
    assert.equal("claude-3-haiku-20240307", r.metadata.model)
    assert.equal(2, #r.metadata.attempts)
    assert.equal("rate_limited", r.metadata.attempts[1].kind)
    assert.equal(429, r.metadata.attempts[1].http_status)
    assert.is_number(r.metadata.cost_usd)
    no_keys(out, err)
  end)

  it("prints a JSON array for parallel and exits 0 when one answered", function()
    local code, out, err = sh(env(nil, "fault=500"), "ask", "--json", "--strategy", "parallel", "hello")
    assert.equal(0, code, err)
    local list = assert(cjson.decode(out))
    assert.equal(2, #list)
    assert.equal("success", list[1].status)
    assert.equal("error", list[2].status)
    assert.equal("server_error", list[2].metadata.error_kind)
    no_keys(out, err)
  end)

  it("prints each answer for parallel in text mode", function()
    local code, out = sh(env(), "ask", "--strategy", "parallel", "hi")
    assert.equal(0, code)
    assert.matches("== openai %(%d+ ms%) ==\nHello from the mock openai provider", out)
    assert.matches("== anthropic %(%d+ ms%) ==\nHello from the mock anthropic provider", out)
  end)

  it("exits 1 with one line on stderr when the provider fails", function()
    local code, out, err = sh(env("fault=401"), "ask", "--strategy", "single", "--providers", "openai", "hello")
    assert.equal(1, code)
    assert.equal("", out)
    local ls = {}
    for _, l in ipairs(lines(err)) do
      if not l:find("^aiorch: debug:") and not l:find("^aiorch: info:") then
        ls[#ls + 1] = l
      end
    end
    assert.equal(1, #ls, err)
    assert.matches("^aiorch: openai: auth %(HTTP 401: Incorrect API key provided", ls[1])
    no_keys(out, err)
  end)

  it("exits 1 naming each failure when all fail, also with --json", function()
    local code, out, err = sh(env("fault=500", "fault=529", { AIORCH_LOG = "warn" }), "ask", "--json", "hello")
    assert.equal(1, code)
    local r = assert(cjson.decode(out))
    assert.equal("error", r.status)
    assert.matches("openai: server_error", r.error_message)
    assert.matches("anthropic: server_error", r.error_message)
    one_error_line(err, "all providers failed")
    no_keys(out, err)
  end)

  it("removes every form of a key a provider echoes, and carries the provider's error type and code", function()
    local forms = {}
    for _, key in pairs(KEYS) do
      for _, text in pairs(require("aiorch.mock").echoed_forms(key)) do
        forms[#forms + 1] = text
      end
      for i = 1, #key - 7 do
        forms[#forms + 1] = key:sub(i, i + 7)
      end
    end
    local function clean(...)
      for _, text in ipairs { ... } do
        for _, form in ipairs(forms) do
          assert.falsy(text:find(form, 1, true), "a form of a key leaked: " .. form)
        end
      end
    end
    local e = env("fault=echo_key", "fault=echo_key")
    for _, args in ipairs { { "ask", "--json", "q" }, { "ask", "--json", "--stream", "q" }, { "ask", "q" },
      { "ask", "--json", "--strategy", "parallel", "q" } } do
      local code, out, err = sh(e, table.unpack(args))
      assert.equal(1, code, err)
      assert.matches("Incorrect API key provided: %[redacted%]", out .. err) -- the echo came back, scrubbed
      clean(out, err)
    end
    for api, pe in pairs { openai = { type = "invalid_request_error", code = "[redacted]" },
      anthropic = { type = "[redacted]" } } do
      local code, out, err = sh(e, "ask", "--json", "--strategy", "single", "--providers", api, "q")
      assert.equal(1, code, err)
      local r = assert(cjson.decode(out))
      assert.equal("auth", r.metadata.error_kind)
      assert.same(pe, r.metadata.provider_error)
      clean(out, err)
    end
  end)

  it("streams the answer with --stream", function()
    local code, out, err = sh(env(nil, "chunks=5,chunk_delay_ms=5"), "ask", "--stream", "--providers", "anthropic",
      "Stream", "me")
    assert.equal(0, code, err)
    assert.equal("Hello from the mock anthropic provider. You asked: Stream me\n", out)
    no_keys(out, err)
  end)

  it("ends with an error when a stream is cut after its first token (never a silent switch)", function()
    local code, out, err = sh(env("fault=cut,chunks=6", nil, { AIORCH_LOG = "warn" }), "ask", "--stream", "hi")
    assert.equal(1, code, err)
    assert.matches("^Hello from", out)
    assert.not_matches("anthropic", out)
    one_error_line(err, "openai: stream_cut")
  end)

  it("lets the next provider continue a cut stream with --policy continue_on_cut=true", function()
    local code, out, err = sh(env("fault=cut,chunks=6", nil, { AIORCH_LOG = "warn" }), "ask", "--stream",
      "--policy", "continue_on_cut=true", "hi")
    assert.equal(0, code, err)
    assert.matches("^Hello from.*Hello from the mock anthropic provider. You asked: hi\n$", out)
    one_error_line(err, "openai was cut off; anthropic continued it")
  end)

  it("finds a user strategy via AIORCH_PATH and via --path, with no rebuild", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. q(dir .. "/strategies")))
    local f = assert(io.open(dir .. "/strategies/last_first.lua", "w"))
    f:write("return function(_, providers, ctx) return ctx.call(providers[#providers]) end\n")
    f:close()
    local code, out, err = sh(env(nil, nil, { AIORCH_PATH = "/nonexistent:" .. dir }), "ask", "--strategy",
      "last_first", "hi")
    assert.equal(0, code, err)
    assert.matches("mock anthropic provider", out)
    code, out, err = sh(env(), "ask", "--path", dir, "--strategy", "last_first", "hi")
    assert.equal(0, code, err)
    assert.matches("mock anthropic provider", out)
    code, out, err = sh(env(), "ask", "--strategy", "last_first", "hi")
    assert.equal(2, code)
    assert.equal("", out)
    one_error_line(err, "unknown strategy 'last_first'")
    os.execute("rm -rf " .. q(dir))
  end)
end)
