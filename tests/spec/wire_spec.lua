-- The translation layer: every golden pair of tests/fixtures/translation
-- (KIND/FROM-TO/NAME.in.json -> NAME.out.json, compared as JSON; FROM or TO
-- "canonical" is the model itself: a canonical request {model, stream,
-- request} in, a decoded result or stream {events, result} out), and the
-- wire modules' fields tables against what canonical.unsupported refuses
-- and what encode_request writes.
--
-- AIORCH_FIXTURES=write writes the .out.json files instead of comparing
-- them (review the diff before committing it).
local ROOT = debug.getinfo(1, "S").source:match("^@(.*)/tests/spec/[^/]+$") or "."
package.path = ROOT .. "/scripts/?.lua;" .. package.path

local json = require "aiorch.json"
local canonical = require "aiorch.canonical"

local WIRES = { openai = require "aiorch.wire.openai", anthropic = require "aiorch.wire.anthropic",
  cohere = require "aiorch.wire.cohere", gemini = require "aiorch.wire.gemini" }
local CANONICAL = { api = "canonical" } -- the model itself, as a fixture's FROM or TO
-- The path of a Gemini request (its model and method are in the URL).
local GEMINI_PATH = "/v1beta/models/gemini-2.5-flash:generateContent"
local DIR = ROOT .. "/tests/fixtures/translation"
local WRITE = os.getenv("AIORCH_FIXTURES") == "write"

local function read(path)
  local f = io.open(path, "r")
  if not f then
    return nil
  end
  local text = f:read("a")
  f:close()
  return text
end

local function read_json(path)
  local text = read(path)
  return text and assert(json.decode(text))
end

