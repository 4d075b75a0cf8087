-- Shared by the gateway's endpoints: reading a request body, and what an
-- orchestration's result says (usage, successes, the failure's status).
-- The APIs' own translations are aiorch.wire.openai and .anthropic.
local cjson = require "cjson.safe"
local json = require "aiorch.json"
local policy = require "aiorch.policy"

local fmt = string.format
local type = type
local ipairs = ipairs
local tostring = tostring
local concat = table.concat
local tointeger = math.tointeger
local ceil = math.ceil

local EMPTY = {} -- never written

local _M = {}

local null = cjson.null
_M.null = null

function _M.absent(v)
  return v == nil or v == null
end

-- Decodes a request body that must be a JSON object (with aiorch.json:
-- an empty array stays one, should the body go to another API).
function _M.decode_object(body)
  if body == nil or body == "" then
    return nil, "the request body is empty; a JSON object is required"
  end
  local doc, err = json.decode(body)
  if doc == nil then
    return nil, "malformed JSON body: " .. tostring(err)
  end
  if type(doc) ~= "table" or (#doc > 0) or doc[1] ~= nil or json.is_array(doc) then
    return nil, "the request body must be a JSON object"
  end
  return doc
end

function _M.json_string(s)
  return cjson.encode(tostring(s or ""))
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

-- Whether every attempt behind r that was sent was refused by its
-- upstream as a bad request (aiorch.call's upstream_error; providers
-- skipped as unable to take the request do not count). Returns that, and
-- the first refusal (found: the first so far).
local function rejected(r, found)
  local m = r.metadata or EMPTY
  local list = type(m.attempts) == "table" and #m.attempts > 0 and m.attempts or { m }
  for _, a in ipairs(list) do
    if (a.kind or a.error_kind) ~= "unsupported" and a.status ~= "success" then
      local u = a.upstream_error
      if not u then
        return false
      end
      found = found or u
    end
  end
  return found ~= nil, found
end

-- The failure a result stands for: status 504 when every provider timed
-- out, 429 when every one rate-limited the request, 503 when every one is
-- cooling down (nothing was sent), the upstream's own 4xx when every one
-- refused the request itself, else 502. Returns status, kind, message,
-- for a 429 the Retry-After to pass on (whole seconds, as a string) if a
-- provider asked for one, and for a refusal the first upstream's
-- ({api, status, body}: a client of that API gets its body as it is).
function _M.failure(result)
  local list = result.status and { result } or result
  local timeout, cooling, limited, refused, msgs = #list > 0, #list > 0, #list > 0, #list > 0, {}
  local wait, refusal
  for _, r in ipairs(list) do
    timeout = timeout and r.status == "timeout"
    cooling = cooling and all_cooling(r)
    if limited then
      limited, wait = rate_limited(r, wait)
    end
    if refused then
      refused, refusal = rejected(r, refusal)
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
  if refused then
    local e = refusal.body.error
    local said = type(e) == "table" and type(e.message) == "string" and e.message or concat(msgs, "; ")
    return refusal.status, nil, fmt("provider %s refused the request (HTTP %d): %s", tostring(refusal.provider),
      refusal.status, said), nil, refusal
  end
  return 502, kind, concat(msgs, "; ")
end

return _M
