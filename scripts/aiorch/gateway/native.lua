-- POST /v1/orchestrate: an AIRequest plus `strategy` and `providers` in,
-- a StandardAIResponse (or a list, for parallel) out, as `aiorch ask --json`
-- prints it. Gateway-level errors (400, 401, 404 …) use
-- {"error": {"type": …, "message": …}}; an upstream failure is the
-- StandardAIResponse itself, with status 502 (or 504 when every provider
-- timed out).
local common = require "aiorch.gateway.common"

local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local sort = table.sort
local concat = table.concat
local js = common.json_string

local _M = { name = "native" }

local ERROR_TYPES = {
  [400] = "invalid_request", [401] = "unauthorized", [404] = "not_found", [405] = "method_not_allowed",
  [413] = "too_large", [500] = "internal", [502] = "upstream_error", [503] = "unavailable", [504] = "timeout",
}

function _M.error_body(status, message)
  return concat { '{"error":{"type":', js(ERROR_TYPES[status] or "error"), ',"message":', js(message), "}}" }
end

-- The AIRequest's fields (docs/canonical.md): the simple form and the
-- conversation; aiorch.request checks their values.
local FIELDS = { "user_question", "context", "temperature", "max_tokens", "system_prompt", "policy",
  "messages", "tools", "tool_choice", "parallel_tool_calls", "response_format", "stop", "top_p", "top_k", "seed",
  "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "n", "user", "metadata", "reasoning",
  "stream_options", "extra" }
local KNOWN = { strategy = true, providers = true, model = true, stream = true }
for _, f in ipairs(FIELDS) do
  KNOWN[f] = true
end

-- Returns {request, strategy, providers, model} or nil, message.
function _M.parse(doc)
  local req = {}
  for _, f in ipairs(FIELDS) do
    if not common.absent(doc[f]) then
      req[f] = doc[f]
    end
  end
  local unknown = {}
  for k in pairs(doc) do
    if not KNOWN[k] then
      unknown[#unknown + 1] = tostring(k)
    end
  end
  if #unknown > 0 then
    sort(unknown)
    return nil, unknown[1] .. ": not a field of an AIRequest (docs/canonical.md), nor strategy, providers or model"
  end
  if doc.stream == true then
    return nil, "stream: this endpoint answers whole; /v1/chat/completions and /v1/messages stream"
  end
  local strategy = doc.strategy
  if common.absent(strategy) then
    strategy = nil
  elseif type(strategy) ~= "string" then
    return nil, "strategy: must be a string"
  end
  local providers = doc.providers
  if common.absent(providers) then
    providers = nil
  elseif type(providers) == "string" then
    local list = {}
    for n in providers:gmatch("[^,%s]+") do
      list[#list + 1] = n
    end
    providers = list
  elseif type(providers) == "table" then
    for i, p in ipairs(providers) do
      if type(p) ~= "string" then
        return nil, ("providers[%d]: must be a string"):format(i - 1)
      end
    end
  else
    return nil, "providers: must be a list of names or a comma-separated string"
  end
  if providers and #providers == 0 then
    providers = nil
  end
  return { request = req, strategy = strategy, providers = providers, model = doc.model }
end

return _M
