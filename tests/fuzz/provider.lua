-- The checks of the fuzz_provider_* targets: on any reply, an adapter's
-- parsers return a result or nil, kind, message; they never raise. A
-- result, and the canonical events of a stream, then go through every
-- API's encoders, which must not raise either.
local concat = table.concat

local KINDS = {
  auth = true, rate_limited = true, server_error = true, bad_request = true,
  http = true, parse = true, stream_cut = true, content_filter = true,
}

local EVENTS = {
  text = "text", thinking = "text", thinking_signature = "signature", redacted_thinking = "data",
  tool_call = "id", tool_arguments = "text", meta = false,
}

local PARTS = { text = true, tool_call = true, thinking = true, redacted_thinking = true, opaque = true }

local encoders = { require "aiorch.wire.openai", require "aiorch.wire.anthropic", (require "aiorch.wire.gemini") }

local function check(result, kind, message, deltas)
  if result == nil then
    assert(KINDS[kind], "unknown error kind: " .. tostring(kind))
    assert(type(message) == "string", "the message is not a string")
    assert(not message:find("[\r\n]"), "the message is not one line: " .. message)
    return
  end
  assert(type(result) == "table", "the result is not a table")
  assert(type(result.text) == "string", "result.text is not a string")
  assert(type(result.model) == "string", "result.model is not a string")
  assert(type(result.usage) == "table", "result.usage is not a table")
  assert(result.finish_reason == nil or type(result.finish_reason) == "string", "result.finish_reason")
  assert(type(result.content) == "table", "result.content is not a list")
  for _, p in ipairs(result.content) do
    assert(PARTS[p.type], "unknown part type: " .. tostring(p.type))
  end
  if deltas then
    assert(result.text == concat(deltas), "result.text is not the deltas joined")
  end
  -- A StandardAIResponse of it, written in each API's shape.
  local r = { response_text = result.text, content = result.content, choices = result.choices,
    metadata = { model = result.model, finish_reason = result.finish_reason, usage = result.usage,
      provider_finish_reason = result.provider_finish_reason, upstream = result.upstream } }
  for _, w in ipairs(encoders) do
    assert(type(w.encode_response({ r }, "fuzz", "m")) == "string", "encode_response")
  end
end

-- Each canonical event well formed; returns them as a list. nil (an
-- error event, and what follows it) is no event: the stream then fails.
local function events_of(out)
  if out == nil then
    return {}, true
  end
  assert(type(out) == "table", "a parser in events mode returned neither events nor nil")
  local list = out.type and { out } or out
  assert(#list > 0, "an empty list of events")
  for _, ev in ipairs(list) do
    local field = EVENTS[ev.type]
    assert(field ~= nil, "unknown event type: " .. tostring(ev.type))
    assert(ev.raw ~= nil, "an event without its raw event")
    if field then
      assert(type(ev[field]) == "string", ev.type .. "." .. field .. " is not a string")
    end
    if ev.type == "tool_call" or ev.type == "tool_arguments" then
      assert(math.type(ev.index) == "integer", ev.type .. ".index is not an integer")
    end
  end
  return list
end

-- Returns the two entry points for the named adapter.
return function(name)
  local adapter = require("providers." .. name)
  local config = { model = adapter.default_model }

  local function response(status, headers, body)
    local result, kind, message, extra = adapter.parse_response(config, status, headers, body)
    check(result, kind, message)
    assert(extra == nil or type(extra) == "table", "the fourth value is not a table")
  end

  local function stream(events)
    local parser = adapter.stream_parser(config)
    local deltas = {}
    for i = 1, #events do
      local delta = parser:event(events[i])
      assert(delta == nil or (type(delta) == "string" and delta ~= ""), "a delta is not a non-empty string")
      deltas[#deltas + 1] = delta
    end
    local result, kind, message = parser:result()
    check(result, kind, message, deltas)

    -- The same stream as canonical events, written in both APIs' streams.
    parser = adapter.stream_parser(config, { events = true })
    local writers = {}
    for i, w in ipairs(encoders) do
      writers[i] = w.stream_encoder("fuzz", "m", { include_usage = true })
      writers[i]:start(nil, 1)
    end
    local text = {}
    local dropped = false
    for i = 1, #events do
      local list, none = events_of(parser:event(events[i]))
      dropped = dropped or none
      for _, ev in ipairs(list) do
        if ev.type == "text" and not ev.choice then
          text[#text + 1] = ev.text
        end
        for _, w in ipairs(writers) do
          assert(type(w:event(ev, ev.choice or 0)) == "string", "stream encoder")
        end
      end
    end
    local r2, kind2 = parser:result()
    assert((r2 == nil) == (result == nil) and kind2 == kind, "the two modes disagree")
    assert(not (dropped and r2), "an event gave nothing in a stream that succeeded")
    if r2 then
      assert(r2.text == concat(text), "result.text is not the text events joined")
      for _, w in ipairs(writers) do
        assert(type(w:finish({ { response_text = r2.text, content = r2.content,
          metadata = { finish_reason = r2.finish_reason, usage = r2.usage } } })) == "string", "finish")
      end
    end
  end

  return response, stream
end
