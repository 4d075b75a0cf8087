-- The yielding primitives, each four ways: success, expected failure,
-- misuse (raises), and cancellation or collection while pending.
local aiorch = require "aiorch"

local now, sleep, spawn = aiorch.now, aiorch.sleep, aiorch.spawn

-- A loopback server whose handler is chosen per test.
local server, base_url
local handler
local function start_server()
  server = aiorch.server.listen{
    host = "127.0.0.1", port = 0,
    handler = function(req, res) return handler(req, res) end,
  }
  base_url = "http://127.0.0.1:" .. server.port
end

describe("tasks", function()
  it("spawn/await returns every value of the task", function()
    local t = spawn(function(a, b) sleep(1); return a + b, "x", nil end, 2, 3)
    assert.equal("pending", t:status())
    local s, x, n = t:await()
    assert.equal(5, s)
    assert.equal("x", x)
    assert.is_nil(n)
    assert.equal("done", t:status())
    -- awaiting again gives the same values
    assert.equal(5, (t:await()))
  end)

  it("spawn takes opts first: a task started with a stack runs as any other", function()
    local function depth(n) -- deep enough to need more than the stack it starts with
      if n == 0 then sleep(1); return 0 end
      return 1 + depth(n - 1)
    end
    local t = spawn({ stack = 320 }, function(a, n) return a, depth(n) end, "v", 200)
    assert.equal("pending", t:status())
    local a, d = t:await()
    assert.equal("v", a)
    assert.equal(200, d)
    assert.equal(7, spawn({}, function(x) return x end, 7):await())
    assert.has_error(function() spawn({ stack = 5000 }, function() end) end)
    assert.has_error(function() spawn({ stack = -1 }, function() end) end)
    assert.has_error(function() spawn({ stack = 10 }) end)
  end)

  it("an error in a task comes back from await and leaves other tasks alone", function()
    local bad = spawn(function() sleep(1); error("kaboom") end)
    local good = spawn(function() sleep(5); return "fine" end)
    local v, kind, msg = bad:await()
    assert.is_nil(v)
    assert.equal("error", kind)
    assert.truthy(msg:find("kaboom", 1, true))
    assert.equal("fine", good:await())
    assert.equal("failed", bad:status())
  end)

  it("await with a deadline returns timeout and leaves the task running", function()
    local t = spawn(function() sleep(50); return "late" end)
    local t0 = now()
    local v, kind, msg = t:await(10)
    local waited = now() - t0
    assert.is_nil(v)
    assert.equal("timeout", kind)
    assert.equal("timeout", msg)
    assert.is_true(waited >= 9 and waited < 45, "waited " .. waited)
    assert.equal("late", t:await())
  end)

  it("misuse raises", function()
    assert.has_error(function() spawn("not a function") end)
    assert.has_error(function() aiorch.current():await() end, "task:await: a task cannot await itself")
    assert.has_error(function() spawn(function() end):await(-1) end)
    assert.has_error(function() aiorch.gather({ 1, 2 }) end)
    assert.has_error(function() aiorch.first({}, "nope") end)
    assert.has_error(function() aiorch.run(function() end) end)
  end)

  it("cancelling a task that awaits its own child ends both (the wait is undone before the child)", function()
    local child
    local t = aiorch.spawn(function()
      child = aiorch.spawn(function() aiorch.sleep(1000) end)
      child:await()
    end)
    aiorch.sleep(10)
    assert.is_true(t:cancel())
    assert.equal("cancelled", t:status())
    assert.equal("cancelled", child:status())
    assert.same({ nil, "cancelled", "cancelled" }, { t:await() })
  end)

  it("cancel stops a waiting task at once, runs its to-be-closed variables, and cancels its children #timing",
    function()
      local closed, child = false, nil
      local parent = spawn(function()
        child = spawn(function() sleep(10000) end)
        local guard <close> = setmetatable({}, { __close = function() closed = true end })
        sleep(10000)
        return guard
      end)
      sleep(1)
      assert.equal("waiting", parent:status())
      local t0 = now()
      assert.is_true(parent:cancel())
      assert.is_true(now() - t0 < 5)
      assert.equal("cancelled", parent:status())
      assert.equal("cancelled", child:status())
      assert.is_true(closed)
      local v, kind, msg = parent:await()
      assert.is_nil(v)
      assert.equal("cancelled", kind)
      assert.equal("cancelled", msg)
      assert.is_false(parent:cancel())
    end)

  it("a task that cancels itself stops at its next yield", function()
    local after = false
    local t = spawn(function()
      aiorch.current():cancel()
      sleep(1)
      after = true
    end)
    t:await()
    assert.equal("cancelled", t:status())
    assert.is_false(after)
  end)

  it("a task that nobody references still runs to the end", function()
    local done = false
    spawn(function() sleep(5); done = true end)
    collectgarbage()
    collectgarbage()
    sleep(20)
    assert.is_true(done)
  end)

  it("the collector starts earlier while thousands of tasks are live, and as before after", function()
    -- "setpause" sets and returns the previous pause: read it, put it back
    local function pause()
      local p = collectgarbage("setpause", 100)
      collectgarbage("setpause", p)
      return p
    end
    local before = pause()
    local tasks = {}
    for i = 1, 1100 do
      tasks[i] = spawn(sleep, 20)
    end
    assert.equal(120, pause())
    aiorch.gather(tasks)
    assert.equal(before, pause())
  end)
end)

