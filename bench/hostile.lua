-- Hostile clients against a real gateway: build/aiorch run bench/hostile.lua [PART,...]
-- Each part starts its own `aiorch serve --workers 0` (from AIORCH_BUILD,
-- default build/, so that another build can be measured with this same
-- script), loads it with python3 clients (tests/hostile_client.py) and
-- prints its figures:
--   emfile    the server under `ulimit -n 64`, 200 clients holding a
--             connection for 3 s: its stderr, its CPU time, whether it
--             served an open connection meanwhile and new ones after;
--   slowloris 1,000 connections sending a header byte every 5 s, with a
--             normal client asking /healthz every 50 ms meanwhile: when and
--             how they were closed, the normal client's latency;
--   unauth    100 unauthenticated 4 MiB bodies at once (a client key is
--             configured): the RSS they add;
--   slow      1,500 authenticated 1 MiB bodies at once, 64 KiB each every
--             100 ms: what they were answered, the RSS they add;
--   streams   150 clients that never read a long stream (bench/hostile_streams.lua);
--   reload    SIGHUP twice during a 20 s stream (bench/hostile_streams.lua).
-- PART (default all) is a comma-separated choice. A part is an entry of
-- PARTS below: a name, what it does, and a function that prints figures.
local aiorch = require "aiorch"

local fmt = string.format

local ROOT = debug.getinfo(1, "S").source:match("^@(.*)/bench/[^/]+$") or "."
package.path = ROOT .. "/?.lua;" .. package.path
local support = require "tests.support"
local BUILD = os.getenv("AIORCH_BUILD") or (ROOT .. "/build")
local EXE = BUILD .. "/aiorch"
local CLIENT = ROOT .. "/tests/hostile_client.py"
local MiB = 1024 * 1024
local KEY = "hostile-bench-client-key"

------------------------------------------------------------------------------
-- Processes and /proc

local slurp, stop, status_kib = support.read, support.stop, support.status_kib

