-- Circuit breakers kept in the shared state (aiorch.state), for processes
-- that share it: a breaker opened by failures seen in one worker is open
-- for the requests of every other. The same states as aiorch.breaker's
-- own (closed, open, half_open with one trial), on these keys per provider:
--   u   open until (the backend's clock, ms); absent: closed
--   t   the trial's claim (add: one process wins it), expiring after
--       trial_ttl_ms so that a process that dies holding it blocks nobody
--   a   1 when the provider asked for the pause (Retry-After)
--   y   why it opened (with n, w: the failures and window; s: seconds asked)
--   f   the failures, a sliding window count (aiorch.state.window_add) of
--       breaker_window_ms (kept in fw)
-- aiorch.breaker calls these when the state is shared; the API is its own.
-- The keys live in state.kv(): Redis when replicas share it, else the
-- backend.
local state = require "aiorch.state"
local policy = require "aiorch.policy"

local fmt = string.format
local ceil = math.ceil
local floor = math.floor
local pairs = pairs

local _M = {}

-- A trial request longer than this may be joined by another.
_M.trial_ttl_ms = 120000

local FAILURES, TRIAL, ASKED = 1, 2, 3

local key_sets = {}

local function keys(name)
  local k = key_sets[name]
  if not k then
    local p = "b\31" .. name .. "\31"
    k = { u = p .. "u", t = p .. "t", a = p .. "a", y = p .. "y", n = p .. "n", w = p .. "w", s = p .. "s",
          f = p .. "f", fw = p .. "fw" }
    key_sets[name] = k
  end
  return k
end

local function why_text(b, k)
  local y = b:get(k.y)
  if y == FAILURES then
    return fmt("%d failures in %d ms", b:get(k.n) or 0, b:get(k.w) or 0)
  elseif y == TRIAL then
    return "the trial request failed"
  elseif y == ASKED then
    return fmt("it asked to wait %d s", b:get(k.s) or 0)
  end
  return "failures"
end

local function clear_failures(b, k)
  local w = b:get(k.fw)
  if w then
    state.window_clear(k.f, w)
  end
end

-- The reason's fields first, the open-until last: a reader that sees the
-- breaker open finds why.
local function open(b, k, t, ms, why, asked, x, y)
  b:set(k.y, why)
  if why == FAILURES then
    b:set(k.n, x)
    b:set(k.w, y)
  elseif why == ASKED then
    b:set(k.s, x)
  end
  b:set(k.a, asked and 1 or 0)
  clear_failures(b, k)
  b:delete(k.t)
  b:set(k.u, t + ms)
end

local function close(b, k)
  b:delete(k.u)
  b:delete(k.t)
  clear_failures(b, k)
end

-- As aiorch.breaker.allow.
function _M.allow(name)
  local b = state.kv()
  local k = keys(name)
  local u = b:get(k.u)
  if not u then
    return true
  end
  local t = b:now()
  if t < u then
    local left = ceil(u - t)
    return false, fmt("%s is cooling down for %d ms more (%s)", name, left, why_text(b, k)),
      b:get(k.a) == 1 and left or nil
  end
  if b:add(k.t, 1, _M.trial_ttl_ms) then
    return true, "trial"
  end
  return false, fmt("%s is cooling down: a trial request is deciding", name), nil
end

-- As aiorch.breaker.record. A success outside a trial costs nothing.
function _M.record(name, pol, ok, kind, retry_after, trial)
  if ok and not trial then
    return
  end
  local b = state.kv()
  local k = keys(name)
  local asked = not ok and kind == "rate_limited" and policy.retry_after_ms(retry_after) or nil
  if asked and asked > 0 then
    local t = b:now()
    local u = b:get(k.u)
    if not (u and t < u) or t + asked > u then
      open(b, k, t, asked, ASKED, true, ceil(asked / 1000))
    end
    return
  end
  local failure = not ok and policy.counts_as_failure(kind)
  if not failure and not trial then
    return
  end
  if b:get(k.u) then
    if not trial then
      return -- stale: let through before it opened
    end
    if ok then
      close(b, k)
    elseif failure then
      open(b, k, b:now(), pol.cooldown_ms, TRIAL)
    else
      b:delete(k.t) -- the trial said nothing; the next call tries again
    end
    return
  end
  local limit = pol.breaker_failures
  if not failure or not limit or limit <= 0 then
    return
  end
  local window = pol.breaker_window_ms
  if b:get(k.fw) ~= window then
    b:set(k.fw, window)
  end
  local count = state.window_add(k.f, 1, window)
  if count and count >= limit then
    open(b, k, b:now(), pol.cooldown_ms, FAILURES, false, limit, window)
  end
end

-- As aiorch.breaker.release.
function _M.release(name, trial)
  if not trial then
    return
  end
  local b = state.kv()
  local k = keys(name)
  local u = b:get(k.u)
  if u and b:now() >= u then
    b:delete(k.t)
  end
end

-- As aiorch.breaker.health; failures: the sliding count while closed.
function _M.health(name)
  local b = state.kv()
  local k = keys(name)
  local u = b:get(k.u)
  local t = b:now()
  local st = not u and "closed" or (t < u and "open" or "half_open")
  local w = st == "closed" and b:get(k.fw)
  return {
    healthy = st ~= "open", state = st, failures = w and floor(state.window_count(k.f, w) + 0.5) or 0,
    cooldown_ms = st == "open" and ceil(u - t) or nil,
  }
end

-- Whether a call now would be refused (open, or half open with its trial
-- claimed): one or two reads.
function _M.cooling(name)
  local b = state.kv()
  local k = keys(name)
  local u = b:get(k.u)
  if not u then
    return false
  end
  return b:now() < u or b:get(k.t) ~= nil
end

-- Forgets every breaker (tests, the demo).
function _M.reset()
  local b = state.kv()
  for key in pairs(b:items("b\31")) do
    b:delete(key)
  end
end

return _M
