-- Mock OpenAI and Anthropic providers on aiorch.server.
--
-- Speaks the real wire formats (Chat Completions and Messages, plain and
-- SSE streaming) and injects faults chosen per request by directives:
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
--                   cut | error200 | huge | html | reset | none
--                     4xx/5xx: that status in the API's own error shape
--                     huge:  a 200 JSON answer of `size` bytes (one huge text)
--                     html:  a 200 text/html page instead of JSON
--                     reset: the connection closes once the request is read,
--                            with no response at all (a client reusing a
--                            kept-alive connection may resend once: curl does)
--   size            bytes of a fault=huge body (default 16 MiB; never less
--                   than the JSON around the text)
--   retry_after     Retry-After of a 429, in seconds (default 1)
--   fail_first      only the first N requests carrying the same `key` get
--                   the fault and stall_after; later ones are answered
--                   normally. Counted per mock on arrival; m:reset_counters()
--   key             the counter of fail_first (default: one shared counter)
--   chunks          content pieces of a stream, at most (default 5)
--   chunk_delay_ms  wait before each content piece of a stream (default 0)
--   stall_after     a stream sends N content pieces (all when N >= chunks),
--                   then sends nothing more and keeps the connection open
--                   until the client goes away; a response that is not a
--                   stream stalls after its headers and half its body.
--                   Ignored with fault=cut and error200 (they end the
--                   stream themselves) and with huge.
--   text            the answer text (default: names the provider, echoes the question)
--
-- Every request is recorded in m.requests as soon as it arrives: the
-- server's request table itself, so req.aborted_at (set by the server when
-- the client goes away) is visible there. Its fields set by the mock: api,
-- raw_path, directives (those it was answered with), json, completed_at,
-- and attempt (its number among the fail_first requests of its key).
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

local concat, tinsert = table.concat, table.insert
local fmt = string.format
local byte, char = string.byte, string.char
local math_type, tointeger, huge = math.type, math.tointeger, math.huge
local ipairs, pairs, next = ipairs, pairs, next
local setmetatable, tostring, tonumber, type, error = setmetatable, tostring, tonumber, type, error
local os_time = os.time
local now = aiorch.now
local encode, decode = cjson.encode, cjson.decode

local _M = {}

-- Directives, in the order base_url writes them.
local ORDER = { "latency_ms", "tail_pct", "tail_ms", "first_token_ms", "fault", "size", "retry_after",
  "fail_first", "key", "chunks", "chunk_delay_ms", "stall_after", "text" }
local KNOWN = {}
for i, k in ipairs(ORDER) do
  KNOWN[k] = i
end
local KNOWN_LIST = concat(ORDER, ", ")
-- Directives whose value is a whole number: the least allowed.
local INTEGERS = { chunks = 1, stall_after = 0, size = 0, fail_first = 0 }

local FAULT_LIST = "429, 500, 529, 401, 400, 403, 503, hang, malformed, cut, error200, huge, html, reset, none"
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
local NO_STREAM = { hang = true, huge = true, html = true, reset = true }
for f in pairs(STATUS_FAULTS) do
  NO_STREAM[f] = true
end

local DEFAULT_MODEL = { openai = "gpt-4o-mini", anthropic = "claude-3-haiku-20240307" }
local HANG_SLICE_MS = 3600 * 1000
local MAX_ECHO = 60
local HUGE_SIZE = 16 * 1024 * 1024

------------------------------------------------------------------------------
-- Directives

-- Returns true, value (value nil for fault=none) or false, message.
local function check_directive(k, v)
  if not KNOWN[k] then
    return false, fmt("unknown directive '%s' (known: %s)", tostring(k), KNOWN_LIST)
  end
  if k == "text" or k == "key" then
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
}

local function error_body(api, etype, code, message)
  if api == "anthropic" then
    return concat { '{"type":"error","error":{"type":', encode(etype), ',"message":', encode(message), "}}" }
  end
  return concat { '{"error":{"message":', encode(message), ',"type":', encode(etype),
    ',"param":null,"code":', code and encode(code) or "null", "}}" }
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

local A_BLOCK_START = 'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
  .. '"content_block":{"type":"text","text":""}}\n\n'
local A_PING = 'event: ping\ndata: {"type":"ping"}\n\n'
local A_BLOCK_STOP = 'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
local A_MESSAGE_STOP = 'event: message_stop\ndata: {"type":"message_stop"}\n\n'
local A_DELTA = 'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
  .. '"delta":{"type":"text_delta","text":'
local O_DONE = "data: [DONE]\n\n"

