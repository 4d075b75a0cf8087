-- metadata.cost_usd against hand-computed figures, for each provider, over
-- real sockets: the mocks report usage in each API's wire format (JSON and
-- streams), cached reads, cache writes and reasoning where the API has
-- them; failed attempts and cancelled race losers are charged too.
-- Runs inside the runtime.
local aiorch = require "aiorch"
local mock_mod = require "aiorch.mock"
local orchestrate = require "aiorch.orchestrate"
local metrics = require "aiorch.metrics"
local breaker = require "aiorch.breaker"
local response = require "aiorch.response"
local compat = require "aiorch.compat"
local cjson = require "cjson.safe"

local KEYS = { openai = "sk-test-cost-openai-0001", anthropic = "sk-ant-test-cost-0002", gemini = "gm-cost-0003",
  cohere = "co-cost-0004", deepseek = "ds-cost-0005" }
local SLOWDOWN = tonumber(os.getenv("AIORCH_TEST_SLOWDOWN") or "") or 1
local function stretch(ms)
  return math.ceil(ms * SLOWDOWN)
end

local m

local function env(dirs)
  dirs = dirs or {}
  local ds = compat.PRESETS.deepseek
  return {
    OPENAI_API_KEY = KEYS.openai, OPENAI_BASE_URL = m:base_url("openai", dirs.openai),
    ANTHROPIC_API_KEY = KEYS.anthropic, ANTHROPIC_BASE_URL = m:base_url("anthropic", dirs.anthropic),
    GEMINI_API_KEY = KEYS.gemini, GEMINI_BASE_URL = m:base_url("gemini", dirs.gemini),
    CO_API_KEY = KEYS.cohere, CO_API_URL = m:base_url("cohere", dirs.cohere),
    [ds.key_env] = KEYS.deepseek, [ds.base_url_env or "DEEPSEEK_BASE_URL"] = m:base_url("deepseek", dirs.deepseek),
  }
end

local function ask(provider, request, opts)
  opts = opts or {}
  opts.env = opts.env or env(opts.dirs)
  local r, kind, err = orchestrate.orchestrate(request, opts.strategy or "single",
    type(provider) == "table" and provider or { provider }, opts)
  assert(r, tostring(kind) .. ": " .. tostring(err))
  return r
end

local function near(expected, got, what)
  assert.is_number(got, what)
  assert.is_true(math.abs(expected - got) <= 1e-12 + 1e-9 * expected,
    ("%s: expected %.12g, got %.12g"):format(what or "cost", expected, got))
end

-- Hand-computed: USD per 1M tokens, fresh input, cached read, cache write,
-- output other than reasoning, reasoning.
local function usd(p, u)
  local i, o = u.input_tokens or 0, u.output_tokens or 0
  local cr, cw, r = u.cached_input_tokens or 0, u.cache_write_tokens or 0, u.reasoning_tokens or 0
  return ((i - cr - cw) * p.input + cr * (p.cached_read or p.input) + cw * (p.cache_write or p.input)
    + (o - r) * p.output + r * (p.reasoning or p.output)) / 1e6
end

-- The prices of the models the mocks answer with, copied by hand from
-- the providers' pages (scripts/aiorch/prices.lua must agree).
local GPT_4O_MINI = { input = 0.15, output = 0.60, cached_read = 0.075 }
local CLAUDE_3_HAIKU = { input = 0.25, output = 1.25, cached_read = 0.03, cache_write = 0.30 }
local GEMINI_25_FLASH = { input = 0.30, output = 2.50, cached_read = 0.03 }
local COMMAND_A = { input = 2.50, output = 10.00 }
local DEEPSEEK_CHAT = { input = 0.28, output = 0.42, cached_read = 0.028 }

local LONG = ("lorem "):rep(1300) -- over the mocks' 1024-token minimum for a cached prefix

local function words(n)
  local t = {}
  for i = 1, n do
    t[i] = "w" .. i
  end
  return table.concat(t, " ")
end

