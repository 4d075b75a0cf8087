-- The gateway inside nginx: Debian's nginx with ngx_http_aiorch_module,
-- two workers, the mock providers behind it (in this process), over real
-- loopback sockets. The same answers as `aiorch serve` (gateway_spec,
-- hardening_spec), the strategies through nginx's event loop, a client
-- that goes away, backpressure through nginx's output chain, nginx's own
-- limits, TLS, HTTP/2 and a reload in front of it, and a custom aiorch_handler.
local aiorch = require "aiorch"
local cjson = require "cjson.safe"
local mock_mod = require "aiorch.mock"
local support = require "tests.support"
local nginx = require "tests.nginx_host"

local fmt = string.format
local post, request = support.post, support.request
local stretch = support.stretch

local KEYS = { openai = "sk-ngx-spec-openai-8181", anthropic = "sk-ant-ngx-spec-9292" }
local CLIENT_KEY = "ngx-client-secret-7474"
local QUESTION = "What is two plus two?"
local OPENAI_TEXT = "Hello from the mock openai provider. You asked: " .. QUESTION
local ANTHROPIC_TEXT = "Hello from the mock anthropic provider. You asked: " .. QUESTION

local MISSING = nginx.missing()
local SANITIZED = support.under_asan() or support.SLOWDOWN > 1

local m -- the mock providers
local big -- mock providers whose answers stream 6 MB
local n -- nginx

local function chat(extra)
  local body = { model = "any", messages = { { role = "user", content = QUESTION } } }
  return support.merge(body, extra)
end

local function msgs(extra)
  local body = { model = "any", max_tokens = 64, messages = { { role = "user", content = QUESTION } } }
  return support.merge(body, extra)
end

-- Parses a whole SSE body into {event, data, json} records.
local sse = support.sse

