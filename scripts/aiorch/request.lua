-- AIRequest validation. Runs before any network call; each error names
-- the field at fault.
local cjson = require "cjson.safe"
local policy = require "aiorch.policy"

local fmt = string.format
local type = type
local ipairs = ipairs
local tostring = tostring
local tointeger = math.tointeger

local _M = {}

local null = cjson.null

_M.fields = { "user_question", "context", "temperature", "max_tokens", "system_prompt", "policy" }

local function absent(v)
  return v == nil or v == null
end

local function show(v)
  if type(v) == "string" then
    return fmt("%q", #v > 40 and v:sub(1, 40) .. "..." or v)
  end
  return tostring(v)
end

local function range_text(r)
  return fmt("%s..%s", tostring(r[1]), tostring(r[2]))
end

-- validate(request, adapters) -> a clean copy, or nil, message.
-- adapters: the chosen providers' adapters; the temperature must be
-- within every one's temperature_range.
function _M.validate(req, adapters)
  if type(req) ~= "table" then
    return nil, "request: must be a table"
  end
  local q = req.user_question
  if absent(q) then
    return nil, "user_question: required"
  end
  if type(q) ~= "string" then
    return nil, fmt("user_question: must be a string (got %s)", type(q))
  end
  if not q:find("%S") then
    return nil, "user_question: must not be empty"
  end

  local out = { user_question = q }

  local c, s = req.context, req.system_prompt
  if not absent(c) then
    if type(c) ~= "string" then
      return nil, fmt("context: must be a string (got %s)", type(c))
    end
    out.context = c
  end
  if not absent(s) then
    if type(s) ~= "string" then
      return nil, fmt("system_prompt: must be a string (got %s)", type(s))
    end
    out.system_prompt = s
  end

  local t = req.temperature
  if not absent(t) then
    if type(t) ~= "number" or t ~= t then
      return nil, fmt("temperature: must be a number (got %s)", show(t))
    end
    for _, a in ipairs(adapters or {}) do
      local r = a.temperature_range
      if r and (t < r[1] or t > r[2]) then
        return nil, fmt("temperature: %s is outside %s's range %s", tostring(t), a.name or "?", range_text(r))
      end
    end
    out.temperature = t
  end

  local m = req.max_tokens
  if not absent(m) then
    local n = type(m) == "number" and tointeger(m) or nil
    if not n or n <= 0 then
      return nil, fmt("max_tokens: must be a positive integer (got %s)", show(m))
    end
    out.max_tokens = n
  end

  -- Per-request overrides of the providers' policies (retries, deadlines...).
  if not absent(req.policy) then
    local p, perr = policy.check(req.policy, "policy")
    if not p then
      return nil, perr
    end
    out.policy = p
  end
  return out
end

return _M
