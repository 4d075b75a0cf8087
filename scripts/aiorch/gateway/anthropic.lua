-- The Anthropic Messages shape for the gateway: request -> AIRequest;
-- answers, streams and errors are wire.anthropic's (scripts/aiorch/wire/anthropic.lua).
local common = require "aiorch.gateway.common"
local wire = require "aiorch.wire.anthropic"

local type = type
local setmetatable = setmetatable

local _M = { name = "anthropic" }

-- Errors and GET /v1/models: the wire module's.
_M.error_body = wire.error_body
_M.models = wire.models

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

-- successes: the responses to show (their blocks in order); id: the
-- request's id (letters and digits, from the gateway).
_M.render = wire.encode_response

-- A stream writer (wire.anthropic's encoder); delta(text, index) is its
-- text event.
local Stream = setmetatable({}, { __index = wire.Stream })
Stream.__index = Stream

function _M.stream(id, model)
  return setmetatable(wire.stream_encoder(id, model), Stream)
end

-- message_start (and a text block per answer when there are several).
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
