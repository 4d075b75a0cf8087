-- The mock's Cohere Chat v2 (POST /v2/chat), plain and streamed, under
-- the same directives as the others (the top of scripts/aiorch/mock.lua):
-- mock.lua routes the requests here and hands over its shared parts
-- (handler(H)); the faults that answer before a request is read (429,
-- 500, hang, html, ...) stay there, in Cohere's error shape from here.
--
-- Behaviour, driven by the request (deterministic):
--   tools           tool_choice NONE: text. None given: calls the tools the
--                   last user message names (or tool_calls=N), else text; a
--                   last turn of tool results gets text. REQUIRED: always
--                   calls. Each call comes after a tool_plan naming the tools;
--                   arguments are an instance of the tool's parameters
--                   schema; ids NAME_mock…, distinct. finish_reason TOOL_CALL.
--   tool results    the text quotes them in order ("Tool results: [id] text")
--   images          image_url items: "I see 2 images." Documents (the
--                   top-level `documents`, and document items of tool
--                   results) are counted the same way.
--   thinking        thinking {type: enabled}: a thinking item first.
--   JSON output     response_format json_object ({"answer": text}), with
--                   json_schema an instance of the schema.
--   stop sequences  stop_sequences cut the text (finish_reason STOP_SEQUENCE).
--   max_tokens      an answer longer (in words) than max_tokens is cut to
--                   it (finish_reason MAX_TOKENS).
--   logprobs        logprobs: true adds {text, token_ids, logprobs} per
--                   word (in a stream, one on each content-delta: its words).
--   usage           billed_units counts the words of the request and the
--                   answer; tokens adds PREAMBLE_TOKENS to the input (the
--                   prompt Cohere wraps around it); cached_tokens 0.
-- Validation: a 400 {"id", "message"} for what Cohere refuses: no model or
-- messages, unknown roles or content items, a tool message that answers no
-- call of the assistant turn before it, calls left unanswered, a last
-- assistant turn, bad tools, tool_choice other than REQUIRED and NONE (or
-- without tools), response_format with tools or documents, p, k,
-- penalties, temperature, max_tokens, stop_sequences, thinking and
-- safety_mode out of their ranges.
local json = require "aiorch.json"
local cjson = require "cjson.safe"

local concat = table.concat
local fmt = string.format
local byte = string.byte
local ipairs, pairs, next, type, tostring, tonumber = ipairs, pairs, next, type, tostring, tonumber
local tointeger = math.tointeger
local encode = cjson.encode
local null = cjson.null

local _M = {}

_M.DEFAULT_MODEL = "command-a-03-2025"
local PREAMBLE_TOKENS = 64
local IMAGE_TOKENS, DOCUMENT_TOKENS = 85, 100
local MAX_RESULT_ECHO = 500
local IMAGE_MEDIA = { ["image/jpeg"] = true, ["image/png"] = true, ["image/gif"] = true, ["image/webp"] = true }

------------------------------------------------------------------------------
-- Errors: {"id": "<uuid>", "message": "..."}

-- An id of the shape of Cohere's (a UUID), the same for the same text.
local function uuid_of(s)
  local h1, h2 = 5381, 52711
  for i = 1, #s do
    local b = byte(s, i)
    h1 = (h1 * 33 + b) % 0x100000000
    h2 = (h2 * 31 + b) % 0x1000000000000
  end
  return fmt("%08x-%04x-4%03x-8%03x-%012x", h1, h2 % 0x10000, h1 % 0x1000, h2 % 0x1000, h2)
end

local function answer_id(seq)
  return fmt("c0e5e000-0000-4000-8000-%012d", seq)
end

-- The body of an error: id defaults to one made of the message (echo_key
-- puts the second half of the key there).
function _M.error_body(message, id)
  return concat { '{"id":', encode(id or uuid_of(message)), ',"message":', encode(message), "}" }
end

local function usage_json(input, output)
  return fmt('{"billed_units":{"input_tokens":%d,"output_tokens":%d},"tokens":{"input_tokens":%d,'
    .. '"output_tokens":%d},"cached_tokens":0}', input, output, input + PREAMBLE_TOKENS, output)
end

