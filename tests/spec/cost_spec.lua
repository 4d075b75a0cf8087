-- aiorch.cost: the price table (scripts/aiorch/prices.lua), lookups by
-- exact and dated name, the cost of a canonical usage, estimates, and the
-- configuration's overrides.
local ROOT = debug.getinfo(1, "S").source:match("^@(.*)/tests/spec/[^/]+$") or "."
package.path = ROOT .. "/scripts/?.lua;" .. package.path

local cost = require "aiorch.cost"

local function near(expected, got)
  assert.is_number(got)
  assert.is_true(math.abs(expected - got) < 1e-12, ("expected %.12g, got %.12g"):format(expected, got))
end

describe("the price table", function()
  it("is data with a source page and a date on every entry", function()
    local raw = dofile(ROOT .. "/scripts/aiorch/prices.lua")
    local n = 0
    for model, e in pairs(raw) do
      n = n + 1
      assert.is_string(e.source, model)
      assert.truthy(e.source:match("^https://"), model)
      assert.truthy(e.date:match("^%d%d%d%d%-%d%d%-%d%d$"), model)
      assert.is_number(e.input, model)
      assert.is_number(e.output, model)
    end
    assert.is_true(n >= 40)
  end)

  it("prices the current models of every provider", function()
    for _, m in ipairs({ "gpt-4o-mini", "gpt-4.1", "gpt-5", "o4-mini", "claude-3-haiku", "claude-sonnet-4-5",
      "claude-haiku-4-5", "gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.0-flash", "command-a-03-2025",
      "command-r-08-2024", "llama-3.3-70b-versatile", "mistral-small-latest", "deepseek-chat", "grok-3-mini" }) do
      assert.is_table(cost.price(m), m)
    end
  end)
end)

describe("cost.price", function()
  it("finds the exact name, then the name without its date", function()
    local p = assert(cost.price("claude-3-5-haiku-20241022"))
    assert.equal(0.80, p.input)
    assert.equal(4.00, p.output)
    assert.equal(0.08, p.cached_read)
    assert.equal(1.00, p.cache_write)
    assert.equal(4.00, p.reasoning) -- absent: as output
    assert.equal("https://docs.anthropic.com/en/docs/about-claude/pricing", p.source)
    assert.is_string(p.date)
    assert.equal(0.15, cost.price("gpt-4o-mini-2024-07-18").input)
    assert.equal(0.075, cost.price("gemini-1.5-flash-002").input)
    assert.equal(2.50, cost.price("command-a-03-2025").input)
    -- a cache write without a price of its own is charged as input
    assert.equal(0.15, cost.price("gpt-4o-mini").cache_write)
  end)

  it("does not take a longer name for a shorter one", function()
    assert.is_nil(cost.price("gpt-4o-mini-tts"))
    assert.is_nil(cost.price("claude-3-haiku-x"))
    assert.is_nil(cost.price("nonexistent"))
    assert.is_nil(cost.price(nil))
    assert.is_nil(cost.price(42))
  end)

  it("takes overrides first, and they extend the table", function()
    local over = assert(cost.check {
      ["gpt-4o-mini"] = { input = 1, output = 2 },
      ["my-local"] = { input = 0, output = 0, source = "own hardware", date = "2026-01-01" },
    })
    assert.equal(1, cost.price("gpt-4o-mini", over).input)
    assert.equal(1, cost.price("gpt-4o-mini-2024-07-18", over).input)
    assert.equal(0, cost.price("my-local", over).output)
    assert.equal(2.50, cost.price("gpt-4o", over).input)
    -- overrides as a caller writes them: completed
    local raw = { ["my-raw"] = { input = 2, output = 8 } }
    assert.same({ input = 2, output = 8, cached_read = 2, cache_write = 2, reasoning = 8 }, cost.price("my-raw", raw))
    near((10 * 2 + 5 * 2 + 3 * 8) / 1e6, cost.of("my-raw-20250101", { input_tokens = 15, cached_input_tokens = 5,
      output_tokens = 3, reasoning_tokens = 1 }, raw))
    assert.is_nil(cost.price("bad", { bad = { input = "x", output = 1 } }))
  end)

  it("the configuration's overrides apply when none are given", function()
    cost.configure(assert(cost.check { ["house-model"] = { input = 3, output = 4 } }))
    finally(function() cost.configure(nil) end)
    assert.equal(3, cost.price("house-model").input)
    near(7e-6, cost.of("house-model", { input_tokens = 1, output_tokens = 1 }))
    cost.configure(nil)
    assert.is_nil(cost.price("house-model"))
  end)

  it("refuses a wrong entry, naming it", function()
    local _, err = cost.check { m = { input = -1, output = 1 } }
    assert.truthy(err:find('prices["m"].input', 1, true))
    _, err = cost.check { m = { input = 1 } }
    assert.truthy(err:find('prices["m"].output: required', 1, true))
    _, err = cost.check { m = { input = 1, output = 1, cached = 1 } }
    assert.truthy(err:find('unknown field "cached"', 1, true))
    _, err = cost.check { m = { input = 0 / 0, output = 1 } }
    assert.truthy(err:find("must be a number", 1, true))
    _, err = cost.check "x"
    assert.truthy(err:find("prices: must be a table", 1, true))
  end)
end)

describe("cost.of", function()
  it("charges each kind of token at its price", function()
    -- claude-sonnet-4-5: input 3, output 15, cached read 0.30, cache write 3.75.
    -- 1000 input of which 600 read from the cache and 200 written to it;
    -- 500 output of which 100 reasoning.
    local usage = { input_tokens = 1000, output_tokens = 500, cached_input_tokens = 600,
      cache_write_tokens = 200, reasoning_tokens = 100 }
    near((200 * 3 + 600 * 0.30 + 200 * 3.75 + 400 * 15 + 100 * 15) / 1e6, cost.of("claude-sonnet-4-5", usage))
    -- gpt-4o-mini: 0.15 / 0.60, cached 0.075
    near((1000 * 0.15 + 1000 * 0.60) / 1e6,
      cost.of("gpt-4o-mini-2024-07-18", { input_tokens = 1000, output_tokens = 1000 }))
    near((500 * 0.15 + 500 * 0.075 + 10 * 0.60) / 1e6,
      cost.of("gpt-4o-mini", { input_tokens = 1000, output_tokens = 10, cached_input_tokens = 500 }))
  end)

  it("gives nil, never 0, for a model without a price or no usage", function()
    assert.is_nil(cost.of("unknown-model", { input_tokens = 1 }))
    assert.is_nil(cost.of("gpt-4o-mini", {}))
    assert.is_nil(cost.of("gpt-4o-mini", nil))
    assert.equal(0, cost.of("gpt-4o-mini", { input_tokens = 0, output_tokens = 0 }))
  end)
end)

describe("cost.estimate", function()
  it("counts the request's characters for input and max_tokens for output", function()
    local usd, i, o = cost.estimate("gpt-4o-mini", { messages = { { role = "user", content = ("x"):rep(400) } },
      max_tokens = 50 })
    assert.equal(100, i)
    assert.equal(50, o)
    near((100 * 0.15 + 50 * 0.60) / 1e6, usd)
    local _, i2, o2 = cost.estimate("gpt-4o-mini", { user_question = "abcd", system_prompt = "abcdefgh",
      messages = { { role = "user", content = { { type = "text", text = "abcd" } } } } })
    assert.equal(4, i2)
    assert.equal(cost.default_output_tokens, o2)
    assert.is_nil(cost.estimate("unknown-model", { user_question = "x" }))
  end)
end)
