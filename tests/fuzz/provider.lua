-- The checks of the fuzz_provider_* targets: on any reply, an adapter's
-- parsers return a result or nil, kind, message; they never raise.
local concat = table.concat

local KINDS = {
  auth = true, rate_limited = true, server_error = true, bad_request = true,
  http = true, parse = true, stream_cut = true,
}

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
  if deltas then
    assert(result.text == concat(deltas), "result.text is not the deltas joined")
  end
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
  end

  return response, stream
end
