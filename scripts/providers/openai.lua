-- OpenAI Chat Completions adapter: POST {base_url}/chat/completions.
local cjson = require "cjson.safe"
local util = require "aiorch.adapter"

local fmt = string.format
local concat = table.concat
local type = type
local setmetatable = setmetatable
local str, num, present = util.str, util.num, util.present

local _M = {
  name = "openai",
  -- The models this provider serves by default (aiorch serve routes by them).
  model_prefixes = { "gpt-", "o1", "o3", "o4", "chatgpt-" },
  default_model = "gpt-4o-mini",
  key_env = "OPENAI_API_KEY",
  base_url_env = "OPENAI_BASE_URL",
  model_env = "OPENAI_MODEL",
  default_base_url = "https://api.openai.com/v1",
  temperature_range = { 0, 2 },
}

-- Per base URL and per key: built once, not on every request.
local urls, bearers = {}, {}

function _M.build_request(config, request, opts)
  local messages = {}
  if type(request.system_prompt) == "string" and request.system_prompt ~= "" then
    messages[1] = { role = "system", content = request.system_prompt }
  end
  messages[#messages + 1] = { role = "user", content = util.user_content(request) }
  -- Continuing an answer another provider began: it is ours so far.
  if type(request.continue_from) == "string" and request.continue_from ~= "" then
    messages[#messages + 1] = { role = "assistant", content = request.continue_from }
    messages[#messages + 1] = { role = "user", content = util.CONTINUE }
  end

  local body = {
    model = config.model or _M.default_model,
    messages = messages,
    max_tokens = request.max_tokens,
    temperature = request.temperature,
  }
  local key = config.key or ""
  local auth = bearers[key]
  if not auth then
    auth = "Bearer " .. key
    bearers[key] = auth
  end
  local headers = {
    ["content-type"] = "application/json",
    ["authorization"] = auth,
  }
  if opts and opts.stream then
    body.stream = true
    body.stream_options = { include_usage = true }
    headers["accept"] = "text/event-stream"
  end
  local base = config.base_url or _M.default_base_url
  local url = urls[base]
  if not url then
    url = util.join_url(base, "/chat/completions")
    urls[base] = url
  end
  return {
    method = "POST",
    url = url,
    headers = headers,
    body = assert(cjson.encode(body)),
  }
end

-- An error object in a 200 body or a stream chunk: classify by its type/code.
local function body_error(e)
  local t = type(e) == "table" and (str(e.code) or str(e.type)) or ""
  local kind = "server_error"
  if t:find("rate_limit", 1, true) or t == "insufficient_quota" then
    kind = "rate_limited"
  elseif t == "invalid_api_key" or t:find("auth", 1, true) or t:find("permission", 1, true) then
    kind = "auth"
  elseif t == "invalid_request_error" then
    kind = "bad_request"
  end
  local msg = type(e) == "table" and (str(e.message) or str(e.type)) or str(e) or "unknown error"
  return nil, kind, "provider error: " .. util.excerpt(msg, 500), { provider_error = util.provider_error(e) }
end

local function usage_of(u)
  if type(u) ~= "table" then
    return nil
  end
  return { input_tokens = num(u.prompt_tokens), output_tokens = num(u.completion_tokens) }
end

function _M.parse_response(config, status, headers, body)
  if status < 200 or status > 299 then
    return util.http_error(status, headers, body, util.error_object_message)
  end
  local doc, err = cjson.decode(body or "")
  if type(doc) ~= "table" then
    return nil, "parse", "malformed JSON body: " .. (err or "not an object")
  end
  if present(doc.error) then
    return body_error(doc.error)
  end
  local choice = type(doc.choices) == "table" and doc.choices[1] or nil
  if type(choice) ~= "table" or type(choice.message) ~= "table" then
    return nil, "parse", "reply has no choices[1].message"
  end
  local msg = choice.message
  return {
    -- A refusal comes instead of content; it is still the model's answer.
    text = str(msg.content) or str(msg.refusal) or "",
    model = str(doc.model) or config.model or _M.default_model,
    usage = usage_of(doc.usage) or {},
    finish_reason = str(choice.finish_reason),
  }
end

-- Stream parser: data chunks carry choices[1].delta.content; with
-- include_usage a last chunk has usage and no choices; then "data: [DONE]".
local Parser = {}
Parser.__index = Parser

function Parser:event(ev)
  self.events = self.events + 1
  local data = ev.data
  if data == "[DONE]" then
    self.done = true
    return nil
  end
  if self.err then
    return nil
  end
  local doc, err = cjson.decode(data or "")
  if type(doc) ~= "table" then
    self.err = { "parse", "malformed stream chunk: " .. (err or "not an object") }
    return nil
  end
  if present(doc.error) then
    local _, kind, msg, extra = body_error(doc.error)
    self.err = { kind, msg, extra }
    return nil
  end
  self.model = str(doc.model) or self.model
  local u = usage_of(doc.usage)
  if u then
    self.usage = u
  end
  local choice = type(doc.choices) == "table" and doc.choices[1] or nil
  if type(choice) ~= "table" then
    return nil
  end
  self.finish_reason = str(choice.finish_reason) or self.finish_reason
  local delta = type(choice.delta) == "table" and str(choice.delta.content) or nil
  if delta and delta ~= "" then
    local parts = self.parts
    parts[#parts + 1] = delta
    return delta
  end
  return nil
end

function Parser:result()
  if self.err then
    return nil, self.err[1], self.err[2], self.err[3]
  end
  -- Without [DONE] or a finish_reason the answer may be truncated.
  if not (self.done or self.finish_reason) then
    return nil, "stream_cut", fmt("stream ended after %d events without [DONE]", self.events)
  end
  return {
    text = concat(self.parts),
    model = self.model or self.config.model or _M.default_model,
    usage = self.usage or {},
    finish_reason = self.finish_reason,
  }
end

function _M.stream_parser(config)
  return setmetatable({ config = config, parts = {}, events = 0, done = false }, Parser)
end

return _M
