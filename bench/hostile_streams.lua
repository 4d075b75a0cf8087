-- Hostile clients that hold streams, and reloads: the parts streams and
-- reload of bench/hostile.lua, also runnable alone:
--   build/aiorch run bench/hostile_streams.lua [PARTS] [ARGS]
-- PARTS is a comma-separated choice of the parts below (default: all), each
-- printing its figures:
--   streams [N]   N clients (default 150) ask for a fast, long stream and
--                 never read it: the gateway's RSS, before and while they
--                 hang there, and how far the mock's sends got.
--   reload        a 20 s stream in flight while the master gets SIGHUP
--                 twice, 1 s apart: the stream completes, the newest
--                 generation serves, no worker of it is killed.
-- Runs the mock providers inside this process and the gateway as a
-- subprocess; the clients that never read are tests/hostile_client.py.
local aiorch = require "aiorch"
local mock = require "aiorch.mock"

local process = aiorch.process
local fmt = string.format
local concat = table.concat

local args = table.pack(...)
local ROOT = debug.getinfo(1, "S").source:match("^@(.*)/bench/[^/]+$") or "."
package.path = ROOT .. "/?.lua;" .. package.path
local support = require "tests.support"
local BUILD = os.getenv("AIORCH_BUILD") or "build"
local EXE = BUILD .. "/aiorch"
local HOST = "127.0.0.1"

------------------------------------------------------------------------------
-- Helpers

local slurp, tmpname, start, stop, status_kib = support.read, support.tmpname, support.start, support.stop,
  support.status_kib
local free_port, children, alive, wait_for = support.free_port, support.children, support.alive, support.wait_for

local function get(url, timeout_ms)
  return aiorch.http.request { url = url, timeout_ms = timeout_ms or 1000 }
end

