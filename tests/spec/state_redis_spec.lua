-- aiorch.state.redis, the Redis tier of aiorch.state, against a real
-- redis-server: windows counted by the script as the local backend counts
-- them, keys with one hash tag per window, scripts loaded again after a
-- flush, a Redis that is down or too slow answered by the process's own
-- state (or an error, failing closed), breakers and the cache.
local aiorch = require "aiorch"
local state = require "aiorch.state"
local state_local = require "aiorch.state.local"
local state_redis = require "aiorch.state.redis"
local breaker = require "aiorch.breaker"
local support = require "tests.support"
local redis_server = require "tests.redis_server"

local fmt = string.format

describe("aiorch.state.redis", function()
  local rs, admin
  local n = 0

  -- A tier on the server with a prefix of its own, shared by aiorch.state.
  local function tier(extra)
    n = n + 1
    local raw = { url = rs.url, prefix = "t" .. n .. ":", timeout_ms = support.stretch(200) }
    for k, v in pairs(extra or {}) do
      raw[k] = v
    end
    local cfg = assert(state_redis.check(raw))
    return assert(state_redis.new(cfg))
  end

  setup(function()
    rs = redis_server.start()
    admin = assert(aiorch.redis.connect(rs.url, { timeout_ms = 2000 }))
  end)

  teardown(function()
    state.share(nil)
    admin:close()
    rs.stop()
    support.cleanup()
  end)

  before_each(function()
    state.use(state_local.new())
    -- The windows counted here are a minute long and sliding: a test that
    -- crossed into the next minute would see last minute's counts weighted
    -- down (1.996 for 2). Start well inside a minute.
    local into = aiorch.now() % 60000
    if into > 55000 then
      aiorch.sleep(60000 - into + 50)
    end
  end)

  after_each(function()
    local t = state.redis()
    state.share(nil)
    if t then
      t:close()
    end
  end)

  it("counts a window with the local backend's arithmetic, on keys that share one hash tag", function()
    local t = state.share(tier())
    for i = 1, 5 do
      local ok, slot = state.window("8080\31r*", 1, 60000, 5)
      assert.is_true(ok, "request " .. i)
      assert.equal("table", type(slot))
    end
    local ok, wait = state.window("8080\31r*", 1, 60000, 5)
    assert.is_false(ok)
    assert.is_true(wait >= 1 and wait <= 120000, tostring(wait))
    assert.equal(5, state.window_count("8080\31r*", 60000))
    -- budgets: fractional amounts, no limit
    local c = state.window_add("budget", 0.25, 3600000)
    assert.equal(0.25, c)
    c = state.window_add("budget", 0.5, 3600000)
    assert.equal(0.75, c)
    -- what the local backend saw: nothing
    assert.same({}, state.backend():items(""))
    -- the keys: prefix{key}window, the tag the same for both of a window's slots
    local keys = admin:call("KEYS", t.prefix .. "*")
    table.sort(keys)
    assert.equal(2, #keys)
    for _, k in ipairs(keys) do
      local tag = k:match("^t%d+:{([^}]*)}%d+$")
      assert.truthy(tag, k)
      assert.truthy(tag == "8080\31r*" or tag == "budget", k)
    end
    -- the window's key expires (two windows and a second)
    local pttl = admin:call("PTTL", keys[1])
    assert.is_true(pttl > 60000 and pttl <= 3600000 * 2 + 1000, tostring(pttl))
    -- undo gives back what was counted
    local ok2, slot = state.window("other", 2, 60000, 10)
    assert.is_true(ok2)
    state.undo(slot, 2)
    assert.equal(0, state.window_count("other", 60000))
    -- braces in a key cannot split the tag
    assert.truthy(state.window("a}b{c", 1, 1000, 10))
    keys = admin:call("KEYS", t.prefix .. "{a*")
    assert.equal(1, #keys)
    assert.truthy(keys[1]:find("{a%7Db%7Bc}", 1, true), keys[1])
  end)

  it("loads its script again when the server lost it (NOSCRIPT)", function()
    state.share(tier())
    assert.is_true((state.window("k", 1, 60000, 10)))
    assert.equal("OK", admin:call("SCRIPT", "FLUSH"))
    assert.is_true((state.window("k", 1, 60000, 10)))
    assert.equal(2, state.window_count("k", 60000))
    assert.is_false(state.degraded())
  end)

  it("a slow redis: the window falls back to the local state within the timeout; fail_closed sees the error",
    function()
      local t = state.share(tier { timeout_ms = 30, backoff_ms = 200 })
      assert.is_true((state.window("s", 1, 60000, 3))) -- connected, clock known
      assert.equal("OK", admin:call("CLIENT", "PAUSE", 300, "WRITE"))
      local t0 = aiorch.now()
      local ok = state.window("s", 1, 60000, 3)
      local took = aiorch.now() - t0
      assert.is_true(ok)
      assert.is_true(took < support.stretch(200), fmt("took %.1f ms", took))
      assert.equal(1, state.backend():get("s\31" .. math.floor(aiorch.now() / 60000)))
      local degraded, why = state.degraded()
      assert.is_true(degraded)
      assert.matches("redis", why)
      -- in the back-off: at once
      t0 = aiorch.now()
      local v, kind = state.window("s", 1, 60000, 3, true)
      assert.is_true(aiorch.now() - t0 < 5)
      assert.is_nil(v)
      assert.equal("connect", kind)
      assert.is_nil(state.window_add("s", 1, 60000, true))
      assert.is_nil(state.window_count("s", 60000, true))
      local errs = t:metrics().errors
      assert.is_true(errs.timeout == 1 and errs.connect >= 1, require("cjson").encode(errs))
      assert.is_false(t:metrics().up)
      -- back: shared again
      aiorch.sleep(support.stretch(400))
      assert.is_true((state.window("s", 1, 60000, 3)))
      assert.is_false(state.degraded())
      assert.equal(2, state.window_count("s", 60000))
    end)

  it("keeps breakers in redis, where another replica finds them", function()
    local t = state.share(tier())
    local pol = { breaker_failures = 2, breaker_window_ms = 60000, cooldown_ms = 60000 }
    breaker.record("prov", pol, false, "server_error")
    assert.is_true((breaker.allow("prov")))
    breaker.record("prov", pol, false, "server_error")
    local ok, msg = breaker.allow("prov")
    assert.is_false(ok)
    assert.matches("2 failures in 60000 ms", msg)
    -- another replica: its own tier, the same prefix
    local other = assert(state_redis.new(t.cfg, function() return state_local.new() end))
    local until_ms = other.kv:get("b\31prov\31u")
    assert.is_true(until_ms > other.kv:now() + 50000)
    other:close()
    -- the failures' window was cleared when it opened
    assert.equal(0, #admin:call("KEYS", t.prefix .. "{b\31prov\31f}*"))
    assert.same({}, state.backend():items("b\31"))
    breaker.reset()
    assert.is_true((breaker.allow("prov")))
  end)

  it("a cache of bytes with a TTL, on its own connection", function()
    local t = tier()
    assert.is_true(t:cache_set("resp:1", "a\0b", 60))
    assert.equal("a\0b", t:cache_get("resp:1"))
    assert.is_nil(t:cache_get("resp:2"))
    aiorch.sleep(120)
    assert.is_nil(t:cache_get("resp:1"))
    assert.is_true(t:cache_set("resp:3", "x", 10000))
    assert.is_true(t:cache_delete("resp:3"))
    assert.is_false(t:cache_delete("resp:3"))
    assert.has_error(function() t:cache_set("k", 1, 10) end, "cache_set: the value must be a string")
    assert.has_error(function() t:cache_set("k", "v", 0) end, "cache_set: ttl_ms must be an integer >= 1")
    assert.equal("aiorch.redis.client", tostring(t:cache_client()):match("^[%w%.]+"))
    assert.equal(t.prefix .. "{resp:1}", t:key("resp:1"))
    t:close()
  end)

  it("checks its configuration, naming the field", function()
    local function bad(raw, pattern, getenv)
      local c, err = state_redis.check(raw, getenv)
      assert.is_nil(c)
      assert.truthy(err:find(pattern, 1, true), err)
    end
    bad("redis://x", "redis: must be a table")
    bad({ url = "http://x" }, "redis.url: must be a redis://")
    bad({ url = "redis://x", timeout_ms = 0 }, "redis.timeout_ms: must be an integer from 1 to 60000")
    bad({ url = "redis://x", prefix = "a{b" }, "redis.prefix: must be a string")
    bad({ url = "redis://x", port = 1 }, "redis: unknown field 'port'")
    bad({ url = "redis://x", password_env = "NOPE_UNSET" }, "redis.password_env: NOPE_UNSET is not set",
      function() return nil end)
    bad({ url = "redis://x", backoff_ms = 500, max_backoff_ms = 100 }, "redis.max_backoff_ms")
    local c = assert(state_redis.check({ url = "redis://x:1/2", password_env = "PW" },
      function(k) return k == "PW" and "pw-value" or nil end))
    assert.same({ url = "redis://x:1/2", prefix = "aiorch:", timeout_ms = 20, cache_timeout_ms = 20,
      connect_timeout_ms = 1000, backoff_ms = 100, max_backoff_ms = 2000, password = "pw-value" }, c)
  end)
end)
