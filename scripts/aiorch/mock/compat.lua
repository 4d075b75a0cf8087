-- The mock's OpenAI-compatible servers: Chat Completions as mock.lua
-- answers it, under each server's own path, with what each refuses and
-- adds (the presets of aiorch.compat). mock.lua routes a path here by its
-- first segment and hands over openai_chat (handler(H)).
--
--   /azure/openai/deployments/DEP/chat/completions?api-version=V
--           Azure OpenAI: the `api-key` header (401 without it, or with a
--           Bearer instead), api-version (404 without it, 400 for one
--           Azure does not have); DEP `missing-*` is DeploymentNotFound
--           (404), `throttled-*` a 429 with retry-after-ms; a user turn
--           holding "[filtered]" a content_filter 400; the answer names
--           the body's model, else the deployment.
--   /groq/openai/v1/chat/completions
--           Groq: refuses stream_options, logprobs, top_logprobs,
--           logit_bias, messages[].name and n other than 1 (400); a
--           stream's usage comes in the last chunk's x_groq.usage.
--   /mistral/v1/chat/completions
--           Mistral: refuses stream_options, seed (random_seed is its
--           name), max_completion_tokens, user, logprobs and top_logprobs
--           (422, {"detail": [...]}), tool-call ids that are not 9 letters
--           and digits (400); tool_choice "any" is "required"; its ids are
--           9 letters and digits; a stream sends each tool call whole, in
--           one chunk, and ends with usage.
--   /deepseek[/v1]/chat/completions
--           DeepSeek (thinking on): answers carry reasoning_content; an
--           assistant turn with tool calls sent back without its
--           reasoning_content is a 400.
--   /ollama/v1, /vllm/v1, /lmstudio/v1 (no key), /openrouter/api/v1,
--   /together/v1, /xai/v1 (a Bearer key): Chat Completions as it is.
-- Every server but the keyless ones answers 401 without a Bearer key.
local cjson = require "cjson.safe"

local fmt = string.format
local concat = table.concat
local ipairs, pairs, type, tostring, tonumber = ipairs, pairs, type, tostring, tonumber
local encode = cjson.encode
local null = cjson.null

local _M = {}

-- path prefix -> flavour, and what follows it to make an OpenAI path.
local PREFIXES = {
  { "^/groq/openai(/v1/.*)$", "groq" },
  { "^/mistral(/v1/.*)$", "mistral" },
  { "^/deepseek(/v1/.*)$", "deepseek" },
  { "^/deepseek(/.*)$", "deepseek", "/v1" },
  { "^/ollama(/v1/.*)$", "ollama" },
  { "^/vllm(/v1/.*)$", "vllm" },
  { "^/lmstudio(/v1/.*)$", "lmstudio" },
  { "^/openrouter/api(/v1/.*)$", "openrouter" },
  { "^/together(/v1/.*)$", "together" },
  { "^/xai(/v1/.*)$", "xai" },
}

-- The base URL of each server under the mock's (what a preset's base_url is
-- upstream: /chat/completions follows it; Azure's endpoint).
_M.BASES = {
  azure = "/azure", groq = "/groq/openai/v1", mistral = "/mistral/v1", deepseek = "/deepseek",
  ollama = "/ollama/v1", vllm = "/vllm/v1", lmstudio = "/lmstudio/v1", openrouter = "/openrouter/api/v1",
  together = "/together/v1", xai = "/xai/v1",
}

local KEYLESS = { ollama = true, vllm = true, lmstudio = true }

_M.AZURE_VERSIONS = {
  ["2024-02-01"] = true, ["2024-06-01"] = true, ["2024-10-21"] = true, ["2024-08-01-preview"] = true,
  ["2024-10-01-preview"] = true, ["2024-12-01-preview"] = true, ["2025-01-01-preview"] = true,
  ["2025-03-01-preview"] = true, ["2025-04-01-preview"] = true,
}

