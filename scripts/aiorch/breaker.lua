-- Circuit breakers, one per provider. closed: calls go through, failures
-- are counted; open: calls are refused until the cooldown ends; half_open:
-- one trial call decides between closed and open again. Kept in this Lua
-- state, or, when the state is shared (aiorch.state: the workers of one
-- server), in the shared state through aiorch.state.breaker.
local policy = require "aiorch.policy"
local core = require "aiorch"
local state_mod = require "aiorch.state"

local fmt = string.format
local ceil = math.ceil
local now = core.now

local _M = {}

local states = {}
local shared_seen = {} -- shared breakers as a balancer last read them: name -> {read again after (ms), cooling}

-- aiorch.state.breaker while the state is shared, else nil.
local shared_breaker
local function shared()
  if state_mod.is_shared then
    shared_breaker = shared_breaker or require "aiorch.state.breaker"
    return shared_breaker
  end
  return nil
end

-- The breakers not closed (open or half open), {name = state}, and their
-- number: while none of these is cooling, a balancer asks nothing per
-- deployment; else it asks of these only.
local unclosed, nunclosed = {}, 0

local function state(name)
  local s = states[name]
  if not s then
    s = { name = name, state = "closed", failures = {}, first = 1, count = 0, open_until = 0, trial = false, why = nil }
    states[name] = s
  end
  return s
end

-- Drops the failures that fell out of the window (a ring of timestamps).
local function prune(s, t, window)
  local f = s.failures
  while s.count > 0 and f[s.first] <= t - window do
    f[s.first] = nil
    s.first = s.first + 1
    s.count = s.count - 1
  end
end

-- asked: the provider asked for the pause (Retry-After), rather than the
-- breaker deciding it after failures.
local function open(s, t, ms, why, asked)
  if s.state == "closed" then
    unclosed[s.name], nunclosed = s, nunclosed + 1
  end
  s.state = "open"
  s.open_until = t + ms
  s.trial = false
  s.why = why
  s.asked = asked or false
  s.failures, s.first, s.count = {}, 1, 0
end

-- allow(name) -> true, or false, message (the provider cools down) and,
-- when the provider itself asked for the pause, the ms left of it.
-- A half-open breaker lets one caller through; it must report back.
function _M.allow(name)
  local sh = state_mod.is_shared and shared()
  if sh then
    return sh.allow(name)
  end
  local s = states[name]
  if not s or s.state == "closed" then
    return true
  end
  local t = now()
  if s.state == "open" and t >= s.open_until then
    s.state = "half_open"
  end
  if s.state == "half_open" and not s.trial then
    s.trial = true
    return true, "trial"
  end
  local left = s.state == "open" and ceil(s.open_until - t) or nil
  return false, left and fmt("%s is cooling down for %d ms more (%s)", name, left, s.why or "failures")
    or fmt("%s is cooling down: a trial request is deciding", name), s.asked and left or nil
end

-- record(name, pol, ok, kind, retry_after, trial) after a call that was let
-- through; trial: allow() said "trial". While the breaker is open or half
-- open, the outcome of a call let through before it opened is stale: only
-- the trial decides (a later Retry-After may still lengthen the pause).
function _M.record(name, pol, ok, kind, retry_after, trial)
  local sh = state_mod.is_shared and shared()
  if sh then
    shared_seen[name] = nil -- (a balancer reads it afresh)
    return sh.record(name, pol, ok, kind, retry_after, trial)
  end
  local s = states[name]
  local t = now()
  -- A provider that says when to come back is believed, breaker or not.
  local asked = not ok and kind == "rate_limited" and policy.retry_after_ms(retry_after) or nil
  if asked and asked > 0 then
    s = state(name)
    if s.state ~= "open" or t + asked > s.open_until then
      open(s, t, asked, fmt("it asked to wait %d s", ceil(asked / 1000)), true)
    end
    return
  end
  if not s then
    if ok or not policy.counts_as_failure(kind) then
      return
    end
    s = state(name)
  end
  if s.state ~= "closed" then
    if not trial then
      return -- stale
    end
    if ok then
      s.state, s.trial, s.why = "closed", false, nil
      unclosed[name], nunclosed = nil, nunclosed - 1
      s.failures, s.first, s.count = {}, 1, 0
    elseif policy.counts_as_failure(kind) then
      open(s, t, pol.cooldown_ms, "the trial request failed")
    else
      s.trial = false -- the trial said nothing; the next call tries again
    end
    return
  end
  if ok or not policy.counts_as_failure(kind) then
    return
  end
  local limit = pol.breaker_failures
  if not limit or limit <= 0 then
    return
  end
  prune(s, t, pol.breaker_window_ms)
  s.failures[s.first + s.count] = t
  s.count = s.count + 1
  if s.count >= limit then
    open(s, t, pol.cooldown_ms, fmt("%d failures in %d ms", limit, pol.breaker_window_ms))
  end
end

-- The trial call ended without an outcome (cancelled): the next caller
-- may try instead.
function _M.release(name, trial)
  local sh = state_mod.is_shared and shared()
  if sh then
    return sh.release(name, trial)
  end
  local s = states[name]
  if trial and s and s.state == "half_open" then
    s.trial = false
  end
end

-- cooling(name) -> whether a call now would be refused: the breaker is
-- open, or half open with its trial under way (cheap: the balancers ask
-- it of every deployment at each decision).
local cooling
function _M.cooling(name)
  return cooling(name)
end

-- A shared breaker is read again after this (a balancer asks of every
-- deployment at each decision; the other processes' breakers are seen
-- this late at most, as replicas see them).
_M.SHARED_RECHECK_MS = 100

local function shared_cooling(name)
  local t = now()
  local e = shared_seen[name]
  if e and t < e[1] then
    return e[2]
  end
  local v = shared().cooling(name)
  if e then
    e[1], e[2] = t + _M.SHARED_RECHECK_MS, v
  else
    shared_seen[name] = { t + _M.SHARED_RECHECK_MS, v }
  end
  return v
end

-- The cooling function, or nil when no breaker is cooling (all of this
-- process's are closed, or half open with no trial under way): a balancer
-- asks once per decision.
-- Shared breakers: as read at most SHARED_RECHECK_MS ago. Local ones: also
-- the table of those not closed, {name = state}: one not in it is not
-- cooling (the caller asks of these only).
function _M.cooling_check()
  if state_mod.is_shared then
    return shared_cooling
  end
  if nunclosed == 0 then
    return nil
  end
  for name in pairs(unclosed) do
    if cooling(name) then
      return cooling, unclosed
    end
  end
  return nil
end

cooling = function(name)
  local sh = state_mod.is_shared and shared()
  if sh then
    return sh.cooling(name)
  end
  local s = states[name]
  if not s or s.state == "closed" then
    return false
  end
  if s.state == "open" and now() < s.open_until then
    return true
  end
  return s.trial
end

-- health(name) -> {healthy, state, failures, cooldown_ms}
function _M.health(name)
  local sh = state_mod.is_shared and shared()
  if sh then
    return sh.health(name)
  end
  local s = states[name]
  if not s then
    return { healthy = true, state = "closed", failures = 0 }
  end
  local t = now()
  local st = s.state
  if st == "open" and t >= s.open_until then
    st = "half_open"
  end
  return {
    healthy = st ~= "open", state = st, failures = s.count,
    cooldown_ms = st == "open" and ceil(s.open_until - t) or nil,
  }
end

function _M.reset()
  states, unclosed, nunclosed, shared_seen = {}, {}, 0, {}
  local sh = shared()
  if sh then
    sh.reset()
  end
end

return _M
