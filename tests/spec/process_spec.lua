-- aiorch.process and aiorch.signal: each yielding call four ways (success,
-- expected failure, misuse raises, cancel while pending), against real
-- child processes.
local aiorch = require "aiorch"
local support = require "tests.support"

local process = aiorch.process
local signal = aiorch.signal

local tmpfile, slurp = support.tmpname, support.read

describe("aiorch.process.spawn", function()
  it("starts a program found on PATH and returns its pid", function()
    local pid = assert(process.spawn { "sh", "-c", "exit 0" })
    assert.is_true(math.type(pid) == "integer" and pid > 0)
    assert.equal(0, process.wait(pid))
  end)

  it("passes env additions and removals, and redirects stdout", function()
    local out = tmpfile()
    local pid = assert(process.spawn({ "sh", "-c", 'echo "$AIORCH_T1|${HOME:-unset}"' },
      { env = { AIORCH_T1 = "one", HOME = false }, stdout = out }))
    assert.equal(0, process.wait(pid))
    assert.equal("one|unset\n", slurp(out))
    os.remove(out)
  end)

  it("leaks no descriptor into the child and resets its signal mask", function()
    local out = tmpfile()
    local f = assert(io.open(os.tmpname(), "w")) -- a descriptor without close-on-exec
    -- The mask is read by the exec'ed grep itself: a shell waiting for a
    -- child may block SIGCHLD meanwhile, which is not what it was given.
    local pid = assert(process.spawn({ "sh", "-c", "ls /proc/$$/fd; exec grep SigBlk /proc/self/status" },
      { stdout = out }))
    assert.equal(0, process.wait(pid))
    f:close()
    local got = slurp(out)
    os.remove(out)
    local fds = {}
    for line in got:gmatch("[^\n]+") do
      if line:match("^%d+$") then
        fds[#fds + 1] = tonumber(line)
      end
    end
    table.sort(fds)
    assert.are.same({ 0, 1, 2 }, { fds[1], fds[2], fds[3] })
    assert.is_nil(fds[5]) -- 0, 1, 2 and at most the shell's own
    assert.truthy(got:find("SigBlk:%s+0+\n"))
  end)

  it("returns nil, 'spawn' for a program that cannot run", function()
    local pid, kind, msg = process.spawn { "/nonexistent/aiorch-test" }
    assert.is_nil(pid)
    assert.equal("spawn", kind)
    assert.truthy(msg:find("No such file"))
  end)

  it("raises on misuse", function()
    assert.has_error(function() process.spawn {} end)
    assert.has_error(function() process.spawn "sh" end)
    assert.has_error(function() process.spawn({ "sh" }, { bogus = 1 }) end)
    assert.has_error(function() process.spawn({ "sh" }, { env = { ["A=B"] = "x" } }) end)
    assert.has_error(function() process.spawn({ "sh" }, { env = { A = true } }) end)
  end)
end)

describe("aiorch.process.wait", function()
  it("returns the exit status, or nil, 'signal', name", function()
    local pid = assert(process.spawn { "sh", "-c", "sleep 0.05; exit 7" })
    assert.equal(7, process.wait(pid, 5000))
    pid = assert(process.spawn { "sleep", "10" })
    assert.is_true(process.kill(pid, "TERM"))
    assert.are.same({ nil, "signal", "SIGTERM" }, { process.wait(pid) })
  end)

  it("keeps the status of a child that exited before anyone waited", function()
    local pid = assert(process.spawn { "true" })
    aiorch.sleep(100)
    assert.equal(0, process.wait(pid))
  end)

  it("returns nil, 'timeout' and the child can be waited for again", function()
    local pid = assert(process.spawn { "sleep", "10" })
    assert.are.same({ nil, "timeout", "the child is still running" }, { process.wait(pid, 30) })
    assert.are.same({ nil, "timeout", "the child is still running" }, { process.wait(pid, 0) })
    process.kill(pid, "KILL")
    assert.are.same({ nil, "signal", "SIGKILL" }, { process.wait(pid, 5000) })
  end)

  it("raises on misuse", function()
    assert.has_error(function() process.wait(0) end)
    assert.has_error(function() process.wait("x") end)
    assert.has_error(function() process.wait(process.pid()) end) -- not our child
    local pid = assert(process.spawn { "true" })
    assert.has_error(function() process.wait(pid, -1) end)
    assert.equal(0, process.wait(pid))
    assert.has_error(function() process.wait(pid) end) -- already waited for
    -- outside a task
    pid = assert(process.spawn { "sleep", "10" })
    local co = coroutine.wrap(function() return pcall(process.wait, pid) end)
    local ok, err = co()
    assert.is_false(ok)
    assert.truthy(err:find("must be called from an aiorch task"))
    process.kill(pid, "KILL")
    process.wait(pid)
  end)

  it("can be cancelled while pending, and waited for later", function()
    local pid = assert(process.spawn { "sleep", "10" })
    local t = aiorch.spawn(function() return process.wait(pid) end)
    aiorch.sleep(20)
    assert.equal("waiting", t:status())
    assert.is_true(t:cancel())
    assert.equal("cancelled", t:status())
    process.kill(pid, "KILL")
    assert.are.same({ nil, "signal", "SIGKILL" }, { process.wait(pid, 5000) })
  end)

  it("wakes several waiters of one child", function()
    local pid = assert(process.spawn { "sh", "-c", "sleep 0.05; exit 3" })
    local a = aiorch.spawn(function() return process.wait(pid) end)
    local b = aiorch.spawn(function() return process.wait(pid) end)
    assert.equal(3, a:await(5000))
    assert.equal(3, b:await(5000))
  end)
end)

describe("aiorch.process.kill", function()
  it("signals a process", function()
    local pid = assert(process.spawn { "sleep", "10" })
    assert.is_true(process.kill(pid, "SIGINT"))
    assert.are.same({ nil, "signal", "SIGINT" }, { process.wait(pid) })
  end)

  it("returns nil, kind for a child already reaped", function()
    local pid = assert(process.spawn { "true" })
    aiorch.sleep(50)
    process.wait(pid, 0) -- reaps and forgets it
    local pid2 = assert(process.spawn { "sh", "-c", "exit 0" })
    aiorch.sleep(100)
    local ok, kind = process.kill(pid2, "TERM") -- exited, reaped, not yet waited for
    assert.is_nil(ok)
    assert.equal("exited", kind)
    assert.equal(0, process.wait(pid2))
  end)

  it("raises on misuse", function()
    assert.has_error(function() process.kill(0, "TERM") end)
    assert.has_error(function() process.kill(-1, "TERM") end)
    assert.has_error(function() process.kill(process.pid(), "NOPE") end)
    assert.has_error(function() process.kill(process.pid()) end)
  end)

  it("pid() and exe() describe this process", function()
    assert.is_true(process.pid() > 1)
    assert.truthy(process.exe():find("aiorch"))
  end)
end)

describe("aiorch.signal.wait", function()
  it("returns the name of the signal that arrived", function()
    aiorch.spawn(function()
      aiorch.sleep(20)
      process.kill(process.pid(), "USR1")
    end)
    assert.equal("SIGUSR1", signal.wait({ "SIGUSR2", "USR1" }, 5000))
  end)

  it("keeps a signal that arrived while nobody waited, once caught", function()
    -- catches it from now on
    assert.are.same({ nil, "timeout", "no signal arrived in time" }, { signal.wait("USR2", 0) })
    process.kill(process.pid(), "USR2")
    process.kill(process.pid(), "USR2")
    aiorch.sleep(50) -- we are still alive: caught, not the default action
    assert.equal("SIGUSR2", signal.wait("USR2", 1000))
    assert.are.same({ nil, "timeout", "no signal arrived in time" }, { signal.wait("USR2", 10) }) -- counted once
    assert.is_true(signal.reset("USR2"))
    assert.is_false(signal.reset("USR2"))
  end)

  it("returns nil, 'timeout', message", function()
    local t0 = aiorch.now()
    assert.are.same({ nil, "timeout", "no signal arrived in time" }, { signal.wait("HUP", 30) })
    assert.is_true(aiorch.now() - t0 >= 25)
  end)

  it("raises on misuse", function()
    assert.has_error(function() signal.wait("NOPE") end)
    assert.has_error(function() signal.wait("KILL") end)
    assert.has_error(function() signal.wait("CHLD") end)
    assert.has_error(function() signal.wait({}) end)
    assert.has_error(function() signal.wait({ "HUP", "SIGHUP" }) end)
    assert.has_error(function() signal.wait("HUP", -1) end)
    local co = coroutine.wrap(function() return pcall(signal.wait, "HUP") end)
    local ok, err = co()
    assert.is_false(ok)
    assert.truthy(err:find("must be called from an aiorch task"))
  end)

  it("can be cancelled while pending; the signal stays caught", function()
    local t = aiorch.spawn(function() return signal.wait("USR1") end)
    aiorch.sleep(10)
    assert.equal("waiting", t:status())
    assert.is_true(t:cancel())
    process.kill(process.pid(), "USR1")
    aiorch.sleep(30)
    assert.equal("SIGUSR1", signal.wait("USR1", 0))
    -- one waiter of two gets it, the oldest first
    local a = aiorch.spawn(function() return signal.wait("USR1", 2000) end)
    local b = aiorch.spawn(function() return signal.wait("USR1", 300) end)
    aiorch.sleep(10)
    process.kill(process.pid(), "USR1")
    assert.equal("SIGUSR1", a:await())
    assert.are.same({ nil, "timeout", "no signal arrived in time" }, { b:await() })
    signal.reset("USR1")
  end)
end)
