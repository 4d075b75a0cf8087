-- aiorch.state, the one interface to server-wide state, on each backend:
-- the local one (this process) and the shared-memory one (aiorch.shm, as
-- the workers of `aiorch serve` use it). The same cases run on both; the
-- shm ones then show what sharing adds, with two backends on one segment
-- standing for two workers.
local aiorch = require "aiorch"
local state = require "aiorch.state"
local state_local = require "aiorch.state.local"
local state_shm = require "aiorch.state.shm"
local breaker = require "aiorch.breaker"
local metrics = require "aiorch.metrics"

local POL = { breaker_failures = 3, breaker_window_ms = 10000, cooldown_ms = 80 }

-- A backend whose clock the test sets (b:now() reads t[1]).
local function on_clock(b, t)
  b.now = function() return t[1] end
  return b
end

-- The first two results of a call: nil and the kind of its failure.
local function fail_of(a, kind)
  return { a, kind }
end

local BACKENDS = {
  ["local"] = function() return state_local.new() end,
  shm = function() return state_shm.new(assert(aiorch.shm.open(1024 * 1024)), "w1") end,
}

for _, kind in ipairs { "local", "shm" } do
  describe("aiorch.state on the " .. kind .. " backend", function()
    local b
    before_each(function()
      b = state.use(BACKENDS[kind]())
      breaker.reset()
    end)
    after_each(function()
      breaker.reset()
      state.use(state_local.new())
    end)

    it("says whether it is shared", function()
      assert.equal(kind == "shm", state.shared())
      assert.equal(b, state.backend())
    end)

    it("lets a window's limit through, then refuses with when to come back", function()
      local t = { 60000 * 1000 } -- the start of a minute
      on_clock(b, t)
      for i = 1, 100 do
        assert.is_true((state.window("rl", 1, 60000, 100)), "request " .. i)
      end
      local ok, wait = state.window("rl", 1, 60000, 100)
      assert.is_false(ok)
      -- not before the next window, and 1/100 into it (the last window weighs 99/100 then)
      assert.near(60600, wait, 1)
      assert.equal(100, state.window_count("rl", 60000)) -- the refused one was not counted
      -- a quarter into the next window, three quarters of the last one count
      t[1] = t[1] + 60000 + 15000
      assert.near(75, state.window_count("rl", 60000), 0.001)
      for _ = 1, 25 do
        assert.is_true((state.window("rl", 1, 60000, 100)))
      end
      ok, wait = state.window("rl", 1, 60000, 100)
      assert.is_false(ok)
      -- 25 here, 100 before: one more fits once 1/100 of the old window is out of view
      assert.near(600, wait, 1)
      t[1] = t[1] + 601
      assert.is_true((state.window("rl", 1, 60000, 100)))
    end)

    it("takes back a counted request (undo)", function()
      local ok, slot = state.window("u", 1, 1000, 2)
      assert.is_true(ok)
      assert.is_true((state.window("u", 1, 1000, 2)))
      assert.is_false((state.window("u", 1, 1000, 2)))
      state.undo(slot)
      assert.is_true((state.window("u", 1, 1000, 2)))
    end)

    it("acquires up to a limit and releases", function()
      assert.are.same({ true, 1 }, { state.acquire("inflight", 2) })
      assert.are.same({ true, 2 }, { state.acquire("inflight", 2) })
      assert.are.same({ false, 2 }, { state.acquire("inflight", 2) })
      state.release("inflight")
      assert.equal(1, state.count("inflight"))
      assert.is_true((state.acquire("inflight", 2)))
    end)

    it("says full when there is no room, and keeps what it has", function()
      local small = kind == "local" and state_local.new { max_keys = 3 }
        or state_shm.new(assert(aiorch.shm.open(64 * 1024)), "w1")
      state.use(small)
      local cap = small:stats().capacity
      for i = 1, cap do
        assert.truthy(small:set("k" .. i, i))
      end
      assert.are.same({ nil, "full" }, fail_of(small:set("one more", 1)))
      local ok, kind2, msg = state.window("w", 1, 1000, 10)
      assert.is_nil(ok)
      assert.equal("full", kind2)
      assert.matches("full", msg)
      assert.equal(cap, small:get("k" .. cap))
      -- keys with an expiry make room when they expire
      small:delete("k1")
      assert.truthy(small:set("brief", 1, 30))
      aiorch.sleep(40)
      assert.truthy(small:set("after", 2))
      assert.is_nil(small:get("brief"))
    end)

    it("has the semantics of aiorch.shm for add, cas, incr and items", function()
      assert.is_true(b:add("a", 1))
      assert.is_false(b:add("a", 2))
      assert.are.same({ false, 1 }, { b:cas("a", 5, 6) })
      assert.is_true(b:cas("a", 1, 6))
      assert.are.same({ false, nil }, { b:cas("absent", 1, 2) })
      assert.is_true(b:cas("absent", nil, 2))
      assert.are.same({ nil, "not_found" }, fail_of(b:incr("nope", 1)))
      assert.equal(3, b:incr("nope", 1, 2))
      assert.are.same({ 4, 10 }, { b:incr_many { "nope", 1, "new", 10 } })
      assert.are.same({ ["p.x"] = 1, ["p.y"] = 2 }, (function()
        b:set("p.x", 1)
        b:set("p.y", 2)
        b:set("q.z", 3)
        return b:items("p.")
      end)())
      assert.is_true(b:delete("p.x"))
      assert.is_false(b:delete("p.x"))
      assert.has_error(function() b:get(("k"):rep(225)) end)
    end)

    it("keeps a breaker's states: closed, open after failures, half open, one trial", function()
      for _ = 1, 2 do
        breaker.record("prov", POL, false, "server_error")
      end
      assert.is_true((breaker.allow("prov")))
      assert.equal(2, breaker.health("prov").failures)
      breaker.record("prov", POL, false, "bad_request") -- not a failure of the provider's
      breaker.record("prov", POL, false, "server_error")
      local ok, why = breaker.allow("prov")
      assert.is_false(ok)
      assert.matches("prov is cooling down for %d+ ms more %(3 failures in 10000 ms%)", why)
      assert.equal("open", breaker.health("prov").state)
      breaker.record("prov", POL, false, "server_error") -- stale: let through before it opened
      breaker.record("prov", POL, true)
      aiorch.sleep(100)
      assert.equal("half_open", breaker.health("prov").state)
      local t1, trial = breaker.allow("prov")
      assert.is_true(t1)
      assert.equal("trial", trial)
      assert.is_false((breaker.allow("prov"))) -- one trial at a time
      breaker.release("prov", true) -- the trial was cancelled: the next may try
      assert.is_true((breaker.allow("prov")))
      breaker.record("prov", POL, false, "timeout", nil, true)
      assert.equal("open", breaker.health("prov").state)
      assert.matches("the trial request failed", select(2, breaker.allow("prov")))
      aiorch.sleep(100)
      assert.is_true((breaker.allow("prov")))
      breaker.record("prov", POL, true, nil, nil, true)
      assert.are.same({ healthy = true, state = "closed", failures = 0 }, breaker.health("prov"))
      -- a 429 with Retry-After opens it for that long, and says so
      breaker.record("prov", POL, false, "rate_limited", 2)
      local ok2, why2, left = breaker.allow("prov")
      assert.is_false(ok2)
      assert.matches("it asked to wait 2 s", why2)
      assert.is_true(left > 1900 and left <= 2000)
    end)
  end)
