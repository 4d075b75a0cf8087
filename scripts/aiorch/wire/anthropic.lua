-- Anthropic Messages <-> the canonical model (docs/canonical.md):
-- requests both ways, responses both ways, streams both ways. Pure
-- functions and one small object per stream; no I/O.
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
local sort = table.sort
local tointeger = math.tointeger
local max = math.max
local insert = table.insert
local str, num, present = util.str, util.num, util.present
local js, jw = json.quote, json.word
local null = json.null

local EMPTY = {} -- never written

local _M = { api = "anthropic" }

local events = common.events
local text_of = common.text_of
local pass, translate, refuse = common.pass, common.translate, common.refuse
local copy, fail, set, tokens = common.copy, common.fail, common.set, common.tokens
local copy_to, ignore = common.copy_to, common.ignore
local count = util.num -- a count as the canonical model keeps it, or nil
local extra_of = common.extra_of_for("anthropic")

-- What the Messages API can express of the canonical model: one cell per
-- key of canonical.CELLS.
_M.fields = {
  messages = pass(),
  ["role.system"] = translate("the top-level `system`: a string, or text blocks (keeping `cache_control`), "
    .. "every system message in order"),
  ["role.developer"] = translate("like `system`"),
  ["role.tool"] = translate("a user turn of `tool_result` blocks; a user message right after it joins that turn"),
  ["message.name"] = refuse("Anthropic messages have no participant name"),
  prefill = pass("the model goes on from it"),
  text = pass(),
  ["image.base64"] = pass(),
  ["image.url"] = pass(),
  ["image.file"] = pass(),
  ["image.detail"] = refuse("Anthropic images have no detail level"),
  ["document.base64"] = pass(),
  ["document.url"] = pass(),
  ["document.text"] = translate("`source: {type: text, media_type: text/plain, data}`"),
  ["document.file"] = pass(),
  ["document.title"] = pass(),
  ["document.filename"] = translate("the document's `title` when it has none"),
  tool_call = translate("a `tool_use` block, `input` the arguments decoded; ids unchanged"),
  ["tool_call.arguments"] = refuse("a `tool_use` input must be a JSON object"),
  tool_result = translate("a `tool_result` block (`tool_use_id`)"),
  ["tool_result.is_error"] = pass(),
  ["tool_result.image"] = pass(),
  ["tool_result.document"] = pass(),
  thinking = pass("a `thinking` block with its signature"),
  ["thinking.unsigned"] = refuse("Anthropic takes back only thinking it signed"),
  redacted_thinking = pass(),
  cache_control = pass(),
  tools = translate("`{name, description, input_schema, strict, cache_control}`; an empty object schema when "
    .. "there are no parameters"),
  ["tool.strict"] = pass(),
  tool_choice = translate("`auto`, `none`; `required` as `{type: any}`; `{name}` as `{type: tool, name}`"),
  parallel_tool_calls = translate("false as `tool_choice.disable_parallel_tool_use`"),
  ["response_format.text"] = translate("nothing to send: text is the default"),
  ["response_format.json_object"] = refuse("Anthropic has no JSON mode without a schema"),
  ["response_format.json_schema"] = translate("`output_config.format: {type: json_schema, schema}`; the name, "
    .. "description and strict have no place (the schema is always enforced)"),
  max_tokens = translate("required: the adapter's default (1024) when absent"),
  temperature = pass({ range = { 0, 1 } }),
  top_p = pass(),
  top_k = pass(),
  stop = translate("`stop_sequences`"),
  seed = refuse("Anthropic has no seed"),
  presence_penalty = refuse("Anthropic has no repetition penalties"),
  frequency_penalty = refuse("Anthropic has no repetition penalties"),
  logprobs = refuse("Anthropic returns no log-probabilities"),
  top_logprobs = refuse("Anthropic returns no log-probabilities"),
  n = refuse("Anthropic answers with one message per request"),
  user = translate("`metadata.user_id`"),
  metadata = refuse("Anthropic's metadata holds only user_id"),
  ["reasoning.effort"] = translate("`output_config.effort`; `none` is thinking disabled, `minimal` is `low`"),
  ["reasoning.budget_tokens"] = translate("`thinking: {type: enabled, budget_tokens}`"),
  ["reasoning.mode"] = translate("`thinking.type`: enabled (adaptive without a budget), adaptive, disabled"),
  ["reasoning.display"] = translate("`thinking.display`"),
  stream_options = translate("nothing to send: a stream always reports its usage"),
  extra = translate("Anthropic fields sent as they came; another API's refused by name"),
  opaque = translate("Anthropic blocks and tools (server tools, search results, ...) sent as they came; "
    .. "another API's refused by name"),
  ["anthropic-beta"] = pass("forwarded as the header"),
  signature = translate("not sent: a thought signature only means something to the API that made it (Gemini)"),
  ["response.text"] = translate("`text` blocks"),
  ["response.tool_calls"] = translate("`tool_use` blocks (`input` as JSON text)"),
  ["response.thinking"] = pass("`thinking` blocks with their signature, `redacted_thinking`"),
  ["response.refusal"] = translate("`stop_reason: refusal`"),
  ["response.finish_reason"] = translate("`end_turn`, `stop_sequence`, `pause_turn` are stop; `max_tokens`, "
    .. "`model_context_window_exceeded` length; `tool_use` tool_calls; `refusal`. Written back: content_filter "
    .. "as `refusal`"),
  ["response.usage"] = translate("every input token is `input_tokens` + `cache_read_input_tokens` + "
    .. "`cache_creation_input_tokens`; `output_tokens`"),
  ["response.usage.cached_input_tokens"] = translate("`cache_read_input_tokens`"),
  ["response.usage.cache_write_tokens"] = translate("`cache_creation_input_tokens`"),
  ["response.usage.reasoning_tokens"] = translate("`output_tokens_details.thinking_tokens`"),
  ["response.logprobs"] = refuse("Anthropic returns none"),
  ["response.choices"] = refuse("one message per request; several answers are written as one message's "
    .. "blocks, in order"),
  ["response.upstream"] = translate("`id`, `stop_sequence`"),
  ["response.stream"] = translate("`content_block_start`/`delta`/`stop` per block: `text_delta`, "
    .. "`thinking_delta`, `signature_delta`, `input_json_delta`"),
}

