-- The OpenAI Chat Completions shape for the gateway: request -> AIRequest;
-- answers, streams and errors are wire.openai's (scripts/aiorch/wire/openai.lua).
local common = require "aiorch.gateway.common"
local wire = require "aiorch.wire.openai"

local type = type
local setmetatable = setmetatable

local _M = { name = "openai" }

-- Errors and GET /v1/models: the wire module's.
_M.error_body = wire.error_body
_M.models = wire.models

-- doc: the decoded body. Returns {request, model, stream, include_usage} or nil, message.
function _M.parse(doc)
  if type(doc.model) ~= "string" or doc.model == "" then
    return nil, "model: required (a string)"
  end
  local req, err = common.fold(doc.messages)
  if not req then
    return nil, err
  end
  local t
  t, err = common.number_field(doc, "temperature")
  if err then
    return nil, err
  end
  req.temperature = t
  local m
  m, err = common.int_field(doc, "max_completion_tokens")
  if err then
    return nil, err
  end
  if m == nil then
    m, err = common.int_field(doc, "max_tokens")
    if err then
      return nil, err
    end
  end
  req.max_tokens = m
  if not common.absent(doc.n) and doc.n ~= 1 then
    return nil, "n: only 1 is supported"
  end
  local so = doc.stream_options
  return {
    request = req,
    model = doc.model,
    stream = doc.stream == true,
    include_usage = type(so) == "table" and so.include_usage == true,
  }
end

-- successes: the responses to show (one choice each, in order); id: the
-- request's id (letters and digits, from the gateway).
_M.render = wire.encode_response

-- A stream writer (wire.openai's encoder): each method returns the bytes
-- to send; delta(text, index) is its text event.
local Stream = setmetatable({}, { __index = wire.Stream })
Stream.__index = Stream

function _M.stream(id, model, include_usage)
  return setmetatable(wire.stream_encoder(id, model, { include_usage = include_usage }), Stream)
end

-- The first bytes (the role chunk of each choice).
function Stream:start(n)
  return wire.Stream.start(self, nil, n)
end

-- text, or a canonical stream event.
function Stream:delta(text, index)
  if type(text) == "table" then
    return self:event(text, index)
  end
  return self:text(text, index)
end

return _M
