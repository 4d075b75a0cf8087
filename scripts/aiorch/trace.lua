-- Errors raised by user code (scripts, strategies): one line that names the
-- user's file and line, and the traceback only in debug mode (--debug or
-- AIORCH_DEBUG=1; the runtime's aiorch.debug() holds the setting).
local io_stderr = io.stderr
local os_getenv = os.getenv
local getinfo = debug.getinfo
local traceback = debug.traceback
local type = type
local tostring = tostring
local pcall = pcall
local getmetatable = getmetatable

local _M = {}

local ok_core, core = pcall(require, "aiorch")
local core_debug = ok_core and type(core) == "table" and core.debug or nil
local function env_on()
  local v = os_getenv("AIORCH_DEBUG")
  return v ~= nil and v ~= "" and v ~= "0"
end
local debug_on = env_on()

-- Whether debug mode is on; with an argument, turns it on or off.
function _M.debug(on)
  if on ~= nil then
    debug_on = on and true or false
    if core_debug then
      core_debug(debug_on)
    end
  end
  if core_debug then
    return core_debug()
  end
  return debug_on
end

-- The library's own directory (scripts/aiorch/): its frames are not the user's.
local LIB = getinfo(1, "S").source:match("^@(.*/)[^/]*$")

local function is_user(info)
  if info.what == "C" or info.currentline <= 0 or info.source:sub(1, 1) ~= "@" then
    return false
  end
  return not (LIB and info.source:sub(2, #LIB + 1) == LIB)
end

-- "file:line" of the innermost user frame from level up, or nil.
function _M.where(level)
  level = (level or 1) + 1
  while true do
    local info = getinfo(level, "Sl")
    if not info then
      return nil
    end
    if is_user(info) then
      return info.short_src .. ":" .. info.currentline
    end
    level = level + 1
  end
end

local function message_of(e)
  if type(e) == "string" then
    return e
  end
  local mt = getmetatable(e)
  if type(e) == "number" or (mt and mt.__tostring) then
    local ok, s = pcall(tostring, e)
    if ok and type(s) == "string" then
      return s
    end
  end
  return "(error object is a " .. type(e) .. " value)"
end

-- An xpcall message handler: returns {message, trace}. The message is one
-- line and names the innermost user frame when the error does not already
-- (a library function raised, or the error carried no position).
function _M.handler(e)
  local msg = message_of(e):gsub("[\r\n]+", " ")
  local where = _M.where(2)
  if where and not msg:find(where, 1, true) then
    msg = where .. ": " .. msg
  end
  return { message = msg, trace = traceback(message_of(e), 2) }
end

-- Writes a handler's traceback to stderr in debug mode.
function _M.report(t)
  if type(t) == "table" and t.trace and _M.debug() then
    io_stderr:write(t.trace, "\n")
  end
end

return _M
