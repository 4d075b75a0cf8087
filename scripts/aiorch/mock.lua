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
--   fault           429 | 500 | 529 | 401 | hang | malformed | cut | error200 | none
--   retry_after     Retry-After of a 429, in seconds (default 1)
--   chunks          content pieces of a stream, at most (default 5)
--   chunk_delay_ms  wait before each content piece of a stream (default 0)
--   text            the answer text (default: names the provider, echoes the question)
--
-- Every request is recorded in m.requests as soon as it arrives: the
-- server's request table itself, so req.aborted_at (set by the server when
-- the client goes away) is visible there.
local aiorch = require "aiorch"
local cjson = require "cjson.safe"

local concat, tinsert = table.concat, table.insert
local fmt = string.format
local byte, char = string.byte, string.char
local math_type, tointeger, huge = math.type, math.tointeger, math.huge
local ipairs, pairs, next = ipairs, pairs, next
local setmetatable, tostring, tonumber, type, error = setmetatable, tostring, tonumber, type, error
local os_time = os.time
local encode, decode = cjson.encode, cjson.decode

local _M = {}

-- Directives, in the order base_url writes them.
local ORDER = { "latency_ms", "fault", "retry_after", "chunks", "chunk_delay_ms", "text" }
local KNOWN = {}
for i, k in ipairs(ORDER) do
  KNOWN[k] = i
end
local KNOWN_LIST = concat(ORDER, ", ")

local FAULTS = {
  ["429"] = true, ["500"] = true, ["529"] = true, ["401"] = true,
  hang = true, malformed = true, cut = true, error200 = true, none = true,
}
-- Faults answered with an error status before anything else.
local STATUS_FAULTS = { ["429"] = true, ["500"] = true, ["529"] = true, ["401"] = true }
local FAULT_LIST = "429, 500, 529, 401, hang, malformed, cut, error200, none"

local DEFAULT_MODEL = { openai = "gpt-4o-mini", anthropic = "claude-3-haiku-20240307" }
local HANG_SLICE_MS = 3600 * 1000
local MAX_ECHO = 60

------------------------------------------------------------------------------
-- Directives

-- Returns true, value (value nil for fault=none) or false, message.
local function check_directive(k, v)
  if not KNOWN[k] then
    return false, fmt("unknown directive '%s' (known: %s)", tostring(k), KNOWN_LIST)
  end
  if k == "text" then
    if type(v) ~= "string" then
      return false, "directive text must be a string"
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
  if k == "chunks" then
    n = tointeger(n)
    if not n or n < 1 then
      return false, fmt("bad value '%s' for directive chunks (an integer >= 1)", tostring(v))
    end
  end
  return true, n
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
    error200 = { 200, "server_error", nil,
      "The server had an error while processing your request. Sorry about that!" },
  },
  anthropic = {
    ["429"] = { 429, "rate_limit_error", nil, "Number of requests has exceeded your rate limit." },
    ["500"] = { 500, "api_error", nil, "Internal server error" },
    ["529"] = { 529, "overloaded_error", nil, "Overloaded" },
    ["401"] = { 401, "authentication_error", nil, "invalid x-api-key" },
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

-- A 200 JSON body, subject to the body faults.
local function respond_json(res, api, body, d)
  local fault = d.fault
  if fault == "malformed" then
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

-- Sends a stream: events[first .. first + n - 1] are the n content deltas,
-- each preceded by chunk_delay_ms. Applies the stream faults.
local function send_stream(res, api, events, first, n, d)
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
  local delay = d.chunk_delay_ms
  if delay <= 0 and fault ~= "cut" then
    -- nothing to pace: one write, with a content-length
    res:respond(200, SSE_HEADERS, concat(events, "", 1, last))
    return
  end
  res:start(200, SSE_HEADERS)
  local from = 1
  if delay > 0 then
    local i = first
    for _ = 1, n do
      if i == skip then
        i = i + 1
      end
      if i > from and not res:write(concat(events, "", from, i - 1)) then
        return
      end
      aiorch.sleep(delay)
      from = i
      i = i + 1
    end
  end
  if fault == "cut" then
    res:write(concat(events, "", from, last))
    res:abort()
  else
    res:finish(concat(events, "", from, last))
  end
end

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
  return send_stream(res, "openai", events, 2, #pieces, d)
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
  return send_stream(res, "anthropic", events, 4, #pieces, d)
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
    if not d then
      req.directives = {}
      respond_invalid(res, api, 400, "mock: " .. err)
      req.completed_at = aiorch.now()
      return
    end
  end
  req.directives = d

  local body = req.body
  if body and body ~= "" then
    req.json = decode(body)
  end

  if d.latency_ms > 0 then
    aiorch.sleep(d.latency_ms)
  end
  local fault = d.fault
  if fault == "hang" then
    while true do
      aiorch.sleep(HANG_SLICE_MS)
    end
  end

  if STATUS_FAULTS[fault] then
    respond_error(res, api, fault, d)
  else
    local key = req.method .. " " .. route
    local fn = ROUTES[key]
    if fn then
      if type(req.json) ~= "table" then
        respond_invalid(res, api, 400, "We could not parse the JSON body of your request.")
      else
        fn(self, req, res, d)
      end
    elseif key == "GET /v1/models" then
      respond_json(res, api, MODELS[api], d)
    else
      respond_invalid(res, api, 404, fmt("Invalid URL (%s %s)", req.method, route))
    end
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
    seq = 0,
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

-- Forgets the recorded requests (the same table is kept).
function Mock:reset()
  local r = self.requests
  for i = #r, 1, -1 do
    r[i] = nil
  end
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