setup(function()
  m = assert(mock_mod.start { host = "127.0.0.1", port = 0 })
end)

teardown(function()
  m:close()
end)

before_each(function()
  m:reset()
  metrics.reset()
  breaker.reset()
end)

describe("cost_usd per provider", function()
  for _, stream in ipairs({ false, true }) do
    local how = stream and " (streamed)" or ""
    local opts = function()
      return stream and { stream = true, on_token = function() end } or {}
    end

    it("openai: input, cached input and reasoning tokens" .. how, function()
      local req = { messages = { { role = "user", content = LONG .. " question" } }, reasoning = { effort = "low" } }
      ask("openai", req, opts()) -- the prefix is now in the mock's cache
      local r = ask("openai", req, opts())
      assert.equal("success", r.status)
      local u = r.metadata.usage
      assert.equal("gpt-4o-mini", r.metadata.model)
      assert.is_true(u.cached_input_tokens >= 1024, "cached tokens reported")
      assert.is_true(u.reasoning_tokens > 0, "reasoning tokens reported")
      near(usd(GPT_4O_MINI, u), r.metadata.cost_usd)
      -- and by hand from the counts: none of them is zero
      near(((u.input_tokens - u.cached_input_tokens) * 0.15 + u.cached_input_tokens * 0.075
        + u.output_tokens * 0.60) / 1e6, r.metadata.cost_usd)
      assert.is_nil(r.metadata.cost_estimated)
    end)

    it("anthropic: cache writes, then cache reads" .. how, function()
      local function req()
        return { max_tokens = 100, messages = { { role = "user", content = {
          { type = "text", text = words(50), cache_control = { type = "ephemeral" } },
          { type = "text", text = "and the question" } } } } }
      end
      local r1 = ask("anthropic", req(), opts())
      local u1 = r1.metadata.usage
      assert.equal("claude-3-haiku-20240307", r1.metadata.model)
      assert.is_true(u1.cache_write_tokens >= 50, "cache write reported")
      near(usd(CLAUDE_3_HAIKU, u1), r1.metadata.cost_usd)
      local r2 = ask("anthropic", req(), opts())
      local u2 = r2.metadata.usage
      assert.is_true(u2.cached_input_tokens >= 50, "cache read reported")
      near(usd(CLAUDE_3_HAIKU, u2), r2.metadata.cost_usd)
      near(((u2.input_tokens - u2.cached_input_tokens - (u2.cache_write_tokens or 0)) * 0.25
        + u2.cached_input_tokens * 0.03 + (u2.cache_write_tokens or 0) * 0.30 + u2.output_tokens * 1.25) / 1e6,
        r2.metadata.cost_usd)
      assert.is_true(r2.metadata.cost_usd < r1.metadata.cost_usd, "a read costs less than a write")
    end)

    it("gemini: cached content and thoughts" .. how, function()
      local req = { messages = { { role = "user", content = LONG .. " question" } },
        reasoning = { budget_tokens = 1024 } }
      ask("gemini", req, opts())
      local r = ask("gemini", req, opts())
      assert.equal("success", r.status)
      local u = r.metadata.usage
      assert.equal("gemini-2.5-flash", r.metadata.model)
      assert.is_true((u.cached_input_tokens or 0) >= 1024, "cached content reported")
      assert.is_true((u.reasoning_tokens or 0) > 0, "thoughts reported")
      near(usd(GEMINI_25_FLASH, u), r.metadata.cost_usd)
    end)

    it("cohere: billed input and output" .. how, function()
      local r = ask("cohere", { user_question = words(20), max_tokens = 50 }, opts())
      assert.equal("success", r.status)
      local u = r.metadata.usage
      assert.equal("command-a-03-2025", r.metadata.model)
      assert.is_true(u.input_tokens > 20 and u.output_tokens > 0)
      near((u.input_tokens * 2.50 + u.output_tokens * 10.00) / 1e6, r.metadata.cost_usd)
      near(usd(COMMAND_A, u), r.metadata.cost_usd)
    end)

    it("an OpenAI-compatible preset (deepseek): cache hits" .. how, function()
      local req = { messages = { { role = "user", content = LONG .. " question" } } }
      ask("deepseek", req, opts())
      local r = ask("deepseek", req, opts())
      assert.equal("success", r.status)
      local u = r.metadata.usage
      assert.equal("deepseek-chat", r.metadata.model)
      assert.is_true((u.cached_input_tokens or 0) >= 1024, "cache hits reported")
      near(usd(DEEPSEEK_CHAT, u), r.metadata.cost_usd)
    end)
  end

  it("a model without a price: cost_usd is null, never 0, and one warning for it", function()
    local r = ask("openai", { user_question = "q", model = nil }, { env = (function()
      local e = env()
      e.OPENAI_MODEL = "gpt-unpriced-test"
      return e
    end)() })
    assert.equal("success", r.status)
    assert.is_nil(r.metadata.cost_usd)
    local doc = cjson.decode(response.encode(r))
    assert.equal(cjson.null, doc.metadata.cost_usd)
  end)
end)

