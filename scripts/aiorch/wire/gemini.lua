-- Google Gemini generateContent <-> the canonical model (docs/canonical.md):
-- requests both ways, responses both ways, streams both ways. Pure
-- functions and one small object per stream; no I/O.
--
-- The model and whether to stream are in Gemini's URL, not its body
-- (POST /v1beta/models/{model}:generateContent, :streamGenerateContent;
-- /v1/ the same, as Google's own clients call it by default);
-- decode_request reads them from the request's path.
--
-- Tool-call ids: a functionCall has an `id` only in some models. A call
-- without one gets an id made here, "gcall_" and something stable for the
-- same input (the answer's responseId and the call's place, or the call's
-- place in the request's contents). Such an id is never sent to Gemini,
-- which pairs a functionResponse with its call by name and order; decoding
-- pairs them the same way (the first call of that name not yet answered).
--
-- Thought signatures (thoughtSignature) go back unchanged on the part they
-- came on: a `thought: true` part's is its thinking part's signature; one
-- on a text or functionCall part is that part's `signature`.
local json = require "aiorch.json"
local canonical = require "aiorch.canonical"
local util = require "aiorch.adapter"
local common = require "aiorch.wire.common"

local fmt = string.format
local type = type
local pairs = pairs
local ipairs = ipairs
local next = next
local tostring = tostring
local tonumber = tonumber
local setmetatable = setmetatable
local getmetatable = getmetatable
local concat = table.concat
local sort = table.sort
local tointeger = math.tointeger
local max = math.max
local byte, char = string.byte, string.char
local lower, upper = string.lower, string.upper
local str, num, present = util.str, util.num, util.present
local null = json.null

local EMPTY = {} -- never written

local _M = { api = "gemini" }

local events = common.events
local choice_count, choices_result = common.choice_count, common.choices_result
local text_of = common.text_of
local pass, translate, refuse = common.pass, common.translate, common.refuse
local fail, set, ignore, tokens = common.fail, common.set, common.ignore, common.tokens
local extra_of = common.extra_of_for("gemini")

-- What generateContent can express of the canonical model: one cell per
-- key of canonical.CELLS.
_M.fields = {
  messages = translate("`contents`: roles `user` and `model`; consecutive contents of one role are one message"),
  ["role.system"] = translate("`systemInstruction`: every system message's parts, in order"),
  ["role.developer"] = translate("like `system`"),
  ["role.tool"] = translate("a `user` content of `functionResponse` parts; a user message right after it joins "
    .. "that content"),
  ["message.name"] = refuse("Gemini contents have no participant name"),
  prefill = refuse("Gemini answers a last `model` content instead of continuing it"),
  text = pass(),
  ["image.base64"] = translate("an `inlineData` part `{mimeType, data}`"),
  ["image.url"] = translate("a `fileData` part `{fileUri, mimeType}` (the type from the URL's extension, when it "
    .. "has a known one)"),
  ["image.file"] = refuse("Gemini takes files by URI (`fileData`), not by another API's file id"),
  ["image.detail"] = translate("the part's `mediaResolution.level`: `MEDIA_RESOLUTION_LOW` or "
    .. "`MEDIA_RESOLUTION_HIGH`"),
  ["document.base64"] = translate("an `inlineData` part"),
  ["document.url"] = translate("a `fileData` part"),
  ["document.text"] = translate("a text part"),
  ["document.file"] = refuse("Gemini takes files by URI (`fileData`), not by another API's file id"),
  ["document.title"] = translate("the `displayName` of its `inlineData` or `fileData`, when it has no filename"),
  ["document.filename"] = translate("the `displayName` of its `inlineData` or `fileData`"),
  tool_call = translate("a `functionCall` part `{name, args}`, args the arguments decoded; its `id` when Gemini "
    .. "gave it (ids aiorch made, `gcall_...`, are not sent: Gemini pairs calls and responses by name and order)"),
  ["tool_call.arguments"] = refuse("a `functionCall`'s args must be a JSON object"),
  tool_result = translate("a `functionResponse` part named after its call: `response` the content when it is a "
    .. "JSON object, else `{output: text}`"),
  ["tool_result.is_error"] = translate("`response: {error: ...}`"),
  ["tool_result.image"] = translate("the `functionResponse`'s `parts` (`inlineData` or `fileData`)"),
  ["tool_result.document"] = translate("the `functionResponse`'s `parts` (`inlineData` or `fileData`)"),
  thinking = translate("a `thought: true` text part with its `thoughtSignature`"),
  ["thinking.unsigned"] = translate("a `thought: true` text part without a signature"),
  redacted_thinking = refuse("Gemini has no redacted thinking"),
  cache_control = refuse("Gemini caches prompt prefixes by itself, or through a `cachedContent` resource: there is "
    .. "no per-part marker"),
  tools = translate("one `tools` entry of `functionDeclarations`: `{name, description, parametersJsonSchema}`"),
  ["tool.strict"] = refuse("Gemini function declarations have no strict flag"),
  tool_choice = translate("`toolConfig.functionCallingConfig.mode`: `auto` AUTO, `none` NONE, `required` ANY; "
    .. "`{name}` ANY with `allowedFunctionNames: [name]`"),
  parallel_tool_calls = refuse("Gemini has no switch for parallel function calls"),
  ["response_format.text"] = translate("nothing to send: text is the default"),
  ["response_format.json_object"] = translate("`generationConfig.responseMimeType: application/json`"),
  ["response_format.json_schema"] = translate("`responseMimeType: application/json` and `responseJsonSchema`; the "
    .. "name, description and strict have no place"),
  max_tokens = translate("`generationConfig.maxOutputTokens`"),
  temperature = translate("`generationConfig.temperature`", { 0, 2 }),
  top_p = translate("`generationConfig.topP`"),
  top_k = translate("`generationConfig.topK`"),
  stop = translate("`generationConfig.stopSequences`"),
  seed = translate("`generationConfig.seed`"),
  presence_penalty = translate("`generationConfig.presencePenalty`"),
  frequency_penalty = translate("`generationConfig.frequencyPenalty`"),
  logprobs = translate("`generationConfig.responseLogprobs`"),
  top_logprobs = translate("`generationConfig.logprobs`"),
  n = translate("`generationConfig.candidateCount`"),
  user = refuse("Gemini has no end-user id"),
  metadata = refuse("Gemini requests carry no metadata (its `labels` are billing labels)"),
  ["reasoning.effort"] = translate("`thinkingConfig.thinkingLevel` (`minimal` to `xhigh` by name, `max` as XHIGH); "
    .. "`none` is `thinkingBudget: 0`"),
  ["reasoning.budget_tokens"] = translate("`thinkingConfig.thinkingBudget`"),
  ["reasoning.mode"] = translate("`disabled` is `thinkingBudget: 0`; `enabled` and `adaptive`, without a budget or an "
    .. "effort, `thinkingBudget: -1` (dynamic)"),
  ["reasoning.display"] = translate("`thinkingConfig.includeThoughts`: true for `summarized`, false for `omitted`"),
  stream_options = translate("nothing to send: a stream's last chunk always reports its usage"),
  extra = translate("Gemini fields sent as they came; another API's refused by name"),
  opaque = translate("Gemini parts and tools (`executableCode`, `codeExecution`, `googleSearch`, ...) sent as they "
    .. "came; another API's refused by name"),
  ["anthropic-beta"] = translate("not sent: it only changes Anthropic's behaviour (what a beta adds to a request is "
    .. "refused on its own)"),
  signature = pass("`thoughtSignature` on the part, unchanged"),
  ["response.text"] = translate("text parts (not `thought`)"),
  ["response.tool_calls"] = translate("`functionCall` parts (`args` as JSON text); the call's `id`, else one made "
    .. "from the `responseId` (`gcall_...`)"),
  ["response.thinking"] = translate("`thought: true` parts, with their `thoughtSignature`; a signature on a text or "
    .. "`functionCall` part stays on that part"),
  ["response.refusal"] = refuse("Gemini has no refusal; a blocked answer ends with a content-filter finish reason "
    .. "(written back as `SAFETY`)"),
  ["response.finish_reason"] = translate("`STOP` is stop (tool_calls when the answer calls functions); `MAX_TOKENS` "
    .. "length; `SAFETY`, `RECITATION`, `BLOCKLIST`, `PROHIBITED_CONTENT`, `SPII` and the image blocks "
    .. "content_filter; the rest other. A prompt blocked outright (`promptFeedback.blockReason`, no candidates) is "
    .. "the error kind `content_filter`. Written back: stop and tool_calls as `STOP`, length `MAX_TOKENS`, "
    .. "content_filter and refusal `SAFETY`, other `OTHER`"),
  ["response.usage"] = translate("input: `promptTokenCount` + `toolUsePromptTokenCount`; output: "
    .. "`candidatesTokenCount` + `thoughtsTokenCount`"),
  ["response.usage.cached_input_tokens"] = translate("`cachedContentTokenCount`"),
  ["response.usage.cache_write_tokens"] = refuse("Gemini reports no cache writes"),
  ["response.usage.reasoning_tokens"] = translate("`thoughtsTokenCount`"),
  ["response.logprobs"] = translate("a candidate's `logprobsResult`, as Gemini sends it (another API's are not "
    .. "written)"),
  ["response.choices"] = translate("`candidates` (`candidateCount`), by `index`"),
  ["response.upstream"] = translate("`responseId`; `modelVersion` is the model"),
  ["response.stream"] = translate("every chunk a whole response: text and `thought` parts as they come, each "
    .. "`functionCall` whole (its arguments in one piece); the last chunk has the finish reason and the usage"),
}

-- Errors and models -------------------------------------------------------

local STATUS = {
  [400] = "INVALID_ARGUMENT", [401] = "UNAUTHENTICATED", [403] = "PERMISSION_DENIED", [404] = "NOT_FOUND",
  [405] = "INVALID_ARGUMENT", [408] = "DEADLINE_EXCEEDED", [409] = "ABORTED", [413] = "INVALID_ARGUMENT",
  [429] = "RESOURCE_EXHAUSTED", [499] = "CANCELLED", [500] = "INTERNAL", [501] = "UNIMPLEMENTED",
  [502] = "UNAVAILABLE", [503] = "UNAVAILABLE", [504] = "DEADLINE_EXCEEDED",
}
_M.STATUS = STATUS

-- Gemini's error object for an answer with this status:
-- {"error":{"code":429,"message":"...","status":"RESOURCE_EXHAUSTED"}}.
function _M.error_body(status, message)
  local name = STATUS[status] or (status >= 500 and "INTERNAL" or "INVALID_ARGUMENT")
  return concat { '{"error":{"code":', tointeger(status) or 500, ',"message":', json.quote(message),
    ',"status":"', name, '"}}' }
end

-- GET /v1beta/models in Gemini's list shape; entries: {id}.
function _M.models(entries)
  local out = {}
  for i, e in ipairs(entries) do
    out[i] = concat { '{"name":', json.quote("models/" .. e.id), ',"displayName":', json.quote(e.id),
      ',"supportedGenerationMethods":["generateContent","streamGenerateContent"]}' }
  end
  return '{"models":[' .. concat(out, ",") .. "]}"
end

-- Requests: Gemini -> canonical --------------------------------------------

local function unescape(s)
  return (s:gsub("%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
end

-- "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse" ->
-- "gemini-2.5-flash", "streamGenerateContent", "alt=sse"
function _M.parse_path(path)
  if type(path) ~= "string" then
    return nil
  end
  local route, query = path:match("^([^?]*)%??(.*)$")
  local model, method = route:match("^/v1beta/models/([^/]+):(%a+)$")
  if not model then
    model, method = route:match("^/v1/models/([^/]+):(%a+)$")
  end
  if not model then
    return nil
  end
  return unescape(model), method, query
end

-- The gateway's names of the two routes, whatever the version and the
-- model in the path.
_M.ROUTE = "/{version}/models/{model}:generateContent"
_M.STREAM_ROUTE = "/{version}/models/{model}:streamGenerateContent"
local ROUTES = { generateContent = _M.ROUTE, streamGenerateContent = _M.STREAM_ROUTE }

-- A path without its query -> the route's name, or nil.
function _M.route_of(route)
  local method = route:match("^/v1beta/models/[^/]+:(%a+)$") or route:match("^/v1/models/[^/]+:(%a+)$")
  return ROUTES[method]
end

-- A query parameter's value (percent-decoded), or nil.
function _M.query_param(query, name)
  for k, v in (query or ""):gmatch("([^&=]+)=?([^&]*)") do
    if k == name then
      return unescape(v)
    end
  end
  return nil
end

-- Gemini's OpenAPI Schema (`parameters`, `responseSchema`: types in upper
-- case, `nullable`) as JSON Schema; other keywords kept, propertyOrdering
-- (Gemini's own) left out.
local function json_schema_of(s, depth)
  if type(s) ~= "table" or depth > 64 then
    return s
  end
  if json.is_array(s) or #s > 0 then
    local out = json.array()
    for i, v in ipairs(s) do
      out[i] = json_schema_of(v, depth + 1)
    end
    return out
  end
  local out = {}
  for k, v in pairs(s) do
    if k == "type" and type(v) == "string" then
      out.type = lower(v)
    elseif k == "properties" and type(v) == "table" then
      local props = json.object()
      for name, sub in pairs(v) do
        props[name] = json_schema_of(sub, depth + 1)
      end
      out.properties = props
    elseif k ~= "nullable" and k ~= "propertyOrdering" then
      out[k] = json_schema_of(v, depth + 1)
    end
  end
  if s.nullable == true and type(out.type) == "string" then
    out.type = json.array({ out.type, "null" })
  end
  return setmetatable(out, getmetatable(s) or json.object_mt)
end
_M.json_schema_of = function(s)
  return json_schema_of(s, 0)
end

local EXTENSION_TYPES = {
  png = "image/png", jpg = "image/jpeg", jpeg = "image/jpeg", gif = "image/gif", webp = "image/webp",
  heic = "image/heic", heif = "image/heif", pdf = "application/pdf", txt = "text/plain", md = "text/markdown",
  html = "text/html", csv = "text/csv",
}

local function url_type(url)
  local ext = url:match("^[^?#]*%.(%w+)$") or url:match("^[^?#]*%.(%w+)[?#]")
  return ext and EXTENSION_TYPES[lower(ext)] or nil
end

local MEDIA_RESOLUTION = { MEDIA_RESOLUTION_LOW = "low", MEDIA_RESOLUTION_HIGH = "high" }

-- An image, a document, or (audio, video, ...) an opaque part: by media type.
local function media_part(mime, source, display, p)
  local kind = mime:match("^image/") and "image"
    or (mime == "application/pdf" or mime:match("^text/")) and "document" or nil
  if not kind then
    return { type = "opaque", api = "gemini", value = p, name = p.inlineData and "inlineData" or "fileData" }
  end
  local part = { type = kind, source = source }
  local rest = {}
  local mr = p.mediaResolution
  if kind == "image" and type(mr) == "table" and MEDIA_RESOLUTION[mr.level] and next(mr, next(mr)) == nil then
    part.detail = MEDIA_RESOLUTION[mr.level]
  elseif present(mr) then
    rest.mediaResolution = mr
  end
  if display then
    if kind == "document" then
      part.filename = display
    else
      local key = p.inlineData and "inlineData" or "fileData"
      rest[key] = { displayName = display }
    end
  end
  for k, v in pairs(p) do
    if k ~= "inlineData" and k ~= "fileData" and k ~= "mediaResolution" and v ~= null then
      rest[k] = v
    end
  end
  if next(rest) then
    part.extra = { api = "gemini", fields = rest }
  end
  return part
end

local PLAIN_KEYS = set { "text", "thought", "thoughtSignature" }
local CALL_KEYS = set { "functionCall", "thoughtSignature" }
local CALL_FIELDS = set { "name", "args", "id" }

-- A functionResponse's response (and parts) -> a tool result's content
-- and error flag, or nil, nil, message.
local function result_content(fr, path)
  local r = fr.response
  local content, is_error
  if type(r) == "table" and not json.is_array(r) then
    local only = next(r) ~= nil and next(r, next(r)) == nil and next(r)
    local v = only and r[only]
    if only == "output" or only == "error" then
      content = type(v) == "string" and v or json.encode(v)
      is_error = only == "error" or nil
    else
      content = json.encode(next(r) == nil and json.object() or r)
    end
  elseif present(r) then
    return nil, nil, path .. ".response: must be an object"
  end
  if type(fr.parts) == "table" and #fr.parts > 0 then
    local list = { { type = "text", text = content or "" } }
    for i, q in ipairs(fr.parts) do
      local where = fmt("%s.parts[%d]", path, i - 1)
      local b = type(q) == "table" and (q.inlineData or q.fileData)
      if type(b) ~= "table" or type(b.mimeType) ~= "string" then
        return nil, nil, where .. ": inlineData or fileData with a mimeType is required"
      end
      local source
      if q.inlineData then
        if type(b.data) ~= "string" then
          return nil, nil, where .. ".inlineData.data: required"
        end
        source = { type = "base64", media_type = b.mimeType, data = b.data }
      else
        if type(b.fileUri) ~= "string" then
          return nil, nil, where .. ".fileData.fileUri: required"
        end
        source = { type = "url", url = b.fileUri }
      end
      list[#list + 1] = media_part(b.mimeType, source, str(b.displayName), q)
    end
    content = list
  end
  return content, is_error
end

-- The state of decoding one request's contents: the calls so far, in
-- order, for pairing responses with them.
local function call_id(st, name, id)
  local calls = st.calls
  calls[#calls + 1] = { id = id, name = name }
  return id
end

local function answer_id(st, fr, path)
  local calls = st.calls
  local id = str(fr.id)
  if id and id ~= "" then
    for _, c in ipairs(calls) do
      if c.id == id then
        c.answered = true
      end
    end
    return id
  end
  for _, c in ipairs(calls) do
    if not c.answered and c.name == fr.name then
      c.answered = true
      return c.id
    end
  end
  return fail(path .. ".functionResponse", fmt("answers no earlier functionCall named '%s'", tostring(fr.name)))
end

-- One part of a content -> a canonical part, or nil, message.
local function decode_part(p, path, role, st, ci, pi)
  if type(p) ~= "table" then
    return fail(path, "must be an object")
  end
  local sig = str(p.thoughtSignature)
  if type(p.text) == "string" then
    local part = { type = (p.thought == true and role == "model") and "thinking" or "text", text = p.text,
      signature = sig }
    part.extra = extra_of(p, PLAIN_KEYS)
    return part
  elseif type(p.inlineData) == "table" then
    local b = p.inlineData
    if type(b.mimeType) ~= "string" or type(b.data) ~= "string" then
      return fail(path .. ".inlineData", "mimeType and data are required")
    end
    return media_part(b.mimeType, { type = "base64", media_type = b.mimeType, data = b.data }, str(b.displayName), p)
  elseif type(p.fileData) == "table" then
    local f = p.fileData
    if type(f.fileUri) ~= "string" then
      return fail(path .. ".fileData.fileUri", "required")
    end
    local mime = str(f.mimeType) or url_type(f.fileUri) or "application/octet-stream"
    return media_part(mime, { type = "url", url = f.fileUri }, str(f.displayName), p)
  elseif type(p.functionCall) == "table" then
    local fc = p.functionCall
    if role ~= "model" then
      return fail(path .. ".functionCall", "only a model content may call a function")
    end
    if type(fc.name) ~= "string" or fc.name == "" then
      return fail(path .. ".functionCall.name", "required")
    end
    local args = fc.args
    if present(args) and (type(args) ~= "table" or json.is_array(args)) then
      return fail(path .. ".functionCall.args", "must be an object")
    end
    local id = str(fc.id)
    if not id or id == "" then
      id = fmt("gcall_%d_%d", ci - 1, pi - 1)
    end
    local part = { type = "tool_call", id = call_id(st, fc.name, id), name = fc.name,
      arguments = json.encode(type(args) == "table" and next(args) ~= nil and args or json.object()),
      signature = sig }
    local rest = extra_of(p, CALL_KEYS)
    local inner = extra_of(fc, CALL_FIELDS)
    if inner then
      rest = rest or { api = "gemini", fields = {} }
      rest.fields.functionCall = inner.fields
    end
    part.extra = rest
    return part
  elseif type(p.functionResponse) == "table" then
    local fr = p.functionResponse
    if role == "model" then
      return fail(path .. ".functionResponse", "only a user content may answer a function call")
    end
    if type(fr.name) ~= "string" then
      return fail(path .. ".functionResponse.name", "required")
    end
    local id, err = answer_id(st, fr, path)
    if not id then
      return nil, err
    end
    local content, is_error, rerr = result_content(fr, path .. ".functionResponse")
    if rerr then
      return nil, rerr
    end
    return { type = "tool_result", id = id, content = content, is_error = is_error }
  end
  for k in pairs(p) do
    if k ~= "thoughtSignature" and k ~= "thought" then
      return { type = "opaque", api = "gemini", value = p, name = k }
    end
  end
  return fail(path, "a part needs one of text, inlineData, fileData, functionCall, functionResponse")
end

-- Appends part to parts, joining a text or thought piece to the one
-- before it while that one has no signature (a signature ends a run).
local function add_part(parts, part)
  local last = parts[#parts]
  if last and last.type == part.type and (part.type == "text" or part.type == "thinking") and not last.signature
    and not last.extra and not part.extra then
    last.text = last.text .. part.text
    last.signature = part.signature
    return
  end
  parts[#parts + 1] = part
end

-- A list of parts as a message's content: one plain text part as a string.
local function content_of(parts)
  local one = parts[1]
  if #parts == 1 and one.type == "text" and not one.signature and not one.extra then
    return one.text
  end
  return parts
end

local function decode_contents(list)
  if type(list) ~= "table" or #list == 0 then
    return fail("contents", "contents is not specified (a non-empty list)")
  end
  local out = {}
  local st = { calls = {} }
  local run -- the role of the contents being gathered, and their parts
  local function flush()
    if not run then
      return
    end
    if run.role == "model" then
      out[#out + 1] = { role = "assistant", content = content_of(run.parts) }
    else
      if #run.results > 0 then
        out[#out + 1] = { role = "tool", content = run.results }
      end
      if #run.parts > 0 or #run.results == 0 then
        out[#out + 1] = { role = "user", content = #run.parts > 0 and content_of(run.parts) or json.array() }
      end
    end
    run = nil
  end
  for ci, c in ipairs(list) do
    local path = fmt("contents[%d]", ci - 1)
    if type(c) ~= "table" then
      return fail(path, "must be an object")
    end
    local role = c.role
    if not present(role) then
      role = "user"
    elseif role ~= "user" and role ~= "model" then
      return fail(path .. ".role", fmt("must be 'user' or 'model' (got '%s')", tostring(role)))
    end
    if type(c.parts) ~= "table" or #c.parts == 0 then
      return fail(path .. ".parts", "must be a non-empty list")
    end
    if not run or run.role ~= role then
      flush()
      run = { role = role, parts = {}, results = {} }
    end
    for pi, p in ipairs(c.parts) do
      local part, err = decode_part(p, fmt("%s.parts[%d]", path, pi - 1), role, st, ci, pi)
      if not part then
        return nil, err
      end
      if part.type == "tool_result" then
        run.results[#run.results + 1] = part
      elseif role == "model" then
        add_part(run.parts, part) -- a streamed answer's pieces, as a client kept them
      else
        run.parts[#run.parts + 1] = part
      end
    end
  end
  flush()
  return out
end

local function decode_system(si)
  if type(si) ~= "table" or type(si.parts) ~= "table" then
    return fail("systemInstruction.parts", "must be a list")
  end
  local parts = {}
  for i, p in ipairs(si.parts) do
    local part, err = decode_part(p, fmt("systemInstruction.parts[%d]", i - 1), "system", { calls = {} }, 0, i)
    if not part then
      return nil, err
    end
    if part.type ~= "text" and part.type ~= "opaque" then
      return fail(fmt("systemInstruction.parts[%d]", i - 1), "a system instruction takes text only")
    end
    parts[#parts + 1] = part
  end
  if #parts == 0 then
    return nil
  end
  return { role = "system", content = content_of(parts) }
end

local DECLARATION_KEYS = set { "name", "description", "parameters", "parametersJsonSchema" }

local function decode_tools(list)
  if type(list) ~= "table" then
    return fail("tools", "must be a list")
  end
  local out = {}
  for i, t in ipairs(list) do
    local path = fmt("tools[%d]", i - 1)
    if type(t) ~= "table" then
      return fail(path, "must be an object")
    end
    for k, v in pairs(t) do
      if k == "functionDeclarations" then
        if type(v) ~= "table" then
          return fail(path .. ".functionDeclarations", "must be a list")
        end
        for j, d in ipairs(v) do
          local where = fmt("%s.functionDeclarations[%d]", path, j - 1)
          if type(d) ~= "table" or type(d.name) ~= "string" or d.name == "" then
            return fail(where .. ".name", "required")
          end
          local schema = d.parametersJsonSchema
          if type(schema) ~= "table" then
            schema = type(d.parameters) == "table" and json_schema_of(d.parameters, 0) or nil
          end
          out[#out + 1] = { name = d.name, description = str(d.description), parameters = schema,
            extra = extra_of(d, DECLARATION_KEYS) }
        end
      elseif v ~= null then
        out[#out + 1] = { type = "opaque", api = "gemini", value = { [k] = v }, name = k }
      end
    end
  end
  return out
end

-- toolConfig -> tool_choice; what it cannot say stays an extra field.
local function decode_tool_config(tc, req, extra)
  if type(tc) ~= "table" then
    return fail("toolConfig", "must be an object")
  end
  local fc = tc.functionCallingConfig
  local names = type(fc) == "table" and fc.allowedFunctionNames
  local mode = type(fc) == "table" and fc.mode
  local choice
  if type(fc) == "table" and next(fc) ~= nil then
    local n = type(names) == "table" and #names or 0
    if mode == "AUTO" and n == 0 then
      choice = "auto"
    elseif mode == "NONE" and n == 0 then
      choice = "none"
    elseif mode == "ANY" and n == 0 then
      choice = "required"
    elseif mode == "ANY" and n == 1 and type(names[1]) == "string" then
      choice = { name = names[1] }
    end
    local rest = extra_of(fc, { mode = true, allowedFunctionNames = true })
    if not choice or rest then
      extra.toolConfig = tc
      return true
    end
  end
  req.tool_choice = choice
  local rest = extra_of(tc, { functionCallingConfig = true })
  if rest then
    extra.toolConfig = rest.fields
  end
  return true
end

local EFFORT_IN = { MINIMAL = "minimal", LOW = "low", MEDIUM = "medium", HIGH = "high", XHIGH = "xhigh" }

local function decode_thinking(tc, req, gextra)
  local r, rest = {}, {}
  for k, v in pairs(tc) do
    if k == "thinkingBudget" and tointeger(v) then
      local b = tointeger(v)
      if b == 0 then
        r.mode = "disabled"
      elseif b < 0 then
        r.mode = "adaptive"
      else
        r.budget_tokens = b
      end
    elseif k == "thinkingLevel" and type(v) == "string" and EFFORT_IN[upper(v)] then
      r.effort = EFFORT_IN[upper(v)]
    elseif k == "includeThoughts" and type(v) == "boolean" then
      r.display = v and "summarized" or "omitted"
    elseif v ~= null then
      rest[k] = v
    end
  end
  if r.display and r.mode == "disabled" then
    rest.includeThoughts, r.display = tc.includeThoughts, nil
  elseif r.display and not (r.mode or r.budget_tokens) then
    r.mode = "adaptive" -- thoughts shown: thinking is on
  end
  if next(rest) then
    gextra.thinkingConfig = rest
  end
  if next(r) then
    req.reasoning = r
  end
end

-- generationConfig -> the canonical fields; the rest stays an extra field.
local GEN_COPY = { temperature = "temperature", topP = "top_p", topK = "top_k", maxOutputTokens = "max_tokens",
  seed = "seed", presencePenalty = "presence_penalty", frequencyPenalty = "frequency_penalty",
  candidateCount = "n", logprobs = "top_logprobs" }

local function decode_generation(gc, req, extra)
  if type(gc) ~= "table" then
    return fail("generationConfig", "must be an object")
  end
  local gextra = {}
  for k, v in pairs(gc) do
    if GEN_COPY[k] then
      if v ~= null then
        req[GEN_COPY[k]] = v
      end
    elseif k == "stopSequences" then
      if present(v) then
        req.stop = v
      end
    elseif k == "responseLogprobs" then
      if v == true then
        req.logprobs = true
      elseif present(v) and v ~= false then
        gextra[k] = v
      end
    elseif k == "thinkingConfig" then
      if type(v) == "table" then
        decode_thinking(v, req, gextra)
      elseif present(v) then
        gextra[k] = v
      end
    elseif k ~= "responseMimeType" and k ~= "responseSchema" and k ~= "responseJsonSchema" and v ~= null then
      gextra[k] = v
    end
  end
  local mime = gc.responseMimeType
  if mime == "application/json" then
    if type(gc.responseJsonSchema) == "table" then
      req.response_format = { type = "json_schema", schema = gc.responseJsonSchema }
    elseif type(gc.responseSchema) == "table" then
      req.response_format = { type = "json_schema", schema = json_schema_of(gc.responseSchema, 0) }
    else
      req.response_format = { type = "json_object" }
    end
  elseif mime == "text/plain" and not (present(gc.responseSchema) or present(gc.responseJsonSchema)) then
    req.response_format = { type = "text" }
  else
    for _, k in ipairs({ "responseMimeType", "responseSchema", "responseJsonSchema" }) do
      if present(gc[k]) then
        gextra[k] = gc[k]
      end
    end
  end
  if next(gextra) then
    extra.generationConfig = gextra
  end
  return true
end

local KNOWN = set { "contents", "systemInstruction", "generationConfig", "tools", "toolConfig", "model" }

-- decode_request(doc, headers, path) -> req, info ({model, stream,
-- include_usage}), or nil, message naming the field. path: the request's
-- (/v1beta/models/{model}:generateContent or :streamGenerateContent).
function _M.decode_request(doc, _, path)
  if type(doc) ~= "table" then
    return nil, "the request body must be a JSON object"
  end
  local model, method, query = _M.parse_path(path)
  if path ~= nil and not model then
    return fail("path", "must be /v1beta/models/{model}:generateContent or :streamGenerateContent (or /v1/...)")
  end
  if method and method ~= "generateContent" and method ~= "streamGenerateContent" then
    return fail("path", fmt("unknown method '%s' (generateContent or streamGenerateContent)", method))
  end
  if method == "streamGenerateContent" and _M.query_param(query, "alt") ~= "sse" then
    return fail("alt", "streamGenerateContent is served as server-sent events only: add ?alt=sse")
  end
  local messages, err = decode_contents(doc.contents)
  if not messages then
    return nil, err
  end
  if present(doc.systemInstruction) then
    local sys
    sys, err = decode_system(doc.systemInstruction)
    if err then
      return nil, err
    end
    if sys then
      table.insert(messages, 1, sys)
    end
  end
  local req = { messages = messages }
  local extra = {}
  for k, v in pairs(doc) do
    if not KNOWN[k] and v ~= null then
      extra[k] = v
    end
  end
  if present(doc.tools) then
    req.tools, err = decode_tools(doc.tools)
    if not req.tools then
      return nil, err
    end
  end
  if present(doc.toolConfig) then
    local ok, terr = decode_tool_config(doc.toolConfig, req, extra)
    if not ok then
      return nil, terr
    end
  end
  if present(doc.generationConfig) then
    local ok, gerr = decode_generation(doc.generationConfig, req, extra)
    if not ok then
      return nil, gerr
    end
  end
  if next(extra) then
    req.extra = { api = "gemini", fields = extra }
  end
  return req, { model = model, stream = method == "streamGenerateContent", include_usage = true }
end

-- Requests: canonical -> Gemini --------------------------------------------

-- Each part type's attributes the encoder writes.
local ENCODED = common.encoded {
  tool_result = { "is_error" },
  thinking = { "type", "text", "signature", "extra" },
}
local encoder = common.encoder("gemini", ENCODED)
local cannot, merge_extra, check_keys = encoder.cannot, encoder.merge_extra, encoder.check_keys
local write_fields = encoder.write_fields

-- Whether an id is one made here (never sent to Gemini).
local function own_id(id)
  return type(id) == "string" and id:sub(1, 6) ~= "gcall_" and id or nil
end

local DETAIL_OUT = { low = "MEDIA_RESOLUTION_LOW", high = "MEDIA_RESOLUTION_HIGH" }

-- An image or document part: inlineData or fileData.
local function media_json(p, where)
  local s = p.source
  local out
  local display = p.filename or p.title
  if s.type == "base64" then
    out = { inlineData = { mimeType = s.media_type, data = s.data, displayName = display } }
  elseif s.type == "url" then
    out = { fileData = { fileUri = s.url, mimeType = url_type(s.url), displayName = display } }
  elseif s.type == "text" then
    out = { text = s.data }
  else
    cannot(fmt("%s: a %s by %s", where, p.type, tostring(s.type)))
  end
  if p.detail and p.detail ~= "auto" then
    out.mediaResolution = { level = DETAIL_OUT[p.detail] }
  end
  return out
end

-- A tool call's arguments (JSON text) as a functionCall's args object.
local function args_of(arguments, where)
  if not arguments:find("%S") then
    return json.object()
  end
  local v = json.decode(arguments)
  if type(v) ~= "table" or json.is_array(v) or #v > 0 then
    cannot(where .. ".arguments: not a JSON object")
  end
  return next(v) == nil and json.object() or v
end

-- A tool result's content as a functionResponse's response (and parts).
local function response_json(p, where)
  local c = p.content
  local text, media
  if type(c) == "string" then
    text = c
  elseif type(c) == "table" then
    local texts = {}
    for i, q in ipairs(c) do
      local w = fmt("%s.content[%d]", where, i - 1)
      if q.type == "text" then
        texts[#texts + 1] = q.text
      elseif q.type == "image" or q.type == "document" then
        if q.source.type == "text" then
          texts[#texts + 1] = q.source.data
        else
          media = media or json.array()
          media[#media + 1] = media_json(q, w)
        end
      elseif q.type == "opaque" and q.api == "gemini" then
        media = media or json.array()
        media[#media + 1] = q.value
      else
        cannot(fmt("%s: a %s in a tool result", w, tostring(q.type)))
      end
    end
    text = concat(texts)
  end
  local obj
  if text and text:find("^%s*{") then
    local v = json.decode(text)
    if type(v) == "table" and not json.is_array(v) and #v == 0 then
      obj = next(v) == nil and json.object() or v
    end
  end
  local response
  if p.is_error then
    response = { error = obj or text or "" }
  else
    response = obj or { output = text or "" }
  end
  return response, media
end

local function encode_part(p, where, names)
  check_keys(p, where)
  local t = p.type
  local out
  if t == "text" then
    out = { text = p.text, thoughtSignature = p.signature }
  elseif t == "thinking" then
    out = { text = p.text, thought = true, thoughtSignature = p.signature }
  elseif t == "image" or t == "document" then
    out = media_json(p, where)
  elseif t == "tool_call" then
    names[p.id] = p.name
    out = { functionCall = { name = p.name, args = args_of(p.arguments, where), id = own_id(p.id) },
      thoughtSignature = p.signature }
  elseif t == "tool_result" then
    local response, media = response_json(p, where)
    out = { functionResponse = { name = names[p.id] or p.id, id = own_id(p.id), response = response,
      parts = media } }
  else -- opaque
    if p.api ~= "gemini" then
      cannot(fmt("%s: a %s part", where, tostring(p.api)))
    end
    return p.value
  end
  return merge_extra(out, p.extra, where)
end

local function encode_parts(content, where, names, out)
  out = out or json.array()
  if type(content) == "string" then
    out[#out + 1] = { text = content }
    return out
  end
  for i, p in ipairs(content) do
    out[#out + 1] = encode_part(p, fmt("%s.content[%d]", where, i - 1), names)
  end
  return out
end

local function encode_messages(list, body)
  if list[#list].role == "assistant" then
    cannot("prefill (a last assistant message)")
  end
  local contents = json.array()
  local system
  local names = {} -- tool-call id -> function name
  local tool_turn -- the user content the last tool message made
  for i, m in ipairs(list) do
    local where = fmt("messages[%d]", i - 1)
    for k in pairs(m) do
      if k ~= "role" and k ~= "content" and k ~= "extra" then
        cannot(where .. "." .. k)
      end
    end
    local role = m.role
    if role == "system" or role == "developer" then
      system = system or { parts = json.array() }
      encode_parts(m.content, where, names, system.parts)
      merge_extra(system, m.extra, where)
    elseif role == "tool" then
      if tool_turn then
        encode_parts(m.content, where, names, tool_turn.parts)
      else
        tool_turn = { role = "user", parts = encode_parts(m.content, where, names) }
        contents[#contents + 1] = tool_turn
      end
      merge_extra(tool_turn, m.extra, where)
    elseif role == "user" and tool_turn then
      encode_parts(m.content, where, names, tool_turn.parts)
      merge_extra(tool_turn, m.extra, where)
      tool_turn = nil
    else
      tool_turn = nil
      contents[#contents + 1] = merge_extra({ role = role == "assistant" and "model" or "user",
        parts = encode_parts(m.content, where, names) }, m.extra, where)
    end
  end
  body.contents = contents
  body.systemInstruction = system
end

local function generation(body)
  local g = body.generationConfig
  if not g then
    g = {}
    body.generationConfig = g
  end
  return g
end

local function to_generation(name)
  return function(body, v)
    generation(body)[name] = v
  end
end

local function encode_tools(body, tools)
  local decls = json.array()
  local out = json.array()
  for i, t in ipairs(tools) do
    local where = fmt("tools[%d]", i - 1)
    if t.type == "opaque" then
      if t.api ~= "gemini" then
        cannot(fmt("%s: a %s tool", where, tostring(t.api)))
      end
      out[#out + 1] = t.value
    else
      for k in pairs(t) do
        if k ~= "name" and k ~= "description" and k ~= "parameters" and k ~= "extra" then
          cannot(where .. "." .. k)
        end
      end
      local params = t.parameters
      if params and next(params) == nil then
        params = nil
      end
      decls[#decls + 1] = merge_extra({ name = t.name, description = t.description, parametersJsonSchema = params },
        t.extra, where)
    end
  end
  if #decls > 0 then
    table.insert(out, 1, { functionDeclarations = decls })
  end
  body.tools = out
end

local MODES = { auto = "AUTO", none = "NONE", required = "ANY" }
local LEVELS = { minimal = "MINIMAL", low = "LOW", medium = "MEDIUM", high = "HIGH", xhigh = "XHIGH", max = "XHIGH" }

local REQUEST = {
  messages = function(body, v)
    encode_messages(v, body)
  end,
  max_tokens = to_generation("maxOutputTokens"),
  temperature = to_generation("temperature"),
  top_p = to_generation("topP"),
  top_k = to_generation("topK"),
  seed = to_generation("seed"),
  presence_penalty = to_generation("presencePenalty"),
  frequency_penalty = to_generation("frequencyPenalty"),
  top_logprobs = to_generation("logprobs"),
  stop = function(body, v)
    local list = json.array()
    for i, s in ipairs(v) do
      list[i] = s
    end
    generation(body).stopSequences = list
  end,
  logprobs = function(body, v)
    if v then
      generation(body).responseLogprobs = true
    end
  end,
  n = function(body, v)
    if v > 1 then
      generation(body).candidateCount = v
    end
  end,
  user = function()
    cannot("user")
  end,
  metadata = function()
    cannot("metadata")
  end,
  parallel_tool_calls = function()
    cannot("parallel_tool_calls")
  end,
  tools = encode_tools,
  tool_choice = function(body, v)
    local fc
    if type(v) == "table" then
      fc = { mode = "ANY", allowedFunctionNames = json.array({ v.name }) }
    else
      fc = { mode = MODES[v] }
    end
    body.toolConfig = { functionCallingConfig = fc }
  end,
  response_format = function(body, v)
    if v.type == "json_schema" then
      local g = generation(body)
      g.responseMimeType, g.responseJsonSchema = "application/json", v.schema
    elseif v.type == "json_object" then
      generation(body).responseMimeType = "application/json"
    end
  end,
  reasoning = function(body, r)
    local tc = {}
    tc.thinkingBudget = r.budget_tokens
    local effort = r.effort
    if effort == "none" then
      tc.thinkingBudget = tc.thinkingBudget or 0
    elseif effort then
      tc.thinkingLevel = LEVELS[effort]
    end
    if r.mode == "disabled" then
      tc.thinkingBudget = tc.thinkingBudget or 0
    elseif (r.mode == "enabled" or r.mode == "adaptive") and not (tc.thinkingBudget or tc.thinkingLevel) then
      tc.thinkingBudget = -1
    end
    if r.display then
      tc.includeThoughts = r.display == "summarized"
    end
    if next(tc) then
      generation(body).thinkingConfig = tc
    end
  end,
  stream_options = ignore, -- a stream reports its usage anyway
  extra = ignore, -- merged last
  continue_from = ignore, -- after the messages
  policy = ignore,
  raw = ignore,
}

-- encode_request(req, opts) -> the wire body (a table for aiorch.json.encode).
-- req: canonical.normalize's. The model and the stream flag go in the URL
-- (the adapter's). Raises on a field it cannot write (canonical.unsupported
-- refuses those).
function _M.encode_request(req)
  local body = {}
  write_fields(REQUEST, body, req)
  -- Continuing an answer another provider began: it is ours so far.
  local partial = req.continue_from
  if type(partial) == "string" and partial ~= "" then
    local c = body.contents
    c[#c + 1] = { role = "model", parts = json.array({ { text = partial } }) }
    c[#c + 1] = { role = "user", parts = json.array({ { text = util.CONTINUE } }) }
  end
  merge_extra(body, req.extra, "extra")
  return body
end

-- Responses: Gemini -> canonical ---------------------------------------------

-- Gemini's finish reasons -> the normalised ones (docs/canonical.md).
local FINISH = {
  STOP = "stop", MAX_TOKENS = "length", CONTINUATION = "length",
  SAFETY = "content_filter", RECITATION = "content_filter", BLOCKLIST = "content_filter",
  PROHIBITED_CONTENT = "content_filter", SPII = "content_filter", IMAGE_SAFETY = "content_filter",
  IMAGE_PROHIBITED_CONTENT = "content_filter", IMAGE_RECITATION = "content_filter", MODEL_ARMOR = "content_filter",
}

local function finish_of(reason, calls)
  if type(reason) ~= "string" then
    return nil
  end
  if reason == "STOP" and calls then
    return "tool_calls"
  end
  return FINISH[reason] or "other"
end
_M.finish_of = finish_of

local function usage_of(u)
  if type(u) ~= "table" then
    return nil
  end
  local p, t = num(u.promptTokenCount), num(u.toolUsePromptTokenCount)
  local c, th = num(u.candidatesTokenCount), num(u.thoughtsTokenCount)
  return {
    input_tokens = (p or t) and (p or 0) + (t or 0),
    output_tokens = (c or th) and (c or 0) + (th or 0),
    cached_input_tokens = num(u.cachedContentTokenCount),
    reasoning_tokens = th,
  }
end

-- A 64-bit FNV-1a of s as hex: the stable part of an id made for a call.
local function hash_hex(s)
  local h = -3750763034362895579 -- 0xcbf29ce484222325
  for i = 1, #s do
    h = (h ~ byte(s, i)) * 0x100000001b3
  end
  return fmt("%016x", h)
end

-- The stable part of the ids made for an answer's calls: its responseId
-- when it is a plain word, else a hash of what it says.
local function id_base(response_id, seed)
  if type(response_id) == "string" and response_id:find("^[%w_%-]+$") and #response_id <= 64 then
    return response_id
  end
  return hash_hex(seed)
end

-- A candidate's parts -> canonical parts; calls counts the calls before.
local function candidate_parts(c, base, idx)
  local parts, calls = {}, 0
  local content = type(c.content) == "table" and c.content or EMPTY
  for _, p in ipairs(type(content.parts) == "table" and content.parts or EMPTY) do
    if type(p) == "table" then
      local sig = str(p.thoughtSignature)
      if type(p.text) == "string" then
        add_part(parts, { type = p.thought == true and "thinking" or "text", text = p.text, signature = sig })
      elseif type(p.functionCall) == "table" and type(p.functionCall.name) == "string" then
        local fc = p.functionCall
        local args = type(fc.args) == "table" and next(fc.args) ~= nil and fc.args or json.object()
        local arguments = json.encode_safe(args) or "{}"
        calls = calls + 1
        parts[#parts + 1] = { type = "tool_call", name = fc.name, arguments = arguments, signature = sig,
          id = str(fc.id) or fmt("gcall_%s_%d_%d", base(fc.name .. arguments), idx, calls - 1) }
      else
        parts[#parts + 1] = { type = "opaque", api = "gemini", value = p }
      end
    end
  end
  return parts, calls
end

-- The result of a reply whose prompt was blocked: nil, kind, message.
local function blocked(doc)
  local pf = type(doc.promptFeedback) == "table" and doc.promptFeedback or EMPTY
  local reason = str(pf.blockReason)
  if reason then
    return nil, "content_filter", "provider error: the prompt was blocked (" .. util.excerpt(reason, 100) .. ")"
  end
  return nil
end

-- decode_response(doc) -> result, or nil, kind, message. doc: a decoded
-- 2xx body (aiorch.json.decode, so that [] stays an array).
function _M.decode_response(doc)
  if type(doc) ~= "table" then
    return nil, "parse", "reply is not an object"
  end
  local cands = doc.candidates
  if type(cands) ~= "table" or #cands == 0 then
    local _, kind, msg = blocked(doc)
    if kind then
      return nil, kind, msg
    end
    return nil, "parse", "reply has no candidates"
  end
  local function base(seed)
    return id_base(doc.responseId, seed)
  end
  local list = {}
  for i, c in ipairs(cands) do
    if type(c) == "table" then
      local idx = tointeger(c.index) or i - 1
      local parts, calls = candidate_parts(c, base, idx)
      local provider = str(c.finishReason)
      list[#list + 1] = { index = idx, content = parts, response_text = text_of(parts),
        finish_reason = finish_of(provider, calls > 0), provider_finish_reason = provider,
        logprobs = type(c.logprobsResult) == "table" and c.logprobsResult or nil }
    end
  end
  if #list == 0 then
    return nil, "parse", "reply has no candidates"
  end
  sort(list, function(a, b) return a.index < b.index end)
  local one = list[1]
  return {
    content = one.content,
    text = one.response_text,
    choices = #list > 1 and list or nil,
    model = str(doc.modelVersion),
    finish_reason = one.finish_reason,
    provider_finish_reason = one.provider_finish_reason,
    usage = usage_of(doc.usageMetadata) or {},
    logprobs = one.logprobs,
    upstream = { id = str(doc.responseId) },
  }
end

-- Responses: canonical -> Gemini ---------------------------------------------

local FINISH_OUT = { stop = "STOP", tool_calls = "STOP", length = "MAX_TOKENS", content_filter = "SAFETY",
  refusal = "SAFETY", other = "OTHER" }

-- The finish reason of a response (or a choice of one) in Gemini's words.
local function finish_out(f, m, provider)
  if m.api == "gemini" and type(provider) == "string" then
    return provider
  end
  return FINISH_OUT[canonical.finish_reason(f) or "stop"] or "STOP"
end

-- Every choice of the results, in order: {content, text, finish, logprobs}.
local function each_choice(results)
  local out = {}
  for _, r in ipairs(results) do
    local m = r.metadata or EMPTY
    local own = m.api == "gemini"
    if type(r.choices) == "table" and #r.choices > 1 then
      for _, c in ipairs(r.choices) do
        out[#out + 1] = { content = c.content, text = c.response_text or "",
          finish = finish_out(c.finish_reason, m, c.provider_finish_reason), logprobs = own and c.logprobs or nil }
      end
    else
      out[#out + 1] = { content = r.content, text = r.response_text or "",
        finish = finish_out(m.finish_reason, m, m.provider_finish_reason), logprobs = own and m.logprobs or nil }
    end
  end
  return out
end

local function usage_table(results)
  local i, o, cached, reasoning = 0, 0, nil, nil
  for _, r in ipairs(results) do
    local u = r.metadata and r.metadata.usage or EMPTY
    i, o = i + tokens(u.input_tokens), o + tokens(u.output_tokens)
    if type(u.cached_input_tokens) == "number" then
      cached = (cached or 0) + tokens(u.cached_input_tokens)
    end
    if type(u.reasoning_tokens) == "number" then
      reasoning = (reasoning or 0) + tokens(u.reasoning_tokens)
    end
  end
  return { promptTokenCount = i, candidatesTokenCount = max(o - (reasoning or 0), 0), totalTokenCount = i + o,
    thoughtsTokenCount = reasoning, cachedContentTokenCount = cached }
end

-- A canonical part of an answer as a Gemini part, or nil (no such thing).
local function answer_part(p)
  local t = p.type
  if t == "text" then
    return { text = p.text, thoughtSignature = p.signature }
  elseif t == "thinking" then
    return { text = p.text, thought = true, thoughtSignature = p.signature }
  elseif t == "tool_call" then
    local args = json.object()
    if type(p.arguments) == "string" and p.arguments:find("%S") then
      local v = json.decode(p.arguments)
      if type(v) == "table" and not json.is_array(v) and #v == 0 and next(v) ~= nil then
        args = v
      end
    end
    return { functionCall = { id = p.id, name = p.name, args = args }, thoughtSignature = p.signature }
  elseif t == "opaque" and p.api == "gemini" and json.encode_safe(p.value) then
    return p.value -- (a value JSON cannot hold is left out)
  end
  return nil
end

local function candidate_of(i, c)
  local parts = json.array()
  if type(c.content) == "table" then
    for _, p in ipairs(c.content) do
      parts[#parts + 1] = answer_part(p)
    end
  elseif c.text ~= "" then
    parts[1] = { text = c.text }
  end
  return { content = { role = "model", parts = parts }, finishReason = c.finish, index = i - 1,
    logprobsResult = c.logprobs }
end

-- encode_response(results, id, model) -> a GenerateContentResponse's JSON
-- text: one candidate per result (per choice of a result that has several).
function _M.encode_response(results, id, model)
  local first = results[1]
  local cands = json.array()
  for i, c in ipairs(each_choice(results)) do
    cands[i] = candidate_of(i, c)
  end
  return json.encode({ candidates = cands, usageMetadata = usage_table(results),
    modelVersion = first and first.metadata and first.metadata.model or model, responseId = id })
end

-- Streams: Gemini -> canonical events ---------------------------------------

local Decoder = {}
Decoder.__index = Decoder
_M.Decoder = Decoder

function _M.stream_decoder()
  return setmetatable({ parts = {}, choices = {}, events = 0 }, Decoder)
end

function Decoder:choice_state(idx)
  local st = self.choices[idx]
  if not st then
    st = { parts = {}, calls = 0 }
    self.choices[idx] = st
  end
  return st
end

local function emit(out, ev, sse, idx)
  ev.raw = sse
  if idx ~= 0 then
    ev.choice = idx
  end
  out[#out + 1] = ev
end

-- One candidate of a chunk: its events appended to out.
function Decoder:decode_candidate(c, out, sse, pos)
  local idx = tointeger(c.index) or pos - 1
  local st = self:choice_state(idx)
  local reason = str(c.finishReason)
  if reason then
    st.finish = reason
  end
  if type(c.logprobsResult) == "table" then
    st.logprobs = c.logprobsResult
  end
  local content = type(c.content) == "table" and c.content or EMPTY
  for _, p in ipairs(type(content.parts) == "table" and content.parts or EMPTY) do
    if type(p) == "table" then
      local sig = str(p.thoughtSignature)
      if type(p.text) == "string" then
        local kind = p.thought == true and "thinking" or "text"
        add_part(st.parts, { type = kind, text = p.text, signature = sig })
        if kind == "text" then
          if idx == 0 and p.text ~= "" then
            self.parts[#self.parts + 1] = p.text
          end
          if p.text ~= "" or sig then
            emit(out, { type = "text", text = p.text, signature = sig }, sse, idx)
          end
        else
          if p.text ~= "" then
            emit(out, { type = "thinking", text = p.text }, sse, idx)
          end
          if sig then
            emit(out, { type = "thinking_signature", signature = sig }, sse, idx)
          end
        end
      elseif type(p.functionCall) == "table" and type(p.functionCall.name) == "string" then
        local fc = p.functionCall
        local args = type(fc.args) == "table" and next(fc.args) ~= nil and fc.args or json.object()
        local arguments = json.encode_safe(args) or "{}"
        local i = st.calls
        st.calls = i + 1
        local id = str(fc.id) or fmt("gcall_%s_%d_%d", id_base(self.response_id, fc.name .. arguments), idx, i)
        st.parts[#st.parts + 1] = { type = "tool_call", id = id, name = fc.name, arguments = arguments,
          signature = sig }
        emit(out, { type = "tool_call", index = i, id = id, name = fc.name, signature = sig }, sse, idx)
        emit(out, { type = "tool_arguments", index = i, text = arguments }, sse, idx)
      else
        st.parts[#st.parts + 1] = { type = "opaque", api = "gemini", value = p }
      end
    end
  end
end

-- event(sse) -> one canonical event or a list of them; {type = "meta"}
-- for a chunk without content. sse: {event, data}.
function Decoder:event(sse)
  self.events = self.events + 1
  if self.err then
    return nil -- what follows an error is not relayed: the caller ends the stream its own way
  end
  -- A functionCall's args become JSON text again: [] must stay an array.
  local data = sse.data or ""
  local decode = data:find('"functionCall"', 1, true) and json.decode or json.decode_plain
  local doc, err = decode(data)
  if type(doc) ~= "table" then
    self.err = { "parse", "malformed stream chunk: " .. (err or "not an object") }
    return nil
  end
  if present(doc.error) then
    self.err = { self.classify(doc.error) }
    return nil
  end
  self.model = str(doc.modelVersion) or self.model
  self.response_id = self.response_id or str(doc.responseId)
  local u = usage_of(doc.usageMetadata)
  if u then
    self.usage = u
  end
  local out = {}
  local cands = doc.candidates
  if type(cands) == "table" and #cands > 0 then
    for pos, c in ipairs(cands) do
      if type(c) == "table" then
        self:decode_candidate(c, out, sse, pos)
      end
    end
  elseif not self.choices[0] then
    local _, kind, msg = blocked(doc)
    if kind then
      self.err = { kind, msg }
      return nil
    end
  end
  return events(out, sse)
end

-- result() -> the result as decode_response gives it, or nil, kind, message.
function Decoder:result()
  if self.err then
    return nil, self.err[1], self.err[2], self.err[3]
  end
  local first = self.choices[0]
  if not (first and first.finish) then
    return nil, "stream_cut", fmt("stream ended after %d events without a finishReason", self.events)
  end
  local n = choice_count(self.choices)
  local list = {}
  for idx = 0, n - 1 do
    local st = self.choices[idx] or { parts = {}, calls = 0 }
    list[idx + 1] = { index = idx, content = st.parts, response_text = text_of(st.parts),
      finish_reason = finish_of(st.finish, st.calls > 0), provider_finish_reason = st.finish, logprobs = st.logprobs }
  end
  return choices_result(list, concat(self.parts), self.model, self.usage, { id = self.response_id })
end

-- An error object in a stream chunk -> kind, message (the adapter sets
-- its own classification; this is the default).
function Decoder.classify(e)
  local msg = type(e) == "table" and (str(e.message) or str(e.status)) or str(e) or "unknown error"
  return "server_error", "provider error: " .. util.excerpt(msg, 500)
end

-- Streams: canonical events -> Gemini ---------------------------------------

local Encoder = {}
Encoder.__index = Encoder
_M.Stream = Encoder

-- stream_encoder(id, model) -> an encoder whose methods return the bytes
-- to send. Every chunk is a whole GenerateContentResponse. Each answer's
-- latest part is held back, so that the last chunk carries content along
-- with the finish reason (clients keep only chunks with content); a tool
-- call is held until its arguments are complete.
function _M.stream_encoder(id, model)
  return setmetatable({ id = id, model = model, held = {} }, Encoder)
end

function Encoder:chunk(r, part, finish, usage)
  local cand = { index = r, finishReason = finish,
    content = { role = "model", parts = json.array({ part or { text = "" } }) } }
  return "data: " .. json.encode({ candidates = json.array({ cand }), modelVersion = self.model,
    responseId = self.id, usageMetadata = usage }) .. "\n\n"
end

-- The bytes of answer r's held part (and nothing held after).
function Encoder:flush(r)
  local h = self.held[r]
  if not h then
    return ""
  end
  self.held[r] = nil
  return self:chunk(r, self.part_of(h))
end

function Encoder.part_of(h)
  if h.call then
    local args = json.object()
    local text = concat(h.args)
    if text:find("%S") then
      local v = json.decode(text)
      if type(v) == "table" and not json.is_array(v) and #v == 0 and next(v) ~= nil then
        args = v
      end
    end
    return { functionCall = { id = h.id, name = h.name, args = args }, thoughtSignature = h.signature }
  end
  return h.part
end

function Encoder:start(model)
  self.model = model or self.model
  return ""
end

function Encoder.open_choice()
  return ""
end

-- Takes over a stream that was relayed as an upstream sent it: each of
-- Gemini's chunks stands alone.
function Encoder.resume()
  return ""
end

-- Holds a part of answer r, sending the one held before.
function Encoder:hold(r, h)
  local out = self:flush(r)
  self.held[r] = h
  return out
end

-- event(ev, r) -> the bytes of one canonical event of answer r.
function Encoder:event(e, r)
  r = r or 0
  local t = e.type
  if t == "text" then
    return self:hold(r, { part = { text = e.text, thoughtSignature = e.signature } })
  elseif t == "thinking" then
    return self:hold(r, { part = { text = e.text, thought = true } })
  elseif t == "thinking_signature" then
    local h = self.held[r]
    if h and h.part and h.part.thought and not h.part.thoughtSignature then
      h.part.thoughtSignature = e.signature
      return ""
    end
    return self:hold(r, { part = { text = "", thought = true, thoughtSignature = e.signature } })
  elseif t == "tool_call" then
    return self:hold(r, { call = true, index = e.index or 0, id = e.id, name = e.name, signature = e.signature,
      args = {} })
  elseif t == "tool_arguments" then
    local h = self.held[r]
    if not (h and h.call and h.index == (e.index or 0)) then
      local out = self:hold(r, { call = true, index = e.index or 0, id = "", name = "", args = {} })
      self.held[r].args[1] = e.text
      return out
    end
    h.args[#h.args + 1] = e.text
    return ""
  end
  return "" -- meta, redacted thinking: nothing Gemini can say
end

-- The end of a successful stream: each answer's held part with its finish
-- reason; the usage on the last chunk.
function Encoder:finish(results)
  local out = {}
  local choices = each_choice(results)
  for i, c in ipairs(choices) do
    local r = i - 1
    local h = self.held[r]
    self.held[r] = nil
    out[#out + 1] = self:chunk(r, h and self.part_of(h), c.finish, i == #choices and usage_table(results) or nil)
  end
  for r in pairs(self.held) do -- answers the results do not list
    out[#out + 1] = self:flush(r)
  end
  return concat(out)
end

-- A stream that broke after it began: Gemini's error object as a chunk,
-- which clients raise.
function Encoder.error(_, status, message)
  return "data: " .. _M.error_body(status, message) .. "\n\n"
end

return _M
