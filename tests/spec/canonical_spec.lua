-- The canonical request: normalize's checks, unsupported, drop, the simple
-- form for adapters written for it, and finish reasons.
local ROOT = debug.getinfo(1, "S").source:match("^@(.*)/tests/spec/[^/]+$") or "."
package.path = ROOT .. "/scripts/?.lua;" .. package.path

local canonical = require "aiorch.canonical"
local openai = require "aiorch.wire.openai"
local anthropic = require "aiorch.wire.anthropic"

local function invalid(req, field, says)
  local out, err = canonical.normalize(req)
  assert.is_nil(out)
  assert.is_string(err)
  assert.equal(1, err:find(field, 1, true), ("%q should name %s"):format(err, field))
  if says then
    assert.matches(says, err, 1, true)
  end
end

local function user(content)
  return { role = "user", content = content }
end

describe("canonical.normalize", function()
  it("builds the messages from the simple form", function()
    local r = assert(canonical.normalize({ user_question = "q", context = "c", system_prompt = "s", max_tokens = 5 }))
    assert.same({ { role = "system", content = "s" }, user("Context:\nc\n\nQuestion:\nq") }, r.messages)
    assert.equal(5, r.max_tokens)
    assert.is_nil(r.user_question)
    assert.is_nil(r.context)
    -- The context already in the system prompt is not sent twice; no empty system turn.
    r = assert(canonical.normalize({ user_question = "q", context = "c", system_prompt = "",
      context_in_system_prompt = true }))
    assert.same({ user("q") }, r.messages)
  end)

  it("takes a conversation with every part type", function()
    local req = {
      messages = {
        { role = "developer", content = {
          { type = "text", text = "d", cache_control = { type = "ephemeral" } } } },
        user({ { type = "image", source = { type = "url", url = "u" }, detail = "low" },
          { type = "document", source = { type = "text", data = "t" }, title = "T" } }),
        { role = "assistant", content = { { type = "thinking", text = "x", signature = "s" },
          { type = "redacted_thinking", data = "r" },
          { type = "tool_call", id = "a", name = "f", arguments = "{}" } } },
        { role = "tool", content = { { type = "tool_result", id = "a", is_error = true,
          content = { { type = "text", text = "e" } } } } },
      },
      tools = { { name = "f", parameters = {} } }, tool_choice = { name = "f" }, stop = "END",
      reasoning = { effort = "high", budget_tokens = 2048, mode = "enabled", display = "omitted" },
    }
    local r = assert(canonical.normalize(req))
    assert.same({ "END" }, r.stop)
    assert.equal(req.messages[3], r.messages[3])
  end)

  it("names the field at fault", function()
    invalid({ messages = {} }, "messages", "non-empty")
    invalid({ messages = { { role = "robot", content = "x" } } }, "messages[0].role")
    invalid({ messages = { user({ { type = "video" } }) } }, "messages[0].content[0].type")
    invalid({ messages = { user({ { type = "text" } }) } }, "messages[0].content[0].text", "required")
    invalid({ messages = { user({ { type = "image", source = { type = "ftp" } } }) } },
      "messages[0].content[0].source.type")
    invalid({ messages = { user({ { type = "image", source = { type = "url", url = "u" }, detail = "max" } }) } },
      "messages[0].content[0].detail")
    invalid({ messages = { user({ { type = "tool_call", id = "a", name = "f", arguments = "{}" } }) } },
      "messages[0].content[0].type", "cannot stand in a user message")
    invalid({ messages = { { role = "tool", content = "x" } } }, "messages[0].content", "tool_result")
    invalid({ messages = {
      { role = "assistant", content = { { type = "tool_call", id = "a", name = "f", arguments = "{}" } } },
      { role = "tool", content = { { type = "tool_result", id = "b" } } } } },
      "messages[1].content[0].id", "answers no")
    invalid({ messages = { user("q") }, user_question = "q" }, "user_question", "not allowed")
    invalid({ user_question = "q", tools = { { name = "f" }, { name = "f" } } }, "tools[1].name", "twice")
    invalid({ user_question = "q", tools = { { name = "" } } }, "tools[0].name")
    invalid({ user_question = "q", tools = { { name = "f" } }, tool_choice = { name = "g" } }, "tool_choice", "g")
    invalid({ user_question = "q", tool_choice = "sometimes" }, "tool_choice")
    invalid({ user_question = "q", n = 0 }, "n")
    invalid({ user_question = "q", n = 1.5 }, "n")
    invalid({ user_question = "q", top_logprobs = 21 }, "top_logprobs")
    invalid({ user_question = "q", top_p = 2 }, "top_p")
    invalid({ user_question = "q", max_tokens = 0 }, "max_tokens", "positive integer")
    invalid({ user_question = "q", reasoning = { effort = "extreme" } }, "reasoning.effort")
    invalid({ user_question = "q", reasoning = { display = "omitted" } }, "reasoning.display")
    invalid({ user_question = "q", response_format = { type = "json_schema" } }, "response_format.schema")
    invalid({ user_question = "q", metadata = { k = 1 } }, "metadata.k")
    invalid({ user_question = "q", stop = { "a", 2 } }, "stop[1]")
    invalid({ user_question = "q", extra = { fields = {} } }, "extra")
  end)

  -- Every message as it reads, and with several fields wrong, the first in
  -- a fixed order (numbers, booleans, strings, tools, then the other
  -- tables), whatever order the table holds them in.
  it("says exactly what is wrong, the same error whatever the fields' order", function()
    local call = { role = "assistant", content = { { type = "tool_call", id = "a", name = "f", arguments = "{}" } } }
    local cases = {
      { { messages = { user({ { type = "text", text = 5 } }) } },
        "messages[0].content[0].text: must be a string (got number)" },
      { { messages = { user({ { type = "image", source = { type = "base64", media_type = "image/png" } } }) } },
        "messages[0].content[0].source.data: required" },
      { { messages = { user({ { type = "image", source = "x" } }) } },
        "messages[0].content[0].source: must be a table" },
      { { messages = { user({ { type = "document", source = { type = "text", data = "d" }, title = 3 } }) } },
        "messages[0].content[0].title: must be a string (got number)" },
      { { messages = { user({ { type = "document", source = { type = "file", file_id = "f" }, filename = false } }) } },
        "messages[0].content[0].filename: must be a string (got boolean)" },
      { { messages = { user({ { type = "text", text = "t", cache_control = "x" } }) } },
        "messages[0].content[0].cache_control: must be a table" },
      { { messages = { user({ { type = "text", text = "t", extra = { api = "openai" } } }) } },
        "messages[0].content[0].extra: must be {api = name, fields = {...}}" },
      { { messages = { user({ "text" }) } },
        "messages[0].content[0]: must be a table" },
      { { messages = { user("q"),
        { role = "assistant", content = { { type = "tool_call", id = "a", name = "f" } } } } },
        "messages[1].content[0].arguments: required" },
      { { messages = { call, { role = "tool", content = { { type = "tool_result", id = "a", is_error = "yes" } } } } },
        "messages[1].content[0].is_error: must be a boolean (got \"yes\")" },
      { { messages = { call, { role = "tool", content = { { type = "tool_result", id = "a", content = 7 } } } } },
        "messages[1].content[0].content: must be a string or a list of parts" },
      { { messages = { call, { role = "tool", content = { { type = "tool_result", id = "a",
        content = { { type = "text", text = "ok" }, { type = "thinking", text = "x" } } } } } } },
        "messages[1].content[0].content[1].type: must be text, image, document or opaque" },
      { { messages = { call, { role = "tool", content = { { type = "tool_result", id = "a",
        content = { { type = "text", text = "ok" }, { type = "image", source = { type = "url" } } } } } } } },
        "messages[1].content[0].content[1].source.url: required" },
      { { messages = { call, { role = "tool", content = { { type = "tool_result", id = "a",
        content = { { type = "document", source = { type = "text", data = "d" }, title = 1 } } } } } } },
        "messages[1].content[0].content[0].title: must be a string (got number)" },
      { { messages = { { role = "assistant", content = { { type = "thinking", text = "x", signature = 1 } } } } },
        "messages[0].content[0].signature: must be a string (got number)" },
      { { messages = { { role = "assistant", content = { { type = "redacted_thinking" } } } } },
        "messages[0].content[0].data: required" },
      { { messages = { user({ { type = "opaque", api = "openai" } }) } },
        "messages[0].content[0]: an opaque part needs api and value" },
      { { messages = { user("q"), "m" } },
        "messages[1]: must be a table" },
      { { messages = { user("q"), { role = "user", content = 5 } } },
        "messages[1].content: must be a string or a list of parts" },
      { { messages = { { role = "tool", content = 5 } } },
        "messages[0].content: a tool message holds a list of tool_result parts" },
      { { messages = { { role = "user", content = "q", name = 1 } } },
        "messages[0].name: must be a string (got number)" },
      { { messages = { { role = "user", content = "q", extra = 1 } } },
        "messages[0].extra: must be {api = name, fields = {...}}" },
      { { messages = { user("q") }, context = "c" },
        "context: not allowed with messages" },
      { { messages = { user("q") }, system_prompt = "s" },
        "system_prompt: not allowed with messages" },
      { { user_question = 5 },
        "user_question: must be a string (got number)" },
      { { user_question = "  " },
        "user_question: must not be empty" },
      { { user_question = "q", context = 1 },
        "context: must be a string (got number)" },
      { { user_question = "q", tools = { "t" } },
        "tools[0]: must be a table" },
      { { user_question = "q", tools = { { type = "opaque", api = "x" } } },
        "tools[0]: an opaque tool needs api and value" },
      { { user_question = "q", tools = { { name = "f", description = 1 } } },
        "tools[0].description: must be a string (got number)" },
      { { user_question = "q", tools = { { name = "f", parameters = "p" } } },
        "tools[0].parameters: must be a JSON Schema (a table)" },
      { { user_question = "q", tools = { { name = "f", strict = "yes" } } },
        "tools[0].strict: must be a boolean (got \"yes\")" },
      { { user_question = "q", tools = { { name = "f", cache_control = 1 } } },
        "tools[0].cache_control: must be a table" },
      { { user_question = "q", tools = "t" },
        "tools: must be a list" },
      { { user_question = "q", temperature = "hot", top_p = 5, stop = 5, tool_choice = "x", n = 0, reasoning = 1 },
        "temperature: must be a number (got \"hot\")" },
      { { user_question = "q", stop = 5, tool_choice = "x", reasoning = 1, metadata = 1, logprobs = "y", user = 1 },
        "logprobs: must be a boolean (got \"y\")" },
      { { user_question = "q", stop = 5, tool_choice = "x", reasoning = 1, metadata = 1, tools = { 1 } },
        "tools[0]: must be a table" },
      { { user_question = "q", stream_options = { include_usage = 1 }, extra = 1, policy = 1, response_format = 1 },
        "response_format.type: must be text, json_object or json_schema (got 1)" },
      { { user_question = "q", policy = { nope = 1 }, extra = 1 },
        "extra: must be {api = name, fields = {...}}" },
      { { user_question = "q", seed = 1.5, user = 1 },
        "seed: must be an integer (got 1.5)" },
      { { user_question = "q", continue_from = 1, context_in_system_prompt = 1 },
        "context_in_system_prompt: must be a boolean (got 1)" },
      { { user_question = "q", tools = { { name = "f" } }, tool_choice = { name = "g" }, metadata = { k = 1 } },
        "tool_choice: names \"g\", which is not among the tools" },
      { { user_question = "q", response_format = { type = "json_schema", schema = {}, name = 1 } },
        "response_format.name: must be a string (got number)" },
      { { user_question = "q", reasoning = { budget_tokens = 0 } },
        "reasoning.budget_tokens: must be at least 1 (got 0)" },
    }
    for _, c in ipairs(cases) do
      local out, err = canonical.normalize(c[1])
      assert.is_nil(out)
      assert.equal(c[2], err)
    end
  end)
end)

