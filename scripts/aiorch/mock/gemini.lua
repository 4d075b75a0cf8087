-- The mock's Gemini generateContent (scripts/aiorch/mock.lua serves it):
--   POST /v1beta/models/{model}:generateContent
--   POST /v1beta/models/{model}:streamGenerateContent?alt=sse
--   GET  /v1beta/models
-- (and /v1/ the same, as Google's clients call it by default)
-- with the key in x-goog-api-key or ?key=. The directives, faults and
-- behaviour are the mock's (see the top of mock.lua), in Gemini's shapes:
--   tools           functionDeclarations (parametersJsonSchema, or
--                   parameters in Gemini's upper-case schema); toolConfig
--                   mode AUTO (the default with tools), NONE, ANY (with
--                   allowedFunctionNames); calls have no id, like the older
--                   models; a user content of functionResponses answers the
--                   calls before it by name (or id)
--   JSON output     responseMimeType application/json with responseSchema
--                   or responseJsonSchema: an instance; without: {"answer"}
--   thinking        thinkingConfig with a budget other than 0 or a level:
--                   thoughtsTokenCount > 0, and signatures: includeThoughts
--                   adds a thought part first (its signature signs its
--                   text, all the thought pieces before it joined); else
--                   the first functionCall, or the last text piece, carries
--                   one. Every signature sent back is verified
--                   (req.thinking_verified, header x-mock-thinking-verified)
--                   and a wrong one gets a 400
--   caching         a prompt of 1024 tokens or more whose prefix was seen:
--                   cachedContentTokenCount (as the OpenAI mock counts it)
--   stop, n         stopSequences cut the text (finishReason STOP);
--                   candidateCount: candidate k > 0 ends " (candidate k)"
--   finish_reason   a directive: the answer ends with it; a content block
--                   (SAFETY, RECITATION, ...) keeps the first half of the text
-- Validation: a 400 INVALID_ARGUMENT for no contents, a bad role, a part
-- without data, a functionCall in a user turn, a functionResponse that
-- answers no call, a bad function name, parameters with
-- parametersJsonSchema, toolConfig without tools or naming a function that
-- is not there, more than 5 stop sequences, candidateCount outside 1..8,
-- temperature outside 0..2, responseSchema with responseJsonSchema, a
-- thinking budget with a thinking level, inline data whose bytes are not
-- of its media type.
local json = require "aiorch.json"
local cjson = require "cjson.safe"

local concat = table.concat
local fmt = string.format
local lower, upper = string.lower, string.upper
local ipairs, pairs, next, type, tostring, tonumber = ipairs, pairs, next, type, tostring, tonumber
local tointeger = math.tointeger
local encode = cjson.encode
local null = cjson.null

local _M = {}

local H -- the mock's helpers (bind)

local DEFAULT_MODEL = "gemini-2.5-flash"
local MAX_STOPS, MAX_CANDIDATES = 5, 8
local IMAGE_MEDIA = { ["image/png"] = true, ["image/jpeg"] = true, ["image/webp"] = true, ["image/heic"] = true,
  ["image/heif"] = true, ["image/gif"] = true }
-- Finish reasons after which only the first half of the text was sent.
local BLOCKS = { SAFETY = true, RECITATION = true, BLOCKLIST = true, PROHIBITED_CONTENT = true, SPII = true }

local STATUS = { [400] = "INVALID_ARGUMENT", [401] = "UNAUTHENTICATED", [403] = "PERMISSION_DENIED",
  [404] = "NOT_FOUND", [429] = "RESOURCE_EXHAUSTED", [500] = "INTERNAL", [503] = "UNAVAILABLE",
  [529] = "UNAVAILABLE" }

-- Gemini's error object: {"error":{"code","message","status"}}.
function _M.error_body(code, message, status)
  return concat { '{"error":{"code":', code, ',"message":', encode(message), ',"status":',
    encode(status or STATUS[code] or (code >= 500 and "INTERNAL" or "INVALID_ARGUMENT")), "}}" }
end

local function fault_body(code, message, status)
  return { code, _M.error_body(code, message, status) }
end

-- The bodies of the status faults: {status, body}.
_M.ERROR_BODY = {
  ["429"] = fault_body(429, "Resource has been exhausted (e.g. check quota)."),
  ["500"] = fault_body(500, "An internal error has occurred. Please retry or report in "
    .. "https://developers.generativeai.google/guide/troubleshooting"),
  ["529"] = fault_body(529, "The model is overloaded. Please try again later."),
  ["401"] = fault_body(401, "API key not valid. Please pass a valid API key."),
  ["400"] = fault_body(400, "Request contains an invalid argument."),
  ["403"] = fault_body(403, "Method doesn't allow unregistered callers (callers without established identity). "
    .. "Please use API Key or other form of API consumer identity to call this API."),
  ["503"] = fault_body(503, "The model is overloaded. Please try again later."),
  error200 = fault_body(500, "An internal error has occurred. Please retry or report in "
    .. "https://developers.generativeai.google/guide/troubleshooting"),
}
_M.STREAM_ERROR = "data: " .. _M.ERROR_BODY.error200[2] .. "\n\n"
_M.MALFORMED = 'data: {"candidates":[{"content":{"parts":[{"text":"trunc\n\n'
_M.MODELS = '{"models":['
  .. '{"name":"models/gemini-2.5-flash","version":"001","displayName":"Gemini 2.5 Flash",'
  .. '"supportedGenerationMethods":["generateContent","streamGenerateContent"]},'
  .. '{"name":"models/gemini-2.5-pro","version":"2.5","displayName":"Gemini 2.5 Pro",'
  .. '"supportedGenerationMethods":["generateContent","streamGenerateContent"]}]}'

-- The request's key: x-goog-api-key, else ?key=.
function _M.key_of(req)
  local k = req.headers["x-goog-api-key"]
  if k then
    return k
  end
  local q = (req.path or ""):match("%?(.*)$")
  for name, v in (q or ""):gmatch("([^&=]+)=?([^&]*)") do
    if name == "key" then
      return (v:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
    end
  end
  return nil
end

-- The model and method of a generateContent path (either version).
local function model_verb(path)
  local model, verb = path:match("^/v1beta/models/([^/:?]+):(%a+)")
  if not model then
    model, verb = path:match("^/v1/models/([^/:?]+):(%a+)")
  end
  return model, verb
end

function _M.owns(route)
  return route:find("^/v1beta/") ~= nil or route:find("^/v1/models/[^/]+:") ~= nil
end

------------------------------------------------------------------------------
-- Reading a request

local function bad(message)
  return nil, { message = "* GenerateContentRequest." .. message .. "\n" }
end

-- Gemini's upper-case OpenAPI schema as the JSON Schema the mock fills in.
local function json_schema(s, depth)
  if type(s) ~= "table" or depth > 32 then
    return s
  end
  local out = {}
  for k, v in pairs(s) do
    if k == "type" and type(v) == "string" then
      out.type = lower(v)
    elseif type(v) == "table" then
      out[k] = json_schema(v, depth + 1)
    else
      out[k] = v
    end
  end
  return out
end

local NAME = "^[%a_][%w_%.:%-]*$"

local function read_tools(body, conv)
  local names = {}
  local tools = body.tools
  if not H.present(tools) then
    return names
  end
  if type(tools) ~= "table" then
    return bad("tools: must be a list")
  end
  local tokens = 0
  for i, t in ipairs(tools) do
    local decls = type(t) == "table" and t.functionDeclarations
    if type(decls) == "table" then
      for j, f in ipairs(decls) do
        local p = fmt("tools[%d].function_declarations[%d]", i - 1, j - 1)
        if type(f) ~= "table" or type(f.name) ~= "string" then
          return bad(p .. ".name: Function name is required.")
        end
        if #f.name > 128 or not f.name:find(NAME) then
          return bad(fmt("%s.name: Invalid function name. Must start with a letter or an underscore. Must be a-z, "
            .. "A-Z, 0-9, or contain underscores, dots, colons and dashes, with a maximum length of 128.", p))
        end
        if H.present(f.parameters) and H.present(f.parametersJsonSchema) then
          return bad(p .. ": parameters and parameters_json_schema are mutually exclusive.")
        end
        local schema = type(f.parametersJsonSchema) == "table" and f.parametersJsonSchema
          or type(f.parameters) == "table" and json_schema(f.parameters, 0) or nil
        conv.tools[#conv.tools + 1] = { name = f.name, schema = schema }
        names[f.name] = true
        tokens = tokens + H.tool_tokens(f.name, f.description, schema)
      end
    end
  end
  if tokens > 0 then
    H.add_unit(conv, tools, tokens)
  end
  return names
end

local function read_tool_config(body, conv, names)
  local any = next(names) ~= nil
  local choice = { mode = any and "auto" or "none" }
  local tc = body.toolConfig
  local fc = type(tc) == "table" and tc.functionCallingConfig
  if type(fc) == "table" then
    if not any then
      return bad("tool_config: function calling config is set without function declarations.")
    end
    local mode = fc.mode
    if mode == "NONE" then
      choice.mode = "none"
    elseif mode == "ANY" then
      choice.mode = "required"
    elseif mode ~= nil and mode ~= "AUTO" and mode ~= "VALIDATED" and mode ~= "MODE_UNSPECIFIED" then
      return bad(fmt("tool_config.function_calling_config.mode: Invalid value '%s'.", tostring(mode)))
    end
    local allowed = fc.allowedFunctionNames
    if type(allowed) == "table" and #allowed > 0 then
      if mode ~= "ANY" then
        return bad("tool_config.function_calling_config.allowed_function_names: only allowed with mode ANY.")
      end
      choice.allowed = {}
      for _, n in ipairs(allowed) do
        if not names[n] then
          return bad(fmt("tool_config.function_calling_config.allowed_function_names: '%s' is not among the "
            .. "function declarations.", tostring(n)))
        end
        choice.allowed[n] = true
      end
    end
  end
  conv.choice = choice
  return true
end

local function read_media(conv, blob, p, inline)
  local mime = blob.mimeType
  if type(mime) ~= "string" then
    return bad(p .. ".mime_type: required")
  end
  if inline then
    if type(blob.data) ~= "string" or not H.is_base64(blob.data) then
      return bad(p .. ".data: Invalid value (bytes): base64 decoding failed")
    end
    local seen = H.sniff(blob.data)
    if seen and seen ~= mime and IMAGE_MEDIA[mime] then
      return bad(fmt("%s: Unable to process input image: the data is %s, not %s.", p, seen, mime))
    end
  elseif type(blob.fileUri) ~= "string" then
    return bad(p .. ".file_uri: required")
  end
  if mime:find("^image/") then
    conv.images = conv.images + 1
    return H.IMAGE_TOKENS
  end
  conv.documents = conv.documents + 1
  return H.DOCUMENT_TOKENS
end

-- What a text part's signature signs (its pieces may come back joined).
local TEXT_SUBJECT = "text\0"

-- The signature of a part: thought text (its run), a call by its name, a text part.
local function signature_of(kind, subject)
  return H.sign(kind .. "\0" .. (subject or ""))
end
_M.signature_of = signature_of

-- Verifies the signatures of the model contents: true, whether any was
-- checked; or nil, the error.
local function check_signatures(contents)
  local run, any = {}, false
  for i, c in ipairs(contents) do
    if c.role ~= "model" then
      run = {}
    else
      for j, p in ipairs(c.parts) do
        local sig = p.thoughtSignature
        local where = fmt("contents[%d].parts[%d]", i - 1, j - 1)
        if p.thought == true and type(p.text) == "string" then
          run[#run + 1] = p.text
        end
        if H.present(sig) then
          local want
          if p.thought == true then
            want = signature_of("thought", concat(run))
            run = {}
          elseif type(p.functionCall) == "table" then
            want = signature_of("functionCall", p.functionCall.name)
          elseif type(p.text) == "string" then
            want = H.sign(TEXT_SUBJECT)
          end
          if sig ~= want then
            return bad(where .. ".thought_signature: Corrupted thought signature.")
          end
          any = true
        end
      end
    end
  end
  return true, any
end

local function function_response_text(fr)
  local r = fr.response
  if type(r) == "table" and next(r) ~= nil and next(r, next(r)) == nil and type(r.output) == "string" then
    return r.output
  end
  return json.encode_safe(r) or ""
end

local function read_contents(body, conv)
  local contents = body.contents
  if type(contents) ~= "table" or #contents == 0 then
    return bad("contents: contents is not specified")
  end
  local calls -- the calls of the model content before: {name -> count}, ids
  for i, c in ipairs(contents) do
    local p = fmt("contents[%d]", i - 1)
    if type(c) ~= "table" then
      return bad(p .. ": must be an object")
    end
    local role = c.role
    if role == nil or role == null then
      role = "user"
    end
    if role ~= "user" and role ~= "model" then
      return bad(fmt("%s.role: Please use a valid role: user, model.", p))
    end
    c.role = role
    if type(c.parts) ~= "table" or #c.parts == 0 then
      return bad(p .. ".parts: contents.parts must not be empty.")
    end
    local texts, tokens, results, made = {}, 0, {}, nil
    for j, part in ipairs(c.parts) do
      local pp = fmt("%s.parts[%d]", p, j - 1)
      if type(part) ~= "table" then
        return bad(pp .. ": must be an object")
      end
      if type(part.text) == "string" then
        if part.thought ~= true then
          texts[#texts + 1] = part.text
        end
        tokens = tokens + H.words(part.text)
      elseif type(part.inlineData) == "table" or type(part.fileData) == "table" then
        local inline = type(part.inlineData) == "table"
        local n, e = read_media(conv, inline and part.inlineData or part.fileData,
          pp .. (inline and ".inline_data" or ".file_data"), inline)
        if not n then
          return nil, e
        end
        tokens = tokens + n
      elseif type(part.functionCall) == "table" then
        local fc = part.functionCall
        if role ~= "model" then
          return bad(pp .. ".function_call: a function call must come from the model.")
        end
        if type(fc.name) ~= "string" then
          return bad(pp .. ".function_call.name: Function name is required.")
        end
        made = made or { names = {}, ids = {} }
        made.names[fc.name] = (made.names[fc.name] or 0) + 1
        if type(fc.id) == "string" and fc.id ~= "" then
          made.ids[fc.id] = true
        end
        tokens = tokens + H.words(fc.name) + H.words(json.encode_safe(fc.args) or "")
      elseif type(part.functionResponse) == "table" then
        local fr = part.functionResponse
        if role ~= "user" then
          return bad(pp .. ".function_response: a function response must come from the user.")
        end
        if type(fr.name) ~= "string" then
          return bad(pp .. ".function_response.name: Name is required.")
        end
        local n = calls and calls.names[fr.name] or 0
        local fid = type(fr.id) == "string" and fr.id ~= "" and fr.id or nil
        if n <= 0 or (fid and next(calls.ids) and not calls.ids[fid]) then
          return bad(fmt("%s.function_response: Please ensure that function response turn comes immediately after "
            .. "a function call turn, and answers one of its calls (no call named '%s').", pp, fr.name))
        end
        calls.names[fr.name] = n - 1
        local text = function_response_text(fr)
        results[#results + 1] = { id = fid or fr.name,
          text = H.utf8_head(text, H.MAX_RESULT_ECHO) }
        tokens = tokens + H.words(fr.name) + H.words(text)
      elseif next(part) == nil or (part.thoughtSignature ~= nil and next(part, next(part)) == nil) then
        return bad(pp .. ".data: required oneof field 'data' must have one initialized field")
      end
    end
    if role == "model" and made then
      -- A streamed answer comes back as one content per chunk: one turn.
      if calls and contents[i - 1].role == "model" then
        for name, k in pairs(made.names) do
          calls.names[name] = (calls.names[name] or 0) + k
        end
        for cid in pairs(made.ids) do
          calls.ids[cid] = true
        end
      else
        calls = made
      end
    elseif role == "user" then
      calls = nil
    end
    local text = concat(texts, " ")
    if role == "user" then
      if text:find("%S") then
        conv.question = text
      end
      conv.results = #results > 0 and results or nil
    end
    H.add_unit(conv, c, tokens)
  end
  if contents[#contents].role ~= "user" then
    conv.results = nil
  end
  return true
end

local function read_system(body, conv)
  local si = body.systemInstruction
  if not H.present(si) then
    return true
  end
  if type(si) ~= "table" or type(si.parts) ~= "table" then
    return bad("system_instruction.parts: must be a list")
  end
  local texts = {}
  for _, p in ipairs(si.parts) do
    if type(p) == "table" and type(p.text) == "string" then
      texts[#texts + 1] = p.text
    end
  end
  H.add_unit(conv, si, H.words(concat(texts, " ")))
  return true
end

local function read_generation(body, conv)
  local g = body.generationConfig
  if not H.present(g) then
    return true
  end
  if type(g) ~= "table" then
    return bad("generation_config: must be an object")
  end
  local t = g.temperature
  if H.present(t) and (type(t) ~= "number" or t < 0 or t > 2) then
    return bad("generation_config.temperature: must be between 0 and 2.")
  end
  local n = g.candidateCount
  if H.present(n) then
    n = tointeger(n)
    if not n or n < 1 or n > MAX_CANDIDATES then
      return bad(fmt("generation_config.candidate_count: must be between 1 and %d.", MAX_CANDIDATES))
    end
    conv.n = n
  end
  local stops = g.stopSequences
  if type(stops) == "table" then
    if #stops > MAX_STOPS then
      return bad(fmt("generation_config.stop_sequences: at most %d stop sequences are allowed.", MAX_STOPS))
    end
    conv.stops = stops
  end
  if H.present(g.responseSchema) and H.present(g.responseJsonSchema) then
    return bad("generation_config: response_schema and response_json_schema are mutually exclusive.")
  end
  if g.responseMimeType == "application/json" then
    if type(g.responseJsonSchema) == "table" then
      conv.json_schema = g.responseJsonSchema
    elseif type(g.responseSchema) == "table" then
      conv.json_schema = json_schema(g.responseSchema, 0)
    else
      conv.json_object = true
    end
  end
  local tc = g.thinkingConfig
  if type(tc) == "table" then
    local budget, level = tc.thinkingBudget, tc.thinkingLevel
    if H.present(budget) and H.present(level) then
      return bad("generation_config.thinking_config: You can only set only one of thinking budget and thinking "
        .. "level.")
    end
    if H.present(level) and not ({ MINIMAL = 1, LOW = 1, MEDIUM = 1, HIGH = 1, XHIGH = 1 })[upper(tostring(level))]
    then
      return bad(fmt("generation_config.thinking_config.thinking_level: Invalid value '%s'.", tostring(level)))
    end
    conv.thinking = budget ~= 0
    conv.include_thoughts = conv.thinking and tc.includeThoughts == true
  end
  return true
end

-- conv, or nil, {message}. Sets req.thinking_verified when signatures came back.
local function read_gemini(body, req)
  local conv = H.new_conv()
  local ok, e = read_system(body, conv)
  if not ok then
    return nil, e
  end
  local names
  names, e = read_tools(body, conv)
  if not names then
    return nil, e
  end
  ok, e = read_tool_config(body, conv, names)
  if not ok then
    return nil, e
  end
  ok, e = read_contents(body, conv)
  if not ok then
    return nil, e
  end
  local any
  ok, any = check_signatures(body.contents)
  if not ok then
    return nil, any
  end
  req.thinking_verified = any or nil
  ok, e = read_generation(body, conv)
  if not ok then
    return nil, e
  end
  return conv
end

------------------------------------------------------------------------------
-- The answer

local function usage_json(u, partial)
  if partial then
    return fmt('{"promptTokenCount":%d,"totalTokenCount":%d}', u.prompt, u.prompt)
  end
  local out = { fmt('{"promptTokenCount":%d,"candidatesTokenCount":%d,"totalTokenCount":%d', u.prompt, u.output,
    u.prompt + u.output + u.thoughts) }
  if u.cached > 0 then
    out[#out + 1] = fmt(',"cachedContentTokenCount":%d', u.cached)
  end
  if u.thoughts > 0 then
    out[#out + 1] = fmt(',"thoughtsTokenCount":%d', u.thoughts)
  end
  out[#out + 1] = fmt(',"promptTokensDetails":[{"modality":"TEXT","tokenCount":%d}]}', u.prompt)
  return concat(out)
end

local function part_json(p)
  local sig = p.signature and ',"thoughtSignature":"' .. p.signature .. '"' or ""
  if p.call then
    return concat { '{"functionCall":{"name":', encode(p.call), ',"args":', p.args, "}", sig, "}" }
  end
  return concat { '{"text":', encode(p.text), p.thought and ',"thought":true' or "", sig, "}" }
end

-- One candidate: its parts ({text, thought, call, args, signature}), its
-- output tokens and its finish reason.
local function candidate(conv, d, k, text, calls, args, thought)
  local parts, output = {}, 0
  if thought and conv.include_thoughts then
    parts[1] = { text = thought, thought = true, signature = signature_of("thought", thought) }
  end
  if calls then
    for i, t in ipairs(calls) do
      parts[#parts + 1] = { call = t.name, args = args[t.name],
        signature = conv.thinking and i == 1 and signature_of("functionCall", t.name) or nil }
      output = output + H.words(t.name) + H.words(args[t.name])
    end
    return parts, output, d.finish_reason or "STOP"
  end
  local body = k == 0 and text or fmt("%s (candidate %d)", text, k)
  body = H.cut_at_stop(body, conv.stops)
  local finish = d.finish_reason or "STOP"
  if BLOCKS[finish] then
    body = H.split(body, 2)[1] or ""
  end
  parts[#parts + 1] = { text = body,
    signature = conv.thinking and not conv.include_thoughts and H.sign(TEXT_SUBJECT) or nil }
  return parts, output + H.words(body), finish
end

local function candidate_json(k, parts, finish)
  local ps = {}
  for i, p in ipairs(parts) do
    ps[i] = part_json(p)
  end
  local ratings = BLOCKS[finish] and ',"safetyRatings":[{"category":"HARM_CATEGORY_DANGEROUS_CONTENT",'
    .. '"probability":"HIGH","blocked":true}]' or ""
  return concat { '{"content":{"parts":[', concat(ps, ","), '],"role":"model"},"finishReason":"', finish,
    '","index":', k, ratings, "}" }
end

-- The stream chunks of one candidate: {json text of the candidate, content?}.
local function candidate_chunks(k, parts, finish, d)
  local out = {}
  local function add(p, last)
    out[#out + 1] = { concat { '{"content":{"parts":[', part_json(p), '],"role":"model"}',
      last and ',"finishReason":"' .. finish .. '"' or "", ',"index":', k, "}" }, true }
  end
  for i, p in ipairs(parts) do
    local last_part = i == #parts
    if p.call then
      add(p, last_part)
    else
      local pieces = H.split(p.text, d.chunks)
      if #pieces == 0 then
        pieces[1] = ""
      end
      for j, piece in ipairs(pieces) do
        local last = j == #pieces
        add({ text = piece, thought = p.thought, signature = last and p.signature or nil }, last_part and last)
      end
    end
  end
  if #out == 0 then
    out[1] = { concat { '{"content":{"parts":[],"role":"model"},"finishReason":"', finish, '","index":', k, "}" },
      false }
  end
  return out
end

local function generate(self, req, res, d, stream)
  local body = req.json
  local conv, e = read_gemini(body, req)
  if not conv then
    return H.reject(req, res, "gemini", e)
  end
  local model = req.gemini_model or DEFAULT_MODEL
  self.seq = self.seq + 1
  local id = fmt("mock-gemini-%08d", self.seq)
  local calls = H.tool_calls(conv, d)
  local text, args, err
  if calls then
    args, err = H.arguments_of(calls)
  else
    text, err = H.json_text(conv, H.answer_text("gemini", conv, d), d)
  end
  if err then
    return H.reject(req, res, "gemini", { message = err })
  end
  local thought = conv.thinking and H.thinking_text(conv) or nil
  local cands, output = {}, 0
  for k = 0, conv.n - 1 do
    local parts, out, finish = candidate(conv, d, k, text, calls, args, thought)
    cands[#cands + 1] = { parts = parts, finish = finish }
    output = output + out
  end
  local u = { prompt = conv.input_tokens, output = output, thoughts = thought and H.words(thought) * conv.n or 0,
    cached = H.openai_cached(self, conv, model) }
  local extra = req.thinking_verified and { ["x-mock-thinking-verified"] = "true" } or nil
  local tail = concat { ',"modelVersion":', encode(model), ',"responseId":"', id, '"}' }
  if not stream then
    local cs = {}
    for k, c in ipairs(cands) do
      cs[k] = candidate_json(k - 1, c.parts, c.finish)
    end
    return H.respond_json(res, "gemini", concat { '{"candidates":[', concat(cs, ","), '],"usageMetadata":',
      usage_json(u), tail }, d, extra)
  end
  local events, content = {}, {}
  for k, c in ipairs(cands) do
    local chunks = candidate_chunks(k - 1, c.parts, c.finish, d)
    for j, ch in ipairs(chunks) do
      local final = k == #cands and j == #chunks
      events[#events + 1] = concat { 'data: {"candidates":[', ch[1], '],"usageMetadata":', usage_json(u, not final),
        tail, "\n\n" }
      content[#events] = ch[2]
    end
  end
  return H.send_stream(self, req, res, "gemini", events, content, 1, d, extra)
end

-- The route's handler (nil for another route), and whether it streams.
-- POST /v1beta/models/{model}:generateContent or :streamGenerateContent.
function _M.route(method, route)
  if method ~= "POST" then
    return nil
  end
  local model, verb = model_verb(route)
  if verb == "generateContent" or verb == "streamGenerateContent" then
    local stream = verb == "streamGenerateContent"
    return function(self, req, res, d)
      req.gemini_model = model
      return generate(self, req, res, d, stream)
    end, stream
  end
  return nil
end

-- A fault=huge answer: the JSON before and after its one text.
function _M.huge(self, body, req)
  local model = model_verb(req.path or "")
  local conv = H.new_conv()
  read_contents(type(body) == "table" and body or {}, conv)
  local tail = function(out)
    return concat { '"}],"role":"model"},"finishReason":"MAX_TOKENS","index":0}],"usageMetadata":',
      '{"promptTokenCount":', conv.input_tokens, ',"candidatesTokenCount":', out, ',"totalTokenCount":',
      conv.input_tokens + out, '},"modelVersion":', encode(model or DEFAULT_MODEL), ',"responseId":"',
      fmt("mock-gemini-%08d", self.seq), '"}' }
  end
  return '{"candidates":[{"content":{"parts":[{"text":"', tail
end

-- Binds the mock's helpers (scripts/aiorch/mock.lua); returns the module.
function _M.bind(helpers)
  H = helpers
  return _M
end

return _M
