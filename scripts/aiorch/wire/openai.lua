-- OpenAI Chat Completions <-> the canonical model (docs/canonical.md):
-- requests both ways, responses both ways, streams both ways. Pure
-- functions and one small object per stream; no I/O.
--
-- Extensions beyond OpenAI's own API, as OpenAI-compatible servers use
-- them: an assistant message's `reasoning_content` (thinking text) and
-- `thinking_blocks` ({type = "thinking", thinking, signature} or
-- {type = "redacted_thinking", data}), in requests, answers and stream
-- deltas, so that thinking and its signature survive an OpenAI client.
local json = require "aiorch.json"
local canonical = require "aiorch.canonical"
local util = require "aiorch.adapter"
local common = require "aiorch.wire.common"

local fmt = string.format
local type = type
local pairs = pairs
local ipairs = ipairs
local next = next
local tostring = tostring
local setmetatable = setmetatable
local concat = table.concat
local max = math.max
local os_time = os.time
local tointeger = math.tointeger
local str, present = util.str, util.present
local js, jw = json.quote, json.word
local decode_plain = json.decode_plain
local null = json.null

local EMPTY = {} -- never written

local _M = { api = "openai" }

local continue_chat = common.continue_chat
local choice_count, choices_result = common.choice_count, common.choices_result
local text_of = common.text_of
local pass, translate, refuse = common.pass, common.translate, common.refuse
local copy, fail, set, tokens = common.copy, common.fail, common.set, common.tokens
local copy_to, ignore = common.copy_to, common.ignore
local count = util.num -- a count as the canonical model keeps it, or nil
local extra_of = common.extra_of_for("openai")

-- What Chat Completions can express of the canonical model: one cell per
-- key of canonical.CELLS.
_M.fields = {
  messages = pass(),
  ["role.system"] = pass(),
  ["role.developer"] = pass(),
  ["role.tool"] = translate("one `tool` message per tool result, with its `tool_call_id`"),
  ["message.name"] = pass(),
  prefill = refuse("Chat Completions answers a last assistant message instead of continuing it"),
  text = pass(),
  ["image.base64"] = translate("an `image_url` part with a `data:` URL"),
  ["image.url"] = translate("an `image_url` part"),
  ["image.file"] = refuse("`image_url` takes a URL, not a file id"),
  ["image.detail"] = translate("`image_url.detail`"),
  ["document.base64"] = translate("a `file` part, `file_data` as a `data:` URL"),
  ["document.url"] = refuse("`file` parts take data or a file id, not a URL"),
  ["document.text"] = refuse("`file` parts take base64 data, not plain text"),
  ["document.file"] = translate("a `file` part with `file_id`"),
  ["document.title"] = translate("`file.filename` when the part has no filename"),
  ["document.filename"] = translate("`file.filename`"),
  tool_call = translate("the assistant message's `tool_calls` (type function), ids unchanged"),
  ["tool_call.arguments"] = translate("`function.arguments`, as they are"),
  tool_result = translate("a `tool` message: the content as a string or text parts"),
  ["tool_result.is_error"] = refuse("`tool` messages have no error flag"),
  ["tool_result.image"] = refuse("`tool` messages take text only"),
  ["tool_result.document"] = refuse("`tool` messages take text only"),
  thinking = refuse("Chat Completions takes no reasoning back in a request"),
  ["thinking.unsigned"] = refuse("Chat Completions takes no reasoning back in a request"),
  redacted_thinking = refuse("Chat Completions takes no reasoning back in a request"),
  cache_control = refuse("OpenAI caches prompt prefixes by itself: there is no per-block marker"),
  tools = translate("`{type: function, function: {name, description, parameters, strict}}`"),
  ["tool.strict"] = translate("`function.strict`"),
  tool_choice = translate("`auto`, `none`, `required` as they are; `{name}` as `{type: function, function: {name}}`"),
  parallel_tool_calls = pass(),
  ["response_format.text"] = pass(),
  ["response_format.json_object"] = pass(),
  ["response_format.json_schema"] = translate("`{type: json_schema, json_schema: {name, description, schema, strict}}`"
    .. ", named `response` when it has no name"),
  max_tokens = translate("`max_tokens` (a client's `max_completion_tokens` is read as it)"),
  temperature = pass({ range = { 0, 2 } }),
  top_p = pass(),
  top_k = refuse("Chat Completions has no top_k"),
  stop = pass(),
  seed = pass(),
  presence_penalty = pass(),
  frequency_penalty = pass(),
  logprobs = pass(),
  top_logprobs = pass(),
  n = pass(),
  user = pass(),
  metadata = pass(),
  ["reasoning.effort"] = translate("`reasoning_effort`"),
  ["reasoning.budget_tokens"] = refuse("OpenAI takes an effort level, not a token budget"),
  ["reasoning.mode"] = translate("`disabled` is `reasoning_effort: none` (when no effort is given); "
    .. "`enabled` and `adaptive` leave it to the model"),
  ["reasoning.display"] = refuse("Chat Completions does not show reasoning"),
  stream_options = translate("upstream, `include_usage` is always asked when streaming; "
    .. "the caller gets usage only if it asked"),
  extra = translate("OpenAI fields sent as they came; another API's refused by name"),
  opaque = translate("OpenAI parts and tools (`input_audio`, custom tools) sent as they came; another API's "
    .. "refused by name"),
  ["anthropic-beta"] = translate("not sent: it only changes Anthropic's behaviour (what a beta adds to a request "
    .. "is refused on its own)"),
  signature = translate("not sent: a thought signature only means something to the API that made it (Gemini)"),
  ["response.text"] = translate("`message.content`"),
  ["response.tool_calls"] = translate("`message.tool_calls` (arguments as JSON text)"),
  ["response.thinking"] = translate("`reasoning_content` and `thinking_blocks` (an extension of OpenAI-compatible "
    .. "servers; OpenAI itself returns no reasoning text)"),
  ["response.refusal"] = translate("`message.refusal` is the answer's text"),
  ["response.finish_reason"] = translate("`stop`, `length`, `tool_calls` (and `function_call`), `content_filter`; "
    .. "another API's `refusal` is written `content_filter`"),
  ["response.usage"] = translate("`prompt_tokens` (every input token) and `completion_tokens`"),
  ["response.usage.cached_input_tokens"] = translate("`prompt_tokens_details.cached_tokens`"),
  ["response.usage.cache_write_tokens"] = translate("`prompt_tokens_details.cache_write_tokens`"),
  ["response.usage.reasoning_tokens"] = translate("`completion_tokens_details.reasoning_tokens`"),
  ["response.logprobs"] = pass(),
  ["response.choices"] = pass(),
  ["response.upstream"] = translate("`id`, `created`, `system_fingerprint`, `service_tier`"),
  ["response.stream"] = translate("`delta.content`, `delta.tool_calls`, `delta.reasoning_content`; "
    .. "a thinking signature as `delta.thinking_blocks`"),
}

