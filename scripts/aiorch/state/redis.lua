-- The Redis tier of the server-wide state (aiorch.state): what several
-- replicas of `aiorch serve` share when the configuration has
-- `redis = {url = ...}`. aiorch.state.share(tier) puts it in front of the
-- process's own backend (local or shm) for:
--   windows   rate limits and budgets: one script (EVALSHA) counts and
--             checks atomically, on the two fixed windows' keys
--   kv        breakers and cooldowns (aiorch.state.breaker): plain keys
--   cache     string values with a TTL, on a client of their own
-- Plain counters, gauges and in-flight counts stay on the process's own
-- backend: /metrics and max_inflight are per replica.
--
-- Keys: prefix .. "{" .. key .. "}" .. suffix. The braces are a Redis
-- Cluster hash tag: the keys one script or command touches (a window's two
-- slots) share their tag, so no command spans two hash slots.
--
-- Failure: every operation returns nil, kind, message when Redis does not
-- answer in time (or is down); aiorch.state then uses the process's own
-- backend instead, unless the caller asked to fail closed. The client
-- drops a connection whose call timed out and opens a new one no sooner
-- than its back-off, so an outage costs at most one timeout per back-off.
-- The first failure of an outage is logged, and its end; each is counted
-- (metrics()).
local aiorch = require "aiorch"
local log = require "aiorch.log"
local secrets = require "aiorch.secrets"
local state = require "aiorch.state"

local redis = aiorch.redis
local now = aiorch.now
local fmt = string.format
local type = type
local pairs = pairs
local tostring = tostring
local tonumber = tonumber
local tointeger = math.tointeger
local floor = math.floor
local find = string.find
local gsub = string.gsub
local setmetatable = setmetatable
local os_getenv = os.getenv

local _M = {}

_M.default_prefix = "aiorch:"
_M.default_timeout_ms = 20
_M.default_connect_timeout_ms = 1000
_M.default_backoff_ms = 100
_M.default_max_backoff_ms = 2000
_M.clock_refresh_ms = 60000 -- how often the offset to the server's clock is measured again

-- A window: KEYS[1] the previous fixed window's count, KEYS[2] this one's
-- (one hash tag); ARGV n, the TTL of this window's key (ms), the part of
-- this window gone (0..1), the limit ("": none). Over the limit nothing is
-- counted. Returns {counted 1|0, previous, current} (numbers as strings:
-- a script's numbers would come back truncated to integers).
_M.WINDOW_SCRIPT = [[
local prev = tonumber(redis.call("GET", KEYS[1]) or "0")
local cur = tonumber(redis.call("GET", KEYS[2]) or "0")
local n = tonumber(ARGV[1])
if ARGV[4] ~= "" and prev * (1 - tonumber(ARGV[3])) + cur + n > tonumber(ARGV[4]) then
  return {0, tostring(prev), tostring(cur)}
end
cur = redis.call("INCRBYFLOAT", KEYS[2], ARGV[1])
redis.call("PEXPIRE", KEYS[2], ARGV[2])
return {1, tostring(prev), cur}
]]

-- The kinds that say Redis is unreachable or too slow (the others are
-- answers: "redis" for an error reply).
local DOWN = { timeout = true, connect = true, busy = true, closed = true }

local function ms_field(v, where, least, most, default)
  if v == nil then
    return default
  end
  local n = type(v) == "number" and tointeger(v) or nil
  if not n or n < least or n > most then
    return nil, fmt("%s: must be an integer from %d to %d (ms)", where, least, most)
  end
  return n
end

local FIELDS = { url = true, prefix = true, timeout_ms = true, password_env = true, connect_timeout_ms = true,
  backoff_ms = true, max_backoff_ms = true, cache_timeout_ms = true }

-- The gateway's `redis = {...}` checked: {url, prefix, timeout_ms,
-- connect_timeout_ms, backoff_ms, max_backoff_ms, cache_timeout_ms,
-- password} or nil, message. The password comes from the URL or from the
-- variable password_env names; neither is ever logged.
function _M.check(raw, getenv, where)
  where = where or "redis"
  getenv = getenv or os_getenv
  if type(raw) ~= "table" then
    return nil, where .. ': must be a table {url = "redis://host:port/db", prefix = "aiorch:", timeout_ms = 20}'
  end
  for k in pairs(raw) do
    if not FIELDS[k] then
      return nil, fmt("%s: unknown field '%s'", where, tostring(k))
    end
  end
  local url = raw.url
  if type(url) ~= "string" or not find(url, "^redis://[^/?#]") then
    return nil, where .. ".url: must be a redis://[[user]:password@]host[:port][/db] URL"
  end
  local c = { url = url, prefix = raw.prefix or _M.default_prefix }
  if type(c.prefix) ~= "string" or #c.prefix > 64 or find(c.prefix, "[{}%c]") then
    return nil, where .. ".prefix: must be a string of at most 64 bytes, without braces or control characters"
  end
  local err
  c.timeout_ms, err = ms_field(raw.timeout_ms, where .. ".timeout_ms", 1, 60000, _M.default_timeout_ms)
  if not c.timeout_ms then
    return nil, err
  end
  c.cache_timeout_ms, err = ms_field(raw.cache_timeout_ms, where .. ".cache_timeout_ms", 1, 60000, c.timeout_ms)
  if not c.cache_timeout_ms then
    return nil, err
  end
  c.connect_timeout_ms, err = ms_field(raw.connect_timeout_ms, where .. ".connect_timeout_ms", 1, 60000,
    _M.default_connect_timeout_ms)
  if not c.connect_timeout_ms then
    return nil, err
  end
  c.backoff_ms, err = ms_field(raw.backoff_ms, where .. ".backoff_ms", 1, 60000, _M.default_backoff_ms)
  if not c.backoff_ms then
    return nil, err
  end
  c.max_backoff_ms, err = ms_field(raw.max_backoff_ms, where .. ".max_backoff_ms", c.backoff_ms, 3600000,
    _M.default_max_backoff_ms)
  if not c.max_backoff_ms then
    return nil, err
  end
  if raw.password_env ~= nil then
    if type(raw.password_env) ~= "string" or not find(raw.password_env, "^[%a_][%w_]*$") then
      return nil, where .. ".password_env: must be the name of an environment variable"
    end
    local pw = getenv(raw.password_env)
    if not pw or pw == "" then
      return nil, fmt("%s.password_env: %s is not set", where, raw.password_env)
    end
    c.password = pw
  end
  return c