local function unescape(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- route(path) -> flavour, the OpenAI route to answer, and the
-- deployment (Azure); nil for a path of no flavour.
function _M.route(path)
  local route, query = path:match("^([^?]*)%??(.*)$")
  local dep = route:match("^/azure/openai/deployments/([^/]+)/chat/completions$")
  if dep then
    local version
    for k, v in query:gmatch("([^&=]+)=([^&]*)") do
      if k == "api-version" then
        version = unescape(v)
      end
    end
    return "azure", "/v1/chat/completions", unescape(dep), version
  end
  for _, p in ipairs(PREFIXES) do
    local rest = route:match(p[1])
    if rest then
      return p[2], (p[3] or "") .. rest
    end
  end
  return nil
end

local function respond(res, status, body, extra)
  local h = { ["content-type"] = "application/json" }
  for k, v in pairs(extra or {}) do
    h[k] = v
  end
  res:respond(status, h, body)
end

local function openai_error(message, etype, code, param)
  return encode { error = { message = message, type = etype or "invalid_request_error", param = param or null,
    code = code or null } }
end

local function bearer(req)
  local a = req.headers["authorization"]
  return type(a) == "string" and a:match("^Bearer%s+(%S+)") ~= nil
end

local function present(v)
  return v ~= nil and v ~= null
end

local function user_text(body)
  local out = {}
  for _, m in ipairs(type(body.messages) == "table" and body.messages or {}) do
    if type(m) == "table" and m.role == "user" then
      if type(m.content) == "string" then
        out[#out + 1] = m.content
      elseif type(m.content) == "table" then
        for _, p in ipairs(m.content) do
          if type(p) == "table" and type(p.text) == "string" then
            out[#out + 1] = p.text
          end
        end
      end
    end
  end
  return concat(out, "\n")
end

-- Each flavour's check: nil, or status, body[, headers].
local CHECK = {}

function CHECK.azure(req, body)
  local h = req.headers
  if not (type(h["api-key"]) == "string" and h["api-key"] ~= "") then
    return 401, encode { error = { code = "401", message = "Access denied due to invalid subscription key or wrong "
      .. "API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API "
      .. "endpoint for your resource." } }
  end
  local v = req.api_version
  if not v then
    return 404, encode { error = { code = "404", message = "Resource not found" } }
  elseif not _M.AZURE_VERSIONS[v] then
    return 400, encode { error = { code = "BadRequest", message = "API version not supported" } }
  end
  local dep = req.deployment
  if dep:match("^missing%-") then
    return 404, encode { error = { code = "DeploymentNotFound", message = "The API deployment for this resource "
      .. "does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try "
      .. "again." } }
  elseif dep:match("^throttled%-") then
    return 429, encode { error = { code = "429", message = fmt("Requests to the ChatCompletions_Create Operation "
      .. "under Azure OpenAI API version %s have exceeded token rate limit of your current OpenAI S0 pricing tier. "
      .. "Please retry after 2 seconds.", v) } }, { ["retry-after"] = "2", ["retry-after-ms"] = "1500" }
  end
  if user_text(body):find("[filtered]", 1, true) then
    return 400, encode { error = { message = "The response was filtered due to the prompt triggering Azure "
      .. "OpenAI's content management policy.", type = null, param = "prompt", code = "content_filter",
      status = 400, innererror = { code = "ResponsibleAIPolicyViolation", content_filter_result = {
        hate = { filtered = true, severity = "high" }, self_harm = { filtered = false, severity = "safe" },
        sexual = { filtered = false, severity = "safe" }, violence = { filtered = false, severity = "safe" } } } } }
  end
  if not present(body.model) then
    body.model = dep
  end
  return nil
end

local GROQ_REFUSED = { "stream_options", "logprobs", "top_logprobs", "logit_bias" }

function CHECK.groq(_, body)
  for _, k in ipairs(GROQ_REFUSED) do
    if present(body[k]) then
      return 400, openai_error(fmt("'%s' : property '%s' is unsupported", k, k))
    end
  end
  if present(body.n) and body.n ~= 1 then
    return 400, openai_error("'n' : number must be at most 1")
  end
  for i, m in ipairs(type(body.messages) == "table" and body.messages or {}) do
    if type(m) == "table" and present(m.name) then
      return 400, openai_error(fmt("'messages.%d' : for 'role:%s' the following must be satisfied[('messages.%d.name'"
        .. " : property 'name' is unsupported)]", i - 1, tostring(m.role), i - 1))
    end
  end
  return nil
end

local MISTRAL_REFUSED = { "stream_options", "seed", "max_completion_tokens", "user", "logprobs", "top_logprobs" }

local function valid9(id)
  return type(id) == "string" and #id == 9 and not id:find("[^A-Za-z0-9]")
end

function CHECK.mistral(_, body)
  for _, k in ipairs(MISTRAL_REFUSED) do
    if present(body[k]) then
      return 422, encode { detail = { { type = "extra_forbidden", loc = { "body", k }, msg = "Extra inputs are not "
        .. "permitted", input = body[k] } } }
    end
  end
  for _, m in ipairs(type(body.messages) == "table" and body.messages or {}) do
    if type(m) == "table" then
      local ids = {}
      for _, tc in ipairs(type(m.tool_calls) == "table" and m.tool_calls or {}) do
        ids[#ids + 1] = type(tc) == "table" and tc.id or nil
      end
      if m.role == "tool" then
        ids[#ids + 1] = m.tool_call_id
      end
      for _, id in ipairs(ids) do
        if not valid9(id) then
          return 400, encode { object = "error", message = fmt("Tool call id was %s but must be a-z, A-Z, 0-9, with "
            .. "a length of 9.", tostring(id)), type = "invalid_request_message_error", param = null, code = "3280" }
        end
      end
    end
  end
  if body.tool_choice == "any" then
    body.tool_choice = "required"
  end
  return nil
end

function CHECK.deepseek(_, body)
  for i, m in ipairs(type(body.messages) == "table" and body.messages or {}) do
    if type(m) == "table" and m.role == "assistant" and type(m.tool_calls) == "table" and m.tool_calls[1]
        and type(m.reasoning_content) ~= "string" then
      return 400, openai_error(fmt("Missing `reasoning_content` field in the assistant message at message index %d. "
        .. "For more information, please refer to the thinking mode guide.", i - 1), "invalid_request_error",
        "invalid_request_error")
    end
  end
  return nil
end

-- What each flavour changes in openai_chat's answer.
local SHAPE = {
  groq = { usage = "x_groq" },
  mistral = { usage = "always", whole_calls = true,
    call_id = function(seq, k, i) return fmt("M%04d%02d%02d", seq % 10000, k, i) end },
  deepseek = { reasoning = true },
}

-- handler(H) -> the handler of flavoured Chat Completions requests.
-- H: openai_chat (mock.lua's), and the request's flavour in req.flavour.
function _M.handler(H)
  return function(self, req, res, d)
    local fl = req.flavour
    local body = req.json
    if not KEYLESS[fl] and fl ~= "azure" and not bearer(req) then
      req.rejected = "no key"
      if fl == "mistral" then
        return respond(res, 401, encode { message = "Unauthorized", request_id = "mock" })
      end
      return respond(res, 401, openai_error("Invalid API Key", "invalid_request_error", "invalid_api_key"))
    end
    local check = CHECK[fl]
    if check then
      local status, err, headers = check(req, body)
      if status then
        req.rejected = err
        return respond(res, status, err, headers)
      end
    end
    local shape = SHAPE[fl]
    if shape and shape.reasoning and not d.reasoning_content then
      local c = {}
      for k, v in pairs(d) do
        c[k] = v
      end
      c.reasoning_content = 1
      d = c
    end
    req.shape = shape
    return H.openai_chat(self, req, res, d)
  end
end

return _M