-- Errors and models -------------------------------------------------------

local ERROR_TYPES = {
  [400] = "invalid_request_error", [401] = "authentication_error", [404] = "not_found_error",
  [405] = "invalid_request_error", [413] = "request_too_large", [429] = "rate_limit_error",
  [500] = "api_error", [502] = "api_error", [503] = "overloaded_error", [504] = "timeout_error",
}

-- Anthropic's error object for an answer with this status.
function _M.error_body(status, message)
  return concat { '{"type":"error","error":{"type":', js(ERROR_TYPES[status] or "api_error"),
    ',"message":', js(message), "}}" }
end

-- GET /v1/models in Anthropic's list shape; entries: {id}.
function _M.models(entries)
  local data = {}
  for i, e in ipairs(entries) do
    data[i] = concat { '{"type":"model","id":', js(e.id), ',"display_name":', js(e.id),
      ',"created_at":"1970-01-01T00:00:00Z"}' }
  end
  local first, last = entries[1], entries[#entries]
  return concat { '{"data":[', concat(data, ","), '],"has_more":false,"first_id":',
    first and js(first.id) or "null", ',"last_id":', last and js(last.id) or "null", "}" }
end

-- Requests: Anthropic -> canonical ----------------------------------------

local function cache_of(b)
  return type(b.cache_control) == "table" and b.cache_control or nil
end

local BLOCK_KEYS = {
  text = set { "type", "text", "cache_control" },
  image = set { "type", "source", "cache_control" },
  document = set { "type", "source", "title", "cache_control" },
  tool_use = set { "type", "id", "name", "input", "cache_control" },
  tool_result = set { "type", "tool_use_id", "content", "is_error", "cache_control" },
  thinking = set { "type", "thinking", "signature" },
  redacted_thinking = set { "type", "data" },
}

local IMAGE_SOURCES = { base64 = true, url = true, file = true }
local DOCUMENT_SOURCES = { base64 = true, url = true, text = true, file = true }

local decode_block

-- The decoders of sources and blocks say where an error is from the block
-- they were given (".source.url: Field required", ": Input should be ...");
-- their callers put the path in front, so that a path is made only for an
-- error.
local function decode_source(s, kinds)
  if type(s) ~= "table" or not kinds[s.type] then
    return fail(".source.type", "Input tag '" .. tostring(type(s) == "table" and s.type) .. "' does not match "
      .. "any of the expected tags")
  end
  local out = { type = s.type }
  if s.type == "base64" then
    if type(s.data) ~= "string" or type(s.media_type) ~= "string" then
      return fail(".source", "data and media_type: Field required")
    end
    out.media_type, out.data = s.media_type, s.data
  elseif s.type == "url" then
    if type(s.url) ~= "string" then
      return fail(".source.url", "Field required")
    end
    out.url = s.url
  elseif s.type == "text" then
    if type(s.data) ~= "string" then
      return fail(".source.data", "Field required")
    end
    out.data = s.data
  else
    if type(s.file_id) ~= "string" then
      return fail(".source.file_id", "Field required")
    end
    out.file_id = s.file_id
  end
  return out
end

local function decode_blocks(list)
  local out = {}
  for i, b in ipairs(list) do
    local part, err = decode_block(b)
    if not part then
      return nil, "." .. (i - 1) .. err
    end
    out[i] = part
  end
  return out
end

-- One content block -> a part (an opaque part for the blocks the model
-- does not know: server tools, search results, ...).
function decode_block(b)
  if type(b) ~= "table" then
    return fail("", "Input should be a valid dictionary")
  end
  local t = b.type
  if type(t) ~= "string" then
    return fail(".type", "Field required")
  end
  local part, err
  if t == "text" then
    if type(b.text) ~= "string" then
      return fail(".text", "Field required")
    end
    part = { type = "text", text = b.text, cache_control = nil, extra = nil }
  elseif t == "image" then
    local source
    source, err = decode_source(b.source, IMAGE_SOURCES)
    if not source then
      return nil, err
    end
    part = { type = "image", source = source }
  elseif t == "document" then
    if type(b.source) == "table" and b.source.type == "content" then
      return { type = "opaque", api = "anthropic", value = b }
    end
    local source
    source, err = decode_source(b.source, DOCUMENT_SOURCES)
    if not source then
      return nil, err
    end
    part = { type = "document", source = source, title = str(b.title) }
  elseif t == "tool_use" then
    if type(b.id) ~= "string" or type(b.name) ~= "string" then
      return fail("", "id and name: Field required")
    end
    local input = b.input
    part = { type = "tool_call", id = b.id, name = b.name,
      arguments = json.encode(type(input) == "table" and input or json.object()) }
  elseif t == "tool_result" then
    if type(b.tool_use_id) ~= "string" then
      return fail(".tool_use_id", "Field required")
    end
    local content = b.content
    if type(content) == "table" then
      content, err = decode_blocks(content)
      if not content then
        return nil, ".content" .. err
      end
    elseif type(content) ~= "string" then
      content = nil
    end
    part = { type = "tool_result", id = b.tool_use_id, content = content,
      is_error = type(b.is_error) == "boolean" and b.is_error or nil }
  elseif t == "thinking" then
    if type(b.thinking) ~= "string" then
      return fail(".thinking", "Field required")
    end
    part = { type = "thinking", text = b.thinking, signature = str(b.signature) }
  elseif t == "redacted_thinking" then
    if type(b.data) ~= "string" then
      return fail(".data", "Field required")
    end
    part = { type = "redacted_thinking", data = b.data }
  else
    return { type = "opaque", api = "anthropic", value = b }
  end
  part.cache_control = cache_of(b)
  part.extra = extra_of(b, BLOCK_KEYS[t])
  return part
end

-- A user turn: its tool_result blocks become a canonical tool message,
-- then the rest a user message. An error is said from the content.
local function decode_user(content, out)
  if type(content) == "string" then
    out[#out + 1] = { role = "user", content = content, extra = nil }
    return true
  end
  local parts, err = decode_blocks(content)
  if not parts then
    return nil, err
  end
  local results, rest = {}, {}
  for _, p in ipairs(parts) do
    if p.type == "tool_result" then
      results[#results + 1] = p
    else
      rest[#rest + 1] = p
    end
  end
  if #results > 0 then
    out[#out + 1] = { role = "tool", content = results }
  end
  if #rest > 0 or #results == 0 then
    out[#out + 1] = { role = "user", content = rest }
  end
  return true
end

local MESSAGE_KEYS = set { "role", "content" }

local function message_path(i)
  return fmt("messages.%d", i - 1)
end

local function decode_messages(list)
  if type(list) ~= "table" or #list == 0 then
    return fail("messages", "Field required (a non-empty list)")
  end
  local out = {}
  for i, m in ipairs(list) do
    if type(m) ~= "table" then
      return fail(message_path(i), "Input should be a valid dictionary")
    end
    local role, c = m.role, m.content
    if type(c) ~= "string" and type(c) ~= "table" then
      return fail(message_path(i) .. ".content", "Input should be a valid string or list")
    end
    local ok, err
    if role == "user" then
      ok, err = decode_user(c, out)
    elseif role == "assistant" or role == "system" then
      local content = c
      if type(c) == "table" then
        content, err = decode_blocks(c)
      end
      ok = content ~= nil
      out[#out + 1] = { role = role, content = content, extra = nil }
    else
      return fail(message_path(i) .. ".role", "Input should be 'user' or 'assistant'")
    end
    if not ok then
      return nil, message_path(i) .. ".content" .. err
    end
    out[#out].extra = extra_of(m, MESSAGE_KEYS)
  end
  return out
end

local TOOL_KEYS = set { "type", "name", "description", "input_schema", "strict", "cache_control" }

local function decode_tools(list)
  if type(list) ~= "table" then
    return fail("tools", "Input should be a valid list")
  end
  local out = {}
  for i, t in ipairs(list) do
    if type(t) ~= "table" then
      return fail(fmt("tools.%d", i - 1), "Input should be a valid dictionary")
    end
    if t.type == nil or t.type == null or t.type == "custom" then
      if type(t.name) ~= "string" then
        return fail(fmt("tools.%d", i - 1) .. ".name", "Field required")
      end
      out[i] = { name = t.name, description = str(t.description),
        parameters = type(t.input_schema) == "table" and t.input_schema or nil,
        strict = type(t.strict) == "boolean" and t.strict or nil, cache_control = cache_of(t),
        extra = extra_of(t, TOOL_KEYS) }
    else
      out[i] = { type = "opaque", api = "anthropic", value = t, name = str(t.name) }
    end
  end
  return out
end

local CHOICES = { auto = "auto", any = "required", none = "none" }

local function decode_tool_choice(tc, req)
  if type(tc) ~= "table" then
    return fail("tool_choice", "Input should be a valid dictionary")
  end
  if tc.type == "tool" then
    if type(tc.name) ~= "string" then
      return fail("tool_choice.name", "Field required")
    end
    req.tool_choice = { name = tc.name }
  elseif CHOICES[tc.type] then
    req.tool_choice = CHOICES[tc.type]
  else
    return fail("tool_choice.type", "Input tag '" .. tostring(tc.type) .. "' does not match any of the expected "
      .. "tags: 'auto', 'any', 'tool', 'none'")
  end
  if tc.disable_parallel_tool_use == true then
    req.parallel_tool_calls = false
  end
  return true
end

-- thinking and output_config -> reasoning (and response_format).
local function decode_reasoning(doc, req, extra)
  local r = {}
  local th = doc.thinking
  if type(th) == "table" then
    if th.type == "enabled" or th.type == "adaptive" or th.type == "disabled" then
      r.mode = th.type
      r.budget_tokens = th.budget_tokens ~= null and th.budget_tokens or nil
      r.display = str(th.display)
    else
      extra.thinking = th
    end
  end
  local oc = doc.output_config
  if type(oc) == "table" then
    r.effort = str(oc.effort)
    local f = oc.format
    if type(f) == "table" and f.type == "json_schema" and type(f.schema) == "table" then
      req.response_format = { type = "json_schema", schema = f.schema }
    end
    local rest = extra_of(oc, { effort = true, format = req.response_format ~= nil })
    if rest then
      extra.output_config = rest.fields
    end
  end
  if next(r) then
    req.reasoning = r
  end
end

local KNOWN = set { "model", "messages", "max_tokens", "system", "stream", "temperature", "top_p", "top_k",
  "stop_sequences", "metadata", "tools", "tool_choice", "thinking", "output_config" }

-- decode_request(doc, headers) -> req, info ({model, stream, include_usage}),
-- or nil, message naming the field. headers: lower-cased; the
-- anthropic-beta and anthropic-version headers are kept in req.extra.headers.
function _M.decode_request(doc, headers)
  if type(doc) ~= "table" then
    return nil, "the request body must be a JSON object"
  end
  if type(doc.model) ~= "string" or doc.model == "" then
    return fail("model", "Field required")
  end
  if not present(doc.max_tokens) then
    return fail("max_tokens", "Field required")
  end
  local messages, err = decode_messages(doc.messages)
  if not messages then
    return nil, err
  end
  local s = doc.system
  if type(s) == "string" then
    if s ~= "" then
      insert(messages, 1, { role = "system", content = s })
    end
  elseif type(s) == "table" then
    local blocks
    blocks, err = decode_blocks(s)
    if not blocks then
      return nil, "system" .. err
    end
    insert(messages, 1, { role = "system", content = blocks })
  elseif present(s) then
    return fail("system", "Input should be a valid string or list")
  end
  local req = { messages = messages, max_tokens = doc.max_tokens }
  for _, f in ipairs({ "temperature", "top_p", "top_k" }) do
    if present(doc[f]) then
      req[f] = doc[f]
    end
  end
  if present(doc.stop_sequences) then
    req.stop = doc.stop_sequences
  end
  local extra = {}
  for k, v in pairs(doc) do
    if not KNOWN[k] and v ~= null then
      extra[k] = v
    end
  end
  local md = doc.metadata
  if type(md) == "table" then
    req.user = str(md.user_id)
    local rest = extra_of(md, { user_id = true })
    if rest then
      extra.metadata = rest.fields
    end
  end
  if present(doc.tools) then
    req.tools, err = decode_tools(doc.tools)
    if not req.tools then
      return nil, err
    end
  end
  if present(doc.tool_choice) then
    local ok, terr = decode_tool_choice(doc.tool_choice, req)
    if not ok then
      return nil, terr
    end
  end
  decode_reasoning(doc, req, extra)
  local h = {}
  if type(headers) == "table" then
    h["anthropic-beta"] = headers["anthropic-beta"]
    h["anthropic-version"] = headers["anthropic-version"]
  end
  if next(extra) or next(h) then
    req.extra = { api = "anthropic", fields = extra, headers = next(h) and h or nil }
  end
  return req, { model = doc.model, stream = doc.stream == true, include_usage = true }
end

-- Requests: canonical -> Anthropic ----------------------------------------

-- Each part type's attributes the encoder writes.
local ENCODED = common.encoded {
  text = { "cache_control" },
  image = { "cache_control" },
  document = { "cache_control" },
  tool_call = { "cache_control" },
  tool_result = { "is_error", "cache_control" },
  thinking = { "type", "text", "signature", "extra" },
  redacted_thinking = { "type", "data", "extra" },
}
local encoder = common.encoder("anthropic", ENCODED, { foreign_empty_refused = true })
local cannot, merge_extra, check_keys = encoder.cannot, encoder.merge_extra, encoder.check_keys
local default_only = encoder.default_only
local write_fields = encoder.write_fields

local function encode_source(s, where)
  if s.type == "base64" then
    return { type = "base64", media_type = s.media_type, data = s.data }
  elseif s.type == "url" then
    return { type = "url", url = s.url }
  elseif s.type == "file" then
    return { type = "file", file_id = s.file_id }
  elseif s.type == "text" then
    return { type = "text", media_type = "text/plain", data = s.data }
  end
  cannot(where .. ".source: " .. tostring(s.type))
end

-- A tool call's arguments (JSON text) as the tool_use input object.
local function input_of(arguments, where)
  if not arguments:find("%S") then
    return json.object()
  end
  local v = json.decode(arguments)
  if type(v) ~= "table" or json.is_array(v) or (#v > 0) then
    cannot(where .. ".arguments: not a JSON object")
  end
  return next(v) == nil and json.object() or v
end

local encode_block

local function encode_blocks(parts, where)
  local out = json.array()
  for i, p in ipairs(parts) do
    out[i] = encode_block(p, fmt("%s.content[%d]", where, i - 1))
  end
  return out
end

function encode_block(p, where)
  check_keys(p, where)
  local t = p.type
  local b
  if t == "text" then
    b = { type = "text", text = p.text }
  elseif t == "image" then
    if p.detail ~= nil and p.detail ~= "auto" then
      cannot(where .. ".detail")
    end
    b = { type = "image", source = encode_source(p.source, where) }
  elseif t == "document" then
    b = { type = "document", source = encode_source(p.source, where), title = p.title or p.filename }
  elseif t == "tool_call" then
    b = { type = "tool_use", id = p.id, name = p.name, input = input_of(p.arguments, where) }
  elseif t == "tool_result" then
    local c = p.content
    if type(c) == "table" then
      c = encode_blocks(c, where)
    end
    b = { type = "tool_result", tool_use_id = p.id, content = c, is_error = p.is_error }
  elseif t == "thinking" then
    if not p.signature or p.signature == "" then
      cannot(where .. ": thinking without a signature")
    end
    b = { type = "thinking", thinking = p.text, signature = p.signature }
  elseif t == "redacted_thinking" then
    b = { type = "redacted_thinking", data = p.data }
  else -- opaque
    if p.api ~= "anthropic" then
      cannot(fmt("%s: a %s part", where, tostring(p.api)))
    end
    return p.value
  end
  b.cache_control = p.cache_control
  return merge_extra(b, p.extra, where)
end

local function encode_content(c, where)
  if type(c) == "string" then
    return c
  end
  return encode_blocks(c, where)
end

-- The system messages as the top-level system: one string when there is
-- one plain string, else text blocks in order.
-- (A message's path, for the errors and for its blocks' paths: made only
-- when needed.)
local function message_where(i)
  return fmt("messages[%d]", i - 1)
end

-- The system messages (their indices in list) as the top-level system: one
-- string when there is one plain string, else text blocks in order.
local function encode_system(list, systems)
  if #systems == 1 and type(list[systems[1]].content) == "string" then
    return list[systems[1]].content
  end
  local out = json.array()
  for _, i in ipairs(systems) do
    local c = list[i].content
    if type(c) == "string" then
      out[#out + 1] = { type = "text", text = c }
    else
      for j, p in ipairs(c) do
        out[#out + 1] = encode_block(p, fmt("%s.content[%d]", message_where(i), j - 1))
      end
    end
  end
  return out
end

local function encode_messages(list, body)
  local out = json.array()
  local systems
  local tool_turn -- the user turn the last tool message made
  for i, m in ipairs(list) do
    for k in pairs(m) do
      if k ~= "role" and k ~= "content" and k ~= "extra" then
        cannot(message_where(i) .. "." .. k)
      end
    end
    local role = m.role
    if role == "system" or role == "developer" then
      systems = systems or {}
      systems[#systems + 1] = i
      if m.extra then
        cannot(message_where(i) .. ".extra")
      end
    elseif role == "tool" then
      local where = message_where(i)
      local blocks = encode_blocks(m.content, where)
      if tool_turn then
        for _, b in ipairs(blocks) do
          tool_turn.content[#tool_turn.content + 1] = b
        end
      else
        tool_turn = { role = "user", content = blocks }
        out[#out + 1] = tool_turn
      end
      merge_extra(tool_turn, m.extra, where)
    elseif role == "user" and tool_turn then
      -- The turn that answers the tool calls carries what the user adds.
      local c = m.content
      if type(c) == "string" then
        tool_turn.content[#tool_turn.content + 1] = { type = "text", text = c }
      else
        for _, b in ipairs(encode_blocks(c, message_where(i))) do
          tool_turn.content[#tool_turn.content + 1] = b
        end
      end
      if m.extra ~= nil then
        merge_extra(tool_turn, m.extra, message_where(i))
      end
      tool_turn = nil
    else
      tool_turn = nil
      local c = m.content
      local msg = { role = role, content = type(c) == "string" and c or encode_content(c, message_where(i)) }
      if m.extra ~= nil then
        merge_extra(msg, m.extra, message_where(i))
      end
      out[#out + 1] = msg
    end
  end
  if systems then
    body.system = encode_system(list, systems)
  end
  return out
end

local function encode_tools(body, tools)
  local out = json.array()
  for i, t in ipairs(tools) do
    local where = fmt("tools[%d]", i - 1)
    if t.type == "opaque" then
      if t.api ~= "anthropic" then
        cannot(fmt("%s: a %s tool", where, tostring(t.api)))
      end
      out[i] = t.value
    else
      for k in pairs(t) do
        if not (k == "name" or k == "description" or k == "parameters" or k == "strict" or k == "cache_control"
            or k == "extra") then
          cannot(where .. "." .. k)
        end
      end
      local schema = t.parameters
      if schema == nil or next(schema) == nil then
        schema = { type = "object", properties = json.object() }
      end
      out[i] = merge_extra({ name = t.name, description = t.description, input_schema = schema, strict = t.strict,
        cache_control = t.cache_control }, t.extra, where)
    end
  end
  body.tools = out
end

-- tool_choice and parallel_tool_calls make one tool_choice object.
local function encode_tool_choice(body, _, req)
  if body.tool_choice then
    return
  end
  local tc = req.tool_choice
  local out
  if type(tc) == "table" then
    out = { type = "tool", name = tc.name }
  elseif tc == "required" then
    out = { type = "any" }
  elseif tc == "none" then
    out = { type = "none" }
  else
    out = { type = "auto" }
  end
  if req.parallel_tool_calls == false and out.type ~= "none" then
    out.disable_parallel_tool_use = true
  elseif tc == nil then
    return -- parallel calls are the default
  end
  body.tool_choice = out
end

local REQUEST = {
  messages = function(body, v)
    body.messages = encode_messages(v, body)
  end,
  max_tokens = copy_to("max_tokens"),
  temperature = copy_to("temperature"),
  top_p = copy_to("top_p"),
  top_k = copy_to("top_k"),
  stop = function(body, v)
    body.stop_sequences = json.array(copy(v))
  end,
  user = function(body, v)
    body.metadata = body.metadata or {}
    body.metadata.user_id = v
  end,
  n = default_only("n", 1),
  logprobs = default_only("logprobs", false),
  tools = encode_tools,
  tool_choice = encode_tool_choice,
  parallel_tool_calls = encode_tool_choice,
  response_format = function(body, v)
    if v.type == "json_schema" then
      body.output_config = body.output_config or {}
      body.output_config.format = { type = "json_schema", schema = v.schema }
    elseif v.type ~= "text" then
      cannot("response_format." .. tostring(v.type))
    end
  end,
  reasoning = function(body, r)
    local thinking
    if r.budget_tokens then
      thinking = { type = "enabled", budget_tokens = r.budget_tokens }
    elseif r.mode == "enabled" or r.mode == "adaptive" then
      thinking = { type = "adaptive" }
    elseif r.mode == "disabled" then
      thinking = { type = "disabled" }
    end
    local effort = r.effort
    if effort == "none" then
      thinking = thinking or { type = "disabled" }
      effort = nil
    elseif effort == "minimal" then
      effort = "low"
    end
    if r.display then
      if not thinking or thinking.type == "disabled" then
        cannot("reasoning.display without thinking")
      end
      thinking.display = r.display
    end
    body.thinking = thinking
    if effort then
      body.output_config = body.output_config or {}
      body.output_config.effort = effort
    end
  end,
  stream_options = ignore,
  extra = ignore,
  continue_from = ignore,
  policy = ignore,
  raw = ignore,
}

-- encode_request(req, opts) -> the wire body (a table for aiorch.json.encode).
-- req: canonical.normalize's; opts: {model, stream, default_max_tokens}.
-- Raises on a field it cannot write (canonical.unsupported refuses those).
function _M.encode_request(req, opts)
  opts = opts or EMPTY
  -- (the usual fields named: the table is sized once)
  local body = { model = opts.model, messages = nil, max_tokens = nil, stream = nil }
  write_fields(REQUEST, body, req)
  body.max_tokens = body.max_tokens or opts.default_max_tokens
  -- Continuing an answer another provider began: a last assistant turn is
  -- a prefill the model goes on from (it must not end in whitespace).
  local partial = req.continue_from
  if type(partial) == "string" and partial:find("%S") then
    local msgs = body.messages
    msgs[#msgs + 1] = { role = "assistant", content = (partial:gsub("%s+$", "")) }
  end
  if req.extra then
    local e = req.extra
    if e.api ~= "anthropic" and next(e.fields) then
      cannot("extra: " .. tostring(e.api) .. " fields")
    end
    if e.api == "anthropic" then
      merge_extra(body, { api = e.api, fields = e.fields }, "extra")
    end
  end
  if opts.stream then
    body.stream = true
  end
  return body
end

-- Responses: Anthropic -> canonical ---------------------------------------

-- Anthropic's usage -> the canonical one: every input token counted.
local function usage_of(u)
  if type(u) ~= "table" then
    return nil
  end
  local i, r, w = count(u.input_tokens), count(u.cache_read_input_tokens), count(u.cache_creation_input_tokens)
  local d = u.output_tokens_details
  return {
    input_tokens = i and (i + (r or 0) + (w or 0)),
    output_tokens = count(u.output_tokens),
    cached_input_tokens = r,
    cache_write_tokens = w,
    reasoning_tokens = type(d) == "table" and count(d.thinking_tokens) or nil,
  }
end

local function block_part(b)
  local t = b.type
  if t == "text" and type(b.text) == "string" then
    return { type = "text", text = b.text }
  elseif t == "thinking" and type(b.thinking) == "string" then
    return { type = "thinking", text = b.thinking, signature = str(b.signature) }
  elseif t == "redacted_thinking" and type(b.data) == "string" then
    return { type = "redacted_thinking", data = b.data }
  elseif t == "tool_use" and type(b.name) == "string" then
    local input = type(b.input) == "table" and b.input or json.object()
    return { type = "tool_call", id = str(b.id) or "", name = b.name, arguments = json.encode(input) }
  end
  return { type = "opaque", api = "anthropic", value = b }
end

-- decode_response(doc) -> result, or nil, kind, message. doc: a decoded
-- 2xx body (aiorch.json.decode, so that [] stays an array).
function _M.decode_response(doc)
  local blocks = type(doc) == "table" and doc.content
  if type(blocks) ~= "table" then
    return nil, "parse", "reply has no content array"
  end
  local parts, n = {}, 0
  for _, b in ipairs(blocks) do
    if type(b) == "table" then
      n = n + 1
      parts[n] = block_part(b)
    end
  end
  local stop, model, id, seq = doc.stop_reason, doc.model, doc.id, doc.stop_sequence
  if type(stop) ~= "string" then
    stop = nil
  end
  return {
    content = parts,
    text = text_of(parts),
    model = type(model) == "string" and model or nil,
    finish_reason = canonical.finish_reason(stop),
    provider_finish_reason = stop,
    usage = usage_of(doc.usage) or {},
    upstream = { id = type(id) == "string" and id or nil, stop_sequence = type(seq) == "string" and seq or nil },
  }
end

-- Responses: canonical -> Anthropic ---------------------------------------

local STOP_OUT = { stop = "end_turn", length = "max_tokens", tool_calls = "tool_use", content_filter = "refusal",
  refusal = "refusal", other = "end_turn" }

local function stop_of(r)
  local m = r and r.metadata or EMPTY
  if m.api == "anthropic" and type(m.provider_finish_reason) == "string" then
    return m.provider_finish_reason
  end
  local f = m.finish_reason
  if type(f) ~= "string" then
    return "end_turn"
  end
  return STOP_OUT[canonical.finish_reason(f)]
end

local function stop_sequence_of(r)
  local m = r and r.metadata or EMPTY
  local s = m.api == "anthropic" and type(m.upstream) == "table" and m.upstream.stop_sequence
  return type(s) == "string" and js(s) or "null"
end

-- The usage object of the results: Anthropic counts cached input apart.
local function usage_json(results)
  local i, o, r, w, th, cache, reasoning = 0, 0, 0, 0, 0, false, false
  for _, res in ipairs(results) do
    local u = res.metadata and res.metadata.usage or EMPTY
    i, o = i + tokens(u.input_tokens), o + tokens(u.output_tokens)
    if type(u.cached_input_tokens) == "number" or type(u.cache_write_tokens) == "number" then
      cache = true
      r, w = r + tokens(u.cached_input_tokens), w + tokens(u.cache_write_tokens)
    end
    if type(u.reasoning_tokens) == "number" then
      reasoning = true
      th = th + tokens(u.reasoning_tokens)
    end
  end
  local out = { fmt('{"input_tokens":%d,"output_tokens":%d', cache and max(i - r - w, 0) or i, o) }
  if cache then
    out[2] = fmt(',"cache_creation_input_tokens":%d,"cache_read_input_tokens":%d', w, r)
  end
  if reasoning then
    out[#out + 1] = fmt(',"output_tokens_details":{"thinking_tokens":%d}', th)
  end
  out[#out + 1] = "}"
  return concat(out)
end

-- A tool call's arguments as the input object's JSON text.
local function input_json(arguments)
  if type(arguments) == "string" and arguments:find("%S") then
    local v = json.decode(arguments)
    if type(v) == "table" and not json.is_array(v) and #v == 0 then
      return json.encode_safe(v) or "{}"
    end
  end
  return "{}"
end

local function part_json(p)
  local t = p.type
  if t == "text" then
    return '{"type":"text","text":' .. js(p.text) .. "}"
  elseif t == "thinking" then
    return concat { '{"type":"thinking","thinking":', js(p.text), ',"signature":', js(p.signature or ""), "}" }
  elseif t == "redacted_thinking" then
    return '{"type":"redacted_thinking","data":' .. js(p.data) .. "}"
  elseif t == "tool_call" then
    return concat { '{"type":"tool_use","id":', js(p.id), ',"name":', js(p.name), ',"input":',
      input_json(p.arguments), "}" }
  elseif t == "opaque" and p.api == "anthropic" then
    return json.encode_safe(p.value)
  end
  return nil
end

-- The blocks of one result: its content's, or one text block.
local function blocks_of(r, out)
  local n = #out
  if type(r.content) == "table" then
    for _, p in ipairs(r.content) do
      out[#out + 1] = part_json(p)
    end
  end
  if #out == n then
    out[n + 1] = '{"type":"text","text":' .. js(r.response_text) .. "}"
  end
end

-- encode_response(results, id, model) -> a message's JSON text: every
-- result's blocks, in order. results: StandardAIResponses.
function _M.encode_response(results, id, model)
  local first = results[1]
  local blocks = {}
  for _, r in ipairs(results) do
    blocks_of(r, blocks)
  end
  return concat { '{"id":"msg_', id, '","type":"message","role":"assistant","model":',
    jw(first and first.metadata and first.metadata.model or model), ',"content":[', concat(blocks, ","),
    '],"stop_reason":', jw(first and stop_of(first) or "end_turn"), ',"stop_sequence":', stop_sequence_of(first),
    ',"usage":', usage_json(results), "}" }
end

-- Streams: Anthropic -> canonical events ----------------------------------

local Decoder = {}
Decoder.__index = Decoder
_M.Decoder = Decoder

function _M.stream_decoder()
  return setmetatable({ parts = {}, blocks = {}, tools = 0, events = 0, done = false, u = {} }, Decoder)
end

-- The block at index i (made when a delta comes without its start; a
-- start always makes a new one).
function Decoder:block(i, kind, new)
  local b = self.blocks[i]
  if new or not b then
    b = { type = kind, buf = {} }
    if kind == "tool_call" then
      b.index, b.id, b.name = self.tools, "", ""
      self.tools = self.tools + 1
    end
    self.blocks[i] = b
  end
  return b
end

function Decoder:set_usage(u)
  if type(u) ~= "table" then
    return
  end
  local mine = self.u
  for _, k in ipairs({ "input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens" }) do
    local v = num(u[k])
    if v then
      mine[k] = v
    end
  end
  if type(u.output_tokens_details) == "table" then
    mine.output_tokens_details = u.output_tokens_details
  end
  self.usage = usage_of(mine)
end

local function ev(list, e, sse)
  e.raw = sse
  list[#list + 1] = e
end

function Decoder:block_start(doc, out, sse)
  local i = tointeger(doc.index) or 0
  local cb = type(doc.content_block) == "table" and doc.content_block or EMPTY
  local t = cb.type
  if t == "text" then
    local b = self:block(i, "text", true)
    local text = str(cb.text)
    if text and text ~= "" then
      b.buf[#b.buf + 1] = text
      self.parts[#self.parts + 1] = text
      ev(out, { type = "text", text = text }, sse)
    end
  elseif t == "thinking" then
    local b = self:block(i, "thinking", true)
    local text = str(cb.thinking)
    if text and text ~= "" then
      b.buf[#b.buf + 1] = text
      ev(out, { type = "thinking", text = text }, sse)
    end
    if str(cb.signature) and cb.signature ~= "" then
      b.signature = cb.signature
      ev(out, { type = "thinking_signature", signature = cb.signature }, sse)
    end
  elseif t == "redacted_thinking" then
    local b = self:block(i, "redacted_thinking", true)
    b.data = str(cb.data) or ""
    ev(out, { type = "redacted_thinking", data = b.data }, sse)
  elseif t == "tool_use" then
    local b = self:block(i, "tool_call", true)
    b.id, b.name = str(cb.id) or "", str(cb.name) or ""
    ev(out, { type = "tool_call", index = b.index, id = b.id, name = b.name }, sse)
    if type(cb.input) == "table" and next(cb.input) ~= nil then
      local args = json.encode(cb.input)
      b.buf[#b.buf + 1] = args
      ev(out, { type = "tool_arguments", index = b.index, text = args }, sse)
    end
  elseif t then
    self.blocks[i] = { type = "opaque", value = cb }
  end
end

local DELTAS = {
  text_delta = function(self, b, d, out, sse)
    local text = str(d.text)
    if text and text ~= "" then
      b.buf[#b.buf + 1] = text
      self.parts[#self.parts + 1] = text
      ev(out, { type = "text", text = text }, sse)
    end
  end,
  thinking_delta = function(_, b, d, out, sse)
    local text = str(d.thinking)
    if text and text ~= "" then
      b.buf[#b.buf + 1] = text
      ev(out, { type = "thinking", text = text }, sse)
    end
  end,
  signature_delta = function(_, b, d, out, sse)
    local sig = str(d.signature)
    if sig then
      b.signature = sig
      ev(out, { type = "thinking_signature", signature = sig }, sse)
    end
  end,
  input_json_delta = function(_, b, d, out, sse)
    local text = str(d.partial_json)
    if text and text ~= "" then
      b.buf[#b.buf + 1] = text
      ev(out, { type = "tool_arguments", index = b.index, text = text }, sse)
    end
  end,
}
local DELTA_KIND = { text_delta = "text", thinking_delta = "thinking", signature_delta = "thinking",
  input_json_delta = "tool_call" }

-- event(sse) -> one canonical event or a list of them; {type = "meta"}
-- for an event without content. sse: {event, data}.
function Decoder:event(sse)
  self.events = self.events + 1
  if self.err then
    return nil -- what follows an error is not relayed: the caller ends the stream its own way
  end
  local doc, err = json.decode_plain(sse.data or "") -- partial input is text: nothing here goes back as JSON
  if type(doc) ~= "table" then
    self.err = { "parse", "malformed stream event: " .. (err or "not an object") }
    return nil
  end
  local t = str(doc.type) or sse.event
  local out = {}
  if t == "content_block_delta" then
    local d = type(doc.delta) == "table" and doc.delta or EMPTY
    local f = DELTAS[d.type]
    if f then
      local b = self:block(tointeger(doc.index) or 0, DELTA_KIND[d.type])
      if b.type == DELTA_KIND[d.type] then
        f(self, b, d, out, sse)
      end
    end
  elseif t == "content_block_start" then
    self:block_start(doc, out, sse)
  elseif t == "message_start" then
    local m = type(doc.message) == "table" and doc.message or EMPTY
    self.model = str(m.model) or self.model
    self.upstream = { id = str(m.id) }
    self:set_usage(m.usage)
  elseif t == "message_delta" then
    local d = type(doc.delta) == "table" and doc.delta or EMPTY
    self.finish_reason = str(d.stop_reason) or self.finish_reason
    self.stop_sequence = str(d.stop_sequence) or self.stop_sequence
    self:set_usage(doc.usage)
  elseif t == "message_stop" then
    self.done = true
  elseif t == "error" then
    self.err = { self.classify(doc.error) }
    return nil
  end
  return events(out, sse)
end

-- result() -> the result as decode_response gives it, or nil, kind, message.
function Decoder:result()
  if self.err then
    return nil, self.err[1], self.err[2], self.err[3]
  end
  if not self.done then
    return nil, "stream_cut", fmt("stream ended after %d events without message_stop", self.events)
  end
  local order = {}
  for i in pairs(self.blocks) do
    order[#order + 1] = i
  end
  sort(order)
  local parts = {}
  for _, i in ipairs(order) do
    local b = self.blocks[i]
    local p
    if b.type == "tool_call" then
      local args = concat(b.buf)
      p = { type = "tool_call", id = b.id, name = b.name, arguments = args:find("%S") and args or "{}" }
    elseif b.type == "redacted_thinking" then
      p = { type = "redacted_thinking", data = b.data or "" }
    elseif b.type == "opaque" then
      p = { type = "opaque", api = "anthropic", value = b.value }
    else
      p = { type = b.type, text = concat(b.buf), signature = b.signature }
    end
    parts[#parts + 1] = p
  end
  local up = self.upstream or {}
  up.stop_sequence = self.stop_sequence
  return {
    content = parts,
    text = concat(self.parts),
    model = self.model,
    finish_reason = canonical.finish_reason(self.finish_reason),
    provider_finish_reason = self.finish_reason,
    usage = self.usage or {},
    upstream = up,
  }
end

-- An error event's error object -> kind, message (the adapter sets its
-- own classification; this is the default).
function Decoder.classify(e)
  local msg = type(e) == "table" and (str(e.message) or str(e.type)) or str(e) or "unknown error"
  return "server_error", "provider error: " .. util.excerpt(msg, 500)
end

-- Streams: canonical events -> Anthropic ----------------------------------

local function event(name, data)
  return concat { "event: ", name, "\ndata: ", data, "\n\n" }
end

local Encoder = {}
Encoder.__index = Encoder
_M.Stream = Encoder

-- stream_encoder(id, model) -> an encoder whose methods return the bytes
-- to send. One content block is open per answer at a time; a change of
-- kind (text, thinking, tool_use) closes it and opens the next index.
function _M.stream_encoder(id, model)
  return setmetatable({ id = "msg_" .. id, model = model, n = 1, next_index = 0, open = {}, tools = {} }, Encoder)
end

-- message_start; with several answers (n > 1), a text block for each.
function Encoder:start(model, n)
  self.model = model or self.model
  self.n = n or 1
  local out = { event("message_start", concat { '{"type":"message_start","message":{"id":', js(self.id),
    ',"type":"message","role":"assistant","model":', js(self.model),
    ',"content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":0,"output_tokens":0}}}' }) }
  if self.n > 1 then
    for i = 1, self.n do
      out[#out + 1] = event("content_block_start", fmt('{"type":"content_block_start","index":%d,'
        .. '"content_block":{"type":"text","text":""}}', i - 1))
      self.open[i - 1] = { index = i - 1, kind = "text" }
    end
    self.next_index = self.n
  end
  return concat(out)
end

local function close(self, r)
  local b = self.open[r]
  if not b then
    return ""
  end
  self.open[r] = nil
  return event("content_block_stop", fmt('{"type":"content_block_stop","index":%d}', b.index))
end

-- Closes answer r's open block and opens one of kind with this start.
local function open(self, r, kind, block_json)
  local closed = close(self, r)
  local i = self.next_index
  self.next_index = i + 1
  self.open[r] = { index = i, kind = kind }
  return closed .. event("content_block_start", concat { '{"type":"content_block_start","index":', i,
    ',"content_block":', block_json, "}" }), i
end

local function delta(i, d)
  return event("content_block_delta", concat { '{"type":"content_block_delta","index":', i, ',"delta":', d, "}" })
end

function Encoder:text(text, r)
  r = r or 0
  local b = self.open[r]
  local head = ""
  if not (b and b.kind == "text") then
    head = open(self, r, "text", '{"type":"text","text":""}')
    b = self.open[r]
  end
  return head .. delta(b.index, '{"type":"text_delta","text":' .. js(text) .. "}")
end

local function thinking_block(self, r)
  local b = self.open[r]
  if b and b.kind == "thinking" and not b.signed then
    return "", b
  end
  local head = open(self, r, "thinking", '{"type":"thinking","thinking":"","signature":""}')
  return head, self.open[r]
end

local EVENTS = {
  thinking = function(self, e, r)
    local head, b = thinking_block(self, r)
    return head .. delta(b.index, '{"type":"thinking_delta","thinking":' .. js(e.text) .. "}")
  end,
  thinking_signature = function(self, e, r)
    local head, b = thinking_block(self, r)
    b.signed = true
    return head .. delta(b.index, '{"type":"signature_delta","signature":' .. js(e.signature) .. "}")
  end,
  redacted_thinking = function(self, e, r)
    local head = open(self, r, "redacted_thinking", '{"type":"redacted_thinking","data":' .. js(e.data) .. "}")
    return head .. close(self, r)
  end,
  tool_call = function(self, e, r)
    local head, i = open(self, r, "tool_use", concat { '{"type":"tool_use","id":', js(e.id), ',"name":',
      js(e.name), ',"input":{}}' })
    self.tools[r] = self.tools[r] or {}
    self.tools[r][e.index or 0] = i
    return head
  end,
  tool_arguments = function(self, e, r)
    local tools = self.tools[r]
    local i = tools and tools[e.index or 0]
    local head = ""
    if not i then -- arguments without their call: open one
      head = self:event({ type = "tool_call", index = e.index or 0, id = "", name = "" }, r)
      i = self.tools[r][e.index or 0]
    end
    return head .. delta(i, '{"type":"input_json_delta","partial_json":' .. js(e.text) .. "}")
  end,
}

-- An answer that begins after the others: its blocks follow theirs.
function Encoder.open_choice()
  return ""
end

-- Takes over a stream that was relayed as an upstream sent it: blocks
-- content blocks had been started there, the last still open when
-- open_block. It is closed; the next block takes the next index.
function Encoder:resume(blocks, open_block)
  self.next_index = blocks
  if open_block and blocks > 0 then
    return event("content_block_stop", fmt('{"type":"content_block_stop","index":%d}', blocks - 1))
  end
  return ""
end

-- event(ev, r) -> the bytes of one canonical event of answer r.
function Encoder:event(e, r)
  if e.type == "text" then
    return self:text(e.text, r)
  end
  local f = EVENTS[e.type]
  if not f then
    return "" -- meta: nothing of its own to say
  end
  return f(self, e, r or 0)
end

-- The end of a successful stream: the open blocks closed, message_delta
-- with the stop reason and usage, message_stop.
function Encoder:finish(results)
  local out = {}
  if self.next_index == 0 then -- an empty answer still has its text block
    out[1] = open(self, 0, "text", '{"type":"text","text":""}')
  end
  local open_list = {}
  for r, b in pairs(self.open) do
    open_list[#open_list + 1] = { r = r, index = b.index }
  end
  sort(open_list, function(a, b) return a.index < b.index end)
  for _, o in ipairs(open_list) do
    out[#out + 1] = close(self, o.r)
  end
  local first = results[1]
  out[#out + 1] = event("message_delta", concat { '{"type":"message_delta","delta":{"stop_reason":',
    js(first and stop_of(first) or "end_turn"), ',"stop_sequence":', stop_sequence_of(first), "},",
    '"usage":', usage_json(results), "}" })
  out[#out + 1] = event("message_stop", '{"type":"message_stop"}')
  return concat(out)
end

-- A stream that broke after it began: Anthropic's own mid-stream error event.
function Encoder.error(_, status, message)
  return event("error", _M.error_body(status, message))
end

return _M
