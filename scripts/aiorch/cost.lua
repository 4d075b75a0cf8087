-- What a call costs: the price table (scripts/aiorch/prices.lua, data)
-- with the configuration's overrides, a model's price, the cost of a
-- canonical usage, and an estimate of a request before it is sent.
local log = require "aiorch.log"

local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local fmt = string.format
local max = math.max
local huge = math.huge

local _M = {}

local FIELDS = { "input", "output", "cached_read", "cache_write", "reasoning" }
local CACHE_MAX = 1024 -- model names remembered (found or not), then forgotten
local WARNED_MAX = 1024 -- models warned about, then forgotten (and warned again)
_M.default_output_tokens = 1024 -- an estimate's output without max_tokens
_M.chars_per_token = 4 -- an estimate's input: the request's characters / this

-- A price entry checked and completed: the absent cache and reasoning
-- prices are those of input and output. nil, message when it is wrong.
local function normalize(model, e)
  if type(e) ~= "table" then
    return nil, fmt("prices[%q]: must be a table {input = ..., output = ...}", tostring(model))
  end
  for k in pairs(e) do
    if k ~= "source" and k ~= "date" and not (type(k) == "string" and (k == "input" or k == "output"
      or k == "cached_read" or k == "cache_write" or k == "reasoning")) then
      return nil, fmt("prices[%q]: unknown field %q (known: %s, source, date)", tostring(model), tostring(k),
        table.concat(FIELDS, ", "))
    end
  end
  for _, k in ipairs(FIELDS) do
    local v = e[k]
    local required = k == "input" or k == "output"
    if v == nil and required then
      return nil, fmt("prices[%q].%s: required (USD per 1M tokens)", tostring(model), k)
    end
    if v ~= nil and (type(v) ~= "number" or v ~= v or v < 0 or v == huge) then
      return nil, fmt("prices[%q].%s: must be a number >= 0 (USD per 1M tokens)", tostring(model), k)
    end
  end
  if e.source ~= nil and type(e.source) ~= "string" or e.date ~= nil and type(e.date) ~= "string" then
    return nil, fmt("prices[%q]: source and date must be strings", tostring(model))
  end
  return {
    input = e.input, output = e.output,
    cached_read = e.cached_read or e.input, cache_write = e.cache_write or e.input,
    reasoning = e.reasoning or e.output,
    source = e.source, date = e.date,
  }
end

-- prices: {model = entry} -> the same, checked and completed; nil, message.
function _M.check(prices)
  if type(prices) ~= "table" then
    return nil, "prices: must be a table {model = {input = ..., output = ...}}"
  end
  local out = {}
  for model, e in pairs(prices) do
    if type(model) ~= "string" or model == "" or #model > 200 then
      return nil, "prices: a model name must be a string of 1 to 200 characters"
    end
    local p, err = normalize(model, e)
    if not p then
      return nil, err
    end
    out[model] = p
  end
  return out
end

local table_ = assert(_M.check(require "aiorch.prices"))
package.loaded["aiorch.prices"] = nil -- the checked copy is the one kept (the heap is traversed by every GC cycle)
_M.table = table_

-- The configuration's prices (checked), in force for metadata.cost_usd and ctx.price.
local configured = nil
local found, n_found = {}, 0 -- model -> price or false: the lookups of configured prices

-- Sets the configuration's overrides (a table checked by check, or nil).
function _M.configure(prices)
  configured = prices
  found, n_found = {}, 0
end

function _M.overrides()
  return configured
end

-- The name without a date at its end: -20241022, -2024-07-18, -03-2025 or
-- a version such as -001; nil when it has none.
local function undated(model)
  return model:match("^(.+)%-%d%d%d%d%d%d%d%d$") or model:match("^(.+)%-%d%d%d%d%-%d%d%-%d%d$")
    or model:match("^(.+)%-%d%d%-%d%d%d%d$") or model:match("^(.+)%-%d%d%d$")
end

-- An entry of the overrides a caller gave as they are (not through
-- check): completed, or nil when it is wrong.
local function complete(model, e)
  if type(e) == "table" and (e.cached_read == nil or e.cache_write == nil or e.reasoning == nil) then
    return (normalize(model, e))
  end
  return e
end

local function lookup(model, overrides)
  local p = overrides and complete(model, overrides[model]) or table_[model]
  if p then
    return p
  end
  local base = undated(model)
  if base then
    return overrides and complete(base, overrides[base]) or table_[base]
  end
  return nil
end

