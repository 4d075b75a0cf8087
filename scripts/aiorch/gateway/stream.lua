-- A gateway client's stream: one session per streamed request. The
-- orchestration hands it the canonical events of the provider that owns
-- the stream (aiorch.context's commit point: the first provider to send
-- content); the session writes them in the client's API.
--
-- Two ways to write: a provider that speaks the client's API (and a
-- request that came in through it) is relayed event by event, as it sent
-- them (same-API passthrough); any other is translated, each canonical
-- event through the client API's stream encoder (aiorch.wire.*).
--
-- Events come from the HTTP client's on_event, which may yield: a write
-- goes out at once, and a slow client (res:write yields under
-- backpressure) holds the upstream transfer back instead of growing a
-- buffer. Where the caller cannot yield, a writer task drains a queue, in
-- order.
local aiorch = require "aiorch"

local type = type
local ipairs = ipairs
local tostring = tostring
local setmetatable = setmetatable
local concat = table.concat
local gsub = string.gsub
local find = string.find
local spawn = aiorch.spawn
local isyieldable = coroutine.isyieldable

local _M = {}

local Session = {}
Session.__index = Session

-- res: the server response; encoder: the client API's stream encoder;
-- headers: the response headers (the provider and model are added at the
-- commit); api: the client's API ("openai", "anthropic"), whose providers
-- are relayed as they are.
function _M.session(res, encoder, headers, api)
  return setmetatable({ res = res, encoder = encoder, headers = headers, api = api, queue = nil, qn = 0,
    committed = false, sent = false, gone = false, closed = false, draining = false, writer = nil,
    provider = nil, model = nil, passthrough = false, held = nil, blocks = 0, open_block = false }, Session)
end

------------------------------------------------------------------------------
-- Writing

-- Writes first (when given), then what was queued meanwhile, in order.
local function drain(s, first)
  s.draining = true
  local chunk = first
  while not s.gone do
    if chunk == nil then
      local n = s.qn
      if n == 0 then
        break
      end
      local q = s.queue
      chunk = n == 1 and q[1] or concat(q, "", 1, n)
      s.queue, s.qn = nil, 0
    end
    if not s.sent then
      s.sent = true
      s.res:start(200, s.headers)
    end
    if not s.res:write(chunk) then
      s.gone = true
    end
    chunk = nil
  end
  s.draining = false
  s.writer = nil
end

function Session:push(bytes)
  if bytes == nil or bytes == "" then
    return
  end
  if self.qn == 0 and not (self.draining or self.writer) and isyieldable() then
    return drain(self, bytes) -- nothing waits before it: no queue
  end
  local n = self.qn + 1
  local q = self.queue
  if not q then
    q = {}
    self.queue = q
  end
  q[n] = bytes
  self.qn = n
  if not (self.draining or self.writer) then
    self.writer = spawn(drain, self)
  end
end

-- Waits until every queued byte is written (or the client is gone).
function Session:flush()
  local w = self.writer
  if w then
    w:await()
  end
  if self.qn > 0 then
    drain(self)
  end
end

-- Ends the stream with the given last bytes.
function Session:close(bytes)
  self:flush()
  if self.gone or self.closed then
    return
  end
  self.closed = true
  if not self.sent then
    self.sent = true
    self.res:start(200, self.headers)
  end
  self.res:finish(bytes)
end

------------------------------------------------------------------------------
-- Events

-- An upstream event as it came: its name (unless the default), its data.
local function sse_bytes(ev)
  local data = ev.data or ""
  if find(data, "\n", 1, true) then
    data = gsub(data, "\n", "\ndata: ")
  end
  local name = ev.event
  if name and name ~= "message" then
    return "event: " .. name .. "\ndata: " .. data .. "\n\n"
  end
  return "data: " .. data .. "\n\n"
end
_M.sse_bytes = sse_bytes

-- The events that end an upstream stream: held back in passthrough until
-- the orchestration has its answer (it may add other answers before them).
local function terminal(raw)
  local name = raw.event
  return raw.data == "[DONE]" or name == "message_delta" or name == "message_stop"
end

