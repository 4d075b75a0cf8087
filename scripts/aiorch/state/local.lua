-- The local state backend: this process's own tables, with the semantics
-- of the shared dictionary (aiorch.shm): numbers under string keys, an
-- expiry per key, a bounded number of keys. For one process: `aiorch
-- serve --workers 0`, `aiorch run`, tests. Nothing yields.
local aiorch = require "aiorch"

local now = aiorch.now
local type = type
local pairs = pairs
local error = error
local setmetatable = setmetatable
local sub = string.sub

local _M = {}

-- About what the default shared_memory (8 MiB) holds.
_M.default_max_keys = 32768
local KEY_MAX = 224

local Local = {}
Local.__index = Local

local FULL = "the local state is full (its bound is max_keys)"

local function check_key(k)
  if type(k) ~= "string" or #k < 1 or #k > KEY_MAX then
    error("state: a key is a string of 1 to 224 bytes", 3)
  end
end

-- The live value of k, or nil (an expired key is dropped).
local function live(self, k)
  local v = self.values[k]
  if v == nil then
    return nil
  end
  local e = self.expires[k]
  if e and e <= now() then
    self.values[k], self.expires[k] = nil, nil
    self.n = self.n - 1
    return nil
  end
  return v
end

-- Room for one more key: drops the expired ones when at the bound.
local function room(self)
  if self.n < self.max_keys then
    return true
  end
  local t = now()
  for k, e in pairs(self.expires) do
    if e <= t then
      self.values[k], self.expires[k] = nil, nil
      self.n = self.n - 1
    end
  end
  return self.n < self.max_keys
end

local function put(self, k, v, ttl)
  if self.values[k] == nil then
    self.n = self.n + 1
  end
  self.values[k] = v
  self.expires[k] = ttl and ttl > 0 and now() + ttl or nil
end

-- b:now(): aiorch.now (which takes no arguments), the clock of both.
Local.now = now

function Local:get(k)
  check_key(k)
  return live(self, k)
end

function Local:set(k, v, ttl)
  check_key(k)
  if live(self, k) == nil and not room(self) then
    return nil, "full", FULL
  end
  put(self, k, v, ttl)
  return true
end

function Local:add(k, v, ttl)
  check_key(k)
  if live(self, k) ~= nil then
    return false
  end
  if not room(self) then
    return nil, "full", FULL
  end
  put(self, k, v, ttl)
  return true
end

function Local:incr(k, n, init, ttl)
  check_key(k)
  local v = live(self, k)
  if v ~= nil then
    v = v + n
    self.values[k] = v
    return v
  end
  if init == nil then
    return nil, "not_found", "no such key (and no init value)"
  end
  if not room(self) then
    return nil, "full", FULL
  end
  put(self, k, init + n, ttl)
  return init + n
end

function Local:cas(k, old, new, ttl)
  check_key(k)
  local v = live(self, k)
  if v ~= old then
    return false, v
  end
  if v == nil and not room(self) then
    return nil, "full", FULL
  end
  put(self, k, new, ttl)
  return true
end

function Local:delete(k)
  check_key(k)
  if live(self, k) == nil then
    return false
  end
  self.values[k], self.expires[k] = nil, nil
  self.n = self.n - 1
  return true
end

-- All or none, as the shared dictionary's.
function Local:incr_many(list)
  local missing = 0
  for i = 1, #list, 2 do
    check_key(list[i])
    if live(self, list[i]) == nil then
      missing = missing + 1
    end
  end
  if missing > 0 and self.n + missing > self.max_keys then
    room(self)
    if self.n + missing > self.max_keys then
      return nil, "full", FULL
    end
  end
  local out = {}
  for i = 1, #list, 2 do
    local k = list[i]
    local v = (live(self, k) or 0) + list[i + 1]
    if self.values[k] == nil then
      self.n = self.n + 1
    end
    self.values[k] = v
    out[#out + 1] = v
  end
  return table.unpack(out)
end

function Local:items(prefix)
  prefix = prefix or ""
  local out, t, len = {}, now(), #prefix
  for k, v in pairs(self.values) do
    local e = self.expires[k]
    if (not e or e > t) and sub(k, 1, len) == prefix then
      out[k] = v
    end
  end
  return out
end

function Local:stats()
  return { capacity = self.max_keys, used = self.n }
end

-- opts.max_keys: the bound (default _M.default_max_keys).
function _M.new(opts)
  opts = opts or {}
  return setmetatable({ values = {}, expires = {}, n = 0, max_keys = opts.max_keys or _M.default_max_keys,
    shared = false, kind = "local" }, Local)
end

return _M
