-- Anthropic Messages adapter: POST {base_url}/v1/messages. The translation
-- to and from the canonical model is wire.anthropic's.
local json = require "aiorch.json"
local util = require "aiorch.adapter"
local common = require "aiorch.providers_common"
local wire = require "aiorch.wire.anthropic"

local type = type
local str = util.str

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
    local req = common.normalize(request)
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
  return {
    method = "POST",
    url = urls[base] or common.url(urls, base, "/v1/messages"),
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
local function classify(e)
  local t = type(e) == "table" and str(e.type) or nil
  local msg = type(e) == "table" and (str(e.message) or t) or str(e) or "unknown error"
  return ERROR_KINDS[t] or "server_error", "provider error: " .. util.excerpt(msg, 500),
    { provider_error = util.provider_error(e) }
end

-- An error body without an error object is an error still.
local function failed(doc)
  if doc.type == "error" then
    return classify(doc.error)
  end
end

-- result: wire.anthropic.decode_response's, plus raw_body (the upstream bytes).
-- A tool call's input is an object: it becomes JSON text again, so its
-- empty arrays must stay arrays (aiorch.json); otherwise cjson alone.
_M.parse_response = common.response_parser(_M, wire, { classify = classify, failed = failed, objects = '"tool_use"' })

-- stream_parser(config[, opts]) -> wire.anthropic's stream decoder (the
-- named events message_start, content_block_*, message_delta,
-- message_stop, ping, error): :event(ev) returns canonical events when
-- opts.events, else the text delta (or nil); it keeps parts (the text
-- deltas), usage, model, finish_reason. Without message_stop the answer
-- may be truncated.
_M.stream_parser = common.stream_parser(_M, wire, classify, common.text_event(wire.Decoder.event))

return _M
