-- OpenAI Chat Completions adapter: POST {base_url}/chat/completions. The
-- translation to and from the canonical model is wire.openai's.
local json = require "aiorch.json"
local util = require "aiorch.adapter"
local common = require "aiorch.providers_common"
local wire = require "aiorch.wire.openai"

local type = type
local str = util.str

local EMPTY = {} -- never written
local bearers = common.bearers

local _M = {
  name = "openai",
  api = "openai",
  -- The models this provider serves by default (aiorch serve routes by them).
  model_prefixes = { "gpt-", "o1", "o3", "o4", "chatgpt-" },
  fields = wire.fields,
  default_model = "gpt-4o-mini",
  key_env = "OPENAI_API_KEY",
  base_url_env = "OPENAI_BASE_URL",
  model_env = "OPENAI_MODEL",
  default_base_url = "https://api.openai.com/v1",
  temperature_range = wire.fields.temperature.range,
}

-- Per base URL: joined once, not on every request.
local urls = {}

-- opts: stream (ask for SSE), model (the model to send; default the
-- config's). A request that came in through this API (request.raw) is
-- sent as it came, with opts.model only when given.
function _M.build_request(config, request, opts)
  opts = opts or EMPTY
  local raw = request.raw
  local body, stream
  if type(raw) == "table" and raw.api == _M.api and type(raw.body) == "string" then
    body, stream = util.passthrough(raw, opts.model, opts.stream == true)
  else
    local req = common.normalize(request)
    stream = opts.stream and true or false
    body = json.encode(wire.encode_request(req, { model = opts.model or config.model or _M.default_model,
      stream = stream }))
  end
  local key = config.key or ""
  local headers = {
    ["content-type"] = "application/json",
    ["authorization"] = bearers[key] or common.bearer(key),
  }
  if stream then
    headers["accept"] = "text/event-stream"
  end
  local base = config.base_url or _M.default_base_url
  return {
    method = "POST",
    url = urls[base] or common.url(urls, base, "/chat/completions"),
    headers = headers,
    body = body,
  }
end

-- An error object in a 200 body or a stream chunk: classify by its type/code.
local function classify(e)
  local t = type(e) == "table" and (str(e.code) or str(e.type)) or ""
  local kind = "server_error"
  if t:find("rate_limit", 1, true) or t == "insufficient_quota" then
    kind = "rate_limited"
  elseif t == "invalid_api_key" or t:find("auth", 1, true) or t:find("permission", 1, true) then
    kind = "auth"
  elseif t == "invalid_request_error" then
    kind = "bad_request"
  end
  local msg = type(e) == "table" and (str(e.message) or str(e.type)) or str(e) or "unknown error"
  return kind, "provider error: " .. util.excerpt(msg, 500), { provider_error = util.provider_error(e) }
end

-- result: wire.openai.decode_response's, plus raw_body (the upstream bytes).
-- Tool calls' arguments are JSON text already: nothing here is written
-- back as JSON, so cjson alone reads it.
_M.parse_response = common.response_parser(_M, wire, { classify = classify })

-- stream_parser(config[, opts]) -> wire.openai's stream decoder: :event(ev)
-- returns canonical events when opts.events, else the text delta (or
-- nil); it keeps parts (the text deltas), usage, model, finish_reason.
_M.stream_parser = common.stream_parser(_M, wire, classify, common.text_event(wire.Decoder.event))

return _M
