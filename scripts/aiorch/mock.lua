-- Mock OpenAI, Anthropic and Gemini providers on aiorch.server, Cohere's
-- Chat v2 (POST /v2/chat: scripts/aiorch/mock/cohere.lua, under the same
-- directives), and OpenAI-compatible servers (Azure, Groq, Mistral, ...)
-- under their own paths (scripts/aiorch/mock/compat.lua; base_url("groq")
-- and the like).
--
-- Speaks the real wire formats of Chat Completions, Messages and Gemini's
-- generateContent (scripts/aiorch/mock/gemini.lua, which says how each
-- behaviour below looks there), plain and SSE streaming, and answers what a request asks (see "Behaviour" below):
-- conversations, tools, images and documents, JSON output, thinking, prompt
-- caching, stop sequences, n, logprobs, prefill. Refuses with a 400 in the
-- API's own shape what the real API refuses (see "Validation"). Injects
-- faults chosen per request by directives:
--   * a path prefix:  /_mock/latency_ms=20,fault=500/v1/chat/completions
--   * a header:       x-mock-directives: latency_ms=20,fault=500
--   * the defaults of m:configure(), for requests that carry none.
-- A request that carries directives (prefix or header; the prefix wins on a
-- clash) does not inherit the defaults. Values are percent-decoded.
--
-- Directives:
--   latency_ms      wait before the response headers (default 0)
--   tail_pct        a latency tail: this percentage of requests (at random)
--   tail_ms         waits tail_ms instead of latency_ms (both needed)
--   first_token_ms  a stream sends its headers and the events before the
--                   content at once, then waits this long before the first
--                   content piece (in place of chunk_delay_ms); a response
--                   that is not a stream waits it on top of latency_ms
--   fault           429 | 500 | 529 | 401 | 400 | 403 | 503 | hang | malformed |
--                   cut | error200 | huge | html | reset | echo_key | none
--                     4xx/5xx: that status in the API's own error shape
--                     huge:  a 200 JSON answer of `size` bytes (one huge text)
--                     html:  a 200 text/html page instead of JSON
--                     reset: the connection closes once the request is read,
--                            with no response at all (a client reusing a
--                            kept-alive connection may resend once: curl does)
--                     echo_key: a 401 in the API's error shape whose message
--                            quotes the key the request carried in six forms
--                            (_M.echoed_forms): whole, percent-encoded, JSON-
--                            escaped, masked (prefix...suffix, and OpenAI's
--                            prefix*****suffix), cut short, and split across
--                            two fields: its first half in the message, the
--                            second in error.code (OpenAI) or error.type
--                     cut, malformed, error200 and stall_after count every
--                     content piece of a stream: text, thinking, a tool
--                     call's start and each piece of its arguments
--   size            bytes of a fault=huge body (default 16 MiB; never less
--                   than the JSON around the text)
--   retry_after     Retry-After of a 429, in seconds (default 1)
--   fail_first      only the first N requests carrying the same `key` get
--                   the fault and stall_after; later ones are answered
--                   normally. Counted per mock on arrival; m:reset_counters()
--   key             the counter of fail_first (default: one shared counter)
--   chunks          pieces of each content block of a stream (text,
--                   thinking, a tool call's arguments), at most (default 5)
--   chunk_delay_ms  wait before each content piece of a stream (default 0)
--   stall_after     a stream sends N content pieces (all when N >= their
--                   number), then sends nothing more and keeps the
--                   connection open until the client goes away; a response
--                   that is not a stream stalls after its headers and half
--                   its body. Ignored with fault=cut and error200 (they end
--                   the stream themselves) and with huge.
--   tool_calls      N tool calls: with tool_choice auto even when the question
--                   names no tool; with required / any / a named tool, N of
--                   them (one when parallel tool use is off)
--   redacted_thinking  1: an answer with thinking adds a redacted_thinking block
--   reasoning_content  1: an OpenAI answer carries reasoning_content (streamed
--                   before the content), as DeepSeek and vLLM send it
--   text            the answer text (default: names the provider, echoes the
--                   question, quotes the tool results, counts the images and
--                   documents); in JSON output modes, the JSON text as is
--   finish_reason   Gemini: the finishReason the answer ends with (SAFETY and
--                   the other blocks keep the first half of the text)
--
-- Behaviour, driven by the request (deterministic):
--   tools           tool_choice none: text. auto: calls the tools the last
--                   user message names (or tool_calls=N), else text; a last
--                   turn of tool results gets text. required / any / named:
--                   always calls. Arguments: a valid instance of the tool's
--                   JSON Schema (schema_instance). Ids call_… / toolu_…,
--                   distinct. parallel_tool_calls=false /
--                   disable_parallel_tool_use: one call.
--   tool results    the text quotes them in order: "Tool results: [id] text;
--                   [id error] text"
--   images, files   the text says "I see 2 images and 1 document."
--   thinking        Anthropic thinking enabled or adaptive, or
--                   output_config.effort: a thinking block first, signed by
--                   sign(); one sent back is verified (req.thinking_verified,
--                   and the answer's header x-mock-thinking-verified: true)
--                   and a bad signature gets a 400. OpenAI reasoning_effort:
--                   completion_tokens_details.reasoning_tokens > 0.
--   prompt caching  Anthropic cache_control (on blocks, tools, system, or at
--                   the top level): a prefix not seen before is written
--                   (cache_creation_input_tokens), one seen is read
--                   (cache_read_input_tokens); no minimum length. OpenAI: a
--                   prompt of 1024 tokens or more reports the prefix already
--                   seen as prompt_tokens_details.cached_tokens, in steps of
--                   128. Per mock, until m:reset(); at most CACHE_LIMIT
--                   prefixes (then it starts over).
--   JSON output     response_format json_object ({"answer": text}) or
--                   json_schema, Anthropic output_config.format (or the beta
--                   output_format): an instance of the schema.
--   stop sequences  stop / stop_sequences cut the text before the first one
--                   it contains (Anthropic: stop_reason stop_sequence).
--   n, logprobs     n choices (choice k > 0 ends " (choice k)"); logprobs
--                   per word, with top_logprobs alternatives.
--   prefill         a last Anthropic assistant turn: the answer goes on from
--                   it (an answer that begins with it loses that part).
--   max_tokens 0    Anthropic: no content, stop_reason max_tokens.
--   Tokens are words (an image 85, a document 100); the answer never
--   stops at max_tokens.
--
-- Validation: a 400 in the API's shape, recorded in req.rejected, for
--   OpenAI: unknown roles, parts a role may not carry, a bad image URL, a
--   tool message that answers no tool call of the assistant message before
--   it, tool calls left unanswered, tool_choice or parallel_tool_calls
--   without tools, a named tool that is not there, a strict schema that
--   does not close every object, json_object without the word "json" in the
--   messages, a bad n, top_logprobs, reasoning_effort or stop.
--   Anthropic: max_tokens or messages missing, a system role in messages,
--   unknown roles or block types, an image or document without a valid
--   source (or whose bytes are of another media type), a tool_result
--   without its tool_use in the previous assistant turn, a tool_use without
--   its tool_result in the next turn, a thinking signature that does not
--   match, thinking with a small budget / temperature / top_k / a forced
--   tool / a last tool-use turn that does not start with its thinking, a
--   prefill ending in whitespace, temperature out of [0, 1], unknown
--   metadata, bad tools and tool_choice, and `thread` (message threads are
--   not kept: refused with error.details.error_code thread_unsupported_request,
--   on which the SDKs send the whole conversation instead). Consecutive turns
--   of one role are merged, as the API does.
--
-- Every request is recorded in m.requests as soon as it arrives: the
-- server's request table itself (headers included), so req.aborted_at (set
-- by the server when the client goes away) is visible there. Its fields set
-- by the mock: api, raw_path, directives (those it was answered with), json,
-- completed_at, attempt (its number among the fail_first requests of its
-- key), rejected (the message of a validation 400) and thinking_verified.
-- For tests: mock.sign(text) is the signature the mock gives a thinking
-- text; mock.schema_instance(schema) the instance it makes of a JSON Schema.
--
-- Rate limits: m:rate_limit{requests, tokens, window_ms} (or start's
-- rate_limit) counts each key's requests and tokens and tells them in every
-- answer's headers, in OpenAI's (x-ratelimit-*) or Anthropic's
-- (anthropic-ratelimit-*) format, with a 429 past a limit; req.rate_limited
-- marks those (scripts/aiorch/mock/ratelimit.lua).
--
-- Backpressure. A stream of more than 64 KiB that nothing paces is written
-- in pieces of about 16 KiB (a fault=huge answer in pieces of 64 KiB);
-- res:write waits while more than 64 KiB of them are unsent, so a client
-- that stops reading stalls the mock's sends. A stream's or huge answer's record
-- then also has: sent (body bytes written so far), write_waits (writes
-- that waited on backpressure: they took 1 ms or more, where one that does
-- not wait takes microseconds) and writing_since (aiorch.now() when the
-- write it is parked in began; nil when it is not parked in one).
-- m:stats() gives the totals: {writes, write_waits, writing}.
local aiorch = require "aiorch"
local cjson = require "cjson.safe"
local json = require "aiorch.json"

local concat, tinsert, sort = table.concat, table.insert, table.sort
local fmt = string.format
local byte, char, lower, rep = string.byte, string.char, string.lower, string.rep
local spack, sunpack = string.pack, string.unpack
local math_type, tointeger, huge, ceil, floor = math.type, math.tointeger, math.huge, math.ceil, math.floor
local ipairs, pairs, next = ipairs, pairs, next
local setmetatable, tostring, tonumber, type, error = setmetatable, tostring, tonumber, type, error
local os_time = os.time
local encode = cjson.encode
local null = cjson.null
local now = aiorch.now
local cohere = require "aiorch.mock.cohere"
local compat = require "aiorch.mock.compat"
local ratelimit = require "aiorch.mock.ratelimit"

local _M = {}

-- Gemini (scripts/aiorch/mock/gemini.lua), bound to the helpers of this
-- file before "Serving" below.
local gemini

-- Directives, in the order base_url writes them.
local ORDER = { "latency_ms", "tail_pct", "tail_ms", "first_token_ms", "fault", "size", "retry_after",
  "fail_first", "key", "chunks", "chunk_delay_ms", "stall_after", "tool_calls", "redacted_thinking",
  "reasoning_content", "text", "finish_reason" }
local KNOWN = {}
for i, k in ipairs(ORDER) do
  KNOWN[k] = i
end
local KNOWN_LIST = concat(ORDER, ", ")
-- Directives whose value is a whole number: the least allowed.
local INTEGERS = { chunks = 1, stall_after = 0, size = 0, fail_first = 0, tool_calls = 1,
  redacted_thinking = 0, reasoning_content = 0 }

local FAULT_LIST = "429, 500, 529, 401, 400, 403, 503, hang, malformed, cut, error200, huge, html, reset, "
  .. "echo_key, none"
local FAULTS = {}
for f in FAULT_LIST:gmatch("[^, ]+") do
  FAULTS[f] = true
end
-- Faults answered with an error status before anything else.
local STATUS_FAULTS = {
  ["429"] = true, ["500"] = true, ["529"] = true, ["401"] = true,
  ["400"] = true, ["403"] = true, ["503"] = true,
}
-- Faults whose answer is never a stream, whatever was asked.
local NO_STREAM = { hang = true, huge = true, html = true, reset = true, echo_key = true }
for f in pairs(STATUS_FAULTS) do
  NO_STREAM[f] = true
end

local DEFAULT_MODEL = { openai = "gpt-4o-mini", anthropic = "claude-3-haiku-20240307",
  cohere = cohere.DEFAULT_MODEL }
local HANG_SLICE_MS = 3600 * 1000
local MAX_ECHO = 60
local MAX_RESULT_ECHO = 500
local HUGE_SIZE = 16 * 1024 * 1024
-- Prompt-cache prefixes one mock remembers; past this it forgets them all.
local CACHE_LIMIT = 4096
local OPENAI_CACHE_MIN, OPENAI_CACHE_STEP = 1024, 128
local IMAGE_TOKENS, DOCUMENT_TOKENS = 85, 100
-- OpenAI reasoning_effort: the reasoning tokens an answer reports.
local REASONING_TOKENS = { none = 0, minimal = 8, low = 16, medium = 32, high = 64, xhigh = 128, max = 256 }

------------------------------------------------------------------------------
-- Directives

-- Returns true, value (value nil for fault=none) or false, message.
local function check_directive(k, v)
  if not KNOWN[k] then
    return false, fmt("unknown directive '%s' (known: %s)", tostring(k), KNOWN_LIST)
  end
  if k == "text" or k == "key" or k == "finish_reason" then
    if type(v) ~= "string" or (k == "key" and v == "") then
      return false, fmt("directive %s must be a%s string", k, k == "key" and " non-empty" or "")
    end
    return true, v
  end
  if k == "fault" then
    local f = tostring(v)
    if not FAULTS[f] then
      return false, fmt("bad value '%s' for directive fault (one of %s)", f, FAULT_LIST)
    end
    if f == "none" then
      return true, nil
    end
    return true, f
  end
  local n = tonumber(v)
  if not n or n ~= n or n < 0 or n == huge then
    return false, fmt("bad value '%s' for directive %s (a number >= 0)", tostring(v), k)
  end
  local least = INTEGERS[k]
  if least then
    n = tointeger(n)
    if not n or n < least then
      return false, fmt("bad value '%s' for directive %s (an integer >= %d)", tostring(v), k, least)
    end
  end
  return true, n
end

-- Checks what no single directive can; returns d or nil, message.
local function check_set(d)
  if d.fail_first and not (d.fault or d.stall_after) then
    return nil, "directive fail_first needs a fault or stall_after"
  end
  if (d.tail_pct == nil) ~= (d.tail_ms == nil) then
    return nil, "directives tail_pct and tail_ms go together"
  end
  return d
end

local function new_directives()
  return { latency_ms = 0, retry_after = 1, chunks = 5, chunk_delay_ms = 0 }
end

-- A directives table from a plain {name = value} table; raises on misuse.
local function resolve(raw, level)
  local d = new_directives()
  if raw == nil then
    return d
  end
  if type(raw) ~= "table" then
    error("mock: directives must be a table", level + 1)
  end
  for k, v in pairs(raw) do
    local ok, val = check_directive(k, v)
    if not ok then
      error("mock: " .. val, level + 1)
    end
    d[k] = val
  end
  local ok, msg = check_set(d)
  if not ok then
    error("mock: " .. msg, level + 1)
  end
  return d
end

local function unescape(s)
  return (s:gsub("%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
end

local function escape(s)
  return (s:gsub("[^%w%-%._~]", function(c) return fmt("%%%02X", byte(c)) end))
end

-- Parses "k=v,k=v" into d; returns d or nil, message.
local function parse_directives(s, d)
  for item in s:gmatch("[^,]+") do
    local k, v = item:match("^([^=]*)=(.*)$")
    if not k then
      return nil, fmt("directive '%s' is not name=value", unescape(item))
    end
    k = unescape(k)
    local ok, val = check_directive(k, unescape(v))
    if not ok then
      return nil, val
    end
    d[k] = val
  end
  return d
end

------------------------------------------------------------------------------
-- Static parts of the responses

local JSON_HEADERS = { ["content-type"] = "application/json" }
local SSE_HEADERS = { ["content-type"] = "text/event-stream", ["cache-control"] = "no-cache" }

local ERRORS = {
  openai = {
    ["429"] = { 429, "requests", "rate_limit_exceeded",
      "Rate limit reached for requests. Please try again later." },
    ["500"] = { 500, "server_error", nil,
      "The server had an error while processing your request. Sorry about that!" },
    ["529"] = { 529, "server_error", nil, "The engine is currently overloaded, please try again later." },
    ["401"] = { 401, "invalid_request_error", "invalid_api_key", "Incorrect API key provided." },
    ["400"] = { 400, "invalid_request_error", "invalid_value",
      "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got 0 instead." },
    ["403"] = { 403, "request_forbidden", "unsupported_country_region_territory",
      "Country, region, or territory not supported" },
    ["503"] = { 503, "server_error", nil, "The server is overloaded or not ready yet." },
    error200 = { 200, "server_error", nil,
      "The server had an error while processing your request. Sorry about that!" },
  },
  anthropic = {
    ["429"] = { 429, "rate_limit_error", nil, "Number of requests has exceeded your rate limit." },
    ["500"] = { 500, "api_error", nil, "Internal server error" },
    ["529"] = { 529, "overloaded_error", nil, "Overloaded" },
    ["401"] = { 401, "authentication_error", nil, "invalid x-api-key" },
    ["400"] = { 400, "invalid_request_error", nil, "max_tokens: Field required" },
    ["403"] = { 403, "permission_error", nil,
      "Your API key does not have permission to use the specified resource." },
    -- Not among Anthropic's documented statuses; shaped like its 500.
    ["503"] = { 503, "api_error", nil, "Service Unavailable" },
    error200 = { 200, "overloaded_error", nil, "Overloaded" },
  },
  cohere = cohere.ERRORS,
}

-- details: JSON text of Anthropic's error.details, or nil.
local function error_body(api, etype, code, message, param, details)
  if api == "cohere" then
    return cohere.error_body_of(etype, code, message)
  elseif api == "anthropic" then
    return concat { '{"type":"error","error":{"type":', encode(etype), ',"message":', encode(message),
      details and ',"details":' .. details or "", "}}" }
  end
  return concat { '{"error":{"message":', encode(message), ',"type":', encode(etype),
    ',"param":', param and encode(param) or "null", ',"code":', code and encode(code) or "null", "}}" }
end

-- ERROR_BODY[api][fault] = {status, body}
local ERROR_BODY = {}
for api, faults in pairs(ERRORS) do
  ERROR_BODY[api] = {}
  for fault, e in pairs(faults) do
    ERROR_BODY[api][fault] = { e[1], error_body(api, e[2], e[3], e[4]) }
  end
end

-- The error event a stream carries for fault=error200.
local STREAM_ERROR = {
  openai = "data: " .. ERROR_BODY.openai.error200[2] .. "\n\n",
  anthropic = "event: error\ndata: " .. ERROR_BODY.anthropic.error200[2] .. "\n\n",
  cohere = cohere.STREAM_ERROR,
}

local MODELS = {
  openai = '{"object":"list","data":['
    .. '{"id":"gpt-4o-mini","object":"model","created":1721172741,"owned_by":"system"},'
    .. '{"id":"gpt-4o","object":"model","created":1715367049,"owned_by":"system"}]}',
  anthropic = '{"data":['
    .. '{"type":"model","id":"claude-3-haiku-20240307","display_name":"Claude Haiku 3",'
    .. '"created_at":"2024-03-07T00:00:00Z"},'
    .. '{"type":"model","id":"claude-3-5-sonnet-20241022","display_name":"Claude Sonnet 3.5 (New)",'
    .. '"created_at":"2024-10-22T00:00:00Z"}],'
    .. '"has_more":false,"first_id":"claude-3-haiku-20240307","last_id":"claude-3-5-sonnet-20241022"}',
}

local A_PING = 'event: ping\ndata: {"type":"ping"}\n\n'
local A_MESSAGE_STOP = 'event: message_stop\ndata: {"type":"message_stop"}\n\n'
local A_DELTA = 'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
  .. '"delta":{"type":"text_delta","text":'
local O_DONE = "data: [DONE]\n\n"

-- The invalid data line of a stream with fault=malformed.
local MALFORMED = {
  openai = 'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"trunc\n\n',
  anthropic = A_DELTA .. '"trunc\n\n',
  cohere = cohere.MALFORMED,
}

------------------------------------------------------------------------------
-- Text

local function words(s)
  local _, n = s:gsub("%S+", "")
  return n
end

-- The text of a message content: a string or an array of parts.
local function content_text(c)
  if type(c) == "string" then
    return c
  end
  if type(c) ~= "table" then
    return ""
  end
  local out = {}
  for _, part in ipairs(c) do
    if type(part) == "table" and type(part.text) == "string" then
      out[#out + 1] = part.text
    elseif type(part) == "string" then
      out[#out + 1] = part
    end
  end
  return concat(out, " ")
end

-- Returns the last user message's text and the word count of every input
-- (for fault=huge, which reads no further).
local function read_messages(body)
  local question, count = "", 0
  if body.system ~= nil then
    count = count + words(content_text(body.system))
  end
  local messages = body.messages
  if type(messages) ~= "table" then
    return question, count
  end
  for _, m in ipairs(messages) do
    if type(m) == "table" then
      local t = content_text(m.content)
      count = count + words(t)
      if m.role == "user" then
        question = t
      end
    end
  end
  return question, count
end

-- At most n bytes of s, not splitting a UTF-8 sequence.
local function utf8_head(s, n)
  if #s <= n then
    return s
  end
  while n > 0 do
    local b = byte(s, n + 1)
    if b < 0x80 or b >= 0xC0 then
      break
    end
    n = n - 1
  end
  return s:sub(1, n)
end

local function one_line(s)
  return (s:gsub("%s+", " "):match("^ ?(.-) ?$"))
end

-- The question on one line, cut at a word after MAX_ECHO bytes.
local function echo(question)
  local q
  if #question > 32 * MAX_ECHO then
    -- the head decides, unless it is mostly space (prompts can be megabytes)
    q = one_line(question:sub(1, 32 * MAX_ECHO))
    if #q <= MAX_ECHO + 1 then
      q = nil
    end
  end
  q = q or one_line(question)
  if #q > MAX_ECHO then
    local head = utf8_head(q, MAX_ECHO)
    q = (head:match("^(.+) %S*$") or head) .. "..."
  end
  return q
end

local function default_answer(api, question)
  return fmt("Hello from the mock %s provider. You asked: %s", api, echo(question))
end

local function plural(n, word)
  return fmt("%d %s%s", n, word, n == 1 and "" or "s")
end

-- Splits text into n pieces of about equal size (fewer when it is shorter
-- than n bytes), never inside a UTF-8 sequence.
local function split(text, n)
  local len = #text
  local pieces = {}
  local i = 1
  for k = 1, n do
    local j = k * len // n + 1 -- the next piece starts here
    while j <= len do
      local b = byte(text, j)
      if b < 0x80 or b >= 0xC0 then
        break
      end
      j = j + 1
    end
    if j > i then
      pieces[#pieces + 1] = text:sub(i, j - 1)
      i = j
    end
  end
  return pieces
end

-- The tokens of logprobs: each run of spaces with the word after it (a last
-- run of spaces alone); together they are the text.
local function tokens_of(text)
  local out = {}
  local pos, len = 1, #text
  while pos <= len do
    local _, e = text:find("^%s*%S+", pos)
    e = e or len
    out[#out + 1] = text:sub(pos, e)
    pos = e + 1
  end
  return out
end

-- Where text first contains one of stops: the text before it and the stop;
-- else the text.
local function cut_at_stop(text, stops)
  local at, which
  for _, s in ipairs(stops) do
    if type(s) == "string" and s ~= "" then
      local i = text:find(s, 1, true)
      if i and (not at or i < at) then
        at, which = i, s
      end
    end
  end
  if at then
    return text:sub(1, at - 1), which
  end
  return text, nil
end

------------------------------------------------------------------------------
-- Signatures: a keyed hash, so a thinking block the mock signed can be
-- checked when a later request sends it back, by this or another mock.

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local B64_VALUE = {}
for i = 1, 64 do
  B64_VALUE[byte(B64, i)] = i - 1
end

local function b64char(n)
  return B64:sub(n + 1, n + 1)
end

local function base64(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = byte(s, i, i + 2)
    local n = a << 16 | (b or 0) << 8 | (c or 0)
    out[#out + 1] = b64char(n >> 18 & 63) .. b64char(n >> 12 & 63)
      .. (b and b64char(n >> 6 & 63) or "=") .. (c and b64char(n & 63) or "=")
  end
  return concat(out)
end

-- The bytes the first `chars` characters of base64 text stand for (for
-- sniffing a media type); nil when they are not base64.
local function unbase64_head(s, chars)
  local out = {}
  local acc, bits = 0, 0
  for i = 1, chars < #s and chars or #s do
    local c = byte(s, i)
    if c == 61 then -- '='
      break
    end
    local v = B64_VALUE[c]
    if not v then
      return nil
    end
    acc = (acc << 6 | v) & 0xffffff
    bits = bits + 6
    if bits >= 8 then
      bits = bits - 8
      out[#out + 1] = char(acc >> bits & 255)
    end
  end
  return concat(out)
end

local function is_base64(s)
  return #s % 4 == 0 and s:find("^[%w+/]*=?=?$") ~= nil
end

local function mix64(h)
  h = (h ~ (h >> 33)) * 0xff51afd7ed558ccd
  h = (h ~ (h >> 33)) * 0xc4ceb9fe1a85ec53
  return h ~ (h >> 33)
end

local FNV_PRIME = 0x100000001b3

-- A 64-bit hash of s, chained from h: 32 bytes a step (prompts can be
-- megabytes), mixed at the end.
local function hash64(s, h)
  local n = #s
  local i = 1
  while i + 31 <= n do
    local a, b, c, d = sunpack("<i8i8i8i8", s, i)
    h = (((h ~ a) * FNV_PRIME ~ b) * FNV_PRIME ~ c) * FNV_PRIME
    h = (h ~ d) * FNV_PRIME
    h = h ~ (h >> 29)
    i = i + 32
  end
  while i <= n do
    h = (h ~ byte(s, i)) * FNV_PRIME
    i = i + 1
  end
  return mix64(h ~ n * 0x9e3779b97f4a7c15)
end

local SIGN_KEY = "aiorch mock signing key\0"

-- The signature of a text: base64 of 32 bytes (44 characters).
local function sign(text)
  local lanes = {}
  for lane = 1, 4 do
    lanes[lane] = spack("<i8", hash64(SIGN_KEY .. text, lane * 0x9e3779b97f4a7c15))
  end
  return base64(concat(lanes))
end

-- Redacted thinking: opaque base64 that carries its own signature.
local function redacted_data(label)
  label = "redacted thinking: " .. label
  local b = base64(label .. rep(" ", -#label % 3)) -- no padding inside
  return b .. sign(b)
end

local function redacted_ok(data)
  return #data > 44 and sign(data:sub(1, -45)) == data:sub(-44)
end

------------------------------------------------------------------------------
-- JSON Schema: an instance the schema accepts, for tool arguments and
-- structured output. Covers types (and type lists), properties (all of
-- them; required ones always), additionalProperties, items / prefixItems,
-- min/max items and lengths, numeric bounds and multipleOf, enum, const,
-- anyOf / oneOf (the first branch that is not null), allOf (objects
-- merged), $ref into the schema and a few string formats. Not patterns.

local SCHEMA_DEPTH = 32   -- deeper than this: refused
local SCHEMA_SHALLOW = 6  -- past this depth optional parts are left out, so recursive schemas end

local FORMATS = {
  ["date-time"] = "2024-01-01T00:00:00Z", date = "2024-01-01", time = "12:00:00Z",
  email = "mock@example.com", uri = "https://example.com/", ["uri-reference"] = "/mock",
  hostname = "example.com", ipv4 = "192.0.2.1", ipv6 = "2001:db8::1",
  uuid = "00000000-0000-4000-8000-000000000000", duration = "PT1H",
}

local function resolve_ref(root, ref)
  if ref == "#" then
    return root
  end
  local path = ref:match("^#/(.*)$")
  if not path then
    return nil
  end
  local node = root
  for seg in path:gmatch("[^/]+") do
    seg = seg:gsub("~1", "/"):gsub("~0", "~")
    if type(node) ~= "table" then
      return nil
    end
    node = node[seg]
  end
  return type(node) == "table" and node or nil
end

-- The first type of a type or a list of types that is not "null".
local function main_type(t)
  if type(t) == "table" then
    for _, v in ipairs(t) do
      if v ~= "null" then
        return v
      end
    end
    return t[1]
  end
  return t
end

local instance

local function string_instance(s, name)
  local v = FORMATS[s.format] or name or "value"
  local min, max = tointeger(tonumber(s.minLength)), tointeger(tonumber(s.maxLength))
  if min and #v < min then
    v = v .. rep("x", min - #v)
  end
  if max and #v > max then
    v = v:sub(1, max)
  end
  return v
end

local function number_instance(s, integer)
  local v = integer and 42 or 42.5
  local step = integer and 1 or 0.5
  local lo, hi = tonumber(s.minimum), tonumber(s.maximum)
  local xlo, xhi = tonumber(s.exclusiveMinimum), tonumber(s.exclusiveMaximum)
  if xlo and (not lo or xlo >= lo) then
    lo = xlo + step
  end
  if xhi and (not hi or xhi <= hi) then
    hi = xhi - step
  end
  if lo and v < lo then
    v = lo
  end
  if hi and v > hi then
    v = hi
  end
  local m = tonumber(s.multipleOf)
  if m and m > 0 then
    v = ceil(v / m) * m
    if hi and v > hi then
      v = v - m
    end
  end
  if integer then
    v = ceil(v)
    if hi and v > hi then
      v = floor(hi)
    end
    return tointeger(v) or v
  end
  return v
end

local function object_instance(s, ctx, depth)
  local obj = json.object()
  local required = {}
  if type(s.required) == "table" then
    for _, k in ipairs(s.required) do
      required[k] = true
    end
  end
  if type(s.properties) == "table" then
    for k, sub in pairs(s.properties) do
      if required[k] or depth <= SCHEMA_SHALLOW then
        local v, err = instance(sub, ctx, k, depth + 1)
        if v == nil then
          return nil, err
        end
        obj[k] = v
      end
    end
  end
  local extra = s.additionalProperties
  if extra ~= false then
    for k in pairs(required) do
      if obj[k] == nil then
        local v, err = instance(type(extra) == "table" and extra or nil, ctx, k, depth + 1)
        if v == nil then
          return nil, err
        end
        obj[k] = v
      end
    end
  end
  return obj
end

local function array_instance(s, ctx, name, depth)
  local prefix = s.prefixItems
  local items = s.items
  if type(items) == "table" and items[1] ~= nil then -- the older tuple form
    prefix, items = items, nil
  end
  local n = tointeger(tonumber(s.minItems)) or (depth <= SCHEMA_SHALLOW and 1 or 0)
  if type(prefix) == "table" and #prefix > n then
    n = #prefix
  end
  local max = tointeger(tonumber(s.maxItems))
  if max and n > max then
    n = max
  end
  local arr = json.array()
  for i = 1, n do
    local sub = type(prefix) == "table" and prefix[i] or items
    local v, err = instance(type(sub) == "table" and sub or nil, ctx, name, depth + 1)
    if v == nil then
      return nil, err
    end
    arr[i] = v
  end
  return arr
end

-- allOf: one schema with the branches' properties and required names.
local function merge_all_of(s, ctx)
  local merged = { properties = {}, required = json.array() }
  for k, v in pairs(s) do
    if k ~= "allOf" and k ~= "properties" and k ~= "required" then
      merged[k] = v
    end
  end
  local function take(b)
    if type(b) == "table" and type(b["$ref"]) == "string" then
      b = resolve_ref(ctx.root, b["$ref"])
    end
    if type(b) ~= "table" then
      return
    end
    merged.type = merged.type or b.type
    if type(b.properties) == "table" then
      for k, v in pairs(b.properties) do
        merged.properties[k] = v
      end
    end
    if type(b.required) == "table" then
      for _, k in ipairs(b.required) do
        merged.required[#merged.required + 1] = k
      end
    end
  end
  take(s)
  for _, b in ipairs(s.allOf) do
    take(b)
  end
  return merged
end

-- An instance of schema s (nil or true: anything), or nil, message.
function instance(s, ctx, name, depth)
  if depth > SCHEMA_DEPTH then
    return nil, fmt("the schema nests deeper than %d levels", SCHEMA_DEPTH)
  end
  if type(s) ~= "table" then
    return name or "value"
  end
  local ref = s["$ref"]
  if type(ref) == "string" then
    local target = resolve_ref(ctx.root, ref)
    if not target then
      return nil, fmt("cannot resolve $ref '%s'", ref)
    end
    return instance(target, ctx, name, depth + 1)
  end
  if s.const ~= nil then
    return s.const
  end
  if type(s.enum) == "table" and s.enum[1] ~= nil then
    return s.enum[1]
  end
  local any = s.anyOf or s.oneOf
  if type(any) == "table" and any[1] ~= nil then
    -- the first branch that is not null; past SCHEMA_SHALLOW, a null one
    local deep = depth > SCHEMA_SHALLOW
    local pick = any[1]
    for _, b in ipairs(any) do
      if (type(b) == "table" and b.type == "null") == deep then
        pick = b
        break
      end
    end
    return instance(pick, ctx, name, depth + 1)
  end
  if type(s.allOf) == "table" and s.allOf[1] ~= nil then
    return instance(merge_all_of(s, ctx), ctx, name, depth + 1)
  end
  local t = main_type(s.type)
  if t == nil then
    if s.properties ~= nil or s.additionalProperties ~= nil or s.required ~= nil then
      t = "object"
    elseif s.items ~= nil or s.prefixItems ~= nil then
      t = "array"
    else
      t = "string"
    end
  end
  if t == "object" then
    return object_instance(s, ctx, depth)
  elseif t == "array" then
    return array_instance(s, ctx, name, depth)
  elseif t == "string" then
    return string_instance(s, name)
  elseif t == "integer" or t == "number" then
    return number_instance(s, t == "integer")
  elseif t == "boolean" then
    return true
  elseif t == "null" then
    return null
  end
  return nil, fmt("unknown type '%s'", tostring(t))
end

-- An instance of a JSON Schema (a decoded table), or nil, message.
local function schema_instance(schema)
  return instance(schema, { root = schema }, nil, 0)
end
_M.schema_instance = schema_instance

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do
    keys[#keys + 1] = tostring(k)
  end
  sort(keys)
  return keys
end

local function context_join(path, part)
  return path == "" and part or path .. ", " .. part
end

-- OpenAI's strict mode: every object closes (additionalProperties false) and
-- requires all its properties. Returns what breaks that, or nil.
local function strict_problem(s, path, depth)
  if type(s) ~= "table" or depth > SCHEMA_DEPTH then
    return nil
  end
  local t = s.type
  local is_object = t == "object"
  if type(t) == "table" then
    for _, v in ipairs(t) do
      is_object = is_object or v == "object"
    end
  end
  if is_object or type(s.properties) == "table" then
    if s.additionalProperties ~= false then
      return fmt("In context=(%s), 'additionalProperties' is required to be supplied and to be false.", path)
    end
    local props = type(s.properties) == "table" and s.properties or {}
    local required = {}
    if type(s.required) == "table" then
      for _, k in ipairs(s.required) do
        required[k] = true
      end
    end
    for _, k in ipairs(sorted_keys(props)) do
      if not required[k] then
        return fmt("In context=(%s), 'required' is required to be supplied and to be an array including every "
          .. "key in properties. Missing '%s'.", path, k)
      end
    end
    for _, k in ipairs(sorted_keys(props)) do
      local p = strict_problem(props[k], context_join(path, fmt("'properties', '%s'", k)), depth + 1)
      if p then
        return p
      end
    end
  end
  if type(s.items) == "table" then
    local p = strict_problem(s.items, context_join(path, "'items'"), depth + 1)
    if p then
      return p
    end
  end
  for _, key in ipairs { "anyOf", "$defs", "definitions" } do
    local list = s[key]
    if type(list) == "table" then
      for _, k in ipairs(sorted_keys(list)) do
        local sub = list[k] or list[tointeger(tonumber(k))]
        local p = strict_problem(sub, context_join(path, fmt("'%s', '%s'", key, k)), depth + 1)
        if p then
          return p
        end
      end
    end
  end
  return nil
end

------------------------------------------------------------------------------
-- Reading a request: what it asks, or the 400 the real API would answer.
--
-- A conversation (conv): question (the last user message with text),
-- input_tokens, images, documents, results (the tool results of the last
-- turn: {id, text, is_error}), tools (callable: {name, schema}), choice
-- ({mode = none|auto|required|named, name, allowed}), parallel, units (the
-- prompt in order, for caching: {obj, tokens, cc}), breakpoints, stops, n,
-- logprobs, top_logprobs, json_object, json_schema, reasoning_tokens,
-- thinking, thinking_display, prefill, max_tokens.

local IMAGE_MEDIA = { ["image/jpeg"] = true, ["image/png"] = true, ["image/gif"] = true, ["image/webp"] = true }

local function bad(message, param, code)
  return nil, { message = message, param = param, code = code }
end

local function present(v)
  return v ~= nil and v ~= null
end

local function json_type(v)
  if v == null or v == nil then
    return "null"
  elseif type(v) == "table" then
    return (v[1] ~= nil or json.is_array(v)) and "array" or "object"
  end
  return type(v)
end

local function has(list, v)
  for _, x in ipairs(list) do
    if x == v then
      return true
    end
  end
  return false
end

-- 'a', 'b', and 'c'
local function value_list(list)
  local q = {}
  for i, v in ipairs(list) do
    q[i] = "'" .. v .. "'"
  end
  if #q <= 1 then
    return q[1] or ""
  end
  return concat(q, ", ", 1, #q - 1) .. (#q > 2 and "," or "") .. " and " .. q[#q]
end

local function new_conv()
  return { question = "", input_tokens = 0, images = 0, documents = 0, tools = {}, units = {}, stops = {},
    choice = { mode = "none" }, parallel = true, n = 1 }
end

local function add_unit(conv, obj, tokens, cc)
  local u = { obj = obj, tokens = tokens, cc = type(cc) == "table" and cc or nil }
  conv.units[#conv.units + 1] = u
  conv.input_tokens = conv.input_tokens + tokens
  if u.cc then
    conv.breakpoints = true
  end
end

-- The tokens of a tool definition.
local function tool_tokens(name, description, schema)
  local n = words(name) + words(type(description) == "string" and description or "")
  local s = type(schema) == "table" and json.encode_safe(schema)
  if s then
    n = n + words((s:gsub('[{}%[%]":,]', " ")))
  end
  return n
end

-- The media type the first bytes of base64 data show, for the formats the
-- APIs take; nil when unknown.
local function sniff(data)
  local head = unbase64_head(data, 16)
  if not head then
    return nil
  elseif head:sub(1, 4) == "\137PNG" then
    return "image/png"
  elseif head:sub(1, 3) == "\255\216\255" then
    return "image/jpeg"
  elseif head:sub(1, 4) == "GIF8" then
    return "image/gif"
  elseif head:sub(1, 4) == "RIFF" and head:sub(9, 12) == "WEBP" then
    return "image/webp"
  elseif head:sub(1, 5) == "%PDF-" then
    return "application/pdf"
  end
  return nil
end

------------------------------------------------------------------------------
-- OpenAI Chat Completions

local OPENAI_PARTS = {
  system = { "text" }, developer = { "text" }, tool = { "text" }, ["function"] = { "text" },
  assistant = { "text", "refusal" }, user = { "text", "image_url", "input_audio", "file" },
}
local OPENAI_ROLE_LIST = "'system', 'assistant', 'user', 'function', 'tool', and 'developer'"
local DATA_URL_EXAMPLE = "Expected a base64-encoded data URL with an image MIME type "
  .. "(e.g. 'data:image/png;base64,aW1nIGJ5dGVzIGhlcmU='), but got "

local function image_url_problem(url, param)
  if type(url) ~= "string" then
    return fmt("Missing required parameter: '%s'.", param)
  end
  if url:find("^https?://[^%s]+$") then
    return nil
  end
  local media, data = url:match("^data:([^;,]+);base64,(.*)$")
  if not media then
    return fmt("Invalid '%s'. Expected a valid URL, but got a value with an invalid format.", param)
  elseif not IMAGE_MEDIA[media] then
    return fmt("Invalid '%s'. %sunsupported MIME type '%s'.", param, DATA_URL_EXAMPLE, media)
  elseif data == "" or not is_base64(data) then
    return fmt("Invalid '%s'. %sa value with invalid base64 data.", param, DATA_URL_EXAMPLE)
  end
  return nil
end

local function read_openai_tools(body, conv)
  local tools = body.tools
  local names = {}
  if not present(tools) then
    return names
  end
  if type(tools) ~= "table" then
    return bad(fmt("Invalid type for 'tools': expected an array of objects, but got %s instead.", json_type(tools)),
      "tools", "invalid_type")
  end
  local tokens = 0
  for i, t in ipairs(tools) do
    local p = fmt("tools[%d]", i - 1)
    if type(t) ~= "table" then
      return bad(fmt("Invalid type for '%s': expected an object, but got %s instead.", p, json_type(t)), p,
        "invalid_type")
    end
    if t.type == "function" then
      local f = t["function"]
      if type(f) ~= "table" or type(f.name) ~= "string" then
        return bad(fmt("Missing required parameter: '%s.function.name'.", p), p .. ".function.name",
          "missing_required_parameter")
      end
      if #f.name > 64 or not f.name:find("^[%w_%-]+$") then
        return bad(fmt("Invalid '%s.function.name': string does not match pattern. Expected a string that "
          .. "matches the pattern '^[a-zA-Z0-9_-]+$'.", p), p .. ".function.name", "invalid_value")
      end
      if f.strict == true then
        local problem = strict_problem(f.parameters, "", 0)
        if problem then
          return bad(fmt("Invalid schema for function '%s': %s", f.name, problem), p .. ".function.parameters",
            "invalid_function_parameters")
        end
      end
      conv.tools[#conv.tools + 1] = { name = f.name, schema = f.parameters }
      names[f.name] = true
      tokens = tokens + tool_tokens(f.name, f.description, f.parameters)
    elseif t.type == "custom" then
      local c = t.custom
      if type(c) ~= "table" or type(c.name) ~= "string" then
        return bad(fmt("Missing required parameter: '%s.custom.name'.", p), p .. ".custom.name",
          "missing_required_parameter")
      end
      names[c.name] = true -- a tool the mock does not call
      tokens = tokens + tool_tokens(c.name, c.description, nil)
    else
      return bad(fmt("Invalid value: '%s'. Supported values are: 'function' and 'custom'.", tostring(t.type)),
        p .. ".type", "invalid_value")
    end
  end
  if tools[1] ~= nil then
    add_unit(conv, tools, tokens)
  end
  return names
end

local function read_openai_choice(body, conv, names)
  local any = next(names) ~= nil
  local tc = body.tool_choice
  local choice = { mode = any and "auto" or "none" }
  if present(tc) then
    if not any then
      return bad("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
        "tool_choice")
    end
    if tc == "none" or tc == "auto" or tc == "required" then
      choice.mode = tc
    elseif type(tc) == "table" and (tc.type == "function" or tc.type == "custom") then
      local f = tc[tc.type]
      local name = type(f) == "table" and f.name
      if type(name) ~= "string" then
        return bad(fmt("Missing required parameter: 'tool_choice.%s.name'.", tc.type),
          "tool_choice." .. tc.type .. ".name", "missing_required_parameter")
      end
      if not names[name] then
        return bad(fmt("Invalid value for 'tool_choice': no tool named '%s' in 'tools'.", name), "tool_choice",
          "invalid_value")
      end
      choice.mode, choice.name = "named", name
    elseif type(tc) == "table" and tc.type == "allowed_tools" then
      local at = tc.allowed_tools
      if type(at) ~= "table" or (at.mode ~= "auto" and at.mode ~= "required") or type(at.tools) ~= "table" then
        return bad("Invalid value for 'tool_choice.allowed_tools': expected a mode ('auto' or 'required') and "
          .. "a list of tools.", "tool_choice.allowed_tools", "invalid_value")
      end
      choice.mode, choice.allowed = at.mode, {}
      for _, t in ipairs(at.tools) do
        local f = type(t) == "table" and (t["function"] or t.custom or t)
        if type(f) == "table" and type(f.name) == "string" then
          choice.allowed[f.name] = true
        end
      end
    else
      return bad("Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or a named tool.",
        "tool_choice", "invalid_value")
    end
  end
  if present(body.parallel_tool_calls) and not any then
    return bad("Invalid value for 'parallel_tool_calls': 'parallel_tool_calls' is only allowed when 'tools' are "
      .. "specified.", "parallel_tool_calls")
  end
  conv.choice = choice
  conv.parallel = body.parallel_tool_calls ~= false
  return true
end

-- One message's content: its tokens and text, or nil, error.
local function read_openai_content(conv, m, p)
  local c = m.content
  local allowed = OPENAI_PARTS[m.role]
  if not present(c) then
    if m.role ~= "assistant" and m.role ~= "function" then
      return bad(fmt("Invalid value for '%s.content': expected a string or an array of content parts, got null.", p),
        p .. ".content", "invalid_value")
    end
    return 0, ""
  elseif type(c) == "string" then
    return words(c), c
  elseif type(c) ~= "table" then
    return bad(fmt("Invalid type for '%s.content': expected one of a string or an array of objects, but got %s "
      .. "instead.", p, json_type(c)), p .. ".content", "invalid_type")
  end
  local tokens = 0
  for j, part in ipairs(c) do
    local pp = fmt("%s.content[%d]", p, j - 1)
    if type(part) ~= "table" then
      return bad(fmt("Invalid type for '%s': expected an object, but got %s instead.", pp, json_type(part)), pp,
        "invalid_type")
    end
    local t = part.type
    if not has(allowed, t) then
      return bad(fmt("Invalid value: '%s'. Supported values are: %s.", tostring(t), value_list(allowed)),
        pp .. ".type", "invalid_value")
    end
    if t == "text" and type(part.text) ~= "string" then
      return bad(fmt("Missing required parameter: '%s.text'.", pp), pp .. ".text", "missing_required_parameter")
    elseif t == "image_url" then
      local iu = part.image_url
      local param = pp .. ".image_url.url"
      local problem = image_url_problem(type(iu) == "table" and iu.url or nil, param)
      if problem then
        return bad(problem, param, "invalid_value")
      end
      conv.images = conv.images + 1
      tokens = tokens + IMAGE_TOKENS
    elseif t == "file" then
      local f = part.file
      if type(f) ~= "table" or (type(f.file_data) ~= "string" and type(f.file_id) ~= "string") then
        return bad(fmt("Missing required parameter: '%s.file.file_data' or '%s.file.file_id'.", pp, pp),
          pp .. ".file", "missing_required_parameter")
      end
      conv.documents = conv.documents + 1
      tokens = tokens + DOCUMENT_TOKENS
    end
  end
  local text = content_text(c)
  return tokens + words(text), text
end

local function read_openai_format(body, conv, all_text)
  local rf = body.response_format
  if not present(rf) then
    return true
  end
  if type(rf) ~= "table" then
    return bad(fmt("Invalid type for 'response_format': expected an object, but got %s instead.", json_type(rf)),
      "response_format", "invalid_type")
  end
  if rf.type == "json_object" then
    if not lower(all_text):find("json", 1, true) then
      return bad("'messages' must contain the word 'json' in some form, to use 'response_format' of type "
        .. "'json_object'.", "messages")
    end
    conv.json_object = true
  elseif rf.type == "json_schema" then
    local js = rf.json_schema
    if type(js) ~= "table" then
      return bad("Missing required parameter: 'response_format.json_schema'.", "response_format.json_schema",
        "missing_required_parameter")
    end
    if type(js.name) ~= "string" then
      return bad("Missing required parameter: 'response_format.json_schema.name'.",
        "response_format.json_schema.name", "missing_required_parameter")
    end
    if js.strict == true then
      local problem = strict_problem(js.schema, "", 0)
      if problem then
        return bad(fmt("Invalid schema for response_format '%s': %s", js.name, problem), "response_format",
          "invalid_json_schema")
      end
    end
    conv.json_schema = type(js.schema) == "table" and js.schema or { type = "object" }
  elseif rf.type ~= "text" then
    return bad(fmt("Invalid value: '%s'. Supported values are: 'json_object', 'json_schema', and 'text'.",
      tostring(rf.type)), "response_format.type", "invalid_value")
  end
  return true
end

local function read_openai_sampling(body, conv)
  local n = body.n
  if present(n) then
    local k = tointeger(tonumber(n))
    if not k then
      return bad(fmt("Invalid type for 'n': expected an integer, but got %s instead.", json_type(n)), "n",
        "invalid_type")
    elseif k < 1 then
      return bad(fmt("Invalid 'n': integer below minimum value. Expected a value >= 1, but got %d instead.", k),
        "n", "integer_below_min_value")
    elseif k > 128 then
      return bad(fmt("Invalid 'n': integer above maximum value. Expected a value <= 128, but got %d instead.", k),
        "n", "integer_above_max_value")
    end
    conv.n = k
  end
  conv.logprobs = body.logprobs == true
  local top = body.top_logprobs
  if present(top) then
    local k = tointeger(tonumber(top))
    if not k or k < 0 or k > 20 then
      return bad(fmt("Invalid 'top_logprobs': expected an integer from 0 to 20, but got %s instead.",
        tostring(top)), "top_logprobs", "invalid_value")
    end
    if not conv.logprobs then
      return bad("Invalid value for 'top_logprobs': 'logprobs' must be set to true to use 'top_logprobs'.",
        "top_logprobs")
    end
    conv.top_logprobs = k
  end
  local effort = body.reasoning_effort
  if present(effort) then
    if REASONING_TOKENS[effort] == nil then
      return bad(fmt("Invalid value: '%s'. Supported values are: 'none', 'minimal', 'low', 'medium', 'high', "
        .. "'xhigh', and 'max'.", tostring(effort)), "reasoning_effort", "invalid_value")
    end
    conv.reasoning_tokens = REASONING_TOKENS[effort]
  end
  local stop = body.stop
  if type(stop) == "string" then
    conv.stops = { stop }
  elseif type(stop) == "table" then
    if #stop > 4 then
      return bad(fmt("Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array "
        .. "with length %d instead.", #stop), "stop", "array_above_max_length")
    end
    conv.stops = stop
  elseif present(stop) then
    return bad(fmt("Invalid type for 'stop': expected a string or an array of strings, but got %s instead.",
      json_type(stop)), "stop", "invalid_type")
  end
  return true
end

-- The tool_call ids of an assistant message left without a tool message.
local function unanswered(open, order)
  local missing = {}
  for _, id in ipairs(order) do
    if not open[id] then
      missing[#missing + 1] = id
    end
  end
  if missing[1] then
    return "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
      .. "'tool_call_id'. The following tool_call_ids did not have response messages: " .. concat(missing, ", ")
  end
  return nil
end

-- conv, or nil, {message, param, code}.
local function read_openai(body)
  local conv = new_conv()
  local names, e = read_openai_tools(body, conv)
  if not names then
    return nil, e
  end
  local ok
  ok, e = read_openai_choice(body, conv, names)
  if not ok then
    return nil, e
  end
  local messages = body.messages
  if not present(messages) then
    return bad("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
  elseif type(messages) ~= "table" or (messages[1] == nil and next(messages) ~= nil) then
    return bad(fmt("Invalid type for 'messages': expected an array, but got %s instead.", json_type(messages)),
      "messages", "invalid_type")
  elseif messages[1] == nil then
    return bad("Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array "
      .. "instead.", "messages", "empty_array")
  end
  -- open: the tool_call ids of the assistant message before (true once
  -- answered), while the messages after it are tool messages
  local open, order, open_at
  local all_text = {}
  for i, m in ipairs(messages) do
    local p = fmt("messages[%d]", i - 1)
    if type(m) ~= "table" then
      return bad(fmt("Invalid type for '%s': expected an object, but got %s instead.", p, json_type(m)), p,
        "invalid_type")
    end
    local role = m.role
    if not OPENAI_PARTS[role] then
      if not present(role) then
        return bad(fmt("Missing required parameter: '%s.role'.", p), p .. ".role", "missing_required_parameter")
      end
      return bad(fmt("Invalid value: '%s'. Supported values are: %s.", tostring(role), OPENAI_ROLE_LIST),
        p .. ".role", "invalid_value")
    end
    if role == "tool" then
      local id = m.tool_call_id
      if type(id) ~= "string" then
        return bad(fmt("Missing required parameter: '%s.tool_call_id'.", p), p .. ".tool_call_id",
          "missing_required_parameter")
      end
      if not open then
        return bad("Invalid parameter: messages with role 'tool' must be a response to a preceeding message with "
          .. "'tool_calls'.", fmt("messages.[%d].role", i - 1))
      end
      if open[id] == nil then
        return bad(fmt("Invalid parameter: 'tool_call_id' of '%s' not found in 'tool_calls' of previous message.",
          id), fmt("messages.[%d].tool_call_id", i - 1))
      end
      open[id] = true
    elseif open then
      local missing = unanswered(open, order)
      if missing then
        return bad(missing, fmt("messages.[%d].role", open_at))
      end
      open = nil
    end
    local tokens, text = read_openai_content(conv, m, p)
    if not tokens then
      return nil, text
    end
    if role == "assistant" and present(m.tool_calls) then
      if type(m.tool_calls) ~= "table" then
        return bad(fmt("Invalid type for '%s.tool_calls': expected an array, but got %s instead.", p,
          json_type(m.tool_calls)), p .. ".tool_calls", "invalid_type")
      end
      for j, tc in ipairs(m.tool_calls) do
        local pp = fmt("%s.tool_calls[%d]", p, j - 1)
        local f = type(tc) == "table" and (tc["function"] or tc.custom)
        if type(tc) ~= "table" or type(tc.id) ~= "string" or type(f) ~= "table" or type(f.name) ~= "string" then
          return bad(fmt("Missing required parameter: '%s.id', '%s.function.name'.", pp, pp), pp,
            "missing_required_parameter")
        end
        if not open then
          open, order, open_at = {}, {}, i - 1
        end
        open[tc.id] = false
        order[#order + 1] = tc.id
        local args = f.arguments or f.input
        tokens = tokens + words(f.name) + words(type(args) == "string" and args or "")
      end
    end
    if role == "user" and text:find("%S") then
      conv.question = text
    end
    all_text[#all_text + 1] = text
    add_unit(conv, m, tokens)
  end
  if open then
    local missing = unanswered(open, order)
    if missing then
      return bad(missing, fmt("messages.[%d].role", open_at))
    end
  end
  -- the tool results that end the conversation, in order
  local last = #messages
  if messages[last].role == "tool" then
    local first = last
    while first > 1 and messages[first - 1].role == "tool" do
      first = first - 1
    end
    conv.results = {}
    for i = first, last do
      conv.results[#conv.results + 1] = { id = messages[i].tool_call_id,
        text = utf8_head(content_text(messages[i].content), MAX_RESULT_ECHO) }
    end
  end
  ok, e = read_openai_format(body, conv, concat(all_text, " "))
  if not ok then
    return nil, e
  end
  ok, e = read_openai_sampling(body, conv)
  if not ok then
    return nil, e
  end
  return conv
end

------------------------------------------------------------------------------
-- Anthropic Messages

local ANTHROPIC_BLOCKS = { "text", "image", "document", "search_result", "thinking", "redacted_thinking",
  "tool_use", "tool_result", "server_tool_use", "web_search_tool_result", "web_fetch_tool_result",
  "code_execution_tool_result", "bash_code_execution_tool_result", "text_editor_code_execution_tool_result",
  "tool_search_tool_result", "container_upload", "mcp_tool_use", "mcp_tool_result" }
local ANTHROPIC_BLOCK = {}
for _, t in ipairs(ANTHROPIC_BLOCKS) do
  ANTHROPIC_BLOCK[t] = true
end
local ANTHROPIC_TAGS = "'" .. concat(ANTHROPIC_BLOCKS, "', '") .. "'"
local RESULT_BLOCKS = { "text", "image", "document", "search_result", "tool_reference" }

local function tag_problem(p, tag, tags)
  return fmt("%s: Input tag '%s' found using 'type' does not match any of the expected tags: %s", p,
    tostring(tag), tags)
end

local function image_problem(src, p)
  if type(src) ~= "table" then
    return p .. ".source: Field required"
  end
  local t = src.type
  if t == "base64" then
    if not IMAGE_MEDIA[src.media_type] then
      return p .. ".source.base64.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'"
    elseif type(src.data) ~= "string" or src.data == "" then
      return p .. ".source.base64.data: Field required"
    elseif not is_base64(src.data) then
      return p .. ".source.base64.data: Input should be valid base64 data"
    end
    local seen = sniff(src.data)
    if seen and seen ~= src.media_type then
      return fmt("%s.source.base64: The image was specified using the %s media type, but the image appears to be "
        .. "a %s image", p, src.media_type, seen)
    end
  elseif t == "url" then
    if type(src.url) ~= "string" then
      return p .. ".source.url.url: Field required"
    end
  elseif t == "file" then
    if type(src.file_id) ~= "string" then
      return p .. ".source.file.file_id: Field required"
    end
  else
    return tag_problem(p .. ".source", t, "'base64', 'url', 'file'")
  end
  return nil
end

-- A document's source: nil and its tokens, or the problem.
local function document_problem(src, p)
  if type(src) ~= "table" then
    return p .. ".source: Field required"
  end
  local t = src.type
  if t == "base64" then
    if src.media_type ~= "application/pdf" then
      return p .. ".source.base64.media_type: Input should be 'application/pdf'"
    elseif type(src.data) ~= "string" or src.data == "" or not is_base64(src.data) then
      return p .. ".source.base64.data: Input should be valid base64 data"
    end
  elseif t == "text" then
    if type(src.data) ~= "string" then
      return p .. ".source.text.data: Field required"
    end
    return nil, words(src.data)
  elseif t == "url" then
    if type(src.url) ~= "string" then
      return p .. ".source.url.url: Field required"
    end
  elseif t == "content" then
    if type(src.content) ~= "string" and type(src.content) ~= "table" then
      return p .. ".source.content.content: Field required"
    end
    return nil, words(content_text(src.content))
  elseif t == "file" then
    if type(src.file_id) ~= "string" then
      return p .. ".source.file.file_id: Field required"
    end
  else
    return tag_problem(p .. ".source", t, "'base64', 'text', 'url', 'content', 'file'")
  end
  return nil, DOCUMENT_TOKENS
end

local function result_text(b)
  return utf8_head(content_text(b.content), MAX_RESULT_ECHO)
end

local read_block

local function read_tool_result(conv, b, bp, req)
  if type(b.tool_use_id) ~= "string" then
    return bad(bp .. ".tool_use_id: Field required")
  end
  local c = b.content
  local tokens = 0
  if type(c) == "table" then
    for k, sub in ipairs(c) do
      local sp = fmt("%s.content.%d", bp, k - 1)
      local t = type(sub) == "table" and sub.type
      if not has(RESULT_BLOCKS, t) then
        return bad(tag_problem(sp, t, "'" .. concat(RESULT_BLOCKS, "', '") .. "'"))
      end
      if t == "text" or t == "image" or t == "document" then
        local n, e = read_block(conv, sub, sp, req)
        if not n then
          return nil, e
        end
        tokens = tokens + n
      end
    end
    return tokens
  elseif type(c) == "string" then
    return words(c)
  elseif present(c) then
    return bad(bp .. ".content: Input should be a valid list")
  end
  return 0
end

-- One content block: its tokens (what it carries counted into conv), or
-- nil, error. A thinking block's signature is checked here.
function read_block(conv, b, bp, req)
  if type(b) ~= "table" then
    return bad(bp .. ": Input should be a valid dictionary")
  end
  local t = b.type
  if not ANTHROPIC_BLOCK[t] then
    return bad(tag_problem(bp, t, ANTHROPIC_TAGS))
  end
  if t == "text" then
    if type(b.text) ~= "string" then
      return bad(bp .. ".text: Field required")
    end
    return words(b.text)
  elseif t == "image" then
    local problem = image_problem(b.source, bp .. ".image")
    if problem then
      return bad(problem)
    end
    conv.images = conv.images + 1
    return IMAGE_TOKENS
  elseif t == "document" then
    local problem, tokens = document_problem(b.source, bp .. ".document")
    if problem then
      return bad(problem)
    end
    conv.documents = conv.documents + 1
    return tokens
  elseif t == "tool_use" then
    if type(b.id) ~= "string" then
      return bad(bp .. ".id: Field required")
    elseif type(b.name) ~= "string" then
      return bad(bp .. ".name: Field required")
    elseif type(b.input) ~= "table" then
      return bad(bp .. ".input: Input should be a valid dictionary")
    end
    return words(b.name) + words(json.encode_safe(b.input) or "")
  elseif t == "tool_result" then
    return read_tool_result(conv, b, bp, req)
  elseif t == "thinking" then
    if type(b.thinking) ~= "string" then
      return bad(bp .. ".thinking: Field required")
    elseif type(b.signature) ~= "string" then
      return bad(bp .. ".signature: Field required")
    elseif sign(b.thinking) ~= b.signature then
      req.thinking_verified = false
      return bad(bp .. ": Invalid `signature` in `thinking` block")
    end
    conv.verified = true
    return 0
  elseif t == "redacted_thinking" then
    if type(b.data) ~= "string" or not redacted_ok(b.data) then
      req.thinking_verified = false
      return bad(bp .. ": Invalid `data` in `redacted_thinking` block")
    end
    conv.verified = true
    return 0
  end
  return 0
end

local function read_number(body, name, lo, hi, integer)
  local v = body[name]
  if not present(v) then
    return true
  end
  local n = tonumber(v)
  if type(v) ~= "number" or (integer and not tointeger(n)) then
    return bad(fmt("%s: Input should be a valid %s", name, integer and "integer" or "number"))
  elseif lo and n < lo then
    return bad(fmt("%s: Input should be greater than or equal to %s", name, lo))
  elseif hi and n > hi then
    return bad(fmt("%s: Input should be less than or equal to %s", name, hi))
  end
  return true
end

local function read_anthropic_params(body, conv)
  if present(body.thread) then
    -- Message threads (the conversation kept by the server) are not kept
    -- here: refused as the API refuses what threads cannot take.
    local _, e = bad("mock: message threads are not supported; send the whole conversation without `thread`")
    e.details = '{"error_code":"thread_unsupported_request","unsupported":[]}'
    return nil, e
  end
  local mt = body.max_tokens
  if not present(mt) then
    return bad("max_tokens: Field required")
  end
  local max_tokens = tointeger(tonumber(mt))
  if type(mt) ~= "number" or not max_tokens then
    return bad("max_tokens: Input should be a valid integer")
  elseif max_tokens < 0 then
    return bad("max_tokens: Input should be greater than or equal to 0")
  end
  conv.max_tokens = max_tokens
  local ok, e = read_number(body, "temperature", 0, 1)
  if ok then
    ok, e = read_number(body, "top_p", 0, 1)
  end
  if ok then
    ok, e = read_number(body, "top_k", 0, nil, true)
  end
  if not ok then
    return nil, e
  end
  local md = body.metadata
  if present(md) then
    if type(md) ~= "table" then
      return bad("metadata: Input should be a valid dictionary")
    end
    for _, k in ipairs(sorted_keys(md)) do
      if k ~= "user_id" then
        return bad(fmt("metadata.%s: Extra inputs are not permitted", k))
      end
    end
  end
  local ss = body.stop_sequences
  if present(ss) then
    if type(ss) ~= "table" then
      return bad("stop_sequences: Input should be a valid list")
    end
    for i, s in ipairs(ss) do
      if type(s) ~= "string" then
        return bad(fmt("stop_sequences.%d: Input should be a valid string", i - 1))
      end
    end
    conv.stops = ss
  end
  local oc = body.output_config
  local format = body.output_format
  if present(oc) then
    if type(oc) ~= "table" then
      return bad("output_config: Input should be a valid dictionary")
    end
    if present(oc.format) then
      format = oc.format
    end
  end
  if present(format) then
    if type(format) ~= "table" or format.type ~= "json_schema" then
      return bad("output_config.format.type: Input should be 'json_schema'")
    elseif type(format.schema) ~= "table" then
      return bad("output_config.format.schema: Field required")
    end
    conv.json_schema = format.schema
  end
  return true
end

local function read_anthropic_tools(body, conv)
  local names = {}
  local tools = body.tools
  if present(tools) then
    if type(tools) ~= "table" then
      return bad("tools: Input should be a valid list")
    end
    for i, t in ipairs(tools) do
      local p = "tools." .. (i - 1)
      if type(t) ~= "table" then
        return bad(p .. ": Input should be a valid dictionary")
      elseif type(t.name) ~= "string" then
        return bad(p .. ".name: Field required")
      elseif names[t.name] then
        return bad("tools: Tool names must be unique.")
      end
      local name = t.name
      names[name] = true
      local tokens = 0
      if not present(t.type) or t.type == "custom" then
        if #name > 128 or not name:find("^[%w_%-]+$") then
          return bad(fmt("%s.custom.name: String should match pattern '^[a-zA-Z0-9_-]{1,128}$'", p))
        end
        local s = t.input_schema
        if type(s) ~= "table" then
          return bad(p .. ".custom.input_schema: Field required")
        elseif s.type ~= "object" then
          return bad(p .. ".custom.input_schema.type: Input should be 'object'")
        end
        conv.tools[#conv.tools + 1] = { name = name, schema = s }
        tokens = tool_tokens(name, t.description, s)
      end
      add_unit(conv, t, tokens, t.cache_control)
    end
  end
  local tc = body.tool_choice
  conv.choice = { mode = "auto" }
  if present(tc) then
    if type(tc) ~= "table" then
      return bad("tool_choice: Input should be a valid dictionary")
    end
    local t = tc.type
    if t == "auto" or t == "none" then
      conv.choice.mode = t
    elseif t == "any" then
      conv.choice.mode = "required"
    elseif t == "tool" then
      if type(tc.name) ~= "string" then
        return bad("tool_choice.tool.name: Field required")
      elseif not names[tc.name] then
        return bad(fmt("tool_choice.tool.name: no tool named '%s' in tools", tc.name))
      end
      conv.choice = { mode = "named", name = tc.name }
    else
      return bad(tag_problem("tool_choice", t, "'auto', 'any', 'tool', 'none'"))
    end
    conv.parallel = tc.disable_parallel_tool_use ~= true
  end
  return true
end

-- Thinking: whether the answer thinks, and what thinking forbids.
local function read_thinking(body, conv)
  local th = body.thinking
  local on = false
  if present(th) then
    if type(th) ~= "table" then
      return bad("thinking: Input should be a valid dictionary")
    end
    if th.type == "enabled" then
      local budget = tointeger(tonumber(th.budget_tokens))
      if not budget then
        return bad("thinking.enabled.budget_tokens: Field required")
      elseif budget < 1024 then
        return bad("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
      elseif conv.max_tokens <= budget then
        return bad("`max_tokens` must be greater than `thinking.budget_tokens`")
      end
      on = true
    elseif th.type == "adaptive" or th.type == "between_tools" then
      on = true
    elseif th.type ~= "disabled" then
      return bad(tag_problem("thinking", th.type, "'enabled', 'disabled', 'adaptive'"))
    end
    conv.thinking_display = th.display
  end
  if on then
    local temp = body.temperature
    if present(temp) and temp ~= 1 then
      return bad("`temperature` may only be set to 1 when thinking is enabled.")
    elseif present(body.top_k) then
      return bad("`top_k` may not be set when thinking is enabled.")
    elseif present(body.top_p) and tonumber(body.top_p) < 0.95 then
      return bad("`top_p` must be greater than or equal to 0.95 when thinking is enabled.")
    elseif conv.choice.mode == "required" or conv.choice.mode == "named" then
      return bad("Thinking may not be enabled when tool_choice forces tool use.")
    end
  end
  local oc = body.output_config
  if not on and type(oc) == "table" and present(oc.effort) and not (type(th) == "table" and th.type == "disabled") then
    on = true
  end
  conv.thinking = on
  return true
end

local function read_system(body, conv)
  local system = body.system
  if not present(system) then
    return true
  elseif type(system) == "string" then
    add_unit(conv, { type = "text", text = system }, words(system))
    return true
  elseif type(system) ~= "table" then
    return bad("system: Input should be a valid string or a valid list")
  end
  for i, b in ipairs(system) do
    local p = "system." .. (i - 1)
    if type(b) ~= "table" or b.type ~= "text" then
      return bad(p .. ".type: Input should be 'text'")
    elseif type(b.text) ~= "string" then
      return bad(p .. ".text: Field required")
    end
    add_unit(conv, b, words(b.text), b.cache_control)
  end
  return true
end

-- The messages as turns: consecutive messages of one role merged, as the
-- API does. Each turn: role, first (its first message's index), items
-- ({b, msg, idx} per block), tool_ids / tool_list (its tool_use ids), text.
local function read_turns(body, conv, req)
  local messages = body.messages
  if not present(messages) then
    return bad("messages: Field required")
  elseif type(messages) ~= "table" then
    return bad("messages: Input should be a valid list")
  elseif messages[1] == nil then
    return bad("messages: at least one message is required")
  end
  local turns = {}
  for i, m in ipairs(messages) do
    local p = "messages." .. (i - 1)
    if type(m) ~= "table" then
      return bad(p .. ": Input should be a valid dictionary")
    end
    local role = m.role
    if role == "system" then
      return bad(p .. '.role: Unexpected role "system". The Messages API accepts a top-level `system` parameter, '
        .. 'not "system" as an input message role.')
    elseif role ~= "user" and role ~= "assistant" then
      return bad(p .. ".role: Input should be 'user' or 'assistant'")
    end
    local turn = turns[#turns]
    if not turn or turn.role ~= role then
      turn = { role = role, first = i - 1, items = {}, tool_ids = {}, tool_list = {}, text = {} }
      turns[#turns + 1] = turn
    end
    local c = m.content
    if type(c) == "string" then
      local b = { type = "text", text = c } -- the same to the cache as the string
      add_unit(conv, b, words(c))
      turn.items[#turn.items + 1] = { b = b, msg = i - 1, idx = 0 }
      turn.text[#turn.text + 1] = c
    elseif type(c) == "table" then
      for j, b in ipairs(c) do
        local tokens, e = read_block(conv, b, fmt("%s.content.%d", p, j - 1), req)
        if not tokens then
          return nil, e
        end
        add_unit(conv, b, tokens, b.cache_control)
        turn.items[#turn.items + 1] = { b = b, msg = i - 1, idx = j - 1 }
        if b.type == "text" then
          turn.text[#turn.text + 1] = b.text
        elseif b.type == "tool_use" then
          turn.tool_ids[b.id] = true
          turn.tool_list[#turn.tool_list + 1] = b.id
        end
      end
    elseif present(c) then
      return bad(p .. ".content: Input should be a valid list")
    else
      return bad(p .. ".content: Field required")
    end
    local text = content_text(c)
    if role == "user" and text:find("%S") then
      conv.question = text
    end
  end
  return turns
end

-- Tool results against tool uses, turn by turn.
local function check_tool_pairs(turns)
  for t, turn in ipairs(turns) do
    if turn.role == "user" then
      local prev = turns[t - 1]
      for _, it in ipairs(turn.items) do
        local b = it.b
        if b.type == "tool_result" and not (prev and prev.tool_ids[b.tool_use_id]) then
          return bad(fmt("messages.%d.content.%d: unexpected `tool_use_id` found in `tool_result` blocks: %s. "
            .. "Each `tool_result` block must have a corresponding `tool_use` block in the previous message.",
            it.msg, it.idx, b.tool_use_id))
        end
      end
    elseif turn.tool_list[1] and turns[t + 1] then
      local answered = {}
      for _, it in ipairs(turns[t + 1].items) do
        if it.b.type == "tool_result" then
          answered[it.b.tool_use_id] = true
        end
      end
      local missing = {}
      for _, id in ipairs(turn.tool_list) do
        if not answered[id] then
          missing[#missing + 1] = id
        end
      end
      if missing[1] then
        return bad(fmt("messages.%d: `tool_use` ids were found without `tool_result` blocks immediately after: "
          .. "%s. Each `tool_use` block must have a corresponding `tool_result` block in the next message.",
          turns[t + 1].first, concat(missing, ", ")))
      end
    end
  end
  return true
end

-- conv, or nil, {message}. Sets req.thinking_verified when the request
-- sends thinking blocks back.
local function read_anthropic(body, req)
  local conv = new_conv()
  local ok, e = read_anthropic_params(body, conv)
  if ok then
    ok, e = read_anthropic_tools(body, conv)
  end
  if ok then
    ok, e = read_thinking(body, conv)
  end
  if ok then
    ok, e = read_system(body, conv)
  end
  if not ok then
    return nil, e
  end
  local turns
  turns, e = read_turns(body, conv, req)
  if not turns then
    return nil, e
  end
  ok, e = check_tool_pairs(turns)
  if not ok then
    return nil, e
  end
  local last = turns[#turns]
  if last.role == "assistant" and not last.tool_list[1] then
    local prefill = concat(last.text)
    if prefill:find("%s$") then
      return bad("messages: final assistant content cannot end with trailing whitespace")
    end
    conv.prefill = prefill ~= "" and prefill or nil
  elseif last.role == "user" then
    for _, it in ipairs(last.items) do
      if it.b.type == "tool_result" then
        conv.results = conv.results or {}
        conv.results[#conv.results + 1] = { id = it.b.tool_use_id, text = result_text(it.b),
          is_error = it.b.is_error == true }
      end
    end
    local prev = turns[#turns - 1]
    local first = prev and prev.items[1]
    if conv.thinking and conv.results and prev.tool_list[1] and first
        and first.b.type ~= "thinking" and first.b.type ~= "redacted_thinking" then
      return bad(fmt("messages.%d.content.%d.type: Expected `thinking` or `redacted_thinking`, but found `%s`. "
        .. "When `thinking` is enabled, a final `assistant` message must start with a thinking block.",
        first.msg, first.idx, tostring(first.b.type)))
    end
  end
  if conv.verified then
    req.thinking_verified = true
  end
  return conv
end

------------------------------------------------------------------------------
-- The answer

-- The answer's text, when it calls no tool.
local function answer_text(api, conv, d)
  if d.text then
    return d.text
  end
  local seen = {}
  if conv.images > 0 then
    seen[#seen + 1] = plural(conv.images, "image")
  end
  if conv.documents > 0 then
    seen[#seen + 1] = plural(conv.documents, "document")
  end
  local out
  if conv.question == "" and (conv.results or seen[1]) then
    out = fmt("Hello from the mock %s provider.", api)
  else
    out = default_answer(api, conv.question)
  end
  if conv.results then
    local r = {}
    for i, x in ipairs(conv.results) do
      r[i] = fmt("[%s%s] %s", x.id, x.is_error and " error" or "", x.text)
    end
    out = out .. " Tool results: " .. concat(r, "; ")
  end
  if seen[1] then
    out = out .. " I see " .. concat(seen, " and ") .. "."
  end
  return out
end

-- The text in a JSON output mode (else text), or nil, message.
local function json_text(conv, text, d)
  if conv.json_schema then
    if d.text then
      return d.text
    end
    local v, err = schema_instance(conv.json_schema)
    if v == nil then
      return nil, "mock: cannot make an instance of the output schema: " .. err
    end
    return json.encode(v)
  elseif conv.json_object then
    return d.text or json.encode { answer = text }
  end
  return text
end

local function thinking_text(conv)
  if conv.results then
    return fmt("I have %s to go through. Let me read them in order.", plural(#conv.results, "tool result"))
  end
  return fmt('The user asks: "%s" Let me think it through step by step.', echo(conv.question))
end

-- The tools an answer calls, one entry per call, or nil for a text answer.
local function tool_calls(conv, d)
  local choice = conv.choice
  if choice.mode == "none" then
    return nil
  end
  local pool = {}
  for _, t in ipairs(conv.tools) do
    if (choice.mode ~= "named" or t.name == choice.name) and (not choice.allowed or choice.allowed[t.name]) then
      pool[#pool + 1] = t
    end
  end
  if not pool[1] then
    return nil
  end
  local q = lower(conv.question)
  local named = {}
  for _, t in ipairs(pool) do
    if q:find(lower(t.name), 1, true) then
      named[#named + 1] = t
    end
  end
  local n
  if choice.mode == "auto" then
    if conv.results or not (d.tool_calls or named[1]) then
      return nil
    end
    n = d.tool_calls or #named
  else
    n = d.tool_calls or (named[1] and #named or 1)
  end
  if named[1] then
    pool = named
  end
  if not conv.parallel then
    n = 1
  end
  local out = {}
  for i = 1, n do
    out[i] = pool[(i - 1) % #pool + 1]
  end
  return out
end

-- The JSON text of each called tool's arguments, by name; or nil, message.
local function arguments_of(calls)
  local args = {}
  for _, t in ipairs(calls) do
    if not args[t.name] then
      local v, err = schema_instance(type(t.schema) == "table" and t.schema or { type = "object" })
      if v == nil then
        return nil, fmt("mock: cannot make arguments for tool '%s': %s", t.name, err)
      end
      if type(v) ~= "table" then
        v = json.object()
      end
      args[t.name] = json.encode(v)
    end
  end
  return args
end

------------------------------------------------------------------------------
-- Prompt caching

local function remember(self, key)
  if self.cache[key] then
    return
  end
  if self.cache_count >= CACHE_LIMIT then
    self.cache, self.cache_count = {}, 0
  end
  self.cache[key] = true
  self.cache_count = self.cache_count + 1
end

-- A unit of the prompt chained into the cache's hash h: a text block or a
-- message of plain text by its text, anything else by its JSON without
-- cache_control.
local function unit_hash(u, h)
  local obj = u.obj
  if obj.type == "text" and type(obj.text) == "string" and obj.citations == nil then
    return hash64(obj.text, hash64("text", h))
  elseif type(obj.role) == "string" and type(obj.content) == "string" and obj.tool_calls == nil
      and obj.name == nil and obj.tool_call_id == nil then
    return hash64(obj.content, hash64(obj.role, h))
  end
  if obj.cache_control ~= nil then
    local copy = {}
    for k, v in pairs(obj) do
      if k ~= "cache_control" then
        copy[k] = v
      end
    end
    obj = copy
  end
  return hash64(json.encode_safe(obj) or "", h)
end

-- Anthropic: the prefix up to each breakpoint is written unless a prefix
-- ending at any block up to the last breakpoint is already there (read).
-- Returns the tokens read, written for 5 minutes, written for 1 hour.
local function anthropic_cache(self, conv, model, top_cc)
  local units = conv.units
  local n = #units
  if type(top_cc) == "table" and n > 0 and not units[n].cc then
    units[n].cc = top_cc -- the top-level marker: the last block
  end
  local last = 0
  for i = n, 1, -1 do
    if units[i].cc then
      last = i
      break
    end
  end
  if last == 0 then
    return 0, 0, 0
  end
  local keys, sums = {}, {}
  local h, sum, hit = hash64(model, 0x5eed), 0, 0
  for i = 1, last do
    h = unit_hash(units[i], h)
    sum = sum + units[i].tokens
    keys[i], sums[i] = h, sum
    if self.cache[h] then
      hit = i
    end
  end
  local read = hit > 0 and sums[hit] or 0
  local w5, w1, from = 0, 0, read
  for i = hit + 1, last do
    local cc = units[i].cc
    if cc then
      if cc.ttl == "1h" then
        w1 = w1 + sums[i] - from
      else
        w5 = w5 + sums[i] - from
      end
      from = sums[i]
      remember(self, keys[i])
    end
  end
  return read, w5, w1
end

-- OpenAI: a long enough prompt caches every prefix ending at a message;
-- the longest one seen before is read, in steps.
local function openai_cached(self, conv, model)
  if conv.input_tokens < OPENAI_CACHE_MIN then
    return 0
  end
  local h, sum, hit = hash64(model, 0x0a1), 0, 0
  local keys = {}
  for i, u in ipairs(conv.units) do
    h = unit_hash(u, h)
    sum = sum + u.tokens
    keys[i] = h
    if self.cache[h] then
      hit = sum
    end
  end
  for _, k in ipairs(keys) do
    remember(self, k)
  end
  hit = hit // OPENAI_CACHE_STEP * OPENAI_CACHE_STEP
  return hit >= OPENAI_CACHE_MIN and hit or 0
end

------------------------------------------------------------------------------
-- Writing the response

local function respond_error(res, api, fault, d)
  local e = ERROR_BODY[api][fault]
  local headers = JSON_HEADERS
  if fault == "429" then
    headers = { ["content-type"] = "application/json", ["retry-after"] = fmt("%.14g", d.retry_after) }
  end
  res:respond(e[1], headers, e[2])
end

-- The forms in which fault=echo_key quotes a key, by name.
function _M.echoed_forms(key)
  local half = #key // 2
  return {
    whole = key,
    percent_encoded = (key:gsub(".", function(c) return fmt("%%%02x", byte(c)) end)),
    json_escaped = (key:gsub("[^%w]", function(c) return fmt("\\u%04x", byte(c)) end)),
    masked = key:sub(1, 3) .. "..." .. key:sub(-4),
    masked_openai = key:sub(1, 6) .. ("*"):rep(#key - 10) .. key:sub(-4),
    cut = key:sub(1, #key * 2 // 3),
    first_half = key:sub(1, half),
    second_half = key:sub(half + 1),
  }
end

-- fault=echo_key: a 401 quoting the request's key (see the top of this file).
local function respond_echo_key(res, api, headers, req)
  local key = headers["x-api-key"] or (headers["authorization"] or ""):match("^[Bb]earer (.*)$")
    or (api == "gemini" and gemini.key_of(req)) or ""
  local f = _M.echoed_forms(key)
  local message = fmt("Incorrect API key provided: %s. Encoded: %s. Escaped: {\"key\": \"%s\"}. "
    .. "Masked: %s and %s. Cut: %s. First half: %s", f.whole, f.percent_encoded, f.json_escaped, f.masked,
    f.masked_openai, f.cut, f.first_half)
  local body
  if api == "gemini" then
    body = gemini.error_body(401, message, f.second_half)
  elseif api == "anthropic" then
    body = error_body(api, f.second_half, nil, message)
  else
    body = error_body(api, "invalid_request_error", f.second_half, message)
  end
  res:respond(401, JSON_HEADERS, body)
end

local function respond_invalid(res, api, status, message, param, code, details)
  local body
  if api == "gemini" then
    body = gemini.error_body(status, message)
  elseif api == "anthropic" then
    body = error_body(api, status == 404 and "not_found_error" or "invalid_request_error", nil, message, nil, details)
  else
    body = error_body(api, "invalid_request_error", code, message, param)
  end
  res:respond(status, JSON_HEADERS, body)
end

-- A 400 for what the real API refuses; recorded on the request.
local function reject(req, res, api, e)
  req.rejected = e.message
  respond_invalid(res, api, 400, e.message, e.param, e.code, e.details)
end

-- Keeps the connection open, sending nothing, until the client goes away
-- (the server then cancels the handler) or the mock closes.
local function stall()
  while true do
    aiorch.sleep(HANG_SLICE_MS)
  end
end

-- headers with extra ones added (a new table), or headers itself.
local function with_headers(headers, extra)
  if not extra then
    return headers
  end
  local h = {}
  for k, v in pairs(headers) do
    h[k] = v
  end
  for k, v in pairs(extra) do
    h[k] = v
  end
  return h
end

-- A 200 JSON body, subject to the body faults. extra: more headers.
local function respond_json(res, api, body, d, extra)
  local fault = d.fault
  local headers = with_headers(JSON_HEADERS, extra)
  if d.stall_after and fault ~= "cut" and fault ~= "error200" then
    res:start(200, with_headers(headers, { ["content-length"] = tostring(#body) }))
    res:write(body:sub(1, #body // 2))
    stall()
  elseif fault == "malformed" then
    res:respond(200, headers, body:sub(1, #body // 2))
  elseif fault == "cut" then
    res:start(200, with_headers(headers, { ["content-length"] = tostring(#body) }))
    res:write(body:sub(1, #body // 2))
    res:abort()
  elseif fault == "error200" then
    res:respond(200, headers, ERROR_BODY[api].error200[2])
  else
    res:respond(200, headers, body)
  end
end

-- A write that took this long waited on backpressure (one that does not
-- wait returns in microseconds).
local WAITED_MS = 1
-- A stream longer than this is written in pieces of about WRITE_PIECE
-- bytes, each waiting while the client does not read; a shorter one in one
-- write (the server's own high-water mark: it never waits).
local ONE_WRITE_MAX = 64 * 1024
local WRITE_PIECE = 16 * 1024

-- Closes a request's write accounting, however its handler ends (a
-- cancelled handler never returns from the write it was parked in).
local Writing = {
  __close = function(w)
    local self, req = w[1], w[2]
    if req.writing_since then
      req.writing_since = nil
      self.writing = self.writing - 1
    end
  end,
}

local function writing(self, req)
  req.sent, req.write_waits = 0, 0
  return setmetatable({ self, req }, Writing)
end

-- res:write, counted on the request and the mock (see the top of the file).
local function write(self, req, res, data)
  local t0 = now()
  req.writing_since = t0
  self.writing = self.writing + 1
  local ok = res:write(data)
  req.writing_since = nil
  self.writing = self.writing - 1
  self.writes = self.writes + 1
  if now() - t0 >= WAITED_MS then
    req.write_waits = req.write_waits + 1
    self.write_waits = self.write_waits + 1
  end
  if ok then
    req.sent = req.sent + #data
  end
  return ok
end

-- Writes events[from .. last] in pieces of about WRITE_PIECE bytes, then
-- finishes the response. False when the client went away.
local function write_events(self, req, res, events, from, last)
  local i, size = from, 0
  for j = from, last do
    size = size + #events[j]
    if size >= WRITE_PIECE then
      if not write(self, req, res, concat(events, "", i, j)) then
        return false
      end
      i, size = j + 1, 0
    end
  end
  if not res:finish(concat(events, "", i, last)) then
    return false
  end
  req.sent = req.sent + size
  return true
end

-- Sends a stream. content[i] is true when events[i] is a content piece: the
-- first waits first_token_ms (else chunk_delay_ms), the others
-- chunk_delay_ms. `first` is the index where the content begins (or would).
-- Applies the stream faults and stall_after. extra: more headers.
local function send_stream(self, req, res, api, events, content, first, d, extra)
  local fault = d.fault
  local headers = with_headers(SSE_HEADERS, extra)
  local last = #events
  if fault == "malformed" then
    local at = first
    for i = 1, last do
      if content[i] then
        at = i + 1
        break
      end
    end
    tinsert(events, at, MALFORMED[api])
    tinsert(content, at, false)
    last = last + 1
  end
  local pieces = {}
  for i = 1, last do
    if content[i] then
      pieces[#pieces + 1] = i
    end
  end
  local n = #pieces
  if fault == "error200" then
    local at = pieces[1] or first
    events[at] = STREAM_ERROR[api]
    last, n = at, 0
  elseif fault == "cut" then
    n = (n + 1) // 2
    last = n > 0 and pieces[n] or first - 1
  end
  local stall_after = d.stall_after
  if fault == "cut" or fault == "error200" then
    stall_after = nil
  end
  if stall_after and stall_after < n then
    n = stall_after
  end
  local delay, first_wait = d.chunk_delay_ms, d.first_token_ms
  local _ <close> = writing(self, req)
  if delay <= 0 and not first_wait and not stall_after and fault ~= "cut" then
    local size = 0
    for j = 1, last do
      size = size + #events[j]
    end
    if size <= ONE_WRITE_MAX then
      -- nothing to pace: one write, with a content-length
      res:respond(200, headers, concat(events, "", 1, last))
      req.sent = size
      return
    end
    res:start(200, headers)
    write_events(self, req, res, events, 1, last)
    return
  end
  res:start(200, headers)
  -- events[from .. i - 1] are due but not yet written
  local from = 1
  for k = 1, n do
    local i = pieces[k]
    local wait = k == 1 and first_wait or delay
    if wait > 0 then
      if i > from and not write(self, req, res, concat(events, "", from, i - 1)) then
        return
      end
      from = i
      aiorch.sleep(wait)
    end
  end
  if stall_after then
    local upto = n > 0 and pieces[n] or first - 1
    if upto >= from and not write(self, req, res, concat(events, "", from, upto)) then
      return
    end
    stall()
  elseif fault == "cut" then
    write(self, req, res, concat(events, "", from, last))
    res:abort()
  else
    write_events(self, req, res, events, from, last)
  end
end

-- The text of a fault=huge answer repeats FILL; PIECE is a run of it that
-- each write sends, so the body is never built whole.
local FILL = "All work and no play makes Jack a dull boy. "
local FILL_WORDS = words(FILL)
local PIECE = FILL:rep(64 * 1024 // #FILL)

-- The words in the first n bytes of the huge text.
local function fill_words(n)
  return n // #FILL * FILL_WORDS + words(FILL:sub(1, n % #FILL))
end

-- A 200 JSON answer of about `size` bytes (exactly, unless the JSON around
-- the text is longer), written piece by piece as the client takes it.
local function send_huge(self, req, res, api, body, size)
  local _, input_tokens = read_messages(body)
  local model = encode(type(body.model) == "string" and body.model or DEFAULT_MODEL[api])
  self.seq = self.seq + 1
  local head, tail
  if api == "cohere" then
    head, tail = cohere.huge(self.seq, input_tokens)
  elseif api == "gemini" then
    head, tail = gemini.huge(self, body, req)
  elseif api == "anthropic" then
    head = concat { '{"id":"', fmt("msg_mock%08d", self.seq), '","type":"message","role":"assistant","model":',
      model, ',"content":[{"type":"text","text":"' }
    tail = function(out)
      return concat { '"}],"stop_reason":"max_tokens","stop_sequence":null,"usage":{"input_tokens":',
        input_tokens, ',"output_tokens":', out, "}}" }
    end
  else
    head = concat { '{"id":"', fmt("chatcmpl-mock%08d", self.seq), '","object":"chat.completion","created":',
      self.created, ',"model":', model, ',"choices":[{"index":0,"message":{"role":"assistant","content":"' }
    tail = function(out)
      return concat { '"},"logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":', input_tokens,
        ',"completion_tokens":', out, ',"total_tokens":', input_tokens + out, "}}" }
    end
  end
  -- The token count changes the tail's length: two passes settle it (the
  -- count may be off by a word; nothing reads it that closely).
  local room = size - #head - #tail(0)
  local last = tail(fill_words(room > 0 and room or 0))
  room = size - #head - #last
  if room < 0 then
    room = 0
  end
  res:start(200, { ["content-type"] = "application/json",
    ["content-length"] = tostring(#head + room + #last) })
  local _ <close> = writing(self, req)
  if not write(self, req, res, head) then
    return
  end
  local piece = #PIECE
  while room > 0 do
    local n = room < piece and room or piece
    if not write(self, req, res, n == piece and PIECE or PIECE:sub(1, n)) then
      return
    end
    room = room - n
  end
  if res:finish(last) then
    req.sent = req.sent + #last
  end
end

local HTML_HEADERS = { ["content-type"] = "text/html; charset=utf-8" }
local HTML = '<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>Sign in</title></head>\n'
  .. "<body><h1>Sign in to continue</h1><p>This network requires you to sign in.</p></body>\n</html>\n"

------------------------------------------------------------------------------
-- OpenAI Chat Completions

local function bytes_json(s)
  local b = {}
  for k = 1, #s do
    b[k] = byte(s, k)
  end
  return "[" .. concat(b, ",") .. "]"
end

-- logprobs.content of tokens[from .. to]: each token with a plausible
-- log-probability and `top` alternatives (itself first).
local function logprobs_json(tokens, from, to, top)
  local entries = {}
  for i = from, to do
    local tok = tokens[i]
    local lp = -((i - 1) % 7 + 1) / 64
    local tops = {}
    for k = 1, top do
      local t = k == 1 and tok or fmt("alt%d", k - 1)
      tops[k] = concat { '{"token":', encode(t), ',"logprob":', fmt("%.6g", lp - (k - 1)), ',"bytes":',
        bytes_json(t), "}" }
    end
    entries[#entries + 1] = concat { '{"token":', encode(tok), ',"logprob":', fmt("%.6g", lp), ',"bytes":',
      bytes_json(tok), ',"top_logprobs":[', concat(tops, ","), "]}" }
  end
  return '{"content":[' .. concat(entries, ",") .. '],"refusal":null}'
end

local function openai_usage(prompt, completion, cached, reasoning)
  return concat { '{"prompt_tokens":', prompt, ',"completion_tokens":', completion, ',"total_tokens":',
    prompt + completion, ',"prompt_tokens_details":{"cached_tokens":', cached,
    ',"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":', reasoning,
    ',"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}' }
end

local function openai_message(c)
  local out = { '{"role":"assistant","content":', c.text and encode(c.text) or "null",
    ',"refusal":null,"annotations":[]' }
  if c.reasoning then
    out[#out + 1] = ',"reasoning_content":' .. encode(c.reasoning)
  end
  if c.calls then
    local tc = {}
    for i, call in ipairs(c.calls) do
      tc[i] = concat { '{"id":"', call.id, '","type":"function","function":{"name":', encode(call.name),
        ',"arguments":', encode(call.args), "}}" }
    end
    out[#out + 1] = ',"tool_calls":[' .. concat(tc, ",") .. "]"
  end
  out[#out + 1] = "}"
  return concat(out)
end

local function openai_logprobs(c, conv)
  if not conv.logprobs then
    return "null"
  elseif not c.text then
    return '{"content":null,"refusal":null}'
  end
  local tokens = tokens_of(c.text)
  return logprobs_json(tokens, 1, #tokens, conv.top_logprobs or 0)
end

-- The stream chunks of one choice: {delta, logprobs, finish_reason, content}.
local function openai_deltas(c, conv, d, shape)
  local out = {}
  local function add(delta, lp, content)
    out[#out + 1] = { delta, lp or "null", "null", content }
  end
  add(c.calls and '{"role":"assistant","content":null}' or '{"role":"assistant","content":""}', nil, false)
  if c.reasoning then
    for _, piece in ipairs(split(c.reasoning, d.chunks)) do
      add('{"reasoning_content":' .. encode(piece) .. "}", nil, true)
    end
  end
  if c.calls and shape.whole_calls then
    for i, call in ipairs(c.calls) do -- Mistral: each call whole, in one chunk
      add(concat { '{"tool_calls":[{"index":', i - 1, ',"id":"', call.id, '","type":"function","function":{"name":',
        encode(call.name), ',"arguments":', encode(call.args), "}}]}" }, nil, true)
    end
  elseif c.calls then
    for i, call in ipairs(c.calls) do
      add(concat { '{"tool_calls":[{"index":', i - 1, ',"id":"', call.id, '","type":"function","function":{"name":',
        encode(call.name), ',"arguments":""}}]}' }, nil, true)
      for _, piece in ipairs(split(call.args, d.chunks)) do
        add(concat { '{"tool_calls":[{"index":', i - 1, ',"function":{"arguments":', encode(piece), "}}]}" }, nil,
          true)
      end
    end
  elseif conv.logprobs then
    -- pieces of whole tokens, each with its tokens' logprobs
    local tokens = tokens_of(c.text)
    local n = #tokens
    local groups = d.chunks < n and d.chunks or n
    local from = 1
    for g = 1, groups do
      local to = g * n // groups
      add('{"content":' .. encode(concat(tokens, "", from, to)) .. "}",
        logprobs_json(tokens, from, to, conv.top_logprobs or 0), true)
      from = to + 1
    end
  else
    for _, piece in ipairs(split(c.text, d.chunks)) do
      add('{"content":' .. encode(piece) .. "}", nil, true)
    end
  end
  out[#out + 1] = { "{}", "null", '"' .. c.finish .. '"', false }
  return out
end

local function openai_chat(self, req, res, d)
  local body = req.json
  local conv, e = read_openai(body)
  if not conv then
    return reject(req, res, "openai", e)
  end
  local model = type(body.model) == "string" and body.model or DEFAULT_MODEL.openai
  local shape = req.shape or {} -- an OpenAI-compatible server's differences (mock/compat.lua)
  self.seq = self.seq + 1
  local seq = self.seq
  local calls = tool_calls(conv, d)
  local text, args, err
  if calls then
    args, err = arguments_of(calls)
  else
    text, err = json_text(conv, answer_text("openai", conv, d), d)
  end
  if err then
    return reject(req, res, "openai", { message = err })
  end
  local reasoning = d.reasoning_content and d.reasoning_content > 0 and thinking_text(conv) or nil
  local reasoning_tokens = (reasoning and words(reasoning) or 0) + (conv.reasoning_tokens or 0)
  local choices, completion = {}, 0
  for k = 0, conv.n - 1 do
    local c = { index = k, reasoning = reasoning }
    if calls then
      c.calls, c.finish = {}, "tool_calls"
      for i, t in ipairs(calls) do
        local cid = shape.call_id and shape.call_id(seq, k, i) or fmt("call_mock%08d%02d%02d", seq, k, i)
        c.calls[i] = { id = cid, name = t.name, args = args[t.name] }
        completion = completion + words(t.name) + words(args[t.name])
      end
    else
      c.text = cut_at_stop(k == 0 and text or fmt("%s (choice %d)", text, k), conv.stops)
      c.finish = "stop"
      completion = completion + words(c.text)
    end
    completion = completion + reasoning_tokens
    choices[#choices + 1] = c
  end
  local usage = openai_usage(conv.input_tokens, completion, openai_cached(self, conv, model),
    reasoning_tokens * conv.n)
  local tier = body.service_tier
  if tier ~= "default" and tier ~= "flex" and tier ~= "priority" and tier ~= "scale" then
    tier = "default"
  end
  local fingerprint = fmt("fp_%010x", hash64(model, 7) & 0xffffffffff)
  local id = fmt("chatcmpl-mock%08d", seq)
  if body.stream ~= true then
    local cs = {}
    for i, c in ipairs(choices) do
      cs[i] = concat { '{"index":', c.index, ',"message":', openai_message(c), ',"logprobs":',
        openai_logprobs(c, conv), ',"finish_reason":"', c.finish, '"}' }
    end
    return respond_json(res, "openai", concat {
      '{"id":"', id, '","object":"chat.completion","created":', self.created, ',"model":', encode(model),
      ',"choices":[', concat(cs, ","), '],"usage":', usage, ',"service_tier":"', tier,
      '","system_fingerprint":"', fingerprint, '"}',
    }, d)
  end
  local so = body.stream_options
  local asked_usage = type(so) == "table" and so.include_usage == true
  local with_usage = asked_usage or shape.usage == "always"
  local head = concat { 'data: {"id":"', id, '","object":"chat.completion.chunk","created":', self.created,
    ',"model":', encode(model), ',"service_tier":"', tier, '","system_fingerprint":"', fingerprint,
    '","choices":[' }
  local tail = asked_usage and '],"usage":null}\n\n' or "]}\n\n"
  -- the choices' chunks, interleaved: all role chunks, then turn by turn
  local lists, longest = {}, 0
  for i, c in ipairs(choices) do
    lists[i] = openai_deltas(c, conv, d, shape)
    if #lists[i] > longest then
      longest = #lists[i]
    end
  end
  local events, content = {}, {}
  for p = 1, longest do
    for i, list in ipairs(lists) do
      local x = list[p]
      if x then
        events[#events + 1] = concat { head, '{"index":', choices[i].index, ',"delta":', x[1], ',"logprobs":', x[2],
          ',"finish_reason":', x[3], "}", tail }
        content[#events] = x[4]
      end
    end
  end
  if with_usage then
    events[#events + 1] = head .. '],"usage":' .. usage .. "}\n\n"
    content[#events] = false
  elseif shape.usage == "x_groq" then
    events[#events + 1] = concat { head, '],"x_groq":{"id":"req_mock', seq, '","usage":', usage, "}}\n\n" }
    content[#events] = false
  end
  events[#events + 1] = O_DONE
  content[#events] = false
  return send_stream(self, req, res, "openai", events, content, #choices + 1, d)
end

------------------------------------------------------------------------------
-- Anthropic Messages

local function anthropic_usage(input, read, w5, w1, output)
  return concat { '{"input_tokens":', input, ',"cache_creation_input_tokens":', w5 + w1,
    ',"cache_read_input_tokens":', read, ',"cache_creation":{"ephemeral_5m_input_tokens":', w5,
    ',"ephemeral_1h_input_tokens":', w1, '},"output_tokens":', output, ',"service_tier":"standard"}' }
end

-- A content block, whole (final) or as content_block_start carries it.
local function block_json(b, start)
  if b.type == "text" then
    return '{"type":"text","text":' .. (start and '""' or encode(b.text)) .. "}"
  elseif b.type == "thinking" then
    if start then
      return '{"type":"thinking","thinking":"","signature":""}'
    end
    return concat { '{"type":"thinking","thinking":', encode(b.text), ',"signature":"', b.signature, '"}' }
  elseif b.type == "redacted_thinking" then
    return '{"type":"redacted_thinking","data":"' .. b.data .. '"}'
  end
  return concat { '{"type":"tool_use","id":"', b.id, '","name":', encode(b.name), ',"input":',
    start and "{}" or b.args, "}" }
end

-- The answer's content blocks, its output tokens, stop_reason and
-- stop_sequence; or nil, error.
local function anthropic_blocks(self, conv, d, id)
  local blocks, output = {}, 0
  if conv.max_tokens == 0 then
    return blocks, 0, "max_tokens"
  end
  if conv.thinking then
    local th = thinking_text(conv)
    output = output + words(th)
    if conv.thinking_display == "omitted" then
      th = ""
    end
    blocks[1] = { type = "thinking", text = th, signature = sign(th) }
    if d.redacted_thinking and d.redacted_thinking > 0 then
      blocks[2] = { type = "redacted_thinking", data = redacted_data(id) }
    end
  end
  local calls = tool_calls(conv, d)
  if calls then
    local args, err = arguments_of(calls)
    if not args then
      return nil, { message = err }
    end
    for i, t in ipairs(calls) do
      blocks[#blocks + 1] = { type = "tool_use", id = fmt("toolu_mock%08d%02d", self.seq, i), name = t.name,
        args = args[t.name] }
      output = output + words(t.name) + words(args[t.name])
    end
    return blocks, output, "tool_use"
  end
  local text, err = json_text(conv, answer_text("anthropic", conv, d), d)
  if not text then
    return nil, { message = err }
  end
  local prefill = conv.prefill
  if prefill and text:sub(1, #prefill) == prefill then
    text = text:sub(#prefill + 1)
  end
  local cut, stop = cut_at_stop(text, conv.stops)
  blocks[#blocks + 1] = { type = "text", text = cut }
  return blocks, output + words(cut), stop and "stop_sequence" or "end_turn", stop
end

local function anthropic_messages(self, req, res, d)
  local body = req.json
  local conv, e = read_anthropic(body, req)
  if not conv then
    return reject(req, res, "anthropic", e)
  end
  local model_name = type(body.model) == "string" and body.model or DEFAULT_MODEL.anthropic
  local model = encode(model_name)
  self.seq = self.seq + 1
  local id = fmt("msg_mock%08d", self.seq)
  local blocks, output, stop_reason, stop = anthropic_blocks(self, conv, d, id)
  if not blocks then
    return reject(req, res, "anthropic", output)
  end
  local read, w5, w1 = 0, 0, 0
  if conv.breakpoints or type(body.cache_control) == "table" then
    read, w5, w1 = anthropic_cache(self, conv, model_name, body.cache_control)
  end
  local input = conv.input_tokens - read - w5 - w1
  local stop_json = stop and encode(stop) or "null"
  local extra = req.thinking_verified and { ["x-mock-thinking-verified"] = "true" } or nil
  if body.stream ~= true then
    local content = {}
    for i, b in ipairs(blocks) do
      content[i] = block_json(b)
    end
    return respond_json(res, "anthropic", concat {
      '{"id":"', id, '","type":"message","role":"assistant","model":', model, ',"content":[', concat(content, ","),
      '],"stop_reason":"', stop_reason, '","stop_sequence":', stop_json, ',"usage":',
      anthropic_usage(input, read, w5, w1, output), "}",
    }, d, extra)
  end
  local events = {
    concat { 'event: message_start\ndata: {"type":"message_start","message":{"id":"', id,
      '","type":"message","role":"assistant","model":', model,
      ',"content":[],"stop_reason":null,"stop_sequence":null,"usage":', anthropic_usage(input, read, w5, w1, 1),
      "}}\n\n" },
  }
  local content = { false }
  local function add(ev, is_content)
    events[#events + 1] = ev
    content[#events] = is_content
  end
  for i, b in ipairs(blocks) do
    local k = i - 1
    add(concat { 'event: content_block_start\ndata: {"type":"content_block_start","index":', k,
      ',"content_block":', block_json(b, true), "}\n\n" }, false)
    if i == 1 then
      add(A_PING, false)
    end
    local function delta(json_text_of_delta, is_content)
      add(concat { 'event: content_block_delta\ndata: {"type":"content_block_delta","index":', k, ',"delta":',
        json_text_of_delta, "}\n\n" }, is_content)
    end
    if b.type == "text" then
      for _, piece in ipairs(split(b.text, d.chunks)) do
        delta('{"type":"text_delta","text":' .. encode(piece) .. "}", true)
      end
    elseif b.type == "thinking" then
      for _, piece in ipairs(split(b.text, d.chunks)) do
        delta('{"type":"thinking_delta","thinking":' .. encode(piece) .. "}", true)
      end
      delta('{"type":"signature_delta","signature":"' .. b.signature .. '"}', false)
    elseif b.type == "tool_use" then
      delta('{"type":"input_json_delta","partial_json":""}', false)
      for _, piece in ipairs(split(b.args, d.chunks)) do
        delta('{"type":"input_json_delta","partial_json":' .. encode(piece) .. "}", true)
      end
    end
    add(concat { 'event: content_block_stop\ndata: {"type":"content_block_stop","index":', k, "}\n\n" }, false)
  end
  if not blocks[1] then
    add(A_PING, false)
  end
  add(concat { 'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"', stop_reason,
    '","stop_sequence":', stop_json, '},"usage":{"output_tokens":', output, "}}\n\n" }, false)
  add(A_MESSAGE_STOP, false)
  local first = #events
  for i = 1, #events do
    if content[i] then
      first = i
      break
    end
  end
  if not content[first] then
    first = blocks[1] and 4 or 3 -- after the first block's start and the ping
  end
  return send_stream(self, req, res, "anthropic", events, content, first, d, extra)
end

------------------------------------------------------------------------------
-- Gemini's generateContent (scripts/aiorch/mock/gemini.lua), on the helpers above.

gemini = require("aiorch.mock.gemini").bind {
  present = present, new_conv = new_conv, add_unit = add_unit, tool_tokens = tool_tokens, words = words,
  is_base64 = is_base64, sniff = sniff, utf8_head = utf8_head, sign = sign, split = split, cut_at_stop = cut_at_stop,
  IMAGE_TOKENS = IMAGE_TOKENS, DOCUMENT_TOKENS = DOCUMENT_TOKENS, MAX_RESULT_ECHO = MAX_RESULT_ECHO,
  answer_text = answer_text, json_text = json_text, thinking_text = thinking_text, tool_calls = tool_calls,
  arguments_of = arguments_of, openai_cached = openai_cached, reject = reject, respond_json = respond_json,
  send_stream = send_stream,
}
ERROR_BODY.gemini, STREAM_ERROR.gemini, MALFORMED.gemini = gemini.ERROR_BODY, gemini.STREAM_ERROR, gemini.MALFORMED
MODELS.gemini, DEFAULT_MODEL.gemini = gemini.MODELS, "gemini-2.5-flash"

------------------------------------------------------------------------------
-- Serving

-- Cohere v2 answers with these shared parts.
local cohere_chat = cohere.handler {
  new_conv = new_conv, words = words, split = split, tokens_of = tokens_of, utf8_head = utf8_head,
  content_text = content_text, cut_at_stop = cut_at_stop, tool_calls = tool_calls, arguments_of = arguments_of,
  answer_text = answer_text, json_text = json_text, thinking_text = thinking_text, reject = reject,
  respond_json = respond_json, send_stream = send_stream,
}

local ROUTES = {
  ["POST /v1/chat/completions"] = openai_chat,
  ["POST /v1/messages"] = anthropic_messages,
  ["POST /v2/chat"] = cohere_chat,
}

-- OpenAI-compatible servers' Chat Completions (mock/compat.lua).
local compat_chat = compat.handler { openai_chat = openai_chat }

local function api_of(route, headers)
  if route == "/v2/chat" then
    return "cohere"
  elseif gemini.owns(route) or headers["x-goog-api-key"] then
    return "gemini"
  elseif route == "/v1/chat/completions" then
    return "openai"
  elseif route == "/v1/messages" then
    return "anthropic"
  elseif headers["anthropic-version"] or headers["x-api-key"] then
    return "anthropic"
  end
  return "openai"
end

-- fail_first: counts the request under its key; past the first N, the fault
-- and the stall are dropped. Returns the directives to answer with.
local function count_request(self, req, d)
  local key = d.key or ""
  local n = (self.counters[key] or 0) + 1
  self.counters[key] = n
  req.attempt = n
  if n <= d.fail_first then
    return d
  end
  local copy = {}
  for k, v in pairs(d) do
    copy[k] = v
  end
  copy.fault, copy.stall_after = nil, nil
  return copy
end

local function handle(self, req, res)
  if self.record then
    local requests = self.requests
    requests[#requests + 1] = req
  end

  local target = req.path
  local path, prefix = target, nil
  if target:find("^/_mock/") then
    prefix, path = target:match("^/_mock/([^/?]*)(.*)$")
    if path == "" then
      path = "/"
    end
  end
  req.raw_path = target
  req.path = path
  local route = path:match("^[^?]*")
  -- An OpenAI-compatible server's path: its flavour, answered as OpenAI's route.
  local flavour, as_route, deployment, api_version = compat.route(path)
  if flavour then
    req.flavour, req.deployment, req.api_version = flavour, deployment, api_version
    route = as_route
  end
  local headers = req.headers
  local api = api_of(route, headers)
  req.api = api

  local d = self.defaults
  local header = headers["x-mock-directives"]
  if (prefix and prefix ~= "") or (header and header ~= "") then
    local err
    d = new_directives()
    if header then
      d, err = parse_directives(header, d)
    end
    if d and prefix then
      d, err = parse_directives(prefix, d)
    end
    if d then
      d, err = check_set(d)
    end
    if not d then
      req.directives = {}
      respond_invalid(res, api, 400, "mock: " .. err)
      req.completed_at = aiorch.now()
      return
    end
  end
  if d.fail_first then
    d = count_request(self, req, d)
  end
  req.directives = d

  local body = req.body
  if body and body ~= "" then
    req.json = json.decode(body)
  end

  local key = req.method .. " " .. route
  local fn, gemini_stream = ROUTES[key], nil
  if not fn and api == "gemini" then
    fn, gemini_stream = gemini.route(req.method, route)
  elseif flavour and fn == openai_chat then
    fn = compat_chat
  end
  if self.rate_limits and fn then
    local extra, retry = ratelimit.check(self.rate_limits, self.rate_windows, req, api)
    if retry then
      local e = (ERROR_BODY[api] or ERROR_BODY.openai)["429"]
      extra["retry-after"] = tostring(retry)
      res:respond(e[1], with_headers(JSON_HEADERS, extra), e[2])
      req.completed_at = aiorch.now()
      req.rate_limited = true
      return
    end
    res = ratelimit.adding_headers(res, extra, with_headers)
  end
  local fault = d.fault
  local wait = d.latency_ms
  if d.tail_pct and math.random() * 100 < d.tail_pct then
    wait = d.tail_ms
  end
  if d.first_token_ms then
    local doc = req.json
    local streams = fn and type(doc) == "table" and (doc.stream == true or gemini_stream) and not NO_STREAM[fault]
    if not streams then
      wait = wait + d.first_token_ms
    end
  end
  if wait > 0 then
    aiorch.sleep(wait)
  end
  if fault == "hang" then
    stall()
  end

  if fault == "reset" then
    res:abort()
  elseif STATUS_FAULTS[fault] then
    respond_error(res, api, fault, d)
  elseif fault == "echo_key" then
    respond_echo_key(res, api, headers, req)
  elseif fault == "html" then
    res:respond(200, HTML_HEADERS, HTML)
  elseif fn then
    if type(req.json) ~= "table" then
      respond_invalid(res, api, 400, "We could not parse the JSON body of your request.")
    elseif fault == "huge" then
      send_huge(self, req, res, api, req.json, d.size or HUGE_SIZE)
    else
      fn(self, req, res, d)
    end
  elseif key == "GET /v1/models" or key == "GET /v1beta/models" then
    respond_json(res, api, MODELS[api], d)
  else
    respond_invalid(res, api, 404, fmt("Invalid URL (%s %s)", req.method, route))
  end
  req.completed_at = aiorch.now()
end

------------------------------------------------------------------------------
-- The mock object

local Mock = {}
Mock.__index = Mock

-- Starts a mock server; call inside a task. Returns the mock, or nil, kind,
-- message as aiorch.server.listen does.
-- opts: host, port, defaults (directives), max_body, record (false: keep
-- m.requests empty, for long benchmarks), idle_timeout_ms (close idle
-- keep-alive connections), rate_limit (m:rate_limit's).
function _M.start(opts)
  opts = opts or {}
  if type(opts) ~= "table" then
    error("mock.start: options must be a table", 2)
  end
  local host = opts.host or "127.0.0.1"
  local self = setmetatable({
    requests = {},
    counters = {},
    cache = {},
    cache_count = 0,
    seq = 0,
    writes = 0,
    write_waits = 0,
    writing = 0,
    created = os_time(),
    defaults = resolve(opts.defaults, 2),
    record = opts.record ~= false,
    rate_limits = nil,
    rate_windows = {},
  }, Mock)
  if opts.rate_limit ~= nil then
    self:rate_limit(opts.rate_limit)
  end
  local srv, kind, message = aiorch.server.listen {
    host = host,
    port = opts.port or 0,
    max_body = opts.max_body or 16 * 1024 * 1024,
    idle_timeout_ms = opts.idle_timeout_ms,
    handler = function(req, res) return handle(self, req, res) end,
  }
  if not srv then
    return nil, kind, message
  end
  self.server = srv
  self.host = host
  self.port = srv.port
  self.url = fmt("http://%s:%d", host, srv.port)
  return self
end

-- The base URL an adapter of `api` should use to reach this mock with the
-- given directives ("http://host:port[/_mock/dirs]" + "/v1" for openai).
-- api: openai, anthropic or cohere.
function Mock:base_url(api, directives)
  local prefix = ""
  if directives ~= nil then
    if type(directives) ~= "table" then
      error("mock: directives must be a table", 2)
    end
    local items = {}
    for k, v in pairs(directives) do
      local ok, msg = check_directive(k, v)
      if not ok then
        error("mock: " .. msg, 2)
      end
    end
    local ok, msg = check_set(directives)
    if not ok then
      error("mock: " .. msg, 2)
    end
    for _, k in ipairs(ORDER) do
      local v = directives[k]
      if v ~= nil then
        local s = math_type(v) and fmt("%.14g", v) or tostring(v)
        items[#items + 1] = k .. "=" .. escape(s)
      end
    end
    if next(items) then
      prefix = "/_mock/" .. concat(items, ",")
    end
  end
  if api == "openai" then
    return self.url .. prefix .. "/v1"
  elseif api == "anthropic" or api == "cohere" or api == "gemini" then
    return self.url .. prefix
  elseif compat.BASES[api] then
    return self.url .. prefix .. compat.BASES[api]
  end
  error(fmt("mock: unknown api '%s' (openai, anthropic, cohere or gemini)", tostring(api)), 2)
end

-- Forgets the recorded requests (the same table is kept), the prompt
-- cache and the write counts.
function Mock:reset()
  local r = self.requests
  for i = #r, 1, -1 do
    r[i] = nil
  end
  self.cache, self.cache_count = {}, 0
  self.writes, self.write_waits = 0, 0
end

-- The writes of stream and fault=huge bodies since the start (or reset):
-- {writes = n, write_waits = n (those that waited on backpressure),
-- writing = n (responses parked in a write right now)}.
function Mock:stats()
  return { writes = self.writes, write_waits = self.write_waits, writing = self.writing }
end

-- Forgets the fail_first counts (of one key, or of all).
function Mock:reset_counters(key)
  if key ~= nil then
    self.counters[key] = nil
    return
  end
  for k in pairs(self.counters) do
    self.counters[k] = nil
  end
end

-- How many fail_first requests arrived with this key ("" for none).
function Mock:counter(key)
  return self.counters[key or ""] or 0
end

-- Rate limits per key, told in the answers' headers (see "Rate limits"):
-- {requests = n, tokens = n, window_ms = ms (default 60000)}; nil: none.
-- Starts every key's window afresh.
function Mock:rate_limit(limits)
  if limits ~= nil then
    if type(limits) ~= "table" then
      error("mock: rate limits must be a table", 2)
    end
    for _, k in ipairs { "requests", "tokens", "window_ms" } do
      local v = limits[k]
      if v ~= nil and (math_type(v) ~= "integer" or v <= 0) then
        error(fmt("mock: rate limit %s must be a positive integer", k), 2)
      end
    end
    limits = { requests = limits.requests, tokens = limits.tokens, window_ms = limits.window_ms or 60000 }
  end
  self.rate_limits = limits
  self.rate_windows = {}
end

-- Sets the directives of requests that carry none.
function Mock:configure(defaults)
  self.defaults = resolve(defaults, 2)
end

function Mock:close()
  if self.server then
    self.server:close()
    self.server = nil
  end
end

_M.sign = sign

return _M