-- Errors and models -------------------------------------------------------

local ERROR_TYPES = {
  [400] = "invalid_request_error", [401] = "invalid_request_error", [404] = "invalid_request_error",
  [405] = "invalid_request_error", [413] = "invalid_request_error", [429] = "rate_limit_exceeded",
  [500] = "server_error", [502] = "upstream_error", [503] = "server_error", [504] = "timeout",
}
local ERROR_CODES = { [401] = "invalid_api_key", [404] = "unknown_url", [405] = "method_not_allowed",
  [413] = "request_too_large" }

-- OpenAI's error object for an answer with this status.
function _M.error_body(status, message, code)
  code = code or ERROR_CODES[status]
  return concat { '{"error":{"message":', js(message), ',"type":', js(ERROR_TYPES[status] or "server_error"),
    ',"param":null,"code":', code and js(code) or "null", "}}" }
end

-- GET /v1/models in OpenAI's list shape; entries: {id, owner}.
function _M.models(entries)
  local data = {}
  for i, e in ipairs(entries) do
    data[i] = concat { '{"id":', js(e.id), ',"object":"model","created":0,"owned_by":', js(e.owner), "}" }
  end
  return '{"object":"list","data":[' .. concat(data, ",") .. "]}"
end

-- Requests: OpenAI -> canonical -------------------------------------------

-- "data:image/png;base64,AAAA" -> "image/png", "AAAA"
local function data_url(u)
  return u:match("^data:([^;,]+);base64,(.*)$")
end

local PART_KEYS = {
  text = set { "type", "text" },
  image_url = set { "type", "image_url" },
  file = set { "type", "file" },
}

local USER_PARTS = "'text', 'image_url', 'input_audio' and 'file'"

-- Paths name the field at fault; they are built only for an error.
local function message_path(i)
  return fmt("messages[%d]", i - 1)
end

local function part_path(i, j)
  return fmt("messages[%d].content[%d]", i - 1, j - 1)
end

-- Content part j of message i (a user, system or developer message).
local function decode_part(p, i, j, text_only)
  if type(p) ~= "table" then
    return fail(part_path(i, j), "Invalid type: expected an object")
  end
  local t = p.type
  local part
  if t == "text" then
    local text = p.text
    if type(text) ~= "string" then
      return fail(part_path(i, j) .. ".text", "Missing required parameter (a string)")
    end
    part = { type = "text", text = text, extra = nil }
  elseif text_only then
    return fail(part_path(i, j) .. ".type", fmt("Invalid value: %s. Supported values are: 'text'", tostring(t)))
  elseif t == "image_url" then
    local iu = p.image_url
    if type(iu) ~= "table" or type(iu.url) ~= "string" then
      return fail(part_path(i, j) .. ".image_url.url", "Missing required parameter (a string)")
    end
    local media, data = data_url(iu.url)
    part = { type = "image", source = media and { type = "base64", media_type = media, data = data }
      or { type = "url", url = iu.url } }
    if present(iu.detail) then
      part.detail = iu.detail
    end
  elseif t == "file" then
    local f = p.file
    if type(f) ~= "table" then
      return fail(part_path(i, j) .. ".file", "Missing required parameter (an object)")
    end
    local source
    if type(f.file_data) == "string" then
      local media, data = data_url(f.file_data)
      -- Plain base64 (no data: URL) is a PDF, as OpenAI takes files.
      source = { type = "base64", media_type = media or "application/pdf", data = data or f.file_data }
    elseif type(f.file_id) == "string" then
      source = { type = "file", file_id = f.file_id }
    else
      return fail(part_path(i, j) .. ".file", "one of file_data or file_id is required")
    end
    part = { type = "document", source = source, filename = str(f.filename) }
  elseif t == "input_audio" then
    return { type = "opaque", api = "openai", value = p }
  else
    return fail(part_path(i, j) .. ".type", fmt("Invalid value: %s. Supported values are: %s", tostring(t),
      USER_PARTS))
  end
  part.extra = extra_of(p, PART_KEYS[t])
  return part
end

-- The content of message i: a string stays one; a list becomes parts.
local function decode_content(c, i, text_only)
  if type(c) == "string" then
    return c
  end
  if type(c) ~= "table" then
    return fail(message_path(i) .. ".content", "Invalid type: expected a string or an array of content parts")
  end
  local parts = {}
  for j, p in ipairs(c) do
    local part, err = decode_part(p, i, j, text_only)
    if not part then
      return nil, err
    end
    parts[j] = part
  end
  return parts
end

