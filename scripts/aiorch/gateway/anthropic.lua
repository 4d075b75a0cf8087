-- The Anthropic Messages shape: request -> AIRequest, StandardAIResponse
-- -> message, streams as Anthropic's named events, and its error object.
local common = require "aiorch.gateway.common"

local fmt = string.format
local type = type
local ipairs = ipairs
local setmetatable = setmetatable
local concat = table.concat
local js = common.json_string
local jw = common.json_word

local _M = { name = "anthropic" }

-- An answer from another API keeps Anthropic's vocabulary.
local STOP = { stop = "end_turn", length = "max_tokens", content_filter = "end_turn", tool_calls = "tool_use" }

local function stop_reason(r)
  local f = r.metadata and r.metadata.finish_reason
  if type(f) ~= "string" then
    return "end_turn"
  end
  return STOP[f] or f
end

local ERROR_TYPES = {
  [400] = "invalid_request_error", [401] = "authentication_error", [404] = "not_found_error",
  [405] = "invalid_request_error", [413] = "request_too_large", [429] = "rate_limit_error",
  [500] = "api_error", [502] = "api_error", [503] = "overloaded_error", [504] = "timeout_error",
}

function _M.error_body(status, message)
  return concat { '{"type":"error","error":{"type":', js(ERROR_TYPES[status] or "api_error"),
    ',"message":', js(message), "}}" }
end

-- Returns {request, model, stream} or nil, message.
function _M.parse(doc)
  if type(doc.model) ~= "string" or doc.model == "" then
    return nil, "model: Field required"
  end
  -- The API requires max_tokens; clients written for it always send it.
  local m, err = common.int_field(doc, "max_tokens")
  if err then
    return nil, err
  end
  if m == nil then
    return nil, "max_tokens: Field required"
  end
  local systems = {}
  if not common.absent(doc.system) then
    local s, serr = common.content_text(doc.system, "system")
    if not s then
      return nil, serr
    end
    systems[1] = s
  end
  local req
  req, err = common.fold(doc.messages, systems)
  if not req then
    return nil, err
  end
  local t
  t, err = common.number_field(doc, "temperature")
  if err then
    return nil, err
  end
  req.temperature = t
  req.max_tokens = m
  return { request = req, model = doc.model, stream = doc.stream == true }
end

local function blocks(successes)
  if #successes == 1 then
    return '{"type":"text","text":' .. js(successes[1].response_text) .. "}"
  end
  local out = {}
  for i, r in ipairs(successes) do
    out[i] = '{"type":"text","text":' .. js(r.response_text) .. "}"
  end
  return concat(out, ",")
end

local function usage_of(list)
  local i, o = 0, 0
  for _, r in ipairs(list) do
    local a, b = common.usage(r)
    i, o = i + a, o + b
  end
  return i, o
end

-- successes: the responses to show (one text block each, in order); id:
-- the request's id (letters and digits, from the gateway).
function _M.render(successes, id, model)
  local first = successes[1]
  local i, o = usage_of(successes)
  return '{"id":"msg_' .. id .. '","type":"message","role":"assistant","model":'
    .. jw(first and first.metadata and first.metadata.model or model) .. ',"content":[' .. blocks(successes)
    .. '],"stop_reason":' .. jw(first and stop_reason(first) or "end_turn") .. ',"stop_sequence":null,'
    .. fmt('"usage":{"input_tokens":%d,"output_tokens":%d}}', i, o)
end

local function event(name, data)
  return concat { "event: ", name, "\ndata: ", data, "\n\n" }
end

local Stream = {}
Stream.__index = Stream

function _M.stream(id, model)
  return setmetatable({ id = "msg_" .. id, model = model, n = 1 }, Stream)
end

-- message_start and a content_block_start per block.
function Stream:start(n)
  self.n = n or 1
  local out = { event("message_start", concat { '{"type":"message_start","message":{"id":', js(self.id),
    ',"type":"message","role":"assistant","model":', js(self.model),
    ',"content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":0,"output_tokens":0}}}' }) }
  for i = 1, self.n do
    out[#out + 1] = event("content_block_start", fmt('{"type":"content_block_start","index":%d,'
      .. '"content_block":{"type":"text","text":""}}', i - 1))
  end
  return concat(out)
end

function Stream.delta(_, text, index)
  return event("content_block_delta", concat { '{"type":"content_block_delta","index":', index or 0,
    ',"delta":{"type":"text_delta","text":', js(text), "}}" })
end

function Stream:finish(successes)
  local out = {}
  for i = 1, self.n do
    out[i] = event("content_block_stop", fmt('{"type":"content_block_stop","index":%d}', i - 1))
  end
  local first = successes[1]
  local ti, to = usage_of(successes)
  out[#out + 1] = event("message_delta", concat { '{"type":"message_delta","delta":{"stop_reason":',
    js(first and stop_reason(first) or "end_turn"), ',"stop_sequence":null},',
    fmt('"usage":{"input_tokens":%d,"output_tokens":%d}}', ti, to) })
  out[#out + 1] = event("message_stop", '{"type":"message_stop"}')
  return concat(out)
end

-- A stream that broke after it began: Anthropic's own mid-stream error event.
function Stream.error(_, status, message)
  return event("error", _M.error_body(status, message))
end

-- GET /v1/models in Anthropic's list shape.
function _M.models(entries)
  local data = {}
  for i, e in ipairs(entries) do
    data[i] = concat { '{"type":"model","id":', js(e.id), ',"display_name":', js(e.id),
      ',"created_at":"1970-01-01T00:00:00Z"}' }
  end
  local first, last = entries[1], entries[#entries]
  return concat { '{"data":[', concat(data, ","), '],"has_more":false,"first_id":',
    first and js(first.id) or "null", ',"last_id":', last and js(last.id) or "null", "}" }
end

return _M
