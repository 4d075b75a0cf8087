-- Hostile clients against real `aiorch serve` and `aiorch run` processes,
-- scaled down from bench/hostile.lua: running out of descriptors, the
-- descriptors limit fitted to max_connections, bodies sent without a
-- client key, and more slow bodies than max_buffered holds.
local aiorch = require "aiorch"

local process = aiorch.process
local fmt = string.format

local EXE = process.exe()
-- Longer under valgrind (tests/busted.lua).
local SLOWDOWN = (tonumber(os.getenv("AIORCH_TEST_SLOWDOWN") or "") or 1)
local MiB = 1024 * 1024

-- Under AddressSanitizer (its library is mapped) the RSS says nothing
-- about ours: shadow memory and the quarantine dwarf it.
local function under_asan()
  local f = io.open("/proc/self/maps")
  local maps = f and f:read("a") or ""
  if f then
    f:close()
  end
  return maps:find("libasan", 1, true) ~= nil
end
local MEASURE_RSS = not under_asan() and SLOWDOWN == 1

local function wait_for(cond, ms)
  local deadline = aiorch.now() + (ms or 5000) * SLOWDOWN
  repeat
    local v = cond()
    if v then
      return v
    end
    aiorch.sleep(10)
  until aiorch.now() > deadline
  return cond()
end

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then
    return nil
  end
  local s = f:read("a")
  f:close()
  return s
end

local function tmpname()
  local p = os.tmpname()
  os.remove(p)
  return p
end

