-- What the wire modules (aiorch.wire.openai, .anthropic, .gemini, .cohere)
-- share: the cells of their `fields` tables, small table helpers, and the
-- checks of their encoders, made once per API (`encoder(api, encoded)`).
-- Pure functions; no I/O.
local json = require "aiorch.json"
local util = require "aiorch.adapter"

local fmt = string.format
local type = type
local pairs = pairs
local ipairs = ipairs
local next = next
local error = error
local tostring = tostring
local tointeger = math.tointeger
local concat = table.concat
local max = math.max
local null = json.null

local _M = {}

-- Cells ---------------------------------------------------------------------
-- One cell per key of canonical.CELLS: {"pass"|"translate"|"refuse", how or
-- why, range}.

-- pass(), pass(how) or pass({range = ..., how = ...}) (the table itself).
function _M.pass(x)
  if type(x) == "table" then
    x[1] = "pass"
    return x
  end
  return { "pass", how = x }
end

function _M.translate(how, range)
  return { "translate", how = how, range = range }
end

function _M.refuse(why)
  return { "refuse", why = why }
end

-- Tables --------------------------------------------------------------------

function _M.set(list)
  local s = {}
  for _, k in ipairs(list) do
    s[k] = true
  end
  return s
end

-- A shallow copy.
function _M.copy(t)
  local c = {}
  for k, v in pairs(t) do
    c[k] = v
  end
  return c
end

-- A decoder's failure: nil, "path: message".
function _M.fail(path, msg)
  return nil, path .. ": " .. msg
end

-- A count written back to a client: 0 when absent.
function _M.tokens(v)
  return type(v) == "number" and tointeger(v) or 0
end

