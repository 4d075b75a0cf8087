-- Shared by the two API shapes: reading messages into an AIRequest, and
-- small JSON helpers.
--
-- A conversation becomes one AIRequest: system messages (or Anthropic's
-- `system`) join into system_prompt; the last user message is the
-- user_question; earlier turns are folded, in order, into `context` as
-- "role: text" lines, which the adapters send ahead of the question. The
-- gateway never adds the prompt builder's own system prompt to these
-- requests (system_prompt is "" when the client sent none).
local cjson = require "cjson.safe"
local policy = require "aiorch.policy"

local fmt = string.format
local type = type
local ipairs = ipairs
local tostring = tostring
local concat = table.concat
local tointeger = math.tointeger
local byte = string.byte
local ceil = math.ceil

local EMPTY = {} -- never written

local _M = {}

local null = cjson.null
_M.null = null

function _M.absent(v)
  return v == nil or v == null
end

-- Decodes a request body that must be a JSON object.
function _M.decode_object(body)
  if body == nil or body == "" then
    return nil, "the request body is empty; a JSON object is required"
  end
  local doc, err = cjson.decode(body)
  if doc == nil then
    return nil, "malformed JSON body: " .. tostring(err)
  end
  if type(doc) ~= "table" or (#doc > 0) or doc[1] ~= nil then
    return nil, "the request body must be a JSON object"
  end
  return doc
end

-- The text of a message content: a string or a list of text parts.
-- Returns nil, message for a part it cannot carry (images, tools).
function _M.content_text(c, where)
  if type(c) == "string" then
    return c
  end
  if type(c) ~= "table" then
    return nil, fmt("%s: must be a string or a list of text parts", where)
  end
  local out = {}
  for i, part in ipairs(c) do
    if type(part) ~= "table" or part.type ~= "text" or type(part.text) ~= "string" then
      return nil, fmt("%s[%d]: only text parts are supported", where, i - 1)
    end
    out[#out + 1] = part.text
  end
  return concat(out, "\n")
end

-- messages: the client's list; system: extra system text (Anthropic).
-- Returns an AIRequest (without temperature/max_tokens) or nil, message.
local function where_of(i)
  return fmt("messages[%d]", i - 1)
end

-- Whether s has a non-space character (as %S), looking at its first byte first.
local function has_text(s)
  local b = byte(s, 1)
  if b and b ~= 32 and (b < 9 or b > 13) then
    return true
  end
  return s:find("%S") ~= nil
end

function _M.fold(messages, system_parts)
  if type(messages) ~= "table" or #messages == 0 then
    return nil, "messages: a non-empty list is required"
  end
  local systems = system_parts
  local turns = {} -- role, text, role, text, ...
  local n = 0
  for i, m in ipairs(messages) do
    if type(m) ~= "table" then
      return nil, where_of(i) .. ": must be an object"
    end
    local role = m.role
    if role ~= "system" and role ~= "developer" and role ~= "user" and role ~= "assistant" then
      return nil, fmt("%s.role: must be system, user or assistant", where_of(i))
    end
    local text, err = m.content
    if type(text) ~= "string" then
      text, err = _M.content_text(text, where_of(i) .. ".content")
      if not text then
        return nil, err
      end
    end
    if role == "system" or role == "developer" then
      systems = systems or {}
      systems[#systems + 1] = text
    else
      turns[n + 1], turns[n + 2] = role, text
      n = n + 2
    end
  end
  if n == 0 or turns[n - 1] ~= "user" then
    return nil, "messages: the last message must come from the user"
  end
  local question = turns[n]
  if not has_text(question) then
    return nil, "messages: the last user message is empty"
  end
  local context
  if n > 2 then
    local earlier = {}
    for i = 1, n - 2, 2 do
      earlier[#earlier + 1] = turns[i] .. ": " .. turns[i + 1]
    end
    context = "Conversation so far:\n" .. concat(earlier, "\n")
  end
  return {
    user_question = question,
    context = context,
    system_prompt = systems and concat(systems, "\n\n") or "",
  }
end

-- A number field: nil when absent, else the number or nil, message.
function _M.number_field(doc, name)
  local v = doc[name]
  if _M.absent(v) then
    return nil
  end
  if type(v) ~= "number" then
    return nil, fmt("%s: must be a number", name)
  end
  return v
end

function _M.int_field(doc, name)
  local v = doc[name]
  if _M.absent(v) then
    return nil
  end
  local n = type(v) == "number" and tointeger(v) or nil
  if not n or n <= 0 then
    return nil, fmt("%s: must be a positive integer", name)
  end
  return n
end

function _M.json_string(s)
  return cjson.encode(tostring(s or ""))
end

-- json_string for the few values that repeat (models, finish reasons):
-- encoded once. Bounded: emptied when full; long strings are not kept.
local js_cache, js_count = {}, 0
function _M.json_word(s)
  local hit = js_cache[s]
  if hit then
    return hit
  end
  local out = _M.json_string(s)
  if type(s) == "string" and #s <= 128 then
    if js_count >= 256 then
      js_cache, js_count = {}, 0
    end
    js_cache[s] = out
    js_count = js_count + 1
  end
  return out
end

-- The usage numbers of a response (0 when the provider gave none).
function _M.usage(r)
  local u = r and r.metadata and r.metadata.usage or EMPTY
  return tointeger(u.input_tokens) or 0, tointeger(u.output_tokens) or 0
end

-- Successful responses of a result (one response or a list).
function _M.successes(result)
  if result.status then
    local list = { result }
    return result.status == "success" and list or {}, list
  end
  local list = result
  local out = {}
  for _, r in ipairs(list) do
    if r.status == "success" then
      out[#out + 1] = r
    end
  end
  return out, list
end

-- Whether every attempt behind r was refused by a cooling provider.
local function all_cooling(r)
  local m = r.metadata or {}
  if m.error_kind == "cooldown" then
    return true
  end
  local list = m.attempts
  if m.error_kind ~= "all_failed" or type(list) ~= "table" or #list == 0 then
    return false
  end
  for _, a in ipairs(list) do
    if a.kind ~= "cooldown" then
      return false
    end
  end
  return true
end

-- Whether every attempt behind r was rate-limited: answered 429, or
-- skipped while its provider waits out a Retry-After it sent earlier.
-- Returns that, and the shortest wait asked (in ms; wait is the shortest
-- so far, or nil).
local function rate_limited(r, wait)
  local m = r.metadata or EMPTY
  local list = m.error_kind == "all_failed" and m.attempts or { m }
  for _, a in ipairs(list) do
    local kind = a.kind or a.error_kind
    if kind ~= "rate_limited" and not (kind == "cooldown" and a.retry_after) then
      return false
    end
    local ms = policy.retry_after_ms(a.retry_after)
    if ms and (not wait or ms < wait) then
      wait = ms
    end
  end
  return #list > 0, wait
end

-- The failure a result stands for: status 504 when every provider timed
-- out, 429 when every one rate-limited the request, 503 when every one is
-- cooling down (nothing was sent), else 502. Returns status, kind, message
-- and for a 429 the Retry-After to pass on (whole seconds, as a string) if
-- a provider asked for one.
function _M.failure(result)
  local list = result.status and { result } or result
  local timeout, cooling, limited, msgs = #list > 0, #list > 0, #list > 0, {}
  local wait
  for _, r in ipairs(list) do
    timeout = timeout and r.status == "timeout"
    cooling = cooling and all_cooling(r)
    if limited then
      limited, wait = rate_limited(r, wait)
    end
    msgs[#msgs + 1] = r.error_message or r.status
  end
  local first = list[1] or {}
  local kind = first.metadata and first.metadata.error_kind or "upstream"
  if timeout then
    return 504, "timeout", concat(msgs, "; ")
  end
  if limited then
    return 429, "rate_limited", concat(msgs, "; "), wait and tostring(ceil(wait / 1000)) or nil
  end
  if cooling then
    return 503, "cooldown", concat(msgs, "; ")
  end
  return 502, kind, concat(msgs, "; ")
end

return _M
