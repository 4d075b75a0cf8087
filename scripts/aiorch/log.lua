-- One-line log records on stderr. The level comes from AIORCH_LOG
-- (debug | info | warn | error), default warn.
local io_stderr = io.stderr
local os_getenv = os.getenv
local fmt = string.format
local select = select

local _M = {}

local LEVELS = { debug = 10, info = 20, warn = 30, error = 40 }
_M.levels = LEVELS

local threshold = LEVELS[(os_getenv("AIORCH_LOG") or ""):lower()] or LEVELS.warn

function _M.enabled(level)
  local n = LEVELS[level]
  return n ~= nil and n >= threshold
end

-- log(level, fmt, ...) never raises: a bad format degrades to the raw text.
function _M.log(level, msg, ...)
  local n = LEVELS[level] or LEVELS.error
  if n < threshold then
    return
  end
  local text = tostring(msg)
  if select("#", ...) > 0 then
    local ok, s = pcall(fmt, text, ...)
    if ok then
      text = s
    end
  end
  text = text:gsub("[\r\n]+", " ")
  io_stderr:write("aiorch: ", level, ": ", text, "\n")
end

function _M.debug(...) _M.log("debug", ...) end
function _M.info(...) _M.log("info", ...) end
function _M.warn(...) _M.log("warn", ...) end
function _M.error(...) _M.log("error", ...) end

return _M