-- The invalid data line of a stream with fault=malformed.
local MALFORMED = {
  openai = 'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"trunc\n\n',
  anthropic = A_DELTA .. '"trunc\n\n',
}

------------------------------------------------------------------------------
-- Reading the request

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

-- Returns the last user message's text and the word count of every input.
local function read_messages(json)
  local question, count = "", 0
  if json.system ~= nil then
    count = count + words(content_text(json.system))
  end
  local messages = json.messages
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

local function default_answer(api, question)
  local q = question:gsub("%s+", " "):match("^ ?(.-) ?$")
  if #q > MAX_ECHO then
    local head = utf8_head(q, MAX_ECHO)
    q = (head:match("^(.+) %S*$") or head) .. "..."
  end
  return fmt("Hello from the mock %s provider. You asked: %s", api, q)
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

local function respond_invalid(res, api, status, message)
  local body
  if api == "anthropic" then
    body = error_body(api, status == 404 and "not_found_error" or "invalid_request_error", nil, message)
  else
    body = error_body(api, "invalid_request_error", nil, message)
  end
  res:respond(status, JSON_HEADERS, body)
end

-- Keeps the connection open, sending nothing, until the client goes away
-- (the server then cancels the handler) or the mock closes.
local function stall()
  while true do
    aiorch.sleep(HANG_SLICE_MS)
  end
end