-- fault=error200 without a stream: a 200 answer whose generation failed.
local ERROR200 = concat { '{"id":"', answer_id(0), '","finish_reason":"ERROR","message":{"role":"assistant",',
  '"content":[]},"usage":', usage_json(0, 0), "}" }

-- mock.lua's ERRORS entries: {status, type, code, message}. error200's
-- body is a whole answer (error_body below gives it for that type).
_M.ERRORS = {
  ["429"] = { 429, nil, nil, "You have reached the rate limit of this API key. Please wait and try again." },
  ["500"] = { 500, nil, nil, "internal server error, this has been reported to our developers" },
  ["529"] = { 529, nil, nil, "the model is overloaded, please try again later" },
  ["401"] = { 401, nil, nil, "invalid api token" },
  ["400"] = { 400, nil, nil, "invalid request: max_tokens must be at least 1" },
  ["403"] = { 403, nil, nil, "this API key is not allowed to use the requested model" },
  ["503"] = { 503, nil, nil, "service unavailable, please try again later" },
  error200 = { 200, "error200", nil, "the generation failed" },
}

-- mock.lua's error_body(api, etype, code, message) for Cohere.
function _M.error_body_of(etype, code, message)
  if etype == "error200" then
    return ERROR200
  end
  return _M.error_body(message, code)
end

local function sse(name, data)
  return concat { "event: ", name, "\ndata: ", data, "\n\n" }
end

local DONE = "data: [DONE]\n\n"

-- fault=error200 in a stream: the generation fails after it began.
_M.STREAM_ERROR = sse("message-end", '{"type":"message-end","delta":{"error":"the generation failed",'
  .. '"finish_reason":"ERROR","usage":' .. usage_json(0, 0) .. "}}") .. DONE

-- fault=malformed: an event cut inside its JSON.
_M.MALFORMED = 'event: content-delta\ndata: {"type":"content-delta","index":0,"delta":{"message":'
  .. '{"content":{"text":"trunc\n\n'

-- fault=huge: the JSON before and after the text of a one-text answer.
function _M.huge(seq, input_tokens)
  local head = concat { '{"id":"', answer_id(seq), '","message":{"role":"assistant","content":[{"type":"text",',
    '"text":"' }
  return head, function(out)
    return concat { '"}]},"finish_reason":"MAX_TOKENS","usage":', usage_json(input_tokens, out), "}" }
  end
end

------------------------------------------------------------------------------
-- Reading a request

local function present(v)
  return v ~= nil and v ~= null
end

local function bad(message)
  return nil, { message = "invalid request: " .. message }
end

local function is_list(v)
  return type(v) == "table" and (v[1] ~= nil or next(v) == nil or json.is_array(v))
end

-- A number field within [lo, hi] (hi may be nil), or nil, error.
local function number_in(body, name, lo, hi, integer)
  local v = body[name]
  if not present(v) then
    return true
  end
  local n = tonumber(v)
  if type(v) ~= "number" or (integer and not tointeger(n)) or n < lo or (hi and n > hi) then
    return bad(fmt("%s must be %s %s (got %s)", name, integer and "an integer" or "a number",
      hi and fmt("between %s and %s", lo, hi) or "of at least " .. fmt("%.14g", lo), tostring(v)))
  end
  return true
end

local function image_problem(url, where)
  if type(url) ~= "string" then
    return where .. ".image_url.url is required"
  end
  if url:find("^https?://[^%s]+$") then
    return nil
  end
  local media, data = url:match("^data:([^;,]+);base64,(.*)$")
  if not media or not IMAGE_MEDIA[media] or data == "" then
    return where .. ".image_url.url must be an http(s) URL or a base64 data URL of a jpeg, png, gif or webp image"
  end
  return nil
end

-- The items a role's content may hold.
local ITEMS = {
  user = { text = true, image_url = true },
  system = { text = true },
  assistant = { text = true, thinking = true },
  tool = { text = true, document = true },
}

