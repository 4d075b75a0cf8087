-- The response cache's benchmark: build/aiorch run bench/cache.lua [SECONDS]
-- Runs three `aiorch serve` processes (one worker each, pinned to CPU 0) in
-- front of the mock providers at 0 ms and a redis-server (pinned to CPU 1
-- with the mock and wrk), and measures, in the same run, the gateway's CPU
-- time per request (utime + stime from /proc, over a wrk run of 8
-- connections) and the latency at 1 connection (wrk's p50) of:
--   floor        the plain request handling: the same request read,
--                decoded and routed, then refused (an unknown strategy, 400)
--                before anything is looked up or called
--   plain miss   no cache: the request answered by the mock (0 ms)
--   miss+store   cache on, every request new: looked up, answered, stored
--   memory hit   cache on, the same request: answered from memory
--   redis hit    cache on without its memory tier (max_bytes = 0), redis
--                configured: answered from Redis
--   stream miss / stream hit   the same, streamed (the OpenAI client's
--                chunks and [DONE])
-- and prints the targets of issue 15 with a verdict each:
--   a memory hit adds <= 30 us of CPU over the floor;
--   a Redis hit adds <= 300 us at p50 (over the memory hit's p50);
--   a hit is >= 5x cheaper in CPU than a miss to a 0 ms upstream (the
--   miss with the cache on: miss+store).
-- Needs wrk and redis-server (the Redis rows are skipped without it).
local aiorch = require "aiorch"

local fmt = string.format
local concat = table.concat

local args = table.pack(...)
local SECONDS = math.tointeger(tonumber(args[1] or "")) or 5
local BUILD = os.getenv("AIORCH_BUILD") or "build"
local EXE = BUILD .. "/aiorch"
local HOST = "127.0.0.1"

local function sh_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function capture(cmd)
  local p = io.popen(cmd, "r")
  local out = p:read("a")
  p:close()
  return out
end

local function have(cmd)
  return os.execute("command -v " .. cmd .. " >/dev/null 2>&1")
end

assert(have("wrk"), "bench/cache.lua needs wrk (Debian: apt-get install wrk)")

local function own_pid()
  local f = assert(io.open("/proc/self/stat"))
  local pid = f:read("n")
  f:close()
  return pid
end

-- The gateways on CPU 0; the mock, redis, wrk and this process on CPU 1.
local NCPU = tonumber(capture("nproc")) or 1
local PIN = have("taskset") and NCPU >= 2
if PIN then
  os.execute("taskset -cp 1 " .. own_pid() .. " >/dev/null")
end
local function pin(cpu)
  return PIN and fmt("taskset -c %d ", cpu) or ""
end

local TMP = capture("mktemp -d /tmp/aiorch-cache-bench.XXXXXX"):match("%S+")
local started = {} -- pid -> pipe

-- Starts cmd (exec'ed by sh: the pid is the program's), its output to log.
local function start(cmd, env, log)
  local parts = { "echo $$; exec env" }
  for k, v in pairs(env or {}) do
    parts[#parts + 1] = k .. "=" .. sh_quote(v)
  end
  parts[#parts + 1] = cmd
  if log then
    parts[#parts + 1] = ">" .. sh_quote(log) .. " 2>&1"
  end
  local p = assert(io.popen(concat(parts, " "), "r"))
  local pid = math.tointeger(tonumber(p:read("l") or ""))
  assert(pid, "could not start: " .. cmd)
  started[pid] = p
  return pid, p
end

local function stop_all()
  for pid, p in pairs(started) do
    os.execute(fmt("kill -TERM %d 2>/dev/null", pid))
    p:close()
  end
  started = {}
end

local CLK_TCK = tonumber(capture("getconf CLK_TCK")) or 100

-- utime + stime of a process, in seconds.
local function cpu_seconds(pid)
  local f = assert(io.open(fmt("/proc/%d/stat", pid)))
  local s = f:read("a")
  f:close()
  local fields = {}
  for v in s:match("%) (.*)"):gmatch("%S+") do
    fields[#fields + 1] = v
  end
  return (tonumber(fields[12]) + tonumber(fields[13])) / CLK_TCK
end

local function free_port()
  local srv = aiorch.server.listen { host = HOST, port = 0, handler = function() end }
  local port = srv.port
  srv:close()
  return port
end

local function wait_up(url, what, log)
  local t0 = aiorch.now()
  while not aiorch.http.request { url = url, timeout_ms = 1000 } do
    if aiorch.now() - t0 > 15000 then
      local f = io.open(log)
      error(fmt("%s did not start: %s", what, f and f:read("a") or ""))
    end
    aiorch.sleep(20)
  end
end

------------------------------------------------------------------------------
-- The processes

local function start_mock()
  local pid, p = start(pin(1) .. EXE .. " run tests/mock_server.lua")
  local port = (p:read("l") or ""):match("^PORT (%d+)")
  assert(port, "the mock did not start")
  return tonumber(port), pid
end

local function start_redis()
  if not have("redis-server") then
    return nil
  end
  local port = free_port()
  local log = TMP .. "/redis.log"
  start(fmt("%sredis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --dir %s", pin(1), port,
    sh_quote(TMP)), nil, log)
  local url = "redis://127.0.0.1:" .. port
  local t0 = aiorch.now()
  while true do
    local c = aiorch.redis.connect(url, { timeout_ms = 200, backoff_ms = 1 })
    local v = c and c:call("PING")
    if c then
      c:close()
    end
    if v == "PONG" then
      return url
    end
    assert(aiorch.now() - t0 < 10000, "redis-server did not start")
    aiorch.sleep(20)
  end
end

local function start_gateway(name, mock_port, config)
  local port = free_port()
  local log = fmt("%s/%s.log", TMP, name)
  local conf = fmt("%s/%s.config.lua", TMP, name)
  local f = assert(io.open(conf, "w"))
  f:write(config)
  f:close()
  local env = { OPENAI_API_KEY = "sk-bench", OPENAI_BASE_URL = fmt("http://%s:%d/v1", HOST, mock_port),
    AIORCH_LOG = "error" }
  local pid = start(fmt("%s%s serve --workers 0 --listen %s:%d --config %s", pin(0), EXE, HOST, port,
    sh_quote(conf)), env, log)
  local url = fmt("http://%s:%d", HOST, port)
  wait_up(url .. "/healthz", "aiorch serve (" .. name .. ")", log)
  return { pid = pid, url = url, name = name }
end

------------------------------------------------------------------------------
-- wrk

local BODY = '{"model":"gpt-4o-mini","max_tokens":16,"temperature":0,'
  .. '"messages":[{"role":"user","content":"How fast is this?"}]}'
local STREAM_BODY = BODY:gsub("^{", '{"stream":true,')

-- BENCH_UNIQUE=1: every request another question (all misses).
local WRK_SCRIPT = [[
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Aiorch-Strategy"] = os.getenv("BENCH_STRATEGY")
wrk.headers["X-Aiorch-Providers"] = "openai"
local body = os.getenv("BENCH_BODY")
local unique = os.getenv("BENCH_UNIQUE") == "1"
local n = 0
local tag = tostring(math.random(1, 1e9))
function request()
  if unique then
    n = n + 1
    return wrk.format(nil, nil, nil, (body:gsub("How fast", "How fast " .. tag .. "-" .. n)))
  end
  return wrk.format(nil, nil, nil, body)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK requests=%d duration_us=%d status_errors=%d socket_errors=%d p50=%d p99=%d\n",
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
]]
local WRK_LUA = TMP .. "/post.lua"
do
  local f = assert(io.open(WRK_LUA, "w"))
  f:write(WRK_SCRIPT)
  f:close()
end

local function wrk(url, conns, seconds, body, unique, strategy)
  local cmd = fmt("BENCH_BODY=%s BENCH_UNIQUE=%s BENCH_STRATEGY=%s %swrk -t1 -c%d -d%ds --timeout 10s -s %s %s",
    sh_quote(body), unique and "1" or "0", sh_quote(strategy or "single"), pin(1), conns, seconds,
    sh_quote(WRK_LUA), sh_quote(url .. "/v1/chat/completions"))
  local out = capture(cmd .. " 2>&1")
  local line = out:match("WRK ([^\n]*)")
  assert(line, "wrk failed: " .. out)
  local r = {}
  for k, v in line:gmatch("([%w_]+)=(%d+)") do
    r[k] = tonumber(v)
  end
  r.errors = r.status_errors + r.socket_errors
  return r
end

-- One scenario: CPU per request at 8 connections, p50 at 1 connection.
local function measure(gw, body, unique, strategy)
  wrk(gw.url, 8, 1, body, unique, strategy) -- warm up (and store, for the hits)
  local c0 = cpu_seconds(gw.pid)
  local r = wrk(gw.url, 8, SECONDS, body, unique, strategy)
  local cpu_us = (cpu_seconds(gw.pid) - c0) / r.requests * 1e6
  local one = wrk(gw.url, 1, math.max(2, SECONDS // 2), body, unique, strategy)
  return { cpu_us = cpu_us, rps = r.requests / (r.duration_us / 1e6), p50 = one.p50, p99 = one.p99,
    errors = r.errors, requests = r.requests }
end

-- The header a request gets (checks that a scenario is what it says).
local function cache_header(gw, body)
  local _, h = aiorch.http.request { method = "POST", url = gw.url .. "/v1/chat/completions", body = body,
    headers = { ["content-type"] = "application/json", ["x-aiorch-strategy"] = "single",
      ["x-aiorch-providers"] = "openai" } }
  return h and h["x-aiorch-cache"] or "none"
end

------------------------------------------------------------------------------

local ok, err = pcall(function()
  local mock_port = start_mock()
  local redis_url = start_redis()
  local plain = start_gateway("plain", mock_port, "return { access_log = false }")
  local mem = start_gateway("memory", mock_port, "return { access_log = false, cache = true }")
  local red = redis_url and start_gateway("redis", mock_port, fmt(
    "return { access_log = false, cache = { max_bytes = 0 }, redis = { url = %q, prefix = \"bench:\" } }",
    redis_url))

  cache_header(mem, BODY)
  assert(cache_header(mem, BODY) == "hit", "the memory gateway does not hit")
  if red then
    cache_header(red, BODY)
    aiorch.sleep(50)
    assert(cache_header(red, BODY) == "hit", "the redis gateway does not hit")
  end

  local rows = {}
  local function row(name, r, expect_errors)
    rows[name] = r
    print(fmt("%-14s %10.1f %10.0f %9d %9d %s", name, r.cpu_us, r.rps, r.p50, r.p99,
      (r.errors > 0 and not expect_errors) and fmt("(%d errors of %d)", r.errors, r.requests) or ""))
  end
  print(fmt("%-14s %10s %10s %9s %9s", "scenario", "CPU us/req", "req/s", "p50 us", "p99 us"))
  row("floor", measure(mem, BODY, false, "no-such-strategy"), true)
  row("plain miss", measure(plain, BODY, false))
  row("miss+store", measure(mem, BODY, true))
  row("memory hit", measure(mem, BODY, false))
  if red then
    row("redis hit", measure(red, BODY, false))
  end
  row("stream miss", measure(plain, STREAM_BODY, false))
  row("stream hit", measure(mem, STREAM_BODY, false))

  local function target(what, met, figure)
    print(fmt("target: %-58s %-8s (%s)", what, met and "met" or "NOT met", figure))
  end
  local added = rows["memory hit"].cpu_us - rows.floor.cpu_us
  target("a memory hit adds <= 30 us of CPU over the plain handling", added <= 30,
    fmt("%.1f us: hit %.1f, floor %.1f", added, rows["memory hit"].cpu_us, rows.floor.cpu_us))
  if red then
    local p50_added = rows["redis hit"].p50 - rows["memory hit"].p50
    target("a Redis hit adds <= 300 us at p50", p50_added <= 300,
      fmt("%d us: redis hit p50 %d, memory hit p50 %d; CPU %.1f us", p50_added, rows["redis hit"].p50,
        rows["memory hit"].p50, rows["redis hit"].cpu_us))
  end
  -- (against the miss with the cache on, which looks up and stores too;
  -- the plain miss beside it)
  local hit_us = rows["memory hit"].cpu_us
  local ratio = rows["miss+store"].cpu_us / hit_us
  target("a hit is >= 5x cheaper in CPU than a miss to a 0 ms upstream", ratio >= 5,
    fmt("%.1fx: miss+store %.1f us, hit %.1f us; plain miss %.1fx", ratio, rows["miss+store"].cpu_us, hit_us,
      rows["plain miss"].cpu_us / hit_us))
  local sratio = rows["stream miss"].cpu_us / rows["stream hit"].cpu_us
  print(fmt("streams: a hit is %.1fx cheaper in CPU than a miss (%.1f us, %.1f us)", sratio,
    rows["stream miss"].cpu_us, rows["stream hit"].cpu_us))
end)
stop_all()
os.execute("rm -rf " .. sh_quote(TMP))
if not ok then
  error(err, 0)
end
