-- An in-memory store of values under string keys: least recently used
-- first out, bounded by bytes and by entries, each entry with its own
-- expiry. The gateway's response cache keeps its memory tier here
-- (aiorch.gateway.cache); nothing in it knows what the values are.
--
--   local cache = require "aiorch.cache"
--   local c = cache.new { max_bytes = 64 * 1024 * 1024, max_entries = 65536 }
--   c:set(key, value, size, ttl_ms)  -- size: the bytes the value stands for
--   local v = c:get(key)             -- nil when absent or expired
--   c.bytes, c.entries, c.evictions  -- (evictions: pushed out for room)
--
-- A doubly linked list orders the entries (the head is the most recently
-- used) and a table finds them by key: get and set cost the same whatever
-- the number of entries.
local aiorch = require "aiorch"

local now = aiorch.now
local setmetatable = setmetatable
local type = type
local error = error

local _M = {}

-- Bytes an entry costs beyond its key and value: its node and its slot.
_M.ENTRY_OVERHEAD = 160

local Cache = {}
Cache.__index = Cache

-- opts: max_bytes (> 0), max_entries (> 0).
function _M.new(opts)
  local c = setmetatable({ map = {}, head = nil, tail = nil, bytes = 0, entries = 0, evictions = 0, expired = 0,
    max_bytes = opts.max_bytes, max_entries = opts.max_entries }, Cache)
  if type(c.max_bytes) ~= "number" or c.max_bytes <= 0 or type(c.max_entries) ~= "number"
      or c.max_entries <= 0 then
    error("aiorch.cache.new: max_bytes and max_entries must be positive numbers", 2)
  end
  return c
end

local function unlink(c, n)
  local p, nx = n.prev, n.next
  if p then
    p.next = nx
  else
    c.head = nx
  end
  if nx then
    nx.prev = p
  else
    c.tail = p
  end
  n.prev, n.next = nil, nil
end

local function push_front(c, n)
  local h = c.head
  n.next = h
  if h then
    h.prev = n
  else
    c.tail = n
  end
  c.head = n
end

local function drop(c, n)
  unlink(c, n)
  c.map[n.key] = nil
  c.bytes = c.bytes - n.size
  c.entries = c.entries - 1
end

-- The value under key, made the most recently used; nil when absent or
-- expired (an expired entry is dropped).
function Cache:get(key)
  local n = self.map[key]
  if not n then
    return nil
  end
  if n.expires <= now() then
    drop(self, n)
    self.expired = self.expired + 1
    return nil
  end
  if self.head ~= n then
    unlink(self, n)
    push_front(self, n)
  end
  return n.value, n.expires
end

-- Stores value under key for ttl_ms; size is what the value weighs, in
-- bytes (the key and the overhead are added). Older entries leave, least
-- recently used first, until the new one fits. Returns false (and stores
-- nothing) for an entry larger than the whole store.
function Cache:set(key, value, size, ttl_ms)
  local cost = size + #key + _M.ENTRY_OVERHEAD
  if cost > self.max_bytes then
    return false
  end
  local old = self.map[key]
  if old then
    drop(self, old)
  end
  while self.tail and (self.bytes + cost > self.max_bytes or self.entries + 1 > self.max_entries) do
    drop(self, self.tail)
    self.evictions = self.evictions + 1
  end
  local n = { key = key, value = value, size = cost, expires = now() + ttl_ms, prev = nil, next = nil }
  self.map[key] = n
  push_front(self, n)
  self.bytes = self.bytes + cost
  self.entries = self.entries + 1
  return true
end

-- Removes key; true when it was there.
function Cache:delete(key)
  local n = self.map[key]
  if n then
    drop(self, n)
    return true
  end
  return false
end

return _M
