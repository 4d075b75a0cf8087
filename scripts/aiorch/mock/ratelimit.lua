-- The mock's rate limits (m:rate_limit in scripts/aiorch/mock.lua):
-- counted per key (the request's API key), in fixed windows from the key's first request, and told in every answer's
-- headers as the real APIs do:
--   OpenAI     x-ratelimit-{limit,remaining,reset}-{requests,tokens},
--              resets as durations ("59.5s", "1m0s", "20ms")
--   Anthropic  anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
--              {limit,remaining,reset}, resets as RFC 3339 times
-- A request charges 1 request and its tokens: the body's length / 4 plus
-- its max_tokens (as OpenAI charges on arrival). Past a limit: a 429 in the
-- API's shape, with retry-after (seconds) and the same headers.
local aiorch = require "aiorch"

local fmt = string.format
local ceil, floor = math.ceil, math.floor
local ipairs, type, tostring, setmetatable = ipairs, type, tostring, setmetatable
local os_time, os_date = os.time, os.date
local now = aiorch.now

local _M = {}

local function duration_text(ms)
  if ms < 1000 then
    return fmt("%dms", ceil(ms))
  elseif ms < 60000 then
    return fmt("%.14gs", floor(ms / 100 + 0.5) / 10)
  end
  return fmt("%dm%ds", floor(ms / 60000), floor(ms % 60000 / 1000))
end

local function rfc3339(epoch)
  return os_date("!%Y-%m-%dT%H:%M:%SZ", floor(epoch))
end

local function tokens_charged(req)
  local doc = req.json
  local n = #(req.body or "") // 4
  if type(doc) == "table" then
    local m = doc.max_tokens or doc.max_completion_tokens
    n = n + (type(m) == "number" and m or 0)
  end
  return n
end

-- Charges req to its key (rl: the limits, windows: the keys' windows); returns the headers to send and whether it is
-- over a limit (then the seconds until its window resets).
function _M.check(rl, windows, req, api)
  local headers = req.headers
  local key = headers["authorization"] or headers["x-api-key"] or headers["api-key"] or ""
  local t = now()
  local w = windows[key]
  if not w or t >= w.start + rl.window_ms then
    w = { start = t, requests = 0, tokens = 0 }
    windows[key] = w
  end
  local tokens = tokens_charged(req)
  local over = (rl.requests and w.requests + 1 > rl.requests) or (rl.tokens and w.tokens + tokens > rl.tokens)
  if not over then
    w.requests, w.tokens = w.requests + 1, w.tokens + tokens
  end
  local left_ms = w.start + rl.window_ms - t
  local out = {}
  if api == "anthropic" then
    local reset = rfc3339(os_time() + ceil(left_ms / 1000))
    if rl.requests then
      out["anthropic-ratelimit-requests-limit"] = tostring(rl.requests)
      out["anthropic-ratelimit-requests-remaining"] = tostring(rl.requests - w.requests)
      out["anthropic-ratelimit-requests-reset"] = reset
    end
    if rl.tokens then
      for _, kind in ipairs { "tokens", "input-tokens", "output-tokens" } do
        out["anthropic-ratelimit-" .. kind .. "-limit"] = tostring(rl.tokens)
        out["anthropic-ratelimit-" .. kind .. "-remaining"] = tostring(rl.tokens - w.tokens)
        out["anthropic-ratelimit-" .. kind .. "-reset"] = reset
      end
    end
  else
    local reset = duration_text(left_ms)
    if rl.requests then
      out["x-ratelimit-limit-requests"] = tostring(rl.requests)
      out["x-ratelimit-remaining-requests"] = tostring(rl.requests - w.requests)
      out["x-ratelimit-reset-requests"] = reset
    end
    if rl.tokens then
      out["x-ratelimit-limit-tokens"] = tostring(rl.tokens)
      out["x-ratelimit-remaining-tokens"] = tostring(rl.tokens - w.tokens)
      out["x-ratelimit-reset-tokens"] = reset
    end
  end
  return out, over and ceil(left_ms / 1000) or nil
end

-- A response writer that adds `extra` to the headers of whatever is sent.
function _M.adding_headers(res, extra, with_headers)
  return setmetatable({}, {
    __index = function(_, k)
      local f = res[k]
      if k == "respond" or k == "start" then
        return function(_, status, headers, ...)
          return f(res, status, with_headers(headers or {}, extra), ...)
        end
      end
      return function(_, ...)
        return f(res, ...)
      end
    end,
  })
end

return _M
