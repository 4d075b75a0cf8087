-- Server-wide state: counters, limits, in-flight counts (and, through
-- aiorch.breaker, breaker state) behind one interface, on one backend per
-- process:
--   local (aiorch.state.local)  this process's tables: one process
--   shm   (aiorch.state.shm)    a shared-memory dictionary: the workers of
--                               one `aiorch serve`
-- A backend is a store of numbers under string keys (at most 224 bytes)
-- with an expiry per key; its methods, each of which may yield (a
-- networked backend), are those of aiorch.shm: get, set, add, incr, cas,
-- delete, incr_many, items, stats; plus now() (ms, its own clock), and the
-- fields shared (other processes see the values) and id (this process,
-- among those sharing it; nil for a local one).
--
-- What must be exact is written through: windows (rate limits, budgets),
-- acquire/release (in-flight limits), breaker state. Plain counters are
-- kept by their owners in local tables and pushed as deltas every
-- flush_ms by flush(); a reader flushes its own first, so that totals
-- only ever grow and include what it counted itself.
--
-- In front of the backend, a shared tier (aiorch.state.redis, share()) may
-- hold what replicas share: windows and breakers. When it fails, the
-- backend answers instead, unless the caller asked to fail closed.
local aiorch = require "aiorch"
local log = require "aiorch.log"

local sleep = aiorch.sleep
local now = aiorch.now
local pairs = pairs
local ipairs = ipairs
local floor = math.floor
local max = math.max
local remove = table.remove
local type = type

local _M = {}

_M.flush_ms = 100
local MANY_MAX = 4096 -- pairs per incr_many
local WARN_EVERY_MS = 60000

local current -- the backend
local tier -- the shared tier (aiorch.state.redis), or nil
local sources = {} -- {collect = fn(add), baseline = fn()}
local gauges = {} -- key -> {fn = fn, last = value}
local pending, npending = {}, 0 -- deltas not yet in the backend
local own_keys = {} -- key -> this process's share of it (acquire)
local EMPTY = {}

local function backend()
  if not current then
    current = require("aiorch.state.local").new()
  end
  return current
end

local warned_at = -WARN_EVERY_MS
local function warn(what, msg)
  local t = now()
  if t - warned_at >= WARN_EVERY_MS then
    warned_at = t
    log.log("warn", "state: %s: %s", what, msg)
  end
end

-- The backend in use (the local one unless use() chose another).
function _M.backend()
  return backend()
end

-- Whether other processes see the backend's counters; the field
-- is_shared (for the hot paths): whether they see the windows and
-- breakers (the backend's, or a shared tier's).
_M.is_shared = false
function _M.shared()
  return current ~= nil and current.shared == true
end

-- Uses b from now on. What sources counted before is not pushed to it.
function _M.use(b)
  current = b
  _M.is_shared = b.shared == true or tier ~= nil
  pending, npending, own_keys = {}, 0, {}
  for _, g in pairs(gauges) do
    g.last, g.key = nil, nil
  end
  for _, s in ipairs(sources) do
    if s.baseline then
      s.baseline()
    end
  end
  return b
end

-- Puts t (an aiorch.state.redis tier) in front of the backend for windows
-- and breakers; nil takes it away.
function _M.share(t)
  tier = t
  _M.is_shared = t ~= nil or (current ~= nil and current.shared == true)
  return t
end

-- The shared tier, or nil: aiorch.state.redis's cache_get, cache_set, ...
function _M.redis()
  return tier
end

-- The store of breakers: the tier's (falling back to the backend), else
-- the backend.
function _M.kv()
  return tier and tier.kv or backend()
end

-- false while the windows and breakers are what every replica sees; true,
-- message while the shared tier fails and this process's own state
-- answers instead.
function _M.degraded()
  if tier and not tier.up then
    return true, "the shared state (redis) does not answer; this replica's own state is in use"
  end
  return false
end

------------------------------------------------------------------------------
-- Plain counters: owned by their modules, pushed as deltas.

