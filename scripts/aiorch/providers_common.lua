-- The plumbing the built-in provider adapters share (scripts/providers/*.lua
-- and aiorch.compat's), around their wire modules: the request's parts,
-- the answer's parser, the stream parser. Nothing here does I/O.
local canonical = require "aiorch.canonical"
local util = require "aiorch.adapter"
local json = require "aiorch.json"

local type = type
local ipairs = ipairs
local error = error
local concat = table.concat
local find = string.find
local present = util.present
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

-- s percent-encoded for a URL's path or query: all but letters, digits
-- and -._~ (a model or deployment name, an API version).
function _M.percent(s)
  return (s:gsub("[^%w%-%._~]", function(c) return fmt("%%%02X", byte(c)) end))
end

-- "Bearer " .. key, made once per key, not on every request: callers
-- read _M.bearers[key] first, and call bearer(key) only when it is not
-- there (no call on a request's path).
local bearers = {}
_M.bearers = bearers

function _M.bearer(key)
  local auth = "Bearer " .. key
  bearers[key] = auth
  return auth
end

-- base joined with path, kept in urls (the adapter's cache by base): as
-- with bearer, callers read urls[base] first.
function _M.url(urls, base, path)
  local url = util.join_url(base, path)
  urls[base] = url
  return url
end

-- Answers -------------------------------------------------------------------

-- response_parser(adapter, wire, opts) -> the adapter's
-- parse_response(config, status, headers, body): a non-2xx answer is
-- opts.http_error's (default: util.http_error with opts.message_of,
-- default util.error_object_message, and opts.error_of); a 2xx body is
-- decoded by aiorch.json's decode_plain, or by its decode when the body
-- has opts.objects (a JSON text that is written again, so its empty
-- arrays must stay arrays); the provider's error instead when the body
-- has an `error` object (opts.classify(e) -> kind, message, extra; none:
-- the provider has no such object) or opts.failed(doc) says kind,
-- message, extra; else wire.decode_response's result, with the model
-- (the config's or the adapter's default when the answer names none) and
-- raw_body (the upstream bytes). One function, no call more, on the
-- answer's path.
function _M.response_parser(adapter, wire, opts)
  local classify, failed, objects = opts.classify, opts.failed, opts.objects
  local message_of, error_of = opts.message_of or util.error_object_message, opts.error_of
  local http_error = opts.http_error or function(status, headers, body)
    return util.http_error(status, headers, body, message_of, error_of)
  end
  local decode, decode_plain = json.decode, json.decode_plain
  return function(config, status, headers, body)
    if status < 200 or status > 299 then
      return http_error(status, headers, body)
    end
    local text = body or ""
    local doc, err
    if objects and find(text, objects, 1, true) then
      doc, err = decode(text)
    else
      doc, err = decode_plain(text)
    end
    if type(doc) ~= "table" then
      return nil, "parse", "malformed JSON body: " .. (err or "not an object")
    end
    if classify and present(doc.error) then
      return nil, classify(doc.error)
    end
    local result, kind, msg, extra
    if failed then
      kind, msg, extra = failed(doc)
      if kind then
        return nil, kind, msg, extra
      end
    end
    result, kind, msg = wire.decode_response(doc)
    if not result then
      return nil, kind, msg
    end
    result.model = result.model or config.model or adapter.default_model
    result.raw_body = body
    return result
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