end

describe("aiorch.state shared by two processes (two backends on one segment)", function()
  local dict, w1, w2
  before_each(function()
    dict = assert(aiorch.shm.open(1024 * 1024))
    w1, w2 = state_shm.new(dict, "101"), state_shm.new(dict, "102")
  end)
  after_each(function()
    breaker.reset()
    state.use(state_local.new())
  end)

  it("a window counts the requests of both", function()
    local through = 0
    for i = 1, 40 do
      state.use(i % 2 == 0 and w1 or w2)
      if state.window("rl", 1, 60000, 25) then
        through = through + 1
      end
    end
    assert.equal(25, through)
  end)

  it("a breaker opened by one's failures is open for the other", function()
    state.use(w1)
    breaker.record("prov", POL, false, "server_error")
    breaker.record("prov", POL, false, "server_error")
    state.use(w2)
    assert.is_true((breaker.allow("prov")))
    breaker.record("prov", POL, false, "server_error")
    state.use(w1)
    assert.is_false((breaker.allow("prov")))
    assert.is_false(breaker.health("prov").healthy)
    aiorch.sleep(100)
    assert.is_true((breaker.allow("prov"))) -- w1 has the trial
    state.use(w2)
    assert.is_false((breaker.allow("prov")))
    breaker.record("prov", POL, false, "server_error", nil, false) -- w2's stale failure changes nothing
    state.use(w1)
    breaker.record("prov", POL, true, nil, nil, true)
    state.use(w2)
    assert.equal("closed", breaker.health("prov").state)
  end)

  it("max in flight holds for both, and a dead one's share is given back", function()
    state.use(w1)
    assert.is_true((state.acquire("if", 3)))
    assert.is_true((state.acquire("if", 3)))
    state.use(w2)
    assert.is_true((state.acquire("if", 3)))
    assert.is_false((state.acquire("if", 3)))
    state_shm.forget(dict, "101") -- the master, when w1's process is gone
    assert.equal(1, state.count("if"))
    assert.is_true((state.acquire("if", 3)))
    assert.is_true((state.acquire("if", 3)))
    assert.is_false((state.acquire("if", 3)))
    state.release("if")
    assert.equal(2, state.count("if"))
  end)

  it("counters: each pushes its deltas; totals only grow and include the reader's own", function()
    metrics.reset()
    state.use(w1)
    metrics.started("p1")
    metrics.finished("p1", { status = "success", latency_ms = 120,
      metadata = { usage = { input_tokens = 5, output_tokens = 7 }, cost_usd = 0.25 } })
    metrics.finished("p1", { status = "error", latency_ms = 20, metadata = { error_kind = "server_error" } })
    local snap = metrics.snapshot() -- flushes its own first
    assert.equal(1, snap.p1.requests)
    assert.equal(1, snap.p1.successes)
    assert.equal(1, snap.p1.errors_by_kind.server_error)
    assert.equal(5, snap.p1.tokens_in)
    assert.equal(0.25, snap.p1.cost_usd)
    assert.equal(2, snap.p1.latency.count)
    assert.equal(1, snap.p1.latency.buckets[1].count) -- 20 ms
    assert.equal(2, snap.p1.latency.buckets[3].count) -- 120 ms, cumulative
    metrics.started("p1") -- counted, not flushed
    state.use(w2) -- "another worker": its own counters start at what it counted
    metrics.reset()
    metrics.started("p1")
    snap = metrics.snapshot()
    assert.equal(2, snap.p1.requests) -- w1's first, w2's one: w1's second is not flushed yet
    state.use(w1)
    metrics.reset()
    metrics.count("p1", "retries", 3)
    state.flush()
    state.use(w2)
    assert.equal(3, metrics.snapshot().p1.retries)
    assert.equal(2, metrics.snapshot().p1.requests) -- never less than before
  end)

  it("a gauge is the sum of each one's value, the asker's own fresh", function()
    local mine = 2
    local function five() return 5 end
    local function my() return mine end
    state.use(w1)
    state.gauge("g", five)
    state.flush()
    state.use(w2)
    state.gauge("g", my)
    state.flush()
    mine = 4
    assert.equal(9, state.gauge_total("g", function() return mine end))
    state_shm.forget(dict, "101")
    assert.equal(4, state.gauge_total("g", my))
    state.ungauge("g", my)
  end)
end)

describe("aiorch.state.shm sizes", function()
  it("parses shared_memory sizes and refuses bad ones by name", function()
    assert.equal(8 * 1024 * 1024, state_shm.parse_size("8m"))
    assert.equal(512 * 1024, state_shm.parse_size("512k"))
    assert.equal(1024 * 1024 * 1024, state_shm.parse_size("1g"))
    assert.equal(100000, state_shm.parse_size(100000))
    for _, bad in ipairs { "1k", "2g", "8x", -1, 1.5, true } do
      local n, err = state_shm.parse_size(bad)
      assert.is_nil(n)
      assert.matches("^shared_memory: must be a size from 64k to 1g", err)
    end
  end)
end)
