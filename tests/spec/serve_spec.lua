-- `aiorch serve` as a production server: the server's limits and graceful
-- shutdown (aiorch.server directly), then real `aiorch serve --workers 2`
-- processes (master + workers) in front of the mock providers.
local aiorch = require "aiorch"
local support = require "tests.support"

local process = aiorch.process
local fmt = string.format

local HOST = "127.0.0.1"
local EXE = process.exe()

local SLOWDOWN = support.SLOWDOWN
local slurp, tmpname, start, stop_all = support.read, support.tmpname, support.start, support.stop_all
local wait_for, children = support.wait_for, support.children

-- A raw TCP client (python3): sends the bytes of `data`, then reads until
-- the server closes; returns what it got and the seconds it took.
local RAW = [[
import socket, sys, time
port, infile, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
t0 = time.time()
s = socket.create_connection(("127.0.0.1", port))
s.settimeout(10)
data = open(infile, "rb").read()
if data:
    s.sendall(data)
got = []
try:
    while True:
        b = s.recv(65536)
        if not b:
            break
        got.append(b)
except Exception as e:
    got.append(("<client error: %s>" % e).encode())
open(out, "wb").write(("%.3f\n" % (time.time() - t0)).encode() + b"".join(got))
]]

local raw_script = tmpname() .. ".py"
support.write(raw_script, RAW)

-- Runs the raw client to completion; returns the response bytes and seconds.
local function raw(port, data)
  local infile, out = tmpname(), tmpname()
  support.write(infile, data or "")
  local pid = start { "python3", raw_script, tostring(port), infile, out }
  assert.equal(0, process.wait(pid, 15000))
  local got = slurp(out)
  os.remove(infile)
  os.remove(out)
  local secs, rest = got:match("^([%d.]+)\n(.*)$")
  return rest, tonumber(secs)
end

local function listen(opts, handler)
  opts.host = HOST
  opts.port = opts.port or 0
  opts.handler = handler or function(_, res)
    res:respond(200, { ["content-type"] = "text/plain" }, "ok")
  end
  return assert(aiorch.server.listen(opts))
end

local function get(port, path, headers, timeout_ms)
  return aiorch.http.request {
    url = fmt("http://%s:%d%s", HOST, port, path or "/"),
    headers = headers,
    timeout_ms = timeout_ms or 10000,
  }
end

-- Slow clients (tests/hostile_client.py trickle): N connections, each
-- sending `head` and then one byte of `bytes` every `every` seconds
-- (cycling), until the server closes it or `secs` pass. Starts them;
-- returns a function that waits for them and returns their {secs, status}
-- records (secs from the first byte to the close, or -1; status or 0).
local client_script = (debug.getinfo(1, "S").source:match("^@(.*)/tests/spec/[^/]+$") or ".")
  .. "/tests/hostile_client.py"
