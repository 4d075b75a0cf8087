-- What /metrics and /healthz say of the gateway: the requests answered (by
-- route and status) and those in flight, for the whole server. A worker
-- counts in its own table (the gateway state's counts and in_flight) and
-- aiorch.state pushes what changed every flush_ms; a scrape reads the
-- totals, its own worker's counts flushed first.
local aiorch = require "aiorch"
local state = require "aiorch.state"

local spawn = aiorch.spawn
local pairs = pairs
local sub = string.sub

local _M = {}

local PREFIX = "g\31r\31"

local function gauge_fn(gw)
  return function() return gw.in_flight end
end

-- Starts counting gw (a gateway's state) into the server's totals, and,
-- when the state is shared, the task that flushes. Returns what stop takes.
function _M.start(gw)
  local t = { source = state.counts_source(PREFIX, gw.counts), gauge = gauge_fn(gw) }
  state.gauge("in_flight", t.gauge)
  if state.shared() then
    t.flusher = spawn(state.flusher)
  end
  return t
end

-- Stops counting: a last flush, so that nothing counted is lost.
function _M.stop(t)
  if t.flusher then
    t.flusher:cancel()
  end
  state.flush()
  state.unsource(t.source)
  state.ungauge("in_flight", t.gauge)
end

-- {["route status"] = n}: the server's.
function _M.requests(gw)
  if not state.shared() then
    return gw.counts
  end
  local out = {}
  for k, v in pairs(state.read(PREFIX)) do
    out[sub(k, #PREFIX + 1)] = v
  end
  return out
end

-- The server's requests in flight, but for the one asking.
function _M.in_flight(gw)
  if not state.shared() then
    return gw.in_flight - 1
  end
  return state.gauge_total("in_flight", function() return gw.in_flight end) - 1
end

return _M
