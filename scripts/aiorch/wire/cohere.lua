-- Cohere Chat v2 (POST /v2/chat) <-> the canonical model (docs/canonical.md):
-- requests out, answers and streams in. aiorch serves no Cohere API, so
-- there is no decode_request, encode_response or stream_encoder here. Pure
-- functions and one small object per stream; no I/O.
--
-- Cohere's `tool_plan` (the words a model says before it calls tools) is
-- text: an OpenAI answer's content beside its tool_calls, an Anthropic
-- text block before its tool_use. An assistant turn sent back puts the
-- text that comes with tool calls in `tool_plan` again.
local json = require "aiorch.json"
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
local tointeger = math.tointeger
local str, num = util.str, util.num

local EMPTY = {} -- never written

local _M = { api = "cohere" }

local events, continue_chat = common.events, common.continue_chat
local text_of = common.text_of
local pass, translate, refuse = common.pass, common.translate, common.refuse
local copy, copy_to, ignore = common.copy, common.copy_to, common.ignore

-- The API's documented bounds of p and k; values past them are sent at
-- the bound (top_p 1, "no nucleus cut", is 0.99, the widest Cohere takes).
local P_MIN, P_MAX, K_MAX = 0.01, 0.99, 500

-- What Chat v2 can express of the canonical model: one cell per key of
-- canonical.CELLS.
_M.fields = {
  messages = pass(),
  ["role.system"] = pass("`system` messages, where they stand"),
  ["role.developer"] = translate("a `system` message"),
  signature = translate("not sent: a thought signature only means something to the API that made it (Gemini)"),
  ["role.tool"] = translate("one `tool` message per tool result, with its `tool_call_id`"),
  ["message.name"] = refuse("Cohere messages have no participant name"),
  prefill = refuse("Cohere answers a last assistant message instead of continuing it"),
  text = pass(),
  ["image.base64"] = translate("an `image_url` content item with a `data:` URL (vision models)"),
  ["image.url"] = translate("an `image_url` content item (vision models)"),
  ["image.file"] = refuse("`image_url` takes a URL, not a file id"),
  ["image.detail"] = translate("`image_url.detail`"),
  ["document.base64"] = refuse("Cohere takes documents as text, not files"),
  ["document.url"] = refuse("Cohere takes documents as text, not URLs"),
  ["document.text"] = translate("an entry of the top-level `documents`, `{data: {title, text}}`: the model "
    .. "grounds its answer on it"),
  ["document.file"] = refuse("Cohere takes documents as text, not file ids"),
  ["document.title"] = translate("`data.title`"),
  ["document.filename"] = translate("`data.title` when the document has no title"),
  tool_call = translate("the assistant message's `tool_calls` (type function), ids unchanged; the text "
    .. "beside them is its `tool_plan`"),
  ["tool_call.arguments"] = translate("`function.arguments`, as they are"),
  tool_result = translate("a `tool` message: the content as a string or `text` and `document` items"),
  ["tool_result.is_error"] = refuse("`tool` messages have no error flag"),
  ["tool_result.image"] = refuse("`tool` messages take text and documents only"),
  ["tool_result.document"] = translate("a `document` content item `{document: {data: {title, text}}}` "
    .. "(text documents)"),
  thinking = translate("a `thinking` content item of the assistant message (a signature, another API's, "
    .. "has no place)"),
  ["thinking.unsigned"] = translate("a `thinking` content item of the assistant message"),
  redacted_thinking = refuse("Cohere has no redacted thinking"),
  cache_control = refuse("Cohere caches prompt prefixes by itself: there is no per-block marker"),
  tools = translate("`{type: function, function: {name, description, parameters}}`; an empty object schema "
    .. "when there are no parameters"),
  ["tool.strict"] = translate("`strict_tools: true` when any tool is strict (Cohere's switch holds for "
    .. "every tool)"),
  tool_choice = translate("`auto` sends nothing; `required` and `none` as `REQUIRED` and `NONE`; `{name}` "
    .. "as `REQUIRED` with that tool alone in `tools`"),
  parallel_tool_calls = refuse("Cohere has no switch for it: a model may always call several tools at once"),
  ["response_format.text"] = pass(),
  ["response_format.json_object"] = pass(),
  ["response_format.json_schema"] = translate("`{type: json_object, json_schema}`; the name, description "
    .. "and strict have no place (the schema is always enforced)"),
  max_tokens = pass(),
  temperature = pass({ range = { 0, 5 } }),
  top_p = translate(fmt("`p`, within Cohere's %s..%s (1, no cut, is sent as %s)", P_MIN, P_MAX, P_MAX)),
  top_k = translate(fmt("`k`, at most %d (more is sent as %d)", K_MAX, K_MAX)),
  stop = translate("`stop_sequences`"),
  seed = pass(),
  presence_penalty = pass("Cohere takes 0..1 and refuses other values"),
  frequency_penalty = pass("Cohere takes 0..1 and refuses other values"),
  logprobs = pass(),
  top_logprobs = refuse("Cohere returns the chosen tokens' log-probabilities only"),
  n = refuse("Cohere answers with one message per request"),
  user = refuse("Cohere's chat has no end-user field"),
  metadata = refuse("Cohere's chat has no request metadata"),
  ["reasoning.effort"] = translate("`none` is `thinking: {type: disabled}`; another level leaves thinking on "
    .. "(`type: enabled`): Cohere has a token budget, not effort levels"),
  ["reasoning.budget_tokens"] = translate("`thinking: {type: enabled, token_budget}`"),
  ["reasoning.mode"] = translate("`thinking.type`: enabled and adaptive are `enabled`, disabled `disabled`"),
  ["reasoning.display"] = refuse("Cohere shows its thinking as it is"),
  stream_options = translate("nothing to send: a stream always reports its usage"),
  extra = translate("Cohere fields (`safety_mode`, `citation_options`, `documents`, `priority`, ...) sent "
    .. "as they came; another API's refused by name"),
  opaque = translate("Cohere content items sent as they came; another API's refused by name"),
  ["anthropic-beta"] = translate("not sent: it only changes Anthropic's behaviour (what a beta adds to a "
    .. "request is refused on its own)"),
  ["response.text"] = translate("`message.content` text items, and `tool_plan` (the words before tool calls) "
    .. "as text ahead of the calls"),
  ["response.tool_calls"] = translate("`message.tool_calls` (arguments as JSON text)"),
  ["response.thinking"] = translate("`thinking` content items, without a signature"),
  ["response.refusal"] = refuse("Cohere has no refusal of its own"),
  ["response.finish_reason"] = translate("`COMPLETE` and `STOP_SEQUENCE` are stop, `MAX_TOKENS` length, "
    .. "`TOOL_CALL` tool_calls, `TIMEOUT` other; `ERROR` is a failed call (server_error)"),
  ["response.usage"] = translate("`usage.tokens` (what the model read and wrote; `billed_units` when it is "
    .. "all there is)"),
  ["response.usage.cached_input_tokens"] = translate("`usage.cached_tokens`"),
  ["response.usage.cache_write_tokens"] = refuse("Cohere reports no cache writes"),
  ["response.usage.reasoning_tokens"] = refuse("Cohere counts thinking in the output tokens, not apart"),
  ["response.logprobs"] = translate("`logprobs` items `{text, token_ids, logprobs}` as OpenAI's "
    .. "`{content: [{token, logprob, top_logprobs: []}]}`: an item is one entry, its text and its tokens' "
    .. "log-probabilities summed"),
  ["response.choices"] = refuse("one message per request"),
  ["response.upstream"] = translate("`id`, `billed_units`, `citations`"),
  ["response.stream"] = translate("`content-delta` (text, thinking), `tool-plan-delta` (text), "
    .. "`tool-call-start`/`tool-call-delta`; usage and the finish reason in `message-end`"),
}

