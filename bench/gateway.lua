-- The gateway benchmark: build/aiorch run bench/gateway.lua [SECONDS] [STREAMS] [PARTS]
-- Runs `aiorch serve` as a subprocess in front of the mock providers at 0 ms
-- and prints, with a verdict per target (met / NOT met):
--   * the latency the gateway adds over calling the mock directly, measured
--     with wrk in the same run: 1 connection (p50, p99) and 64 connections (p99);
--     also, for what they tell apart, 1 connection with the gateway on wrk's
--     CPU and 64 connections paced below saturation;
--   * the gateway's own CPU time per request (utime + stime of its processes,
--     from /proc) for `single`, and for `fallback` when the first provider
--     always answers 500; the requests per second through it;
--   * the RSS of an idle worker, and the peak RSS of the gateway while it
--     carries STREAMS (default 10,000) concurrent streams from a slow-streaming
--     mock, every one checked complete and in order;
--   * the time from a `fastest` winner's first byte to the loser's socket
--     closing, seen by the mock (which runs inside this process for that);
--   * for comparison, the runtime's floor under the same load: bench/floor.lua,
--     the HTTP server alone and the server relaying one upstream call.
-- SECONDS (default 5) is the length of each wrk run; PARTS (default all) a
-- comma-separated choice of latency, streams, fastest. Needs wrk (Debian: apt-get install wrk);
-- installs nothing.
local aiorch = require "aiorch"
local mock = require "aiorch.mock"
local cjson = require "cjson.safe"

local fmt = string.format
local concat = table.concat

local args = table.pack(...)
local SECONDS = math.tointeger(tonumber(args[1] or "")) or 5
local STREAMS = math.tointeger(tonumber(args[2] or "")) or 10000
local PARTS = {}
for p in (args[3] or "latency,streams,fastest"):gmatch("[^,%s]+") do PARTS[p] = true end
local BUILD = os.getenv("AIORCH_BUILD") or "build"
local EXE = BUILD .. "/aiorch"
local HOST = "127.0.0.1"
local ROOT = debug.getinfo(1, "S").source:match("^@(.*)/bench/[^/]+$") or "."
package.path = ROOT .. "/?.lua;" .. package.path
local bench = require "bench.support"

local PACE_MS = 20 -- the paced 64-connection runs: at most 3,200 req/s offered
local TARGETS = {
  p50_added_us = 100, p99_added_us = 250, p99_added_64_us = 1000, cpu_single_us = 50,
  rps_single = 15000, idle_rss_mib = 10, streams_rss_mib = 350, abort_ms = 1,
}

------------------------------------------------------------------------------
-- Processes

local sh_quote, capture, have, pin, tree = bench.sh_quote, bench.capture, bench.have, bench.pin, bench.tree
local start, stop, stop_all, cpu_seconds, status_kib = bench.start, bench.stop, bench.stop_all, bench.cpu_seconds,
  bench.status_kib
local free_port, PIN, ANY_CPU = bench.free_port, bench.PIN, bench.ANY_CPU

-- aiorch (the gateway) on CPU 0; the mock, wrk and this process on CPU 1.
bench.pin_self(1)

local TMP = bench.workdir("gateway-bench")

local function start_mock(extra, unpinned)
  return bench.start_mock(EXE, unpinned and ANY_CPU or pin(1), extra)
end

-- Of /proc/PID/smaps_rollup: the RSS split into what the process alone
-- holds (Private_*) and the shared library pages it maps (Shared_*), and
-- its PSS. Only shown: the target stays on VmRSS.
local function rss_split(pid)
  local f = io.open(fmt("/proc/%d/smaps_rollup", pid))
  if not f then return nil end
  local s = f:read("a")
  f:close()
  local function kib(k) return tonumber(s:match("\n" .. k .. ":%s*(%d+)")) or 0 end
  return fmt("private %.1f, shared %.1f, PSS %.1f MiB", (kib("Private_Clean") + kib("Private_Dirty")) / 1024,
    (kib("Shared_Clean") + kib("Shared_Dirty")) / 1024, kib("Pss") / 1024)
end

local function sum_kib(pids, field)
  local t = 0
  for _, pid in ipairs(pids) do t = t + status_kib(pid, field) end
  return t
end