local function write(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
  return path
end

local function sh_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local started = {}

-- Runs argv under `ulimit -n nofile` (soft and hard) when given.
local function start(argv, opts, nofile)
  if nofile then
    local words = {}
    for i, a in ipairs(argv) do
      words[i] = sh_quote(a)
    end
    argv = { "sh", "-c", fmt("ulimit -n %d && exec %s", nofile, table.concat(words, " ")) }
  end
  local pid = assert(process.spawn(argv, opts))
  started[#started + 1] = pid
  return pid
end

local function stop(pid)
  if process.kill(pid, "SIGKILL") then
    process.wait(pid, 5000)
  end
end

-- A field of /proc/PID/status, in KiB.
local function status_kib(pid, field)
  local s = slurp("/proc/" .. pid .. "/status") or ""
  return tonumber(s:match(field .. ":%s*(%d+)")) or 0
end

-- A free port (bound and released).
local function free_port()
  local s = assert(aiorch.server.listen { host = "127.0.0.1", port = 0, handler = function() end })
  local port = s.port
  s:close()
  return port
end

-- Starts `aiorch serve --workers 0` with the configuration text cfg and
-- env (name -> value); returns pid, port and the stderr file.
local function serve(cfg, env, nofile)
  local port = free_port()
  local errfile = tmpname()
  local cfgfile = write(tmpname() .. ".lua", cfg)
  local pid = start({ EXE, "serve", "--workers", "0", "--listen", "127.0.0.1:" .. port, "--config", cfgfile },
    { stderr = errfile, env = env }, nofile)
  assert(wait_for(function() return (slurp(errfile) or ""):find("listening on", 1, true) end),
    "the gateway did not start: " .. tostring(slurp(errfile)))
  os.remove(cfgfile)
  return pid, port, errfile
end

-- The clients (python3): tests/hostile_client.py, shared with the benchmark.
local ROOT = debug.getinfo(1, "S").source:match("^@(.*)/tests/spec/[^/]+$") or "."
local client_script = ROOT .. "/tests/hostile_client.py"

-- Runs the client to its end; returns its output lines.
local function client(args, ms)
  local out = tmpname()
  local argv = { "python3", client_script }
  for _, a in ipairs(args) do
    argv[#argv + 1] = tostring(a)
  end
  local pid = start(argv, { stdout = out })
  assert.equal(0, process.wait(pid, (ms or 30000) * SLOWDOWN))
  local lines = {}
  for line in (slurp(out) or ""):gmatch("[^\n]+") do
    lines[#lines + 1] = line
  end
  os.remove(out)
  return lines
end

local function count(lines)
  local n = {}
  for _, l in ipairs(lines) do
    n[l] = (n[l] or 0) + 1
  end
  return n
end

local ENV = { OPENAI_API_KEY = false, ANTHROPIC_API_KEY = false, AIORCH_PATH = false, AIORCH_LOG = false,
  HOSTILE_KEY = "hostile-client-key-8080" }

describe("hostile clients", function()
  teardown(function()
    for _, pid in ipairs(started) do
      stop(pid)
    end
  end)

  -- #timing: the client's waits are fixed, and valgrind needs descriptors of its own.
  it("out of descriptors: pauses accepting, logs a little, serves the open connections, resumes #timing", function()
    local pid, port, errfile = serve("return {}", ENV, 64)
    local lines = client({ "hold", port, 200, 2 })
    local err = slurp(errfile) or ""
    stop(pid)
    os.remove(errfile)
    assert.equal("first 200", lines[1])
    assert.equal("during 200", lines[2])
    local after, secs = lines[3]:match("^after (%d+) ([%d.]+)$")
    assert.equal("200", after, lines[3])
    assert.is_true(tonumber(secs) < 3 * SLOWDOWN, "answered again after " .. secs .. " s")
    -- aiorch serve fitted max_connections to the 64 descriptors
    assert.matches("max_connections 10000 needs 20064 descriptors, but RLIMIT_NOFILE is 64: "
      .. "serving at most 24 connections", err, 1, true)
    assert.matches("Too many open files: not accepting for a while", err, 1, true)
    assert.matches("accepting again after", err, 1, true)
    assert.is_true(#err < 20 * 1024, "stderr: " .. #err .. " bytes")
  end)

  it("raise_nofile raises the soft descriptors limit to fit max_connections, or fits the limit", function()
    -- in a plain lua5.4 (the aiorch command raises its soft limit itself)
    local maps = slurp("/proc/self/maps") or ""
    local asan = maps:match("%s(/%S+/libasan%.so[%.%d]*)\n")
    local cpath = EXE:match("^(.*)/[^/]+$") .. "/lua/?.so"
    local script = write(tmpname() .. ".lua", [[
      local aiorch = require "aiorch"
      local srv = assert(aiorch.server.listen { port = 0, max_connections = 200, raise_nofile = true,
        handler = function() end })
      local f = io.open("/proc/self/limits")
      local limits = f:read("a")
      f:close()
      print(srv:limits().max_connections .. " " .. limits:match("Max open files%s+(%d+)"))
      srv:close()
    ]])
    -- the soft limit is low: raised to 2 x 200 + 64
    local out, errfile = tmpname(), tmpname()
    local pid = start({ "sh", "-c", fmt("ulimit -Sn 100 && exec lua5.4 %s", sh_quote(script)) },
      { stdout = out, stderr = errfile, env = { LUA_CPATH = cpath .. ";;", LD_PRELOAD = asan or false } })
    assert.equal(0, process.wait(pid, 10000 * SLOWDOWN), slurp(errfile))
    assert.equal("200 464", (slurp(out) or ""):match("[^\n]*"))
    assert.equal("", slurp(errfile))
    -- the hard limit is low too: the limit is lowered to fit, and said once
    pid = start({ EXE, "run", script }, { stdout = out, stderr = errfile }, 100)
    assert.equal(0, process.wait(pid, 10000 * SLOWDOWN))
    assert.equal("37 100", (slurp(out) or ""):match("[^\n]*"))
    local _, lines = (slurp(errfile) or ""):gsub("\n", "")
    assert.equal(1, lines)
    assert.matches("max_connections 200 needs 464 descriptors, but RLIMIT_NOFILE is 100: serving at most 37",
      slurp(errfile), 1, true)
    os.remove(out)
    os.remove(errfile)
    os.remove(script)
  end)

  it("reads no body before the client key is checked", function()
    local pid, port, errfile = serve([[return { max_body = 8 * 1024 * 1024, client_keys_env = { "HOSTILE_KEY" } }]],
      ENV)
    aiorch.sleep(200)
    local rss0 = status_kib(pid, "VmRSS")
    local lines = client({ "bodies", port, 50, 4 * MiB, 256 * 1024, 0, "" })
    local hwm = status_kib(pid, "VmHWM")
    -- every refusal has its access line (written in batches)
    local logged = wait_for(function()
      local _, n = (slurp(errfile) or ""):gsub("path=/v1/chat/completions status=401", "")
      return n == 50 and n
    end, 2000)
    stop(pid)
    os.remove(errfile)
    assert.same({ ["401"] = 50 }, count(lines))
    assert.equal(50, logged)
    if MEASURE_RSS then
      local added = (hwm - rss0) / 1024
      assert.is_true(added < 20, fmt("50 unauthenticated 4 MiB bodies added %.1f MiB of RSS", added))
    end
  end)

  it("answers 503 to bodies beyond max_buffered and stays within it", function()
    local pid, port, errfile = serve([[return { max_body = 4 * 1024 * 1024, client_keys_env = { "HOSTILE_KEY" },
      server = { max_buffered = 16 * 1024 * 1024 } }]], ENV)
    aiorch.sleep(200)
    local rss0 = status_kib(pid, "VmRSS")
    -- 40 bodies of 1 MiB, 64 KiB each per 50 ms: all in flight at once
    local lines = client({ "bodies", port, 40, MiB, 64 * 1024, 0.05,
      "Authorization: Bearer " .. ENV.HOSTILE_KEY .. "\\r\\n" })
    local hwm = status_kib(pid, "VmHWM")
    local err = wait_for(function() return (slurp(errfile) or ""):find("status=503", 1, true) and slurp(errfile) end,
      2000) or ""
    stop(pid)
    os.remove(errfile)
    local n = count(lines)
    -- a body that got in is malformed JSON (400); the others were refused
    assert.is_true((n["503"] or 0) > 0, "none refused")
    assert.is_true((n["400"] or 0) > 0, "none read")
    assert.equal(40, (n["503"] or 0) + (n["400"] or 0))
    assert.matches("status=503", err, 1, true)
    if MEASURE_RSS then
      local added = (hwm - rss0) / 1024
      assert.is_true(added < 40, fmt("40 slow 1 MiB bodies under a 16 MiB cap added %.1f MiB of RSS", added))
    end
  end)
end)
