-- OpenAI Chat Completions adapter: POST {base_url}/chat/completions. The
-- translation to and from the canonical model is wire.openai's.
local json = require "aiorch.json"
local util = require "aiorch.adapter"
local canonical = require "aiorch.canonical"
local wire = require "aiorch.wire.openai"

local type = type
local ipairs = ipairs
local error = error
local concat = table.concat
local str, present = util.str, util.present

local EMPTY = {} -- never written

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

-- Per base URL and per key: built once, not on every request.
local urls, bearers = {}, {}


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
    local req, err = canonical.normalize(request)
    if not req then
      error("invalid request: " .. err, 0)
    end
    stream = opts.stream and true or false
    body = json.encode(wire.encode_request(req, { model = opts.model or config.model or _M.default_model,
      stream = stream }))
  end
  local key = config.key or ""
  local auth = bearers[key]
  if not auth then
    auth = "Bearer " .. key
    bearers[key] = auth
  end
  local headers = {
    ["content-type"] = "application/json",
    ["authorization"] = auth,
  }
  if stream then
    headers["accept"] = "text/event-stream"
  end
  local base = config.base_url or _M.default_base_url
  local url = urls[base]
  if not url then
    url = util.join_url(base, "/chat/completions")
    urls[base] = url
  end
  return {
    method = "POST",
    url = url,
    headers = headers,
    body = body,
  }
end

-- An error object in a 200 body or a stream chunk: classify by its type/code.
local function body_error(e)
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
  return nil, kind, "provider error: " .. util.excerpt(msg, 500), { provider_error = util.provider_error(e) }
end

-- result: wire.openai.decode_response's, plus raw_body (the upstream bytes).
function _M.parse_response(config, status, headers, body)
  if status < 200 or status > 299 then
    return util.http_error(status, headers, body, util.error_object_message)
  end
  -- Tool calls' arguments are JSON text already: nothing here is
  -- written back as JSON, so cjson alone reads it.
  local doc, err = json.decode_plain(body or "")
  if type(doc) ~= "table" then
    return nil, "parse", "malformed JSON body: " .. (err or "not an object")
  end
  if present(doc.error) then
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

-- :event for a parser made without opts.events: the text the event adds
-- (the first choice's), as adapters written before stream events return.
local function text_event(self, ev)
  local out = wire.Decoder.event(self, ev)
  if not out then
    return nil
  elseif out.type then
    return out.type == "text" and not out.choice and out.text or nil
  end
  local text = {}
  for _, e in ipairs(out) do
    if e.type == "text" and not e.choice then
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

-- stream_parser(config[, opts]) -> wire.openai's stream decoder: :event(ev)
-- returns canonical events when opts.events, else the text delta (or
-- nil); it keeps parts (the text deltas), usage, model, finish_reason.
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
