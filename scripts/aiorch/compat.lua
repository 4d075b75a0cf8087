-- OpenAI-compatible providers without an adapter file of their own: one
-- generic adapter on wire.openai, made per preset (groq, mistral, ...,
-- and azure) or per entry of the gateway's configuration
-- (`providers.NAME = {api = "openai", base_url, api_key_env, models,
-- quirks}`). Quirks adjust what is sent to servers that differ from
-- OpenAI; each translates a client's field or refuses it by name, never
-- drops it unsaid.
local json = require "aiorch.json"
local cjson = require "cjson.safe"
local util = require "aiorch.adapter"
local common = require "aiorch.providers_common"
local wire = require "aiorch.wire.openai"
local wire_common = require "aiorch.wire.common"

local fmt = string.format
local type = type
local pairs = pairs
local ipairs = ipairs
local error = error
local tostring = tostring
local next = next
local tonumber = tonumber
local concat = table.concat
local find = string.find
local byte = string.byte
local str, num = util.str, util.num

local _M = {}

local EMPTY = {} -- never written

local function translate(how)
  return { "translate", how = how }
end

local function refuse(why)
  return { "refuse", why = why }
end

-- Each quirk: what it does (docs), and the fidelity cells it changes.
_M.QUIRKS = {
  no_stream_options = {
    doc = "`stream_options` is never sent (the server refuses it); the server reports usage at the "
      .. "end of every stream by itself (Groq in `x_groq.usage`, read as usage)",
    cells = { stream_options = translate("not sent: the server reports a stream's usage by itself "
      .. "(Groq: `x_groq.usage`)") },
  },
  max_tokens = {
    doc = "the limit is sent as `max_tokens`: a client's `max_completion_tokens` is renamed (the server "
      .. "ignores that name)",
    cells = { max_tokens = translate("`max_tokens`; a client's `max_completion_tokens` is sent as `max_tokens`") },
  },
  max_completion_tokens = {
    doc = "the limit is sent as `max_completion_tokens`: a client's `max_tokens` is renamed (the server "
      .. "refuses that name)",
    cells = { max_tokens = translate("`max_completion_tokens`; a client's `max_tokens` is renamed") },
  },
  tool_call_id_9 = {
    doc = "tool-call ids must be 9 letters and digits: any other id is replaced, in the assistant's "
      .. "`tool_calls` and in the `tool` message that answers it alike, by one made of it (the same "
      .. "in every request of a conversation; distinct ids stay distinct); valid ids, the server's "
      .. "own, are sent as they are",
    cells = { tool_call = translate("the assistant message's `tool_calls`; an id that is not 9 letters "
      .. "and digits is sent as one made of it (the same in every turn)") },
  },
  reasoning_content = {
    doc = "thinking sent back goes in the assistant message's `reasoning_content` (the server asks for "
      .. "it back after tool calls)",
    cells = {
      thinking = translate("the assistant message's `reasoning_content` (a signature has no place)"),
      ["thinking.unsigned"] = translate("the assistant message's `reasoning_content`"),
    },
  },
  no_tool_choice_without_tools = {
    doc = "a `tool_choice` without tools: `auto` and `none` are not sent (they change nothing without "
      .. "tools); `required` or a named tool is refused by name",
    cells = { tool_choice = translate("as OpenAI; without tools, `auto` and `none` are not sent and "
      .. "`required` or a named tool is refused") },
  },
  random_seed = {
    doc = "`seed` is sent as `random_seed`",
    cells = { seed = translate("`random_seed`") },
  },
}

local OPENAI_PREFIXES = { "gpt-", "o1", "o3", "o4", "chatgpt-" }

