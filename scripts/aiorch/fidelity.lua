-- docs/fidelity.md, written from the providers' `fields` tables (the wire
-- modules', scripts/aiorch/wire/*.lua): for every feature of the canonical
-- model and every provider, passed, translated (how) or refused (why).
--   build/aiorch run scripts/aiorch/fidelity.lua > docs/fidelity.md
local canonical = require "aiorch.canonical"
local loader = require "aiorch.loader"

local fmt = string.format
local type = type
local ipairs = ipairs
local concat = table.concat
local sort = table.sort

local _M = {}

-- The first columns, in this order; other built-in adapters with a fields
-- table follow by name.
local FIRST = { openai = 1, anthropic = 2, gemini = 3 }

-- The built-in adapters that declare a fields table, in column order.
function _M.providers()
  local names = {}
  local p = io.popen("ls -1 '" .. loader.root() .. "/scripts/providers' 2>/dev/null")
  if p then
    for f in p:lines() do
      local n = f:match("^([%w_%-]+)%.lua$")
      if n then
        names[#names + 1] = n
      end
    end
    p:close()
  end
  sort(names, function(a, b)
    local x, y = FIRST[a] or 99, FIRST[b] or 99
    if x ~= y then
      return x < y
    end
    return a < b
  end)
  local out = {}
  for _, n in ipairs(names) do
    local ok, a = pcall(require, "providers." .. n)
    if ok and type(a) == "table" and type(a.fields) == "table" then
      out[#out + 1] = a
    end
  end
  return out
end

local function escape(s)
  return (s:gsub("|", "\\|"):gsub("\n", " "))
end

local function cell_text(c)
  if type(c) ~= "table" then
    return "refused: not declared"
  end
  local range = c.range and fmt(" (%s..%s)", c.range[1], c.range[2]) or ""
  if c[1] == "pass" then
    return "passed" .. range .. (c.how and ": " .. escape(c.how) or "")
  elseif c[1] == "translate" then
    return "translated" .. range .. ": " .. escape(c.how or "")
  end
  return "refused: " .. escape(c.why or "")
end

local function table_of(side, providers)
  local head = { "| feature |" }
  local rule = { "|---|" }
  for _, a in ipairs(providers) do
    head[#head + 1] = " " .. a.name .. " |"
    rule[#rule + 1] = "---|"
  end
  local lines = { concat(head), concat(rule) }
  for _, c in ipairs(canonical.CELLS) do
    if (c.side or "request") == side then
      local row = { "| `", c.key, "`", c.label and ": " .. escape(c.label) or "", " |" }
      for _, a in ipairs(providers) do
        row[#row + 1] = " " .. cell_text(a.fields[c.key]) .. " |"
      end
      lines[#lines + 1] = concat(row)
    end
  end
  return concat(lines, "\n")
end

-- The whole page, as Markdown.
function _M.markdown(providers)
  providers = providers or _M.providers()
  return concat({
    "# Fidelity: what each provider takes of the canonical model",
    "",
    "Written by `build/aiorch run scripts/aiorch/fidelity.lua > docs/fidelity.md` from the",
    "providers' `fields` tables (`scripts/aiorch/wire/*.lua`); a spec checks that this page is what",
    "the script writes. The model itself is [canonical.md](canonical.md).",
    "",
    "- **passed**: sent as the model has it.",
    "- **translated**: sent in the API's own form, as the cell says.",
    "- **refused**: the API cannot take it. A request that has it is refused by name",
    "  (`top_k is not supported by provider openai`), or, where the request or the",
    "  configuration allows dropping, sent without it and the drop reported.",
    "",
    "## Same-API passthrough",
    "",
    "None of this applies to a request that came in through the API its provider speaks (an",
    "OpenAI client answered by an OpenAI-API provider, an Anthropic client by Anthropic, a Gemini",
    "client by Gemini): it is sent upstream as the client sent it, byte for byte, unknown fields",
    "included; only `model` is replaced when the configuration maps it to another (Gemini's is in",
    "the URL). Anthropic's `anthropic-version` and `anthropic-beta` headers go with it, and the",
    "answer (a stream event by event) comes back as the provider sent it.",
    "",
    "## Requests",
    "",
    table_of("request", providers),
    "",
    "## Answers",
    "",
    "What a provider's answer reports, and how an answer is written back in each API's shape;",
    "here *refused* means the API has no such thing.",
    "",
    table_of("response", providers),
    "",
    require("aiorch.compat").markdown(),
  }, "\n")
end

if ... ~= "aiorch.fidelity" then
  io.write(_M.markdown())
end

return _M