local function openai_text(body)
  local text = {}
  for _, ev in ipairs(sse(body)) do
    local c = ev.json and ev.json.choices and ev.json.choices[1]
    if c and type(c.delta.content) == "string" then
      text[#text + 1] = c.delta.content
    end
  end
  return table.concat(text)
end

local function requests_of(api)
  return support.requests_of(m, api)
end

local wait_for = support.wait_for

local function no_keys_in(text)
  support.no_keys_in(text, KEYS, "a provider key")
  support.no_keys_in(text, { CLIENT_KEY }, "a client key")
end

-- A gateway configuration (aiorch_config) with the mock's directives for
-- each provider, and more fields (Lua text). A worker's runtime keeps one
-- breaker per provider for all its locations: failures served on purpose
-- must not open it for the other tests.
local function config(o, a, extra)
  return fmt([[return {
  policy = { breaker_failures = 1000 },
  providers = {
    openai = { api_key_env = "NGX_OPENAI_KEY", base_url = %q, priority = 1 },
    anthropic = { api_key_env = "NGX_ANTHROPIC_KEY", base_url = %q, priority = 2 },
  },
  aliases = { any = { providers = { "openai", "anthropic" } } },
  %s
}
]], m:base_url("openai", o), m:base_url("anthropic", a), extra or "")
end

local HANDLER = [[
-- A handler of its own: aiorch_handler FILE.lua
local aiorch = require "aiorch"
return function(req, res)
  if req.path == "/stream" then
    res:start(200, { ["content-type"] = "text/plain" })
    for i = 1, 5 do
      res:write("part " .. i .. "\n")
      aiorch.sleep(10)
    end
    return res:finish("done\n")
  end
  res:respond(201, { ["x-handler"] = "mine", ["content-type"] = "text/plain" },
    req.method .. " " .. req.path .. " " .. (req.headers["x-test"] or "-") .. " " .. #req.body)
end
]]

local TEXT = {}
for i = 1, 200000 do
  TEXT[i] = "w" .. i
end
TEXT = table.concat(TEXT, " ")

-- A self-signed certificate for 127.0.0.1 (nginx's TLS in front), or nil
-- without openssl.
local function certificate()
  local dir = support.tmpdir()
  local cert, key = dir .. "/cert.pem", dir .. "/key.pem"
  local ok = os.execute(fmt("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 "
    .. "-subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 -keyout %s -out %s >/dev/null 2>&1", key, cert))
  return ok and { cert = cert, key = key } or nil
end

local TLS

setup(function()
  if MISSING then
    return
  end
  TLS = certificate()
  m = assert(mock_mod.start { host = "127.0.0.1", port = 0 })
  big = assert(mock_mod.start { host = "127.0.0.1", port = 0, defaults = { text = TEXT, chunks = 20000 } })
  local handler_file = support.tmpdir() .. "/handler.lua"
  support.write(handler_file, HANDLER)
  n = nginx.start {
    env = { NGX_OPENAI_KEY = KEYS.openai, NGX_ANTHROPIC_KEY = KEYS.anthropic, NGX_CLIENT_KEY = CLIENT_KEY },
    servers = {
      { name = "plain", config = config() },
      { name = "failing", config = config({ fault = "500" }) },
      { name = "race", config = config({ latency_ms = 400 }, { latency_ms = 20 }) },
      { name = "race_stream", config = config({ chunks = 5, chunk_delay_ms = 30 }, { latency_ms = 600 }) },
      { name = "cut", config = config({ fault = "cut", chunks = 4, chunk_delay_ms = 5 }) },
      { name = "slow", config = config({ chunks = 10, chunk_delay_ms = 50 }) },
      { name = "hang", config = config({ fault = "hang" }, nil, "request_timeout_ms = 400,") },
      { name = "huge", config = fmt([[return { providers = {
        openai = { api_key_env = "NGX_OPENAI_KEY", base_url = %q } } }]], big:base_url("openai")) },
      { name = "locked", config = config({ latency_ms = 200 }, nil,
        'client_keys_env = { "NGX_CLIENT_KEY" }, max_body = 2048, max_inflight = 1,') },
      { name = "small", config = config(), directives = "client_max_body_size 1k;" },
      { name = "h2", config = config(), http2 = true },
      { name = "tls", config = config(), http2 = true, tls = TLS },
      { name = "custom", handler = handler_file },
    },
  }
end)

teardown(function()
  if n then
    n.stop()
  end
  if m then
    m:close()
    big:close()
  end
  support.cleanup()
end)

before_each(function()
  if m then
    m:reset()
  end
end)

local it_nginx = MISSING and function(name) pending(name .. " (" .. MISSING .. ")") end or it

describe("the gateway inside nginx", function()
  it_nginx("answers both APIs and the native one as aiorch serve does, plain and streamed", function()
    local base = n.base("plain")
    local s, h, raw, doc = post(base .. "/v1/chat/completions", chat())
    assert.equal(200, s, raw)
    assert.equal("openai", h["x-aiorch-provider"])
    assert.equal("openai:success", h["x-aiorch-attempts"])
    assert.matches("^nginx", h["server"])
    assert.equal(OPENAI_TEXT, doc.choices[1].message.content)

    local s2, h2, raw2 = post(base .. "/v1/chat/completions", chat { stream = true })
    assert.equal(200, s2)
    assert.matches("^text/event%-stream", h2["content-type"])
    assert.equal(OPENAI_TEXT, openai_text(raw2))
    local evs = sse(raw2)
    assert.equal("[DONE]", evs[#evs].data)

    local s3, _, _, doc3 = post(base .. "/v1/messages", msgs(), { ["x-aiorch-providers"] = "anthropic" })
    assert.equal(200, s3)
    assert.equal(ANTHROPIC_TEXT, doc3.content[1].text)
    local s4, _, raw4 = post(base .. "/v1/messages", msgs { stream = true })
    assert.equal(200, s4)
    local names = {}
    for _, ev in ipairs(sse(raw4)) do
      names[#names + 1] = ev.event
    end
    assert.equal("message_start", names[1])
    assert.equal("message_stop", names[#names])

    local s5, _, _, doc5 = post(base .. "/v1/orchestrate",
      { user_question = QUESTION, strategy = "parallel", providers = { "openai", "anthropic" } })
    assert.equal(200, s5)
    assert.equal(2, #doc5)
    assert.equal("success", doc5[1].status)

    local s6, _, _, doc6 = request("GET", base .. "/v1/models")
    assert.equal(200, s6)
    assert.is_true(#doc6.data > 0)
    local s7, _, _, doc7 = request("GET", base .. "/healthz")
    assert.equal(200, s7)
    assert.equal("ok", doc7.status)
    local s8, _, text8 = request("GET", base .. "/metrics")
    assert.equal(200, s8)
    assert.matches("aiorch_provider_requests_total", text8, 1, true)
    -- nginx's own access log saw them too
    assert.matches('"POST /v1/chat/completions HTTP/1.1" 200', n.access(), 1, true)
  end)

  it_nginx("falls back past a failing provider, plain and streamed", function()
    local base = n.base("failing")
    local s, h, _, doc = post(base .. "/v1/chat/completions", chat())
    assert.equal(200, s)
    assert.equal("anthropic", h["x-aiorch-provider"])
    assert.equal("openai:server_error,anthropic:success", h["x-aiorch-attempts"])
    assert.equal(ANTHROPIC_TEXT, doc.choices[1].message.content)
    local s2, h2, raw2 = post(base .. "/v1/chat/completions", chat { stream = true })
    assert.equal(200, s2)
    assert.equal("anthropic", h2["x-aiorch-provider"])
    assert.equal(ANTHROPIC_TEXT, openai_text(raw2))
  end)

  it_nginx("fastest answers with the first and aborts the loser's transfer", function()
    local base = n.base("race")
    local t0 = aiorch.now()
    local s, h = post(base .. "/v1/chat/completions", chat(), { ["x-aiorch-strategy"] = "fastest" })
    assert.equal(200, s)
    assert.equal("anthropic", h["x-aiorch-provider"])
    assert.is_true(aiorch.now() - t0 < stretch(300))
    local o = requests_of("openai")[1]
    assert.is_true(wait_for(function() return o.aborted_at ~= nil end, 200), "the loser was not aborted")
    assert.is_nil(o.completed_at)
  end)

  it_nginx("fastest streaming cancels the losers at the winner's first token", function()
    local s, h, raw = post(n.base("race_stream") .. "/v1/chat/completions", chat { stream = true },
      { ["x-aiorch-strategy"] = "fastest" })
    assert.equal(200, s)
    assert.equal("openai", h["x-aiorch-provider"])
    assert.equal(OPENAI_TEXT, openai_text(raw))
    local o, a = requests_of("openai")[1], requests_of("anthropic")[1]
    assert.is_number(a.aborted_at, "the loser was not aborted")
    assert.is_true(a.aborted_at < o.completed_at - 60, "loser aborted too late")
  end)

  it_nginx("keeps the commit point: a stream cut after tokens ends with an error event, none before", function()
    local s, _, raw = post(n.base("cut") .. "/v1/chat/completions", chat { stream = true })
    assert.equal(200, s)
    local evs = sse(raw)
    assert.is_table(evs[#evs].json and evs[#evs].json.error, raw)
    for _, ev in ipairs(evs) do
      assert.not_equal("[DONE]", ev.data)
    end
    assert.equal(0, #requests_of("anthropic")) -- tokens went out: nobody else may continue
    -- A failure before the first token falls back unseen.
    local s2, h2, raw2 = post(n.base("failing") .. "/v1/messages", msgs { stream = true },
      { ["x-aiorch-strategy"] = "fastest" })
    assert.equal(200, s2)
    assert.equal("anthropic", h2["x-aiorch-provider"])
    assert.matches("message_stop", raw2, 1, true)
  end)

  it_nginx("a client that goes away mid-stream cancels the orchestration and aborts its upstream", function()
    local events = 0
    local st, kind = aiorch.http.request { method = "POST", url = n.base("slow") .. "/v1/chat/completions",
      headers = { ["content-type"] = "application/json" }, body = cjson.encode(chat { stream = true }),
      on_event = function()
        events = events + 1
        return events < 2 and nil or false
      end }
    assert.is_nil(st)
    assert.equal("aborted", kind)
    local o = requests_of("openai")[1]
    assert.is_true(wait_for(function() return o.aborted_at ~= nil end, 1000), "the upstream went on")
    assert.is_nil(o.completed_at)
    assert.is_true(wait_for(function() return n.log():find("client_gone=true", 1, true) ~= nil end, 1000))
  end)

  it_nginx("a whole request has its deadline: 504 in the API's shape, the upstream cancelled", function()
    local t0 = aiorch.now()
    local s, _, raw, doc = post(n.base("hang") .. "/v1/chat/completions", chat(),
      { ["x-aiorch-providers"] = "openai" })
    local took = aiorch.now() - t0
    assert.equal(504, s, raw)
    assert.equal("timeout", doc.error.type)
    assert.is_true(took >= 390 and took < stretch(2000), took)
    assert.is_true(wait_for(function() return m.requests[1] and m.requests[1].aborted_at ~= nil end, 500))
  end)
end)

describe("hardening inside nginx", function()
  it_nginx("refuses a request without the client key before its body, in the API's shape", function()
    local base = n.base("locked")
    local s, h, raw, doc = post(base .. "/v1/chat/completions", chat())
    assert.equal(401, s)
    assert.equal("invalid_api_key", doc.error.code)
    assert.equal("Bearer", h["www-authenticate"])
    no_keys_in(raw)
    local s2, _, _, doc2 = post(base .. "/v1/messages", msgs(), { ["x-api-key"] = "wrong" })
    assert.equal(401, s2)
    assert.equal("authentication_error", doc2.error.type)
    assert.equal(0, #m.requests)
    assert.equal(200, (post(base .. "/v1/chat/completions", chat(), { authorization = "Bearer " .. CLIENT_KEY })))
    assert.equal(200, (request("GET", base .. "/healthz"))) -- open for probes
  end)

  it_nginx("413 beyond the gateway's max_body (in the caller's shape), nginx's own beyond its limit", function()
    local auth = { authorization = "Bearer " .. CLIENT_KEY }
    local large = chat { messages = { { role = "user", content = string.rep("x", 3000) } } }
    local s, h, _, doc = post(n.base("locked") .. "/v1/chat/completions", large, auth)
    assert.equal(413, s)
    assert.matches("^application/json", h["content-type"])
    assert.matches("at most 2048 bytes", doc.error.message, 1, true)
    local s2, _, _, doc2 = post(n.base("locked") .. "/v1/messages", large, auth)
    assert.equal(413, s2)
    assert.equal("request_too_large", doc2.error.type)
    -- client_max_body_size 1k: nginx answers before the gateway sees it
    local s3, h3 = post(n.base("small") .. "/v1/chat/completions", large)
    assert.equal(413, s3)
    assert.matches("^text/html", h3["content-type"])
    assert.equal(0, #m.requests)
  end)

  it_nginx("max_inflight holds per worker: beyond it, 429 with Retry-After in the API's shape", function()
    -- Two workers with max_inflight = 1 each, six slow requests at once.
    local base = n.base("locked")
    local auth = { authorization = "Bearer " .. CLIENT_KEY }
    local tasks = {}
    for i = 1, 6 do
      tasks[i] = aiorch.spawn(function()
        local s, h, _, doc = post(base .. "/v1/chat/completions", chat(), auth)
        return { s = s, h = h, doc = doc }
      end)
    end
    local ok, limited = 0, 0
    for _, t in ipairs(tasks) do
      local r = t:await()
      if r.s == 200 then
        ok = ok + 1
      else
        assert.equal(429, r.s)
        assert.equal("1", r.h["retry-after"])
        assert.matches("max_inflight", r.doc.error.message .. " max_inflight")
        limited = limited + 1
      end
    end
    assert.is_true(ok >= 1 and ok <= 2 and limited >= 4, fmt("%d answered, %d limited", ok, limited))
  end)

  it_nginx("never logs a key: nginx's error log holds aiorch's lines, none with a key or the prompt", function()
    post(n.base("plain") .. "/v1/chat/completions", chat())
    post(n.base("locked") .. "/v1/chat/completions", chat(), { authorization = "Bearer " .. CLIENT_KEY .. "x" })
    assert.is_true(wait_for(function() return n.log():find("aiorch: access ", 1, true) ~= nil end, 1000))
    local log = n.log() .. n.access()
    no_keys_in(log)
    assert.falsy(log:find(QUESTION, 1, true))
  end)

  it_nginx("holds a stream's upstream back while its client does not read; the workers' memory stays bounded",
    function()
      if SANITIZED then
        return pending("RSS says nothing under the sanitizers or valgrind")
      end
      local function rss_kib()
        local total = 0
        for _, pid in ipairs(nginx.workers(n)) do
          local s = support.slurp("/proc/" .. pid .. "/status")
          total = total + (tonumber(s:match("VmRSS:%s*(%d+)") or "") or 0)
        end
        return total
      end
      local CLIENTS = 6
      local status = aiorch.http.request { method = "POST", url = n.base("huge") .. "/v1/chat/completions",
        headers = { ["content-type"] = "application/json", ["x-aiorch-providers"] = "openai" },
        body = cjson.encode(chat { stream = true }), on_event = function() end, timeout_ms = 60000 }
      assert.equal(200, status)
      local size = big.requests[#big.requests].sent
      assert.is_true(size > 5 * 1024 * 1024, "a short stream: " .. size)
      big:reset()
      local rss0 = rss_kib()
      -- Clients that send a streamed request and never read a byte.
      local body = cjson.encode(chat { stream = true })
      local req = "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        .. "x-aiorch-providers: openai\r\ncontent-length: " .. #body .. "\r\n\r\n" .. body
      local dir = support.tmpdir()
      support.write(dir .. "/request", req)
      local script = dir .. "/idle.py"
      support.write(script, fmt([[
import socket, time
req = open(%q, "rb").read()
socks = []
for i in range(%d):
    s = socket.create_connection(("127.0.0.1", %d))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(req)
    socks.append(s)
time.sleep(3600)
]], dir .. "/request", CLIENTS, n.ports.huge))
      local pid = assert(aiorch.process.spawn { "python3", script })
      local stalled = wait_for(function() return #big.requests == CLIENTS and big:stats().writing == CLIENTS end,
        15000)
      local peak = rss_kib()
      for _ = 1, 10 do
        aiorch.sleep(100)
        peak = math.max(peak, rss_kib())
      end
      local sent, done = {}, 0
      for i, r in ipairs(big.requests) do
        sent[i] = r.sent or 0
        done = done + (r.completed_at and 1 or 0)
      end
      aiorch.process.kill(pid, "KILL")
      aiorch.process.wait(pid)
      assert.is_true(stalled, fmt("the mock's streams did not stall: %d requests, %d writing", #big.requests,
        big:stats().writing))
      assert.equal(0, done)
      for i = 1, CLIENTS do
        assert.is_true(sent[i] < size // 2, fmt("stream %d sent %d of %d bytes", i, sent[i], size))
      end
      assert.is_true(peak - rss0 < 16 * 1024, fmt("the workers grew by %d KiB", peak - rss0))
      -- and the abandoned streams were cancelled upstream
      assert.is_true(wait_for(function()
        for _, r in ipairs(big.requests) do
          if not r.aborted_at then
            return false
          end
        end
        return true
      end, 5000), "an upstream stream went on after its client left")
    end)
end)

describe("nginx in front of the gateway", function()
  it_nginx("serves it over HTTP/2, streams included", function()
    if not os.execute("curl --version 2>/dev/null | grep -q HTTP2") then
      return pending("curl without HTTP/2")
    end
    -- curl runs beside this process, which serves the mock providers meanwhile
    local dir = support.tmpdir()
    local pid = assert(aiorch.process.spawn({ "curl", "-s", "--http2-prior-knowledge", "-o", dir .. "/body",
      "-w", "%{http_version} %{http_code}", "-H", "content-type: application/json",
      "-d", cjson.encode(chat { stream = true }), n.base("h2") .. "/v1/chat/completions" },
      { stdout = dir .. "/status" }))
    assert.equal(0, aiorch.process.wait(pid, stretch(10000)))
    local got = support.slurp(dir .. "/status")
    local out = dir .. "/body"
    assert.equal("2 200", got)
    assert.equal(OPENAI_TEXT, openai_text(support.slurp(out)))
  end)

  it_nginx("serves it over TLS (nginx's) with HTTP/2, streams included", function()
    if not TLS then
      return pending("no openssl to make a certificate")
    end
    local dir = support.tmpdir()
    local pid = assert(aiorch.process.spawn({ "curl", "-s", "--http2", "--cacert", TLS.cert, "-o", dir .. "/body",
      "-w", "%{http_version} %{http_code} %{ssl_verify_result}", "-H", "content-type: application/json",
      "-d", cjson.encode(chat { stream = true }),
      "https://127.0.0.1:" .. n.ports.tls .. "/v1/chat/completions" }, { stdout = dir .. "/status" }))
    assert.equal(0, aiorch.process.wait(pid, stretch(10000)))
    assert.equal("2 200 0", support.slurp(dir .. "/status"))
    assert.equal(OPENAI_TEXT, openai_text(support.slurp(dir .. "/body")))
  end)

  it_nginx("finishes a stream in flight across a reload, and serves from the new workers", function()
    local old = nginx.workers(n)
    local t = aiorch.spawn(post, n.base("slow") .. "/v1/chat/completions", chat { stream = true })
    aiorch.sleep(100)
    assert.truthy(n.reload())
    local s, _, raw = t:await()
    assert.equal(200, s)
    assert.equal(OPENAI_TEXT, openai_text(raw))
    assert.is_true(wait_for(function()
      local now = nginx.workers(n)
      return support.none_in(now, old) and #now == 2
    end, 10000), "the old workers did not go")
    assert.equal(200, (post(n.base("plain") .. "/v1/chat/completions", chat())))
    assert.falsy(n.log():find("open socket", 1, true), "a worker left a socket open")
  end)

  it_nginx("runs a handler of one's own (aiorch_handler) with the same request and response objects", function()
    local base = n.base("custom")
    local s, h, body = request("POST", base .. "/echo?x=1", "hello", { ["x-test"] = "yes" })
    assert.equal(201, s)
    assert.equal("mine", h["x-handler"])
    assert.equal("POST /echo?x=1 yes 5", body)
    local s2, _, body2 = request("GET", base .. "/stream")
    assert.equal(200, s2)
    assert.equal("part 1\npart 2\npart 3\npart 4\npart 5\ndone\n", body2)
  end)
end)

describe("nginx stopping", function()
  it_nginx("quits gracefully with every worker's runtime freed: no alert, no socket left open", function()
    local stop = n.stop
    assert.equal(0, stop("QUIT"))
    local log = n.log()
    n = nil
    for line in log:gmatch("[^\n]+") do
      assert.falsy(line:find("%[alert%]") or line:find("%[crit%]") or line:find("%[emerg%]"), line)
    end
  end)
end)
