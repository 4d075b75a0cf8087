-- nginx with the aiorch module under valgrind memcheck: 1,000 requests
-- (both APIs, plain and streamed, fallback, clients that leave mid-stream)
-- through two workers, three reloads among them (each replaces both
-- workers: the old ones free their runtime as they exit), then a graceful
-- stop. Fails on any memcheck error or definite leak in any nginx process
-- (the master, every worker of every generation).
--   build/aiorch run tests/nginx_valgrind.lua [REQUESTS] [RELOADS]
-- (.ci/nginx-valgrind builds first; the logs stay in build/nginx-valgrind/.)
local aiorch = require "aiorch"
local cjson = require "cjson.safe"
local mock_mod = require "aiorch.mock"
local support = require "tests.support"
local nginx = require "tests.nginx_host"

local fmt = string.format
local REQUESTS = math.tointeger(tonumber((...) or "")) or 1000
local RELOADS = math.tointeger(tonumber((select(2, ...)) or "")) or 3
local LOGS = os.getenv("AIORCH_VALGRIND_LOGS") or (nginx.ROOT .. "/build/nginx-valgrind")

if nginx.missing() then
  io.stderr:write("nginx_valgrind: ", nginx.missing(), "\n")
  return 1
end
os.execute(fmt("rm -rf '%s' && mkdir -p '%s'", LOGS, LOGS))

local m = assert(mock_mod.start { host = "127.0.0.1", port = 0 })
-- A gateway over the mock; openai's directives given.
local function config(o)
  return fmt([[return {
  providers = {
    openai = { api_key_env = "VG_OPENAI_KEY", base_url = %q },
    anthropic = { api_key_env = "VG_ANTHROPIC_KEY", base_url = %q },
  },
  aliases = { any = { providers = { "openai", "anthropic" } } },
  policy = { breaker_failures = 0 },
}
]], m:base_url("openai", o), m:base_url("anthropic"))
end

local n = nginx.start {
  env = { VG_OPENAI_KEY = "sk-vg-openai", VG_ANTHROPIC_KEY = "sk-ant-vg-anthropic" },
  servers = { { name = "gw", config = config() }, { name = "failing", config = config { fault = "500" } } },
  wrapper = { "valgrind", "--tool=memcheck", "--trace-children=yes", "--leak-check=full",
              "--show-leak-kinds=definite", "--errors-for-leak-kinds=definite", "--num-callers=30",
              "--error-markers=VGERR-BEGIN,VGERR-END",
              "--suppressions=" .. nginx.ROOT .. "/.ci/nginx-valgrind.supp", "--log-file=" .. LOGS .. "/%p.log" },
  start_ms = 120000, stop_ms = 120000,
}

local function chat(stream)
  return cjson.encode { model = "any", stream = stream or nil,
    messages = { { role = "user", content = "What is two plus two?" } } }
end
local MSGS = cjson.encode { model = "any", max_tokens = 32, stream = true,
  messages = { { role = "user", content = "Hi" } } }
local JSON = { ["content-type"] = "application/json" }

-- One request of kind i % 5; returns whether it was answered as expected.
local function one(i)
  local kind = i % 5
  if kind == 0 then
    return aiorch.http.request { method = "POST", url = n.base("gw") .. "/v1/chat/completions",
      headers = JSON, body = chat(), timeout_ms = 60000 } == 200
  elseif kind == 1 then
    return aiorch.http.request { method = "POST", url = n.base("gw") .. "/v1/chat/completions",
      headers = JSON, body = chat(true), timeout_ms = 60000, on_event = function() end } == 200
  elseif kind == 2 then
    return aiorch.http.request { method = "POST", url = n.base("gw") .. "/v1/messages",
      headers = { ["content-type"] = "application/json", ["anthropic-version"] = "2023-06-01" },
      body = MSGS, timeout_ms = 60000, on_event = function() end } == 200
  elseif kind == 3 then -- fallback past a 500
    return aiorch.http.request { method = "POST", url = n.base("failing") .. "/v1/chat/completions",
      headers = JSON, body = chat(), timeout_ms = 60000 } == 200
  end
  -- a client that leaves after the first event
  local _, why = aiorch.http.request { method = "POST", url = n.base("gw") .. "/v1/chat/completions",
    headers = JSON, body = chat(true), timeout_ms = 60000, on_event = function() return false end }
  return why == "aborted"
end

local CONCURRENCY = 4
local done, failed, next_i = 0, 0, 1
local t0 = aiorch.now()
local function client()
  while next_i <= REQUESTS do
    local i = next_i
    next_i = next_i + 1
    if one(i) then
      done = done + 1
    else
      failed = failed + 1
    end
  end
end

local reloads = 0
local function reloader()
  for r = 1, RELOADS do
    while done + failed < REQUESTS * r / (RELOADS + 1) do
      aiorch.sleep(50)
    end
    local before = nginx.workers(n)
    n.reload()
    -- the new generation takes over: two workers none of which was there before
    local deadline = aiorch.now() + 120000
    while aiorch.now() < deadline do
      local now, fresh = nginx.workers(n), 0
      for _, pid in ipairs(now) do
        local old = false
        for _, o in ipairs(before) do
          old = old or o == pid
        end
        fresh = fresh + (old and 0 or 1)
      end
      if fresh == 2 and #now == 2 then
        break
      end
      aiorch.sleep(100)
    end
    reloads = reloads + 1
  end
end

local tasks = { aiorch.spawn(reloader) }
for _ = 1, CONCURRENCY do
  tasks[#tasks + 1] = aiorch.spawn(client)
end
aiorch.gather(tasks)
local took = (aiorch.now() - t0) / 1000
local code = n.stop("QUIT")
m:close()

-- Every process's log: errors between markers, and the leak summary. A
-- runtime left to the exit would be reachable (from the module's globals),
-- not lost: what an exiting process still holds is bounded too, at nginx's
-- own (about 450 KiB with 1,024 worker_connections).
local MAX_IN_USE = 512 * 1024
local logs, bad, most = 0, {}, 0
local p = io.popen(fmt("ls '%s'", LOGS))
for name in p:lines() do
  local text = support.slurp(LOGS .. "/" .. name)
  logs = logs + 1
  local lost = tonumber(((text:match("definitely lost: ([%d,]+) bytes") or "0"):gsub(",", "")))
  local in_use = tonumber(((text:match("in use at exit: ([%d,]+) bytes") or "0"):gsub(",", "")))
  most = math.max(most, in_use)
  if text:find("VGERR-BEGIN", 1, true) or text:find("ERROR SUMMARY: [1-9]") or lost > 0 or in_use > MAX_IN_USE then
    bad[#bad + 1] = name
  end
end
p:close()
support.cleanup()

print(fmt("nginx under valgrind: %d requests (%d as expected, %d not) in %.1f s, %d reloads, "
  .. "nginx exited %s; %d processes checked, %d with errors, definite leaks or more than %d bytes "
  .. "held at exit (the most: %d; logs in %s)",
  REQUESTS, done, failed, took, reloads, tostring(code), logs, #bad, MAX_IN_USE, most, LOGS))
for _, name in ipairs(bad) do
  print("  " .. LOGS .. "/" .. name)
end
-- every process checked: the master, and two workers per generation
if failed > 0 or #bad > 0 or code ~= 0 or reloads ~= RELOADS or logs < 1 + 2 * (RELOADS + 1) then
  return 1
end
return 0
