-- aiorch.shm, the shared dictionary, from Lua: each call's success,
-- expected failure and misuse, and one segment shared with real child
-- processes through process.spawn's pass_fds.
local aiorch = require "aiorch"
local support = require "tests.support"

local shm = aiorch.shm
local process = aiorch.process

local slurp = support.read

-- A new file holding text; returns its path.
local function tmpfile(text)
  local p = os.tmpname()
  support.write(p, text)
  return p
end

-- The first two results of a call: nil and the kind of its failure.
local function fail_of(a, kind)
  return { a, kind }
end

describe("aiorch.shm", function()
  it("counts, sets, adds, compares and sets, deletes and lists", function()
    local d = assert(shm.open(256 * 1024))
    assert.equal(1, d:incr("hits", 1, 0))
    assert.equal(3.5, d:incr("hits", 2.5))
    assert.equal(3.5, d:get("hits"))
    assert.is_nil(d:get("absent"))
    assert.is_true(d:set("x", 7))
    assert.equal("integer", math.type(d:get("x")))
    assert.is_false(d:add("x", 8))
    assert.is_true(d:add("y", 8))
    assert.are.same({ false, 8 }, { d:cas("y", 1, 2) })
    assert.is_true(d:cas("y", 8, 9))
    assert.is_true(d:cas("z", nil, 1)) -- only when absent
    assert.are.same({ false, 1 }, { d:cas("z", nil, 5) })
    assert.are.same({ 10, 2, 1 }, { d:incr_many { "y", 1, "z", 1, "new", 1 } })
    assert.are.same({ x = 7, y = 10 }, (function()
      local all = d:items("")
      return { x = all.x, y = all.y }
    end)())
    assert.are.same({ z = 2 }, d:items("z"))
    assert.is_true(d:delete("z"))
    assert.is_false(d:delete("z"))
    local st = d:stats()
    assert.equal(256 * 1024, st.size)
    assert.is_true(st.capacity > 900)
    assert.equal(4, st.used) -- hits, x, y, new
    assert.equal(0, st.repairs)
    assert.equal(224, shm.key_max)
    assert.truthy(d:fd())
    d:close()
  end)

  it("forgets an entry when its ttl passes", function()
    local d = assert(shm.open(64 * 1024))
    assert.is_true(d:set("brief", 1, 30))
    assert.equal(1, d:incr("brief2", 1, 0, 30))
    assert.equal(2, d:incr("brief2", 1)) -- keeps its expiry
    aiorch.sleep(50)
    assert.is_nil(d:get("brief"))
    assert.is_nil(d:get("brief2"))
    assert.are.same({}, d:items("brief"))
  end)

  it("says full, and not_found for an incr without init", function()
    local d = assert(shm.open(64 * 1024))
    local cap = d:stats().capacity
    for i = 1, cap do
      assert.is_true(d:set("k" .. i, i))
    end
    local ok, kind, msg = d:set("one more", 1)
    assert.is_nil(ok)
    assert.equal("full", kind)
    assert.matches("shared_memory", msg)
    assert.are.same({ nil, "full" }, fail_of(d:incr("one more", 1, 0)))
    assert.are.same({ nil, "full" }, fail_of(d:incr_many { "k1", 1, "one more", 1 }))
    assert.equal(1, d:get("k1")) -- all or none
    assert.are.same({ nil, "full" }, fail_of(d:add("one more", 1)))
    assert.is_true(d:set("k2", 20)) -- a present key still takes a value
    assert.are.same({ nil, "not_found" }, fail_of(d:incr("nothing", 1)))
    assert.equal(4, d:stats().full)
  end)

  it("raises on misuse", function()
    local d = assert(shm.open(64 * 1024))
    assert.has_error(function() shm.open(1024) end)
    assert.has_error(function() shm.open(2 * 1024 * 1024 * 1024) end)
    assert.has_error(function() d:get("") end)
    assert.has_error(function() d:get(("k"):rep(225)) end)
    assert.has_error(function() d:set("k", 0 / 0) end)
    assert.has_error(function() d:set("k", 1, -5) end)
    assert.has_error(function() d:incr("k", "x") end)
    assert.has_error(function() d:incr_many { "k" } end)
    assert.has_error(function() d:incr_many { 1, 1 } end)
    assert.has_error(function() shm.attach(-1) end)
    d:close()
    assert.has_error(function() d:get("k") end, "shm: the dictionary is closed")
    d:close() -- twice is fine
  end)

  it("refuses to attach a descriptor that is not open (and, in tests/c/test_shm.c, one not its own)", function()
    local ok, kind, msg = shm.attach(99999)
    assert.is_nil(ok)
    assert.equal("shm", kind)
    assert.matches("descriptor 99999", msg)
  end)

  it("is one segment for the processes it is passed to: their counts add up exactly", function()
    local d = assert(shm.open(1024 * 1024))
    local child = tmpfile([[
local aiorch = require "aiorch"
local d = assert(aiorch.shm.attach(tonumber(os.getenv("AIORCH_SHM_FD"))))
for i = 1, 3000 do
  d:incr("total", 1, 0)
  d:incr_many { "pairs.a", 1, "pairs.b", 2 }
  if i % 3 == 0 then
    -- compare-and-set, retried on a change: as a GCRA's update
    while true do
      local v = d:get("cas")
      if d:cas("cas", v, (v or 0) + 1) then break end
    end
  end
end
io.write(tostring((d:fd())))
]])
    local pids, outs = {}, {}
    for i = 1, 4 do
      outs[i] = os.tmpname()
      pids[i] = assert(process.spawn({ process.exe(), "run", child }, {
        pass_fds = { d:fd() }, env = { AIORCH_SHM_FD = tostring(d:fd()) }, stdout = outs[i] }))
    end
    for i = 1, 4 do
      assert.equal(0, process.wait(pids[i], 60000))
      assert.equal("nil", slurp(outs[i])) -- an attached dictionary keeps no descriptor
      os.remove(outs[i])
    end
    os.remove(child)
    assert.equal(12000, d:get("total"))
    assert.equal(12000, d:get("pairs.a"))
    assert.equal(24000, d:get("pairs.b"))
    assert.equal(4000, d:get("cas"))
  end)

  it("is anonymous: nothing in /dev/shm, a memfd that goes with its last process", function()
    local function mapped()
      local _, n = slurp("/proc/self/maps"):gsub("/memfd:aiorch%-state %(deleted%)", "")
      return n
    end
    collectgarbage()
    collectgarbage()
    local before = mapped()
    local d = assert(shm.open(64 * 1024))
    assert.equal(before + 1, mapped())
    local p = io.popen("ls /dev/shm 2>/dev/null")
    local listing = p:read("a")
    p:close()
    assert.is_nil(listing:find("aiorch", 1, true))
    d:close()
    assert.equal(before, mapped())
  end)
end)

describe("aiorch.process.spawn pass_fds", function()
  it("keeps the descriptors listed, and only those", function()
    local d = assert(shm.open(64 * 1024))
    local fd = d:fd()
    local out = os.tmpname()
    local pid = assert(process.spawn({ "sh", "-c", "ls /proc/$$/fd" }, { pass_fds = { fd }, stdout = out }))
    assert.equal(0, process.wait(pid))
    local fds = {}
    for line in slurp(out):gmatch("[^\n]+") do
      fds[tonumber(line)] = true
    end
    os.remove(out)
    assert.is_true(fds[fd])
    local others = 0
    for n in pairs(fds) do
      if n > 2 and n ~= fd then
        others = others + 1
      end
    end
    assert.is_true(others <= 1) -- the shell's own, at most
  end)

  it("raises on a descriptor that is not open or below 3", function()
    assert.has_error(function() process.spawn({ "true" }, { pass_fds = { 1 } }) end)
    assert.has_error(function() process.spawn({ "true" }, { pass_fds = { 99999 } }) end)
    assert.has_error(function() process.spawn({ "true" }, { pass_fds = 5 }) end)
  end)
end)
