-- Every Lua API that can fail returns nil, kind, message (docs/lua-api.md):
-- each is driven into a real failure here, and the shape is checked.
local aiorch = require "aiorch"
local mock = require "aiorch.mock"
local orchestrate = require "aiorch.orchestrate"
local openai = require "providers.openai"

local process, signal = aiorch.process, aiorch.signal
local spawn, sleep = aiorch.spawn, aiorch.sleep

local SLOWDOWN = tonumber(os.getenv("AIORCH_TEST_SLOWDOWN") or "") or 1

-- Checks r (a packed result) is nil, kind, message with the kind expected.
local function failure(r, kind, what)
  assert.is_true(r.n >= 3, what .. ": fewer than three values")
  assert.is_nil(r[1], what)
  assert.is_string(r[2], what .. ": the kind")
  assert.matches("^[a-z_]+$", r[2], what .. ": the kind")
  assert.equal(kind, r[2], what .. ": " .. tostring(r[3]))
  assert.is_string(r[3], what .. ": the message")
  assert.is_true(#r[3] > 0, what .. ": an empty message")
end

-- A loopback server whose handler is given per case; closed after each.
local servers = {}
local function listen(handler)
  local srv = assert(aiorch.server.listen { host = "127.0.0.1", port = 0, handler = handler })
  servers[#servers + 1] = srv
  return srv, "http://127.0.0.1:" .. srv.port .. "/"
end

after_each(function()
  for _, s in ipairs(servers) do
    s:close()
  end
  servers = {}
end)

-- name, expected kind, a function returning the API's results
local CASES = {
  { "task:await on a task that raised", "error", function()
    return spawn(function() error("boom") end):await()
  end, "boom" },
  { "task:await on a task that raised a table", "error", function()
    return spawn(function() error({}) end):await()
  end, "^%(error object is a table value%)$" },
  { "task:await on a task that raised an object with __tostring", "error", function()
    return spawn(function() error(setmetatable({}, { __tostring = function() return "custom" end })) end):await()
  end, "^custom$" },
  { "task:await on a cancelled task", "cancelled", function()
    local t = spawn(sleep, 10000)
    sleep(0)
    t:cancel()
    return t:await()
  end, "^cancelled$" },
  { "task:await past its deadline", "timeout", function()
    local t = spawn(sleep, 200)
    return t:await(5)
  end, "^timeout$" },
  { "aiorch.first when no task satisfies", "none", function()
    return aiorch.first({ spawn(function() return false end), spawn(function() error("x") end) })
  end, "satisfies the predicate" },
  { "aiorch.first past its deadline", "timeout", function()
    return aiorch.first({ spawn(sleep, 10000) }, nil, 5)
  end, "^timeout$" },
  { "aiorch.http.request to a closed port", "connect", function()
    return aiorch.http.request { url = "http://127.0.0.1:1/", connect_timeout_ms = 2000 }
  end },
  { "aiorch.http.request past its deadline", "timeout", function()
    local _, url = listen(function() sleep(10000) end)
    return aiorch.http.request { url = url, headers_timeout_ms = 20 }
  end, "headers deadline" },
  { "aiorch.http.request stopped by on_event", "aborted", function()
    local _, url = listen(function(_, res)
      res:start(200, { ["content-type"] = "text/event-stream" })
      res:write("data: one\n\n")
      sleep(10000)
    end)
    return aiorch.http.request { url = url, on_event = function() return false end }
  end },
  { "aiorch.server.listen on a port taken", "listen", function()
    local srv = listen(function() end)
    return aiorch.server.listen { host = "127.0.0.1", port = srv.port, handler = function() end }
  end },
  { "mock.start on a port taken", "listen", function()
    local srv = listen(function() end)
    return mock.start { host = "127.0.0.1", port = srv.port }
  end },
  { "aiorch.process.spawn of a missing program", "spawn", function()
    return process.spawn { "/nonexistent/aiorch-no-such-program" }
  end },
  { "aiorch.process.kill of a child that exited", "exited", function()
    local pid = assert(process.spawn { "true" })
    local deadline = aiorch.now() + 5000 * SLOWDOWN
    local r
    repeat -- until the runtime has reaped it
      sleep(10)
      r = table.pack(process.kill(pid, "TERM"))
    until r[1] == nil or aiorch.now() > deadline
    assert.equal(0, process.wait(pid))
    return table.unpack(r, 1, r.n)
  end },
  { "aiorch.process.wait past its deadline", "timeout", function()
    local pid = assert(process.spawn { "sleep", "5" })
    local r = table.pack(process.wait(pid, 10))
    process.kill(pid, "KILL")
    process.wait(pid)
    return table.unpack(r, 1, r.n)
  end },
  { "aiorch.process.wait on a child killed by a signal", "signal", function()
    local pid = assert(process.spawn { "sleep", "5" })
    process.kill(pid, "KILL")
    return process.wait(pid)
  end, "^SIGKILL$" },
  { "aiorch.signal.wait past its deadline", "timeout", function()
    local r = table.pack(signal.wait("USR2", 10))
    signal.reset("USR2")
    return table.unpack(r, 1, r.n)
  end },
  { "res:write on a closed connection", "closed", function()
    local got
    local _, url = listen(function(_, res)
      res:start(200, { ["content-length"] = "100" })
      res:abort()
      got = table.pack(res:write("more"))
    end)
    aiorch.http.request { url = url }
    return table.unpack(got, 1, got.n)
  end },
  { "res:finish on a closed connection", "closed", function()
    local got
    local _, url = listen(function(_, res)
      res:start(200)
      res:abort()
      got = table.pack(res:finish("end"))
    end)
    aiorch.http.request { url = url }
    return table.unpack(got, 1, got.n)
  end },
  { "orchestrate with a bad request", "invalid", function()
    return orchestrate.orchestrate({ user_question = "" }, "single", { "openai" }, { env = {} })
  end, "user_question" },
  { "orchestrate with an unknown strategy", "invalid", function()
    return orchestrate.orchestrate({ user_question = "q" }, "no-such-strategy", { "openai" }, { env = {} })
  end, "unknown strategy" },
  { "orchestrate with a missing prompt builder", "prompt", function()
    return orchestrate.orchestrate({ user_question = "q" }, "single", { "openai" },
      { env = {}, prompt = "no-such-prompt" })
  end, "no%-such%-prompt" },
  { "an adapter's parse_response on an error status", "server_error", function()
    return openai.parse_response({}, 500, {}, '{"error":{"message":"down","type":"server_error"}}')
  end, "down" },
}

describe("every API that can fail returns nil, kind, message", function()
  for _, c in ipairs(CASES) do
    local name, kind, fn, pattern = c[1], c[2], c[3], c[4]
    it(name, function()
      local r = table.pack(fn())
      failure(r, kind, name)
      if pattern then
        assert.matches(pattern, r[3])
      end
    end)
  end

  it("aiorch.gather gives each task's kind and message as await would", function()
    local tasks = {
      spawn(function() return "ok" end),
      spawn(function() error("gather boom") end),
      spawn(sleep, 10000),
    }
    sleep(0)
    tasks[3]:cancel()
    tasks[4] = spawn(sleep, 10000)
    local values, errors, messages = aiorch.gather(tasks, 20)
    assert.equal(4, values.n)
    assert.equal("ok", values[1])
    assert.is_nil(errors[1])
    for i, kind in pairs { [2] = "error", [3] = "cancelled", [4] = "timeout" } do
      local await = table.pack(tasks[i]:await())
      if i == 4 then -- cancelled by gather's deadline
        await = table.pack(nil, "timeout", "timeout")
      end
      failure(table.pack(values[i], errors[i], messages[i]), kind, "gather #" .. i)
      assert.same({ await[2], await[3] }, { errors[i], messages[i] })
    end
    assert.matches("gather boom", messages[2])
  end)

  it("aiorch.first's failures carry the gathered values, errors and messages", function()
    local tasks = { spawn(function() return false end), spawn(function() error("first boom") end) }
    local v, kind, msg, values, errors, messages = aiorch.first(tasks)
    assert.is_nil(v)
    assert.equal("none", kind)
    assert.is_string(msg)
    assert.is_false(values[1])
    assert.same({ n = 2, [2] = "error" }, errors)
    assert.matches("first boom", messages[2])
  end)

  it("srv:shutdown does not fail: it returns the requests it cut", function()
    local srv = listen(function() end)
    assert.equal(0, srv:shutdown(100))
    assert.equal(0, srv:shutdown(100))
  end)
end)
