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