-- The text parts of a list joined (one part: its text, no new string).
function _M.text_of(parts)
  local one, out
  for _, p in ipairs(parts) do
    if p.type == "text" then
      if out then
        out[#out + 1] = p.text
      elseif one then
        out = { one, p.text }
      else
        one = p.text
      end
    end
  end
  return out and concat(out) or one or ""
end

-- Continuing an answer another provider began (a request's continue_from)
-- in a chat of {role, content} messages: the answer so far is the
-- assistant's, then a user turn asks for the rest.
function _M.continue_chat(msgs, partial)
  if type(partial) == "string" and partial ~= "" then
    msgs[#msgs + 1] = { role = "assistant", content = partial }
    msgs[#msgs + 1] = { role = "user", content = util.CONTINUE }
  end
end

-- What a stream decoder's :event returns for the canonical events out of
-- one server-sent event: a meta event when there are none, the event
-- when there is one, else the list.
function _M.events(out, sse)
  if #out == 0 then
    return { type = "meta", raw = sse }
  end
  return #out == 1 and out[1] or out
end

-- The number of choices a stream decoder keeps by index from 0: one more
-- than the highest index (0 for none).
function _M.choice_count(choices)
  local n = 0
  for idx in pairs(choices) do
    n = max(n, idx + 1)
  end
  return n
end

-- A stream's result, as decode_response gives it, from its choices in
-- order (each {index, content, response_text, finish_reason,
-- provider_finish_reason, logprobs}); the first is the answer's.
function _M.choices_result(list, text, model, usage, upstream)
  local one = list[1]
  return {
    content = one.content,
    text = text,
    choices = #list > 1 and list or nil,
    model = model,
    finish_reason = one.finish_reason,
    provider_finish_reason = one.provider_finish_reason,
    usage = usage or {},
    logprobs = one.logprobs,
    upstream = upstream,
  }
end

-- Entries of an encoder's REQUEST table (canonical field -> how it is
-- written): copied under a name, or nothing to write.
function _M.copy_to(name)
  return function(body, v)
    body[name] = v
  end
end

function _M.ignore() end

-- Decoding: extras ----------------------------------------------------------

-- extra_of(obj, known) for api: the fields of obj not in known (a set), as
-- an extra {api, fields}, or nil. A null field is no field.
function _M.extra_of_for(api)
  return function(obj, known)
    local fields
    for k, v in pairs(obj) do
      if not known[k] and v ~= null then
        fields = fields or {}
        fields[k] = v
      end
    end
    return fields and { api = api, fields = fields } or nil
  end
end

-- Encoding ------------------------------------------------------------------

-- The attributes each part type's encoder writes, for check_keys: those of
-- every API, with more[type] added (a list; a type of its own in more is
-- added whole).
function _M.encoded(more)
  local keys = {
    text = { "type", "text", "signature", "extra" },
    image = { "type", "source", "detail", "extra" },
    document = { "type", "source", "title", "filename", "extra" },
    tool_call = { "type", "id", "name", "arguments", "signature", "extra" },
    tool_result = { "type", "id", "content", "extra" },
    opaque = { "type", "api", "value", "name" },
  }
  for t, list in pairs(more or {}) do
    local have = keys[t]
    if not have then
      keys[t] = list
    else
      for _, k in ipairs(list) do
        have[#have + 1] = k
      end
    end
  end
  local out = {}
  for t, list in pairs(keys) do
    out[t] = _M.set(list)
  end
  return out
end

-- The checks of one API's encoder: encoder(api, encoded[, opts]) ->
-- {cannot, merge_extra, check_keys, opaque_value, write_fields, image_url,
-- default_only}. encoded: the attributes each part type's encoder writes
-- (_M.encoded). opts: arrays_replace (an extra's array replaces the
-- object's value instead of being merged into it), foreign_empty_refused
-- (an extra of another API raises even with no fields).
function _M.encoder(api, encoded, opts)
  opts = opts or {}
  local arrays_replace = opts.arrays_replace
  local foreign_empty_refused = opts.foreign_empty_refused
  local module = "wire." .. api
  local h = {}

  -- Raised when the encoder meets what it cannot write: canonical.unsupported
  -- refuses it, so getting it here is a bug of the caller.
  local function cannot(what)
    error(fmt("%s: cannot encode %s (canonical.unsupported refuses it)", module, what), 2)
  end
  h.cannot = cannot

  -- Adds the fields of an extra of api to a wire object, one level deep;
  -- another API's extra cannot be written.
  function h.merge_extra(obj, e, where)
    if e == nil or (not foreign_empty_refused and next(e.fields) == nil) then
      return obj -- (another API's headers only: nothing for this body)
    end
    if e.api ~= api then
      cannot(fmt("%s: %s fields", where, tostring(e.api)))
    end
    for k, v in pairs(e.fields) do
      local have = obj[k]
      if type(have) == "table" and type(v) == "table" and not (arrays_replace and json.is_array(v)) then
        for k2, v2 in pairs(v) do
          have[k2] = v2
        end
      else
        obj[k] = v
      end
    end
    return obj
  end

  -- Raises unless every attribute of part p is one its encoder writes (an
  -- is_error false says nothing).
  function h.check_keys(p, where)
    local known = encoded[p.type]
    if not known then
      cannot(fmt("%s: a %s part", where, tostring(p.type)))
    end
    for k, v in pairs(p) do
      if not known[k] and not (k == "is_error" and v == false) then
        cannot(where .. "." .. k)
      end
    end
  end

  -- An opaque part's value, which only its own API can take.
  function h.opaque_value(p, where)
    if p.api ~= api then
      cannot(fmt("%s: a %s part", where, tostring(p.api)))
    end
    return p.value
  end

  -- Writes each field of req (canonical.normalize's) into body with its
  -- entry of request (field -> fn(body, v, req)); a field without one
  -- cannot be written.
  function h.write_fields(request, body, req)
    for k, v in pairs(req) do
      local f = request[k]
      if not f then
        cannot(k)
      end
      f(body, v, req)
    end
    return body
  end

  -- An image part as an `image_url` item {url, detail} (OpenAI's, which
  -- Cohere takes too): base64 data as a data: URL.
  function h.image_url(p, where)
    local s = p.source
    local url
    if s.type == "base64" then
      url = "data:" .. s.media_type .. ";base64," .. s.data
    elseif s.type == "url" then
      url = s.url
    else
      cannot(where .. ": an image by " .. tostring(s.type))
    end
    return { type = "image_url", image_url = { url = url, detail = p.detail } }
  end

  -- A REQUEST entry for a field the API cannot set: only its default passes.
  function h.default_only(name, default)
    return function(_, v)
      if v ~= default then
        cannot(name)
      end
    end
  end

  return h
end

return _M
