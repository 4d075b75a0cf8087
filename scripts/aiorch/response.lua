-- StandardAIResponse: constructors, cost (aiorch.cost), and JSON encoding.
local cjson = require "cjson.safe"
local cost = require "aiorch.cost"

local fmt = string.format
local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local sort = table.sort
local concat = table.concat
local floor = math.floor
local math_type = math.type

local _M = {}

-- cost(model, usage) -> USD or nil (aiorch.cost.of: the price table and
-- the configuration's prices).
_M.cost = cost.of

local function ms(v)
  if type(v) ~= "number" then
    return 0
  end
  return floor(v + 0.5)
end

-- result: an adapter result {text, model, usage, finish_reason}.
-- result: an adapter's result (docs/lua-api.md); api: the wire API of the
-- provider that gave it. raw_body (the upstream's bytes, which a caller
-- of the same API gets as they are) is kept beside the response, never
-- encoded.
--
-- A constructor sizes a table for every field it names, nil or not, and
-- the nodes of a table of more than 8 fields are allocated with malloc,
-- not from the allocator's lists (src/base.c): the answer names its 8
-- fields (error_message is a failure's).
function _M.success(provider, result, latency_ms, http_status, api)
  local usage = result.usage or {}
  local text = result.text
  if text == nil and type(result.content) == "table" then
    text = _M.text_of(result.content)
  end
  return {
    ia_provider_name = provider,
    response_text = text or "",
    status = "success",
    latency_ms = ms(latency_ms),
    content = result.content,
    choices = result.choices,
    raw_body = result.raw_body,
    metadata = { -- (every field named: most answers have most, and attempts is added)
      model = result.model,
      usage = usage,
      finish_reason = result.finish_reason,
      provider_finish_reason = result.provider_finish_reason,
      logprobs = result.logprobs,
      upstream = result.upstream,
      api = api,
      http_status = http_status,
      cost_usd = cost.of(result.model, usage),
    },
  }
end

-- The text parts of a content list, joined.
function _M.text_of(content)
  local out = {}
  for _, part in ipairs(content) do
    if type(part) == "table" and part.type == "text" and type(part.text) == "string" then
      out[#out + 1] = part.text
    end
  end
  return concat(out)
end

-- kind "timeout" gives status "timeout"; every other kind gives "error".
-- provider is nil for a failure that is no provider's (a strategy's).
function _M.error(provider, kind, message, latency_ms, meta)
  meta = meta or {}
  meta.error_kind = kind
  return {
    ia_provider_name = provider,
    response_text = "",
    status = kind == "timeout" and "timeout" or "error",
    latency_ms = ms(latency_ms),
    error_message = message or kind,
    metadata = meta,
  }
end

function _M.is_response(v)
  if type(v) ~= "table" or type(v.status) ~= "string" then
    return false
  end
  local p = v.ia_provider_name
  return type(p) == "string" or (p == nil and v.status ~= "success")
end

-- One entry of metadata.attempts.
function _M.attempt(r)
  local m = r.metadata or {}
  local a = {
    provider = r.ia_provider_name,
    status = r.status,
    latency_ms = r.latency_ms,
    http_status = m.http_status,
    cost_usd = m.cost_usd,
    cost_estimated = m.cost_estimated,
    unpriced = m.cost_usd == nil and m.usage ~= nil and (m.usage.input_tokens or m.usage.output_tokens) ~= nil
      or nil,
  }
  -- (a failure's: added when present, as success explains)
  if m.error_kind ~= nil or m.deadline ~= nil or m.retry_after ~= nil or m.provider_error ~= nil
    or m.upstream_error ~= nil then
    a.kind, a.deadline, a.retry_after = m.error_kind, m.deadline, m.retry_after
    a.provider_error, a.upstream_error = m.provider_error, m.upstream_error
  end
  return a
end

-- Appends r's attempts (or r itself, as one) to the list `into`.
function _M.add_attempts(into, r)
  local list = r.metadata and r.metadata.attempts
  if type(list) == "table" and #list > 0 then
    for _, a in ipairs(list) do
      into[#into + 1] = a
    end
  else
    into[#into + 1] = _M.attempt(r)
  end
  return into
end

local function failure_text(r)
  local m = r.metadata or {}
  local kind = m.error_kind or r.status
  local msg = r.error_message
  local who = tostring(r.ia_provider_name) .. (m.deployment and "/" .. m.deployment or "") -- (a deployment's id)
  if msg and msg ~= kind then
    return fmt("%s: %s (%s)", who, kind, msg)
  end
  return fmt("%s: %s", who, kind)
end

-- The error that names every failure. Status is "timeout" only when every
-- provider timed out.
function _M.all_failed(responses)
  local parts, attempts = {}, {}
  local all_timeout = #responses > 0
  local latency = 0
  for i, r in ipairs(responses) do
    parts[i] = failure_text(r)
    _M.add_attempts(attempts, r)
    all_timeout = all_timeout and r.status == "timeout"
    latency = latency + (r.latency_ms or 0)
  end
  local last = responses[#responses]
  local message = #parts > 0 and "all providers failed: " .. concat(parts, "; ") or "no provider to call"
  local resp = _M.error(last and last.ia_provider_name or "none", "all_failed", message, latency,
    { attempts = attempts })
  if all_timeout then
    resp.status = "timeout"
  end
  return resp
end

-- JSON encoding: fixed key order for readability, error_message and
-- ia_provider_name as null when absent, and empty lists as [].
local ORDER = {
  "ia_provider_name", "provider", "response_text", "status", "kind", "latency_ms", "error_message", "metadata",
  "model", "usage", "input_tokens", "output_tokens", "finish_reason", "http_status",
  "error_kind", "provider_error", "retry_after", "attempts", "cost_usd", "deadline", "partial_text", "continued_from",
}
local RANK = {}
for i, k in ipairs(ORDER) do
  RANK[k] = i
end
local ARRAY_FIELDS = { attempts = true, content = true }
-- Kept beside a response, not part of it.
local PRIVATE = { raw_body = true, unpriced = true }

local function key_less(a, b)
  local ra, rb = RANK[a] or 1000, RANK[b] or 1000
  if ra ~= rb then
    return ra < rb
  end
  return tostring(a) < tostring(b)
end

local function is_array(t)
  local n = #t
  if n == 0 then
    return false
  end
  local count = 0
  for _ in pairs(t) do
    count = count + 1
  end
  return count == n
end

local encode_value

local function encode_table(t, as_array, depth)
  if depth > 32 then
    return '"<nested too deep>"'
  end
  local out = {}
  if as_array or is_array(t) then
    for i = 1, #t do
      out[i] = encode_value(t[i], false, depth + 1)
    end
    return "[" .. concat(out, ",") .. "]"
  end
  local keys = {}
  for k, v in pairs(t) do
    if (type(k) == "string" or type(k) == "number") and type(v) ~= "function" and not PRIVATE[k] then
      keys[#keys + 1] = k
    end
  end
  sort(keys, key_less)
  for i, k in ipairs(keys) do
    out[i] = cjson.encode(tostring(k)) .. ":" .. encode_value(t[k], ARRAY_FIELDS[k], depth + 1)
  end
  return "{" .. concat(out, ",") .. "}"
end

function encode_value(v, as_array, depth)
  local tv = type(v)
  if tv == "table" then
    return encode_table(v, as_array, depth or 0)
  elseif tv == "number" then
    if v ~= v or v == math.huge or v == -math.huge then
      return "null"
    end
    if math_type(v) == "float" and v == floor(v) and v > -2 ^ 53 and v < 2 ^ 53 then
      return fmt("%d", v)
    end
    return cjson.encode(v) or "null"
  elseif tv == "string" or tv == "boolean" then
    return cjson.encode(v) or "null"
  end
  return "null"
end

-- Kept nil in Lua (arithmetic stays simple), null in JSON: a response's
-- error_message and ia_provider_name, and its cost when unknown.
local function with_nulls(r)
  if type(r) ~= "table" or not r.status then
    return r
  end
  local m = r.metadata
  local no_cost = type(m) == "table" and m.cost_usd == nil
  if r.error_message == nil or r.ia_provider_name == nil or no_cost then
    local copy = {}
    for k, v in pairs(r) do
      copy[k] = v
    end
    copy.error_message = r.error_message or cjson.null
    copy.ia_provider_name = r.ia_provider_name or cjson.null
    if no_cost then
      local mc = {}
      for k, v in pairs(m) do
        mc[k] = v
      end
      mc.cost_usd = cjson.null
      copy.metadata = mc
    end
    return copy
  end
  return r
end

-- encode(response) or encode({response, ...}) -> JSON text.
function _M.encode(v)
  if _M.is_response(v) then
    return encode_value(with_nulls(v), false, 0)
  end
  local out = {}
  for i, r in ipairs(v) do
    out[i] = encode_value(with_nulls(r), false, 0)
  end
  return "[" .. concat(out, ",") .. "]"
end

return _M