end

-- A new aiorch.redis client on cfg (checked), with opts overriding the
-- client's options (timeout_ms, ...): what another module (the response
-- cache, say) uses for a connection of its own.
function _M.connect(cfg, opts)
  opts = opts or {}
  local o = { timeout_ms = cfg.timeout_ms, connect_timeout_ms = cfg.connect_timeout_ms, backoff_ms = cfg.backoff_ms,
    max_backoff_ms = cfg.max_backoff_ms, password = cfg.password }
  for k, v in pairs(opts) do
    o[k] = v
  end
  if o.password then
    secrets.add(o.password)
  end
  return redis.connect(cfg.url, o)
end

-- "}" would end the hash tag early, "{" start none: both are escaped (and
-- "%", so that no two keys meet).
local ESC = { ["{"] = "%7B", ["}"] = "%7D", ["%"] = "%25" }

-- The Redis key of a state key: prefix{key}suffix.
local function rkey(self, key, suffix)
  if find(key, "[{}%%]") then
    key = gsub(key, "[{}%%]", ESC)
  end
  return self.prefix .. "{" .. key .. "}" .. (suffix or "")
end

local Tier = {}
Tier.__index = Tier

Tier.key = rkey

-- The first failure of an outage is logged; each is counted.
function Tier:failed(kind, msg)
  self.errors[kind] = (self.errors[kind] or 0) + 1
  if DOWN[kind] and self.up then
    self.up = false
    log.log("warn", "redis: %s; going on with this replica's own state until it answers", msg)
  end
  return nil, kind, msg
end

local function back(self)
  if not self.up then
    self.up = true
    self.offset = nil -- another server, perhaps: measure its clock again
    log.log("warn", "redis: %s answers again; state is shared again", self.server)
  end
end

-- client:call with the failures counted; a reply means Redis is up.
function Tier:call(...)
  local v, kind, msg = self.client:call(...)
  if v == nil and kind then
    return self:failed(kind, msg)
  end
  back(self)
  return v
end

-- The server's clock (ms), as every replica sees it: this process's
-- monotonic clock plus the offset measured with TIME (at most every
-- clock_refresh_ms, and after an outage). nil, kind, message before the
-- first measure when Redis does not answer.
function Tier:now()
  local t = now()
  if not self.offset or t - self.offset_at > _M.clock_refresh_ms then
    local v, kind, msg = self:call("TIME")
    if not v then
      if not self.offset then
        return nil, kind, msg
      end
    else
      local t1 = now()
      self.offset = tonumber(v[1]) * 1000 + tonumber(v[2]) / 1000 - (t + t1) / 2
      self.offset_at = t1
      t = t1
    end
  end
  return t + self.offset
end