describe("aiorch.sleep", function()
  it("sleeps at least the time asked, and sleep(0) lets others run", function()
    local order = {}
    local t = spawn(function() order[#order + 1] = "other" end)
    sleep(0)
    order[#order + 1] = "me"
    assert.same({ "other", "me" }, order)
    t:await()
    local t0 = now()
    sleep(15)
    local took = now() - t0
    assert.is_true(took >= 15 and took < 60, "slept " .. took)
  end)

  it("misuse raises", function()
    assert.has_error(function() sleep(-1) end)
    assert.has_error(function() sleep("x") end)
    local co = coroutine.wrap(function() sleep(1) end)
    assert.has_error(co) -- a coroutine that is not a task cannot yield to the loop
  end)

  it("a sleeping task is cancelled without waiting", function()
    local t = spawn(function() sleep(60000) end)
    sleep(1)
    local t0 = now()
    t:cancel()
    assert.equal("cancelled", t:status())
    assert.is_true(now() - t0 < 5)
  end)
end)

describe("aiorch.gather", function()
  it("returns every value in order and every error in its place", function()
    local tasks = {
      spawn(function() sleep(10); return "a" end),
      spawn(function() sleep(1); error("b failed") end),
      spawn(function() return "c" end),
    }
    local t0 = now()
    local values, errors, messages = aiorch.gather(tasks)
    assert.is_true(now() - t0 >= 9)
    assert.equal(3, values.n)
    assert.equal("a", values[1])
    assert.is_nil(values[2])
    assert.equal("error", errors[2])
    assert.truthy(messages[2]:find("b failed", 1, true))
    assert.equal("c", values[3])
    assert.is_nil(errors[1])
    assert.is_nil(messages[1])
  end)

  it("a deadline cancels the unfinished tasks and marks them timeout", function()
    local slow = spawn(function() sleep(10000) end)
    local fast = spawn(function() return 1 end)
    local values, errors, messages = aiorch.gather({ slow, fast }, 20)
    assert.equal("timeout", errors[1])
    assert.equal("timeout", messages[1])
    assert.equal(1, values[2])
    assert.equal("cancelled", slow:status())
  end)

  it("an empty list gives empty results", function()
    local values, errors, messages = aiorch.gather({})
    assert.equal(0, values.n)
    assert.equal(0, errors.n)
    assert.equal(0, messages.n)
  end)

  it("cancelling a gathering task leaves the gathered tasks running", function()
    local inner = spawn(function() sleep(20); return "x" end)
    local outer = spawn(function() return aiorch.gather({ inner }) end)
    sleep(1)
    outer:cancel()
    assert.equal("x", inner:await())
  end)
end)

describe("aiorch.first", function()
  it("returns the first value that satisfies the predicate and cancels the rest", function()
    local losers = {}
    local tasks = {
      spawn(function() sleep(40); return { ok = true, name = "slow" } end),
      spawn(function() sleep(1); return { ok = false, name = "fails fast" } end),
      spawn(function() sleep(10); return { ok = true, name = "fast" } end),
    }
    local t0 = now()
    local v, i = aiorch.first(tasks, function(r) return r.ok end)
    assert.is_true(now() - t0 < 35)
    assert.equal("fast", v.name)
    assert.equal(3, i)
    losers[1] = tasks[1]:status()
    assert.same({ "cancelled" }, losers)
  end)

  it("returns nil, \"none\", message, values, errors, messages when nothing satisfies", function()
    local tasks = {
      spawn(function() error("x") end),
      spawn(function() return false end),
    }
    local v, kind, msg, values, errors, messages = aiorch.first(tasks)
    assert.is_nil(v)
    assert.equal("none", kind)
    assert.equal("no task of 2 gave a value that satisfies the predicate", msg)
    assert.equal("error", errors[1])
    assert.truthy(messages[1]:find("x", 1, true))
    assert.is_false(values[2])
  end)

  it("a deadline ends the race", function()
    local tasks = { spawn(function() sleep(10000) end) }
    local v, kind, msg, _, errors = aiorch.first(tasks, nil, 15)
    assert.is_nil(v)
    assert.equal("timeout", kind)
    assert.equal("timeout", msg)
    assert.equal("timeout", errors[1])
    assert.equal("cancelled", tasks[1]:status())
  end)

  it("misuse raises", function()
    assert.has_error(function() aiorch.first({ spawn(function() end) }, nil, -5) end)
  end)
end)

describe("aiorch.http.request", function()
  setup(start_server)
  teardown(function() server:close() end)

  it("returns status, headers and body, and reuses the connection", function()
    handler = function(req, res)
      res:respond(201, { ["x-echo"] = req.method .. " " .. req.path }, "body:" .. req.body)
    end
    local accepted = server:stats().accepted
    for _ = 1, 3 do
      local status, headers, body = aiorch.http.request{
        method = "POST", url = base_url .. "/p?q=1", body = "hi",
        headers = { ["content-type"] = "text/plain" },
      }
      assert.equal(201, status)
      assert.equal("POST /p?q=1", headers["x-echo"])
      assert.equal("body:hi", body)
    end
    assert.equal(accepted + 1, server:stats().accepted) -- keep-alive
  end)

  it("delivers server-sent events as they arrive #timing", function()
    handler = function(_, res)
      res:start(200, { ["content-type"] = "text/event-stream" })
      res:write("event: a\ndata: 1\n\n: comment\n")
      sleep(20)
      res:write("data: two\ndata: lines\n\n")
      res:finish()
    end
    local events, times = {}, {}
    local t0 = now()
    local status, _, body = aiorch.http.request{
      url = base_url .. "/sse",
      on_event = function(ev)
        events[#events + 1] = ev.event .. "=" .. ev.data
        times[#times + 1] = now() - t0
      end,
    }
    assert.equal(200, status)
    assert.equal("", body)
    assert.same({ "a=1", "message=two\nlines" }, events)
    assert.is_true(times[1] < 15, "the first event arrived before the stream ended")
  end)

  it("fails with stable kinds: connect, timeout, too_large, invalid_url, reset", function()
    local _, kind = aiorch.http.request{ url = "http://127.0.0.1:1/" }
    assert.equal("connect", kind)

    handler = function() sleep(10000) end
    local t0 = now()
    local s, k, msg = aiorch.http.request{ url = base_url .. "/hang", timeout_ms = 50 }
    assert.is_nil(s)
    assert.equal("timeout", k)
    assert.is_string(msg)
    assert.is_true(now() - t0 < 1000)

    handler = function(_, res) res:respond(200, {}, string.rep("x", 5000)) end
    _, kind = aiorch.http.request{ url = base_url .. "/big", max_body = 100 }
    assert.equal("too_large", kind)

    _, kind = aiorch.http.request{ url = "gopher://127.0.0.1/" }
    assert.equal("invalid_url", kind)

    handler = function(_, res)
      res:start(200, { ["content-length"] = "100" })
      res:write("partial")
      sleep(5)
      res:abort()
    end
    _, kind = aiorch.http.request{ url = base_url .. "/cut" }
    assert.equal("reset", kind)
  end)

  it("an on_event that returns false stops the transfer; one that raises propagates", function()
    handler = function(_, res)
      res:start(200, { ["content-type"] = "text/event-stream" })
      for i = 1, 100 do
        if not res:write("data: " .. i .. "\n\n") then return end
        sleep(2)
      end
      res:finish()
    end
    local n = 0
    local s, kind = aiorch.http.request{
      url = base_url .. "/many", on_event = function() n = n + 1; return n < 3 and true or false end,
    }
    assert.is_nil(s)
    assert.equal("aborted", kind)
    assert.equal(3, n)
    assert.has_error(function()
      aiorch.http.request{ url = base_url .. "/many", on_event = function() error("in callback") end }
    end)
  end)

  it("on_event may yield: events keep their order and the transfer waits for it", function()
    handler = function(_, res)
      res:start(200, { ["content-type"] = "text/event-stream" })
      for i = 1, 5 do res:write("data: " .. i .. "\n\n") end
      res:finish()
    end
    local got = {}
    local status = aiorch.http.request{
      url = base_url .. "/yielding",
      on_event = function(ev)
        sleep(3) -- e.g. a write to a slow client
        got[#got + 1] = ev.data
      end,
    }
    assert.equal(200, status)
    assert.same({ "1", "2", "3", "4", "5" }, got)
  end)

  it("cancelling a task parked inside on_event aborts its transfer", function()
    local seen
    handler = function(req, res)
      seen = req
      res:start(200, { ["content-type"] = "text/event-stream" })
      res:write("data: first\n\n")
      sleep(10000)
    end
    local inside = false
    local t = spawn(function()
      return aiorch.http.request{
        url = base_url .. "/parked",
        on_event = function() inside = true; sleep(10000) end,
      }
    end)
    while not inside do sleep(1) end
    local t0 = now()
    t:cancel()
    while not seen.aborted_at and now() - t0 < 1000 do sleep(1) end
    assert.is_number(seen.aborted_at)
    assert.is_true(seen.aborted_at - t0 < 20, "closed after " .. (seen.aborted_at - t0) .. " ms")
  end)

  it("a handle reused after a transfer that failed early still reads a large body safely", function()
    -- libcurl kept the 4 KiB receive buffer of such transfers, and refused
    -- the size on the reset handle: the next read overflowed it (ASan, valgrind).
    local big = string.rep("0123456789abcdef", 4096)
    handler = function(_, res) res:respond(200, {}, big) end
    for _ = 1, 3 do
      local _, kind = aiorch.http.request{ url = "gopher://127.0.0.1/" }
      assert.equal("invalid_url", kind)
      _, kind = aiorch.http.request{ url = base_url .. "/big", max_body = 100 }
      assert.equal("too_large", kind)
      local status, _, body = aiorch.http.request{ url = base_url .. "/big" }
      assert.equal(200, status)
      assert.equal(big, body)
    end
  end)

  it("misuse raises", function()
    assert.has_error(function() aiorch.http.request("http://x") end)
    assert.has_error(function() aiorch.http.request{} end)
    assert.has_error(function() aiorch.http.request{ url = base_url, headers = { a = "x\r\nInjected: 1" } } end)
    assert.has_error(function() aiorch.http.request{ url = base_url, method = "get me" } end)
    assert.has_error(function() aiorch.http.request{ url = base_url, timeout_ms = -1 } end)
  end)

  it("cancelling a task aborts its transfer and the server sees the close at once", function()
    local seen
    handler = function(req)
      seen = req
      sleep(10000)
    end
    local t = spawn(function() return aiorch.http.request{ url = base_url .. "/slow" } end)
    while not seen do sleep(1) end
    local t0 = now()
    t:cancel()
    while not seen.aborted_at and now() - t0 < 1000 do sleep(1) end
    assert.is_number(seen.aborted_at)
    assert.is_true(seen.aborted_at - t0 < 20, "closed after " .. (seen.aborted_at - t0) .. " ms")
    assert.equal("cancelled", t:status())
    collectgarbage()
  end)
end)

-- A consumer slower than its upstream: the transfer pauses above 256 KiB
-- of events not yet taken by on_event and resumes below 64 KiB.
describe("aiorch.http.request backpressure", function()
  local HIGH_WATER = 256 * 1024
  local EVENTS = 20000
  local PAD = string.rep("x", 120)
  local seen -- the server's request table, with what its writes did

  setup(start_server)
  teardown(function() server:close() end)

  -- A fast, long stream (about 2.8 MB): event i has id i and data "i PAD".
  -- Counts on the request the bytes written and the writes that waited.
  local function long_stream(req, res)
    seen = req
    req.sent, req.waits = 0, 0
    res:start(200, { ["content-type"] = "text/event-stream" })
    local batch = {}
    for i = 1, EVENTS do
      batch[#batch + 1] = "id: " .. i .. "\ndata: " .. i .. " " .. PAD .. "\n\n"
      if #batch == 64 or i == EVENTS then
        local chunk = table.concat(batch)
        batch = {}
        local t0 = now()
        if not res:write(chunk) then
          return
        end
        if now() - t0 >= 1 then
          req.waits = req.waits + 1
        end
        req.sent = req.sent + #chunk
      end
    end
    res:finish()
  end

  -- Samples aiorch.http.stats() every 2 ms until stop() is called.
  local function sampler()
    local s = { max_queued = 0, paused = 0, running = true }
    local t = spawn(function()
      while s.running do
        local st = aiorch.http.stats()
        if st.queued_bytes > s.max_queued then
          s.max_queued = st.queued_bytes
        end
        s.paused = s.paused + st.paused
        sleep(2)
      end
    end)
    function s.stop()
      s.running = false
      t:await()
    end
    return s
  end

  local function wait_until(cond, ms)
    local t0 = now()
    while not cond() and now() - t0 < ms do
      sleep(2)
    end
    return cond()
  end

  it("holds at most about the high-water mark, stalls the upstream, and delivers every event once, in order",
    function()
      handler = long_stream
      local got, out_of_order = 0, nil
      local s = sampler()
      local status, _, body = aiorch.http.request {
        url = base_url .. "/long", timeout_ms = 60000,
        on_event = function(ev)
          got = got + 1
          if ev.id ~= tostring(got) or ev.data ~= got .. " " .. PAD then
            out_of_order = out_of_order or (got .. ": id " .. tostring(ev.id) .. ", data " .. ev.data:sub(1, 20))
          end
          if got == 1 or got % 4000 == 0 then
            sleep(300) -- parked, as in a write to a client that does not read
          end
        end,
      }
      s.stop()
      assert.equal(200, status)
      assert.equal("", body)
      assert.equal(EVENTS, got)
      assert.is_nil(out_of_order)
      assert.is_true(s.paused > 0, "never paused")
      assert.is_true(s.max_queued >= HIGH_WATER * 3 // 4, "queued at most " .. s.max_queued)
      assert.is_true(s.max_queued <= HIGH_WATER + 32 * 1024, "queued " .. s.max_queued .. " bytes")
      assert.is_true(seen.waits > 0, "the server's writes never waited")
      assert.same({ requests = 0, paused = 0, queued_bytes = 0 }, aiorch.http.stats())
    end)

  it("a paused transfer is cancelled at once and freed; the next request goes through", function()
    handler = long_stream
    local t = spawn(function()
      return aiorch.http.request { url = base_url .. "/paused", on_event = function() sleep(100000) end }
    end)
    local paused = wait_until(function() return aiorch.http.stats().paused == 1 end, 5000)
    local t0 = now()
    t:cancel()
    assert.truthy(paused, "not paused")
    assert.same({ requests = 0, paused = 0, queued_bytes = 0 }, aiorch.http.stats())
    while not seen.aborted_at and now() - t0 < 1000 do sleep(1) end
    assert.is_number(seen.aborted_at)
    assert.is_true(seen.aborted_at - t0 < 50, "closed after " .. (seen.aborted_at - t0) .. " ms")
    assert.is_true(seen.sent < EVENTS * #PAD, "the server sent it all")
    -- the pooled handle that was paused serves a whole stream
    local got = 0
    local status = aiorch.http.request { url = base_url .. "/after", on_event = function() got = got + 1 end }
    assert.equal(200, status)
    assert.equal(EVENTS, got)
  end)

  it("the total deadline ends a paused transfer; the gap deadline counts the upstream's silence only", function()
    handler = long_stream
    local t0 = now()
    local first = true
    local s, kind, _, which = aiorch.http.request {
      url = base_url .. "/total", timeout_ms = 400,
      on_event = function()
        if first then
          first = false
          sleep(1000)
        end
      end,
    }
    assert.is_nil(s)
    assert.equal("timeout", kind)
    assert.equal("total", which)
    assert.is_number(seen.aborted_at)
    assert.is_true(seen.aborted_at - t0 < 900, "closed after " .. (seen.aborted_at - t0) .. " ms")
    assert.equal(0, aiorch.http.stats().requests)

    -- paused longer than the gap: the upstream was not silent, we were
    local got = 0
    local status = aiorch.http.request {
      url = base_url .. "/gap", gap_timeout_ms = 200,
      on_event = function()
        got = got + 1
        if got == 1 then
          sleep(600)
        end
      end,
    }
    assert.equal(200, status)
    assert.equal(EVENTS, got)

    -- an upstream that goes silent still meets the gap deadline
    handler = function(_, res)
      res:start(200, { ["content-type"] = "text/event-stream" })
      res:write("data: 1\n\n")
      sleep(5000)
    end
    t0 = now()
    s, kind, _, which = aiorch.http.request {
      url = base_url .. "/silent", gap_timeout_ms = 200, on_event = function() end,
    }
    assert.is_nil(s)
    assert.equal("timeout", kind)
    assert.equal("gap", which)
    assert.is_true(now() - t0 < 1000)
  end)
end)
