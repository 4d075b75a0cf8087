-- The multi-worker supervisor of `aiorch serve`, as nginx's master does it:
-- N worker processes share the port (SO_REUSEPORT); a worker that dies is
-- restarted (with a backoff against crash loops); SIGTERM / SIGINT drains
-- the workers and exits 0; SIGHUP starts a new generation of workers and,
-- once each is listening, gracefully stops the old one.
--
-- A worker tells the master it is listening by writing its pid to the file
-- named by AIORCH_WORKER_READY. Workers get SIGTERM if the master dies.
-- The shared state's segment (opts.shm), made before the first worker, is
-- passed to every worker of every generation; what a dead one held in it
-- is given back.
local aiorch = require "aiorch"
local state_shm = require "aiorch.state.shm"

local process = aiorch.process
local signal = aiorch.signal
local spawn = aiorch.spawn
local sleep = aiorch.sleep
local now = aiorch.now
local fmt = string.format
local pairs = pairs
local ipairs = ipairs
local type = type
local assert = assert
local min = math.min
local tostring = tostring
local tonumber = tonumber
local io_open = io.open
local io_popen = io.popen
local io_stderr = io.stderr
local os_getenv = os.getenv
local os_remove = os.remove
local os_rename = os.rename
local os_tmpname = os.tmpname

local _M = {}

_M.READY_ENV = "AIORCH_WORKER_READY"

local STOP_SIGNALS = { "SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP" }

local DEFAULTS = {
  drain_timeout_ms = 10000, -- a worker's own drain; the master waits this plus kill_grace_ms
  kill_grace_ms = 5000,     -- then SIGKILL
  ready_timeout_ms = 10000, -- a new generation's time to listen on SIGHUP
  backoff_ms = 100,         -- first restart delay after a quick death, doubled each time
  max_backoff_ms = 10000,
  stable_ms = 5000,         -- a worker that lived this long resets the backoff
}

-- The number of cores this process may run on (nproc honours the affinity).
function _M.cores()
  local p = io_popen("nproc 2>/dev/null")
  local n = p and tonumber(p:read("l") or "")
  if p then
    p:close()
  end
  return (n and n >= 1) and n or 1
end

local function exists(path)
  local f = io_open(path, "rb")
  if f then
    f:close()
    return true
  end
  return false
end

local function log(m, f, ...)
  local line = fmt(f, ...)
  if m.opts.log then
    m.opts.log(line)
  else
    io_stderr:write("aiorch master: ", line, "\n")
    io_stderr:flush()
  end
end

local function describe(code, kind, detail)
  if code then
    return fmt("exit status %d", code)
  end
  return fmt("%s %s", tostring(kind), tostring(detail))
end

local start_worker

-- Watches one worker until it exits; restarts it when it was not asked to go.
local function monitor(m, w)
  local code, kind, detail = process.wait(w.pid)
  if m.opts.shm then
    state_shm.forget(m.opts.shm, w.pid)
  end
  m.workers[w.pid] = nil
  m.count = m.count - 1
  os_remove(w.ready)
  if m.slots[w.slot] == w then
    m.slots[w.slot] = nil
  end
  local how = describe(code, kind, detail)
  if m.stopping or w.retired or w.gen ~= m.gen then
    log(m, "worker %d (pid %d) stopped: %s", w.slot, w.pid, how)
    return
  end
  local lived = now() - w.started
  local fails = lived >= m.opts.stable_ms and 1 or (m.fails[w.slot] or 0) + 1
  m.fails[w.slot] = fails
  local delay = lived >= m.opts.stable_ms and 0
    or min(m.opts.backoff_ms * 2 ^ (fails - 1), m.opts.max_backoff_ms)
  log(m, "worker %d (pid %d) died (%s); restarting in %d ms", w.slot, w.pid, how, delay)
  m.restarts = m.restarts + 1
  if delay > 0 then
    sleep(delay)
  end
  if m.stopping or w.gen ~= m.gen or m.slots[w.slot] then
    return
  end
  start_worker(m, w.slot, m.gen)
end

-- Starts the worker of slot in generation gen; returns it or nil.
function start_worker(m, slot, gen)
  local ready = os_tmpname()
  os_remove(ready)
  local spawn_opts = { env = { [_M.READY_ENV] = ready }, death_signal = "SIGTERM" }
  if m.opts.shm then
    state_shm.spawn_opts(m.opts.shm, spawn_opts)
  end
  local pid, _, msg = process.spawn(m.argv, spawn_opts)
  if not pid then
    log(m, "cannot start worker %d: %s", slot, tostring(msg))
    return nil
  end
  local w = { pid = pid, slot = slot, gen = gen, started = now(), ready = ready }
  m.workers[pid] = w
  m.count = m.count + 1
  if gen == m.gen then
    m.slots[slot] = w
  end
  spawn(monitor, m, w)
  return w
end

-- Waits until the workers of every slot of generation gen are listening.
local function wait_ready(m, gen, timeout_ms)
  local deadline = now() + timeout_ms
  repeat
    local all = true
    for slot = 1, m.n do
      local w = m.slots[slot]
      if not (w and w.gen == gen and exists(w.ready)) then
        all = false
        break
      end
    end
    if all then
      return true
    end
    sleep(10)
  until now() > deadline
  return false
end

-- Sends sig to every worker for which pick(w) is true.
local function signal_workers(m, sig, pick)
  for pid, w in pairs(m.workers) do
    if not pick or pick(w) then
      process.kill(pid, sig)
    end
  end
