-- The gateway's response cache: an answer the gateway gave is given again,
-- without calling a provider, to an identical request.
--
-- The key is exact: the canonical request (aiorch.canonical) without what
-- does not change the answer (the client's key, `user`, `metadata`, the
-- policy, headers such as tracing ones), after the route (the client
-- API), whether it streams, the model, the strategy and providers it was
-- routed to, the headers that change what is sent (X-Aiorch-Allow-Drop,
-- Anthropic's version and betas) and (namespace = "client") the client's
-- name. Entries are per client API: what one stored is served to the same
-- API only (its bytes are that API's). In memory the request is written
-- by cjson (keys_of_request); for Redis, field by field with sorted keys,
-- the same in every process. Before any of that, a request's exact bytes
-- may name its key (bytes_key): a repeated request is answered before its
-- body is decoded.
--
-- An entry is what the client got: the status 200 answer's headers that
-- say who answered, and its body, or, for a stream, its bytes. A hit
-- writes them again, a stream's events one by one, so that it is replayed
-- with its chunking, its tool-call deltas and its thinking. At its first
-- hit the entry's usage is rewritten to report the input as cached (and
-- the native answer's metadata.cached = true, cost_usd = 0). Only a
-- complete answer is stored: not an error, a stream that broke, one whose
-- client went away or one that ran out of time.
--
-- Tiers: memory (aiorch.cache, an LRU bounded by bytes, per process), then
-- the shared Redis tier (aiorch.state.redis's cache_get/cache_set) when
-- the gateway has `redis = {...}`: a miss in memory asks Redis, a Redis
-- hit is kept in memory too; a store goes to both. Redis that fails or is
-- slow (cache_timeout_ms) is a miss, never an error.
--
-- Single-flight: while a request is being answered for a key, identical
-- requests wait for it (at most max_waiters) and get what it sends, a
-- stream's events as they come; when it ends with nothing for them (an
-- error) they go on by themselves.
local aiorch = require "aiorch"
local store = require "aiorch.cache"
local state = require "aiorch.state"
local json = require "aiorch.json"
local cjson = require "cjson.safe"

local fmt = string.format
local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local tointeger = math.tointeger
local math_type = math.type
local floor = math.floor
local sort = table.sort
local concat = table.concat
local find = string.find
local sub = string.sub
local byte = string.byte
local spack = string.pack
local sunpack = string.unpack
local setmetatable = setmetatable
local os_time = os.time
local now = aiorch.now
local spawn = aiorch.spawn
local sleep = aiorch.sleep

local _M = {}

_M.default_max_bytes = 64 * 1024 * 1024
_M.default_max_entries = 65536
_M.default_max_entry_bytes = 4 * 1024 * 1024
_M.default_ttl_ms = 3600 * 1000
_M.default_max_ttl_ms = 24 * 3600 * 1000
_M.default_max_waiters = 1000

------------------------------------------------------------------------------
-- Configuration

local FIELDS = { enabled = true, max_bytes = true, max_entries = true, max_entry_bytes = true, ttl_ms = true,
  max_ttl_ms = true, deterministic_only = true, routes = true, redis = true, max_waiters = true, namespace = true }

-- The routes whose answers may be cached (the gateway's names).
_M.ROUTES = { "/v1/chat/completions", "/v1/messages", "/{version}/models/{model}:generateContent",
  "/{version}/models/{model}:streamGenerateContent", "/v1/orchestrate" }

local function int_field(raw, name, least, most, default, where)
  local v = raw[name]
  if v == nil then
    return default
  end
  local n = type(v) == "number" and tointeger(v) or nil
  if not n or n < least or n > most then
    return nil, fmt("%s.%s: must be an integer from %d to %d", where, name, least, most)
  end
  return n
end

-- The configuration's `cache` (true, or a table) checked: the settings
-- with their defaults, or nil, message.
function _M.check(raw, where)
  where = where or "cache"
  if raw == true then
    raw = {}
  end
  if type(raw) ~= "table" then
    return nil, where .. ": must be true or a table {max_bytes = ..., ttl_ms = ..., ...}"
  end
  for k in pairs(raw) do
    if not FIELDS[k] then
      return nil, fmt("%s: unknown field '%s'", where, tostring(k))
    end
  end
  local c = {}
  local err
  for _, f in ipairs({
    { "max_bytes", 0, 1 << 40, _M.default_max_bytes },
    { "max_entries", 1, 1 << 30, _M.default_max_entries },
    { "max_entry_bytes", 1, 1 << 32, _M.default_max_entry_bytes },
    { "ttl_ms", 1, 365 * 24 * 3600 * 1000, _M.default_ttl_ms },
    { "max_ttl_ms", 1, 365 * 24 * 3600 * 1000, _M.default_max_ttl_ms },
    { "max_waiters", 0, 1000000, _M.default_max_waiters },
  }) do
    c[f[1]], err = int_field(raw, f[1], f[2], f[3], f[4], where)
    if not c[f[1]] then
      return nil, err
    end
  end
  if c.ttl_ms > c.max_ttl_ms then
    return nil, fmt("%s.ttl_ms: must not exceed max_ttl_ms (%d)", where, c.max_ttl_ms)
  end
  for _, b in ipairs({ "enabled", "deterministic_only", "redis" }) do
    if raw[b] ~= nil and type(raw[b]) ~= "boolean" then
      return nil, fmt("%s.%s: must be true or false", where, b)
    end
  end
  c.enabled = raw.enabled ~= false
  c.deterministic_only = raw.deterministic_only == true
  c.redis = raw.redis ~= false
  if raw.namespace ~= nil and raw.namespace ~= "none" and raw.namespace ~= "client" then
    return nil, where .. '.namespace: must be "none" (one cache for every client) or "client" (one per client key)'
  end
  c.per_client = raw.namespace == "client"
  local routes = raw.routes or _M.ROUTES
  if type(routes) ~= "table" then
    return nil, where .. ".routes: must be a list of routes"
  end
  c.routes = {}
  local known = {}
  for _, r in ipairs(_M.ROUTES) do
    known[r] = true
  end
  for i, r in ipairs(routes) do
    if not known[r] then
      return nil, fmt("%s.routes[%d]: '%s' is not a route whose answers can be cached (%s)", where, i,
        tostring(r), concat(_M.ROUTES, ", "))
    end
    c.routes[r] = true
  end
  return c
end

------------------------------------------------------------------------------
-- The key

-- Top-level fields of the canonical request that do not change the answer.
local NOT_KEYED = { raw = true, user = true, metadata = true, policy = true }

local function mixed_order(a, b)
  local ta, tb = type(a), type(b)
  if ta ~= tb then
    return ta < tb
  end
  return a < b
end

local function keys_of(t)
  local ks, n, mixed = {}, 0, false
  for k in pairs(t) do
    n = n + 1
    ks[n] = k
    mixed = mixed or type(k) ~= "string"
  end
  if n > 1 then
    sort(ks, mixed and mixed_order or nil) -- (strings alone: the plain order, no Lua call per comparison)
  end
  return ks, n
end

-- Writes v into buf (from n + 1); returns the new n. Strings carry their
-- length, so that no two values write the same text.
local write_value
local function write_table(buf, n, t, skip)
  local len = #t
  if len > 0 or json.is_array(t) then
    n = n + 1
    buf[n] = "["
    for i = 1, len do
      n = write_value(buf, n, t[i])
    end
    n = n + 1
    buf[n] = "]"
    return n
  end
  local ks, kn = keys_of(t)
  n = n + 1
  buf[n] = "{"
  for i = 1, kn do
    local k = ks[i]
    if not (skip and skip[k]) then
      n = write_value(buf, n, k)
      n = write_value(buf, n, t[k])
    end
  end
  n = n + 1
  buf[n] = "}"
  return n
end

function write_value(buf, n, v)
  local tv = type(v)
  if tv == "string" then
    buf[n + 1], buf[n + 2] = #v .. ":", v
    return n + 2
  elseif tv == "number" then
    local i = math_type(v) == "integer" and v or (v == floor(v) and v >= -2 ^ 53 and v <= 2 ^ 53 and floor(v))
    buf[n + 1] = i and "i" .. tointeger(i) .. ";" or fmt("f%.17g;", v)
    return n + 1
  elseif tv == "boolean" then
    buf[n + 1] = v and "T" or "F"
    return n + 1
  elseif tv == "table" then
    return write_table(buf, n, v)
  end
  buf[n + 1] = "N" -- json.null, and whatever JSON cannot hold
  return n + 1
end

-- The request headers that change an answer besides those that route it:
-- the fields a provider may drop, Anthropic's version and betas.
local KEYED_HEADERS = { "x-aiorch-allow-drop", "anthropic-version", "anthropic-beta" }

-- The keys of a request (see the top of the file): the head (what routes
-- and shapes it) with the request written two ways.
--   memory    cjson's text of the request: fast, and the same for the same
--             request in one process (its tables are built in the same
--             order); a request that cjson cannot write, or writes
--             otherwise (keys in another order), is keyed by the portable
--             text or misses, never hits wrongly. cjson writes numbers
--             with 14 digits: the seed, the one field with more, follows
--             in full.
--   portable  the request written field by field, keys sorted: the same
--             in every process, for the Redis tier; made when needed.
-- The canonical request's fields, in a fixed order (docs/canonical.md).
local KEYED_FIELDS = { "context", "extra", "frequency_penalty", "logprobs", "max_tokens", "messages", "n",
  "parallel_tool_calls", "presence_penalty", "reasoning", "response_format", "seed", "stop", "stream_options",
  "system_prompt", "temperature", "tool_choice", "tools", "top_k", "top_logprobs", "top_p", "user_question" }
local KNOWN = {}
for _, f in ipairs(KEYED_FIELDS) do
  KNOWN[f] = true
end

-- cjson's text of the request's keyed fields, or nil (a field it does not
-- know, a value cjson cannot write). The fields go into a new table in a
-- fixed order, so that the same fields come out of cjson in the same order.
-- (One constructor, KEYED_FIELDS in their order: the table is sized once.)
local function fast_text(r)
  for k in pairs(r) do
    if not (KNOWN[k] or NOT_KEYED[k]) then
      return nil
    end
  end
  return cjson.encode({ context = r.context, extra = r.extra, frequency_penalty = r.frequency_penalty,
    logprobs = r.logprobs, max_tokens = r.max_tokens, messages = r.messages, n = r.n,
    parallel_tool_calls = r.parallel_tool_calls, presence_penalty = r.presence_penalty, reasoning = r.reasoning,
    response_format = r.response_format, seed = r.seed, stop = r.stop, stream_options = r.stream_options,
    system_prompt = r.system_prompt, temperature = r.temperature, tool_choice = r.tool_choice, tools = r.tools,
    top_k = r.top_k, top_logprobs = r.top_logprobs, top_p = r.top_p, user_question = r.user_question })
end

local function keys_of_request(c, x, api, request, info, rt)
  local head = _M.key_head(c, x, api, info, rt)
  local text = fast_text(request)
  local seed = request.seed
  return { head = head, request = request, portable = nil,
    memory = text and head .. "\0j" .. text .. (seed ~= nil and "\0s" .. tostring(seed) or "") or nil }
end

local function portable(k)
  local p = k.portable
  if not p then
    local buf = { k.head, "\0" }
    local n = write_table(buf, 2, k.request, NOT_KEYED)
    p = concat(buf, "", 1, n)
    k.portable = p
  end
  return p
end

local function memory_key(k)
  return k.memory or portable(k)
end

-- The portable key of a request, as the Redis tier has it.
function _M.key_of(c, x, api, request, info, rt)
  return portable(keys_of_request(c, x, api, request, info, rt))
end

-- What routes and shapes a request's answer, before the request itself.
function _M.key_head(c, x, api, info, rt)
  local hd = x.req.headers
  local buf = { x.route, info.stream and "S" or "P", tostring(info.model), "\0", rt.strategy or "", "\0",
    hd[KEYED_HEADERS[1]] or "", "\0", hd[KEYED_HEADERS[2]] or "", "\0", hd[KEYED_HEADERS[3]] or "", "\0" }
  local n = #buf
  for _, p in ipairs(rt.providers or {}) do
    buf[n + 1], buf[n + 2] = p, ","
    n = n + 2
  end
  if api.api == "gemini" and info.stream then
    n = n + 1
    buf[n] = find(x.req.path, "alt=sse", 1, true) and "\0sse" or "\0json"
  end
  if c.cfg.per_client then
    n = n + 1
    buf[n] = "\0c:" .. tostring(x.client and x.client.name or "")
  end
  return concat(buf, "", 1, n)
end

-- The key of a request's bytes: its body, its path (a Gemini model is in
-- it), its client and every header the answer depends on, the routing
-- ones included. A request whose bytes were answered from the cache (or
-- stored in it) before gets an alias of this key to the canonical one, so
-- that the same bytes again are answered without decoding them. Anything
-- else that differs (a tracing header, another client key of the same
-- client...) only misses the alias: the canonical key still finds the
-- entry.
local function bytes_key(x)
  local req = x.req
  local h = req.headers
  local path = req.path
  local q = find(path, "?", 1, true)
  local client = x.client
  -- (one concatenation of them all: no table)
  return "\1" .. (q and sub(path, 1, q - 1) or path) .. (q and find(path, "alt=sse", q, true) and "\0sse\0" or "\0\0")
    .. (client and client.name or "") .. "\0" .. (h["x-aiorch-strategy"] or "") .. "\0"
    .. (h["x-aiorch-providers"] or "") .. "\0" .. (h["x-aiorch-allow-drop"] or "") .. "\0"
    .. (h["x-aiorch-policy"] or "") .. "\0" .. (h["anthropic-version"] or "") .. "\0"
    .. (h["anthropic-beta"] or "") .. "\0" .. (req.body or "")
end

-- A 128-bit hash of s as 32 hex digits: the Redis tier's key (the whole
-- key is kept in the entry and compared on a hit, so a collision is a miss).
local P1, P2 = 0x100000001b3, 0x9E3779B97F4A7C15
local function hash(s)
  local h1, h2 = -3750763034362895579, 0x2545F4914F6CDD1D ~ #s
  local len = #s
  local i = 1
  while i + 31 <= len do
    local a, b, cc, d = sunpack("<i8i8i8i8", s, i)
    h1 = (h1 ~ a) * P1
    h2 = (h2 ~ b) * P2
    h1 = (h1 ~ cc) * P1
    h2 = (h2 ~ d) * P2
    i = i + 32
  end
  while i <= len do
    local b = s:byte(i)
    h1 = (h1 ~ b) * P1
    h2 = (h2 ~ b) * P2
    i = i + 1
  end
  h1 = (h1 ~ (h2 >> 29)) * P2
  h2 = (h2 ~ (h1 >> 31)) * P1
  return fmt("%016x%016x", h1, h2)
end
_M.hash = hash

------------------------------------------------------------------------------
-- Usage reported as cached

-- The usage is rewritten in the answer's text, where it stands: the JSON
-- around it is scanned, not decoded (a body with an empty array would be
-- decoded by dkjson, in Lua, at many times the cost of the rest of a
-- miss), and only the small usage objects are decoded and encoded again.

local function blank_end(s, i)
  return find(s, "[^ \t\r\n]", i)
end

-- The index of the quote that ends the string starting at i.
local function string_end(s, i)
  local j = i + 1
  while true do
    local q = find(s, '["\\]', j)
    if not q then
      return nil
    end
    if byte(s, q) == 92 then
      j = q + 2
    else
      return q
    end
  end
end

-- The index of the last byte of the JSON value starting at i.
local function value_end(s, i)
  local ch = byte(s, i)
  if ch == 34 then
    return string_end(s, i)
  elseif ch == 123 or ch == 91 then -- to the matching bracket
    local depth, j = 0, i
    while true do
      j = find(s, '[{}%[%]"]', j)
      if not j then
        return nil
      end
      local c = byte(s, j)
      if c == 34 then
        j = string_end(s, j)
        if not j then
          return nil
        end
      elseif c == 123 or c == 91 then
        depth = depth + 1
      else
        depth = depth - 1
        if depth == 0 then
          return j
        end
      end
      j = j + 1
    end
  end
  local e = find(s, "[,}%]%s]", i) -- a number, true, false, null
  return e and e - 1 or #s
end

-- Calls fn(key, from, to) for each member of the object whose "{" is at
-- i, fn(nil, from, to) for each element of an array; returns its end.
local function each(s, i, fn)
  local close = byte(s, i) == 123 and 125 or 93
  local j = blank_end(s, i + 1)
  if j and byte(s, j) == close then
    return j
  end
  while j do
    local key
    if close == 125 then
      if byte(s, j) ~= 34 then
        return nil
      end
      local ke = string_end(s, j)
      local colon = ke and blank_end(s, ke + 1)
      if not colon or byte(s, colon) ~= 58 then
        return nil
      end
      key = sub(s, j + 1, ke - 1)
      j = blank_end(s, colon + 1)
      if not j then
        return nil
      end
    end
    local ve = value_end(s, j)
    if not ve then
      return nil
    end
    fn(key, j, ve)
    j = blank_end(s, ve + 1)
    local c = j and byte(s, j)
    if c == close then
      return j
    elseif c ~= 44 then
      return nil
    end
    j = blank_end(s, j + 1)
  end
  return nil
end

-- Appends to edits the usage object s[from..to] rewritten as cached for
-- kind: "openai", "anthropic", "gemini" or "native".
local function edit_usage(s, from, to, kind, edits)
  local text = sub(s, from, to)
  if byte(text, 1) ~= 123 or find(text, "[", 1, true) then
    return
  end
  local u = cjson.decode(text)
  if type(u) ~= "table" then
    return
  end
  if kind == "openai" then
    if type(u.prompt_tokens) ~= "number" then
      return
    end
    local d = type(u.prompt_tokens_details) == "table" and u.prompt_tokens_details or {}
    d.cached_tokens = u.prompt_tokens
    u.prompt_tokens_details = d
  elseif kind == "anthropic" then -- cached input is counted apart
    if type(u.input_tokens) ~= "number" then
      return
    end
    u.cache_read_input_tokens = u.input_tokens + (tonumber(u.cache_read_input_tokens) or 0)
      + (tonumber(u.cache_creation_input_tokens) or 0)
    u.input_tokens = 0
    if u.cache_creation_input_tokens ~= nil then
      u.cache_creation_input_tokens = 0
    end
  elseif kind == "gemini" then
    if type(u.promptTokenCount) ~= "number" then
      return
    end
    u.cachedContentTokenCount = u.promptTokenCount
  else -- native: the canonical usage
    if type(u.input_tokens) ~= "number" then
      return
    end
    u.cached_input_tokens = u.input_tokens
  end
  local out = cjson.encode(u)
  if out then
    edits[#edits + 1] = { from, to, out }
  end
end

-- The edits of one answer object (any API's shape, or a native
-- StandardAIResponse) at i.
local function edit_answer(s, i, edits)
  local spans, native = {}, false
  each(s, i, function(key, from, to)
    if key == "ia_provider_name" then
      native = true
    elseif key then
      spans[key] = { from, to }
    end
  end)
  local m = spans.metadata
  if native and m and byte(s, m[1]) == 123 then
    local has_cached = false
    each(s, m[1], function(key, from, to)
      if key == "usage" then
        edit_usage(s, from, to, "native", edits)
      elseif key == "cost_usd" then
        edits[#edits + 1] = { from, to, "0" }
      elseif key == "cached" then
        has_cached = true
        edits[#edits + 1] = { from, to, "true" }
      end
    end)
    if not has_cached then -- (an insertion: to is before from)
      local first = blank_end(s, m[1] + 1)
      edits[#edits + 1] = { m[1] + 1, m[1], byte(s, first) == 125 and '"cached":true' or '"cached":true,' }
    end
    return
  end
  local u = spans.usage
  if u then
    edit_usage(s, u[1], u[2], find(s, '"prompt_tokens"', u[1], true) and "openai" or "anthropic", edits)
  end
  local msg = spans.message -- Anthropic's message_start
  if msg and byte(s, msg[1]) == 123 then
    each(s, msg[1], function(key, from, to)
      if key == "usage" then
        edit_usage(s, from, to, "anthropic", edits)
      end
    end)
  end
  local g = spans.usageMetadata
  if g then
    edit_usage(s, g[1], g[2], "gemini", edits)
  end
end

-- The edits of an API's answer (or one event of its stream): each usage
-- object found by its name. A key in the text with its quotes bare is a
-- key (inside a string they would be escaped), and a usage object holds
-- numbers and objects, no string with a brace: %b{} finds its end.
local function edit_api(s, edits)
  local from = 1
  while true do
    local _, b, name = find(s, '"(usage%a*)":%s*{', from)
    if not b then
      return
    end
    local _, e = find(s, "^%b{}", b)
    if not e then
      return
    end
    if name == "usageMetadata" then
      edit_usage(s, b, e, "gemini", edits)
    elseif name == "usage" then
      local p = find(s, '"prompt_tokens"', b, true)
      edit_usage(s, b, e, p and p < e and "openai" or "anthropic", edits)
    end
    from = e + 1
  end
end

-- A JSON body (an answer, or a list of them) with its usage reported as
-- cached (as it was when it does not scan).
local function cached_body(body)
  local i = blank_end(body, 1)
  local first = i and byte(body, i)
  local edits = {}
  if not find(body, '"ia_provider_name"', 1, true) then
    edit_api(body, edits)
  elseif first == 123 then
    edit_answer(body, i, edits)
  elseif first == 91 then
    each(body, i, function(_, from)
      if byte(body, from) == 123 then
        edit_answer(body, from, edits)
      end
    end)
  end
  if #edits == 0 then
    return body
  end
  sort(edits, function(a, b) return a[1] < b[1] end)
  local out, at = {}, 1
  for _, e in ipairs(edits) do
    out[#out + 1] = sub(body, at, e[1] - 1)
    out[#out + 1] = e[3]
    at = e[2] + 1
  end
  out[#out + 1] = sub(body, at)
  return concat(out)
end
_M.cached_body = cached_body

-- One server-sent event with its usage reported as cached.
local function cached_frame(frame)
  if not find(frame, "sage", 1, true) then -- usage, usageMetadata: most frames have neither
    return frame
  end
  local head, data, tail = frame:match("^(.-data: )(.-)(\n\n)$")
  if not data or find(data, "\n", 1, true) then
    return frame
  end
  local patched = cached_body(data)
  return patched == data and frame or head .. patched .. tail
end

-- The server-sent events of a stream's bytes, each with its blank line.
local function frames_of(bytes)
  local out, n, from = {}, 0, 1
  while true do
    local a, b = find(bytes, "\n\n", from, true)
    if not a then
      if from <= #bytes then
        n = n + 1
        out[n] = sub(bytes, from)
      end
      return out
    end
    n = n + 1
    out[n] = cached_frame(sub(bytes, from, b))
    from = b + 1
  end
end

------------------------------------------------------------------------------
-- Recording what a client gets

-- The headers an entry keeps: those that say who answered and how.
local KEPT = { "content-type", "cache-control", "x-aiorch-strategy", "x-aiorch-provider", "x-aiorch-model",
  "x-aiorch-attempts", "x-aiorch-dropped" }

-- Stands for the response writer (res) while a request is answered:
-- every header set gets X-Aiorch-Cache, and, when rec is true, what is
-- sent is recorded (up to max bytes).
local Recorder = {}
Recorder.__index = Recorder

local function recorder(res, tag, rec, max)
  return setmetatable({ res = res, tag = tag, rec = rec, max = max, status = nil, headers = nil, body = nil,
    parts = nil, np = 0, bytes = 0, complete = false, broken = false, flight = nil }, Recorder)
end

local wake -- below: tells a flight's followers that its leader sent more

local function record(self, data)
  if not self.rec or data == nil or data == "" then
    return
  end
  local b = self.bytes + #data
  if b > self.max then
    self.rec, self.parts = false, nil -- too large to keep
    return
  end
  self.bytes = b
  local np = self.np + 1
  self.parts[np] = data
  self.np = np
end

function Recorder:respond(status, headers, body)
  headers["x-aiorch-cache"] = self.tag
  self.status, self.headers, self.complete = status, headers, true
  if self.rec then
    if body and #body > self.max then
      self.rec = false
    else
      self.body = body
    end
  end
  return self.res:respond(status, headers, body)
end

function Recorder:start(status, headers)
  headers = headers or {}
  headers["x-aiorch-cache"] = self.tag
  self.status, self.headers, self.parts = status, headers, self.rec and {} or nil
  if self.flight then
    wake(self.flight)
  end
  return self.res:start(status, headers)
end

function Recorder:write(data)
  record(self, data)
  if self.flight then
    wake(self.flight)
  end
  local ok, kind, msg = self.res:write(data)
  if not ok then
    self.broken = true
  end
  return ok, kind, msg
end

function Recorder:finish(data)
  record(self, data)
  self.complete = true
  if self.flight then
    wake(self.flight)
  end
  return self.res:finish(data)
end

function Recorder:abort()
  self.broken = true
  return self.res:abort()
end

function Recorder:on_error(...)
  return self.res:on_error(...)
end

-- The entry of what was recorded, or nil when it is not to be kept.
local function entry_of(rec, x)
  if not (rec.rec and rec.complete) or rec.broken or rec.status ~= 200 or x.broken or x.aborted then
    return nil
  end
  local rh = rec.headers
  local h = { ["content-type"] = rh["content-type"], ["cache-control"] = rh["cache-control"], -- KEPT
    ["x-aiorch-strategy"] = rh["x-aiorch-strategy"], ["x-aiorch-provider"] = rh["x-aiorch-provider"],
    ["x-aiorch-model"] = rh["x-aiorch-model"], ["x-aiorch-attempts"] = rh["x-aiorch-attempts"],
    ["x-aiorch-dropped"] = rh["x-aiorch-dropped"] }
  -- As it was sent: the usage is rewritten, and a stream cut into its
  -- events, at the first hit (ready), so that an entry never hit costs its
  -- miss nothing more.
  if rec.parts then -- a stream
    return { headers = h, bytes = concat(rec.parts, "", 1, rec.np), size = rec.bytes + 256, ready = false }
  end
  local body = rec.body or ""
  return { headers = h, body = body, size = #body + 256, ready = false }
end

-- Makes an entry ready to replay: its usage reported as cached, a
-- stream's events apart.
local function ready(e)
  if not e.ready then
    if e.bytes then
      e.frames, e.bytes = frames_of(e.bytes), nil
    else
      e.body = cached_body(e.body)
    end
    e.ready = true
  end
  return e
end

------------------------------------------------------------------------------
-- Entries in Redis: one string (string.pack) holding the whole key, so
-- that a hash that collides is a miss; its wall-clock expiry, so that the
-- memory tier keeps it no longer than Redis does.

local MAGIC = "AIC1"

local function encode_entry(key, e, expires_at)
  local parts = { MAGIC, spack("<s4d", key, expires_at) }
  local hn = 0
  for _, k in ipairs(KEPT) do
    if e.headers[k] then
      hn = hn + 1
    end
  end
  parts[#parts + 1] = spack("<B", hn)
  for _, k in ipairs(KEPT) do
    local v = e.headers[k]
    if v then
      parts[#parts + 1] = spack("<s2s4", k, tostring(v))
    end
  end
  -- As it was sent (entries are stored before any hit made them ready).
  if e.bytes then
    parts[#parts + 1] = spack("<Bs4", 2, e.bytes)
  else
    parts[#parts + 1] = spack("<Bs4", 0, e.body)
  end
  return concat(parts)
end

-- The entry in v if it is key's (else nil), and its wall-clock expiry.
local function decode_entry(key, v)
  if type(v) ~= "string" or sub(v, 1, 4) ~= MAGIC then
    return nil
  end
  local ok, e, expires_at = pcall(function()
    local k, exp, pos = sunpack("<s4d", v, 5)
    if k ~= key then
      return nil
    end
    local hn
    hn, pos = sunpack("<B", v, pos)
    local h = {}
    for _ = 1, hn do
      local name, value
      name, value, pos = sunpack("<s2s4", v, pos)
      h[name] = value
    end
    local kind
    kind, pos = sunpack("<B", v, pos)
    local bytes = sunpack("<s4", v, pos)
    if kind == 2 then
      return { headers = h, bytes = bytes, size = #v, ready = false }, exp
    end
    return { headers = h, body = bytes, size = #v, ready = false }, exp
  end)
  if not ok then
    return nil
  end
  return e, expires_at
end

local function wall_ms()
  return os_time() * 1000
end

------------------------------------------------------------------------------
-- The cache of one gateway

local Cache = {}
Cache.__index = Cache

local COUNTS = { "hit", "miss", "bypass", "stored", "memory_hit", "redis_hit", "flight_hit", "redis_error" }
local PREFIX = "ca\31" -- the counters' keys in the state

-- A cache on cfg (from check()).
function _M.new(cfg)
  local c = setmetatable({ cfg = cfg, flights = {}, counts = {} }, Cache)
  for _, k in ipairs(COUNTS) do
    c.counts[k] = 0
  end
  if cfg.max_bytes > 0 then
    -- The aliases of requests' bytes (bytes_key) get an eighth of the
    -- bytes, in a store of their own: they never push answers out.
    local for_aliases = cfg.max_bytes // 8
    c.memory = store.new { max_bytes = math.max(1, cfg.max_bytes - for_aliases), max_entries = cfg.max_entries }
    if for_aliases > 0 then
      c.aliases = store.new { max_bytes = for_aliases, max_entries = cfg.max_entries }
    end
  end
  c.source = state.counts_source(PREFIX, c.counts) -- the server's totals across workers
  c.bytes_fn = function() return c.memory and c.memory.bytes + (c.aliases and c.aliases.bytes or 0) or 0 end
  c.entries_fn = function() return c.memory and c.memory.entries or 0 end
  c.evictions_fn = function() return c.memory and c.memory.evictions or 0 end
  state.gauge("cache_bytes", c.bytes_fn)
  state.gauge("cache_entries", c.entries_fn)
  state.gauge("cache_evictions", c.evictions_fn)
  return c
end

function Cache:close()
  state.unsource(self.source)
  state.ungauge("cache_bytes", self.bytes_fn)
  state.ungauge("cache_entries", self.entries_fn)
  state.ungauge("cache_evictions", self.evictions_fn)
end

-- The server's figures: {hit, miss, bypass, stored, ..., bytes, entries, evictions}.
function Cache:metrics()
  local out = {}
  if state.shared() then
    local t = state.read(PREFIX)
    for _, k in ipairs(COUNTS) do
      out[k] = t[PREFIX .. k] or 0
    end
  else
    for _, k in ipairs(COUNTS) do
      out[k] = self.counts[k]
    end
  end
  out.bytes = state.gauge_total("cache_bytes", self.bytes_fn)
  out.entries = state.gauge_total("cache_entries", self.entries_fn)
  out.evictions = state.gauge_total("cache_evictions", self.evictions_fn)
  return out
end

-- The Prometheus lines of the cache, through add and header (those of
-- aiorch.gateway.prometheus).
function Cache:render(add, header)
  local m = self:metrics()
  header("aiorch_cache_requests_total", "Requests the response cache looked at, by result (hit, miss, bypass).",
    "counter")
  for _, k in ipairs({ "hit", "miss", "bypass" }) do
    add(fmt('aiorch_cache_requests_total{result="%s"} %d', k, m[k]))
  end
  header("aiorch_cache_hits_total", "Cache hits by where the answer came from (memory, redis, a request in flight).",
    "counter")
  for _, k in ipairs({ "memory", "redis", "flight" }) do
    add(fmt('aiorch_cache_hits_total{tier="%s"} %d', k, m[k .. "_hit"]))
  end
  header("aiorch_cache_stores_total", "Answers stored in the cache.", "counter")
  add(fmt("aiorch_cache_stores_total %d", m.stored))
  header("aiorch_cache_evictions_total", "Entries the memory tier pushed out for room.", "counter")
  add(fmt("aiorch_cache_evictions_total %d", m.evictions))
  header("aiorch_cache_redis_errors_total", "Redis tier operations that failed (the cache went on without it).",
    "counter")
  add(fmt("aiorch_cache_redis_errors_total %d", m.redis_error))
  header("aiorch_cache_bytes", "Bytes held by the memory tier (all workers).", "gauge")
  add(fmt("aiorch_cache_bytes %d", m.bytes))
  header("aiorch_cache_entries", "Entries held by the memory tier (all workers).", "gauge")
  add(fmt("aiorch_cache_entries %d", m.entries))
end

local function count(c, k)
  c.counts[k] = c.counts[k] + 1
end

local function redis_tier(c)
  return c.cfg.redis and state.redis() or nil
end

-- The entry under the keys k: memory first, then Redis (kept in memory then).
function Cache:lookup(k)
  local mem = self.memory
  local key = memory_key(k)
  if mem then
    local e, expires = mem:get(key)
    if e then
      count(self, "memory_hit")
      return e, expires - now()
    end
  end
  local tier = redis_tier(self)
  if not tier then
    return nil
  end
  local pk = portable(k)
  local v, kind = tier:cache_get(hash(pk))
  if v == nil then
    if kind then
      count(self, "redis_error")
    end
    return nil
  end
  local e, expires_at = decode_entry(pk, v)
  if not e then
    return nil
  end
  count(self, "redis_hit")
  local left = expires_at - wall_ms()
  if mem and left >= 1000 then
    mem:set(key, e, e.size, left)
  end
  return e, left
end

-- Points the bytes' key of x at key (the request's own, with no cache
-- header that would change what is looked up or stored) for ttl_ms.
function Cache:alias(x, key, ttl_ms)
  local aliases = self.aliases
  local h = x.req.headers
  if aliases and ttl_ms >= 1 and not (h["cache-control"] or h["x-aiorch-cache-ttl"]) then
    aliases:set(x.bytes_key or bytes_key(x), key, #key, ttl_ms) -- (quick made it, mostly)
  end
end

function Cache:store(x, k, e, ttl_ms)
  local key = memory_key(k)
  count(self, "stored")
  if self.memory then
    self.memory:set(key, e, e.size, ttl_ms)
  end
  self:alias(x, key, ttl_ms)
  local tier = redis_tier(self)
  if tier then
    local pk = portable(k)
    local ok = tier:cache_set(hash(pk), encode_entry(pk, e, wall_ms() + ttl_ms), ttl_ms)
    if not ok then
      count(self, "redis_error")
    end
  end
end

------------------------------------------------------------------------------
-- Answering

-- Writes an entry to the client: the body, or the stream event by event.
local function replay(x, e)
  if not e.ready then
    ready(e)
  end
  local eh = e.headers
  -- (one constructor: KEPT's names, then the hit's own)
  local h = { ["content-type"] = eh["content-type"], ["cache-control"] = eh["cache-control"],
    ["x-aiorch-strategy"] = eh["x-aiorch-strategy"], ["x-aiorch-provider"] = eh["x-aiorch-provider"],
    ["x-aiorch-model"] = eh["x-aiorch-model"], ["x-aiorch-attempts"] = eh["x-aiorch-attempts"],
    ["x-aiorch-dropped"] = eh["x-aiorch-dropped"], ["x-request-id"] = x.id, ["x-aiorch-cache"] = "hit" }
  x.provider, x.model, x.attempts = eh["x-aiorch-provider"], eh["x-aiorch-model"], "cache:hit"
  x.tokens_in, x.tokens_out = 0, 0
  if not e.frames then
    return x:respond(200, h, e.body)
  end
  x.stream, x.status, x.started = true, 200, true
  local res = x.res
  res:start(200, h)
  for _, f in ipairs(e.frames) do
    if not res:write(f) then
      return
    end
  end
  res:finish()
end

-- Cache-Control's directives: no_cache, no_store.
local function directives(v)
  if type(v) ~= "string" then
    return false, false
  end
  v = v:lower()
  return find(v, "no-cache", 1, true) ~= nil, find(v, "no-store", 1, true) ~= nil
end

local function bypass(c, x, answer, ...)
  count(c, "bypass")
  x.res = recorder(x.res, "bypass", false, 0)
  return answer(x, ...)
end

-- A request in flight for a key (its leader): followers wait on its
-- signal, a task that sleeps until it is cancelled, which wakes every
-- follower at once. The leader wakes them at each piece of a stream (a
-- new signal for the next one) and when it ends (done).
local function park()
  sleep(1e9)
end

function wake(f)
  local s = f.signal
  if s then
    f.signal = nil -- (the next waiter makes the next one)
    s:cancel()
  end
end

-- The signal to wait on: made by the first follower to wait (none is made
-- while nobody waits), again if the follower that made it went away.
local function signal_of(f)
  local s = f.signal
  if not s or s:status() == "cancelled" or s:status() == "done" then
    s = spawn(park)
    f.signal = s
  end
  return s
end

local flight_guard = {
  __close = function(f)
    if f.c.flights[f.key] == f then
      f.c.flights[f.key] = nil
    end
    f.done = true
    wake(f)
  end,
}

-- Answers x with what the leader of flight f sends: a stream piece by
-- piece as it comes (so that a follower's first event is not held until
-- the leader's last), else the entry it stored. Returns false when the
-- leader ended with nothing for x (an error, nothing stored): x is then
-- answered by itself.
local function follow(c, x, f)
  f.waiters = f.waiters + 1
  local rec, res = f.rec, x.res
  local n = 0 -- the leader's pieces written to x
  while true do
    local parts = rec.parts
    if parts and rec.status == 200 and rec.np > n then
      if n == 0 then
        local h = { ["x-request-id"] = x.id, ["x-aiorch-cache"] = "hit" }
        for _, k in ipairs(KEPT) do
          h[k] = rec.headers[k]
        end
        x.provider, x.model, x.attempts = h["x-aiorch-provider"], h["x-aiorch-model"], "cache:flight"
        x.tokens_in, x.tokens_out = 0, 0
        x.stream, x.status, x.started = true, 200, true
        count(c, "hit")
        count(c, "flight_hit")
        res:start(200, h)
      end
      while parts and n < rec.np do
        n = n + 1
        if not res:write(parts[n]) then
          return true -- the follower's client went away
        end
        parts = rec.parts
      end
    end
    if n > 0 and not rec.parts then
      res:abort() -- the leader's stream grew too large to follow
      return true
    end
    if f.done then
      break -- (what it sent is written: nothing yields since)
    end
    signal_of(f):await()
  end
  if n > 0 then
    if rec.complete then
      res:finish() -- as the leader's ended (its error event included)
    else
      res:abort() -- the leader was cut before its end
    end
    return true
  end
  local e = f.entry
  if e then
    count(c, "hit")
    count(c, "flight_hit")
    replay(x, e)
    return true
  end
  return false
end

-- Answers x from the memory tier if its bytes were seen (see bytes_key),
-- before its body is decoded: true when it did.
function _M.quick(c, x)
  local aliases = c.aliases
  if not (aliases and c.cfg.routes[x.route]) then
    return false
  end
  local h = x.req.headers
  if h["cache-control"] or h["x-aiorch-cache-ttl"] then
    return false
  end
  local bk = bytes_key(x)
  x.bytes_key = bk -- (a miss stores its alias under it)
  local key = aliases:get(bk)
  local e = key and c.memory:get(key)
  if not e then
    return false
  end
  local counts = c.counts
  counts.hit, counts.memory_hit = counts.hit + 1, counts.memory_hit + 1
  x.strategy = e.headers["x-aiorch-strategy"]
  replay(x, e)
  return true
end

-- Answers x (whose request is decoded and routed) from the cache, or
-- through answer(x, api, request, info, rt) and then stores what the
-- client got.
function _M.serve(c, x, api, request, info, rt, answer)
  local cfg = c.cfg
  -- On for this request: its endpoint is listed, and neither its client
  -- key nor its model's alias says false; either saying true turns it on
  -- where cache.enabled = false.
  local by_client = x.client and x.client.cache
  local alias = rt.alias and x.state.config.aliases[rt.alias]
  local by_alias = alias and alias.cache
  local on
  if by_client == false or by_alias == false then
    on = false
  else
    on = by_client or by_alias or cfg.enabled
  end
  if not (on and cfg.routes[x.route]) then
    return bypass(c, x, answer, api, request, info, rt)
  end
  if cfg.deterministic_only and request.temperature ~= 0 and request.seed == nil then
    return bypass(c, x, answer, api, request, info, rt)
  end
  local h = x.req.headers
  local no_cache, no_store = directives(h["cache-control"])
  local ttl_ms = cfg.ttl_ms
  local asked = h["x-aiorch-cache-ttl"]
  if asked ~= nil then
    local s = tointeger(tonumber(asked))
    if not s or s < 0 or s * 1000 > cfg.max_ttl_ms then
      return x:fail(400, fmt("X-Aiorch-Cache-TTL: must be a whole number of seconds from 0 to %d",
        cfg.max_ttl_ms // 1000))
    end
    if s == 0 then
      no_store = true
    else
      ttl_ms = s * 1000
    end
  end
  if no_cache and no_store then
    return bypass(c, x, answer, api, request, info, rt)
  end
  local keys = keys_of_request(c, x, api, request, info, rt)
  local key = memory_key(keys)
  if not no_cache then
    local e, left = c:lookup(keys)
    if e then
      count(c, "hit")
      c:alias(x, key, left)
      return replay(x, e)
    end
    -- Single-flight: the same request already on its way upstream.
    local f = c.flights[key]
    if f and f.waiters < cfg.max_waiters then
      if follow(c, x, f) then
        return
      end
      e = c:lookup(keys) -- (stored by another meanwhile)
      if e then
        count(c, "hit")
        return replay(x, e)
      end
    end
  end
  -- no-cache: the answer is fetched whatever is stored (and stored in its
  -- place); the cache did not answer, so the header says bypass.
  local tag = no_cache and "bypass" or "miss"
  count(c, tag)
  local rec = recorder(x.res, tag, not no_store, cfg.max_entry_bytes)
  x.res = rec
  if no_store then
    return answer(x, api, request, info, rt)
  end
  local f
  if not c.flights[key] then
    f = setmetatable({ c = c, key = key, waiters = 0, entry = nil, rec = rec, done = false, signal = nil },
      flight_guard)
    c.flights[key] = f
    rec.flight = f
  end
  local _ <close> = f
  answer(x, api, request, info, rt)
  local e = entry_of(rec, x)
  if e then
    if f then
      f.entry = e
      f.done = true
      wake(f) -- the followers answer at once
    end
    c:store(x, keys, e, ttl_ms)
  end
end

return _M