-- One message's content: its words and text, or nil, error.
local function read_content(H, conv, m, where)
  local c = m.content
  if type(c) == "string" then
    return H.words(c), c
  elseif not present(c) then
    if m.role == "assistant" then
      return 0, ""
    end
    return bad(where .. ".content is required")
  elseif not is_list(c) then
    return bad(where .. ".content must be a string or a list of content items")
  end
  local tokens, texts = 0, {}
  for j, item in ipairs(c) do
    local w = fmt("%s.content[%d]", where, j - 1)
    local t = type(item) == "table" and item.type
    if not (t and ITEMS[m.role][t]) then
      local names = {}
      for k in pairs(ITEMS[m.role]) do
        names[#names + 1] = k
      end
      table.sort(names)
      return bad(fmt("%s.type must be one of %s for a %s message (got %s)", w, concat(names, ", "), m.role,
        tostring(t)))
    end
    if t == "text" then
      if type(item.text) ~= "string" then
        return bad(w .. ".text is required")
      end
      texts[#texts + 1] = item.text
    elseif t == "thinking" then
      if type(item.thinking) ~= "string" then
        return bad(w .. ".thinking is required")
      end
    elseif t == "image_url" then
      local problem = image_problem(type(item.image_url) == "table" and item.image_url.url, w)
      if problem then
        return bad(problem)
      end
      conv.images = conv.images + 1
      tokens = tokens + IMAGE_TOKENS
    elseif t == "document" then
      local d = item.document
      if type(d) ~= "table" or type(d.data) ~= "table" then
        return bad(w .. ".document.data is required (an object)")
      end
      conv.documents = conv.documents + 1
      tokens = tokens + DOCUMENT_TOKENS
      texts[#texts + 1] = type(d.data.text) == "string" and d.data.text or ""
    end
  end
  local text = concat(texts, " ")
  return tokens + H.words(text), text
end

local function read_tools(H, body, conv)
  local tools = body.tools
  if not present(tools) then
    tools = {}
  elseif not is_list(tools) then
    return bad("tools must be a list")
  end
  for i, t in ipairs(tools) do
    local w = fmt("tools[%d]", i - 1)
    local f = type(t) == "table" and t["function"]
    if type(t) ~= "table" or t.type ~= "function" then
      return bad(w .. ".type must be function")
    elseif type(f) ~= "table" or type(f.name) ~= "string" or f.name == "" then
      return bad(w .. ".function.name is required")
    elseif type(f.parameters) ~= "table" then
      return bad(w .. ".function.parameters is required (a JSON schema)")
    end
    conv.tools[#conv.tools + 1] = { name = f.name, schema = f.parameters }
    conv.input_tokens = conv.input_tokens + H.words(f.name)
      + H.words(type(f.description) == "string" and f.description or "")
      + H.words(((json.encode_safe(f.parameters) or ""):gsub('[{}%[%]":,]', " ")))
  end
  local tc = body.tool_choice
  local any = conv.tools[1] ~= nil
  conv.choice = { mode = any and "auto" or "none" }
  if present(tc) then
    if tc ~= "REQUIRED" and tc ~= "NONE" then
      return bad(fmt("tool_choice must be REQUIRED or NONE (got %s)", tostring(tc)))
    end
    if not any then
      return bad("tool_choice can only be used with tools")
    end
    conv.choice.mode = tc == "REQUIRED" and "required" or "none"
  end
  return true
end

local function read_documents(H, body, conv)
  local docs = body.documents
  if not present(docs) then
    return true
  end
  if not is_list(docs) then
    return bad("documents must be a list")
  end
  for i, d in ipairs(docs) do
    if type(d) == "string" then
      conv.input_tokens = conv.input_tokens + H.words(d)
    elseif type(d) == "table" and type(d.data) == "table" then
      conv.input_tokens = conv.input_tokens + DOCUMENT_TOKENS
    else
      return bad(fmt("documents[%d] must be a string or {data: {...}}", i - 1))
    end
    conv.documents = conv.documents + 1
  end
  return true
end

local function read_params(body, conv)
  local checks = {
    { "temperature", 0, 5 }, { "p", 0.01, 0.99 }, { "k", 0, 500, true }, { "frequency_penalty", 0, 1 },
    { "presence_penalty", 0, 1 }, { "max_tokens", 1, nil, true }, { "seed", -(2 ^ 63), nil, true },
  }
  for _, c in ipairs(checks) do
    local ok, e = number_in(body, c[1], c[2], c[3], c[4])
    if not ok then
      return nil, e
    end
  end
  conv.max_tokens = tointeger(body.max_tokens)
  local stops = body.stop_sequences
  if present(stops) then
    if not is_list(stops) or #stops > 5 then
      return bad("stop_sequences must be a list of at most 5 strings")
    end
    conv.stops = stops
  end
  local sm = body.safety_mode
  if present(sm) and sm ~= "CONTEXTUAL" and sm ~= "STRICT" and sm ~= "OFF" then
    return bad(fmt("safety_mode must be CONTEXTUAL, STRICT or OFF (got %s)", tostring(sm)))
  end
  local th = body.thinking
  if present(th) then
    if type(th) ~= "table" or (th.type ~= "enabled" and th.type ~= "disabled") then
      return bad("thinking.type must be enabled or disabled")
    end
    local b = th.token_budget
    if present(b) and not (tointeger(b) and b > 0) then
      return bad("thinking.token_budget must be a positive integer")
    end
    conv.thinking = th.type == "enabled"
  end
  local rf = body.response_format
  if present(rf) then
    if type(rf) ~= "table" or (rf.type ~= "text" and rf.type ~= "json_object") then
      return bad("response_format.type must be text or json_object")
    end
    if rf.type == "json_object" then
      if conv.tools[1] or present(body.documents) then
        return bad("response_format is not supported with tools or documents")
      end
      if type(rf.json_schema) == "table" then
        conv.json_schema = rf.json_schema
      else
        conv.json_object = true
      end
    end
  end
  conv.logprobs = body.logprobs == true
  return true
end

-- The ids of the assistant turn's calls still unanswered, as an error.
local function unanswered(open, order)
  for _, id in ipairs(order) do
    if not open[id] then
      return bad(fmt("the tool call %s has no tool message answering it", id))
    end
  end
  return true
end

-- conv (see mock.lua's "Reading a request"), or nil, {message}.
local function read(H, body)
  local conv = H.new_conv()
  if type(body.model) ~= "string" or body.model == "" then
    return bad("model is required")
  end
  local ok, e = read_tools(H, body, conv)
  if not ok then
    return nil, e
  end
  ok, e = read_documents(H, body, conv)
  if not ok then
    return nil, e
  end
  ok, e = read_params(body, conv)
  if not ok then
    return nil, e
  end
  local messages = body.messages
  if not is_list(messages) or messages[1] == nil then
    return bad("messages must be a non-empty list")
  end
  local open, order -- the calls of the assistant turn before (true once answered)
  for i, m in ipairs(messages) do
    local where = fmt("messages[%d]", i - 1)
    local role = type(m) == "table" and m.role
    if not ITEMS[role] then
      return bad(fmt("%s.role must be one of system, user, assistant or tool (got %s)", where, tostring(role)))
    end
    if role == "tool" then
      local id = m.tool_call_id
      if type(id) ~= "string" then
        return bad(where .. ".tool_call_id is required")
      end
      if not open or open[id] == nil then
        return bad(fmt("%s.tool_call_id %s answers no tool call of the assistant message before it", where, id))
      end
      open[id] = true
    elseif open then
      ok, e = unanswered(open, order)
      if not ok then
        return nil, e
      end
      open = nil
    end
    local tokens, text = read_content(H, conv, m, where)
    if not tokens then
      return nil, text
    end
    if role == "assistant" then
      local calls = m.tool_calls
      if present(calls) then
        if not is_list(calls) then
          return bad(where .. ".tool_calls must be a list")
        end
        open, order = {}, {}
        for j, tc in ipairs(calls) do
          local f = type(tc) == "table" and tc["function"]
          if type(tc) ~= "table" or type(tc.id) ~= "string" or type(f) ~= "table" or type(f.name) ~= "string" then
            return bad(fmt("%s.tool_calls[%d] needs an id and function.name", where, j - 1))
          end
          open[tc.id] = false
          order[#order + 1] = tc.id
          tokens = tokens + H.words(f.name) + H.words(type(f.arguments) == "string" and f.arguments or "")
        end
      end
      if type(m.tool_plan) == "string" then
        tokens = tokens + H.words(m.tool_plan)
      end
    end
    if role == "user" and text:find("%S") then
      conv.question = text
    end
    conv.input_tokens = conv.input_tokens + tokens
  end
  if open then
    ok, e = unanswered(open, order)
    if not ok then
      return nil, e
    end
  end
  local last = #messages
  if messages[last].role == "assistant" then
    return bad("the last message must be a user or tool message")
  end
  if messages[last].role == "tool" then
    local first = last
    while first > 1 and messages[first - 1].role == "tool" do
      first = first - 1
    end
    conv.results = {}
    for i = first, last do
      conv.results[#conv.results + 1] = { id = messages[i].tool_call_id,
        text = H.utf8_head(H.content_text(messages[i].content), MAX_RESULT_ECHO) }
    end
  end
  return conv
end

------------------------------------------------------------------------------
-- The answer

-- The first n words of text (with the spaces between them).
local function first_words(text, n)
  local count = 0
  for e in text:gmatch("%S+()") do
    count = count + 1
    if count == n then
      return text:sub(1, e - 1)
    end
  end
  return text
end

local function logprob(i)
  return fmt("%.6g", -((i - 1) % 7 + 1) / 64)
end

-- logprobs items of text: one per word, a plausible value each.
local function logprobs_items(H, text)
  local out = {}
  for i, tok in ipairs(H.tokens_of(text)) do
    out[i] = fmt('{"text":%s,"token_ids":[%d],"logprobs":[%s]}', encode(tok), 1000 + i, logprob(i))
  end
  return out
end

-- The logprobs item of a stream's piece: its words, one token each.
local function piece_logprobs(H, piece)
  local ids, lps = {}, {}
  for i in ipairs(H.tokens_of(piece)) do
    ids[i], lps[i] = 1000 + i, logprob(i)
  end
  return fmt('{"text":%s,"token_ids":[%s],"logprobs":[%s]}', encode(piece), concat(ids, ","), concat(lps, ","))
end

-- What the answer holds: {thinking, plan, calls, text, finish, output}, or
-- nil, error.
local function compose(H, self, conv, d)
  local a = { output = 0 }
  if conv.thinking then
    a.thinking = H.thinking_text(conv)
    a.output = a.output + H.words(a.thinking)
  end
  local calls = H.tool_calls(conv, d)
  if calls then
    local args, err = H.arguments_of(calls)
    if not args then
      return nil, { message = err }
    end
    local names, seen = {}, {}
    a.calls = {}
    for i, t in ipairs(calls) do
      a.calls[i] = { id = fmt("%s_mock%08d%02d", t.name, self.seq, i), name = t.name, args = args[t.name] }
      a.output = a.output + H.words(t.name) + H.words(args[t.name])
      if not seen[t.name] then
        seen[t.name] = true
        names[#names + 1] = t.name
      end
    end
    a.plan = fmt("I will use %s to answer this.", concat(names, " and "))
    a.output = a.output + H.words(a.plan)
    a.finish = "TOOL_CALL"
    return a
  end
  local text, err = H.json_text(conv, H.answer_text("cohere", conv, d), d)
  if not text then
    return nil, { message = err }
  end
  local cut, stop = H.cut_at_stop(text, conv.stops)
  a.finish = stop and "STOP_SEQUENCE" or "COMPLETE"
  if conv.max_tokens and H.words(cut) > conv.max_tokens then
    cut, a.finish = first_words(cut, conv.max_tokens), "MAX_TOKENS"
  end
  a.text = cut
  a.output = a.output + H.words(cut)
  return a
end

local function call_json(c)
  return concat { '{"id":"', c.id, '","type":"function","function":{"name":', encode(c.name), ',"arguments":',
    encode(c.args), "}}" }
end

local function message_json(H, a, conv)
  local content = {}
  if a.thinking then
    content[#content + 1] = '{"type":"thinking","thinking":' .. encode(a.thinking) .. "}"
  end
  if a.text then
    content[#content + 1] = '{"type":"text","text":' .. encode(a.text) .. "}"
  end
  local out = { '{"role":"assistant"' }
  if a.calls then
    local calls = {}
    for i, c in ipairs(a.calls) do
      calls[i] = call_json(c)
    end
    out[#out + 1] = ',"tool_plan":' .. encode(a.plan) .. ',"tool_calls":[' .. concat(calls, ",") .. "]"
  end
  if content[1] then
    out[#out + 1] = ',"content":[' .. concat(content, ",") .. "]"
  end
  out[#out + 1] = "}"
  local lp = ""
  if conv.logprobs and a.text then
    lp = ',"logprobs":[' .. concat(logprobs_items(H, a.text), ",") .. "]"
  end
  return concat(out), lp
end

-- The stream's events and which of them are content pieces.
local function stream_events(H, a, conv, d, id, usage)
  local events, content = {}, {}
  local function add(name, data, is_content)
    events[#events + 1] = sse(name, data)
    content[#events] = is_content
  end
  add("message-start", concat { '{"id":"', id, '","type":"message-start","delta":{"message":{"role":"assistant",',
    '"content":[],"tool_plan":"","tool_calls":[],"citations":[]}}}' }, false)
  local index = 0
  local function block(kind, text)
    add("content-start", fmt('{"type":"content-start","index":%d,"delta":{"message":{"content":{"type":"%s",'
      .. '"%s":""}}}}', index, kind, kind), false)
    for _, piece in ipairs(H.split(text, d.chunks)) do
      local lp = ""
      if kind == "text" and conv.logprobs then
        lp = ',"logprobs":' .. piece_logprobs(H, piece)
      end
      add("content-delta", concat { '{"type":"content-delta","index":', index, ',"delta":{"message":{"content":{"',
        kind, '":', encode(piece), "}}}", lp, "}" }, true)
    end
    add("content-end", fmt('{"type":"content-end","index":%d}', index), false)
    index = index + 1
  end
  if a.thinking then
    block("thinking", a.thinking)
  end
  if a.calls then
    for _, piece in ipairs(H.split(a.plan, d.chunks)) do
      add("tool-plan-delta", '{"type":"tool-plan-delta","delta":{"message":{"tool_plan":' .. encode(piece) .. "}}}",
        true)
    end
    for i, c in ipairs(a.calls) do
      add("tool-call-start", concat { '{"type":"tool-call-start","index":', i - 1, ',"delta":{"message":',
        '{"tool_calls":{"id":"', c.id, '","type":"function","function":{"name":', encode(c.name),
        ',"arguments":""}}}}}' }, true)
      for _, piece in ipairs(H.split(c.args, d.chunks)) do
        add("tool-call-delta", concat { '{"type":"tool-call-delta","index":', i - 1, ',"delta":{"message":',
          '{"tool_calls":{"function":{"arguments":', encode(piece), "}}}}}" }, true)
      end
      add("tool-call-end", fmt('{"type":"tool-call-end","index":%d}', i - 1), false)
    end
  else
    block("text", a.text)
  end
  add("message-end", concat { '{"type":"message-end","delta":{"finish_reason":"', a.finish, '","usage":', usage,
    "}}" }, false)
  events[#events + 1] = DONE
  content[#events] = false
  local first = #events
  for i = 1, #events do
    if content[i] then
      first = i
      break
    end
  end
  return events, content, first
end

-- handler(H) -> the handler of POST /v2/chat, (self, req, res, d). H: the
-- parts of mock.lua it shares (see where mock.lua calls this).
function _M.handler(H)
  return function(self, req, res, d)
    local body = req.json
    local conv, e = read(H, body)
    if not conv then
      return H.reject(req, res, "cohere", e)
    end
    self.seq = self.seq + 1
    local a
    a, e = compose(H, self, conv, d)
    if not a then
      return H.reject(req, res, "cohere", e)
    end
    local id = answer_id(self.seq)
    local usage = usage_json(conv.input_tokens, a.output)
    if body.stream ~= true then
      local msg, lp = message_json(H, a, conv)
      return H.respond_json(res, "cohere", concat { '{"id":"', id, '","message":', msg, ',"finish_reason":"',
        a.finish, '"', lp, ',"usage":', usage, "}" }, d)
    end
    local events, content, first = stream_events(H, a, conv, d, id, usage)
    return H.send_stream(self, req, res, "cohere", events, content, first, d)
  end
end

return _M