-- price(model[, overrides]) -> {input, output, cached_read, cache_write,
-- reasoning, source, date} in USD per 1M tokens, or nil: the exact name,
-- then the name without its date. overrides (checked by check) come first;
-- without it, the configuration's.
function _M.price(model, overrides)
  if type(model) ~= "string" then
    return nil
  end
  if overrides ~= nil then
    return lookup(model, overrides)
  end
  local p = found[model]
  if p == nil then
    p = lookup(model, configured) or false
    if n_found >= CACHE_MAX then
      found, n_found = {}, 0
    end
    found[model] = p
    n_found = n_found + 1
  end
  return p or nil
end

-- The cost in USD of a price p and a canonical usage (input_tokens counts
-- every input token, cached ones included; output_tokens includes
-- reasoning). Counts are numbers or nil (docs/lua-api.md: an adapter's
-- result); on every answer, so the common case (no cache, no reasoning)
-- is the short one.
local function cost_of(p, usage)
  local i, o = usage.input_tokens or 0, usage.output_tokens or 0
  local cr, cw, r = usage.cached_input_tokens, usage.cache_write_tokens, usage.reasoning_tokens
  if not cr or cr == 0 then
    if (not cw or cw == 0) and (not r or r == 0) then
      return (i * p.input + o * p.output) / 1e6
    end
    cr = 0
  end
  cw, r = cw or 0, r or 0
  return (max(i - cr - cw, 0) * p.input + cr * p.cached_read + cw * p.cache_write
    + max(o - r, 0) * p.output + r * p.reasoning) / 1e6
end
_M.cost_of = cost_of

local warned, n_warned = {}, 0

local function unpriced(model)
  if type(model) == "string" and not warned[model] then
    if n_warned >= WARNED_MAX then
      warned, n_warned = {}, 0
    end
    warned[model] = true
    n_warned = n_warned + 1
    log.warn("cost: no price for model %q: cost_usd is null (add it under prices in the configuration)",
      #model > 100 and model:sub(1, 100) .. "..." or model)
  end
  return nil
end

-- of(model, usage[, overrides]) -> cost_usd, or nil when the model has no
-- price (one warning per model) or there is no usage to price.
function _M.of(model, usage, overrides)
  if type(usage) ~= "table" or usage.input_tokens == nil and usage.output_tokens == nil then
    return nil
  end
  local p = overrides == nil and model ~= nil and found[model] -- (the lookup's cache, inline: every answer comes here)
  if not p then
    p = _M.price(model, overrides)
    if not p then
      return unpriced(model)
    end
  end
  return cost_of(p, usage)
end

-- The characters of a request's text: messages (strings and text parts),
-- the simple form's question, context and system prompt.
local function chars_of_content(c)
  if type(c) == "string" then
    return #c
  elseif type(c) ~= "table" then
    return 0
  end
  local n = 0
  for _, part in ipairs(c) do
    if type(part) == "table" then
      local t = part.text or part.arguments or part.content
      if type(t) == "string" then
        n = n + #t
      elseif type(t) == "table" then
        n = n + chars_of_content(t)
      end
    end
  end
  return n
end

-- Input and output tokens a request will likely use: its text's characters
-- / chars_per_token (at least 1), and max_tokens or default_output_tokens.
function _M.estimate_tokens(request)
  local n = 0
  if type(request) == "table" then
    for _, k in ipairs({ "user_question", "context", "system_prompt" }) do
      if type(request[k]) == "string" then
        n = n + #request[k]
      end
    end
    if type(request.messages) == "table" then
      for _, m in ipairs(request.messages) do
        if type(m) == "table" then
          n = n + chars_of_content(m.content)
        end
      end
    end
  end
  local out = type(request) == "table" and type(request.max_tokens) == "number" and request.max_tokens > 0
    and request.max_tokens or _M.default_output_tokens
  return max(1, (n + _M.chars_per_token - 1) // _M.chars_per_token), out
end

-- estimate(model, request[, overrides]) -> USD, input tokens, output
-- tokens; nil when the model has no price.
function _M.estimate(model, request, overrides)
  local p = _M.price(model, overrides)
  local i, o = _M.estimate_tokens(request)
  if not p then
    return nil, i, o
  end
  return (i * p.input + o * p.output) / 1e6, i, o
end

-- The tokens of a text that was streamed, when the provider did not count
-- them (a cancelled stream): chars_per_token characters a token.
function _M.tokens_of_text(n_chars)
  if type(n_chars) ~= "number" or n_chars <= 0 then
    return 0
  end
  return (n_chars + _M.chars_per_token - 1) // _M.chars_per_token
end

return _M
