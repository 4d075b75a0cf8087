-- One provider call: adapter.build_request -> aiorch.http.request (yields)
-- -> parse -> StandardAIResponse. Never raises because a provider misbehaved.
local core = require "aiorch"
local response = require "aiorch.response"
local metrics = require "aiorch.metrics"
local util = require "aiorch.adapter"
local log = require "aiorch.log"

local fmt = string.format
local type = type
local pairs = pairs
local pcall = pcall
local tostring = tostring
local setmetatable = setmetatable
local http = core.http
local now = core.now

local _M = {}

-- Providers sometimes quote the key back (e.g. in a 401 message).
local function scrub(msg, key)
  msg = tostring(msg or "")
  if type(key) == "string" and #key >= 4 then
    local i, j = msg:find(key, 1, true)
    while i do
      msg = msg:sub(1, i - 1) .. "[redacted]" .. msg:sub(j + 1)
      i, j = msg:find(key, i + 10, true)
    end
  end
  return (msg:gsub("[\r\n]+", " "))
end

local function fail(name, config, kind, msg, t0, meta)
  meta = meta or {}
  meta.model = meta.model or config.model
  return response.error(name, kind, scrub(msg, config.key), now() - t0, meta)
end

local function finish(name, resp)
  metrics.finished(name, resp)
  if log.enabled("debug") then
    log.debug("%s: %s in %d ms%s", name, resp.status, resp.latency_ms,
      resp.error_message and (" (" .. resp.error_message .. ")") or "")
  end
  return resp
end

-- Header values already checked (free of CR and LF): the same few repeat.
local checked, n_checked = {}, 0

local function header_ok(v)
  local tv = type(v)
  if tv == "number" or checked[v] then
    return true
  end
  if tv ~= "string" or v:find("[\r\n]") then
    return false
  end
  if #v <= 512 then
    if n_checked >= 256 then
      checked, n_checked = {}, 0
    end
    checked[v] = true
    n_checked = n_checked + 1
  end
  return true
end

-- Counts a call whose task was cancelled before it finished.
local cancel_guard = {
  __close = function(g)
    if not g.finished then
      metrics.cancelled(g.name)
    end
  end,
}

-- call(adapter, config, request[, opts]) -> StandardAIResponse
-- config: from aiorch.config.provider; request: a validated AIRequest.
-- opts: stream, on_token(text, provider), timeout_ms.
function _M.call(adapter, config, request, opts)
  opts = opts or {}
  local name = config.name
  local t0 = now()
  metrics.started(name)

  if not config.available then
    return finish(name, response.error(name, "unavailable", config.unavailable or (name .. " is not available"), 0,
      { model = config.model }))
  end

  local guard <close> = setmetatable({ name = name, finished = false }, cancel_guard)

  local stream = opts.stream and type(adapter.stream_parser) == "function"
  local ok, wire = pcall(adapter.build_request, config, request, { stream = stream })
  if not ok or type(wire) ~= "table" then
    guard.finished = true
    return finish(name, fail(name, config, "adapter", "build_request failed: " .. tostring(wire), t0))
  end

  -- aiorch.http raises on CR/LF in a header value; name the header, not its value.
  for k, v in pairs(wire.headers or {}) do
    if not header_ok(v) then
      guard.finished = true
      return finish(name, fail(name, config, "bad_request", fmt("invalid value for header '%s'", tostring(k)), t0))
    end
  end

  local parser, events, stream_err
  local on_event
  if stream then
    local pok, p = pcall(adapter.stream_parser, config)
    if not pok or type(p) ~= "table" then
      guard.finished = true
      return finish(name, fail(name, config, "adapter", "stream_parser failed: " .. tostring(p), t0))
    end
    parser, events = p, 0
    local on_token = opts.on_token
    on_event = function(ev)
      events = events + 1
      local eok, delta = pcall(parser.event, parser, ev)
      if not eok then
        stream_err = "stream parser failed: " .. tostring(delta)
        return false
      end
      if delta and on_token then
        local tok, terr = pcall(on_token, delta, name)
        if not tok then
          stream_err = "on_token failed: " .. tostring(terr)
          return false
        end
      end
    end
  end

  local status, headers, body = http.request {
    method = wire.method or "POST",
    url = wire.url,
    headers = wire.headers,
    body = wire.body,
    timeout_ms = opts.timeout_ms or config.timeout_ms,
    connect_timeout_ms = config.connect_timeout_ms,
    on_event = on_event,
  }
  guard.finished = true

  if not status then
    local kind, msg = headers, body
    if stream_err then
      return finish(name, fail(name, config, "stream", stream_err, t0))
    end
    -- A stream that broke after it began is a cut answer, not a connect error.
    if events and events > 0 and kind ~= "timeout" then
      return finish(name, fail(name, config, "stream_cut",
        fmt("stream cut after %d events: %s", events, tostring(msg or kind)), t0))
    end
    return finish(name, fail(name, config, tostring(kind or "http"), msg or kind, t0))
  end

  local result, kind, msg, extra
  if parser and status >= 200 and status < 300 and util.is_event_stream(headers) then
    local rok, r, k, m = pcall(parser.result, parser)
    if rok then
      result, kind, msg = r, k, m
    else
      kind, msg = "adapter", "stream parser failed: " .. tostring(r)
    end
  else
    local pok, r, k, m, x = pcall(adapter.parse_response, config, status, headers, body)
    if pok then
      result, kind, msg, extra = r, k, m, x
    else
      kind, msg = "adapter", "parse_response failed: " .. tostring(r)
    end
  end

  if type(result) == "table" then
    return finish(name, response.success(name, result, now() - t0, status))
  end
  return finish(name, fail(name, config, kind or "parse", msg or "no result", t0, {
    http_status = status,
    retry_after = type(extra) == "table" and extra.retry_after or nil,
  }))
end

_M.scrub = scrub

return _M
