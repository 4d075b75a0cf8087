-- The shared-memory state backend: an aiorch.shm dictionary that the
-- master of `aiorch serve` creates before it starts the workers. The
-- segment has no name: the master passes its descriptor to each worker
-- (process.spawn's pass_fds, its number in AIORCH_SHM_FD), so it lives
-- exactly as long as the processes holding it; a worker restarted, or a
-- generation started by SIGHUP, attaches the same one.
local aiorch = require "aiorch"

local shm = aiorch.shm
local process = aiorch.process
local now = aiorch.now
local fmt = string.format
local type = type
local pairs = pairs
local tostring = tostring
local tonumber = tonumber
local tointeger = math.tointeger
local setmetatable = setmetatable
local os_getenv = os.getenv
local sub = string.sub

local _M = {}

_M.FD_ENV = "AIORCH_SHM_FD"
_M.default_size = 8 * 1024 * 1024
_M.min_size = 64 * 1024
_M.max_size = 1024 * 1024 * 1024

local Shm = {}
Shm.__index = Shm

-- b:now(): aiorch.now (which takes no arguments), the clock of both.
Shm.now = now

function Shm:get(k)
  return self.dict:get(k)
end

function Shm:set(k, v, ttl)
  return self.dict:set(k, v, ttl)
end

function Shm:add(k, v, ttl)
  return self.dict:add(k, v, ttl)
end

function Shm:incr(k, n, init, ttl)
  return self.dict:incr(k, n, init, ttl)
end

function Shm:cas(k, old, new, ttl)
  return self.dict:cas(k, old, new, ttl)
end

function Shm:delete(k)
  return self.dict:delete(k)
end

function Shm:incr_many(list)
  return self.dict:incr_many(list)
end

function Shm:items(prefix)
  return self.dict:items(prefix)
end

function Shm:stats()
  return self.dict:stats()
end

-- A backend on dict (an aiorch.shm dictionary); id names this process's
-- own contributions (default: its pid).
function _M.new(dict, id)
  return setmetatable({ dict = dict, shared = true, kind = "shm", id = tostring(id or process.pid()) }, Shm)
end

-- "8m", "512k", "1g" or a number of bytes -> bytes, or nil, message.
function _M.parse_size(v, where)
  where = where or "shared_memory"
  local n
  if type(v) == "number" then
    n = tointeger(v)
  elseif type(v) == "string" then
    local digits, unit = v:lower():match("^%s*(%d+)%s*([kmg]?)i?b?%s*$")
    local mult = { [""] = 1, k = 1024, m = 1024 * 1024, g = 1024 * 1024 * 1024 }
    n = digits and tointeger(tonumber(digits) * mult[unit])
  end
  if not n or n < _M.min_size or n > _M.max_size then
    return nil, fmt("%s: must be a size from 64k to 1g (bytes, or a number with k, m or g), not %s", where,
      tostring(v))
  end
  return n
end

-- The master's segment: a new dictionary of size bytes, or nil, message.
function _M.create(size)
  local d, _, msg = shm.open(size)
  if not d then
    return nil, "shared memory: " .. tostring(msg)
  end
  return d
end

-- What process.spawn needs to hand dict to a child.
function _M.spawn_opts(dict, opts)
  opts = opts or {}
  local fd = dict:fd()
  opts.pass_fds = { fd }
  opts.env = opts.env or {}
  opts.env[_M.FD_ENV] = tostring(fd)
  return opts
end

-- In a worker: the backend on the segment the master passed, nil when it
-- passed none, or nil, message when it cannot be attached.
function _M.from_env(getenv)
  local v = (getenv or os_getenv)(_M.FD_ENV)
  if not v or v == "" then
    return nil
  end
  local fd = tointeger(tonumber(v))
  if not fd or fd < 0 then
    return nil, fmt("%s: '%s' is not a descriptor", _M.FD_ENV, v)
  end
  local d, _, msg = shm.attach(fd)
  if not d then
    return nil, "shared memory: " .. tostring(msg)
  end
  return _M.new(d)
end

-- Called by the master when the process with this id (a worker's pid) is
-- gone: what it held (in flight) is given back and its gauges dropped.
function _M.forget(dict, id)
  id = tostring(id)
  local held = "a\31" .. id .. "\31"
  for k, v in pairs(dict:items(held)) do
    dict:incr_many { sub(k, #held + 1), -v, k, -v }
    dict:delete(k)
  end
  local suffix = "\31" .. id
  for k in pairs(dict:items("v\31")) do
    if sub(k, -#suffix) == suffix then
      dict:delete(k)
    end
  end
end

return _M
