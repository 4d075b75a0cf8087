-- Helpers shared by the provider adapters (scripts/providers/*.lua).
-- User adapters may use them too; nothing here does I/O.
local cjson = require "cjson.safe"
local json = require "aiorch.json"

local fmt = string.format
local type = type
local pairs = pairs
local tonumber = tonumber
local tostring = tostring
local tointeger = math.tointeger

local _M = {}

local EMPTY = {} -- never written

local null = cjson.null

-- A JSON null decodes to cjson.null; treat it like an absent field.
function _M.str(v)
  if type(v) == "string" then
    return v
  end
  return nil
end

function _M.num(v)
  if type(v) == "number" then
    return tointeger(v) or v
  end
  return nil
end

function _M.present(v)
  return v ~= nil and v ~= null
end

-- A client's request in the provider's own API, sent as it came: its own
-- bytes; or its document re-encoded (aiorch.json: nothing else changes)
-- when the model must change, or when the caller takes the answer whole
-- from a client that asked for a stream. Returns the body and whether it
-- asks for a stream.
function _M.passthrough(raw, model, stream)
  local doc = type(raw.doc) == "table" and raw.doc or EMPTY
  local asked = doc.stream == true
  if (model and doc.model ~= model) or (asked and not stream) then
    local copy = {}
    for k, v in pairs(doc) do
      copy[k] = v
    end
    copy.model = model or doc.model
    if not stream then
      copy.stream, copy.stream_options = nil, nil
    end
    return json.encode(copy), stream
  end
  return raw.body, asked
end

function _M.join_url(base, path)
  return (base:gsub("/+$", "")) .. path
end

-- The user turn: the question, preceded by the context when there is one
-- and the system prompt does not already carry it.
function _M.user_content(request)
  local q = request.user_question
  local c = request.context
  if type(c) == "string" and c:find("%S") and not request.context_in_system_prompt then
    return fmt("Context:\n%s\n\nQuestion:\n%s", c, q)
  end
  return q
end

-- The turn that asks a model to go on with an answer cut short.
_M.CONTINUE = "Your previous answer was cut off. Continue it exactly where it stops, "
  .. "without repeating any of it and without any preamble."

function _M.kind_for_status(status)
  if status == 401 or status == 403 then
    return "auth"
  elseif status == 429 then
    return "rate_limited"
  elseif status >= 500 then
    return "server_error" -- includes Anthropic's 529 (overloaded)
  elseif status >= 400 then
    return "bad_request"
  end
  return "http"
end

-- Retry-After is seconds or an HTTP date; keep a number when it is one.
function _M.retry_after(headers)
  local v = type(headers) == "table" and headers["retry-after"] or nil
  if type(v) ~= "string" then
    return nil
  end
  return _M.num(tonumber(v)) or v
end

-- At most n bytes of s on one line, for messages quoting a body.
function _M.excerpt(s, n)
  n = n or 200
  s = tostring(s or ""):gsub("%s+", " ")
  if #s > n then
    s = s:sub(1, n) .. "..."
  end
  return s
end

-- The provider's own error type and code, {type, code} (either may be
-- nil), from an error object {type, message[, code]}; nil when it has none.
function _M.provider_error(e)
  if type(e) ~= "table" then
    return nil
  end
  local t = _M.str(e.type)
  local c = e.code
  c = (type(c) == "string" or math.type(c) == "integer") and tostring(c) or nil
  if not t and not c then
    return nil
  end
  return { type = t, code = c }
end

-- The error for a non-2xx reply: kind from the status, the provider's own
-- message when its JSON error shape carries one. extra: retry_after, and
-- provider_error when the body has an error object (both APIs' shape;
-- error_of(doc.error), when given, reads the provider's own first).
function _M.http_error(status, headers, body, message_of, error_of)
  local kind = _M.kind_for_status(status)
  local doc = cjson.decode(body or "")
  local msg = type(doc) == "table" and message_of(doc) or nil
  if not msg or msg == "" then
    msg = _M.excerpt(body, 200)
  end
  local message = msg ~= "" and fmt("HTTP %d: %s", status, _M.excerpt(msg, 500)) or fmt("HTTP %d", status)
  return nil, kind, message, {
    retry_after = _M.retry_after(headers),
    provider_error = type(doc) == "table" and (error_of and error_of(doc.error) or _M.provider_error(doc.error))
      or nil,
  }
end

-- Both APIs use a top-level "error" object: {type, message[, code]}.
function _M.error_object_message(doc)
  local e = doc.error
  if type(e) == "table" then
    return _M.str(e.message) or _M.str(e.type)
  end
  return _M.str(e) or _M.str(doc.message)
end

function _M.is_event_stream(headers)
  local ct = type(headers) == "table" and headers["content-type"] or nil
  return type(ct) == "string" and ct:lower():find("text/event-stream", 1, true) ~= nil
end

return _M
