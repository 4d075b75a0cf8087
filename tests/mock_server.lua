-- The mock providers as a process of their own:
--   build/aiorch run tests/mock_server.lua [--port N] [--latency-ms N] [--first-token-ms N]
--     [--fault F] [--size N] [--retry-after N] [--fail-first N] [--key K] [--chunks N]
--     [--chunk-delay-ms N] [--stall-after N] [--tool-calls N] [--redacted-thinking 0|1]
--     [--reasoning-content 0|1] [--text T] [--finish-reason R] [--idle-timeout-ms N]
-- Prints "PORT <n>" as its first line, then serves on 127.0.0.1 until killed.
-- The options set the directives of requests that carry none.
local aiorch = require "aiorch"
local mock = require "aiorch.mock"

local USAGE = "usage: mock_server.lua [--port N] [--latency-ms N] [--first-token-ms N] [--fault F] [--size N]"
  .. " [--retry-after N] [--fail-first N] [--key K] [--chunks N] [--chunk-delay-ms N] [--stall-after N]"
  .. " [--tool-calls N] [--redacted-thinking 0|1] [--reasoning-content 0|1] [--text T] [--finish-reason R]"
  .. " [--idle-timeout-ms N]"

-- option -> directive name
local DIRECTIVES = {
  ["--latency-ms"] = "latency_ms",
  ["--first-token-ms"] = "first_token_ms",
  ["--fault"] = "fault",
  ["--size"] = "size",
  ["--retry-after"] = "retry_after",
  ["--fail-first"] = "fail_first",
  ["--key"] = "key",
  ["--chunks"] = "chunks",
  ["--chunk-delay-ms"] = "chunk_delay_ms",
  ["--stall-after"] = "stall_after",
  ["--tool-calls"] = "tool_calls",
  ["--redacted-thinking"] = "redacted_thinking",
  ["--reasoning-content"] = "reasoning_content",
  ["--text"] = "text",
  ["--finish-reason"] = "finish_reason",
}

local function fail(msg)
  io.stderr:write("mock_server: ", msg, "\n", USAGE, "\n")
  return 2
end

local function main(...)
  local args = table.pack(...)
  local port = 0
  local defaults = {}
  local idle_timeout_ms
  local i = 1
  while i <= args.n do
    local opt, val = args[i], args[i + 1]
    if opt == "-h" or opt == "--help" then
      io.stdout:write(USAGE, "\n")
      return 0
    end
    if val == nil then
      return fail("missing value for " .. tostring(opt))
    end
    if opt == "--port" then
      port = tonumber(val)
      port = port and math.tointeger(port)
      if not port or port < 0 or port > 65535 then
        return fail("bad port '" .. val .. "'")
      end
    elseif opt == "--idle-timeout-ms" then
      idle_timeout_ms = math.tointeger(tonumber(val))
      if not idle_timeout_ms or idle_timeout_ms <= 0 then
        return fail("bad idle timeout '" .. val .. "'")
      end
    elseif DIRECTIVES[opt] then
      defaults[DIRECTIVES[opt]] = val
    else
      return fail("unknown option '" .. tostring(opt) .. "'")
    end
    i = i + 2
  end

  -- Nobody can read the recorded requests of another process: keep none.
  local ok, m, kind, message = pcall(mock.start,
    { host = "127.0.0.1", port = port, defaults = defaults, record = false, idle_timeout_ms = idle_timeout_ms })
  if not ok then
    return fail(tostring(m))
  end
  if not m then
    io.stderr:write("mock_server: cannot listen: ", tostring(message or kind), "\n")
    return 1
  end
  io.stdout:write("PORT ", m.port, "\n")
  io.stdout:flush()

  while true do
    aiorch.sleep(3600 * 1000)
  end
end

return main(...)