-- EVALSHA of a script (SCRIPT LOAD once, again after a NOSCRIPT: the
-- server restarted or flushed its scripts).
local function eval(self, retried, script, ...)
  local sha = self.shas[script]
  if not sha then
    local s, kind, msg = self:call("SCRIPT", "LOAD", script)
    if not s then
      return nil, kind, msg
    end
    sha = s
    self.shas[script] = s
  end
  local v, kind, msg = self.client:call("EVALSHA", sha, ...)
  if v == nil and kind == "redis" and find(msg, "^NOSCRIPT") and not retried then
    self.shas[script] = nil
    return eval(self, true, script, ...)
  end
  if v == nil and kind then
    return self:failed(kind, msg)
  end
  back(self)
  return v
end

function Tier:eval(script, ...)
  return eval(self, false, script, ...)
end

-- Before the first request: the connection made, the server's clock
-- measured, the window script loaded, each within connect_timeout_ms, so
-- that the first requests need one call each. A failure is the outage's
-- first (logged; the back-off starts). Returns true or nil, kind, message.
function Tier:warm()
  self.client:set_timeout(self.cfg.connect_timeout_ms)
  local ok, kind, msg = self:now()
  if ok then
    ok, kind, msg = self:call("SCRIPT", "LOAD", _M.WINDOW_SCRIPT)
    self.shas[_M.WINDOW_SCRIPT] = ok or nil
  end
  self.client:set_timeout(self.cfg.timeout_ms)
  if not ok then
    return nil, kind, msg
  end
  return true
end

-- Counts n in the sliding window of window_ms under key, unless limit is
-- given and the count would pass it. Returns true, slot, previous, frac,
-- current (counted); false, nil, previous, frac, current (not counted:
-- over the limit); nil, kind, message (Redis failed).
function Tier:window(key, n, window_ms, limit)
  local t, kind, msg = self:now()
  if not t then
    return nil, kind, msg
  end
  local idx = floor(t / window_ms)
  local frac = (t - idx * window_ms) / window_ms
  local cur_key = rkey(self, key, idx)
  local v
  v, kind, msg = self:eval(_M.WINDOW_SCRIPT, 2, rkey(self, key, idx - 1), cur_key, n, 2 * window_ms + 1000, frac,
    limit or "")
  if not v then
    return nil, kind, msg
  end
  local prev, cur = tonumber(v[2]), tonumber(v[3])
  if v[1] == 1 then
    return true, { tier = self, key = cur_key }, prev, frac, cur
  end
  return false, nil, prev, frac, cur
end

-- Takes back n of what window() counted under slot.
function Tier:undo(slot, n)
  return self:call("INCRBYFLOAT", slot.key, -n)
end

-- The sliding count under key now.
function Tier:window_count(key, window_ms)
  local t, kind, msg = self:now()
  if not t then
    return nil, kind, msg
  end
  local idx = floor(t / window_ms)
  local frac = (t - idx * window_ms) / window_ms
  local v
  v, kind, msg = self:call("MGET", rkey(self, key, idx - 1), rkey(self, key, idx))
  if not v then
    return nil, kind, msg
  end
  return (tonumber(v[1]) or 0) * (1 - frac) + (tonumber(v[2]) or 0)
end

-- Forgets the window under key.
function Tier:window_clear(key, window_ms)
  local t, kind, msg = self:now()
  if not t then
    return nil, kind, msg
  end
  local idx = floor(t / window_ms)
  return self:call("DEL", rkey(self, key, idx - 1), rkey(self, key, idx))
end

------------------------------------------------------------------------------
-- kv: the backend methods aiorch.state.breaker uses (get, set, add,
-- delete, items, now), on Redis; each falls back to the process's own
-- backend (fallback()) when Redis fails.

local KV = {}
KV.__index = KV

function KV:get(k)
  local tier = self.tier
  local v, kind = tier:call("GET", rkey(tier, k))
  if v or not kind then
    return tonumber(v)
  end
  return self.fallback():get(k)
end

local function px(ttl)
  return ttl and ttl > 0 and floor(ttl + 0.5) or nil
end

function KV:set(k, v, ttl)
  local tier = self.tier
  local ms = px(ttl)
  local ok
  if ms then
    ok = tier:call("SET", rkey(tier, k), v, "PX", ms)
  else
    ok = tier:call("SET", rkey(tier, k), v)
  end
  if ok then
    return true
  end
  return self.fallback():set(k, v, ttl)
end

-- SET NX: true when it was absent (now set), false when present.
function KV:add(k, v, ttl)
  local tier = self.tier
  local ms = px(ttl)
  local ok, kind
  if ms then
    ok, kind = tier:call("SET", rkey(tier, k), v, "NX", "PX", ms)
  else
    ok, kind = tier:call("SET", rkey(tier, k), v, "NX")
  end
  if ok or not kind then
    return ok == "OK"
  end
  return self.fallback():add(k, v, ttl)