-- Requests: canonical -> Cohere -------------------------------------------

-- Each part type's attributes the encoder writes.
local ENCODED = common.encoded {
  thinking = { "type", "text", "signature", "extra" },
}
local encoder = common.encoder("cohere", ENCODED, { arrays_replace = true })
local cannot, merge_extra, check_keys = encoder.cannot, encoder.merge_extra, encoder.check_keys
local opaque_value, default_only = encoder.opaque_value, encoder.default_only
local write_fields, image_url = encoder.write_fields, encoder.image_url

-- A text document's data object.
local function document_data(p, where)
  if p.source.type ~= "text" then
    cannot(where .. ": a document by " .. tostring(p.source.type))
  end
  return { title = p.title or p.filename, text = p.source.data }
end

-- A part of a user or system message as a content item; a document goes
-- to the top-level list (docs) instead, and gives nil.
local function encode_item(p, where, docs)
  check_keys(p, where)
  local t = p.type
  local out
  if t == "text" then
    out = { type = "text", text = p.text }
  elseif t == "image" and docs then
    out = image_url(p, where)
  elseif t == "document" and docs then
    docs[#docs + 1] = merge_extra({ data = document_data(p, where) }, p.extra, where)
    return nil
  elseif t == "opaque" then
    return opaque_value(p, where)
  else
    cannot(fmt("%s: a %s part here", where, t))
  end
  return merge_extra(out, p.extra, where)
end

local function encode_items(content, where, docs)
  if type(content) == "string" then
    return content
  end
  local out = json.array()
  for i, p in ipairs(content) do
    out[#out + 1] = encode_item(p, fmt("%s.content[%d]", where, i - 1), docs)
  end
  return out
end

-- An assistant turn: text and thinking as content items; with tool
-- calls, the text is the tool_plan.
local function encode_assistant(m, where)
  local msg = { role = "assistant" }
  if type(m.content) == "string" then
    msg.content = m.content
    return msg
  end
  local texts, items, calls = {}, json.array(), nil
  for i, p in ipairs(m.content) do
    local w = fmt("%s.content[%d]", where, i - 1)
    check_keys(p, w)
    if p.type == "text" then
      texts[#texts + 1] = p.text
      items[#items + 1] = merge_extra({ type = "text", text = p.text }, p.extra, w)
    elseif p.type == "thinking" then
      items[#items + 1] = merge_extra({ type = "thinking", thinking = p.text }, p.extra, w)
    elseif p.type == "tool_call" then
      calls = calls or json.array()
      calls[#calls + 1] = merge_extra({ id = p.id, type = "function",
        ["function"] = { name = p.name, arguments = p.arguments } }, p.extra, w)
    elseif p.type == "opaque" then
      items[#items + 1] = opaque_value(p, w)
    else
      cannot(fmt("%s: a %s part", w, p.type))
    end
  end
  if calls then
    msg.tool_calls = calls
    msg.tool_plan = #texts > 0 and concat(texts) or nil
    local rest = json.array()
    for _, it in ipairs(items) do
      if it.type ~= "text" then
        rest[#rest + 1] = it
      end
    end
    msg.content = #rest > 0 and rest or nil
  else
    msg.content = items
  end
  return msg
end

-- A tool result's content: a string, or text and document items.
local function result_content(c, where)
  if c == nil then
    return ""
  elseif type(c) == "string" then
    return c
  end
  local out = json.array()
  for k, q in ipairs(c) do
    local w = fmt("%s.content[%d]", where, k - 1)
    check_keys(q, w)
    if q.type == "text" then
      out[#out + 1] = merge_extra({ type = "text", text = q.text }, q.extra, w)
    elseif q.type == "document" then
      out[#out + 1] = merge_extra({ type = "document", document = { data = document_data(q, w) } }, q.extra, w)
    elseif q.type == "opaque" then
      out[#out + 1] = opaque_value(q, w)
    else
      cannot(fmt("%s: a %s in a tool result", w, tostring(q.type)))
    end
  end
  return out
end

local function encode_messages(list, body)
  if list[#list].role == "assistant" then
    cannot("prefill (a last assistant message)")
  end
  local out = json.array()
  local docs = {}
  for i, m in ipairs(list) do
    local where = fmt("messages[%d]", i - 1)
    for k in pairs(m) do
      if k ~= "role" and k ~= "content" and k ~= "extra" then
        cannot(where .. "." .. k)
      end
    end
    local role = m.role
    if role == "tool" then
      for j, p in ipairs(m.content) do
        local w = fmt("%s.content[%d]", where, j - 1)
        if p.type ~= "tool_result" then
          cannot(w .. ": a " .. tostring(p.type) .. " part in a tool message")
        end
        check_keys(p, w)
        out[#out + 1] = merge_extra({ role = "tool", tool_call_id = p.id, content = result_content(p.content, w) },
          p.extra, w)
      end
      merge_extra(out[#out] or {}, m.extra, where)
    elseif role == "assistant" then
      out[#out + 1] = merge_extra(encode_assistant(m, where), m.extra, where)
    else
      local user = role == "user"
      local had = #docs
      local content = encode_items(m.content, where, user and docs or nil)
      -- A user turn of documents alone: they went to `documents`.
      if not (type(content) == "table" and #content == 0 and #docs > had) then
        out[#out + 1] = merge_extra({ role = user and "user" or "system", content = content }, m.extra, where)
      end
    end
  end
  if #docs > 0 then
    body.documents = json.array(docs)
  end
  return out
end

local function encode_tools(body, tools, req)
  local only = type(req.tool_choice) == "table" and req.tool_choice.name or nil
  local out = json.array()
  local strict = false
  for i, t in ipairs(tools) do
    local where = fmt("tools[%d]", i - 1)
    if t.type == "opaque" then
      if not only or t.name == only then
        out[#out + 1] = opaque_value(t, where)
      end
    else
      for k in pairs(t) do
        if k ~= "name" and k ~= "description" and k ~= "parameters" and k ~= "strict" and k ~= "extra" then
          cannot(where .. "." .. k)
        end
      end
      local params = t.parameters
      if params == nil or next(params) == nil then
        params = { type = "object", properties = json.object() }
      end
      if not only or t.name == only then
        out[#out + 1] = merge_extra({ type = "function", ["function"] = { name = t.name,
          description = t.description, parameters = params } }, t.extra, where)
        strict = strict or t.strict == true
      end
    end
  end
  body.tools = out
  if strict then
    body.strict_tools = true
  end
end

local CHOICES = { required = "REQUIRED", none = "NONE" }

-- Each canonical field -> how it is written. A field without an entry
-- cannot be written (encode_request raises).
local REQUEST = {
  messages = function(body, v)
    body.messages = encode_messages(v, body)
  end,
  max_tokens = copy_to("max_tokens"),
  temperature = copy_to("temperature"),
  seed = copy_to("seed"),
  presence_penalty = copy_to("presence_penalty"),
  frequency_penalty = copy_to("frequency_penalty"),
  top_p = function(body, v)
    body.p = v < P_MIN and P_MIN or v > P_MAX and P_MAX or v
  end,
  top_k = function(body, v)
    body.k = v > K_MAX and K_MAX or v
  end,
  logprobs = function(body, v)
    body.logprobs = v or nil
  end,
  n = default_only("n", 1),
  stop = function(body, v)
    body.stop_sequences = json.array(copy(v))
  end,
  tools = encode_tools,
  tool_choice = function(body, v)
    if type(v) == "table" then
      body.tool_choice = "REQUIRED" -- with that tool alone (encode_tools)
    else
      body.tool_choice = CHOICES[v]
    end
  end,
  response_format = function(body, v)
    if v.type == "json_schema" then
      body.response_format = { type = "json_object", json_schema = v.schema }
    else
      body.response_format = { type = v.type }
    end
  end,
  reasoning = function(body, r)
    if r.display ~= nil then
      cannot("reasoning.display")
    end
    local thinking
    if r.budget_tokens then
      thinking = { type = "enabled", token_budget = r.budget_tokens }
    elseif r.mode == "disabled" or (r.mode == nil and r.effort == "none") then
      thinking = { type = "disabled" }
    else
      thinking = { type = "enabled" }
    end
    body.thinking = thinking
  end,
  stream_options = ignore,
  extra = ignore, -- merged last
  continue_from = ignore, -- after the messages
  policy = ignore,
  raw = ignore,
}

-- encode_request(req, opts) -> the wire body (a table for aiorch.json.encode).
-- req: canonical.normalize's; opts: {model, stream}. Raises on a field it
-- cannot write (canonical.unsupported refuses those).
function _M.encode_request(req, opts)
  opts = opts or EMPTY
  local body = { model = opts.model }
  write_fields(REQUEST, body, req)
  -- Continuing an answer another provider began: it is ours so far.
  continue_chat(body.messages, req.continue_from)
  merge_extra(body, req.extra, "extra")
  if opts.stream then
    body.stream = true
  end
  return body
end

-- Answers: Cohere -> canonical --------------------------------------------

local FINISH = { COMPLETE = "stop", STOP_SEQUENCE = "stop", MAX_TOKENS = "length", TOOL_CALL = "tool_calls" }

-- Cohere's finish reason -> the normalised one (docs/canonical.md).
function _M.finish_reason(reason)
  if type(reason) ~= "string" then
    return nil
  end
  return FINISH[reason] or "other"
end

local function failed(message)
  local msg = str(message)
  return "server_error", "provider error: " .. (msg and util.excerpt(msg, 500) or "the generation failed "
    .. "(finish_reason ERROR)")
end

-- Cohere's usage -> the canonical one: the tokens the model read and
-- wrote; what was billed when that is all there is.
local function usage_of(u)
  if type(u) ~= "table" then
    return nil
  end
  local t = type(u.tokens) == "table" and u.tokens or EMPTY
  local b = type(u.billed_units) == "table" and u.billed_units or EMPTY
  return {
    input_tokens = num(t.input_tokens) or num(b.input_tokens),
    output_tokens = num(t.output_tokens) or num(b.output_tokens),
    cached_input_tokens = num(u.cached_tokens),
  }
end

local function billed_of(u)
  local b = type(u) == "table" and u.billed_units
  if type(b) ~= "table" then
    return nil
  end
  local out = {}
  for k, v in pairs(b) do
    if type(k) == "string" and num(v) then
      out[k] = num(v)
    end
  end
  return next(out) and out or nil
end

-- One Cohere logprobs item -> an entry of OpenAI's logprobs.content (the
-- canonical shape), or nil.
local function logprob_entry(item)
  if type(item) ~= "table" or type(item.logprobs) ~= "table" then
    return nil
  end
  local sum = 0
  for _, v in ipairs(item.logprobs) do
    if type(v) == "number" then
      sum = sum + v
    end
  end
  return { token = str(item.text) or "", logprob = sum, bytes = json.null, top_logprobs = json.array() }
end

local function logprobs_of(items)
  if type(items) ~= "table" then
    return nil
  end
  local out = json.array()
  for _, item in ipairs(items) do
    out[#out + 1] = logprob_entry(item)
  end
  return { content = out }
end

-- The parts of an answer's message: its content items in order, the
-- tool_plan as text, then the tool calls.
local function message_parts(msg)
  local parts = {}
  if type(msg.content) == "table" then
    for _, c in ipairs(msg.content) do
      if type(c) == "table" then
        if c.type == "thinking" and str(c.thinking) and c.thinking ~= "" then
          parts[#parts + 1] = { type = "thinking", text = c.thinking }
        elseif c.type == "text" and str(c.text) and c.text ~= "" then
          parts[#parts + 1] = { type = "text", text = c.text }
        end
      end
    end
  elseif str(msg.content) and msg.content ~= "" then
    parts[1] = { type = "text", text = msg.content }
  end
  local plan = str(msg.tool_plan)
  if plan and plan ~= "" then
    parts[#parts + 1] = { type = "text", text = plan }
  end
  if type(msg.tool_calls) == "table" then
    for _, tc in ipairs(msg.tool_calls) do
      local f = type(tc) == "table" and tc["function"]
      if type(f) == "table" and str(f.name) then
        local args = str(f.arguments) or ""
        parts[#parts + 1] = { type = "tool_call", id = str(tc.id) or "", name = f.name,
          arguments = args:find("%S") and args or "{}" }
      end
    end
  end
  return parts
end

-- decode_response(doc) -> result, or nil, kind, message. doc: a decoded
-- 2xx body.
function _M.decode_response(doc)
  local msg = type(doc) == "table" and doc.message
  if type(msg) ~= "table" then
    return nil, "parse", "reply has no message object"
  end
  local reason = str(doc.finish_reason)
  if reason == "ERROR" then
    return nil, failed(nil)
  end
  local parts = message_parts(msg)
  return {
    content = parts,
    text = text_of(parts),
    finish_reason = _M.finish_reason(reason),
    provider_finish_reason = reason,
    usage = usage_of(doc.usage) or {},
    logprobs = logprobs_of(doc.logprobs),
    upstream = { id = str(doc.id), billed_units = billed_of(doc.usage),
      citations = type(msg.citations) == "table" and next(msg.citations) and msg.citations or nil },
  }
end

-- Streams: Cohere -> canonical events -------------------------------------

local Decoder = {}
Decoder.__index = Decoder
_M.Decoder = Decoder

-- stream_decoder() -> one stream's state: its parts in order (content
-- blocks by Cohere's index, the plan, tool calls by their own index).
function _M.stream_decoder()
  return setmetatable({ parts = {}, seq = {}, blocks = {}, calls = {}, tools = 0, events = 0, done = false },
    Decoder)
end

local function emit(out, ev, sse)
  ev.raw = sse
  out[#out + 1] = ev
end

-- The content block at Cohere's index i, of kind ("text" or "thinking"):
-- a new one when there is none there, or one of another kind.
function Decoder:block(i, kind, new)
  local b = self.blocks[i]
  if new or not b or b.type ~= kind then
    b = { type = kind, buf = {} }
    self.blocks[i] = b
    self.seq[#self.seq + 1] = b
  end
  return b
end

function Decoder:add(b, kind, text, out, sse)
  if text and text ~= "" then
    b.buf[#b.buf + 1] = text
    if kind == "text" then
      self.parts[#self.parts + 1] = text
    end
    emit(out, { type = kind, text = text }, sse)
  end
end

-- The text or thinking of a content event's delta.message.content.
local function content_of(doc)
  local d = type(doc.delta) == "table" and doc.delta or EMPTY
  local m = type(d.message) == "table" and d.message or EMPTY
  return type(m.content) == "table" and m.content or EMPTY, m
end

function Decoder:call(i, id, name, out, sse)
  local c = { type = "tool_call", index = self.tools, id = id or "", name = name or "", buf = {} }
  self.tools = self.tools + 1
  self.calls[i] = c
  self.seq[#self.seq + 1] = c
  emit(out, { type = "tool_call", index = c.index, id = c.id, name = c.name }, sse)
  return c
end

local function arguments(c, text, out, sse)
  if text and text ~= "" then
    c.buf[#c.buf + 1] = text
    emit(out, { type = "tool_arguments", index = c.index, text = text }, sse)
  end
end

local EVENTS = {
  ["content-start"] = function(self, doc, out, sse)
    local c = content_of(doc)
    local kind = c.type == "thinking" and "thinking" or "text"
    local b = self:block(tointeger(doc.index) or 0, kind, true)
    self:add(b, kind, str(c[kind]), out, sse)
  end,
  ["content-delta"] = function(self, doc, out, sse)
    local c = content_of(doc)
    local i = tointeger(doc.index) or 0
    local thinking, text = str(c.thinking), str(c.text)
    if thinking then
      self:add(self:block(i, "thinking"), "thinking", thinking, out, sse)
    end
    if text then
      self:add(self:block(i, "text"), "text", text, out, sse)
    end
    local lp = logprob_entry(doc.logprobs)
    if lp then
      self.logprobs = self.logprobs or { content = json.array() }
      local list = self.logprobs.content
      list[#list + 1] = lp
    end
  end,
  ["tool-plan-delta"] = function(self, doc, out, sse)
    local _, m = content_of(doc)
    local plan = self.plan
    if not plan then
      plan = { type = "text", buf = {} }
      self.plan = plan
      self.seq[#self.seq + 1] = plan
    end
    self:add(plan, "text", str(m.tool_plan), out, sse)
  end,
  ["tool-call-start"] = function(self, doc, out, sse)
    local _, m = content_of(doc)
    local tc = type(m.tool_calls) == "table" and m.tool_calls or EMPTY
    local f = type(tc["function"]) == "table" and tc["function"] or EMPTY
    local c = self:call(tointeger(doc.index) or 0, str(tc.id), str(f.name), out, sse)
    arguments(c, str(f.arguments), out, sse)
  end,
  ["tool-call-delta"] = function(self, doc, out, sse)
    local _, m = content_of(doc)
    local tc = type(m.tool_calls) == "table" and m.tool_calls or EMPTY
    local f = type(tc["function"]) == "table" and tc["function"] or EMPTY
    local i = tointeger(doc.index) or 0
    local c = self.calls[i] or self:call(i, nil, nil, out, sse) -- arguments without their start
    arguments(c, str(f.arguments), out, sse)
  end,
  ["citation-start"] = function(self, doc)
    local _, m = content_of(doc)
    if type(m.citations) == "table" then
      self.citations = self.citations or json.array()
      self.citations[#self.citations + 1] = m.citations
    end
  end,
  ["message-start"] = function(self, doc)
    self.id = str(doc.id) or self.id
  end,
  ["message-end"] = function(self, doc)
    local d = type(doc.delta) == "table" and doc.delta or EMPTY
    self.finish_reason = str(d.finish_reason) or self.finish_reason
    self.usage = usage_of(d.usage) or self.usage
    self.billed = billed_of(d.usage) or self.billed
    self.id = str(doc.id) or self.id
    self.done = true
    if self.finish_reason == "ERROR" or str(d.error) then
      self.err = { failed(d.error) }
    end
  end,
}

-- event(sse) -> one canonical event or a list of them; {type = "meta"}
-- for an event without content. sse: {event, data}.
function Decoder:event(sse)
  self.events = self.events + 1
  if self.err then
    return nil -- what follows an error is not relayed: the caller ends the stream its own way
  end
  local data = sse.data
  if data == "[DONE]" then
    return { type = "meta", raw = sse }
  end
  local doc, err = json.decode_plain(data or "") -- arguments are text: nothing here goes back as JSON
  if type(doc) ~= "table" then
    self.err = { "parse", "malformed stream event: " .. (err or "not an object") }
    return nil
  end
  local f = EVENTS[str(doc.type) or sse.event]
  local out = {}
  if f then
    f(self, doc, out, sse)
    if self.err then
      return nil
    end
  end
  return events(out, sse)
end

-- result() -> the result as decode_response gives it, or nil, kind, message.
function Decoder:result()
  if self.err then
    return nil, self.err[1], self.err[2], self.err[3]
  end
  if not self.done then
    return nil, "stream_cut", fmt("stream ended after %d events without message-end", self.events)
  end
  local parts = {}
  for _, b in ipairs(self.seq) do
    if b.type == "tool_call" then
      local args = concat(b.buf)
      parts[#parts + 1] = { type = "tool_call", id = b.id, name = b.name, arguments = args:find("%S") and args
        or "{}" }
    else
      local text = concat(b.buf)
      if text ~= "" then
        parts[#parts + 1] = { type = b.type, text = text }
      end
    end
  end
  return {
    content = parts,
    text = concat(self.parts),
    finish_reason = _M.finish_reason(self.finish_reason),
    provider_finish_reason = self.finish_reason,
    usage = self.usage or {},
    logprobs = self.logprobs,
    upstream = { id = self.id, billed_units = self.billed, citations = self.citations },
  }
end

-- An error's kind and message (the adapter sets its own classification;
-- this is the default).
function Decoder.classify(e)
  local msg = type(e) == "table" and (str(e.message) or str(e.type)) or str(e) or "unknown error"
  return "server_error", "provider error: " .. util.excerpt(msg, 500)
end

return _M
