-- AIRequest validation, the search path, and orchestrate's checks that run
-- before any network call.
local ROOT = debug.getinfo(1, "S").source:match("^@(.*)/tests/spec/[^/]+$") or "."
package.path = ROOT .. "/scripts/?.lua;" .. package.path

local request = require "aiorch.request"
local loader = require "aiorch.loader"
local response = require "aiorch.response"
local cjson = require "cjson.safe"

local openai = dofile(ROOT .. "/scripts/providers/openai.lua")
local anthropic = dofile(ROOT .. "/scripts/providers/anthropic.lua")
local BOTH = { openai, anthropic }

local function invalid(req, adapters, field)
  local out, err = request.validate(req, adapters or BOTH)
  assert.is_nil(out)
  assert.is_string(err)
  assert.equal(1, err:find(field, 1, true), ("%q should name %s"):format(err, field))
  return err
end

describe("request.validate", function()
  it("accepts a question alone and copies only known fields", function()
    local out = assert(request.validate({ user_question = "hi", bogus = 1 }, BOTH))
    assert.same({ user_question = "hi" }, out)
  end)

  it("accepts every field", function()
    local req = { user_question = "q", context = "c", temperature = 0.5, max_tokens = 100, system_prompt = "s" }
    assert.same(req, assert(request.validate(req, BOTH)))
  end)

  it("requires a non-empty user_question", function()
    invalid({}, nil, "user_question")
    invalid({ user_question = "" }, nil, "user_question")
    invalid({ user_question = "  \n\t" }, nil, "user_question")
    invalid({ user_question = 42 }, nil, "user_question")
    invalid({ user_question = cjson.null }, nil, "user_question")
  end)

  it("rejects a request that is not a table", function()
    local out, err = request.validate("hello", BOTH)
    assert.is_nil(out)
    assert.matches("request", err)
  end)

  it("checks the temperature against every chosen provider's range", function()
    assert.truthy(request.validate({ user_question = "q", temperature = 1.5 }, { openai }))
    local err = invalid({ user_question = "q", temperature = 1.5 }, BOTH, "temperature")
    assert.matches("anthropic", err)
    assert.matches("0%.%.1", err)
    invalid({ user_question = "q", temperature = -0.1 }, { openai }, "temperature")
    invalid({ user_question = "q", temperature = 2.01 }, { openai }, "temperature")
    invalid({ user_question = "q", temperature = "hot" }, nil, "temperature")
    invalid({ user_question = "q", temperature = 0 / 0 }, nil, "temperature")
    assert.truthy(request.validate({ user_question = "q", temperature = 0 }, BOTH))
    assert.truthy(request.validate({ user_question = "q", temperature = 1 }, BOTH))
  end)

  it("wants max_tokens to be a positive integer", function()
    invalid({ user_question = "q", max_tokens = 0 }, nil, "max_tokens")
    invalid({ user_question = "q", max_tokens = -5 }, nil, "max_tokens")
    invalid({ user_question = "q", max_tokens = 1.5 }, nil, "max_tokens")
    invalid({ user_question = "q", max_tokens = "100" }, nil, "max_tokens")
    local out = assert(request.validate({ user_question = "q", max_tokens = 100.0 }, BOTH))
    assert.equal("integer", math.type(out.max_tokens))
  end)

  it("wants context and system_prompt to be strings", function()
    invalid({ user_question = "q", context = 5 }, nil, "context")
    invalid({ user_question = "q", system_prompt = {} }, nil, "system_prompt")
    assert.same({ user_question = "q" }, request.validate({ user_question = "q", context = cjson.null }, BOTH))
  end)
end)

