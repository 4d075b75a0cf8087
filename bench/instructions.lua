-- Instructions per gateway request, counted by callgrind: repeatable for
-- the same binary and inputs whatever else the machine is doing, so two
-- builds can be compared on a busy machine.
--   build/aiorch run bench/instructions.lua [REQUESTS] [KIND] [EXE] [WORKERS]
-- KIND: plain (default: an OpenAI client, `single`, answered by openai),
-- cross (the same request answered by anthropic), stream (plain, streamed);
-- hit and stream_hit: plain and stream with the response cache on (the
-- first request stores, every other one is a memory hit); miss: the cache
-- on, every request another question (looked up, answered, stored); unique:
-- plain, every request another question (miss's baseline); floor: not the
-- gateway but bench/floor.lua (the HTTP server alone, a fixed answer).
-- EXE: the aiorch binary to measure (default: this build's). WORKERS: 0
-- (default: one process, the local state), or N: a master and N workers on
-- the shared state, every process counted. The mock runs in this process,
-- not under callgrind. Prints user-space instructions per request: (a run
-- of REQUESTS) - (a run of 1), / (REQUESTS - 1).
local aiorch = require "aiorch"
local mock = require "aiorch.mock"

local fmt = string.format
local process = aiorch.process

local args = table.pack(...)
local N = math.tointeger(tonumber(args[1] or "")) or 2000
local KIND = args[2] or "plain"
local EXE = args[3] or process.exe()
local WORKERS = math.tointeger(tonumber(args[4] or "")) or 0
local CONCURRENCY = 8

local BODY = '{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"user","content":"What is a monad?"}]}'
local HEADERS = { ["content-type"] = "application/json", ["x-aiorch-strategy"] = "single",
  ["x-aiorch-providers"] = KIND == "cross" and "anthropic" or "openai" }
local body = (KIND == "stream" or KIND == "stream_hit") and BODY:gsub("^{", '{"stream":true,') or BODY
local CACHED = KIND == "hit" or KIND == "stream_hit" or KIND == "miss"
local sent = 0 -- miss: every request another question

local function capture(cmd)
  local p = io.popen(cmd, "r")
  local out = p:read("a")
  p:close()
  return out
end

local TMP = capture("mktemp -d /tmp/aiorch-instructions.XXXXXX"):match("%S+")

local function free_port()
  local s = assert(aiorch.server.listen { host = "127.0.0.1", port = 0, handler = function() end })
  local port = s.port
  s:close()
  return port
end

local function run(m, n)
  local port = free_port()
  local out = fmt("%s/callgrind.%d", TMP, n)
  local argv = { "valgrind", "--tool=callgrind", "--trace-children=yes",
    "--callgrind-out-file=" .. out .. ".%p", EXE, "serve", "--workers", tostring(WORKERS),
    "--listen", "127.0.0.1:" .. port }
  if KIND == "floor" then
    argv = { "valgrind", "--tool=callgrind", "--trace-children=yes", "--callgrind-out-file=" .. out .. ".%p", EXE,
      "run", "bench/floor.lua", tostring(port) }
  end
  if CACHED then
    local f = assert(io.open(TMP .. "/cache.lua", "w"))
    f:write("return { cache = true }")
    f:close()
    argv[#argv + 1] = "--config"
    argv[#argv + 1] = TMP .. "/cache.lua"
  end
  local pid = assert(process.spawn(argv, {
    stderr = TMP .. "/serve.err",
    env = { OPENAI_API_KEY = "sk-bench", ANTHROPIC_API_KEY = "sk-bench", OPENAI_BASE_URL = m:base_url("openai"),
      ANTHROPIC_BASE_URL = m:base_url("anthropic"), AIORCH_LOG = "error" },
  }))
  local url = fmt("http://127.0.0.1:%d/v1/chat/completions", port)
  local deadline = aiorch.now() + 60000
  while not aiorch.http.request { url = fmt("http://127.0.0.1:%d/healthz", port), timeout_ms = 1000 } do
    assert(aiorch.now() < deadline, "the gateway did not start")
    aiorch.sleep(100)
  end
  local left = n
  local workers = {}
  for i = 1, math.min(CONCURRENCY, n) do
    workers[i] = aiorch.spawn(function()
      while left > 0 do
        left = left - 1
        sent = sent + 1
        local b0 = (KIND == "miss" or KIND == "unique") and body:gsub("monad", "monad " .. sent) or body
        local st, _, b = aiorch.http.request { method = "POST", url = url, headers = HEADERS, body = b0,
          timeout_ms = 60000 }
        assert(st == 200, "request failed: " .. tostring(st) .. " " .. tostring(b))
      end
    end)
  end
  aiorch.gather(workers)
  process.kill(pid, "TERM")
  process.wait(pid, 60000)
  local total = 0
  for file in capture("ls " .. out .. ".*"):gmatch("%S+") do -- a file per process
    local text = capture("callgrind_annotate " .. file .. " 2>/dev/null | grep -m1 'PROGRAM TOTALS'")
    total = total + assert(tonumber((text:match("([%d,]+)%s") or ""):gsub(",", ""), 10), "no totals in " .. file)
  end
  return total
end

local m = assert(mock.start { host = "127.0.0.1", port = 0 })
local one = run(m, 1)
local many = run(m, N)
m:close()
if os.getenv("KEEP") then
  print("callgrind outputs kept in " .. TMP)
else
  os.execute("rm -rf '" .. TMP .. "'")
end
print(fmt("%s: %s requests, %d workers: %.0f instructions per request (%s)", KIND, N, WORKERS, (many - one) / (N - 1),
  EXE))
