-- Anthropic Messages adapter: POST {base_url}/v1/messages.
local cjson = require "cjson.safe"
local util = require "aiorch.adapter"

local fmt = string.format
local concat = table.concat
local type = type
local ipairs = ipairs
local setmetatable = setmetatable
local str, num, present = util.str, util.num, util.present

local _M = {
  name = "anthropic",
  -- The models this provider serves by default (aiorch serve routes by them).
  model_prefixes = { "claude-" },
  default_model = "claude-3-haiku-20240307",
  key_env = "ANTHROPIC_API_KEY",
  base_url_env = "ANTHROPIC_BASE_URL",
  model_env = "ANTHROPIC_MODEL",
  default_base_url = "https://api.anthropic.com",
  temperature_range = { 0, 1 },
  api_version = "2023-06-01",
  -- The API requires max_tokens on every request.
  default_max_tokens = 1024,
}

-- Per base URL: joined once, not on every request.
local urls = {}

function _M.build_request(config, request, opts)
  local body = {
    model = config.model or _M.default_model,
    max_tokens = request.max_tokens or config.max_tokens or _M.default_max_tokens,
    messages = { { role = "user", content = util.user_content(request) } },
    temperature = request.temperature,
  }
  if type(request.system_prompt) == "string" and request.system_prompt ~= "" then
    body.system = request.system_prompt
  end
  -- Continuing an answer another provider began: a last assistant turn is
  -- a prefill the model goes on from (it must not end in whitespace).
  local partial = request.continue_from
  if type(partial) == "string" and partial:find("%S") then
    body.messages[2] = { role = "assistant", content = (partial:gsub("%s+$", "")) }
  end
  local headers = {
    ["content-type"] = "application/json",
    ["x-api-key"] = config.key or "",
    ["anthropic-version"] = _M.api_version,
  }
  if opts and opts.stream then
    body.stream = true
    headers["accept"] = "text/event-stream"
  end
  local base = config.base_url or _M.default_base_url
  local url = urls[base]
  if not url then
    url = util.join_url(base, "/v1/messages")
    urls[base] = url
  end
  return {
    method = "POST",
    url = url,
    headers = headers,
    body = assert(cjson.encode(body)),
  }
end

local ERROR_KINDS = {
  authentication_error = "auth",
  permission_error = "auth",
  rate_limit_error = "rate_limited",
  overloaded_error = "server_error",
  api_error = "server_error",
  invalid_request_error = "bad_request",
  not_found_error = "bad_request",
  request_too_large = "bad_request",
}

-- {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}
local function body_error(e)
  local t = type(e) == "table" and str(e.type) or nil
  local msg = type(e) == "table" and (str(e.message) or t) or str(e) or "unknown error"
  return nil, ERROR_KINDS[t] or "server_error", "provider error: " .. util.excerpt(msg, 500),
    { provider_error = util.provider_error(e) }
end

local function text_of(content)
  local parts = {}
  if type(content) == "table" then
    for _, block in ipairs(content) do
      if type(block) == "table" and block.type == "text" and type(block.text) == "string" then
        parts[#parts + 1] = block.text
      end
    end
  end
  return concat(parts)
end

function _M.parse_response(config, status, headers, body)
  if status < 200 or status > 299 then
    return util.http_error(status, headers, body, util.error_object_message)
  end
  local doc, err = cjson.decode(body or "")
  if type(doc) ~= "table" then
    return nil, "parse", "malformed JSON body: " .. (err or "not an object")
  end
  if doc.type == "error" or present(doc.error) then
    return body_error(doc.error)
  end
  if type(doc.content) ~= "table" then
    return nil, "parse", "reply has no content array"
  end
  local u = type(doc.usage) == "table" and doc.usage or {}
  return {
    text = text_of(doc.content),
    model = str(doc.model) or config.model or _M.default_model,
    usage = { input_tokens = num(u.input_tokens), output_tokens = num(u.output_tokens) },
    finish_reason = str(doc.stop_reason),
  }
end

-- Stream parser for the named events: message_start, content_block_start,
-- content_block_delta, content_block_stop, message_delta, message_stop,
-- ping and error. Without message_stop the answer may be truncated.
local Parser = {}
Parser.__index = Parser

function Parser:event(ev)
  self.events = self.events + 1
  if self.err then
    return nil
  end
  local doc, err = cjson.decode(ev.data or "")
  if type(doc) ~= "table" then
    self.err = { "parse", "malformed stream event: " .. (err or "not an object") }
    return nil
  end
  local t = str(doc.type) or ev.event
  if t == "content_block_delta" then
    local d = doc.delta
    if type(d) == "table" and d.type == "text_delta" and type(d.text) == "string" and d.text ~= "" then
      local parts = self.parts
      parts[#parts + 1] = d.text
      return d.text
    end
  elseif t == "message_start" then
    local m = type(doc.message) == "table" and doc.message or {}
    self.model = str(m.model) or self.model
    local u = type(m.usage) == "table" and m.usage or {}
    self.input_tokens = num(u.input_tokens) or self.input_tokens
    self.output_tokens = num(u.output_tokens) or self.output_tokens
  elseif t == "message_delta" then
    local d = type(doc.delta) == "table" and doc.delta or {}
    self.finish_reason = str(d.stop_reason) or self.finish_reason
    local u = type(doc.usage) == "table" and doc.usage or {}
    self.output_tokens = num(u.output_tokens) or self.output_tokens
  elseif t == "message_stop" then
    self.done = true
  elseif t == "error" then
    local _, kind, msg, extra = body_error(doc.error)
    self.err = { kind, msg, extra }
  end
  return nil
end

function Parser:result()
  if self.err then
    return nil, self.err[1], self.err[2], self.err[3]
  end
  if not self.done then
    return nil, "stream_cut", fmt("stream ended after %d events without message_stop", self.events)
  end
  return {
    text = concat(self.parts),
    model = self.model or self.config.model or _M.default_model,
    usage = { input_tokens = self.input_tokens, output_tokens = self.output_tokens },
    finish_reason = self.finish_reason,
  }
end

function _M.stream_parser(config)
  return setmetatable({ config = config, parts = {}, events = 0, done = false }, Parser)
end

return _M