describe("loader", function()
  local tmp

  before_each(function()
    tmp = os.tmpname()
    os.remove(tmp)
    assert(os.execute("mkdir -p '" .. tmp .. "/strategies' '" .. tmp .. "/prompts'"))
    loader.clear_cache()
  end)

  after_each(function()
    os.execute("rm -rf '" .. tmp .. "'")
    loader.reset_path()
    loader.clear_cache()
  end)

  it("finds the built-ins under the root", function()
    assert.matches("/strategies/fallback%.lua$", assert(loader.find("strategy", "fallback")))
    assert.matches("/scripts/providers/openai%.lua$", assert(loader.find("provider", "openai")))
    assert.matches("/scripts/prompts/default%.lua$", assert(loader.find("prompt", "default")))
  end)

  it("lists the valid names of an unknown one", function()
    local path, err = loader.find("strategy", "nope")
    assert.is_nil(path)
    assert.matches("unknown strategy 'nope'", err)
    for _, n in ipairs({ "fallback", "fastest", "parallel", "single" }) do
      assert.matches(n, err)
    end
    local _, perr = loader.find("provider", "nope")
    assert.matches("unknown provider 'nope' %(valid: .*anthropic.*openai", perr)
  end)

  it("refuses names that could leave the search path", function()
    for _, bad in ipairs({ "../etc/passwd", "a/b", "", "x.lua", "a b" }) do
      local path, err = loader.find("strategy", bad)
      assert.is_nil(path)
      assert.matches("invalid strategy name", err)
    end
  end)

  it("searches a user directory first, without a rebuild", function()
    local f = assert(io.open(tmp .. "/strategies/fallback.lua", "w"))
    f:write("return function() return 'mine' end\n")
    f:close()
    local fn = assert(loader.load("strategy", "fallback", { tmp }))
    assert.equal("mine", fn())
    -- Without the directory the built-in is found again.
    assert.matches(loader.root() .. "/strategies/fallback.lua", assert(loader.find("strategy", "fallback")), 1, true)
    -- add_path (the --path flag) works the same way.
    loader.add_path(tmp)
    assert.equal(tmp .. "/strategies/fallback.lua", loader.find("strategy", "fallback"))
  end)

  it("sees a new user file at once and lists it", function()
    assert.is_nil(loader.find("strategy", "brand_new", tmp))
    local f = assert(io.open(tmp .. "/strategies/brand_new.lua", "w"))
    f:write("return function() end\n")
    f:close()
    assert.equal(tmp .. "/strategies/brand_new.lua", loader.find("strategy", "brand_new", tmp))
    local names = table.concat(loader.list("strategy", tmp), ",")
    assert.matches("brand_new", names)
  end)

  it("reports a file that fails to load or has the wrong shape", function()
    local f = assert(io.open(tmp .. "/strategies/broken.lua", "w"))
    f:write("return function(\n")
    f:close()
    local v, err = loader.load("strategy", "broken", tmp)
    assert.is_nil(v)
    assert.matches("cannot load strategy 'broken'", err)
    f = assert(io.open(tmp .. "/strategies/shape.lua", "w"))
    f:write("return 42\n")
    f:close()
    v, err = loader.load("strategy", "shape", tmp)
    assert.is_nil(v)
    assert.matches("must return a function", err)
  end)
end)