-- The stream is now provider's (info: see aiorch.context): the headers
-- name it, and its start goes out.
function Session:commit(provider, info, n)
  self.committed = true
  self.provider, self.model = provider, info.model
  if n and n > 1 then -- several answers at once: the body names the first's model
    self.model = info.first_model
  end
  local h = self.headers
  h["x-aiorch-provider"] = provider
  h["x-aiorch-model"] = info.model
  if info.dropped then
    h["x-aiorch-dropped"] = concat(info.dropped, ",")
  end
  self.passthrough = info.api == self.api and info.prelude ~= nil
  if self.passthrough then
    for _, ev in ipairs(info.prelude) do
      self:relay(ev.raw)
    end
  else
    self:push(self.encoder:start(self.model, n or 1))
  end
end

-- One upstream event in passthrough. Anthropic's content blocks are
-- counted, should a translated provider take over the stream.
function Session:relay(raw)
  if not raw or raw == self.last_raw then
    return -- one upstream event of several canonical ones (a whole tool call) goes out once
  end
  self.last_raw = raw
  if terminal(raw) then
    local held = self.held or {}
    held[#held + 1] = raw
    self.held = held
    return
  end
  local name = raw.event
  if name == "content_block_start" then
    self.blocks = self.blocks + 1
    self.open_block = true
  elseif name == "content_block_stop" then
    self.open_block = false
  end
  self:push(sse_bytes(raw))
end

-- on_event of the orchestration: the owner's canonical events; info comes
-- with the first content of each attempt.
function Session:event(ev, provider, info)
  if info then
    if not self.committed then
      self:commit(provider, info)
    elseif provider ~= self.provider then
      -- Another provider continues a cut answer. The same API goes on as it
      -- comes (its start skipped); another one is translated from here on.
      self.provider = provider
      if self.passthrough and info.api ~= self.api then
        self.passthrough = false
        self:push(self.encoder:resume(self.blocks, self.open_block))
      end
    end
  end
  if self.passthrough then
    return self:relay(ev.raw)
  end
  return self:push(self.encoder:event(ev, 0))
end

-- The canonical events of a whole answer (for answers that were not streamed).
local function events_of(r)
  local out = {}
  local content = r.content
  if type(content) ~= "table" then
    if r.response_text and r.response_text ~= "" then
      out[1] = { type = "text", text = r.response_text }
    end
    return out
  end
  local calls = 0
  for _, part in ipairs(content) do
    local t = part.type
    if t == "text" then
      if part.text ~= "" then
        out[#out + 1] = { type = "text", text = part.text }
      end
    elseif t == "tool_call" then
      out[#out + 1] = { type = "tool_call", index = calls, id = part.id, name = part.name }
      out[#out + 1] = { type = "tool_arguments", index = calls, text = part.arguments or "" }
      calls = calls + 1
    elseif t == "thinking" then
      out[#out + 1] = { type = "thinking", text = part.text or "" }
      if part.signature then
        out[#out + 1] = { type = "thinking_signature", signature = part.signature }
      end
    elseif t == "redacted_thinking" then
      out[#out + 1] = { type = "redacted_thinking", data = part.data }
    end
  end
  return out
end
_M.events_of = events_of

-- Ends a successful stream. successes: the answers, the streamed one (if
-- any) first; the others were not streamed and are written whole.
function Session:finish(successes)
  local enc = self.encoder
  local first = 1
  if not self.committed then
    -- Nothing was streamed (an empty answer, an adapter that cannot
    -- stream, a strategy that answered otherwise): all of it goes now.
    -- The headers name every one that answered.
    local names, models = {}, {}
    for i, one in ipairs(successes) do
      names[i] = one.ia_provider_name
      models[i] = tostring(one.metadata and one.metadata.model or "-")
    end
    self:commit(concat(names, ","), { model = concat(models, ","), first_model = models[1] }, #successes)
    first = 0
  end
  if self.passthrough then
    if #successes == 1 then
      for _, raw in ipairs(self.held or {}) do
        self:push(sse_bytes(raw))
      end
      return self:close()
    end
    -- More answers than the one relayed: translated after it.
    self.passthrough = false
    self:push(enc:resume(self.blocks, self.open_block))
  end
  for i = first == 0 and 1 or 2, #successes do
    if first ~= 0 then
      self:push(enc:open_choice(i - 1))
    end
    for _, ev in ipairs(events_of(successes[i])) do
      self:push(enc:event(ev, i - 1))
    end
  end
  return self:close(enc:finish(successes))
end

-- Ends a stream that broke after it began: the API's error event.
function Session:fail(status, message, code)
  return self:close(self.encoder:error(status, message, code))
end

return _M
