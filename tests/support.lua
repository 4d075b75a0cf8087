-- Helpers shared by the specs that drive a real gateway over loopback:
-- HTTP calls, temporary directories, and `aiorch serve` processes.
--   local support = require "tests.support"
local aiorch = require "aiorch"
local cjson = require "cjson.safe"

local process = aiorch.process

local _M = {}

-- AIORCH_TEST_SLOWDOWN (.ci/valgrind): waits, and margins that only guard
-- against a slow runtime, stretch by it.
_M.SLOWDOWN = tonumber(os.getenv("AIORCH_TEST_SLOWDOWN") or "") or 1

function _M.stretch(ms)
  return math.ceil(ms * _M.SLOWDOWN)
end

-- One request; returns status, headers, body and the body decoded as JSON.
-- Fails the test when the request itself fails (no answer at all).
function _M.request(method, url, body, headers, timeout_ms)
  local h = { ["content-type"] = "application/json" }
  for k, v in pairs(headers or {}) do
    h[k] = v
  end
  local status, rh, rb = aiorch.http.request { method = method, url = url, headers = h,
    body = type(body) == "table" and assert(cjson.encode(body)) or body,
    timeout_ms = timeout_ms or _M.stretch(10000) }
  assert(status, "request failed: " .. tostring(rh) .. " " .. tostring(rb))
  return status, rh, rb, cjson.decode(rb or "")
end

function _M.post(url, body, headers, timeout_ms)
  return _M.request("POST", url, body, headers, timeout_ms)
end

function _M.get(url, headers)
  return _M.request("GET", url, nil, headers)
end

-- A new table with the fields of each argument in turn (a nil is skipped;
-- a later one wins): a base table and a test's additions to it.
function _M.merge(...)
  local out = {}
  for i = 1, select("#", ...) do
    for k, v in pairs(select(i, ...) or {}) do
      out[k] = v
    end
  end
  return out
end

-- Whether no value of the list a is in the list b (no old pid left).
function _M.none_in(a, b)
  for _, x in ipairs(a) do
    for _, y in ipairs(b) do
      if x == y then
        return false
      end
    end
  end
  return true
end

function _M.slurp(path)
  local f = io.open(path, "rb")
  if not f then
    return ""
  end
  local s = f:read("a")
  f:close()
  return s
end

function _M.write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

-- A file's text, or nil when it cannot be read (slurp gives "" then).
function _M.read(path)
  local f = io.open(path, "rb")
  if not f then
    return nil
  end
  local s = f:read("a")
  f:close()
  return s
end

-- A fresh path in the temporary directory, with nothing there yet.
function _M.tmpname()
  local p = os.tmpname()
  os.remove(p)
  return p
end

function _M.sh_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Calls cond every `every` ms (default 5) until it returns a true value,
-- for at most stretch(ms) (default 5000); returns that value, or what
-- cond returns once the time is up.
function _M.wait_for(cond, ms, every)
  local deadline = aiorch.now() + _M.stretch(ms or 5000)
  repeat
    local v = cond()
    if v then
      return v
    end
    aiorch.sleep(every or 5)
  until aiorch.now() > deadline
  return cond()
end

-- A field of /proc/PID/status (VmRSS, VmHWM) in KiB; 0 once it is gone.
function _M.status_kib(pid, field)
  local s = _M.read("/proc/" .. pid .. "/status") or ""
  return tonumber(s:match(field .. ":%s*(%d+)")) or 0
end

-- Whether AddressSanitizer's library is mapped: then shadow memory and
-- the quarantine dwarf the RSS of the runtime's own buffers.
function _M.under_asan()
  return (_M.read("/proc/self/maps") or ""):find("libasan", 1, true) ~= nil
end

-- Processes run by start(), in their order; stop() and stop_all() end them.
local started = {}

