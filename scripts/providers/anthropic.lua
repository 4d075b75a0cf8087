-- Anthropic Messages adapter: POST {base_url}/v1/messages. The translation
-- to and from the canonical model is wire.anthropic's.
local json = require "aiorch.json"
local util = require "aiorch.adapter"
local canonical = require "aiorch.canonical"
local wire = require "aiorch.wire.anthropic"

local type = type
local find = string.find
local ipairs = ipairs
local error = error
local concat = table.concat
local str, present = util.str, util.present

local EMPTY = {} -- never written

local _M = {
  name = "anthropic",
  api = "anthropic",
  -- The models this provider serves by default (aiorch serve routes by them).
  model_prefixes = { "claude-" },
  fields = wire.fields,
  default_model = "claude-3-haiku-20240307",
  key_env = "ANTHROPIC_API_KEY",
  base_url_env = "ANTHROPIC_BASE_URL",
  model_env = "ANTHROPIC_MODEL",
  default_base_url = "https://api.anthropic.com",
  temperature_range = wire.fields.temperature.range,
  api_version = "2023-06-01",
  -- The API requires max_tokens on every request.
  default_max_tokens = 1024,
}

-- Per base URL: joined once, not on every request.
local urls = {}


-- opts: stream (ask for SSE), model (the model to send; default the
-- config's). A request that came in through this API (request.raw) is
-- sent as it came, with opts.model only when given, and with the
-- client's anthropic-version and anthropic-beta headers.
function _M.build_request(config, request, opts)
  opts = opts or EMPTY
  local headers = {
    ["content-type"] = "application/json",
    ["x-api-key"] = config.key or "",
    ["anthropic-version"] = _M.api_version,
  }
  local raw = request.raw
  local body, stream
  if type(raw) == "table" and raw.api == _M.api and type(raw.body) == "string" then
    body, stream = util.passthrough(raw, opts.model, opts.stream == true)
    local h = type(raw.headers) == "table" and raw.headers or EMPTY
    headers["anthropic-version"] = str(h["anthropic-version"]) or _M.api_version
    headers["anthropic-beta"] = str(h["anthropic-beta"])
  else
    local req, err = canonical.normalize(request)
    if not req then
      error("invalid request: " .. err, 0)
    end
    stream = opts.stream and true or false
    body = json.encode(wire.encode_request(req, {
      model = opts.model or config.model or _M.default_model,
      stream = stream,
      default_max_tokens = config.max_tokens or _M.default_max_tokens,
    }))
    local e = req.extra
    if type(e) == "table" and e.api == _M.api and type(e.headers) == "table" then
      headers["anthropic-beta"] = str(e.headers["anthropic-beta"])
    end
  end
  if stream then
    headers["accept"] = "text/event-stream"
  end
  local base = config.base_url or _M.default_base_url
  local url = urls[base]
  if not url then
    url = util.join_url(base, "/v1/messages")
    urls[base] = url
  end
  return {
    method = "POST",
    url = url,
    headers = headers,
    body = body,
  }
end

local ERROR_KINDS = {
  authentication_error = "auth",
  permission_error = "auth",
  rate_limit_error = "rate_limited",
  overloaded_error = "server_error",
  api_error = "server_error",
  invalid_request_error = "bad_request",
  not_found_error = "bad_request",
  request_too_large = "bad_request",
}

-- {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}
local function body_error(e)
  local t = type(e) == "table" and str(e.type) or nil
  local msg = type(e) == "table" and (str(e.message) or t) or str(e) or "unknown error"
  return nil, ERROR_KINDS[t] or "server_error", "provider error: " .. util.excerpt(msg, 500),
    { provider_error = util.provider_error(e) }
end

-- result: wire.anthropic.decode_response's, plus raw_body (the upstream bytes).
function _M.parse_response(config, status, headers, body)
  if status < 200 or status > 299 then
    return util.http_error(status, headers, body, util.error_object_message)
  end
  -- A tool call's input is an object: it becomes JSON text again, so its
  -- empty arrays must stay arrays (aiorch.json); otherwise cjson alone.
  local decode = find(body or "", '"tool_use"', 1, true) and json.decode or json.decode_plain
  local doc, err = decode(body or "")
  if type(doc) ~= "table" then
    return nil, "parse", "malformed JSON body: " .. (err or "not an object")
  end
  if doc.type == "error" or present(doc.error) then
    return body_error(doc.error)
  end
  local result, kind, msg = wire.decode_response(doc)
  if not result then
    return nil, kind, msg
  end
  result.model = result.model or config.model or _M.default_model
  result.raw_body = body
  return result
end

local function classify(e)
  local _, kind, msg, extra = body_error(e)
  return kind, msg, extra
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
  result.model = result.model or self.config.model or _M.default_model
  return result
end

-- stream_parser(config[, opts]) -> wire.anthropic's stream decoder (the
-- named events message_start, content_block_*, message_delta,
-- message_stop, ping, error): :event(ev) returns canonical events when
-- opts.events, else the text delta (or nil); it keeps parts (the text
-- deltas), usage, model, finish_reason. Without message_stop the answer
-- may be truncated.
function _M.stream_parser(config, opts)
  local p = wire.stream_decoder()
  p.config = config
  p.classify = classify
  p.result = parser_result
  if not (opts and opts.events) then
    p.event = text_event
  end
  return p
end

return _M
