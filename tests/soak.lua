-- Soak test of `aiorch serve`:
--   build/aiorch run tests/soak.lua [REQUESTS] [SEED]
-- Starts the mock providers (tests/mock_server.lua) and one gateway process
-- (`aiorch serve --workers 0`) whose providers are the mock with a fault
-- each. Sends REQUESTS (default 100000) requests, ~64 at a time; each picks,
-- from a generator seeded with SEED (default: from the clock; printed with
-- the command that replays the run), an endpoint, streaming or not, a
-- strategy, providers (so faults) and the way they are chosen. Every
-- request carries its own id in the question, which the mock echoes.
-- Checks that each request gets exactly one well-formed answer that is the
-- one its faults predict (the provider and text, or the error in the API's
-- shape with the expected status); that the gateway counted each request
-- once; that the gateway's RSS after the run is within 10% of its RSS after
-- the warm-up (10% of the requests), both taken idle; that its open file
-- descriptors did not grow; and that it logged no internal error.
-- Prints a summary; exits 1 on any violation.
local aiorch = require "aiorch"
local cjson = require "cjson.safe"

local process = aiorch.process
local fmt = string.format
local concat = table.concat
local now = aiorch.now

local HOST = "127.0.0.1"
local EXE = assert(process.exe(), "soak: cannot find the aiorch executable")
local HERE = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
package.path = HERE .. "/../?.lua;" .. package.path
local support = require "tests.support"
local CONCURRENCY = 64
local WARM_SHARE = 0.10
-- Before a sample: the idle_timeout_ms (1 s) of the gateway and the mock
-- close the kept-alive connections, then one request lets libcurl drop the
-- dead ones from its pool, and the gateway's idle clean-up (0.5 s) runs.
local IDLE_MS, AFTER_POKE_MS = 2500, 1200
local RSS_SLACK = 0.10
local CLIENT_TIMEOUT_MS = 30000
local HANG_TIMEOUT_MS = 150
-- AIORCH_SOAK_CLIENT_ABORTS=0: no client goes away mid-stream (the draw is
-- the same, so a seed replays the other requests identically).
local CLIENT_ABORTS = os.getenv("AIORCH_SOAK_CLIENT_ABORTS") ~= "0"
local REPLAY_ENV = CLIENT_ABORTS and "" or "AIORCH_SOAK_CLIENT_ABORTS=0 "

------------------------------------------------------------------------------
-- Arguments and the seeded generator

local args = { ... }
local N = math.tointeger(tonumber(args[1] or "100000"))
if not N or N < 1 then
  io.stderr:write("usage: aiorch run tests/soak.lua [REQUESTS] [SEED]\n")
  return 2
end
local SEED = math.tointeger(tonumber(args[2] or ""))
if args[2] and not SEED then
  io.stderr:write("soak: SEED must be an integer\n")
  return 2
end
SEED = SEED or ((os.time() * 1000003 + process.pid()) % 2147483647)

-- splitmix64: the same sequence for a seed on every machine and Lua build.
local rng_state = SEED
local function rnd()
  rng_state = rng_state + 0x9E3779B97F4A7C15
  local z = rng_state
  z = (z ~ (z >> 30)) * 0xBF58476D1CE4E5B9
  z = (z ~ (z >> 27)) * 0x94D049BB133111EB
  return z ~ (z >> 31)
end

-- 1 .. n
local function pick(n)
  return (rnd() >> 1) % n + 1
end

local function chance(percent)
  return pick(100) <= percent
end

------------------------------------------------------------------------------
-- The providers: one mock with a fault each. For each, what it does when
-- called plainly and streamed: "ok" answers; "fail" fails before any token;
-- "timeout" hangs until its timeout_ms; "post" streams the whole answer's
-- tokens, then fails (chunks=1: one piece, so the echoed id is in it).

