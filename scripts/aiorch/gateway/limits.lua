-- The gateway's admission limits, held for the whole server through
-- aiorch.state (shared by the workers, or this process's own): the rate
-- limits (the gateway's `rate_limit`, each client's `clients.NAME.rate_limit`)
-- and `max_inflight`. A request that passes them all is counted by each; one
-- refused by any is counted by none, and gets a 429 in the caller's shape
-- with Retry-After.
local state = require "aiorch.state"

local fmt = string.format
local ceil = math.ceil
local max = math.max
local tostring = tostring

local _M = {}

-- The keys of one gateway (ns: its port, the same in every worker and
-- every generation; none when replicas share the limits through Redis,
-- whose prefix names the deployment) for one client.
local function keys(gw, client)
  local ks = gw.limit_keys
  if not ks then
    local ns = state.redis() and "" or gw.ns
    ks = { global = ns .. "r*", inflight = gw.ns .. "i", clients = {}, ns = ns }
    gw.limit_keys = ks
  end
  if client and client.name then
    local k = ks.clients[client.name]
    if not k then
      k = ks.ns .. "rc\31" .. client.name
      ks.clients[client.name] = k
    end
    return ks, k
  end
  return ks
end

local function retry_after(ms)
  return tostring(max(1, ceil(ms / 1000)))
end

-- Counts one request under key; true (with its slot), false after the
-- client got its 429, or true when the state could not count it (full:
-- letting requests through beats refusing them all; said in the log).
local function take(x, key, rl, whose)
  local ok, a, msg = state.window(key, 1, rl.window_ms, rl.requests)
  if ok then
    return true, a
  end
  if ok == nil then
    state.warn("rate limit not counted", msg or a)
    return true
  end
  x:fail(429, fmt("rate limit reached: %s %d requests per %s; retry in %s s", whose, rl.requests, rl.per,
    retry_after(a)), "rate_limit_exceeded", { ["retry-after"] = retry_after(a) })
  return false
end

-- Admits x (a request that calls providers) or answers it 429. Returns
-- true when admitted; then release(x) must follow when it ends.
function _M.admit(x)
  local gw = x.state
  local client = x.client
  local rl = client.rate_limit
  if not rl and not gw.config.rate_limit and gw.max_inflight <= 0 then
    return true -- no limit: nothing to count
  end
  local ks, ckey = keys(gw, client)
  local own, slot_c, slot_g
  if rl then
    own, slot_c = take(x, ckey, rl, "this client may make")
    if not own then
      return false
    end
  end
  rl = gw.config.rate_limit
  if rl then
    local ok
    ok, slot_g = take(x, ks.global, rl, "this gateway takes")
    if not ok then
      if slot_c then
        state.undo(slot_c)
      end
      return false
    end
  end
  local cap = gw.max_inflight
  if cap > 0 then
    local ok, _, msg = state.acquire(ks.inflight, cap)
    if ok == false then
      if slot_c then
        state.undo(slot_c)
      end
      if slot_g then
        state.undo(slot_g)
      end
      x:fail(429, fmt("too many requests in flight (at most %d at once); retry shortly", cap), nil,
        { ["retry-after"] = "1" })
      return false
    end
    if ok == nil then
      state.warn("in-flight request not counted", msg)
    end
    x.holds = ok
  end
  return true
end

-- The end of an admitted request.
function _M.release(x)
  if x.holds then
    x.holds = false
    state.release(keys(x.state).inflight)
  end
end

return _M