end

local function wait_gone(m, pick, timeout_ms)
  local deadline = now() + timeout_ms
  while now() <= deadline do
    local left = false
    for _, w in pairs(m.workers) do
      if not pick or pick(w) then
        left = true
        break
      end
    end
    if not left then
      return true
    end
    sleep(10)
  end
  return false
end

-- SIGHUP: a new generation; the old one drains once the new one listens.
local function reload(m)
  local old_gen = m.gen
  m.next_gen = m.next_gen + 1
  local gen = m.next_gen
  m.gen = gen
  log(m, "reload: starting generation %d", gen)
  for slot = 1, m.n do
    m.slots[slot] = nil
    start_worker(m, slot, gen)
  end
  if not wait_ready(m, gen, m.opts.ready_timeout_ms) then
    -- Keep serving with the old workers rather than drop the port.
    log(m, "reload: generation %d did not start listening; keeping generation %d", gen, old_gen)
    m.gen = old_gen
    for _, w in pairs(m.workers) do
      if w.gen == gen then
        w.retired = true
      elseif w.gen == old_gen then
        m.slots[w.slot] = w
      end
    end
    signal_workers(m, "SIGTERM", function(w) return w.gen == gen end)
    return false
  end
  -- This reload drains the workers of older generations that still serve,
  -- and only those: not the newer ones a later SIGHUP starts, nor the ones
  -- an earlier reload drains (and kills at its own deadline).
  local retiring = {}
  for _, w in pairs(m.workers) do
    if w.gen < gen and not w.retired then
      w.retired = true
      retiring[w] = true
    end
  end
  local function old(w) return retiring[w] end
  signal_workers(m, "SIGTERM", old)
  spawn(function()
    if not wait_gone(m, old, m.opts.drain_timeout_ms + m.opts.kill_grace_ms) then
      signal_workers(m, "SIGKILL", old)
    end
  end)
  log(m, "reload: generation %d listening", gen)
  return true
end

-- SIGTERM / SIGINT / SIGQUIT: drain every worker, then return 0.
local function stop(m, sig)
  m.stopping = true
  log(m, "%s: stopping %d workers", sig, m.count)
  signal_workers(m, "SIGTERM")
  if not wait_gone(m, nil, m.opts.drain_timeout_ms + m.opts.kill_grace_ms) then
    log(m, "workers still running after the drain timeout: killing them")
    signal_workers(m, "SIGKILL")
    wait_gone(m, nil, 2000)
  end
  return 0
end

-- Runs the master until SIGTERM / SIGINT / SIGQUIT. opts: argv (the
-- command of one worker, a list), workers (default: the number of cores),
-- shm (an aiorch.shm dictionary for the workers' shared state), log
-- (function(line), default stderr) and the timings of DEFAULTS.
-- Returns the exit status (0).
function _M.run(opts)
  local o = {}
  for k, v in pairs(DEFAULTS) do
    o[k] = v
  end
  for k, v in pairs(opts) do
    o[k] = v
  end
  assert(type(o.argv) == "table" and #o.argv >= 1, "master.run: argv must list the worker command")
  local m = {
    opts = o, argv = o.argv, n = o.workers or _M.cores(), gen = 1, next_gen = 1,
    workers = {}, slots = {}, fails = {}, count = 0, restarts = 0, stopping = false,
  }
  _M.current = m -- for introspection (tests)
  -- Catch the signals first: none may kill the master while it starts.
  for _, sig in ipairs(STOP_SIGNALS) do
    signal.wait(sig, 0)
  end
  for slot = 1, m.n do
    start_worker(m, slot, m.gen)
  end
  if wait_ready(m, m.gen, o.ready_timeout_ms) then
    log(m, "%d workers listening (master pid %d)", m.n, process.pid())
  else
    log(m, "not every worker is listening yet")
  end
  while true do
    local sig = signal.wait(STOP_SIGNALS)
    if sig == "SIGHUP" then
      reload(m)
    else
      return stop(m, sig)
    end
  end
end

-- Tells the master (if any) that this worker listens: writes our pid to the
-- ready file, atomically.
function _M.announce_ready()
  local path = os_getenv(_M.READY_ENV)
  if not path or path == "" then
    return false
  end
  local tmp = path .. ".tmp"
  local f = io_open(tmp, "w")
  if not f then
    return false
  end
  f:write(tostring(process.pid()), "\n")
  f:close()
  return os_rename(tmp, path) and true or false
end

-- The signal loop of one serving process (a worker, or `--workers 0`):
-- SIGTERM / SIGINT / SIGQUIT drain the gateway handle (stop accepting at
-- once, finish the requests in flight within drain_timeout_ms) and return
-- 0; SIGHUP is ignored (the master reloads by replacing workers).
function _M.worker(handle, opts)
  opts = opts or {}
  local timeout = opts.drain_timeout_ms or DEFAULTS.drain_timeout_ms
  for _, sig in ipairs(STOP_SIGNALS) do
    signal.wait(sig, 0)
  end
  _M.announce_ready()
  while true do
    local sig = signal.wait(STOP_SIGNALS)
    if sig ~= "SIGHUP" then
      local cut = handle.server:shutdown(timeout)
      if cut > 0 and opts.log then
        opts.log(fmt("drain: %d requests cut at the deadline", cut))
      end
      handle:drain(100)
      return 0
    end
  end
end

return _M
