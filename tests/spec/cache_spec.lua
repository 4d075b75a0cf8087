-- The response cache (aiorch.gateway.cache) over real loopback sockets:
-- in-process gateways with the mock providers behind them, and two
-- `aiorch serve` processes sharing a real redis-server.
local aiorch = require "aiorch"
local cjson = require "cjson.safe"
local mock_mod = require "aiorch.mock"
local gateway = require "aiorch.gateway.server"
local gconfig = require "aiorch.gateway.config"
local support = require "tests.support"
local redis_server = require "tests.redis_server"

local fmt = string.format

local KEYS = { openai = "sk-cache-spec-openai", anthropic = "sk-ant-cache-spec" }
local CLIENT_A, CLIENT_B = "cache-client-a-1111", "cache-client-b-2222"

local m -- the mock providers
local started = {}

local function env_of(o, a)
  return { OPENAI_API_KEY = KEYS.openai, ANTHROPIC_API_KEY = KEYS.anthropic,
    OPENAI_BASE_URL = m:base_url("openai", o), ANTHROPIC_BASE_URL = m:base_url("anthropic", a),
    CLIENT_A = CLIENT_A, CLIENT_B = CLIENT_B }
end

-- An in-process gateway on raw (a configuration table); o, a: the mock's
-- directives for openai and anthropic.
local function start_gw(raw, o, a, log)
  local env = env_of(o, a)
  local cfg = assert(gconfig.check(raw, function(k) return env[k] end))
  local h = assert(gateway.start { config = cfg, port = 0, access_log = log or false })
  started[#started + 1] = h
  return "http://127.0.0.1:" .. h.port, h
end

local function post(base, path, body, headers, on_event)
  local h = { ["content-type"] = "application/json", ["x-aiorch-strategy"] = "single" }
  for k, v in pairs(headers or {}) do
    h[k] = v
  end
  local status, rh, rb = aiorch.http.request { method = "POST", url = base .. path, headers = h,
    body = type(body) == "table" and assert(cjson.encode(body)) or body, timeout_ms = support.stretch(15000),
    on_event = on_event }
  assert(status, "request failed: " .. tostring(rh) .. " " .. tostring(rb))
  return status, rh, rb
end

local function chat(base, body, headers)
  headers = headers or {}
  headers["x-aiorch-providers"] = headers["x-aiorch-providers"] or "openai"
  return post(base, "/v1/chat/completions", body, headers)
end

local function question(q, extra)
  local b = { model = "gpt-4o-mini", max_tokens = 64, messages = { { role = "user", content = q } } }
  for k, v in pairs(extra or {}) do
    b[k] = v
  end
  return b
end

local function upstream_calls()
  return #m.requests
end

-- A stream's events as the client got them, one record each.
local function stream(base, path, body, headers)
  local events = {}
  local status, h = post(base, path, body, headers, function(ev)
    events[#events + 1] = { event = ev.event, data = ev.data }
    return true
  end)
  return status, h, events
end

-- Equal event by event; the usage, reported as cached on a hit, apart.
local function without_usage(data)
  local doc = cjson.decode(data)
  if type(doc) ~= "table" then
    return data
  end
  doc.usage = nil
  if type(doc.message) == "table" then
    doc.message.usage = nil
  end
  return doc
end

local function same_events(a, b)
  assert.equal(#a, #b)
  for i = 1, #a do
    assert.equal(a[i].event, b[i].event)
    if a[i].data ~= b[i].data then
      assert.same(without_usage(a[i].data), without_usage(b[i].data))
    end
  end
end

local function scrape(base)
  local status, _, body = aiorch.http.request { url = base .. "/metrics", timeout_ms = support.stretch(5000) }
  assert.equal(200, status)
  return body
end

describe("response cache", function()
  setup(function()
    m = assert(mock_mod.start {})
  end)

  teardown(function()
    for _, h in ipairs(started) do
      h:close()
    end
    support.cleanup()
    m:close()
  end)

  before_each(function()
    m:reset()
  end)

  it("misses, then hits with the same answer, usage reported as cached and no upstream call", function()
    local base = start_gw { cache = true }
    local s1, h1, b1 = chat(base, question("What is a monad?"))
    assert.equal(200, s1)
    assert.equal("miss", h1["x-aiorch-cache"])
    local s2, h2, b2 = chat(base, question("What is a monad?"))
    assert.equal(200, s2)
    assert.equal("hit", h2["x-aiorch-cache"])
    assert.equal(1, upstream_calls())
    local d1, d2 = cjson.decode(b1), cjson.decode(b2)
    assert.same(d1.choices, d2.choices)
    assert.equal(d1.id, d2.id)
    assert.equal(d1.usage.prompt_tokens, d2.usage.prompt_tokens_details.cached_tokens)
    assert.equal(h1["x-aiorch-provider"], h2["x-aiorch-provider"])
    assert.are_not.equal(h1["x-request-id"], h2["x-request-id"])
    local text = scrape(base)
    assert.equal(1, support.metric(text, 'aiorch_cache_requests_total{result="hit"}'))
    assert.equal(1, support.metric(text, 'aiorch_cache_requests_total{result="miss"}'))
    assert.equal(1, support.metric(text, "aiorch_cache_stores_total"))
    assert.is_true(support.metric(text, "aiorch_cache_bytes") > 0)
  end)

  it("an Anthropic client's hit reports its input as cache_read_input_tokens", function()
    local base = start_gw { cache = true }
    local body = { model = "claude-3-haiku-20240307", max_tokens = 64,
      messages = { { role = "user", content = "Name a colour." } } }
    local hd = { ["x-aiorch-providers"] = "anthropic", ["anthropic-version"] = "2023-06-01" }
    local _, h1, b1 = post(base, "/v1/messages", body, hd)
    local _, h2, b2 = post(base, "/v1/messages", body, hd)
    assert.equal("miss", h1["x-aiorch-cache"])
    assert.equal("hit", h2["x-aiorch-cache"])
    local u1, u2 = cjson.decode(b1).usage, cjson.decode(b2).usage
    assert.equal(0, u2.input_tokens)
    assert.equal(u1.input_tokens, u2.cache_read_input_tokens)
    assert.equal(u1.output_tokens, u2.output_tokens)
    assert.equal(1, upstream_calls())
  end)

  it("the native endpoint's hit says metadata.cached = true, costs 0 and reports its input as cached", function()
    local base = start_gw { cache = true }
    local body = { user_question = "Native?", strategy = "single", providers = { "openai" } }
    local s1, h1, b1 = post(base, "/v1/orchestrate", body)
    local s2, h2, b2 = post(base, "/v1/orchestrate", body)
    assert.equal(200, s1)
    assert.equal(200, s2)
    assert.equal("miss", h1["x-aiorch-cache"])
    assert.equal("hit", h2["x-aiorch-cache"])
    local r1, r2 = cjson.decode(b1), cjson.decode(b2)
    assert.is_nil(r1.metadata.cached)
    assert.is_true(r1.metadata.cost_usd > 0)
    assert.is_true(r2.metadata.cached)
    assert.equal(0, r2.metadata.cost_usd)
    assert.equal(r1.metadata.usage.input_tokens, r2.metadata.usage.cached_input_tokens)
    assert.equal(r1.response_text, r2.response_text)
    assert.equal(1, upstream_calls())
  end)

  it("serves a Gemini client's hit, plain and streamed (alt=sse)", function()
    local base = start_gw { cache = true }
    local body = { contents = { { role = "user", parts = { { text = "Gemini?" } } } } }
    local hd = { ["x-aiorch-providers"] = "openai" }
    local path = "/v1beta/models/gpt-4o-mini:generateContent"
    local _, h1, b1 = post(base, path, body, hd)
    local _, h2, b2 = post(base, path, body, hd)
    assert.equal("miss", h1["x-aiorch-cache"])
    assert.equal("hit", h2["x-aiorch-cache"])
    local u = cjson.decode(b2).usageMetadata
    assert.equal(u.promptTokenCount, u.cachedContentTokenCount)
    assert.same(cjson.decode(b1).candidates, cjson.decode(b2).candidates)
    local spath = "/v1beta/models/gpt-4o-mini:streamGenerateContent?alt=sse"
    local _, h3, ev3 = stream(base, spath, body, hd)
    local _, h4, ev4 = stream(base, spath, body, hd)
    assert.equal("miss", h3["x-aiorch-cache"])
    assert.equal("hit", h4["x-aiorch-cache"])
    assert.equal(#ev3, #ev4)
    for i = 1, #ev3 do
      local a, b = cjson.decode(ev3[i].data), cjson.decode(ev4[i].data)
      a.usageMetadata, b.usageMetadata = nil, nil
      assert.same(a, b)
    end
    assert.equal(2, upstream_calls())
  end)

  it("keys on every parameter and tool, not on user nor on the client's key", function()
    local base = start_gw { cache = true, clients = { a = { key_env = "CLIENT_A" }, b = { key_env = "CLIENT_B" } } }
    local tool = { type = "function", ["function"] = { name = "get_weather", description = "Weather",
      parameters = { type = "object", properties = { city = { type = "string" } } } } }
    local base_body = question("Hello there", { temperature = 0, tools = { tool } })
    local auth_a = { authorization = "Bearer " .. CLIENT_A }
    local auth_b = { authorization = "Bearer " .. CLIENT_B }
    local function tag(body, auth)
      local st, h = chat(base, body, { authorization = auth.authorization })
      assert.equal(200, st)
      return h["x-aiorch-cache"]
    end
    assert.equal("miss", tag(base_body, auth_a))
    assert.equal("hit", tag(base_body, auth_a))
    -- another client key, another user, tracing headers: the same answer
    assert.equal("hit", tag(base_body, auth_b))
    assert.equal("hit", tag(question("Hello there", { temperature = 0, tools = { tool }, user = "someone-else" }),
      auth_a))
    local st, h = chat(base, base_body, { authorization = auth_a.authorization,
      traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" })
    assert.equal(200, st)
    assert.equal("hit", h["x-aiorch-cache"])
    -- a parameter, a tool, the model's words, the strategy's providers: another answer
    assert.equal("miss", tag(question("Hello there", { temperature = 0.5, tools = { tool } }), auth_a))
    assert.equal("miss", tag(question("Hello there", { temperature = 0, seed = 7, tools = { tool } }), auth_a))
    local tool2 = cjson.decode(cjson.encode(tool))
    tool2["function"].parameters.properties.unit = { type = "string" }
    assert.equal("miss", tag(question("Hello there", { temperature = 0, tools = { tool2 } }), auth_a))
    assert.equal("miss", tag(question("Hello there!", { temperature = 0, tools = { tool } }), auth_a))
    st, h = chat(base, base_body, { authorization = auth_a.authorization, ["x-aiorch-allow-drop"] = "seed" })
    assert.equal(200, st)
    assert.equal("miss", h["x-aiorch-cache"])
    st, h = chat(base, base_body, { authorization = auth_a.authorization, ["x-aiorch-providers"] = "anthropic" })
    assert.equal(200, st)
    assert.equal("miss", h["x-aiorch-cache"])
    assert.equal("anthropic", h["x-aiorch-provider"])
    -- seeds that differ past the 15th digit are other requests
    local function seeded(seed)
      local _, sh = chat(base, '{"model":"gpt-4o-mini","max_tokens":64,"seed":' .. seed
        .. ',"messages":[{"role":"user","content":"Seeded"}]}', { authorization = auth_a.authorization })
      return sh["x-aiorch-cache"]
    end
    assert.equal("miss", seeded("12345678901234567"))
    assert.equal("miss", seeded("12345678901234568"))
    assert.equal("hit", seeded("12345678901234567"))
    assert.equal(9, upstream_calls())
  end)

  it("per client key: namespace = \"client\" keeps the clients' entries apart, and a key can turn it off",
    function()
      local base = start_gw { cache = { namespace = "client" },
        clients = { a = { key_env = "CLIENT_A" }, b = { key_env = "CLIENT_B", cache = false } } }
      local body = question("Namespaces?")
      local _, h1 = chat(base, body, { authorization = "Bearer " .. CLIENT_A })
      local _, h2 = chat(base, body, { authorization = "Bearer " .. CLIENT_A })
      local _, h3 = chat(base, body, { authorization = "Bearer " .. CLIENT_B })
      assert.equal("miss", h1["x-aiorch-cache"])
      assert.equal("hit", h2["x-aiorch-cache"])
      assert.equal("bypass", h3["x-aiorch-cache"])
      assert.equal(2, upstream_calls())
    end)

  it("per route: an alias, or the list of endpoints, turns it on or off", function()
    local base = start_gw { cache = { enabled = false, routes = { "/v1/chat/completions" } },
      aliases = { cached = { providers = { "openai" }, cache = true }, plain = { providers = { "openai" } } } }
    local function tag(model, path)
      local body = question("Per route?", { model = model })
      local st, h = post(base, path or "/v1/chat/completions", body, { ["anthropic-version"] = path and "2023-06-01" })
      assert.equal(200, st)
      return h["x-aiorch-cache"]
    end
    assert.equal("bypass", tag("plain"))
    assert.equal("miss", tag("cached"))
    assert.equal("hit", tag("cached"))
    assert.equal("bypass", tag("cached", "/v1/messages")) -- not a listed endpoint
    local base2 = start_gw { cache = true, aliases = { live = { providers = { "openai" }, cache = false } } }
    local _, h = chat(base2, question("Live?", { model = "live" }))
    assert.equal("bypass", h["x-aiorch-cache"])
    _, h = chat(base2, question("Live?", { model = "live" }))
    assert.equal("bypass", h["x-aiorch-cache"])
    assert.equal(5, upstream_calls())
  end)

  it("deterministic_only caches temperature 0 or a seed, and bypasses the rest", function()
    local base = start_gw { cache = { deterministic_only = true } }
    local function tag(extra)
      local _, h = chat(base, question("Deterministic?", extra))
      return h["x-aiorch-cache"]
    end
    assert.equal("bypass", tag({ temperature = 0.7 }))
    assert.equal("bypass", tag({ temperature = 0.7 }))
    assert.equal("miss", tag({ temperature = 0 }))
    assert.equal("hit", tag({ temperature = 0 }))
    assert.equal("miss", tag({ temperature = 0.7, seed = 1 }))
    assert.equal("hit", tag({ temperature = 0.7, seed = 1 }))
  end)

  it("Cache-Control: no-cache skips the lookup (and refreshes), no-store keeps nothing", function()
    local base = start_gw { cache = true }
    local body = question("Controls?")
    local _, h = chat(base, body, { ["cache-control"] = "no-store" })
    assert.equal("miss", h["x-aiorch-cache"])
    _, h = chat(base, body)
    assert.equal("miss", h["x-aiorch-cache"]) -- nothing was stored
    _, h = chat(base, body, { ["cache-control"] = "no-cache" })
    assert.equal("bypass", h["x-aiorch-cache"])
    _, h = chat(base, body, { ["cache-control"] = "no-store" })
    assert.equal("hit", h["x-aiorch-cache"]) -- no-store alone still looks up
    _, h = chat(base, body, { ["cache-control"] = "no-cache, no-store" })
    assert.equal("bypass", h["x-aiorch-cache"])
    assert.equal(4, upstream_calls())
  end)

  it("expires entries after their TTL: the configuration's, or X-Aiorch-Cache-TTL's", function()
    local base = start_gw { cache = { ttl_ms = 300 } }
    local body = question("TTL?")
    local _, h = chat(base, body)
    assert.equal("miss", h["x-aiorch-cache"])
    _, h = chat(base, body)
    assert.equal("hit", h["x-aiorch-cache"])
    aiorch.sleep(450)
    _, h = chat(base, body)
    assert.equal("miss", h["x-aiorch-cache"])
    -- a longer TTL asked by the request
    local body2 = question("TTL header?")
    _, h = chat(base, body2, { ["x-aiorch-cache-ttl"] = "60" })
    assert.equal("miss", h["x-aiorch-cache"])
    aiorch.sleep(450)
    _, h = chat(base, body2)
    assert.equal("hit", h["x-aiorch-cache"])
    local st, _, rb = chat(base, body2, { ["x-aiorch-cache-ttl"] = "soon" })
    assert.equal(400, st)
    assert.matches("X%-Aiorch%-Cache%-TTL", rb)
  end)

  it("does not store an answer larger than max_entry_bytes; the access log says which answers were hits",
    function()
      local lines = {}
      local base = start_gw({ cache = { max_entry_bytes = 200 } }, nil, nil, function(l) lines[#lines + 1] = l end)
      local _, h1 = chat(base, question("A long answer, please"))
      local _, h2 = chat(base, question("A long answer, please"))
      assert.equal("miss", h1["x-aiorch-cache"])
      assert.equal("miss", h2["x-aiorch-cache"])
      local base2 = start_gw({ cache = true }, nil, nil, function(l) lines[#lines + 1] = l end)
      chat(base2, question("Logged?"))
      chat(base2, question("Logged?"))
      aiorch.sleep(100)
      assert.matches("attempts=openai:success", lines[#lines - 1])
      assert.matches("status=200 strategy=single provider=openai attempts=cache:hit .* tokens_in=0 tokens_out=0",
        lines[#lines])
      assert.equal(3, upstream_calls())
    end)

  it("evicts the least recently used entries to stay within max_bytes, and counts them", function()
    local base = start_gw { cache = { max_bytes = 6000 } }
    local function tag(q)
      local _, h = chat(base, question(q))
      return h["x-aiorch-cache"]
    end
    for i = 1, 12 do
      assert.equal("miss", tag("question number " .. i))
    end
    local text = scrape(base)
    local evictions = support.metric(text, "aiorch_cache_evictions_total")
    assert.is_true(evictions > 0, "no eviction")
    assert.is_true(support.metric(text, "aiorch_cache_bytes") <= 6000)
    assert.equal("hit", tag("question number 12")) -- the most recent stays
    assert.equal("miss", tag("question number 1")) -- the oldest went
  end)

  it("replays an OpenAI tool-call stream event by event, as the original went", function()
    local base = start_gw({ cache = true }, { chunks = 4 })
    local tool = { type = "function", ["function"] = { name = "get_weather", description = "Weather",
      parameters = { type = "object", properties = { city = { type = "string" } }, required = { "city" } } } }
    local body = question("What is the weather in Paris?", { stream = true, tools = { tool }, tool_choice = "required",
      stream_options = { include_usage = true } })
    local hd = { ["x-aiorch-providers"] = "openai" }
    local s1, h1, ev1 = stream(base, "/v1/chat/completions", body, hd)
    local s2, h2, ev2 = stream(base, "/v1/chat/completions", body, hd)
    assert.equal(200, s1)
    assert.equal(200, s2)
    assert.equal("miss", h1["x-aiorch-cache"])
    assert.equal("hit", h2["x-aiorch-cache"])
    assert.matches("^text/event%-stream", h2["content-type"])
    assert.equal(1, upstream_calls())
    assert.is_true(#ev1 >= 5, "a stream of " .. #ev1 .. " events")
    same_events(ev1, ev2)
    local deltas = 0
    for _, ev in ipairs(ev2) do
      if ev.data:find('"tool_calls"', 1, true) then
        deltas = deltas + 1
      end
    end
    assert.is_true(deltas >= 3, "tool-call deltas: " .. deltas)
    local last_usage = cjson.decode(ev2[#ev2 - 1].data).usage
    assert.equal(last_usage.prompt_tokens, last_usage.prompt_tokens_details.cached_tokens)
  end)

  it("replays an Anthropic thinking stream event by event, and a translated one too", function()
    local base = start_gw({ cache = true }, nil, { chunks = 4 })
    local body = { model = "claude-3-7-sonnet-20250219", max_tokens = 2048, stream = true,
      thinking = { type = "enabled", budget_tokens = 1024 },
      messages = { { role = "user", content = "Think about it." } } }
    local hd = { ["x-aiorch-providers"] = "anthropic", ["anthropic-version"] = "2023-06-01" }
    local _, h1, ev1 = stream(base, "/v1/messages", body, hd)
    local _, h2, ev2 = stream(base, "/v1/messages", body, hd)
    assert.equal("miss", h1["x-aiorch-cache"])
    assert.equal("hit", h2["x-aiorch-cache"])
    same_events(ev1, ev2)
    local thinking = 0
    for _, ev in ipairs(ev2) do
      if ev.data:find('"thinking_delta"', 1, true) then
        thinking = thinking + 1
      end
    end
    assert.is_true(thinking >= 2, "thinking deltas: " .. thinking)
    -- an Anthropic client answered by OpenAI: the translated stream
    local body2 = { model = "gpt-4o-mini", max_tokens = 64, stream = true,
      messages = { { role = "user", content = "Translate me." } } }
    local hd2 = { ["x-aiorch-providers"] = "openai", ["anthropic-version"] = "2023-06-01" }
    local _, h3, ev3 = stream(base, "/v1/messages", body2, hd2)
    local _, h4, ev4 = stream(base, "/v1/messages", body2, hd2)
    assert.equal("miss", h3["x-aiorch-cache"])
    assert.equal("hit", h4["x-aiorch-cache"])
    same_events(ev3, ev4)
    assert.equal(2, upstream_calls())
  end)

  it("never stores a stream that broke", function()
    local base = start_gw({ cache = true }, { fault = "cut", chunks = 4 })
    local body = question("Cut me", { stream = true })
    local _, h1, ev1 = stream(base, "/v1/chat/completions", body)
    assert.equal("miss", h1["x-aiorch-cache"])
    local broke = false
    for _, ev in ipairs(ev1) do
      broke = broke or ev.data:find('"error"', 1, true) ~= nil
    end
    assert.is_true(broke, "the stream did not end with an error")
    local _, h2 = stream(base, "/v1/chat/completions", body)
    assert.equal("miss", h2["x-aiorch-cache"])
    assert.equal(2, upstream_calls())
    assert.equal(0, support.metric(scrape(base), "aiorch_cache_stores_total"))
  end)

  it("single-flight: N identical requests at once make one upstream call, and all get the answer", function()
    local base = start_gw({ cache = true }, { latency_ms = 300 })
    local N = 6
    local function burst(body)
      local tasks = {}
      for i = 1, N do
        tasks[i] = aiorch.spawn(function()
          if body.stream then
            local st, h, evs = stream(base, "/v1/chat/completions", body, { ["x-aiorch-providers"] = "openai" })
            return { st, h["x-aiorch-cache"], #evs }
          end
          local st, h, b = chat(base, body)
          return { st, h["x-aiorch-cache"], cjson.decode(b).choices[1].message.content }
        end)
      end
      local values, errs, msgs = aiorch.gather(tasks)
      for i = 1, N do
        assert(not errs[i], msgs[i])
      end
      return values
    end
    local values = burst(question("All at once"))
    assert.equal(1, upstream_calls())
    local misses = 0
    for _, v in ipairs(values) do
      assert.equal(200, v[1])
      assert.equal(values[1][3], v[3])
      misses = misses + (v[2] == "miss" and 1 or 0)
    end
    assert.equal(1, misses)
    m:reset()
    values = burst(question("Streams at once", { stream = true }))
    assert.equal(1, upstream_calls())
    for _, v in ipairs(values) do
      assert.equal(200, v[1])
      assert.equal(values[1][3], v[3])
    end
    assert.is_true(support.metric(scrape(base), 'aiorch_cache_hits_total{tier="flight"}') >= 2 * (N - 1))
  end)

  it("single-flight streams: the waiting requests get the first stream's events as they come", function()
    local base = start_gw({ cache = true }, { chunks = 5, chunk_delay_ms = 200 })
    local body = question("Stream slowly", { stream = true })
    local N = 4
    local t0 = aiorch.now()
    local tasks = {}
    for i = 1, N do
      tasks[i] = aiorch.spawn(function()
        local first, events = nil, {}
        local st, h = post(base, "/v1/chat/completions", body, { ["x-aiorch-providers"] = "openai" }, function(ev)
          first = first or aiorch.now() - t0
          events[#events + 1] = { event = ev.event, data = ev.data }
          return true
        end)
        return { st, h["x-aiorch-cache"], first, aiorch.now() - t0, events }
      end)
    end
    local values, errs, msgs = aiorch.gather(tasks)
    for i = 1, N do
      assert(not errs[i], msgs[i])
    end
    assert.equal(1, upstream_calls())
    local leader
    for _, v in ipairs(values) do
      assert.equal(200, v[1])
      if v[2] == "miss" then
        leader = v
      end
    end
    assert.truthy(leader)
    for _, v in ipairs(values) do
      if v ~= leader then
        assert.equal("hit", v[2])
        same_events(leader[5], v[5])
        -- the first content came long before the leader's stream ended (5 pieces 200 ms apart)
        assert.is_true(v[3] < leader[4] - 300, fmt("first event at %.0f ms, the leader ended at %.0f ms", v[3],
          leader[4]))
      end
    end
  end)

  it("a hit reserves and charges no budget: a spent budget refuses misses, not hits", function()
    local base = start_gw { cache = true, clients = { a = { key_env = "CLIENT_A" } },
      budgets = { { client = "a", tokens = 5, window = "hour" } } }
    local auth = { authorization = "Bearer " .. CLIENT_A }
    local st, h = chat(base, question("Budgeted?"), auth)
    assert.equal(200, st)
    assert.equal("miss", h["x-aiorch-cache"])
    aiorch.sleep(100) -- (a request's spending is settled once it ended): the budget is spent
    for _ = 1, 3 do
      st, h = chat(base, question("Budgeted?"), { authorization = auth.authorization })
      assert.equal(200, st)
      assert.equal("hit", h["x-aiorch-cache"])
    end
    local rb
    st, h, rb = chat(base, question("Budgeted, but new?"), { authorization = auth.authorization })
    assert.equal(429, st)
    assert.equal("budget_exceeded", cjson.decode(rb).error.code)
    assert.equal("miss", h["x-aiorch-cache"])
    assert.equal(1, upstream_calls())
  end)

  it("rewrites the usage where it stands, every other byte kept", function()
    local cached_body = require("aiorch.gateway.cache").cached_body
    local openai = '{"id":"x","choices":[{"message":{"content":"a \\"usage\\": {}","annotations":[]}}],'
      .. '"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10},"service_tier":"default"}'
    local out = cached_body(openai)
    assert.equal(openai:match('^(.-)"usage"'), out:match('^(.-)"usage"'))
    assert.equal(',"service_tier":"default"}', out:sub(-26))
    local u = cjson.decode(out).usage
    assert.equal(7, u.prompt_tokens_details.cached_tokens)
    assert.equal(10, u.total_tokens)
    local start = '{"type":"message_start","message":{"id":"m","content":[],"usage":{"input_tokens":9,'
      .. '"cache_read_input_tokens":2,"output_tokens":1}}}'
    u = cjson.decode(cached_body(start)).message.usage
    assert.same({ input_tokens = 0, cache_read_input_tokens = 11, output_tokens = 1 }, u)
    local native = '[{"ia_provider_name":"openai","content":[],"metadata":{"cost_usd":0.5,"attempts":'
      .. '[{"provider":"openai","cost_usd":0.5}],"usage":{"input_tokens":4,"output_tokens":2}}},'
      .. '{"ia_provider_name":"anthropic","metadata":{}}]'
    local list = cjson.decode(cached_body(native))
    assert.is_true(list[1].metadata.cached)
    assert.equal(0, list[1].metadata.cost_usd)
    assert.equal(0.5, list[1].metadata.attempts[1].cost_usd)
    assert.equal(4, list[1].metadata.usage.cached_input_tokens)
    assert.is_true(list[2].metadata.cached)
    assert.equal("not json {", cached_body("not json {"))
  end)

  it("checks its configuration", function()
    local env = env_of()
    local function refused(cache)
      local cfg, err = gconfig.check({ cache = cache }, function(k) return env[k] end)
      assert.is_nil(cfg)
      return err
    end
    assert.matches("cache: unknown field 'size'", refused({ size = 1 }))
    assert.matches("cache.max_bytes", refused({ max_bytes = -1 }))
    assert.matches("cache.ttl_ms", refused({ ttl_ms = 10, max_ttl_ms = 5 }))
    assert.matches("cache.routes%[1%]", refused({ routes = { "/v1/models" } }))
    assert.matches("cache.namespace", refused({ namespace = "user" }))
  end)
end)

describe("response cache on redis", function()
  local rs

  setup(function()
    m = assert(mock_mod.start {})
    rs = redis_server.start()
  end)

  teardown(function()
    support.cleanup()
    if rs then
      rs.stop()
    end
    m:close()
  end)

  before_each(function()
    m:reset()
  end)

  local function env()
    return { OPENAI_API_KEY = KEYS.openai, OPENAI_BASE_URL = m:base_url("openai"), AIORCH_LOG = "warn" }
  end

  it("with workers: each keeps its own memory tier, /metrics counts them all", function()
    local s = support.serve("return { access_log = false, cache = true }", env(), { workers = 2 })
    local N = 12
    for _ = 1, N do
      local st = chat(s.base, question("Workers?"))
      assert.equal(200, st)
    end
    -- at most one miss per worker: the memory tier is per worker (docs/replicas.md)
    local calls = upstream_calls()
    assert.is_true(calls >= 1 and calls <= 2, calls .. " upstream calls")
    aiorch.sleep(300) -- the workers push their counts every 100 ms
    local text = scrape(s.base)
    local hits = support.metric(text, 'aiorch_cache_requests_total{result="hit"}')
    local misses = support.metric(text, 'aiorch_cache_requests_total{result="miss"}')
    assert.equal(N, hits + misses)
    assert.equal(calls, misses)
    assert.equal(calls, support.metric(text, "aiorch_cache_entries"))
    s.stop()
  end)

  it("is shared by two aiorch serve processes, streams included; Redis killed, requests still succeed",
    function()
      local config = fmt('return { access_log = false, cache = true, redis = { url = %q, prefix = "cachespec:" } }',
        rs.url)
      local a = support.serve(config, env())
      local b = support.serve(config, env())
      local body = question("Shared?")
      local _, h1, b1 = chat(a.base, body)
      aiorch.sleep(100) -- the entry goes to Redis right after the answer
      local _, h2, b2 = chat(b.base, body)
      assert.equal("miss", h1["x-aiorch-cache"])
      assert.equal("hit", h2["x-aiorch-cache"], support.slurp(b.err))
      assert.same(cjson.decode(b1).choices, cjson.decode(b2).choices)
      assert.equal(1, upstream_calls())
      assert.equal(1, support.metric(scrape(b.base), 'aiorch_cache_hits_total{tier="redis"}'))
      local sbody = question("Shared stream?", { stream = true })
      local _, sh1, ev1 = stream(a.base, "/v1/chat/completions", sbody, { ["x-aiorch-providers"] = "openai" })
      aiorch.sleep(100)
      local _, sh2, ev2 = stream(b.base, "/v1/chat/completions", sbody, { ["x-aiorch-providers"] = "openai" })
      assert.equal("miss", sh1["x-aiorch-cache"])
      assert.equal("hit", sh2["x-aiorch-cache"])
      same_events(ev1, ev2)
      assert.equal(2, upstream_calls())

      rs.kill()
      for i = 1, 10 do
        local st, h = chat(i % 2 == 0 and a.base or b.base, question("After redis went " .. i))
        assert.equal(200, st)
        assert.equal("miss", h["x-aiorch-cache"])
      end
      -- the memory tier goes on
      local st, h = chat(a.base, question("After redis went 2"))
      assert.equal(200, st)
      assert.equal("hit", h["x-aiorch-cache"])
      assert.equal(12, upstream_calls())
      assert.is_true(support.metric(scrape(a.base), "aiorch_cache_redis_errors_total") >= 1)
      a.stop()
      b.stop()
    end)
end)
