-- The default system-prompt builder. Replace it by putting a prompts/default.lua
-- in a directory on AIORCH_PATH (or --path).
local type = type
local pairs = pairs
local tostring = tostring
local sort = table.sort
local concat = table.concat

local _M = {}

local BASE = "You are a helpful, accurate assistant. Answer the user's question clearly and concisely, "
  .. "in the language the question is asked in. If you do not know or the context does not say, "
  .. "say so instead of guessing."

-- context_info: nil, a string (free text) or a table of named facts
-- (e.g. {project = "...", description = "..."}).
function _M.build_system_prompt(context_info)
  if type(context_info) == "string" then
    if not context_info:find("%S") then
      return BASE
    end
    return BASE .. "\n\nUse the following context when it is relevant to the question:\n" .. context_info
  end
  if type(context_info) == "table" then
    local keys = {}
    for k in pairs(context_info) do
      keys[#keys + 1] = tostring(k)
    end
    if #keys == 0 then
      return BASE
    end
    sort(keys)
    local lines = {}
    for i, k in ipairs(keys) do
      local v = context_info[k]
      if v == nil then
        v = context_info[tonumber(k)]
      end
      lines[i] = "- " .. k .. ": " .. tostring(v)
    end
    return BASE .. "\n\nWhat is known about the user's situation:\n" .. concat(lines, "\n")
  end
  return BASE
end

return _M
