-- Hostile clients against real `aiorch serve` and `aiorch run` processes,
-- scaled down from bench/hostile.lua: running out of descriptors, the
-- descriptors limit fitted to max_connections, bodies sent without a
-- client key, and more slow bodies than max_buffered holds.
local aiorch = require "aiorch"
local support = require "tests.support"

local process = aiorch.process
local fmt = string.format

local EXE = process.exe()
local SLOWDOWN = support.SLOWDOWN
local slurp, tmpname, start, stop = support.read, support.tmpname, support.start, support.stop
local wait_for, status_kib = support.wait_for, support.status_kib
local serve = support.start_serve
local MiB = 1024 * 1024

-- Under AddressSanitizer the RSS says nothing about ours.
local MEASURE_RSS = not support.under_asan() and SLOWDOWN == 1

-- The clients (python3): tests/hostile_client.py, shared with the benchmark.
local ROOT = debug.getinfo(1, "S").source:match("^@(.*)/tests/spec/[^/]+$") or "."
local client_script = ROOT .. "/tests/hostile_client.py"

-- Runs the client to its end; returns its output lines.
local function client(args, ms)
  local argv = { "python3", client_script }
  table.move(args, 1, #args, 3, argv)
  return support.start_lines(argv, ms)()
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
  teardown(support.stop_all)

  -- #timing: the client's waits are fixed, and valgrind needs descriptors of its own.
  it("out of descriptors: pauses accepting, logs a little, serves the open connections, resumes #timing", function()
    local pid, port, errfile = serve("return {}", ENV, { nofile = 64 })
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
    local script = tmpname() .. ".lua"
    support.write(script, [[
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
    local pid = start({ "sh", "-c", fmt("ulimit -Sn 100 && exec lua5.4 %s", support.sh_quote(script)) },
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