-- Ready settings by name: `preset = "groq"` in an entry, or the name
-- itself (`aiorch ask --providers groq`). base_url: the URL that
-- `/chat/completions` follows; key_env: false for local servers.
_M.PRESETS = {
  azure = {
    label = "Azure OpenAI",
    base_url = nil, -- the resource's endpoint: AZURE_OPENAI_ENDPOINT or base_url
    key_env = "AZURE_OPENAI_API_KEY", base_url_env = "AZURE_OPENAI_ENDPOINT",
    model_env = "AZURE_OPENAI_DEPLOYMENT", auth = "api-key", azure = true,
    default_model = "gpt-4o-mini", model_prefixes = OPENAI_PREFIXES,
    docs = "https://learn.microsoft.com/azure/ai-foundry/openai/reference",
  },
  ollama = {
    label = "Ollama (its OpenAI-compatible /v1)",
    base_url = "http://127.0.0.1:11434/v1", key_env = false,
    default_model = "llama3.1:8b", quirks = { "max_tokens" },
    docs = "https://docs.ollama.com/api/openai-compatibility",
  },
  vllm = {
    label = "vLLM",
    base_url = "http://127.0.0.1:8000/v1", key_env = false,
    default_model = "meta-llama/Llama-3.1-8B-Instruct", quirks = { "no_tool_choice_without_tools" },
    docs = "https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html",
  },
  lmstudio = {
    label = "LM Studio",
    base_url = "http://127.0.0.1:1234/v1", key_env = false,
    default_model = "qwen2.5-7b-instruct", quirks = { "max_tokens" },
    docs = "https://lmstudio.ai/docs/app/api/endpoints/openai",
  },
  groq = {
    label = "Groq",
    base_url = "https://api.groq.com/openai/v1", key_env = "GROQ_API_KEY",
    default_model = "llama-3.3-70b-versatile", model_prefixes = { "llama-", "meta-llama/", "openai/gpt-oss-",
      "qwen/", "moonshotai/" },
    quirks = { "no_stream_options" },
    refuse = {
      logprobs = "Groq returns no log-probabilities", top_logprobs = "Groq returns no log-probabilities",
      ["message.name"] = "Groq refuses messages[].name", n = "Groq answers one choice per request",
    },
    docs = "https://console.groq.com/docs/openai",
  },
  mistral = {
    label = "Mistral",
    base_url = "https://api.mistral.ai/v1", key_env = "MISTRAL_API_KEY",
    default_model = "mistral-small-latest", model_prefixes = { "mistral-", "ministral-", "magistral-",
      "codestral-", "devstral-", "pixtral-", "open-mistral-" },
    quirks = { "no_stream_options", "tool_call_id_9", "random_seed", "max_tokens" },
    refuse = {
      user = "Mistral's chat has no end-user field", logprobs = "Mistral returns no log-probabilities",
      top_logprobs = "Mistral returns no log-probabilities",
    },
    docs = "https://docs.mistral.ai/api/#tag/chat",
  },
  deepseek = {
    label = "DeepSeek",
    base_url = "https://api.deepseek.com", key_env = "DEEPSEEK_API_KEY",
    default_model = "deepseek-chat", model_prefixes = { "deepseek-" },
    quirks = { "reasoning_content" },
    docs = "https://api-docs.deepseek.com/guides/thinking_mode",
  },
  openrouter = {
    label = "OpenRouter",
    base_url = "https://openrouter.ai/api/v1", key_env = "OPENROUTER_API_KEY",
    default_model = "openai/gpt-4o-mini", model_prefixes = { "openrouter/" },
    docs = "https://openrouter.ai/docs/api-reference/overview",
  },
  together = {
    label = "Together AI",
    base_url = "https://api.together.xyz/v1", key_env = "TOGETHER_API_KEY",
    default_model = "meta-llama/Llama-3.3-70B-Instruct-Turbo", model_prefixes = { "meta-llama/", "Qwen/",
      "deepseek-ai/", "mistralai/", "google/" },
    docs = "https://docs.together.ai/docs/openai-api-compatibility",
  },
  xai = {
    label = "xAI",
    base_url = "https://api.x.ai/v1", key_env = "XAI_API_KEY",
    default_model = "grok-3-mini", model_prefixes = { "grok-" },
    docs = "https://docs.x.ai/docs/api-reference",
  },
}

-- Presets in the order the docs list them.
_M.PRESET_ORDER = { "azure", "ollama", "vllm", "lmstudio", "groq", "mistral", "deepseek", "openrouter", "together",
  "xai" }

_M.default_azure_api_version = "2024-10-21"