-- thinking_blocks (or reasoning_content) -> thinking parts, appended to
-- parts. i: the message's index (nil: an answer's message).
local function decode_thinking(m, parts, i)
  local blocks = m.thinking_blocks
  if type(blocks) == "table" and #blocks > 0 then
    for j, b in ipairs(blocks) do
      if type(b) == "table" and b.type == "thinking" and type(b.thinking) == "string" then
        parts[#parts + 1] = { type = "thinking", text = b.thinking, signature = str(b.signature) }
      elseif type(b) == "table" and b.type == "redacted_thinking" and type(b.data) == "string" then
        parts[#parts + 1] = { type = "redacted_thinking", data = b.data }
      else
        local where = fmt("%s.thinking_blocks[%d]", i and message_path(i) or "message", j - 1)
        if type(b) ~= "table" then
          return fail(where, "Invalid type: expected an object")
        end
        return fail(where .. ".type", "Invalid value: expected 'thinking' (with thinking) or 'redacted_thinking' "
          .. "(with data)")
      end
    end
  else
    local r = m.reasoning_content
    if type(r) == "string" and r ~= "" then
      parts[#parts + 1] = { type = "thinking", text = r }
    end
  end
  return parts
end

local ASSISTANT_KEYS = set { "role", "content", "name", "tool_calls", "refusal", "reasoning_content",
  "thinking_blocks" }
local MESSAGE_KEYS = set { "role", "content", "name" }
local TOOL_KEYS = set { "role", "content", "tool_call_id" }

local function decode_assistant(m, i)
  local parts = {}
  local _, err = decode_thinking(m, parts, i)
  if err then
    return nil, err
  end
  local c = m.content
  local texts = 0
  if type(c) == "string" then
    if c ~= "" then
      parts[#parts + 1] = { type = "text", text = c }
      texts = 1
    end
  elseif type(c) == "table" then
    for j, p in ipairs(c) do
      if type(p) == "table" and p.type == "text" and type(p.text) == "string" then
        parts[#parts + 1] = { type = "text", text = p.text }
      elseif type(p) == "table" and p.type == "refusal" and type(p.refusal) == "string" then
        parts[#parts + 1] = { type = "text", text = p.refusal }
      else
        return fail(part_path(i, j) .. ".type", "Invalid value. Supported values are: 'text' and 'refusal'")
      end
      texts = texts + 1
    end
  elseif present(c) then
    return fail(message_path(i) .. ".content", "Invalid type: expected a string, an array of content parts or null")
  end
  local extra = extra_of(m, ASSISTANT_KEYS)
  if type(m.refusal) == "string" and m.refusal ~= "" then
    if texts == 0 then
      parts[#parts + 1] = { type = "text", text = m.refusal }
      texts = 1
    else
      extra = extra or { api = "openai", fields = {} }
      extra.fields.refusal = m.refusal
    end
  end
  local calls = m.tool_calls
  if present(calls) then
    if type(calls) ~= "table" then
      return fail(message_path(i) .. ".tool_calls", "Invalid type: expected an array")
    end
    for j, tc in ipairs(calls) do
      if type(tc) ~= "table" or type(tc.id) ~= "string" then
        return fail(fmt("%s.tool_calls[%d].id", message_path(i), j - 1), "Missing required parameter (a string)")
      end
      if tc.type == "custom" then
        parts[#parts + 1] = { type = "opaque", api = "openai", value = tc }
      else
        local f = tc["function"]
        if type(f) ~= "table" or type(f.name) ~= "string" then
          return fail(fmt("%s.tool_calls[%d].function.name", message_path(i), j - 1),
            "Missing required parameter (a string)")
        end
        parts[#parts + 1] = { type = "tool_call", id = tc.id, name = f.name,
          arguments = type(f.arguments) == "string" and f.arguments or "" }
      end
    end
  end
  local msg = { role = "assistant", content = nil, name = str(m.name), extra = extra }
  if type(c) == "string" and texts == 1 and #parts == 1 then
    msg.content = c
  else
    msg.content = parts
  end
  return msg
end

local function decode_tool(m, i)
  if type(m.tool_call_id) ~= "string" then
    return fail(message_path(i) .. ".tool_call_id", "Missing required parameter (a string)")
  end
  local c = m.content
  local content
  if type(c) == "string" then
    content = c
  elseif type(c) == "table" then
    local err
    content, err = decode_content(c, i, true)
    if not content then
      return nil, err
    end
  elseif present(c) then
    return fail(message_path(i) .. ".content", "Invalid type: expected a string or an array of text parts")
  end
  return { type = "tool_result", id = m.tool_call_id, content = content, extra = extra_of(m, TOOL_KEYS) }
end

local ROLES = "'system', 'assistant', 'user', 'tool' and 'developer'"

local DETAILS = canonical.DETAILS

-- The messages. A list in which the decoder found everything canonical
-- validation checks is vouched for (canonical.vouch): it is not walked
-- again. Two things only validation says are looked at here, without
-- failing: an image's detail, and tool results that answer no earlier call.
local function decode_messages(list)
  if type(list) ~= "table" or #list == 0 then
    return fail("messages", "Missing required parameter (a non-empty array)")
  end
  local out, n = {}, 0
  local sure, calls = true, nil
  for i, m in ipairs(list) do
    if type(m) ~= "table" then
      return fail(message_path(i), "Invalid type: expected an object")
    end
    local role = m.role
    if role == "user" or role == "system" or role == "developer" then
      local c = m.content
      if type(c) ~= "string" then
        local err
        c, err = decode_content(c, i, role ~= "user")
        if not c then
          return nil, err
        end
        for _, p in ipairs(c) do
          if p.detail ~= nil and not DETAILS[p.detail] then
            sure = false
          end
        end
      end
      local name = m.name
      n = n + 1
      out[n] = { role = role, content = c, name = type(name) == "string" and name or nil,
        extra = extra_of(m, MESSAGE_KEYS) }
    elseif role == "assistant" then
      local msg, err = decode_assistant(m, i)
      if not msg then
        return nil, err
      end
      if type(msg.content) == "table" then
        for _, p in ipairs(msg.content) do
          if p.type == "tool_call" then
            calls = calls or {}
            calls[p.id] = true
          end
        end
      end
      n = n + 1
      out[n] = msg
    elseif role == "tool" then
      local part, err = decode_tool(m, i)
      if not part then
        return nil, err
      end
      if calls and not calls[part.id] then
        sure = false
      end
      -- Consecutive tool messages: one canonical tool message, in order.
      local last = out[n]
      if last and last.role == "tool" then
        last.content[#last.content + 1] = part
      else
        n = n + 1
        out[n] = { role = "tool", content = { part } }
      end
    else
      return fail(message_path(i) .. ".role", fmt("Invalid value: %s. Supported values are: %s", tostring(role),
        ROLES))
    end
  end
  return sure and canonical.vouch(out) or out
end

local function decode_tools(list)
  if type(list) ~= "table" then
    return fail("tools", "Invalid type: expected an array")
  end
  local out = {}
  for i, t in ipairs(list) do
    local path = fmt("tools[%d]", i - 1)
    if type(t) ~= "table" then
      return fail(path, "Invalid type: expected an object")
    end
    if t.type == "function" or t.type == nil then
      local f = t["function"]
      if type(f) ~= "table" or type(f.name) ~= "string" then
        return fail(path .. ".function.name", "Missing required parameter (a string)")
      end
      out[i] = { name = f.name, description = str(f.description),
        parameters = type(f.parameters) == "table" and f.parameters or nil,
        strict = type(f.strict) == "boolean" and f.strict or nil }
    else
      out[i] = { type = "opaque", api = "openai", value = t,
        name = type(t.custom) == "table" and str(t.custom.name) or nil }
    end
  end
  return out
end

local function decode_tool_choice(tc, extra)
  if type(tc) == "string" then
    return tc
  end
  if type(tc) == "table" and tc.type == "function" and type(tc["function"]) == "table"
    and type(tc["function"].name) == "string" then
    return { name = tc["function"].name }
  end
  extra.tool_choice = tc -- allowed_tools, custom: OpenAI's own
  return nil
end

local function decode_response_format(rf)
  if type(rf) ~= "table" then
    return fail("response_format", "Invalid type: expected an object")
  end
  if rf.type == "json_schema" then
    local s = rf.json_schema
    if type(s) ~= "table" then
      return fail("response_format.json_schema", "Missing required parameter (an object)")
    end
    return { type = "json_schema", name = str(s.name), description = str(s.description),
      schema = type(s.schema) == "table" and s.schema or json.object(), strict = type(s.strict) == "boolean"
      and s.strict or nil }
  end
  return { type = rf.type }
end

-- How decode_request takes each field of the body: true, copied as it is
-- (canonical.validate checks it); false, read on its own below. Any other
-- field is OpenAI's own, kept in extra.
local FIELDS = { temperature = true, top_p = true, seed = true, presence_penalty = true, frequency_penalty = true,
  logprobs = true, top_logprobs = true, n = true, user = true, metadata = true, parallel_tool_calls = true,
  model = false, messages = false, stream = false, stream_options = false, max_tokens = false,
  max_completion_tokens = false, stop = false, tools = false, tool_choice = false, response_format = false,
  reasoning_effort = false }

-- decode_request(doc, headers) -> req, info ({model, stream, include_usage}),
-- or nil, message naming the field.
function _M.decode_request(doc)
  if type(doc) ~= "table" then
    return nil, "the request body must be a JSON object"
  end
  local model = doc.model
  if type(model) ~= "string" or model == "" then
    return fail("model", "Missing required parameter (a string)")
  end
  local messages, err = decode_messages(doc.messages)
  if not messages then
    return nil, err
  end
  -- (the fields named here are the usual ones and raw, which the gateway adds: the table is sized once)
  local req = { messages = messages, max_tokens = nil, raw = nil, extra = nil }
  local extra
  for k, v in next, doc do -- the fields present, once
    if v ~= null then
      local how = FIELDS[k]
      if how then
        req[k] = v
      elseif how == nil then
        extra = extra or {}
        extra[k] = v
      end
    end
  end
  local m = doc.max_completion_tokens
  if m == nil or m == null then
    m = doc.max_tokens
  end
  if m ~= nil and m ~= null then
    req.max_tokens = m
  end
  local stop = doc.stop
  if type(stop) == "string" then
    req.stop = { stop }
  elseif stop ~= nil and stop ~= null then
    req.stop = stop
  end
  local v = doc.tools
  if v ~= nil and v ~= null then
    req.tools, err = decode_tools(v)
    if not req.tools then
      return nil, err
    end
  end
  v = doc.tool_choice
  if v ~= nil and v ~= null then
    extra = extra or {}
    req.tool_choice = decode_tool_choice(v, extra)
  end
  v = doc.response_format
  if v ~= nil and v ~= null then
    req.response_format, err = decode_response_format(v)
    if not req.response_format then
      return nil, err
    end
  end
  v = doc.reasoning_effort
  if v ~= nil and v ~= null then
    req.reasoning = { effort = v }
  end
  local so = doc.stream_options
  local include_usage = false
  if type(so) == "table" then
    include_usage = so.include_usage == true
    if present(so.include_usage) then
      req.stream_options = { include_usage = so.include_usage }
    end
    local rest = extra_of(so, { include_usage = true })
    if rest then
      extra = extra or {}
      extra.stream_options = rest.fields
    end
  end
  if extra and next(extra) then
    req.extra = { api = "openai", fields = extra }
  end
  return req, { model = model, stream = doc.stream == true, include_usage = include_usage }
end

-- Requests: canonical -> OpenAI -------------------------------------------

-- Each part type's attributes the encoder writes.
local ENCODED = common.encoded()
local encoder = common.encoder("openai", ENCODED)
local cannot, merge_extra, check_keys = encoder.cannot, encoder.merge_extra, encoder.check_keys
local opaque_value = encoder.opaque_value
local write_fields, image_url = encoder.write_fields, encoder.image_url

local function encode_part(p, where)
  check_keys(p, where)
  local t = p.type
  local out
  if t == "text" then
    out = { type = "text", text = p.text }
  elseif t == "image" then
    out = image_url(p, where)
  elseif t == "document" then
    local s = p.source
    local file = { filename = p.filename or p.title }
    if s.type == "base64" then
      file.file_data = "data:" .. s.media_type .. ";base64," .. s.data
    elseif s.type == "file" then
      file.file_id = s.file_id
    else
      cannot(where .. ": a document by " .. tostring(s.type))
    end
    out = { type = "file", file = file }
  elseif t == "opaque" then
    return opaque_value(p, where)
  else
    cannot(fmt("%s: a %s part here", where, t))
  end
  return merge_extra(out, p.extra, where)
end

local function encode_parts(content, where)
  if type(content) == "string" then
    return content
  end
  local out = json.array()
  for i, p in ipairs(content) do
    out[i] = encode_part(p, fmt("%s.content[%d]", where, i - 1))
  end
  return out
end

local function encode_assistant(m, where)
  local msg = { role = "assistant" }
  if type(m.content) == "string" then
    msg.content = m.content
    return msg
  end
  local texts, calls = {}, nil
  for i, p in ipairs(m.content) do
    local w = fmt("%s.content[%d]", where, i - 1)
    check_keys(p, w)
    if p.type == "text" then
      texts[#texts + 1] = merge_extra({ type = "text", text = p.text }, p.extra, w)
    elseif p.type == "tool_call" then
      calls = calls or json.array()
      calls[#calls + 1] = merge_extra({ id = p.id, type = "function",
        ["function"] = { name = p.name, arguments = p.arguments } }, p.extra, w)
    elseif p.type == "opaque" then
      calls = calls or json.array()
      calls[#calls + 1] = opaque_value(p, w) -- a custom tool call
    else
      cannot(fmt("%s: a %s part", w, p.type))
    end
  end
  if #texts == 0 then
    msg.content = calls and null or ""
  elseif #texts == 1 and not texts[1].extra then
    msg.content = texts[1].text
  else
    msg.content = json.array(texts)
  end
  msg.tool_calls = calls
  return msg
end

local function encode_messages(list)
  if list[#list].role == "assistant" then
    cannot("prefill (a last assistant message)")
  end
  local out = json.array()
  for i, m in ipairs(list) do
    local where = fmt("messages[%d]", i - 1)
    local role = m.role
    if role == "tool" then
      for j, p in ipairs(m.content) do
        local w = fmt("%s.content[%d]", where, j - 1)
        if p.type ~= "tool_result" then
          cannot(w .. ": a " .. tostring(p.type) .. " part in a tool message")
        end
        check_keys(p, w)
        local c = p.content
        if c == nil then
          c = ""
        elseif type(c) ~= "string" then
          for k, q in ipairs(c) do
            if q.type ~= "text" then
              cannot(fmt("%s.content[%d]: a %s in a tool result", w, k - 1, tostring(q.type)))
            end
          end
          c = encode_parts(c, w)
        end
        out[#out + 1] = merge_extra({ role = "tool", tool_call_id = p.id, content = c }, p.extra, w)
      end
    else
      local msg
      if role == "assistant" then
        msg = encode_assistant(m, where)
      else
        msg = { role = role, content = encode_parts(m.content, where) }
      end
      msg.name = m.name
      for k in pairs(m) do
        if k ~= "role" and k ~= "content" and k ~= "name" and k ~= "extra" then
          cannot(where .. "." .. k)
        end
      end
      out[#out + 1] = merge_extra(msg, m.extra, where)
    end
  end
  return out
end

local function encode_tools(body, tools)
  local out = json.array()
  for i, t in ipairs(tools) do
    local where = fmt("tools[%d]", i - 1)
    if t.type == "opaque" then
      out[i] = opaque_value(t, where)
    else
      for k in pairs(t) do
        if k ~= "name" and k ~= "description" and k ~= "parameters" and k ~= "strict" and k ~= "extra" then
          cannot(where .. "." .. k)
        end
      end
      local params = t.parameters
      if params and next(params) == nil then
        params = json.object()
      end
      out[i] = merge_extra({ type = "function", ["function"] = { name = t.name, description = t.description,
        parameters = params, strict = t.strict } }, t.extra, where)
    end
  end
  body.tools = out
end

-- Each canonical field -> how it is written. A field without an entry
-- cannot be written (encode_request raises).
local REQUEST = {
  messages = function(body, v)
    body.messages = encode_messages(v)
  end,
  max_tokens = copy_to("max_tokens"),
  temperature = copy_to("temperature"),
  top_p = copy_to("top_p"),
  seed = copy_to("seed"),
  presence_penalty = copy_to("presence_penalty"),
  frequency_penalty = copy_to("frequency_penalty"),
  logprobs = copy_to("logprobs"),
  top_logprobs = copy_to("top_logprobs"),
  n = copy_to("n"),
  user = copy_to("user"),
  parallel_tool_calls = copy_to("parallel_tool_calls"),
  stop = function(body, v)
    body.stop = json.array(copy(v))
  end,
  metadata = function(body, v)
    body.metadata = json.object(copy(v))
  end,
  tools = encode_tools,
  tool_choice = function(body, v)
    body.tool_choice = type(v) == "table" and { type = "function", ["function"] = { name = v.name } } or v
  end,
  response_format = function(body, v)
    if v.type == "json_schema" then
      body.response_format = { type = "json_schema", json_schema = { name = v.name or "response",
        description = v.description, schema = v.schema, strict = v.strict } }
    else
      body.response_format = { type = v.type }
    end
  end,
  reasoning = function(body, v)
    if v.budget_tokens ~= nil or v.display ~= nil then
      cannot(v.budget_tokens ~= nil and "reasoning.budget_tokens" or "reasoning.display")
    end
    body.reasoning_effort = v.effort or (v.mode == "disabled" and "none" or nil)
  end,
  stream_options = ignore, -- written with opts.stream
  extra = ignore, -- merged last
  continue_from = ignore, -- after the messages
  policy = ignore,
  raw = ignore,
}

-- encode_request(req, opts) -> the wire body (a table for aiorch.json.encode).
-- req: canonical.normalize's; opts: {model, stream, default_max_tokens}.
-- Raises on a field it cannot write (canonical.unsupported refuses those).
function _M.encode_request(req, opts)
  opts = opts or EMPTY
  local body = { model = opts.model }
  write_fields(REQUEST, body, req)
  -- Continuing an answer another provider began: it is ours so far.
  continue_chat(body.messages, req.continue_from)
  merge_extra(body, req.extra, "extra")
  if opts.stream then
    body.stream = true
    body.stream_options = body.stream_options or {}
    body.stream_options.include_usage = true
  end
  return body
end

-- Responses: OpenAI -> canonical ------------------------------------------

local function usage_of(u)
  if type(u) ~= "table" then
    return nil
  end
  local p, c = u.prompt_tokens_details, u.completion_tokens_details
  if type(p) ~= "table" then
    p = EMPTY
  end
  if type(c) ~= "table" then
    c = EMPTY
  end
  return {
    input_tokens = count(u.prompt_tokens),
    output_tokens = count(u.completion_tokens),
    cached_input_tokens = count(p.cached_tokens),
    cache_write_tokens = count(p.cache_write_tokens),
    reasoning_tokens = count(c.reasoning_tokens),
  }
end

-- The answer's text: its content, else its refusal (which comes instead
-- of content; it is still the model's answer); nil when neither is text.
local function message_text(msg)
  local text = msg.content
  if type(text) == "string" then
    return text
  end
  text = msg.refusal
  return type(text) == "string" and text or nil
end

local function message_parts(msg)
  local parts = {}
  if msg.thinking_blocks ~= nil or msg.reasoning_content ~= nil then
    decode_thinking(msg, parts)
  end
  local text = message_text(msg)
  if text and text ~= "" then
    parts[#parts + 1] = { type = "text", text = text }
  end
  local calls = msg.tool_calls
  if type(calls) == "table" then
    for _, tc in ipairs(calls) do
      local f = type(tc) == "table" and tc["function"]
      if type(f) == "table" and type(f.name) == "string" then
        parts[#parts + 1] = { type = "tool_call", id = str(tc.id) or "", name = f.name,
          arguments = str(f.arguments) or "" }
      end
    end
  end
  return parts
end

local function upstream_of(doc)
  local id, fp, tier = doc.id, doc.system_fingerprint, doc.service_tier
  return { id = type(id) == "string" and id or nil, created = count(doc.created),
    system_fingerprint = type(fp) == "string" and fp or nil, service_tier = type(tier) == "string" and tier or nil }
end

-- Choice c (the i-th): its content, text, finish reasons, logprobs and index.
local function choice_values(c, i)
  local msg = c.message
  local provider = c.finish_reason
  if type(provider) ~= "string" then
    provider = nil
  end
  local logprobs = c.logprobs
  return message_parts(msg), message_text(msg) or "", canonical.finish_reason(provider), provider,
    type(logprobs) == "table" and logprobs or nil, count(c.index) or i - 1
end

local function choice_entry(c, i)
  local parts, text, finish, provider, logprobs, index = choice_values(c, i)
  return { index = index, content = parts, response_text = text, finish_reason = finish,
    provider_finish_reason = provider, logprobs = logprobs }
end

-- decode_response(doc) -> result, or nil, kind, message. doc: a decoded
-- 2xx body (aiorch.json.decode).
function _M.decode_response(doc)
  local choices = type(doc) == "table" and doc.choices
  local first = type(choices) == "table" and choices[1]
  if type(first) ~= "table" or type(first.message) ~= "table" then
    return nil, "parse", "reply has no choices[1].message"
  end
  -- One choice (the usual answer) needs no list of them.
  local list
  for i, c in ipairs(choices) do
    if i > 1 and type(c) == "table" and type(c.message) == "table" then
      list = list or { choice_entry(first, 1) }
      list[#list + 1] = choice_entry(c, i)
    end
  end
  local parts, text, finish, provider, logprobs
  if list then
    local one = list[1]
    parts, text, finish, provider, logprobs = one.content, one.response_text, one.finish_reason,
      one.provider_finish_reason, one.logprobs
  else
    parts, text, finish, provider, logprobs = choice_values(first, 1)
  end
  local model = doc.model
  -- The fields every answer has; choices and logprobs when there are. With
  -- the adapter's raw_body that is 8 fields: 8 nodes, from the allocator's
  -- lists (a constructor naming more would size the table for 16, with malloc).
  local result = {
    content = parts,
    text = text,
    model = type(model) == "string" and model or nil,
    finish_reason = finish,
    provider_finish_reason = provider,
    usage = usage_of(doc.usage) or {},
    upstream = upstream_of(doc),
  }
  if list then
    result.choices = list
  end
  if logprobs ~= nil then
    result.logprobs = logprobs
  end
  return result
end

-- Responses: canonical -> OpenAI ------------------------------------------

local FINISH_OUT = { stop = "stop", length = "length", tool_calls = "tool_calls",
  content_filter = "content_filter", refusal = "content_filter", other = "stop" }

-- The finish reason of a response (or a choice of one) in OpenAI's words.
local function finish_of(f, m)
  if m.api == "openai" and type(m.provider_finish_reason) == "string" then
    return m.provider_finish_reason
  end
  if type(f) ~= "string" then
    return "stop"
  end
  return FINISH_OUT[canonical.finish_reason(f)]
end

-- Every choice of the results, in order: {content, text, finish, logprobs}.
local function each_choice(results)
  local out = {}
  for _, r in ipairs(results) do
    local m = r.metadata or EMPTY
    if type(r.choices) == "table" and #r.choices > 1 then
      for _, c in ipairs(r.choices) do
        out[#out + 1] = { content = c.content, text = c.response_text or "", finish = finish_of(c.finish_reason, m),
          logprobs = c.logprobs }
      end
    else
      out[#out + 1] = { content = r.content, text = r.response_text or "", finish = finish_of(m.finish_reason, m),
        logprobs = m.logprobs }
    end
  end
  return out
end

local function usage_json(results)
  local i, o, cached, written, reasoning = 0, 0, nil, nil, nil
  for _, r in ipairs(results) do
    local u = r.metadata and r.metadata.usage or EMPTY
    i, o = i + tokens(u.input_tokens), o + tokens(u.output_tokens)
    if type(u.cached_input_tokens) == "number" or type(u.cache_write_tokens) == "number" then
      cached = (cached or 0) + tokens(u.cached_input_tokens)
      if type(u.cache_write_tokens) == "number" then
        written = (written or 0) + tokens(u.cache_write_tokens)
      end
    end
    if type(u.reasoning_tokens) == "number" then
      reasoning = (reasoning or 0) + tokens(u.reasoning_tokens)
    end
  end
  local head = fmt('{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d', i, o, i + o)
  if not (cached or reasoning) then
    return head .. "}"
  end
  return head .. (cached and fmt(',"prompt_tokens_details":{"cached_tokens":%d%s}', cached,
    written and fmt(',"cache_write_tokens":%d', written) or "") or "")
    .. (reasoning and fmt(',"completion_tokens_details":{"reasoning_tokens":%d}', reasoning) or "") .. "}"
end

-- The thinking of parts as reasoning_content and thinking_blocks, or nil.
local function thinking_json(parts)
  local text, blocks = {}, {}
  for _, p in ipairs(parts) do
    if p.type == "thinking" then
      text[#text + 1] = p.text
      blocks[#blocks + 1] = concat { '{"type":"thinking","thinking":', js(p.text),
        p.signature and ',"signature":' .. js(p.signature) or "", "}" }
    elseif p.type == "redacted_thinking" then
      blocks[#blocks + 1] = '{"type":"redacted_thinking","data":' .. js(p.data) .. "}"
    end
  end
  if #blocks == 0 then
    return nil
  end
  return concat { ',"reasoning_content":', js(concat(text)), ',"thinking_blocks":[', concat(blocks, ","), "]" }
end

-- The message of a choice: its content, and its tool calls and thinking
-- (as JSON text to follow the content, "" without them). One text part
-- (the usual answer) needs no list.
local function message_json(text, parts)
  if type(parts) ~= "table" then
    return js(text), ""
  end
  local one, texts, calls, thinking
  for _, p in ipairs(parts) do
    local t = p.type
    if t == "text" then
      if texts then
        texts[#texts + 1] = p.text
      elseif one then
        texts = { one, p.text }
      else
        one = p.text
      end
    elseif t == "tool_call" then
      calls = calls or {}
      calls[#calls + 1] = '{"id":' .. js(p.id) .. ',"type":"function","function":{"name":' .. js(p.name)
        .. ',"arguments":' .. js(p.arguments) .. "}}"
    elseif t == "thinking" or t == "redacted_thinking" then
      thinking = true
    end
  end
  local content = texts and js(concat(texts)) or one and js(one) or "null"
  if not (calls or thinking) then
    return content, ""
  end
  return content, (calls and ',"tool_calls":[' .. concat(calls, ",") .. "]" or "")
    .. (thinking and thinking_json(parts) or "")
end

local function choice_json(i, text, parts, finish, logprobs)
  local content, extra = message_json(text, parts)
  return '{"index":' .. (i - 1) .. ',"message":{"role":"assistant","content":' .. content .. ',"refusal":null'
    .. extra .. '},"logprobs":' .. (type(logprobs) == "table" and json.encode_safe(logprobs) or "null")
    .. ',"finish_reason":' .. jw(finish) .. "}"
end

-- encode_response(results, id, model) -> a chat.completion's JSON text:
-- one choice per result (per choice of a result that has several).
-- results: StandardAIResponses; id: letters and digits.
function _M.encode_response(results, id, model)
  local first = results[1]
  local choices
  local r = results[2] == nil and first
  if r and not (type(r.choices) == "table" and #r.choices > 1) then -- one answer, one choice: no lists
    local m = r.metadata or EMPTY
    choices = choice_json(1, r.response_text or "", r.content, finish_of(m.finish_reason, m), m.logprobs)
  else
    local list = {}
    for i, c in ipairs(each_choice(results)) do
      list[i] = choice_json(i, c.text, c.content, c.finish, c.logprobs)
    end
    choices = concat(list, ",")
  end
  return '{"id":"chatcmpl-' .. id .. '","object":"chat.completion","created":' .. os_time() .. ',"model":'
    .. jw(first and first.metadata and first.metadata.model or model) .. ',"choices":[' .. choices
    .. '],"usage":' .. usage_json(results) .. ',"system_fingerprint":null}'
end

-- Streams: OpenAI -> canonical events -------------------------------------

local Decoder = {}
Decoder.__index = Decoder
_M.Decoder = Decoder

-- The assembly of one choice: its parts in order, tool calls by index.
local function new_choice()
  return { parts = {}, tools = {}, last = nil, thinking = nil }
end

local function append(st, kind, text)
  local last = st.last
  if not (last and last.type == kind and not last.signature) then
    last = { type = kind, buf = {} }
    st.parts[#st.parts + 1] = last
    st.last = last
  end
  last.buf[#last.buf + 1] = text
  return last
end

-- (An event is made whole: with the upstream event it came from, raw, and
-- for a choice other than the first, the choice's index, choice.)

-- thinking_blocks in a delta: the text not yet streamed, the signature.
local function delta_blocks(st, blocks, out, sse, idx)
  local choice = idx ~= 0 and idx or nil
  for _, b in ipairs(blocks) do
    if type(b) == "table" and b.type == "thinking" then
      local cur = st.last and st.last.type == "thinking" and not st.last.signature and st.last or nil
      local seen = cur and concat(cur.buf) or ""
      local full = str(b.thinking) or ""
      if #full > #seen and full:sub(1, #seen) == seen then
        local rest = full:sub(#seen + 1)
        cur = append(st, "thinking", rest)
        out[#out + 1] = { type = "thinking", text = rest, raw = sse, choice = choice }
      end
      if type(b.signature) == "string" then
        cur = cur or append(st, "thinking", "")
        cur.signature = b.signature
        out[#out + 1] = { type = "thinking_signature", signature = b.signature, raw = sse,
          choice = choice }
      end
    elseif type(b) == "table" and b.type == "redacted_thinking" and type(b.data) == "string" then
      local p = { type = "redacted_thinking", data = b.data }
      st.parts[#st.parts + 1] = p
      st.last = p
      out[#out + 1] = { type = "redacted_thinking", data = b.data, raw = sse, choice = choice }
    end
  end
end

function Decoder:choice_state(idx)
  local st = self.choices[idx]
  if not st then
    st = new_choice()
    self.choices[idx] = st
  end
  return st
end

-- One choice of a chunk: its events appended to out.
-- (Fields that are usually absent or null are compared with both before
-- their type is asked: no call for them.)
function Decoder:decode_choice(c, out, sse)
  local idx = c.index
  idx = idx == 0 and 0 or tointeger(idx) or 0
  local choice = idx ~= 0 and idx or nil
  local st = self.choices[idx] or self:choice_state(idx)
  local f = c.finish_reason
  if f ~= nil and f ~= null and type(f) == "string" then
    st.finish = f
    if idx == 0 then
      self.finish_reason = f
    end
  end
  local lp = c.logprobs
  if lp ~= nil and lp ~= null and type(lp) == "table" and type(lp.content) == "table" then
    st.logprobs = st.logprobs or json.array()
    for _, one in ipairs(lp.content) do
      st.logprobs[#st.logprobs + 1] = one
    end
  end
  local d = c.delta
  if type(d) ~= "table" then
    return
  end
  local r = d.reasoning_content
  if r ~= nil and r ~= null and type(r) == "string" and r ~= "" then
    append(st, "thinking", r)
    out[#out + 1] = { type = "thinking", text = r, raw = sse, choice = choice }
  end
  local blocks = d.thinking_blocks
  if blocks ~= nil and blocks ~= null and type(blocks) == "table" then
    delta_blocks(st, blocks, out, sse, idx)
  end
  local text = d.content
  if text == nil or text == null or text == "" or type(text) ~= "string" then
    text = d.refusal
    if text == nil or text == null or type(text) ~= "string" then
      text = nil
    end
  end
  if text and text ~= "" then
    append(st, "text", text)
    if idx == 0 then
      local parts = self.parts
      parts[#parts + 1] = text
    end
    out[#out + 1] = { type = "text", text = text, raw = sse, choice = choice }
  end
  local calls = d.tool_calls
  if calls ~= nil and calls ~= null and type(calls) == "table" then
    for i, tc in ipairs(calls) do
      if type(tc) == "table" then
        local ti = tointeger(tc.index) or i - 1
        local f2 = type(tc["function"]) == "table" and tc["function"] or EMPTY
        local call = st.tools[ti]
        if not call then
          call = { type = "tool_call", id = str(tc.id) or "", name = str(f2.name) or "", buf = {} }
          st.tools[ti] = call
          st.parts[#st.parts + 1] = call
          st.last = call
          out[#out + 1] = { type = "tool_call", index = ti, id = call.id, name = call.name, raw = sse,
            choice = choice }
        end
        local args = str(f2.arguments)
        if args and args ~= "" then
          call.buf[#call.buf + 1] = args
          out[#out + 1] = { type = "tool_arguments", index = ti, text = args, raw = sse, choice = choice }
        end
      end
    end
  end
end

-- event(sse) -> one canonical event or a list of them; {type = "meta"}
-- for an event without content. sse: {event, data}.
function Decoder:event(sse)
  self.events = self.events + 1
  local data = sse.data
  if data == "[DONE]" then
    self.done = true
    return { type = "meta", raw = sse }
  end
  if self.err then
    return nil -- what follows an error is not relayed: the caller ends the stream its own way
  end
  local doc, err = decode_plain(data or "") -- partial arguments are text: nothing here goes back as JSON
  if type(doc) ~= "table" then
    self.err = { "parse", "malformed stream chunk: " .. (err or "not an object") }
    return nil
  end
  local e = doc.error
  if e ~= nil and e ~= null then
    self.err = { self.classify(e) }
    return nil
  end
  local model = doc.model
  if type(model) == "string" then
    self.model = model
  end
  if not self.upstream then
    self.upstream = upstream_of(doc)
  end
  local u = doc.usage
  if u ~= nil and u ~= null and type(u) == "table" then
    self.usage = usage_of(u)
  end
  local out = {}
  local choices = doc.choices
  if type(choices) == "table" then
    for _, c in ipairs(choices) do
      if type(c) == "table" then
        self:decode_choice(c, out, sse)
      end
    end
  end
  if #out == 0 then
    return { type = "meta", raw = sse }
  end
  return out -- (a list even of one: the caller takes lists as they are)
end

-- The parts of an assembled choice, their pieces joined.
local function finished_parts(st)
  local out = {}
  for i, p in ipairs(st.parts) do
    if p.type == "tool_call" then
      out[i] = { type = "tool_call", id = p.id, name = p.name, arguments = concat(p.buf) }
    elseif p.type == "redacted_thinking" then
      out[i] = p
    else
      out[i] = { type = p.type, text = concat(p.buf), signature = p.signature }
    end
  end
  return out
end

-- result() -> the result as decode_response gives it, or nil, kind, message.
function Decoder:result()
  if self.err then
    return nil, self.err[1], self.err[2], self.err[3]
  end
  -- Without [DONE] or a finish_reason the answer may be truncated.
  if not (self.done or self.finish_reason) then
    return nil, "stream_cut", fmt("stream ended after %d events without [DONE]", self.events)
  end
  local list = {}
  local n = choice_count(self.choices)
  for idx = 0, max(n, 1) - 1 do
    local st = self.choices[idx] or new_choice()
    local parts = finished_parts(st)
    list[idx + 1] = { index = idx, content = parts, response_text = text_of(parts),
      finish_reason = canonical.finish_reason(st.finish), provider_finish_reason = st.finish,
      logprobs = st.logprobs and { content = st.logprobs } or nil }
  end
  return choices_result(list, concat(self.parts), self.model, self.usage, self.upstream or {})
end

-- An error object in a stream chunk -> kind, message (the adapter sets
-- its own classification; this is the default).
function Decoder.classify(e)
  local msg = type(e) == "table" and (str(e.message) or str(e.type)) or str(e) or "unknown error"
  return "server_error", "provider error: " .. util.excerpt(msg, 500)
end

function _M.stream_decoder()
  return setmetatable({ parts = {}, choices = {}, events = 0, done = false }, Decoder)
end

-- Streams: canonical events -> OpenAI -------------------------------------

local Encoder = {}
Encoder.__index = Encoder
_M.Stream = Encoder

function Encoder:set_model(model)
  self.model = model
  self.head = concat { 'data: {"id":', js("chatcmpl-" .. self.id), ',"object":"chat.completion.chunk","created":',
    self.created, ',"model":', js(model), ',"system_fingerprint":null,"choices":[' }
end

-- stream_encoder(id, model, opts) -> an encoder whose methods return the
-- bytes to send. opts: include_usage (the usage chunk at the end).
function _M.stream_encoder(id, model, opts)
  local include_usage = opts and opts.include_usage
  local e = setmetatable({ id = id, created = os_time(), include_usage = include_usage, thinking = {}, bare = {},
    tail = include_usage and '],"usage":null}\n\n' or "]}\n\n" }, Encoder)
  e:set_model(model)
  return e
end

-- The first bytes: the role chunk of each of n choices.
function Encoder:start(model, n)
  if model and model ~= self.model then
    self:set_model(model)
  end
  local out = {}
  for i = 1, n or 1 do
    out[i] = concat { self.head, '{"index":', i - 1, ',"delta":{"role":"assistant","content":""},',
      '"logprobs":null,"finish_reason":null}', self.tail }
  end
  return concat(out)
end

-- The role chunk of a choice that begins after the others started.
function Encoder:open_choice(index)
  return concat { self.head, '{"index":', index, ',"delta":{"role":"assistant","content":""},',
    '"logprobs":null,"finish_reason":null}', self.tail }
end

-- Takes over a stream that was relayed as an upstream sent it: nothing
-- of OpenAI's chunks depends on what came before.
function Encoder.resume()
  return ""
end

local function chunk(self, index, delta)
  return concat { self.head, '{"index":', index or 0, ',"delta":', delta, ',"logprobs":null,"finish_reason":null}',
    self.tail }
end

local function arguments_chunk(self, index, ti, text)
  return chunk(self, index, concat { '{"tool_calls":[{"index":', ti, ',"function":{"arguments":', js(text), "}}]}" })
end

function Encoder:text(text, index)
  return chunk(self, index, '{"content":' .. js(text) .. "}")
end

local EVENTS = {
  text = Encoder.text,
  thinking = function(self, ev, index)
    local acc = self.thinking[index or 0]
    if not acc then
      acc = {}
      self.thinking[index or 0] = acc
    end
    acc[#acc + 1] = ev.text
    return chunk(self, index, '{"reasoning_content":' .. js(ev.text) .. "}")
  end,
  thinking_signature = function(self, ev, index)
    local acc = self.thinking[index or 0]
    self.thinking[index or 0] = nil
    return chunk(self, index, concat { '{"thinking_blocks":[{"type":"thinking","thinking":',
      js(acc and concat(acc) or ""), ',"signature":', js(ev.signature), "}]}" })
  end,
  redacted_thinking = function(self, ev, index)
    return chunk(self, index, '{"thinking_blocks":[{"type":"redacted_thinking","data":' .. js(ev.data) .. "}]}")
  end,
  tool_call = function(self, ev, index)
    local head = self:no_arguments(index)
    self.bare[index or 0] = ev.index or 0
    return head .. chunk(self, index, concat { '{"tool_calls":[{"index":', ev.index or 0, ',"id":', js(ev.id),
      ',"type":"function","function":{"name":', js(ev.name), ',"arguments":""}}]}' })
  end,
  tool_arguments = function(self, ev, index)
    if self.bare[index or 0] == (ev.index or 0) then
      self.bare[index or 0] = nil
    end
    return arguments_chunk(self, index, ev.index or 0, ev.text)
  end,
}

-- A tool call that ended without arguments gets "{}": clients parse them.
function Encoder:no_arguments(index)
  local ti = self.bare[index or 0]
  if not ti then
    return ""
  end
  self.bare[index or 0] = nil
  return arguments_chunk(self, index, ti, "{}")
end

-- event(ev, index) -> the bytes of one canonical event for choice index.
function Encoder:event(ev, index)
  local f = EVENTS[ev.type]
  if not f then
    return "" -- meta: nothing of its own to say
  end
  if ev.type == "text" then
    return f(self, ev.text, index)
  end
  return f(self, ev, index)
end

-- The end of a successful stream: finish_reason per choice, usage, [DONE].
function Encoder:finish(results)
  local out = {}
  for i, c in ipairs(each_choice(results)) do
    out[i] = concat { self:no_arguments(i - 1), self.head, '{"index":', i - 1,
      ',"delta":{},"logprobs":null,"finish_reason":', js(c.finish), "}", self.tail }
  end
  if self.include_usage then
    out[#out + 1] = concat { self.head, '],"usage":', usage_json(results), "}\n\n" }
  end
  out[#out + 1] = "data: [DONE]\n\n"
  return concat(out)
end

-- A stream that broke after it began: OpenAI's error object as a data
-- event; no [DONE], so a client cannot take the answer for complete.
function Encoder.error(_, status, message, code)
  return "data: " .. _M.error_body(status, message, code) .. "\n\n"
end

return _M
