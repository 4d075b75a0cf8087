-- Google Gemini adapter: POST {base_url}/v1beta/models/{model}:generateContent
-- (:streamGenerateContent?alt=sse for a stream). The translation to and
-- from the canonical model is wire.gemini's.
local json = require "aiorch.json"
local util = require "aiorch.adapter"
local common = require "aiorch.providers_common"
local wire = require "aiorch.wire.gemini"

local type = type
local tostring = tostring
local concat = table.concat
local str = util.str

local EMPTY = {} -- never written

local _M = {
  name = "gemini",
  api = "gemini",
  -- The models this provider serves by default (aiorch serve routes by them).
  model_prefixes = { "gemini-" },
  fields = wire.fields,
  default_model = "gemini-2.5-flash",
  key_env = "GEMINI_API_KEY",
  -- Read when GEMINI_API_KEY is not set (Google's own clients read both).
  key_env_fallback = "GOOGLE_API_KEY",
  base_url_env = "GEMINI_BASE_URL",
  model_env = "GEMINI_MODEL",
  default_base_url = "https://generativelanguage.googleapis.com",
  temperature_range = wire.fields.temperature.range,
}

-- The URL of a model's method, built once per base URL, model and kind
-- (bounded: emptied when full; models come from clients).
local urls, n_urls = {}, 0
local URLS_MAX = 256

local function url_of(base, model, stream)
  local key = concat({ base, model, stream and "s" or "" }, "\0")
  local url = urls[key]
  if not url then
    url = util.join_url(base, "/v1beta/models/" .. common.percent(model)
      .. (stream and ":streamGenerateContent?alt=sse" or ":generateContent"))
    if n_urls >= URLS_MAX then
      urls, n_urls = {}, 0
    end
    urls[key] = url
    n_urls = n_urls + 1
  end
  return url
end

-- opts: stream (ask for SSE), model (the model to send; default the
-- config's). A request that came in through this API (request.raw) is
-- sent as it came: its bytes (the model and the stream flag are in the URL).
function _M.build_request(config, request, opts)
  opts = opts or EMPTY
  local raw = request.raw
  local body
  if type(raw) == "table" and raw.api == _M.api and type(raw.body) == "string" then
    body = raw.body
  else
    body = json.encode(wire.encode_request(common.normalize(request)))
  end
  local stream = opts.stream == true
  local headers = {
    ["content-type"] = "application/json",
    ["x-goog-api-key"] = config.key or "",
  }
  if stream then
    headers["accept"] = "text/event-stream"
  end
  return {
    method = "POST",
    url = url_of(config.base_url or _M.default_base_url, opts.model or config.model or _M.default_model, stream),
    headers = headers,
    body = body,
  }
end

-- Gemini's error status names -> error kinds.
local KINDS = {
  RESOURCE_EXHAUSTED = "rate_limited",
  UNAUTHENTICATED = "auth",
  PERMISSION_DENIED = "auth",
  INVALID_ARGUMENT = "bad_request",
  FAILED_PRECONDITION = "bad_request",
  NOT_FOUND = "bad_request",
  OUT_OF_RANGE = "bad_request",
}

-- The provider's own error type and code: {status, code} as {type, code}.
local function provider_error(e)
  if type(e) ~= "table" then
    return nil
  end
  local code = math.tointeger(e.code)
  local t = str(e.status)
  if not (t or code) then
    return nil
  end
  return { type = t, code = code and tostring(code) }
end

-- {"error":{"code":429,"message":"...","status":"RESOURCE_EXHAUSTED"}}
local function classify(e)
  local t = type(e) == "table" and str(e.status) or nil
  local msg = type(e) == "table" and (str(e.message) or t) or str(e) or "unknown error"
  return KINDS[t] or "server_error", "provider error: " .. util.excerpt(msg, 500),
    { provider_error = provider_error(e) }
end

-- result: wire.gemini.decode_response's, plus raw_body (the upstream bytes).
-- A call's args become JSON text again, so their empty arrays must stay
-- arrays (aiorch.json); otherwise cjson alone. A non-2xx's error object
-- is read as Gemini's ({status, code}) first.
_M.parse_response = common.response_parser(_M, wire, { classify = classify, objects = '"functionCall"',
  error_of = provider_error })

-- stream_parser(config[, opts]) -> wire.gemini's stream decoder (each
-- server-sent event a whole GenerateContentResponse): :event(ev) returns
-- canonical events when opts.events, else the text delta (or nil: the
-- first candidate's, empty text none); it keeps parts (the text deltas),
-- usage, model, finish_reason. Without a finishReason the answer may be
-- truncated.
_M.stream_parser = common.stream_parser(_M, wire, classify, common.text_event(wire.Decoder.event, true))

return _M
