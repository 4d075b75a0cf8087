-- AIRequest validation. Runs before any network call; each error names
-- the field at fault. The checks themselves are canonical.validate's.
local canonical = require "aiorch.canonical"

local ipairs = ipairs

local EMPTY = {} -- never written

local _M = {}

-- The simple form's fields (the canonical model's are in docs/canonical.md).
_M.fields = { "user_question", "context", "temperature", "max_tokens", "system_prompt", "policy" }

-- validate(request, adapters) -> a clean copy, or nil, message.
-- adapters: the chosen providers' adapters; the temperature must be
-- within every one's range.
function _M.validate(req, adapters)
  local out, err = canonical.validate(req)
  if not out then
    return nil, err
  end
  for _, a in ipairs(adapters or EMPTY) do
    local why = canonical.temperature_issue(out.temperature, a)
    if why then
      return nil, "temperature: " .. why:gsub("^temperature ", "")
    end
  end
  return out
end

return _M