-- collect(add) is called at each flush and calls add(key, delta) for what
-- changed since; baseline() forgets what was counted so far (a new
-- backend). Returns a handle for unsource().
function _M.source(collect, baseline)
  local s = { collect = collect, baseline = baseline }
  sources[#sources + 1] = s
  return s
end

-- The source of a table of counters its owner counts up (name -> count;
-- the same table for as long as it is a source): each flush pushes what
-- each gained since, under prefix .. name.
function _M.counts_source(prefix, counts)
  local flushed, keys = {}, {}
  local function collect(add)
    for k, v in pairs(counts) do
      local d = v - (flushed[k] or 0)
      if d ~= 0 then
        local key = keys[k]
        if not key then
          key = prefix .. k
          keys[k] = key
        end
        add(key, d)
        flushed[k] = v
      end
    end
  end
  local function baseline()
    for k, v in pairs(counts) do
      flushed[k] = v
    end
  end
  return _M.source(collect, baseline)
end

function _M.unsource(s)
  for i, x in ipairs(sources) do
    if x == s then
      remove(sources, i)
      return
    end
  end
end

-- A gauge: this process's value is fn(), published at each flush; the
-- server's is the sum over the processes (gauge_total).
function _M.gauge(key, fn)
  gauges[key] = { fn = fn }
end

function _M.ungauge(key, fn)
  local g = gauges[key]
  if g and g.fn == fn then
    gauges[key] = nil
  end
end

-- The deltas of one flush, as incr_many takes them: {k1, n1, k2, n2, ...}.
local batch, nbatch = {}, 0

local function add(key, n)
  if n ~= 0 then
    batch[nbatch + 1], batch[nbatch + 2] = key, n
    nbatch = nbatch + 2
  end
end

-- Sends batch[from .. to] (pairs), at most MANY_MAX pairs at a time; what
-- a full backend refuses is tried key by key, and what finds no room is
-- kept for the next flush.
local function push(b, from, to)
  local list = batch
  if from ~= 1 or to ~= #batch then
    list = { table.unpack(batch, from, to) }
  end
  local ok, kind, msg = b:incr_many(list)
  if ok == nil then
    warn("counters", msg or kind)
    for i = 1, #list, 2 do
      if not b:incr(list[i], list[i + 1], 0) then
        if pending[list[i]] == nil then
          npending = npending + 1
        end
        pending[list[i]] = (pending[list[i]] or 0) + list[i + 1]
      end
    end
  end
end

-- Pushes what this process counted since the last flush, and its gauges
-- (unless counters_only). Nothing to do on a local backend.
function _M.flush(counters_only)
  local b = backend()
  if not b.shared then
    return
  end
  local last = #batch
  nbatch = 0
  if npending > 0 then
    local kept = pending
    pending, npending = {}, 0
    for k, d in pairs(kept) do
      add(k, d)
    end
  end
  for _, s in ipairs(sources) do
    s.collect(add)
  end
  for i = nbatch + 1, last do
    batch[i] = nil
  end
  for key, g in pairs(counters_only and EMPTY or gauges) do
    local v = g.fn()
    if v ~= g.last then
      g.key = g.key or "v\31" .. key .. "\31" .. b.id
      if b:set(g.key, v) then
        g.last = v
      end
    end
  end
  for i = 1, nbatch, 2 * MANY_MAX do
    push(b, i, math.min(i + 2 * MANY_MAX - 1, nbatch))
  end
end

-- The task that flushes every flush_ms, until it is cancelled (then once
-- more is the caller's business: flush()).
function _M.flusher(interval_ms)
  while true do
    sleep(interval_ms or _M.flush_ms)
    _M.flush()
  end
end

-- The server's totals under prefix, {key = value}, this process's own
-- counts included.
function _M.read(prefix)
  local b = backend()
  _M.flush(true)
  return b:items(prefix)
end

-- The sum over the processes of a gauge; mine(), when given, stands for
-- this process's own value (fresher than its last flush).
function _M.gauge_total(key, mine)
  local b = backend()
  if not b.shared then
    local g = gauges[key]
    return mine and mine() or (g and g.fn()) or 0
  end
  local own = "v\31" .. key .. "\31" .. b.id
  local total = 0
  for k, v in pairs(b:items("v\31" .. key .. "\31")) do
    if k ~= own then
      total = total + v
    end
  end
  local g = gauges[key]
  return total + (mine and mine() or (g and g.fn()) or 0)
end

------------------------------------------------------------------------------
-- Windows: rate limits, budgets. With a shared tier, its count; when it
-- fails, the backend's, or nil, kind, message with fail_closed.

-- Adds n to the sliding count under key (window_ms): the count of the
-- current fixed window plus the previous window's, weighted by the part of
-- it still in view. Returns the sliding count, the slot n went to (for
-- undo) and the parts (previous, weight, current); nil, kind, message when
-- the backend failed (full), or the shared tier failed and fail_closed is
-- set.
local function local_add(key, n, window_ms)
  local b = backend()
  local t = b:now()
  local idx = floor(t / window_ms)
  local slot = key .. "\31" .. idx
  local prev = b:get(key .. "\31" .. (idx - 1)) or 0
  local frac = (t - idx * window_ms) / window_ms
  local c, kind, msg = b:incr(slot, n, 0, 2 * window_ms + 1000)
  if not c then
    return nil, kind, msg
  end
  return prev * (1 - frac) + c, slot, prev, frac, c
end

function _M.window_add(key, n, window_ms, fail_closed)
  if tier then
    local ok, slot, prev, frac, c = tier:window(key, n, window_ms)
    if ok then
      return prev * (1 - frac) + c, slot, prev, frac, c
    elseif fail_closed then
      return nil, slot, prev
    end
  end
  return local_add(key, n, window_ms)
end

-- How long until n more fit limit, given the previous window's count,
-- the part of the current one gone, and its count without them (mine).
local function wait_ms(prev, frac, mine, n, limit, window_ms)
  local wait
  if mine + n <= limit and prev > 0 then
    -- it fits this window once enough of the previous one is out of view
    wait = (1 - (limit - mine - n) / prev - frac) * window_ms
  else
    -- not before the next window, where this one is the previous
    local f = mine > 0 and 1 - (limit - n) / mine or 0
    wait = (1 - frac + max(f, 0)) * window_ms
  end
  return max(wait, 1)
end

-- Counts n (> 0) against limit in the sliding window of window_ms under
-- key (window_add). Returns true, slot (for undo) when it fits; false,
-- retry_after_ms when it does not (then nothing is counted); nil, kind,
-- message when the backend failed (full), or the shared tier failed and
-- fail_closed is set.
function _M.window(key, n, window_ms, limit, fail_closed)
  if tier then
    local ok, slot, prev, frac, c = tier:window(key, n, window_ms, limit)
    if ok then
      return true, slot
    elseif ok == false then
      return false, wait_ms(prev, frac, c, n, limit, window_ms)
    elseif fail_closed then
      return nil, slot, prev
    end
  end
  local est, slot, prev, frac, c = local_add(key, n, window_ms)
  if not est then
    return nil, slot, prev
  end
  if est <= limit then
    return true, slot
  end
  backend():incr(slot, -n)
  return false, wait_ms(prev, frac, c - n, n, limit, window_ms)
end

-- Takes back what window() counted (the request was refused later).
function _M.undo(slot, n)
  if type(slot) == "table" then -- the shared tier's
    slot.tier:undo(slot, n or 1)
    return
  end
  backend():incr(slot, -(n or 1))
end

-- Forgets the window under key.
function _M.window_clear(key, window_ms)
  if tier and tier:window_clear(key, window_ms) then
    return
  end
  local b = backend()
  local idx = floor(b:now() / window_ms)
  b:delete(key .. "\31" .. idx)
  b:delete(key .. "\31" .. (idx - 1))
end

-- The sliding count under key now (what window() compares to its limit).
function _M.window_count(key, window_ms, fail_closed)
  if tier then
    local c, kind, msg = tier:window_count(key, window_ms)
    if c or fail_closed then
      return c, kind, msg
    end
  end
  local b = backend()
  local t = b:now()
  local idx = floor(t / window_ms)
  local frac = (t - idx * window_ms) / window_ms
  return (b:get(key .. "\31" .. (idx - 1)) or 0) * (1 - frac) + (b:get(key .. "\31" .. idx) or 0)
end

------------------------------------------------------------------------------
-- In flight: a count shared by the processes, each one's share kept
-- beside it (updated in the same atomic step), so that a process that dies
-- gives its share back (aiorch.state.shm.forget, from the master).

local function own_key(b, key)
  local k = own_keys[key]
  if not k then
    k = "a\31" .. b.id .. "\31" .. key
    own_keys[key] = k
  end
  return k
end

-- Takes one of limit under key. Returns true, count; false, count (at the
-- limit: nothing taken); nil, kind, message (the backend failed).
function _M.acquire(key, limit)
  local b = backend()
  if not b.id then
    local c, kind, msg = b:incr(key, 1, 0)
    if not c then
      return nil, kind, msg
    end
    if c <= limit then
      return true, c
    end
    b:incr(key, -1)
    return false, c - 1
  end
  local own = own_key(b, key)
  local c, kind, msg = b:incr_many { key, 1, own, 1 }
  if not c then
    return nil, kind, msg
  end
  if c <= limit then
    return true, c
  end
  b:incr_many { key, -1, own, -1 }
  return false, c - 1
end

function _M.release(key)
  local b = backend()
  if not b.id then
    b:incr(key, -1)
  else
    b:incr_many { key, -1, own_key(b, key), -1 }
  end
end

-- The count under key (across the processes).
function _M.count(key)
  return backend():get(key) or 0
end

_M.warn = warn

return _M