describe("response", function()
  it("prices the default models", function()
    assert.near(0.0000530, response.cost("claude-3-haiku-20240307", { input_tokens = 12, output_tokens = 40 }), 1e-12)
    assert.near((1000 * 0.15 + 1000 * 0.60) / 1e6,
      response.cost("gpt-4o-mini-2024-07-18", { input_tokens = 1000, output_tokens = 1000 }), 1e-12)
    assert.is_nil(response.cost("unknown-model", { input_tokens = 1 }))
  end)

  it("encodes error_message as null and keeps the field names", function()
    local r = response.success("anthropic", { text = "hi", model = "claude-3-haiku-20240307",
      usage = { input_tokens = 12, output_tokens = 40 }, finish_reason = "end_turn" }, 412.4, 200)
    local text = response.encode(r)
    assert.matches('"error_message":null', text, 1, true)
    local back = cjson.decode(text)
    assert.equal("anthropic", back.ia_provider_name)
    assert.equal("hi", back.response_text)
    assert.equal("success", back.status)
    assert.equal(412, back.latency_ms)
    assert.equal(cjson.null, back.error_message)
    assert.same({ input_tokens = 12, output_tokens = 40 }, back.metadata.usage)
    assert.equal("end_turn", back.metadata.finish_reason)
    assert.equal(200, back.metadata.http_status)
    assert.near(0.000053, back.metadata.cost_usd, 1e-12)
  end)

  it("encodes a list as a JSON array and empty attempts as []", function()
    local e = response.error("openai", "timeout", "timed out", 5, { attempts = {} })
    assert.equal("timeout", e.status)
    local text = response.encode({ e, e })
    assert.equal("[", text:sub(1, 1))
    assert.matches('"attempts":[]', text, 1, true)
  end)

  it("names every failure in all_failed", function()
    local a = response.error("openai", "rate_limited", "HTTP 429: slow down", 10, { http_status = 429 })
    local b = response.error("anthropic", "server_error", "HTTP 529: Overloaded", 20, { http_status = 529 })
    local e = response.all_failed({ a, b })
    assert.equal("error", e.status)
    assert.matches("openai: rate_limited %(HTTP 429: slow down%)", e.error_message)
    assert.matches("anthropic: server_error %(HTTP 529: Overloaded%)", e.error_message)
    assert.equal(2, #e.metadata.attempts)
    local t = response.all_failed({ response.error("openai", "timeout", "t", 1),
      response.error("anthropic", "timeout", "t", 1) })
    assert.equal("timeout", t.status)
  end)
end)

-- The checks orchestrate makes before any network call; they need the runtime.
local has_core = pcall(require, "aiorch")
if has_core then
  describe("orchestrate validation", function()
    local orchestrate = require "aiorch.orchestrate"
    local metrics = require "aiorch.metrics"
    -- Port 1 on loopback is closed: a call would fail with "connect".
    local env = {
      OPENAI_API_KEY = "sk-test-validation", ANTHROPIC_API_KEY = "sk-ant-validation",
      OPENAI_BASE_URL = "http://127.0.0.1:1/v1", ANTHROPIC_BASE_URL = "http://127.0.0.1:1",
    }

    before_each(function() metrics.reset() end)

    local function rejected(req, strategy, providers, pattern)
      local r, kind, err = orchestrate.orchestrate(req, strategy, providers, { env = env })
      assert.is_nil(r)
      assert.equal("invalid", kind)
      assert.matches(pattern, err)
      assert.same({}, metrics.snapshot(), "no call was made")
      return err
    end

    it("rejects a bad request before calling anyone", function()
      rejected({ user_question = "" }, "fallback", nil, "^user_question")
      -- a temperature only refuses the providers it does not fit: the request
      -- is refused when none is left
      rejected({ user_question = "q", temperature = 1.5 }, "parallel", { "anthropic" },
        "^temperature 1.5 is outside anthropic's range 0..1")
      rejected({ user_question = "q", temperature = 2.5 }, "parallel", nil,
        "^temperature 2.5 is outside openai's range")
      rejected({ user_question = "q", max_tokens = -1 }, "single", { "openai" }, "^max_tokens")
    end)

    it("accepts a temperature valid for the chosen providers only", function()
      local r = orchestrate.orchestrate({ user_question = "q", temperature = 1.5 }, "single", { "openai" },
        { env = env })
      assert.equal("error", r.status)
      assert.equal("connect", r.metadata.error_kind)
    end)

    it("lists the valid names of an unknown strategy or provider", function()
      rejected({ user_question = "q" }, "roulette", nil, "unknown strategy 'roulette' %(valid: .*fallback")
      rejected({ user_question = "q" }, "single", { "gemini-x" }, "unknown provider 'gemini%-x' %(valid: .*openai")
      rejected({ user_question = "q" }, "single", { "openai", "openai" }, "listed twice")
    end)
  end)
end