local function trickle(port, n, every, secs, head, bytes)
  local out = tmpname()
  local pid = start({ "python3", client_script, "trickle", tostring(port), tostring(n), tostring(every),
    tostring(secs), head, bytes }, { stdout = out })
  return function()
    assert.equal(0, process.wait(pid, (secs + 20) * 1000))
    local list = {}
    for line in (slurp(out) or ""):gmatch("[^\n]+") do
      local t, st = line:match("^(%S+) (%d+)$")
      list[#list + 1] = { secs = tonumber(t), status = tonumber(st) }
    end
    os.remove(out)
    return list
  end
end

describe("aiorch.server limits", function()
  it("closes an idle connection after idle_timeout_ms, silently", function()
    local srv = listen { idle_timeout_ms = 200 }
    local got, secs = raw(srv.port, "")
    assert.equal("", got)
    assert.is_true(secs >= 0.15 and secs < 3, "closed after " .. secs)
    assert.equal(1, srv:stats().timed_out)
    srv:close()
  end)

  it("closes an idle keep-alive connection between requests", function()
    local srv = listen { idle_timeout_ms = 200 }
    local got, secs = raw(srv.port, "GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    assert.truthy(got:find("^HTTP/1.1 200"))
    assert.is_true(secs >= 0.15 and secs < 3)
    srv:close()
  end)

  it("answers 408 when the headers do not arrive within header_timeout_ms", function()
    local srv = listen { header_timeout_ms = 200 }
    local got, secs = raw(srv.port, "GET / HTTP/1.1\r\nhost: x\r\n")
    assert.truthy(got:find("^HTTP/1.1 408"), got)
    assert.truthy(got:find("connection: close", 1, true))
    assert.is_true(secs >= 0.15 and secs < 3)
    srv:close()
  end)

  it("answers 408 when the body stalls for read_timeout_ms", function()
    local srv = listen { read_timeout_ms = 200 }
    local got = raw(srv.port, "POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc")
    assert.truthy(got:find("^HTTP/1.1 408"), got)
    srv:close()
  end)

  it("answers 408 when the body takes longer than body_timeout_ms in all", function()
    local srv = listen { body_timeout_ms = 400, read_timeout_ms = 5000 }
    -- a byte every 50 ms keeps the gap short, not the total
    local wait = trickle(srv.port, 1, 0.05, 5 * SLOWDOWN,
      "POST / HTTP/1.1\\r\\nhost: x\\r\\ncontent-length: 1000\\r\\n\\r\\n", "b")
    local list = wait()
    assert.equal(408, list[1].status)
    assert.is_true(list[1].secs >= 0.35 and list[1].secs < 2 * SLOWDOWN, "closed after " .. list[1].secs)
    srv:close()
  end)

  -- #timing: it bounds a normal request's latency.
  it("closes 50 slowloris connections at the header timeout and serves a normal client meanwhile #timing",
    function()
    local srv = listen { header_timeout_ms = 800 }
    -- a byte every 200 ms: each read is far inside any gap timeout
    local wait = trickle(srv.port, 50, 0.2, 6 * SLOWDOWN, "GET / HTTP/1.1\\r\\nhost: x\\r\\nx-slow: ", "abcdefgh")
    aiorch.sleep(100)
    local worst, served = 0, 0
    local t_end = aiorch.now() + 1500
    while aiorch.now() < t_end do
      local t0 = aiorch.now()
      local status = get(srv.port, "/")
      worst = math.max(worst, aiorch.now() - t0)
      if status == 200 then
        served = served + 1
      end
      aiorch.sleep(20)
    end
    local list = wait()
    assert.equal(50, #list)
    for _, c in ipairs(list) do
      assert.equal(408, c.status)
      assert.is_true(c.secs >= 0.75 and c.secs < 1.6 * SLOWDOWN, "closed after " .. c.secs)
    end
    assert.is_true(served >= 20, "served " .. served)
    assert.is_true(worst < 250 * SLOWDOWN, "a normal request took " .. worst .. " ms")
    assert.equal(50, srv:stats().timed_out)
    srv:close()
  end)

  it("lets on_refuse word a refusal once the headers are in", function()
    local seen = {}
    local srv
    srv = listen { max_body = 100, read_timeout_ms = 200, max_header = 1024,
      on_refuse = function(status, req)
        seen[#seen + 1] = status .. " " .. req.method .. " " .. req.path .. " " .. tostring(req.headers["x-api"])
        if req.headers["x-api"] == "boom" then
          error("a broken hook")
        end
        if req.headers["x-api"] == "close" then
          srv:close() -- refused: it would free the connection being answered
        end
        return '{"error":' .. status .. '}', "application/json"
      end }
    -- over max_body by content-length: refused before the body is read
    local got = raw(srv.port, "POST /v1/x?q=1 HTTP/1.1\r\nhost: x\r\nX-Api: a\r\ncontent-length: 500\r\n\r\n")
    assert.truthy(got:find("^HTTP/1.1 413"), got)
    assert.truthy(got:find("content-type: application/json\r\n", 1, true), got)
    assert.truthy(got:find("connection: close", 1, true), got)
    assert.truthy(got:find('\r\n\r\n{"error":413}$'), got)
    -- a body that stalls
    got = raw(srv.port, "POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc")
    assert.truthy(got:find('^HTTP/1.1 408.*\r\n\r\n{"error":408}$'), got)
    -- a hook that fails: the plain answer, and the server goes on
    got = raw(srv.port, "POST /c HTTP/1.1\r\nhost: x\r\nx-api: boom\r\ncontent-length: 500\r\n\r\n")
    assert.truthy(got:find("^HTTP/1.1 413.*content%-type: text/plain.*payload too large"), got)
    -- before the headers are complete there is no request to word it for
    got = raw(srv.port, "GET / HTTP/1.1\r\nhost: x\r\nx-big: " .. ("a"):rep(2000) .. "\r\n\r\n")
    assert.truthy(got:find("^HTTP/1.1 431.*content%-type: text/plain"), got)
    got = raw(srv.port, "POST /d HTTP/1.1\r\nhost: x\r\nx-api: close\r\ncontent-length: 500\r\n\r\n")
    assert.truthy(got:find("^HTTP/1.1 413.*payload too large"), got)
    assert.same({ "413 POST /v1/x?q=1 a", "408 POST /b nil", "413 POST /c boom", "413 POST /d close" }, seen)
    assert.equal(200, (get(srv.port, "/")))
    assert.has_error(function() listen { on_refuse = 1 } end)
    srv:close()
  end)

  it("answers 431 beyond max_header", function()
    local srv = listen { max_header = 1024 }
    local got = raw(srv.port, "GET / HTTP/1.1\r\nhost: x\r\nx-big: " .. ("a"):rep(2000) .. "\r\n\r\n")
    assert.truthy(got:find("^HTTP/1.1 431"), got)
    -- under the limit: served
    local status = get(srv.port, "/", { ["x-small"] = ("a"):rep(500) })
    assert.equal(200, status)
    srv:close()
  end)

  it("answers 503 to connections beyond max_connections", function()
    local srv = listen({ max_connections = 2 }, function(_, res)
      aiorch.sleep(400)
      res:respond(200, nil, "slow")
    end)
    local a = aiorch.spawn(get, srv.port, "/a")
    local b = aiorch.spawn(get, srv.port, "/b")
    aiorch.sleep(100)
    local got = raw(srv.port, "GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    assert.truthy(got:find("^HTTP/1.1 503"), got)
    assert.equal(200, a:await())
    assert.equal(200, b:await())
    assert.equal(1, srv:stats().refused)
    assert.equal(200, (get(srv.port, "/c")))
    srv:close()
  end)

  it("raises on bad limit options", function()
    assert.has_error(function() listen { max_connections = -1 } end)
    assert.has_error(function() listen { idle_timeout_ms = "x" } end)
    assert.has_error(function() listen { reuseport = 1 } end)
    assert.has_error(function() listen { max_header = 1.5 } end)
    assert.has_error(function() listen { body_timeout_ms = -1 } end)
    assert.has_error(function() listen { send_timeout_ms = "1" } end)
    assert.has_error(function() listen { raise_nofile = "yes" } end)
  end)

  it("lets several servers share a port with reuseport", function()
    local a = listen { reuseport = true }
    local b = listen { reuseport = true, port = a.port }
    assert.equal(a.port, b.port)
    local c, kind = aiorch.server.listen { host = HOST, port = a.port, handler = function() end }
    assert.is_nil(c)
    assert.equal("listen", kind)
    b:close()
    assert.equal(200, (get(a.port, "/")))
    a:close()
  end)
end)

describe("aiorch.server shutdown", function()
  it("finishes the request in flight with connection: close and returns 0", function()
    local srv = listen({}, function(_, res)
      aiorch.sleep(300)
      res:respond(200, nil, "done")
    end)
    local port = srv.port
    local idle = aiorch.spawn(raw, port, "GET / HTTP/1.1\r\nhost: x\r\n\r\n") -- keep-alive, then idle
    assert.truthy(wait_for(function() return srv:stats().requests == 1 end))
    local t = aiorch.spawn(get, port, "/slow")
    assert.truthy(wait_for(function() return srv:stats().requests == 2 end))
    aiorch.sleep(350) -- both served: their connections are idle
    local t2 = aiorch.spawn(get, port, "/slow2")
    assert.truthy(wait_for(function() return srv:stats().requests == 3 end))
    local t0 = aiorch.now()
    local cut = srv:shutdown(5000)
    assert.equal(0, cut)
    assert.is_true(aiorch.now() - t0 < 2000)
    local status, headers, body = t2:await()
    assert.equal(200, status)
    assert.equal("done", body)
    assert.equal("close", headers.connection)
    assert.equal(200, (t:await()))
    local got, secs = idle:await()
    assert.truthy(got:find("^HTTP/1.1 200"))
    assert.is_true(secs < 3) -- closed by the shutdown, not by a timeout
    -- not accepting any more
    local s2, kind = get(port, "/late", nil, 2000)
    assert.is_nil(s2)
    assert.equal("connect", kind)
    assert.equal(0, srv:shutdown(10)) -- done already
    assert.is_table(srv:stats())
    srv:close()
    assert.has_error(function() srv:stats() end)
  end)

  it("cuts what is left at the deadline and returns the count", function()
    local srv = listen({}, function(_, res)
      aiorch.sleep(5000)
      res:respond(200, nil, "never")
    end)
    local t = aiorch.spawn(get, srv.port, "/stuck")
    wait_for(function() return srv:stats().requests == 1 end)
    local t0 = aiorch.now()
    assert.equal(1, srv:shutdown(100))
    assert.is_true(aiorch.now() - t0 < 1000)
    local status = t:await()
    assert.is_nil(status)
    srv:close()
  end)

  it("raises on misuse", function()
    local srv = listen({}, function(_, res)
      aiorch.sleep(300)
      res:respond(200, nil, "x")
    end)
    assert.has_error(function() srv:shutdown(-1) end)
    local co = coroutine.wrap(function() return pcall(srv.shutdown, srv, 10) end)
    local ok = co()
    assert.is_false(ok)
    local t = aiorch.spawn(get, srv.port, "/")
    wait_for(function() return srv:stats().requests == 1 end)
    local s = aiorch.spawn(function() return srv:shutdown(2000) end)
    aiorch.sleep(10)
    assert.has_error(function() srv:shutdown(10) end) -- already shutting down
    assert.equal(0, s:await())
    assert.equal(200, (t:await()))
    srv:close()
    assert.has_error(function() srv:shutdown(10) end) -- closed
  end)

  it("closes at once when the shutdown is cancelled", function()
    local srv = listen({}, function(_, res)
      aiorch.sleep(5000)
      res:respond(200, nil, "never")
    end)
    local t = aiorch.spawn(get, srv.port, "/stuck")
    wait_for(function() return srv:stats().requests == 1 end)
    local s = aiorch.spawn(function() return srv:shutdown(5000) end)
    aiorch.sleep(20)
    assert.equal("waiting", s:status())
    assert.is_true(s:cancel())
    assert.is_nil((t:await(2000)))
    assert.equal(0, srv:stats().open)
    srv:close()
  end)
end)

-- ---- the real thing ------------------------------------------------------

-- Starts the mock providers; returns pid, port.
local function start_mock(extra)
  local out = tmpname()
  local argv = { EXE, "run", "tests/mock_server.lua" }
  for _, a in ipairs(extra or {}) do
    argv[#argv + 1] = a
  end
  local pid = start(argv, { stdout = out })
  local port = wait_for(function()
    local s = slurp(out)
    return s and tonumber(s:match("PORT (%d+)"))
  end)
  os.remove(out)
  assert(port, "the mock did not start")
  return pid, port
end

local free_port = support.free_port

local function wchar(pid)
  local s = slurp("/proc/" .. pid .. "/io")
  return s and tonumber(s:match("wchar: (%d+)")) or 0
end

local function chat(port, timeout_ms)
  return aiorch.http.request {
    method = "POST",
    url = fmt("http://%s:%d/v1/chat/completions", HOST, port),
    headers = { ["content-type"] = "application/json", connection = "close" },
    body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}',
    timeout_ms = timeout_ms or 10000,
  }
end

-- Starts `aiorch serve --workers 2` against the mock at mock_port.
local function start_serve(mock_port, log)
  local port = free_port()
  local base = fmt("http://%s:%d", HOST, mock_port)
  local pid = start({ EXE, "serve", "--workers", "2", "--listen", fmt("%s:%d", HOST, port) }, {
    stderr = log,
    env = {
      OPENAI_API_KEY = "test-key", OPENAI_BASE_URL = base .. "/v1",
      ANTHROPIC_API_KEY = "test-key", ANTHROPIC_BASE_URL = base,
    },
  })
  assert(wait_for(function() return #children(pid) == 2 and (get(port, "/healthz", nil, 500)) == 200 end, 10000),
    "serve did not start: " .. tostring(slurp(log)))
  assert(wait_for(function() return (slurp(log) or ""):find("2 workers listening") end, 10000))
  return pid, port
end

describe("aiorch serve --workers 2", function()
  local mock_port, slow_port
  local log = tmpname()

  setup(function()
    mock_port = select(2, start_mock())
    slow_port = select(2, start_mock { "--latency-ms", "800" })
  end)

  teardown(function()
    stop_all()
    os.remove(log)
    os.remove(raw_script)
  end)

  -- #timing: the master gives its workers 10 s to listen, too short under valgrind.
  it("spreads requests over both workers, restarts a killed one, reloads on SIGHUP #timing", function()
    local master, port = start_serve(mock_port, log)
    local workers = children(master)
    assert.equal(2, #workers)

    -- Fresh connections reach both workers (each writes its access log line).
    local before = { wchar(workers[1]), wchar(workers[2]) }
    for _ = 1, 40 do
      assert.equal(200, (chat(port)))
    end
    -- (access lines are written in batches, at most 50 ms late)
    assert.truthy(wait_for(function() return wchar(workers[1]) > before[1] end), "worker 1 served nothing")
    assert.truthy(wait_for(function() return wchar(workers[2]) > before[2] end), "worker 2 served nothing")

    -- SIGKILL a worker: the master starts another.
    assert.is_true(process.kill(workers[1], "SIGKILL"))
    local now_workers = wait_for(function()
      local c = children(master)
      return #c == 2 and c[1] ~= workers[1] and c[2] ~= workers[1] and c
    end, 5000)
    assert.truthy(now_workers, "the killed worker was not replaced")
    assert.truthy(slurp(log):find("died %(signal SIGKILL%); restarting"))
    assert.truthy(wait_for(function() return (chat(port, 2000)) == 200 end))

    -- SIGHUP: a new generation, no request failed meanwhile.
    local old = children(master)
    local failures, done, running = {}, 0, true
    local load = aiorch.spawn(function()
      while running do
        local status, kind, msg = chat(port)
        if status ~= 200 then
          failures[#failures + 1] = tostring(status or kind) .. " " .. tostring(msg)
        end
        done = done + 1
      end
    end)
    aiorch.sleep(100)
    assert.is_true(process.kill(master, "SIGHUP"))
    local fresh = wait_for(function()
      local c = children(master)
      if #c ~= 2 then
        return false
      end
      for _, p in ipairs(c) do
        if p == old[1] or p == old[2] then
          return false
        end
      end
      return c
    end, 10000)
    aiorch.sleep(200)
    running = false
    load:await(15000)
    assert.truthy(fresh, "no new generation")
    assert.is_true(done > 5, "too few requests during the reload: " .. done)
    assert.are.same({}, failures)
    assert.truthy(slurp(log):find("reload: generation 2 listening"))

    -- SIGTERM with nothing in flight: exits 0.
    assert.is_true(process.kill(master, "SIGTERM"))
    assert.equal(0, process.wait(master, 15000))
    assert.are.same({}, children(master))
    local stopped = 0
    for how in slurp(log):gmatch("stopped: ([^\n]+)") do -- the drained workers (old generation too)
      assert.equal("exit status 0", how)
      stopped = stopped + 1
    end
    assert.equal(4, stopped)
  end)

  it("on SIGTERM finishes the request in flight and exits 0", function()
    local slog = tmpname()
    local master, port = start_serve(slow_port, slog)
    local t = aiorch.spawn(chat, port, 10000)
    aiorch.sleep(300) -- in flight: the mock answers after 800 ms
    local t0 = aiorch.now()
    assert.is_true(process.kill(master, "SIGTERM"))
    local status, _, body = t:await()
    assert.equal(200, status)
    assert.truthy(body:find("mock openai", 1, true))
    assert.equal(0, process.wait(master, 15000))
    assert.is_true(aiorch.now() - t0 < 5000)
    -- and the port is closed
    assert.is_nil((get(port, "/healthz", nil, 1000)))
    os.remove(slog)
  end)

  it("refuses --workers with port 0, and runs one process with --workers 0", function()
    local pid = start { EXE, "serve", "--workers", "2", "--listen", "127.0.0.1:0" }
    assert.equal(2, process.wait(pid, 10000))
    local port = free_port()
    local slog = tmpname()
    pid = start({ EXE, "serve", "--workers", "0", "--listen", fmt("%s:%d", HOST, port) }, {
      stderr = slog,
      env = { OPENAI_API_KEY = "k", OPENAI_BASE_URL = fmt("http://%s:%d/v1", HOST, mock_port) },
    })
    assert.truthy(wait_for(function() return (get(port, "/healthz", nil, 500)) == 200 end, 10000))
    assert.are.same({}, children(pid))
    process.kill(pid, "SIGHUP") -- ignored
    aiorch.sleep(100)
    assert.equal(200, (chat(port)))
    process.kill(pid, "SIGTERM")
    assert.equal(0, process.wait(pid, 10000))
    os.remove(slog)
  end)

  it("stops its workers when the master is killed", function()
    local slog = tmpname()
    local master, port = start_serve(mock_port, slog)
    local workers = children(master)
    process.kill(master, "SIGKILL")
    process.wait(master, 5000)
    local function gone(pid) -- exited (a zombie until someone reaps it) or reaped
      local st = slurp("/proc/" .. pid .. "/stat")
      return not st or st:match("^%d+ %b() (%a)") == "Z"
    end
    assert.truthy(wait_for(function() return gone(workers[1]) and gone(workers[2]) end, 10000),
      "orphaned workers")
    assert.is_nil((get(port, "/healthz", nil, 500)))
    os.remove(slog)
  end)
end)

describe("aiorch.gateway.master", function()
  it("restarts a worker that keeps dying with a growing backoff, and stops on SIGTERM", function()
    local master = require "aiorch.gateway.master"
    local lines = {}
    local t = aiorch.spawn(master.run, {
      argv = { "sh", "-c", "exit 3" }, workers = 1, ready_timeout_ms = 50,
      log = function(line) lines[#lines + 1] = line end,
    })
    aiorch.sleep(1000)
    assert.is_true(process.kill(process.pid(), "SIGTERM")) -- caught by the master's signal.wait
    assert.equal(0, t:await(5000))
    for _, sig in ipairs { "SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP" } do
      aiorch.signal.reset(sig)
    end
    local delays = {}
    for _, line in ipairs(lines) do
      local d = line:match("died %(exit status 3%); restarting in (%d+) ms")
      if d then
        delays[#delays + 1] = tonumber(d)
      end
    end
    assert.are.same({ 100, 200, 400 }, { delays[1], delays[2], delays[3] })
    assert.is_true(#delays <= 5, "no backoff: " .. #delays .. " restarts")
    assert.truthy(lines[#lines]:find("SIGTERM: stopping") or lines[#lines]:find("stopped"))
  end)

  -- A second SIGHUP while the first reload's drain runs. The first reload's
  -- kill deadline (drain_timeout_ms + kill_grace_ms after it) must reach
  -- only the generation it drained, not the third one. #timing: the stream
  -- and the deadlines are a few seconds each.
  it("survives two SIGHUPs during a drain: the stream completes, the newest generation lives and serves #timing",
    function()
      local master = require "aiorch.gateway.master"
      local mock_mod = require "aiorch.mock"
      local DRAIN_MS, GRACE_MS = 5000, 500
      local TEXT = string.rep("tick ", 60)
      local m = assert(mock_mod.start { defaults = { chunks = 30, chunk_delay_ms = 100, text = TEXT } })
      local cfg = tmpname() .. ".lua"
      local f = assert(io.open(cfg, "w"))
      f:write(fmt("return { drain_timeout_ms = %d, access_log = false }\n", DRAIN_MS))
      f:close()
      local port = free_port()
      local lines = {}
      local t = aiorch.spawn(master.run, {
        argv = { "env", "OPENAI_API_KEY=sk-master-spec", "OPENAI_BASE_URL=" .. m:base_url("openai"),
          EXE, "serve", "--worker", "--listen", fmt("%s:%d", HOST, port), "--config", cfg },
        workers = 1, drain_timeout_ms = DRAIN_MS, kill_grace_ms = GRACE_MS,
        log = function(line) lines[#lines + 1] = line end,
      })
      assert.truthy(wait_for(function() return (get(port, "/healthz", nil, 500)) == 200 end, 10000),
        "the master's worker did not start")
      local url = fmt("http://%s:%d/v1/chat/completions", HOST, port)
      local headers = { ["content-type"] = "application/json", ["x-aiorch-providers"] = "openai" }

      -- the stream, about 3 s long
      local first = false
      local stream = aiorch.spawn(function()
        local status, _, _, text, done = support.stream_chat(url, headers,
          '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"count"}]}', 30000,
          function() first = true end)
        return status, text, done
      end)
      -- plain requests all along: none may fail
      local failures, served, running = {}, 0, true
      local load = aiorch.spawn(function()
        while running do
          local status, kind, msg = aiorch.http.request {
            method = "POST", url = url, headers = headers, timeout_ms = 10000,
            body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}',
          }
          if status ~= 200 then
            failures[#failures + 1] = tostring(status or kind) .. " " .. tostring(msg)
          end
          served = served + 1
          aiorch.sleep(20)
        end
      end)

      assert.truthy(wait_for(function() return first end, 5000), "the stream did not start")
      local t0 = aiorch.now()
      assert.is_true(process.kill(process.pid(), "SIGHUP"))
      aiorch.sleep(1000)
      assert.is_true(process.kill(process.pid(), "SIGHUP"))
      local newest = wait_for(function()
        local list = {}
        for pid, w in pairs(master.current.workers) do
          if w.gen == 3 then
            list[#list + 1] = pid
          end
        end
        return #list == 1 and list
      end, 10000)
      assert.truthy(newest, "no third generation")
      -- past the first reload's kill deadline
      aiorch.sleep(math.max(0, t0 + DRAIN_MS + GRACE_MS + 1000 - aiorch.now()))
      running = false
      load:await(15000)

      local status, text, done = stream:await(30000)
      assert.equal(200, status)
      assert.equal(TEXT, text)
      assert.is_true(done)
      assert.are.same({}, failures)
      assert.is_true(served > 20, "too few requests: " .. served)
      -- the newest generation alone is left, and it serves
      local left = {}
      for pid, w in pairs(master.current.workers) do
        left[#left + 1] = pid .. ":" .. w.gen
      end
      assert.are.same({ newest[1] .. ":3" }, left)
      assert.is_true(process.kill(newest[1], "SIGCONT"), "the newest worker is gone")
      assert.equal(200, (get(port, "/healthz", nil, 2000)))
      for _, line in ipairs(lines) do
        assert.falsy(line:find("SIGKILL", 1, true), line)
      end

      assert.is_true(process.kill(process.pid(), "SIGTERM"))
      assert.equal(0, t:await(15000))
      for _, sig in ipairs { "SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP" } do
        aiorch.signal.reset(sig)
      end
      local stopped = 0
      for line in table.concat(lines, "\n"):gmatch("stopped: ([^\n]+)") do
        assert.equal("exit status 0", line)
        stopped = stopped + 1
      end
      assert.equal(3, stopped)
      os.remove(cfg)
      m:close()
    end)
end)

-- Clients that ask for a stream and never read it: the gateway pauses the
-- upstream transfer (bench/hostile.lua `streams` does it with 150 clients).
describe("aiorch serve with clients that stop reading", function()
  -- Under the sanitizers (shadow memory, quarantine) or valgrind RSS says
  -- nothing about our own buffers: the memory bound is checked only in
  -- the plain build.
  local SANITIZED = support.under_asan() or SLOWDOWN > 1
  local CLIENTS = 8

  local function rss_kib(pid)
    return support.status_kib(pid, "VmRSS")
  end

  teardown(stop_all)

  it("stall the upstream's sends, and the gateway's memory stays bounded", function()
    local mock_mod = require "aiorch.mock"
    -- a fast, long stream: 20,000 events, about 6 MB
    local function text(n)
      local words = {}
      for i = 1, n do
        words[i] = "w" .. i
      end
      return table.concat(words, " ")
    end
    local m = assert(mock_mod.start { defaults = { text = text(200000), chunks = 20000 } })
    local port = free_port()
    local glog = tmpname()
    local gw = start({ EXE, "serve", "--workers", "0", "--listen", fmt("%s:%d", HOST, port) }, {
      stderr = glog, env = { OPENAI_API_KEY = "sk-idle-spec", OPENAI_BASE_URL = m:base_url("openai") },
    })
    assert.truthy(wait_for(function() return (get(port, "/healthz", nil, 500)) == 200 end, 10000))
    -- one stream read whole: the warm-up, and the stream's size
    local status = aiorch.http.request {
      method = "POST", url = fmt("http://%s:%d/v1/chat/completions", HOST, port), timeout_ms = 60000,
      headers = { ["content-type"] = "application/json", ["x-aiorch-providers"] = "openai" },
      body = '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Warm up"}]}',
      on_event = function() end,
    }
    assert.equal(200, status)
    local size = m.requests[#m.requests].sent
    assert.is_true(size > 5 * 1024 * 1024, "a short stream: " .. size)
    m:reset()
    aiorch.sleep(700) -- the gateway gives memory back once idle
    local rss0 = rss_kib(gw)

    -- clients that each send a streamed request and never read
    local out = tmpname()
    local clients = start({ "python3", client_script, "streams", tostring(port), tostring(CLIENTS), "Tell me all" },
      { stdout = out })
    assert.truthy(wait_for(function() return (slurp(out) or ""):find("SENT") end, 10000))
    -- every upstream stream ends up parked in a write
    local stalled = wait_for(function() return #m.requests == CLIENTS and m:stats().writing == CLIENTS end, 15000)
    local peak = rss_kib(gw)
    for _ = 1, 10 do -- and stays there
      aiorch.sleep(100)
      peak = math.max(peak, rss_kib(gw))
    end
    local st = m:stats()
    local sent, done = {}, 0
    for i, r in ipairs(m.requests) do
      sent[i] = r.sent or 0
      if r.completed_at then
        done = done + 1
      end
    end

    process.kill(clients, "SIGKILL")
    process.wait(clients, 5000)
    -- the gateway cancels the transfers of the clients that left
    local cancelled = wait_for(function()
      for _, r in ipairs(m.requests) do
        if not r.aborted_at then
          return false
        end
      end
      return true
    end, 5000)
    process.kill(gw, "SIGTERM")
    assert.equal(0, process.wait(gw, 10000))
    m:close()
    os.remove(out)
    os.remove(glog)

    assert.truthy(stalled, fmt("%d of %d upstream streams stalled", st.writing, CLIENTS))
    assert.equal(CLIENTS, st.writing)
    assert.equal(0, done)
    for i = 1, CLIENTS do
      assert.is_true(sent[i] < size // 2, fmt("stream %d sent %d of %d bytes", i, sent[i], size))
    end
    assert.is_true(st.write_waits >= CLIENTS)
    assert.truthy(cancelled, "an upstream transfer outlived its client")
    if not SANITIZED then
      -- about 0.7 MiB each (the paused events, the text so far, the output);
      -- without backpressure, the whole 6 MB stream and more
      local grown = (peak - rss0) / 1024
      assert.is_true(grown < 2 * CLIENTS, fmt("the gateway grew by %.1f MiB for %d clients", grown, CLIENTS))
    end
  end)
end)
