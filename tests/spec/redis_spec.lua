-- aiorch.redis against a real redis-server on loopback: replies as Lua
-- values, pipelining, the deadline of a call (a server that never
-- answers, a paused one), refused connections and the back-off, misuse,
-- cancellation and collection while a call is pending, reconnection
-- after the server came back.
local aiorch = require "aiorch"
local support = require "tests.support"
local redis_server = require "tests.redis_server"

local redis = aiorch.redis
local fmt = string.format

describe("aiorch.redis", function()
  local rs

  setup(function()
    rs = redis_server.start()
  end)

  teardown(function()
    rs.stop()
    support.cleanup()
  end)

  local function client(path, opts)
    return assert(redis.connect(rs.url .. (path or ""), opts or { timeout_ms = support.stretch(1000) }))
  end

  describe("answers", function()
    it("strings (any bytes), integers, nil, arrays, status replies", function()
      local r = client()
      assert.equal("OK", r:call("SET", "bin", "a\0b\255", "PX", 10000))
      assert.equal("a\0b\255", r:call("GET", "bin"))
      r:call("DEL", "n")
      assert.equal(1, r:call("INCR", "n"))
      assert.equal(5, r:call("INCRBY", "n", 4)) -- a number argument
      local v = table.pack(r:call("GET", "absent"))
      assert.equal(1, v.n)
      assert.is_nil(v[1])
      -- a nil inside an array is false; nested arrays are tables
      assert.same({ "a\0b\255", false, "5" }, r:call("MGET", "bin", "absent", "n"))
      assert.same({ 1, { "x", { 2 } }, false },
        r:call("EVAL", "return {1, {'x', {2}}, false}", 0))
      assert.equal("PONG", r:call("PING"))
      r:close()
    end)

    it("an error reply is nil, \"redis\", message; inside an array {err = message}", function()
      local r = client()
      local v, kind, msg = r:call("NOSUCHCOMMAND", "x")
      assert.is_nil(v)
      assert.equal("redis", kind)
      assert.matches("^ERR unknown command", msg)
      r:call("SET", "str", "x")
      v, kind, msg = r:call("INCR", "str")
      assert.is_nil(v)
      assert.equal("redis", kind)
      assert.matches("not an integer", msg)
      local t = r:call("EVAL", "return {1, redis.pcall('INCR', KEYS[1])}", 1, "str")
      assert.equal(1, t[1])
      assert.matches("not an integer", t[2].err)
      -- the connection goes on
      assert.equal("PONG", r:call("PING"))
      r:close()
    end)

    it("pipelines the calls of many tasks on one connection, each getting its own reply", function()
      local r = client()
      r:call("DEL", "p")
      local tasks = {}
      for i = 1, 200 do
        tasks[i] = aiorch.spawn(function()
          return r:call("RPUSH", "p", i), i
        end)
      end
      local seen = {}
      for i = 1, 200 do
        seen[tasks[i]:await()] = true -- each RPUSH answered with the list's length then
      end
      for i = 1, 200 do
        assert.is_true(seen[i], "no call saw the length " .. i)
      end
      assert.equal(200, r:call("LLEN", "p"))
      assert.equal(1, r:stats().connects)
      assert.equal(0, r:stats().pending)
      r:close()
    end)

    it("selects the URL's database", function()
      local r3, r0 = client("/3"), client("/0")
      r3:call("SET", "where", "three")
      r0:call("SET", "where", "zero")
      assert.equal("three", r3:call("GET", "where"))
      assert.equal("zero", r0:call("GET", "where"))
      r3:close()
      r0:close()
    end)

    it("authenticates with the URL's user and password, or opts.password; a refusal never shows it", function()
      local admin = client()
      assert.equal("OK", admin:call("ACL", "SETUSER", "alice", "on", ">s3cret-pass", "~*", "+@all"))
      local host = rs.url:sub(#"redis://" + 1)
      local r = assert(redis.connect("redis://alice:s3cret%2Dpass@" .. host, { timeout_ms = 1000 }))
      assert.equal("alice", r:call("ACL", "WHOAMI"))
      r:close()
      r = assert(redis.connect("redis://alice@" .. host, { timeout_ms = 1000, password = "s3cret-pass" }))
      assert.equal("alice", r:call("ACL", "WHOAMI"))
      r:close()
      r = assert(redis.connect("redis://alice:wrong-pass@" .. host, { timeout_ms = 1000 }))
      local v, kind, msg = r:call("PING")
      assert.is_nil(v)
      assert.equal("connect", kind)
      assert.matches("refused the connection's setup", msg)
      assert.is_nil(msg:find("wrong-pass", 1, true))
      assert.is_nil(tostring(r):find("wrong-pass", 1, true))
      r:close()
      admin:call("ACL", "DELUSER", "alice")
      admin:close()
    end)
  end)

  describe("expected failures", function()
    it("a server that never answers: nil, \"timeout\" at the call's deadline, then the back-off", function()
      local silent = redis_server.silent()
      local r = assert(redis.connect("redis://127.0.0.1:" .. silent.port, { timeout_ms = 50, backoff_ms = 300 }))
      local t0 = aiorch.now()
      local v, kind, msg = r:call("PING")
      local took = aiorch.now() - t0
      assert.is_nil(v)
      assert.equal("timeout", kind)
      assert.matches("did not answer within 50 ms", msg)
      assert.is_true(took >= 49 and took < support.stretch(500), fmt("took %.1f ms", took))
      -- the connection is dropped; until the back-off ends, calls fail at once
      t0 = aiorch.now()
      v, kind, msg = r:call("PING")
      assert.is_nil(v)
      assert.equal("connect", kind)
      assert.matches("too slow.*next attempt in %d+ ms", msg)
      assert.is_true(aiorch.now() - t0 < 5)
      local st = r:stats()
      assert.equal("down", st.state)
      assert.equal(1, st.timeouts)
      assert.equal(0, st.pending)
      r:close()
      silent.stop()
    end)

    it("a paused server: the call times out, and a later one reconnects once the back-off is over", function()
      local admin = client()
      local r = assert(redis.connect(rs.url, { timeout_ms = 30, backoff_ms = 50 }))
      assert.equal("PONG", r:call("PING"))
      assert.equal("OK", admin:call("CLIENT", "PAUSE", 150, "ALL"))
      local v, kind = r:call("PING")
      assert.is_nil(v)
      assert.equal("timeout", kind)
      aiorch.sleep(support.stretch(250))
      assert.equal("PONG", r:call("PING"))
      assert.equal(2, r:stats().connects)
      -- a longer deadline from now on: the same pause is waited out
      r:set_timeout(support.stretch(1000))
      assert.equal("OK", admin:call("CLIENT", "PAUSE", 100, "ALL"))
      assert.equal("PONG", r:call("PING"))
      assert.has_error(function() r:set_timeout(0) end)
      admin:close()
      r:close()
    end)

    it("a closed port: nil, \"connect\"; a bad host name: nil, \"connect\" from connect()", function()
      local port = support.free_port()
      local r = assert(redis.connect("redis://127.0.0.1:" .. port, { timeout_ms = 200 }))
      local v, kind, msg = r:call("PING")
      assert.is_nil(v)
      assert.equal("connect", kind)
      assert.matches("cannot connect to redis at 127.0.0.1:" .. port, msg)
      r:close()
      v, kind, msg = redis.connect("redis://no-such-host.invalid:6379")
      assert.is_nil(v)
      assert.equal("connect", kind)
      assert.truthy(msg:find("cannot resolve the redis host 'no-such-host.invalid'", 1, true), msg)
    end)

    it("more calls pending than max_pending: nil, \"busy\"", function()
      local silent = redis_server.silent()
      local r = assert(redis.connect("redis://127.0.0.1:" .. silent.port, { timeout_ms = 1000, max_pending = 2 }))
      local a = aiorch.spawn(function() return r:call("PING") end)
      local b = aiorch.spawn(function() return r:call("PING") end)
      aiorch.sleep(0)
      local v, kind, msg = r:call("PING")
      assert.is_nil(v)
      assert.equal("busy", kind)
      assert.matches("max_pending", msg)
      r:close()
      assert.same({ nil, "closed", "the redis client was closed" }, { a:await() })
      assert.same({ nil, "closed", "the redis client was closed" }, { b:await() })
      silent.stop()
    end)
  end)

  describe("misuse raises", function()
    it("bad URLs and options", function()
      for _, url in ipairs { "http://127.0.0.1", "redis://", "redis://127.0.0.1:0", "redis://127.0.0.1:99999",
        "redis://127.0.0.1:6379/x", "redis://127.0.0.1:6379/0?a=b", "redis://:%zz@h", "redis://[::1" } do
        assert.has_error(function() redis.connect(url) end, nil, url)
      end
      assert.has_error(function() redis.connect(rs.url, { timeout_ms = 0 }) end)
      assert.has_error(function() redis.connect(rs.url, { timeout_ms = "20" }) end)
      assert.has_error(function() redis.connect(rs.url, { max_pending = 0 }) end)
      assert.has_error(function() redis.connect(rs.url, { password = "" }) end)
      assert.has_error(function() redis.connect(rs.url, { backoff_ms = 100, max_backoff_ms = 10 }) end)
    end)

    it("a bad argument, no command, a closed client, a call outside a task", function()
      local r = client()
      assert.has_error(function() r:call("SET", "k", {}) end,
        "redis client:call: argument #3 is a table: arguments are strings or numbers")
      assert.has_error(function() r:call() end)
      local ok, err = pcall(coroutine.wrap(function() return r:call("PING") end))
      assert.is_false(ok)
      assert.matches("redis client:call: must be called from an aiorch task", err, 1, true)
      r:close()
      r:close() -- again: nothing
      assert.has_error(function() r:call("PING") end, "redis: the client is closed")
      assert.equal("closed", r:stats().state)
    end)
  end)

  describe("cancellation and collection while pending", function()
    it("a cancelled call's reply is dropped, and the next call gets its own", function()
      local r, other = client("", { timeout_ms = support.stretch(5000) }), client()
      r:call("DEL", "q")
      local waiting = aiorch.spawn(function() return r:call("BLPOP", "q", 0) end)
      aiorch.sleep(20)
      assert.equal("waiting", waiting:status())
      waiting:cancel()
      assert.equal("cancelled", waiting:status())
      assert.equal(1, other:call("LPUSH", "q", "for-nobody"))
      -- the BLPOP's reply comes first on the connection, then this one's
      assert.equal("PONG", r:call("PING"))
      assert.equal(0, other:call("LLEN", "q"))
      assert.equal(0, r:stats().pending)
      r:close()
      other:close()
    end)

    it("close() while calls are pending: each answers nil, \"closed\"", function()
      local silent = redis_server.silent()
      local r = assert(redis.connect("redis://127.0.0.1:" .. silent.port, { timeout_ms = 5000 }))
      local tasks = {}
      for i = 1, 5 do
        tasks[i] = aiorch.spawn(function() return r:call("GET", "k" .. i) end)
      end
      aiorch.sleep(10)
      r:close()
      for i = 1, 5 do
        assert.same({ nil, "closed", "the redis client was closed" }, { tasks[i]:await() })
      end
      silent.stop()
    end)

    it("a client collected with a call pending (its task cancelled) frees everything", function()
      local silent = redis_server.silent()
      for _ = 1, 20 do
        local r = assert(redis.connect("redis://127.0.0.1:" .. silent.port, { timeout_ms = 5000 }))
        local t = aiorch.spawn(function() return r:call("GET", "k") end)
        aiorch.sleep(0)
        t:cancel()
        r = nil -- luacheck: ignore 311
        collectgarbage()
      end
      collectgarbage()
      silent.stop()
    end)
  end)

  it("reconnects after the server was killed and started again", function()
    local other = redis_server.start()
    local r = assert(redis.connect(other.url, { timeout_ms = 200, backoff_ms = 20, max_backoff_ms = 100 }))
    assert.equal("OK", r:call("SET", "k", "before"))
    other.kill()
    local v, kind = r:call("GET", "k")
    assert.is_nil(v)
    assert.equal("connect", kind)
    other.restart()
    local deadline = aiorch.now() + support.stretch(3000)
    repeat
      aiorch.sleep(20)
      v = r:call("PING")
    until v == "PONG" or aiorch.now() > deadline
    assert.equal("PONG", v)
    assert.is_nil(r:call("GET", "k")) -- a new server: nothing kept
    assert.is_true(r:stats().connects >= 2)
    r:close()
    other.stop()
  end)
end)
