-- Helpers shared by the benchmarks that run servers as processes (gateway,
-- nginx): shell commands, CPU pinning, processes started through sh and
-- stopped by pid with their children, /proc figures and wrk. On top of
-- tests/support.lua; a benchmark finds both from the repository's root:
--   local ROOT = debug.getinfo(1, "S").source:match("^@(.*)/bench/[^/]+$") or "."
--   package.path = ROOT .. "/?.lua;" .. package.path
--   local bench = require "bench.support"
local aiorch = require "aiorch"
local support = require "tests.support"

local fmt = string.format
local concat = table.concat

local _M = {}

_M.HOST = "127.0.0.1"
_M.sh_quote = support.sh_quote
_M.free_port = support.free_port
_M.status_kib = support.status_kib
_M.write = support.write

-- What the shell command prints on stdout.
function _M.capture(cmd)
  local p = io.popen(cmd, "r")
  local out = p:read("a")
  p:close()
  return out
end

function _M.have(cmd)
  return os.execute("command -v " .. cmd .. " >/dev/null 2>&1")
end

-- The servers on CPU 0; the mock, wrk and the benchmark on CPU 1, once it
-- calls pin_self(). Counted before that: nproc honours the affinity.
_M.NCPU = tonumber(_M.capture("nproc")) or 1
_M.PIN = _M.have("taskset") and _M.NCPU >= 2
-- Children inherit the benchmark's CPU; "unpinned" ones get every CPU back.
_M.ANY_CPU = _M.PIN and fmt("taskset -c 0-%d ", _M.NCPU - 1) or ""

-- The prefix of a command that runs it on that CPU (none without pinning).
function _M.pin(cpu)
  return _M.PIN and fmt("taskset -c %d ", cpu) or ""
end

function _M.pin_self(cpu)
  if _M.PIN then
    os.execute(fmt("taskset -cp %d %d >/dev/null", cpu, aiorch.process.pid()))
  end
end

-- A new directory for the benchmark's files: mktemp -d /tmp/aiorch-NAME.XXXXXX.
function _M.workdir(name)
  return _M.capture("mktemp -d /tmp/aiorch-" .. name .. ".XXXXXX"):match("%S+")
end

local started = {} -- pid -> pipe