local PROVIDERS = {
  { name = "ok_o", api = "openai", d = "chunks=3", plain = "ok", stream = "ok" },
  { name = "ok_a", api = "anthropic", d = "chunks=2", plain = "ok", stream = "ok" },
  { name = "slow_o", api = "openai", d = "latency_ms=15,chunks=4,chunk_delay_ms=2", plain = "ok", stream = "ok" },
  { name = "slow_a", api = "anthropic", d = "latency_ms=10,chunks=3,chunk_delay_ms=3", plain = "ok", stream = "ok" },
  { name = "e500_o", api = "openai", d = "fault=500", plain = "fail", stream = "fail" },
  -- Retry-After 0: a 429 that asked for a pause would cool the provider
  { name = "e429_a", api = "anthropic", d = "fault=429,retry_after=0", plain = "fail", stream = "fail",
    limited = true },
  { name = "e529_a", api = "anthropic", d = "fault=529", plain = "fail", stream = "fail" },
  { name = "e401_o", api = "openai", d = "fault=401", plain = "fail", stream = "fail" },
  { name = "hang_o", api = "openai", d = "fault=hang", timeout = HANG_TIMEOUT_MS, plain = "timeout",
    stream = "timeout" },
  { name = "hang_a", api = "anthropic", d = "fault=hang", timeout = HANG_TIMEOUT_MS, plain = "timeout",
    stream = "timeout" },
  { name = "bad_o", api = "openai", d = "fault=malformed,chunks=1", plain = "fail", stream = "post" },
  { name = "bad_a", api = "anthropic", d = "fault=malformed,chunks=1", plain = "fail", stream = "post" },
  { name = "cut_o", api = "openai", d = "fault=cut,chunks=1", plain = "fail", stream = "post" },
  { name = "cut_a", api = "anthropic", d = "fault=cut,chunks=1,chunk_delay_ms=1", plain = "fail", stream = "post" },
  { name = "e200_o", api = "openai", d = "fault=error200", plain = "fail", stream = "fail" },
  { name = "e200_a", api = "anthropic", d = "fault=error200", plain = "fail", stream = "fail" },
}
local BY_NAME = {}
for _, p in ipairs(PROVIDERS) do
  BY_NAME[p.name] = p
