-- Cohere Chat v2 adapter: POST {base_url}/v2/chat with a Bearer key. The
-- translation to and from the canonical model is wire.cohere's.
local json = require "aiorch.json"
local util = require "aiorch.adapter"
local common = require "aiorch.providers_common"
local wire = require "aiorch.wire.cohere"

local type = type
local str = util.str

local EMPTY = {} -- never written
local bearers = common.bearers

local _M = {
  name = "cohere",
  api = "cohere",
  -- The models this provider serves by default (aiorch serve routes by them).
  model_prefixes = { "command-", "c4ai-" },
  fields = wire.fields,
  default_model = "command-a-03-2025",
  -- The official SDKs' variables.
  key_env = "CO_API_KEY",
  base_url_env = "CO_API_URL",
  model_env = "COHERE_MODEL",
  default_base_url = "https://api.cohere.com",
  temperature_range = wire.fields.temperature.range,
}

-- Per base URL: joined once, not on every request.
local urls = {}

-- opts: stream (ask for SSE), model (the model to send; default the
-- config's).
function _M.build_request(config, request, opts)
  opts = opts or EMPTY
  local req = common.normalize(request)
  local stream = opts.stream and true or false
  local body = json.encode(wire.encode_request(req, { model = opts.model or config.model or _M.default_model,
    stream = stream }))
  local key = config.key or ""
  local headers = {
    ["content-type"] = "application/json",
    ["authorization"] = bearers[key] or common.bearer(key),
    ["accept"] = stream and "text/event-stream" or "application/json",
  }
  local base = config.base_url or _M.default_base_url
  return {
    method = "POST",
    url = urls[base] or common.url(urls, base, "/v2/chat"),
    headers = headers,
    body = body,
  }
end

-- Cohere's error body, {"id": ..., "message": ...}, in a 200.
local function failed(doc)
  if type(doc.message) ~= "table" and str(doc.message) then
    return "server_error", "provider error: " .. util.excerpt(str(doc.message) or "unknown error", 500)
  end
end

-- result: wire.cohere.decode_response's, plus model (the config's: Cohere
-- does not name it) and raw_body (the upstream bytes). Tool calls'
-- arguments are JSON text already: cjson alone reads it.
_M.parse_response = common.response_parser(_M, wire, { failed = failed })

-- stream_parser(config[, opts]) -> wire.cohere's stream decoder (the
-- events message-start, content-*, tool-plan-delta, tool-call-*,
-- citation-*, message-end, then data: [DONE]): :event(ev) returns
-- canonical events when opts.events, else the text delta (or nil); it
-- keeps usage and the finish reason. Without message-end the answer may
-- be truncated. An error in the stream is classified by the decoder.
_M.stream_parser = common.stream_parser(_M, wire, nil, common.text_event(wire.Decoder.event))

return _M