-- The URLs an adapter keeps built (Azure's: per deployment and version).
local URLS_MAX = 1024

-- Tool-call ids ------------------------------------------------------------

local B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

local function valid9(id)
  return #id == 9 and not find(id, "[^A-Za-z0-9]")
end

-- 9 base-62 digits of a 64-bit FNV-1a hash of salt .. id.
local function hash9(id, salt)
  local h = -3750763034362895579 -- the FNV offset basis, as a signed 64-bit integer
  local s = salt > 0 and salt .. ":" .. id or id
  for i = 1, #s do
    h = (h ~ byte(s, i)) * 1099511628211
  end
  h = h & 0x7fffffffffffffff
  local out = {}
  for i = 1, 9 do
    local d = h % 62
    out[i] = B62:sub(d + 1, d + 1)
    h = h // 62
  end
  return concat(out)
end

-- The ids of a request's messages (OpenAI shape) mapped to 9 letters and
-- digits: valid ids keep theirs, others get a hash of themselves (salted
-- again on a clash, so distinct ids stay distinct). Returns the map, or
-- nil when every id is valid.
function _M.map_ids(messages)
  local ids, order = {}, {}
  local function see(id)
    if type(id) == "string" and not ids[id] then
      ids[id] = true
      order[#order + 1] = id
    end
  end
  for _, m in ipairs(messages) do
    if type(m) == "table" then
      if type(m.tool_calls) == "table" then
        for _, tc in ipairs(m.tool_calls) do
          see(type(tc) == "table" and tc.id or nil)
        end
      end
      see(m.tool_call_id)
    end
  end
  local taken, map, any = {}, {}, false
  for _, id in ipairs(order) do
    if valid9(id) then
      taken[id] = true
    end
  end
  for _, id in ipairs(order) do
    if not valid9(id) then
      local salt, short = 0, hash9(id, 0)
      while taken[short] do
        salt = salt + 1
        short = hash9(id, salt)
      end
      taken[short] = true
      map[id] = short
      any = true
    end
  end
  return any and map or nil
end

-- Messages with mapped ids: copies of the messages that change.
local function remap_messages(messages, map)
  local out = json.array()
  for i, m in ipairs(messages) do
    local c = m
    if type(m) == "table" and (type(m.tool_calls) == "table" or map[m.tool_call_id]) then
      c = {}
      for k, v in pairs(m) do
        c[k] = v
      end
      if map[m.tool_call_id] then
        c.tool_call_id = map[m.tool_call_id]
      end
      if type(m.tool_calls) == "table" then
        local calls = json.array()
        for j, tc in ipairs(m.tool_calls) do
          if type(tc) == "table" and map[tc.id] then
            local t = {}
            for k, v in pairs(tc) do
              t[k] = v
            end
            t.id = map[tc.id]
            calls[j] = t
          else
            calls[j] = tc
          end
        end
        c.tool_calls = calls
      end
    end
    out[i] = c
  end
  return out
end

-- Quirks on a request body ------------------------------------------------

local function absent(v)
  return v == nil or v == cjson.null
end

-- Applies the quirks to doc (an OpenAI request body: the caller's copy,
-- its messages list is replaced, never written). Returns whether it
-- changed; raises "invalid request: ..." for a field refused by name.
local function apply(q, doc, name)
  local changed = false
  if q.no_stream_options and doc.stream_options ~= nil then
    doc.stream_options, changed = nil, true
  end
  if q.max_tokens and doc.max_completion_tokens ~= nil then
    if absent(doc.max_tokens) then
      doc.max_tokens = doc.max_completion_tokens
    end
    doc.max_completion_tokens, changed = nil, true
  end
  if q.max_completion_tokens and doc.max_tokens ~= nil then
    if absent(doc.max_completion_tokens) then
      doc.max_completion_tokens = doc.max_tokens
    end
    doc.max_tokens, changed = nil, true
  end
  if q.random_seed and doc.seed ~= nil then
    if absent(doc.random_seed) then
      doc.random_seed = doc.seed
    end
    doc.seed, changed = nil, true
  end
  if q.no_tool_choice_without_tools and not absent(doc.tool_choice)
      and (type(doc.tools) ~= "table" or #doc.tools == 0) then
    local tc = doc.tool_choice
    if tc ~= "auto" and tc ~= "none" then
      error(fmt("invalid request: tool_choice %s without tools is not supported by provider %s",
        type(tc) == "string" and tc or "naming a tool", name), 0)
    end
    doc.tool_choice, changed = nil, true
    if type(doc.tools) == "table" then
      doc.tools = nil -- an empty list: nothing to send
    end
  end
  if q.tool_call_id_9 and type(doc.messages) == "table" then
    local map = _M.map_ids(doc.messages)
    if map then
      doc.messages, changed = remap_messages(doc.messages, map), true
    end
  end
  return changed
end

_M.apply_quirks = apply

-- The thinking of each assistant message (by its index), taken out of a
-- copy of req: wire.openai refuses thinking in requests, the quirk sends
-- it as reasoning_content. Returns req (unchanged) or the copy, and the
-- texts by message index.
local function take_thinking(req)
  local msgs = req.messages
  if type(msgs) ~= "table" then
    return req, nil
  end
  local texts, out
  for i, m in ipairs(msgs) do
    if m.role == "assistant" and type(m.content) == "table" then
      local keep, text = {}, {}
      for _, p in ipairs(m.content) do
        if p.type == "thinking" then
          text[#text + 1] = p.text or ""
        elseif p.type ~= "redacted_thinking" then
          keep[#keep + 1] = p
        end
      end
      if #text > 0 then
        texts = texts or {}
        texts[i] = concat(text)
        out = out or {}
        local c = {}
        for k, v in pairs(m) do
          c[k] = v
        end
        c.content = #keep > 0 and json.array(keep) or ""
        out[i] = c
      end
    end
  end
  if not out then
    return req, nil
  end
  local c = {}
  for k, v in pairs(req) do
    c[k] = v
  end
  local list = json.array()
  for i, m in ipairs(msgs) do
    list[i] = out[i] or m
  end
  c.messages = list
  return c, texts
end

-- Puts each thinking text on its encoded assistant message: one wire
-- message per canonical one, and one per tool result of a tool message.
local function put_thinking(req, body, texts)
  local pos = 1
  for i, m in ipairs(req.messages) do
    if m.role == "tool" then
      pos = pos + (type(m.content) == "table" and #m.content or 1)
    else
      if texts[i] and body.messages[pos] then
        body.messages[pos].reasoning_content = texts[i]
      end
      pos = pos + 1
    end
  end
end

-- The adapter ----------------------------------------------------------------

local function fields_for(quirks, refused)
  local f = {}
  for k, v in pairs(wire.fields) do
    f[k] = v
  end
  for q in pairs(quirks) do
    for k, v in pairs(_M.QUIRKS[q].cells) do
      f[k] = v
    end
  end
  for k, why in pairs(refused or EMPTY) do
    f[k] = refuse(why)
  end
  return f
end

local percent, copy = common.percent, wire_common.copy

-- An error object in a 200 body or a stream chunk: classify by its type/code.
local function classify(e)
  local t = type(e) == "table" and (str(e.code) or str(e.type)) or ""
  local kind = "server_error"
  if t:find("rate_limit", 1, true) or t == "insufficient_quota" or t == "429" then
    kind = "rate_limited"
  elseif t == "invalid_api_key" or t:find("auth", 1, true) or t:find("permission", 1, true) or t == "401" then
    kind = "auth"
  elseif t == "invalid_request_error" or t == "content_filter" then
    kind = "bad_request"
  end
  local msg = type(e) == "table" and (str(e.message) or str(e.type)) or str(e) or "unknown error"
  return kind, "provider error: " .. util.excerpt(msg, 500), { provider_error = util.provider_error(e) }
end

-- Servers' error bodies: OpenAI's {"error": {...}}, Azure's gateway
-- {"statusCode", "message"}, Mistral's {"message"} or {"detail": [...]}.
local function error_message(doc)
  local m = util.error_object_message(doc)
  if m then
    return m
  end
  local d = doc.detail
  if type(d) == "table" and type(d[1]) == "table" then
    local e = d[1]
    local loc = type(e.loc) == "table" and concat(e.loc, ".", 1, #e.loc) or nil
    return loc and fmt("%s: %s", loc, tostring(e.msg)) or str(e.msg)
  end
  return str(d)
end

-- new(name, spec) -> an adapter. spec: a preset's fields, overridden by
-- an entry's: base_url, key_env (false: none), base_url_env, model_env,
-- default_model, model_prefixes, models, quirks (a list of names), refuse
-- ({field = why}), auth ("bearer" or "api-key"), azure (deployment URLs),
-- deployments ({model = deployment}), api_version, preset.
function _M.new(name, spec)
  local quirks = {}
  for _, q in ipairs(spec.quirks or EMPTY) do
    if not _M.QUIRKS[q] then
      error(fmt("unknown quirk '%s'", tostring(q)), 2)
    end
    quirks[q] = true
  end
  local a = {
    name = name,
    api = "openai",
    compat = true,
    preset = spec.preset,
    fields = fields_for(quirks, spec.refuse),
    quirks = quirks,
    model_prefixes = spec.model_prefixes,
    models = spec.models,
    default_model = spec.default_model,
    key_env = spec.key_env,
    base_url_env = spec.base_url_env,
    model_env = spec.model_env,
    default_base_url = spec.base_url,
    temperature_range = wire.fields.temperature.range,
    env_fields = spec.azure and { api_version = "OPENAI_API_VERSION" } or nil,
  }
  local api_key = spec.auth == "api-key"
  local deployments = spec.deployments or EMPTY
  local fixed_version = spec.api_version
  local has_quirks = next(quirks) ~= nil
  local urls, auths, cached = {}, {}, 0

  local function url_of(config, model)
    local base = config.base_url or a.default_base_url
    if not base then
      error(fmt("%s: no base URL (set %s or the configuration's base_url)", name,
        a.base_url_env or "base_url"), 0)
    end
    if not spec.azure then
      return urls[base] or common.url(urls, base, "/chat/completions")
    end
    local dep = deployments[model] or model
    local version = fixed_version or config.api_version or _M.default_azure_api_version
    local key = base .. "\0" .. dep .. "\0" .. version
    local u = urls[key]
    if not u then
      -- Clients choose the models: the cache starts over when full.
      if cached >= URLS_MAX then
        urls, cached = {}, 0
      end
      u = util.join_url(base, "/openai/deployments/" .. percent(dep) .. "/chat/completions?api-version="
        .. percent(version))
      urls[key], cached = u, cached + 1
    end
    return u
  end

  -- opts: stream, model. A request that came in through the OpenAI API is
  -- sent as it came, unless a quirk must change it (then re-encoded).
  function a.build_request(config, request, opts)
    opts = opts or EMPTY
    local raw = request.raw
    local body, stream
    local model = opts.model or config.model or a.default_model
    if type(raw) == "table" and raw.api == "openai" and type(raw.body) == "string" then
      local doc = type(raw.doc) == "table" and raw.doc or EMPTY
      local mine = has_quirks and copy(doc) or nil
      if mine and apply(quirks, mine, name) then
        stream = doc.stream == true and opts.stream == true
        mine.model = opts.model or mine.model
        if doc.stream == true and not stream then
          mine.stream, mine.stream_options = nil, nil
        end
        body = json.encode(mine)
      else
        body, stream = util.passthrough(raw, opts.model, opts.stream == true)
      end
      model = opts.model or str(doc.model) or model
    else
      local req = common.normalize(request)
      local texts
      if quirks.reasoning_content then
        req, texts = take_thinking(req)
      end
      stream = opts.stream and true or false
      local doc = wire.encode_request(req, { model = model, stream = stream })
      if texts then
        put_thinking(req, doc, texts)
      end
      if has_quirks then
        apply(quirks, doc, name)
      end
      body = json.encode(doc)
    end
    local key = config.key or ""
    local auth = auths[key]
    if not auth then
      auth = api_key and key or "Bearer " .. key
      auths[key] = auth
    end
    local headers = { ["content-type"] = "application/json" }
    if api_key then
      headers["api-key"] = auth
    elseif config.key then
      headers["authorization"] = auth
    end
    if stream then
      headers["accept"] = "text/event-stream"
    end
    return { method = "POST", url = url_of(config, model), headers = headers, body = body }
  end

  -- A non-2xx: Azure says when to retry in milliseconds too.
  local function http_error(status, headers, body)
    local r, kind, msg, extra = util.http_error(status, headers, body, error_message)
    if extra and not extra.retry_after and type(headers) == "table" then
      local ms = num(tonumber(headers["retry-after-ms"] or ""))
      extra.retry_after = ms and ms / 1000 or nil
    end
    return r, kind, msg, extra
  end

  a.parse_response = common.response_parser(a, wire, { classify = classify, http_error = http_error })

  -- Groq reports a stream's usage in x_groq.usage.
  local function event(self, ev)
    local out = wire.Decoder.event(self, ev)
    local data = ev.data
    if type(data) == "string" and find(data, '"x_groq"', 1, true) then
      local doc = cjson.decode(data)
      local u = type(doc) == "table" and type(doc.x_groq) == "table" and doc.x_groq.usage
      if type(u) == "table" then
        self.usage = { input_tokens = num(u.prompt_tokens), output_tokens = num(u.completion_tokens) }
      end
    end
    return out
  end

  a.stream_parser = common.stream_parser(a, wire, classify, common.text_event(event), event)

  return a
end

-- Entries ------------------------------------------------------------------

-- The fields of a gateway entry this module reads.
_M.ENTRY_FIELDS = { api = true, preset = true, quirks = true, deployments = true, api_version = true }

local adapters = {} -- preset name -> adapter, made once

-- The adapter of a preset under its own name, or nil.
function _M.preset(name)
  local p = _M.PRESETS[name]
  if not p then
    return nil
  end
  local a = adapters[name]
  if not a then
    local spec = copy(p)
    spec.preset = name
    a = _M.new(name, spec)
    adapters[name] = a
  end
  return a
end

local function env_name_ok(s)
  return type(s) == "string" and s:match("^[%a_][%w_]*$") ~= nil
end

-- Whether a gateway entry declares an OpenAI-compatible provider (or sets
-- a preset's own fields): then entry_adapter makes its adapter.
function _M.declares(entry)
  for k in pairs(_M.ENTRY_FIELDS) do
    if entry[k] ~= nil then
      return true
    end
  end
  return false
end

-- entry_adapter(name, entry, where) -> an adapter for a gateway entry that
-- declares one (api = "openai" or a preset, its quirks, Azure's
-- deployments and api_version), or nil, message naming the field.
function _M.entry_adapter(name, e, where)
  local preset_name = e.preset
  if preset_name == nil and e.api == nil and _M.PRESETS[name] then
    preset_name = name
  end
  local spec = {}
  if preset_name ~= nil then
    local p = type(preset_name) == "string" and _M.PRESETS[preset_name]
    if not p then
      local names = {}
      for _, n in ipairs(_M.PRESET_ORDER) do
        names[#names + 1] = n
      end
      return nil, fmt("%s.preset: unknown preset '%s' (valid: %s)", where, tostring(preset_name),
        concat(names, ", "))
    end
    spec = copy(p)
    spec.preset = preset_name
  end
  if e.api ~= nil and e.api ~= "openai" then
    return nil, fmt("%s.api: must be \"openai\" (the wire API of a provider declared by configuration)", where)
  end
  if preset_name == nil and e.api == nil then
    return nil, fmt("%s: set api = \"openai\" or a preset to declare a provider (quirks, deployments and "
      .. "api_version belong to those)", where)
  end
  if e.quirks ~= nil then
    if type(e.quirks) ~= "table" then
      return nil, where .. ".quirks: must be a list of quirk names"
    end
    local list = {}
    for i, q in ipairs(e.quirks) do
      if not _M.QUIRKS[q] then
        local names = {}
        for k in pairs(_M.QUIRKS) do
          names[#names + 1] = k
        end
        table.sort(names)
        return nil, fmt("%s.quirks[%d]: unknown quirk '%s' (valid: %s)", where, i, tostring(q), concat(names, ", "))
      end
      list[#list + 1] = q
    end
    spec.quirks = list -- the entry's list replaces the preset's
  end
  if e.deployments ~= nil or e.api_version ~= nil then
    if not spec.azure then
      return nil, fmt("%s.%s: only for preset azure", where, e.deployments ~= nil and "deployments" or "api_version")
    end
  end
  if e.deployments ~= nil then
    if type(e.deployments) ~= "table" then
      return nil, where .. ".deployments: must be a table {model = deployment}"
    end
    local models = {}
    for m, d in pairs(e.deployments) do
      if type(m) ~= "string" or type(d) ~= "string" or d == "" or d:find("[/?#%s]") then
        return nil, fmt("%s.deployments[%s]: must map a model name to a deployment name", where, tostring(m))
      end
      models[#models + 1] = m
    end
    table.sort(models)
    spec.deployments, spec.models = e.deployments, models
  end
  if e.api_version ~= nil then
    if type(e.api_version) ~= "string" or not e.api_version:match("^[%w%-%.]+$") then
      return nil, where .. ".api_version: must be a version such as \"2024-10-21\""
    end
    spec.api_version = e.api_version
  end
  if e.api_key_env ~= nil then
    if e.api_key_env ~= false and not env_name_ok(e.api_key_env) then
      return nil, where .. ".api_key_env: must be an environment variable name, or false (no key)"
    end
    spec.key_env = e.api_key_env
  elseif spec.key_env == nil then
    spec.key_env = false -- declared without a key variable: a local server
  end
  if e.base_url ~= nil then
    spec.base_url = e.base_url
  end
  if spec.base_url == nil and not spec.azure then
    return nil, where .. ".base_url: required for a provider without a preset"
  end
  if e.model ~= nil then
    spec.default_model = e.model
  elseif spec.default_model == nil and type(e.models) == "table" then
    spec.default_model = e.models[1]
  end
  return _M.new(name, spec)
end

-- The docs ------------------------------------------------------------------

local function preset_row(n)
  local p = _M.PRESETS[n]
  local key = p.key_env and "`" .. p.key_env .. "`" or "none"
  local base = p.base_url and "`" .. p.base_url .. "`" or "`$" .. p.base_url_env .. "`"
  local q = {}
  for _, x in ipairs(p.quirks or EMPTY) do
    q[#q + 1] = "`" .. x .. "`"
  end
  local r = {}
  local keys = {}
  for k in pairs(p.refuse or EMPTY) do
    keys[#keys + 1] = k
  end
  table.sort(keys)
  for _, k in ipairs(keys) do
    r[#r + 1] = "`" .. k .. "`"
  end
  local prefixes = {}
  for _, x in ipairs(p.model_prefixes or EMPTY) do
    prefixes[#prefixes + 1] = "`" .. x .. "`"
  end
  return fmt("| `%s` | %s | %s | %s | %s | %s | %s |", n, p.label, base, key,
    #prefixes > 0 and concat(prefixes, ", ") or "(list its models)", #q > 0 and concat(q, ", ") or "—",
    #r > 0 and concat(r, ", ") or "—")
end

-- The fidelity page's section on OpenAI-compatible providers (Markdown).
function _M.markdown()
  local lines = {
    "## OpenAI-compatible providers",
    "",
    "A provider declared in the configuration (`api = \"openai\"`) or by a preset speaks OpenAI's wire",
    "format: it takes what the `openai` column says, except where its quirks or its refusals say",
    "otherwise (below). A client's OpenAI request is still sent as it came, with only what a quirk",
    "must change re-encoded.",
    "",
    "| preset | server | base URL | key variable | model prefixes | quirks | refused |",
    "|---|---|---|---|---|---|---|",
  }
  for _, n in ipairs(_M.PRESET_ORDER) do
    lines[#lines + 1] = preset_row(n)
  end
  lines[#lines + 1] = ""
  lines[#lines + 1] = "| quirk | what it changes |"
  lines[#lines + 1] = "|---|---|"
  local names = {}
  for k in pairs(_M.QUIRKS) do
    names[#names + 1] = k
  end
  table.sort(names)
  for _, k in ipairs(names) do
    lines[#lines + 1] = fmt("| `%s` | %s |", k, _M.QUIRKS[k].doc)
  end
  lines[#lines + 1] = ""
  return concat(lines, "\n")
end

return _M