-- Pretty JSON with sorted keys, for the golden files and the comparison.
local function pretty(v, indent)
  indent = indent or ""
  if type(v) ~= "table" then
    return (json.encode(v):gsub("\\/", "/"))
  end
  local inner = indent .. "  "
  local out = {}
  if json.is_array(v) or (getmetatable(v) ~= json.object_mt and #v > 0) then
    if #v == 0 then
      return "[]"
    end
    for i, x in ipairs(v) do
      out[i] = inner .. pretty(x, inner)
    end
    return "[\n" .. table.concat(out, ",\n") .. "\n" .. indent .. "]"
  end
  local keys = {}
  for k in pairs(v) do
    keys[#keys + 1] = k
  end
  if #keys == 0 then
    return "{}"
  end
  table.sort(keys)
  for i, k in ipairs(keys) do
    out[i] = inner .. json.encode(k) .. ": " .. pretty(v[k], inner)
  end
  return "{\n" .. table.concat(out, ",\n") .. "\n" .. indent .. "}"
end

-- The same value whatever its keys' order; "created" stamps masked.
local function canon(v)
  if type(v) == "table" then
    for k, x in pairs(v) do
      if k == "created" and type(x) == "number" then
        v[k] = 0
      else
        canon(x)
      end
    end
  end
  return pretty(v)
end

-- A list of server-sent events in the text of a stream: {event, data},
-- data decoded when it is JSON.
local function sse_list(text)
  local out = {}
  for block in text:gmatch("(.-)\n\n") do
    local ev = {}
    for line in block:gmatch("[^\n]+") do
      local name, value = line:match("^(%w+): ?(.*)$")
      if name == "event" then
        ev.event = value
      elseif name == "data" then
        ev.data = value == "[DONE]" and value or assert(json.decode(value))
      end
    end
    out[#out + 1] = ev
  end
  return out
end

-- A StandardAIResponse from a decoded result, as the plumbing makes one.
local function response_of(result, api)
  return {
    ia_provider_name = api, status = "success", response_text = result.text, content = result.content,
    choices = result.choices,
    metadata = { model = result.model, finish_reason = result.finish_reason, api = api,
      provider_finish_reason = result.provider_finish_reason, usage = result.usage, logprobs = result.logprobs,
      upstream = result.upstream },
  }
end

local TRANSLATE = {}

function TRANSLATE.request(from, to, input, case)
  local req, info
  if from == CANONICAL then
    req, info = input.request, { model = input.model, stream = input.stream }
  else
    req, info = assert(from.decode_request(input, {}, GEMINI_PATH))
  end
  req = assert(canonical.normalize(req))
  local refused = canonical.unsupported(req, to)
  local expected_drop = read_json(case .. ".dropped.json")
  if expected_drop then
    local names = {}
    for i, u in ipairs(refused) do
      names[i] = u.field
    end
    local dropped
    req, dropped = canonical.drop(req, names)
    table.sort(dropped)
    assert.same(expected_drop, dropped)
    assert.same({}, canonical.unsupported(req, to))
  else
    assert.same({}, refused)
  end
  return to.encode_request(req, { model = info.model, stream = info.stream, default_max_tokens = 1024 })
end

function TRANSLATE.response(from, to, input)
  local result = assert(from.decode_response(input))
  if to == CANONICAL then
    return result
  end
  return json.decode(to.encode_response({ response_of(result, from.api) }, "fixture", "requested-model"))
end

-- A stream's canonical events (without their raw events) and its result.
local function canonical_stream(dec, input)
  local events = {}
  for _, e in ipairs(input) do
    local sse = { event = e.event, data = type(e.data) == "table" and json.encode(e.data) or e.data }
    local evs = dec:event(sse)
    for _, ev in ipairs(evs.type and { evs } or evs) do
      assert.equal(sse, ev.raw)
      ev.raw = nil
      events[#events + 1] = ev
    end
  end
  return { events = events, result = assert(dec:result()) }
end

function TRANSLATE.stream(from, to, input)
  local dec = from.stream_decoder()
  if to == CANONICAL then
    return canonical_stream(dec, input)
  end
  local enc = to.stream_encoder("fixture", "requested-model", { include_usage = true })
  local out = { enc:start(nil, 1) }
  for _, e in ipairs(input) do
    local sse = { event = e.event, data = type(e.data) == "table" and json.encode(e.data) or e.data }
    local evs = dec:event(sse)
    for _, ev in ipairs(evs.type and { evs } or evs) do
      assert.equal(sse, ev.raw)
      out[#out + 1] = enc:event(ev, ev.choice or 0)
    end
  end
  local result = assert(dec:result())
  out[#out + 1] = enc:finish({ response_of(result, from.api) })
  return sse_list(table.concat(out))
end

local function cases(kind, pair)
  local list = {}
  local p = io.popen("ls '" .. DIR .. "/" .. kind .. "/" .. pair .. "' 2>/dev/null")
  for name in p:lines() do
    local base = name:match("^(.+)%.in%.json$")
    if base then
      list[#list + 1] = base
    end
  end
  p:close()
  table.sort(list)
  return list
end

describe("translation fixtures", function()
  local total = 0
  for _, kind in ipairs({ "request", "response", "stream" }) do
    for _, pair in ipairs({ "openai-anthropic", "anthropic-openai", "anthropic-anthropic", "openai-openai",
      "canonical-cohere", "openai-cohere", "anthropic-cohere", "cohere-canonical", "cohere-openai",
      "cohere-anthropic", "gemini-openai", "gemini-anthropic", "openai-gemini", "anthropic-gemini",
      "gemini-gemini" }) do
      local from_name, to_name = pair:match("^(%w+)-(%w+)$")
      for _, name in ipairs(cases(kind, pair)) do
        total = total + 1
        it(kind .. " " .. pair .. ": " .. name, function()
          local base = DIR .. "/" .. kind .. "/" .. pair .. "/" .. name
          local from, to = WIRES[from_name] or CANONICAL, WIRES[to_name] or CANONICAL
          local got = canon(TRANSLATE[kind](from, to, read_json(base .. ".in.json"), base))
          if WRITE then
            local f = assert(io.open(base .. ".out.json", "w"))
            f:write(got, "\n")
            f:close()
          end
          local expected = read_json(base .. ".out.json")
          assert(expected, "missing " .. base .. ".out.json")
          assert.equal(canon(expected), got)
        end)
      end
    end
  end

  it("has a fixture for every kind and direction", function()
    for _, kind in ipairs({ "request", "response", "stream" }) do
      for _, pair in ipairs({ "openai-anthropic", "anthropic-openai", "gemini-openai", "openai-gemini",
        "gemini-anthropic", "anthropic-gemini" }) do
        assert.is_true(#cases(kind, pair) >= (pair:find("gemini", 1, true) and 2 or 3), kind .. " " .. pair)
      end
    end
    assert.is_true(#cases("request", "canonical-cohere") >= 3)
    assert.is_true(#cases("response", "cohere-canonical") >= 3)
    assert.is_true(#cases("stream", "cohere-canonical") >= 3)
    assert.is_true(total >= 90)
  end)
end)

-- The fields tables ---------------------------------------------------------

local BASE = { { role = "user", content = "q" } }

local function with_messages(extra)
  local msgs = { { role = "user", content = "q" } }
  for _, m in ipairs(extra) do
    msgs[#msgs + 1] = m
  end
  msgs[#msgs + 1] = { role = "user", content = "go on" }
  return msgs
end

local function user_parts(parts)
  return { messages = { { role = "user", content = parts } } }
end

local function call(args)
  return { role = "assistant", content = { { type = "tool_call", id = "c1", name = "f", arguments = args or "{}" } } }
end

local function result(content, is_error)
  return { role = "tool", content = { { type = "tool_result", id = "c1", content = content, is_error = is_error } } }
end

local IMAGE = { type = "base64", media_type = "image/png", data = "AAAA" }
-- A document source the API takes (Cohere takes text documents only).
local function doc_source(api)
  if api == "cohere" then -- Cohere takes text documents only
    return { type = "text", data = "notes" }
  elseif api == "gemini" then -- Gemini takes documents by URL or data, not by another API's file id
    return { type = "url", url = "https://x/a.pdf" }
  end
  return { type = "file", file_id = "f1" }
end
local TOOLS = { { name = "f", parameters = { type = "object" } } }

-- For each request-side key of canonical.CELLS: a canonical request that
-- has that feature and nothing else beyond a plain user turn. api: the
-- target's, for the fields of its own API.
local function sample(key, api)
  local S = {
    messages = { messages = BASE },
    ["role.system"] = { messages = { { role = "system", content = "s" }, BASE[1] } },
    ["role.developer"] = { messages = { { role = "developer", content = "s" }, BASE[1] } },
    ["role.tool"] = { messages = with_messages({ call(), result("r") }) },
    ["message.name"] = { messages = { { role = "user", content = "q", name = "ann" } } },
    prefill = { messages = { BASE[1], { role = "assistant", content = "The answer is" } } },
    text = user_parts({ { type = "text", text = "q" } }),
    ["image.base64"] = user_parts({ { type = "image", source = IMAGE } }),
    ["image.url"] = user_parts({ { type = "image", source = { type = "url", url = "https://x/y.png" } } }),
    ["image.file"] = user_parts({ { type = "image", source = { type = "file", file_id = "f1" } } }),
    ["image.detail"] = user_parts({ { type = "image", source = { type = "url", url = "https://x" }, detail = "low" } }),
    ["document.base64"] = user_parts({ { type = "document",
      source = { type = "base64", media_type = "application/pdf", data = "AAAA" } } }),
    ["document.url"] = user_parts({ { type = "document", source = { type = "url", url = "https://x/a.pdf" } } }),
    ["document.text"] = user_parts({ { type = "document", source = { type = "text", data = "notes" } } }),
    ["document.file"] = user_parts({ { type = "document", source = { type = "file", file_id = "f1" } } }),
    ["document.title"] = user_parts({ { type = "text", text = "q" }, { type = "document", source = doc_source(api),
      title = "T" } }),
    ["document.filename"] = user_parts({ { type = "text", text = "q" }, { type = "document",
      source = doc_source(api), filename = "a.pdf" } }),
    tool_call = { messages = with_messages({ call(), result("r") }) },
    ["tool_call.arguments"] = { messages = with_messages({ call("[1]"), result("r") }) },
    tool_result = { messages = with_messages({ call(), result("r") }) },
    ["tool_result.is_error"] = { messages = with_messages({ call(), result("r", true) }) },
    ["tool_result.image"] = { messages = with_messages({ call(), result({ { type = "image", source = IMAGE } }) }) },
    ["tool_result.document"] = { messages = with_messages({ call(), result({ { type = "document",
      source = doc_source(api) } }) }) },
    thinking = { messages = with_messages({ { role = "assistant", content = {
      { type = "thinking", text = "hm", signature = "sig" }, { type = "text", text = "a" } } } }) },
    ["thinking.unsigned"] = { messages = with_messages({ { role = "assistant", content = {
      { type = "thinking", text = "hm" }, { type = "text", text = "a" } } } }) },
    redacted_thinking = { messages = with_messages({ { role = "assistant", content = {
      { type = "redacted_thinking", data = "xx" }, { type = "text", text = "a" } } } }) },
    cache_control = user_parts({ { type = "text", text = "q", cache_control = { type = "ephemeral" } } }),
    tools = { messages = BASE, tools = TOOLS },
    ["tool.strict"] = { messages = BASE, tools = { { name = "f", strict = true } } },
    tool_choice = { messages = BASE, tools = TOOLS, tool_choice = "required" },
    parallel_tool_calls = { messages = BASE, tools = TOOLS, parallel_tool_calls = false },
    ["response_format.text"] = { messages = BASE, response_format = { type = "text" } },
    ["response_format.json_object"] = { messages = BASE, response_format = { type = "json_object" } },
    ["response_format.json_schema"] = { messages = BASE, response_format = { type = "json_schema",
      schema = { type = "object" } } },
    max_tokens = { messages = BASE, max_tokens = 77 },
    temperature = { messages = BASE, temperature = 0.5 },
    top_p = { messages = BASE, top_p = 0.5 },
    top_k = { messages = BASE, top_k = 5 },
    stop = { messages = BASE, stop = { "X" } },
    seed = { messages = BASE, seed = 7 },
    presence_penalty = { messages = BASE, presence_penalty = 0.5 },
    frequency_penalty = { messages = BASE, frequency_penalty = 0.5 },
    logprobs = { messages = BASE, logprobs = true },
    top_logprobs = { messages = BASE, top_logprobs = 2 },
    n = { messages = BASE, n = 2 },
    user = { messages = BASE, user = "u1" },
    metadata = { messages = BASE, metadata = { k = "v" } },
    ["reasoning.effort"] = { messages = BASE, reasoning = { effort = "low" } },
    ["reasoning.budget_tokens"] = { messages = BASE, reasoning = { budget_tokens = 2048 } },
    ["reasoning.mode"] = { messages = BASE, reasoning = { mode = "disabled" } },
    ["reasoning.display"] = { messages = BASE, reasoning = { mode = "adaptive", display = "omitted" } },
    stream_options = { messages = BASE, stream_options = { include_usage = true } },
    extra = { messages = BASE, extra = { api = api, fields = { some_field = 1 } } },
    opaque = user_parts({ { type = "opaque", api = api, value = { type = "some_block", x = 1 } } }),
    ["anthropic-beta"] = { messages = BASE, extra = { api = "anthropic", fields = {},
      headers = { ["anthropic-beta"] = "b1" } } },
    signature = { messages = with_messages({ { role = "assistant", content = {
      { type = "tool_call", id = "c1", name = "f", arguments = "{}", signature = "sig" } } }, result("r") }) },
  }
  return assert(S[key], "no sample for " .. key)
end

-- Cells whose translation is that nothing needs sending.
local SILENT = {
  messages = true,
  text = true,
  stream_options = true,
  ["anthropic-beta"] = true,
  ["response_format.text"] = { anthropic = true, gemini = true },
  signature = { openai = true, anthropic = true },
}

describe("fields tables", function()
  for api, wire in pairs(WIRES) do
    describe(api, function()
      it("has one cell per key of canonical.CELLS, and no other", function()
        local keys = {}
        for _, c in ipairs(canonical.CELLS) do
          keys[c.key] = true
          local cell = wire.fields[c.key]
          assert.is_table(cell, c.key)
          assert.truthy(cell[1] == "pass" or cell[1] == "translate" or cell[1] == "refuse", c.key)
          if cell[1] == "translate" then
            assert.is_string(cell.how, c.key)
          elseif cell[1] == "refuse" then
            assert.is_string(cell.why, c.key)
          end
        end
        for k in pairs(wire.fields) do
          assert.is_true(keys[k], "a cell canonical.CELLS does not list: " .. k)
        end
      end)

      local baseline = json.encode(wire.encode_request(assert(canonical.normalize({ messages = BASE })),
        { model = "m", default_max_tokens = 9 }))

      for _, c in ipairs(canonical.CELLS) do
        if c.side ~= "response" then
          local cell = wire.fields[c.key]
          it(c.key .. " is " .. (cell and cell[1] or "?"), function()
            local req = assert(canonical.normalize(sample(c.key, api)))
            local fields = {}
            for _, u in ipairs(canonical.unsupported(req, wire)) do
              fields[u.field] = u.why
            end
            local ok, body = pcall(wire.encode_request, req, { model = "m", default_max_tokens = 9 })
            if cell[1] == "refuse" then
              assert.equal(cell.why, fields[c.key])
              assert.is_false(ok, "the encoder writes what the table refuses")
            else
              assert.same({}, fields)
              assert.is_true(ok, body)
              local silent = SILENT[c.key]
              if not (silent == true or (type(silent) == "table" and silent[api])) then
                assert.are_not.equal(baseline, json.encode(body), "nothing of it was written")
              end
            end
          end)
        end
      end

      it("refuses the fields and parts of another API by their own names", function()
        local other = api == "openai" and "anthropic" or "openai"
        local req = assert(canonical.normalize({
          messages = { { role = "user", content = {
            { type = "opaque", api = other, value = { type = "their_block" } } } } },
          extra = { api = other, fields = { their_field = true } },
        }))
        local names = {}
        for _, u in ipairs(canonical.unsupported(req, wire)) do
          names[#names + 1] = u.field
          assert.matches(other, u.why)
        end
        table.sort(names)
        assert.same({ "their_block", "their_field" }, names)
        assert.has_error(function()
          wire.encode_request(req, { model = "m", default_max_tokens = 9 })
        end)
      end)

      it("refuses a temperature outside its range, with the range", function()
        local r = wire.fields.temperature.range
        local got = canonical.unsupported({ temperature = r[2] + 0.5 }, wire)
        assert.equal(1, #got)
        assert.equal("temperature", got[1].field)
        assert.equal(("temperature %s is outside %s's range %s..%s"):format(r[2] + 0.5, api, r[1], r[2]), got[1].why)
        assert.same({}, canonical.unsupported({ temperature = r[2] }, wire))
      end)
    end)
  end
end)

describe("docs/fidelity.md", function()
  it("is what scripts/aiorch/fidelity.lua writes (build/aiorch run scripts/aiorch/fidelity.lua > docs/fidelity.md)",
    function()
      local fidelity = require "aiorch.fidelity"
      assert.equal(fidelity.markdown(), read(ROOT .. "/docs/fidelity.md"))
    end)

  it("has a column per built-in provider and a row per feature", function()
    local fidelity = require "aiorch.fidelity"
    local names = {}
    for i, a in ipairs(fidelity.providers()) do
      names[i] = a.name
    end
    assert.same({ "openai", "anthropic" }, { names[1], names[2] })
    local has = {}
    for _, n in ipairs(names) do
      has[n] = true
    end
    assert.is_true(has.cohere, "the cohere column")
    assert.is_true(has.gemini, "the gemini column")
    local text = fidelity.markdown()
    for _, c in ipairs(canonical.CELLS) do
      assert.truthy(text:find("| `" .. c.key .. "`", 1, true), c.key)
    end
  end)
end)

describe("decode_request", function()
  local openai, anthropic = WIRES.openai, WIRES.anthropic

  it("names the field at fault in the API's own way", function()
    local bad = {
      { openai, { messages = { { role = "user", content = "q" } } }, "^model: " },
      { openai, { model = "m" }, "^messages: " },
      { openai, { model = "m", messages = { { role = "user", content = "q" }, { role = "user", content = "q" },
        { role = "user", content = { { type = "video" } } } } }, "^messages%[2%]%.content%[0%]%.type: Invalid value" },
      { openai, { model = "m", messages = { { role = "robot", content = "q" } } }, "^messages%[0%]%.role: " },
      { openai, { model = "m", messages = { { role = "tool", content = "q" } } }, "^messages%[0%]%.tool_call_id: " },
      { openai, { model = "m", messages = { { role = "system", content = { { type = "image_url",
        image_url = { url = "u" } } } } } }, "^messages%[0%]%.content%[0%]%.type: " },
      { openai, { model = "m", messages = { { role = "user", content = "q" } }, tools = { { type = "function" } } },
        "^tools%[0%]%.function%.name: " },
      { anthropic, { model = "m", messages = { { role = "user", content = "q" } } }, "^max_tokens: Field required" },
      { anthropic, { model = "m", max_tokens = 5, messages = { { role = "user", content = "q" },
        { role = "assistant", content = { { text = "x" } } } } }, "^messages%.1%.content%.0%.type: Field required" },
      { anthropic, { model = "m", max_tokens = 5, messages = { { role = "user", content = { { type = "image",
        source = { type = "ftp" } } } } } }, "^messages%.0%.content%.0%.source%.type: " },
      { anthropic, { model = "m", max_tokens = 5, messages = { { role = "user", content = "q" } },
        tool_choice = { type = "maybe" } }, "^tool_choice%.type: " },
    }
    for _, c in ipairs(bad) do
      local req, err = c[1].decode_request(c[2], {})
      assert.is_nil(req)
      assert.matches(c[3], err)
    end
  end)

  it("keeps what the model does not know with the API it came from", function()
    local req, info = assert(openai.decode_request({ model = "m", stream = true, logit_bias = { ["5"] = 1 },
      stream_options = { include_usage = false, include_obfuscation = false }, service_tier = "flex",
      messages = { { role = "user", content = { { type = "input_audio", input_audio = { data = "x", format = "wav" } },
        { type = "text", text = "q", prompt_cache_breakpoint = { mode = "explicit" } } } } } }, {}))
    assert.same({ model = "m", stream = true, include_usage = false }, info)
    assert.same({ api = "openai", fields = { logit_bias = { ["5"] = 1 }, service_tier = "flex",
      stream_options = { include_obfuscation = false } } }, req.extra)
    assert.equal("opaque", req.messages[1].content[1].type)
    assert.same({ api = "openai", fields = { prompt_cache_breakpoint = { mode = "explicit" } } },
      req.messages[1].content[2].extra)

    req = assert(anthropic.decode_request({ model = "m", max_tokens = 5, container = "c",
      metadata = { user_id = "u", other = "x" }, messages = { { role = "user", content = "q" } },
      tools = { { type = "web_search_20250305", name = "web_search" } } },
      { ["anthropic-beta"] = "b1", ["anthropic-version"] = "2023-06-01", authorization = "no" }))
    assert.equal("u", req.user)
    assert.same({ api = "anthropic", fields = { container = "c", metadata = { other = "x" } },
      headers = { ["anthropic-beta"] = "b1", ["anthropic-version"] = "2023-06-01" } }, req.extra)
    assert.equal("opaque", req.tools[1].type)
  end)

  it("merges consecutive OpenAI tool messages and splits an Anthropic turn of results and text", function()
    local req = assert(openai.decode_request({ model = "m", messages = {
      { role = "assistant", tool_calls = {
        { id = "a", type = "function", ["function"] = { name = "f", arguments = "{}" } },
        { id = "b", type = "function", ["function"] = { name = "f", arguments = "{}" } } } },
      { role = "tool", tool_call_id = "a", content = "1" },
      { role = "tool", tool_call_id = "b", content = "2" } } }))
    assert.equal(2, #req.messages)
    assert.same({ "a", "b" }, { req.messages[2].content[1].id, req.messages[2].content[2].id })
    req = assert(anthropic.decode_request({ model = "m", max_tokens = 5, messages = {
      { role = "user", content = { { type = "tool_result", tool_use_id = "a", content = "1" },
        { type = "text", text = "next" } } } } }))
    assert.same({ "tool", "user" }, { req.messages[1].role, req.messages[2].role })
    assert.same({ { type = "text", text = "next" } }, req.messages[2].content)
  end)

  -- The OpenAI decoder vouches for the messages it found valid (validation
  -- does not walk them again): what only validation says still comes out,
  -- as validation says it.
  it("leaves to validation the messages it cannot vouch for", function()
    local function validated(messages)
      return canonical.normalize(assert(openai.decode_request({ model = "m", messages = messages })))
    end
    local tool_call = { role = "assistant", tool_calls = {
      { id = "a", type = "function", ["function"] = { name = "f", arguments = "{}" } } } }
    local bad = {
      { { { role = "user", content = { { type = "text", text = "q" },
        { type = "image_url", image_url = { url = "https://x/i.png", detail = "max" } } } } },
        'messages[0].content[1].detail: must be auto, low or high (got "max")' },
      { { { role = "user", content = "q" }, tool_call, { role = "tool", tool_call_id = "a", content = "1" },
        { role = "tool", tool_call_id = "b", content = "2" } },
        'messages[2].content[1].id: "b" answers no earlier tool call' },
    }
    for _, c in ipairs(bad) do
      local out, err = validated(c[1])
      assert.is_nil(out)
      assert.equal(c[2], err)
    end
    -- Without an earlier tool call, validation takes any result; so does the decoder.
    assert(validated({ { role = "user", content = "q" }, { role = "tool", tool_call_id = "z", content = "1" } }))
    local req = assert(validated({ { role = "user", content = { { type = "image_url",
      image_url = { url = "https://x/i.png", detail = "low" } } } }, tool_call,
      { role = "tool", tool_call_id = "a", content = "1" }, { role = "user", content = "thanks" } }))
    assert.equal(4, #req.messages)
  end)
end)

describe("streams with several choices", function()
  it("keep each choice apart, both ways", function()
    local dec = WIRES.openai.stream_decoder()
    local function chunk(choices)
      return { data = json.encode({ model = "m", choices = choices }) }
    end
    local seen = {}
    for _, sse in ipairs({
      chunk({ { index = 0, delta = { content = "A" } }, { index = 1, delta = { content = "B" } } }),
      chunk({ { index = 1, delta = { tool_calls = { { index = 0, id = "t", ["function"] = { name = "f",
        arguments = "{}" } } } }, finish_reason = "tool_calls" } }),
      chunk({ { index = 0, delta = {}, finish_reason = "stop", logprobs = { content = { { token = "A" } } } } }),
      { data = "[DONE]" } }) do
      local out = dec:event(sse)
      for _, ev in ipairs(out.type and { out } or out) do
        seen[#seen + 1] = ev.type .. ":" .. tostring(ev.choice or 0)
      end
    end
    assert.same({ "text:0", "text:1", "tool_call:1", "tool_arguments:1", "meta:0", "meta:0" }, seen)
    local r = assert(dec:result())
    assert.equal("A", r.text)
    assert.equal(2, #r.choices)
    assert.equal("tool_calls", r.choices[2].finish_reason)
    assert.same({ content = { { token = "A" } } }, r.logprobs)
    assert.equal('{}', r.choices[2].content[2].arguments)

    -- Anthropic, two answers at once (a parallel strategy): a text block
    -- each from the start, then a tool_use block of the second.
    local enc = WIRES.anthropic.stream_encoder("x", "m")
    local bytes = enc:start(nil, 2) .. enc:text("A", 0) .. enc:text("B", 1)
      .. enc:event({ type = "tool_call", index = 0, id = "t", name = "f" }, 1)
      .. enc:event({ type = "tool_arguments", index = 0, text = "{}" }, 1)
      .. enc:finish({ { response_text = "A", metadata = {} } })
    local evs = sse_list(bytes)
    local order = {}
    for _, e in ipairs(evs) do
      order[#order + 1] = e.event .. (e.data.index and ("@" .. math.tointeger(e.data.index)) or "")
    end
    assert.same({ "message_start", "content_block_start@0", "content_block_start@1", "content_block_delta@0",
      "content_block_delta@1", "content_block_stop@1", "content_block_start@2", "content_block_delta@2",
      "content_block_stop@0", "content_block_stop@2", "message_delta", "message_stop" }, order)
  end)
end)

describe("stream decoders on streams out of order", function()
  it("give a tool call its index when its block starts where a delta came first", function()
    local dec = WIRES.anthropic.stream_decoder()
    dec:event({ data = '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}' })
    local ev = dec:event({ data = '{"type":"content_block_start","index":0,"content_block":{"type":"tool_use",'
      .. '"id":"t","name":"f","input":{}}}' })
    assert.same({ "tool_call", 0, "t" }, { ev.type, ev.index, ev.id })
    dec:event({ data = '{"type":"message_stop"}' })
    local r = assert(dec:result())
    assert.equal("Hi", r.text)
    assert.same({ { type = "tool_call", id = "t", name = "f", arguments = "{}" } }, r.content)
  end)
end)