-- A 200 JSON body, subject to the body faults.
local function respond_json(res, api, body, d)
  local fault = d.fault
  if d.stall_after and fault ~= "cut" and fault ~= "error200" then
    res:start(200, { ["content-type"] = "application/json", ["content-length"] = tostring(#body) })
    res:write(body:sub(1, #body // 2))
    stall()
  elseif fault == "malformed" then
    res:respond(200, JSON_HEADERS, body:sub(1, #body // 2))
  elseif fault == "cut" then
    res:start(200, { ["content-type"] = "application/json", ["content-length"] = tostring(#body) })
    res:write(body:sub(1, #body // 2))
    res:abort()
  elseif fault == "error200" then
    res:respond(200, JSON_HEADERS, ERROR_BODY[api].error200[2])
  else
    res:respond(200, JSON_HEADERS, body)
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

-- Sends a stream: events[first .. first + n - 1] are the n content deltas,
-- the first preceded by first_token_ms (else chunk_delay_ms), the others by
-- chunk_delay_ms. Applies the stream faults and stall_after.
local function send_stream(self, req, res, api, events, first, n, d)
  local fault = d.fault
  local last = #events
  local skip = nil -- an index inserted among the deltas
  if fault == "error200" then
    events[first] = STREAM_ERROR[api]
    last, n = first, 0
  elseif fault == "cut" then
    n = (n + 1) // 2
    last = first + n - 1
  elseif fault == "malformed" then
    skip = n > 0 and first + 1 or first
    tinsert(events, skip, MALFORMED[api])
    last = last + 1
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
      res:respond(200, SSE_HEADERS, concat(events, "", 1, last))
      req.sent = size
      return
    end
    res:start(200, SSE_HEADERS)
    write_events(self, req, res, events, 1, last)
    return
  end
  res:start(200, SSE_HEADERS)
  -- events[from .. i - 1] are due but not yet written
  local from, i = 1, first
  for k = 1, n do
    if i == skip then
      i = i + 1
    end
    local wait = k == 1 and first_wait or delay
    if wait > 0 then
      if i > from and not write(self, req, res, concat(events, "", from, i - 1)) then
        return
      end
      from = i
      aiorch.sleep(wait)
    end
    i = i + 1
  end
  if stall_after then
    if i > from and not write(self, req, res, concat(events, "", from, i - 1)) then
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
local function send_huge(self, req, res, api, json, size)
  local _, input_tokens = read_messages(json)
  local model = encode(type(json.model) == "string" and json.model or DEFAULT_MODEL[api])
  self.seq = self.seq + 1
  local head, tail
  if api == "anthropic" then
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

local function openai_chat(self, req, res, d)
  local json = req.json
  local question, input_tokens = read_messages(json)
  local text = d.text or default_answer("openai", question)
  local output_tokens = words(text)
  local model = type(json.model) == "string" and json.model or DEFAULT_MODEL.openai
  self.seq = self.seq + 1
  local id = fmt("chatcmpl-mock%08d", self.seq)
  local usage = concat { '{"prompt_tokens":', input_tokens, ',"completion_tokens":', output_tokens,
    ',"total_tokens":', input_tokens + output_tokens, "}" }
  if json.stream ~= true then
    return respond_json(res, "openai", concat {
      '{"id":"', id, '","object":"chat.completion","created":', self.created, ',"model":', encode(model),
      ',"choices":[{"index":0,"message":{"role":"assistant","content":', encode(text),
      '},"logprobs":null,"finish_reason":"stop"}],"usage":', usage, "}",
    }, d)
  end
  local so = json.stream_options
  local with_usage = type(so) == "table" and so.include_usage == true
  local head = concat { 'data: {"id":"', id, '","object":"chat.completion.chunk","created":', self.created,
    ',"model":', encode(model), ',"choices":[' }
  local tail = with_usage and ',"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    or ',"logprobs":null,"finish_reason":null}]}\n\n'
  local events = { head .. '{"index":0,"delta":{"role":"assistant","content":""}' .. tail }
  local pieces = split(text, d.chunks)
  for i = 1, #pieces do
    events[i + 1] = concat { head, '{"index":0,"delta":{"content":', encode(pieces[i]), "}", tail }
  end
  events[#events + 1] = head .. '{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]'
    .. (with_usage and ',"usage":null}\n\n' or "}\n\n")
  if with_usage then
    events[#events + 1] = head .. '],"usage":' .. usage .. "}\n\n"
  end
  events[#events + 1] = O_DONE
  return send_stream(self, req, res, "openai", events, 2, #pieces, d)
end

local function anthropic_messages(self, req, res, d)
  local json = req.json
  local question, input_tokens = read_messages(json)
  local text = d.text or default_answer("anthropic", question)
  local output_tokens = words(text)
  local model = encode(type(json.model) == "string" and json.model or DEFAULT_MODEL.anthropic)
  self.seq = self.seq + 1
  local id = fmt("msg_mock%08d", self.seq)
  if json.stream ~= true then
    return respond_json(res, "anthropic", concat {
      '{"id":"', id, '","type":"message","role":"assistant","model":', model,
      ',"content":[{"type":"text","text":', encode(text), '}],"stop_reason":"end_turn","stop_sequence":null,',
      '"usage":{"input_tokens":', input_tokens, ',"output_tokens":', output_tokens, "}}",
    }, d)
  end
  local events = {
    concat { 'event: message_start\ndata: {"type":"message_start","message":{"id":"', id,
      '","type":"message","role":"assistant","model":', model,
      ',"content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":', input_tokens,
      ',"output_tokens":1}}}\n\n' },
    A_BLOCK_START,
    A_PING,
  }
  local pieces = split(text, d.chunks)
  for i = 1, #pieces do
    events[i + 3] = concat { A_DELTA, encode(pieces[i]), "}}\n\n" }
  end
  local n = #events
  events[n + 1] = A_BLOCK_STOP
  events[n + 2] = concat { 'event: message_delta\ndata: {"type":"message_delta",'
    .. '"delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":', output_tokens,
    "}}\n\n" }
  events[n + 3] = A_MESSAGE_STOP
  return send_stream(self, req, res, "anthropic", events, 4, #pieces, d)
end

local ROUTES = {
  ["POST /v1/chat/completions"] = openai_chat,
  ["POST /v1/messages"] = anthropic_messages,
}

local function api_of(route, headers)
  if route == "/v1/chat/completions" then
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
    req.json = decode(body)
  end

  local key = req.method .. " " .. route
  local fn = ROUTES[key]
  local fault = d.fault
  local wait = d.latency_ms
  if d.tail_pct and math.random() * 100 < d.tail_pct then
    wait = d.tail_ms
  end
  if d.first_token_ms then
    local json = req.json
    local streams = fn and type(json) == "table" and json.stream == true and not NO_STREAM[fault]
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
  elseif key == "GET /v1/models" then
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
-- keep-alive connections).
function _M.start(opts)
  opts = opts or {}
  if type(opts) ~= "table" then
    error("mock.start: options must be a table", 2)
  end
  local host = opts.host or "127.0.0.1"
  local self = setmetatable({
    requests = {},
    counters = {},
    seq = 0,
    writes = 0,
    write_waits = 0,
    writing = 0,
    created = os_time(),
    defaults = resolve(opts.defaults, 2),
    record = opts.record ~= false,
  }, Mock)
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
  elseif api == "anthropic" then
    return self.url .. prefix
  end
  error(fmt("mock: unknown api '%s' (openai or anthropic)", tostring(api)), 2)
end

-- Forgets the recorded requests (the same table is kept) and the write counts.
function Mock:reset()
  local r = self.requests
  for i = #r, 1, -1 do
    r[i] = nil
  end
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

return _M
