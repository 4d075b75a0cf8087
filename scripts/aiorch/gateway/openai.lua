-- The OpenAI Chat Completions shape: request -> AIRequest, StandardAIResponse
-- -> chat.completion, streams as chat.completion.chunk events + [DONE], and
-- OpenAI's error object.
local common = require "aiorch.gateway.common"

local fmt = string.format
local type = type
local ipairs = ipairs
local setmetatable = setmetatable
local concat = table.concat
local os_time = os.time
local js = common.json_string
local jw = common.json_word

local _M = { name = "openai" }

-- An answer from another API keeps OpenAI's vocabulary.
local FINISH = { end_turn = "stop", stop_sequence = "stop", max_tokens = "length", tool_use = "tool_calls" }

local function finish_reason(r)
  local f = r.metadata and r.metadata.finish_reason
  if type(f) ~= "string" then
    return "stop"
  end
  return FINISH[f] or f
end

local ERROR_TYPES = {
  [400] = "invalid_request_error", [401] = "invalid_request_error", [404] = "invalid_request_error",
  [405] = "invalid_request_error", [413] = "invalid_request_error", [429] = "rate_limit_exceeded",
  [500] = "server_error", [502] = "upstream_error", [503] = "server_error", [504] = "timeout",
}
local ERROR_CODES = { [401] = "invalid_api_key", [404] = "unknown_url", [405] = "method_not_allowed",
  [413] = "request_too_large" }

function _M.error_body(status, message, code)
  return concat { '{"error":{"message":', js(message), ',"type":', js(ERROR_TYPES[status] or "server_error"),
    ',"param":null,"code":', (code or ERROR_CODES[status]) and js(code or ERROR_CODES[status]) or "null", "}}" }
end

-- doc: the decoded body. Returns {request, model, stream, include_usage} or nil, message.
function _M.parse(doc)
  if type(doc.model) ~= "string" or doc.model == "" then
    return nil, "model: required (a string)"
  end
  local req, err = common.fold(doc.messages)
  if not req then
    return nil, err
  end
  local t
  t, err = common.number_field(doc, "temperature")
  if err then
    return nil, err
  end
  req.temperature = t
  local m
  m, err = common.int_field(doc, "max_completion_tokens")
  if err then
    return nil, err
  end
  if m == nil then
    m, err = common.int_field(doc, "max_tokens")
    if err then
      return nil, err
    end
  end
  req.max_tokens = m
  if not common.absent(doc.n) and doc.n ~= 1 then
    return nil, "n: only 1 is supported"
  end
  local so = doc.stream_options
  return {
    request = req,
    model = doc.model,
    stream = doc.stream == true,
    include_usage = type(so) == "table" and so.include_usage == true,
  }
end

local function usage_json(list)
  local i, o = 0, 0
  for _, r in ipairs(list) do
    local a, b = common.usage(r)
    i, o = i + a, o + b
  end
  return fmt('{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}', i, o, i + o)
end

local function choice(i, r)
  return '{"index":' .. (i - 1) .. ',"message":{"role":"assistant","content":' .. js(r.response_text)
    .. ',"refusal":null},"logprobs":null,"finish_reason":' .. jw(finish_reason(r)) .. "}"
end

-- successes: the responses to show (one choice each, in order); id: the
-- request's id (letters and digits, from the gateway).
function _M.render(successes, id, model)
  local first = successes[1]
  local choices
  if #successes == 1 then
    choices = choice(1, first)
  else
    local list = {}
    for i, r in ipairs(successes) do
      list[i] = choice(i, r)
    end
    choices = concat(list, ",")
  end
  return '{"id":"chatcmpl-' .. id .. '","object":"chat.completion","created":' .. os_time()
    .. ',"model":' .. jw(first and first.metadata and first.metadata.model or model)
    .. ',"choices":[' .. choices .. '],"usage":' .. usage_json(successes) .. ',"system_fingerprint":null}'
end

-- A stream writer: each method returns the bytes to send.
local Stream = {}
Stream.__index = Stream

function _M.stream(id, model, include_usage)
  local s = setmetatable({ include_usage = include_usage }, Stream)
  s.head = concat { 'data: {"id":', js("chatcmpl-" .. id), ',"object":"chat.completion.chunk","created":',
    os_time(), ',"model":', js(model), ',"system_fingerprint":null,"choices":[' }
  s.tail = include_usage and '],"usage":null}\n\n' or "]}\n\n"
  return s
end

-- The first bytes (the role chunk of each choice).
function Stream:start(n)
  local out = {}
  for i = 1, n or 1 do
    out[i] = concat { self.head, '{"index":', i - 1, ',"delta":{"role":"assistant","content":""},',
      '"logprobs":null,"finish_reason":null}', self.tail }
  end
  return concat(out)
end

function Stream:delta(text, index)
  return concat { self.head, '{"index":', index or 0, ',"delta":{"content":', js(text),
    '},"logprobs":null,"finish_reason":null}', self.tail }
end

-- The end of a successful stream: finish_reason per choice, usage, [DONE].
function Stream:finish(successes)
  local out = {}
  for i, r in ipairs(successes) do
    out[i] = concat { self.head, '{"index":', i - 1, ',"delta":{},"logprobs":null,"finish_reason":',
      js(finish_reason(r)), "}", self.tail }
  end
  if self.include_usage then
    out[#out + 1] = concat { self.head, '],"usage":', usage_json(successes), "}\n\n" }
  end
  out[#out + 1] = "data: [DONE]\n\n"
  return concat(out)
end

-- A stream that broke after it began: OpenAI's error object as a data
-- event; no [DONE], so a client cannot take the answer for complete.
function Stream.error(_, status, message, code)
  return "data: " .. _M.error_body(status, message, code) .. "\n\n"
end

-- GET /v1/models in OpenAI's list shape.
function _M.models(entries)
  local data = {}
  for i, e in ipairs(entries) do
    data[i] = concat { '{"id":', js(e.id), ',"object":"model","created":0,"owned_by":', js(e.owner), "}" }
  end
  return '{"object":"list","data":[' .. concat(data, ",") .. "]}"
end

return _M