end
-- The draw: answering providers come up more often than each fault.
local POOL = {}
for _, p in ipairs(PROVIDERS) do
  for _ = 1, (p.plain == "ok" and 3 or 1) do
    POOL[#POOL + 1] = p.name
  end
end

-- The "default" route names a model that only these two serve (their
-- configured models), in this order (default_providers).
local DEFAULT_PROVIDERS = { "e429_a", "ok_o" }
local DEFAULT_MODEL = "soak-default"
local ALIAS, ALIAS_PROVIDERS = "soak-alias", { "e500_o", "ok_a" }
local STRATEGIES = { "single", "fallback", "fastest", "parallel" }

------------------------------------------------------------------------------
-- Files and processes

local sh_quote, slurp, write = support.sh_quote, support.read, support.write

local TMP = os.tmpname()
os.remove(TMP)
assert(os.execute("mkdir -p " .. sh_quote(TMP .. "/providers")))

local started = {}

local function start(argv, opts)
  opts = opts or {}
  opts.death_signal = "SIGKILL" -- never outlive the soak
  local pid = assert(process.spawn(argv, opts))
  started[#started + 1] = pid
  return pid
end

local function stop_all(keep)
  for _, pid in ipairs(started) do
    if process.kill(pid, "SIGTERM") then
      if not process.wait(pid, 5000) and process.kill(pid, "SIGKILL") then
        process.wait(pid, 5000)
      end
    end
  end
  started = {}
  if keep then
    io.stderr:write("soak: the logs are kept in ", TMP, "\n")
  else
    os.execute("rm -rf " .. sh_quote(TMP))
  end
end

-- Waits for pattern in the file; returns its capture or raises with the file.
local function wait_line(path, pattern, pid, what)
  local deadline = now() + 30000
  while true do
    local text = slurp(path) or ""
    local v = text:match(pattern)
    if v then
      return v
    end
    if now() > deadline or not process.kill(pid, "SIGCONT") then -- a liveness probe
      error(fmt("soak: %s did not start: %s", what, text:sub(-2000)))
    end
    aiorch.sleep(20)
  end
end

-- The gateway's figures from /proc.
local function rss_kib(pid)
  return support.status_kib(pid, "VmRSS"), support.status_kib(pid, "VmHWM")
end

-- Open descriptors: the total and how many are sockets.
local function fd_count(pid)
  local p = io.popen("ls -l /proc/" .. pid .. "/fd 2>/dev/null")
  local n, sockets = 0, 0
  for line in p:lines() do
    if line:find(" -> ", 1, true) then
      n = n + 1
      if line:find("-> socket:", 1, true) then
        sockets = sockets + 1
      end
    end
  end
  p:close()
  return n, sockets
end

------------------------------------------------------------------------------
-- Requests: their draw and what their faults predict

local function text_of(name, question)
  return fmt("Hello from the mock %s provider. You asked: %s", BY_NAME[name].api, question)
end

local function distinct(k)
  local out, seen = {}, {}
  while #out < k do
    local n = POOL[pick(#POOL)]
    if not seen[n] then
      seen[n] = true
      out[#out + 1] = n
    end
  end
  return out
end

-- Draws request i. Calls the generator a fixed way for a given i, with no
-- yield in between, so a seed gives the same requests in the same order.
local function draw(i)
  local r = { i = i }
  local e = pick(10)
  r.endpoint = e <= 4 and "chat" or (e <= 8 and "messages" or "native")
  r.stream = r.endpoint ~= "native" and chance(50)
  r.abort = r.stream and chance(3) and CLIENT_ABORTS -- the client goes away at the first event
  r.usage = r.endpoint == "chat" and chance(50)
  local how = pick(100)
  if how <= 5 then
    r.route = "default"
    r.strategy, r.providers = "fallback", DEFAULT_PROVIDERS
  elseif how <= 10 and r.endpoint ~= "native" then
    r.route = "alias"
    r.strategy, r.providers = "fallback", ALIAS_PROVIDERS
  else
    r.route = (r.endpoint == "native" and chance(50)) and "body" or "headers"
    r.strategy = STRATEGIES[pick(#STRATEGIES)]
    r.providers = distinct(pick(3))
  end
  local bad = pick(100)
  if bad <= 1 then
    r.bad = "json"
  elseif bad <= 2 and r.route ~= "default" and r.route ~= "alias" then
    r.bad = "provider"
    r.providers = { r.providers[1], "nosuch" }
  elseif bad <= 3 and r.route ~= "default" and r.route ~= "alias" then
    r.bad = "strategy"
    r.strategy = "nosuch"
  end
  r.question = fmt("soak %d of run %d: please answer", i, SEED)
  return r
end

-- 504 when every provider timed out, 429 when every one rate-limited, else 502.
local function failure_status(names, beh)
  local timeout, limited = true, true
  for _, n in ipairs(names) do
    timeout = timeout and BY_NAME[n][beh] == "timeout"
    limited = limited and BY_NAME[n].limited == true
  end
  return timeout and 504 or (limited and 429 or 502)
end

-- The outcomes request r may have: a list of {status, owners = {names},
-- post = true when the stream ends with an error after the answer}.
local function predict(r)
  if r.bad then
    return { { status = 400 } }
  end
  local ps, strategy = r.providers, r.strategy
  if strategy == "parallel" then
    local oks = {}
    for _, n in ipairs(ps) do
      if BY_NAME[n].plain == "ok" then
        oks[#oks + 1] = n
      end
    end
    if #oks > 0 then
      return { { status = 200, owners = oks } }
    end
    return { { status = failure_status(ps, "plain") } }
  end
  local beh = r.stream and "stream" or "plain"
  if strategy == "single" then
    ps = { ps[1] }
  end
  if strategy == "fastest" then
    local out = {}
    for _, n in ipairs(ps) do
      local b = BY_NAME[n][beh]
      if b == "ok" or b == "post" then
        out[#out + 1] = { status = 200, owners = { n }, post = b == "post" }
      end
    end
    if #out == 0 then
      out[1] = { status = failure_status(ps, beh) }
    end
    return out
  end
  for _, n in ipairs(ps) do -- single, fallback
    local b = BY_NAME[n][beh]
    if b == "ok" or b == "post" then
      return { { status = 200, owners = { n }, post = b == "post" } }
    end
  end
  return { { status = failure_status(ps, beh) } }
end

local MODEL = { chat = "gpt-4o-mini", messages = "claude-3-haiku-20240307" }
local PATH = { chat = "/v1/chat/completions", messages = "/v1/messages", native = "/v1/orchestrate" }

-- The HTTP request for r.
local function build(r)
  local headers = { ["content-type"] = "application/json" }
  local body
  if r.endpoint == "messages" then
    headers["anthropic-version"] = "2023-06-01"
  end
  if r.route == "headers" then
    headers["x-aiorch-strategy"] = r.strategy
    headers["x-aiorch-providers"] = concat(r.providers, ",")
  end
  if r.endpoint == "native" then
    local doc = { user_question = r.question, max_tokens = 64 }
    if r.route == "body" then
      doc.strategy, doc.providers = r.strategy, r.providers
    end
    body = cjson.encode(doc)
  else
    local doc = {
      model = r.route == "alias" and ALIAS or r.route == "default" and DEFAULT_MODEL or MODEL[r.endpoint],
      max_tokens = 64,
      messages = { { role = "user", content = r.question } },
    }
    if r.stream then
      doc.stream = true
      if r.usage then
        doc.stream_options = { include_usage = true }
      end
    end
    body = cjson.encode(doc)
  end
  if r.bad == "json" then
    body = body:sub(1, #body - 3)
  end
  return { method = "POST", path = PATH[r.endpoint], headers = headers, body = body }
end

------------------------------------------------------------------------------
-- Checking an answer. Each check returns nil when the answer is right,
-- else a message.

local OPENAI_TYPES = { [400] = "invalid_request_error", [429] = "rate_limit_exceeded", [502] = "upstream_error",
  [504] = "timeout" }
local ANTHROPIC_TYPES = { [400] = "invalid_request_error", [429] = "rate_limit_error", [502] = "api_error",
  [504] = "timeout_error" }
local NATIVE_TYPES = { [400] = "invalid_request" }

local function json_error(r, status, doc)
  if type(doc) ~= "table" then
    return "the error body is not JSON"
  end
  if r.endpoint == "messages" then
    if doc.type ~= "error" or type(doc.error) ~= "table" or doc.error.type ~= ANTHROPIC_TYPES[status]
      or type(doc.error.message) ~= "string" then
      return "not an Anthropic error of status " .. status
    end
  elseif r.endpoint == "chat" then
    if type(doc.error) ~= "table" or doc.error.type ~= OPENAI_TYPES[status]
      or type(doc.error.message) ~= "string" then
      return "not an OpenAI error of status " .. status
    end
  elseif status == 400 then
    if type(doc.error) ~= "table" or doc.error.type ~= NATIVE_TYPES[status] then
      return "not a native error of status 400"
    end
  else -- a native upstream failure: the StandardAIResponse itself
    local want = status == 504 and "timeout" or "error"
    local one = doc.status and doc or nil
    if r.strategy == "parallel" and not r.bad then
      if #doc ~= #r.providers then
        return fmt("%d responses for %d providers", #doc, #r.providers)
      end
      for k, x in ipairs(doc) do
        local b = BY_NAME[r.providers[k]].plain
        if x.ia_provider_name ~= r.providers[k] or x.status ~= (b == "timeout" and "timeout" or "error") then
          return fmt("response %d is %s from %s", k, tostring(x.status), tostring(x.ia_provider_name))
        end
      end
      return nil
    end
    if not one or one.status ~= want then
      return fmt("a native %d whose status is %s, not %s", status, tostring(one and one.status), want)
    end
  end
  return nil
end

-- A plain 200: the texts of owners, in order.
local function plain_answer(r, doc, owners)
  if type(doc) ~= "table" then
    return "the body is not JSON"
  end
  if r.endpoint == "chat" then
    if doc.object ~= "chat.completion" or type(doc.choices) ~= "table" or #doc.choices ~= #owners then
      return "not a chat.completion with " .. #owners .. " choices"
    end
    for k, n in ipairs(owners) do
      local c = doc.choices[k]
      if c.index ~= k - 1 or type(c.message) ~= "table" or c.message.content ~= text_of(n, r.question) then
        return fmt("choice %d is not %s's answer: %s", k, n, cjson.encode(c))
      end
    end
  elseif r.endpoint == "messages" then
    if doc.type ~= "message" or type(doc.content) ~= "table" or #doc.content ~= #owners then
      return "not a message with " .. #owners .. " blocks"
    end
    for k, n in ipairs(owners) do
      if doc.content[k].text ~= text_of(n, r.question) then
        return fmt("block %d is not %s's answer: %s", k, n, cjson.encode(doc.content[k]))
      end
    end
  else
    local list = doc.status and { doc } or doc
    if r.strategy == "parallel" then
      local oks = {}
      for k, x in ipairs(list) do
        if x.ia_provider_name ~= r.providers[k] then
          return fmt("response %d is from %s, not %s", k, tostring(x.ia_provider_name), r.providers[k])
        end
        if x.status == "success" then
          oks[#oks + 1] = x
        end
      end
      if #list ~= #r.providers or #oks ~= #owners then
        return fmt("%d responses (%d successes) for %d providers", #list, #oks, #r.providers)
      end
      list = oks
    end
    if #list ~= #owners then
      return "expected " .. #owners .. " responses"
    end
    for k, n in ipairs(owners) do
      local x = list[k]
      if x.status ~= "success" or x.ia_provider_name ~= n or x.response_text ~= text_of(n, r.question) then
        return fmt("response %d is not %s's answer: %s", k, n, cjson.encode(x))
      end
    end
  end
  return nil
end

-- Splits an SSE body into {event, data} records; nil, message on bad framing.
local function sse(body)
  local out = {}
  if body:sub(-2) ~= "\n\n" then
    return nil, "the stream does not end with a blank line"
  end
  for block in body:gmatch("(.-)\n\n") do
    local ev = { event = "message" }
    for line in block:gmatch("[^\n]+") do
      local k, v = line:match("^(%a+): ?(.*)$")
      if k == "event" then
        ev.event = v
      elseif k == "data" then
        ev.data = v
      else
        return nil, "bad stream line: " .. line
      end
    end
    if not ev.data then
      return nil, "an event without data"
    end
    out[#out + 1] = ev
  end
  return out
end

-- A streamed 200: owners' texts, then the end (or an error event when post).
local function stream_answer(r, body, owners, post)
  local events, err = sse(body)
  if not events then
    return err
  end
  local n = #owners
  local texts, finished = {}, {}
  for k = 1, n do
    texts[k] = {}
  end
  local last = events[#events]
  if r.endpoint == "chat" then
    local id
    local done = 0
    for k, ev in ipairs(events) do
      if ev.data == "[DONE]" then
        done = done + 1
        if k ~= #events then
          return "[DONE] before the end"
        end
      else
        local doc = cjson.decode(ev.data)
        if type(doc) ~= "table" then
          return "a chunk that is not JSON"
        end
        if doc.error then
          if k ~= #events or not post then
            return "an unexpected error event: " .. ev.data
          end
        else
          id = id or doc.id
          if doc.id ~= id or doc.object ~= "chat.completion.chunk" then
            return "a chunk of another completion"
          end
          for _, c in ipairs(doc.choices) do
            local slot = texts[c.index + 1]
            if not slot then
              return "a choice index out of range"
            end
            if type(c.delta.content) == "string" then
              slot[#slot + 1] = c.delta.content
            end
            if c.finish_reason ~= cjson.null and c.finish_reason ~= nil then
              if finished[c.index + 1] then
                return "a choice finished twice"
              end
              finished[c.index + 1] = true
            end
          end
        end
      end
    end
    if post then
      if done ~= 0 or not last.data:find('"error"', 1, true) then
        return "the broken stream does not end with an error event"
      end
    elseif done ~= 1 then
      return "no [DONE] at the end"
    end
  else
    local starts, stops, msg_stop = 0, 0, 0
    if events[1].event ~= "message_start" then
      return "the stream does not begin with message_start"
    end
    for k, ev in ipairs(events) do
      local doc = cjson.decode(ev.data)
      if type(doc) ~= "table" then
        return "an event that is not JSON"
      end
      if ev.event == "content_block_start" then
        starts = starts + 1
      elseif ev.event == "content_block_delta" then
        local slot = texts[doc.index + 1]
        if not slot then
          return "a block index out of range"
        end
        slot[#slot + 1] = doc.delta.text
      elseif ev.event == "content_block_stop" then
        stops = stops + 1
      elseif ev.event == "message_stop" then
        msg_stop = msg_stop + 1
        if k ~= #events then
          return "message_stop before the end"
        end
      elseif ev.event == "error" then
        if k ~= #events or not post or doc.type ~= "error" then
          return "an unexpected error event: " .. ev.data
        end
      elseif ev.event ~= "message_start" and ev.event ~= "message_delta" and ev.event ~= "ping" then
        return "an unknown event " .. ev.event
      end
    end
    if starts ~= n then
      return fmt("%d content blocks for %d answers", starts, n)
    end
    if post then
      if last.event ~= "error" or msg_stop ~= 0 then
        return "the broken stream does not end with an error event"
      end
    elseif msg_stop ~= 1 or stops ~= n then
      return "the stream does not end with message_stop"
    end
  end
  for k, name in ipairs(owners) do
    local got = concat(texts[k])
    if got ~= text_of(name, r.question) then
      return fmt("answer %d is not %s's: %q", k, name, got)
    end
  end
  return nil
end

-- Checks one answer against the outcomes predicted. Returns the outcome's
-- label for the summary, or nil, message.
local function check(r, status, headers, body)
  local outcomes = predict(r)
  if not status then
    if headers == "aborted" and r.abort then
      for _, o in ipairs(outcomes) do
        if o.status == 200 then
          return "aborted by the client"
        end
      end
    end
    return nil, fmt("no answer: %s %s", tostring(headers), tostring(body))
  end
  local candidates = {}
  for _, o in ipairs(outcomes) do
    if o.status == status then
      candidates[#candidates + 1] = o
    end
  end
  if #candidates == 0 then
    local want = {}
    for _, o in ipairs(outcomes) do
      want[#want + 1] = tostring(o.status)
    end
    return nil, fmt("status %d, expected %s: %s", status, concat(want, " or "), body:sub(1, 300))
  end
  if status ~= 200 then
    local ctype = headers["content-type"] or ""
    if not ctype:find("application/json", 1, true) then
      return nil, "an error that is not JSON: " .. ctype
    end
    local err = json_error(r, status, cjson.decode(body))
    if err then
      return nil, err .. ": " .. body:sub(1, 300)
    end
    return tostring(status)
  end
  -- Which outcome: the gateway names who answered.
  local said = headers["x-aiorch-provider"]
  local o
  for _, c in ipairs(candidates) do
    if concat(c.owners, ",") == said then
      o = c
    end
  end
  if not o then
    return nil, fmt("answered by %s, not a provider the faults allow", tostring(said))
  end
  local err
  if r.stream then -- (parallel's answer too is sent as a stream)
    if not (headers["content-type"] or ""):find("text/event-stream", 1, true) then
      return nil, "a stream that is not text/event-stream"
    end
    err = stream_answer(r, body, o.owners, o.post)
  else
    err = plain_answer(r, cjson.decode(body), o.owners)
  end
  if err then
    return nil, err .. " | " .. body:sub(1, 400)
  end
  return o.post and "200 stream ended by an error event" or "200"
end

------------------------------------------------------------------------------
-- The run

local function describe(r)
  return fmt("request %d: %s%s %s [%s] via %s%s", r.i, r.endpoint, r.stream and " stream" or "",
    r.strategy, concat(r.providers, ","), r.route, r.bad and (" bad=" .. r.bad) or "")
end

local function main()
  -- The mock providers.
  local mock_out = TMP .. "/mock.out"
  local mock_pid = start({ EXE, "run", HERE .. "/mock_server.lua", "--idle-timeout-ms", "1000" },
    { stdout = mock_out, stderr = TMP .. "/mock.err" })
  local mock_port = tonumber(wait_line(mock_out, "PORT (%d+)", mock_pid, "the mock server"))

  -- Their adapters (the built-ins under other names) and the gateway's configuration.
  local root = require("aiorch.loader").root()
  local lines = {}
  for _, p in ipairs(PROVIDERS) do
    write(fmt("%s/providers/%s.lua", TMP, p.name), fmt([[
local base = dofile(%q)
local a = {}
for k, v in pairs(base) do a[k] = v end
a.name, a.key_env, a.base_url_env, a.model_env = %q, false, nil, nil
return a
]], root .. "/scripts/providers/" .. p.api .. ".lua", p.name))
    local url = fmt("http://%s:%d/_mock/%s%s", HOST, mock_port, p.d, p.api == "openai" and "/v1" or "")
    local models = ""
    for _, d in ipairs(DEFAULT_PROVIDERS) do
      if d == p.name then
        models = fmt(", models = { %q }", DEFAULT_MODEL)
      end
    end
    lines[#lines + 1] = fmt("    %s = { base_url = %q, timeout_ms = %d%s },", p.name, url, p.timeout or 10000, models)
  end
  local function list(t)
    local q = {}
    for k, v in ipairs(t) do
      q[k] = fmt("%q", v)
    end
    return "{ " .. concat(q, ", ") .. " }"
  end
  local config = TMP .. "/gateway.lua"
  write(config, concat {
    "return {\n",
    "  default_strategy = \"fallback\",\n",
    "  default_providers = ", list(DEFAULT_PROVIDERS), ",\n",
    "  providers = {\n", concat(lines, "\n"), "\n  },\n",
    "  aliases = { [", fmt("%q", ALIAS), "] = { strategy = \"fallback\", providers = ", list(ALIAS_PROVIDERS),
    " } },\n",
    "  server = { idle_timeout_ms = 1000 },\n",
    -- No circuit breaking: each answer stays what its own faults predict,
    -- whatever came before (tests/spec/faults_spec.lua covers breakers).
    "  policy = { breaker_failures = 0 },\n",
    "}\n",
  })

  local log = TMP .. "/gateway.log"
  local gw = start({ EXE, "serve", "--workers", "0", "--listen", HOST .. ":0", "--config", config,
    "--path", TMP }, { stderr = log, stdout = TMP .. "/gateway.out" })
  local port = tonumber(wait_line(log, "listening on http://[%d.]+:(%d+)", gw, "aiorch serve"))
  local base = fmt("http://%s:%d", HOST, port)

  print(fmt("soak: %d requests, seed %d, %d at a time, gateway pid %d on port %d", N, SEED, CONCURRENCY, gw, port))
  print(fmt("soak: replay with: %sbuild/aiorch run tests/soak.lua %d %d", REPLAY_ENV, N, SEED))
  io.stdout:flush()

  local next_i, answered = 1, 0
  local seen = {} -- i -> label
  local labels = {} -- label -> count
  local violations = {}
  local function violation(msg)
    violations[#violations + 1] = msg
    if #violations <= 20 then
      io.stderr:write("soak: VIOLATION ", msg, "\n")
    end
  end

  local function one(r)
    local q = build(r)
    local on_event
    if r.abort then
      on_event = function() return false end
    end
    local status, headers, body = aiorch.http.request {
      method = q.method, url = base .. q.path, headers = q.headers, body = q.body,
      timeout_ms = CLIENT_TIMEOUT_MS, on_event = on_event,
    }
    local label, err = check(r, status, headers, body)
    if seen[r.i] then
      violation(describe(r) .. ": answered twice")
    end
    seen[r.i] = label or "violation"
    answered = answered + 1
    if not label then
      violation(describe(r) .. ": " .. err)
      label = "violation"
    end
    labels[label] = (labels[label] or 0) + 1
  end

  local function worker(last)
    while next_i <= last do
      local r = draw(next_i) -- no yield between taking i and drawing it
      next_i = next_i + 1
      one(r)
    end
  end

  local function phase(last)
    local tasks = {}
    for k = 1, CONCURRENCY do
      tasks[k] = aiorch.spawn(worker, last)
    end
    local _, errors, messages = aiorch.gather(tasks)
    for k = 1, CONCURRENCY do
      if errors[k] then
        violation("a client task failed: " .. tostring(messages[k]))
      end
    end
  end

  -- The gateway idle, with the same connections open each time.
  local function sample()
    aiorch.sleep(IDLE_MS)
    local poke = { i = 0, endpoint = "native", route = "body", strategy = "single", providers = { "ok_o" },
      question = "soak: idle" }
    local q = build(poke)
    local status, headers, body = aiorch.http.request {
      method = q.method, url = base .. q.path, headers = q.headers, body = q.body, timeout_ms = CLIENT_TIMEOUT_MS }
    local label, err = check(poke, status, headers, body)
    if not label then
      violation("the request between phases: " .. err)
    end
    aiorch.sleep(AFTER_POKE_MS)
    local rss, hwm = rss_kib(gw)
    local fds, sockets = fd_count(gw)
    return rss, fds, sockets, hwm
  end

  local warm_n = math.max(1, math.floor(N * WARM_SHARE))
  local t0 = now()
  phase(warm_n)
  local busy_ms = now() - t0
  local rss_warm, fds_warm, socks_warm = sample()
  print(fmt("soak: warm-up done: %d requests, gateway RSS %d KiB, %d fds (%d sockets)", warm_n, rss_warm,
    fds_warm, socks_warm))
  io.stdout:flush()

  local t1 = now()
  phase(N)
  busy_ms = busy_ms + (now() - t1)
  local rss_end, fds_end, socks_end, hwm = sample()

  -- Every request answered once, by us and by the gateway's own count.
  local missing = 0
  for i = 1, N do
    if not seen[i] then
      missing = missing + 1
    end
  end
  if missing > 0 or answered ~= N then
    violation(fmt("%d requests without an answer (%d answers for %d requests)", missing, answered, N))
  end
  local mstatus, _, metrics = aiorch.http.request { url = base .. "/metrics", timeout_ms = 10000 }
  local counted = 0
  if mstatus == 200 then
    for route, n in metrics:gmatch('aiorch_gateway_requests_total{route="([^"]+)",status="%d+"} (%d+)') do
      if route == PATH.chat or route == PATH.messages or route == PATH.native then
        counted = counted + tonumber(n)
      end
    end
  end
  if counted ~= N + 2 then
    violation(fmt("the gateway counted %d requests, %d were sent", counted, N + 2))
  end
  local code, kind, sig = process.wait(gw, 0)
  local gw_state = "running"
  if kind ~= "timeout" then
    gw_state = "EXITED: " .. (code and ("status " .. code) or tostring(sig or kind))
    violation("the gateway " .. gw_state)
  end

  -- The gateway's log: one access line per request, and no internal error.
  -- Access lines are written in batches, 50 ms late at most on an idle
  -- machine; a loaded one may not run the gateway for a while: read the log
  -- again until every line is there, for 5 s at most.
  local access, errors
  local read_until = aiorch.now() + 5000
  repeat
    aiorch.sleep(200)
    access, errors = 0, {}
    for line in io.lines(log) do
      if line:find("^aiorch: access ") then
        if not line:find("path=/metrics", 1, true) then
          access = access + 1
        end
      elseif line:find("error", 1, true) or line:find("fail", 1, true) then
        errors[#errors + 1] = line
      end
    end
  until access >= N + 2 or aiorch.now() >= read_until
  if access ~= N + 2 then -- and the two between the phases
    violation(fmt("the gateway logged %d requests, %d were sent", access, N + 2))
  end
  for k, line in ipairs(errors) do
    if k <= 5 then
      violation("the gateway logged: " .. line)
    end
  end

  if rss_end > rss_warm * (1 + RSS_SLACK) then
    violation(fmt("gateway RSS grew from %d KiB to %d KiB (more than %d%%)", rss_warm, rss_end, RSS_SLACK * 100))
  end
  if fds_end > fds_warm then
    violation(fmt("gateway file descriptors grew from %d to %d", fds_warm, fds_end))
  end

  local names = {}
  for l in pairs(labels) do
    names[#names + 1] = l
  end
  table.sort(names)
  print(fmt("soak: requests   %d (answered %d)", N, answered))
  print(fmt("soak: req/s      %.0f (%.1f s under load, %d at a time)", N / (busy_ms / 1000), busy_ms / 1000,
    CONCURRENCY))
  for _, l in ipairs(names) do
    print(fmt("soak: answers    %-38s %d", l, labels[l]))
  end
  print(fmt("soak: RSS        warm %d KiB, end %d KiB (%+.1f%%), peak %d KiB", rss_warm, rss_end,
    (rss_end - rss_warm) * 100 / rss_warm, hwm))
  print(fmt("soak: fds        warm %d (%d sockets), end %d (%d sockets)", fds_warm, socks_warm, fds_end, socks_end))
  print(fmt("soak: gateway    %s", gw_state))
  print(fmt("soak: seed       %d (replay: %sbuild/aiorch run tests/soak.lua %d %d)", SEED, REPLAY_ENV, N, SEED))
  if #violations > 0 then
    print(fmt("soak: FAILED: %d violations", #violations))
    return 1
  end
  print("soak: OK")
  return 0
end

local ok, code = xpcall(main, debug.traceback)
stop_all(not ok or code ~= 0)
if not ok then
  io.stderr:write(tostring(code), "\n")
  return 1
end
return code