describe("the cost of failed attempts and race losers", function()
  it("a stream cut after its first tokens is charged what it reported", function()
    local r = ask("anthropic", { user_question = "q" },
      { stream = true, on_token = function() end, dirs = { anthropic = { fault = "cut", chunks = 6 } } })
    assert.equal("stream_cut", r.metadata.error_kind)
    local u = r.metadata.usage
    assert.is_true(u.input_tokens > 0)
    near(usd(CLAUDE_3_HAIKU, u), r.metadata.cost_usd)
  end)

  it("retries: an attempt that reported nothing adds nothing", function()
    local r = ask("openai", { user_question = "q" }, { policy = { max_attempts = 2, backoff_ms = 1 },
      dirs = { openai = { fault = "500", fail_first = 1 } } })
    assert.equal("success", r.status)
    assert.equal(2, #r.metadata.attempts)
    near(usd(GPT_4O_MINI, r.metadata.usage), r.metadata.cost_usd)
  end)

  it("a stream cut and continued elsewhere: the answer's cost is both attempts'", function()
    local r = ask({ "anthropic", "openai" }, { user_question = "q" }, { strategy = "fallback",
      policy = { continue_on_cut = true }, stream = true, on_token = function() end,
      dirs = { anthropic = { fault = "cut", chunks = 6 } } })
    assert.equal("success", r.status)
    assert.equal("anthropic", r.metadata.continued_from)
    local cut
    for _, e in ipairs(metrics.spending()) do
      if e.provider == "anthropic" then
        cut = e
      end
    end
    -- anthropic's reported tokens, by kind, at claude-3-haiku's prices
    local cut_usd = (cut.input * 0.25 + cut.output * 1.25) / 1e6
    assert.is_true(cut.input > 0)
    near(cut_usd, cut.cost_usd, "the cut attempt")
    assert.is_number(r.metadata.attempts[1].cost_usd)
    near(cut_usd, r.metadata.attempts[1].cost_usd, "its attempt")
    near(cut_usd + usd(GPT_4O_MINI, r.metadata.usage), r.metadata.cost_usd, "total")
  end)

  it("fastest: a loser cancelled mid-stream is charged the usage its stream had reported", function()
      -- anthropic's message_start reports the input; its text comes late and loses
      local r = ask({ "openai", "anthropic" }, { user_question = words(30) }, {
        strategy = "fastest", stream = true, on_token = function() end,
        dirs = { openai = { latency_ms = stretch(20) }, anthropic = { chunk_delay_ms = stretch(300) } } })
      assert.equal("openai", r.ia_provider_name)
      local loser
      for _, a in ipairs(r.metadata.attempts) do
        if a.provider == "anthropic" then
          loser = a
        end
      end
      assert.equal("cancelled", loser.status)
      assert.falsy(loser.cost_estimated)
      local lu = loser.usage
      assert.is_true(lu.input_tokens > 30, "input from message_start")
      near(usd(CLAUDE_3_HAIKU, lu), loser.cost_usd, "loser")
      assert.is_true(loser.cost_usd > 0)
      -- the answer's cost is the winner's and the loser's
      local own = usd(GPT_4O_MINI, r.metadata.usage)
      near(own + loser.cost_usd, r.metadata.cost_usd, "total")
      assert.falsy(r.metadata.cost_estimated)
      -- and the metrics count the loser's spending
      local spent = 0
      for _, e in ipairs(metrics.spending()) do
        if e.provider == "anthropic" then
          spent = spent + e.cost_usd
        end
      end
      near(loser.cost_usd, spent, "anthropic's spending")
    end)

  it("fastest: a loser whose stream reported no usage yet is estimated (cost_estimated)", function()
    local r = ask({ "anthropic", "openai" }, { user_question = words(40) }, {
      strategy = "fastest", stream = true, on_token = function() end,
      dirs = { anthropic = { latency_ms = stretch(20) }, openai = { chunk_delay_ms = stretch(300) } } })
    assert.equal("anthropic", r.ia_provider_name)
    local loser
    for _, a in ipairs(r.metadata.attempts) do
      if a.provider == "openai" then
        loser = a
      end
    end
    assert.equal("cancelled", loser.status)
    assert.is_true(loser.cost_estimated)
    -- input: the request's characters / 4 (the system prompt included); output: the streamed text's
    assert.is_true(loser.usage.input_tokens > 40 * 2 / 4)
    near(usd(GPT_4O_MINI, loser.usage), loser.cost_usd, "loser")
    assert.is_true(loser.cost_usd > 0)
    near(usd(CLAUDE_3_HAIKU, r.metadata.usage) + loser.cost_usd, r.metadata.cost_usd, "total")
    assert.is_true(r.metadata.cost_estimated)
  end)
end)

describe("the strategy context", function()
  it("ctx.price, ctx.estimate and ctx.budget", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir .. "/strategies"))
    finally(function() os.execute("rm -rf " .. dir) end)
    local f = assert(io.open(dir .. "/strategies/peek.lua", "w"))
    f:write([[
return function(request, providers, ctx)
  local r = ctx.call(providers[1])
  r.metadata.peek = { price = ctx.price("claude-3-5-haiku-20241022"), none = ctx.price("no-such-model"),
    estimate = ctx.estimate("gpt-4o-mini", request), budget = ctx.budget() }
  return r
end
]])
    f:close()
    local r = ask("openai", { messages = { { role = "user", content = ("x"):rep(400) } }, max_tokens = 50 },
      { strategy = "peek", path = { dir } })
    local peek = r.metadata.peek
    assert.same({ input = 0.80, output = 4.00, cached_read = 0.08, cache_write = 1.00, reasoning = 4.00,
      source = "https://docs.anthropic.com/en/docs/about-claude/pricing", date = peek.price.date }, peek.price)
    assert.is_nil(peek.none)
    near((100 * 0.15 + 50 * 0.60) / 1e6, peek.estimate, "estimate")
    assert.is_nil(peek.budget) -- no budget outside the gateway
    -- the gateway's reader, when there is one
    r = ask("openai", { user_question = "q" }, { strategy = "peek", path = { dir },
      budget = function() return { usd = 1, tokens = 2, window = "day", resets_at = 3 } end })
    assert.same({ usd = 1, tokens = 2, window = "day", resets_at = 3 }, r.metadata.peek.budget)
  end)
end)

describe("prices from the configuration", function()
  it("override the table for metadata.cost_usd", function()
    local cost = require "aiorch.cost"
    cost.configure(assert(cost.check { ["gpt-4o-mini"] = { input = 1000, output = 2000 } }))
    finally(function() cost.configure(nil) end)
    local r = ask("openai", { user_question = "q" })
    local u = r.metadata.usage
    near((u.input_tokens * 1000 + u.output_tokens * 2000) / 1e6, r.metadata.cost_usd)
    assert.is_true(aiorch.now() > 0)
  end)
end)
