-- The plumbing the built-in provider adapters share (scripts/providers/*.lua
-- and aiorch.compat's), around their wire modules: the request's parts,
-- reading a 2xx answer, the stream parser. Nothing here does I/O.
local canonical = require "aiorch.canonical"
local util = require "aiorch.adapter"

local type = type
local ipairs = ipairs
local error = error
local concat = table.concat
local fmt = string.format
local byte = string.byte

local _M = {}

-- Requests ------------------------------------------------------------------

-- The canonical form of request; raises "invalid request: ..." when it has none.
function _M.normalize(request)
  local req, err = canonical.normalize(request)
  if not req then
    error("invalid request: " .. err, 0)
  end
  return req
end

-- request.raw when the request came in through api with its body (then it
-- is sent as it came), else nil.
function _M.raw_of(request, api)
  local raw = request.raw
  if type(raw) == "table" and raw.api == api and type(raw.body) == "string" then
    return raw
  end
  return nil
end

-- s percent-encoded for a URL's path or query: all but letters, digits
-- and -._~ (a model or deployment name, an API version).
function _M.percent(s)
  return (s:gsub("[^%w%-%._~]", function(c) return fmt("%%%02X", byte(c)) end))
end

-- "Bearer " .. key, made once per key, not on every request.
local bearers = {}

function _M.bearer(key)
  local auth = bearers[key]
  if not auth then
    auth = "Bearer " .. key
    bearers[key] = auth
  end
  return auth
end

-- base joined with path, once per base: urls is the adapter's cache.
function _M.url(urls, base, path)
  local url = urls[base]
  if not url then
    url = util.join_url(base, path)
    urls[base] = url
  end
  return url
end

-- Answers -------------------------------------------------------------------

-- The result of a 2xx answer's body: decoded with decode (aiorch.json's
-- decode or decode_plain); failed(doc) -> kind, message, extra when the
-- body is the provider's error instead; translated by wire.decode_response,
-- with model when the answer names none, and raw_body (the upstream bytes).
function _M.read_answer(body, decode, failed, wire, model)
  local doc, err = decode(body or "")
  if type(doc) ~= "table" then
    return nil, "parse", "malformed JSON body: " .. (err or "not an object")
  end
  local kind, msg, extra = failed(doc)
  if kind then
    return nil, kind, msg, extra
  end
  local result
  result, kind, msg = wire.decode_response(doc)
  if not result then
    return nil, kind, msg
  end
  result.model = result.model or model
  result.raw_body = body
  return result
end

-- read_answer's failed for a provider whose error in a 2xx is the body's
-- `error` object: classify(e) -> kind, message, extra.
function _M.error_field(classify)
  local present = util.present
  return function(doc)
    if present(doc.error) then
      return classify(doc.error)
    end
  end
end

-- Streams -------------------------------------------------------------------

-- text_event(event[, skip_empty]) -> :event for a parser made without
-- opts.events: the text that event(self, ev)'s canonical events add (the
-- first choice's), as adapters written before stream events return; nil
-- for none (skip_empty: nor for empty text).
function _M.text_event(event, skip_empty)
  return function(self, ev)
    local out = event(self, ev)
    if not out then
      return nil
    elseif out.type then
      return out.type == "text" and not out.choice and (not skip_empty or out.text ~= "") and out.text or nil
    end
    local text = {}
    for _, e in ipairs(out) do
      if e.type == "text" and not e.choice then
        text[#text + 1] = e.text
      end
    end
    if skip_empty then
      local s = concat(text)
      return s ~= "" and s or nil
    end
    return #text > 0 and concat(text) or nil
  end
end

-- stream_parser(adapter, wire, classify, text_event[, event]) -> the
-- adapter's stream_parser(config[, opts]): wire's stream decoder, whose
-- :event(ev) returns canonical events when opts.events (event, when given,
-- instead of the decoder's), else text_event's text delta (or nil); its
-- result has the model (the config's or the adapter's default when the
-- stream names none). classify: the adapter's, for an error in the stream
-- (nil: the decoder's own).
function _M.stream_parser(adapter, wire, classify, text_event, event)
  local function result(self)
    local r, kind, msg, extra = wire.Decoder.result(self)
    if not r then
      return nil, kind, msg, extra
    end
    r.model = r.model or self.config.model or adapter.default_model
    return r
  end
  return function(config, opts)
    local p = wire.stream_decoder()
    p.config = config
    p.classify = classify
    p.result = result
    if not (opts and opts.events) then
      p.event = text_event
    elseif event then
      p.event = event
    end
    return p
  end
end

return _M
