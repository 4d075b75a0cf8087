-- A real redis-server for the specs: on a free loopback port, with no
-- persistence, stopped by its PID. .ci/setup installs it.
--   local rs = require("tests.redis_server").start()
--   rs.url --> "redis://127.0.0.1:PORT"; rs.kill(); rs.restart(); rs.stop()
local aiorch = require "aiorch"
local support = require "tests.support"

local process = aiorch.process

local _M = {}

-- A socket that takes connections (the kernel's backlog) and never answers:
-- a Redis that hangs. Returns {port, stop()}.
function _M.silent()
  local port = support.free_port()
  local code = "import socket, time\n" ..
    "s = socket.socket()\n" ..
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n" ..
    "s.bind(('127.0.0.1', " .. port .. "))\n" ..
    "s.listen(64)\n" ..
    "print('ready', flush=True)\n" ..
    "time.sleep(600)\n"
  local dir = support.tmpdir()
  local pid = assert(process.spawn({ "python3", "-c", code }, { stdout = dir .. "/out", death_signal = "KILL" }))
  local deadline = aiorch.now() + support.stretch(5000)
  while not support.slurp(dir .. "/out"):find("ready", 1, true) do
    assert(aiorch.now() < deadline, "the silent server did not start")
    aiorch.sleep(10)
  end
  local s = { port = port, pid = pid }
  function s.stop()
    if s.pid then
      process.kill(s.pid, "KILL")
      process.wait(s.pid, support.stretch(5000))
      s.pid = nil
    end
  end
  return s
end

local function ping(url)
  local c = aiorch.redis.connect(url, { timeout_ms = 200, backoff_ms = 1 })
  local v = c and c:call("PING")
  if c then
    c:close()
  end
  return v == "PONG"
end

-- Starts redis-server (on port, or a free one). Returns {port, url, pid,
-- stop(), kill() (SIGKILL, as a crash), restart() (on the same port)}.
function _M.start(port)
  local s = { port = port or support.free_port(), dir = support.tmpdir() }
  s.url = "redis://127.0.0.1:" .. s.port
  function s.restart()
    local pid, _, msg = process.spawn({ "redis-server", "--port", tostring(s.port), "--bind", "127.0.0.1",
      "--save", "", "--appendonly", "no", "--dir", s.dir }, { stdout = s.dir .. "/log", death_signal = "KILL" })
    assert(pid, "redis-server cannot run (run .ci/setup): " .. tostring(msg))
    s.pid = pid
    local deadline = aiorch.now() + support.stretch(10000)
    while not ping(s.url) do
      assert(aiorch.now() < deadline, "redis-server did not start: " .. support.slurp(s.dir .. "/log"))
      aiorch.sleep(20)
    end
    return s
  end
  local function halt(sig)
    if s.pid then
      process.kill(s.pid, sig)
      process.wait(s.pid, support.stretch(10000))
      s.pid = nil
    end
  end
  function s.stop()
    halt("TERM")
  end
  function s.kill()
    halt("KILL")
  end
  return s.restart()
end

return _M