local HELP = capture(EXE .. " --help 2>&1")
local HAS_WORKERS = HELP:find("--workers", 1, true) ~= nil

local function env_for(port, openai_directives, anthropic_directives)
  local function prefix(d) return d and ("/_mock/" .. d) or "" end
  return {
    OPENAI_API_KEY = "sk-bench", ANTHROPIC_API_KEY = "sk-ant-bench",
    OPENAI_BASE_URL = fmt("http://%s:%d%s/v1", HOST, port, prefix(openai_directives)),
    ANTHROPIC_BASE_URL = fmt("http://%s:%d%s", HOST, port, prefix(anthropic_directives)),
  }
end

-- Waits until url/healthz answers 200; raises with the tail of the log
-- if the process (what, for the message) dies or 15 s pass.
local function wait_healthy(what, pid, url, log)
  bench.wait_up(what, pid, url .. "/healthz", log, 200)
end

-- Starts `aiorch serve` and waits for /healthz; returns {pid, url, port, log}.
local function start_gateway(name, env, opts)
  opts = opts or {}
  local port = free_port()
  local log = fmt("%s/%s.log", TMP, name)
  local cpu = opts.unpinned and ANY_CPU or pin(opts.cpu or 0)
  local cmd = { cpu .. EXE, "serve", "--listen", fmt("%s:%d", HOST, port) }
  if HAS_WORKERS and not opts.unpinned then cmd[#cmd + 1] = "--workers " .. (opts.workers or 1) end
  if opts.config then
    local path = fmt("%s/%s.config.lua", TMP, name)
    bench.write(path, opts.config)
    cmd[#cmd + 1] = "--config " .. sh_quote(path)
  end
  local pid = start(concat(cmd, " "), env, log)
  local url = fmt("http://%s:%d", HOST, port)
  wait_healthy(fmt("aiorch serve (%s)", name), pid, url, log)
  aiorch.sleep(200) -- let every worker come up
  return { pid = pid, url = url, port = port, log = log }
end

------------------------------------------------------------------------------
-- wrk

local BODY = bench.BODY

-- Runs wrk against url; returns {requests, rps, p50, p90, p99 (µs), errors}.
-- delay_ms: each connection pauses that long between requests (a paced load).
local function wrk(url, conns, seconds, strategy, providers, unpinned, delay_ms)
  return bench.wrk(TMP, url, conns, seconds, { strategy = strategy, providers = providers,
    cpu = unpinned and ANY_CPU or nil, delay_ms = delay_ms })
end

-- One request through the gateway: true when it answers 200 from `want`;
-- otherwise prints why (the figures that follow are then not trustworthy).
local function check_route(gw, strategy, providers, want)
  local status, headers, body = aiorch.http.request {
    method = "POST", url = gw.url .. "/v1/chat/completions", body = BODY,
    headers = { ["content-type"] = "application/json", ["x-aiorch-strategy"] = strategy,
      ["x-aiorch-providers"] = providers },
  }
  local by = headers and headers["x-aiorch-provider"]
  if status == 200 and by == want then return true end
  print(fmt("CHECK FAILED: %s over %s answered %s from %s (wanted 200 from %s): %s", strategy, providers,
    tostring(status), tostring(by), want, tostring(body):sub(1, 200)))
  return false
end

local function verdict(ok) return ok and "met" or "NOT met" end

local function target(what, ok, figure)
  print(fmt("target: %-52s %-8s (%s)", what, verdict(ok), figure))
end

------------------------------------------------------------------------------
-- Parts

-- The runtime's floor (bench/floor.lua) under the same pinned load: the
-- server alone, then the server relaying one upstream call to the mock.
-- Whatever a gateway on this runtime does, it costs at least this much.
local function floor(mock_port)
  local rows = {}
  for _, mode in ipairs { "fixed", "relay" } do
    local port = free_port()
    local upstream = mode == "relay" and fmt("http://%s:%d/v1/chat/completions", HOST, mock_port) or ""
    local log = fmt("%s/floor-%s.log", TMP, mode)
    local pid = start(fmt("%s%s run bench/floor.lua %d %s", pin(0), EXE, port, upstream), nil, log)
    local url = fmt("http://%s:%d", HOST, port)
    wait_healthy("bench/floor.lua (" .. mode .. ")", pid, url, log)
    wrk(url, 1, 1)
    local r1 = wrk(url, 1, SECONDS)
    wrk(url, 64, 1)
    local c0 = cpu_seconds { pid }
    local r64 = wrk(url, 64, SECONDS)
    rows[mode] = { r1 = r1, r64 = r64, cpu = (cpu_seconds { pid } - c0) / r64.requests * 1e6 }
    stop(pid)
  end
  return rows
end

local function latency_and_cpu(mock_port)
  local gw = start_gateway("single", env_for(mock_port))
  local workers = tree(gw.pid)
  local idle_rss, idle_split = 0, nil
  for i = (#workers > 1 and 2 or 1), #workers do
    local r = status_kib(workers[i], "VmRSS")
    if r >= idle_rss then idle_rss, idle_split = r, rss_split(workers[i]) end
  end
  local routed = check_route(gw, "single", "openai", "openai")
  local direct_url = fmt("http://%s:%d", HOST, mock_port)

  wrk(direct_url, 1, 1)
  wrk(gw.url, 1, 1, "single", "openai")
  local d1 = wrk(direct_url, 1, SECONDS)
  local g1 = wrk(gw.url, 1, SECONDS, "single", "openai")

  wrk(direct_url, 64, 1)
  wrk(gw.url, 64, 1, "single", "openai")
  local d64 = wrk(direct_url, 64, SECONDS)
  local c0 = cpu_seconds(tree(gw.pid))
  local g64 = wrk(gw.url, 64, SECONDS, "single", "openai")
  local cpu_single = (cpu_seconds(tree(gw.pid)) - c0) / g64.requests * 1e6
  -- 64 connections below saturation: each pauses PACE_MS between requests (on average).
  local dp = wrk(direct_url, 64, SECONDS, nil, nil, false, PACE_MS)
  local gp = wrk(gw.url, 64, SECONDS, "single", "openai", false, PACE_MS)
  aiorch.sleep(1000)
  local after_rss, after_split = 0, nil
  for i = (#workers > 1 and 2 or 1), #workers do
    local r = status_kib(workers[i], "VmRSS")
    if r >= after_rss then after_rss, after_split = r, rss_split(workers[i]) end
  end
  stop(gw.pid)
  local fl = floor(mock_port) -- next to the gateway's runs: the machine's speed drifts

  -- fallback: openai always answers 500, anthropic succeeds.
  local fb = start_gateway("fallback", env_for(mock_port, "fault=500", nil))
  local fb_routed = check_route(fb, "fallback", "openai,anthropic", "anthropic")
  wrk(fb.url, 64, 1, "fallback", "openai,anthropic")
  c0 = cpu_seconds(tree(fb.pid))
  local f64 = wrk(fb.url, 64, SECONDS, "fallback", "openai,anthropic")
  local cpu_fallback = (cpu_seconds(tree(fb.pid)) - c0) / f64.requests * 1e6
  stop(fb.pid)

  -- 1 connection with the gateway on the mock's and wrk's CPU: no hop wakes
  -- the other (virtual) CPU, whose wake-up the hypervisor makes slow.
  local same = start_gateway("same-cpu", env_for(mock_port), { cpu = 1 })
  wrk(same.url, 1, 1, "single", "openai")
  local s1 = wrk(same.url, 1, SECONDS, "single", "openai")
  stop(same.pid)

  -- Throughput as a user would run it: nothing pinned, the gateway's default workers.
  local free_mock, free_mock_pid = start_mock(nil, true)
  local free = start_gateway("free", env_for(free_mock), { unpinned = true })
  local free_workers = #tree(free.pid)
  local free_direct_url = fmt("http://%s:%d", HOST, free_mock)
  wrk(free_direct_url, 64, 1, nil, nil, true)
  local dfree = wrk(free_direct_url, 64, SECONDS, nil, nil, true)
  wrk(free.url, 64, 1, "single", "openai", true)
  local gfree = wrk(free.url, 64, SECONDS, "single", "openai", true)
  stop(free.pid)
  stop(free_mock_pid)

  print()
  print(fmt("%-34s %5s %9s %8s %8s %8s %8s", "wrk POST /v1/chat/completions", "conns", "req/s", "p50 µs",
    "p90 µs", "p99 µs", "errors"))
  local function row(name, conns, r)
    print(fmt("%-34s %5d %9.0f %8d %8d %8d %8d", name, conns, r.rps, r.p50, r.p90, r.p99, r.errors))
  end
  row("direct to the mock", 1, d1)
  row("gateway single", 1, g1)
  row("gateway single, on wrk's CPU", 1, s1)
  row("direct to the mock", 64, d64)
  row("gateway single", 64, g64)
  row(fmt("direct, paced (%d ms pauses)", PACE_MS), 64, dp)
  row(fmt("gateway single, paced (%d ms)", PACE_MS), 64, gp)
  row("gateway fallback (500, then ok)", 64, f64)
  row("direct to the mock, unpinned", 64, dfree)
  row(fmt("gateway single, unpinned (%d procs)", free_workers), 64, gfree)
  row("floor: server alone (bench/floor)", 1, fl.fixed.r1)
  row("floor: server alone", 64, fl.fixed.r64)
  row("floor: server + one upstream call", 1, fl.relay.r1)
  row("floor: server + one upstream call", 64, fl.relay.r64)
  print(fmt("gateway CPU per request (utime+stime, /proc): single %.1f µs, fallback %.1f µs",
    cpu_single, cpu_fallback))
  print(fmt("the runtime's floor, CPU per request: server alone %.1f µs, + one upstream call %.1f µs",
    fl.fixed.cpu, fl.relay.cpu))
  print(fmt("  (added at 1 connection by the floor with an upstream call: p50 %d µs, p99 %d µs)",
    fl.relay.r1.p50 - d1.p50, fl.relay.r1.p99 - d1.p99))
  print(fmt("worker RSS: %.1f MiB idle after start, %.1f MiB idle after the runs",
    idle_rss / 1024, after_rss / 1024))
  if idle_split then print(fmt("  after start: %s; after the runs: %s", idle_split, after_split or "?")) end
  print()
  local a50, a99, a99_64 = g1.p50 - d1.p50, g1.p99 - d1.p99, g64.p99 - d64.p99
  local errors = g1.errors + g64.errors + (routed and 0 or 1)
  -- The verdicts are on the runs above (separate CPUs, wrk at saturation);
  -- the same-CPU and paced figures follow them, to tell what costs what.
  target("p50 added at 1 connection <= 100 µs", a50 <= TARGETS.p50_added_us and errors == 0,
    fmt("%d µs; %d µs on wrk's CPU", a50, s1.p50 - d1.p50))
  target("p99 added at 1 connection <= 250 µs", a99 <= TARGETS.p99_added_us and errors == 0,
    fmt("%d µs; %d µs on wrk's CPU; the floor adds %d µs", a99, s1.p99 - d1.p99, fl.relay.r1.p99 - d1.p99))
  target("p99 added at 64 connections <= 1 ms", a99_64 <= TARGETS.p99_added_64_us and errors == 0,
    fmt("%d µs at saturation; %d µs paced, at %.0f req/s", a99_64, gp.p99 - dp.p99, gp.rps))
  target("gateway CPU per single request <= 50 µs", cpu_single <= TARGETS.cpu_single_us and routed,
    fmt("%.1f µs; fallback %.1f µs; the floor %.1f µs%s", cpu_single, cpu_fallback, fl.relay.cpu,
      (f64.errors > 0 or not fb_routed) and fmt(", fallback had %d errors", f64.errors) or ""))
  local best = math.max(g64.rps, gfree.rps)
  errors = errors + gfree.errors
  target("single through the gateway >= 15,000 req/s", best >= TARGETS.rps_single and errors == 0,
    fmt("%.0f req/s pinned, %.0f unpinned, %d errors; the floor %.0f", g64.rps, gfree.rps, errors,
      fl.relay.r64.rps))
  target("idle worker RSS <= 10 MiB", math.max(idle_rss, after_rss) / 1024 <= TARGETS.idle_rss_mib,
    fmt("%.1f MiB after start, %.1f MiB after load", idle_rss / 1024, after_rss / 1024))
end

-- STREAMS concurrent streams through the gateway from a slow-streaming mock.
local CHUNKS, CHUNK_DELAY_MS = 20, 1500

local function streams()
  local words = {}
  for i = 1, CHUNKS do words[i] = fmt("w%02d.", i) end
  local text = concat(words) -- 4 bytes a word: the mock sends one word per chunk
  local directives = fmt("chunks=%d,chunk_delay_ms=%d,text=%s", CHUNKS, CHUNK_DELAY_MS, text)
  local mock_port, mock_pid = start_mock()
  -- one worker holds at most ~2 fds per stream: two workers stay under the fd limit
  local gw = start_gateway("streams", env_for(mock_port, directives, directives), {
    workers = 2,
    config = "return { access_log = false, server = { max_connections = 50000 } }\n",
  })
  local body = '{"model":"gpt-4o-mini","max_tokens":64,"stream":true,'
    .. '"messages":[{"role":"user","content":"Stream to me"}]}'
  local headers = { ["content-type"] = "application/json", ["x-aiorch-strategy"] = "single",
    ["x-aiorch-providers"] = "openai" }
  local open, peak_open, done, failures, first_failure = 0, 0, 0, 0, nil
  local all_open_at = 0

  local function one()
    local got, deltas, finished, finish_reason, opened = {}, 0, false, nil, false
    local status, kind, message = aiorch.http.request {
      method = "POST", url = gw.url .. "/v1/chat/completions", headers = headers, body = body,
      timeout_ms = 120000, connect_timeout_ms = 30000,
      on_event = function(ev)
        if not opened then
          opened = true
          open = open + 1
          if open > peak_open then peak_open, all_open_at = open, aiorch.now() end
        end
        if ev.data == "[DONE]" then finished = true return end
        local j = cjson.decode(ev.data)
        local c = j and j.choices and j.choices[1]
        if c and type(c.delta) == "table" and type(c.delta.content) == "string" and c.delta.content ~= "" then
          deltas = deltas + 1
          got[deltas] = c.delta.content
        end
        if c and type(c.finish_reason) == "string" then finish_reason = c.finish_reason end
      end,
    }
    if opened then open = open - 1 end
    local whole = concat(got)
    local ok = status == 200 and finished and whole == text and deltas == CHUNKS and finish_reason == "stop"
    if ok then
      done = done + 1
    else
      failures = failures + 1
      first_failure = first_failure or fmt("status %s %s %s, %d deltas, text %q, [DONE] %s",
        tostring(status), tostring(kind), tostring(message), deltas, whole, tostring(finished))
    end
  end

  local pids = tree(gw.pid)
  local rss0 = sum_kib(pids, "VmRSS")
  local peak, t0 = 0, aiorch.now()
  local sampling = true
  local sampler = aiorch.spawn(function()
    while sampling do
      local r = sum_kib(pids, "VmRSS")
      if r > peak then peak = r end
      aiorch.sleep(50)
    end
  end)
  local tasks = {}
  for i = 1, STREAMS do
    tasks[i] = aiorch.spawn(one)
    if i % 100 == 0 then aiorch.sleep(10) end -- a ramp, so that no listen backlog overflows
  end
  aiorch.gather(tasks)
  sampling = false
  sampler:await()
  local wall = aiorch.now() - t0
  local hwm = sum_kib(pids, "VmHWM")
  stop(gw.pid)
  stop(mock_pid)

  print()
  print(fmt("%d concurrent streams (%d chunks, %d ms apart, through `single`), %d gateway processes:",
    STREAMS, CHUNKS, CHUNK_DELAY_MS, #pids))
  print(fmt("  %d completed in order, %d failed; at most %d open at once (reached after %.1f s), %.1f s in all",
    done, failures, peak_open, (all_open_at - t0) / 1000, wall / 1000))
  if first_failure then print("  first failure: " .. first_failure) end
  print(fmt("  gateway RSS (all its processes): %.1f MiB before, peak %.1f MiB sampled, %.1f MiB VmHWM"
    .. " (%.1f KiB per stream over the start)", rss0 / 1024, peak / 1024, hwm / 1024,
    (math.max(peak, hwm) - rss0) / STREAMS))
  print()
  local peak_mib = math.max(peak, hwm) / 1024
  target(fmt("peak RSS with %d streams open at once <= 350 MiB", STREAMS),
    peak_mib <= TARGETS.streams_rss_mib and peak_open == STREAMS,
    fmt("%.1f MiB%s", peak_mib, peak_open < STREAMS and fmt(" with only %d open at once", peak_open) or ""))
  target("every stream completed, no chunk lost or reordered", failures == 0 and done == STREAMS,
    fmt("%d of %d", done, STREAMS))
end

-- `fastest`: from the winner's response being written to the loser's socket
-- closing, both seen by an in-process mock on one clock.
local function fastest()
  local m = assert(mock.start { host = HOST, port = 0 })
  local winner = { latency_ms = 20 }
  local env = {
    OPENAI_API_KEY = "sk-bench", ANTHROPIC_API_KEY = "sk-ant-bench",
    OPENAI_BASE_URL = m:base_url("openai", winner),
    ANTHROPIC_BASE_URL = m:base_url("anthropic", { latency_ms = 3000 }),
  }
  local gw = start_gateway("fastest", env)
  local results = {}
  for _, stream in ipairs { false, true } do
    local gaps = {}
    local body = stream and BODY:gsub("^{", '{"stream":true,') or BODY
    for run = 1, 21 do
      m:reset()
      local status, headers = aiorch.http.request {
        method = "POST", url = gw.url .. "/v1/chat/completions", body = body,
        headers = { ["content-type"] = "application/json", ["x-aiorch-strategy"] = "fastest",
          ["x-aiorch-providers"] = "openai,anthropic" },
        on_event = stream and function() end or nil,
      }
      assert(status == 200 and headers["x-aiorch-provider"] == "openai",
        fmt("fastest: %s answered by %s", tostring(status), tostring(headers and headers["x-aiorch-provider"])))
      local t0 = aiorch.now()
      local win, lose
      repeat
        for _, r in ipairs(m.requests) do
          if r.api == "openai" then win = r else lose = r end
        end
        if lose and lose.aborted_at and win and win.completed_at then break end
        aiorch.sleep(1)
      until aiorch.now() - t0 > 2000
      assert(lose and lose.aborted_at, "fastest: the loser's transfer was not aborted")
      if run > 1 then gaps[#gaps + 1] = lose.aborted_at - win.completed_at end -- run 1 warms up
    end
    table.sort(gaps)
    results[#results + 1] = { stream = stream, median = gaps[(#gaps + 1) // 2], max = gaps[#gaps] }
  end
  stop(gw.pid)
  m:close()

  print()
  for _, r in ipairs(results) do
    print(fmt("fastest (%s), 20 runs: winner's response written -> loser's socket closed: median %.3f ms, max %.3f ms",
      r.stream and "streaming" or "non-streaming", r.median, r.max))
  end
  print()
  local worst = math.max(results[1].max, results[2].max)
  target("fastest: loser's socket closed <= 1 ms after the winner's first byte", worst <= TARGETS.abort_ms,
    fmt("max %.3f ms", worst))
end

------------------------------------------------------------------------------

local function main()
  if not HELP:match("\n%s*serve%s") then
    print(fmt("gateway benchmark skipped: %s has no 'serve' command yet", EXE))
    return 0
  end
  if not have("wrk") then
    print("gateway benchmark needs wrk: apt-get install wrk (Debian); nothing was run")
    return 1
  end
  print(fmt("aiorch %s gateway benchmark: wrk runs of %d s, mock providers at 0 ms on %s", aiorch.version,
    SECONDS, HOST))
  local f = io.open("/proc/loadavg")
  if f then
    print(fmt("load average before the run: %s (other work on the machine skews every figure)",
      f:read("l"):match("^(%S+ %S+ %S+)")))
    f:close()
  end
  print(PIN and "pinned: the gateway on CPU 0; the mock, wrk and this script on CPU 1"
    or "not pinned (no taskset or one core)")
  print(HAS_WORKERS and "the gateway runs with --workers 1 (2 for the streams, for the fd limit)"
    or "the gateway runs with its default workers")

  if PARTS.latency then
    latency_and_cpu((start_mock()))
    stop_all()
  end
  if PARTS.streams then streams() end
  if PARTS.fastest then fastest() end
  return 0
end

local ok, rc = pcall(main)
stop_all()
os.execute("rm -rf " .. sh_quote(TMP))
if not ok then
  io.stderr:write("gateway benchmark failed: ", tostring(rc), "\n")
  return 1
end
return rc