-- Starts `aiorch serve` with the given argv tail and env; waits for /healthz.
local function start_gateway(port, tail, env, log)
  local argv = { EXE, "serve", "--listen", fmt("%s:%d", HOST, port) }
  for _, a in ipairs(tail) do
    argv[#argv + 1] = a
  end
  local pid = start(argv, { env = env, stderr = log })
  assert(wait_for(function() return (get(fmt("http://%s:%d/healthz", HOST, port), 500)) == 200 end, 10000),
    "the gateway did not start")
  return pid
end

-- Starts n clients (tests/hostile_client.py streams) that ask the gateway
-- at port for a stream and never read; returns the pid once every request
-- is sent.
local function idle_clients(port, n)
  local out = tmpname()
  local pid = start({ "python3", ROOT .. "/tests/hostile_client.py", "streams", tostring(port), tostring(n),
    "Tell me everything" }, { stdout = out })
  assert(wait_for(function() return (slurp(out) or ""):find("SENT") end, 30000), "the clients did not start")
  os.remove(out)
  return pid
end

-- A mock answer of about `bytes` bytes of text in `chunks` stream events.
local function long_text(bytes)
  local words, n = {}, 0
  local i = 0
  while n < bytes do
    i = i + 1
    local w = "w" .. i
    words[i] = w
    n = n + #w + 1
  end
  return concat(words, " ")
end

------------------------------------------------------------------------------
-- Parts

local parts = {}

-- N clients that never read a fast, long stream (about 6 MiB, under the
-- 8 MiB max_response_bytes): without backpressure the gateway holds what
-- the upstream sends; with it the upstream's sends stall.
function parts.streams(n)
  n = math.tointeger(tonumber(n or "")) or 150
  local CHUNKS, TEXT_BYTES = 20000, 2 * 1000 * 1000
  local m = assert(mock.start { defaults = { text = long_text(TEXT_BYTES), chunks = CHUNKS } })
  local port = free_port()
  local log = tmpname()
  local gw = start_gateway(port, { "--workers", "0" }, {
    OPENAI_API_KEY = "sk-bench", OPENAI_BASE_URL = m:base_url("openai"),
  }, log)
  -- one stream read whole: the warm-up, and the stream's size
  local bytes = 0
  local status = aiorch.http.request {
    method = "POST", url = fmt("http://%s:%d/v1/chat/completions", HOST, port),
    headers = { ["content-type"] = "application/json", ["x-aiorch-providers"] = "openai" },
    body = '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Warm up"}]}',
    timeout_ms = 60000,
    on_event = function(ev) bytes = bytes + #ev.data end,
  }
  assert(status == 200, "the warm-up stream failed")
  local upstream = m.requests[#m.requests].sent
  m:reset()
  aiorch.sleep(1000) -- the gateway gives memory back after a quiet spell
  local rss0 = status_kib(gw, "VmRSS")
  local t0 = aiorch.now()
  local clients = idle_clients(port, n)
  local peak = rss0
  local function sample()
    local r = status_kib(gw, "VmRSS")
    if r > peak then
      peak = r
    end
    return r
  end
  -- until every stream has stalled upstream and the RSS is flat for 2 s
  local last, flat_since = 0, aiorch.now()
  while aiorch.now() - t0 < 60000 do
    local r = sample()
    if math.abs(r - last) > 1024 then
      last, flat_since = r, aiorch.now()
    elseif aiorch.now() - flat_since > 2000 and #m.requests == n then
      break
    end
    aiorch.sleep(100)
  end
  local sent, done = 0, 0
  for _, r in ipairs(m.requests) do
    sent = sent + (r.sent or 0)
    if r.completed_at then
      done = done + 1
    end
  end
  local st = m:stats()
  local rss = sample()
  stop(clients)
  -- the gateway cancels the upstream transfers of the clients that left
  local gone = wait_for(function()
    for _, r in ipairs(m.requests) do
      if not (r.aborted_at or r.completed_at) then
        return false
      end
    end
    return true
  end, 10000)
  aiorch.sleep(1500)
  local rss_after = status_kib(gw, "VmRSS")
  local hwm = status_kib(gw, "VmHWM")
  stop(gw)
  os.remove(log)
  m:close()
  print(fmt("streams: %d clients ask for a %.1f MiB stream (%d events) and never read it", n,
    upstream / 1048576, CHUNKS))
  print(fmt("  gateway RSS: %.1f MiB before, %.1f MiB with them hanging (peak %.1f, VmHWM %.1f;"
    .. " %.0f KiB per stream), %.1f MiB once they left", rss0 / 1024, rss / 1024, peak / 1024, hwm / 1024,
    (peak - rss0) / n, rss_after / 1024))
  print(fmt("  mock: %d of %d streams parked in a write, %d writes waited on backpressure, %d streams"
    .. " sent whole; %.1f MiB sent of %.1f MiB (%.0f KiB per stream)", st.writing, n, st.write_waits, done,
    sent / 1048576, upstream * n / 1048576, sent / n / 1024))
  print(fmt("  upstream transfers ended once the clients left: %s", gone and "yes" or "NO"))
  local ok = peak / 1024 < 150
  print(fmt("  target: total RSS under 150 MiB with %d such clients: %s", n, ok and "met" or "NOT met"))
  return ok
end

-- A 20 s stream through `aiorch serve --workers 2` (drain_timeout_ms 25 s,
-- the master's kill grace 5 s) while the master gets SIGHUP twice, 1 s
-- apart, and plain requests go on all along. Watched until 2 s past the
-- first reload's kill deadline (32 s).
function parts.reload()
  local DRAIN_MS, GRACE_MS = 25000, 5000
  local TEXT = string.rep("tock ", 40)
  local m = assert(mock.start { defaults = { chunks = 40, chunk_delay_ms = 500, text = TEXT } })
  local cfg, log = tmpname() .. ".lua", tmpname()
  support.write(cfg, fmt("return { drain_timeout_ms = %d, access_log = false }\n", DRAIN_MS))
  local port = free_port()
  local master = start({ EXE, "serve", "--workers", "2", "--listen", fmt("%s:%d", HOST, port), "--config", cfg }, {
    env = { OPENAI_API_KEY = "sk-bench", OPENAI_BASE_URL = m:base_url("openai") }, stderr = log,
  })
  assert(wait_for(function() return (slurp(log) or ""):find("2 workers listening") end, 15000),
    "the master did not start")
  local url = fmt("http://%s:%d/v1/chat/completions", HOST, port)
  local headers = { ["content-type"] = "application/json", ["x-aiorch-providers"] = "openai" }

  local first, t_stream = false, aiorch.now()
  local stream = aiorch.spawn(function()
    local status, kind, msg, text, done = support.stream_chat(url, headers,
      '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"count"}]}', 60000,
      function() first = true end)
    return status, kind, msg, text, done, aiorch.now() - t_stream
  end)
  local served, failures, first_failure, running = 0, 0, nil, true
  local load = aiorch.spawn(function()
    while running do
      local status, kind, msg = aiorch.http.request {
        method = "POST", url = url, headers = headers, timeout_ms = 10000,
        body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}',
      }
      served = served + 1
      if status ~= 200 then
        failures = failures + 1
        first_failure = first_failure or fmt("%s %s", tostring(status or kind), tostring(msg))
      end
      aiorch.sleep(20)
    end
  end)

  assert(wait_for(function() return first end, 5000), "the stream did not start")
  local before = {}
  for _, pid in ipairs(children(master)) do
    before[pid] = true
  end
  local t0 = aiorch.now()
  process.kill(master, "SIGHUP")
  aiorch.sleep(1000)
  for _, pid in ipairs(children(master)) do
    before[pid] = true
  end
  process.kill(master, "SIGHUP")
  assert(wait_for(function() return (slurp(log) or ""):find("generation 3 listening") end, 15000),
    "no third generation")
  local newest = {}
  for _, pid in ipairs(children(master)) do
    if not before[pid] then
      newest[#newest + 1] = pid
    end
  end
  aiorch.sleep(math.max(0, t0 + DRAIN_MS + GRACE_MS + 2000 - aiorch.now()))
  running = false
  load:await(15000)
  local status, kind, msg, text, done, secs = stream:await(60000)
  local living = 0
  for _, pid in ipairs(newest) do
    if alive(pid) then
      living = living + 1
    end
  end
  local kills = select(2, (slurp(log) or ""):gsub("SIGKILL", ""))
  process.kill(master, "SIGTERM")
  process.wait(master, 40000)
  m:close()
  os.remove(cfg)
  os.remove(log)

  local whole = status == 200 and done and text == TEXT
  print(fmt("reload: a %.1f s stream in flight, SIGHUP twice 1 s apart, watched for %.1f s after the first",
    secs / 1000, (aiorch.now() - t0) / 1000))
  print(fmt("  the stream: %s", whole and "complete" or fmt("NOT complete (%s %s %s, %d bytes, [DONE] %s)",
    tostring(status), tostring(kind), tostring(msg), #(text or ""), tostring(done))))
  print(fmt("  plain requests: %d, %d failed%s", served, failures, first_failure and (": " .. first_failure) or ""))
  print(fmt("  newest generation: %d of %d workers alive; SIGKILL in the master's log: %d", living, #newest, kills))
  local ok = whole and failures == 0 and living == #newest and #newest == 2 and kills == 0
  print(fmt("  target: the stream completes, no request fails, the newest generation lives: %s",
    ok and "met" or "NOT met"))
  return ok
end

------------------------------------------------------------------------------

local ORDER = { "streams", "reload" }
local chosen = {}
for p in (args[1] or concat(ORDER, ",")):gmatch("[^,%s]+") do
  assert(parts[p], "unknown part '" .. p .. "' (one of " .. concat(ORDER, ", ") .. ")")
  chosen[#chosen + 1] = p
end
local all_ok = true
for _, p in ipairs(chosen) do
  local ok, res = pcall(parts[p], table.unpack(args, 2, args.n))
  if not ok then
    print(fmt("%s: failed: %s", p, tostring(res)))
  end
  all_ok = all_ok and ok and res
  support.stop_all()
end
return all_ok and 0 or 1