-- Starts cmd (exec'ed by sh, so the pid is the program's) with env's
-- variables; returns pid, pipe. With `log`, its output goes to that file
-- instead of the pipe.
function _M.start(cmd, env, log)
  local parts = { "echo $$; exec env" }
  for k, v in pairs(env or {}) do parts[#parts + 1] = k .. "=" .. _M.sh_quote(v) end
  parts[#parts + 1] = cmd
  if log then parts[#parts + 1] = ">" .. _M.sh_quote(log) .. " 2>&1" end
  local p = assert(io.popen(concat(parts, " "), "r"))
  local pid = math.tointeger(tonumber(p:read("l") or ""))
  assert(pid, "could not start: " .. cmd)
  started[pid] = p
  return pid, p
end

_M.alive = support.alive

-- The process and its descendants (a master and its workers).
function _M.tree(pid)
  local out = { pid }
  local i = 1
  while out[i] do
    local f = io.open(fmt("/proc/%d/task/%d/children", out[i], out[i]))
    if f then
      for c in f:read("a"):gmatch("%d+") do out[#out + 1] = tonumber(c) end
      f:close()
    end
    i = i + 1
  end
  return out
end

-- Sends sig (default TERM: a gateway drains) to a process start() ran,
-- then SIGKILL after 5 s to it and whatever of its descendants is left.
function _M.stop(pid, sig)
  local p = started[pid]
  if not p then return end
  started[pid] = nil
  local pids = _M.tree(pid)
  os.execute(fmt("kill -%s %d 2>/dev/null", sig or "TERM", pid))
  local t0 = aiorch.now()
  while _M.alive(pid) and aiorch.now() - t0 < 5000 do aiorch.sleep(20) end
  for _, q in ipairs(pids) do
    if _M.alive(q) then os.execute(fmt("kill -KILL %d 2>/dev/null", q)) end
  end
  p:close()
end

function _M.stop_all()
  for pid in pairs(started) do _M.stop(pid) end
end

-- Starts tests/mock_server.lua (exe run, with more arguments) on a CPU
-- (pin's prefix); returns its port and pid.
function _M.start_mock(exe, cpu_prefix, extra)
  local pid, p = _M.start(cpu_prefix .. exe .. " run tests/mock_server.lua " .. (extra or ""))
  local line = p:read("l") or ""
  local port = line:match("^PORT (%d+)")
  assert(port, "the mock did not start: " .. line)
  return tonumber(port), pid
end

-- Waits until url answers (with `status` when given); raises with the
-- tail of the log when the process (what, for the message) dies or 15 s
-- pass.
function _M.wait_up(what, pid, url, log, status)
  local t0 = aiorch.now()
  while true do
    local got = aiorch.http.request { url = url, timeout_ms = 1000 }
    if got and (status == nil or got == status) then return end
    if not _M.alive(pid) or aiorch.now() - t0 > 15000 then
      error(fmt("%s did not start: %s", what, support.slurp(log):sub(-2000)))
    end
    aiorch.sleep(20)
  end
end

local CLK_TCK = tonumber(_M.capture("getconf CLK_TCK")) or 100

-- utime + stime of the processes, in seconds.
function _M.cpu_seconds(pids)
  local total = 0
  for _, pid in ipairs(pids) do
    local s = support.read(fmt("/proc/%d/stat", pid))
    if s then
      local fields = {}
      for v in s:match("%) (.*)"):gmatch("%S+") do fields[#fields + 1] = v end
      total = total + (tonumber(fields[12]) + tonumber(fields[13])) / CLK_TCK
    end
  end
  return total
end

------------------------------------------------------------------------------
-- wrk

_M.BODY = '{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"How fast is this?"}]}'

local WRK_SCRIPT = [[
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
local strategy, providers = os.getenv("BENCH_STRATEGY"), os.getenv("BENCH_PROVIDERS")
if strategy and strategy ~= "" then wrk.headers["X-Aiorch-Strategy"] = strategy end
if providers and providers ~= "" then wrk.headers["X-Aiorch-Providers"] = providers end
local pause = tonumber(os.getenv("BENCH_DELAY_MS") or "")
-- Each connection waits about this long between requests, at random so
-- that the connections do not fire together.
if pause then function delay() return math.random(0, 2 * pause) end end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK requests=%d duration_us=%d status_errors=%d socket_errors=%d p50=%d p90=%d p99=%d max=%d\n",
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
]]

-- Runs wrk (POST BODY to url/v1/chat/completions) with the script written
-- in dir; returns {requests, rps, p50, p90, p99, max (µs), errors}. opts:
-- strategy and providers (the X-Aiorch-* headers), cpu (the command's
-- prefix, default pin(1)), delay_ms (each connection pauses that long
-- between requests: a paced load).
function _M.wrk(dir, url, conns, seconds, opts)
  opts = opts or {}
  local script = dir .. "/post.lua"
  if not support.read(script) then support.write(script, WRK_SCRIPT) end
  local cmd = fmt("BENCH_BODY=%s BENCH_STRATEGY=%s BENCH_PROVIDERS=%s BENCH_DELAY_MS=%s %swrk -t1 -c%d -d%ds "
    .. "--timeout 10s -s %s %s", _M.sh_quote(_M.BODY), _M.sh_quote(opts.strategy or ""),
    _M.sh_quote(opts.providers or ""), opts.delay_ms or "", opts.cpu or _M.pin(1), conns, seconds,
    _M.sh_quote(script), _M.sh_quote(url .. "/v1/chat/completions"))
  local out = _M.capture(cmd .. " 2>&1")
  local line = out:match("WRK ([^\n]*)")
  assert(line, "wrk failed: " .. out)
  local r = {}
  for k, v in line:gmatch("([%w_]+)=(%d+)") do r[k] = tonumber(v) end
  r.rps = r.requests / (r.duration_us / 1e6)
  r.errors = r.status_errors + r.socket_errors
  return r
end

return _M