describe("canonical.unsupported", function()
  it("says, in the refusal's words, what a provider cannot take", function()
    local req = assert(canonical.normalize({ user_question = "q", top_k = 3, seed = 1, n = 2, temperature = 1.5 }))
    local by = {}
    for _, u in ipairs(canonical.unsupported(req, anthropic)) do
      by[u.field] = u.why
    end
    assert.same({ "n", "seed", "temperature" }, (function()
      local k = {}
      for f in pairs(by) do
        k[#k + 1] = f
      end
      table.sort(k)
      return k
    end)())
    assert.equal("temperature 1.5 is outside anthropic's range 0..1", by.temperature)
    local list = canonical.unsupported(req, openai)
    assert.equal(1, #list)
    assert.equal("top_k", list[1].field)
    assert.equal("top_k is not supported by provider openai", canonical.message("top_k", "openai"))
  end)

  it("lets an adapter written for the simple form take text conversations only", function()
    local legacy = { name = "mine", temperature_range = { 0, 1 } }
    local text = assert(canonical.normalize({ messages = { { role = "system", content = "s" }, user("a"),
      { role = "assistant", content = "b" }, user({ { type = "text", text = "c" } }) }, max_tokens = 9 }))
    assert.same({}, canonical.unsupported(text, legacy))
    local simple = assert(canonical.to_simple(text))
    assert.equal("c", simple.user_question)
    assert.equal("s", simple.system_prompt)
    assert.equal("Conversation so far:\nuser: a\nassistant: b", simple.context)
    assert.equal(9, simple.max_tokens)
    local image = assert(canonical.normalize({ messages = { user({ { type = "image",
      source = { type = "url", url = "u" } } }) }, top_p = 0.5 }))
    local fields = {}
    for _, u in ipairs(canonical.unsupported(image, legacy)) do
      fields[#fields + 1] = u.field
    end
    table.sort(fields)
    assert.same({ "image", "image.url", "top_p" }, fields)
  end)
end)

describe("canonical.drop", function()
  local req = assert(canonical.normalize({
    messages = {
      { role = "system", content = { { type = "text", text = "s", cache_control = { type = "ephemeral" } } } },
      user({ { type = "image", source = { type = "url", url = "u" }, detail = "high" },
        { type = "text", text = "q" } }),
      { role = "assistant", content = { { type = "thinking", text = "t", signature = "sig" },
        { type = "tool_call", id = "a", name = "f", arguments = "{}" } } },
      { role = "tool", content = { { type = "tool_result", id = "a", content = "r", is_error = true } } },
      { role = "assistant", content = "pre" },
    },
    tools = { { name = "f", strict = true, cache_control = { type = "ephemeral" } } },
    top_k = 4, reasoning = { budget_tokens = 2048, effort = "low" },
    extra = { api = "anthropic", fields = { service_tier = "auto" } },
  }))

  it("removes the features named, reports those it found, and leaves the request as it was", function()
    local out, dropped = canonical.drop(req, { "cache_control", "image.detail", "thinking",
      "tool_result.is_error", "prefill", "top_k", "reasoning.budget_tokens", "service_tier", "tool.strict", "seed" })
    table.sort(dropped)
    assert.same({ "cache_control", "image.detail", "prefill", "reasoning.budget_tokens", "service_tier",
      "thinking", "tool.strict", "tool_result.is_error", "top_k" }, dropped)
    assert.equal(4, #out.messages)
    assert.same({ { type = "text", text = "s" } }, out.messages[1].content)
    assert.same({ type = "image", source = { type = "url", url = "u" } }, out.messages[2].content[1])
    assert.same({ { type = "tool_call", id = "a", name = "f", arguments = "{}" } }, out.messages[3].content)
    assert.is_nil(out.messages[4].content[1].is_error)
    assert.same({ { name = "f" } }, out.tools)
    assert.same({ effort = "low" }, out.reasoning)
    assert.is_nil(out.extra)
    assert.is_nil(out.top_k)
    assert.same({}, canonical.unsupported(out, anthropic))
    -- The original is untouched.
    assert.equal(5, #req.messages)
    assert.equal("high", req.messages[2].content[1].detail)
    assert.equal(4, req.top_k)
    assert.same({ type = "ephemeral" }, req.tools[1].cache_control)
  end)

  it("leaves a request an OpenAI provider takes once what it refuses is dropped", function()
    local names = {}
    for i, u in ipairs(canonical.unsupported(req, openai)) do
      names[i] = u.field
    end
    local out = canonical.drop(req, names)
    assert.same({}, canonical.unsupported(out, openai))
    assert.is_table(openai.encode_request(out, { model = "m" }))
  end)

  it("drops the results of a tool call it drops, so that no result answers nothing", function()
    local r = assert(canonical.normalize({
      messages = {
        user("q"),
        { role = "assistant", content = { { type = "text", text = "calling" },
          { type = "tool_call", id = "bad", name = "f", arguments = "[1]" },
          { type = "tool_call", id = "ok", name = "f", arguments = "{}" } } },
        { role = "tool", content = { { type = "tool_result", id = "bad", content = "1" },
          { type = "tool_result", id = "ok", content = "2" } } },
        { role = "assistant", content = { { type = "tool_call", id = "bad2", name = "f", arguments = "2" } } },
        { role = "tool", content = { { type = "tool_result", id = "bad2", content = "3" } } },
        user("next"),
      },
    }))
    local out, dropped = canonical.drop(r, { "tool_call.arguments" })
    assert.same({ "tool_call.arguments" }, dropped)
    assert.same({ "user", "assistant", "tool", "user" }, { out.messages[1].role, out.messages[2].role,
      out.messages[3].role, out.messages[4].role })
    assert.equal(4, #out.messages)
    assert.same({ { type = "text", text = "calling" },
      { type = "tool_call", id = "ok", name = "f", arguments = "{}" } }, out.messages[2].content)
    assert.same({ { type = "tool_result", id = "ok", content = "2" } }, out.messages[3].content)
    assert.same({}, canonical.unsupported(out, anthropic))
  end)
end)

describe("canonical.finish_reason", function()
  it("normalises every API's reasons", function()
    local cases = { stop = "stop", end_turn = "stop", stop_sequence = "stop", pause_turn = "stop", length = "length",
      max_tokens = "length", model_context_window_exceeded = "length", tool_calls = "tool_calls",
      function_call = "tool_calls", tool_use = "tool_calls", content_filter = "content_filter", refusal = "refusal",
      something_new = "other" }
    for given, want in pairs(cases) do
      assert.equal(want, canonical.finish_reason(given), given)
    end
    assert.is_nil(canonical.finish_reason(nil))
  end)
end)