-- Spawns argv with process.spawn's opts, under `ulimit -n nofile` (soft
-- and hard) when nofile is given; returns its pid.
function _M.start(argv, opts, nofile)
  if nofile then
    local words = {}
    for i, a in ipairs(argv) do
      words[i] = _M.sh_quote(a)
    end
    argv = { "sh", "-c", string.format("ulimit -n %d && exec %s", nofile, table.concat(words, " ")) }
  end
  local pid = assert(process.spawn(argv, opts))
  started[#started + 1] = pid
  return pid
end

-- Takes pid off start()'s list (it was waited for); true when it was there.
function _M.forget(pid)
  for i, p in ipairs(started) do
    if p == pid then
      table.remove(started, i)
      return true
    end
  end
  return false
end

-- SIGKILLs a process run by start() and waits for it.
function _M.stop(pid)
  if _M.forget(pid) and process.kill(pid, "SIGKILL") then
    process.wait(pid, 5000)
  end
end

-- Stops every process start() ran that is not stopped yet.
function _M.stop_all()
  while started[1] do
    _M.stop(started[1])
  end
end

-- The pids of a process's children, ascending.
function _M.children(pid)
  local p = io.popen("pgrep -P " .. pid)
  local list = {}
  for line in p:lines() do
    list[#list + 1] = tonumber(line)
  end
  p:close()
  table.sort(list)
  return list
end

-- Whether pid is there and not a zombie.
function _M.alive(pid)
  local s = _M.read("/proc/" .. pid .. "/stat")
  return s ~= nil and s:match("%) (%a)") ~= "Z"
end

-- Runs argv (start()) with its stdout in a file; returns a function that
-- waits for its end (stretch(ms), default 30 s), checks that it exited 0
-- and returns its output's lines.
function _M.start_lines(argv, ms)
  local out = _M.tmpname()
  local words = {}
  for i, a in ipairs(argv) do
    words[i] = tostring(a)
  end
  local pid = _M.start(words, { stdout = out })
  return function()
    local code = process.wait(pid, _M.stretch(ms or 30000))
    _M.forget(pid)
    assert(code == 0, "the client failed: " .. tostring(code))
    local lines = {}
    for line in (_M.read(out) or ""):gmatch("[^\n]+") do
      lines[#lines + 1] = line
    end
    os.remove(out)
    return lines
  end
end

-- Starts `aiorch serve --workers 0` (start(): stop it with stop(pid)) with
-- the configuration text cfg and env; opts: nofile (start()'s), exe (the
-- program, default this one). Returns pid, port and its stderr's file once
-- it says it listens.
function _M.start_serve(cfg, env, opts)
  opts = opts or {}
  local port = _M.free_port()
  local errfile, cfgfile = _M.tmpname(), _M.tmpname() .. ".lua"
  _M.write(cfgfile, cfg)
  local pid = _M.start({ opts.exe or process.exe(), "serve", "--workers", "0", "--listen", "127.0.0.1:" .. port,
    "--config", cfgfile }, { stderr = errfile, env = env }, opts.nofile)
  assert(_M.wait_for(function() return (_M.read(errfile) or ""):find("listening on", 1, true) end),
    "the gateway did not start: " .. tostring(_M.read(errfile)))
  os.remove(cfgfile)
  return pid, port, errfile
end

-- A new empty directory; removed by _M.cleanup().
local dirs = {}
function _M.tmpdir()
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p '" .. dir .. "'"))
  dirs[#dirs + 1] = dir
  return dir
end

function _M.free_port()
  local probe = assert(aiorch.server.listen { host = "127.0.0.1", port = 0, handler = function() end })
  local port = probe.port
  probe:close()
  return port
end

-- Waits until url answers (any status).
function _M.wait_up(url, ms)
  local deadline = aiorch.now() + (ms or _M.stretch(10000))
  while aiorch.now() < deadline do
    if aiorch.http.request { url = url, timeout_ms = 500 } then
      return true
    end
    aiorch.sleep(20)
  end
  return false
end

-- Starts `aiorch serve --workers 0` with a config (a Lua source text) and
-- env (a table; false unsets). opts: path (a --path dir), args (more
-- arguments), workers (N: a master and N workers, waited for until all
-- listen), config_workers (N: as many, set by the configuration's
-- `workers`). Returns {base, pid, err (stderr's file), dir, stop()}.
local serving = {}
function _M.serve(config_text, env, opts)
  opts = opts or {}
  local dir = _M.tmpdir()
  local conf = dir .. "/gateway.lua"
  _M.write(conf, config_text)
  local port = _M.free_port()
  local workers = opts.workers or opts.config_workers or 0
  local argv = { process.exe(), "serve", "--config", conf, "--listen", "127.0.0.1:" .. port }
  if not opts.config_workers then -- (else the configuration's `workers` says how many)
    table.insert(argv, 3, "--workers")
    table.insert(argv, 4, tostring(workers))
  end
  if opts.path then
    argv[#argv + 1] = "--path"
    argv[#argv + 1] = opts.path
  end
  for _, a in ipairs(opts.args or {}) do
    argv[#argv + 1] = a
  end
  local err = dir .. "/stderr"
  local pid = assert(process.spawn(argv, { stderr = err, stdout = dir .. "/stdout", env = env,
    death_signal = "TERM" }))
  local s = { base = "http://127.0.0.1:" .. port, pid = pid, err = err, dir = dir }
  function s.stop()
    if s.pid then
      process.kill(s.pid, "TERM")
      local code = process.wait(s.pid, _M.stretch(10000))
      s.pid = nil
      return code
    end
  end
  serving[#serving + 1] = s
  assert(_M.wait_up(s.base .. "/healthz"), "the gateway did not start: " .. _M.slurp(err))
  if workers > 0 then
    local deadline = aiorch.now() + _M.stretch(10000)
    while not _M.slurp(err):find(workers .. " workers listening", 1, true) do
      assert(aiorch.now() < deadline, "the workers did not start: " .. _M.slurp(err))
      aiorch.sleep(20)
    end
  end
  return s
end

-- The access lines a gateway wrote so far (they are written in batches,
-- at most 50 ms after their request ends), but those of the start-up's
-- health checks.
function _M.access_lines(s)
  aiorch.sleep(120)
  local out = {}
  for line in _M.slurp(s.err):gmatch("[^\n]+") do
    if line:find("^aiorch: access ") and not line:find(" path=/healthz ", 1, true) then
      out[#out + 1] = line
    end
  end
  return out
end

-- POSTs an OpenAI chat request for a stream (body: its JSON text) to url
-- and reads the stream to its end. Returns aiorch.http.request's status
-- (or nil, kind, message), the text of the deltas and whether [DONE]
-- came; on_event, when given, sees each event first.
function _M.stream_chat(url, headers, body, timeout_ms, on_event)
  local deltas, done = {}, false
  local status, kind, msg = aiorch.http.request {
    method = "POST", url = url, headers = headers, body = body, timeout_ms = timeout_ms,
    on_event = function(ev)
      if on_event then
        on_event(ev)
      end
      if ev.data == "[DONE]" then
        done = true
        return
      end
      local j = cjson.decode(ev.data)
      local c = j and j.choices and j.choices[1]
      if c and c.delta and type(c.delta.content) == "string" then
        deltas[#deltas + 1] = c.delta.content
      end
    end,
  }
  return status, kind, msg, table.concat(deltas), done
end

-- Parses a whole SSE body into {event = name|nil, data = text, json =
-- data decoded or nil} records.
function _M.sse(body)
  local out = {}
  for block in (body .. "\n\n"):gmatch("(.-)\n\n") do
    if block ~= "" then
      local ev = { data = {} }
      for line in block:gmatch("[^\n]+") do
        local k, v = line:match("^(%w+): ?(.*)$")
        if k == "event" then
          ev.event = v
        elseif k == "data" then
          ev.data[#ev.data + 1] = v
        end
      end
      ev.data = table.concat(ev.data, "\n")
      ev.json = cjson.decode(ev.data)
      out[#out + 1] = ev
    end
  end
  return out
end

-- Gateways started in this process by start_gateway(); close_gateways()
-- closes them.
local gateways = {}

-- Starts an aiorch.gateway.server on a free port with the configuration
-- table raw, checked with the variables of env (a table); its access
-- lines go to access_log (default: dropped). Returns its base URL and
-- its handle.
function _M.start_gateway(raw, env, access_log)
  local gconfig = require "aiorch.gateway.config"
  local gateway = require "aiorch.gateway.server"
  local cfg = assert(gconfig.check(raw or {}, function(k) return env[k] end))
  local h = assert(gateway.start { config = cfg, port = 0, access_log = access_log or function() end })
  gateways[#gateways + 1] = h
  return "http://127.0.0.1:" .. h.port, h
end

function _M.close_gateways()
  for _, h in ipairs(gateways) do
    h:close()
  end
  gateways = {}
end

-- For a spec (or a describe block): an aiorch.mock server, started by
-- setup() with opts (default: on 127.0.0.1, a free port) and handed to
-- set; before each test its requests and counters, the metrics and the
-- circuit breakers are reset; teardown() closes it and calls cleanup().
function _M.use_mock(set, opts)
  local busted = require "busted" -- the running busted's API: a spec's setup() and the rest
  local setup, teardown, before_each = busted.setup, busted.teardown, busted.before_each
  local mock_mod = require "aiorch.mock"
  local metrics = require "aiorch.metrics"
  local breaker = require "aiorch.breaker"
  local m
  setup(function()
    m = assert(mock_mod.start(opts or { host = "127.0.0.1", port = 0 }))
    set(m)
  end)
  teardown(function()
    m:close()
    _M.cleanup()
  end)
  before_each(function()
    m:reset()
    m:reset_counters()
    metrics.reset()
    breaker.reset() -- each test starts with every provider healthy
  end)
end

-- The environment of providers openai and anthropic at an aiorch.mock
-- server m, with their keys (keys.openai, keys.anthropic), the mock
-- directives o and a for each, and extra variables.
function _M.mock_env(m, keys, o, a, extra)
  local env = {
    OPENAI_API_KEY = keys.openai, ANTHROPIC_API_KEY = keys.anthropic,
    OPENAI_BASE_URL = m:base_url("openai", o or {}), ANTHROPIC_BASE_URL = m:base_url("anthropic", a or {}),
  }
  for k, v in pairs(extra or {}) do
    env[k] = v
  end
  return env
end

-- An SSE body's events as {event = name|nil, data = the data decoded, or
-- the text "[DONE]"}.
function _M.sse_events(body)
  local out = {}
  for i, ev in ipairs(_M.sse(body)) do
    out[i] = { event = ev.event, data = ev.data == "[DONE]" and ev.data or ev.json }
  end
  return out
end

-- Runs `aiorch ARGS...` (this program) with env to its end, for at most
-- stretch(ms) (default 20 s); returns its exit code, stdout and stderr.
function _M.run_aiorch(args, env, ms)
  local dir = _M.tmpdir()
  local argv = { process.exe() }
  for _, a in ipairs(args) do
    argv[#argv + 1] = a
  end
  local pid = assert(process.spawn(argv, { env = env, stdout = dir .. "/out", stderr = dir .. "/err" }))
  local code = process.wait(pid, _M.stretch(ms or 20000))
  return code, _M.slurp(dir .. "/out"), _M.slurp(dir .. "/err")
end

-- The requests an aiorch.mock server received for one api, in order.
function _M.requests_of(mock, api)
  local out = {}
  for _, r in ipairs(mock.requests) do
    if r.api == api then
      out[#out + 1] = r
    end
  end
  return out
end

-- Fails unless none of keys (a table's values) is in text; what names
-- them in the message (default "a key"), never the key itself.
function _M.no_keys_in(text, keys, what)
  for _, key in pairs(keys) do
    assert(not text:find(key, 1, true), (what or "a key") .. " leaked")
  end
end

-- A Prometheus sample's value.
function _M.metric(text, name)
  local v = text:match("\n" .. name:gsub("[%-%.%[%]%(%)%+%*%?%^%$%%]", "%%%0") .. " ([%d%.e%+%-]+)")
  return tonumber(v)
end

-- Stops every gateway started and removes every directory made.
function _M.cleanup()
  for _, s in ipairs(serving) do
    s.stop()
  end
  serving = {}
  for _, d in ipairs(dirs) do
    os.execute("rm -rf '" .. d .. "'")
  end
  dirs = {}
end

return _M
