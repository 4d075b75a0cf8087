-- Cohere Chat v2 adapter: POST {base_url}/v2/chat with a Bearer key. The
-- translation to and from the canonical model is wire.cohere's.
local json = require "aiorch.json"
local util = require "aiorch.adapter"
local canonical = require "aiorch.canonical"
local wire = require "aiorch.wire.cohere"

local type = type
local ipairs = ipairs
local error = error
local concat = table.concat
local str = util.str

local EMPTY = {} -- never written

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

-- Per base URL and per key: built once, not on every request.
local urls, bearers = {}, {}

-- opts: stream (ask for SSE), model (the model to send; default the
-- config's).
function _M.build_request(config, request, opts)
  opts = opts or EMPTY
  local req, err = canonical.normalize(request)
  if not req then
    error("invalid request: " .. err, 0)
  end
  local stream = opts.stream and true or false
  local body = json.encode(wire.encode_request(req, { model = opts.model or config.model or _M.default_model,
    stream = stream }))
  local key = config.key or ""
  local auth = bearers[key]
  if not auth then
    auth = "Bearer " .. key
    bearers[key] = auth
  end
  local headers = {
    ["content-type"] = "application/json",
    ["authorization"] = auth,
    ["accept"] = stream and "text/event-stream" or "application/json",
  }
  local base = config.base_url or _M.default_base_url
  local url = urls[base]
  if not url then
    url = util.join_url(base, "/v2/chat")
    urls[base] = url
  end
  return {
    method = "POST",
    url = url,
    headers = headers,
    body = body,
  }
end

-- Cohere's error body, {"id": ..., "message": ...}, in a 200.
local function body_error(message)
  return nil, "server_error", "provider error: " .. util.excerpt(str(message) or "unknown error", 500)
end

-- result: wire.cohere.decode_response's, plus model (the config's: Cohere
-- does not name it) and raw_body (the upstream bytes).
function _M.parse_response(config, status, headers, body)
  if status < 200 or status > 299 then
    return util.http_error(status, headers, body, util.error_object_message)
  end
  -- Tool calls' arguments are JSON text already: cjson alone reads it.
  local doc, err = json.decode_plain(body or "")
  if type(doc) ~= "table" then
    return nil, "parse", "malformed JSON body: " .. (err or "not an object")
  end
  if type(doc.message) ~= "table" and str(doc.message) then
    return body_error(doc.message)
  end
  local result, kind, msg = wire.decode_response(doc)
  if not result then
    return nil, kind, msg
  end
  result.model = config.model or _M.default_model
  result.raw_body = body
  return result
end

-- :event for a parser made without opts.events: the text the event adds,
-- as adapters written before stream events return.
local function text_event(self, ev)
  local out = wire.Decoder.event(self, ev)
  if not out then
    return nil
  elseif out.type then
    return out.type == "text" and out.text or nil
  end
  local text = {}
  for _, e in ipairs(out) do
    if e.type == "text" then
      text[#text + 1] = e.text
    end
  end
  return #text > 0 and concat(text) or nil
end

local function parser_result(self)
  local result, kind, msg, extra = wire.Decoder.result(self)
  if not result then
    return nil, kind, msg, extra
  end
  result.model = self.config.model or _M.default_model
  return result
end

-- stream_parser(config[, opts]) -> wire.cohere's stream decoder (the
-- events message-start, content-*, tool-plan-delta, tool-call-*,
-- citation-*, message-end, then data: [DONE]): :event(ev) returns
-- canonical events when opts.events, else the text delta (or nil); it
-- keeps usage and the finish reason. Without message-end the answer may
-- be truncated.
function _M.stream_parser(config, opts)
  local p = wire.stream_decoder()
  p.config = config
  p.result = parser_result
  if not (opts and opts.events) then
    p.event = text_event
  end
  return p
end

return _M
