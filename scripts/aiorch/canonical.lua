-- The canonical request (docs/canonical.md): validation, and what a wire
-- API cannot take. Pure functions, no I/O.
--   local canonical = require "aiorch.canonical"
--   local req, err = canonical.normalize(request)      -- with `messages`
--   for _, u in ipairs(canonical.unsupported(req, adapter)) do ... u.field, u.why end
--   local copy, dropped = canonical.drop(req, { "top_k" })
--
-- What each API can express is its wire module's `fields` table
-- (scripts/aiorch/wire/*.lua): one cell per feature key of CELLS below,
-- {"pass"}, {"translate", how = ...} or {"refuse", why = ...}.
local json = require "aiorch.json"
local policy = require "aiorch.policy"

local fmt = string.format
local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local next = next
local setmetatable = setmetatable
local getmetatable = getmetatable
local tointeger = math.tointeger
local concat = table.concat
local sort = table.sort

local _M = {}

local null = json.null

-- Every feature a request (or an answer) can have, in the order the
-- fidelity table lists them. `key` is the name a refusal uses.
_M.CELLS = {
  { key = "messages", label = "user and assistant turns" },
  { key = "role.system", label = "`system` messages" },
  { key = "role.developer", label = "`developer` messages" },
  { key = "role.tool", label = "`tool` messages (tool results)" },
  { key = "message.name", label = "a message's participant `name`" },
  { key = "prefill", label = "assistant prefill (a last assistant message)" },
  { key = "text", label = "text parts" },
  { key = "image.base64", label = "image, base64 data" },
  { key = "image.url", label = "image, by URL" },
  { key = "image.file", label = "image, by uploaded file id" },
  { key = "image.detail", label = "image `detail` (other than auto)" },
  { key = "document.base64", label = "document, base64 data" },
  { key = "document.url", label = "document, by URL" },
  { key = "document.text", label = "document, plain text" },
  { key = "document.file", label = "document, by uploaded file id" },
  { key = "document.title", label = "document `title`" },
  { key = "document.filename", label = "document `filename`" },
  { key = "tool_call", label = "assistant tool calls" },
  { key = "tool_call.arguments", label = "tool-call arguments that are not a JSON object" },
  { key = "tool_result", label = "tool results" },
  { key = "tool_result.is_error", label = "tool result `is_error`" },
  { key = "tool_result.image", label = "images in a tool result" },
  { key = "tool_result.document", label = "documents in a tool result" },
  { key = "thinking", label = "thinking with its signature, sent back" },
  { key = "thinking.unsigned", label = "thinking without a signature, sent back" },
  { key = "redacted_thinking", label = "redacted thinking, sent back" },
  { key = "cache_control", label = "`cache_control` on parts, system blocks and tools" },
  { key = "tools" },
  { key = "tool.strict", label = "a tool's `strict`" },
  { key = "tool_choice" },
  { key = "parallel_tool_calls" },
  { key = "response_format.text" },
  { key = "response_format.json_object" },
  { key = "response_format.json_schema" },
  { key = "max_tokens" },
  { key = "temperature" },
  { key = "top_p" },
  { key = "top_k" },
  { key = "stop" },
  { key = "seed" },
  { key = "presence_penalty" },
  { key = "frequency_penalty" },
  { key = "logprobs", label = "`logprobs` (true)" },
  { key = "top_logprobs" },
  { key = "n", label = "`n` greater than 1" },
  { key = "user" },
  { key = "metadata" },
  { key = "reasoning.effort" },
  { key = "reasoning.budget_tokens" },
  { key = "reasoning.mode" },
  { key = "reasoning.display" },
  { key = "stream_options" },
  { key = "extra", label = "fields of the caller's API that the model does not know" },
  { key = "opaque", label = "parts and tools of the caller's API that the model does not know" },
  { key = "anthropic-beta", label = "the `anthropic-beta` header" },
  { key = "signature", label = "a thought signature on a text or tool-call part (Gemini's `thoughtSignature`)" },
  -- The answer: what the provider's reply can report.
  { key = "response.text", side = "response" },
  { key = "response.tool_calls", side = "response" },
  { key = "response.thinking", side = "response" },
  { key = "response.refusal", side = "response", label = "a refusal" },
  { key = "response.finish_reason", side = "response" },
  { key = "response.usage", side = "response", label = "input and output tokens" },
  { key = "response.usage.cached_input_tokens", side = "response" },
  { key = "response.usage.cache_write_tokens", side = "response" },
  { key = "response.usage.reasoning_tokens", side = "response" },
  { key = "response.logprobs", side = "response" },
  { key = "response.choices", side = "response", label = "several choices (`n` > 1)" },
  { key = "response.upstream", side = "response", label = "the reply's own fields (id, created, ...)" },
  { key = "response.stream", side = "response", label = "streamed text, tool calls and thinking" },
}

local ROLES = { system = true, developer = true, user = true, assistant = true, tool = true }

-- The roles each part type may stand in.
local PART_ROLES = {
  text = { system = true, developer = true, user = true, assistant = true },
  image = { user = true },
  document = { user = true },
  tool_call = { assistant = true },
  tool_result = { tool = true },
  thinking = { assistant = true },
  redacted_thinking = { assistant = true },
  opaque = { system = true, developer = true, user = true, assistant = true, tool = true },
}
_M.PART_TYPES = { "text", "image", "document", "tool_call", "tool_result", "thinking", "redacted_thinking", "opaque" }

-- The parts a tool result's content may hold.
local RESULT_PARTS = { text = true, image = true, document = true, opaque = true }

local SOURCES = {
  image = { base64 = { "media_type", "data" }, url = { "url" }, file = { "file_id" } },
  document = { base64 = { "media_type", "data" }, url = { "url" }, text = { "data" }, file = { "file_id" } },
}

local EFFORTS = { none = true, minimal = true, low = true, medium = true, high = true, xhigh = true, max = true }
local MODES = { enabled = true, adaptive = true, disabled = true }
local DISPLAYS = { summarized = true, omitted = true }
local FORMATS = { text = true, json_object = true, json_schema = true }
local DETAILS = { auto = true, low = true, high = true }

local function absent(v)
  return v == nil or v == null
end
_M.absent = absent

local function show(v)
  if type(v) == "string" then
    return fmt("%q", #v > 40 and v:sub(1, 40) .. "..." or v)
  end
  return tostring(v)
end

local function bad(where, what, v)
  if v == nil then
    return nil, where .. ": " .. what
  end
  return nil, fmt("%s: %s (got %s)", where, what, show(v))
end

local function is_list(t)
  return type(t) == "table" and (#t > 0 or next(t) == nil)
end

-- Number fields: {kind, min, max}; kind "number" or "integer".
local NUMBERS = {
  temperature = { "number", 0 },
  top_p = { "number", 0, 1 },
  top_k = { "integer", 1 },
  seed = { "integer" },
  presence_penalty = { "number", -2, 2 },
  frequency_penalty = { "number", -2, 2 },
  top_logprobs = { "integer", 0, 20 },
  n = { "integer", 1 },
  max_tokens = { "integer", 1 },
}
local NUMBER_NAMES = { "temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty",
  "top_logprobs", "n", "max_tokens" }
local BOOLEANS = { "logprobs", "parallel_tool_calls", "context_in_system_prompt" }
local STRINGS = { "user", "continue_from" }

local function check_number(name, v, spec)
  local kind, lo, hi = spec[1], spec[2], spec[3]
  if type(v) ~= "number" or v ~= v or v == math.huge or v == -math.huge then
    return bad(name, kind == "integer" and "must be an integer" or "must be a number", v)
  end
  if kind == "integer" then
    local n = tointeger(v)
    if not n then
      if name == "max_tokens" then
        return bad(name, "must be a positive integer", v)
      end
      return bad(name, "must be an integer", v)
    end
    v = n
  end
  if (lo and v < lo) or (hi and v > hi) then
    if name == "max_tokens" then
      return bad(name, "must be a positive integer", v)
    end
    if hi then
      return bad(name, fmt("must be between %s and %s", tostring(lo), tostring(hi)), v)
    end
    return bad(name, "must be at least " .. tostring(lo), v)
  end
  return v
end

local function check_string(where, v, required)
  if absent(v) then
    if required then
      return nil, where .. ": required"
    end
    return nil
  end
  if type(v) ~= "string" then
    return nil, fmt("%s: must be a string (got %s)", where, type(v))
  end
  return v
end

local function check_extra(where, e)
  if type(e) ~= "table" or type(e.api) ~= "string" or type(e.fields) ~= "table" then
    return nil, where .. ": must be {api = name, fields = {...}}"
  end
  return e
end

-- The checks of messages, parts and tools below say what is wrong as the
-- end of a message (".text: required", ": must be a table"); the path in
-- front of it is built only then.

-- bad's message without its path.
local function issue(what, v)
  if v == nil then
    return ": " .. what
  end
  return fmt(": %s (got %s)", what, show(v))
end

-- check_string's message without its path, or nil.
local function string_issue(v, required)
  if v == nil or v == null then
    return required and ": required" or nil
  end
  if type(v) ~= "string" then
    return fmt(": must be a string (got %s)", type(v))
  end
  return nil
end

local function extra_issue(e)
  if e ~= nil and e ~= null and (type(e) ~= "table" or type(e.api) ~= "string" or type(e.fields) ~= "table") then
    return ".extra: must be {api = name, fields = {...}}"
  end
  return nil
end

local function source_issue(kind, s)
  if type(s) ~= "table" then
    return ".source: must be a table"
  end
  local need = SOURCES[kind][s.type]
  if not need then
    local names = {}
    for k in pairs(SOURCES[kind]) do
      names[#names + 1] = k
    end
    sort(names)
    return ".source.type" .. issue("must be one of " .. concat(names, ", "), s.type)
  end
  for _, f in ipairs(need) do
    local e = string_issue(s[f], true)
    if e then
      return ".source." .. f .. e
    end
  end
  return nil
end

local part_issue
local TOOL_CALL_FIELDS = { "id", "name", "arguments" }

-- A text or thinking part's fields: text, and a signature.
local function text_issue(p)
  local e = string_issue(p.text, true)
  if e then
    return ".text" .. e
  end
  e = string_issue(p.signature)
  return e and ".signature" .. e
end

-- Each part type's own fields: what is wrong, or nil.
local PART_ISSUES = {
  text = text_issue,
  thinking = text_issue,
  image = function(p)
    local e = source_issue("image", p.source)
    if e then
      return e
    end
    if not absent(p.detail) and not DETAILS[p.detail] then
      return ".detail" .. issue("must be auto, low or high", p.detail)
    end
    return nil
  end,
  document = function(p)
    local e = source_issue("document", p.source)
    if e then
      return e
    end
    e = string_issue(p.title)
    if e then
      return ".title" .. e
    end
    e = string_issue(p.filename)
    return e and ".filename" .. e
  end,
  tool_call = function(p)
    for _, f in ipairs(TOOL_CALL_FIELDS) do
      local e = string_issue(p[f], true)
      if e then
        return "." .. f .. e
      end
    end
    local e = string_issue(p.signature)
    return e and ".signature" .. e
  end,
  tool_result = function(p)
    local e = string_issue(p.id, true)
    if e then
      return ".id" .. e
    end
    if not absent(p.is_error) and type(p.is_error) ~= "boolean" then
      return ".is_error" .. issue("must be a boolean", p.is_error)
    end
    local c = p.content
    if absent(c) or type(c) == "string" then
      return nil
    end
    if not is_list(c) then
      return ".content: must be a string or a list of parts"
    end
    for i, q in ipairs(c) do
      if type(q) ~= "table" or not RESULT_PARTS[q.type] then
        return fmt(".content[%d]", i - 1) .. ".type: must be text, image, document or opaque"
      end
      local qe = part_issue(q)
      if qe then
        return fmt(".content[%d]", i - 1) .. qe
      end
    end
    return nil
  end,
  redacted_thinking = function(p)
    local e = string_issue(p.data, true)
    return e and ".data" .. e
  end,
  opaque = function(p)
    if type(p.api) ~= "string" or type(p.value) ~= "table" then
      return ": an opaque part needs api and value"
    end
    return nil
  end,
}

-- What is wrong with part p, or nil.
function part_issue(p)
  if type(p) ~= "table" then
    return ": must be a table"
  end
  local t = p.type
  local check = PART_ISSUES[t]
  if not check then
    return ".type" .. issue("must be one of " .. concat(_M.PART_TYPES, ", "), t)
  end
  local e = check(p)
  if e then
    return e
  end
  local cc = p.cache_control
  if cc ~= nil and cc ~= null and type(cc) ~= "table" then
    return ".cache_control: must be a table"
  end
  return extra_issue(p.extra)
end

local function message_where(i)
  return fmt("messages[%d]", i - 1)
end

-- Lists of messages a wire decoder made and found as validate would find
-- them (weak keys: they go with their requests). validate takes them as
-- they are; a decoder that could not tell leaves its list to validate.
local vouched = setmetatable({}, { __mode = "k" })

-- vouch(messages) -> messages, marked as checked. Only for a list made
-- just now, by code that has checked everything check_messages checks.
function _M.vouch(messages)
  vouched[messages] = true
  return messages
end

_M.DETAILS = DETAILS

local function check_messages(msgs)
  if vouched[msgs] then
    return msgs
  end
  if not is_list(msgs) or #msgs == 0 then
    return nil, "messages: must be a non-empty list"
  end
  local out = {}
  local calls -- ids of the tool calls so far (nil until one is seen)
  for i, m in ipairs(msgs) do
    if type(m) ~= "table" then
      return nil, message_where(i) .. ": must be a table"
    end
    local role = m.role
    if not ROLES[role] then
      return nil, message_where(i) .. ".role" .. issue("must be system, developer, user, assistant or tool", role)
    end
    local c = m.content
    if type(c) ~= "string" then
      if not is_list(c) then
        return nil, message_where(i) .. (role == "tool" and ".content: a tool message holds a list of tool_result "
          .. "parts" or ".content: must be a string or a list of parts")
      end
      for j, p in ipairs(c) do
        local e = part_issue(p)
        if e then
          return nil, fmt("messages[%d].content[%d]", i - 1, j - 1) .. e
        end
        local t = p.type
        if not PART_ROLES[t][role] then
          return nil, fmt("messages[%d].content[%d].type: a %s part cannot stand in a %s message", i - 1, j - 1, t,
            role)
        end
        if t == "tool_call" then
          calls = calls or {}
          calls[p.id] = true
        elseif t == "tool_result" and calls and not calls[p.id] then
          return nil, fmt("messages[%d].content[%d].id: %s answers no earlier tool call", i - 1, j - 1, show(p.id))
        end
      end
    elseif role == "tool" then
      return nil, message_where(i) .. ".content: a tool message holds a list of tool_result parts"
    end
    local name = m.name
    if name ~= nil and name ~= null and type(name) ~= "string" then
      return nil, message_where(i) .. ".name" .. string_issue(name)
    end
    local extra = m.extra
    if extra ~= nil and extra ~= null then
      local e = extra_issue(extra)
      if e then
        return nil, message_where(i) .. e
      end
    end
    out[i] = m
  end
  return out
end

local function tool_where(i)
  return fmt("tools[%d]", i - 1)
end

local function check_tools(tools)
  if not is_list(tools) then
    return nil, "tools: must be a list"
  end
  local names = {}
  for i, t in ipairs(tools) do
    if type(t) ~= "table" then
      return nil, tool_where(i) .. ": must be a table"
    end
    if t.type == "opaque" then
      if type(t.api) ~= "string" or type(t.value) ~= "table" then
        return nil, tool_where(i) .. ": an opaque tool needs api and value"
      end
      if type(t.name) == "string" then
        names[t.name] = true
      end
    else
      local name = t.name
      if type(name) ~= "string" or name == "" then
        return nil, tool_where(i) .. ".name" .. issue("must be a non-empty string", name)
      end
      if names[name] then
        return nil, fmt("%s.name: %s is named twice", tool_where(i), show(name))
      end
      names[name] = true
      local e = string_issue(t.description)
      if e then
        return nil, tool_where(i) .. ".description" .. e
      end
      if not absent(t.parameters) and type(t.parameters) ~= "table" then
        return nil, tool_where(i) .. ".parameters: must be a JSON Schema (a table)"
      end
      if not absent(t.strict) and type(t.strict) ~= "boolean" then
        return nil, tool_where(i) .. ".strict" .. issue("must be a boolean", t.strict)
      end
      if not absent(t.cache_control) and type(t.cache_control) ~= "table" then
        return nil, tool_where(i) .. ".cache_control: must be a table"
      end
    end
  end
  return tools, names
end

local function check_tool_choice(tc, names)
  if tc == "auto" or tc == "none" or tc == "required" then
    return tc
  end
  if type(tc) == "table" and type(tc.name) == "string" then
    if not (names and names[tc.name]) then
      return nil, fmt("tool_choice: names %s, which is not among the tools", show(tc.name))
    end
    return tc
  end
  return bad("tool_choice", 'must be "auto", "none", "required" or {name = tool}',
    type(tc) == "table" and "a table" or tc)
end

local function check_response_format(rf)
  if type(rf) ~= "table" or not FORMATS[rf.type] then
    return bad("response_format.type", "must be text, json_object or json_schema",
      type(rf) == "table" and rf.type or rf)
  end
  if rf.type == "json_schema" then
    if type(rf.schema) ~= "table" then
      return nil, "response_format.schema: required (a JSON Schema)"
    end
    for _, f in ipairs({ "name", "description" }) do
      local _, err = check_string("response_format." .. f, rf[f])
      if err then
        return nil, err
      end
    end
    if not absent(rf.strict) and type(rf.strict) ~= "boolean" then
      return bad("response_format.strict", "must be a boolean", rf.strict)
    end
  end
  return rf
end

local function check_reasoning(r)
  if type(r) ~= "table" then
    return nil, "reasoning: must be a table"
  end
  if not absent(r.effort) and not EFFORTS[r.effort] then
    return bad("reasoning.effort", "must be none, minimal, low, medium, high, xhigh or max", r.effort)
  end
  if not absent(r.budget_tokens) then
    local _, err = check_number("reasoning.budget_tokens", r.budget_tokens, { "integer", 1 })
    if err then
      return nil, err
    end
  end
  if not absent(r.mode) and not MODES[r.mode] then
    return bad("reasoning.mode", "must be enabled, adaptive or disabled", r.mode)
  end
  if not absent(r.display) then
    if not DISPLAYS[r.display] then
      return bad("reasoning.display", "must be summarized or omitted", r.display)
    end
    if r.mode ~= "enabled" and r.mode ~= "adaptive" and absent(r.budget_tokens) then
      return nil, "reasoning.display: needs reasoning.mode enabled or adaptive"
    end
  end
  return r
end

local function check_metadata(m)
  if type(m) ~= "table" then
    return nil, "metadata: must be a table of strings"
  end
  for k, v in pairs(m) do
    if type(k) ~= "string" or type(v) ~= "string" then
      return nil, fmt("metadata.%s: must be a string", tostring(k))
    end
  end
  return m
end

local function check_stop(s)
  if type(s) == "string" then
    return { s }
  end
  if not is_list(s) then
    return nil, "stop: must be a string or a list of strings"
  end
  for i, v in ipairs(s) do
    if type(v) ~= "string" then
      return bad(fmt("stop[%d]", i - 1), "must be a string", v)
    end
  end
  return s
end

-- The fields that are tables (or a choice of strings), each with its check.
local TABLES = {
  { "tool_choice", check_tool_choice },
  { "response_format", check_response_format },
  { "reasoning", check_reasoning },
  { "metadata", check_metadata },
  { "stop", check_stop },
  { "stream_options", function(v)
      if type(v) ~= "table" or not (absent(v.include_usage) or type(v.include_usage) == "boolean") then
        return nil, "stream_options: must be {include_usage = boolean}"
      end
      return v
    end },
  { "extra", function(v) return check_extra("extra", v) end },
  { "policy", function(v) return policy.check(v, "policy") end },
}

-- Each top-level field checked by itself (beside the simple form, the
-- messages and the tools): name -> check(v, tool names), which returns
-- the clean value, or nil, message. ORDERED: the order of the checks,
-- which says which error a request with several gets.
local FIELD_CHECKS, ORDERED = {}, {}
for _, name in ipairs(NUMBER_NAMES) do
  local spec = NUMBERS[name]
  FIELD_CHECKS[name] = function(v) return check_number(name, v, spec) end
  ORDERED[#ORDERED + 1] = name
end
for _, name in ipairs(BOOLEANS) do
  FIELD_CHECKS[name] = function(v)
    if type(v) ~= "boolean" then
      return bad(name, "must be a boolean", v)
    end
    return v
  end
  ORDERED[#ORDERED + 1] = name
end
for _, name in ipairs(STRINGS) do
  FIELD_CHECKS[name] = function(v) return check_string(name, v) end
  ORDERED[#ORDERED + 1] = name
end
ORDERED[#ORDERED + 1] = "tools"
for _, c in ipairs(TABLES) do
  FIELD_CHECKS[c[1]] = c[2]
  ORDERED[#ORDERED + 1] = c[1]
end

-- The first error of a request whose fields failed a check, in ORDERED's
-- order (tools_err: the tools' error, if theirs failed).
local function first_error(req, names, tools_err)
  for _, name in ipairs(ORDERED) do
    if name == "tools" then
      if tools_err then
        return tools_err
      end
    else
      local v = req[name]
      if v ~= nil and v ~= null then
        local value, err = FIELD_CHECKS[name](v, names)
        if value == nil then
          return err
        end
      end
    end
  end
  return nil
end

-- The metatable of validate's copies: normalize need not check them again
-- (the plumbing only adds trusted fields, such as the system prompt).
local VALID = { __name = "aiorch.canonical.request" }

-- validate(req) -> a clean copy of the fields it knows (the simple form
-- kept as it is), or nil, message naming the field.
function _M.validate(req)
  if type(req) ~= "table" then
    return nil, "request: must be a table"
  end
  -- (the usual fields named: the table is sized once)
  local out = { messages = nil, max_tokens = nil, raw = nil, temperature = nil }
  local err

  local msgs = req.messages
  if msgs == nil or msgs == null then
    local q = req.user_question
    if absent(q) then
      return nil, "user_question: required"
    end
    if type(q) ~= "string" then
      return nil, fmt("user_question: must be a string (got %s)", type(q))
    end
    if not q:find("%S") then
      return nil, "user_question: must not be empty"
    end
    out.user_question = q
    out.context, err = check_string("context", req.context)
    if err then
      return nil, err
    end
    out.system_prompt, err = check_string("system_prompt", req.system_prompt)
    if err then
      return nil, err
    end
  else
    local v = req.user_question
    if v ~= nil and v ~= null then
      return nil, "user_question: not allowed with messages"
    end
    v = req.context
    if v ~= nil and v ~= null and v ~= "" then
      return nil, "context: not allowed with messages"
    end
    v = req.system_prompt
    if v ~= nil and v ~= null and v ~= "" then
      return nil, "system_prompt: not allowed with messages"
    end
    out.messages, err = check_messages(msgs)
    if err then
      return nil, err
    end
  end

  -- The fields present, each checked once; on an error, the first in
  -- ORDERED's order is reported.
  local names, tools_err
  local tools = req.tools
  if tools ~= nil and tools ~= null then
    out.tools, names = check_tools(tools)
    if not out.tools then
      tools_err, names = names, nil
    end
  end
  if tools_err then
    return nil, first_error(req, names, tools_err)
  end
  for k, v in next, req do
    local check = FIELD_CHECKS[k]
    if check and v ~= null then
      local value
      value, err = check(v, names)
      if value == nil then
        return nil, first_error(req, names) or err
      end
      out[k] = value
    end
  end
  if type(req.raw) == "table" then
    out.raw = req.raw
  end
  return setmetatable(out, VALID)
end

-- The user turn of the simple form: the question, preceded by the
-- context unless the system prompt already carries it.
function _M.user_content(req)
  local q, c = req.user_question, req.context
  if type(c) == "string" and c:find("%S") and not req.context_in_system_prompt then
    return fmt("Context:\n%s\n\nQuestion:\n%s", c, q)
  end
  return q
end

-- normalize(req) -> a validated request with `messages` (built from the
-- simple form when absent), or nil, message naming the field: req itself
-- when it is one already (validate's, with messages and without the
-- simple form's fields), else a copy. (Nothing changes a request once it
-- is validated: the orchestration and the adapters read it, copies aside.)
function _M.normalize(req)
  local out, err
  if getmetatable(req) == VALID then
    if req.messages and req.user_question == nil and req.context == nil and req.system_prompt == nil
      and req.context_in_system_prompt == nil then
      return req
    end
    out = {}
    for k, v in pairs(req) do
      out[k] = v
    end
    setmetatable(out, VALID)
  else
    out, err = _M.validate(req)
    if not out then
      return nil, err
    end
  end
  if not out.messages then
    local msgs = {}
    local s = out.system_prompt
    if type(s) == "string" and s ~= "" then
      msgs[1] = { role = "system", content = s }
    end
    msgs[#msgs + 1] = { role = "user", content = _M.user_content(out) }
    out.messages = msgs
  end
  out.user_question, out.context, out.system_prompt, out.context_in_system_prompt = nil, nil, nil, nil
  return out
end

-- Features --------------------------------------------------------------
-- features(req, fn) calls fn(key[, api, name]) for each feature req
-- uses: the keys of CELLS; "extra" and "opaque" also pass the API the
-- field or part came from and its name in that API. (Inside, the walk
-- calls fn(st, key, api, name), st passed through: unsupported needs no
-- closure.)

local function extra_features(e, fn, st)
  if type(e) == "table" and type(e.fields) == "table" then
    for name in pairs(e.fields) do
      fn(st, "extra", e.api, name)
    end
  end
end

local function opaque_name(p)
  local v = p.value
  return type(v) == "table" and type(v.type) == "string" and v.type or p.name or "opaque"
end

-- Whether a tool call's arguments can be sent as a JSON object.
local function object_arguments(a)
  return a == "" or a:find("^%s*{") ~= nil or not a:find("%S")
end

local function part_features(p, fn, st, inside)
  local t = p.type
  if t == "opaque" then
    fn(st, "opaque", p.api, opaque_name(p))
    return
  end
  if inside and t ~= "text" then
    fn(st, inside .. "." .. t)
  elseif not inside then
    fn(st, t == "image" and "image." .. p.source.type or t == "document" and "document." .. p.source.type or t)
  end
  if inside and (t == "image" or t == "document") then
    fn(st, t .. "." .. p.source.type)
  end
  if not absent(p.cache_control) then
    fn(st, "cache_control")
  end
  if (t == "text" or t == "tool_call") and not absent(p.signature) then
    fn(st, "signature")
  end
  if t == "image" then
    if not absent(p.detail) and p.detail ~= "auto" then
      fn(st, "image.detail")
    end
  elseif t == "document" then
    if not absent(p.title) then
      fn(st, "document.title")
    end
    if not absent(p.filename) then
      fn(st, "document.filename")
    end
  elseif t == "tool_call" then
    if not object_arguments(p.arguments) then
      fn(st, "tool_call.arguments")
    end
  elseif t == "tool_result" then
    if p.is_error == true then
      fn(st, "tool_result.is_error")
    end
    if type(p.content) == "table" then
      for _, q in ipairs(p.content) do
        part_features(q, fn, st, "tool_result")
      end
    end
  elseif t == "thinking" then
    if absent(p.signature) or p.signature == "" then
      fn(st, "thinking.unsigned")
    end
  end
  extra_features(p.extra, fn, st)
end

-- Top-level fields that are features as they are (when present).
local PLAIN = { "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "presence_penalty",
  "frequency_penalty", "top_logprobs", "user", "metadata", "tool_choice", "parallel_tool_calls", "stream_options" }
local ROLE_KEYS = { system = "role.system", developer = "role.developer", tool = "role.tool" }
local REASONING_KEYS = { { "effort", "reasoning.effort" }, { "budget_tokens", "reasoning.budget_tokens" },
  { "mode", "reasoning.mode" }, { "display", "reasoning.display" } }

local function each_feature(req, fn, st)
  local msgs = req.messages
  if type(msgs) == "table" then
    fn(st, "messages")
    local last = #msgs
    for i, m in ipairs(msgs) do
      local role = m.role
      if role ~= "user" and role ~= "assistant" then
        fn(st, ROLE_KEYS[role] or "role." .. role)
      elseif role == "assistant" and i == last then
        fn(st, "prefill")
      end
      local name = m.name
      if name ~= nil and name ~= null then
        fn(st, "message.name")
      end
      local c = m.content
      if type(c) == "table" then
        for _, p in ipairs(c) do
          part_features(p, fn, st)
        end
      else
        fn(st, "text")
      end
      if m.extra ~= nil then
        extra_features(m.extra, fn, st)
      end
    end
  end
  for i = 1, #PLAIN do
    local name = PLAIN[i]
    local v = req[name]
    if v ~= nil and v ~= null then
      fn(st, name)
    end
  end
  if req.logprobs == true then
    fn(st, "logprobs")
  end
  local n = req.n
  if type(n) == "number" and n > 1 then
    fn(st, "n")
  end
  local tools = req.tools
  if type(tools) == "table" then
    fn(st, "tools")
    for _, t in ipairs(tools) do
      if t.type == "opaque" then
        fn(st, "opaque", t.api, opaque_name(t))
      else
        if not absent(t.strict) then
          fn(st, "tool.strict")
        end
        if not absent(t.cache_control) then
          fn(st, "cache_control")
        end
        extra_features(t.extra, fn, st)
      end
    end
  end
  local rf = req.response_format
  if type(rf) == "table" then
    fn(st, "response_format." .. rf.type)
  end
  local r = req.reasoning
  if type(r) == "table" then
    for _, f in ipairs(REASONING_KEYS) do
      if not absent(r[f[1]]) then
        fn(st, f[2])
      end
    end
  end
  local e = req.extra
  if type(e) == "table" then
    extra_features(e, fn, st)
    if type(e.headers) == "table" and e.headers["anthropic-beta"] then
      fn(st, "anthropic-beta")
    end
  end
end

local function call_with(fn, key, api, name)
  return fn(key, api, name)
end

function _M.features(req, fn)
  return each_feature(req, call_with, fn)
end

-- Refusal -----------------------------------------------------------------

function _M.message(field, provider)
  return fmt("%s is not supported by provider %s", field, provider)
end

local function range_text(r)
  return fmt("%s..%s", tostring(r[1]), tostring(r[2]))
end

-- The temperature's range for a target (a wire module or an adapter).
local function temperature_range(target)
  local cell = type(target.fields) == "table" and target.fields.temperature
  return type(cell) == "table" and cell.range or target.temperature_range
end

-- Why t is out of the target's range, or nil.
function _M.temperature_issue(t, target)
  local r = type(t) == "number" and temperature_range(target)
  if r and (t < r[1] or t > r[2]) then
    return fmt("temperature %s is outside %s's range %s", tostring(t), target.name or target.api or "?",
      range_text(r))
  end
  return nil
end

-- What an adapter without a `fields` table (one written for the simple
-- form) takes: the simple form's fields, and text-only conversations
-- that to_simple can fold.
local SIMPLE_CELLS = {
  messages = { "translate", how = "folded into the simple form" },
  text = { "pass" },
  ["role.system"] = { "translate", how = "joined into system_prompt" },
  ["role.developer"] = { "translate", how = "joined into system_prompt" },
  max_tokens = { "pass" },
  temperature = { "pass" },
}

-- Records a refusal of st (unsupported's state), each field once.
local function refuse(st, field, why)
  local seen = st.seen
  if not seen then
    seen = {}
    st.seen = seen
  elseif seen[field] then
    return
  end
  seen[field] = true
  local out = st.out
  out[#out + 1] = { field = field, why = why }
end

-- unsupported's check of one feature.
local function check_feature(st, key, from, name)
  local target = st.target
  if key == "extra" or key == "opaque" then
    local api = target.api
    if from ~= api then
      refuse(st, name, fmt("a field of the %s API; provider %s speaks %s", tostring(from),
        target.name or tostring(api), api or "the simple form"))
    end
    return
  end
  local cell = st.cells[key]
  if not cell then
    refuse(st, key, "not declared by this provider")
  elseif cell[1] == "refuse" then
    refuse(st, key, cell.why or "refused")
  end
end

-- unsupported(req, target) -> list of {field, why}: what target (a wire
-- module or an adapter: anything with `fields` and `api` or `name`)
-- cannot take of req, each field once.
function _M.unsupported(req, target)
  local fields = target.fields
  local st = { cells = type(fields) == "table" and fields or SIMPLE_CELLS, target = target, out = {}, seen = nil }
  each_feature(req, check_feature, st)
  local why = _M.temperature_issue(req.temperature, target)
  if why then
    refuse(st, "temperature", why)
  end
  if not fields and type(req.messages) == "table" then
    local _, field, fwhy = _M.to_simple(req)
    if field then
      refuse(st, field, fwhy)
    end
  end
  return st.out
end

-- Dropping ----------------------------------------------------------------

local function copy(t)
  local c = {}
  for k, v in pairs(t) do
    c[k] = v
  end
  return setmetatable(c, getmetatable(t))
end

local function without_extra(e, names, hit)
  if type(e) ~= "table" or type(e.fields) ~= "table" then
    return e
  end
  local fields, any = {}, false
  for k, v in pairs(e.fields) do
    if names[k] then
      hit(k)
    else
      fields[k], any = v, true
    end
  end
  if not any then
    return nil
  end
  local c = copy(e)
  c.fields = fields
  return c
end

-- The key that removes part p as a whole, when names has one.
local function removing_key(p, names, inside)
  local t = p.type
  if t == "opaque" then
    local name = opaque_name(p)
    return names[name] and name or nil
  end
  local keys = {}
  if not inside then
    keys[1] = t
  elseif t ~= "text" then
    keys[1] = inside .. "." .. t
  end
  if t == "image" or t == "document" then
    keys[#keys + 1] = t .. "." .. p.source.type
  elseif t == "thinking" and (absent(p.signature) or p.signature == "") then
    keys[#keys + 1] = "thinking.unsigned"
  elseif t == "tool_call" and not object_arguments(p.arguments) then
    keys[#keys + 1] = "tool_call.arguments"
  end
  for _, k in ipairs(keys) do
    if names[k] then
      return k
    end
  end
  return nil
end

-- The parts of a list left after the dropped ones, attributes dropped
-- from copies; nil when none is left. calls: the ids of the tool calls
-- dropped so far, whose results go with them.
local function drop_parts(parts, names, hit, inside, calls)
  local out = json.array()
  for _, p in ipairs(parts) do
    local gone = removing_key(p, names, inside)
    if gone then
      hit(gone)
      if p.type == "tool_call" and calls then
        calls[p.id] = true
      end
    elseif p.type == "tool_result" and calls and calls[p.id] then -- luacheck: ignore 542
      -- the result of a dropped call: gone with it
    else
      local c = copy(p)
      local function attr(key, field)
        if names[key] and not absent(c[field]) then
          c[field] = nil
          hit(key)
        end
      end
      attr("cache_control", "cache_control")
      if p.type == "text" or p.type == "tool_call" then
        attr("signature", "signature")
      end
      if p.type == "image" and p.detail ~= "auto" then
        attr("image.detail", "detail")
      elseif p.type == "document" then
        attr("document.title", "title")
        attr("document.filename", "filename")
      elseif p.type == "tool_result" then
        if p.is_error == true then
          attr("tool_result.is_error", "is_error")
        end
        if type(p.content) == "table" then
          c.content = drop_parts(p.content, names, hit, "tool_result") or json.array()
        end
      end
      c.extra = without_extra(p.extra, names, hit)
      out[#out + 1] = c
    end
  end
  if #out == 0 then
    return nil
  end
  return out
end

local TOP = {} -- the fields drop removes from the request as a whole
for _, name in ipairs(PLAIN) do
  TOP[name] = true
end
TOP.logprobs, TOP.n = true, true

-- drop(req, names) -> a copy of req without those features (field names
-- as unsupported gives them), and the list of those actually dropped.
function _M.drop(req, names)
  local set = {}
  for _, n in ipairs(names) do
    set[n] = true
  end
  local dropped, done = {}, {}
  local function hit(n)
    if not done[n] then
      done[n] = true
      dropped[#dropped + 1] = n
    end
  end
  local out = copy(req)
  for name in pairs(TOP) do
    if set[name] and not absent(out[name]) then
      out[name] = nil
      hit(name)
    end
  end
  if type(out.messages) == "table" then
    local msgs = json.array()
    local calls = {}
    local n = #out.messages
    for i, m in ipairs(out.messages) do
      local role = m.role
      if set["role." .. role] then
        hit("role." .. role)
      elseif set.prefill and role == "assistant" and i == n then
        hit("prefill")
      else
        local c = copy(m)
        if set["message.name"] and not absent(c.name) then
          c.name = nil
          hit("message.name")
        end
        if type(m.content) == "table" then
          c.content = drop_parts(m.content, set, hit, nil, calls)
        end
        c.extra = without_extra(m.extra, set, hit)
        if c.content then
          msgs[#msgs + 1] = c
        end
      end
    end
    out.messages = msgs
  end
  if type(out.tools) == "table" then
    if set.tools then
      out.tools, out.tool_choice, out.parallel_tool_calls = nil, nil, nil
      hit("tools")
    else
      local tools = json.array()
      for _, t in ipairs(out.tools) do
        if t.type == "opaque" and set[opaque_name(t)] then
          hit(opaque_name(t))
        else
          local c = copy(t)
          if set["tool.strict"] and not absent(c.strict) then
            c.strict = nil
            hit("tool.strict")
          end
          if set.cache_control and not absent(c.cache_control) then
            c.cache_control = nil
            hit("cache_control")
          end
          c.extra = without_extra(t.extra, set, hit)
          tools[#tools + 1] = c
        end
      end
      out.tools = tools
    end
  end
  local rf = out.response_format
  if type(rf) == "table" and set["response_format." .. rf.type] then
    out.response_format = nil
    hit("response_format." .. rf.type)
  end
  if type(out.reasoning) == "table" then
    local r, any = {}, false
    for k, v in pairs(out.reasoning) do
      if set["reasoning." .. k] then
        hit("reasoning." .. k)
      else
        r[k], any = v, true
      end
    end
    if r.display and not (r.mode == "enabled" or r.mode == "adaptive" or r.budget_tokens) then
      r.display = nil -- display means nothing without thinking
    end
    out.reasoning = any and r or nil
  end
  if type(out.extra) == "table" then
    local e = without_extra(out.extra, set, hit)
    if set["anthropic-beta"] and type(out.extra.headers) == "table" then
      e = e or { api = out.extra.api, fields = {} }
      hit("anthropic-beta")
    elseif e then
      e.headers = out.extra.headers
    elseif type(out.extra.headers) == "table" then
      e = { api = out.extra.api, fields = {}, headers = out.extra.headers }
    end
    out.extra = e
  end
  return out, dropped
end

-- The simple form of a text-only conversation, for adapters written for
-- it: systems joined into system_prompt, the last user turn the question,
-- the earlier turns folded into the context. Returns the copy, or nil,
-- field, why.
function _M.to_simple(req)
  local msgs = req.messages
  local systems, turns = {}, {}
  for i, m in ipairs(msgs) do
    local text = m.content
    if type(text) == "table" then
      local parts = {}
      for _, p in ipairs(text) do
        if p.type ~= "text" then
          return nil, p.type == "opaque" and opaque_name(p) or p.type, "an adapter of the simple form takes text only"
        end
        parts[#parts + 1] = p.text
      end
      text = concat(parts, "\n")
    end
    if m.role == "system" or m.role == "developer" then
      systems[#systems + 1] = text
    elseif m.role == "user" or m.role == "assistant" then
      turns[#turns + 1] = { m.role, text, i }
    else
      return nil, "role." .. m.role, "an adapter of the simple form takes text only"
    end
  end
  local last = turns[#turns]
  if not last or last[1] ~= "user" then
    return nil, "prefill", "the simple form ends with the user's question"
  end
  local out = copy(req)
  out.messages = nil
  out.user_question = last[2]
  out.system_prompt = #systems > 0 and concat(systems, "\n\n") or nil
  if #turns > 1 then
    local earlier = {}
    for i = 1, #turns - 1 do
      earlier[i] = turns[i][1] .. ": " .. turns[i][2]
    end
    out.context = "Conversation so far:\n" .. concat(earlier, "\n")
  end
  return out
end

-- Finish reasons ----------------------------------------------------------

-- Any API's finish reason -> the normalised one (docs/canonical.md).
local FINISH = {
  stop = "stop", end_turn = "stop", stop_sequence = "stop", pause_turn = "stop",
  length = "length", max_tokens = "length", model_context_window_exceeded = "length",
  tool_calls = "tool_calls", function_call = "tool_calls", tool_use = "tool_calls",
  content_filter = "content_filter", refusal = "refusal",
}

function _M.finish_reason(reason)
  if type(reason) ~= "string" then
    return nil
  end
  return FINISH[reason] or "other"
end

return _M