end

function KV:delete(k)
  local tier = self.tier
  local n = tier:call("DEL", rkey(tier, k))
  if n then
    return n > 0
  end
  return self.fallback():delete(k)
end

-- The keys under prefix, by SCAN (a single server; for resets and tests).
function KV:items(prefix)
  local tier = self.tier
  local out = {}
  local pattern = gsub(rkey(tier, ""):sub(1, -2), "[%*%?%[%]\\]", "\\%0")
  pattern = pattern .. gsub(prefix, "[{}%%]", ESC):gsub("[%*%?%[%]\\]", "\\%0") .. "*"
  local cursor = "0"
  repeat
    local v = tier:call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
    if not v then
      return self.fallback():items(prefix)
    end
    cursor = v[1]
    for _, rk in pairs(v[2]) do
      if rk:sub(-1) == "}" then -- a plain key (a window's have a suffix)
        local k = rk:sub(#tier.prefix + 2, -2):gsub("%%7B", "{"):gsub("%%7D", "}"):gsub("%%25", "%%")
        out[k] = tonumber(tier.client:call("GET", rk))
      end
    end
  until cursor == "0"
  return out
end

function KV:now()
  local t = self.tier:now()
  return t or self.fallback().now()
end

------------------------------------------------------------------------------
-- cache: string values (any bytes) with a TTL, on a client of their own
-- (cache_timeout_ms), so that a large value never holds the state's calls.

function Tier:cache_client()
  local c = self.cache
  if not c then
    c = assert(_M.connect(self.cfg, { timeout_ms = self.cfg.cache_timeout_ms }))
    self.cache = c
  end
  return c
end

local function cache_call(self, ...)
  local v, kind, msg = self:cache_client():call(...)
  if v == nil and kind then
    self.errors[kind] = (self.errors[kind] or 0) + 1
    return nil, kind, msg
  end
  return v
end

-- The value under key: a string, nil (absent), or nil, kind, message.
function Tier:cache_get(key)
  return cache_call(self, "GET", rkey(self, key))
end

-- Stores value (a string) under key for ttl_ms: true or nil, kind, message.
function Tier:cache_set(key, value, ttl_ms)
  if type(value) ~= "string" then
    error("cache_set: the value must be a string", 2)
  end
  local ms = tointeger(ttl_ms)
  if not ms or ms < 1 then
    error("cache_set: ttl_ms must be an integer >= 1", 2)
  end
  local ok, kind, msg = cache_call(self, "SET", rkey(self, key), value, "PX", ms)
  if not ok then
    return nil, kind, msg
  end
  return true
end

-- true when the key was there, false when not, or nil, kind, message.
function Tier:cache_delete(key)
  local n, kind, msg = cache_call(self, "DEL", rkey(self, key))
  if not n then
    return nil, kind, msg
  end
  return n > 0
end

------------------------------------------------------------------------------

local ERRORS = "rd\31e\31" -- the errors' keys in the state, by kind

-- {up = bool, errors = {kind = n}} for /metrics: the server's (every
-- process's) when the backend is shared.
function Tier:metrics()
  local errors = {}
  if state.shared() then
    for k, v in pairs(state.read(ERRORS)) do
      errors[k:sub(#ERRORS + 1)] = v
    end
    return { up = state.gauge_total("redis_down", self.down_fn) == 0, errors = errors }
  end
  for k, v in pairs(self.errors) do
    errors[k] = v
  end
  return { up = self.up, errors = errors }
end

function Tier:close()
  state.unsource(self.source)
  state.ungauge("redis_down", self.down_fn)
  self.client:close()
  if self.cache then
    self.cache:close()
  end
end

-- A tier on cfg (from check()); fallback() gives the backend to use when
-- Redis fails (default: aiorch.state's own). Returns the tier or nil,
-- message (the host cannot be resolved).
function _M.new(cfg, fallback)
  local client, _, msg = _M.connect(cfg)
  if not client then
    return nil, "redis: " .. tostring(msg)
  end
  local t = setmetatable({ client = client, cfg = cfg, prefix = cfg.prefix, shas = {}, errors = {}, up = true,
    offset = nil, offset_at = 0, cache = nil, kind = "redis" }, Tier)
  t.server = client:stats().server
  fallback = fallback or function() return require("aiorch.state").backend() end
  t.kv = setmetatable({ tier = t, fallback = fallback, shared = true, kind = "redis" }, KV)
  t.source = state.counts_source(ERRORS, t.errors) -- the errors, by kind
  t.down_fn = function() return t.up and 0 or 1 end
  state.gauge("redis_down", t.down_fn)
  return t
end

return _M