-- utime + stime of a process, in seconds.
local function cpu_s(pid)
  local s = slurp("/proc/" .. pid .. "/stat") or ""
  local rest = s:match("%) (.*)$") or ""
  local f = {}
  for w in rest:gmatch("%S+") do
    f[#f + 1] = w
  end
  return ((tonumber(f[12]) or 0) + (tonumber(f[13]) or 0)) / 100 -- fields 14, 15; USER_HZ
end

local ENV = { OPENAI_API_KEY = false, ANTHROPIC_API_KEY = false, AIORCH_PATH = false, AIORCH_LOG = false,
  HOSTILE_KEY = KEY }

-- `aiorch serve --workers 0` with the configuration text cfg; returns its
-- pid, port and stderr file once it listens.
local function serve(cfg, nofile)
  local pid, port, errfile = support.start_serve(cfg, ENV, { exe = EXE, nofile = nofile })
  aiorch.sleep(200) -- settled: the RSS before
  return pid, port, errfile
end

-- Starts the python client; returns a function that waits for it and
-- returns its output lines.
local function client(args)
  local argv = { "python3", CLIENT }
  table.move(args, 1, #args, 3, argv)
  return support.start_lines(argv, 120000)
end

local function count(lines)
  local n, keys = {}, {}
  for _, l in ipairs(lines) do
    if not n[l] then
      keys[#keys + 1] = l
    end
    n[l] = (n[l] or 0) + 1
  end
  table.sort(keys)
  local parts = {}
  for _, k in ipairs(keys) do
    parts[#parts + 1] = fmt("%s x%d", k, n[k])
  end
  return table.concat(parts, ", ")
end

local function pct(sorted, p)
  if #sorted == 0 then
    return 0
  end
  return sorted[math.max(1, math.ceil(#sorted * p))]
end

local function figure(name, value, unit)
  print(fmt("  %-44s %s%s", name, value, unit and " " .. unit or ""))
end

------------------------------------------------------------------------------
-- The parts

local PARTS = {}

PARTS[#PARTS + 1] = {
  name = "emfile",
  about = "ulimit -n 64, 200 clients hold a connection for 3 s",
  run = function()
    local pid, port, errfile = serve("return {}", 64)
    local cpu0 = cpu_s(pid)
    local lines = client({ "hold", port, 200, 3 })()
    local cpu = cpu_s(pid) - cpu0
    local err = slurp(errfile) or ""
    stop(pid)
    os.remove(errfile)
    local _, nlines = err:gsub("\n", "")
    figure("stderr", fmt("%d bytes, %d lines", #err, nlines))
    figure("server CPU during the run", fmt("%.2f", cpu), "s")
    for _, l in ipairs(lines) do
      local what, st, secs = l:match("^(%a+) (%d+) ?([%d.]*)")
      figure("request on " .. (what == "first" and "a connection, before"
        or what == "during" and "that connection, during"
        or "a new connection, after"), st .. (secs ~= "" and fmt(" (after %s s)", secs) or ""))
    end
  end,
}

PARTS[#PARTS + 1] = {
  name = "slowloris",
  about = "1,000 connections send a header byte every 5 s; a normal client asks meanwhile",
  run = function()
    local pid, port, errfile = serve("return {}")
    local wait = client({ "trickle", port, 1000, 5, 15, "GET /healthz HTTP/1.1\\r\\nhost: x\\r\\nx-slow: ",
      "abcdefgh" })
    local lat, failed = {}, 0
    local t_end = aiorch.now() + 14000
    aiorch.sleep(500)
    while aiorch.now() < t_end do
      local t0 = aiorch.now()
      local st = aiorch.http.request { url = fmt("http://127.0.0.1:%d/healthz", port), timeout_ms = 5000 }
      if st == 200 then
        lat[#lat + 1] = aiorch.now() - t0
      else
        failed = failed + 1
      end
      aiorch.sleep(50)
    end
    local lines = wait()
    local rss = status_kib(pid, "VmHWM")
    stop(pid)
    os.remove(errfile)
    local closed, statuses, times = 0, {}, {}
    for _, l in ipairs(lines) do
      local secs, st = l:match("^(%S+) (%d+)$")
      secs = tonumber(secs)
      if secs >= 0 then
        closed = closed + 1
        times[#times + 1] = secs
      end
      statuses[#statuses + 1] = st
    end
    table.sort(times)
    table.sort(lat)
    figure("closed by the server within 15 s", fmt("%d of %d", closed, #lines))
    figure("what they got", count(statuses))
    if closed > 0 then
      figure("closed after their first byte (p50 / max)", fmt("%.1f / %.1f", pct(times, 0.5), times[#times]), "s")
    end
    figure("normal client: answered / failed", fmt("%d / %d", #lat, failed))
    figure("normal client latency (p50 / p99 / max)",
      fmt("%.1f / %.1f / %.1f", pct(lat, 0.5), pct(lat, 0.99), lat[#lat] or 0), "ms")
    figure("gateway peak RSS", fmt("%.1f", rss / 1024), "MiB")
  end,
}

-- The bodies clients (N, SIZE, SLICE, EVERY, HEADERS: tests/hostile_client.py)
-- against a gateway with a client key and max_body: what they were
-- answered (label), how long it took and the RSS they added.
local function bodies(max_body, args, label)
  local pid, port, errfile = serve(fmt([[return { max_body = %d, client_keys_env = { "HOSTILE_KEY" } }]], max_body))
  local rss0 = status_kib(pid, "VmRSS")
  local t0 = aiorch.now()
  local lines = client({ "bodies", port, table.unpack(args) })()
  local took = aiorch.now() - t0
  local hwm = status_kib(pid, "VmHWM")
  stop(pid)
  os.remove(errfile)
  figure(label, count(lines))
  figure("time to answer them all", fmt("%.0f", took), "ms")
  figure("RSS added (peak - idle)", fmt("%.1f", (hwm - rss0) / 1024), "MiB")
end

PARTS[#PARTS + 1] = {
  name = "unauth",
  about = "100 unauthenticated 4 MiB bodies at once",
  run = function()
    bodies(8 * MiB, { 100, 4 * MiB, 256 * 1024, 0, "" }, "answers")
  end,
}

PARTS[#PARTS + 1] = {
  name = "slow",
  about = "1,500 authenticated 1 MiB bodies at once, 64 KiB each every 100 ms",
  run = function()
    bodies(2 * MiB, { 1500, MiB, 64 * 1024, 0.1, "Authorization: Bearer " .. KEY .. "\\r\\n" },
      "answers (400: read, malformed JSON)")
  end,
}

-- Streams held by clients that do not read, and reloads under a stream:
-- bench/hostile_streams.lua (it runs the mock providers in this process).
for _, name in ipairs { "streams", "reload" } do
  PARTS[#PARTS + 1] = {
    name = name,
    about = "see bench/hostile_streams.lua",
    run = function()
      assert(loadfile(ROOT .. "/bench/hostile_streams.lua"))(name)
    end,
  }
end

------------------------------------------------------------------------------

local chosen = {}
for p in ((...) or ""):gmatch("[^,%s]+") do
  chosen[p] = true
end
local any = false
for _, part in ipairs(PARTS) do
  if next(chosen) == nil or chosen[part.name] then
    any = true
    print(fmt("%s: %s (%s)", part.name, part.about, EXE))
    local ok, err = pcall(part.run)
    if not ok then
      print("  FAILED: " .. tostring(err))
    end
    support.stop_all()
  end
end
if not any then
  local names = {}
  for _, part in ipairs(PARTS) do
    names[#names + 1] = part.name
  end
  io.stderr:write("usage: aiorch run bench/hostile.lua [PART,...] (parts: ", table.concat(names, ", "), ")\n")
  os.exit(2)
end
